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

use super::{ManagerError, SandboxManager, SandboxState, SandboxStatus};
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
    /// Destroys and settles every ready sandbox whose ttl has passed. A
    /// sandbox that cannot be destroyed is logged and left for later.
    pub async fn sweep_expired(
        &self,
        now: u64,
        retries: Retries,
    ) -> Result<Vec<SandboxStatus>, ManagerError> {
        let mut swept = Vec::new();
        for record in self.records.all()? {
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
        let _guard = self.lock(id).await;
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
        for record in self.records.all()? {
            let interrupted = matches!(
                record.state,
                SandboxState::Requested | SandboxState::Provisioning | SandboxState::Destroying
            );
            if !interrupted || !retries.allows(&record, now) {
                continue;
            }
            let was = record.state.name();
            report
                .actions
                .push(match self.destroy(&record.id, false).await {
                    Ok(done) if done.state == SandboxState::Destroyed => format!(
                        "{}: interrupted {was}; destroyed and settled at {}",
                        record.id,
                        format_credits(done.meter.actual.unwrap_or(0))
                    ),
                    Ok(done) => format!(
                        "{}: interrupted {was}; {} ({})",
                        record.id,
                        done.state.name(),
                        done.note.as_deref().unwrap_or("")
                    ),
                    Err(error) => format!("{}: still cannot be destroyed: {error}", record.id),
                });
        }
        for swept in self.sweep_expired(now, retries).await? {
            report.actions.push(format!(
                "{}: ttl passed; destroyed and settled at {}",
                swept.id,
                format_credits(swept.meter.actual.unwrap_or(0))
            ));
        }
        match self.void_orphan_holds().await {
            Ok(actions) => report.actions.extend(actions),
            Err(error) => report
                .actions
                .push(format!("holds could not be checked: {error}")),
        }
        // Process trees no live sandbox owns; directories past retention.
        let live = self
            .records
            .all()?
            .into_iter()
            .filter(|record| record.state.is_live())
            .map(|record| record.id)
            .collect();
        let tidy = crate::sandbox_reaper::reap(&self.extensions.snapshot(), &live, now);
        report.actions.extend(tidy.lines());
        for action in &report.actions {
            tracing::info!("reconciled: {action}");
        }
        Ok(report)
    }

    /// Voids every open hold whose sandbox record is gone, finished, or on
    /// another attempt: a hold is owned by the live record whose current
    /// attempt it is.
    async fn void_orphan_holds(&self) -> Result<Vec<String>, ManagerError> {
        let mut actions = Vec::new();
        for hold in self.ledger.open_holds()? {
            let sandbox_id = hold
                .sandbox_id
                .rsplit_once('.')
                .map_or(hold.sandbox_id.as_str(), |(id, _)| id);
            let _guard = self.lock(sandbox_id).await;
            let owned = self.records.get(sandbox_id)?.is_some_and(|record| {
                record.state.is_live()
                    && record.meter.hold_id.as_deref() == Some(hold.sandbox_id.as_str())
            });
            if owned {
                continue;
            }
            actions.push(
                match self
                    .ledger
                    .void_async(&hold.sandbox_id, "reconciled: no live sandbox holds it")
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
