//! The `process` capability: an extension granted it may start the programs
//! its sidecar lists, one process tree per sandbox, and watch and kill it,
//! but only for the sandbox the current call is about (see [`check_scope`]).
//!
//! Each sandbox has a directory `<sandboxes>/<sandbox id>/`:
//!
//! | file | written by | what |
//! |---|---|---|
//! | `spawn.json` | the capability | the program, arguments, environment, limits |
//! | `work/` | the capability, on request | a host working directory (removed when the tree ends) |
//! | `stdout`, `stderr` | the process | its output, readable while it runs and kept after |
//! | `stdin` | the supervisor | a FIFO feeding the process's stdin, when the host pipes it |
//! | `process.json` | the supervisor | the process group, its namespaces, how limits apply |
//! | `exit.json` | the supervisor | how it ended and what it used |
//! | `kill-requested` | the capability | `kill` asked for the end (so it is not taken for a crash) |
//! | `exec-usage` | `sandbox exec` | CPU time of commands run in it, one line each |
//!
//! A process is started by a small supervisor (`sandboxer-host __supervise`)
//! that detaches from the host (its own session, reparented to init), so a
//! sandbox outlives the command that created it. The supervisor applies the
//! limits, starts the program in its own process group, waits for it and
//! records its status and usage (see [`crate::supervisor`]).

use crate::cgroups::{Enforcement, SandboxCgroup};
use crate::names::check_name;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What the supervisor needs to start a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnSpec {
    pub sandbox_id: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub memory_mb: u32,
    pub cpu_secs: u32,
    pub cpu_millis: u32,
    pub max_processes: u32,
    pub wall_secs: u32,
    /// Run as this user and group (when the host runs as root).
    pub run_as: Option<(u32, u32)>,
    /// Where the program reports its status (bubblewrap `--json-status-fd`).
    pub status_fd: Option<u32>,
    /// Feed the process's stdin from the `stdin` FIFO (else /dev/null).
    pub pipe_stdin: bool,
}

/// Limits on one sandbox's process tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_mb: u32,
    pub cpu_secs: u32,
    pub cpu_millis: u32,
    pub max_processes: u32,
    pub wall_secs: u32,
}

/// `process.json`: the process is running (or was).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// The process id, which is also its process group.
    pub pid: i32,
    /// The supervisor waiting for it.
    pub supervisor_pid: i32,
    pub started_ms: u64,
    /// The first process inside the sandbox's namespaces, as the program
    /// reported it: what `sandbox exec` enters.
    #[serde(default)]
    pub namespace_pid: Option<i32>,
    pub enforcement: Enforcement,
    /// The sandbox's cgroup, when it has one.
    #[serde(default)]
    pub cgroup: Option<SandboxCgroup>,
    /// Why no cgroup could be made, when none was.
    #[serde(default)]
    pub cgroup_unavailable: Option<String>,
}

/// Why a process tree ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndCause {
    /// Its program exited, or a signal from inside ended it.
    Exited,
    /// Its wall-clock lifetime (the ttl) ran out.
    WallClock,
    /// `kill` (a destroy) ended it.
    Killed,
    /// The kernel killed it at its cgroup's memory limit.
    MemoryLimit,
    /// Its supervisor was killed before it could say.
    Unknown,
}

/// `exit.json`: how the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exited {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub ended_by: EndCause,
    pub enforcement: Enforcement,
    pub wall_ms: u64,
    pub cpu_ms: u64,
    pub peak_memory_kb: u64,
    /// When it ended (milliseconds since the epoch).
    pub ended_ms: u64,
}

/// The host's view of a sandbox's process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ProcessState {
    Running { started: Started },
    Exited(Exited),
}

/// The user sandboxes run as when the host runs as root: `nobody`, so that
/// the process limit applies (it does not to root) and host files owned by
/// root stay out of reach even where they are bound in.
pub const SANDBOX_USER: (u32, u32) = (65534, 65534);

/// Descriptor numbers a program may ask its status pipe at.
pub const STATUS_FD_RANGE: std::ops::RangeInclusive<u32> = 3..=63;

/// How long `spawn` waits for a sandbox to start (or to fail to).
const START_PATIENCE: Duration = Duration::from_secs(15);

/// The function of the current call that touches the capability; other
/// calls (`estimate-cost`, `meter-actual`, `info`) have none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxFunction {
    Create,
    Destroy,
}

/// The sandbox a `create` or `destroy` call is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxCall {
    pub function: SandboxFunction,
    pub sandbox_id: String,
}

impl SandboxCall {
    pub fn create(sandbox_id: &str) -> Self {
        Self {
            function: SandboxFunction::Create,
            sandbox_id: sandbox_id.to_string(),
        }
    }

    pub fn destroy(sandbox_id: &str) -> Self {
        Self {
            function: SandboxFunction::Destroy,
            sandbox_id: sandbox_id.to_string(),
        }
    }
}

