//! The ledger's tables and the one function that changes them: applying an
//! operation inside a write transaction.
//!
//! Each operation is planned first (checks, new account totals computed in
//! memory with checked arithmetic) and written only when the whole plan is
//! valid, so a refused operation writes nothing and never disturbs the other
//! operations of its batch.

use super::error::{LedgerError, storage};
use super::events::journal_event;
use super::types::*;
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};
use sandboxer_credits::format_credits;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(crate) const META_TEXT: TableDefinition<&str, &str> = TableDefinition::new("meta_text");
/// account -> (debits posted, credits posted, debits pending, credits pending, overrun)
pub(crate) const ACCOUNTS: TableDefinition<&str, (u64, u64, u64, u64, u64)> =
    TableDefinition::new("accounts");
/// sandbox id -> HoldRecord (JSON)
pub(crate) const HOLDS: TableDefinition<&str, &str> = TableDefinition::new("holds");
/// (expires at ms, sandbox id) of open holds only
pub(crate) const HOLD_EXPIRY: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("hold_expiry");
/// seq -> JournalEntry (JSON); append-only
pub(crate) const JOURNAL: TableDefinition<u64, &str> = TableDefinition::new("journal");
/// (tenant, seq): the journal entries of each tenant
pub(crate) const TENANT_ENTRIES: TableDefinition<(&str, u64), ()> =
    TableDefinition::new("tenant_entries");
/// seq -> MeterEvent (JSON) of the journal entry with that seq
pub(crate) const OUTBOX: TableDefinition<u64, &str> = TableDefinition::new("outbox");
/// idempotency key -> StoredReceipt (JSON)
pub(crate) const KEYS: TableDefinition<&str, &str> = TableDefinition::new("idempotency_keys");

pub(crate) const NEXT_SEQ: &str = "next_seq";
pub(crate) const LEDGER_ID: &str = "ledger_id";
/// The lsn of the newest batch of the redo log that redb holds.
pub(crate) const WAL_LSN: &str = "wal_lsn";
const DEFAULT_CREDITS_KEY: &str = "grant/default-credits";

pub(crate) fn totals_from_row(row: (u64, u64, u64, u64, u64)) -> AccountTotals {
    AccountTotals {
        debits_posted: row.0,
        credits_posted: row.1,
        debits_pending: row.2,
        credits_pending: row.3,
        overrun: row.4,
    }
}

fn totals_to_row(totals: &AccountTotals) -> (u64, u64, u64, u64, u64) {
    (
        totals.debits_posted,
        totals.credits_posted,
        totals.debits_pending,
        totals.credits_pending,
        totals.overrun,
    )
}

/// What the key table keeps: the operation (to tell a replay from a reuse)
/// and its first result.
#[derive(Serialize, Deserialize)]
struct StoredReceipt {
    operation: Operation,
    receipt: Receipt,
}

/// The receipt kept under an idempotency key.
pub(crate) fn stored_receipt(json: &str) -> Result<Receipt, LedgerError> {
    Ok(serde_json::from_str::<StoredReceipt>(json)
        .map_err(storage)?
        .receipt)
}

/// Why an operation did not apply.
pub(crate) enum ApplyError {
    /// Refused by a check; nothing was written.
    Refused(LedgerError),
    /// Storage failed midway; the whole transaction must be abandoned.
    Fatal(LedgerError),
    /// The row was not read before the batch ran (PostgreSQL, whose rows
    /// are read ahead): read it, then run the whole batch again.
    NotLoaded(Row),
}

/// A row the operations of a batch read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Row {
    Account(String),
    Hold(String),
    Key(String),
}

