//! The `process` capability: an extension granted it may start the programs
//! its sidecar lists, one process tree per sandbox, and watch and kill it.
//!
//! Each sandbox has a directory `<sandboxes>/<sandbox id>/`:
//!
//! | file | written by | what |
//! |---|---|---|
//! | `spawn.json` | the capability | the program, arguments, environment, limits |
//! | `work/` | the capability | the sandbox's private working directory |
//! | `stdout`, `stderr` | the process | its output, readable while it runs |
//! | `process.json` | the supervisor | the process group and when it started |
//! | `exit.json` | the supervisor | how it ended and what it used |
//!
//! A process is started by a small supervisor (`sandboxer-host __supervise`)
//! that detaches from the host (its own session, reparented to init), so a
//! sandbox outlives the command that created it. The supervisor applies the
//! limits, starts the program in its own process group, waits for it and
//! records its status and usage (see [`crate::supervisor`]).

use crate::names::check_name;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What the supervisor needs to start a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub memory_mb: u32,
    pub cpu_secs: u32,
    pub max_processes: u32,
    pub wall_secs: u32,
    /// Run as this user and group (when the host runs as root).
    pub run_as: Option<(u32, u32)>,
}

/// Limits on one sandbox's process tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_mb: u32,
    pub cpu_secs: u32,
    pub max_processes: u32,
    pub wall_secs: u32,
}

/// `process.json`: the process is running (or was).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// The process id, which is also its process group.
    pub pid: i32,
    /// The supervisor waiting for it.
    pub supervisor_pid: i32,
    pub started_ms: u64,
}

/// `exit.json`: how the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exited {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub wall_ms: u64,
    pub cpu_ms: u64,
    pub peak_memory_kb: u64,
}

/// The host's view of a sandbox's process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ProcessState {
    Running { started: Started },
    Exited(Exited),
}

/// The user sandboxes run as when the host runs as root: `nobody`, so that
/// the process limit applies (it does not to root) and host files owned by
/// root stay out of reach even where they are bound in.
pub const SANDBOX_USER: (u32, u32) = (65534, 65534);

/// The directories and programs of the capability, shared by the instances
/// that are granted it.
#[derive(Debug, Clone)]
pub struct ProcessCapability {
    sandboxes_dir: PathBuf,
    supervisor: PathBuf,
    /// Each granted program as written in the sidecar, and where it resolved.
    granted: Vec<(String, Option<PathBuf>)>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// `name` as the host would run it: an absolute path as it is, else the
/// first match on the host's PATH; canonical, so links cannot smuggle in
/// another program.
pub fn resolve_program(name: &str) -> Option<PathBuf> {
    let candidate = if name.contains('/') {
        Some(PathBuf::from(name))
    } else {
        let path =
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|file| is_executable(file))
    }?;
    let canonical = candidate.canonicalize().ok()?;
    is_executable(&canonical).then_some(canonical)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
}

impl ProcessCapability {
    pub fn new(sandboxes_dir: PathBuf, supervisor: PathBuf, grants: &[String]) -> Self {
        let granted = grants
            .iter()
            .map(|name| (name.clone(), resolve_program(name)))
            .collect();
        Self {
            sandboxes_dir,
            supervisor,
            granted,
        }
    }

    /// The granted program `name` resolves to, if it is granted and exists.
    pub fn find_program(&self, name: &str) -> Option<PathBuf> {
        let resolved = resolve_program(name)?;
        self.granted
            .iter()
            .any(|(_, granted)| granted.as_ref() == Some(&resolved))
            .then_some(resolved)
    }

    fn sandbox_dir(&self, sandbox_id: &str) -> Result<PathBuf, String> {
        check_name("sandbox", sandbox_id)?;
        Ok(self.sandboxes_dir.join(sandbox_id))
    }

    pub fn workdir(&self, sandbox_id: &str) -> Result<PathBuf, String> {
        let work = self.sandbox_dir(sandbox_id)?.join("work");
        std::fs::create_dir_all(&work)
            .map_err(|error| format!("cannot create {}: {error}", work.display()))?;
        if let Some((uid, gid)) = run_as() {
            std::os::unix::fs::chown(&work, Some(uid), Some(gid)).map_err(|error| {
                format!(
                    "cannot hand {} to the sandbox user: {error}",
                    work.display()
                )
            })?;
        }
        Ok(work)
    }