/// What an extension asks of the capability, for [`check_scope`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `spawn` and `workdir`: only while creating that sandbox.
    Start,
    /// `status` and `kill`: while creating or destroying that sandbox.
    Watch,
}

/// The rule that keeps every process inside a sandbox the host tracks and
/// bills: a program starts only during `create`, for the sandbox being
/// created; a tree is watched or killed only during `create` or `destroy`
/// of that sandbox. The error names the rule.
pub fn check_scope(
    current: Option<&SandboxCall>,
    operation: Operation,
    sandbox_id: &str,
) -> Result<(), String> {
    check_name("sandbox", sandbox_id)?;
    let (verb, allowed): (&str, &[SandboxFunction]) = match operation {
        Operation::Start => ("starts programs", &[SandboxFunction::Create]),
        Operation::Watch => (
            "watches and kills processes",
            &[SandboxFunction::Create, SandboxFunction::Destroy],
        ),
    };
    let during = if allowed.len() == 1 {
        "`create`"
    } else {
        "`create` or `destroy`"
    };
    match current {
        Some(call) if allowed.contains(&call.function) => {
            if call.sandbox_id == sandbox_id {
                Ok(())
            } else {
                Err(format!(
                    "the process capability {verb} only for the sandbox this call is about (`{}`), not `{sandbox_id}`",
                    call.sandbox_id
                ))
            }
        }
        _ => Err(format!(
            "the process capability {verb} only during {during}, for that call's sandbox: this call is not one"
        )),
    }
}

/// Where sandboxes live and how their processes start; shared by the
/// instances granted `process`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSettings {
    pub sandboxes_dir: PathBuf,
    /// The sandboxer-host binary, run as `__supervise`.
    pub supervisor: PathBuf,
    /// Feed each new sandbox's stdin from its `stdin` FIFO (`run` attaches
    /// its own stdin there); otherwise stdin is /dev/null.
    pub pipe_stdin: bool,
}

/// The directories and programs of the capability, shared by the instances
/// that are granted it.
#[derive(Debug, Clone)]
pub struct ProcessCapability {
    settings: ProcessSettings,
    /// Each granted program as written in the sidecar, and where it resolved.
    granted: Vec<(String, Option<PathBuf>)>,
}

