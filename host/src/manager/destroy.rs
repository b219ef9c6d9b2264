//! Destroy: the backend's destroy, its usage made durable, priced, capped by
//! the charge policy, settled; and recovery of a create a crash cut short.
//!
//! Order matters for crashes (each step is persisted before the next acts):
//! `destroying` durable → destroy call → meter-actual (in the destroy's
//! key-value session) → charge policy → settle durable → `destroyed`, with
//! the usage and the extension's key-value writes of both calls, in one
//! write. A crash before that write is durable finds the record
//! `destroying`: if the ledger had settled its hold, that charge ends it
//! (destroy is called again only for the extension's own writes, lost with
//! the record, whatever it answers); if not, it is destroyed again (an
//! idempotent destroy reports the same, or that the sandbox is gone). A
//! meter-actual or a settle that fails records the usage (and the
//! extension's writes) before the retry, which prices it without destroying
//! again. The ledger answers a repeated settle with its first result,
//! whatever amount the repeat carries.

use super::charge::{self, ChargeDecision, UNIT_TOLERANCE_PPM};
use super::{
    ManagerError, RecordExtras, SandboxManager, SandboxState, SandboxStatus,
    destroy_retry_delay_ms, disputes, lifecycle_events, now_ms,
};
use crate::ledger::{HoldState, Joint, LedgerError, SettleReceipt};
use crate::runtime::{CallError, ExtError, Extension, PendingKv, Usage};
use crate::state_pg::StateWrite;
use std::sync::Arc;

/// How a charge was arrived at, as the record's `meter.basis` says.
const METERED: &str = "metered";
const HOST_MEASURED: &str = "host-measured";

impl SandboxManager {
    /// Destroys a sandbox, meters it and settles its hold. Idempotent. A
    /// failed destroy is retried with a backoff (the record says when);
    /// calling this again tries at once. With `force`, a sandbox that cannot
    /// be destroyed (its extension is gone, or destroy keeps failing) is
    /// closed and billed the wall time the host measured, at its estimate's
    /// rate.
    pub async fn destroy(&self, id: &str, force: bool) -> Result<SandboxStatus, ManagerError> {
        let _guard = self.lock(id).await;
        self.records.claim(id).await?;
        let record = self.get(id)?;
        self.destroy_locked(record, force).await
    }

