//! Each extension instance's private key-value store, persisted in the host's
//! state database so values survive fresh instances and host restarts.
//!
//! A call sees a [`KvSession`]: reads go through to the database, writes are
//! buffered, and the whole call's writes are committed in one transaction
//! when the call returns normally. A call that traps or is stopped by a limit
//! leaves the store exactly as it found it.

use crate::state_db::{StateDb, StateDbError};
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use std::collections::BTreeMap;
use std::sync::Arc;

/// (instance name, key) -> value.
const VALUES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("extension_kv");
/// instance name -> number of keys it holds.
const KEY_COUNTS: TableDefinition<&str, u64> = TableDefinition::new("extension_kv_key_counts");

pub const MAX_KEY_BYTES: usize = 512;
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
pub const MAX_KEYS_PER_INSTANCE: u64 = 10_000;
pub const MAX_KEYS_LISTED: u32 = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error(transparent)]
    State(#[from] StateDbError),
    #[error("extension key-value store: {0}")]
    Storage(String),
}

fn storage(error: impl std::fmt::Display) -> KvError {
    KvError::Storage(error.to_string())
}

/// The writes and reads of one call of one instance.
pub struct KvSession {
    state: Arc<StateDb>,
    instance: String,
    /// Buffered writes: `Some(value)` sets, `None` deletes.
    pending: BTreeMap<String, Pending>,
}

struct Pending {
    value: Option<Vec<u8>>,
    /// Whether the key existed in the database when the call first touched it.
    was_stored: bool,
}

