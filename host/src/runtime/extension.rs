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
use wasmtime::{Engine, Store, Trap, UpdateDeadline};

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
    pub process: Option<Arc<super::process::ProcessCapability>>,
    /// The `http` capability, when the instance is granted it.
    pub http: Option<Arc<super::http_client::HttpCapability>>,
    /// Instances kept for the next call, when the extension opts into reuse.
    pub idle: Option<Mutex<Vec<IdleInstance>>>,
    /// Keeps deadlines ticking for as long as any extension can be called.
    pub _ticker: Arc<super::engine::EpochTicker>,
    /// How its calls ended, for `/metrics`.
    pub stats: Arc<super::stats::CallStats>,
}

/// One call of the `backend` interface, with its arguments. An enum rather
/// than a closure so the call's future is a concrete type the compiler can
/// see is `Send` (a server awaits it on any worker thread).
pub(crate) enum Call<'a> {
    Info,
    EstimateCost(&'a SandboxSpec),
    Create(&'a SandboxSpec),
    Destroy(&'a SandboxSpec, &'a SandboxHandle),
    MeterActual(&'a SandboxSpec, Usage),
}

impl Call<'_> {
    /// The WIT name of the function, for errors and logs.
    pub fn function(&self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::EstimateCost(_) => "estimate-cost",
            Self::Create(_) => "create",
            Self::Destroy(..) => "destroy",
            Self::MeterActual(..) => "meter-actual",
        }
    }
}

/// What a [`Call`] answered.
pub(crate) enum Answer {
    Info(ExtensionInfo),
    EstimateCost(Result<CostEstimate, ExtError>),
    Create(Result<SandboxHandle, ExtError>),
    Destroy(Result<Usage, ExtError>),
    MeterActual(Result<MicroCredits, ExtError>),
}

impl Answer {
    /// Whether the extension answered with one of its WIT errors.
    fn is_backend_error(&self) -> bool {
        match self {
            Self::Info(_) => false,
            Self::EstimateCost(answer) => answer.is_err(),
            Self::Create(answer) => answer.is_err(),
            Self::Destroy(answer) => answer.is_err(),
            Self::MeterActual(answer) => answer.is_err(),
        }
    }
}

impl Invoker {
    /// Runs `call` against a fresh instance under the instance's limits,
    /// with `timeout` as the wall-clock deadline. Key-value writes are
    /// committed only when the call returns normally.
    pub async fn call(&self, call: Call<'_>, timeout: Duration) -> Result<Answer, CallError> {
        let function = call.function();
        let (answer, kv) = self.call_keeping_kv(call, timeout).await?;
        kv.commit_async().await.map_err(|error| CallError::Host {
            extension: self.name.to_string(),
            function,
            message: error.to_string(),
        })?;
        Ok(answer)
    }

    /// [`Invoker::call`], handing the call's key-value writes back to the
    /// caller to commit (or drop) instead of committing them.
    ///
    /// The call runs on the caller's task. Guest code yields to the executor
    /// at every epoch tick (so a busy guest never holds a worker thread for
    /// long) and traps once its deadline has passed; a call blocked inside a
    /// host call (a WASI sleep, a socket wait) runs no guest code, and is
    /// dropped when the same deadline passes.
    pub async fn call_keeping_kv(
        &self,
        call: Call<'_>,
        timeout: Duration,
    ) -> Result<(Answer, KvSession), CallError> {
        let kv = KvSession::new(
            self.state.clone(),
            self.name.to_string(),
            self.limits.kv_quota_bytes(),
        );
        self.call_in_session(call, timeout, kv).await
    }

    /// [`Invoker::call_keeping_kv`] in an earlier call's key-value session:
    /// the call reads that call's uncommitted writes, and its own join them.
    pub async fn call_in_session(
        &self,
        call: Call<'_>,
        timeout: Duration,
        kv: KvSession,
    ) -> Result<(Answer, KvSession), CallError> {
        let function = call.function();
        let outcome = self.call_counted(call, timeout, kv).await;
        let counted = match &outcome {
            Ok((answer, _)) if answer.is_backend_error() => "backend-error",
            Ok(_) => "ok",
            Err(error) => super::stats::outcome(error),
        };
        self.stats.record(function, counted);
        outcome
    }

