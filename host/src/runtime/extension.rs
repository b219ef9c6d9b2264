//! A loaded extension instance and the one way to call it.
//!
//! Every call gets a fresh `Store` and a fresh instance from the
//! pre-instantiated component, an empty WASI context (plus the network
//! addresses the operator granted), a wall-clock deadline, a fuel tank and a
//! memory cap. Whatever happens inside, the host gets back a value or a
//! typed [`CallError`]; a trap kills only that call's instance.

use super::bindings::sandboxer::extension::types::{
    CostEstimate, ExtError, ExtensionInfo, MicroCredits, SandboxHandle, SandboxSpec, Usage,
};
use super::bindings::{SelfHostedExtension, SelfHostedExtensionPre};
use super::cache::CacheOutcome;
use super::call_state::{CallState, HostFault, MAX_GUEST_TRANSFER_BYTES};
use super::capabilities::ImportedInterface;
use super::engine::deadline_ticks;
use super::error::{CallError, one_line};
use super::kv::KvSession;
use super::network::NetworkPolicy;
use super::process::{ProcessCapability, SandboxCall};
use super::sidecar::{BillingPolicy, Grants, Limits, RoutingHints};
use crate::state_db::StateDb;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmtime::component::Component;
use wasmtime::{Engine, Store, Trap};

/// An instance kept for reuse, with its store.
pub(crate) type IdleInstance = (Store<CallState>, SelfHostedExtension);

/// Idle instances kept per extension that opted into reuse.
pub const MAX_IDLE_INSTANCES: usize = 4;

/// Longest `backend-ref` an extension may return: the host stores it.
pub const MAX_BACKEND_REF_BYTES: usize = 1024;
/// Longest `endpoint` an extension may return.
pub const MAX_ENDPOINT_BYTES: usize = 2048;
/// Error messages from extensions are cut to this many characters.
pub const MAX_ERROR_MESSAGE_CHARS: usize = 2000;

/// Everything needed to call an instance; built before `info` is known.
pub(crate) struct Invoker {
    pub name: Arc<str>,
    pub engine: Engine,
    pub component: Component,
    pub pre: SelfHostedExtensionPre<CallState>,
    pub state: Arc<StateDb>,
    pub config: Arc<BTreeMap<String, String>>,
    pub limits: Limits,
    pub network: Arc<NetworkPolicy>,
    pub executor: Arc<tokio::runtime::Runtime>,
    pub process: Option<Arc<super::process::ProcessCapability>>,
    /// Instances kept for the next call, when the extension opts into reuse.
    pub idle: Option<Mutex<Vec<IdleInstance>>>,
    /// Keeps deadlines ticking for as long as any extension can be called.
    pub _ticker: Arc<super::engine::EpochTicker>,
}

impl Invoker {
    /// Runs `body` against a fresh instance under the instance's limits,
    /// with `timeout` as the wall-clock deadline. Key-value writes are
    /// committed only when `body` returns normally.
    pub fn call<R>(
        &self,
        function: &'static str,
        timeout: Duration,
        body: impl AsyncFnOnce(
            &super::bindings::SelfHostedExtension,
            &mut Store<CallState>,
        ) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let (value, kv) = self.call_keeping_kv(function, timeout, body)?;
        kv.commit().map_err(|error| CallError::Host {
            extension: self.name.to_string(),
            function,
            message: error.to_string(),
        })?;
        Ok(value)
    }

