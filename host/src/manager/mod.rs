//! The sandbox manager: the one place that joins routing, the runtime and
//! the ledger for a sandbox's lifecycle.
//!
//! `requested → provisioning → ready → destroying → destroyed`, with
//! `failed` and `expired` off the main path. Every transition is written to
//! the sandbox's record (with its lifecycle event) before it is acted on,
//! so a crash at any point can be reconciled: no sandbox without a record,
//! no hold without a live sandbox, no charge twice.

pub mod charge;
mod destroy;
pub mod disputes;
mod extend;
pub mod lifecycle_events;
mod reconcile;
pub mod record;

use crate::ledger::{LedgerError, LedgerStore};
use crate::profile::Profile;
use crate::router::health::{self, HealthError, RouteHealth};
use crate::router::{RouteDecision, Router, RouterError};
use crate::runtime::{ExtensionCatalog, ExtensionSet};
use crate::state_db::StateDb;
pub use reconcile::{ReconcileReport, Retries};
pub use record::{
    Attempt, Meter, RecordError, RecordExtras, RecordStore, SandboxState, SandboxStatus,
};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A hold outlives its sandbox's ttl by this much, so a sandbox destroyed a
/// little late (a slow backend, a host restarting) still settles against it.
pub const HOLD_GRACE_MS: u64 = 10 * 60 * 1000;
/// A failed destroy is tried again after this long, doubled after each
/// further failure up to [`DESTROY_RETRY_MAX_MS`].
pub const DESTROY_RETRY_BASE_MS: u64 = 30_000;
pub const DESTROY_RETRY_MAX_MS: u64 = 30 * 60 * 1000;

/// How long to wait before the next try after `failures` failed destroys.
pub fn destroy_retry_delay_ms(failures: u32) -> u64 {
    let doublings = failures.saturating_sub(1).min(20);
    DESTROY_RETRY_BASE_MS
        .saturating_mul(1 << doublings)
        .min(DESTROY_RETRY_MAX_MS)
}

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
    /// The tenant's available credits do not cover the hold.
    #[error("{0}")]
    InsufficientCredits(String),
    #[error("sandbox {id} could not be created: {attempts}")]
    CreateFailed { id: String, attempts: String },
    #[error("no sandbox `{0}`")]
    NotFound(String),
    #[error(
        "sandbox {id} runs on extension `{extension}`, which is not loaded ({why}); it stays {state} with its hold open until the extension is back, or `sandbox destroy {id} --force` closes it and bills the host-measured time"
    )]
    ExtensionNotLoaded {
        id: String,
        extension: String,
        why: String,
        state: &'static str,
    },
    #[error(
        "sandbox {id}: {error}; it stays {state} with its hold open and is retried in {retry_in_secs} s: retry now with `sandbox destroy {id}`, or add --force to bill the host-measured time and close it"
    )]
    DestroyFailed {
        id: String,
        error: String,
        state: &'static str,
        retry_in_secs: u64,
    },
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
    /// Kept on the record as given.
    pub metadata: std::collections::BTreeMap<String, String>,
}

pub struct SandboxManager {
    ledger: Arc<dyn LedgerStore>,
    records: RecordStore,
    extensions: Arc<ExtensionCatalog>,
    health: RouteHealth,
    /// Sandboxes an operation of this process is working on.
    busy: Mutex<HashSet<String>>,
    /// Woken each time a sandbox is released.
    released: tokio::sync::Notify,
    /// Where sandboxes' process trees live, for reconcile to kill the ones
    /// no live sandbox owns.
    sandboxes_dir: Option<std::path::PathBuf>,
    /// Set once this process has restored the records a crash lost (see
    /// [`SandboxManager::restore_lost_records`]): only a crash before it
    /// started can have lost one.
    restored_lost_records: std::sync::atomic::AtomicBool,
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
        self.manager.released.notify_waiters();
    }
}

