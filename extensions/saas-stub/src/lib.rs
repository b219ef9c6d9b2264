//! saas-stub: a metered SaaS backend with no external API.
//!
//! It behaves like a hosted sandbox provider that bills per second from a rate
//! card, without calling one: `create` hands out a reference and remembers
//! when it started (in the host's key-value store, so it survives fresh
//! instances and host restarts), `destroy` reports the wall time since then,
//! and `meter-actual` prices that time, rounded up to whole seconds and
//! capped at the ttl (where a provider would stop the sandbox), at the card
//! used for the estimate.
//!
//! Rate card, from the sidecar's `[config]` table (decimal credits):
//! - `rate_per_vcpu_hour`, default 0.0504 per vCPU-hour;
//! - `rate_per_gib_hour`, default 0.0162 per GiB-hour.
//!
//! The defaults follow the per-second list prices hosted sandbox providers
//! publish (about 0.000014 per vCPU-second and 0.0000045 per GiB-second).

use sandboxer_sdk::*;
use std::hash::{BuildHasher, Hasher};
use std::time::{SystemTime, UNIX_EPOCH};

/// 0.0504 credits per vCPU-hour.
const DEFAULT_RATE_PER_VCPU_HOUR: MicroCredits = 50_400;
/// 0.0162 credits per GiB-hour.
const DEFAULT_RATE_PER_GIB_HOUR: MicroCredits = 16_200;

struct SaasStub;

fn rate_card() -> Result<pricing::RateCard, ExtError> {
    pricing::RateCard::from_config(DEFAULT_RATE_PER_VCPU_HOUR, DEFAULT_RATE_PER_GIB_HOUR)
}

fn validate(spec: &SandboxSpec) -> Result<(), ExtError> {
    if spec.cpu_millis == 0 || spec.memory_mb == 0 {
        return Err(ExtError::InvalidSpec(format!(
            "cpu_millis and memory_mb must be above zero (got {} and {})",
            spec.cpu_millis, spec.memory_mb
        )));
    }
    if spec.ttl_secs == 0 {
        return Err(ExtError::InvalidSpec("ttl_secs must be above zero".into()));
    }
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

fn new_backend_ref() -> String {
    // RandomState is seeded from wasi:random, which the host always provides.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("stub-{random:016x}")
}

fn ref_key(sandbox_id: &str) -> String {
    format!("ref/{sandbox_id}")
}

fn started_key(backend_ref: &str) -> String {
    format!("started/{backend_ref}")
}

fn store(key: &str, value: &str) -> Result<(), ExtError> {
    kv::set_str(key, value).map_err(|error| ExtError::Internal(format!("kv {key}: {error}")))
}

impl Backend for SaasStub {
    fn info() -> ExtensionInfo {
        ExtensionInfo {
            id: "saas-stub".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: BackendKind::Saas,
            description: "Metered SaaS stub: per-second billing from a rate card, no external API"
                .into(),
        }
    }

    fn estimate_cost(spec: SandboxSpec) -> Result<CostEstimate, ExtError> {
        validate(&spec)?;
        rate_card()?.estimate(&spec)
    }

    fn create(spec: SandboxSpec) -> Result<SandboxHandle, ExtError> {
        validate(&spec)?;
        // Idempotent by sandbox id: a retried create gets the first handle.
        if let Some(backend_ref) = kv::get_str(&ref_key(&spec.sandbox_id)) {
            return Ok(SandboxHandle {
                backend_ref,
                endpoint: None,
            });
        }
        let backend_ref = new_backend_ref();
        store(&started_key(&backend_ref), &now_ms().to_string())?;
        store(&ref_key(&spec.sandbox_id), &backend_ref)?;
        log::info(&format!(
            "created {backend_ref} for sandbox {}",
            spec.sandbox_id
        ));
        Ok(SandboxHandle {
            backend_ref,
            endpoint: None,
        })
    }

    fn destroy(spec: SandboxSpec, handle: SandboxHandle) -> Result<Usage, ExtError> {
        let key = started_key(&handle.backend_ref);
        let started_ms = kv::get_str(&key)
            .and_then(|text| text.parse::<u64>().ok())
            .ok_or_else(|| ExtError::NotFound(format!("no sandbox {}", handle.backend_ref)))?;
        kv::delete(&key);
        kv::delete(&ref_key(&spec.sandbox_id));
        Ok(Usage {
            wall_ms: now_ms().saturating_sub(started_ms),
            cpu_ms: 0,
            memory_mb_ms: 0,
            egress_bytes: 0,
        })
    }

    fn meter_actual(spec: SandboxSpec, usage: Usage) -> Result<MicroCredits, ExtError> {
        // Billed per started second, like the providers the card follows,
        // and never beyond the ttl: a provider stops the sandbox there.
        rate_card()?.actual(&spec, usage.wall_ms)
    }
}

export_backend!(SaasStub);
