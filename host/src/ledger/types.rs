//! The ledger's vocabulary: accounts, journal entries, holds, receipts and
//! the operations callers submit.
//!
//! Amounts are `u64` micro-credits. Balances are derived from an account's
//! posted credits minus its posted debits, so they are `i128` and can go
//! below zero (only through a recorded overrun).

use serde::{Deserialize, Serialize};

pub const DEFAULT_TENANT: &str = "default";
/// The account credits come from when they are granted; its balance is the
/// negative of everything ever granted.
pub const GRANTS_ACCOUNT: &str = "system:grants";
/// The clearing account holds are pending transfers into.
pub const HOLDS_ACCOUNT: &str = "system:holds";

pub fn tenant_account(tenant: &str) -> String {
    format!("tenant:{tenant}")
}

pub fn revenue_account(extension: &str) -> String {
    format!("revenue:{extension}")
}

pub use crate::names::check_name;

/// Posted and pending totals of one account, TigerBeetle style: nothing is
/// ever subtracted from a posted total, pending totals go up at a hold and
/// down when it closes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountTotals {
    pub debits_posted: u64,
    pub credits_posted: u64,
    pub debits_pending: u64,
    pub credits_pending: u64,
    /// Charged above a hold (or after it expired): the only way a tenant's
    /// available credits may go below zero.
    pub overrun: u64,
}

impl AccountTotals {
    pub fn balance(&self) -> i128 {
        i128::from(self.credits_posted) - i128::from(self.debits_posted)
    }

    /// What an account can still spend: balance minus open holds.
    pub fn available(&self) -> i128 {
        self.balance() - i128::from(self.debits_pending)
    }

    /// Applies the debit side of a journal entry to this account.
    pub fn debit(&mut self, kind: EntryKind, amount: u64, overrun: u64) -> Result<(), TotalsError> {
        match kind {
            EntryKind::Grant | EntryKind::Charge => {
                self.debits_posted = self
                    .debits_posted
                    .checked_add(amount)
                    .ok_or(TotalsError::Overflow)?;
                self.overrun = self
                    .overrun
                    .checked_add(overrun)
                    .ok_or(TotalsError::Overflow)?;
            }
            EntryKind::Hold => {
                self.debits_pending = self
                    .debits_pending
                    .checked_add(amount)
                    .ok_or(TotalsError::Overflow)?;
            }
            EntryKind::Release | EntryKind::Void | EntryKind::Expire => {
                self.debits_pending = self
                    .debits_pending
                    .checked_sub(amount)
                    .ok_or(TotalsError::ClosesMoreThanPending)?;
            }
        }
        Ok(())
    }

    /// Applies the credit side of a journal entry to this account.
    pub fn credit(&mut self, kind: EntryKind, amount: u64) -> Result<(), TotalsError> {
        match kind {
            EntryKind::Grant | EntryKind::Charge => {
                self.credits_posted = self
                    .credits_posted
                    .checked_add(amount)
                    .ok_or(TotalsError::Overflow)?;
            }
            EntryKind::Hold => {
                self.credits_pending = self
                    .credits_pending
                    .checked_add(amount)
                    .ok_or(TotalsError::Overflow)?;
            }
            EntryKind::Release | EntryKind::Void | EntryKind::Expire => {
                self.credits_pending = self
                    .credits_pending
                    .checked_sub(amount)
                    .ok_or(TotalsError::ClosesMoreThanPending)?;
            }
        }
        Ok(())
    }
}

/// Why an entry cannot apply to an account's totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TotalsError {
    /// A total would pass `u64::MAX`.
    Overflow,
    /// A hold would close more than the account has pending: corruption.
    ClosesMoreThanPending,
}

/// A tenant's credits as `credits show` reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TenantSummary {
    pub tenant: String,
    pub balance: i128,
    pub held: u64,
    pub available: i128,
    pub overrun: u64,
}

impl TenantSummary {
    /// What a tenant account's totals say.
    pub fn from_totals(tenant: &str, totals: &AccountTotals) -> Self {
        Self {
            tenant: tenant.into(),
            balance: totals.balance(),
            held: totals.debits_pending,
            available: totals.available(),
            overrun: totals.overrun,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryKind {
    /// Posted: credits from `system:grants` to a tenant.
    Grant,
    /// Pending: credits reserved from a tenant into `system:holds`.
    Hold,
    /// Closes a hold when it is settled (the charge follows).
    Release,
    /// Posted: the metered actual, from a tenant to an extension's revenue.
    Charge,
    /// Closes a hold without a charge (create failed, or an operator voided it).
    Void,
    /// Closes a hold that passed its expiry.
    Expire,
}

impl EntryKind {
    /// The CloudEvents `type` of this entry's meter event.
    pub fn event_type(self) -> &'static str {
        match self {
            Self::Grant => "sandboxer.credits.granted",
            Self::Hold => "sandboxer.credits.held",
            Self::Release => "sandboxer.credits.released",
            Self::Charge => "sandboxer.credits.charged",
            Self::Void => "sandboxer.credits.voided",
            Self::Expire => "sandboxer.credits.hold_expired",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Grant => "grant",
            Self::Hold => "hold",
            Self::Release => "release",
            Self::Charge => "charge",
            Self::Void => "void",
            Self::Expire => "expire",
        }
    }
}

/// One append-only line of the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub seq: u64,
    pub time_ms: u64,
    pub kind: EntryKind,
    pub debit: String,
    pub credit: String,
    pub amount: u64,
    /// The idempotency key of the operation that wrote it.
    pub key: String,
    pub tenant: String,
    pub sandbox_id: Option<String>,
    /// For a charge: the part above the hold.
    #[serde(default)]
    pub overrun: u64,
    /// Why a hold was voided, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HoldState {
    Open,
    Settled,
    Voided,
    Expired,
}

/// The hold made for one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldRecord {
    pub sandbox_id: String,
    pub tenant: String,
    /// The extension instance whose revenue account a settle credits.
    pub extension: String,
    pub amount: u64,
    pub expires_at_ms: u64,
    pub state: HoldState,
    pub hold_seq: u64,
    pub closed_seq: Option<u64>,
    /// What the hold is for, as its caller wrote it (the host: the
    /// sandbox's `provisioning` record), kept until the hold is settled or
    /// voided (an expiry keeps it; a void after the expiry drops it). See
    /// [`Operation::Hold`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memo: Option<String>,
}

