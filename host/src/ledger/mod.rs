//! The credits ledger: double-entry bookkeeping of integer micro-credits on
//! redb, with holds, idempotent operations and an outbox of meter events.
//!
//! It never calls an extension and knows nothing of wasmtime. Writes go
//! through one writer thread that groups concurrent callers into shared
//! durable commits (see [`writer`]); reads use their own read transactions.
//! `docs/payments.md` describes the model; [`verify`] checks it.

mod backend;
mod error;
mod events;
mod postgres;
mod store;
mod types;
mod verify;
mod writer;

pub(crate) use backend::into_settle;
pub use backend::{Joint, JointWrite, LedgerFuture, LedgerStore};
pub use error::LedgerError;
pub use events::{EVENT_SOURCE, MeterEvent, event_id, rfc3339_millis};
pub use postgres::{PgLedger, redacted as redacted_store_url};
pub(crate) use postgres::{connect as connect_postgres, describe as describe_postgres_error};
pub use types::*;
pub use verify::{VerifyReport, Violation};
pub use writer::{MAX_BATCH, WriterStats};

use crate::group_commit::GroupWriter;
use backend::{
    grant_operation, hold_operation, into_expired, into_grant, into_hold, into_void,
    settle_operation, unexpected, void_operation,
};
use error::storage;
use redb::{Database, ReadableDatabase, ReadableTable};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use store::{HOLDS, JOURNAL, KEYS, TENANT_ENTRIES};
use writer::Job;

/// Credits the default tenant starts with, unless SANDBOXER_DEFAULT_CREDITS says otherwise.
pub const DEFAULT_STARTING_CREDITS: u64 = 10 * sandboxer_credits::MICROS_PER_CREDIT;

#[derive(Debug, Clone)]
pub struct LedgerOptions {
    /// Granted once to tenant `default` the first time it is used.
    pub default_credits: u64,
    /// Close holds past their expiry when the ledger opens.
    pub expire_on_open: bool,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        Self {
            default_credits: DEFAULT_STARTING_CREDITS,
            expire_on_open: true,
        }
    }
}

pub struct Ledger {
    path: PathBuf,
    database: Arc<Database>,
    writer: GroupWriter<Job, Result<Receipt, LedgerError>>,
    stats: Arc<WriterStats>,
}

/// Applies, in `write`, the redo log's batches that redb does not hold
/// yet (those of a process that stopped before its closing commit), in
/// order and with the clock each ran with. Returns the newest lsn.
fn replay(
    write: &redb::WriteTransaction,
    log_path: &Path,
    ledger_id: &str,
    applied: u64,
    fresh: bool,
) -> Result<u64, LedgerError> {
    let unreadable = |error: &dyn std::fmt::Display| {
        LedgerError::Storage(format!("the ledger's redo log cannot be replayed: {error}"))
    };
    let pending = crate::redo_log::read_pending(log_path, ledger_id, applied, fresh)
        .map_err(|error| unreadable(&error))?;
    let Some(last) = pending.last().map(|record| record.lsn) else {
        return Ok(applied);
    };
    for record in &pending {
        let batch: writer::ReplayedBatch =
            serde_json::from_slice(&record.payload).map_err(|error| unreadable(&error))?;
        writer::apply_batch(write, &batch.jobs, batch.now_ms, batch.default_credits)?;
    }
    writer::set_lsn(write, last)?;
    tracing::info!(
        "ledger: replayed {} batches from {}",
        pending.len(),
        log_path.display()
    );
    Ok(last)
}

