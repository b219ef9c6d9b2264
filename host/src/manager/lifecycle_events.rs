//! Lifecycle events: one CloudEvent per state change of a sandbox, written
//! to an outbox in the state store in the same transaction as the record.
//!
//! Ids are `<host id>-L<seq>`: stable across redelivery, distinct from the
//! ledger's `<ledger id>-<seq>`. On a shared store the outbox is the
//! database's (`<store id>-L<seq>`), one for every host.

use super::record::{RecordError, SandboxState, SandboxStatus, storage};
use crate::ledger::rfc3339_millis;
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

/// An event not yet given its sequence number: what a record write
/// appends to the outbox.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PendingEvent {
    pub sandbox_id: String,
    pub event_type: String,
    pub data: serde_json::Value,
    pub time_ms: u64,
}

impl PendingEvent {
    /// The event of `record` entering its current state.
    pub fn state_change(record: &SandboxStatus, now_ms: u64) -> Self {
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
        Self {
            sandbox_id: record.id.clone(),
            event_type: event_type(record.state),
            data,
            time_ms: now_ms,
        }
    }

    /// The event saying `record`'s extension asked more than the charge
    /// policy let stand.
    pub fn dispute(
        record: &SandboxStatus,
        decision: &super::charge::ChargeDecision,
        now_ms: u64,
    ) -> Self {
        let data = serde_json::json!({
            "sandbox_id": record.id,
            "tenant": record.tenant,
            "extension": record.extension,
            "asked": format_credits(decision.asked),
            "ceiling": format_credits(decision.ceiling),
            "charged": format_credits(decision.charged),
            "disputed": format_credits(decision.disputed),
        });
        Self {
            sandbox_id: record.id.clone(),
            event_type: CHARGE_DISPUTED.into(),
            data,
            time_ms: now_ms,
        }
    }

    /// The CloudEvent, as the outbox keeps it (JSON), once it has its
    /// sequence number in the outbox of `store_id`.
    pub fn to_json(&self, store_id: &str, seq: u64) -> Result<String, RecordError> {
        let event = MeterEventFields {
            specversion: "1.0",
            id: &format!("{store_id}-L{seq}"),
            source: LIFECYCLE_SOURCE,
            event_type: &self.event_type,
            time: &rfc3339_millis(self.time_ms),
            subject: &format!("sandbox/{}", self.sandbox_id),
            datacontenttype: "application/json",
            data: &self.data,
        };
        serde_json::to_string(&event).map_err(storage)
    }
}

/// A [`MeterEvent`](crate::ledger::MeterEvent) made of borrowed fields:
/// the same JSON, without copying the event's data to make it.
#[derive(serde::Serialize)]
struct MeterEventFields<'a> {
    specversion: &'a str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    time: &'a str,
    subject: &'a str,
    datacontenttype: &'a str,
    data: &'a serde_json::Value,
}

/// Appends `event` to the outbox in `write`, with an id made of this
/// home's `host_id` (the state store's writer keeps it; see
/// [`ensure_host_id`]).
pub fn append(
    write: &WriteTransaction,
    event: &PendingEvent,
    host_id: &str,
) -> Result<u64, RecordError> {
    let mut meta = write.open_table(META).map_err(storage)?;
    let seq = meta
        .get(NEXT_SEQ)
        .map_err(storage)?
        .map_or(1, |seq| seq.value());
    meta.insert(NEXT_SEQ, seq + 1).map_err(storage)?;
    drop(meta);
    let json = event.to_json(host_id, seq)?;
    write
        .open_table(OUTBOX)
        .map_err(storage)?
        .insert(seq, json.as_str())
        .map_err(storage)?;
    Ok(seq)
}

/// This home's host id, and whether it was made just now (random: the state
/// store makes it durably before logging any write, so that a replayed
/// event gets the id it first had).
pub(crate) fn ensure_host_id(write: &WriteTransaction) -> Result<(String, bool), RecordError> {
    let existing = write
        .open_table(META_TEXT)
        .map_err(storage)?
        .get(HOST_ID)
        .map_err(storage)?
        .map(|id| id.value().to_string());
    match existing {
        Some(id) => Ok((id, false)),
        None => host_id_in(write).map(|id| (id, true)),
    }
}

/// This home's host id, when it has one (a read).
pub(crate) fn stored_host_id(read: &redb::ReadTransaction) -> Result<Option<String>, RecordError> {
    match read.open_table(META_TEXT) {
        Ok(table) => Ok(table
            .get(HOST_ID)
            .map_err(storage)?
            .map(|id| id.value().to_string())),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(error) => Err(storage(error)),
    }
}

/// This home's host id, made (random) on first need.
fn host_id_in(write: &WriteTransaction) -> Result<String, RecordError> {
    let mut meta_text = write.open_table(META_TEXT).map_err(storage)?;
    let existing = meta_text
        .get(HOST_ID)
        .map_err(storage)?
        .map(|id| id.value().to_string());
    Ok(match existing {
        Some(id) => id,
        None => {
            let id = format!("{:016x}", rand::random::<u64>());
            meta_text.insert(HOST_ID, id.as_str()).map_err(storage)?;
            id
        }
    })
}

/// This home's host id: in its lifecycle events' ids, and, on a shared
/// store, the owner of the sandboxes it serves.
pub fn host_id(state: &crate::state_db::StateDb) -> Result<String, RecordError> {
    let database = state.database()?;
    let read = database.begin_read().map_err(storage)?;
    if let Ok(table) = read.open_table(META_TEXT)
        && let Some(id) = table.get(HOST_ID).map_err(storage)?
    {
        return Ok(id.value().to_string());
    }
    drop(read);
    let (sender, receiver) = std::sync::mpsc::channel();
    state.write(move |write| {
        let id = host_id_in(write).map_err(|error| error.to_string())?;
        let _ = sender.send(id);
        Ok(())
    })?;
    receiver
        .recv()
        .map_err(|_| storage("the host id was not written"))
}

/// Events after `after_seq` up to `upto` (the newest on the disk:
/// [`crate::state_db::StateDb::durable_events`]), oldest first, as stored
/// JSON.
pub fn after(
    state: &crate::state_db::StateDb,
    after_seq: u64,
    upto: u64,
    limit: usize,
) -> Result<Vec<(u64, String)>, RecordError> {
    if let Some(shared) = state.shared() {
        return shared
            .events_after(after_seq, limit)
            .map_err(RecordError::Storage);
    }
    let database = state.database()?;
    let read = database.begin_read().map_err(storage)?;
    let table = match read.open_table(OUTBOX) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(error) => return Err(storage(error)),
    };
    let mut events = Vec::new();
    if after_seq >= upto {
        return Ok(events);
    }
    for row in table
        .range(after_seq.saturating_add(1)..=upto)
        .map_err(storage)?
        .take(limit)
    {
        let (seq, json) = row.map_err(storage)?;
        events.push((seq.value(), json.value().to_string()));
    }
    Ok(events)
}

/// The newest event in `database` (0 when none).
pub(crate) fn last_seq_in(database: &redb::Database) -> Result<u64, RecordError> {
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

/// The newest lifecycle event's sequence number (0 when none).
pub fn last_seq(state: &crate::state_db::StateDb) -> Result<u64, RecordError> {
    if let Some(shared) = state.shared() {
        return shared.last_event_seq().map_err(RecordError::Storage);
    }
    last_seq_in(&*state.database()?)
}
