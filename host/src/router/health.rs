//! What routing remembers about each instance, in the host's state store so
//! it survives restarts: a circuit breaker and a moving average of the time
//! to ready.
//!
//! Breaker: after [`FAILURE_THRESHOLD`] consecutive retryable failures an
//! instance is *open* (cooling down) for [`BASE_COOLDOWN_MS`], doubling with
//! each reopening up to [`MAX_COOLDOWN_MS`]. When the cooldown has passed it
//! is *half-open*: eligible again, as a probe. A success closes it and
//! forgets the failures; a failed probe opens it again for twice as long.

use crate::state_db::{StateDb, StateDbError};
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::Serialize;
use std::sync::Arc;

pub const FAILURE_THRESHOLD: u32 = 3;
pub const BASE_COOLDOWN_MS: u64 = 5_000;
pub const MAX_COOLDOWN_MS: u64 = 300_000;
/// Weight of a new latency sample in the moving average, in fifths.
const NEW_SAMPLE_FIFTHS: u64 = 1;
/// Assumed time to ready of an instance with no samples and no sidecar hint:
/// zero, so a new instance is tried at least once rather than starved.
pub const DEFAULT_EXPECTED_LATENCY_MS: u64 = 0;

/// instance -> (consecutive failures, times opened, open until ms)
const BREAKERS: TableDefinition<&str, (u32, u32, u64)> = TableDefinition::new("routing_breakers");
/// instance -> (moving average ms, samples)
const LATENCY: TableDefinition<&str, (u64, u64)> = TableDefinition::new("routing_latency");

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Breaker {
    pub consecutive_failures: u32,
    pub opens: u32,
    pub open_until_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum BreakerState {
    Closed,
    /// Cooling down: not eligible until `until_ms`.
    Open {
        until_ms: u64,
    },
    /// Cooled down: eligible, and its next outcome decides.
    HalfOpen,
}

impl Breaker {
    pub fn state(&self, now_ms: u64) -> BreakerState {
        if self.opens == 0 {
            BreakerState::Closed
        } else if now_ms < self.open_until_ms {
            BreakerState::Open {
                until_ms: self.open_until_ms,
            }
        } else {
            BreakerState::HalfOpen
        }
    }

    pub fn record_failure(&mut self, now_ms: u64) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        match self.state(now_ms) {
            BreakerState::Closed if self.consecutive_failures >= FAILURE_THRESHOLD => {
                self.open(now_ms)
            }
            BreakerState::HalfOpen => self.open(now_ms),
            _ => {}
        }
    }

    pub fn record_success(&mut self) {
        *self = Self::default();
    }

    fn open(&mut self, now_ms: u64) {
        self.opens = self.opens.saturating_add(1);
        let doublings = self.opens.saturating_sub(1).min(16);
        let cooldown = BASE_COOLDOWN_MS
            .saturating_mul(1 << doublings)
            .min(MAX_COOLDOWN_MS);
        self.open_until_ms = now_ms.saturating_add(cooldown);
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    pub average_ms: u64,
    pub samples: u64,
}

impl Latency {
    pub fn record(&mut self, sample_ms: u64) {
        self.average_ms = if self.samples == 0 {
            sample_ms
        } else {
            (self.average_ms * (5 - NEW_SAMPLE_FIFTHS) + sample_ms * NEW_SAMPLE_FIFTHS + 2) / 5
        };
        self.samples = self.samples.saturating_add(1);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error(transparent)]
    State(#[from] StateDbError),
    #[error("routing statistics: {0}")]
    Storage(String),
}

fn storage(error: impl std::fmt::Display) -> HealthError {
    HealthError::Storage(error.to_string())
}

/// Breakers and latency averages of every instance.
#[derive(Debug, Clone)]
pub struct RouteHealth {
    state: Arc<StateDb>,
}

impl RouteHealth {
    pub fn new(state: Arc<StateDb>) -> Self {
        Self { state }
    }

    /// The breaker and latency of each instance, read in one transaction.
    pub fn read(&self, instances: &[String]) -> Result<Vec<(Breaker, Latency)>, HealthError> {
        let database = self.state.database()?;
        let read = database.begin_read().map_err(storage)?;
        let breakers = match read.open_table(BREAKERS) {
            Ok(table) => Some(table),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(error) => return Err(storage(error)),
        };
        let latencies = match read.open_table(LATENCY) {
            Ok(table) => Some(table),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(error) => return Err(storage(error)),
        };
        let mut health = Vec::with_capacity(instances.len());
        for instance in instances {
            let breaker = match &breakers {
                Some(table) => table
                    .get(instance.as_str())
                    .map_err(storage)?
                    .map(|row| row.value()),
                None => None,
            };
            let latency = match &latencies {
                Some(table) => table
                    .get(instance.as_str())
                    .map_err(storage)?
                    .map(|row| row.value()),
                None => None,
            };
            health.push((
                breaker.map_or_else(
                    Breaker::default,
                    |(consecutive_failures, opens, open_until_ms)| Breaker {
                        consecutive_failures,
                        opens,
                        open_until_ms,
                    },
                ),
                latency.map_or_else(Latency::default, |(average_ms, samples)| Latency {
                    average_ms,
                    samples,
                }),
            ));
        }
        Ok(health)
    }

    /// Records the outcome of a call that counts for the breaker: a
    /// retryable failure, or a success.
    pub async fn record_outcome(
        &self,
        instance: &str,
        success: bool,
        now_ms: u64,
    ) -> Result<(), HealthError> {
        let instance = instance.to_string();
        self.state
            .write_async(move |write| apply_outcome(write, &instance, success, now_ms))
            .await?;
        Ok(())
    }

    /// Adds one measured time to ready (create call until ready).
    pub async fn record_latency(&self, instance: &str, sample_ms: u64) -> Result<(), HealthError> {
        let instance = instance.to_string();
        self.state
            .write_async(move |write| apply_latency(write, &instance, sample_ms))
            .await?;
        Ok(())
    }
}

/// [`RouteHealth::record_outcome`] inside a caller's transaction.
pub fn apply_outcome(
    write: &WriteTransaction,
    instance: &str,
    success: bool,
    now_ms: u64,
) -> Result<(), String> {
    let mut table = write
        .open_table(BREAKERS)
        .map_err(|error| error.to_string())?;
    let stored = table
        .get(instance)
        .map_err(|error| error.to_string())?
        .map(|row| {
            let (consecutive_failures, opens, open_until_ms) = row.value();
            Breaker {
                consecutive_failures,
                opens,
                open_until_ms,
            }
        });
    let mut breaker = stored.unwrap_or_default();
    if success {
        breaker.record_success();
    } else {
        breaker.record_failure(now_ms);
    }
    // A closed breaker staying closed (every create that succeeds on a
    // healthy instance): nothing to write, and the commit stays smaller.
    if stored.unwrap_or_default() == breaker {
        return Ok(());
    }
    table
        .insert(
            instance,
            (
                breaker.consecutive_failures,
                breaker.opens,
                breaker.open_until_ms,
            ),
        )
        .map_err(|error| error.to_string())?;
    Ok(())
}

/// [`RouteHealth::record_latency`] inside a caller's transaction.
pub fn apply_latency(
    write: &WriteTransaction,
    instance: &str,
    sample_ms: u64,
) -> Result<(), String> {
    let mut table = write
        .open_table(LATENCY)
        .map_err(|error| error.to_string())?;
    let mut latency = table
        .get(instance)
        .map_err(|error| error.to_string())?
        .map_or_else(Latency::default, |row| {
            let (average_ms, samples) = row.value();
            Latency {
                average_ms,
                samples,
            }
        });
    latency.record(sample_ms);
    table
        .insert(instance, (latency.average_ms, latency.samples))
        .map_err(|error| error.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_consecutive_failures_then_probes() {
        let mut breaker = Breaker::default();
        for _ in 0..FAILURE_THRESHOLD - 1 {
            breaker.record_failure(1_000);
            assert_eq!(breaker.state(1_000), BreakerState::Closed);
        }
        breaker.record_failure(1_000);
        assert_eq!(
            breaker.state(1_000),
            BreakerState::Open {
                until_ms: 1_000 + BASE_COOLDOWN_MS
            }
        );
        assert_eq!(
            breaker.state(1_000 + BASE_COOLDOWN_MS),
            BreakerState::HalfOpen,
            "cooled down: one probe"
        );

        // A failed probe doubles the cooldown.
        let probe_time = 1_000 + BASE_COOLDOWN_MS;
        breaker.record_failure(probe_time);
        assert_eq!(
            breaker.state(probe_time),
            BreakerState::Open {
                until_ms: probe_time + 2 * BASE_COOLDOWN_MS
            }
        );

        // A successful probe closes it and forgets.
        breaker.record_success();
        assert_eq!(breaker, Breaker::default());
        assert_eq!(breaker.state(probe_time), BreakerState::Closed);
    }

    #[test]
    fn a_success_between_failures_resets_the_count() {
        let mut breaker = Breaker::default();
        breaker.record_failure(0);
        breaker.record_failure(0);
        breaker.record_success();
        breaker.record_failure(0);
        assert_eq!(breaker.state(0), BreakerState::Closed);
    }

    #[test]
    fn the_cooldown_doubles_up_to_its_cap() {
        let mut breaker = Breaker::default();
        let mut now = 0;
        let mut cooldowns = Vec::new();
        for _ in 0..FAILURE_THRESHOLD {
            breaker.record_failure(now);
        }
        for _ in 0..10 {
            cooldowns.push(breaker.open_until_ms - now);
            now = breaker.open_until_ms;
            breaker.record_failure(now); // the probe fails
        }
        assert_eq!(&cooldowns[..4], [5_000, 10_000, 20_000, 40_000]);
        assert_eq!(*cooldowns.last().unwrap(), MAX_COOLDOWN_MS);
    }

    #[test]
    fn latency_is_a_moving_average_starting_at_the_first_sample() {
        let mut latency = Latency::default();
        latency.record(1000);
        assert_eq!(latency.average_ms, 1000);
        latency.record(0);
        assert_eq!(latency.average_ms, 800);
        assert_eq!(latency.samples, 2);
    }

    #[tokio::test]
    async fn health_survives_reopening_the_state_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let health = RouteHealth::new(Arc::new(StateDb::new(path.clone())));
            for _ in 0..FAILURE_THRESHOLD {
                health.record_outcome("flaky", false, 10).await.unwrap();
            }
            health.record_latency("fast", 120).await.unwrap();
        }
        let health = RouteHealth::new(Arc::new(StateDb::new(path)));
        let names = [
            "flaky".to_string(),
            "fast".to_string(),
            "unknown".to_string(),
        ];
        let read = health.read(&names).unwrap();
        assert!(matches!(read[0].0.state(11), BreakerState::Open { .. }));
        assert_eq!(
            read[1].1,
            Latency {
                average_ms: 120,
                samples: 1
            }
        );
        assert_eq!(read[2], (Breaker::default(), Latency::default()));
    }
}
