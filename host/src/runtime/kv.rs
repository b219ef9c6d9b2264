//! Each extension instance's private key-value store, persisted in the host's
//! state database so values survive fresh instances and host restarts.
//!
//! A call sees a [`KvSession`]: reads go through to the database, writes are
//! buffered, and the whole call's writes are committed in one transaction
//! when the call returns normally. A call that traps or is stopped by a limit
//! leaves the store exactly as it found it.
//!
//! Two budgets bound what an extension can make the host keep:
//! - on disk, a quota of key and value bytes per instance. The exact usage
//!   (keys and bytes, [`super::kv_usage`]) is kept beside the values and
//!   updated in the same transaction as the writes, so checking it reads one
//!   row, never the store;
//! - in memory, a call's buffered writes count against the call's memory
//!   limit (the caller says how much room is left). Only what changes the
//!   store is buffered: deleting a key that is not stored, or one longer than
//!   any key can be, keeps nothing.

use super::kv_usage::{self, KvUsage, entry_bytes};
use crate::state_db::{StateDb, StateDbError};
use crate::state_pg::{KvWrite, StateWrite};
use redb::{ReadableDatabase, TableDefinition, WriteTransaction};
use std::collections::BTreeMap;
use std::sync::Arc;

/// (instance name, key) -> value.
pub(super) const VALUES: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("extension_kv");

pub const MAX_KEY_BYTES: usize = 512;
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
pub const MAX_KEYS_PER_INSTANCE: u64 = 10_000;
pub const MAX_KEYS_LISTED: u32 = 1_000;
/// Default quota of key and value bytes per instance (`limits.kv_quota_mb`).
pub const DEFAULT_QUOTA_BYTES: u64 = 16 * 1024 * 1024;
/// Host memory one buffered write takes beyond its key and value bytes: the
/// map entry, the key's and value's headers and their allocations.
pub const PENDING_ENTRY_OVERHEAD_BYTES: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error(transparent)]
    State(#[from] StateDbError),
    #[error("extension key-value store: {0}")]
    Storage(String),
}

pub(super) fn storage(error: impl std::fmt::Display) -> KvError {
    KvError::Storage(error.to_string())
}

/// Why a write was refused. The text is what the guest sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvRefusal {
    #[error("key is {0} bytes; the limit is {MAX_KEY_BYTES}")]
    KeyTooLong(usize),
    #[error("value is {0} bytes; the limit is {MAX_VALUE_BYTES}")]
    ValueTooLarge(usize),
    #[error("the store holds {MAX_KEYS_PER_INSTANCE} keys, its limit; delete some first")]
    TooManyKeys,
    #[error(
        "the store would hold {would_hold} bytes of keys and values, over its quota of {quota} bytes (limits.kv_quota_mb); delete some first"
    )]
    OverQuota { would_hold: u64, quota: u64 },
    #[error(
        "this call's writes would pass its memory limit of {limit_mb} MiB (the host holds a call's writes until it returns); return, and write the rest in another call"
    )]
    CallMemory { limit_mb: usize },
}

/// How much more host memory a call's buffered writes may take, and the
/// limit that room is left of (for the refusal's text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRoom {
    pub free_bytes: usize,
    pub limit_bytes: usize,
}

impl MemoryRoom {
    fn refusal(&self) -> KvRefusal {
        KvRefusal::CallMemory {
            limit_mb: self.limit_bytes / (1024 * 1024),
        }
    }
}

/// The writes and reads of one call of one instance (or of calls that
/// commit together: a destroy and the meter-actual that prices it).
#[derive(Clone)]
pub struct KvSession {
    state: Arc<StateDb>,
    instance: String,
    quota_bytes: u64,
    /// Buffered writes: `Some(value)` sets, `None` deletes.
    pending: BTreeMap<String, Pending>,
    /// Host memory `pending` holds, counted as the call's memory.
    pending_bytes: usize,
    /// The store's usage when the call first needed it.
    stored_usage: Option<KvUsage>,
    /// What the buffered writes change in keys and bytes once committed,
    /// against what each key held when the call first touched it.
    key_change: i64,
    byte_change: i64,
}

