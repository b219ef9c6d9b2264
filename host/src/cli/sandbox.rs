//! `run`, `sandbox create | list | show | destroy`, `events tail`.
//!
//! Every command here is a host start: it opens the ledger and the state
//! store, reconciles what a crash may have left, does its work, delivers
//! waiting events, and closes both files. `run` closes them while it waits,
//! so other commands work meanwhile, and opens them again to sweep expired
//! sandboxes and, at the end, to destroy and bill its own.

use super::args::{CreateArgs, EventsCommand, SandboxCommand};
use super::credits::ledger_options;
use super::output::{print_json, print_table};
use anyhow::{Context, Result, bail};
use sandboxer_credits::{format_credits, format_micros};
use sandboxer_host::delivery::{self, Sinks};
use sandboxer_host::ledger::Ledger;
use sandboxer_host::manager::{
    CreateRequest, Retries, SandboxManager, SandboxState, SandboxStatus, now_ms,
};
use sandboxer_host::paths::HostPaths;
use sandboxer_host::profile::{MAX_TTL_SECS, Profile};
use sandboxer_host::runtime::{ExtensionSet, Runtime};
use sandboxer_host::sandbox_io::{self, OutputTail, RunEnd};
use sandboxer_host::state_db::StateDb;
use serde_json::json;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How often a waiting `run` sweeps expired sandboxes and delivers events.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// The long-lived part of a command: the runtime and the loaded extensions.
struct Host {
    paths: HostPaths,
    state: Arc<StateDb>,
    extensions: ExtensionSet,
    sinks: Sinks,
    /// Progress lines on stderr (a terminal, and not --json).
    progress: bool,
    _runtime: Runtime,
}

impl Host {
    fn start(
        paths: &HostPaths,
        hub_url: Option<String>,
        json: bool,
        pipe_stdin: bool,
    ) -> Result<Self> {
        let progress = !json && std::io::stderr().is_terminal();
        let state = Arc::new(StateDb::new(paths.state_file()));
        let mut runtime = Runtime::new(paths.cache_dir(), state.clone())?;
        runtime.enable_processes(paths.sandboxes_dir(), std::env::current_exe()?);
        if pipe_stdin {
            runtime.pipe_stdin_of_new_sandboxes();
        }
        if progress {
            runtime.on_compile(Arc::new(|file: &str| {
                eprintln!("compiling {file} (first load; later loads use the cache)…");
            }));
        }
        let extensions = runtime.load_dir(&paths.extensions_dir)?;
        Ok(Self {
            paths: paths.clone(),
            state,
            extensions,
            sinks: sinks(paths, hub_url),
            progress,
            _runtime: runtime,
        })
    }

    fn say(&self, line: impl AsRef<str>) {
        if self.progress {
            eprintln!("{}", line.as_ref());
        }
    }

    /// Opens the ledger and the state store (waiting, bounded, for another
    /// process to release them), then reconciles.
    fn open(&self) -> Result<SandboxManager> {
        let manager = self.open_only()?;
        self.reconcile(&manager)?;
        Ok(manager)
    }

    fn reconcile(&self, manager: &SandboxManager) -> Result<()> {
        let report = manager.reconcile(now_ms(), Retries::Skip)?;
        for action in &report.actions {
            eprintln!("reconciled {action}");
        }
        Ok(())
    }

    fn open_only(&self) -> Result<SandboxManager> {
        let ledger = super::wait_for_home(|| {
            let ledger = Ledger::open(&self.paths.ledger_file(), ledger_options()?)?;
            self.state.database()?;
            Ok(ledger)
        })?;
        Ok(SandboxManager::new(
            ledger,
            self.state.clone(),
            self.extensions.clone(),
        ))
    }

    /// Delivers waiting events, then releases both files.
    fn close(&self, manager: SandboxManager) {
        deliver(&self.sinks, manager.ledger(), &self.state);
        drop(manager);
        self.state.close();
    }
}

/// The sinks of a home: `<home>/events.jsonl`, and the hub when given.
pub fn sinks(paths: &HostPaths, hub_url: Option<String>) -> Sinks {
    Sinks {
        events_file: paths.home.join("events.jsonl"),
        hub_url,
    }
}

