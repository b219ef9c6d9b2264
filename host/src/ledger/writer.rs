//! The single writer: one thread owns every write transaction and commits
//! concurrent callers' operations together ([`GroupWriter`], up to
//! [`MAX_BATCH`] per transaction). Each caller gets its own result. An
//! operation refused by its checks wrote nothing and does not fail its
//! batch-mates; a storage failure abandons the whole transaction and every
//! caller in it gets the error.
//!
//! A batch is made durable by its record in the redo log
//! ([`crate::redo_log`]), synced before the batch's redb commit (which is
//! not durable by itself); when the log is full, and when the ledger
//! closes, the batch commits to redb durably instead and the log starts
//! again.

use super::error::{LedgerError, storage};
use super::store::{ApplyError, Batch, META, RedbTables, WAL_LSN};
use super::types::{Operation, Receipt};
use crate::group_commit::GroupWriter;
use crate::redo_log::{Appended, WriterLog};
use redb::{Database, Durability};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Most operations committed in one transaction.
pub const MAX_BATCH: usize = 1024;

#[derive(Serialize, Deserialize)]
pub(crate) enum Job {
    Apply(Operation),
    /// Gives the default tenant its starting credits if it never had them.
    EnsureDefaultCredits,
}

/// Commits and operations so far, to see how well requests are grouped.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub commits: AtomicU64,
    pub operations: AtomicU64,
    /// Of the commits, those made durable by redb itself (the others by
    /// their redo-log record).
    pub durable_commits: AtomicU64,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// What the redo log keeps of a batch: everything its operations read
/// besides the ledger itself, so that replaying it gives the same result.
#[derive(Serialize)]
struct LoggedBatch<'a> {
    now_ms: u64,
    default_credits: u64,
    jobs: &'a [Job],
}

/// A logged batch, read back.
#[derive(Deserialize)]
pub(crate) struct ReplayedBatch {
    pub now_ms: u64,
    pub default_credits: u64,
    pub jobs: Vec<Job>,
}

/// Where the writer's redo log is, and where it stands.
pub(crate) struct LogPlace {
    pub path: PathBuf,
    pub ledger_id: String,
    /// The lsn of the newest batch redb holds (durably: the ledger was
    /// just opened and replayed).
    pub last_lsn: u64,
}

/// The writer thread's state.
struct Writer {
    database: Arc<Database>,
    log: WriterLog,
    /// The lsn of the newest batch redb holds.
    last_lsn: u64,
    /// Batches committed to redb without durability since its last durable commit.
    undurable: u64,
    /// Set when a batch's fate became unknown (its log record was written
    /// but its redb commit failed, or the log could not be written): no
    /// more writes until the ledger is opened again and replays its log.
    broken: Option<String>,
    default_credits: u64,
    stats: Arc<WriterStats>,
}

/// Starts the ledger's group-commit writer.
pub(crate) fn start(
    database: Arc<Database>,
    place: LogPlace,
    default_credits: u64,
    stats: Arc<WriterStats>,
) -> std::io::Result<GroupWriter<Job, Result<Receipt, LedgerError>>> {
    let mut writer = Writer {
        database,
        log: WriterLog::new(place.path, place.ledger_id, "the ledger"),
        last_lsn: place.last_lsn,
        undurable: 0,
        broken: None,
        default_credits,
        stats,
    };
    GroupWriter::start("ledger-writer", MAX_BATCH, move |jobs: Vec<Job>| {
        let results = writer.commit_batch(&jobs);
        writer.stats.commits.fetch_add(1, Ordering::Relaxed);
        writer
            .stats
            .operations
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        results
    })
}

/// Runs `jobs` as one batch in `write` with the given clock; the results,
/// or the storage failure that must abandon the transaction.
pub(crate) fn apply_batch(
    write: &redb::WriteTransaction,
    jobs: &[Job],
    now_ms: u64,
    default_credits: u64,
) -> Result<Vec<Result<Receipt, LedgerError>>, LedgerError> {
    let (tables, ledger_id, next_seq) = RedbTables::open(write)?;
    let mut tables = Batch::new(tables, ledger_id, next_seq, now_ms, default_credits);
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        match run_job(&mut tables, job) {
            Ok(receipt) => results.push(Ok(receipt)),
            Err(ApplyError::Refused(error)) => results.push(Err(error)),
            Err(ApplyError::Fatal(error)) => return Err(error),
            Err(ApplyError::NotLoaded(row)) => {
                return Err(storage(format!("redb has no row {row:?}")));
            }
        }
    }
    let (tables, next_seq) = tables.into_parts();
    tables.finish(next_seq)?;
    Ok(results)
}