impl Ledger {
    /// Opens (or creates) the ledger file and starts its writer.
    pub fn open(path: &Path, options: LedgerOptions) -> Result<Self, LedgerError> {
        let database = crate::state_db::open_exclusive(path).map_err(|error| match error {
            crate::state_db::StateDbError::InUse { path } => LedgerError::InUse { path },
            other => LedgerError::Storage(other.to_string()),
        })?;
        let write = database.begin_write().map_err(storage)?;
        let (ledger_id, fresh, applied) = store::initialize(&write)?;
        let log_path = crate::redo_log::path_for(path);
        let last_lsn = replay(&write, &log_path, &ledger_id, applied, fresh)?;
        write.commit().map_err(storage)?;

        let database = Arc::new(database);
        let stats = Arc::new(WriterStats::default());
        let place = writer::LogPlace {
            path: log_path,
            ledger_id,
            last_lsn,
        };
        let writer = writer::start(
            database.clone(),
            place,
            options.default_credits,
            stats.clone(),
        )
        .map_err(storage)?;
        let ledger = Self {
            path: path.to_path_buf(),
            database,
            writer,
            stats,
        };
        let now = writer::now_ms();
        // Only a due hold is worth a write: a read-only command (`credits
        // show`) should not pay a durable commit on every open.
        if options.expire_on_open && ledger.any_hold_due(now)? {
            ledger.expire_due(now)?;
        }
        Ok(ledger)
    }