    /// Starts the sandbox's process through the supervisor; a second call
    /// while it exists does nothing.
    pub fn spawn(
        &self,
        sandbox_id: &str,
        program: &str,
        args: Vec<String>,
        env: Vec<(String, String)>,
        limits: Limits,
    ) -> Result<(), String> {
        let dir = self.sandbox_dir(sandbox_id)?;
        if read_state(&dir).is_some() {
            return Ok(());
        }
        let program_path = self.find_program(program).ok_or_else(|| {
            format!(
                "`{program}` is not a program this extension is granted (grants: {})",
                self.grant_list()
            )
        })?;
        std::fs::create_dir_all(&dir)
            .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
        let spec = SpawnSpec {
            program: program_path,
            args,
            env,
            memory_mb: limits.memory_mb,
            cpu_secs: limits.cpu_secs,
            max_processes: limits.max_processes,
            wall_secs: limits.wall_secs,
            run_as: run_as(),
        };
        let json = serde_json::to_string_pretty(&spec).map_err(|error| error.to_string())?;
        std::fs::write(dir.join("spawn.json"), json)
            .map_err(|error| format!("cannot write spawn.json: {error}"))?;
        let _ = std::fs::remove_file(dir.join("spawn-error"));

        // The supervisor forks its real self and returns at once: waiting for
        // it here leaves no zombie, and the real one belongs to init.
        let status = std::process::Command::new(&self.supervisor)
            .arg("__supervise")
            .arg(&dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map_err(|error| {
                format!(
                    "cannot start the supervisor {}: {error}",
                    self.supervisor.display()
                )
            })?;
        if !status.success() {
            return Err(format!("the supervisor failed to start ({status})"));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(error) = std::fs::read_to_string(dir.join("spawn-error")) {
                return Err(error.trim().to_string());
            }
            if read_state(&dir).is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("the process did not start within 5 s".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn status(&self, sandbox_id: &str) -> Result<Option<ProcessState>, String> {
        Ok(read_state(&self.sandbox_dir(sandbox_id)?))
    }

    /// Kills the whole process group if it still runs, and waits for the
    /// supervisor to record the end.
    pub fn kill(&self, sandbox_id: &str) -> Result<Option<ProcessState>, String> {
        let dir = self.sandbox_dir(sandbox_id)?;
        let Some(ProcessState::Running { started }) = read_state(&dir) else {
            return Ok(read_state(&dir));
        };
        // SAFETY: sending a signal has no memory effects; a negative pid
        // names the process group the supervisor gave the process.
        unsafe {
            libc::kill(-started.pid, libc::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(ProcessState::Exited(exited)) = read_state(&dir) {
                return Ok(Some(ProcessState::Exited(exited)));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(format!(
            "process group {} did not end within 5 s of SIGKILL",
            started.pid
        ))
    }

    fn grant_list(&self) -> String {
        self.granted
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Granted programs and where they resolved, for `ext info`.
    pub fn granted(&self) -> &[(String, Option<PathBuf>)] {
        &self.granted
    }
}

/// Whom sandbox processes run as: [`SANDBOX_USER`] when the host is root.
fn run_as() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    (unsafe { libc::geteuid() } == 0).then_some(SANDBOX_USER)
}

/// The state recorded in a sandbox directory, if a process was started.
pub fn read_state(dir: &Path) -> Option<ProcessState> {
    if let Some(exited) = std::fs::read(dir.join("exit.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
    {
        return Some(ProcessState::Exited(exited));
    }
    let started: Started =
        serde_json::from_slice(&std::fs::read(dir.join("process.json")).ok()?).ok()?;
    // SAFETY: signal 0 only checks that a process (group) exists.
    let alive = |pid: i32| unsafe { libc::kill(pid, 0) } == 0;
    // Still running, or just ended with its supervisor about to record it.
    if alive(-started.pid) || alive(started.supervisor_pid) {
        return Some(ProcessState::Running { started });
    }
    // Gone without an exit record (its supervisor was killed): ended, how
    // is unknown.
    Some(ProcessState::Exited(Exited {
        exit_code: None,
        signal: None,
        wall_ms: now_ms().saturating_sub(started.started_ms),
        cpu_ms: 0,
        peak_memory_kb: 0,
    }))
}

impl ProcessState {
    pub fn wall_ms(&self) -> u64 {
        match self {
            Self::Running { started } => now_ms().saturating_sub(started.started_ms),
            Self::Exited(exited) => exited.wall_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_on_path_and_refuses_what_is_not_granted() {
        let capability =
            ProcessCapability::new("/tmp/none".into(), "/bin/false".into(), &["sh".into()]);
        let sh = resolve_program("sh").expect("sh exists");
        assert_eq!(capability.find_program("sh"), Some(sh.clone()));
        assert_eq!(capability.find_program(sh.to_str().unwrap()), Some(sh));
        assert_eq!(capability.find_program("ls"), None, "not granted");
        assert_eq!(capability.find_program("definitely-not-a-program"), None);
    }

    #[test]
    fn sandbox_ids_cannot_escape_the_sandboxes_directory() {
        let capability = ProcessCapability::new("/tmp/none".into(), "/bin/false".into(), &[]);
        for bad in ["../etc", "a/b", ""] {
            assert!(capability.workdir(bad).is_err(), "{bad}");
        }
    }
}
