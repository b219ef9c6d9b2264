//! What each instance's key-value store holds: its number of keys and its
//! bytes of keys and values (what the quota counts), kept in rows beside the
//! values and updated in the same transaction as every write. A quota check
//! reads one row, never the store.
//!
//! A home written before the byte rows existed has none: the first quota
//! check of such an instance counts its keys and values once, by reading
//! them, and stores the row.

use super::kv::{KvError, VALUES, storage};
use crate::state_db::StateDb;
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

/// instance name -> number of keys it holds.
const KEY_COUNTS: TableDefinition<&str, u64> = TableDefinition::new("extension_kv_key_counts");
/// instance name -> bytes of keys and values it holds.
const BYTE_COUNTS: TableDefinition<&str, u64> = TableDefinition::new("extension_kv_bytes");

/// What an instance's store holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvUsage {
    pub keys: u64,
    /// Bytes of keys and values.
    pub bytes: u64,
}

/// What one key and its value count against the quota.
pub fn entry_bytes(key: &str, value_len: usize) -> u64 {
    (key.len() + value_len) as u64
}

/// What `instance`'s store holds, from its rows. A store from before the
/// byte rows is counted once here and its row stored, so no later call
/// counts it again.
pub fn stored_usage(state: &StateDb, instance: &str) -> Result<KvUsage, KvError> {
    if let Some(usage) = recorded_usage(state, instance)? {
        return Ok(usage);
    }
    let owner = instance.to_string();
    state.write_eventually(move |write| {
        let values = write
            .open_table(VALUES)
            .map_err(|error| error.to_string())?;
        let usage = usage_in(write, &values, &owner)?;
        record(write, &owner, usage)
    })?;
    Ok(recorded_usage(state, instance)?.unwrap_or_default())
}

/// The rows' answer; none when only counting the keys can tell.
fn recorded_usage(state: &StateDb, instance: &str) -> Result<Option<KvUsage>, KvError> {
    let database = state.database()?;
    let read = database.begin_read().map_err(storage)?;
    let row = |table| -> Result<Option<u64>, KvError> {
        match read.open_table(table) {
            Ok(table) => Ok(table
                .get(instance)
                .map_err(storage)?
                .map(|count| count.value())),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(error) => Err(storage(error)),
        }
    };
    let keys = row(KEY_COUNTS)?.unwrap_or(0);
    match row(BYTE_COUNTS)? {
        Some(bytes) => Ok(Some(KvUsage { keys, bytes })),
        // The key counts were always kept: no keys, no bytes.
        None if keys == 0 => Ok(Some(KvUsage::default())),
        None => Ok(None),
    }
}

/// What `instance`'s store holds, inside a write transaction whose values
/// table is `values`.
pub(super) fn usage_in(
    write: &WriteTransaction,
    values: &redb::Table<(&'static str, &'static str), &'static [u8]>,
    instance: &str,
) -> Result<KvUsage, String> {
    let row = |table| -> Result<Option<u64>, String> {
        Ok(write
            .open_table(table)
            .map_err(|error| error.to_string())?
            .get(instance)
            .map_err(|error| error.to_string())?
            .map(|count| count.value()))
    };
    let keys = row(KEY_COUNTS)?.unwrap_or(0);
    match row(BYTE_COUNTS)? {
        Some(bytes) => Ok(KvUsage { keys, bytes }),
        None if keys == 0 => Ok(KvUsage::default()),
        None => count_usage(values, instance).map_err(|error| error.to_string()),
    }
}

/// Stores `instance`'s usage in the caller's transaction.
pub(super) fn record(
    write: &WriteTransaction,
    instance: &str,
    usage: KvUsage,
) -> Result<(), String> {
    write
        .open_table(KEY_COUNTS)
        .map_err(|error| error.to_string())?
        .insert(instance, usage.keys)
        .map_err(|error| error.to_string())?;
    write
        .open_table(BYTE_COUNTS)
        .map_err(|error| error.to_string())?
        .insert(instance, usage.bytes)
        .map_err(|error| error.to_string())?;
    Ok(())
}

/// Counts `instance`'s keys and bytes by reading them all: only for a store
/// that has no row yet.
fn count_usage(
    values: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    instance: &str,
) -> Result<KvUsage, KvError> {
    let mut usage = KvUsage::default();
    for entry in values.range((instance, "")..).map_err(storage)? {
        let (key, value) = entry.map_err(storage)?;
        let (owner, key) = key.value();
        if owner != instance {
            break;
        }
        usage.keys += 1;
        usage.bytes += entry_bytes(key, value.value().len());
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::super::kv::{KvSession, MemoryRoom};
    use super::*;
    use std::sync::Arc;

    const ROOM: MemoryRoom = MemoryRoom {
        free_bytes: usize::MAX,
        limit_bytes: 64 << 20,
    };

    fn recount(state: &StateDb, instance: &str) -> KvUsage {
        let database = state.database().unwrap();
        let read = database.begin_read().unwrap();
        count_usage(&read.open_table(VALUES).unwrap(), instance).unwrap()
    }

    #[test]
    fn the_rows_stay_exact_through_writes_overwrites_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(StateDb::new(dir.path().join("state.redb")));
        // A fixed pseudo-random walk over 40 keys of two instances.
        let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
        for round in 0..30 {
            for instance in ["a", "b"] {
                let mut call = KvSession::new(state.clone(), instance.into(), u64::MAX);
                for _ in 0..20 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let key = format!("key-{}", seed % 40);
                    if seed.is_multiple_of(3) {
                        call.delete(&key, ROOM).unwrap().unwrap();
                    } else {
                        let size = (seed >> 8) as usize % 5_000;
                        call.set(&key, vec![0; size], ROOM).unwrap().unwrap();
                    }
                }
                call.commit().unwrap();
                assert_eq!(
                    stored_usage(&state, instance).unwrap(),
                    recount(&state, instance),
                    "round {round}, instance {instance}"
                );
            }
        }
        assert_ne!(stored_usage(&state, "a").unwrap(), KvUsage::default());
    }

    #[test]
    fn a_store_from_before_byte_rows_is_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(StateDb::new(dir.path().join("state.redb")));
        // What an older host wrote: values and key counts, no byte rows.
        state
            .write(|write| {
                let mut values = write.open_table(VALUES).map_err(|e| e.to_string())?;
                for key in ["one", "two"] {
                    values
                        .insert(("old", key), [9u8; 100].as_slice())
                        .map_err(|e| e.to_string())?;
                }
                write
                    .open_table(KEY_COUNTS)
                    .map_err(|e| e.to_string())?
                    .insert("old", 2)
                    .map_err(|e| e.to_string())?;
                Ok(())
            })
            .unwrap();
        let counted = KvUsage {
            keys: 2,
            bytes: 206,
        };
        assert_eq!(recorded_usage(&state, "old").unwrap(), None);
        assert_eq!(stored_usage(&state, "old").unwrap(), counted);
        assert_eq!(
            recorded_usage(&state, "old").unwrap(),
            Some(counted),
            "counted once, then read from its row"
        );

        let mut call = KvSession::new(state.clone(), "old".into(), u64::MAX);
        call.set("three", vec![1; 10], ROOM).unwrap().unwrap();
        call.commit().unwrap();
        let read = state.database().unwrap().begin_read().unwrap();
        let row = read.open_table(BYTE_COUNTS).unwrap();
        assert_eq!(row.get("old").unwrap().unwrap().value(), 206 + 15);
        assert_eq!(
            stored_usage(&state, "old").unwrap(),
            KvUsage {
                keys: 3,
                bytes: 221
            }
        );
    }
}
