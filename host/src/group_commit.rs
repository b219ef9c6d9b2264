//! Group commit: one writer thread takes every job waiting for it and
//! commits them together.
//!
//! A durable commit costs an fsync whatever it carries. While one commit is
//! in flight new jobs queue up; the writer then takes all of them (up to a
//! maximum) into the next one. Each submitter gets its own result. The
//! ledger and the state store each run one.

use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;

/// Where a job's result goes: a thread blocked on it, or a task awaiting it.
enum Reply<R> {
    Blocking(Sender<R>),
    Awaiting(tokio::sync::oneshot::Sender<R>),
}

impl<R> Reply<R> {
    fn send(self, result: R) {
        // A submitter that stopped waiting is not the writer's problem.
        let _ = match self {
            Self::Blocking(reply) => reply.send(result).map_err(|_| ()),
            Self::Awaiting(reply) => reply.send(result).map_err(|_| ()),
        };
    }
}

type Envelope<J, R> = (J, Reply<R>);

pub struct GroupWriter<J: Send + 'static, R: Send + 'static> {
    jobs: Option<Sender<Envelope<J, R>>>,
    thread: Option<JoinHandle<()>>,
}

impl<J: Send + 'static, R: Send + 'static> GroupWriter<J, R> {
    /// Starts the writer thread. `commit` gets each group of jobs, in the
    /// order they were submitted, and returns one result per job.
    pub fn start(
        name: &str,
        max_group: usize,
        mut commit: impl FnMut(Vec<J>) -> Vec<R> + Send + 'static,
    ) -> std::io::Result<Self> {
        let (jobs, receiver) = mpsc::channel::<Envelope<J, R>>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while let Ok(first) = receiver.recv() {
                    let mut group = vec![first];
                    while group.len() < max_group {
                        match receiver.try_recv() {
                            Ok(job) => group.push(job),
                            Err(_) => break,
                        }
                    }
                    let (jobs, replies): (Vec<J>, Vec<Reply<R>>) = group.into_iter().unzip();
                    let results = commit(jobs);
                    debug_assert_eq!(results.len(), replies.len(), "one result per job");
                    for (reply, result) in replies.into_iter().zip(results) {
                        reply.send(result);
                    }
                }
            })?;
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Submits a job and blocks the thread until its result; none when the
    /// writer has stopped. Not for async tasks: use [`GroupWriter::submit_async`].
    pub fn submit(&self, job: J) -> Option<R> {
        let (reply, answer) = mpsc::channel();
        self.jobs
            .as_ref()?
            .send((job, Reply::Blocking(reply)))
            .ok()?;
        answer.recv().ok()
    }

    /// Submits a job and awaits its result without blocking the executor's
    /// thread: while one commit is on the disk, the tasks of other requests
    /// run and queue their jobs for the next.
    pub async fn submit_async(&self, job: J) -> Option<R> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.jobs
            .as_ref()?
            .send((job, Reply::Awaiting(reply)))
            .ok()?;
        answer.await.ok()
    }
}

impl<J: Send + 'static, R: Send + 'static> Drop for GroupWriter<J, R> {
    fn drop(&mut self) {
        // Closing the channel ends the writer once its group is committed.
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn concurrent_jobs_share_groups_and_each_gets_its_result() {
        let groups = Arc::new(AtomicUsize::new(0));
        let counted = groups.clone();
        let writer = Arc::new(
            GroupWriter::start("test-writer", 64, move |jobs: Vec<u64>| {
                counted.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(2));
                jobs.into_iter().map(|job| job * 10).collect()
            })
            .unwrap(),
        );
        std::thread::scope(|scope| {
            for thread in 0..16u64 {
                let writer = writer.clone();
                scope.spawn(move || {
                    for index in 0..10 {
                        let job = thread * 100 + index;
                        assert_eq!(writer.submit(job), Some(job * 10));
                    }
                });
            }
        });
        assert!(groups.load(Ordering::Relaxed) < 160, "jobs were grouped");
    }
}
