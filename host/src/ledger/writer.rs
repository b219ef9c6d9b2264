//! The single writer: one thread owns every write transaction and commits
//! concurrent callers' operations together.
//!
//! A durable commit costs an fsync (milliseconds here), whatever it carries.
//! While one commit is in flight new requests queue up; the writer then
//! takes all of them (up to [`MAX_BATCH`]) into the next transaction. Each
//! caller gets its own result. An operation refused by its checks wrote
//! nothing and does not fail its batch-mates; a storage failure abandons the
//! whole transaction and every caller in it gets the error.

use super::error::{LedgerError, storage};
use super::store::{ApplyError, Batch};
use super::types::{Operation, Receipt};
use redb::Database;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::time::{SystemTime, UNIX_EPOCH};

/// Most operations committed in one transaction.
pub const MAX_BATCH: usize = 1024;

pub(crate) enum Job {
    Apply(Operation),
    /// Gives the default tenant its starting credits if it never had them.
    EnsureDefaultCredits,
}

pub(crate) struct Request {
    pub job: Job,
    pub reply: Sender<Result<Receipt, LedgerError>>,
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

pub(crate) fn run(
    database: Arc<Database>,
    requests: Receiver<Request>,
    default_credits: u64,
    stats: Arc<WriterStats>,
) {
    while let Ok(first) = requests.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let results = commit_batch(&database, &batch, default_credits);
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats
            .operations
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        for (request, result) in batch.into_iter().zip(results) {
            // A caller that gave up waiting is not the ledger's problem.
            let _ = request.reply.send(result);
        }
    }
}

fn commit_batch(
    database: &Database,
    batch: &[Request],
    default_credits: u64,
) -> Vec<Result<Receipt, LedgerError>> {
    let all_failed = |error: LedgerError| batch.iter().map(|_| Err(error.clone())).collect();
    let write = match database.begin_write() {
        Ok(write) => write,
        Err(error) => return all_failed(storage(error)),
    };
    let mut results = Vec::with_capacity(batch.len());
    {
        let mut tables = match Batch::open(&write, now_ms(), default_credits) {
            Ok(tables) => tables,
            Err(error) => return all_failed(error),
        };
        for request in batch {
            let outcome = match &request.job {
                Job::Apply(operation) => tables.apply(operation),
                Job::EnsureDefaultCredits => tables
                    .ensure_default()
                    .map(|()| Receipt::Expired { holds: Vec::new() }),
            };
            match outcome {
                Ok(receipt) => results.push(Ok(receipt)),
                Err(ApplyError::Refused(error)) => results.push(Err(error)),
                Err(ApplyError::Fatal(error)) => {
                    drop(tables);
                    let _ = write.abort();
                    return all_failed(error);
                }
            }
        }
        if let Err(error) = tables.finish() {
            return all_failed(error);
        }
    }
    match write.commit() {
        Ok(()) => results,
        Err(error) => all_failed(storage(error)),
    }
}
