//! The host's own state store (`<home>/state.redb`): extension key-value
//! stores today, sandbox records and routing statistics as they arrive.
//!
//! Opened lazily on first use, so commands that never touch state (such as
//! `ext list`) work while another process holds the file. redb takes an
//! exclusive lock on its file; a second process gets a plain error saying so.

use redb::{Database, DatabaseError};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum StateDbError {
    #[error("{path} is in use by another sandboxer-host process; wait for it to finish")]
    InUse { path: PathBuf },
    #[error("cannot open the state store {path}: {source}")]
    Open {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A lazily opened, shared handle on `state.redb`.
#[derive(Debug)]
pub struct StateDb {
    path: PathBuf,
    database: Mutex<Option<Arc<Database>>>,
}

impl StateDb {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            database: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open database, opening (or creating) it on first use.
    pub fn database(&self) -> Result<Arc<Database>, StateDbError> {
        let mut slot = self
            .database
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(database) = slot.as_ref() {
            return Ok(database.clone());
        }
        let database = Arc::new(open_exclusive(&self.path)?);
        *slot = Some(database.clone());
        Ok(database)
    }
}

/// Opens or creates a redb file, turning "another process has it" into a
/// sentence an operator can act on.
pub fn open_exclusive(path: &Path) -> Result<Database, StateDbError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| StateDbError::Open {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
    }
    Database::create(path).map_err(|error| match error {
        DatabaseError::DatabaseAlreadyOpen => StateDbError::InUse {
            path: path.to_path_buf(),
        },
        other => StateDbError::Open {
            path: path.to_path_buf(),
            source: Box::new(other),
        },
    })
}