    fn any_hold_due(&self, now_ms: u64) -> Result<bool, LedgerError> {
        let read = self.database.begin_read().map_err(storage)?;
        let expiry = read.open_table(store::HOLD_EXPIRY).map_err(storage)?;
        let mut due = expiry.range(..=(now_ms, "\u{10ffff}")).map_err(storage)?;
        Ok(due.next().transpose().map_err(storage)?.is_some())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn writer_stats(&self) -> &WriterStats {
        &self.stats
    }

    fn send(&self, job: Job) -> Result<Receipt, LedgerError> {
        self.writer.submit(job).ok_or(LedgerError::WriterStopped)?
    }

    async fn send_async(&self, job: Job) -> Result<Receipt, LedgerError> {
        self.writer
            .submit_async(job)
            .await
            .ok_or(LedgerError::WriterStopped)?
    }

    /// Applies one operation durably and returns its receipt (the first
    /// receipt again when its key was already used for the same operation).
    /// Blocks the calling thread until the commit: async callers use
    /// [`Ledger::submit_async`] and the `*_async` operations.
    pub fn submit(&self, operation: Operation) -> Result<Receipt, LedgerError> {
        self.send(Job::Apply(operation))
    }

    /// [`Ledger::submit`], awaited: the executor's thread is free while the
    /// group commit is on the disk.
    pub async fn submit_async(&self, operation: Operation) -> Result<Receipt, LedgerError> {
        self.send_async(Job::Apply(operation)).await
    }

    /// Adds credits to a tenant. Without a key every call adds; with one, the
    /// same key adds once.
    pub fn grant(
        &self,
        tenant: &str,
        amount: u64,
        key: Option<&str>,
    ) -> Result<GrantReceipt, LedgerError> {
        into_grant(self.submit(grant_operation(tenant, amount, key))?)
    }

    /// Reserves `amount` of a tenant's available credits for a sandbox until
    /// `expires_at_ms` (milliseconds since the Unix epoch).
    pub fn hold(
        &self,
        tenant: &str,
        amount: u64,
        sandbox_id: &str,
        extension: &str,
        expires_at_ms: u64,
    ) -> Result<HoldReceipt, LedgerError> {
        let operation = hold_operation(tenant, amount, sandbox_id, extension, expires_at_ms, None);
        into_hold(self.submit(operation)?)
    }

    /// Charges a sandbox's actual cost and releases the rest of its hold.
    pub fn settle(&self, sandbox_id: &str, actual: u64) -> Result<SettleReceipt, LedgerError> {
        into_settle(self.submit(settle_operation(sandbox_id, actual))?)
    }

    /// Releases a sandbox's hold without charging anything.
    pub fn void(&self, sandbox_id: &str, reason: &str) -> Result<VoidReceipt, LedgerError> {
        into_void(self.submit(void_operation(sandbox_id, reason))?)
    }

    /// Closes every open hold that expires at or before `now_ms`.
    pub fn expire_due(&self, now_ms: u64) -> Result<Vec<ExpiredHold>, LedgerError> {
        into_expired(self.submit(Operation::ExpireDue { now_ms })?)
    }

    /// A tenant's balance, held and available credits. Asking about the
    /// default tenant gives it its starting credits if it never had them.
    pub fn summary(&self, tenant: &str) -> Result<TenantSummary, LedgerError> {
        check_name("tenant", tenant).map_err(LedgerError::InvalidInput)?;
        if tenant == DEFAULT_TENANT && !self.has_key("grant/default-credits")? {
            self.send(Job::EnsureDefaultCredits)?;
        }
        self.summary_now(tenant)
    }

    pub async fn summary_async(&self, tenant: &str) -> Result<TenantSummary, LedgerError> {
        check_name("tenant", tenant).map_err(LedgerError::InvalidInput)?;
        if tenant == DEFAULT_TENANT && !self.has_key("grant/default-credits")? {
            self.send_async(Job::EnsureDefaultCredits).await?;
        }
        self.summary_now(tenant)
    }

    fn summary_now(&self, tenant: &str) -> Result<TenantSummary, LedgerError> {
        let totals = self.account_totals(&tenant_account(tenant))?;
        Ok(TenantSummary::from_totals(tenant, &totals))
    }

    /// Whether a tenant has ever had an entry in the journal (or is the
    /// default tenant, which exists from the start).
    pub fn knows_tenant(&self, tenant: &str) -> Result<bool, LedgerError> {
        if tenant == DEFAULT_TENANT {
            return Ok(true);
        }
        let read = self.database.begin_read().map_err(storage)?;
        let index = read.open_table(TENANT_ENTRIES).map_err(storage)?;
        let mut entries = index
            .range((tenant, 0)..=(tenant, u64::MAX))
            .map_err(storage)?;
        Ok(entries.next().is_some())
    }

    /// Every tenant with an account (one that ever had an entry), sorted.
    pub fn tenant_names(&self) -> Result<Vec<String>, LedgerError> {
        let read = self.database.begin_read().map_err(storage)?;
        let accounts = read.open_table(store::ACCOUNTS).map_err(storage)?;
        let mut names = Vec::new();
        // ';' sorts right after ':': the range is every `tenant:` account.
        for row in accounts.range("tenant:".."tenant;").map_err(storage)? {
            let (account, _) = row.map_err(storage)?;
            if let Some(name) = account.value().strip_prefix("tenant:") {
                names.push(name.to_string());
            }
        }
        Ok(names)
    }

    /// Totals of any account (`tenant:…`, `revenue:…`, `system:…`).
    pub fn account_totals(&self, account: &str) -> Result<AccountTotals, LedgerError> {
        let read = self.database.begin_read().map_err(storage)?;
        let accounts = read.open_table(store::ACCOUNTS).map_err(storage)?;
        Ok(accounts
            .get(account)
            .map_err(storage)?
            .map(|row| store::totals_from_row(row.value()))
            .unwrap_or_default())
    }

    /// Micro-credits charged in all: the posted credits of every
    /// extension's revenue account (saturating).
    pub fn revenue_total(&self) -> Result<u64, LedgerError> {
        let read = self.database.begin_read().map_err(storage)?;
        let accounts = read.open_table(store::ACCOUNTS).map_err(storage)?;
        let mut total = 0u64;
        for row in accounts.range("revenue:".."revenue;").map_err(storage)? {
            let (_, totals) = row.map_err(storage)?;
            total = total.saturating_add(store::totals_from_row(totals.value()).credits_posted);
        }
        Ok(total)
    }

    /// The newest outbox sequence number (0 when empty): where a live
    /// stream of new events starts.
    pub fn outbox_last_seq(&self) -> Result<u64, LedgerError> {
        let read = self.database.begin_read().map_err(storage)?;
        let outbox = read.open_table(store::OUTBOX).map_err(storage)?;
        Ok(outbox
            .last()
            .map_err(storage)?
            .map_or(0, |(seq, _)| seq.value()))
    }

    fn has_key(&self, key: &str) -> Result<bool, LedgerError> {
        let read = self.database.begin_read().map_err(storage)?;
        let keys = read.open_table(KEYS).map_err(storage)?;
        Ok(keys.get(key).map_err(storage)?.is_some())
    }

    /// A tenant's journal entries, newest first.
    pub fn history(&self, tenant: &str, limit: usize) -> Result<Vec<JournalEntry>, LedgerError> {
        check_name("tenant", tenant).map_err(LedgerError::InvalidInput)?;
        let read = self.database.begin_read().map_err(storage)?;
        let index = read.open_table(TENANT_ENTRIES).map_err(storage)?;
        let journal = read.open_table(JOURNAL).map_err(storage)?;
        let mut entries = Vec::new();
        for row in index
            .range((tenant, 0)..=(tenant, u64::MAX))
            .map_err(storage)?
            .rev()
            .take(limit)
        {
            let (key, _) = row.map_err(storage)?;
            let seq = key.value().1;
            let json = journal
                .get(seq)
                .map_err(storage)?
                .ok_or_else(|| storage(format!("journal entry {seq} is missing")))?;
            entries.push(serde_json::from_str(json.value()).map_err(storage)?);
        }
        Ok(entries)
    }

    /// Journal entries after `after_seq`, oldest first, at most `limit`.
    pub fn journal_entries(
        &self,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<JournalEntry>, LedgerError> {
        let read = self.database.begin_read().map_err(storage)?;
        let journal = read.open_table(JOURNAL).map_err(storage)?;
        let mut entries = Vec::new();
        for row in journal
            .range(after_seq.saturating_add(1)..)
            .map_err(storage)?
            .take(limit)
        {
            let (_, json) = row.map_err(storage)?;
            entries.push(serde_json::from_str(json.value()).map_err(storage)?);
        }
        Ok(entries)
    }

    /// Outbox events after `after_seq`, oldest first, as stored JSON.
    pub fn outbox_after(
        &self,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>, LedgerError> {
        let read = self.database.begin_read().map_err(storage)?;
        let outbox = read.open_table(store::OUTBOX).map_err(storage)?;
        let mut events = Vec::new();
        for row in outbox
            .range(after_seq.saturating_add(1)..)
            .map_err(storage)?
            .take(limit)
        {
            let (seq, json) = row.map_err(storage)?;
            events.push((seq.value(), json.value().to_string()));
        }
        Ok(events)
    }

    pub fn hold_record(&self, sandbox_id: &str) -> Result<Option<HoldRecord>, LedgerError> {
        let read = self.database.begin_read().map_err(storage)?;
        let holds = read.open_table(HOLDS).map_err(storage)?;
        holds
            .get(sandbox_id)
            .map_err(storage)?
            .map(|json| serde_json::from_str(json.value()).map_err(storage))
            .transpose()
    }

    /// The first answer of the settle of `sandbox_id`'s hold, when it was
    /// settled: what a caller that lost track of it (a crash) adopts.
    pub fn settle_receipt(&self, sandbox_id: &str) -> Result<Option<SettleReceipt>, LedgerError> {
        let read = self.database.begin_read().map_err(storage)?;
        let keys = read.open_table(KEYS).map_err(storage)?;
        let Some(json) = keys
            .get(format!("settle/{sandbox_id}").as_str())
            .map_err(storage)?
        else {
            return Ok(None);
        };
        match store::stored_receipt(json.value())? {
            Receipt::Settle(receipt) => Ok(Some(receipt)),
            other => Err(unexpected(other)),
        }
    }

    pub fn open_holds(&self) -> Result<Vec<HoldRecord>, LedgerError> {
        let read = self.database.begin_read().map_err(storage)?;
        let holds = read.open_table(HOLDS).map_err(storage)?;
        let mut open = Vec::new();
        for row in holds.iter().map_err(storage)? {
            let (_, json) = row.map_err(storage)?;
            let record: HoldRecord = serde_json::from_str(json.value()).map_err(storage)?;
            if record.state == HoldState::Open {
                open.push(record);
            }
        }
        Ok(open)
    }

    /// Holds that still carry a memo (open or expired); see
    /// [`LedgerStore::noted_holds`].
    pub fn noted_holds(&self) -> Result<Vec<HoldRecord>, LedgerError> {
        let read = self.database.begin_read().map_err(storage)?;
        let holds = read.open_table(HOLDS).map_err(storage)?;
        let mut noted = Vec::new();
        for row in holds.iter().map_err(storage)? {
            let (_, json) = row.map_err(storage)?;
            // Most rows have no memo: skip them before parsing.
            if !json.value().contains("\"memo\"") {
                continue;
            }
            let record: HoldRecord = serde_json::from_str(json.value()).map_err(storage)?;
            if record.memo.is_some() {
                noted.push(record);
            }
        }
        Ok(noted)
    }

    /// Checks every invariant; see [`verify`].
    pub fn verify(&self) -> Result<VerifyReport, LedgerError> {
        let read = self.database.begin_read().map_err(storage)?;
        verify::verify(&read)
    }
}

/// The redb ledger as a [`LedgerStore`]: reads run on the caller's task
/// (each is one short read transaction), writes go through the writer.
impl LedgerStore for Ledger {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn submit(&self, operation: Operation) -> LedgerFuture<'_, Receipt> {
        Box::pin(self.submit_async(operation))
    }

    fn summary<'a>(&'a self, tenant: &'a str) -> LedgerFuture<'a, TenantSummary> {
        Box::pin(self.summary_async(tenant))
    }

    fn knows_tenant<'a>(&'a self, tenant: &'a str) -> LedgerFuture<'a, bool> {
        Box::pin(async move { Ledger::knows_tenant(self, tenant) })
    }

    fn tenant_names(&self) -> LedgerFuture<'_, Vec<String>> {
        Box::pin(async move { Ledger::tenant_names(self) })
    }

    fn account_totals<'a>(&'a self, account: &'a str) -> LedgerFuture<'a, AccountTotals> {
        Box::pin(async move { Ledger::account_totals(self, account) })
    }

    fn revenue_total(&self) -> LedgerFuture<'_, u64> {
        Box::pin(async move { Ledger::revenue_total(self) })
    }

