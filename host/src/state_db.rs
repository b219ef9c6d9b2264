//! The host's own state store (`<home>/state.redb`): extension key-value
//! stores, sandbox records and their lifecycle events, routing health and
//! event-delivery cursors.
//!
//! Opened lazily on first use, so commands that never touch state (such as
//! `ext list`) work while another process holds the file. redb takes an
//! exclusive lock on its file; a second process gets a plain error saying so.
//!
//! Writes go through one writer thread that groups concurrent writers into
//! one durable transaction (one fsync for the group), as the ledger does:
//! with many sandboxes in flight, per-write commits would serialize on the
//! disk. Each write is a closure over the transaction; a failing closure
//! abandons its group, and every writer in it gets the error.

use crate::group_commit::GroupWriter;
use redb::{Database, DatabaseError, Durability, WriteTransaction};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Most writes committed in one transaction.
const MAX_GROUP: usize = 256;

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

/// A write and whether the caller needs it on disk before it goes on. A
/// group is durable when any of its writes is.
type Job = (StateWrite, bool);

/// The open file and its writer.
struct Opened {
    database: Arc<Database>,
    writer: GroupWriter<Job, Result<(), String>>,
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
        let writer_database = database.clone();
        let writer = GroupWriter::start("state-writer", MAX_GROUP, move |jobs: Vec<Job>| {
            let durable = jobs.iter().any(|(_, durable)| *durable);
            let writes = jobs.into_iter().map(|(write, _)| write).collect::<Vec<_>>();
            let count = writes.len();
            let outcome = commit_group(&writer_database, writes, durable);
            vec![outcome; count]
        })
        .map_err(|source| StateDbError::Open {
            path: self.path.clone(),
            source: Box::new(source),
        })?;
        let opened = Arc::new(Opened { database, writer });
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

    async fn submit_async(&self, write: StateWrite, durable: bool) -> Result<(), StateDbError> {
        let opened = self.opened()?;
        opened
            .writer
            .submit_async((write, durable))
            .await
            .ok_or_else(|| StateDbError::Write("the state store's writer has stopped".into()))?
            .map_err(StateDbError::Write)
    }

    fn submit(&self, write: StateWrite, durable: bool) -> Result<(), StateDbError> {
        let opened = self.opened()?;
        opened
            .writer
            .submit((write, durable))
            .ok_or_else(|| StateDbError::Write("the state store's writer has stopped".into()))?
            .map_err(StateDbError::Write)
    }
}

fn commit_group(database: &Database, writes: Vec<StateWrite>, durable: bool) -> Result<(), String> {
    let mut transaction = database.begin_write().map_err(|error| error.to_string())?;
    if !durable {
        transaction
            .set_durability(Durability::None)
            .map_err(|error| error.to_string())?;
    }
    for write in writes {
        if let Err(error) = write(&transaction) {
            let _ = transaction.abort();
            return Err(error);
        }
    }
    transaction.commit().map_err(|error| error.to_string())
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