/// Delivers waiting events; a sink that fails is a warning, never a failed
/// command: the events wait in the outbox.
pub fn deliver(sinks: &Sinks, ledger: &Ledger, state: &StateDb) {
    match delivery::flush(sinks, ledger, state) {
        Ok(report) => {
            if let Some(error) = report.hub_error {
                eprintln!(
                    "warning: events could not reach the hub ({error}); they wait in the outbox for the next command"
                );
            }
        }
        Err(error) => eprintln!("warning: events were not delivered: {error}"),
    }
}

fn request(paths: &HostPaths, target: &CreateArgs, command: Vec<String>) -> Result<CreateRequest> {
    if let Some(ttl) = target.ttl
        && !(1..=MAX_TTL_SECS).contains(&ttl)
    {
        bail!("--ttl must be between 1 and {MAX_TTL_SECS} seconds, got {ttl}");
    }
    Ok(CreateRequest {
        profile: Profile::find(&target.profile, &paths.profiles_dir)?,
        tenant: target.tenant.clone(),
        ttl_secs: target.ttl,
        command: (!command.is_empty()).then_some(command),
    })
}

/// `run`: create, wait for the command or the ttl, destroy, settle,
/// summarize; exits with the command's status (see `sandbox_io`).
pub fn run(
    paths: &HostPaths,
    hub_url: Option<String>,
    target: CreateArgs,
    json: bool,
    command: Vec<String>,
) -> Result<ExitCode> {
    let request = request(paths, &target, command)?;
    // From the start: Ctrl-C during create still ends in destroy and bill.
    let interrupted = install_interrupt_flag();
    let host = Host::start(paths, hub_url, json, true)?;
    let manager = host.open()?;
    let created = manager.create(&request);
    host.close(manager);
    let created = created?;
    host.say(format!(
        "{} is ready on {} ({}); estimate {} credits, held",
        created.id,
        created.extension.as_deref().unwrap_or("?"),
        created.kind.as_deref().unwrap_or("?"),
        format_credits(created.meter.estimate.unwrap_or(0))
    ));

    let deadline = created.expires_at_ms.unwrap_or_else(now_ms);
    // A backend that runs the command on this machine leaves its process
    // here: stream its output, and stop waiting when it ends.
    let process_dir = paths.sandboxes_dir().join(&created.id);
    sandbox_io::attach_stdin(&process_dir);
    let mut output = OutputTail::new(&process_dir, !json);
    let mut last_sweep = Instant::now();
    let end = loop {
        output.pump();
        if sandbox_io::exited(&process_dir).is_some() {
            output.pump();
            break RunEnd::CommandEnded;
        }
        let now = now_ms();
        if now >= deadline {
            break RunEnd::TtlReached;
        }
        if interrupted.load(Ordering::Relaxed) {
            host.say("interrupted: destroying the sandbox now");
            break RunEnd::Interrupted;
        }
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = Instant::now();
            let manager = host.open()?;
            let still_ready = manager
                .get(&created.id)
                .map(|record| record.state == SandboxState::Ready);
            host.close(manager);
            if !still_ready.unwrap_or(false) {
                break RunEnd::NoLongerReady;
            }
            if !output.is_streaming() {
                host.say(format!(
                    "waiting for {}: {} s of its ttl left",
                    created.id,
                    (deadline - now).div_ceil(1000)
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(50).min(Duration::from_millis(deadline - now)));
    };

    // Its own sandbox first (a sweep would call it expired), then the rest.
    let manager = host.open_only()?;
    let destroyed = manager.destroy(&created.id, false);
    // The final word on how the command ended, after destroy stopped it;
    // read before reconcile, which removes directories past their retention.
    output.pump();
    let report = sandbox_io::CommandReport::read(&process_dir);
    let balance = manager
        .ledger()
        .summary(&created.tenant)
        .map(|summary| summary.balance);
    let reconciled = host.reconcile(&manager);
    host.close(manager);
    reconciled?;
    let destroyed = destroyed?;
    let balance = balance?;
    let exited = report.as_ref().map(|report| &report.exited);
    let outcome = sandbox_io::run_outcome(end, exited, !destroyed.spec.command.is_empty());
    if json {
        let mut summary = json!({
            "sandbox_id": destroyed.id,
            "extension": destroyed.extension,
            "kind": destroyed.kind,
            "state": destroyed.state.name(),
            "estimate": destroyed.meter.estimate.map(format_credits),
            "actual": destroyed.meter.actual.map(format_credits),
            "balance_after": format_micros(balance),
            "exit_status": outcome.status,
            "end": outcome.words,
        });
        if let (Some(report), Some(fields)) = (&report, summary.as_object_mut()) {
            fields.extend(report.json_fields());
        }
        print_json(&summary)?;
        return Ok(ExitCode::from(outcome.status));
    }
    if let Some(words) = &outcome.words {
        eprintln!("{words}");
    }
    println!(
        "{} on {}: {}; estimate {}, charged {}; balance of {} now {} credits",
        destroyed.id,
        destroyed.extension.as_deref().unwrap_or("?"),
        destroyed.state.name(),
        format_credits(destroyed.meter.estimate.unwrap_or(0)),
        format_credits(destroyed.meter.actual.unwrap_or(0)),
        destroyed.tenant,
        format_micros(balance)
    );
    Ok(ExitCode::from(outcome.status))
}

pub fn run_sandbox(
    paths: &HostPaths,
    hub_url: Option<String>,
    command: SandboxCommand,
) -> Result<ExitCode> {
    let json = match &command {
        SandboxCommand::Create { json, .. }
        | SandboxCommand::List { json, .. }
        | SandboxCommand::Show { json, .. }
        | SandboxCommand::Destroy { json, .. } => *json,
        // The process's own files: no extension, ledger or state needed.
        SandboxCommand::Exec { id, command } => {
            let exe = std::env::current_exe()?;
            let status = sandbox_io::exec(&paths.sandboxes_dir(), &exe, id, command)?;
            return Ok(ExitCode::from(status));
        }
        SandboxCommand::Logs { id, follow } => {
            let stop = install_interrupt_flag();
            sandbox_io::print_logs(&paths.sandboxes_dir(), id, *follow, stop)?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    let host = Host::start(paths, hub_url, json, false)?;
    let manager = host.open()?;
    let outcome = sandbox_command(&manager, paths, command);
    host.close(manager);
    outcome.map(|()| ExitCode::SUCCESS)
}

fn sandbox_command(
    manager: &SandboxManager,
    paths: &HostPaths,
    command: SandboxCommand,
) -> Result<()> {
    match command {
        SandboxCommand::Create { target, json } => {
            let record = manager.create(&request(paths, &target, Vec::new())?)?;
            if json {
                return print_json(&record_json(&record));
            }
            println!(
                "{} ready on {}; estimate {} credits held; expires in {} s",
                record.id,
                record.extension.as_deref().unwrap_or("?"),
                format_credits(record.meter.estimate.unwrap_or(0)),
                record
                    .expires_at_ms
                    .unwrap_or(0)
                    .saturating_sub(now_ms())
                    .div_ceil(1000)
            );
            Ok(())
        }
        SandboxCommand::List { all, json } => {
            let records = manager.list(all)?;
            if json {
                return print_json(&records.iter().map(record_json).collect::<Vec<_>>());
            }
            if records.is_empty() {
                println!(
                    "{}",
                    if all {
                        "no sandboxes"
                    } else {
                        "no live sandboxes (--all shows every record)"
                    }
                );
                return Ok(());
            }
            let now = now_ms();
            let rows: Vec<Vec<String>> = records
                .iter()
                .map(|record| {
                    vec![
                        record.id.clone(),
                        record.state.name().to_string(),
                        record.tenant.clone(),
                        record.profile.clone(),
                        record.extension.clone().unwrap_or_else(|| "-".into()),
                        record
                            .meter
                            .estimate
                            .map_or_else(|| "-".into(), format_credits),
                        record
                            .meter
                            .actual
                            .map_or_else(|| "-".into(), format_credits),
                        match (record.state, record.expires_at_ms) {
                            (SandboxState::Ready, Some(at)) => {
                                format!("{} s", at.saturating_sub(now).div_ceil(1000))
                            }
                            _ => "-".into(),
                        },
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
            Ok(())
        }
        SandboxCommand::Show { id, json } => {
            let record = manager.get(&id)?;
            let process = sandbox_io::process_report(&paths.sandboxes_dir(), &record.id);
            if json {
                let mut shown = record_json(&record);
                shown["process"] = json!(process);
                return print_json(&shown);
            }
            print_record(&record);
            if let Some(process) = process {
                println!(
                    "  process: {}; limits held by {}{}",
                    process.end.as_deref().unwrap_or("running"),
                    process.limits,
                    process
                        .cgroup_unavailable
                        .map(|why| format!(" (no cgroup: {why})"))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }
        SandboxCommand::Exec { .. } | SandboxCommand::Logs { .. } => {
            unreachable!("handled without opening the host's files")
        }
        SandboxCommand::Destroy { id, force, json } => {
            let record = manager.destroy(&id, force)?;
            if json {
                return print_json(&record_json(&record));
            }
            println!(
                "{} {}; charged {} credits{}",
                record.id,
                record.state.name(),
                format_credits(record.meter.actual.unwrap_or(0)),
                record
                    .note
                    .as_ref()
                    .map(|note| format!(" ({note})"))
                    .unwrap_or_default()
            );
            Ok(())
        }
    }
}

pub fn run_events(paths: &HostPaths, command: EventsCommand) -> Result<()> {
    let EventsCommand::Tail { limit, follow } = command;
    let file = paths.home.join("events.jsonl");
    let lines = delivery::last_lines(&file, limit)
        .with_context(|| format!("cannot read {}", file.display()))?;
    for line in &lines {
        println!("{line}");
    }
    if !follow {
        if lines.is_empty() {
            eprintln!("no events yet in {}", file.display());
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

/// A record as JSON, amounts as decimal-credit strings.
pub fn record_json(record: &SandboxStatus) -> serde_json::Value {
    let credits = |amount: Option<u64>| amount.map(format_credits);
    json!({
        "id": record.id,
        "state": record.state.name(),
        "tenant": record.tenant,
        "profile": record.profile,
        "extension": record.extension,
        "kind": record.kind,
        "handle": record.handle,
        "created_at": sandboxer_host::ledger::rfc3339_millis(record.created_at_ms),
        "ready_at": record.ready_at_ms.map(sandboxer_host::ledger::rfc3339_millis),
        "expires_at": record.expires_at_ms.map(sandboxer_host::ledger::rfc3339_millis),
        "finished_at": record.finished_at_ms.map(sandboxer_host::ledger::rfc3339_millis),
        "spec": record.spec,
        "attempts": record.attempts.iter().map(|attempt| json!({
            "extension": attempt.extension,
            "hold_id": attempt.hold_id,
            "estimate": format_credits(attempt.estimate),
            "outcome": attempt.outcome,
        })).collect::<Vec<_>>(),
        "meter": {
            "estimate": credits(record.meter.estimate),
            "hold": credits(record.meter.hold),
            "hold_id": record.meter.hold_id,
            "host_wall_ms": record.meter.host_wall_ms,
            "reported_usage": record.meter.reported_usage,
            "actual": credits(record.meter.actual),
            "drift": record.meter.drift.map(format_micros),
            "basis": record.meter.basis,
            "charge": record.meter.charge.map(|charge| json!({
                "asked": format_credits(charge.asked),
                "ceiling": format_credits(charge.ceiling),
                "charged": format_credits(charge.charged),
                "disputed": format_credits(charge.disputed),
            })),
        },
        "destroy_failures": record.destroy_failures,
        "retry_at": record.retry_at_ms.map(sandboxer_host::ledger::rfc3339_millis),
        "note": record.note,
    })
}

fn print_record(record: &SandboxStatus) {
    println!("{} ({})", record.id, record.state.name());
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
            format_credits(attempt.estimate),
            attempt.outcome.as_deref().unwrap_or("in progress")
        );
    }
    let meter = &record.meter;
    let credits = |amount: Option<u64>| amount.map_or_else(|| "-".to_string(), format_credits);
    println!(
        "  meter: estimate {}, held {}, actual {}, drift {}",
        credits(meter.estimate),
        credits(meter.hold),
        credits(meter.actual),
        meter.drift.map_or_else(|| "-".to_string(), format_micros)
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
        && charge.disputed > 0
    {
        println!(
            "  disputed: meter-actual asked {}, the policy's ceiling is {}: {} not charged",
            format_credits(charge.asked),
            format_credits(charge.ceiling),
            format_credits(charge.disputed)
        );
    }
    if let Some(basis) = &meter.basis {
        println!("  billed on: {basis}");
    }
    if let Some(retry_at) = record.retry_at_ms {
        println!(
            "  destroy failed {} time(s); next try in {} s",
            record.destroy_failures,
            retry_at.saturating_sub(now_ms()).div_ceil(1000)
        );
    }
    if let Some(note) = &record.note {
        println!("  note: {note}");
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
