//! Delivering meter events from the outboxes to sinks.
//!
//! Two outboxes hold events: the ledger's (money, written with each
//! journal entry) and the state store's (lifecycle transitions, written
//! with each sandbox record). Two sinks receive them: a JSON-lines file
//! (`<home>/events.jsonl`, always) and an HTTP webhook (`--hub-url`, when
//! given).
//!
//! Delivery is at-least-once. For every (sink, outbox) pair a cursor in the
//! state store remembers the last event delivered (on a shared store the
//! hub's cursors are in the database, and one host at a time, under a
//! lease, delivers the hub; each host's file gets every event); it moves only after the
//! sink has the events (the file is synced, the hub answered 2xx). A crash
//! in between delivers some events again, with the same ids, so a sink can
//! deduplicate. A hub that is down loses nothing: its cursor stays and the
//! events wait in the outbox for the next flush.
//!
//! A flush posts to the hub at most once per outbox, with a short connect
//! and request timeout and no retry loop: a command must not stall on a hub
//! that is down (the server's next pass, or the next command that writes
//! events, tries again). A command that wrote no event does not contact
//! the hub at all ([`HubAttempt::IfNewEvents`]).

use crate::ledger::LedgerStore;
use crate::manager::lifecycle_events;
use crate::state_db::{StateDb, StateDbError};
use redb::{ReadableDatabase, TableDefinition};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// (sink, source) -> last delivered seq
const CURSORS: TableDefinition<(&str, &str), u64> = TableDefinition::new("delivery_cursors");
const BATCH: usize = 100;
/// How long a post may wait for the hub to accept the connection: a hub on a
/// reachable network accepts within milliseconds.
pub const HUB_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one post may take in all, answer included (a hub that accepts
/// and never answers costs this much, once per flush).
pub const HUB_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// When a flush contacts the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubAttempt {
    /// Whenever events wait for it (the server's passes).
    Always,
    /// Only when this flush found events the file sink had not had yet,
    /// that is, events written since the last flush (a command's end): a
    /// command that wrote nothing never waits on the hub, and events left
    /// by a failed post wait for the next command that writes events.
    IfNewEvents,
}

#[derive(Debug, Clone)]
pub struct Sinks {
    pub events_file: PathBuf,
    pub hub_url: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeliveryReport {
    pub to_file: usize,
    pub to_hub: usize,
    /// Why the hub could not be reached; its events wait in the outbox.
    pub hub_error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error(transparent)]
    State(#[from] StateDbError),
    #[error("event delivery: {0}")]
    Storage(String),
    #[error("cannot deliver events: {0}")]
    Sink(String),
}

/// Why draining an outbox into a sink stopped.
enum DrainError {
    /// The sink refused or could not be reached; the cursor did not move.
    Sink(String),
    Store(DeliveryError),
}

impl From<DeliveryError> for DrainError {
    fn from(error: DeliveryError) -> Self {
        Self::Store(error)
    }
}

fn storage(error: impl std::fmt::Display) -> DeliveryError {
    DeliveryError::Storage(error.to_string())
}

#[derive(Clone, Copy)]
enum Source {
    Ledger,
    Lifecycle,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Self::Ledger => "ledger",
            Self::Lifecycle => "lifecycle",
        }
    }
}

/// Delivers every waiting event to the file sink, then to the hub as
/// `hub` allows.
///
/// Blocking (the sinks are a file and a blocking HTTP client): call it on a
/// blocking thread of a tokio runtime, whose handle runs the ledger's reads.
pub fn flush(
    sinks: &Sinks,
    ledger: &dyn LedgerStore,
    state: &StateDb,
    hub: HubAttempt,
) -> Result<DeliveryReport, DeliveryError> {
    let mut report = DeliveryReport::default();
    for source in [Source::Ledger, Source::Lifecycle] {
        report.to_file += drain(state, "file", None, source, ledger, |events| {
            append_lines(&sinks.events_file, events)
        })
        .map_err(|error| match error {
            DrainError::Sink(message) => DeliveryError::Sink(message),
            DrainError::Store(error) => error,
        })?;
    }
    let contact_hub = match hub {
        HubAttempt::Always => true,
        HubAttempt::IfNewEvents => report.to_file > 0,
    };
    if let Some(url) = sinks.hub_url.as_deref().filter(|_| contact_hub) {
        let agent = hub_agent();
        for source in [Source::Ledger, Source::Lifecycle] {
            match drain(state, "hub", Some(url), source, ledger, |events| {
                post(&agent, url, events)
            }) {
                Ok(count) => report.to_hub += count,
                Err(DrainError::Sink(message)) => {
                    report.hub_error = Some(message);
                    break;
                }
                Err(DrainError::Store(error)) => return Err(error),
            }
        }
    }
    Ok(report)
}

