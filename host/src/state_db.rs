//! The host's own state store (`<home>/state.redb`): extension key-value
//! stores, sandbox records and their lifecycle events, routing health and
//! event-delivery cursors.
//!
//! Opened lazily on first use, so commands that never touch state (such as
//! `ext list`) work while another process holds the file. redb takes an
//! exclusive lock on its file; a second process gets a plain error saying so.
//!
//! Writes go through one writer thread that groups concurrent writers into
//! one transaction (one fsync for the group), as the ledger does: with many
//! sandboxes in flight, per-write commits would serialize on the disk. A
//! failing write abandons its group, and every writer in it gets the error.
//!
//! Two kinds of write:
//! - a [`LoggedWrite`] (a record, its lifecycle events, an extension call's
//!   key-value writes), kept as data: the group's logged writes are
//!   appended to the state's redo log (`state.wal`, [`crate::redo_log`])
//!   and synced when any of them must be durable, and the redb commit is
//!   not durable by itself; opening the store replays what redb lacks;
//! - a closure over the transaction (tenants, keys, cursors, routing
//!   health): a group with a durable closure commits to redb durably (which
//!   holds every earlier write, so the log starts again).
//!
//! Lifecycle events are read (delivered to sinks, streamed) only up to the
//! newest one on the disk ([`StateDb::durable_events`]): an event of a write
//! that was not synced (`destroyed`) waits for the next sync, so no reader
//! ever sees an event a crash could take back, and no delivered sequence
//! number is reused after one.

use crate::group_commit::GroupWriter;
use crate::manager::lifecycle_events::{self, PendingEvent};
use crate::redo_log::{Appended, WriterLog};
use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Most writes committed in one transaction.
const MAX_GROUP: usize = 256;

/// "lsn" -> the newest redo-log group redb holds.
const LOG_META: TableDefinition<&str, u64> = TableDefinition::new("state_log");
const LOG_LSN: &str = "lsn";

#[derive(Debug, thiserror::Error)]
pub enum StateDbError {
    #[error("{path} is in use by another sandboxer-host process; wait for it to finish")]
    InUse { path: PathBuf },
    #[error("cannot open the state store {path}: {source}")]
    Open {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("state store write failed: {0}")]
    Write(String),
}

/// A write: runs inside the group's transaction.
pub type StateWrite = Box<dyn FnOnce(&WriteTransaction) -> Result<(), String> + Send>;

/// A write the redo log keeps as data: a sandbox record (its id and JSON),
/// the lifecycle events appended with it, an extension call's key-value
/// writes (a value, or none to remove the key), and a dispute's tally. Applying it
/// depends on nothing but the store (the host id is made durably before
/// any write is logged), so a replay gives what the first run gave.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LoggedWrite {
    pub record: Option<(String, String)>,
    pub events: Vec<PendingEvent>,
    pub kv: Option<(String, Vec<crate::state_pg::KvWrite>)>,
    /// A charge policy's cut, added to its instance's dispute tally.
    #[serde(default)]
    pub disputed: Option<(String, u64)>,
}

impl LoggedWrite {
    /// Applies the write (its events get ids made of `host_id`); returns
    /// the sequence number of its newest event.
    fn apply(&self, write: &WriteTransaction, host_id: &str) -> Result<Option<u64>, String> {
        if let Some((id, json)) = &self.record {
            crate::manager::record::put_json(write, id, json)?;
        }
        let mut newest_event = None;
        for event in &self.events {
            newest_event = Some(
                lifecycle_events::append(write, event, host_id)
                    .map_err(|error| error.to_string())?,
            );
        }
        if let Some((instance, writes)) = &self.kv {
            crate::runtime::kv::apply_writes(write, instance, writes)?;
        }
        if let Some((instance, amount)) = &self.disputed {
            crate::manager::disputes::add(write, instance, *amount)
                .map_err(|error| error.to_string())?;
        }
        Ok(newest_event)
    }
}

/// The newest lifecycle event redb holds, and the newest one on the disk
/// (in a durable commit, or in a synced log record). The writer moves
/// both; readers stop at `durable`.
#[derive(Debug, Default)]
struct EventMarks {
    written: AtomicU64,
    durable: AtomicU64,
}

impl EventMarks {
    /// Whether events wait for a sync.
    fn behind(&self) -> bool {
        self.written.load(Ordering::Acquire) > self.durable.load(Ordering::Acquire)
    }
}