    fn outbox_last_seq(&self) -> LedgerFuture<'_, u64> {
        Box::pin(async move { Ledger::outbox_last_seq(self) })
    }

    fn history<'a>(&'a self, tenant: &'a str, limit: usize) -> LedgerFuture<'a, Vec<JournalEntry>> {
        Box::pin(async move { Ledger::history(self, tenant, limit) })
    }

    fn journal_entries(&self, after_seq: u64, limit: usize) -> LedgerFuture<'_, Vec<JournalEntry>> {
        Box::pin(async move { Ledger::journal_entries(self, after_seq, limit) })
    }

    fn outbox_after(&self, after_seq: u64, limit: usize) -> LedgerFuture<'_, Vec<(u64, String)>> {
        Box::pin(async move { Ledger::outbox_after(self, after_seq, limit) })
    }

    fn hold_record<'a>(&'a self, sandbox_id: &'a str) -> LedgerFuture<'a, Option<HoldRecord>> {
        Box::pin(async move { Ledger::hold_record(self, sandbox_id) })
    }

    fn settle_receipt<'a>(
        &'a self,
        sandbox_id: &'a str,
    ) -> LedgerFuture<'a, Option<SettleReceipt>> {
        Box::pin(async move { Ledger::settle_receipt(self, sandbox_id) })
    }

    fn any_hold_due(&self, now_ms: u64) -> LedgerFuture<'_, bool> {
        Box::pin(async move { Ledger::any_hold_due(self, now_ms) })
    }

    fn open_holds(&self) -> LedgerFuture<'_, Vec<HoldRecord>> {
        Box::pin(async move { Ledger::open_holds(self) })
    }

    fn noted_holds(&self) -> LedgerFuture<'_, Vec<HoldRecord>> {
        Box::pin(async move { Ledger::noted_holds(self) })
    }

    fn verify(&self) -> LedgerFuture<'_, VerifyReport> {
        Box::pin(async move { Ledger::verify(self) })
    }
}
