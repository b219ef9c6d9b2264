//! The single writer: one thread owns every write transaction and commits
//! concurrent callers' operations together ([`GroupWriter`], up to
//! [`MAX_BATCH`] per transaction). Each caller gets its own result. An
//! operation refused by its checks wrote nothing and does not fail its
//! batch-mates; a storage failure abandons the whole transaction and every
//! caller in it gets the error.

use super::error::{LedgerError, storage};
use super::store::{ApplyError, Batch, RedbTables};
use super::types::{Operation, Receipt};
use crate::group_commit::GroupWriter;
use redb::Database;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Most operations committed in one transaction.
pub const MAX_BATCH: usize = 1024;

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
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// Starts the ledger's group-commit writer.
pub(crate) fn start(
    database: Arc<Database>,
    default_credits: u64,
    stats: Arc<WriterStats>,
) -> std::io::Result<GroupWriter<Job, Result<Receipt, LedgerError>>> {
    GroupWriter::start("ledger-writer", MAX_BATCH, move |jobs: Vec<Job>| {
        let results = commit_batch(&database, &jobs, default_credits);
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats
            .operations
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        results
    })
}

fn commit_batch(
    database: &Database,
    batch: &[Job],
    default_credits: u64,
) -> Vec<Result<Receipt, LedgerError>> {
    let all_failed = |error: LedgerError| batch.iter().map(|_| Err(error.clone())).collect();
    let write = match database.begin_write() {
        Ok(write) => write,
        Err(error) => return all_failed(storage(error)),
    };
    let mut results = Vec::with_capacity(batch.len());
    {
        let (tables, ledger_id, next_seq) = match RedbTables::open(&write) {
            Ok(opened) => opened,
            Err(error) => return all_failed(error),
        };
        let mut tables = Batch::new(tables, ledger_id, next_seq, now_ms(), default_credits);
        for request in batch {
            match run_job(&mut tables, request) {
                Ok(receipt) => results.push(Ok(receipt)),
                Err(ApplyError::Refused(error)) => results.push(Err(error)),
                Err(ApplyError::Fatal(error)) => {
                    drop(tables);
                    let _ = write.abort();
                    return all_failed(error);
                }
                Err(ApplyError::NotLoaded(row)) => {
                    drop(tables);
                    let _ = write.abort();
                    return all_failed(storage(format!("redb has no row {row:?}")));
                }
            }
        }
        let (tables, next_seq) = tables.into_parts();
        if let Err(error) = tables.finish(next_seq) {
            return all_failed(error);
        }
    }
    match write.commit() {
        Ok(()) => results,
        Err(error) => all_failed(storage(error)),
    }
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