/// Readers still get the events already on the disk when the sync that
/// would add the newer ones fails (the writer says why to its own callers).
fn warn_unsynced(synced: Result<(), StateDbError>) {
    if let Err(error) = synced {
        tracing::warn!("lifecycle events wait for the disk: {error}");
    }
}

/// A job for the writer, and whether the caller needs it on disk before it
/// goes on (a group is durable when any of its jobs is).
enum Job {
    Closure(StateWrite, bool),
    /// A logged write, and a host-local write that goes with it in the same
    /// transaction but not in the log (routing health: a crash may lose it).
    Logged(LoggedWrite, Option<StateWrite>, bool),
}

/// The open file and its writer.
struct Opened {
    database: Arc<Database>,
    writer: GroupWriter<Job, Result<(), String>>,
    events: Arc<EventMarks>,
}

/// A lazily opened, shared handle on `state.redb`, and, when the host
/// runs on a shared store, that store's part ([`crate::state_pg`]): sandbox
/// records, lifecycle events and extension key-value stores then live
/// there, and each of their readers and writers asks [`StateDb::shared`].
pub struct StateDb {
    path: PathBuf,
    opened: Mutex<Option<Arc<Opened>>>,
    shared: std::sync::OnceLock<Arc<crate::state_pg::PgState>>,
}

