//! `run`, `sandbox create | list | show | destroy | exec | logs`, `events tail`.
//!
//! Each command reaches the host through [`super::api::Api`]: the home
//! opened here (reconciled at the start, events delivered and files released
//! at the end) or the server that owns it. `run`'s wait is the service
//! layer's ([`sandboxer_host::service::run`]); this prints what it reports.

use super::Context;
use super::api::{Api, note};
use super::args::{CreateArgs, EventsCommand, SandboxCommand};
use super::output::{print_json, print_table};
use anyhow::{Context as _, Result};
use sandboxer_host::delivery;
use sandboxer_host::manager::now_ms;
use sandboxer_host::sandbox_io;
use sandboxer_host::service::api::{CreateSandbox, SandboxQuery, SandboxView};
use sandboxer_host::service::client::Client;
use sandboxer_host::service::run::{self as run_loop, LocalHost, RunOptions, parse_rfc3339_ms};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

fn create_request(target: &CreateArgs, command: Vec<String>) -> CreateSandbox {
    CreateSandbox {
        profile: target.profile.clone(),
        tenant: Some(target.tenant.clone()),
        ttl_secs: target.ttl,
        command: (!command.is_empty()).then_some(command),
        metadata: Default::default(),
    }
}

/// `run`: create, wait for the command or the ttl, destroy, bill,
/// summarize; exits with the command's status (see `sandbox_io`).
pub async fn run(
    context: &Context,
    target: CreateArgs,
    json: bool,
    command: Vec<String>,
) -> Result<ExitCode> {
    // From the start: Ctrl-C during create still ends in destroy and bill.
    let interrupted = install_interrupt_flag();
    let progress = !json && std::io::stderr().is_terminal();
    let say = move |line: &str| {
        if progress {
            eprintln!("{line}");
        }
    };
    let request = create_request(&target, command);
    let remote = Client::discover(&context.paths, context.server.as_deref()).await?;
    let options = RunOptions {
        sandboxes_dir: context.paths.sandboxes_dir(),
        stream_output: !json,
        attach_stdin: remote.is_none(),
        interrupted,
        say: &say,
    };
    let report = match remote {
        Some(mut client) => run_loop::run(&mut client, request, options).await?,
        None => {
            let mut config = context.config(json)?;
            config.pipe_stdin = true;
            let mut host = LocalHost {
                config,
                on_line: Box::new(|line: &str| eprintln!("{line}")),
            };
            run_loop::run(&mut host, request, options).await?
        }
    };
    if json {
        print_json(&report)?;
        return Ok(ExitCode::from(report.exit_status));
    }
    if let Some(words) = &report.end {
        eprintln!("{words}");
    }
    println!(
        "{} on {}: {}; estimate {}, charged {}; balance of {} now {} credits",
        report.id,
        report.extension.as_deref().unwrap_or("?"),
        report.state,
        report.estimate.as_deref().unwrap_or("0.000000"),
        report.actual.as_deref().unwrap_or("0.000000"),
        report.tenant,
        report.balance_after
    );
    Ok(ExitCode::from(report.exit_status))
}

