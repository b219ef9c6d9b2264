//! What each extension instance asked above the charge policy's ceiling
//! (see [`super::charge`]): a running tally per instance, kept in the state
//! store in the same transaction as the destroyed record it comes from, so
//! `ext info` can show which backend bills more than it may.

use super::record::{RecordError, storage};
use crate::state_db::StateDb;
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::Serialize;

/// instance -> (sandboxes with a dispute, micro-credits disputed in all)
const DISPUTES: TableDefinition<&str, (u64, u64)> = TableDefinition::new("billing_disputes");

/// An instance's disputed charges so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DisputeTally {
    pub sandboxes: u64,
    pub disputed: u64,
}

/// Adds one sandbox's disputed amount to `instance`'s tally.
pub fn add(write: &WriteTransaction, instance: &str, disputed: u64) -> Result<(), RecordError> {
    let mut table = write.open_table(DISPUTES).map_err(storage)?;
    let (sandboxes, total) = table
        .get(instance)
        .map_err(storage)?
        .map_or((0, 0), |row| row.value());
    table
        .insert(
            instance,
            (sandboxes.saturating_add(1), total.saturating_add(disputed)),
        )
        .map_err(storage)?;
    Ok(())
}

/// `instance`'s tally (zero when it never asked too much).
pub fn tally(state: &StateDb, instance: &str) -> Result<DisputeTally, RecordError> {
    let database = state.database()?;
    let read = database.begin_read().map_err(storage)?;
    let table = match read.open_table(DISPUTES) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(DisputeTally::default()),
        Err(error) => return Err(storage(error)),
    };
    Ok(table
        .get(instance)
        .map_err(storage)?
        .map_or_else(DisputeTally::default, |row| {
            let (sandboxes, disputed) = row.value();
            DisputeTally {
                sandboxes,
                disputed,
            }
        }))
}