/// What a caller asks the ledger to do. Each is idempotent by its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Operation {
    Grant {
        tenant: String,
        amount: u64,
        key: String,
    },
    Hold {
        tenant: String,
        amount: u64,
        sandbox_id: String,
        extension: String,
        expires_at_ms: u64,
        /// Kept with the hold ([`HoldRecord::memo`]), durable with it:
        /// the host's intent record, so that a crash which loses the
        /// record (written without waiting for the disk) cannot lose what
        /// the hold is for. Not kept with the operation's idempotency key,
        /// and not part of what makes a replay the same step.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memo: Option<String>,
    },
    Settle {
        sandbox_id: String,
        actual: u64,
    },
    Void {
        sandbox_id: String,
        reason: String,
    },
    /// Closes every open hold whose expiry is at or before `now_ms`.
    ExpireDue {
        now_ms: u64,
    },
    /// Raises an open hold by `add` (checked against the tenant's available
    /// credits) and moves its expiry to `expires_at_ms`: a sandbox whose
    /// life was extended. Keyed by the hold and the new expiry.
    Extend {
        sandbox_id: String,
        add: u64,
        expires_at_ms: u64,
    },
}

impl Operation {
    /// The idempotency key: the caller's for a grant, sandbox id + phase for
    /// the others. `ExpireDue` has none (each expiry has its own).
    pub fn key(&self) -> Option<String> {
        match self {
            Self::Grant { key, .. } => Some(format!("grant/{key}")),
            Self::Hold { sandbox_id, .. } => Some(format!("hold/{sandbox_id}")),
            Self::Settle { sandbox_id, .. } => Some(format!("settle/{sandbox_id}")),
            Self::Void { sandbox_id, .. } => Some(format!("void/{sandbox_id}")),
            Self::ExpireDue { .. } => None,
            Self::Extend {
                sandbox_id,
                expires_at_ms,
                ..
            } => Some(format!("extend/{sandbox_id}/{expires_at_ms}")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantReceipt {
    pub seq: u64,
    pub tenant: String,
    pub amount: u64,
    /// True when this key had already been used and nothing was added now.
    #[serde(default)]
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldReceipt {
    pub seq: u64,
    pub tenant: String,
    pub sandbox_id: String,
    pub amount: u64,
    pub expires_at_ms: u64,
    #[serde(default)]
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleReceipt {
    pub sandbox_id: String,
    pub tenant: String,
    pub extension: String,
    /// What the hold reserved (0 when it had already expired).
    pub held: u64,
    /// The actual, charged in full.
    pub charged: u64,
    /// The part of the hold given back.
    pub released: u64,
    /// The part of the charge above the hold.
    pub overrun: u64,
    pub charge_seq: u64,
    #[serde(default)]
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoidReceipt {
    pub sandbox_id: String,
    pub tenant: String,
    pub released: u64,
    /// None when the hold had already expired and nothing was left to void.
    pub seq: Option<u64>,
    #[serde(default)]
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtendReceipt {
    pub sandbox_id: String,
    pub tenant: String,
    /// What the hold reserves now.
    pub amount: u64,
    pub expires_at_ms: u64,
    /// The entry that raised it; none when only the expiry moved.
    pub seq: Option<u64>,
    #[serde(default)]
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpiredHold {
    pub sandbox_id: String,
    pub tenant: String,
    pub released: u64,
    pub seq: u64,
}

/// The result of an operation, stored under its key for replays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "receipt", rename_all = "kebab-case")]
pub enum Receipt {
    Grant(GrantReceipt),
    Hold(HoldReceipt),
    Settle(SettleReceipt),
    Void(VoidReceipt),
    Expired { holds: Vec<ExpiredHold> },
    Extend(ExtendReceipt),
}

impl Receipt {
    pub(crate) fn mark_replayed(mut self) -> Self {
        match &mut self {
            Self::Grant(receipt) => receipt.replayed = true,
            Self::Hold(receipt) => receipt.replayed = true,
            Self::Settle(receipt) => receipt.replayed = true,
            Self::Void(receipt) => receipt.replayed = true,
            Self::Extend(receipt) => receipt.replayed = true,
            Self::Expired { .. } => {}
        }
        self
    }
}
