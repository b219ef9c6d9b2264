//! The ledger's seam: [`LedgerStore`], everything the manager, the service
//! and the server may ask of a ledger, whatever keeps it (redb in the home,
//! or PostgreSQL shared by several hosts).
//!
//! The methods return boxed futures rather than being `async fn`: a trait
//! with `async fn` cannot be used as `dyn LedgerStore`, and the store is
//! chosen at run time (`--store`), so callers hold an `Arc<dyn LedgerStore>`.
//! One allocation per ledger call is nothing beside a durable commit, and it
//! spares the crate a macro dependency (`async-trait`) for the same result.
//!
//! Every operation goes through [`LedgerStore::submit`]; the typed helpers
//! (`grant`, `hold`, `settle`, ...) are defined once on `dyn LedgerStore`.

use super::error::LedgerError;
use super::types::*;
use super::verify::VerifyReport;
use std::future::Future;
use std::pin::Pin;

/// What a ledger call returns: a future that any worker thread may poll.
pub type LedgerFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, LedgerError>> + Send + 'a>>;

/// A state write the ledger commits in the same transaction as its
/// operation, on a store that keeps the sandbox records in the ledger's
/// database (PostgreSQL): the hold and the `provisioning` record, the settle
/// and the `destroyed` record, commit together or not at all.
pub struct Joint {
    /// The record the write belongs to: locked for the transaction, and the
    /// operation refused ([`LedgerError::Fenced`]) when another host owns it.
    pub record_id: String,
    pub owner: crate::state_pg::Owner,
    /// Makes the write from the operation's outcome; `None` writes nothing.
    pub then: JointWrite,
}

pub type JointWrite =
    Box<dyn FnOnce(&Result<Receipt, LedgerError>) -> Option<crate::state_pg::StateWrite> + Send>;

/// A credits ledger. Implementations keep the same rules (see
/// `docs/payments.md`): double entry, holds idempotent by key with the same
/// replay answers, available credits never spent twice, and a journal whose
/// sequence numbers have no gaps and appear in commit order.
pub trait LedgerStore: Send + Sync + 'static {
    /// Where the ledger is kept, for messages (a path, or a PostgreSQL
    /// address without its password).
    fn location(&self) -> String;

    /// Whether other hosts may share this ledger (PostgreSQL): then a hold
    /// this host has no record of may be another host's, and is not this
    /// host's to void.
    fn shared(&self) -> bool {
        false
    }

    /// Whether [`LedgerStore::submit_joint`] works here.
    fn joint_commits(&self) -> bool {
        false
    }

    /// [`LedgerStore::submit`], with `joint`'s state write in the same
    /// transaction. Only where [`LedgerStore::joint_commits`].
    fn submit_joint(&self, operation: Operation, joint: Joint) -> LedgerFuture<'_, Receipt> {
        let _ = (operation, joint);
        Box::pin(async {
            Err(LedgerError::Storage(
                "this ledger cannot commit a sandbox record with its operations".into(),
            ))
        })
    }

    /// Applies one operation durably and returns its receipt (the first
    /// receipt again when its key was already used for the same step).
    fn submit(&self, operation: Operation) -> LedgerFuture<'_, Receipt>;

    /// A tenant's balance, held and available credits. Asking about the
    /// default tenant gives it its starting credits if it never had them.
    fn summary<'a>(&'a self, tenant: &'a str) -> LedgerFuture<'a, TenantSummary>;

    /// Whether a tenant has ever had an entry in the journal (or is the
    /// default tenant, which exists from the start).
    fn knows_tenant<'a>(&'a self, tenant: &'a str) -> LedgerFuture<'a, bool>;

    /// Every tenant with an account (one that ever had an entry), sorted.
    fn tenant_names(&self) -> LedgerFuture<'_, Vec<String>>;

    /// Totals of any account (`tenant:…`, `revenue:…`, `system:…`).
    fn account_totals<'a>(&'a self, account: &'a str) -> LedgerFuture<'a, AccountTotals>;

    /// Micro-credits charged in all (every revenue account, saturating).
    fn revenue_total(&self) -> LedgerFuture<'_, u64>;

    /// The newest outbox sequence number (0 when empty).
    fn outbox_last_seq(&self) -> LedgerFuture<'_, u64>;

    /// A tenant's journal entries, newest first.
    fn history<'a>(&'a self, tenant: &'a str, limit: usize) -> LedgerFuture<'a, Vec<JournalEntry>>;

    /// Journal entries after `after_seq`, oldest first, at most `limit`.
    fn journal_entries(&self, after_seq: u64, limit: usize) -> LedgerFuture<'_, Vec<JournalEntry>>;

    /// Outbox events after `after_seq`, oldest first, as stored JSON.
    fn outbox_after(&self, after_seq: u64, limit: usize) -> LedgerFuture<'_, Vec<(u64, String)>>;

    fn hold_record<'a>(&'a self, sandbox_id: &'a str) -> LedgerFuture<'a, Option<HoldRecord>>;

    /// The first answer of the settle of a hold, when it was settled.
    fn settle_receipt<'a>(&'a self, sandbox_id: &'a str)
    -> LedgerFuture<'a, Option<SettleReceipt>>;

    fn open_holds(&self) -> LedgerFuture<'_, Vec<HoldRecord>>;

    /// Holds that still carry a memo: open ones, and expired ones (an
    /// expiry keeps the memo; a settle or a void drops it). Only a ledger
    /// whose caller writes memos has any.
    fn noted_holds(&self) -> LedgerFuture<'_, Vec<HoldRecord>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Whether any open hold expires at or before `now_ms` (a read: cheaper
    /// than an expiry's write when none does).
    fn any_hold_due(&self, now_ms: u64) -> LedgerFuture<'_, bool>;

    /// Checks every invariant (`ledger verify`).
    fn verify(&self) -> LedgerFuture<'_, VerifyReport>;
}