impl std::fmt::Debug for StateDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDb")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl StateDb {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            opened: Mutex::new(None),
            shared: std::sync::OnceLock::new(),
        }
    }

    /// Moves the shared part of the state to `shared`; set once, before
    /// the store is used.
    pub fn share(&self, shared: Arc<crate::state_pg::PgState>) {
        let _ = self.shared.set(shared);
    }

    /// The shared store, when the host runs on one.
    pub fn shared(&self) -> Option<&Arc<crate::state_pg::PgState>> {
        self.shared.get()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Releases the file (and its lock) once no operation uses it; the next
    /// use opens it again.
    pub fn close(&self) {
        let opened = self
            .opened
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        drop(opened);
    }

    fn opened(&self) -> Result<Arc<Opened>, StateDbError> {
        let mut slot = self
            .opened
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(opened) = slot.as_ref() {
            return Ok(opened.clone());
        }
        let database = Arc::new(open_exclusive(&self.path)?);
        let log_path = crate::redo_log::path_for(&self.path);
        let (host_id, last_lsn) =
            replay(&database, &log_path).map_err(|error| StateDbError::Open {
                path: self.path.clone(),
                source: error.into(),
            })?;
        // Whatever an open finds is on the disk.
        let newest =
            lifecycle_events::last_seq_in(&database).map_err(|error| StateDbError::Open {
                path: self.path.clone(),
                source: error.to_string().into(),
            })?;
        let events = Arc::new(EventMarks {
            written: AtomicU64::new(newest),
            durable: AtomicU64::new(newest),
        });
        let mut writer = Writer {
            database: database.clone(),
            log: WriterLog::new(log_path, host_id.clone(), "the state store"),
            host_id,
            last_lsn,
            undurable: 0,
            broken: None,
            events: events.clone(),
        };
        let writer = GroupWriter::start("state-writer", MAX_GROUP, move |jobs: Vec<Job>| {
            let count = jobs.len();
            let outcome = writer.commit_group(jobs);
            vec![outcome; count]
        })
        .map_err(|source| StateDbError::Open {
            path: self.path.clone(),
            source: Box::new(source),
        })?;
        let opened = Arc::new(Opened {
            database,
            writer,
            events,
        });
        *slot = Some(opened.clone());
        Ok(opened)
    }

    /// The open database, opening (or creating) it on first use. For reads;
    /// write with [`StateDb::write`].
    pub fn database(&self) -> Result<Arc<Database>, StateDbError> {
        Ok(self.opened()?.database.clone())
    }

    /// Runs `write` inside a durable write transaction, grouped with other
    /// writers', and returns once it is committed.
    pub fn write(
        &self,
        write: impl FnOnce(&WriteTransaction) -> Result<(), String> + Send + 'static,
    ) -> Result<(), StateDbError> {
        self.submit(Box::new(write), true)
    }

    /// Like [`StateDb::write`], for a write whose loss in a crash is
    /// harmless: it becomes durable with the next durable write, and costs
    /// no fsync of its own.
    pub fn write_eventually(
        &self,
        write: impl FnOnce(&WriteTransaction) -> Result<(), String> + Send + 'static,
    ) -> Result<(), StateDbError> {
        self.submit(Box::new(write), false)
    }

    /// [`StateDb::write`] for async callers: awaits the commit without
    /// blocking the executor's thread.
    pub async fn write_async(
        &self,
        write: impl FnOnce(&WriteTransaction) -> Result<(), String> + Send + 'static,
    ) -> Result<(), StateDbError> {
        self.submit_async(Box::new(write), true).await
    }

    /// [`StateDb::write_eventually`] for async callers.
    pub async fn write_eventually_async(
        &self,
        write: impl FnOnce(&WriteTransaction) -> Result<(), String> + Send + 'static,
    ) -> Result<(), StateDbError> {
        self.submit_async(Box::new(write), false).await
    }

    /// Commits a logged write (and `local`, a host-local write that goes
    /// with it but may be lost in a crash) and returns once it is durable,
    /// or at once when `durable` is false (a step whose loss in a crash
    /// leaves nothing to reconcile).
    pub fn write_logged(
        &self,
        write: LoggedWrite,
        local: Option<StateWrite>,
        durable: bool,
    ) -> Result<(), StateDbError> {
        self.submit_job(Job::Logged(write, local, durable))
    }

    /// [`StateDb::write_logged`], awaited.
    pub async fn write_logged_async(
        &self,
        write: LoggedWrite,
        local: Option<StateWrite>,
        durable: bool,
    ) -> Result<(), StateDbError> {
        self.submit_job_async(Job::Logged(write, local, durable))
            .await
    }

    /// The newest lifecycle event on the disk, after making the ones written
    /// since the last sync durable (an empty synced write: one sync of the
    /// redo log, only when there are such): readers of the outbox stop
    /// there. A failed sync leaves the mark where it was. On a shared store,
    /// where every commit is durable, `u64::MAX`.
    pub fn durable_events(&self) -> Result<u64, StateDbError> {
        let Some(marks) = self.event_marks()? else {
            return Ok(u64::MAX);
        };
        if marks.behind() {
            warn_unsynced(self.write_logged(LoggedWrite::default(), None, true));
        }
        Ok(marks.durable.load(Ordering::Acquire))
    }

    /// [`StateDb::durable_events`] for async callers.
    pub async fn durable_events_async(&self) -> Result<u64, StateDbError> {
        let Some(marks) = self.event_marks()? else {
            return Ok(u64::MAX);
        };
        if marks.behind() {
            warn_unsynced(
                self.write_logged_async(LoggedWrite::default(), None, true)
                    .await,
            );
        }
        Ok(marks.durable.load(Ordering::Acquire))
    }

    /// The marks of events kept in `state.redb`; none on a shared store.
    fn event_marks(&self) -> Result<Option<Arc<EventMarks>>, StateDbError> {
        if self.shared().is_some() {
            return Ok(None);
        }
        Ok(Some(self.opened()?.events.clone()))
    }

    async fn submit_async(&self, write: StateWrite, durable: bool) -> Result<(), StateDbError> {
        self.submit_job_async(Job::Closure(write, durable)).await
    }

    fn submit(&self, write: StateWrite, durable: bool) -> Result<(), StateDbError> {
        self.submit_job(Job::Closure(write, durable))
    }

    async fn submit_job_async(&self, job: Job) -> Result<(), StateDbError> {
        let opened = self.opened()?;
        opened
            .writer
            .submit_async(job)
            .await
            .ok_or_else(|| StateDbError::Write("the state store's writer has stopped".into()))?
            .map_err(StateDbError::Write)
    }

    fn submit_job(&self, job: Job) -> Result<(), StateDbError> {
        let opened = self.opened()?;
        opened
            .writer
            .submit(job)
            .ok_or_else(|| StateDbError::Write("the state store's writer has stopped".into()))?
            .map_err(StateDbError::Write)
    }
}