impl Writer {
    fn commit_batch(&mut self, batch: &[Job]) -> Vec<Result<Receipt, LedgerError>> {
        let all_failed = |error: LedgerError| batch.iter().map(|_| Err(error.clone())).collect();
        if let Some(broken) = &self.broken {
            return all_failed(LedgerError::Storage(broken.clone()));
        }
        let mut write = match self.database.begin_write() {
            Ok(write) => write,
            Err(error) => return all_failed(storage(error)),
        };
        let now = now_ms();
        let lsn = self.last_lsn + 1;
        let results = match apply_batch(&write, batch, now, self.default_credits)
            .and_then(|results| set_lsn(&write, lsn).map(|()| results))
        {
            Ok(results) => results,
            Err(error) => {
                let _ = write.abort();
                return all_failed(error);
            }
        };
        let logged = match self.log_batch(lsn, now, batch) {
            Ok(logged) => logged,
            Err(error) => {
                let _ = write.abort();
                // The record may have reached the file (a failed sync says
                // nothing of what was written): the batch may be replayed.
                return self.fail_logged(
                    batch,
                    LedgerError::Storage(format!(
                        "the redo log {} could not be written: {error}",
                        self.log.path().display()
                    )),
                );
            }
        };
        if logged && let Err(error) = write.set_durability(Durability::None) {
            let _ = write.abort();
            return self.fail_logged(batch, storage(error));
        }
        if let Err(error) = write.commit() {
            if logged {
                return self.fail_logged(batch, storage(error));
            }
            return all_failed(storage(error));
        }
        self.last_lsn = lsn;
        if logged {
            self.undurable += 1;
        } else {
            self.undurable = 0;
            self.stats.durable_commits.fetch_add(1, Ordering::Relaxed);
            self.log.rewind();
        }
        results
    }

    /// Appends the batch to the redo log; false when it goes to redb
    /// durably instead (the log is full, or cannot be used here).
    fn log_batch(&mut self, lsn: u64, now_ms: u64, jobs: &[Job]) -> std::io::Result<bool> {
        let default_credits = self.default_credits;
        let payload = || {
            serde_json::to_vec(&LoggedBatch {
                now_ms,
                default_credits,
                jobs,
            })
            .map_err(std::io::Error::other)
        };
        Ok(matches!(
            self.log.append(lsn, payload, true)?,
            Appended::Logged
        ))
    }

    /// A logged batch whose redb commit failed: it will be replayed when
    /// the ledger is opened again, so its outcome is unknown until then.
    fn fail_logged(
        &mut self,
        batch: &[Job],
        error: LedgerError,
    ) -> Vec<Result<Receipt, LedgerError>> {
        let message = format!(
            "the ledger could not finish a batch it may have logged ({error}); its outcome \
             is known when the ledger is opened again (retry with the same key to learn its \
             answer), and no more writes are taken until then"
        );
        tracing::error!("{message}");
        self.broken = Some(message.clone());
        batch
            .iter()
            .map(|_| Err(LedgerError::Storage(message.clone())))
            .collect()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.undurable > 0 && self.broken.is_none() {
            crate::redo_log::closing_commit(&self.database, "the ledger");
        }
    }
}

/// Records in `write` that redb holds the batches up to `lsn`.
pub(crate) fn set_lsn(write: &redb::WriteTransaction, lsn: u64) -> Result<(), LedgerError> {
    write
        .open_table(META)
        .map_err(storage)?
        .insert(WAL_LSN, lsn)
        .map_err(storage)?;
    Ok(())
}

/// Runs one job of a batch over its tables.
pub(crate) fn run_job<T: super::store::Tables>(
    batch: &mut Batch<T>,
    job: &Job,
) -> Result<Receipt, ApplyError> {
    match job {
        Job::Apply(operation) => batch.apply(operation),
        Job::EnsureDefaultCredits => batch
            .ensure_default()
            .map(|()| Receipt::Expired { holds: Vec::new() }),
    }
}