pub async fn run_sandbox(context: &Context, command: SandboxCommand) -> Result<ExitCode> {
    let json = match &command {
        SandboxCommand::Create { json, .. }
        | SandboxCommand::List { json, .. }
        | SandboxCommand::Show { json, .. }
        | SandboxCommand::Destroy { json, .. } => *json,
        // The process's own files: no extension, ledger or state needed.
        SandboxCommand::Exec { id, command } => {
            let exe = std::env::current_exe()?;
            let status = sandbox_io::exec(&context.paths.sandboxes_dir(), &exe, id, command)?;
            return Ok(ExitCode::from(status));
        }
        SandboxCommand::Logs { id, follow } => {
            let stop = install_interrupt_flag();
            sandbox_io::print_logs(&context.paths.sandboxes_dir(), id, *follow, stop)?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    let api = if matches!(
        command,
        SandboxCommand::List { .. } | SandboxCommand::Show { .. }
    ) {
        context.connect_read_only(json).await?
    } else {
        context.connect(json).await?
    };
    let outcome = sandbox_command(&api, command).await;
    api.close().await;
    outcome.map(|()| ExitCode::SUCCESS)
}

async fn sandbox_command(api: &Api, command: SandboxCommand) -> Result<()> {
    match command {
        SandboxCommand::Create { target, json } => {
            let record = api
                .create_sandbox(create_request(&target, Vec::new()))
                .await?;
            if json {
                return print_json(&record);
            }
            let expires_in = record
                .expires_at
                .as_deref()
                .and_then(parse_rfc3339_ms)
                .map_or(0, |at| at.saturating_sub(now_ms()).div_ceil(1000));
            println!(
                "{} ready on {}; estimate {} credits held; expires in {expires_in} s",
                record.id,
                record.extension.as_deref().unwrap_or("?"),
                record.meter.estimate.as_deref().unwrap_or("0.000000"),
            );
            Ok(())
        }
        SandboxCommand::List { all, json } => {
            let records = api
                .list_sandboxes(&SandboxQuery {
                    all,
                    ..SandboxQuery::default()
                })
                .await?;
            if json {
                return print_json(&records);
            }
            print_list(&records, all);
            Ok(())
        }
        SandboxCommand::Show { id, json } => {
            let record = api.sandbox(&id).await?;
            if json {
                return print_json(&record);
            }
            print_record(&record);
            Ok(())
        }
        SandboxCommand::Destroy { id, force, json } => {
            let record = api.destroy_sandbox(&id, force).await?;
            if json {
                return print_json(&record);
            }
            println!(
                "{} {}; charged {} credits{}",
                record.id,
                record.state,
                record.meter.actual.as_deref().unwrap_or("0.000000"),
                record
                    .note
                    .as_ref()
                    .map(|note| format!(" ({note})"))
                    .unwrap_or_default()
            );
            Ok(())
        }
        SandboxCommand::Exec { .. } | SandboxCommand::Logs { .. } => {
            unreachable!("handled without opening the host's files")
        }
    }
}

fn print_list(records: &[SandboxView], all: bool) {
    if records.is_empty() {
        println!(
            "{}",
            if all {
                "no sandboxes"
            } else {
                "no live sandboxes (--all shows every record)"
            }
        );
        return;
    }
    let now = now_ms();
    let dash = || "-".to_string();
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|record| {
            let expires = match (record.state.as_str(), record.expires_at.as_deref()) {
                ("ready", Some(at)) => parse_rfc3339_ms(at).map_or_else(dash, |at| {
                    format!("{} s", at.saturating_sub(now).div_ceil(1000))
                }),
                ("destroying", _) if record.retry_at.is_some() => "retrying".into(),
                _ => dash(),
            };
            vec![
                record.id.clone(),
                record.state.clone(),
                record.tenant.clone(),
                record.profile.clone(),
                record.extension.clone().unwrap_or_else(dash),
                record.meter.estimate.clone().unwrap_or_else(dash),
                record.meter.actual.clone().unwrap_or_else(dash),
                expires,
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "STATE",
            "TENANT",
            "PROFILE",
            "EXTENSION",
            "ESTIMATE",
            "ACTUAL",
            "EXPIRES IN",
        ],
        &rows,
    );
}

pub fn run_events(paths: &sandboxer_host::paths::HostPaths, command: EventsCommand) -> Result<()> {
    let EventsCommand::Tail { limit, follow } = command;
    let file = paths.home.join("events.jsonl");
    let lines = delivery::last_lines(&file, limit)
        .with_context(|| format!("cannot read {}", file.display()))?;
    for line in &lines {
        println!("{line}");
    }
    if !follow {
        if lines.is_empty() {
            note(&format!("no events yet in {}", file.display()));
        }
        return Ok(());
    }
    let mut offset = std::fs::metadata(&file).map_or(0, |metadata| metadata.len());
    let interrupted = install_interrupt_flag();
    while !interrupted.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        let Ok(metadata) = std::fs::metadata(&file) else {
            continue;
        };
        if metadata.len() < offset {
            offset = 0; // the file was replaced
        }
        if metadata.len() > offset {
            let bytes = std::fs::read(&file)?;
            let fresh = String::from_utf8_lossy(&bytes[offset as usize..]).into_owned();
            // Print whole lines only; a partial last line waits for its end.
            if let Some(end) = fresh.rfind('\n') {
                print!("{}", &fresh[..=end]);
                offset += end as u64 + 1;
            }
        }
    }
    Ok(())
}

fn print_record(record: &SandboxView) {
    println!("{} ({})", record.id, record.state);
    println!("  tenant {}, profile {}", record.tenant, record.profile);
    if let Some(extension) = &record.extension {
        println!(
            "  extension {} ({})",
            extension,
            record.kind.as_deref().unwrap_or("?")
        );
    }
    if let Some(handle) = &record.handle {
        println!("  backend ref {}", handle.backend_ref);
    }
    for (index, attempt) in record.attempts.iter().enumerate() {
        println!(
            "  attempt {}: {} estimated {}: {}",
            index + 1,
            attempt.extension,
            attempt.estimate,
            attempt.outcome.as_deref().unwrap_or("in progress")
        );
    }
    let meter = &record.meter;
    let shown = |amount: &Option<String>| amount.clone().unwrap_or_else(|| "-".to_string());
    println!(
        "  meter: estimate {}, held {}, actual {}, drift {}",
        shown(&meter.estimate),
        shown(&meter.hold),
        shown(&meter.actual),
        shown(&meter.drift)
    );
    if let Some(usage) = &meter.reported_usage {
        println!(
            "  usage reported: {} ms wall, {} ms cpu; host measured {} ms wall",
            usage.wall_ms,
            usage.cpu_ms,
            meter
                .host_wall_ms
                .map_or_else(|| "-".to_string(), |wall| wall.to_string())
        );
    }
    if let Some(charge) = &meter.charge
        && charge.disputed != "0.000000"
    {
        println!(
            "  disputed: meter-actual asked {}, the policy's ceiling is {}: {} not charged",
            charge.asked, charge.ceiling, charge.disputed
        );
    }
    if let Some(basis) = &meter.basis {
        println!("  billed on: {basis}");
    }
    if let Some(retry_at) = record.retry_at.as_deref().and_then(parse_rfc3339_ms) {
        println!(
            "  destroy failed {} time(s); next try in {} s",
            record.destroy_failures,
            retry_at.saturating_sub(now_ms()).div_ceil(1000)
        );
    }
    if !record.metadata.is_empty() {
        let labels: Vec<String> = record
            .metadata
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        println!("  metadata: {}", labels.join(", "));
    }
    if let Some(note) = &record.note {
        println!("  note: {note}");
    }
    if let Some(process) = &record.process {
        let text = |key: &str| process.get(key).and_then(|value| value.as_str());
        println!(
            "  process: {}; limits held by {}{}",
            text("end").unwrap_or("running"),
            text("limits").unwrap_or("?"),
            text("cgroup_unavailable")
                .map(|why| format!(" (no cgroup: {why})"))
                .unwrap_or_default()
        );
    }
}

/// Set by SIGINT or SIGTERM, so `run` can destroy its sandbox before leaving.
fn install_interrupt_flag() -> &'static AtomicBool {
    static INTERRUPTED: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_signal(_: libc::c_int) {
        INTERRUPTED.store(true, Ordering::Relaxed);
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    &INTERRUPTED
}
