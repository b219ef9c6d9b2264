//! The data of one call's `Store`: an empty WASI context, the memory
//! accounting behind the instance's memory cap, the instance's config and its
//! key-value session, the `wasi:http` hooks of the `http` capability, and the
//! `host` interface the guest imports.
//!
//! What a guest hands the host is bounded twice: wasmtime copies no more
//! than [`MAX_GUEST_TRANSFER_BYTES`] out of guest memory for one host call or
//! one answer (the store's hostcall fuel), and each host function checks its
//! inputs' sizes before it keeps or copies them further. What the host keeps
//! for a call until it ends (the buffered key-value writes) counts against
//! the call's memory limit together with the guest's own memory.

use super::bindings::sandboxer::extension::host::{Host, LogLevel};
use super::error::one_line;
use super::http_client::{EgressHooks, HttpCapability};
use super::kv::{KvRefusal, KvSession, MemoryRoom};
use super::process::{ProcessCapability, SandboxCall};
use std::collections::BTreeMap;
use std::sync::Arc;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// Longest log line kept; the rest is cut.
pub const MAX_LOG_LINE_CHARS: usize = 2_000;
/// Log lines one call may write before it is muted.
pub const MAX_LOG_LINES_PER_CALL: u32 = 100;
/// Longest table (of function references) an instance may grow.
const MAX_TABLE_ELEMENTS: usize = 100_000;
/// Most bytes wasmtime copies out of guest memory for one host call's
/// arguments or one export's answer (strings and lists together). The
/// largest the host accepts is a `spawn` request's arguments and environment
/// (1 MiB); a guest that passes more is stopped before anything is copied.
pub const MAX_GUEST_TRANSFER_BYTES: usize = 2 * 1024 * 1024;
/// WASI resources (streams, pollables, sockets) one instance may hold at
/// once; each costs host memory.
const MAX_RESOURCES: usize = 10_000;
/// Longest `[config]` key looked up; no sidecar key is longer.
const MAX_CONFIG_KEY_BYTES: usize = 1024;
/// Longest sandbox id the process calls accept (the host's name rule).
pub(super) const MAX_SANDBOX_ID_BYTES: usize = 64;
/// Longest program name or path the process calls accept.
pub(super) const MAX_PROGRAM_BYTES: usize = 4096;
/// Most bytes of arguments and environment one `spawn` may pass (Linux
/// allows about 2 MiB for both).
pub const MAX_SPAWN_ARGUMENT_BYTES: usize = 1024 * 1024;

/// A host-side fault raised inside a host function (the state store is
/// unreachable, say). It stops the call as a trap and is reported as a host
/// error, not as the extension's fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HostFault(pub String);

/// Stops a call whose host-side buffers would pass its memory limit where
/// the host function has no error to answer with (`kv-delete`). The call is
/// reported as stopped at its memory limit.
#[derive(Debug, thiserror::Error)]
#[error("the call's host-side memory would pass its limit")]
struct HostMemoryLimit;

pub struct CallState {
    instance: Arc<str>,
    /// The process capability, when the instance is granted it.
    pub(super) process: Option<Arc<ProcessCapability>>,
    /// The sandbox this call is about, set by `Extension::create` and
    /// `Extension::destroy`: the only calls the process capability serves.
    pub(super) sandbox_call: Option<SandboxCall>,
    config: Arc<BTreeMap<String, String>>,
    wasi: WasiCtx,
    table: ResourceTable,
    http: WasiHttpCtx,
    /// Where every outbound request is checked and sent.
    http_hooks: EgressHooks,
    kv: Option<KvSession>,
    memory_limit_bytes: usize,
    memory_in_use: usize,
    /// Set when a memory growth was refused, so a trap that follows is
    /// reported as the memory limit rather than as whatever the guest did
    /// after its allocation failed.
    pub memory_limit_hit: bool,
    log_lines: u32,
}

impl CallState {
    pub fn new(
        instance: Arc<str>,
        config: Arc<BTreeMap<String, String>>,
        wasi: WasiCtx,
        kv: KvSession,
        memory_limit_bytes: usize,
        process: Option<Arc<ProcessCapability>>,
        http: Option<Arc<HttpCapability>>,
    ) -> Self {
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        Self {
            http_hooks: EgressHooks::new(instance.clone(), http),
            http: WasiHttpCtx::new(),
            instance,
            process,
            sandbox_call: None,
            config,
            wasi,
            table,
            kv: Some(kv),
            memory_limit_bytes,
            memory_in_use: 0,
            memory_limit_hit: false,
            log_lines: 0,
        }
    }