    pub(super) async fn destroy_locked(
        &self,
        mut record: SandboxStatus,
        force: bool,
    ) -> Result<SandboxStatus, ManagerError> {
        match record.state {
            SandboxState::Destroyed | SandboxState::Failed => return Ok(record),
            SandboxState::Requested => {
                // Nothing was held or created before a backend was chosen.
                self.fail(&mut record, "create was interrupted before it began".into())
                    .await?;
                return Ok(record);
            }
            SandboxState::Provisioning => match self.recover_create(record, force).await? {
                Recovery::Finished(record) => return Ok(*record),
                Recovery::ToDestroy(recovered) => record = *recovered,
            },
            SandboxState::Ready | SandboxState::Expired | SandboxState::Destroying => {}
        }
        // Settled already: a crash lost the record written after the
        // settle (not synced on a destroy's first try), or pricing it again
        // fails. The ledger's charge ends it.
        let settled = self.settled_before(&record).await;
        let extension = match self.loaded_extension(&record) {
            Ok(extension) => extension,
            Err(why) => {
                if let Some(receipt) = settled {
                    let reason = format!(
                        "its extension `{}` is not loaded",
                        record.extension.as_deref().unwrap_or_default()
                    );
                    return self.finish_settled(record, receipt, &reason, None).await;
                }
                return self.cannot_destroy(record, force, why).await;
            }
        };
        if let Some(receipt) = &settled
            && record.meter.reported_usage.is_none()
        {
            // The usage and the extension's writes were lost with the
            // record: destroy (and meter-actual) run again for those writes,
            // whatever they answer; the charge is the ledger's.
            let kv = match &record.handle {
                Some(handle) => extension.redo_destroy_writes(&record.spec, handle).await,
                None => None,
            };
            let reason = "a crash cut its destroy short";
            return self
                .finish_settled(record, receipt.clone(), reason, kv)
                .await;
        }
        // Only a destroy that ran its whole way here, first time, writes
        // `destroyed` without a sync: `destroying` and the settle are
        // durable, and recovery ends it with the settle's charge (above). A
        // retried one is synced, and so is a forced one
        // (`bill_host_measured`).
        let first_try = record.destroy_failures == 0;

        // A usage measured here, and destroy's own key-value writes: kept
        // on their own if pricing or the settle fails.
        let mut measured = None;
        // The extension's writes of destroy and meter-actual, written with
        // the end.
        let mut end_kv = None;
        if record.meter.reported_usage.is_none() {
            if record.state != SandboxState::Destroying {
                record.state = SandboxState::Destroying;
                self.save(&mut record).await?;
            }
            let host_wall_ms = host_wall_ms(&record);
            let outcome = match &record.handle {
                Some(handle) => extension.destroy_keeping_kv(&record.spec, handle).await,
                None => Err(CallError::Backend {
                    extension: extension.name.clone(),
                    function: "destroy",
                    error: ExtError::NotFound("the host never learned its handle".into()),
                }),
            };
            match outcome {
                Ok((usage, pending_kv)) => {
                    record.meter.host_wall_ms = Some(host_wall_ms);
                    record.meter.reported_usage = Some(usage);
                    record.meter.basis = Some(METERED.into());
                    measured = Some(Measured {
                        destroy_kv: Some(pending_kv),
                    });
                }
                Err(CallError::Backend {
                    error: ExtError::NotFound(message),
                    ..
                }) => {
                    // Already gone on the backend: bill what the host saw.
                    record.meter.host_wall_ms = Some(host_wall_ms);
                    record.meter.reported_usage = Some(wall_only(host_wall_ms));
                    record.meter.basis = Some(HOST_MEASURED.into());
                    record.note = Some(format!(
                        "the backend no longer knew it ({message}); billed the host-measured wall time"
                    ));
                    measured = Some(Measured { destroy_kv: None });
                }
                Err(error) => return self.destroy_failed(record, force, error).await,
            }
        }

        let usage = record.meter.reported_usage.expect("usage was recorded");
        let host_wall_ms = record.meter.host_wall_ms.unwrap_or(usage.wall_ms);
        let asked = if record.meter.basis.as_deref() == Some(HOST_MEASURED) {
            charge::prorated(rate_per_hour(&record), host_wall_ms)
        } else {
            let destroy_kv = measured
                .as_ref()
                .and_then(|measured| measured.destroy_kv.clone());
            let metered = match destroy_kv {
                // Metered in the destroy's key-value session: it reads what
                // the destroy wrote, and both commit with the end.
                Some(destroy_kv) => extension
                    .meter_actual_keeping_kv(&record.spec, usage, destroy_kv)
                    .await
                    .map(|(asked, both_kv)| {
                        end_kv = Some(both_kv);
                        asked
                    }),
                // The usage was recorded by an earlier try.
                None => extension.meter_actual(&record.spec, usage).await,
            };
            match metered {
                Ok(asked) => asked,
                Err(error) => {
                    if let Some(receipt) = settled {
                        let reason = format!("pricing it again failed ({error})");
                        return self.finish_settled(record, receipt, &reason, None).await;
                    }
                    // The usage is kept for the retry, which prices it
                    // without destroying again.
                    self.keep_measured(&mut record, measured).await?;
                    return self.destroy_failed(record, force, error).await;
                }
            }
        };
        let decision = charge::decide(
            asked,
            record.meter.hold.or(record.meter.estimate).unwrap_or(0),
            rate_per_hour(&record),
            host_wall_ms,
            extension.billing.charge_tolerance_ppm,
        );
        if decision.disputed > 0 && measured.is_some() {
            // A cut charge: the usage goes to the disk before the settle,
            // so that recovery prices it again and finds the same dispute
            // (the ledger keeps only the charge).
            let both = Measured {
                destroy_kv: end_kv.take(),
            };
            self.keep_measured(&mut record, Some(both)).await?;
            measured = None;
        }
        let durable = !first_try;
        self.settle_and_finish(record, decision, durable, end_kv, measured)
            .await
    }

    /// The ledger's receipt for a `destroying` record whose hold it has
    /// settled (only a destroyed or force-billed sandbox is settled); none
    /// for any other record, or when the ledger cannot say (the destroy
    /// then goes its usual way, and its settle gets the ledger's answer).
    async fn settled_before(&self, record: &SandboxStatus) -> Option<SettleReceipt> {
        let hold_id = record.meter.hold_id.as_ref()?;
        if record.state != SandboxState::Destroying {
            return None;
        }
        match self.ledger.settle_receipt(hold_id).await {
            Ok(receipt) => receipt,
            Err(error) => {
                tracing::warn!(
                    "sandbox {}: could not ask the ledger whether its hold was settled: {error}",
                    record.id
                );
                None
            }
        }
    }

