//! How each instance's calls ended, counted as they end: what `/metrics`
//! reports as extension calls, errors and timeouts. Counting only; the
//! runtime gives the numbers to whoever asks and knows nothing of exporters.

use super::error::CallError;
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct CallStats {
    /// (function, outcome) -> calls.
    counts: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

/// The outcome name of a call that failed.
pub fn outcome(error: &CallError) -> &'static str {
    match error {
        CallError::Backend { .. } => "backend-error",
        CallError::Timeout { .. } => "timeout",
        CallError::OutOfFuel { .. } => "out-of-fuel",
        CallError::MemoryLimit { .. } => "memory-limit",
        CallError::Trap { .. } => "trap",
        CallError::OutputTooLarge { .. } | CallError::TooMuchData { .. } => "too-much-data",
        _ => "host-error",
    }
}

impl CallStats {
    pub fn record(&self, function: &'static str, outcome: &'static str) {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *counts.entry((function, outcome)).or_default() += 1;
    }

    /// Every (function, outcome, calls) so far.
    pub fn snapshot(&self) -> Vec<(&'static str, &'static str, u64)> {
        self.counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .map(|((function, outcome), count)| (*function, *outcome, *count))
            .collect()
    }
}