/// The rows one batch of operations reads and writes, whatever keeps them:
/// redb's tables in a write transaction ([`RedbTables`]), or rows read
/// ahead from PostgreSQL under its ledger lock (`postgres.rs`).
pub(crate) trait Tables {
    fn account(&self, account: &str) -> Result<Option<AccountTotals>, ApplyError>;
    fn put_account(&mut self, account: &str, totals: &AccountTotals) -> Result<(), ApplyError>;
    fn hold(&self, sandbox_id: &str) -> Result<Option<HoldRecord>, ApplyError>;
    fn put_hold(&mut self, record: &HoldRecord) -> Result<(), ApplyError>;
    /// The ids of open holds that expire at or before `now_ms`, soonest first.
    fn due_holds(&self, now_ms: u64) -> Result<Vec<String>, ApplyError>;
    /// The open-hold expiry index: a hold now expires at `to` instead of
    /// `from` (`None`: it had no entry, or has none any more).
    fn move_expiry(
        &mut self,
        sandbox_id: &str,
        from: Option<u64>,
        to: Option<u64>,
    ) -> Result<(), ApplyError>;
    /// What an idempotency key keeps (JSON of a stored receipt).
    fn key(&self, key: &str) -> Result<Option<String>, ApplyError>;
    fn put_key(&mut self, key: &str, stored_json: &str) -> Result<(), ApplyError>;
    /// Appends a journal entry and its outbox event.
    fn append(
        &mut self,
        entry: &JournalEntry,
        entry_json: &str,
        event_json: &str,
    ) -> Result<(), ApplyError>;
}

impl From<redb::StorageError> for ApplyError {
    fn from(error: redb::StorageError) -> Self {
        Self::Fatal(storage(error))
    }
}

fn fatal(error: impl std::fmt::Display) -> ApplyError {
    ApplyError::Fatal(storage(error))
}

fn refused(error: LedgerError) -> ApplyError {
    ApplyError::Refused(error)
}

/// A new ledger's id: in every meter event's id, so that two ledgers'
/// events never share one.
pub(crate) fn initial_ledger_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Creates the tables and the ledger's id on first open. Returns the id,
/// whether it was created now, and the lsn of the newest redo-log batch the
/// ledger holds.
pub(crate) fn initialize(write: &WriteTransaction) -> Result<(String, bool, u64), LedgerError> {
    let mut meta = write.open_table(META).map_err(storage)?;
    if meta.get(NEXT_SEQ).map_err(storage)?.is_none() {
        meta.insert(NEXT_SEQ, 1).map_err(storage)?;
    }
    let applied = meta
        .get(WAL_LSN)
        .map_err(storage)?
        .map_or(0, |lsn| lsn.value());
    let mut meta_text = write.open_table(META_TEXT).map_err(storage)?;
    let existing = meta_text
        .get(LEDGER_ID)
        .map_err(storage)?
        .map(|id| id.value().to_string());
    let (ledger_id, fresh) = match existing {
        Some(id) => (id, false),
        None => {
            let id = initial_ledger_id();
            meta_text.insert(LEDGER_ID, id.as_str()).map_err(storage)?;
            (id, true)
        }
    };
    write.open_table(HOLDS).map_err(storage)?;
    write.open_table(JOURNAL).map_err(storage)?;
    write.open_table(OUTBOX).map_err(storage)?;
    write.open_table(KEYS).map_err(storage)?;
    write.open_table(ACCOUNTS).map_err(storage)?;
    write.open_table(HOLD_EXPIRY).map_err(storage)?;
    write.open_table(TENANT_ENTRIES).map_err(storage)?;
    Ok((ledger_id, fresh, applied))
}

/// One entry an operation means to write.
struct Draft {
    kind: EntryKind,
    debit: String,
    credit: String,
    amount: u64,
    tenant: String,
    sandbox_id: Option<String>,
    overrun: u64,
    reason: Option<String>,
    extension: Option<String>,
}

/// redb's tables, open in one write transaction (one batch).
pub(crate) struct RedbTables<'txn> {
    accounts: Table<'txn, &'static str, (u64, u64, u64, u64, u64)>,
    holds: Table<'txn, &'static str, &'static str>,
    hold_expiry: Table<'txn, (u64, &'static str), ()>,
    journal: Table<'txn, u64, &'static str>,
    tenant_entries: Table<'txn, (&'static str, u64), ()>,
    outbox: Table<'txn, u64, &'static str>,
    keys: Table<'txn, &'static str, &'static str>,
    meta: Table<'txn, &'static str, u64>,
}