impl SandboxManager {
    pub fn new(
        ledger: Arc<dyn LedgerStore>,
        state: Arc<StateDb>,
        extensions: Arc<ExtensionCatalog>,
    ) -> Self {
        Self {
            ledger,
            records: RecordStore::new(state.clone()),
            extensions,
            health: RouteHealth::new(state),
            busy: Mutex::new(HashSet::new()),
            released: tokio::sync::Notify::new(),
            sandboxes_dir: None,
            restored_lost_records: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Lets reconcile kill process trees under `dir` that no live sandbox
    /// owns (and remove directories past their log retention).
    pub fn with_sandboxes_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.sandboxes_dir = Some(dir);
        self
    }

    pub fn ledger(&self) -> &Arc<dyn LedgerStore> {
        &self.ledger
    }

    pub fn state(&self) -> &Arc<StateDb> {
        self.records.state()
    }

    /// The extension set serving now.
    pub fn extensions(&self) -> Arc<ExtensionSet> {
        self.extensions.snapshot()
    }

    /// The catalog the set is swapped in (hot reload).
    pub fn catalog(&self) -> &Arc<ExtensionCatalog> {
        &self.extensions
    }

    pub fn get(&self, id: &str) -> Result<SandboxStatus, ManagerError> {
        self.records
            .get(id)?
            .ok_or_else(|| ManagerError::NotFound(id.to_string()))
    }

    /// Live sandboxes, or every record with `all`.
    pub fn list(&self, all: bool) -> Result<Vec<SandboxStatus>, ManagerError> {
        Ok(if all {
            self.records.all()?
        } else {
            self.records.live()?
        })
    }

    /// Waits until no other operation of this process works on `id`, then
    /// holds it until the guard drops.
    async fn lock(&self, id: &str) -> BusyGuard<'_> {
        loop {
            // Registered before the check, so a release in between wakes it.
            let released = self.released.notified();
            {
                let mut busy = self
                    .busy
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if busy.insert(id.to_string()) {
                    return BusyGuard {
                        manager: self,
                        id: id.to_string(),
                    };
                }
            }
            released.await;
        }
    }

