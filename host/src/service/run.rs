//! `run`: create a sandbox, wait for its command or its ttl, destroy it,
//! bill it, and say how it ended.
//!
//! The wait happens here, not in a front end. It works the same against an
//! opened home ([`LocalHost`], which releases the home's files while it
//! waits so other commands can use them) and against a server that owns the
//! home ([`super::client::Client`]). A backend that runs the command on this
//! machine leaves its process's files under `<home>/sandboxes/<id>/`: the
//! wait streams its output and stops when it ends.

use super::api::{CreateSandbox, CreditsView, SandboxView};
use super::{Caller, Service, ServiceConfig, ServiceError};
use crate::manager::{Retries, now_ms};
use crate::sandbox_io::{self, OutputTail, RunEnd};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use utoipa::ToSchema;

/// How often a waiting `run` checks on its sandbox (and, on an opened home,
/// sweeps expired sandboxes and delivers events).
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// What `run` needs of a host: the same few operations locally and over HTTP.
#[allow(async_fn_in_trait)] // used only here, by the command line
pub trait RunHost {
    async fn create(&mut self, request: CreateSandbox) -> Result<SandboxView, ServiceError>;
    async fn get(&mut self, id: &str) -> Result<SandboxView, ServiceError>;
    async fn destroy(&mut self, id: &str) -> Result<SandboxView, ServiceError>;
    async fn credits(&mut self, tenant: &str) -> Result<CreditsView, ServiceError>;
    /// Periodic upkeep while waiting; one line per warning.
    async fn tick(&mut self) -> Vec<String>;
}

/// An opened home, opened for each step and released in between.
pub struct LocalHost {
    pub config: ServiceConfig,
    /// Lines to tell the user (reconcile actions, delivery warnings).
    pub on_line: Box<dyn Fn(&str) + Send + Sync>,
}

impl LocalHost {
    async fn with_service<T>(
        &mut self,
        reconcile: bool,
        work: impl AsyncFnOnce(&Service) -> Result<T, ServiceError>,
    ) -> Result<T, ServiceError> {
        let service = Service::open(self.config.clone()).await?;
        if reconcile {
            match service.reconcile(Retries::Skip).await {
                Ok(report) => {
                    for action in &report.actions {
                        (self.on_line)(&format!("reconciled {action}"));
                    }
                }
                Err(error) => (self.on_line)(&format!("warning: reconcile failed: {error}")),
            }
        }
        let outcome = work(&service).await;
        if let Some(warning) = service.close().await {
            (self.on_line)(&format!("warning: {warning}"));
        }
        outcome
    }
}

impl RunHost for LocalHost {
    async fn create(&mut self, request: CreateSandbox) -> Result<SandboxView, ServiceError> {
        self.with_service(true, async |service| {
            service.create_sandbox(&Caller::Operator, request).await
        })
        .await
    }

    async fn get(&mut self, id: &str) -> Result<SandboxView, ServiceError> {
        self.with_service(true, async |service| {
            service.show_sandbox(&Caller::Operator, id)
        })
        .await
    }

    async fn destroy(&mut self, id: &str) -> Result<SandboxView, ServiceError> {
        // Its own sandbox first (a sweep would call it expired), then the rest.
        let on_line = &self.on_line;
        let service = Service::open(self.config.clone()).await?;
        let destroyed = service.destroy_sandbox(&Caller::Operator, id, false).await;
        if let Ok(report) = service.reconcile(Retries::Skip).await {
            for action in &report.actions {
                on_line(&format!("reconciled {action}"));
            }
        }
        if let Some(warning) = service.close().await {
            on_line(&format!("warning: {warning}"));
        }
        destroyed
    }

    async fn credits(&mut self, tenant: &str) -> Result<CreditsView, ServiceError> {
        self.with_service(false, async |service| {
            service.credits(&Caller::Operator, Some(tenant)).await
        })
        .await
    }

    async fn tick(&mut self) -> Vec<String> {
        // Opening reconciles (and sweeps); closing delivers.
        match self.with_service(true, async |_| Ok(())).await {
            Ok(()) => Vec::new(),
            Err(error) => vec![format!("warning: {error}")],
        }
    }
}