    /// Finishes a record with the charge the ledger made, `why` it is not
    /// measured and priced again; `kv` is what the extension wrote when
    /// its calls ran again.
    async fn finish_settled(
        &self,
        mut record: SandboxStatus,
        receipt: SettleReceipt,
        why: &str,
        kv: Option<PendingKv>,
    ) -> Result<SandboxStatus, ManagerError> {
        let decision = ChargeDecision {
            asked: receipt.charged,
            ceiling: receipt.charged,
            charged: receipt.charged,
            disputed: 0,
        };
        record.note = Some(format!(
            "the ledger had settled it ({}) before its record said so; finished with that \
             charge, as {why}",
            sandboxer_credits::format_credits(receipt.charged),
        ));
        self.settle_and_finish(record, decision, true, kv, None)
            .await
    }

    /// The extension a record runs on (the one loaded now, or a retired
    /// version kept for its sandboxes), or why there is none.
    fn loaded_extension(&self, record: &SandboxStatus) -> Result<Arc<Extension>, String> {
        let name = record.extension.clone().unwrap_or_default();
        self.extensions.for_existing(&name)
    }

    /// Settles the hold at the decided charge and records the end, with the
    /// extension's key-value writes (`end_kv`). A hold already settled
    /// answers with its first charge (adopted here); a hold already voided
    /// (an operator, or reconcile) charges nothing. On a shared store the
    /// settle and the `destroyed` record commit in one transaction. When the
    /// settle fails, a usage this destroy `measured` is recorded for the
    /// retry.
    async fn settle_and_finish(
        &self,
        mut record: SandboxStatus,
        decision: ChargeDecision,
        durable: bool,
        end_kv: Option<PendingKv>,
        measured: Option<Measured>,
    ) -> Result<SandboxStatus, ManagerError> {
        let now = now_ms();
        let hold_id = record.meter.hold_id.clone();
        if let (Some(hold_id), Some(owner)) = (&hold_id, self.joint_owner()) {
            let slot: Arc<std::sync::Mutex<Option<Finished>>> = Arc::default();
            let (unfinished, written) = (record.clone(), slot.clone());
            let kv = end_kv.and_then(PendingKv::into_writes);
            let then: crate::ledger::JointWrite = Box::new(move |result| {
                let settled = result.clone().and_then(crate::ledger::into_settle);
                let finished = finish_destroyed(unfinished, decision, Some(settled), now).ok()?;
                let write = StateWrite {
                    record: Some(finished.record.clone()),
                    events: finished.events.clone(),
                    kv,
                };
                *written
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(finished);
                Some(write)
            });
            let joint = Joint {
                record_id: record.id.clone(),
                owner,
                then,
            };
            let outcome = self
                .ledger
                .settle_with(hold_id, decision.charged, joint)
                .await;
            // The record was written with the settle when the batch
            // committed: the settle succeeded, or answered for the hold.
            let committed = match &outcome {
                Ok(_) => true,
                Err(LedgerError::HoldClosed { .. } | LedgerError::NoHold { .. }) => true,
                Err(_) => false,
            };
            let finished = slot
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take();
            return match (committed, finished) {
                (true, Some(finished)) => {
                    if let Some(tally) = finished.dispute_tally() {
                        self.records
                            .state()
                            .write_eventually_async(tally)
                            .await
                            .map_err(super::RecordError::from)?;
                    }
                    Ok(finished.record)
                }
                _ => {
                    // The commit's outcome may be unknown (a lost
                    // connection): a settled hold means the record was
                    // written with it, and is not to be written back.
                    if let Ok(None) = self.ledger.settle_receipt(hold_id).await {
                        self.keep_measured_or_warn(&mut record, measured).await;
                    }
                    Err(outcome.err().map_or_else(
                        || ManagerError::Refused("the settle wrote no record".into()),
                        ManagerError::Ledger,
                    ))
                }
            };
        }
        let settled = match &hold_id {
            Some(hold_id) => Some(self.ledger.settle(hold_id, decision.charged).await),
            None => None,
        };
        if let Some(Err(error)) = &settled
            && !matches!(
                error,
                LedgerError::HoldClosed { .. } | LedgerError::NoHold { .. }
            )
        {
            let error = error.clone();
            self.keep_measured_or_warn(&mut record, measured).await;
            return Err(ManagerError::Ledger(error));
        }
        let finished = finish_destroyed(record, decision, settled, now)?;
        let Finished {
            record,
            events,
            disputed,
        } = finished;
        // Unless `durable`, not synced: `destroying` and the settle are on
        // the disk already. If a crash loses this write (the usage, the
        // extension's key-value writes and `destroyed`), the next start
        // finds the record destroying and its hold settled, and ends it
        // with the ledger's charge (see `settled_before`). A dispute is
        // synced: recovery could not tell what was cut. Its events reach
        // readers once the next sync (or a reader's own) puts them on the
        // disk.
        let durable = durable || disputed.is_some();
        self.records
            .put_async(
                &record,
                RecordExtras {
                    events,
                    disputed,
                    kv: end_kv,
                    ..RecordExtras::default()
                },
                durable,
            )
            .await?;
        Ok(record)
    }