/// Makes sure the store has its host id (durably: the log's records
/// depend on it), then applies, in one durable commit, the redo log's
/// groups that redb lacks. Returns the host id and the newest lsn.
fn replay(database: &Database, log_path: &Path) -> Result<(String, u64), String> {
    let text = |error: &dyn std::fmt::Display| error.to_string();
    let read = database.begin_read().map_err(|error| text(&error))?;
    let stored = lifecycle_events::stored_host_id(&read).map_err(|error| text(&error))?;
    let applied = match read.open_table(LOG_META) {
        Ok(table) => table
            .get(LOG_LSN)
            .map_err(|error| text(&error))?
            .map_or(0, |lsn| lsn.value()),
        Err(redb::TableError::TableDoesNotExist(_)) => 0,
        Err(error) => return Err(text(&error)),
    };
    drop(read);
    let unreadable = |error: std::io::Error| format!("its redo log cannot be replayed: {error}");
    let Some(host_id) = stored else {
        // A new host id: a log beside it is another store's (this file was
        // deleted and made again), removed before the id is committed so
        // that no later open finds it.
        let write = database.begin_write().map_err(|error| text(&error))?;
        let (host_id, _) =
            lifecycle_events::ensure_host_id(&write).map_err(|error| text(&error))?;
        crate::redo_log::read_pending(log_path, &host_id, applied, true).map_err(unreadable)?;
        write.commit().map_err(|error| text(&error))?;
        return Ok((host_id, applied));
    };
    let pending =
        crate::redo_log::read_pending(log_path, &host_id, applied, false).map_err(unreadable)?;
    let Some(last) = pending.last().map(|record| record.lsn) else {
        return Ok((host_id, applied));
    };
    let write = database.begin_write().map_err(|error| text(&error))?;
    for record in &pending {
        let group: Vec<LoggedWrite> = serde_json::from_slice(&record.payload)
            .map_err(|error| format!("its redo log cannot be replayed: {error}"))?;
        for logged in &group {
            logged.apply(&write, &host_id)?;
        }
    }
    set_lsn(&write, last)?;
    write.commit().map_err(|error| text(&error))?;
    tracing::info!(
        "state: replayed {} groups from {}",
        pending.len(),
        log_path.display()
    );
    Ok((host_id, last))
}

fn set_lsn(write: &WriteTransaction, lsn: u64) -> Result<(), String> {
    write
        .open_table(LOG_META)
        .map_err(|error| error.to_string())?
        .insert(LOG_LSN, lsn)
        .map_err(|error| error.to_string())?;
    Ok(())
}

/// How a group reaches the disk.
enum Commit {
    /// A durable redb commit (it holds every earlier group: the log rewinds).
    Durable,
    /// Not durable by itself: its logged writes are in the log (synced when
    /// one of them must be durable), or it has none.
    Deferred,
}

/// The writer thread's state.
struct Writer {
    database: Arc<Database>,
    /// This home's host id, in its events' ids (made before any write).
    host_id: String,
    log: WriterLog,
    last_lsn: u64,
    /// Groups committed without durability since the last durable commit.
    undurable: u64,
    /// Set when a group's fate became unknown: no more writes until the
    /// store is opened again and replays its log.
    broken: Option<String>,
    events: Arc<EventMarks>,
}

