//! The data of one call's `Store`: an empty WASI context, the memory
//! accounting behind the instance's memory cap, the instance's config and its
//! key-value session, and the `host` interface the guest imports.

use super::bindings::sandboxer::extension::host::{Host, LogLevel};
use super::bindings::sandboxer::extension::process::{
    self as wit_process, ProcessStatus, ProcessUsage, SpawnRequest,
};
use super::error::one_line;
use super::kv::KvSession;
use super::process::{Limits, ProcessCapability, ProcessState};
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
    process: Option<Arc<ProcessCapability>>,
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

impl CallState {
    fn process(&self) -> Result<&ProcessCapability, String> {
        self.process
            .as_deref()
            .ok_or_else(|| "the process capability is not granted to this extension".to_string())
    }
}

fn wit_status(state: Option<ProcessState>) -> Result<ProcessStatus, String> {
    match state {
        None => Err("no process was started for this sandbox".into()),
        Some(ProcessState::Running { .. }) => Ok(ProcessStatus {
            running: true,
            exit_code: None,
            signal: None,
            usage: ProcessUsage {
                wall_ms: state.map_or(0, |state| state.wall_ms()),
                cpu_ms: 0,
                peak_memory_kb: 0,
            },
        }),
        Some(ProcessState::Exited(exited)) => Ok(ProcessStatus {
            running: false,
            exit_code: exited.exit_code,
            signal: exited.signal,
            usage: ProcessUsage {
                wall_ms: exited.wall_ms,
                cpu_ms: exited.cpu_ms,
                peak_memory_kb: exited.peak_memory_kb,
            },
        }),
    }
}

impl wit_process::Host for CallState {
    fn find_program(&mut self, name: String) -> wasmtime::Result<Option<String>> {
        Ok(self
            .process()
            .ok()
            .and_then(|process| process.find_program(&name))
            .map(|path| path.display().to_string()))
    }

    fn workdir(&mut self, sandbox_id: String) -> wasmtime::Result<Result<String, String>> {
        Ok(self
            .process()
            .and_then(|process| process.workdir(&sandbox_id))
            .map(|path| path.display().to_string()))
    }

    fn spawn(&mut self, request: SpawnRequest) -> wasmtime::Result<Result<(), String>> {
        let limits = Limits {
            memory_mb: request.limits.memory_mb,
            cpu_secs: request.limits.cpu_secs,
            max_processes: request.limits.max_processes,
            wall_secs: request.limits.wall_secs,
        };
        Ok(self.process().and_then(|process| {
            process.spawn(
                &request.sandbox_id,
                &request.program,
                request.args,
                request.env,
                limits,
            )
        }))
    }

    fn status(&mut self, sandbox_id: String) -> wasmtime::Result<Result<ProcessStatus, String>> {
        Ok(self
            .process()
            .and_then(|process| process.status(&sandbox_id))
            .and_then(wit_status))
    }

    fn kill(&mut self, sandbox_id: String) -> wasmtime::Result<Result<ProcessStatus, String>> {
        Ok(self
            .process()
            .and_then(|process| process.kill(&sandbox_id))
            .and_then(wit_status))
    }
}
