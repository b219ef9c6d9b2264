//! `ledger verify`: every invariant of the ledger, checked from the stored
//! tables alone.
//!
//! 1. The journal is gap-free: sequence numbers 1..=N and the counter at N+1.
//! 2. Every journal entry has its outbox event (same id, matching type).
//! 3. Replaying the journal gives exactly the stored account totals.
//! 4. All balances sum to zero; pending debits equal pending credits.
//! 5. Every open hold belongs to its `hold` journal entry, and a tenant's
//!    open holds add up to its pending debits.
//! 6. A tenant's available credits are negative only by a recorded overrun.

use super::error::{LedgerError, storage};
use super::events::{MeterEvent, event_id};
use super::store::*;
use super::types::*;
use redb::{ReadTransaction, ReadableTable};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// Which invariant: `sequence`, `outbox`, `replay`, `zero-sum`, `holds`, `overrun`, `decode`;
    /// on PostgreSQL also `copy` (a column that repeats a JSON field disagrees with it).
    pub check: &'static str,
    pub message: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub journal_entries: u64,
    pub accounts: usize,
    pub open_holds: usize,
    pub violations: Vec<Violation>,
}

/// What verify reads, from one consistent snapshot of a ledger's store.
pub(crate) trait VerifySource {
    fn ledger_id(&self) -> Result<String, LedgerError>;
    fn next_seq(&self) -> Result<u64, LedgerError>;
    /// Every journal entry as stored (seq, JSON), in seq order.
    fn journal(
        &self,
        visit: &mut dyn FnMut(u64, &str) -> Result<(), LedgerError>,
    ) -> Result<(), LedgerError>;
    /// The outbox event stored at `seq` (JSON).
    fn outbox_event(&self, seq: u64) -> Result<Option<String>, LedgerError>;
    /// Every account's stored totals.
    fn accounts(&self, visit: &mut dyn FnMut(&str, AccountTotals)) -> Result<(), LedgerError>;
    /// Every hold record as stored (sandbox id, JSON).
    fn holds(&self, visit: &mut dyn FnMut(&str, &str)) -> Result<(), LedgerError>;
}

impl VerifySource for ReadTransaction {
    fn ledger_id(&self) -> Result<String, LedgerError> {
        Ok(self
            .open_table(META_TEXT)
            .map_err(storage)?
            .get(LEDGER_ID)
            .map_err(storage)?
            .map(|id| id.value().to_string())
            .unwrap_or_default())
    }

    fn next_seq(&self) -> Result<u64, LedgerError> {
        Ok(self
            .open_table(META)
            .map_err(storage)?
            .get(NEXT_SEQ)
            .map_err(storage)?
            .map_or(1, |seq| seq.value()))
    }

    fn journal(
        &self,
        visit: &mut dyn FnMut(u64, &str) -> Result<(), LedgerError>,
    ) -> Result<(), LedgerError> {
        let journal = self.open_table(JOURNAL).map_err(storage)?;
        for row in journal.iter().map_err(storage)? {
            let (seq, json) = row.map_err(storage)?;
            visit(seq.value(), json.value())?;
        }
        Ok(())
    }

    fn outbox_event(&self, seq: u64) -> Result<Option<String>, LedgerError> {
        let outbox = self.open_table(OUTBOX).map_err(storage)?;
        Ok(outbox
            .get(seq)
            .map_err(storage)?
            .map(|json| json.value().to_string()))
    }

    fn accounts(&self, visit: &mut dyn FnMut(&str, AccountTotals)) -> Result<(), LedgerError> {
        let accounts = self.open_table(ACCOUNTS).map_err(storage)?;
        for row in accounts.iter().map_err(storage)? {
            let (account, totals) = row.map_err(storage)?;
            visit(account.value(), totals_from_row(totals.value()));
        }
        Ok(())
    }

    fn holds(&self, visit: &mut dyn FnMut(&str, &str)) -> Result<(), LedgerError> {
        let holds = self.open_table(HOLDS).map_err(storage)?;
        for row in holds.iter().map_err(storage)? {
            let (sandbox_id, json) = row.map_err(storage)?;
            visit(sandbox_id.value(), json.value());
        }
        Ok(())
    }
}

