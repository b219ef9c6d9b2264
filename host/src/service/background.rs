//! What a long-running host does on its own, on time: destroys and bills
//! sandboxes whose ttl passed, retries failed destroys once their backoff
//! has passed, recovers what a crash left, and delivers meter events.
//!
//! Each pass is the same reconcile a command runs at its start (with
//! retries due), so the server and the command line share one set of rules.

use super::Service;
use crate::manager::Retries;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often the server reaps, retries and delivers.
pub const PASS_EVERY: Duration = Duration::from_secs(1);

/// Runs passes until `shutdown` turns true, then one last delivery.
pub async fn run(service: Arc<Service>, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(PASS_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            break;
        }
        pass(&service).await;
    }
    if let Some(warning) = service.deliver().await {
        tracing::warn!("{warning}");
    }
}

/// One pass: reconcile (reap, retry, recover), then deliver events.
pub async fn pass(service: &Arc<Service>) {
    match service.reconcile(Retries::Due).await {
        Ok(report) => {
            for action in &report.actions {
                tracing::info!("{action}");
            }
        }
        Err(error) => tracing::warn!("reconcile failed: {error}"),
    }
    if let Some(warning) = service.deliver().await {
        tracing::warn!("{warning}");
    }
}