impl Writer {
    fn commit_group(&mut self, jobs: Vec<Job>) -> Result<(), String> {
        if let Some(broken) = &self.broken {
            return Err(broken.clone());
        }
        let mut transaction = self
            .database
            .begin_write()
            .map_err(|error| error.to_string())?;
        let mut logged = Vec::new();
        let mut newest_event = None;
        let (mut durable_closure, mut sync) = (false, false);
        let applied = (|| {
            for job in jobs {
                match job {
                    Job::Closure(write, durable) => {
                        write(&transaction)?;
                        durable_closure |= durable;
                    }
                    Job::Logged(write, local, durable) => {
                        newest_event = write.apply(&transaction, &self.host_id)?.or(newest_event);
                        if let Some(local) = local {
                            local(&transaction)?;
                        }
                        sync |= durable;
                        logged.push(write);
                    }
                }
            }
            Ok::<(), String>(())
        })();
        let lsn = self.last_lsn + 1;
        if let Err(error) = applied.and_then(|()| {
            if logged.is_empty() {
                Ok(())
            } else {
                set_lsn(&transaction, lsn)
            }
        }) {
            let _ = transaction.abort();
            return Err(error);
        }
        let commit = if durable_closure {
            Commit::Durable
        } else if logged.is_empty() {
            Commit::Deferred
        } else {
            match self.log_group(lsn, &logged, sync) {
                Ok(Some(commit)) => commit,
                Ok(None) if sync => Commit::Durable,
                Ok(None) => Commit::Deferred,
                Err(error) => {
                    let _ = transaction.abort();
                    let message = format!(
                        "the state store's redo log {} could not be written ({error}); the \
                         write may still be applied when the store is opened again, and no \
                         more writes are taken until then",
                        self.log.path().display()
                    );
                    tracing::error!("{message}");
                    self.broken = Some(message.clone());
                    return Err(message);
                }
            }
        };
        if matches!(commit, Commit::Deferred)
            && let Err(error) = transaction.set_durability(Durability::None)
        {
            let _ = transaction.abort();
            if !logged.is_empty() && !self.log.unavailable() {
                // Its record may be in the log already: the lsn is spent.
                return Err(self.break_after_logging(&error.to_string()));
            }
            return Err(error.to_string());
        }
        if let Err(error) = transaction.commit() {
            if !logged.is_empty() && matches!(commit, Commit::Deferred) && !self.log.unavailable() {
                return Err(self.break_after_logging(&error.to_string()));
            }
            return Err(error.to_string());
        }
        if !logged.is_empty() {
            self.last_lsn = lsn;
        }
        if let Some(seq) = newest_event {
            self.events.written.store(seq, Ordering::Release);
        }
        // A durable commit holds every group before it; so does a synced
        // log record (every event is in a logged write, and a group the log
        // could not take committed durably if it had to be on the disk).
        if matches!(commit, Commit::Durable) || sync {
            let written = self.events.written.load(Ordering::Acquire);
            self.events.durable.store(written, Ordering::Release);
        }
        match commit {
            Commit::Durable => {
                self.undurable = 0;
                self.log.rewind();
            }
            Commit::Deferred => self.undurable += 1,
        }
        Ok(())
    }

    /// A group whose writes were logged could not be committed: the logged
    /// ones are applied when the store is opened again (the others in the
    /// group are lost), and no more writes are taken until then.
    fn break_after_logging(&mut self, error: &str) -> String {
        let message = format!(
            "the state store could not commit a group whose records were logged ({error}); \
             the logged writes are applied when the store is opened again, and no more \
             writes are taken until then"
        );
        tracing::error!("{message}");
        self.broken = Some(message.clone());
        message
    }

    /// Appends the group's logged writes to the redo log, synced when
    /// `sync`. `Some(Deferred)`: logged. `None`: no log here (the group
    /// must then commit durably if anything in it must be durable). With a
    /// log, a group that does not fit always commits durably, so that the
    /// log never skips a group.
    fn log_group(
        &mut self,
        lsn: u64,
        logged: &[LoggedWrite],
        sync: bool,
    ) -> std::io::Result<Option<Commit>> {
        let payload = || serde_json::to_vec(logged).map_err(std::io::Error::other);
        Ok(match self.log.append(lsn, payload, sync)? {
            Appended::Logged => Some(Commit::Deferred),
            Appended::NotLogged if self.log.unavailable() => None,
            Appended::NotLogged => Some(Commit::Durable),
        })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.undurable > 0 && self.broken.is_none() {
            crate::redo_log::closing_commit(&self.database, "the state store");
        }
    }
}