    /// Pricing or the settle failed (or the charge was cut) after this
    /// destroy `measured` the usage: the usage and destroy's key-value
    /// writes are recorded, durably, so that the retry (or recovery) prices
    /// them instead of destroying again and measuring longer.
    async fn keep_measured(
        &self,
        record: &mut SandboxStatus,
        measured: Option<Measured>,
    ) -> Result<(), ManagerError> {
        let Some(Measured { destroy_kv }) = measured else {
            return Ok(());
        };
        let extras = RecordExtras {
            kv: destroy_kv,
            ..RecordExtras::default()
        };
        self.save_quietly_with(record, extras).await
    }

    /// [`SandboxManager::keep_measured`] after a failed settle, whose error
    /// is the one to report.
    async fn keep_measured_or_warn(&self, record: &mut SandboxStatus, measured: Option<Measured>) {
        if let Err(error) = self.keep_measured(record, measured).await {
            tracing::warn!(
                "sandbox {}: its settle failed, and its usage could not be recorded for the \
                 retry either: {error}",
                record.id
            );
        }
    }

    /// A destroy (or meter-actual) call failed: try again later, or with
    /// `force` bill the host's own measurement and close the sandbox.
    async fn destroy_failed(
        &self,
        mut record: SandboxStatus,
        force: bool,
        error: CallError,
    ) -> Result<SandboxStatus, ManagerError> {
        if force {
            return self
                .bill_host_measured(record, format!("forced after: {error}"))
                .await;
        }
        let state = if record.state == SandboxState::Provisioning {
            SandboxState::Provisioning
        } else {
            SandboxState::Destroying
        };
        record.state = state;
        record.destroy_failures = record.destroy_failures.saturating_add(1);
        let delay = destroy_retry_delay_ms(record.destroy_failures);
        record.retry_at_ms = Some(now_ms().saturating_add(delay));
        record.note = Some(error.to_string());
        self.save_quietly_with(&mut record, RecordExtras::default())
            .await?;
        Err(ManagerError::DestroyFailed {
            id: record.id,
            error: error.to_string(),
            state: state.name(),
            retry_in_secs: delay.div_ceil(1000),
        })
    }

    async fn cannot_destroy(
        &self,
        record: SandboxStatus,
        force: bool,
        why: String,
    ) -> Result<SandboxStatus, ManagerError> {
        let extension = record.extension.clone().unwrap_or_default();
        if force {
            return self
                .bill_host_measured(
                    record,
                    format!("forced: extension `{extension}` is not loaded ({why})"),
                )
                .await;
        }
        Err(ManagerError::ExtensionNotLoaded {
            id: record.id.clone(),
            extension,
            why,
            state: record.state.name(),
        })
    }