impl<'txn> RedbTables<'txn> {
    /// Opens the tables and reads the ledger's id and next sequence number.
    pub fn open(write: &'txn WriteTransaction) -> Result<(Self, String, u64), LedgerError> {
        let meta = write.open_table(META).map_err(storage)?;
        let next_seq = meta
            .get(NEXT_SEQ)
            .map_err(storage)?
            .map_or(1, |seq| seq.value());
        let ledger_id = write
            .open_table(META_TEXT)
            .map_err(storage)?
            .get(LEDGER_ID)
            .map_err(storage)?
            .map(|id| id.value().to_string())
            .ok_or_else(|| storage("the ledger has no id: it was not initialized"))?;
        let tables = Self {
            accounts: write.open_table(ACCOUNTS).map_err(storage)?,
            holds: write.open_table(HOLDS).map_err(storage)?,
            hold_expiry: write.open_table(HOLD_EXPIRY).map_err(storage)?,
            journal: write.open_table(JOURNAL).map_err(storage)?,
            tenant_entries: write.open_table(TENANT_ENTRIES).map_err(storage)?,
            outbox: write.open_table(OUTBOX).map_err(storage)?,
            keys: write.open_table(KEYS).map_err(storage)?,
            meta,
        };
        Ok((tables, ledger_id, next_seq))
    }

    /// Persists the sequence counter; call once after the batch's operations.
    pub fn finish(mut self, next_seq: u64) -> Result<(), LedgerError> {
        self.meta.insert(NEXT_SEQ, next_seq).map_err(storage)?;
        Ok(())
    }
}

impl Tables for RedbTables<'_> {
    fn account(&self, account: &str) -> Result<Option<AccountTotals>, ApplyError> {
        Ok(self
            .accounts
            .get(account)?
            .map(|row| totals_from_row(row.value())))
    }

    fn put_account(&mut self, account: &str, totals: &AccountTotals) -> Result<(), ApplyError> {
        self.accounts.insert(account, totals_to_row(totals))?;
        Ok(())
    }

    fn hold(&self, sandbox_id: &str) -> Result<Option<HoldRecord>, ApplyError> {
        match self.holds.get(sandbox_id)? {
            None => Ok(None),
            Some(json) => serde_json::from_str(json.value()).map_err(fatal),
        }
    }

    fn put_hold(&mut self, record: &HoldRecord) -> Result<(), ApplyError> {
        let json = serde_json::to_string(record).map_err(fatal)?;
        self.holds
            .insert(record.sandbox_id.as_str(), json.as_str())?;
        Ok(())
    }

    fn due_holds(&self, now_ms: u64) -> Result<Vec<String>, ApplyError> {
        let mut due = Vec::new();
        for entry in self.hold_expiry.range(..=(now_ms, "\u{10ffff}"))? {
            let (key, _) = entry?;
            due.push(key.value().1.to_string());
        }
        Ok(due)
    }

    fn move_expiry(
        &mut self,
        sandbox_id: &str,
        from: Option<u64>,
        to: Option<u64>,
    ) -> Result<(), ApplyError> {
        if let Some(from) = from {
            self.hold_expiry.remove((from, sandbox_id))?;
        }
        if let Some(to) = to {
            self.hold_expiry.insert((to, sandbox_id), ())?;
        }
        Ok(())
    }

    fn key(&self, key: &str) -> Result<Option<String>, ApplyError> {
        Ok(self.keys.get(key)?.map(|json| json.value().to_string()))
    }

    fn put_key(&mut self, key: &str, stored_json: &str) -> Result<(), ApplyError> {
        self.keys.insert(key, stored_json)?;
        Ok(())
    }

    fn append(
        &mut self,
        entry: &JournalEntry,
        entry_json: &str,
        event_json: &str,
    ) -> Result<(), ApplyError> {
        self.journal.insert(entry.seq, entry_json)?;
        self.tenant_entries
            .insert((entry.tenant.as_str(), entry.seq), ())?;
        self.outbox.insert(entry.seq, event_json)?;
        Ok(())
    }
}

