//! Recovery after a crash, and the ttl sweep.
//!
//! Every start reconciles: records left mid-create are recovered (see
//! [`SandboxManager::recover_create`]), interrupted destroys finished,
//! expired sandboxes destroyed, holds that no live sandbox owns voided, and
//! process trees that no live sandbox owns killed ([`crate::sandbox_reaper`]).
//! One sandbox that cannot be handled is reported and skipped: it never
//! stops the start or the command about another sandbox. A sandbox whose
//! destroy already failed waits for its backoff, and only a caller that
//! asks for retries (the server's background loop, or `sandbox destroy` of
//! that sandbox) tries it again, so ordinary commands never wait on it.

use super::{ManagerError, SandboxManager, SandboxState, SandboxStatus, now_ms};
use sandboxer_credits::format_credits;

/// What a reconcile pass did, one line per action.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReconcileReport {
    pub actions: Vec<String>,
}

/// Which failed destroys a pass tries again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retries {
    /// Leave every sandbox whose destroy failed alone: a command that is
    /// about something else must not wait on it.
    Skip,
    /// Try those whose backoff has passed.
    Due,
}

impl Retries {
    fn allows(self, record: &SandboxStatus, now: u64) -> bool {
        record.destroy_failures == 0
            || (self == Self::Due && record.retry_at_ms.is_none_or(|at| at <= now))
    }
}

impl SandboxManager {
    /// On a shared store: takes over the live sandboxes whose owner's lease
    /// ran out (a host that died or lost the database) and whose extension
    /// is loaded here, so that this host's reconcile reaps, destroys and
    /// settles them. One line per sandbox taken over; nothing on redb, or
    /// before the extensions are loaded (a command that never loads them
    /// takes nothing over).
    pub async fn tend_leases(&self) -> Vec<String> {
        let Some(shared) = self.records.state().shared() else {
            return Vec::new();
        };
        let loaded = self
            .extensions
            .snapshot()
            .loaded()
            .map(|extension| extension.name.clone())
            .collect();
        match shared.take_over_expired(loaded).await {
            Ok(taken) => taken
                .into_iter()
                .map(|(id, from)| format!("{id}: taken over from host {from}, whose lease ran out"))
                .collect(),
            Err(error) => vec![format!("expired leases could not be checked: {error}")],
        }
    }

    /// Whether a reconcile pass at `now` would act on some sandbox (and so
    /// need the extensions loaded).
    pub fn has_work(&self, now: u64, retries: Retries) -> Result<bool, ManagerError> {
        Ok(self.records.owned_live()?.iter().any(|record| {
            let due = match record.state {
                SandboxState::Requested
                | SandboxState::Provisioning
                | SandboxState::Destroying
                | SandboxState::Expired => true,
                SandboxState::Ready => record.expires_at_ms.is_some_and(|at| at <= now),
                SandboxState::Destroyed | SandboxState::Failed => false,
            };
            due && retries.allows(record, now)
        }))
    }

    /// Destroys and settles every ready sandbox whose ttl has passed. A
    /// sandbox that cannot be destroyed is logged and left for later.
    pub async fn sweep_expired(
        &self,
        now: u64,
        retries: Retries,
    ) -> Result<Vec<SandboxStatus>, ManagerError> {
        let mut swept = Vec::new();
        for record in self.records.owned_live()? {
            let due = record.state == SandboxState::Ready
                && record.expires_at_ms.is_some_and(|at| at <= now);
            if !(due || record.state == SandboxState::Expired) || !retries.allows(&record, now) {
                continue;
            }
            match self.expire_and_destroy(&record.id).await {
                Ok(Some(destroyed)) => swept.push(destroyed),
                Ok(None) => {}
                Err(error) => tracing::warn!(
                    "expired sandbox {} could not be destroyed yet: {error}",
                    record.id
                ),
            }
        }
        Ok(swept)
    }

    async fn expire_and_destroy(&self, id: &str) -> Result<Option<SandboxStatus>, ManagerError> {
        // Busy: another operation of this process has it (a destroy).
        let Some(_guard) = self.try_lock(id) else {
            return Ok(None);
        };
        let mut current = self.get(id)?;
        match current.state {
            SandboxState::Ready => {
                current.state = SandboxState::Expired;
                self.save(&mut current).await?;
            }
            SandboxState::Expired => {}
            // Someone else got to it first.
            _ => return Ok(None),
        }
        self.destroy_locked(current, false).await.map(Some)
    }

