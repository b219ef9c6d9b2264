//! The data of one call's `Store`: an empty WASI context, the memory
//! accounting behind the instance's memory cap, the instance's config and its
//! key-value session, and the `host` interface the guest imports.

use super::bindings::sandboxer::extension::host::{Host, LogLevel};
use super::error::one_line;
use super::kv::KvSession;
use super::process::{ProcessCapability, SandboxCall};
use std::collections::BTreeMap;
use std::sync::Arc;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Longest log line kept; the rest is cut.
pub const MAX_LOG_LINE_CHARS: usize = 2_000;
/// Log lines one call may write before it is muted.
pub const MAX_LOG_LINES_PER_CALL: u32 = 100;
/// Longest table (of function references) an instance may grow.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// A host-side fault raised inside a host function (the state store is
/// unreachable, say). It stops the call as a trap and is reported as a host
/// error, not as the extension's fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HostFault(pub String);

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
    ) -> Self {
        Self {
            instance,
            process,
            sandbox_call: None,
            config,
            wasi,
            table: ResourceTable::new(),
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

    /// The call's key-value writes, to commit once the call has returned.
    pub fn take_kv(&mut self) -> Option<KvSession> {
        self.kv.take()
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
        if total > self.memory_limit_bytes {
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
        Ok(self.config.get(&key).cloned())
    }

    fn kv_get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        self.kv()?.get(&key).map_err(fault)
    }

    fn kv_set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), String>> {
        self.kv()?.set(&key, value).map_err(fault)
    }

    fn kv_delete(&mut self, key: String) -> wasmtime::Result<bool> {
        self.kv()?.delete(&key).map_err(fault)
    }

    fn kv_keys(&mut self, prefix: String, limit: u32) -> wasmtime::Result<Vec<String>> {
        self.kv()?.keys(&prefix, limit).map_err(fault)
    }
}