pub(crate) fn verify(source: &dyn VerifySource) -> Result<VerifyReport, LedgerError> {
    let mut report = VerifyReport::default();
    let mut violations = Vec::new();
    let mut violation =
        |check: &'static str, message: String| violations.push(Violation { check, message });

    let ledger_id = source.ledger_id()?;
    let next_seq = source.next_seq()?;

    // 1 and 2, and the replay of the journal for 3.
    let mut replayed: HashMap<String, AccountTotals> = HashMap::new();
    let mut hold_entries: HashMap<u64, JournalEntry> = HashMap::new();
    // What every hold entry of a sandbox adds up to: a hold that was
    // extended has its first entry and one per extension.
    let mut held_by_sandbox: HashMap<String, u64> = HashMap::new();
    let mut expected_seq = 1;
    let mut entries = 0u64;
    source.journal(&mut |seq, json| {
        entries += 1;
        if seq != expected_seq {
            violation(
                "sequence",
                format!("journal jumps from seq {} to {seq}", expected_seq - 1),
            );
        }
        expected_seq = seq + 1;
        let entry: JournalEntry = match serde_json::from_str(json) {
            Ok(entry) => entry,
            Err(error) => {
                violation(
                    "decode",
                    format!("journal entry {seq} does not decode: {error}"),
                );
                return Ok(());
            }
        };
        if entry.seq != seq {
            violation(
                "sequence",
                format!("journal entry stored at {seq} says it is {}", entry.seq),
            );
        }
        match source.outbox_event(seq)? {
            None => violation(
                "outbox",
                format!(
                    "journal entry {seq} ({}) has no outbox event",
                    entry.kind.name()
                ),
            ),
            Some(json) => match serde_json::from_str::<MeterEvent>(&json) {
                Err(error) => violation(
                    "decode",
                    format!("outbox event {seq} does not decode: {error}"),
                ),
                Ok(event) => {
                    if event.id != event_id(&ledger_id, seq)
                        || event.event_type != entry.kind.event_type()
                    {
                        violation(
                            "outbox",
                            format!(
                                "outbox event {seq} is {} {}, not the event of its journal entry",
                                event.id, event.event_type
                            ),
                        );
                    }
                }
            },
        }
        if let Err(message) = apply_to_totals(&mut replayed, &entry) {
            violation("replay", message);
        }
        if entry.kind == EntryKind::Hold {
            if let Some(sandbox_id) = &entry.sandbox_id {
                let held = held_by_sandbox.entry(sandbox_id.clone()).or_default();
                *held = held.saturating_add(entry.amount);
            }
            hold_entries.insert(seq, entry);
        }
        Ok(())
    })?;
    if next_seq != expected_seq {
        violation(
            "sequence",
            format!(
                "the next seq is {next_seq} but the journal ends at {}",
                expected_seq - 1
            ),
        );
    }
    report.journal_entries = entries;

    // 3 and 4.
    let mut stored: BTreeMap<String, AccountTotals> = BTreeMap::new();
    source.accounts(&mut |account, totals| {
        stored.insert(account.to_string(), totals);
    })?;
    report.accounts = stored.len();
    for account in stored
        .keys()
        .chain(replayed.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let table = stored.get(account).copied().unwrap_or_default();
        let journal = replayed.get(account).copied().unwrap_or_default();
        if table != journal {
            violation(
                "replay",
                format!(
                    "account {account}: the table says {table:?}, the journal says {journal:?}"
                ),
            );
        }
    }
    let sum = |field: fn(&AccountTotals) -> u64| {
        stored
            .values()
            .map(|totals| u128::from(field(totals)))
            .sum::<u128>()
    };
    let (debits, credits) = (
        sum(|totals| totals.debits_posted),
        sum(|totals| totals.credits_posted),
    );
    if debits != credits {
        violation(
            "zero-sum",
            format!(
                "posted debits {debits} and credits {credits} differ: balances do not sum to zero"
            ),
        );
    }
    let (pending_debits, pending_credits) = (
        sum(|totals| totals.debits_pending),
        sum(|totals| totals.credits_pending),
    );
    if pending_debits != pending_credits {
        violation(
            "zero-sum",
            format!("pending debits {pending_debits} and credits {pending_credits} differ"),
        );
    }

    // 5.
    let mut open_by_tenant: HashMap<String, u64> = HashMap::new();
    let mut stored_holds = Vec::new();
    source.holds(&mut |sandbox_id, json| {
        stored_holds.push((sandbox_id.to_string(), json.to_string()));
    })?;
    for (sandbox_id, json) in stored_holds {
        let record: HoldRecord = match serde_json::from_str(&json) {
            Ok(record) => record,
            Err(error) => {
                violation(
                    "decode",
                    format!("hold {sandbox_id} does not decode: {error}"),
                );
                continue;
            }
        };
        if record.state != HoldState::Open {
            continue;
        }
        report.open_holds += 1;
        *open_by_tenant
            .entry(tenant_account(&record.tenant))
            .or_default() += record.amount;
        match hold_entries.get(&record.hold_seq) {
            Some(entry)
                if entry.sandbox_id.as_deref() == Some(record.sandbox_id.as_str())
                    && held_by_sandbox.get(&record.sandbox_id) == Some(&record.amount)
                    && entry.tenant == record.tenant => {}
            _ => violation(
                "holds",
                format!(
                    "open hold of sandbox {} has no matching hold entry at seq {}",
                    record.sandbox_id, record.hold_seq
                ),
            ),
        }
    }
    for (account, totals) in stored
        .iter()
        .filter(|(account, _)| account.starts_with("tenant:"))
    {
        let open = open_by_tenant.get(account).copied().unwrap_or(0);
        if open != totals.debits_pending {
            violation(
                "holds",
                format!(
                    "{account} has {open} in open holds but {} pending",
                    totals.debits_pending
                ),
            );
        }
        // 6.
        if totals.available() < -i128::from(totals.overrun) {
            violation(
                "overrun",
                format!(
                    "{account} has {} available, below its recorded overrun of {}",
                    totals.available(),
                    totals.overrun
                ),
            );
        }
    }

    report.violations = violations;
    report.ok = report.violations.is_empty();
    Ok(report)
}

/// What one journal entry does to the account totals (the writer's own
/// rules); an entry that cannot apply is a violation.
fn apply_to_totals(
    totals: &mut HashMap<String, AccountTotals>,
    entry: &JournalEntry,
) -> Result<(), String> {
    let debit = totals.entry(entry.debit.clone()).or_default();
    debit
        .debit(entry.kind, entry.amount, entry.overrun)
        .map_err(|error| {
            format!(
                "entry {} cannot apply to {}: {error:?}",
                entry.seq, entry.debit
            )
        })?;
    let credit = totals.entry(entry.credit.clone()).or_default();
    credit.credit(entry.kind, entry.amount).map_err(|error| {
        format!(
            "entry {} cannot apply to {}: {error:?}",
            entry.seq, entry.credit
        )
    })
}
