//! The `process` interface as guests call it: each call is checked against
//! the grant and against the sandbox the current call is about
//! ([`check_scope`]), then handed to the [`ProcessCapability`].

use super::bindings::sandboxer::extension::process::{
    self as wit_process, EndCause as WitEndCause, LimitEnforcement, ProcessStatus, ProcessUsage,
    SpawnRequest,
};
use super::call_state::{
    CallState, MAX_PROGRAM_BYTES, MAX_SANDBOX_ID_BYTES, MAX_SPAWN_ARGUMENT_BYTES,
};
use super::process::{EndCause, Limits, Operation, ProcessCapability, ProcessState, check_scope};
use crate::cgroups::Enforcement;

impl CallState {
    /// The capability, once the call may use it on `sandbox_id`.
    fn process_for(
        &self,
        operation: Operation,
        sandbox_id: &str,
    ) -> Result<&ProcessCapability, String> {
        let process = self
            .process
            .as_deref()
            .ok_or_else(|| "the process capability is not granted to this extension".to_string())?;
        check_scope(self.sandbox_call.as_ref(), operation, sandbox_id)?;
        Ok(process)
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

fn wit_enforcement(enforcement: Enforcement) -> LimitEnforcement {
    match enforcement {
        Enforcement::CgroupV2 => LimitEnforcement::CgroupV2,
        Enforcement::CgroupV1 => LimitEnforcement::CgroupV1,
        Enforcement::Rlimits => LimitEnforcement::Rlimits,
    }
}

fn wit_end_cause(cause: EndCause) -> WitEndCause {
    match cause {
        EndCause::Exited => WitEndCause::Exited,
        EndCause::WallClock => WitEndCause::WallClock,
        EndCause::Killed => WitEndCause::Killed,
        EndCause::MemoryLimit => WitEndCause::MemoryLimit,
        EndCause::Unknown => WitEndCause::Unknown,
    }
}

fn wit_status(state: Option<ProcessState>) -> Result<ProcessStatus, String> {
    match state {
        None => Err("no process was started for this sandbox".into()),
        Some(state @ ProcessState::Running { .. }) => Ok(ProcessStatus {
            running: true,
            exit_code: None,
            signal: None,
            ended_by: None,
            enforcement: wit_enforcement(state.enforcement()),
            usage: ProcessUsage {
                wall_ms: state.wall_ms(),
                cpu_ms: 0,
                peak_memory_kb: 0,
            },
        }),
        Some(ProcessState::Exited(exited)) => Ok(ProcessStatus {
            running: false,
            exit_code: exited.exit_code,
            signal: exited.signal,
            ended_by: Some(wit_end_cause(exited.ended_by)),
            enforcement: wit_enforcement(exited.enforcement),
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
            .process
            .as_deref()
            .and_then(|process| process.find_program(&name))
            .map(|path| path.display().to_string()))
    }

    fn workdir(&mut self, sandbox_id: String) -> wasmtime::Result<Result<String, String>> {
        Ok(check_sandbox_id(&sandbox_id)
            .and_then(|()| self.process_for(Operation::Start, &sandbox_id))
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
            cpu_millis: request.limits.cpu_millis,
            max_processes: request.limits.max_processes,
            wall_secs: request.limits.wall_secs,
        };
        Ok(self
            .process_for(Operation::Start, &request.sandbox_id)
            .and_then(|process| {
                process.spawn(
                    &request.sandbox_id,
                    &request.program,
                    request.args,
                    request.env,
                    limits,
                    request.status_fd,
                )
            }))
    }

    fn status(&mut self, sandbox_id: String) -> wasmtime::Result<Result<ProcessStatus, String>> {
        Ok(check_sandbox_id(&sandbox_id)
            .and_then(|()| self.process_for(Operation::Watch, &sandbox_id))
            .and_then(|process| process.status(&sandbox_id))
            .and_then(wit_status))
    }

    fn kill(&mut self, sandbox_id: String) -> wasmtime::Result<Result<ProcessStatus, String>> {
        Ok(check_sandbox_id(&sandbox_id)
            .and_then(|()| self.process_for(Operation::Watch, &sandbox_id))
            .and_then(|process| process.kill(&sandbox_id))
            .and_then(wit_status))
    }
}
