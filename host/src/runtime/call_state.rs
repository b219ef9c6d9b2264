//! The data of one call's `Store`: an empty WASI context, the memory
//! accounting behind the instance's memory cap, the instance's config and its
//! key-value session, and the `host` interface the guest imports.
//!
//! What a guest hands the host is bounded twice: wasmtime copies no more
//! than [`MAX_GUEST_TRANSFER_BYTES`] out of guest memory for one host call or
//! one answer (the store's hostcall fuel), and each host function checks its
//! inputs' sizes before it keeps or copies them further. What the host keeps
//! for a call until it ends (the buffered key-value writes) counts against
//! the call's memory limit together with the guest's own memory.

use super::bindings::sandboxer::extension::host::{Host, LogLevel};
use super::bindings::sandboxer::extension::process::{
    self as wit_process, ProcessStatus, ProcessUsage, SpawnRequest,
};
use super::error::one_line;
use super::kv::{KvRefusal, KvSession, MemoryRoom};
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
const MAX_SANDBOX_ID_BYTES: usize = 64;
/// Longest program name or path the process calls accept.
const MAX_PROGRAM_BYTES: usize = 4096;
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
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        Self {
            instance,
            process,
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
        self.memory_limit_hit = false;
        self.log_lines = 0;
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

/// Refuses a sandbox id longer than any the host assigns, before it is
/// copied into an error or a path.
fn check_sandbox_id(sandbox_id: &str) -> Result<(), String> {
    if sandbox_id.len() > MAX_SANDBOX_ID_BYTES {
        return Err(format!(
            "a sandbox id of {} bytes is not one the host assigns; the limit is {MAX_SANDBOX_ID_BYTES}",
            sandbox_id.len()
        ));
    }
    Ok(())
}

/// Refuses a `spawn` whose program, arguments or environment are larger than
/// a process can be started with.
fn check_spawn_request(request: &SpawnRequest) -> Result<(), String> {
    check_sandbox_id(&request.sandbox_id)?;
    if request.program.len() > MAX_PROGRAM_BYTES {
        return Err(format!(
            "a program name of {} bytes; the limit is {MAX_PROGRAM_BYTES}",
            request.program.len()
        ));
    }
    // Each argument and variable also costs its terminating NUL (and `=`).
    let arguments: usize = request.args.iter().map(|arg| arg.len() + 1).sum();
    let environment: usize = request
        .env
        .iter()
        .map(|(name, value)| name.len() + value.len() + 2)
        .sum();
    let total = arguments.saturating_add(environment);
    if total > MAX_SPAWN_ARGUMENT_BYTES {
        return Err(format!(
            "arguments and environment of {total} bytes; the limit is {MAX_SPAWN_ARGUMENT_BYTES}"
        ));
    }
    Ok(())
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
        if name.len() > MAX_PROGRAM_BYTES {
            return Ok(None);
        }
        Ok(self
            .process()
            .ok()
            .and_then(|process| process.find_program(&name))
            .map(|path| path.display().to_string()))
    }

    fn workdir(&mut self, sandbox_id: String) -> wasmtime::Result<Result<String, String>> {
        Ok(check_sandbox_id(&sandbox_id)
            .and_then(|()| self.process())
            .and_then(|process| process.workdir(&sandbox_id))
            .map(|path| path.display().to_string()))
    }

    fn spawn(&mut self, request: SpawnRequest) -> wasmtime::Result<Result<(), String>> {
        if let Err(refusal) = check_spawn_request(&request) {
            return Ok(Err(refusal));
        }
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
        Ok(check_sandbox_id(&sandbox_id)
            .and_then(|()| self.process())
            .and_then(|process| process.status(&sandbox_id))
            .and_then(wit_status))
    }

    fn kill(&mut self, sandbox_id: String) -> wasmtime::Result<Result<ProcessStatus, String>> {
        Ok(check_sandbox_id(&sandbox_id)
            .and_then(|()| self.process())
            .and_then(|process| process.kill(&sandbox_id))
            .and_then(wit_status))
    }
}