/// One batch of operations over its tables: every rule of the ledger.
pub(crate) struct Batch<T> {
    tables: T,
    ledger_id: String,
    next_seq: u64,
    now_ms: u64,
    default_credits: u64,
}

impl<T: Tables> Batch<T> {
    pub fn new(
        tables: T,
        ledger_id: String,
        next_seq: u64,
        now_ms: u64,
        default_credits: u64,
    ) -> Self {
        Self {
            tables,
            ledger_id,
            next_seq,
            now_ms,
            default_credits,
        }
    }

    /// The tables and the next sequence number, to persist.
    pub fn into_parts(self) -> (T, u64) {
        (self.tables, self.next_seq)
    }

    pub fn apply(&mut self, operation: &Operation) -> Result<Receipt, ApplyError> {
        if let Some(key) = operation.key()
            && let Some(receipt) = self.replay(&key, operation)?
        {
            return Ok(receipt);
        }
        let receipt = match operation {
            Operation::Grant {
                tenant,
                amount,
                key,
            } => self.grant(tenant, *amount, key)?,
            Operation::Hold {
                tenant,
                amount,
                sandbox_id,
                extension,
                expires_at_ms,
                memo,
            } => self.hold(
                tenant,
                *amount,
                sandbox_id,
                extension,
                *expires_at_ms,
                memo.clone(),
            )?,
            Operation::Settle { sandbox_id, actual } => self.settle(sandbox_id, *actual)?,
            Operation::Void { sandbox_id, reason } => self.void(sandbox_id, reason)?,
            Operation::ExpireDue { now_ms } => self.expire_due(*now_ms)?,
            Operation::Extend {
                sandbox_id,
                add,
                expires_at_ms,
            } => self.extend(sandbox_id, *add, *expires_at_ms)?,
        };
        if let Some(key) = operation.key() {
            self.remember(&key, operation, &receipt)?;
        }
        Ok(receipt)
    }

    /// The first result of `key` when `operation` repeats it; an error when
    /// the key was used for something else.
    ///
    /// A step of a hold (`hold/`, `settle/`, `void/` + hold id) is the same
    /// step whatever else the replay carries: a void with another reason or
    /// a settle at a re-measured amount gets the first answer, so a caller
    /// recovering from a crash learns what was done instead of being told
    /// its key is taken. A caller's own key (a grant) must repeat the same
    /// operation exactly.
    fn replay(&self, key: &str, operation: &Operation) -> Result<Option<Receipt>, ApplyError> {
        let Some(stored) = self.tables.key(key)? else {
            return Ok(None);
        };
        let stored: StoredReceipt = serde_json::from_str(&stored).map_err(fatal)?;
        let same_step = !matches!(operation, Operation::Grant { .. })
            && std::mem::discriminant(&stored.operation) == std::mem::discriminant(operation);
        if same_step || &stored.operation == operation {
            Ok(Some(stored.receipt.mark_replayed()))
        } else {
            // A caller's grant key is shown as the caller wrote it.
            let key = key.strip_prefix("grant/").unwrap_or(key).to_string();
            Err(refused(LedgerError::KeyReused {
                key,
                first: describe(&stored.operation),
            }))
        }
    }

    fn remember(
        &mut self,
        key: &str,
        operation: &Operation,
        receipt: &Receipt,
    ) -> Result<(), ApplyError> {
        let mut operation = operation.clone();
        // A hold's memo lives with the open hold, not with its key.
        if let Operation::Hold { memo, .. } = &mut operation {
            *memo = None;
        }
        let stored = StoredReceipt {
            operation,
            receipt: receipt.clone(),
        };
        let json = serde_json::to_string(&stored).map_err(fatal)?;
        self.tables.put_key(key, &json)
    }

    fn account(&self, account: &str) -> Result<AccountTotals, ApplyError> {
        Ok(self.tables.account(account)?.unwrap_or_default())
    }

    pub fn tenant_summary(&self, tenant: &str) -> Result<AccountTotals, ApplyError> {
        self.account(&tenant_account(tenant))
    }