/// How a run went: the destroyed sandbox and how its command ended. `--json`
/// prints it; the command line exits with `exit_status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RunReport {
    pub id: String,
    pub extension: Option<String>,
    pub kind: Option<String>,
    pub state: String,
    pub tenant: String,
    pub estimate: Option<String>,
    pub actual: Option<String>,
    /// The tenant's balance after the charge.
    pub balance_after: String,
    /// What `run` exits with: the command's status, 128+N for signal N, 124
    /// when the ttl ended it, 130 after Ctrl-C.
    pub exit_status: u8,
    /// How the command ended, in words.
    pub end: Option<String>,
    /// For a command that ran on this machine: its status, how it ended,
    /// which limits held, and its stdout and stderr up to 1 MiB each.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub command: serde_json::Map<String, serde_json::Value>,
}

/// What the wait shows while it runs.
pub struct RunOptions<'a> {
    /// Where local sandboxes' process files are.
    pub sandboxes_dir: PathBuf,
    /// Copy the command's output to this process's stdout and stderr.
    pub stream_output: bool,
    /// Feed this process's stdin to the command.
    pub attach_stdin: bool,
    /// Set by Ctrl-C or SIGTERM: destroy now.
    pub interrupted: &'a AtomicBool,
    /// Progress lines (only on a terminal, not under --json).
    pub say: &'a (dyn Fn(&str) + Sync),
}

/// Creates, waits, destroys and reports. The sandbox is destroyed and
/// billed however the wait ends (its command, its ttl, Ctrl-C, or another
/// command destroying it).
pub async fn run(
    host: &mut impl RunHost,
    request: CreateSandbox,
    options: RunOptions<'_>,
) -> Result<RunReport, ServiceError> {
    let created = host.create(request).await?;
    (options.say)(&format!(
        "{} is ready on {} ({}); estimate {} credits, held",
        created.id,
        created.extension.as_deref().unwrap_or("?"),
        created.kind.as_deref().unwrap_or("?"),
        created.meter.estimate.as_deref().unwrap_or("?")
    ));
    let deadline = created
        .expires_at
        .as_deref()
        .and_then(parse_rfc3339_ms)
        .unwrap_or_else(now_ms);
    let process_dir = options.sandboxes_dir.join(&created.id);
    if options.attach_stdin {
        sandbox_io::attach_stdin(&process_dir);
    }
    let mut output = OutputTail::new(&process_dir, options.stream_output);
    let mut last_check = Instant::now();
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
        if options.interrupted.load(Ordering::Relaxed) {
            (options.say)("interrupted: destroying the sandbox now");
            break RunEnd::Interrupted;
        }
        if last_check.elapsed() >= SWEEP_EVERY {
            last_check = Instant::now();
            for line in host.tick().await {
                (options.say)(&line);
            }
            let still_ready = host
                .get(&created.id)
                .await
                .is_ok_and(|record| record.state == "ready");
            if !still_ready {
                break RunEnd::NoLongerReady;
            }
            if !output.is_streaming() {
                (options.say)(&format!(
                    "waiting for {}: {} s of its ttl left",
                    created.id,
                    deadline.saturating_sub(now).div_ceil(1000)
                ));
            }
        }
        let nap = Duration::from_millis(50).min(Duration::from_millis(deadline - now));
        tokio::time::sleep(nap).await;
    };

    let destroyed = host.destroy(&created.id).await?;
    // The final word on how the command ended, after destroy stopped it.
    output.pump();
    let report = sandbox_io::CommandReport::read(&process_dir);
    let balance = host.credits(&destroyed.tenant).await?;
    let exited = report.as_ref().map(|report| &report.exited);
    let outcome = sandbox_io::run_outcome(end, exited, !destroyed.spec.command.is_empty());
    Ok(RunReport {
        id: destroyed.id,
        extension: destroyed.extension,
        kind: destroyed.kind,
        state: destroyed.state,
        tenant: destroyed.tenant,
        estimate: destroyed.meter.estimate,
        actual: destroyed.meter.actual,
        balance_after: balance.balance,
        exit_status: outcome.status,
        end: outcome.words,
        command: report
            .map(|report| report.json_fields())
            .unwrap_or_default(),
    })
}

/// Milliseconds since the epoch of an RFC 3339 time as the host writes them
/// (`2026-11-30T12:00:00.000Z`).
pub fn parse_rfc3339_ms(text: &str) -> Option<u64> {
    let time = humantime::parse_rfc3339_weak(text).ok()?;
    time.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|elapsed| elapsed.as_millis() as u64)
}