    /// Closes a sandbox whose backend cannot report: the charge is the
    /// estimate's rate over the wall time the host measured (from ready, or
    /// from the create attempt when it never became ready, until now).
    async fn bill_host_measured(
        &self,
        mut record: SandboxStatus,
        note: String,
    ) -> Result<SandboxStatus, ManagerError> {
        // Durable before the settle, as for any destroy: a crash between
        // the two then finds it `destroying` with its hold settled, and ends
        // it with that charge, instead of live with nothing held.
        if record.state != SandboxState::Destroying {
            record.state = SandboxState::Destroying;
            self.save(&mut record).await?;
        }
        let wall_ms = record
            .meter
            .host_wall_ms
            .unwrap_or_else(|| host_wall_ms(&record));
        record.meter.host_wall_ms = Some(wall_ms);
        record.meter.basis = Some(HOST_MEASURED.into());
        record.note = Some(format!("{note}; billed the host-measured wall time"));
        let asked = charge::prorated(rate_per_hour(&record), wall_ms);
        let decision = charge::decide(
            asked,
            record.meter.hold.or(record.meter.estimate).unwrap_or(0),
            rate_per_hour(&record),
            wall_ms,
            UNIT_TOLERANCE_PPM,
        );
        self.settle_and_finish(record, decision, true, None, None)
            .await
    }

    /// A record left in `provisioning`: the create may or may not have
    /// happened. The ledger says how far it got: no hold or a voided one,
    /// nothing is live; a settled one, it was finished and only the record
    /// lags; an open (or expired) one, create may have run, so the handle is
    /// recovered by calling create again (idempotent by sandbox id) and the
    /// sandbox destroyed and billed.
    async fn recover_create(
        &self,
        mut record: SandboxStatus,
        force: bool,
    ) -> Result<Recovery, ManagerError> {
        let Some(hold_id) = record.meter.hold_id.clone() else {
            self.fail(&mut record, "create was interrupted before it began".into())
                .await?;
            return Ok(Recovery::Finished(Box::new(record)));
        };
        let hold = self.ledger.hold_record(&hold_id).await?;
        match hold.map(|hold| hold.state) {
            None => {
                self.fail(
                    &mut record,
                    "create was interrupted before its credits were held; nothing was created"
                        .into(),
                )
                .await?;
                Ok(Recovery::Finished(Box::new(record)))
            }
            Some(HoldState::Voided) => {
                record.meter.hold = None;
                self.fail(
                    &mut record,
                    "create was interrupted after its attempt ended; its hold was voided".into(),
                )
                .await?;
                Ok(Recovery::Finished(Box::new(record)))
            }
            Some(HoldState::Settled) => {
                let charged = self
                    .ledger
                    .settle_receipt(&hold_id)
                    .await?
                    .map_or(0, |receipt| receipt.charged);
                record.meter.hold = Some(record.meter.estimate.unwrap_or(0));
                let decision = ChargeDecision {
                    asked: charged,
                    ceiling: charged,
                    charged,
                    disputed: 0,
                };
                let record = self
                    .settle_and_finish(record, decision, true, None, None)
                    .await?;
                Ok(Recovery::Finished(Box::new(record)))
            }
            Some(HoldState::Open | HoldState::Expired) => {
                record.meter.hold = Some(record.meter.estimate.unwrap_or(0));
                let extension = match self.loaded_extension(&record) {
                    Ok(extension) => extension,
                    Err(why) if force => {
                        self.void_hold(&hold_id, "forced: create was interrupted")
                            .await?;
                        record.meter.hold = None;
                        self.fail(
                            &mut record,
                            format!("forced: create was interrupted and its extension is not loaded ({why}); hold voided"),
                        )
                        .await?;
                        return Ok(Recovery::Finished(Box::new(record)));
                    }
                    Err(why) => {
                        return self
                            .cannot_destroy(record, false, why)
                            .await
                            .map(|record| Recovery::Finished(Box::new(record)));
                    }
                };
                match extension.create_keeping_kv(&record.spec).await {
                    Ok((handle, pending_kv)) => {
                        let started = record
                            .attempts
                            .last()
                            .map_or(record.created_at_ms, |attempt| attempt.started_at_ms);
                        record.handle = Some(handle);
                        record.ready_at_ms = Some(started);
                        record.state = SandboxState::Destroying;
                        record.note = Some(
                            "create was interrupted; recovered its handle to destroy it".into(),
                        );
                        self.save_with(
                            &mut record,
                            RecordExtras {
                                kv: Some(pending_kv),
                                ..RecordExtras::default()
                            },
                        )
                        .await?;
                        Ok(Recovery::ToDestroy(Box::new(record)))
                    }
                    Err(CallError::Backend { error, .. }) => {
                        // The backend answered: it has no such sandbox.
                        let message = crate::runtime::describe_ext_error(&error);
                        self.void_hold(&hold_id, "create was interrupted; nothing was created")
                            .await?;
                        record.meter.hold = None;
                        self.fail(
                            &mut record,
                            format!("create was interrupted; the backend has nothing to destroy ({message}); hold voided"),
                        )
                        .await?;
                        Ok(Recovery::Finished(Box::new(record)))
                    }
                    Err(error) if force => {
                        self.void_hold(&hold_id, "forced: create was interrupted")
                            .await?;
                        record.meter.hold = None;
                        self.fail(
                            &mut record,
                            format!("forced after: {error}; create was interrupted; hold voided"),
                        )
                        .await?;
                        Ok(Recovery::Finished(Box::new(record)))
                    }
                    Err(error) => self
                        .destroy_failed(record, false, error)
                        .await
                        .map(|record| Recovery::Finished(Box::new(record))),
                }
            }
        }
    }
}