#[derive(Clone)]
struct Pending {
    value: Option<Vec<u8>>,
    /// What the key counted against the quota in the database when the call
    /// first touched it; none when it was absent.
    stored_bytes: Option<u64>,
}

impl Pending {
    fn held_bytes(&self, key: &str) -> usize {
        PENDING_ENTRY_OVERHEAD_BYTES + key.len() + self.value.as_ref().map_or(0, Vec::len)
    }
}

impl KvSession {
    pub fn new(state: Arc<StateDb>, instance: String, quota_bytes: u64) -> Self {
        Self {
            state,
            instance,
            quota_bytes,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            stored_usage: None,
            key_change: 0,
            byte_change: 0,
        }
    }

    /// Host memory the call's buffered writes hold.
    pub fn host_bytes(&self) -> usize {
        self.pending_bytes
    }

    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        if key.len() > MAX_KEY_BYTES {
            return Ok(None);
        }
        if let Some(pending) = self.pending.get(key) {
            return Ok(pending.value.clone());
        }
        if let Some(shared) = self.state.shared() {
            return shared.kv_get(&self.instance, key).map_err(KvError::Storage);
        }
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

    /// What `key` counts against the quota in the database, without copying
    /// its value.
    fn stored_entry_bytes(&self, key: &str) -> Result<Option<u64>, KvError> {
        if let Some(shared) = self.state.shared() {
            return shared
                .kv_entry_bytes(&self.instance, key)
                .map_err(KvError::Storage);
        }
        let database = self.state.database()?;
        let read = database.begin_read().map_err(storage)?;
        let table = match read.open_table(VALUES) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(error) => return Err(storage(error)),
        };
        let value = table.get((self.instance.as_str(), key)).map_err(storage)?;
        Ok(value.map(|value| entry_bytes(key, value.value().len())))
    }

    /// The store's usage as the call's writes would leave it.
    fn usage_after_commit(&mut self) -> Result<KvUsage, KvError> {
        let stored = match self.stored_usage {
            Some(usage) => usage,
            None => {
                let usage = match self.state.shared() {
                    Some(shared) => {
                        let (keys, bytes) =
                            shared.kv_usage(&self.instance).map_err(KvError::Storage)?;
                        KvUsage { keys, bytes }
                    }
                    None => kv_usage::stored_usage(&self.state, &self.instance)?,
                };
                self.stored_usage = Some(usage);
                usage
            }
        };
        let after = |stored: u64, change: i64| {
            u64::try_from((i128::from(stored) + i128::from(change)).max(0)).unwrap_or(u64::MAX)
        };
        Ok(KvUsage {
            keys: after(stored.keys, self.key_change),
            bytes: after(stored.bytes, self.byte_change),
        })
    }

    /// Buffers a write, or says which limit refuses it.
    pub fn set(
        &mut self,
        key: &str,
        value: Vec<u8>,
        room: MemoryRoom,
    ) -> Result<Result<(), KvRefusal>, KvError> {
        if key.len() > MAX_KEY_BYTES {
            return Ok(Err(KvRefusal::KeyTooLong(key.len())));
        }
        if value.len() > MAX_VALUE_BYTES {
            return Ok(Err(KvRefusal::ValueTooLarge(value.len())));
        }
        let (stored_bytes, current, held_now) = match self.pending.get(key) {
            Some(pending) => (
                pending.stored_bytes,
                pending
                    .value
                    .as_ref()
                    .map(|value| entry_bytes(key, value.len())),
                pending.held_bytes(key),
            ),
            None => {
                let stored = self.stored_entry_bytes(key)?;
                (stored, stored, 0)
            }
        };
        let new = entry_bytes(key, value.len());
        let usage = self.usage_after_commit()?;
        if current.is_none() && usage.keys >= MAX_KEYS_PER_INSTANCE {
            return Ok(Err(KvRefusal::TooManyKeys));
        }
        let current_bytes = current.unwrap_or(0);
        let would_hold = usage
            .bytes
            .saturating_sub(current_bytes)
            .saturating_add(new);
        // A write that does not grow the store is always allowed, so an
        // instance over a lowered quota can still shrink.
        if new > current_bytes && would_hold > self.quota_bytes {
            return Ok(Err(KvRefusal::OverQuota {
                would_hold,
                quota: self.quota_bytes,
            }));
        }
        let held_after = PENDING_ENTRY_OVERHEAD_BYTES + key.len() + value.len();
        if held_after.saturating_sub(held_now) > room.free_bytes {
            return Ok(Err(room.refusal()));
        }

        self.pending_bytes = self.pending_bytes - held_now + held_after;
        self.key_change += i64::from(current.is_none());
        self.byte_change += new as i64 - current_bytes as i64;
        match self.pending.get_mut(key) {
            Some(pending) => pending.value = Some(value),
            None => {
                self.pending.insert(
                    key.to_string(),
                    Pending {
                        value: Some(value),
                        stored_bytes,
                    },
                );
            }
        }
        Ok(Ok(()))
    }

    /// Buffers the removal of `key`, answering whether it existed. Only a
    /// delete of a stored key is kept; the room can refuse only that.
    pub fn delete(
        &mut self,
        key: &str,
        room: MemoryRoom,
    ) -> Result<Result<bool, KvRefusal>, KvError> {
        if key.len() > MAX_KEY_BYTES {
            // No key this long can have been written.
            return Ok(Ok(false));
        }
        if let Some(pending) = self.pending.get_mut(key) {
            let Some(value) = pending.value.take() else {
                return Ok(Ok(false));
            };
            self.pending_bytes -= value.len();
            self.key_change -= 1;
            self.byte_change -= entry_bytes(key, value.len()) as i64;
            if pending.stored_bytes.is_none() {
                // Written and removed by this call: nothing to commit.
                self.pending.remove(key);
                self.pending_bytes -= PENDING_ENTRY_OVERHEAD_BYTES + key.len();
            }
            return Ok(Ok(true));
        }
        let Some(stored) = self.stored_entry_bytes(key)? else {
            return Ok(Ok(false));
        };
        let held = PENDING_ENTRY_OVERHEAD_BYTES + key.len();
        if held > room.free_bytes {
            return Ok(Err(room.refusal()));
        }
        self.pending.insert(
            key.to_string(),
            Pending {
                value: None,
                stored_bytes: Some(stored),
            },
        );
        self.pending_bytes += held;
        self.key_change -= 1;
        self.byte_change -= stored as i64;
        Ok(Ok(true))
    }

    /// Keys starting with `prefix`, stored and buffered merged, in byte
    /// order; holds no more than `limit` keys at a time.
    pub fn keys(&self, prefix: &str, limit: u32) -> Result<Vec<String>, KvError> {
        let limit = limit.min(MAX_KEYS_LISTED) as usize;
        if prefix.len() > MAX_KEY_BYTES || limit == 0 {
            return Ok(Vec::new());
        }
        let mut buffered = self
            .pending
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(key, _)| key.starts_with(prefix))
            .filter(|(_, pending)| pending.value.is_some())
            .map(|(key, _)| key.as_str())
            .peekable();
        let mut keys = Vec::new();
        // Stored keys a buffered write or delete decides for are skipped,
        // so up to that many more are read.
        let decided = self
            .pending
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(key, _)| key.starts_with(prefix))
            .count();
        for key in self.stored_keys(prefix, limit + decided)? {
            if keys.len() == limit {
                return Ok(keys);
            }
            // A buffered write or delete of this key decides for it.
            if self.pending.contains_key(&key) {
                continue;
            }
            while keys.len() < limit
                && let Some(earlier) = buffered.next_if(|buffered| *buffered < key.as_str())
            {
                keys.push(earlier.to_string());
            }
            if keys.len() < limit {
                keys.push(key);
            }
        }
        keys.extend(buffered.take(limit - keys.len()).map(ToString::to_string));
        Ok(keys)
    }

    /// Up to `want` stored keys starting with `prefix`, in byte order.
    fn stored_keys(&self, prefix: &str, want: usize) -> Result<Vec<String>, KvError> {
        if let Some(shared) = self.state.shared() {
            return shared
                .kv_keys(&self.instance, prefix, want)
                .map_err(KvError::Storage);
        }
        let database = self.state.database()?;
        let read = database.begin_read().map_err(storage)?;
        let table = match read.open_table(VALUES) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(error) => return Err(storage(error)),
        };
        let mut keys = Vec::new();
        for entry in table
            .range((self.instance.as_str(), prefix)..)
            .map_err(storage)?
        {
            if keys.len() == want {
                break;
            }
            let (key, _) = entry.map_err(storage)?;
            let (instance, key) = key.value();
            if instance != self.instance || !key.starts_with(prefix) {
                break;
            }
            keys.push(key.to_string());
        }
        Ok(keys)
    }

    /// The call's writes as data, for a shared store's transaction; none
    /// when there are none.
    pub fn into_writes(self) -> Option<(String, Vec<KvWrite>)> {
        if self.pending.is_empty() {
            return None;
        }
        let writes = self
            .pending
            .into_iter()
            .map(|(key, pending)| (key, pending.value))
            .collect();
        Some((self.instance, writes))
    }

    /// Makes the call's writes durable in one transaction. Nothing to write
    /// costs nothing. Blocks the thread: async callers use
    /// [`KvSession::commit_async`].
    pub fn commit(self) -> Result<(), KvError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let state = self.state.clone();
        if let Some(shared) = state.shared() {
            return shared
                .write(StateWrite {
                    kv: self.into_writes(),
                    ..StateWrite::default()
                })
                .map_err(|error| KvError::Storage(error.to_string()));
        }
        let logged = crate::state_db::LoggedWrite {
            kv: self.into_writes(),
            ..Default::default()
        };
        state.write_logged(logged, None, true)?;
        Ok(())
    }

    /// [`KvSession::commit`], awaited.
    pub async fn commit_async(self) -> Result<(), KvError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let state = self.state.clone();
        if let Some(shared) = state.shared() {
            return shared
                .write_async(StateWrite {
                    kv: self.into_writes(),
                    ..StateWrite::default()
                })
                .await
                .map_err(|error| KvError::Storage(error.to_string()));
        }
        let logged = crate::state_db::LoggedWrite {
            kv: self.into_writes(),
            ..Default::default()
        };
        state.write_logged_async(logged, None, true).await?;
        Ok(())
    }

    /// Writes the call's writes into a caller's transaction, so they become
    /// durable together with what the caller records there.
    pub fn apply(self, write: &WriteTransaction) -> Result<(), String> {
        match self.into_writes() {
            Some((instance, writes)) => apply_writes(write, &instance, &writes),
            None => Ok(()),
        }
    }
}