    /// Recovery after a crash; safe to run at any start (a healthy host has
    /// nothing to do). Only reading the records can fail it: what goes
    /// wrong with one sandbox is an action line, and the pass goes on.
    pub async fn reconcile(
        &self,
        now: u64,
        retries: Retries,
    ) -> Result<ReconcileReport, ManagerError> {
        let mut report = ReconcileReport::default();
        report.actions.extend(self.restore_lost_records().await);
        // Until every lost record is back, a `provisioning` record may be an
        // earlier attempt of one a hold's memo would restore: recovering it
        // now could end the sandbox while its newer attempt lives on.
        let restored = self
            .restored_lost_records
            .load(std::sync::atomic::Ordering::Acquire);
        let interrupted = |record: &SandboxStatus| {
            let due = match record.state {
                SandboxState::Requested | SandboxState::Destroying => true,
                SandboxState::Provisioning => restored,
                _ => false,
            };
            due && retries.allows(record, now)
        };
        for record in self.records.owned_live()? {
            if !interrupted(&record) {
                continue;
            }
            // A sandbox this process is working on (a create in flight in a
            // server) is not interrupted: leave it to its operation.
            let Some(_guard) = self.try_lock(&record.id) else {
                continue;
            };
            let record = self.get(&record.id)?;
            if !interrupted(&record) {
                continue;
            }
            let was = record.state.name();
            let id = record.id.clone();
            report
                .actions
                .push(match self.destroy_locked(record, false).await {
                    Ok(done) if done.state == SandboxState::Destroyed => format!(
                        "{id}: interrupted {was}; destroyed and settled at {}",
                        format_credits(done.meter.actual.unwrap_or(0))
                    ),
                    Ok(done) => format!(
                        "{id}: interrupted {was}; {} ({})",
                        done.state.name(),
                        done.note.as_deref().unwrap_or("")
                    ),
                    Err(error) => format!("{id}: still cannot be destroyed: {error}"),
                });
        }
        for swept in self.sweep_expired(now, retries).await? {
            report.actions.push(format!(
                "{}: ttl passed; destroyed and settled at {}",
                swept.id,
                format_credits(swept.meter.actual.unwrap_or(0))
            ));
        }
        // Holds past their expiry return to available: on a shared ledger
        // this is how a dead host's holds are released while other hosts
        // run (no host has their records).
        match self.ledger.any_hold_due(now).await {
            Ok(false) => {}
            Ok(true) => match self.ledger.expire_due(now).await {
                Ok(expired) => report.actions.extend(expired.iter().map(|hold| {
                    format!(
                        "hold {}: expired; released {}",
                        hold.sandbox_id,
                        format_credits(hold.released)
                    )
                })),
                Err(error) => report.actions.push(format!(
                    "holds past their expiry could not be closed: {error}"
                )),
            },
            Err(error) => report.actions.push(format!(
                "holds past their expiry could not be checked: {error}"
            )),
        }
        match self.void_orphan_holds().await {
            Ok(actions) => report.actions.extend(actions),
            Err(error) => report
                .actions
                .push(format!("holds could not be checked: {error}")),
        }
        // Process trees no live sandbox of this host owns; directories past
        // retention.
        let live = self
            .records
            .owned_live()?
            .into_iter()
            .map(|record| record.id)
            .collect();
        if let Some(sandboxes_dir) = &self.sandboxes_dir {
            let tidy = crate::sandbox_reaper::tidy_sandboxes(sandboxes_dir, &live, now, now_ms());
            report.actions.extend(tidy.lines());
        }
        for action in &report.actions {
            tracing::info!("reconciled: {action}");
        }
        Ok(report)
    }

    /// [`Self::restore_from_holds`], once per process (a record can only
    /// have been lost by a crash before this process started); again on the
    /// next pass if it failed. Call it before [`Self::has_work`], which
    /// then sees the restored records.
    pub async fn restore_lost_records(&self) -> Vec<String> {
        use std::sync::atomic::Ordering;
        if self.restored_lost_records.load(Ordering::Acquire) {
            return Vec::new();
        }
        match self.restore_from_holds().await {
            Ok((actions, complete)) => {
                self.restored_lost_records
                    .store(complete, Ordering::Release);
                actions
            }
            Err(error) => vec![format!(
                "holds could not be checked for lost records: {error}"
            )],
        }
    }