pub(crate) fn now_ms() -> u64 {
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
    pub fn new(settings: ProcessSettings, grants: &[String]) -> Self {
        let granted = grants
            .iter()
            .map(|name| (name.clone(), resolve_program(name)))
            .collect();
        Self { settings, granted }
    }

    /// Where the sandboxes' directories are.
    pub fn sandboxes_dir(&self) -> &Path {
        &self.settings.sandboxes_dir
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
        Ok(self.settings.sandboxes_dir.join(sandbox_id))
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

    /// Starts the sandbox's process through the supervisor and returns once
    /// it runs (with a status descriptor: once the sandbox's command runs),
    /// or with the reason it could not start. A second call while it exists
    /// does nothing.
    pub fn spawn(
        &self,
        sandbox_id: &str,
        program: &str,
        args: Vec<String>,
        env: Vec<(String, String)>,
        limits: Limits,
        status_fd: Option<u32>,
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
        if let Some(fd) = status_fd
            && !STATUS_FD_RANGE.contains(&fd)
        {
            return Err(format!(
                "status-fd {fd} is out of range: use {} to {}",
                STATUS_FD_RANGE.start(),
                STATUS_FD_RANGE.end()
            ));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
        let spec = SpawnSpec {
            sandbox_id: sandbox_id.to_string(),
            program: program_path,
            args,
            env,
            memory_mb: limits.memory_mb,
            cpu_secs: limits.cpu_secs,
            cpu_millis: limits.cpu_millis,
            max_processes: limits.max_processes,
            wall_secs: limits.wall_secs,
            run_as: run_as(),
            status_fd,
            pipe_stdin: self.settings.pipe_stdin,
        };
        let json = serde_json::to_string_pretty(&spec).map_err(|error| error.to_string())?;
        std::fs::write(dir.join("spawn.json"), json)
            .map_err(|error| format!("cannot write spawn.json: {error}"))?;
        let _ = std::fs::remove_file(dir.join("spawn-error"));

        // The supervisor forks its real self and returns at once: waiting for
        // it here leaves no zombie, and the real one belongs to init.
        let status = std::process::Command::new(&self.settings.supervisor)
            .arg("__supervise")
            .arg(&dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map_err(|error| {
                format!(
                    "cannot start the supervisor {}: {error}",
                    self.settings.supervisor.display()
                )
            })?;
        if !status.success() {
            return Err(spawn_error(&dir)
                .unwrap_or_else(|| format!("the supervisor failed to start ({status})")));
        }
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            if let Some(error) = spawn_error(&dir) {
                return Err(error);
            }
            if read_state(&dir).is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the process did not start within {} s",
                    START_PATIENCE.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn status(&self, sandbox_id: &str) -> Result<Option<ProcessState>, String> {
        Ok(read_state(&self.sandbox_dir(sandbox_id)?))
    }

    /// Kills the sandbox's whole tree if it still runs, and waits for the
    /// supervisor to record the end.
    pub fn kill(&self, sandbox_id: &str) -> Result<Option<ProcessState>, String> {
        kill_tree(&self.sandbox_dir(sandbox_id)?)
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

fn spawn_error(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("spawn-error"))
        .ok()
        .map(|error| error.trim().to_string())
}

/// Kills the tree recorded in `dir` (its process group and, with a cgroup,
/// everything in it) and waits for its supervisor to record the end.
pub(crate) fn kill_tree(dir: &Path) -> Result<Option<ProcessState>, String> {
    let Some(ProcessState::Running { started }) = read_state(dir) else {
        return Ok(read_state(dir));
    };
    // Told first, so the supervisor records a kill rather than a crash.
    let _ = std::fs::write(dir.join("kill-requested"), b"");
    // SAFETY: sending a signal has no memory effects; a negative pid
    // names the process group the supervisor gave the process.
    unsafe {
        libc::kill(-started.pid, libc::SIGKILL);
    }
    if let Some(cgroup) = &started.cgroup {
        cgroup.kill_all();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(ProcessState::Exited(exited)) = read_state(dir) {
            return Ok(Some(ProcessState::Exited(exited)));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!(
        "process group {} did not end within 5 s of SIGKILL",
        started.pid
    ))
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
        ended_by: EndCause::Unknown,
        enforcement: started.enforcement,
        wall_ms: now_ms().saturating_sub(started.started_ms),
        cpu_ms: 0,
        peak_memory_kb: 0,
        ended_ms: now_ms(),
    }))
}

impl ProcessState {
    pub fn wall_ms(&self) -> u64 {
        match self {
            Self::Running { started } => now_ms().saturating_sub(started.started_ms),
            Self::Exited(exited) => exited.wall_ms,
        }
    }

    pub fn enforcement(&self) -> Enforcement {
        match self {
            Self::Running { started } => started.enforcement,
            Self::Exited(exited) => exited.enforcement,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capability(grants: &[String]) -> ProcessCapability {
        ProcessCapability::new(
            ProcessSettings {
                sandboxes_dir: "/tmp/none".into(),
                supervisor: "/bin/false".into(),
                pipe_stdin: false,
            },
            grants,
        )
    }

    #[test]
    fn resolves_names_on_path_and_refuses_what_is_not_granted() {
        let capability = capability(&["sh".into()]);
        let sh = resolve_program("sh").expect("sh exists");
        assert_eq!(capability.find_program("sh"), Some(sh.clone()));
        assert_eq!(capability.find_program(sh.to_str().unwrap()), Some(sh));
        assert_eq!(capability.find_program("ls"), None, "not granted");
        assert_eq!(capability.find_program("definitely-not-a-program"), None);
    }

    #[test]
    fn sandbox_ids_cannot_escape_the_sandboxes_directory() {
        let capability = capability(&[]);
        for bad in ["../etc", "a/b", "", ".", ".."] {
            assert!(capability.workdir(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn programs_start_only_in_create_for_the_sandbox_being_created() {
        let create = SandboxCall {
            function: SandboxFunction::Create,
            sandbox_id: "sbx-1".into(),
        };
        let destroy = SandboxCall {
            function: SandboxFunction::Destroy,
            sandbox_id: "sbx-1".into(),
        };
        assert_eq!(
            check_scope(Some(&create), Operation::Start, "sbx-1"),
            Ok(())
        );
        assert_eq!(
            check_scope(Some(&destroy), Operation::Watch, "sbx-1"),
            Ok(())
        );

        let outside = check_scope(None, Operation::Start, "sbx-1").unwrap_err();
        assert!(
            outside.contains("starts programs only during `create`"),
            "{outside}"
        );
        let in_destroy = check_scope(Some(&destroy), Operation::Start, "sbx-1").unwrap_err();
        assert!(in_destroy.contains("only during `create`"), "{in_destroy}");
        let other = check_scope(Some(&create), Operation::Start, "sbx-2").unwrap_err();
        assert!(
            other.contains("only for the sandbox this call is about (`sbx-1`), not `sbx-2`"),
            "{other}"
        );
        let watch_outside = check_scope(None, Operation::Watch, "sbx-1").unwrap_err();
        assert!(
            watch_outside.contains("only during `create` or `destroy`"),
            "{watch_outside}"
        );
        let dots = check_scope(Some(&create), Operation::Start, "..").unwrap_err();
        assert!(dots.contains("made only of dots"), "{dots}");
    }
}