/// Writes `instance`'s key-value writes (a value, or none to remove the
/// key) into a transaction. The usage rows are updated from the values each
/// write replaces there, so they stay exact whatever other calls committed
/// meanwhile; the result depends only on the store and the writes (the
/// state store's redo log replays it).
pub(crate) fn apply_writes(
    write: &WriteTransaction,
    instance: &str,
    writes: &[(String, Option<Vec<u8>>)],
) -> Result<(), String> {
    if writes.is_empty() {
        return Ok(());
    }
    let text = |error: redb::StorageError| error.to_string();
    let mut values = write
        .open_table(VALUES)
        .map_err(|error| error.to_string())?;
    let mut usage = kv_usage::usage_in(write, &values, instance)?;
    for (key, value) in writes {
        let previous = match value {
            Some(value) => values.insert((instance, key.as_str()), value.as_slice()),
            None => values.remove((instance, key.as_str())),
        }
        .map_err(text)?
        .map(|previous| entry_bytes(key, previous.value().len()));
        if let Some(previous) = previous {
            usage.keys = usage.keys.saturating_sub(1);
            usage.bytes = usage.bytes.saturating_sub(previous);
        }
        if let Some(value) = value {
            usage.keys = usage.keys.saturating_add(1);
            usage.bytes = usage.bytes.saturating_add(entry_bytes(key, value.len()));
        }
    }
    drop(values);
    kv_usage::record(write, instance, usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOM: MemoryRoom = MemoryRoom {
        free_bytes: usize::MAX,
        limit_bytes: 64 << 20,
    };

    fn state() -> (tempfile::TempDir, Arc<StateDb>) {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(StateDb::new(dir.path().join("state.redb")));
        (dir, state)
    }

    fn session(state: &Arc<StateDb>, instance: &str) -> KvSession {
        KvSession::new(state.clone(), instance.into(), DEFAULT_QUOTA_BYTES)
    }

    #[test]
    fn writes_are_visible_in_the_call_and_durable_after_commit() {
        let (_dir, state) = state();
        let mut writer = session(&state, "a");
        writer.set("k", b"v".to_vec(), ROOM).unwrap().unwrap();
        assert_eq!(writer.get("k").unwrap(), Some(b"v".to_vec()));
        writer.commit().unwrap();
        assert_eq!(session(&state, "a").get("k").unwrap(), Some(b"v".to_vec()));
        assert_eq!(
            session(&state, "b").get("k").unwrap(),
            None,
            "instances never see each other's keys"
        );
    }

    #[test]
    fn uncommitted_writes_are_discarded() {
        let (_dir, state) = state();
        let mut writer = session(&state, "a");
        writer.set("k", b"v".to_vec(), ROOM).unwrap().unwrap();
        drop(writer);
        assert_eq!(session(&state, "a").get("k").unwrap(), None);
    }

    #[test]
    fn keys_merge_pending_writes_and_deletes() {
        let (_dir, state) = state();
        let mut writer = session(&state, "a");
        for key in ["p/1", "p/2", "p/4", "q/1"] {
            writer.set(key, vec![1], ROOM).unwrap().unwrap();
        }
        writer.commit().unwrap();
        session(&state, "b")
            .set("p/0", vec![1], ROOM)
            .unwrap()
            .unwrap();
        let mut reader = session(&state, "a");
        assert!(reader.delete("p/1", ROOM).unwrap().unwrap());
        assert!(!reader.delete("p/9", ROOM).unwrap().unwrap());
        reader.set("p/3", vec![], ROOM).unwrap().unwrap();
        reader.set("p/5", vec![], ROOM).unwrap().unwrap();
        assert_eq!(reader.keys("p/", 10).unwrap(), ["p/2", "p/3", "p/4", "p/5"]);
        assert_eq!(reader.keys("p/", 2).unwrap(), ["p/2", "p/3"]);
        assert_eq!(reader.keys("p/4", 10).unwrap(), ["p/4"]);
        assert_eq!(reader.keys("", 10).unwrap().len(), 5);
        assert!(reader.keys("p/", 0).unwrap().is_empty());
        let too_long = "p".repeat(MAX_KEY_BYTES + 1);
        assert!(reader.keys(&too_long, 10).unwrap().is_empty());
    }

    #[test]
    fn limits_are_reported_to_the_guest() {
        let (_dir, state) = state();
        let mut writer = session(&state, "a");
        let long_key = "k".repeat(MAX_KEY_BYTES + 1);
        assert_eq!(
            writer
                .set(&long_key, vec![], ROOM)
                .unwrap()
                .unwrap_err()
                .to_string(),
            "key is 513 bytes; the limit is 512"
        );
        let big = vec![0; MAX_VALUE_BYTES + 1];
        assert_eq!(
            writer.set("k", big, ROOM).unwrap().unwrap_err().to_string(),
            "value is 65537 bytes; the limit is 65536"
        );
    }

    #[test]
    fn deleting_what_is_not_stored_keeps_nothing() {
        let (_dir, state) = state();
        let mut writer = session(&state, "a");
        writer.set("stored", vec![7; 100], ROOM).unwrap().unwrap();
        writer.commit().unwrap();

        let mut call = session(&state, "a");
        let huge_key = "d".repeat(1 << 20);
        assert!(!call.delete(&huge_key, ROOM).unwrap().unwrap());
        for index in 0..10_000 {
            assert!(
                !call
                    .delete(&format!("never-{index}"), ROOM)
                    .unwrap()
                    .unwrap()
            );
        }
        assert_eq!(call.host_bytes(), 0, "absent keys are not buffered");
        assert_eq!(call.get(&huge_key).unwrap(), None);

        call.set("new", vec![1; 1000], ROOM).unwrap().unwrap();
        assert!(call.host_bytes() >= 1003);
        assert!(call.delete("new", ROOM).unwrap().unwrap());
        assert_eq!(
            call.host_bytes(),
            0,
            "written and removed: nothing to commit"
        );

        assert!(call.delete("stored", ROOM).unwrap().unwrap());
        assert_eq!(
            call.host_bytes(),
            PENDING_ENTRY_OVERHEAD_BYTES + "stored".len(),
            "a delete of a stored key is kept until the commit"
        );
        assert!(!call.delete("stored", ROOM).unwrap().unwrap());
        call.commit().unwrap();
        assert_eq!(session(&state, "a").get("stored").unwrap(), None);
    }

    #[test]
    fn buffered_writes_are_refused_past_the_calls_memory_room() {
        let (_dir, state) = state();
        let mut call = session(&state, "a");
        let room = MemoryRoom {
            free_bytes: 3 * (PENDING_ENTRY_OVERHEAD_BYTES + 2 + 1000),
            limit_bytes: 16 << 20,
        };
        for key in ["k1", "k2", "k3"] {
            call.set(key, vec![0; 1000], room).unwrap().unwrap();
        }
        let tight = MemoryRoom {
            free_bytes: room.free_bytes - call.host_bytes(),
            ..room
        };
        assert_eq!(tight.free_bytes, 0);
        let refusal = call.set("k4", vec![0; 1000], tight).unwrap().unwrap_err();
        assert_eq!(refusal, KvRefusal::CallMemory { limit_mb: 16 });
        assert!(
            refusal
                .to_string()
                .starts_with("this call's writes would pass its memory limit of 16 MiB")
        );
        // Replacing a value with a smaller one needs no room.
        call.set("k1", vec![0; 10], tight).unwrap().unwrap();
        call.commit().unwrap();

        let mut deleter = session(&state, "a");
        let none = MemoryRoom {
            free_bytes: 0,
            ..room
        };
        assert_eq!(
            deleter.delete("k2", none).unwrap().unwrap_err(),
            KvRefusal::CallMemory { limit_mb: 16 }
        );
        assert!(!deleter.delete("absent", none).unwrap().unwrap());
    }

    #[test]
    fn the_quota_counts_stored_and_buffered_bytes_and_names_itself() {
        let (_dir, state) = state();
        let quota = 10_000;
        let mut call = KvSession::new(state.clone(), "a".into(), quota);
        // Each entry counts its key (2 bytes) and value (3000 bytes).
        for key in ["k1", "k2", "k3"] {
            call.set(key, vec![0; 3000], ROOM).unwrap().unwrap();
        }
        let refusal = call.set("k4", vec![0; 3000], ROOM).unwrap().unwrap_err();
        assert_eq!(
            refusal.to_string(),
            "the store would hold 12008 bytes of keys and values, over its quota of 10000 bytes (limits.kv_quota_mb); delete some first"
        );
        call.commit().unwrap();

        let mut next = KvSession::new(state.clone(), "a".into(), quota);
        assert!(matches!(
            next.set("k4", vec![0; 3000], ROOM).unwrap(),
            Err(KvRefusal::OverQuota {
                would_hold: 12008,
                ..
            })
        ));
        assert!(next.delete("k1", ROOM).unwrap().unwrap());
        next.set("k4", vec![0; 3000], ROOM).unwrap().unwrap();
        next.commit().unwrap();

        // A lowered quota still lets the instance shrink.
        let mut lowered = KvSession::new(state, "a".into(), 100);
        lowered.set("k2", vec![0; 10], ROOM).unwrap().unwrap();
        assert!(matches!(
            lowered.set("k3", vec![0; 3001], ROOM).unwrap(),
            Err(KvRefusal::OverQuota { .. })
        ));
    }

    #[test]
    fn the_key_count_limit_still_holds() {
        let (_dir, state) = state();
        let mut call = session(&state, "a");
        for index in 0..MAX_KEYS_PER_INSTANCE {
            call.set(&index.to_string(), vec![], ROOM).unwrap().unwrap();
        }
        assert_eq!(
            call.set("one-more", vec![], ROOM).unwrap().unwrap_err(),
            KvRefusal::TooManyKeys
        );
        call.set("0", vec![1], ROOM).unwrap().unwrap();
    }
}