/// Opens or creates a redb file, turning "another process has it" into a
/// sentence an operator can act on.
pub fn open_exclusive(path: &Path) -> Result<Database, StateDbError> {
    let open_error = |source: Box<dyn std::error::Error + Send + Sync>| StateDbError::Open {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|error| open_error(Box::new(error)))?;
    }
    if !path.exists() {
        create_atomically(path).map_err(open_error)?;
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

/// Creates an empty redb file at `path` as one step: a process killed while
/// redb writes a new file's first pages leaves a file it refuses to open
/// ("magic number mismatch"), which would make the home unusable. The file
/// is made complete under a temporary name, then linked into place; a link
/// fails rather than replace a file another process linked first.
fn create_atomically(path: &Path) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.creating-{}", std::process::id()));
    drop(Database::create(&temporary)?);
    std::fs::File::open(&temporary)?.sync_all()?;
    let linked = std::fs::hard_link(&temporary, path);
    std::fs::remove_file(&temporary)?;
    match linked {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(Box::new(error)),
    }
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableDatabase, TableDefinition};

    const NUMBERS: TableDefinition<u64, u64> = TableDefinition::new("numbers");

    #[test]
    fn concurrent_writes_are_all_committed() {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(StateDb::new(dir.path().join("state.redb")));
        std::thread::scope(|scope| {
            for thread in 0..8u64 {
                let state = state.clone();
                scope.spawn(move || {
                    for index in 0..25u64 {
                        let key = thread * 100 + index;
                        state
                            .write(move |write| {
                                let mut table = write
                                    .open_table(NUMBERS)
                                    .map_err(|error| error.to_string())?;
                                table
                                    .insert(key, key * 2)
                                    .map_err(|error| error.to_string())?;
                                Ok(())
                            })
                            .unwrap();
                    }
                });
            }
        });
        let read = state.database().unwrap().begin_read().unwrap();
        let table = read.open_table(NUMBERS).unwrap();
        assert_eq!(redb::ReadableTableMetadata::len(&table).unwrap(), 200);
    }

    #[test]
    fn lifecycle_events_are_read_only_once_they_are_on_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let state = StateDb::new(path.clone());
        let logged = |n: u64| LoggedWrite {
            events: vec![PendingEvent {
                sandbox_id: format!("sbx-{n}"),
                event_type: "sandboxer.sandbox.destroyed".into(),
                data: serde_json::json!({ "n": n }),
                time_ms: n,
            }],
            ..LoggedWrite::default()
        };
        let marks = || {
            let opened = state.opened().unwrap();
            (
                opened.events.written.load(Ordering::Acquire),
                opened.events.durable.load(Ordering::Acquire),
            )
        };
        state.write_logged(logged(1), None, true).unwrap();
        state.write_logged(logged(2), None, false).unwrap();
        assert_eq!(marks(), (2, 1), "the unsynced event is not on the disk yet");
        state.write_logged(logged(3), None, true).unwrap();
        assert_eq!(
            marks(),
            (3, 3),
            "a synced write takes the earlier one with it"
        );
        state.write_logged(logged(4), None, false).unwrap();
        assert_eq!(marks(), (4, 3));

        // A reader makes the newer ones durable before reading them: the
        // files as they are now (what a crash would leave) hold all four.
        assert_eq!(state.durable_events().unwrap(), 4);
        assert_eq!(marks(), (4, 4));
        let copy = dir.path().join("copy");
        std::fs::create_dir(&copy).unwrap();
        std::fs::copy(&path, copy.join("state.redb")).unwrap();
        let log = crate::redo_log::path_for(&path);
        std::fs::copy(&log, crate::redo_log::path_for(&copy.join("state.redb"))).unwrap();
        let alone = StateDb::new(copy.join("state.redb"));
        let upto = alone.durable_events().unwrap();
        let events = lifecycle_events::after(&alone, 0, upto, 10).unwrap();
        let seqs: Vec<u64> = events.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
        assert!(events[3].1.contains("sbx-4"), "{}", events[3].1);
        // Reading stops at the mark it is given.
        let first_two = lifecycle_events::after(&alone, 0, 2, 10).unwrap();
        assert_eq!(first_two.len(), 2);
    }

    #[test]
    fn a_failed_write_commits_nothing_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDb::new(dir.path().join("state.redb"));
        let error = state
            .write(|write| {
                write
                    .open_table(NUMBERS)
                    .map_err(|error| error.to_string())?
                    .insert(1, 1)
                    .map_err(|error| error.to_string())?;
                Err("refused".into())
            })
            .unwrap_err();
        assert_eq!(error.to_string(), "state store write failed: refused");
        let read = state.database().unwrap().begin_read().unwrap();
        assert!(read.open_table(NUMBERS).is_err(), "nothing was committed");
    }

    #[test]
    fn a_new_file_appears_whole_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fresh.redb");
        drop(open_exclusive(&path).unwrap());
        drop(open_exclusive(&path).expect("opens again"));
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["fresh.redb"], "no temporary file is left");
    }

    #[test]
    fn closing_releases_the_file_for_another_opener() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let state = StateDb::new(path.clone());
        state.database().unwrap();
        assert!(matches!(
            open_exclusive(&path),
            Err(StateDbError::InUse { .. })
        ));
        state.close();
        drop(open_exclusive(&path).unwrap());
        state.database().expect("opens again after close");
    }
}
