//! {{name}}: a sandboxer backend extension.
//!
//! Build: `cargo build --release --target wasm32-wasip2`, then
//! `sandboxer-host ext check target/wasm32-wasip2/release/{{crate}}.wasm`.
//! The contract is in wit/sandbox-extension.wit. Amounts are micro-credits
//! (1 credit = 1_000_000).

wit_bindgen::generate!({ path: "wit", world: "sandbox-extension" });

use exports::sandboxer::extension::backend::Guest;
use sandboxer::extension::host::{config_get, kv_delete, kv_get, kv_set};
use sandboxer::extension::types::*;

/// Micro-credits per second of one vCPU, unless the sidecar sets
/// `rate_per_vcpu_second_micros` under [config].
const DEFAULT_RATE: u64 = 14;

struct Extension;

fn rate() -> Result<u64, ExtError> {
    match config_get("rate_per_vcpu_second_micros") {
        None => Ok(DEFAULT_RATE),
        Some(text) => text.parse().map_err(|_| ExtError::Internal(format!("rate_per_vcpu_second_micros: {text:?} is not a number"))),
    }
}

fn price(spec: &SandboxSpec, seconds: u64) -> Result<u64, ExtError> {
    Ok((rate()? * u64::from(spec.cpu_millis) * seconds).div_ceil(1000))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64)
}

impl Guest for Extension {
    fn info() -> ExtensionInfo {
        ExtensionInfo {
            id: "{{name}}".into(),
            version: "0.1.0".into(),
            kind: BackendKind::Saas,
            description: "{{name}}: describe your backend here".into(),
        }
    }

    fn estimate_cost(spec: SandboxSpec) -> Result<CostEstimate, ExtError> {
        Ok(CostEstimate { amount: price(&spec, spec.ttl_secs.into())?, rate_per_hour: price(&spec, 3600)? })
    }

    fn create(spec: SandboxSpec) -> Result<SandboxHandle, ExtError> {
        let backend_ref = format!("{{name}}-{}", spec.sandbox_id);
        kv_set(&format!("started/{backend_ref}"), now_ms().to_string().as_bytes()).map_err(ExtError::Internal)?;
        Ok(SandboxHandle { backend_ref, endpoint: None })
    }

    fn destroy(_spec: SandboxSpec, handle: SandboxHandle) -> Result<Usage, ExtError> {
        let key = format!("started/{}", handle.backend_ref);
        let started = kv_get(&key)
            .and_then(|bytes| String::from_utf8(bytes).ok()?.parse::<u64>().ok())
            .ok_or_else(|| ExtError::NotFound(handle.backend_ref.clone()))?;
        kv_delete(&key);
        Ok(Usage { wall_ms: now_ms().saturating_sub(started), cpu_ms: 0, memory_mb_ms: 0, egress_bytes: 0 })
    }

    fn meter_actual(spec: SandboxSpec, usage: Usage) -> Result<u64, ExtError> {
        price(&spec, usage.wall_ms.div_ceil(1000))
    }
}

export!(Extension);