/// Where recovering an interrupted create left a record.
enum Recovery {
    /// Nothing more to do (failed, finished, or an error was returned).
    Finished(Box<SandboxStatus>),
    /// Its handle was recovered: destroy it now.
    ToDestroy(Box<SandboxStatus>),
}

/// Wall time the host measured: from ready (or the create attempt, when the
/// host never saw it ready) until now.
fn host_wall_ms(record: &SandboxStatus) -> u64 {
    let since = record.ready_at_ms.unwrap_or_else(|| {
        record
            .attempts
            .last()
            .map_or(record.created_at_ms, |attempt| attempt.started_at_ms)
    });
    now_ms().saturating_sub(since)
}

/// The estimate's hourly rate; for records written before it was kept,
/// derived from the estimate over the ttl.
fn rate_per_hour(record: &SandboxStatus) -> u64 {
    record.meter.rate_per_hour.unwrap_or_else(|| {
        let estimate = u128::from(record.meter.estimate.unwrap_or(0));
        let ttl = u128::from(record.spec.ttl_secs.max(1));
        u64::try_from(estimate * 3600 / ttl).unwrap_or(u64::MAX)
    })
}

fn wall_only(wall_ms: u64) -> Usage {
    Usage {
        wall_ms,
        cpu_ms: 0,
        memory_mb_ms: 0,
        egress_bytes: 0,
    }
}

fn add_note(record: &mut SandboxStatus, note: String) {
    record.note = Some(match record.note.take() {
        Some(existing) => format!("{existing}; {note}"),
        None => note,
    });
}

/// A destroyed record and what its write carries.
struct Finished {
    record: SandboxStatus,
    events: Vec<lifecycle_events::PendingEvent>,
    /// The instance and amount the charge policy cut, for its tally.
    disputed: Option<(String, u64)>,
}

impl Finished {
    fn dispute_tally(&self) -> Option<super::record::LocalWrite> {
        let (instance, disputed) = self.disputed.clone()?;
        Some(Box::new(move |write| {
            disputes::add(write, &instance, disputed).map_err(|error| error.to_string())
        }))
    }
}

/// A usage a destroy measured that no record holds yet (it is in the
/// record being finished), with destroy's own key-value writes, when it
/// made them.
struct Measured {
    destroy_kv: Option<PendingKv>,
}

