//! Lifecycle events: one CloudEvent per state change of a sandbox, written
//! to an outbox in the state store in the same transaction as the record.
//!
//! Ids are `<host id>-L<seq>`: stable across redelivery, distinct from the
//! ledger's `<ledger id>-<seq>`.

use super::record::{RecordError, SandboxState, SandboxStatus, storage};
use crate::ledger::{MeterEvent, rfc3339_millis};
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use sandboxer_credits::format_credits;

pub const LIFECYCLE_SOURCE: &str = "sandboxer-host/lifecycle";

/// seq -> MeterEvent (JSON)
const OUTBOX: TableDefinition<u64, &str> = TableDefinition::new("lifecycle_outbox");
const META: TableDefinition<&str, u64> = TableDefinition::new("lifecycle_meta");
const META_TEXT: TableDefinition<&str, &str> = TableDefinition::new("lifecycle_meta_text");
const NEXT_SEQ: &str = "next_seq";
const HOST_ID: &str = "host_id";

/// The CloudEvents `type` of entering `state`.
pub fn event_type(state: SandboxState) -> String {
    format!("sandboxer.sandbox.{}", state.name())
}

/// The CloudEvents `type` of a charge the policy cut (see `charge.rs`).
pub const CHARGE_DISPUTED: &str = "sandboxer.sandbox.charge_disputed";

/// Appends the event of `record` entering its current state.
pub fn append(
    write: &WriteTransaction,
    record: &SandboxStatus,
    now_ms: u64,
) -> Result<u64, RecordError> {
    let mut data = serde_json::json!({
        "sandbox_id": record.id,
        "state": record.state.name(),
        "tenant": record.tenant,
        "profile": record.profile,
        "extension": record.extension,
        "kind": record.kind,
    });
    let object = data.as_object_mut().expect("a JSON object");
    if let Some(estimate) = record.meter.estimate {
        object.insert("estimate".into(), format_credits(estimate).into());
    }
    if let Some(actual) = record.meter.actual {
        object.insert("actual".into(), format_credits(actual).into());
    }
    if let Some(note) = &record.note {
        object.insert("note".into(), note.clone().into());
    }
    append_event(write, &record.id, event_type(record.state), data, now_ms)
}

/// Appends the event saying `record`'s extension asked more than the
/// charge policy let stand.
pub fn append_dispute(
    write: &WriteTransaction,
    record: &SandboxStatus,
    decision: &super::charge::ChargeDecision,
    now_ms: u64,
) -> Result<u64, RecordError> {
    let data = serde_json::json!({
        "sandbox_id": record.id,
        "tenant": record.tenant,
        "extension": record.extension,
        "asked": format_credits(decision.asked),
        "ceiling": format_credits(decision.ceiling),
        "charged": format_credits(decision.charged),
        "disputed": format_credits(decision.disputed),
    });
    append_event(write, &record.id, CHARGE_DISPUTED.into(), data, now_ms)
}

fn append_event(
    write: &WriteTransaction,
    sandbox_id: &str,
    event_type: String,
    data: serde_json::Value,
    now_ms: u64,
) -> Result<u64, RecordError> {
    let mut meta = write.open_table(META).map_err(storage)?;
    let seq = meta
        .get(NEXT_SEQ)
        .map_err(storage)?
        .map_or(1, |seq| seq.value());
    meta.insert(NEXT_SEQ, seq + 1).map_err(storage)?;
    let mut meta_text = write.open_table(META_TEXT).map_err(storage)?;
    let existing = meta_text
        .get(HOST_ID)
        .map_err(storage)?
        .map(|id| id.value().to_string());
    let host_id = match existing {
        Some(id) => id,
        None => {
            let id = format!("{:016x}", rand::random::<u64>());
            meta_text.insert(HOST_ID, id.as_str()).map_err(storage)?;
            id
        }
    };
    let event = MeterEvent {
        specversion: "1.0".into(),
        id: format!("{host_id}-L{seq}"),
        source: LIFECYCLE_SOURCE.into(),
        event_type,
        time: rfc3339_millis(now_ms),
        subject: format!("sandbox/{sandbox_id}"),
        datacontenttype: "application/json".into(),
        data,
    };
    let json = serde_json::to_string(&event).map_err(storage)?;
    write
        .open_table(OUTBOX)
        .map_err(storage)?
        .insert(seq, json.as_str())
        .map_err(storage)?;
    Ok(seq)
}

/// Events after `after_seq`, oldest first, as stored JSON.
pub fn after(
    state: &crate::state_db::StateDb,
    after_seq: u64,
    limit: usize,
) -> Result<Vec<(u64, String)>, RecordError> {
    let database = state.database()?;
    let read = database.begin_read().map_err(storage)?;
    let table = match read.open_table(OUTBOX) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(error) => return Err(storage(error)),
    };
    let mut events = Vec::new();
    for row in table
        .range(after_seq.saturating_add(1)..)
        .map_err(storage)?
        .take(limit)
    {
        let (seq, json) = row.map_err(storage)?;
        events.push((seq.value(), json.value().to_string()));
    }
    Ok(events)
}

/// The newest lifecycle event's sequence number (0 when none).
pub fn last_seq(state: &crate::state_db::StateDb) -> Result<u64, RecordError> {
    let database = state.database()?;
    let read = database.begin_read().map_err(storage)?;
    let table = match read.open_table(OUTBOX) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(error) => return Err(storage(error)),
    };
    Ok(table
        .last()
        .map_err(storage)?
        .map_or(0, |(seq, _)| seq.value()))
}