/// Sends batches from one outbox to one sink until it is empty or the sink
/// fails; returns how many were delivered.
/// `shared_url` names a sink every host shares (the hub): on a shared store
/// its cursor is the database's, keyed by its URL.
fn drain(
    state: &StateDb,
    sink: &'static str,
    shared_url: Option<&str>,
    source: Source,
    ledger: &dyn LedgerStore,
    mut deliver: impl FnMut(&[String]) -> Result<(), String>,
) -> Result<usize, DrainError> {
    let mut delivered = 0;
    // On a shared store the hub is every host's: one host at a time
    // delivers it, from one cursor (the file is each home's own).
    let shared_hub = state
        .shared()
        .zip(shared_url)
        .map(|(shared, url)| (shared, format!("{sink} {url}")));
    loop {
        let cursor = match &shared_hub {
            Some((shared, key)) => {
                match shared.delivery_claim(key, source.name()).map_err(storage)? {
                    Some(cursor) => cursor,
                    // Another host delivers it.
                    None => return Ok(delivered),
                }
            }
            None => read_cursor(state, sink, source)?,
        };
        let events = match source {
            Source::Ledger => tokio::runtime::Handle::current()
                .block_on(ledger.outbox_after(cursor, BATCH))
                .map_err(storage)?,
            Source::Lifecycle => {
                let upto = state.durable_events().map_err(DeliveryError::from)?;
                lifecycle_events::after(state, cursor, upto, BATCH).map_err(storage)?
            }
        };
        let Some(&(last, _)) = events.last() else {
            return Ok(delivered);
        };
        let bodies: Vec<String> = events.into_iter().map(|(_, json)| json).collect();
        deliver(&bodies).map_err(DrainError::Sink)?;
        match &shared_hub {
            Some((shared, key)) => {
                if !shared
                    .delivery_advance(key, source.name(), last)
                    .map_err(storage)?
                {
                    // Another host took the delivery over meanwhile (this
                    // one was stalled past the lease): it goes on from the
                    // cursor as stored, so some events may reach the hub
                    // twice, with the same ids.
                    return Ok(delivered + bodies.len());
                }
            }
            None => write_cursor(state, sink, source, last)?,
        }
        delivered += bodies.len();
    }
}

fn read_cursor(state: &StateDb, sink: &str, source: Source) -> Result<u64, DeliveryError> {
    let database = state.database()?;
    let read = database.begin_read().map_err(storage)?;
    match read.open_table(CURSORS) {
        Ok(table) => Ok(table
            .get((sink, source.name()))
            .map_err(storage)?
            .map_or(0, |seq| seq.value())),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(error) => Err(storage(error)),
    }
}

fn write_cursor(
    state: &StateDb,
    sink: &'static str,
    source: Source,
    seq: u64,
) -> Result<(), DeliveryError> {
    let source = source.name();
    state.write(move |write| {
        let mut table = write
            .open_table(CURSORS)
            .map_err(|error| error.to_string())?;
        table
            .insert((sink, source), seq)
            .map_err(|error| error.to_string())?;
        Ok(())
    })?;
    Ok(())
}

/// Appends one JSON object per line and syncs the file.
fn append_lines(path: &PathBuf, events: &[String]) -> Result<(), String> {
    let mut text = String::with_capacity(events.iter().map(|event| event.len() + 1).sum());
    for event in events {
        text.push_str(event);
        text.push('\n');
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|error| format!("cannot open {}: {error}", path.display()))?;
    file.write_all(text.as_bytes())
        .map_err(|error| format!("cannot write {}: {error}", path.display()))?;
    file.sync_data()
        .map_err(|error| format!("cannot sync {}: {error}", path.display()))
}

fn hub_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(HUB_CONNECT_TIMEOUT))
        .timeout_global(Some(HUB_REQUEST_TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into()
}

/// Posts a CloudEvents batch (a JSON array); a 2xx answer is delivery.
fn post(agent: &ureq::Agent, url: &str, events: &[String]) -> Result<(), String> {
    let body = format!("[{}]", events.join(","));
    let response = agent
        .post(url)
        .header("content-type", "application/cloudevents-batch+json")
        .send(body.as_bytes())
        .map_err(|error| format!("{url}: {error}"))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("{url} answered {status}"))
    }
}

/// Reads the last `limit` lines of the events file (for `events tail`).
pub fn last_lines(path: &PathBuf, limit: usize) -> std::io::Result<Vec<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let lines: Vec<&str> = text.lines().collect();
    Ok(lines[lines.len().saturating_sub(limit)..]
        .iter()
        .map(|line| line.to_string())
        .collect())
}
