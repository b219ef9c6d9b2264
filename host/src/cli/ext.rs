//! `ext list | check | info | estimate`.

use super::args::ExtCommand;
use super::output::{print_json, print_table};
use super::{AlreadyReported, Context as CliContext};
use anyhow::{Context, Result, anyhow, bail};
use sandboxer_credits::format_credits;
use sandboxer_host::manager::disputes::{self, DisputeTally};
use sandboxer_host::paths::HostPaths;
use sandboxer_host::runtime::{Extension, ExtensionEntry, Runtime, SandboxSpec, kind_name};
use sandboxer_host::scaffold;
use sandboxer_host::service::ServiceError;
use sandboxer_host::service::api::ExtensionListing;
use sandboxer_host::service::client::Client;
use sandboxer_host::state_db::StateDb;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

pub async fn run(command: ExtCommand, context: &CliContext) -> Result<()> {
    let paths = &context.paths;
    if let ExtCommand::New { name, lang, dir } = &command {
        let language = scaffold::Language::parse(lang).map_err(ServiceError::InvalidInput)?;
        let dir = dir.clone().unwrap_or_else(|| PathBuf::from(name));
        let written = scaffold::create(&dir, name, language).map_err(anyhow::Error::msg)?;
        println!(
            "created {} ({lang}): {}",
            dir.display(),
            written
                .iter()
                .map(|path| path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let (steps, output) = language.build_steps(name);
        println!("build it (in {}):", dir.display());
        for step in steps {
            println!("  {}", step.replace("NAME", name));
        }
        println!(
            "then: sandboxer-host ext check {}",
            dir.join(output).display()
        );
        return Ok(());
    }
    let json = match &command {
        ExtCommand::List { json }
        | ExtCommand::Check { json, .. }
        | ExtCommand::Info { json, .. }
        | ExtCommand::Estimate { json, .. } => *json,
        ExtCommand::New { .. } => false,
    };
    let mut runtime = open_runtime(paths)?;
    if !json && std::io::stderr().is_terminal() {
        runtime.on_compile(super::compile_progress());
    }
    match command {
        ExtCommand::New { .. } => unreachable!("handled above"),
        ExtCommand::List { json } => list(&runtime, context, json).await,
        ExtCommand::Check { file, json } => {
            if !file.is_file() {
                bail!("{}: no such file", file.display());
            }
            let entry = runtime.load_file(&file).await;
            if json {
                print_json(&ExtensionListing::from(&entry))?;
            }
            match &entry.status {
                Ok(extension) => {
                    if !json {
                        println!(
                            "ok: {} would load as `{}`: {} {} ({})",
                            file.display(),
                            entry.name,
                            extension.info.id,
                            extension.info.version,
                            kind_name(extension.info.kind)
                        );
                    }
                    Ok(())
                }
                Err(reason) => {
                    if !json {
                        eprintln!("error: {}: rejected: {reason}", file.display());
                    }
                    Err(AlreadyReported.into())
                }
            }
        }
        ExtCommand::Info { name, json } => {
            let extension = find(&runtime, paths, &name).await?;
            let mut details = ExtensionDetails::from(extension.as_ref());
            // Only a home that has recorded sandboxes has disputes to show.
            if paths.state_file().is_file() {
                let state = StateDb::new(paths.state_file());
                details.disputes = disputes::tally(&state, &name)?;
            }
            if json {
                return print_json(&details);
            }
            print_details(&details);
            Ok(())
        }
        ExtCommand::Estimate {
            name,
            cpu_millis,
            memory_mb,
            ttl_secs,
            template,
            json,
        } => {
            let extension = find(&runtime, paths, &name).await?;
            let spec = SandboxSpec {
                sandbox_id: "estimate-only".into(),
                profile: "cli".into(),
                template,
                cpu_millis,
                memory_mb,
                ttl_secs,
                command: Vec::new(),
                env: Vec::new(),
                network: false,
            };
            let estimate = extension.estimate_cost(&spec).await?;
            if json {
                return print_json(&serde_json::json!({
                    "extension": name,
                    "estimate": format_credits(estimate.amount),
                    "rate_per_hour": format_credits(estimate.rate_per_hour),
                }));
            }
            println!(
                "{name}: {} credits for {cpu_millis} cpu-millis, {memory_mb} MiB over {ttl_secs} s ({} credits per hour)",
                format_credits(estimate.amount),
                format_credits(estimate.rate_per_hour)
            );
            Ok(())
        }
    }
}

pub fn open_runtime(paths: &HostPaths) -> Result<Runtime> {
    Ok(open_runtime_with_state(paths)?.0)
}

/// The runtime and the state store it shares with routing.
pub fn open_runtime_with_state(paths: &HostPaths) -> Result<(Runtime, Arc<StateDb>)> {
    let state = Arc::new(StateDb::new(paths.state_file()));
    let mut runtime = Runtime::new(paths.cache_dir(), state.clone())?;
    runtime.enable_processes(paths.sandboxes_dir(), std::env::current_exe()?);
    Ok((runtime, state))
}

/// Loads the one instance called `name` (its `.wasm` only, not the whole
/// directory).
async fn find(runtime: &Runtime, paths: &HostPaths, name: &str) -> Result<Arc<Extension>> {
    let file = paths.extensions_dir.join(format!("{name}.wasm"));
    let set = if file.is_file() {
        sandboxer_host::runtime::ExtensionSet {
            entries: vec![runtime.load_file(&file).await],
        }
    } else {
        sandboxer_host::runtime::ExtensionSet {
            entries: Runtime::extension_files(&paths.extensions_dir)?
                .into_iter()
                .map(|(name, file)| ExtensionEntry {
                    name,
                    file,
                    status: Err(String::new()),
                })
                .collect(),
        }
    };
    match set.entry(name) {
        Some(ExtensionEntry {
            status: Ok(extension),
            ..
        }) => Ok(extension.clone()),
        Some(ExtensionEntry {
            status: Err(reason),
            file,
            ..
        }) => Err(anyhow!(
            "extension `{name}` ({}) is rejected: {reason}",
            file.display()
        )),
        None => {
            let known: Vec<&str> = set
                .entries
                .iter()
                .map(|entry| entry.name.as_str())
                .collect();
            let known = if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            };
            Err(anyhow!(
                "no extension named `{name}` in {} (found: {known})",
                paths.extensions_dir.display()
            ))
        }
    }
}

async fn list(runtime: &Runtime, context: &CliContext, json: bool) -> Result<()> {
    let paths = &context.paths;
    // A server owning the home lists what it serves (it reloads on change).
    let listed: Vec<ExtensionListing> =
        match Client::discover(paths, context.server.as_deref()).await? {
            Some(client) => client.list_extensions().await?,
            None => runtime
                .load_dir(&paths.extensions_dir)
                .await
                .with_context(|| "cannot list extensions".to_string())?
                .entries
                .iter()
                .map(ExtensionListing::from)
                .collect(),
        };
    if json {
        return print_json(&listed);
    }
    if listed.is_empty() {
        println!(
            "no extensions (*.wasm) in {}",
            paths.extensions_dir.display()
        );
        return Ok(());
    }
    let dash = || "-".to_string();
    let rows: Vec<Vec<String>> = listed
        .iter()
        .map(|entry| {
            vec![
                entry.name.clone(),
                entry.status.clone(),
                entry.kind.clone().unwrap_or_else(dash),
                entry.version.clone().unwrap_or_else(dash),
                entry.id.clone().unwrap_or_else(dash),
                entry.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(
        &["NAME", "STATUS", "KIND", "VERSION", "ID", "REASON"],
        &rows,
    );
    Ok(())
}

/// `ext info --json`.
#[derive(Serialize)]
struct ExtensionDetails {
    name: String,
    id: String,
    version: String,
    kind: &'static str,
    description: String,
    file: String,
    sha256: String,
    limits: sandboxer_host::runtime::Limits,
    grants: sandboxer_host::runtime::Grants,
    config: BTreeMap<String, String>,
    imports: Vec<sandboxer_host::runtime::ImportedInterface>,
    billing: sandboxer_host::runtime::BillingPolicy,
    /// What meter-actual asked above the charge policy's ceiling, so far.
    disputes: DisputeTally,
}

impl From<&Extension> for ExtensionDetails {
    fn from(extension: &Extension) -> Self {
        Self {
            name: extension.name.clone(),
            id: extension.info.id.clone(),
            version: extension.info.version.clone(),
            kind: kind_name(extension.info.kind),
            description: extension.info.description.clone(),
            file: extension.file.display().to_string(),
            sha256: extension.content_sha256.clone(),
            limits: extension.limits.clone(),
            grants: extension.grants.clone(),
            config: extension.config.clone(),
            imports: extension.imports.clone(),
            billing: extension.billing,
            disputes: DisputeTally::default(),
        }
    }
}

fn print_details(details: &ExtensionDetails) {
    println!(
        "{} ({} {}, {})",
        details.name, details.id, details.version, details.kind
    );
    println!("  {}", details.description);
    println!("file:    {}", details.file);
    println!("sha256:  {}", details.sha256);
    let fuel = details
        .limits
        .fuel
        .map_or_else(|| "unlimited".to_string(), |fuel| fuel.to_string());
    println!(
        "limits:  {} ms per call, {} MiB memory, fuel {fuel}, {} MiB key-value quota, {}",
        details.limits.timeout_ms,
        details.limits.memory_mb,
        details.limits.kv_quota_mb,
        if details.limits.reuse_instances {
            "instances reused between calls"
        } else {
            "a fresh instance per call"
        }
    );
    let network: Vec<String> = details
        .grants
        .network
        .iter()
        .map(ToString::to_string)
        .collect();
    let none_or = |items: Vec<String>| {
        if items.is_empty() {
            "none".to_string()
        } else {
            items.join(", ")
        }
    };
    println!("grants:  network {}", none_or(network));
    let programs: Vec<String> = details
        .grants
        .process
        .iter()
        .map(
            |program| match sandboxer_host::runtime::process::resolve_program(program) {
                Some(path) => format!("{program} ({})", path.display()),
                None => format!("{program} (not found on this machine)"),
            },
        )
        .collect();
    println!("         process {}", none_or(programs));
    let http: Vec<String> = details
        .grants
        .http
        .iter()
        .map(ToString::to_string)
        .collect();
    println!("         http {}", none_or(http));
    // By name and source only: the host reads a value when a request needs it.
    let secrets: Vec<String> = details
        .grants
        .secrets
        .iter()
        .map(|(name, secret)| {
            let source = match &secret.source {
                sandboxer_host::runtime::SecretSource::Env(variable) => {
                    format!("env {variable}")
                }
                sandboxer_host::runtime::SecretSource::File(path) => {
                    format!("file {}", path.display())
                }
            };
            if secret.hosts.is_empty() {
                format!("{name} ({source})")
            } else {
                let hosts: Vec<String> = secret.hosts.iter().map(ToString::to_string).collect();
                format!("{name} ({source}, sent only to {})", hosts.join(", "))
            }
        })
        .collect();
    println!("secrets: {}", none_or(secrets));
    if details.config.is_empty() {
        println!("config:  none");
    } else {
        println!("config:");
        for (key, value) in &details.config {
            println!("  {key} = {value:?}");
        }
    }
    println!(
        "billing: charges at most {} times what the host can justify (charge_tolerance); {} disputed over {} sandbox(es)",
        format_credits(details.billing.charge_tolerance_ppm),
        format_credits(details.disputes.disputed),
        details.disputes.sandboxes
    );
    println!("imports:");
    for import in &details.imports {
        println!("  {} ({})", import.name, import.provided_as);
    }
}