    /// Grants the default tenant its starting credits the first time it is
    /// used, exactly once.
    fn ensure_default_credits(&mut self, tenant: &str) -> Result<(), ApplyError> {
        if tenant != DEFAULT_TENANT || self.tables.key(DEFAULT_CREDITS_KEY)?.is_some() {
            return Ok(());
        }
        let operation = Operation::Grant {
            tenant: DEFAULT_TENANT.into(),
            amount: self.default_credits,
            key: "default-credits".into(),
        };
        let receipt = if self.default_credits == 0 {
            Receipt::Grant(GrantReceipt {
                seq: 0,
                tenant: DEFAULT_TENANT.into(),
                amount: 0,
                replayed: false,
            })
        } else {
            self.post_grant(DEFAULT_TENANT, self.default_credits, "default-credits")?
        };
        self.remember(DEFAULT_CREDITS_KEY, &operation, &receipt)
    }

    pub fn ensure_default(&mut self) -> Result<(), ApplyError> {
        self.ensure_default_credits(DEFAULT_TENANT)
    }

    fn grant(&mut self, tenant: &str, amount: u64, key: &str) -> Result<Receipt, ApplyError> {
        check_name("tenant", tenant)
            .map_err(|message| refused(LedgerError::InvalidInput(message)))?;
        if amount == 0 {
            return Err(refused(LedgerError::InvalidInput(
                "the amount to add must be above zero".into(),
            )));
        }
        self.ensure_default_credits(tenant)?;
        self.post_grant(tenant, amount, key)
    }

    fn post_grant(&mut self, tenant: &str, amount: u64, key: &str) -> Result<Receipt, ApplyError> {
        let seqs = self.write(
            &format!("grant/{key}"),
            vec![Draft {
                kind: EntryKind::Grant,
                debit: GRANTS_ACCOUNT.into(),
                credit: tenant_account(tenant),
                amount,
                tenant: tenant.into(),
                sandbox_id: None,
                overrun: 0,
                reason: None,
                extension: None,
            }],
        )?;
        Ok(Receipt::Grant(GrantReceipt {
            seq: seqs[0],
            tenant: tenant.into(),
            amount,
            replayed: false,
        }))
    }

    fn hold(
        &mut self,
        tenant: &str,
        amount: u64,
        sandbox_id: &str,
        extension: &str,
        expires_at_ms: u64,
        memo: Option<String>,
    ) -> Result<Receipt, ApplyError> {
        let invalid = |message: String| refused(LedgerError::InvalidInput(message));
        check_name("tenant", tenant).map_err(invalid)?;
        check_name("extension", extension).map_err(invalid)?;
        check_name("sandbox", sandbox_id).map_err(invalid)?;
        if expires_at_ms <= self.now_ms {
            return Err(invalid(format!(
                "the hold for sandbox `{sandbox_id}` would expire in the past"
            )));
        }
        if self.tables.hold(sandbox_id)?.is_some() {
            // The hold key is derived from the sandbox id, so this is a
            // hold written by another path; never hold twice for a sandbox.
            return Err(refused(LedgerError::KeyReused {
                key: format!("hold/{sandbox_id}"),
                first: "an earlier hold".into(),
            }));
        }
        self.ensure_default_credits(tenant)?;
        let available = self.tenant_summary(tenant)?.available();
        if available < i128::from(amount) || available < 0 {
            return Err(refused(LedgerError::InsufficientCredits {
                tenant: tenant.into(),
                available,
                requested: amount,
            }));
        }
        let key = format!("hold/{sandbox_id}");
        let seqs = self.write(
            &key,
            vec![Draft {
                kind: EntryKind::Hold,
                debit: tenant_account(tenant),
                credit: HOLDS_ACCOUNT.into(),
                amount,
                tenant: tenant.into(),
                sandbox_id: Some(sandbox_id.into()),
                overrun: 0,
                reason: None,
                extension: Some(extension.into()),
            }],
        )?;
        let record = HoldRecord {
            sandbox_id: sandbox_id.into(),
            tenant: tenant.into(),
            extension: extension.into(),
            amount,
            expires_at_ms,
            state: HoldState::Open,
            hold_seq: seqs[0],
            closed_seq: None,
            memo,
        };
        self.tables.put_hold(&record)?;
        self.tables
            .move_expiry(sandbox_id, None, Some(expires_at_ms))?;
        Ok(Receipt::Hold(HoldReceipt {
            seq: seqs[0],
            tenant: tenant.into(),
            sandbox_id: sandbox_id.into(),
            amount,
            expires_at_ms,
            replayed: false,
        }))
    }

