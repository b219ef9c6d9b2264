//! The ledger's group commit: concurrent callers' operations are committed
//! together, up to [`MAX_BATCH`] per transaction. Each caller gets its own
//! result. An operation refused by its checks wrote nothing and does not
//! fail its batch-mates; a storage failure abandons the whole transaction
//! and every caller in it gets the error.
//!
//! There is no writer thread: the caller that finds no commit in progress
//! becomes the **leader** and commits on its own thread every operation
//! queued by then (its own first); callers arriving meanwhile queue and
//! sleep. When its commit is done the leader wakes each of its batch-mates
//! with its result and hands the lead to the oldest queued caller, whose
//! operation then heads the next batch. A lone caller so never waits for a
//! thread to wake up (two handoffs per operation with a writer thread),
//! while 64 callers still share commits as before. Durability is unchanged:
//! a result is handed out only after the commit that carried it returned.

use super::error::{LedgerError, storage};
use super::store::{ApplyError, Batch};
use super::types::{Operation, Receipt};
use redb::Database;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
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

type Outcome = Result<Receipt, LedgerError>;

/// What a queued caller is woken with.
enum Wakeup {
    /// Its operation was committed (or refused, or failed with its batch).
    Done(Outcome),
    /// Its operation heads the queue and nobody is committing: commit it.
    Lead,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<(Job, Sender<Wakeup>)>,
    /// Whether a leader is committing (or has been handed the lead).
    leading: bool,
}

/// The ledger's writer: one write transaction at a time, shared by every
/// operation queued while the previous one committed.
pub(crate) struct LedgerWriter {
    database: Arc<Database>,
    default_credits: u64,
    stats: Arc<WriterStats>,
    queue: Mutex<Queue>,
}

/// Starts the ledger's group-commit writer.
pub(crate) fn start(
    database: Arc<Database>,
    default_credits: u64,
    stats: Arc<WriterStats>,
) -> std::io::Result<LedgerWriter> {
    Ok(LedgerWriter {
        database,
        default_credits,
        stats,
        queue: Mutex::new(Queue::default()),
    })
}

impl LedgerWriter {
    /// Applies `job` durably, alone or with the operations queued beside
    /// it, and returns its result (always some: kept for the shape of a
    /// writer that can stop).
    pub fn submit(&self, job: Job) -> Option<Outcome> {
        let (wake, wakeup) = mpsc::channel();
        let lead = {
            let mut queue = self.lock();
            queue.waiting.push_back((job, wake));
            !std::mem::replace(&mut queue.leading, true)
        };
        if !lead {
            match wakeup.recv().ok()? {
                Wakeup::Done(outcome) => return Some(outcome),
                Wakeup::Lead => {}
            }
        }
        self.lead();
        match wakeup.recv().ok()? {
            Wakeup::Done(outcome) => Some(outcome),
            Wakeup::Lead => unreachable!("the lead is handed only to a queued caller"),
        }
    }

    /// Commits one batch from the head of the queue (the leader's own
    /// operation among them), answers it, and hands the lead on.
    fn lead(&self) {
        let batch: Vec<(Job, Sender<Wakeup>)> = {
            let mut queue = self.lock();
            let take = queue.waiting.len().min(MAX_BATCH);
            queue.waiting.drain(..take).collect()
        };
        let (jobs, replies): (Vec<Job>, Vec<Sender<Wakeup>>) = batch.into_iter().unzip();
        let outcomes = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            commit_batch(&self.database, &jobs, self.default_credits)
        }))
        .unwrap_or_else(|_| {
            jobs.iter()
                .map(|_| Err(storage("the ledger's commit panicked")))
                .collect()
        });
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.stats
            .operations
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        debug_assert_eq!(outcomes.len(), replies.len(), "one result per job");
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            // A caller that stopped waiting is not the writer's problem.
            let _ = reply.send(Wakeup::Done(outcome));
        }
        let mut queue = self.lock();
        loop {
            let Some((_, next)) = queue.waiting.front() else {
                queue.leading = false;
                return;
            };
            if next.send(Wakeup::Lead).is_ok() {
                return;
            }
            // Its caller is gone (it cannot be: callers wait): drop the job.
            queue.waiting.pop_front();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
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
        let mut tables = match Batch::open(&write, now_ms(), default_credits) {
            Ok(tables) => tables,
            Err(error) => return all_failed(error),
        };
        for request in batch {
            let outcome = match request {
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
