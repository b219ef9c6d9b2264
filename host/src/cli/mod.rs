//! The command-line front end. It parses arguments, calls the library and
//! prints; no business logic lives here.
//!
//! Exit codes: 0 success, 1 the operation failed, 2 usage error (clap's).
//! Every error prints as one line with its whole cause chain.

mod args;
mod credits;
mod ext;
mod output;
mod route;
mod sandbox;

use anyhow::Result;
use args::{Cli, Command};
use clap::Parser;
use sandboxer_host::paths::{HostPaths, default_home};
use std::process::ExitCode;

/// An operation that ran but failed, after printing its own report (as
/// `ext check` and `ledger verify` do): exit 1 without another message.
#[derive(Debug, thiserror::Error)]
#[error("reported")]
pub struct AlreadyReported;

/// Exit status when another process kept the home busy past the wait.
pub const EXIT_HOME_BUSY: u8 = 75;

/// The home stayed in use by another process for the whole wait.
#[derive(Debug, thiserror::Error)]
#[error(
    "gave up after waiting {waited_secs} s: {cause} (set SANDBOXER_LOCK_WAIT_SECS to wait longer)"
)]
pub struct HomeBusy {
    pub waited_secs: u64,
    pub cause: String,
}

/// How long a command waits for another process to release the home's
/// files (SANDBOXER_LOCK_WAIT_SECS, default 120 s).
fn lock_patience() -> std::time::Duration {
    let secs = std::env::var("SANDBOXER_LOCK_WAIT_SECS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(120);
    std::time::Duration::from_secs(secs)
}

/// Calls `open` until the home's files are free (another process holds
/// them), saying so once on stderr, for at most the lock patience.
pub fn wait_for_home<T>(mut open: impl FnMut() -> Result<T>) -> Result<T> {
    let started = std::time::Instant::now();
    let patience = lock_patience();
    let mut announced = false;
    loop {
        match open() {
            Err(error) if is_in_use(&error) => {
                if started.elapsed() >= patience {
                    return Err(HomeBusy {
                        waited_secs: started.elapsed().as_secs(),
                        cause: format!("{error:#}"),
                    }
                    .into());
                }
                if !announced {
                    eprintln!("waiting for another sandboxer-host process to finish ({error:#})");
                    announced = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

fn is_in_use(error: &anyhow::Error) -> bool {
    use sandboxer_host::ledger::LedgerError;
    use sandboxer_host::state_db::StateDbError;
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<LedgerError>(),
            Some(LedgerError::InUse { .. })
        ) || matches!(
            cause.downcast_ref::<StateDbError>(),
            Some(StateDbError::InUse { .. })
        )
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
    // The supervisor of a sandbox process: internal, not a user command.
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
    let cli = Cli::parse();
    init_logging();
    let paths = HostPaths::new(
        cli.global.home.clone().unwrap_or_else(default_home),
        cli.global.extensions_dir.clone(),
        cli.global.profiles_dir.clone(),
    );
    match run(cli.command, &paths, cli.global.hub_url) {
        Ok(code) => code,
        Err(error) if error.is::<AlreadyReported>() => ExitCode::FAILURE,
        Err(error) if error.is::<HomeBusy>() => {
            eprintln!("error: {}", output::one_line_chain(&error));
            ExitCode::from(EXIT_HOME_BUSY)
        }
        Err(error) => {
            eprintln!("error: {}", output::one_line_chain(&error));
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command, paths: &HostPaths, hub_url: Option<String>) -> Result<ExitCode> {
    let done = match command {
        // These two exit with the status of the command they ran.
        Command::Run {
            target,
            json,
            command,
        } => return sandbox::run(paths, hub_url, target, json, command),
        Command::Sandbox(command) => return sandbox::run_sandbox(paths, hub_url, command),
        Command::Events(command) => sandbox::run_events(paths, command),
        Command::Ext(command) => ext::run(command, paths),
        Command::Credits(command) => credits::run_credits(command, paths, hub_url),
        Command::Ledger(command) => credits::run_ledger(command, paths),
        Command::Route(command) => route::run(command, paths),
    };
    done.map(|()| ExitCode::SUCCESS)
}

/// Logs to stderr, filtered by SANDBOXER_LOG (default: warnings and errors).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SANDBOXER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
