//! Estimates remembered between routing decisions.
//!
//! A decision asks every candidate for an estimate; through a fresh
//! instance each costs tens of microseconds, so 16 candidates cost more than
//! the rest of the decision many times over. An estimate prices a spec, not
//! a sandbox: it is meant to be a function of the spec, the instance's
//! sidecar config and its component (docs/routing.md states the rule). So
//! an answer is kept for [`ESTIMATE_TTL`] and reused for the same instance
//! and the same spec.
//!
//! What keeps one tenant's data out of another's answer: the key covers
//! everything the extension could see. The instance part is its name (which
//! also names its key-value store), its component's sha256 and its config;
//! the spec part is every field of the spec. The one field that differs
//! between two sandboxes of the same request, the sandbox id, is not keyed
//! but stripped: estimate calls see [`ESTIMATE_SANDBOX_ID`] instead, so no
//! answer can depend on another sandbox's id. Only a digest of the key is
//! kept, never the spec's values (env may hold secrets). Failures are never
//! kept: they feed fallback and breakers and may be passing.

use super::EstimateJob;
use crate::runtime::{CallError, CostEstimate, Extension, SandboxSpec};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an estimate is reused. Short enough that a backend whose
/// prices move (by time of day, or read from its provider) is asked again
/// within seconds; long enough that a burst of creates asks once.
pub const ESTIMATE_TTL: Duration = Duration::from_secs(10);

/// The sandbox id every estimate call sees (as `ext estimate` does).
pub const ESTIMATE_SANDBOX_ID: &str = "estimate-only";

/// Most estimates kept; past it, expired ones go, and then all of them.
const MAX_ENTRIES: usize = 4096;

type KeyDigest = [u8; 32];

#[derive(Default)]
struct EstimateCache {
    entries: Mutex<HashMap<KeyDigest, (Instant, CostEstimate)>>,
}

/// One process's estimates: a host has one extension set at a time, and a
/// reloaded instance with the same name, component and config is the same
/// function.
fn cache() -> &'static EstimateCache {
    static CACHE: OnceLock<EstimateCache> = OnceLock::new();
    CACHE.get_or_init(EstimateCache::default)
}

/// One decision's estimates: those answered from the cache, and the jobs
/// still to run (with the spec to run them on).
pub struct EstimateLookup {
    answered: Vec<(usize, Result<CostEstimate, CallError>)>,
    misses: Vec<EstimateJob>,
    miss_keys: Vec<KeyDigest>,
    spec: SandboxSpec,
}

impl EstimateLookup {
    /// Looks every job up for `spec` (its sandbox id stripped).
    pub fn new(jobs: &[EstimateJob], spec: &SandboxSpec) -> Self {
        let spec = SandboxSpec {
            sandbox_id: ESTIMATE_SANDBOX_ID.into(),
            ..spec.clone()
        };
        let spec_digest = spec_digest(&spec);
        let now = Instant::now();
        let mut answered = Vec::with_capacity(jobs.len());
        let mut misses = Vec::new();
        let mut miss_keys = Vec::new();
        {
            let entries = cache()
                .entries
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for (index, extension) in jobs {
                let key = key_digest(extension, &spec_digest);
                match entries.get(&key) {
                    Some((stored, estimate)) if now.duration_since(*stored) < ESTIMATE_TTL => {
                        answered.push((*index, Ok(*estimate)))
                    }
                    _ => {
                        misses.push((*index, extension.clone()));
                        miss_keys.push(key);
                    }
                }
            }
        }
        Self {
            answered,
            misses,
            miss_keys,
            spec,
        }
    }

    /// The jobs the cache could not answer.
    pub fn misses(&self) -> &[EstimateJob] {
        &self.misses
    }

    /// The spec to ask them with: the decision's, without its sandbox id.
    pub fn spec(&self) -> &SandboxSpec {
        &self.spec
    }

    /// Every job's outcome: the cached ones and `fresh`, the misses' own
    /// (by candidate index), whose successes are kept for next time.
    pub fn finish(
        self,
        fresh: Vec<(usize, Result<CostEstimate, CallError>)>,
    ) -> Vec<(usize, Result<CostEstimate, CallError>)> {
        let now = Instant::now();
        {
            let mut entries = cache()
                .entries
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for (index, outcome) in &fresh {
                let Ok(estimate) = outcome else { continue };
                let Some(position) = self.misses.iter().position(|(job, _)| job == index) else {
                    continue;
                };
                if entries.len() >= MAX_ENTRIES {
                    entries.retain(|_, (stored, _)| now.duration_since(*stored) < ESTIMATE_TTL);
                    if entries.len() >= MAX_ENTRIES {
                        entries.clear();
                    }
                }
                entries.insert(self.miss_keys[position], (now, *estimate));
            }
        }
        let mut outcomes = self.answered;
        outcomes.extend(fresh);
        outcomes
    }
}

/// The digest of every field of `spec`, each length-prefixed so no two
/// specs encode alike.
fn spec_digest(spec: &SandboxSpec) -> KeyDigest {
    let mut hasher = Sha256::new();
    let mut text = |value: &str| {
        hasher.update((value.len() as u64).to_le_bytes());
        hasher.update(value.as_bytes());
    };
    text(&spec.sandbox_id);
    text(&spec.profile);
    text(&spec.template);
    text(&spec.cpu_millis.to_string());
    text(&spec.memory_mb.to_string());
    text(&spec.ttl_secs.to_string());
    text(&spec.command.len().to_string());
    for argument in &spec.command {
        text(argument);
    }
    text(&spec.env.len().to_string());
    for (name, value) in &spec.env {
        text(name);
        text(value);
    }
    text(if spec.network {
        "network"
    } else {
        "no network"
    });
    hasher.finalize().into()
}

/// The digest of an instance (name, component, config) and a spec digest.
fn key_digest(extension: &Extension, spec_digest: &KeyDigest) -> KeyDigest {
    let mut hasher = Sha256::new();
    let mut text = |value: &str| {
        hasher.update((value.len() as u64).to_le_bytes());
        hasher.update(value.as_bytes());
    };
    text(&extension.name);
    text(&extension.content_sha256);
    text(&extension.config.len().to_string());
    for (key, value) in &extension.config {
        text(key);
        text(value);
    }
    hasher.update(spec_digest);
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SandboxSpec {
        SandboxSpec {
            sandbox_id: "sbx-a".into(),
            profile: "p".into(),
            template: "base".into(),
            cpu_millis: 1000,
            memory_mb: 1024,
            ttl_secs: 60,
            command: vec!["a".into(), "b".into()],
            env: vec![("TOKEN".into(), "tenant-a-secret".into())],
            network: false,
        }
    }

    #[test]
    fn every_field_but_the_stripped_id_changes_the_key() {
        let base = spec_digest(&spec());
        let changes: [fn(&mut SandboxSpec); 9] = [
            |spec| spec.profile = "q".into(),
            |spec| spec.template = "gpu".into(),
            |spec| spec.cpu_millis = 2000,
            |spec| spec.memory_mb = 2048,
            |spec| spec.ttl_secs = 61,
            |spec| spec.command = vec!["ab".into()],
            |spec| spec.env[0].1 = "tenant-b-secret".into(),
            |spec| spec.env.clear(),
            |spec| spec.network = true,
        ];
        for change in changes {
            let mut changed = spec();
            change(&mut changed);
            assert_ne!(spec_digest(&changed), base, "{changed:?}");
        }
    }
}