    fn settle(&mut self, sandbox_id: &str, actual: u64) -> Result<Receipt, ApplyError> {
        let mut record = self.get_hold(sandbox_id)?;
        let held = match record.state {
            HoldState::Open => record.amount,
            // The reservation ran out before the sandbox was settled: the
            // usage is still charged, all of it above the (now empty) hold.
            HoldState::Expired => 0,
            HoldState::Settled => return Err(refused(closed(sandbox_id, "settled"))),
            HoldState::Voided => return Err(refused(closed(sandbox_id, "voided"))),
        };
        let overrun = actual.saturating_sub(held);
        let key = format!("settle/{sandbox_id}");
        let mut drafts = Vec::new();
        if record.state == HoldState::Open {
            drafts.push(close_draft(&record, EntryKind::Release, None));
        }
        drafts.push(Draft {
            kind: EntryKind::Charge,
            debit: tenant_account(&record.tenant),
            credit: revenue_account(&record.extension),
            amount: actual,
            tenant: record.tenant.clone(),
            sandbox_id: Some(sandbox_id.into()),
            overrun,
            reason: None,
            extension: Some(record.extension.clone()),
        });
        let seqs = self.write(&key, drafts)?;
        if record.state == HoldState::Open {
            self.tables
                .move_expiry(sandbox_id, Some(record.expires_at_ms), None)?;
            record.closed_seq = Some(seqs[0]);
        }
        record.state = HoldState::Settled;
        self.put_hold(&record)?;
        Ok(Receipt::Settle(SettleReceipt {
            sandbox_id: sandbox_id.into(),
            tenant: record.tenant.clone(),
            extension: record.extension.clone(),
            held,
            charged: actual,
            released: held.saturating_sub(actual),
            overrun,
            charge_seq: *seqs.last().expect("a charge entry"),
            replayed: false,
        }))
    }

    fn void(&mut self, sandbox_id: &str, reason: &str) -> Result<Receipt, ApplyError> {
        let mut record = self.get_hold(sandbox_id)?;
        match record.state {
            HoldState::Open => {}
            HoldState::Expired => {
                // Nothing left to release; the memo goes, as with any void.
                if record.memo.is_some() {
                    record.memo = None;
                    self.tables.put_hold(&record)?;
                }
                return Ok(Receipt::Void(VoidReceipt {
                    sandbox_id: sandbox_id.into(),
                    tenant: record.tenant,
                    released: 0,
                    seq: None,
                    replayed: false,
                }));
            }
            HoldState::Settled => return Err(refused(closed(sandbox_id, "settled"))),
            HoldState::Voided => return Err(refused(closed(sandbox_id, "voided"))),
        }
        let seqs = self.write(
            &format!("void/{sandbox_id}"),
            vec![close_draft(
                &record,
                EntryKind::Void,
                Some(reason.to_string()),
            )],
        )?;
        self.tables
            .move_expiry(sandbox_id, Some(record.expires_at_ms), None)?;
        record.state = HoldState::Voided;
        record.closed_seq = Some(seqs[0]);
        self.put_hold(&record)?;
        Ok(Receipt::Void(VoidReceipt {
            sandbox_id: sandbox_id.into(),
            tenant: record.tenant,
            released: record.amount,
            seq: Some(seqs[0]),
            replayed: false,
        }))
    }