impl dyn LedgerStore {
    /// Adds credits to a tenant. Without a key every call adds; with one,
    /// the same key adds once.
    pub async fn grant(
        &self,
        tenant: &str,
        amount: u64,
        key: Option<&str>,
    ) -> Result<GrantReceipt, LedgerError> {
        into_grant(self.submit(grant_operation(tenant, amount, key)).await?)
    }

    /// Reserves `amount` of a tenant's available credits for a sandbox
    /// until `expires_at_ms` (milliseconds since the Unix epoch).
    pub async fn hold(
        &self,
        tenant: &str,
        amount: u64,
        sandbox_id: &str,
        extension: &str,
        expires_at_ms: u64,
    ) -> Result<HoldReceipt, LedgerError> {
        let operation = hold_operation(tenant, amount, sandbox_id, extension, expires_at_ms, None);
        into_hold(self.submit(operation).await?)
    }

    /// [`Self::hold`], keeping `memo` with the hold until it is settled or
    /// voided ([`HoldRecord::memo`](super::HoldRecord::memo)).
    pub async fn hold_noting(
        &self,
        tenant: &str,
        amount: u64,
        sandbox_id: &str,
        extension: &str,
        expires_at_ms: u64,
        memo: String,
    ) -> Result<HoldReceipt, LedgerError> {
        let operation = hold_operation(
            tenant,
            amount,
            sandbox_id,
            extension,
            expires_at_ms,
            Some(memo),
        );
        into_hold(self.submit(operation).await?)
    }

    /// [`Self::hold`] with `joint`'s write in the same transaction.
    pub async fn hold_with(
        &self,
        tenant: &str,
        amount: u64,
        sandbox_id: &str,
        extension: &str,
        expires_at_ms: u64,
        joint: Joint,
    ) -> Result<HoldReceipt, LedgerError> {
        let operation = hold_operation(tenant, amount, sandbox_id, extension, expires_at_ms, None);
        into_hold(self.submit_joint(operation, joint).await?)
    }

    /// [`Self::settle`] with `joint`'s write in the same transaction.
    pub async fn settle_with(
        &self,
        sandbox_id: &str,
        actual: u64,
        joint: Joint,
    ) -> Result<SettleReceipt, LedgerError> {
        into_settle(
            self.submit_joint(settle_operation(sandbox_id, actual), joint)
                .await?,
        )
    }

