//! A ready sandbox's life moved (E2B's `set_timeout` and `connect`): it now
//! ends at a new time. Ending sooner only moves the end; ending later must
//! be covered: the hold rises to the estimate's rate over the whole new
//! life, in one ledger operation that the tenant's available credits must
//! cover, or nothing changes.

use super::charge::prorated;
use super::{
    HOLD_GRACE_MS, ManagerError, RecordExtras, SandboxManager, SandboxState, SandboxStatus, now_ms,
};
use crate::ledger::LedgerError;

impl SandboxManager {
    /// Makes a ready sandbox end at `ends_at_ms`. With `only_later`, an end
    /// sooner than the current one is left alone (E2B's `connect`).
    pub async fn set_end(
        &self,
        id: &str,
        ends_at_ms: u64,
        only_later: bool,
    ) -> Result<SandboxStatus, ManagerError> {
        let _guard = self.lock(id).await;
        let record = self.get(id)?;
        if record.state != SandboxState::Ready {
            return Err(ManagerError::Refused(format!(
                "sandbox {id} is {}; only a ready sandbox's timeout can change",
                record.state.name()
            )));
        }
        let current_end = record.expires_at_ms.unwrap_or(0);
        if only_later && ends_at_ms <= current_end {
            return Ok(record);
        }
        // It changes: this host becomes its owner first (on a shared
        // store), and works from the record as it is then.
        self.records.claim(id).await?;
        let mut record = self.get(id)?;
        if record.state != SandboxState::Ready {
            return Err(ManagerError::Refused(format!(
                "sandbox {id} is {}; only a ready sandbox's timeout can change",
                record.state.name()
            )));
        }
        let ready_at = record.ready_at_ms.unwrap_or(record.created_at_ms);
        let rate = record.meter.rate_per_hour.unwrap_or_else(|| {
            let estimate = u128::from(record.meter.estimate.unwrap_or(0));
            let ttl = u128::from(record.spec.ttl_secs.max(1));
            u64::try_from(estimate * 3600 / ttl).unwrap_or(u64::MAX)
        });
        let held = record.meter.hold.unwrap_or(0);
        let needed = prorated(rate, ends_at_ms.saturating_sub(ready_at));
        let add = needed.saturating_sub(held);
        if let Some(hold_id) = record.meter.hold_id.clone() {
            let expires = ends_at_ms.max(now_ms()).saturating_add(HOLD_GRACE_MS);
            match self.ledger.extend(&hold_id, add, expires).await {
                Ok(receipt) => record.meter.hold = Some(receipt.amount),
                Err(error @ LedgerError::InsufficientCredits { .. }) => {
                    return Err(ManagerError::InsufficientCredits(format!(
                        "extending sandbox {id} until then needs {} more credits: {error}",
                        sandboxer_credits::format_credits(add)
                    )));
                }
                Err(error) => return Err(error.into()),
            }
        }
        record.expires_at_ms = Some(ends_at_ms);
        self.save_quietly_with(&mut record, RecordExtras::default())
            .await?;
        Ok(record)
    }
}
