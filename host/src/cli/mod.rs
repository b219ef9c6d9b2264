//! The command-line front end. It parses arguments, calls the service
//! layer (the home opened here, or the server that owns it) and prints; no
//! business logic lives here. It blocks only here, in `main`, on one tokio
//! runtime.
//!
//! Exit codes: 0 success, 1 the operation failed, 2 usage error (clap's, and
//! input the service refuses as invalid), 75 the home stayed busy past the
//! wait; `run` and `sandbox exec` exit with their command's status. Every
//! error prints as one line with its whole cause chain; under `--json` it is
//! also a JSON object on stdout.

mod api;
mod args;
mod credits;
mod ext;
mod output;
mod route;
mod sandbox;
mod serve;
mod tenant;

use anyhow::Result;
use args::{Cli, Command};
use clap::{CommandFactory, Parser};
use sandboxer_host::paths::{HostPaths, default_home};
use sandboxer_host::service::{ServiceConfig, ServiceError};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// An operation that ran but failed, after printing its own report (as
/// `ext check` and `ledger verify` do): exit 1 without another message.
#[derive(Debug, thiserror::Error)]
#[error("reported")]
pub struct AlreadyReported;

/// Whether the command asked for `--json` (its errors are JSON too).
static JSON_OUTPUT: AtomicBool = AtomicBool::new(false);

/// What a command needs to reach the host.
pub struct Context {
    pub paths: HostPaths,
    pub hub_url: Option<String>,
    pub server: Option<String>,
    /// `--store`: the PostgreSQL database of the ledger.
    pub store: Option<String>,
}

impl Context {
    /// The service configuration of this home, from the options and the
    /// environment, with progress lines on a terminal (not under --json).
    pub fn config(&self, json: bool) -> Result<ServiceConfig> {
        let mut config = ServiceConfig::from_env(self.paths.clone(), self.hub_url.clone())?;
        config.store = self.store.clone();
        config.on_wait = Some(Arc::new(|line: &str| eprintln!("{line}")));
        if !json && std::io::stderr().is_terminal() {
            config.on_compile = Some(compile_progress());
        }
        Ok(config)
    }

    pub async fn connect(&self, json: bool) -> Result<api::Api> {
        Ok(api::Api::connect(self.config(json)?, self.server.as_deref()).await?)
    }

    /// [`Context::connect`] for a command that only reads: it creates
    /// nothing in a fresh home.
    pub async fn connect_read_only(&self, json: bool) -> Result<api::Api> {
        Ok(api::Api::connect_read_only(self.config(json)?, self.server.as_deref()).await?)
    }
}

/// A spinner per extension compiling (several compile at once), with the
/// time it has taken so far: a big guest's first compile takes seconds, and
/// a silent terminal looks stuck. Each line is cleared when its compile
/// ends; later loads use the cache and show nothing.
pub fn compile_progress() -> sandboxer_host::runtime::CompileProgress {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    use sandboxer_host::runtime::CompileStage;
    use std::collections::HashMap;
    use std::sync::Mutex;
    let bars = MultiProgress::new();
    let compiling: Mutex<HashMap<String, ProgressBar>> = Mutex::new(HashMap::new());
    let style = ProgressStyle::with_template(
        "{spinner} compiling {msg} ({elapsed}; first load, later loads use the cache)",
    )
    .unwrap_or_else(|_| ProgressStyle::default_spinner());
    Arc::new(move |file: &str, stage: CompileStage| {
        let mut compiling = compiling
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match stage {
            CompileStage::Started => {
                let bar = bars.add(ProgressBar::new_spinner().with_style(style.clone()));
                let name = std::path::Path::new(file).file_name().map_or_else(
                    || file.to_string(),
                    |name| name.to_string_lossy().into_owned(),
                );
                bar.set_message(name);
                bar.enable_steady_tick(std::time::Duration::from_millis(120));
                compiling.insert(file.to_string(), bar);
            }
            CompileStage::Finished => {
                if let Some(bar) = compiling.remove(file) {
                    bar.finish_and_clear();
                    bars.remove(&bar);
                }
            }
        }
    })
}

pub fn main() -> ExitCode {
    // Die quietly on a closed pipe (`sandboxer-host events tail | head`),
    // as command-line tools do, instead of failing a print.
    // SAFETY: restoring the default disposition of a signal.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    install_panic_hook();
    // Internal entry points, not user commands: single-threaded on purpose.
    let mut args = std::env::args_os().skip(1);
    match (
        args.next().as_deref().and_then(|arg| arg.to_str()),
        args.next(),
    ) {
        (Some("__supervise"), Some(dir)) => {
            return sandboxer_host::supervisor::detach(std::path::Path::new(&dir));
        }
        (Some("__supervise-run"), Some(dir)) => {
            return sandboxer_host::supervisor::run(std::path::Path::new(&dir));
        }
        // Runs single-threaded: it enters the sandbox's namespaces.
        (Some("__exec"), Some(dir)) => {
            let command: Vec<_> = args.skip_while(|arg| arg != "--").skip(1).collect();
            return sandboxer_host::sandbox_exec::run(std::path::Path::new(&dir), &command);
        }
        _ => {}
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return report_usage_error(error),
    };
    init_logging();
    let context = Context {
        paths: HostPaths::new(
            cli.global.home.clone().unwrap_or_else(default_home),
            cli.global.extensions_dir.clone(),
            cli.global.profiles_dir.clone(),
        ),
        hub_url: cli.global.hub_url.clone(),
        server: cli.global.server.clone(),
        store: cli.global.store.clone(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli.command, &context));
    // A sandbox's process outlives this command; nothing here must wait on
    // tasks left behind (an idle stdin reader, say).
    runtime.shutdown_background();
    match outcome {
        Ok(code) => code,
        Err(error) => report_error(&error),
    }
}

