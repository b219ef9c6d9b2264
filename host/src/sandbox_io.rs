//! A local sandbox's process as a command-line user meets it: its output
//! (streamed, followed, or captured up to a cap), its stdin, the exit status
//! `run` ends with, `sandbox exec` into it, and what `sandbox show` says
//! about its process. It reads and writes the files of the sandbox's
//! directory (see [`crate::runtime::process`]); it never calls an
//! extension and knows nothing of money.

use crate::runtime::process::{EndCause, Exited, ProcessState, read_state};
use serde::Serialize;
use std::ffi::OsString;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// `run`'s status when the sandbox's ttl ended its command (as `timeout`).
pub const EXIT_TTL_REACHED: u8 = 124;
/// `run`'s status after Ctrl-C (SIGINT) or SIGTERM: the sandbox was
/// destroyed and billed first.
pub const EXIT_INTERRUPTED: u8 = 130;
/// How much of each of stdout and stderr `run --json` includes.
pub const MAX_CAPTURED_OUTPUT_BYTES: usize = 1024 * 1024;

/// Why `run` stopped waiting for its sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// The sandbox's command ended.
    CommandEnded,
    /// The ttl passed.
    TtlReached,
    /// Ctrl-C or SIGTERM.
    Interrupted,
    /// Something else (another command) destroyed the sandbox.
    NoLongerReady,
}

/// How `run` ends: the status it exits with and, when a command ran, what
/// became of it in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    pub status: u8,
    pub words: Option<String>,
}

/// The status `run` exits with: the command's own (0 to 255), 128+N when
/// signal N ended it, [`EXIT_TTL_REACHED`] when the ttl ended it,
/// [`EXIT_INTERRUPTED`] after Ctrl-C. A sandbox without a process (a SaaS
/// backend) or without a command of its own lives out its ttl: 0.
pub fn run_outcome(end: RunEnd, exited: Option<&Exited>, has_command: bool) -> RunOutcome {
    if end == RunEnd::Interrupted {
        return RunOutcome {
            status: EXIT_INTERRUPTED,
            words: Some("interrupted: the sandbox was destroyed".into()),
        };
    }
    let Some(exited) = exited else {
        return RunOutcome {
            status: 0,
            words: None,
        };
    };
    let ttl_ended_it = exited.ended_by == EndCause::WallClock
        || (end == RunEnd::TtlReached && exited.ended_by == EndCause::Killed);
    if ttl_ended_it {
        return RunOutcome {
            status: if has_command { EXIT_TTL_REACHED } else { 0 },
            words: Some(format!(
                "ttl reached: the command was killed ({})",
                status_words(exited)
            )),
        };
    }
    RunOutcome {
        status: command_status(exited).unwrap_or(1),
        words: Some(describe_end(exited)),
    }
}

/// The command's own status: its exit code, or 128+N for signal N.
pub fn command_status(exited: &Exited) -> Option<u8> {
    match (exited.exit_code, exited.signal) {
        (Some(code), _) => Some(code.clamp(0, 255) as u8),
        (None, Some(signal)) => Some((128 + signal).clamp(0, 255) as u8),
        (None, None) => None,
    }
}

fn status_words(exited: &Exited) -> String {
    match (exited.exit_code, exited.signal) {
        (Some(code), _) => format!("status {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => "no status".into(),
    }
}

/// How a sandbox's process ended, as a sentence.
pub fn describe_end(exited: &Exited) -> String {
    let status = status_words(exited);
    match exited.ended_by {
        EndCause::Exited => match (exited.exit_code, exited.signal) {
            (None, Some(signal)) => format!("the command was killed by signal {signal}"),
            _ => format!("the command exited with {status}"),
        },
        EndCause::WallClock => format!("ttl reached: the command was killed ({status})"),
        EndCause::Killed => {
            format!("the command was killed when its sandbox was destroyed ({status})")
        }
        EndCause::MemoryLimit => format!("the command was killed at its memory limit ({status})"),
        EndCause::Unknown => "the command ended; how is unknown (its supervisor was killed)".into(),
    }
}

/// What `sandbox show` and `run --json` say about a sandbox's process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessReport {
    pub running: bool,
    /// `cgroup-v2`, `cgroup-v1` or `rlimits`: how the limits hold.
    pub limits: &'static str,
    /// Why no cgroup was made, when none was.
    pub cgroup_unavailable: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// `exited`, `wall-clock`, `killed`, `memory-limit` or `unknown`.
    pub ended_by: Option<EndCause>,
    /// The same, in words.
    pub end: Option<String>,
    pub wall_ms: u64,
    pub cpu_ms: Option<u64>,
    pub peak_memory_kb: Option<u64>,
    /// Where its files (output, status) are.
    pub dir: PathBuf,
}