    /// [`Invoker::call`], handing the call's key-value writes back to the
    /// caller to commit (or drop) instead of committing them.
    pub fn call_keeping_kv<R>(
        &self,
        function: &'static str,
        timeout: Duration,
        body: impl AsyncFnOnce(
            &super::bindings::SelfHostedExtension,
            &mut Store<CallState>,
        ) -> wasmtime::Result<R>,
    ) -> Result<(R, KvSession), CallError> {
        let kv = KvSession::new(
            self.state.clone(),
            self.name.to_string(),
            self.limits.kv_quota_bytes(),
        );
        // A reused instance keeps its memory between calls (the extension
        // asked for it); everything else about the call starts afresh.
        let reused = self.idle.as_ref().and_then(|idle| {
            idle.lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .pop()
        });
        let (mut store, instance) = match reused {
            Some((mut store, instance)) => {
                store.data_mut().start_call(kv);
                (store, Some(instance))
            }
            None => {
                let wasi = self.network.wasi_context();
                let data = CallState::new(
                    self.name.clone(),
                    self.config.clone(),
                    wasi,
                    kv,
                    self.limits.memory_bytes(),
                    self.process.clone(),
                );
                let mut store = Store::new(&self.engine, data);
                store.limiter(|state| state);
                store.set_hostcall_fuel(MAX_GUEST_TRANSFER_BYTES);
                store.epoch_deadline_trap();
                (store, None)
            }
        };
        store.set_epoch_deadline(deadline_ticks(timeout));
        store
            .set_fuel(self.limits.fuel.unwrap_or(u64::MAX))
            .expect("fuel is enabled on the engine");

        let work = async {
            let instance = match instance {
                Some(instance) => instance,
                None => self.pre.instantiate_async(&mut store).await?,
            };
            let value = body(&instance, &mut store).await?;
            Ok::<_, wasmtime::Error>((value, instance))
        };
        // Guest code is stopped by the epoch deadline; a call blocked in a
        // host call is dropped here when the same deadline passes.
        let outcome = match self
            .executor
            .block_on(async { tokio::time::timeout(timeout, work).await })
        {
            Ok(outcome) => outcome,
            Err(_elapsed) => {
                return Err(CallError::Timeout {
                    extension: self.name.to_string(),
                    function,
                    limit_ms: timeout.as_millis() as u64,
                });
            }
        };
        match outcome {
            Ok((value, instance)) => {
                let kv = store
                    .data_mut()
                    .take_kv()
                    .expect("the call's key-value session is taken once");
                if let Some(idle) = &self.idle {
                    let mut idle = idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    if idle.len() < MAX_IDLE_INSTANCES {
                        idle.push((store, instance));
                    }
                }
                Ok((value, kv))
            }
            // A failed call's instance is never reused: after a trap it is dead.
            Err(error) => Err(self.classify(function, timeout, &error, store.data())),
        }
    }

    fn classify(
        &self,
        function: &'static str,
        timeout: Duration,
        error: &wasmtime::Error,
        state: &CallState,
    ) -> CallError {
        let extension = self.name.to_string();
        if let Some(fault) = error.downcast_ref::<HostFault>() {
            return CallError::Host {
                extension,
                function,
                message: fault.0.clone(),
            };
        }
        if is_transfer_limit(error) {
            return CallError::TooMuchData {
                extension,
                function,
                limit_bytes: MAX_GUEST_TRANSFER_BYTES,
            };
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => CallError::Timeout {
                extension,
                function,
                limit_ms: timeout.as_millis() as u64,
            },
            Some(Trap::OutOfFuel) => CallError::OutOfFuel {
                extension,
                function,
                fuel: self.limits.fuel.unwrap_or(u64::MAX),
            },
            _ if state.memory_limit_hit => CallError::MemoryLimit {
                extension,
                function,
                limit_mb: self.limits.memory_mb,
            },
            Some(trap) => CallError::Trap {
                extension,
                function,
                message: trap.to_string(),
            },
            None => CallError::Trap {
                extension,
                function,
                message: one_line(&format!("{error:#}"), 500),
            },
        }
    }

    fn backend_error(&self, function: &'static str, error: ExtError) -> CallError {
        let cut = |message: String| one_line(&message, MAX_ERROR_MESSAGE_CHARS);
        let error = match error {
            ExtError::InvalidSpec(message) => ExtError::InvalidSpec(cut(message)),
            ExtError::Capacity(message) => ExtError::Capacity(cut(message)),
            ExtError::Unavailable(message) => ExtError::Unavailable(cut(message)),
            ExtError::NotFound(message) => ExtError::NotFound(cut(message)),
            ExtError::Internal(message) => ExtError::Internal(cut(message)),
        };
        CallError::Backend {
            extension: self.name.to_string(),
            function,
            error,
        }
    }

    /// Calls `info`; used once, while loading.
    pub fn info(&self, timeout: Duration) -> Result<ExtensionInfo, CallError> {
        self.call("info", timeout, async |instance, store| {
            instance
                .sandboxer_extension_backend()
                .call_info(store)
                .await
        })
    }
}

/// Whether wasmtime refused to copy more than the store's hostcall fuel out
/// of guest memory. Its error type is private, so its sentence is matched.
fn is_transfer_limit(error: &wasmtime::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .to_string()
            .contains("fuel allocated for hostcalls has been exhausted")
    })
}

/// Key-value writes of a call, not yet committed.
pub struct PendingKv(KvSession);

impl PendingKv {
    /// Commits them on their own.
    pub fn commit(self) -> Result<(), super::kv::KvError> {
        self.0.commit()
    }

    /// Writes them into the caller's transaction.
    pub fn apply(self, write: &redb::WriteTransaction) -> Result<(), String> {
        self.0.apply(write)
    }
}

/// An extension instance that passed every load check.
pub struct Extension {
    /// The instance name: the file stem.
    pub name: String,
    pub file: PathBuf,
    pub info: ExtensionInfo,
    pub limits: Limits,
    pub grants: Grants,
    pub routing: RoutingHints,
    pub billing: BillingPolicy,
    pub config: BTreeMap<String, String>,
    pub imports: Vec<ImportedInterface>,
    pub content_sha256: String,
    pub cache: CacheOutcome,
    pub(crate) invoker: Invoker,
}

