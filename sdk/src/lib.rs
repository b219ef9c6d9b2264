//! Write a sandboxer backend extension in Rust.
//!
//! Implement [`Backend`] on a type, then call [`export_backend!`] once:
//!
//! ```no_run
//! use sandboxer_sdk::*;
//!
//! struct MyBackend;
//!
//! impl Backend for MyBackend {
//!     fn info() -> ExtensionInfo {
//!         ExtensionInfo {
//!             id: "my-backend".into(),
//!             version: "0.1.0".into(),
//!             kind: BackendKind::Saas,
//!             description: "An example".into(),
//!         }
//!     }
//!     fn estimate_cost(spec: SandboxSpec) -> Result<CostEstimate, ExtError> {
//!         let rate = config::credits("rate_per_vcpu_hour", 50_000)?;
//!         let amount = prorate(rate, spec.cpu_millis.into(), 1000, u64::from(spec.ttl_secs) * 1000)
//!             .ok_or_else(|| ExtError::InvalidSpec("the price overflows".into()))?;
//!         Ok(CostEstimate { amount, rate_per_hour: rate })
//!     }
//!     fn create(spec: SandboxSpec) -> Result<SandboxHandle, ExtError> { todo!() }
//!     fn destroy(spec: SandboxSpec, handle: SandboxHandle) -> Result<Usage, ExtError> { todo!() }
//!     fn meter_actual(spec: SandboxSpec, usage: Usage) -> Result<MicroCredits, ExtError> { todo!() }
//! }
//!
//! export_backend!(MyBackend);
//! # fn main() {}
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`: the `.wasm` in
//! `target/wasm32-wasip2/release/` is the component to drop into the host's
//! extensions directory.
//!
//! The host runs every call in a fresh instance: keep nothing in statics
//! between calls; use [`kv`] for what must survive. Amounts are integer
//! micro-credits; [`prorate`] and [`parse_credits`] do the exact arithmetic.

#[doc(hidden)]
pub mod __bindings {
    wit_bindgen::generate!({
        path: "../wit",
        // The contract plus the optional process capability: a component
        // imports `process` only if it calls it, so backends that never
        // start programs need no grant.
        world: "self-hosted-extension",
        pub_export_macro: true,
        export_macro_name: "__export_sandbox_extension",
        default_bindings_module: "sandboxer_sdk::__bindings",
    });
}

use __bindings::exports::sandboxer::extension::backend::Guest;
use __bindings::sandboxer::extension::host as wit_host;
use std::marker::PhantomData;

pub use __bindings::sandboxer::extension::types::{
    BackendKind, CostEstimate, ExtError, ExtensionInfo, MicroCredits, SandboxHandle, SandboxSpec,
    Usage,
};
pub use sandboxer_credits::{
    MICROS_PER_CREDIT, ParseCreditsError, format_credits, parse_credits, prorate,
};

/// A sandbox backend: the five functions of the WIT interface `backend`.
///
/// Each is called in a fresh instance of the component, under the host's
/// limits (wall-clock deadline, memory cap, optional fuel).
pub trait Backend {
    /// Describes the extension. Called when the host loads it; must not fail.
    fn info() -> ExtensionInfo;

    /// What a sandbox of `spec` would cost over its whole ttl. Must not
    /// create or charge anything.
    fn estimate_cost(spec: SandboxSpec) -> Result<CostEstimate, ExtError>;

    /// Creates the sandbox. A second call with the same `spec.sandbox_id`
    /// should return the first handle.
    fn create(spec: SandboxSpec) -> Result<SandboxHandle, ExtError>;

    /// Destroys the sandbox and reports what it used.
    fn destroy(spec: SandboxSpec, handle: SandboxHandle) -> Result<Usage, ExtError>;

    /// Prices `usage`; the host charges exactly this amount.
    fn meter_actual(spec: SandboxSpec, usage: Usage) -> Result<MicroCredits, ExtError>;
}

/// Connects a [`Backend`] to the component's exports. Use [`export_backend!`].
#[doc(hidden)]
pub struct __Exported<T>(PhantomData<T>);

impl<T: Backend> Guest for __Exported<T> {
    fn info() -> ExtensionInfo {
        T::info()
    }
    fn estimate_cost(spec: SandboxSpec) -> Result<CostEstimate, ExtError> {
        T::estimate_cost(spec)
    }
    fn create(spec: SandboxSpec) -> Result<SandboxHandle, ExtError> {
        T::create(spec)
    }
    fn destroy(spec: SandboxSpec, handle: SandboxHandle) -> Result<Usage, ExtError> {
        T::destroy(spec, handle)
    }
    fn meter_actual(spec: SandboxSpec, usage: Usage) -> Result<MicroCredits, ExtError> {
        T::meter_actual(spec, usage)
    }
}

/// Exports a type implementing [`Backend`] as this component's `backend`.
/// Call it exactly once, at the top level of the extension crate.
#[macro_export]
macro_rules! export_backend {
    ($backend:ty) => {
        type __SandboxerExportedBackend = $crate::__Exported<$backend>;
        $crate::__bindings::__export_sandbox_extension!(
            __SandboxerExportedBackend with_types_in $crate::__bindings
        );
    };
}

/// Lines in the host's log, tagged with this extension's instance name.
pub mod log {
    use super::wit_host::{LogLevel, log};

    pub fn debug(message: &str) {
        log(LogLevel::Debug, message);
    }
    pub fn info(message: &str) {
        log(LogLevel::Info, message);
    }
    pub fn warn(message: &str) {
        log(LogLevel::Warn, message);
    }
    pub fn error(message: &str) {
        log(LogLevel::Error, message);
    }
}

/// Values from the `[config]` table of this instance's sidecar file.
pub mod config {
    use super::{ExtError, wit_host};

    /// The value of `key` as text, if the sidecar sets it.
    pub fn get(key: &str) -> Option<String> {
        wit_host::config_get(key)
    }

    /// `key` as decimal credits converted to micro-credits, or `default`
    /// when the sidecar does not set it. A malformed value is an
    /// `ExtError::Internal` naming the key, so a misconfigured instance says
    /// why instead of charging a wrong price.
    pub fn credits(key: &str, default: u64) -> Result<u64, ExtError> {
        match get(key) {
            None => Ok(default),
            Some(text) => super::parse_credits(&text)
                .map_err(|error| ExtError::Internal(format!("config key `{key}`: {error}"))),
        }
    }
}

/// The common way to price a sandbox: per vCPU-hour and per GiB-hour, from
/// the sidecar's `[config]`, per started second, never beyond the ttl.
pub mod pricing {
    use super::{ExtError, MicroCredits, SandboxSpec, config, prorate};

    pub const MS_PER_HOUR: u64 = 3_600_000;

    /// Rates in micro-credits per hour of one vCPU and of one GiB.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct RateCard {
        pub per_vcpu_hour: MicroCredits,
        pub per_gib_hour: MicroCredits,
    }

    impl RateCard {
        /// `rate_per_vcpu_hour` and `rate_per_gib_hour` from the sidecar
        /// (decimal credits), or these defaults.
        pub fn from_config(
            default_per_vcpu_hour: MicroCredits,
            default_per_gib_hour: MicroCredits,
        ) -> Result<Self, ExtError> {
            Ok(Self {
                per_vcpu_hour: config::credits("rate_per_vcpu_hour", default_per_vcpu_hour)?,
                per_gib_hour: config::credits("rate_per_gib_hour", default_per_gib_hour)?,
            })
        }

        /// The price of `spec`'s size held for `duration_ms`: each resource
        /// rounded up to the next micro-credit, then added.
        pub fn price(
            &self,
            spec: &SandboxSpec,
            duration_ms: u64,
        ) -> Result<MicroCredits, ExtError> {
            let cpu = prorate(
                self.per_vcpu_hour,
                spec.cpu_millis.into(),
                1000,
                duration_ms,
            );
            let memory = prorate(self.per_gib_hour, spec.memory_mb.into(), 1024, duration_ms);
            cpu.zip(memory)
                .and_then(|(cpu, memory)| cpu.checked_add(memory))
                .ok_or_else(|| ExtError::InvalidSpec("the price of this spec overflows".into()))
        }

        /// The estimate: the whole ttl, and the hourly rate of this size.
        pub fn estimate(&self, spec: &SandboxSpec) -> Result<super::CostEstimate, ExtError> {
            Ok(super::CostEstimate {
                amount: self.price(spec, u64::from(spec.ttl_secs) * 1000)?,
                rate_per_hour: self.price(spec, MS_PER_HOUR)?,
            })
        }

        /// The actual: wall time billed per started second, never beyond
        /// the ttl (where the sandbox is stopped).
        pub fn actual(&self, spec: &SandboxSpec, wall_ms: u64) -> Result<MicroCredits, ExtError> {
            let billed_ms = wall_ms
                .div_ceil(1000)
                .saturating_mul(1000)
                .min(u64::from(spec.ttl_secs) * 1000);
            self.price(spec, billed_ms)
        }
    }
}

/// Start and watch programs on the host: only for extensions whose sidecar
/// grants `process` (a component that calls these imports
/// `sandboxer:extension/process`, and the host refuses to load it without
/// the grant). `spawn` and `workdir` work only inside [`Backend::create`],
/// for the sandbox being created; `status` and `kill` inside `create` and
/// [`Backend::destroy`], for that call's sandbox.
pub mod process {
    pub use super::__bindings::sandboxer::extension::process::{
        EndCause, LimitEnforcement, ProcessLimits, ProcessStatus, ProcessUsage, SpawnRequest,
        find_program, kill, spawn, status, workdir,
    };

    /// The descriptor at which bubblewrap is told to report its status
    /// (`--json-status-fd 3`) when [`SpawnRequest::status_fd`] names it.
    pub const BUBBLEWRAP_STATUS_FD: u32 = 3;
}

#[cfg(feature = "http")]
pub mod http;

/// This instance's private key-value store, kept by the host across calls
/// and restarts. Writes made during a call become durable when it returns.
pub mod kv {
    use super::wit_host;

    pub fn get(key: &str) -> Option<Vec<u8>> {
        wit_host::kv_get(key)
    }

    /// Reads a value written by [`set_str`].
    pub fn get_str(key: &str) -> Option<String> {
        get(key).and_then(|bytes| String::from_utf8(bytes).ok())
    }

    /// Fails when the key or value is too large, when the store is full
    /// (10 000 keys, or its quota of bytes), or when the writes the host
    /// holds for this call would pass the call's memory limit; the message
    /// names the limit.
    pub fn set(key: &str, value: &[u8]) -> Result<(), String> {
        wit_host::kv_set(key, value)
    }

    pub fn set_str(key: &str, value: &str) -> Result<(), String> {
        set(key, value.as_bytes())
    }

    /// Removes `key`; true when it existed. Like a write, the removal is
    /// held until the call returns and counts against its memory limit.
    pub fn delete(key: &str) -> bool {
        wit_host::kv_delete(key)
    }

    /// Keys that start with `prefix`, in byte order, at most `limit`.
    pub fn keys(prefix: &str, limit: u32) -> Vec<String> {
        wit_host::kv_keys(prefix, limit)
    }
}