/// The process of sandbox `id`, if it had one on this machine.
pub fn process_report(sandboxes_dir: &Path, id: &str) -> Option<ProcessReport> {
    crate::names::check_name("sandbox", id).ok()?;
    let dir = sandboxes_dir.join(id);
    let state = read_state(&dir)?;
    let limits = state.enforcement().name();
    Some(match state {
        ProcessState::Running { started } => ProcessReport {
            running: true,
            limits,
            cgroup_unavailable: started.cgroup_unavailable.clone(),
            exit_code: None,
            signal: None,
            ended_by: None,
            end: None,
            wall_ms: ProcessState::Running { started }.wall_ms(),
            cpu_ms: None,
            peak_memory_kb: None,
            dir,
        },
        ProcessState::Exited(exited) => ProcessReport {
            running: false,
            limits,
            cgroup_unavailable: None,
            exit_code: exited.exit_code,
            signal: exited.signal,
            ended_by: Some(exited.ended_by),
            end: Some(describe_end(&exited)),
            wall_ms: exited.wall_ms,
            cpu_ms: Some(exited.cpu_ms),
            peak_memory_kb: Some(exited.peak_memory_kb),
            dir,
        },
    })
}

/// The exit record of the process in `dir`, once it has ended.
pub fn exited(dir: &Path) -> Option<Exited> {
    match read_state(dir) {
        Some(ProcessState::Exited(exited)) => Some(exited),
        _ => None,
    }
}

/// How a sandbox's command ended and what it wrote, read once it ended:
/// what `run --json` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandReport {
    pub exited: Exited,
    pub stdout: CapturedStream,
    pub stderr: CapturedStream,
}

impl CommandReport {
    /// The report of the process in `dir`, once it has ended; output cut at
    /// [`MAX_CAPTURED_OUTPUT_BYTES`] per stream.
    pub fn read(dir: &Path) -> Option<Self> {
        Some(Self {
            exited: exited(dir)?,
            stdout: capture(dir, "stdout", MAX_CAPTURED_OUTPUT_BYTES),
            stderr: capture(dir, "stderr", MAX_CAPTURED_OUTPUT_BYTES),
        })
    }

    /// `exit_code`, `ended_by`, `limits`, `stdout` and `stderr`, for a JSON
    /// summary.
    pub fn json_fields(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut fields = serde_json::Map::new();
        let mut put = |key: &str, value: serde_json::Value| {
            fields.insert(key.to_string(), value);
        };
        put("exit_code", serde_json::json!(command_status(&self.exited)));
        put("ended_by", serde_json::json!(self.exited.ended_by));
        put("limits", serde_json::json!(self.exited.enforcement.name()));
        put("stdout", serde_json::json!(self.stdout));
        put("stderr", serde_json::json!(self.stderr));
        fields
    }
}

/// The start of one output stream, cut at a cap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CapturedStream {
    /// Lossy UTF-8 of at most [`MAX_CAPTURED_OUTPUT_BYTES`].
    pub text: String,
    /// How many bytes the process wrote in all.
    pub bytes: u64,
    pub truncated: bool,
}

