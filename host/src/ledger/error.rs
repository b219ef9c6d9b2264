//! Ledger errors, one sentence each. A refused operation changes nothing.

use sandboxer_credits::{format_credits, format_micros};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error(
        "insufficient credits: tenant `{tenant}` has {} available, {} needed{}",
        format_micros(*available),
        format_credits(*requested),
        if *available < 0 { " (it owes an overrun; add credits first)" } else { "" }
    )]
    InsufficientCredits {
        tenant: String,
        available: i128,
        requested: u64,
    },

    #[error("idempotency key `{key}` was already used for a different operation ({first})")]
    KeyReused { key: String, first: String },

    #[error("no hold for sandbox `{sandbox_id}`")]
    NoHold { sandbox_id: String },

    #[error("the hold for sandbox `{sandbox_id}` is already {state}")]
    HoldClosed {
        sandbox_id: String,
        state: &'static str,
    },

    #[error("{0}")]
    InvalidInput(String),

    #[error("the amount would overflow the account `{account}`")]
    Overflow { account: String },

    #[error("{path} is in use by another sandboxer-host process; wait for it to finish")]
    InUse { path: PathBuf },

    #[error("ledger storage: {0}")]
    Storage(String),

    /// On a shared store: the sandbox record the operation goes with is
    /// another host's now; nothing was applied.
    #[error("{0}")]
    Fenced(String),

    #[error("the ledger's writer has stopped")]
    WriterStopped,
}

pub(crate) fn storage(error: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(error.to_string())
}