    fn extend(
        &mut self,
        sandbox_id: &str,
        add: u64,
        expires_at_ms: u64,
    ) -> Result<Receipt, ApplyError> {
        let mut record = self.get_hold(sandbox_id)?;
        match record.state {
            HoldState::Open => {}
            HoldState::Settled => return Err(refused(closed(sandbox_id, "settled"))),
            HoldState::Voided => return Err(refused(closed(sandbox_id, "voided"))),
            HoldState::Expired => return Err(refused(closed(sandbox_id, "expired"))),
        }
        if expires_at_ms <= self.now_ms {
            return Err(refused(LedgerError::InvalidInput(format!(
                "the hold for sandbox `{sandbox_id}` would expire in the past"
            ))));
        }
        let mut seq = None;
        if add > 0 {
            let available = self.tenant_summary(&record.tenant)?.available();
            if available < i128::from(add) {
                return Err(refused(LedgerError::InsufficientCredits {
                    tenant: record.tenant.clone(),
                    available,
                    requested: add,
                }));
            }
            let amount = record.amount.checked_add(add).ok_or_else(|| {
                refused(LedgerError::Overflow {
                    account: tenant_account(&record.tenant),
                })
            })?;
            let seqs = self.write(
                &format!("extend/{sandbox_id}/{expires_at_ms}"),
                vec![Draft {
                    kind: EntryKind::Hold,
                    debit: tenant_account(&record.tenant),
                    credit: HOLDS_ACCOUNT.into(),
                    amount: add,
                    tenant: record.tenant.clone(),
                    sandbox_id: Some(sandbox_id.into()),
                    overrun: 0,
                    reason: None,
                    extension: Some(record.extension.clone()),
                }],
            )?;
            record.amount = amount;
            seq = Some(seqs[0]);
        }
        self.tables
            .move_expiry(sandbox_id, Some(record.expires_at_ms), Some(expires_at_ms))?;
        record.expires_at_ms = expires_at_ms;
        self.put_hold(&record)?;
        Ok(Receipt::Extend(ExtendReceipt {
            sandbox_id: sandbox_id.into(),
            tenant: record.tenant.clone(),
            amount: record.amount,
            expires_at_ms,
            seq,
            replayed: false,
        }))
    }

    fn expire_due(&mut self, now_ms: u64) -> Result<Receipt, ApplyError> {
        let due = self.tables.due_holds(now_ms)?;
        let mut expired = Vec::new();
        for sandbox_id in due {
            let mut record = self.get_hold(&sandbox_id)?;
            let key = format!("expire/{sandbox_id}");
            let seqs = self.write(&key, vec![close_draft(&record, EntryKind::Expire, None)])?;
            self.tables
                .move_expiry(&sandbox_id, Some(record.expires_at_ms), None)?;
            record.state = HoldState::Expired;
            record.closed_seq = Some(seqs[0]);
            self.put_hold(&record)?;
            let receipt = ExpiredHold {
                sandbox_id: sandbox_id.clone(),
                tenant: record.tenant.clone(),
                released: record.amount,
                seq: seqs[0],
            };
            let operation = Operation::ExpireDue { now_ms };
            self.remember(
                &key,
                &operation,
                &Receipt::Expired {
                    holds: vec![receipt.clone()],
                },
            )?;
            expired.push(receipt);
        }
        Ok(Receipt::Expired { holds: expired })
    }

    fn get_hold(&self, sandbox_id: &str) -> Result<HoldRecord, ApplyError> {
        self.tables.hold(sandbox_id)?.ok_or_else(|| {
            refused(LedgerError::NoHold {
                sandbox_id: sandbox_id.into(),
            })
        })
    }

    fn put_hold(&mut self, record: &HoldRecord) -> Result<(), ApplyError> {
        // A settled or voided hold's memo has done its work: it is not
        // kept. An expired one keeps it: its sandbox may still have to be
        // recovered from it (a host down past the hold's expiry).
        if matches!(record.state, HoldState::Settled | HoldState::Voided) && record.memo.is_some() {
            let closed = HoldRecord {
                memo: None,
                ..record.clone()
            };
            return self.tables.put_hold(&closed);
        }
        self.tables.put_hold(record)
    }