impl std::fmt::Debug for Extension {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Extension")
            .field("name", &self.name)
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl Extension {
    fn timeout(&self) -> Duration {
        self.limits.timeout()
    }

    /// The process capability, when this instance is granted it.
    pub fn process_capability(&self) -> Option<&ProcessCapability> {
        self.invoker.process.as_deref()
    }

    /// The component this instance runs (for benchmarks and diagnostics).
    pub fn component(&self) -> &Component {
        &self.invoker.component
    }

    pub fn estimate_cost(&self, spec: &SandboxSpec) -> Result<CostEstimate, CallError> {
        const FUNCTION: &str = "estimate-cost";
        self.invoker
            .call(FUNCTION, self.timeout(), async |instance, store| {
                instance
                    .sandboxer_extension_backend()
                    .call_estimate_cost(store, spec)
                    .await
            })?
            .map_err(|error| self.invoker.backend_error(FUNCTION, error))
    }

    pub fn create(&self, spec: &SandboxSpec) -> Result<SandboxHandle, CallError> {
        let (handle, kv) = self.create_keeping_kv(spec)?;
        kv.commit().map_err(|error| CallError::Host {
            extension: self.name.clone(),
            function: "create",
            message: error.to_string(),
        })?;
        Ok(handle)
    }

    /// [`Extension::create`], handing back the extension's key-value writes
    /// so the caller can make them durable together with its own record of
    /// the sandbox (one commit instead of two). Until then later calls of
    /// the extension do not see them.
    pub fn create_keeping_kv(
        &self,
        spec: &SandboxSpec,
    ) -> Result<(SandboxHandle, PendingKv), CallError> {
        const FUNCTION: &str = "create";
        let (answer, kv) =
            self.invoker
                .call_keeping_kv(FUNCTION, self.timeout(), async |instance, store| {
                    store.data_mut().sandbox_call = Some(SandboxCall::create(&spec.sandbox_id));
                    instance
                        .sandboxer_extension_backend()
                        .call_create(store, spec)
                        .await
                })?;
        let handle = answer.map_err(|error| self.invoker.backend_error(FUNCTION, error))?;
        let too_large = |field, size, limit| CallError::OutputTooLarge {
            extension: self.name.clone(),
            function: FUNCTION,
            field,
            size,
            limit,
        };
        if handle.backend_ref.len() > MAX_BACKEND_REF_BYTES {
            return Err(too_large(
                "backend-ref",
                handle.backend_ref.len(),
                MAX_BACKEND_REF_BYTES,
            ));
        }
        if let Some(endpoint) = &handle.endpoint
            && endpoint.len() > MAX_ENDPOINT_BYTES
        {
            return Err(too_large("endpoint", endpoint.len(), MAX_ENDPOINT_BYTES));
        }
        Ok((handle, PendingKv(kv)))
    }

    pub fn destroy(&self, spec: &SandboxSpec, handle: &SandboxHandle) -> Result<Usage, CallError> {
        let (usage, kv) = self.destroy_keeping_kv(spec, handle)?;
        kv.commit().map_err(|error| CallError::Host {
            extension: self.name.clone(),
            function: "destroy",
            message: error.to_string(),
        })?;
        Ok(usage)
    }

    /// [`Extension::destroy`], handing back the extension's key-value
    /// writes so the caller can make them durable in the same commit as the
    /// usage it records: a crash then loses both (destroy runs again and
    /// reports the same) or neither.
    pub fn destroy_keeping_kv(
        &self,
        spec: &SandboxSpec,
        handle: &SandboxHandle,
    ) -> Result<(Usage, PendingKv), CallError> {
        const FUNCTION: &str = "destroy";
        let (answer, kv) =
            self.invoker
                .call_keeping_kv(FUNCTION, self.timeout(), async |instance, store| {
                    store.data_mut().sandbox_call = Some(SandboxCall::destroy(&spec.sandbox_id));
                    instance
                        .sandboxer_extension_backend()
                        .call_destroy(store, spec, handle)
                        .await
                })?;
        let usage = answer.map_err(|error| self.invoker.backend_error(FUNCTION, error))?;
        Ok((usage, PendingKv(kv)))
    }

    pub fn meter_actual(
        &self,
        spec: &SandboxSpec,
        usage: Usage,
    ) -> Result<MicroCredits, CallError> {
        const FUNCTION: &str = "meter-actual";
        self.invoker
            .call(FUNCTION, self.timeout(), async |instance, store| {
                instance
                    .sandboxer_extension_backend()
                    .call_meter_actual(store, spec, usage)
                    .await
            })?
            .map_err(|error| self.invoker.backend_error(FUNCTION, error))
    }
}
