//! The sandbox manager: the one place that joins routing, the runtime and
//! the ledger for a sandbox's lifecycle.
//!
//! `requested → provisioning → ready → destroying → destroyed`, with
//! `failed` and `expired` off the main path. Every transition is written to
//! the sandbox's record (with its lifecycle event) before it is acted on,
//! so a crash at any point can be reconciled: no sandbox without a record,
//! no hold without a live sandbox, no charge twice.

pub mod lifecycle_events;
pub mod record;

use crate::ledger::{Ledger, LedgerError};
use crate::profile::Profile;
use crate::router::health::{self, HealthError, RouteHealth};
use crate::router::{RouteDecision, Router, RouterError};
use crate::runtime::{CallError, ExtError, ExtensionSet, Usage};
use crate::state_db::StateDb;
pub use record::{Attempt, Meter, RecordError, RecordStore, SandboxState, SandboxStatus};
use sandboxer_credits::format_credits;
use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A hold outlives its sandbox's ttl by this much, so a sandbox destroyed a
/// little late (a slow backend, a host restarting) still settles against it.
pub const HOLD_GRACE_MS: u64 = 10 * 60 * 1000;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("no eligible backend for profile `{profile}`: {reasons}")]
    NoEligibleBackend {
        profile: String,
        reasons: String,
        decision: Box<RouteDecision>,
    },
    #[error("{0}")]
    Refused(String),
    #[error("sandbox {id} could not be created: {attempts}")]
    CreateFailed { id: String, attempts: String },
    #[error("no sandbox `{0}`")]
    NotFound(String),
    #[error(
        "sandbox {id} runs on extension `{extension}`, which is not loaded ({why}); it stays {state} with its hold open until the extension is back, or `sandbox destroy {id} --force` voids it"
    )]
    ExtensionNotLoaded {
        id: String,
        extension: String,
        why: String,
        state: &'static str,
    },
    #[error(
        "sandbox {id}: {error}; it stays destroying with its hold open: retry `sandbox destroy {id}`, or add --force to void the hold"
    )]
    DestroyFailed { id: String, error: String },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Records(#[from] RecordError),
    #[error(transparent)]
    Health(#[from] HealthError),
    #[error(transparent)]
    Router(#[from] RouterError),
}

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub profile: Profile,
    pub tenant: String,
    pub ttl_secs: Option<u32>,
    /// Replaces the profile's command when given.
    pub command: Option<Vec<String>>,
}

/// What a reconcile pass did, one line per action.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReconcileReport {
    pub actions: Vec<String>,
}

pub struct SandboxManager {
    ledger: Ledger,
    records: RecordStore,
    extensions: ExtensionSet,
    health: RouteHealth,
    /// Sandboxes an operation of this process is working on.
    busy: Mutex<HashSet<String>>,
    released: Condvar,
}

/// Holds a sandbox for one operation of this process.
struct BusyGuard<'a> {
    manager: &'a SandboxManager,
    id: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self
            .manager
            .busy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        busy.remove(&self.id);
        self.manager.released.notify_all();
    }
}