    /// Holds `id` if no other operation of this process works on it.
    fn try_lock(&self, id: &str) -> Option<BusyGuard<'_>> {
        let mut busy = self
            .busy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        busy.insert(id.to_string()).then(|| BusyGuard {
            manager: self,
            id: id.to_string(),
        })
    }

    /// This host as a record's writer, when the ledger commits records with
    /// its operations (both on one PostgreSQL database).
    fn joint_owner(&self) -> Option<crate::state_pg::Owner> {
        if !self.ledger.joint_commits() {
            return None;
        }
        self.records.state().shared().map(|shared| shared.owner())
    }

    /// Writes `record` with the event of its current state.
    async fn save(&self, record: &mut SandboxStatus) -> Result<(), ManagerError> {
        self.save_with(record, RecordExtras::default()).await
    }

    /// Writes `record` with its event and `extras`, in one transaction.
    async fn save_with(
        &self,
        record: &mut SandboxStatus,
        extras: RecordExtras,
    ) -> Result<(), ManagerError> {
        self.save_after(record, None, extras).await
    }

    /// Writes `record` with the event of an earlier state not written on
    /// its own (`requested`), the event of its current state and `extras`,
    /// in one transaction, durably.
    async fn save_after(
        &self,
        record: &mut SandboxStatus,
        earlier: Option<lifecycle_events::PendingEvent>,
        extras: RecordExtras,
    ) -> Result<(), ManagerError> {
        self.put_after(record, earlier, extras, true).await
    }

    /// [`SandboxManager::save_after`], synced only when `durable`.
    async fn put_after(
        &self,
        record: &mut SandboxStatus,
        earlier: Option<lifecycle_events::PendingEvent>,
        mut extras: RecordExtras,
        durable: bool,
    ) -> Result<(), ManagerError> {
        let now = now_ms();
        record.updated_at_ms = now;
        let state_change = lifecycle_events::PendingEvent::state_change(record, now);
        extras
            .events
            .splice(0..0, earlier.into_iter().chain([state_change]));
        self.records.put_async(record, extras, durable).await?;
        Ok(())
    }

    /// Writes `record` durably without an event (a detail of the current
    /// state), with `extras` in the same transaction.
    async fn save_quietly_with(
        &self,
        record: &mut SandboxStatus,
        extras: RecordExtras,
    ) -> Result<(), ManagerError> {
        record.updated_at_ms = now_ms();
        self.records.put_async(record, extras, true).await?;
        Ok(())
    }

    /// Routes, holds, creates; falls back to the next candidate after a
    /// retryable failure. Returns the ready sandbox's record.
    pub async fn create(&self, request: &CreateRequest) -> Result<SandboxStatus, ManagerError> {
        let id = format!("sbx-{:016x}", rand::random::<u64>());
        let _guard = self.lock(&id).await;
        let extensions = self.extensions.snapshot();
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
            destroy_failures: 0,
            retry_at_ms: None,
            metadata: request.metadata.clone(),
        };
        crate::ledger::check_name("tenant", &request.tenant).map_err(ManagerError::Refused)?;
        // `requested` is written with the record's next step (routing's
        // refusal, or `provisioning`), not on its own: nothing is acted on
        // before that step, which is durable before its own action, so a
        // crash in between loses nothing reconcile would need, and the
        // sandbox costs one commit less.
        let mut requested = Some(lifecycle_events::PendingEvent::state_change(&record, now));

        let decision = Router::new(&extensions, &self.health)
            .decide(&request.profile, &spec, now)
            .await?;
        if decision.chosen.is_none() {
            let reasons = decision.reasons();
            self.fail_after(
                &mut record,
                format!("no eligible backend: {reasons}"),
                requested.take(),
            )
            .await?;
            return Err(ManagerError::NoEligibleBackend {
                profile: decision.profile.clone(),
                reasons,
                decision: Box::new(decision),
            });
        }

        let ttl_ms = u64::from(spec.ttl_secs) * 1000;
        for candidate in decision.attempt_order() {
            let extension = extensions
                .get(&candidate.name)
                .expect("eligible candidates are loaded")
                .clone();
            let estimate = candidate
                .estimate
                .expect("eligible candidates have an estimate");
            let rate_per_hour = candidate.rate_per_hour;
            let hold_id = format!("{id}.{}", record.attempts.len() + 1);
            record.state = SandboxState::Provisioning;
            record.extension = Some(candidate.name.clone());
            record.kind = candidate.kind.map(str::to_string);
            record.meter = Meter {
                estimate: Some(estimate),
                rate_per_hour,
                hold_id: Some(hold_id.clone()),
                ..Meter::default()
            };
            record.attempts.push(Attempt {
                extension: candidate.name.clone(),
                hold_id: hold_id.clone(),
                estimate,
                rate_per_hour,
                started_at_ms: now_ms(),
                outcome: None,
            });
            let expires = now_ms() + ttl_ms + HOLD_GRACE_MS;
            let held = match self.joint_owner() {
                // On a shared store the hold and the `provisioning` record
                // saying what it holds commit together.
                Some(owner) => {
                    let now = now_ms();
                    record.updated_at_ms = now;
                    let mut provisioning = record.clone();
                    provisioning.meter.hold = Some(estimate);
                    // A refused hold writes nothing here: `requested` then
                    // goes with the `failed` record below.
                    let events = requested
                        .clone()
                        .into_iter()
                        .chain([lifecycle_events::PendingEvent::state_change(
                            &provisioning,
                            now,
                        )])
                        .collect::<Vec<_>>();
                    let joint = crate::ledger::Joint {
                        record_id: id.clone(),
                        owner,
                        then: Box::new(move |result| {
                            result.is_ok().then_some(crate::state_pg::StateWrite {
                                record: Some(provisioning),
                                events,
                                kv: None,
                            })
                        }),
                    };
                    self.ledger
                        .hold_with(
                            &record.tenant,
                            estimate,
                            &hold_id,
                            &candidate.name,
                            expires,
                            joint,
                        )
                        .await
                }
                // The ledger is this home's alone: the `provisioning` record
                // is written without waiting for the disk, then the hold,
                // which keeps a copy of it (its memo) and is durable before
                // the create is called. If a crash loses the record, the
                // next start restores it from the hold
                // (`restore_from_holds`) and recovers the create.
                None if !self.ledger.shared() => {
                    self.put_after(
                        &mut record,
                        requested.take(),
                        RecordExtras::default(),
                        false,
                    )
                    .await?;
                    let memo = serde_json::to_string(&record).map_err(record::storage)?;
                    self.ledger
                        .hold_noting(
                            &record.tenant,
                            estimate,
                            &hold_id,
                            &candidate.name,
                            expires,
                            memo,
                        )
                        .await
                }
                // A shared ledger (other hosts' holds in it, whose records
                // this host cannot see): the record goes first, durably.
                None => {
                    self.save_after(&mut record, requested.take(), RecordExtras::default())
                        .await?;
                    self.ledger
                        .hold(&record.tenant, estimate, &hold_id, &candidate.name, expires)
                        .await
                }
            };
            if let Err(error) = held {
                let message = error.to_string();
                set_outcome(&mut record, message.clone());
                self.fail_after(&mut record, message, requested.take())
                    .await?;
                return Err(match error {
                    LedgerError::InsufficientCredits { .. } => {
                        ManagerError::InsufficientCredits(error.to_string())
                    }
                    LedgerError::InvalidInput(_) => ManagerError::Refused(error.to_string()),
                    other => ManagerError::Ledger(other),
                });
            }
            requested = None;
            record.meter.hold = Some(estimate);

            let started = Instant::now();
            match extension.create_keeping_kv(&spec).await {
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
                    let extras = RecordExtras {
                        kv: Some(pending_kv),
                        local: Some(Box::new(move |write| {
                            health::apply_outcome(write, &instance, true, ready_at)?;
                            health::apply_latency(write, &instance, latency_ms)
                        })),
                        ..RecordExtras::default()
                    };
                    self.save_with(&mut record, extras).await?;
                    return Ok(record);
                }
                Err(error) => {
                    let message = error.to_string();
                    self.void_hold(&hold_id, &format!("create failed: {message}"))
                        .await?;
                    record.meter.hold = None;
                    set_outcome(&mut record, message);
                    if error.is_retryable() {
                        self.health
                            .record_outcome(&candidate.name, false, now_ms())
                            .await?;
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
        self.fail(&mut record, format!("every attempt failed: {attempts}"))
            .await?;
        Err(ManagerError::CreateFailed { id, attempts })
    }

    async fn fail(&self, record: &mut SandboxStatus, note: String) -> Result<(), ManagerError> {
        self.fail_after(record, note, None).await
    }

    /// [`SandboxManager::fail`], with the event of an earlier state not
    /// written on its own.
    async fn fail_after(
        &self,
        record: &mut SandboxStatus,
        note: String,
        earlier: Option<lifecycle_events::PendingEvent>,
    ) -> Result<(), ManagerError> {
        record.state = SandboxState::Failed;
        record.note = Some(note);
        record.finished_at_ms = Some(now_ms());
        record.retry_at_ms = None;
        self.save_after(record, earlier, RecordExtras::default())
            .await
    }

    /// Voids a hold, accepting that it may already be closed: a replay
    /// answers its first void; an expired or missing hold has nothing left
    /// to void. Only a settled hold (which never happens before ready) or a
    /// storage failure is an error.
    async fn void_hold(&self, hold_id: &str, reason: &str) -> Result<(), ManagerError> {
        match self.ledger.void(hold_id, reason).await {
            Ok(_) | Err(LedgerError::NoHold { .. }) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}

fn set_outcome(record: &mut SandboxStatus, outcome: String) {
    if let Some(attempt) = record.attempts.last_mut() {
        attempt.outcome = Some(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_send<T: Send>(_: T) {}

    /// The server awaits the manager on any worker thread: its futures must
    /// be `Send`. This fails to compile, not to run, when one is not.
    #[allow(dead_code)]
    fn the_lifecycle_futures_are_send(manager: &SandboxManager, request: &CreateRequest) {
        is_send(manager.create(request));
        is_send(manager.destroy("sbx-0", false));
        is_send(manager.reconcile(0, Retries::Due));
        is_send(manager.sweep_expired(0, Retries::Due));
    }
}