    async fn call_counted(
        &self,
        call: Call<'_>,
        timeout: Duration,
        kv: KvSession,
    ) -> Result<(Answer, KvSession), CallError> {
        let function = call.function();
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
                    self.http.clone(),
                );
                let mut store = Store::new(&self.engine, data);
                store.limiter(|state| state);
                store.set_hostcall_fuel(MAX_GUEST_TRANSFER_BYTES);
                (store, None)
            }
        };
        store.data_mut().sandbox_call = match &call {
            Call::Create(spec) => Some(SandboxCall::create(&spec.sandbox_id)),
            Call::Destroy(spec, _) => Some(SandboxCall::destroy(&spec.sandbox_id)),
            _ => None,
        };
        store.data_mut().start_http_budget(timeout);
        let ticks = deadline_ticks(timeout);
        let mut elapsed_ticks = 0u64;
        store.epoch_deadline_callback(move |_| {
            elapsed_ticks += 1;
            if elapsed_ticks >= ticks {
                Err(Trap::Interrupt.into())
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        store.set_epoch_deadline(1);
        store
            .set_fuel(self.limits.fuel.unwrap_or(u64::MAX))
            .expect("fuel is enabled on the engine");

        let work = async {
            let instance = match instance {
                Some(instance) => instance,
                None => self.pre.instantiate_async(&mut store).await?,
            };
            let backend = instance.sandboxer_extension_backend();
            let answer = match call {
                Call::Info => Answer::Info(backend.call_info(&mut store).await?),
                Call::EstimateCost(spec) => {
                    Answer::EstimateCost(backend.call_estimate_cost(&mut store, spec).await?)
                }
                Call::Create(spec) => Answer::Create(backend.call_create(&mut store, spec).await?),
                Call::Destroy(spec, handle) => {
                    Answer::Destroy(backend.call_destroy(&mut store, spec, handle).await?)
                }
                Call::MeterActual(spec, usage) => {
                    Answer::MeterActual(backend.call_meter_actual(&mut store, spec, usage).await?)
                }
            };
            Ok::<_, wasmtime::Error>((answer, instance))
        };
        let outcome = match tokio::time::timeout(timeout, work).await {
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
            Ok((answer, instance)) => {
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
                Ok((answer, kv))
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
    pub async fn info(&self, timeout: Duration) -> Result<ExtensionInfo, CallError> {
        match self.call(Call::Info, timeout).await? {
            Answer::Info(info) => Ok(info),
            _ => unreachable!("info answers info"),
        }
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
#[derive(Clone)]
pub struct PendingKv(KvSession);

impl PendingKv {
    /// Commits them on their own.
    pub async fn commit(self) -> Result<(), super::kv::KvError> {
        self.0.commit_async().await
    }

    /// Writes them into the caller's transaction.
    pub fn apply(self, write: &redb::WriteTransaction) -> Result<(), String> {
        self.0.apply(write)
    }

    /// Them as data, for a shared store's transaction.
    pub fn into_writes(self) -> Option<(String, Vec<crate::state_pg::KvWrite>)> {
        self.0.into_writes()
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

    /// How this instance's calls ended so far: (function, outcome, calls).
    pub fn call_stats(&self) -> Vec<(&'static str, &'static str, u64)> {
        self.invoker.stats.snapshot()
    }

    /// The component this instance runs (for benchmarks and diagnostics).
    pub fn component(&self) -> &Component {
        &self.invoker.component
    }

    pub async fn estimate_cost(&self, spec: &SandboxSpec) -> Result<CostEstimate, CallError> {
        const FUNCTION: &str = "estimate-cost";
        match self
            .invoker
            .call(Call::EstimateCost(spec), self.timeout())
            .await?
        {
            Answer::EstimateCost(answer) => {
                answer.map_err(|error| self.invoker.backend_error(FUNCTION, error))
            }
            _ => unreachable!("estimate-cost answers an estimate"),
        }
    }

    pub async fn create(&self, spec: &SandboxSpec) -> Result<SandboxHandle, CallError> {
        let (handle, kv) = self.create_keeping_kv(spec).await?;
        kv.commit().await.map_err(|error| CallError::Host {
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
    pub async fn create_keeping_kv(
        &self,
        spec: &SandboxSpec,
    ) -> Result<(SandboxHandle, PendingKv), CallError> {
        const FUNCTION: &str = "create";
        let (answer, kv) = self
            .invoker
            .call_keeping_kv(Call::Create(spec), self.timeout())
            .await?;
        let Answer::Create(answer) = answer else {
            unreachable!("create answers a handle")
        };
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

    pub async fn destroy(
        &self,
        spec: &SandboxSpec,
        handle: &SandboxHandle,
    ) -> Result<Usage, CallError> {
        let (usage, kv) = self.destroy_keeping_kv(spec, handle).await?;
        kv.commit().await.map_err(|error| CallError::Host {
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
    pub async fn destroy_keeping_kv(
        &self,
        spec: &SandboxSpec,
        handle: &SandboxHandle,
    ) -> Result<(Usage, PendingKv), CallError> {
        const FUNCTION: &str = "destroy";
        let (answer, kv) = self
            .invoker
            .call_keeping_kv(Call::Destroy(spec, handle), self.timeout())
            .await?;
        let Answer::Destroy(answer) = answer else {
            unreachable!("destroy answers usage")
        };
        let usage = answer.map_err(|error| self.invoker.backend_error(FUNCTION, error))?;
        Ok((usage, PendingKv(kv)))
    }

    pub async fn meter_actual(
        &self,
        spec: &SandboxSpec,
        usage: Usage,
    ) -> Result<MicroCredits, CallError> {
        let answer = self
            .invoker
            .call(Call::MeterActual(spec, usage), self.timeout())
            .await?;
        self.metered(answer)
    }

    /// Destroy, and meter-actual in its session, run again after a crash
    /// lost what they wrote the first time (the charge was settled): their
    /// key-value writes, to commit with the record of the end, whatever
    /// they answer (an extension answering `not-found` may have written
    /// too). None when destroy did not return at all (a trap, a limit).
    pub async fn redo_destroy_writes(
        &self,
        spec: &SandboxSpec,
        handle: &SandboxHandle,
    ) -> Option<PendingKv> {
        let (answer, kv) = self
            .invoker
            .call_keeping_kv(Call::Destroy(spec, handle), self.timeout())
            .await
            .ok()?;
        let Answer::Destroy(Ok(usage)) = answer else {
            return Some(PendingKv(kv));
        };
        match self
            .invoker
            .call_in_session(Call::MeterActual(spec, usage), self.timeout(), kv.clone())
            .await
        {
            Ok((_, both)) => Some(PendingKv(both)),
            Err(_) => Some(PendingKv(kv)),
        }
    }

    /// [`Extension::meter_actual`] after [`Extension::destroy_keeping_kv`],
    /// in the destroy's key-value session: it reads what the destroy wrote,
    /// and the writes of both come back to be committed together (with the
    /// record that ends the sandbox). A failed call hands nothing back: the
    /// caller keeps a copy of the destroy's writes.
    pub async fn meter_actual_keeping_kv(
        &self,
        spec: &SandboxSpec,
        usage: Usage,
        destroyed: PendingKv,
    ) -> Result<(MicroCredits, PendingKv), CallError> {
        let (answer, kv) = self
            .invoker
            .call_in_session(Call::MeterActual(spec, usage), self.timeout(), destroyed.0)
            .await?;
        Ok((self.metered(answer)?, PendingKv(kv)))
    }

    fn metered(&self, answer: Answer) -> Result<MicroCredits, CallError> {
        match answer {
            Answer::MeterActual(answer) => {
                answer.map_err(|error| self.invoker.backend_error("meter-actual", error))
            }
            _ => unreachable!("meter-actual answers an amount"),
        }
    }
}