    /// Charges a sandbox's actual cost and releases the rest of its hold.
    pub async fn settle(
        &self,
        sandbox_id: &str,
        actual: u64,
    ) -> Result<SettleReceipt, LedgerError> {
        into_settle(self.submit(settle_operation(sandbox_id, actual)).await?)
    }

    /// Releases a sandbox's hold without charging anything.
    pub async fn void(&self, sandbox_id: &str, reason: &str) -> Result<VoidReceipt, LedgerError> {
        into_void(self.submit(void_operation(sandbox_id, reason)).await?)
    }

    /// Raises an open hold by `add` and moves its expiry; refused, changing
    /// nothing, when the tenant cannot cover it.
    pub async fn extend(
        &self,
        sandbox_id: &str,
        add: u64,
        expires_at_ms: u64,
    ) -> Result<ExtendReceipt, LedgerError> {
        let operation = Operation::Extend {
            sandbox_id: sandbox_id.into(),
            add,
            expires_at_ms,
        };
        match self.submit(operation).await? {
            Receipt::Extend(receipt) => Ok(receipt),
            other => Err(unexpected(other)),
        }
    }

    /// Closes every open hold that expires at or before `now_ms`.
    pub async fn expire_due(&self, now_ms: u64) -> Result<Vec<ExpiredHold>, LedgerError> {
        into_expired(self.submit(Operation::ExpireDue { now_ms }).await?)
    }
}

pub(crate) fn grant_operation(tenant: &str, amount: u64, key: Option<&str>) -> Operation {
    let key = key.map_or_else(
        || format!("auto-{:032x}", rand::random::<u128>()),
        str::to_string,
    );
    Operation::Grant {
        tenant: tenant.into(),
        amount,
        key,
    }
}

pub(crate) fn hold_operation(
    tenant: &str,
    amount: u64,
    sandbox_id: &str,
    extension: &str,
    expires_at_ms: u64,
    memo: Option<String>,
) -> Operation {
    Operation::Hold {
        tenant: tenant.into(),
        amount,
        sandbox_id: sandbox_id.into(),
        extension: extension.into(),
        expires_at_ms,
        memo,
    }
}

pub(crate) fn settle_operation(sandbox_id: &str, actual: u64) -> Operation {
    Operation::Settle {
        sandbox_id: sandbox_id.into(),
        actual,
    }
}

pub(crate) fn void_operation(sandbox_id: &str, reason: &str) -> Operation {
    Operation::Void {
        sandbox_id: sandbox_id.into(),
        reason: reason.into(),
    }
}

pub(crate) fn unexpected(receipt: Receipt) -> LedgerError {
    LedgerError::Storage(format!(
        "the ledger answered with an unexpected receipt: {receipt:?}"
    ))
}

pub(crate) fn into_grant(receipt: Receipt) -> Result<GrantReceipt, LedgerError> {
    match receipt {
        Receipt::Grant(receipt) => Ok(receipt),
        other => Err(unexpected(other)),
    }
}

pub(crate) fn into_hold(receipt: Receipt) -> Result<HoldReceipt, LedgerError> {
    match receipt {
        Receipt::Hold(receipt) => Ok(receipt),
        other => Err(unexpected(other)),
    }
}

pub(crate) fn into_settle(receipt: Receipt) -> Result<SettleReceipt, LedgerError> {
    match receipt {
        Receipt::Settle(receipt) => Ok(receipt),
        other => Err(unexpected(other)),
    }
}

pub(crate) fn into_void(receipt: Receipt) -> Result<VoidReceipt, LedgerError> {
    match receipt {
        Receipt::Void(receipt) => Ok(receipt),
        other => Err(unexpected(other)),
    }
}

pub(crate) fn into_expired(receipt: Receipt) -> Result<Vec<ExpiredHold>, LedgerError> {
    match receipt {
        Receipt::Expired { holds } => Ok(holds),
        other => Err(unexpected(other)),
    }
}