    /// Readies a reused instance's state for its next call: a new key-value
    /// session and fresh counters. Its memory (and what is accounted of it)
    /// stays.
    pub fn start_call(&mut self, kv: KvSession) {
        self.kv = Some(kv);
        self.sandbox_call = None;
        self.memory_limit_hit = false;
        self.log_lines = 0;
    }

    /// Starts the outbound HTTP budget of a call that may run `timeout`:
    /// its requests count afresh and end before its deadline.
    pub fn start_http_budget(&mut self, timeout: std::time::Duration) {
        self.http_hooks.start_call(timeout);
    }

    /// The call's key-value writes, to commit once the call has returned.
    pub fn take_kv(&mut self) -> Option<KvSession> {
        self.kv.take()
    }

    /// Host memory the call holds on the guest's behalf until it ends.
    fn host_bytes(&self) -> usize {
        self.kv.as_ref().map_or(0, KvSession::host_bytes)
    }

    /// What the call's host-side buffers may still take.
    fn memory_room(&self) -> MemoryRoom {
        MemoryRoom {
            free_bytes: self
                .memory_limit_bytes
                .saturating_sub(self.memory_in_use.saturating_add(self.host_bytes())),
            limit_bytes: self.memory_limit_bytes,
        }
    }

    fn kv(&mut self) -> wasmtime::Result<&mut KvSession> {
        self.kv
            .as_mut()
            .ok_or_else(|| HostFault("key-value store used after the call ended".into()).into())
    }
}

fn fault(error: impl std::fmt::Display) -> wasmtime::Error {
    HostFault(error.to_string()).into()
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for CallState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            hooks: &mut self.http_hooks,
            table: &mut self.table,
            ctx: &mut self.http,
        }
    }
}

impl ResourceLimiter for CallState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self
            .memory_in_use
            .saturating_sub(current)
            .saturating_add(desired);
        if total.saturating_add(self.host_bytes()) > self.memory_limit_bytes {
            self.memory_limit_hit = true;
            return Ok(false);
        }
        self.memory_in_use = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

impl super::bindings::sandboxer::extension::types::Host for CallState {}

impl Host for CallState {
    fn log(&mut self, level: LogLevel, message: String) -> wasmtime::Result<()> {
        self.log_lines += 1;
        if self.log_lines > MAX_LOG_LINES_PER_CALL {
            if self.log_lines == MAX_LOG_LINES_PER_CALL + 1 {
                tracing::warn!(extension = %self.instance, "muted for the rest of this call after {MAX_LOG_LINES_PER_CALL} log lines");
            }
            return Ok(());
        }
        let message = one_line(&message, MAX_LOG_LINE_CHARS);
        let extension = &*self.instance;
        match level {
            LogLevel::Trace => tracing::trace!(extension, "{message}"),
            LogLevel::Debug => tracing::debug!(extension, "{message}"),
            LogLevel::Info => tracing::info!(extension, "{message}"),
            LogLevel::Warn => tracing::warn!(extension, "{message}"),
            LogLevel::Error => tracing::error!(extension, "{message}"),
        }
        Ok(())
    }

    fn config_get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        if key.len() > MAX_CONFIG_KEY_BYTES {
            return Ok(None);
        }
        Ok(self.config.get(&key).cloned())
    }

    fn kv_get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        self.kv()?.get(&key).map_err(fault)
    }

    fn kv_set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), String>> {
        let room = self.memory_room();
        Ok(self
            .kv()?
            .set(&key, value, room)
            .map_err(fault)?
            .map_err(|refusal| refusal.to_string()))
    }

    fn kv_delete(&mut self, key: String) -> wasmtime::Result<bool> {
        let room = self.memory_room();
        match self.kv()?.delete(&key, room).map_err(fault)? {
            Ok(existed) => Ok(existed),
            // kv-delete has no error to answer with: the call is stopped as
            // if its memory had grown past the limit.
            Err(KvRefusal::CallMemory { .. }) => {
                self.memory_limit_hit = true;
                Err(HostMemoryLimit.into())
            }
            Err(refusal) => Err(fault(refusal)),
        }
    }

    fn kv_keys(&mut self, prefix: String, limit: u32) -> wasmtime::Result<Vec<String>> {
        self.kv()?.keys(&prefix, limit).map_err(fault)
    }
}