impl KvSession {
    pub fn new(state: Arc<StateDb>, instance: String) -> Self {
        Self {
            state,
            instance,
            pending: BTreeMap::new(),
        }
    }

    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        if let Some(pending) = self.pending.get(key) {
            return Ok(pending.value.clone());
        }
        self.stored(key)
    }

    fn stored(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let database = self.state.database()?;
        let read = database.begin_read().map_err(storage)?;
        let table = match read.open_table(VALUES) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(error) => return Err(storage(error)),
        };
        let value = table.get((self.instance.as_str(), key)).map_err(storage)?;
        Ok(value.map(|value| value.value().to_vec()))
    }

    fn stored_key_count(&self) -> Result<u64, KvError> {
        let database = self.state.database()?;
        let read = database.begin_read().map_err(storage)?;
        let table = match read.open_table(KEY_COUNTS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(error) => return Err(storage(error)),
        };
        Ok(table
            .get(self.instance.as_str())
            .map_err(storage)?
            .map_or(0, |count| count.value()))
    }

    /// Buffers a write; the guest-visible error text says which limit.
    pub fn set(&mut self, key: &str, value: Vec<u8>) -> Result<Result<(), String>, KvError> {
        if key.len() > MAX_KEY_BYTES {
            return Ok(Err(format!(
                "key is {} bytes; the limit is {MAX_KEY_BYTES}",
                key.len()
            )));
        }
        if value.len() > MAX_VALUE_BYTES {
            return Ok(Err(format!(
                "value is {} bytes; the limit is {MAX_VALUE_BYTES}",
                value.len()
            )));
        }
        let was_stored = self.was_stored(key)?;
        let is_new = self
            .pending
            .get(key)
            .map_or(!was_stored, |pending| pending.value.is_none());
        if is_new && self.key_count_after_commit()? >= MAX_KEYS_PER_INSTANCE {
            return Ok(Err(format!(
                "the store holds {MAX_KEYS_PER_INSTANCE} keys, its limit; delete some first"
            )));
        }
        self.pending.insert(
            key.to_string(),
            Pending {
                value: Some(value),
                was_stored,
            },
        );
        Ok(Ok(()))
    }

    pub fn delete(&mut self, key: &str) -> Result<bool, KvError> {
        let existed = self.get(key)?.is_some();
        let was_stored = self.was_stored(key)?;
        self.pending.insert(
            key.to_string(),
            Pending {
                value: None,
                was_stored,
            },
        );
        Ok(existed)
    }

    fn was_stored(&self, key: &str) -> Result<bool, KvError> {
        match self.pending.get(key) {
            Some(pending) => Ok(pending.was_stored),
            None => Ok(self.stored(key)?.is_some()),
        }
    }

    pub fn keys(&self, prefix: &str, limit: u32) -> Result<Vec<String>, KvError> {
        let limit = limit.min(MAX_KEYS_LISTED) as usize;
        let mut keys = std::collections::BTreeSet::new();
        let database = self.state.database()?;
        let read = database.begin_read().map_err(storage)?;
        match read.open_table(VALUES) {
            Ok(table) => {
                let range = table
                    .range((self.instance.as_str(), prefix)..)
                    .map_err(storage)?;
                for entry in range {
                    let (key, _) = entry.map_err(storage)?;
                    let (instance, key) = key.value();
                    if instance != self.instance || !key.starts_with(prefix) {
                        break;
                    }
                    keys.insert(key.to_string());
                    // Pending deletes may remove some; read enough to fill.
                    if keys.len() > limit + self.pending.len() {
                        break;
                    }
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(error) => return Err(storage(error)),
        }
        for (key, pending) in &self.pending {
            if key.starts_with(prefix) {
                match pending.value {
                    Some(_) => keys.insert(key.clone()),
                    None => keys.remove(key),
                };
            }
        }
        Ok(keys.into_iter().take(limit).collect())
    }

    fn key_count_after_commit(&self) -> Result<u64, KvError> {
        let mut count = self.stored_key_count()? as i64;
        for pending in self.pending.values() {
            match (pending.was_stored, pending.value.is_some()) {
                (false, true) => count += 1,
                (true, false) => count -= 1,
                _ => {}
            }
        }
        Ok(count.max(0) as u64)
    }

    /// Makes the call's writes durable in one transaction. Nothing to write
    /// costs nothing.
    pub fn commit(self) -> Result<(), KvError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let state = self.state.clone();
        state.write(move |write| self.apply(write))?;
        Ok(())
    }

    /// Writes the call's writes into a caller's transaction, so they become
    /// durable together with what the caller records there.
    pub fn apply(self, write: &WriteTransaction) -> Result<(), String> {
        let Self {
            instance, pending, ..
        } = self;
        if pending.is_empty() {
            return Ok(());
        }
        let mut values = write
            .open_table(VALUES)
            .map_err(|error| error.to_string())?;
        let mut counts = write
            .open_table(KEY_COUNTS)
            .map_err(|error| error.to_string())?;
        let mut count = counts
            .get(instance.as_str())
            .map_err(|error| error.to_string())?
            .map_or(0, |count| count.value());
        for (key, Pending { value, .. }) in &pending {
            let previous = match value {
                Some(value) => values.insert((instance.as_str(), key.as_str()), value.as_slice()),
                None => values.remove((instance.as_str(), key.as_str())),
            }
            .map_err(|error| error.to_string())?
            .is_some();
            match (previous, value.is_some()) {
                (false, true) => count += 1,
                (true, false) => count = count.saturating_sub(1),
                _ => {}
            }
        }
        counts
            .insert(instance.as_str(), count)
            .map_err(|error| error.to_string())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> (tempfile::TempDir, Arc<StateDb>) {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(StateDb::new(dir.path().join("state.redb")));
        (dir, state)
    }

    #[test]
    fn writes_are_visible_in_the_call_and_durable_after_commit() {
        let (_dir, state) = state();
        let mut session = KvSession::new(state.clone(), "a".into());
        session.set("k", b"v".to_vec()).unwrap().unwrap();
        assert_eq!(session.get("k").unwrap(), Some(b"v".to_vec()));
        session.commit().unwrap();
        let next = KvSession::new(state.clone(), "a".into());
        assert_eq!(next.get("k").unwrap(), Some(b"v".to_vec()));
        let other = KvSession::new(state, "b".into());
        assert_eq!(
            other.get("k").unwrap(),
            None,
            "instances never see each other's keys"
        );
    }

    #[test]
    fn uncommitted_writes_are_discarded() {
        let (_dir, state) = state();
        let mut session = KvSession::new(state.clone(), "a".into());
        session.set("k", b"v".to_vec()).unwrap().unwrap();
        drop(session);
        assert_eq!(KvSession::new(state, "a".into()).get("k").unwrap(), None);
    }

    #[test]
    fn keys_merge_pending_writes_and_deletes() {
        let (_dir, state) = state();
        let mut session = KvSession::new(state.clone(), "a".into());
        for key in ["p/1", "p/2", "q/1"] {
            session.set(key, vec![1]).unwrap().unwrap();
        }
        session.commit().unwrap();
        let mut session = KvSession::new(state, "a".into());
        assert!(session.delete("p/1").unwrap());
        assert!(!session.delete("p/9").unwrap());
        session.set("p/3", vec![]).unwrap().unwrap();
        assert_eq!(session.keys("p/", 10).unwrap(), ["p/2", "p/3"]);
        assert_eq!(session.keys("p/", 1).unwrap(), ["p/2"]);
    }

    #[test]
    fn limits_are_reported_to_the_guest() {
        let (_dir, state) = state();
        let mut session = KvSession::new(state, "a".into());
        let long_key = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(
            session
                .set(&long_key, vec![])
                .unwrap()
                .unwrap_err()
                .contains("limit")
        );
        let big = vec![0; MAX_VALUE_BYTES + 1];
        assert!(
            session
                .set("k", big)
                .unwrap()
                .unwrap_err()
                .contains("limit")
        );
    }
}