    /// Checks the drafts against the accounts, then writes them: account
    /// totals, journal entries, the tenant index and one outbox event each.
    /// Returns their sequence numbers.
    fn write(&mut self, key: &str, drafts: Vec<Draft>) -> Result<Vec<u64>, ApplyError> {
        // Plan: every new total, with checked arithmetic, before any write.
        let mut totals: HashMap<String, AccountTotals> = HashMap::new();
        for draft in &drafts {
            for account in [&draft.debit, &draft.credit] {
                if !totals.contains_key(account) {
                    totals.insert(account.clone(), self.account(account)?);
                }
            }
            let refuse = |account: &String, error: TotalsError| match error {
                TotalsError::Overflow => refused(LedgerError::Overflow {
                    account: account.clone(),
                }),
                TotalsError::ClosesMoreThanPending => fatal(format!(
                    "account {account} has less pending than the hold it closes"
                )),
            };
            let debit = totals.get_mut(&draft.debit).expect("planned");
            debit
                .debit(draft.kind, draft.amount, draft.overrun)
                .map_err(|error| refuse(&draft.debit, error))?;
            let credit = totals.get_mut(&draft.credit).expect("planned");
            credit
                .credit(draft.kind, draft.amount)
                .map_err(|error| refuse(&draft.credit, error))?;
        }

        // Write.
        for (account, account_totals) in &totals {
            self.tables.put_account(account, account_totals)?;
        }
        let mut seqs = Vec::with_capacity(drafts.len());
        for draft in drafts {
            let seq = self.next_seq;
            self.next_seq += 1;
            let entry = JournalEntry {
                seq,
                time_ms: self.now_ms,
                kind: draft.kind,
                debit: draft.debit,
                credit: draft.credit,
                amount: draft.amount,
                key: key.to_string(),
                tenant: draft.tenant,
                sandbox_id: draft.sandbox_id,
                overrun: draft.overrun,
                reason: draft.reason,
            };
            let event = journal_event(&self.ledger_id, &entry, draft.extension.as_deref());
            let entry_json = serde_json::to_string(&entry).map_err(fatal)?;
            let event_json = serde_json::to_string(&event).map_err(fatal)?;
            self.tables.append(&entry, &entry_json, &event_json)?;
            seqs.push(seq);
        }
        Ok(seqs)
    }
}

/// The entry that closes `record`'s pending transfer: same accounts, same
/// amount, as the hold.
fn close_draft(record: &HoldRecord, kind: EntryKind, reason: Option<String>) -> Draft {
    Draft {
        kind,
        debit: tenant_account(&record.tenant),
        credit: HOLDS_ACCOUNT.into(),
        amount: record.amount,
        tenant: record.tenant.clone(),
        sandbox_id: Some(record.sandbox_id.clone()),
        overrun: 0,
        reason,
        extension: Some(record.extension.clone()),
    }
}

fn closed(sandbox_id: &str, state: &'static str) -> LedgerError {
    LedgerError::HoldClosed {
        sandbox_id: sandbox_id.into(),
        state,
    }
}

/// A short description of an operation, for "key already used" errors.
fn describe(operation: &Operation) -> String {
    match operation {
        Operation::Grant { tenant, amount, .. } => {
            format!("adding {} credits to `{tenant}`", format_credits(*amount))
        }
        Operation::Hold {
            tenant,
            amount,
            sandbox_id,
            ..
        } => {
            format!(
                "holding {} credits of `{tenant}` for sandbox `{sandbox_id}`",
                format_credits(*amount)
            )
        }
        Operation::Settle { sandbox_id, actual } => {
            format!(
                "settling sandbox `{sandbox_id}` at {} credits",
                format_credits(*actual)
            )
        }
        Operation::Void { sandbox_id, .. } => format!("voiding the hold of sandbox `{sandbox_id}`"),
        Operation::ExpireDue { .. } => "expiring holds".into(),
        Operation::Extend { sandbox_id, .. } => {
            format!("extending the hold of sandbox `{sandbox_id}`")
        }
    }
}