impl SandboxManager {
    pub fn new(ledger: Ledger, state: Arc<StateDb>, extensions: ExtensionSet) -> Self {
        Self {
            ledger,
            records: RecordStore::new(state.clone()),
            extensions,
            health: RouteHealth::new(state),
            busy: Mutex::new(HashSet::new()),
            released: Condvar::new(),
        }
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn state(&self) -> &Arc<StateDb> {
        self.records.state()
    }

    pub fn extensions(&self) -> &ExtensionSet {
        &self.extensions
    }

    pub fn get(&self, id: &str) -> Result<SandboxStatus, ManagerError> {
        self.records
            .get(id)?
            .ok_or_else(|| ManagerError::NotFound(id.to_string()))
    }

    /// Live sandboxes, or every record with `all`.
    pub fn list(&self, all: bool) -> Result<Vec<SandboxStatus>, ManagerError> {
        let records = self.records.all()?;
        Ok(records
            .into_iter()
            .filter(|record| all || record.state.is_live())
            .collect())
    }

    fn lock(&self, id: &str) -> BusyGuard<'_> {
        let mut busy = self
            .busy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while busy.contains(id) {
            busy = self
                .released
                .wait(busy)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        busy.insert(id.to_string());
        BusyGuard {
            manager: self,
            id: id.to_string(),
        }
    }

    /// Writes `record` with the event of its current state.
    fn save(&self, record: &mut SandboxStatus) -> Result<(), ManagerError> {
        self.save_with(record, |_| Ok(()))
    }

    /// Writes `record` with its event and whatever `also` writes, in one
    /// transaction.
    fn save_with(
        &self,
        record: &mut SandboxStatus,
        also: impl FnOnce(&redb::WriteTransaction) -> Result<(), String> + Send + 'static,
    ) -> Result<(), ManagerError> {
        let now = now_ms();
        record.updated_at_ms = now;
        let event_record = record.clone();
        // `requested` has had nothing acted on yet: if a crash loses it,
        // there is nothing to reconcile, so it need not wait for the disk.
        let durable = record.state != SandboxState::Requested;
        self.records.put_with_durability(
            record,
            move |write| {
                lifecycle_events::append(write, &event_record, now)?;
                also(write).map_err(record::storage)
            },
            durable,
        )?;
        Ok(())
    }

    /// Writes `record` without an event (a detail of the current state).
    fn save_quietly(&self, record: &mut SandboxStatus) -> Result<(), ManagerError> {
        record.updated_at_ms = now_ms();
        self.records.put(record, |_| Ok(()))?;
        Ok(())
    }

    /// Routes, holds, creates; falls back to the next candidate after a
    /// retryable failure. Returns the ready sandbox's record.
    pub fn create(&self, request: &CreateRequest) -> Result<SandboxStatus, ManagerError> {
        let id = format!("sbx-{:016x}", rand::random::<u64>());
        let _guard = self.lock(&id);
        let mut spec = request.profile.spec(&id, request.ttl_secs);
        if let Some(command) = &request.command {
            spec.command = command.clone();
        }
        let now = now_ms();
        let mut record = SandboxStatus {
            id: id.clone(),
            tenant: request.tenant.clone(),
            profile: request.profile.name.clone(),
            state: SandboxState::Requested,
            extension: None,
            kind: None,
            handle: None,
            spec: spec.clone(),
            created_at_ms: now,
            ready_at_ms: None,
            expires_at_ms: None,
            finished_at_ms: None,
            updated_at_ms: now,
            attempts: Vec::new(),
            meter: Meter::default(),
            note: None,
        };
        crate::ledger::check_name("tenant", &request.tenant).map_err(ManagerError::Refused)?;
        self.save(&mut record)?;

        let decision =
            Router::new(&self.extensions, &self.health).decide(&request.profile, &spec, now)?;
        if decision.chosen.is_none() {
            let reasons = decision.reasons();
            self.fail(&mut record, format!("no eligible backend: {reasons}"))?;
            return Err(ManagerError::NoEligibleBackend {
                profile: decision.profile.clone(),
                reasons,
                decision: Box::new(decision),
            });
        }

        let ttl_ms = u64::from(spec.ttl_secs) * 1000;
        for candidate in decision.attempt_order() {
            let extension = self
                .extensions
                .get(&candidate.name)
                .expect("eligible candidates are loaded")
                .clone();
            let estimate = candidate
                .estimate
                .expect("eligible candidates have an estimate");
            let hold_id = format!("{id}.{}", record.attempts.len() + 1);
            record.state = SandboxState::Provisioning;
            record.extension = Some(candidate.name.clone());
            record.kind = candidate.kind.map(str::to_string);
            record.meter = Meter {
                estimate: Some(estimate),
                hold_id: Some(hold_id.clone()),
                ..Meter::default()
            };
            record.attempts.push(Attempt {
                extension: candidate.name.clone(),
                hold_id: hold_id.clone(),
                estimate,
                started_at_ms: now_ms(),
                outcome: None,
            });
            self.save(&mut record)?;

            let expires = now_ms() + ttl_ms + HOLD_GRACE_MS;
            if let Err(error) =
                self.ledger
                    .hold(&record.tenant, estimate, &hold_id, &candidate.name, expires)
            {
                let message = error.to_string();
                set_outcome(&mut record, message.clone());
                self.fail(&mut record, message)?;
                return Err(match error {
                    LedgerError::InsufficientCredits { .. } | LedgerError::InvalidInput(_) => {
                        ManagerError::Refused(error.to_string())
                    }
                    other => ManagerError::Ledger(other),
                });
            }
            record.meter.hold = Some(estimate);

            let started = Instant::now();
            match extension.create_keeping_kv(&spec) {
                Ok((handle, pending_kv)) => {
                    let latency_ms = started.elapsed().as_millis() as u64;
                    let ready_at = now_ms();
                    record.state = SandboxState::Ready;
                    record.handle = Some(handle);
                    record.ready_at_ms = Some(ready_at);
                    record.expires_at_ms = Some(ready_at + ttl_ms);
                    set_outcome(&mut record, "ready".into());
                    // Ready, its event, the extension's own key-value writes
                    // and what routing learns, in one commit.
                    let instance = candidate.name.clone();
                    self.save_with(&mut record, move |write| {
                        pending_kv.apply(write)?;
                        health::apply_outcome(write, &instance, true, ready_at)?;
                        health::apply_latency(write, &instance, latency_ms)
                    })?;
                    return Ok(record);
                }
                Err(error) => {
                    let message = error.to_string();
                    self.ledger
                        .void(&hold_id, &format!("create failed: {message}"))?;
                    record.meter.hold = None;
                    set_outcome(&mut record, message);
                    if error.is_retryable() {
                        self.health
                            .record_outcome(&candidate.name, false, now_ms())?;
                        continue;
                    }
                    break;
                }
            }
        }

        let attempts = record
            .attempts
            .iter()
            .map(|attempt| {
                format!(
                    "{}: {}",
                    attempt.extension,
                    attempt.outcome.as_deref().unwrap_or("not tried")
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        self.fail(&mut record, format!("every attempt failed: {attempts}"))?;
        Err(ManagerError::CreateFailed { id, attempts })
    }

    fn fail(&self, record: &mut SandboxStatus, note: String) -> Result<(), ManagerError> {
        record.state = SandboxState::Failed;
        record.note = Some(note);
        record.finished_at_ms = Some(now_ms());
        self.save(record)
    }

    /// Destroys a sandbox, meters it and settles its hold. Idempotent. With
    /// `force`, a sandbox that cannot be destroyed (its extension is gone,
    /// or destroy fails) has its hold voided instead, with the reason.
    pub fn destroy(&self, id: &str, force: bool) -> Result<SandboxStatus, ManagerError> {
        let _guard = self.lock(id);
        let mut record = self.get(id)?;
        match record.state {
            SandboxState::Destroyed | SandboxState::Failed => return Ok(record),
            SandboxState::Requested | SandboxState::Provisioning => {
                // Only a crash leaves these behind (this process holds the
                // sandbox while creating it): nothing was handed out.
                self.void_current_hold(&record, "create was interrupted")?;
                record.meter.hold = None;
                self.fail(
                    &mut record,
                    "create was interrupted; its hold was voided".into(),
                )?;
                return Ok(record);
            }
            SandboxState::Ready | SandboxState::Expired | SandboxState::Destroying => {}
        }
        let extension_name = record.extension.clone().unwrap_or_default();
        let extension = match self.extensions.entry(&extension_name) {
            Some(entry) => match &entry.status {
                Ok(extension) => extension.clone(),
                Err(reason) => {
                    return self.cannot_destroy(record, force, format!("rejected: {reason}"));
                }
            },
            None => {
                return self.cannot_destroy(
                    record,
                    force,
                    "no such file in the extensions directory".into(),
                );
            }
        };
        let handle = record.handle.clone().expect("a ready sandbox has a handle");

        let usage = match record.meter.reported_usage {
            Some(usage) => usage,
            None => {
                if record.state != SandboxState::Destroying {
                    record.state = SandboxState::Destroying;
                    self.save(&mut record)?;
                }
                let host_wall_ms =
                    now_ms().saturating_sub(record.ready_at_ms.unwrap_or(record.created_at_ms));
                record.meter.host_wall_ms = Some(host_wall_ms);
                let usage = match extension.destroy(&record.spec, &handle) {
                    Ok(usage) => usage,
                    Err(CallError::Backend {
                        error: ExtError::NotFound(message),
                        ..
                    }) => {
                        // Already gone on the backend: bill what the host saw.
                        record.note = Some(format!(
                            "the backend no longer knew it ({message}); billed the host-measured wall time"
                        ));
                        Usage {
                            wall_ms: host_wall_ms,
                            cpu_ms: 0,
                            memory_mb_ms: 0,
                            egress_bytes: 0,
                        }
                    }
                    Err(error) => return self.destroy_failed(record, force, error),
                };
                // Kept in memory until the sandbox is settled: a crash before
                // then destroys again, and a backend that no longer knows the
                // sandbox is billed the host-measured wall time.
                record.meter.reported_usage = Some(usage);
                usage
            }
        };

        let actual = match extension.meter_actual(&record.spec, usage) {
            Ok(actual) => actual,
            Err(error) => return self.destroy_failed(record, force, error),
        };
        let hold_id = record
            .meter
            .hold_id
            .clone()
            .expect("a ready sandbox has a hold");
        self.ledger.settle(&hold_id, actual)?;
        record.meter.actual = Some(actual);
        record.meter.drift = record
            .meter
            .estimate
            .map(|estimate| i128::from(actual) - i128::from(estimate));
        record.state = SandboxState::Destroyed;
        record.finished_at_ms = Some(now_ms());
        self.save(&mut record)?;
        Ok(record)
    }

    fn destroy_failed(
        &self,
        mut record: SandboxStatus,
        force: bool,
        error: CallError,
    ) -> Result<SandboxStatus, ManagerError> {
        if force {
            return self.force_void(record, format!("forced after: {error}"));
        }
        record.state = SandboxState::Destroying;
        record.note = Some(error.to_string());
        self.save_quietly(&mut record)?;
        Err(ManagerError::DestroyFailed {
            id: record.id,
            error: error.to_string(),
        })
    }

    fn cannot_destroy(
        &self,
        record: SandboxStatus,
        force: bool,
        why: String,
    ) -> Result<SandboxStatus, ManagerError> {
        if force {
            let extension = record.extension.clone().unwrap_or_default();
            return self.force_void(
                record,
                format!("forced: extension `{extension}` is not loaded ({why})"),
            );
        }
        Err(ManagerError::ExtensionNotLoaded {
            id: record.id.clone(),
            extension: record.extension.clone().unwrap_or_default(),
            why,
            state: record.state.name(),
        })
    }

    /// Gives up on destroying: voids the hold, nothing is charged.
    fn force_void(
        &self,
        mut record: SandboxStatus,
        reason: String,
    ) -> Result<SandboxStatus, ManagerError> {
        self.void_current_hold(&record, &reason)?;
        record.meter.hold = None;
        record.meter.actual = Some(0);
        record.state = SandboxState::Destroyed;
        record.note = Some(reason);
        record.finished_at_ms = Some(now_ms());
        self.save(&mut record)?;
        Ok(record)
    }

    fn void_current_hold(&self, record: &SandboxStatus, reason: &str) -> Result<(), ManagerError> {
        let Some(hold_id) = &record.meter.hold_id else {
            return Ok(());
        };
        match self.ledger.void(hold_id, reason) {
            Ok(_) | Err(LedgerError::NoHold { .. }) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// Destroys and settles every ready sandbox whose ttl has passed.
    pub fn sweep_expired(&self, now: u64) -> Result<Vec<SandboxStatus>, ManagerError> {
        let mut swept = Vec::new();
        for record in self.records.all()? {
            let due = record.state == SandboxState::Ready
                && record.expires_at_ms.is_some_and(|at| at <= now);
            if due || record.state == SandboxState::Expired {
                if record.state == SandboxState::Ready {
                    let _guard = self.lock(&record.id);
                    let mut current = self.get(&record.id)?;
                    if current.state != SandboxState::Ready {
                        continue;
                    }
                    current.state = SandboxState::Expired;
                    self.save(&mut current)?;
                }
                match self.destroy(&record.id, false) {
                    Ok(destroyed) => swept.push(destroyed),
                    Err(error) => tracing::warn!(
                        "expired sandbox {} could not be destroyed yet: {error}",
                        record.id
                    ),
                }
            }
        }
        Ok(swept)
    }

    /// Recovery after a crash: records left mid-create are voided (or
    /// destroyed when a handle exists), interrupted destroys are finished,
    /// expired sandboxes are destroyed, holds without a live sandbox are
    /// voided, and process trees without a live sandbox are killed (see
    /// [`crate::sandbox_reaper`]). Safe to run at any start: a healthy host
    /// has nothing to do.
    pub fn reconcile(&self, now: u64) -> Result<ReconcileReport, ManagerError> {
        let mut report = ReconcileReport::default();
        for record in self.records.all()? {
            match record.state {
                SandboxState::Requested | SandboxState::Provisioning if record.handle.is_none() => {
                    let mut record = record;
                    let _guard = self.lock(&record.id);
                    self.void_current_hold(&record, "reconciled: create was interrupted")?;
                    record.meter.hold = None;
                    self.fail(
                        &mut record,
                        "reconciled: create was interrupted; its hold was voided".into(),
                    )?;
                    report.actions.push(format!(
                        "{}: create was interrupted; hold voided, marked failed",
                        record.id
                    ));
                }
                SandboxState::Requested | SandboxState::Provisioning | SandboxState::Destroying => {
                    match self.destroy(&record.id, false) {
                        Ok(done) => report.actions.push(format!(
                            "{}: interrupted {}; destroyed and settled at {}",
                            record.id,
                            record.state.name(),
                            format_credits(done.meter.actual.unwrap_or(0))
                        )),
                        Err(error) => report
                            .actions
                            .push(format!("{}: still cannot be destroyed: {error}", record.id)),
                    }
                }
                _ => {}
            }
        }
        for swept in self.sweep_expired(now)? {
            report.actions.push(format!(
                "{}: ttl passed; destroyed and settled at {}",
                swept.id,
                format_credits(swept.meter.actual.unwrap_or(0))
            ));
        }
        for hold in self.ledger.open_holds()? {
            let sandbox_id = hold
                .sandbox_id
                .rsplit_once('.')
                .map_or(hold.sandbox_id.as_str(), |(id, _)| id);
            let live = self.records.get(sandbox_id)?.is_some_and(|record| {
                record.state.is_live()
                    && record.meter.hold.is_some()
                    && record.meter.hold_id.as_deref() == Some(hold.sandbox_id.as_str())
            });
            if !live {
                self.ledger
                    .void(&hold.sandbox_id, "reconciled: no live sandbox holds it")?;
                report.actions.push(format!(
                    "hold {}: no live sandbox; voided {}",
                    hold.sandbox_id,
                    format_credits(hold.amount)
                ));
            }
        }
        // Process trees no live sandbox owns; directories past retention.
        let live_as_of = now_ms();
        let live = (self.records.all()?.into_iter())
            .filter(|record| record.state.is_live())
            .map(|record| record.id)
            .collect();
        let tidy = crate::sandbox_reaper::reap(&self.extensions, &live, live_as_of);
        report.actions.extend(tidy.lines());
        for action in &report.actions {
            tracing::info!("reconciled: {action}");
        }
        Ok(report)
    }
}

fn set_outcome(record: &mut SandboxStatus, outcome: String) {
    if let Some(attempt) = record.attempts.last_mut() {
        attempt.outcome = Some(outcome);
    }
}