/// `record` destroyed and billed as `settled` answered (none: it had no
/// hold), at `now`. An error other than the hold's own answer is returned:
/// the sandbox stays as it was, to be settled again.
fn finish_destroyed(
    mut record: SandboxStatus,
    mut decision: ChargeDecision,
    settled: Option<Result<crate::ledger::SettleReceipt, LedgerError>>,
    now: u64,
) -> Result<Finished, LedgerError> {
    match settled {
        None => {}
        Some(Ok(receipt)) if receipt.replayed && receipt.charged != decision.charged => {
            // Settled before at another amount (a crash lost the record of
            // it): that charge stands, and nothing of it is disputed.
            add_note(
                &mut record,
                format!(
                    "the ledger had settled it at {} before; that charge stands",
                    sandboxer_credits::format_credits(receipt.charged)
                ),
            );
            decision = ChargeDecision {
                asked: receipt.charged,
                ceiling: receipt.charged,
                charged: receipt.charged,
                disputed: 0,
            };
        }
        Some(Ok(receipt)) => decision.charged = receipt.charged,
        Some(Err(LedgerError::HoldClosed { state, .. })) => {
            decision.charged = 0;
            add_note(
                &mut record,
                format!("its hold was already {state}; nothing was charged"),
            );
        }
        Some(Err(LedgerError::NoHold { .. })) => {
            decision.charged = 0;
            add_note(&mut record, "it had no hold; nothing was charged".into());
        }
        Some(Err(error)) => return Err(error),
    }
    decision.disputed = decision.asked.saturating_sub(decision.charged);
    let cut = decision.disputed > 0 && decision.charged == decision.ceiling;
    if cut {
        add_note(
            &mut record,
            format!(
                "meter-actual asked {}; charged the policy's ceiling, {} disputed",
                sandboxer_credits::format_credits(decision.asked),
                sandboxer_credits::format_credits(decision.disputed)
            ),
        );
    }
    record.meter.actual = Some(decision.charged);
    record.meter.drift = record
        .meter
        .estimate
        .map(|estimate| i128::from(decision.charged) - i128::from(estimate));
    record.meter.charge = Some(decision);
    record.state = SandboxState::Destroyed;
    record.finished_at_ms = Some(now);
    record.retry_at_ms = None;
    record.updated_at_ms = now;
    let mut events = vec![lifecycle_events::PendingEvent::state_change(&record, now)];
    let mut disputed = None;
    if cut {
        events.push(lifecycle_events::PendingEvent::dispute(
            &record, &decision, now,
        ));
        disputed = Some((
            record.extension.clone().unwrap_or_default(),
            decision.disputed,
        ));
    }
    Ok(Finished {
        record,
        events,
        disputed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn destroying(id: &str) -> SandboxStatus {
        let profile = crate::profile::Profile::parse(
            "[route]\nstrategy = \"explicit\"\nextension = \"stub\"\n",
            std::path::Path::new("test.toml"),
        )
        .unwrap();
        SandboxStatus {
            id: id.into(),
            tenant: "t1".into(),
            profile: "test".into(),
            state: SandboxState::Destroying,
            extension: Some("stub".into()),
            kind: None,
            handle: None,
            spec: profile.spec(id, Some(60)),
            created_at_ms: 0,
            ready_at_ms: Some(0),
            expires_at_ms: Some(60_000),
            finished_at_ms: None,
            updated_at_ms: 0,
            attempts: Vec::new(),
            meter: super::super::record::Meter {
                estimate: Some(1_000),
                hold: Some(1_000),
                ..Default::default()
            },
            note: None,
            destroy_failures: 0,
            retry_at_ms: None,
            metadata: Default::default(),
        }
    }

    fn receipt(charged: u64, replayed: bool) -> crate::ledger::SettleReceipt {
        crate::ledger::SettleReceipt {
            sandbox_id: "sbx-1".into(),
            tenant: "t1".into(),
            extension: "stub".into(),
            held: 1_000,
            charged,
            released: 1_000 - charged,
            overrun: 0,
            charge_seq: 7,
            replayed,
        }
    }

    /// A settle the ledger had answered before (a crash lost the record of
    /// it) at another amount than the one priced again: that charge stands,
    /// and the difference is not a dispute (nothing was cut).
    #[test]
    fn a_replayed_settle_at_another_amount_stands_undisputed() {
        let priced_again = ChargeDecision {
            asked: 900,
            ceiling: 1_000,
            charged: 900,
            disputed: 0,
        };
        let finished = finish_destroyed(
            destroying("sbx-1"),
            priced_again,
            Some(Ok(receipt(500, true))),
            9,
        )
        .unwrap();
        let record = &finished.record;
        assert_eq!(record.state, SandboxState::Destroyed);
        assert_eq!(record.meter.actual, Some(500));
        let decision = record.meter.charge.unwrap();
        assert_eq!(
            (decision.asked, decision.charged, decision.disputed),
            (500, 500, 0)
        );
        assert!(
            record.note.as_deref().is_some_and(
                |note| note.contains("settled it at 0.000500 before; that charge stands")
            ),
            "{:?}",
            record.note
        );
        assert!(finished.disputed.is_none(), "no dispute is tallied");
        assert_eq!(finished.events.len(), 1, "only the state change is evented");

        // The same amount answered again, or a first answer: as priced.
        let first = finish_destroyed(
            destroying("sbx-2"),
            priced_again,
            Some(Ok(receipt(900, true))),
            9,
        )
        .unwrap();
        assert_eq!(
            (first.record.meter.actual, first.record.note),
            (Some(900), None)
        );
    }
}