/// clap's refusal of the command line: its own text on stderr (help and
/// --version are not errors), and under --json also a JSON error on stdout,
/// as for every other error.
fn report_usage_error(error: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let is_error = !matches!(
        error.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    if is_error && std::env::args_os().any(|arg| arg == "--json") {
        let rendered = error.render().to_string();
        let message = rendered
            .lines()
            .find(|line| !line.trim().is_empty())
            .unwrap_or("usage error")
            .trim_start_matches("error: ")
            .to_string();
        let body = serde_json::json!({
            "error": {"kind": "usage", "message": message, "exit_code": 2}
        });
        println!("{body}");
    }
    let _ = error.print();
    ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2))
}

/// Prints an error (one line on stderr; JSON on stdout under --json) and
/// picks the exit status from its kind.
fn report_error(error: &anyhow::Error) -> ExitCode {
    if error.is::<AlreadyReported>() {
        return ExitCode::FAILURE;
    }
    let line = output::one_line_chain(error);
    let service_error = error.downcast_ref::<ServiceError>();
    let code = service_error.map_or(1, ServiceError::exit_code);
    eprintln!("error: {line}");
    if JSON_OUTPUT.load(Ordering::Relaxed) {
        let body = serde_json::json!({
            "error": {
                "kind": service_error.map_or("failed", ServiceError::kind),
                "message": line,
                "exit_code": code,
            }
        });
        println!("{body}");
    }
    ExitCode::from(code)
}

async fn run(command: Command, context: &Context) -> Result<ExitCode> {
    JSON_OUTPUT.store(command_wants_json(&command), Ordering::Relaxed);
    let done = match command {
        // These exit with the status of the command they ran.
        Command::Run {
            target,
            json,
            command,
        } => return sandbox::run(context, target, json, command).await,
        Command::Sandbox(command) => return sandbox::run_sandbox(context, command).await,
        Command::Events(command) => sandbox::run_events(&context.paths, command),
        Command::Ext(command) => ext::run(command, context).await,
        Command::Credits(command) => credits::run_credits(command, context).await,
        Command::Ledger(command) => credits::run_ledger(command, context).await,
        Command::Route(command) => route::run(command, context).await,
        Command::Tenant(command) => tenant::run(command, context).await,
        Command::Serve {
            listen,
            operator_key_file,
        } => serve::run(context, &listen, operator_key_file).await,
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "sandboxer-host",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    };
    done.map(|()| ExitCode::SUCCESS)
}

fn command_wants_json(command: &Command) -> bool {
    use args::{
        CreditsCommand, ExtCommand, LedgerCommand, RouteCommand, SandboxCommand, TenantCommand,
    };
    match command {
        Command::Run { json, .. } => *json,
        Command::Sandbox(
            SandboxCommand::Create { json, .. }
            | SandboxCommand::List { json, .. }
            | SandboxCommand::Show { json, .. }
            | SandboxCommand::Destroy { json, .. },
        ) => *json,
        Command::Ext(
            ExtCommand::List { json }
            | ExtCommand::Check { json, .. }
            | ExtCommand::Info { json, .. }
            | ExtCommand::Estimate { json, .. },
        ) => *json,
        Command::Credits(
            CreditsCommand::Show { json, .. }
            | CreditsCommand::Add { json, .. }
            | CreditsCommand::History { json, .. },
        ) => *json,
        Command::Ledger(LedgerCommand::Verify { json }) => *json,
        Command::Route(RouteCommand::Explain { json, .. }) => *json,
        Command::Tenant(
            TenantCommand::Create { json, .. }
            | TenantCommand::List { json }
            | TenantCommand::Revoke { json, .. },
        ) => *json,
        _ => false,
    }
}

/// Logs to stderr, filtered by SANDBOXER_LOG (default: warnings and errors).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SANDBOXER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .init();
}

/// A bug must still end in one readable line, not a backtrace.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|text| text.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let location = info
            .location()
            .map(|location| format!(" at {location}"))
            .unwrap_or_default();
        eprintln!(
            "error: internal error{location}: {message} (this is a bug in sandboxer-host; please report it)"
        );
    }));
}