    /// Restores the `provisioning` records a crash lost. On a ledger this
    /// home has alone, that record is written without waiting for the
    /// disk, then its hold, which keeps a copy of it (the hold's memo) and
    /// is durable before the create is called. A hold with a memo (open, or
    /// expired while the host was down) whose record is missing, or still
    /// on an earlier attempt, gets its record back (synced), still
    /// `provisioning`: the pass then recovers the create like any other
    /// interrupted one. Also says whether nothing was left for later.
    async fn restore_from_holds(&self) -> Result<(Vec<String>, bool), ManagerError> {
        let mut actions = Vec::new();
        if self.ledger.shared() {
            return Ok((actions, true));
        }
        // Whether every hold with a memo was restored or needs nothing:
        // until then the orphan check leaves such holds alone.
        let mut complete = true;
        for hold in self.ledger.noted_holds().await? {
            let Some(memo) = &hold.memo else {
                continue;
            };
            let sandbox_id = hold
                .sandbox_id
                .rsplit_once('.')
                .map_or(hold.sandbox_id.as_str(), |(id, _)| id);
            let Some(_guard) = self.try_lock(sandbox_id) else {
                complete = false;
                continue;
            };
            let mut restored = match serde_json::from_str::<SandboxStatus>(memo) {
                Ok(record) if record.id == sandbox_id => record,
                Ok(_) | Err(_) => {
                    actions.push(format!(
                        "hold {}: its memo is not this sandbox's record; left to the orphan \
                         check",
                        hold.sandbox_id
                    ));
                    continue;
                }
            };
            let lost = match self.records.get(sandbox_id)? {
                None => true,
                Some(current) => {
                    current.state == SandboxState::Provisioning
                        && current.attempts.len() < restored.attempts.len()
                }
            };
            if !lost {
                continue;
            }
            restored.note = Some(format!(
                "its provisioning record was lost in a crash; restored from hold {}",
                hold.sandbox_id
            ));
            actions.push(match self.save(&mut restored).await {
                Ok(()) => format!(
                    "{sandbox_id}: its provisioning record was lost in a crash; restored from \
                     hold {}",
                    hold.sandbox_id
                ),
                Err(error) => {
                    complete = false;
                    format!(
                        "{sandbox_id}: its provisioning record was lost in a crash and could \
                         not be restored from hold {} yet: {error}",
                        hold.sandbox_id
                    )
                }
            });
        }
        Ok((actions, complete))
    }

    /// Voids every open hold whose sandbox record is gone, finished, or on
    /// another attempt: a hold is owned by the live record whose current
    /// attempt it is.
    ///
    /// On a ledger other hosts share, a hold with no record here may be
    /// another host's live sandbox's: only holds of this host's own records
    /// are voided, and the rest are released by their expiry.
    async fn void_orphan_holds(&self) -> Result<Vec<String>, ManagerError> {
        let mut actions = Vec::new();
        let shared = self.ledger.shared();
        // Only a shared store needs them (redb's records are all this host's).
        let owned: std::collections::HashSet<String> = if shared {
            self.records
                .owned_live()?
                .into_iter()
                .map(|record| record.id)
                .collect()
        } else {
            std::collections::HashSet::new()
        };
        for hold in self.ledger.open_holds().await? {
            let sandbox_id = hold
                .sandbox_id
                .rsplit_once('.')
                .map_or(hold.sandbox_id.as_str(), |(id, _)| id);
            // A sandbox being worked on is checked on the next pass.
            let Some(_guard) = self.try_lock(sandbox_id) else {
                continue;
            };
            // On a shared store only holds of this host's own sandboxes are
            // its to judge: another host's are that host's to settle (or,
            // once its lease runs out, the host's that takes it over), and a
            // hold with no record at all is released at its expiry. (This
            // also spares a read per hold of every host.)
            if shared && !owned.contains(sandbox_id) {
                continue;
            }
            let record = self.records.get(sandbox_id)?;
            let owned = record.is_some_and(|record| {
                record.state.is_live()
                    && record.meter.hold_id.as_deref() == Some(hold.sandbox_id.as_str())
            });
            // A hold whose record a crash lost (or left on an earlier
            // attempt) and that could not be restored from it yet: the hold
            // and its memo wait for the next pass.
            if owned
                || (hold.memo.is_some()
                    && !self
                        .restored_lost_records
                        .load(std::sync::atomic::Ordering::Acquire))
            {
                continue;
            }
            actions.push(
                match self
                    .ledger
                    .void(&hold.sandbox_id, "reconciled: no live sandbox holds it")
                    .await
                {
                    Ok(_) => format!(
                        "hold {}: no live sandbox; voided {}",
                        hold.sandbox_id,
                        format_credits(hold.amount)
                    ),
                    Err(error) => format!("hold {}: cannot be voided: {error}", hold.sandbox_id),
                },
            );
        }
        Ok(actions)
    }
}
