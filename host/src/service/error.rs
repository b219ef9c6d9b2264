//! What the service answers when it cannot do what was asked: a kind the
//! front ends map to an HTTP status or an exit code, and one line.

use crate::ledger::LedgerError;
use crate::manager::ManagerError;
use crate::profile::ProfileError;
use crate::runtime::RuntimeError;
use crate::state_db::StateDbError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// No such sandbox, tenant, profile or extension (for this caller).
    #[error("{0}")]
    NotFound(String),
    /// The request itself is wrong: a bad amount, ttl, name or option.
    #[error("{0}")]
    InvalidInput(String),
    /// The tenant's available credits do not cover it; nothing changed.
    #[error("{0}")]
    InsufficientCredits(String),
    /// A missing or unknown API key.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid key that may not do this (a tenant asking an operator's action).
    #[error("{0}")]
    Forbidden(String),
    /// It cannot be done in the sandbox's current state.
    #[error("{0}")]
    Conflict(String),
    /// No backend could serve it now (none eligible, every create failed).
    #[error("{0}")]
    Unavailable(String),
    /// Another process kept the home's files for the whole wait.
    #[error("{0}")]
    Busy(String),
    /// A fault of the host (its storage, a bug).
    #[error("{0}")]
    Internal(String),
    /// A route of another API this server does not implement.
    #[error("{0}")]
    NotImplemented(String),
    /// A route that exists, asked with another method.
    #[error("{0}")]
    MethodNotAllowed(String),
}

impl ServiceError {
    /// The HTTP status the server answers with.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotFound(_) => 404,
            Self::InvalidInput(_) => 400,
            Self::InsufficientCredits(_) => 402,
            Self::Unauthorized(_) => 401,
            Self::Forbidden(_) => 403,
            Self::Conflict(_) => 409,
            Self::Unavailable(_) => 503,
            Self::Busy(_) => 503,
            Self::Internal(_) => 500,
            Self::NotImplemented(_) => 501,
            Self::MethodNotAllowed(_) => 405,
        }
    }

    /// The kind of an error the server answered with `status`.
    pub fn from_status(status: u16, message: String) -> Self {
        match status {
            404 => Self::NotFound(message),
            400 | 422 => Self::InvalidInput(message),
            402 => Self::InsufficientCredits(message),
            401 => Self::Unauthorized(message),
            403 => Self::Forbidden(message),
            409 => Self::Conflict(message),
            503 => Self::Unavailable(message),
            501 => Self::NotImplemented(message),
            405 => Self::MethodNotAllowed(message),
            _ => Self::Internal(message),
        }
    }

    /// The command line's exit status: 2 for input a user must fix, 75 for
    /// a busy home, 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::InvalidInput(_) => 2,
            Self::Busy(_) => 75,
            _ => 1,
        }
    }

    /// A stable name of the kind, for `--json` errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "not-found",
            Self::InvalidInput(_) => "invalid-input",
            Self::InsufficientCredits(_) => "insufficient-credits",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::Conflict(_) => "conflict",
            Self::Unavailable(_) => "unavailable",
            Self::Busy(_) => "busy",
            Self::Internal(_) => "internal",
            Self::NotImplemented(_) => "not-implemented",
            Self::MethodNotAllowed(_) => "method-not-allowed",
        }
    }
}

impl From<ManagerError> for ServiceError {
    fn from(error: ManagerError) -> Self {
        let message = error.to_string();
        match error {
            ManagerError::NotFound(_) => Self::NotFound(message),
            ManagerError::InsufficientCredits(_) => Self::InsufficientCredits(message),
            ManagerError::Refused(_) => Self::Conflict(message),
            ManagerError::NoEligibleBackend { .. } | ManagerError::CreateFailed { .. } => {
                Self::Unavailable(message)
            }
            ManagerError::ExtensionNotLoaded { .. } | ManagerError::DestroyFailed { .. } => {
                Self::Unavailable(message)
            }
            ManagerError::Ledger(error) => error.into(),
            ManagerError::Records(crate::manager::RecordError::Fenced(_)) => {
                Self::Conflict(message)
            }
            ManagerError::Records(_) | ManagerError::Health(_) | ManagerError::Router(_) => {
                Self::Internal(message)
            }
        }
    }
}

impl From<LedgerError> for ServiceError {
    fn from(error: LedgerError) -> Self {
        let message = error.to_string();
        match error {
            LedgerError::InsufficientCredits { .. } => Self::InsufficientCredits(message),
            LedgerError::InvalidInput(_) => Self::InvalidInput(message),
            LedgerError::KeyReused { .. } | LedgerError::HoldClosed { .. } => {
                Self::Conflict(message)
            }
            LedgerError::NoHold { .. } => Self::NotFound(message),
            LedgerError::InUse { .. } => Self::Busy(message),
            LedgerError::Overflow { .. } | LedgerError::Fenced(_) => Self::Conflict(message),
            LedgerError::Storage(_) | LedgerError::WriterStopped => Self::Internal(message),
        }
    }
}

impl From<ProfileError> for ServiceError {
    fn from(error: ProfileError) -> Self {
        match error {
            ProfileError::NotFound { .. } => Self::NotFound(error.to_string()),
            other => Self::InvalidInput(other.to_string()),
        }
    }
}

impl From<RuntimeError> for ServiceError {
    fn from(error: RuntimeError) -> Self {
        match error {
            RuntimeError::NoExtensionsDir { .. } => Self::NotFound(error.to_string()),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<StateDbError> for ServiceError {
    fn from(error: StateDbError) -> Self {
        match error {
            StateDbError::InUse { .. } => Self::Busy(error.to_string()),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<crate::manager::RecordError> for ServiceError {
    fn from(error: crate::manager::RecordError) -> Self {
        Self::Internal(error.to_string())
    }
}