/// The first `cap` bytes of `dir/name`.
pub fn capture(dir: &Path, name: &str, cap: usize) -> CapturedStream {
    let path = dir.join(name);
    let bytes = std::fs::metadata(&path).map_or(0, |metadata| metadata.len());
    let mut text = Vec::new();
    if let Ok(file) = std::fs::File::open(&path) {
        let _ = file.take(cap as u64).read_to_end(&mut text);
    }
    CapturedStream {
        text: String::from_utf8_lossy(&text).into_owned(),
        bytes,
        truncated: bytes > text.len() as u64,
    }
}

/// Feeds this process's stdin to the process in `dir` (through its `stdin`
/// FIFO), on a thread, until stdin ends; then the process reads EOF. Does
/// nothing when the process's stdin is not piped.
pub fn attach_stdin(dir: &Path) {
    let fifo = dir.join("stdin");
    std::thread::spawn(move || {
        // A process that stops reading must not kill this one with SIGPIPE:
        // on this thread the write fails with EPIPE instead.
        // SAFETY: blocking one signal for the calling thread only.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGPIPE);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        let Some(mut to) = open_fifo_for_writing(&fifo) else {
            return;
        };
        let mut buffer = [0u8; 16 * 1024];
        let mut stdin = std::io::stdin().lock();
        loop {
            match stdin.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(read) => {
                    if to.write_all(&buffer[..read]).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

/// Opens the FIFO once its reader (the supervisor) is there; gives up when
/// there is no FIFO (stdin not piped, or the process already ended).
fn open_fifo_for_writing(fifo: &Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    loop {
        if !fifo.exists() {
            return None;
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo)
        {
            Ok(file) => {
                // Writes block from here on, as a pipe's do.
                // SAFETY: clearing O_NONBLOCK on a descriptor we own.
                unsafe {
                    libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_SETFL, 0);
                }
                return Some(file);
            }
            // No reader yet (ENXIO): the supervisor is about to open it.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Copies what a sandbox's process writes to its `stdout` and `stderr`
/// files onto this command's own, as it arrives.
pub struct OutputTail {
    files: Vec<(PathBuf, u64, bool)>,
    enabled: bool,
}

impl OutputTail {
    pub fn new(dir: &Path, enabled: bool) -> Self {
        Self {
            files: vec![
                (dir.join("stdout"), 0, false),
                (dir.join("stderr"), 0, true),
            ],
            enabled,
        }
    }

    /// Whether there is output to stream (the sandbox runs a process here).
    pub fn is_streaming(&self) -> bool {
        self.enabled && self.files.iter().any(|(path, _, _)| path.exists())
    }

    /// Copies what arrived since the last call.
    pub fn pump(&mut self) {
        if !self.enabled {
            return;
        }
        for (path, offset, to_stderr) in &mut self.files {
            let Ok(mut file) = std::fs::File::open(&*path) else {
                continue;
            };
            if file.seek(std::io::SeekFrom::Start(*offset)).is_err() {
                continue;
            }
            let mut fresh = Vec::new();
            if file.read_to_end(&mut fresh).is_err() || fresh.is_empty() {
                continue;
            }
            *offset += fresh.len() as u64;
            let _ = if *to_stderr {
                std::io::stderr().write_all(&fresh)
            } else {
                let mut stdout = std::io::stdout();
                stdout.write_all(&fresh).and_then(|()| stdout.flush())
            };
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxIoError {
    #[error(
        "no sandbox `{0}` with a process on this machine (only backends that run sandboxes here, like `local`, keep one)"
    )]
    NoProcess(String),
    #[error("{0}")]
    InvalidName(String),
    #[error("cannot start the exec helper: {0}")]
    Helper(std::io::Error),
}

fn sandbox_dir(sandboxes_dir: &Path, id: &str) -> Result<PathBuf, SandboxIoError> {
    crate::names::check_name("sandbox", id).map_err(SandboxIoError::InvalidName)?;
    let dir = sandboxes_dir.join(id);
    if read_state(&dir).is_none() {
        return Err(SandboxIoError::NoProcess(id.to_string()));
    }
    Ok(dir)
}

/// `sandbox logs ID [--follow]`: prints the process's output so far; with
/// `follow`, keeps printing until it ends or `stop` is set.
pub fn print_logs(
    sandboxes_dir: &Path,
    id: &str,
    follow: bool,
    stop: &AtomicBool,
) -> Result<Option<Exited>, SandboxIoError> {
    let dir = sandbox_dir(sandboxes_dir, id)?;
    let mut tail = OutputTail::new(&dir, true);
    loop {
        tail.pump();
        let ended = exited(&dir);
        if !follow || ended.is_some() || stop.load(Ordering::Relaxed) {
            tail.pump();
            return Ok(ended);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `sandbox exec ID -- CMD...`: runs `command` inside the sandbox through
/// the `__exec` helper (`supervisor` is the sandboxer-host binary), with
/// this process's stdin, stdout and stderr; returns its exit status.
pub fn exec(
    sandboxes_dir: &Path,
    supervisor: &Path,
    id: &str,
    command: &[String],
) -> Result<u8, SandboxIoError> {
    let dir = sandbox_dir(sandboxes_dir, id)?;
    let mut helper = std::process::Command::new(supervisor);
    helper.arg("__exec").arg(&dir).arg("--");
    helper.args(command.iter().map(OsString::from));
    let status = helper.status().map_err(SandboxIoError::Helper)?;
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code.clamp(0, 255) as u8,
        (None, Some(signal)) => (128 + signal).clamp(0, 255) as u8,
        (None, None) => 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroups::Enforcement;

    fn exited(exit_code: Option<i32>, signal: Option<i32>, ended_by: EndCause) -> Exited {
        Exited {
            exit_code,
            signal,
            ended_by,
            enforcement: Enforcement::Rlimits,
            wall_ms: 1,
            cpu_ms: 0,
            peak_memory_kb: 0,
            ended_ms: 0,
        }
    }

    #[test]
    fn run_exits_with_the_commands_status_or_says_why_not() {
        let status =
            |end, exited: &Exited, has_command| run_outcome(end, Some(exited), has_command).status;
        let three = exited(Some(3), None, EndCause::Exited);
        assert_eq!(status(RunEnd::CommandEnded, &three, true), 3);
        let killed = exited(None, Some(9), EndCause::Exited);
        assert_eq!(status(RunEnd::CommandEnded, &killed, true), 137);
        let ttl = exited(None, Some(9), EndCause::WallClock);
        assert_eq!(status(RunEnd::CommandEnded, &ttl, true), EXIT_TTL_REACHED);
        // run destroyed it at the ttl before the supervisor's own timer.
        let destroyed = exited(None, Some(9), EndCause::Killed);
        let outcome = run_outcome(RunEnd::TtlReached, Some(&destroyed), true);
        assert_eq!(outcome.status, EXIT_TTL_REACHED);
        assert_eq!(
            outcome.words.as_deref(),
            Some("ttl reached: the command was killed (signal 9)")
        );
        assert_eq!(status(RunEnd::TtlReached, &ttl, false), 0);
        assert_eq!(run_outcome(RunEnd::TtlReached, None, false).status, 0);
        assert_eq!(status(RunEnd::Interrupted, &three, true), EXIT_INTERRUPTED);
        assert_eq!(describe_end(&three), "the command exited with status 3");
    }

    #[test]
    fn captured_output_is_cut_at_the_cap_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stdout"), "0123456789").unwrap();
        let cut = capture(dir.path(), "stdout", 4);
        assert_eq!(
            (cut.text.as_str(), cut.bytes, cut.truncated),
            ("0123", 10, true)
        );
        let whole = capture(dir.path(), "stdout", 100);
        assert!(!whole.truncated);
        let missing = capture(dir.path(), "stderr", 100);
        assert_eq!((missing.text.as_str(), missing.bytes), ("", 0));
    }
}
