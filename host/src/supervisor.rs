//! The supervisor of one sandbox process: `sandboxer-host __supervise DIR`.
//!
//! The `process` capability starts it; it forks its real self into a new
//! session and returns at once, so the real supervisor belongs to init and
//! outlives the host command. The real one reads `DIR/spawn.json`, makes the
//! sandbox's cgroup (or falls back to resource limits, see
//! [`crate::cgroups`]), starts the program in its own process group with the
//! limits applied (and as the sandbox user when the host is root), waits
//! until the sandbox is up, records `DIR/process.json`, kills the tree when
//! its wall-clock lifetime ends, waits for it, and records `DIR/exit.json`
//! with how it ended and what it used. Then it removes what belonged to the
//! running sandbox (its cgroup, `work/`, the stdin FIFO) and keeps its output.
//!
//! "Up" means: when the program reports its status (bubblewrap's
//! `--json-status-fd`), the sandbox's first process exists and has started
//! the command (it forks it only once the mounts are set up), or the command
//! already ended. A program that exits before that failed to set the sandbox
//! up: the supervisor records its own words (`bwrap: Can't find source
//! path ...`) in `DIR/spawn-error`, and `spawn` fails with them.
//!
//! Nothing here runs inside the host, whose threads make forking unsafe:
//! this is its own small process, with no lock held across a fork.

use crate::cgroups::{CgroupLimits, Enforcement, SandboxCgroup};
use crate::runtime::process::{EndCause, Exited, SpawnSpec, Started, now_ms};
use std::io::{BufRead, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a sandbox may take to come up before it counts as failed.
const START_PATIENCE: Duration = Duration::from_secs(10);

/// Writes a file whole or not at all (a reader never sees half of it).
pub(crate) fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, contents)?;
    std::fs::rename(&temporary, path)
}

/// How many processes the current (real) user has.
pub(crate) fn processes_of_current_user() -> u32 {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() }.to_string();
    proc_entries()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("Uid:"))
                    .and_then(|ids| ids.split_whitespace().next())
                    .is_some_and(|real| real == uid)
            })
        })
        .count() as u32
}

/// Every process id in /proc.
pub(crate) fn proc_entries() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
}

/// The parent of `pid`, from /proc/PID/stat (after the command name, which
/// may itself hold spaces and parentheses).
pub(crate) fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after_name) = stat.rsplit_once(')')?;
    after_name.split_whitespace().nth(1)?.parse().ok()
}

fn has_child(pid: i32) -> bool {
    proc_entries().any(|candidate| parent_of(candidate) == Some(pid))
}

/// `__supervise DIR`: starts the real supervisor detached and returns.
pub fn detach(dir: &Path) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(error) => {
            return fail(
                dir,
                &format!("cannot find the supervisor executable: {error}"),
            );
        }
    };
    let mut command = Command::new(exe);
    command
        .arg("__supervise-run")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe; it detaches the real supervisor
    // from the host's session and terminal.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    match command.spawn() {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => fail(dir, &format!("cannot start the supervisor: {error}")),
    }
}

fn fail(dir: &Path, message: &str) -> ExitCode {
    let _ = write_atomically(&dir.join("spawn-error"), message.as_bytes());
    ExitCode::FAILURE
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors it then hands over to us.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// What the program reports on its status pipe.
enum StatusEvent {
    /// The sandbox's first process (in its namespaces).
    ChildPid(i32),
    /// The sandbox's command ended with this code.
    ExitCode(i32),
}

/// Reads bubblewrap-style JSON status lines until the pipe closes.
fn read_status(pipe: OwnedFd, events: mpsc::Sender<StatusEvent>) {
    let reader = std::io::BufReader::new(std::fs::File::from(pipe));
    for line in reader.lines() {
        let Ok(line) = line else { break };
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let number = |key: &str| value.get(key).and_then(serde_json::Value::as_i64);
        if let Some(pid) = number("child-pid") {
            let _ = events.send(StatusEvent::ChildPid(pid as i32));
        }
        if let Some(code) = number("exit-code") {
            let _ = events.send(StatusEvent::ExitCode(code as i32));
        }
    }
}

/// Copies whatever writers put into the `stdin` FIFO to the process's
/// stdin, and closes it when they are done (the process then reads EOF).
fn pump_stdin(fifo: &Path, to_process: OwnedFd) {
    let Ok(mut from) = std::fs::File::open(fifo) else {
        return;
    };
    let mut to = std::fs::File::from(to_process);
    let mut buffer = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => {
                if std::io::Write::write_all(&mut to, &buffer[..read]).is_err() {
                    break;
                }
            }
        }
    }
}

/// The sandbox's first lines of output from its program, for an error.
fn program_words(dir: &Path) -> String {
    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
    let words: Vec<&str> = stderr.lines().filter(|line| !line.is_empty()).collect();
    if words.is_empty() {
        "it said nothing".to_string()
    } else {
        words[..words.len().min(3)].join("; ")
    }
}

/// `wait4` on the program, blocking or not; the status and usage once it
/// has ended.
fn wait_for(pid: i32, block: bool) -> Option<(libc::c_int, libc::rusage)> {
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data the kernel fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let flags = if block { 0 } else { libc::WNOHANG };
    loop {
        // SAFETY: waiting for our own child, with valid out-pointers.
        let waited = unsafe { libc::wait4(pid, &mut status, flags, &mut usage) };
        if waited == pid {
            return Some((status, usage));
        }
        if waited == 0 {
            return None;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // Not our child any more (cannot happen): treat it as ended.
            return Some((status, usage));
        }
    }
}

/// `__supervise-run DIR`: the real supervisor.
pub fn run(dir: &Path) -> ExitCode {
    // A write to a stdin whose process has gone must fail, not kill us. The
    // program gets the default disposition back before it starts.
    // SAFETY: setting a signal disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let spec: SpawnSpec = match std::fs::read(dir.join("spawn.json"))
        .map_err(|error| error.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|error| error.to_string()))
    {
        Ok(spec) => spec,
        Err(error) => return fail(dir, &format!("cannot read spawn.json: {error}")),
    };
    let open = |name: &str| std::fs::File::create(dir.join(name));
    let (stdout, stderr) = match (open("stdout"), open("stderr")) {
        (Ok(stdout), Ok(stderr)) => (stdout, stderr),
        (Err(error), _) | (_, Err(error)) => {
            return fail(dir, &format!("cannot create the output files: {error}"));
        }
    };

    let (cgroup, cgroup_unavailable) = match SandboxCgroup::create(
        &spec.sandbox_id,
        CgroupLimits {
            memory_mb: spec.memory_mb,
            max_processes: spec.max_processes,
            cpu_millis: spec.cpu_millis,
        },
    ) {
        Ok(cgroup) => (Some(cgroup), None),
        Err(reason) => (None, Some(reason)),
    };
    let enforcement = cgroup
        .as_ref()
        .map_or(Enforcement::Rlimits, |cgroup| cgroup.version);
    let mut procs_files = Vec::new();
    for file in cgroup.iter().flat_map(SandboxCgroup::procs_files) {
        match std::fs::OpenOptions::new().write(true).open(&file) {
            Ok(opened) => procs_files.push(opened),
            Err(error) => {
                cgroup.iter().for_each(SandboxCgroup::remove);
                return fail(dir, &format!("cannot open {}: {error}", file.display()));
            }
        }
    }

    let status_pipe = match spec.status_fd.map(|_| pipe()).transpose() {
        Ok(pipe) => pipe,
        Err(error) => return fail(dir, &format!("cannot make the status pipe: {error}")),
    };
    let stdin_fifo = dir.join("stdin");
    let (stdin, stdin_feed) = if spec.pipe_stdin {
        let fifo =
            std::ffi::CString::new(stdin_fifo.as_os_str().as_encoded_bytes()).unwrap_or_default();
        let _ = std::fs::remove_file(&stdin_fifo);
        // SAFETY: mkfifo reads a valid C string.
        if unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) } != 0 {
            let error = std::io::Error::last_os_error();
            return fail(dir, &format!("cannot make the stdin FIFO: {error}"));
        }
        match pipe() {
            Ok((read, write)) => (Stdio::from(read), Some(write)),
            Err(error) => return fail(dir, &format!("cannot make the stdin pipe: {error}")),
        }
    } else {
        (Stdio::null(), None)
    };

    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(key, value)| (key, value)))
        // Not the sandbox's directory: under a private home the sandbox
        // user could not even look up its own working directory.
        .current_dir("/")
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr);
    // The process limit counts every process of the user. Running as the
    // sandbox user, that is the sandboxes'; otherwise it is the operator's
    // own too, so the sandbox gets its allowance on top of those.
    let mut limits = spec.clone();
    if limits.run_as.is_none() {
        limits.max_processes = limits
            .max_processes
            .saturating_add(processes_of_current_user());
    }
    let per_process_limits = cgroup.is_none();
    let procs_fds: Vec<i32> = procs_files.iter().map(AsRawFd::as_raw_fd).collect();
    let status_fds = status_pipe
        .as_ref()
        .map(|(_, write)| write.as_raw_fd())
        .zip(spec.status_fd);
    // SAFETY: only async-signal-safe calls (signal, setpgid, write,
    // setrlimit, dup2, fcntl, setgroups, setgid, setuid) run between fork
    // and exec, on descriptors opened before the fork.
    unsafe {
        command.pre_exec(move || {
            let check = |result: libc::c_int| {
                if result < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            let limit = |resource, value: u64| {
                let limit = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                check(libc::setrlimit(resource, &limit))
            };
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            check(libc::setpgid(0, 0))?;
            // Into the sandbox's cgroup before anything else can fork.
            for &fd in &procs_fds {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if per_process_limits {
                limit(libc::RLIMIT_AS, u64::from(limits.memory_mb) * 1024 * 1024)?;
                limit(libc::RLIMIT_CPU, u64::from(limits.cpu_secs.max(1)))?;
                limit(libc::RLIMIT_NPROC, u64::from(limits.max_processes.max(1)))?;
            }
            limit(libc::RLIMIT_CORE, 0)?;
            if let Some((write, wanted)) = status_fds {
                let wanted = wanted as libc::c_int;
                if write == wanted {
                    check(libc::fcntl(write, libc::F_SETFD, 0))?;
                } else {
                    check(libc::dup2(write, wanted))?;
                }
            }
            if let Some((uid, gid)) = limits.run_as {
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setgid(gid))?;
                check(libc::setuid(uid))?;
            }
            Ok(())
        });
    }
    let started_at = Instant::now();
    let spawned = command.spawn();
    // The program's copies are its own now; ours would keep pipes open.
    drop(command);
    drop(procs_files);
    let child = match spawned {
        Ok(child) => child,
        Err(error) => {
            cgroup.iter().for_each(SandboxCgroup::remove);
            return fail(
                dir,
                &format!("cannot start {}: {error}", spec.program.display()),
            );
        }
    };
    let pid = child.id() as i32;
    let kill_group = move || {
        // SAFETY: a signal to the sandbox's own process group.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    };

    let (events_sender, events) = mpsc::channel();
    if let Some((read, write)) = status_pipe {
        drop(write);
        std::thread::spawn(move || read_status(read, events_sender));
    }
    let mut namespace_pid = None;
    let mut command_exit_code = None;
    let mut ended = None;
    if spec.status_fd.is_some() {
        let deadline = started_at + START_PATIENCE;
        loop {
            while let Ok(event) = events.try_recv() {
                match event {
                    StatusEvent::ChildPid(child_pid) => namespace_pid = Some(child_pid),
                    StatusEvent::ExitCode(code) => command_exit_code = Some(code),
                }
            }
            let up = command_exit_code.is_some() || namespace_pid.is_some_and(has_child);
            if up {
                break;
            }
            if let Some(status) = wait_for(pid, false) {
                // Ended: a last look for an exit code it reported.
                while let Ok(event) = events.recv_timeout(Duration::from_millis(200)) {
                    if let StatusEvent::ExitCode(code) = event {
                        command_exit_code = Some(code);
                    }
                }
                if command_exit_code.is_none() {
                    cgroup.iter().for_each(SandboxCgroup::kill_all);
                    cgroup.iter().for_each(SandboxCgroup::remove);
                    return fail(
                        dir,
                        &format!("the sandbox could not be set up: {}", program_words(dir)),
                    );
                }
                ended = Some(status);
                break;
            }
            if Instant::now() > deadline {
                kill_group();
                cgroup.iter().for_each(SandboxCgroup::kill_all);
                let _ = wait_for(pid, true);
                cgroup.iter().for_each(SandboxCgroup::remove);
                return fail(
                    dir,
                    &format!(
                        "the sandbox did not come up within {} s: {}",
                        START_PATIENCE.as_secs(),
                        program_words(dir)
                    ),
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    let started = Started {
        pid,
        supervisor_pid: std::process::id() as i32,
        started_ms: now_ms(),
        namespace_pid,
        enforcement,
        cgroup: cgroup.clone(),
        cgroup_unavailable,
    };
    if let Err(error) = write_atomically(
        &dir.join("process.json"),
        &serde_json::to_vec(&started).unwrap_or_default(),
    ) {
        kill_group();
        cgroup.iter().for_each(SandboxCgroup::kill_all);
        return fail(dir, &format!("cannot record the process: {error}"));
    }
    if let Some(feed) = stdin_feed {
        let fifo = stdin_fifo.clone();
        std::thread::spawn(move || pump_stdin(&fifo, feed));
    }

    // The wall-clock lifetime, enforced even if no host command comes by.
    let wall_reached = Arc::new(AtomicBool::new(false));
    let wall = Duration::from_secs(u64::from(spec.wall_secs.max(1)));
    {
        let wall_reached = wall_reached.clone();
        let cgroup = cgroup.clone();
        std::thread::spawn(move || {
            std::thread::sleep(wall.saturating_sub(started_at.elapsed()));
            wall_reached.store(true, Ordering::SeqCst);
            kill_group();
            cgroup.iter().for_each(SandboxCgroup::kill_all);
        });
    }

    let (status, usage) = ended.unwrap_or_else(|| wait_for(pid, true).unwrap_or((0, no_usage())));
    let wall_ms = started_at.elapsed().as_millis() as u64;
    // Whatever the program left behind goes with it.
    kill_group();
    cgroup.iter().for_each(SandboxCgroup::kill_all);
    let exit_code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    let signal = libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status));
    let killed_by_sigkill = signal == Some(libc::SIGKILL) || exit_code == Some(128 + libc::SIGKILL);
    let ended_by = if wall_reached.load(Ordering::SeqCst) {
        EndCause::WallClock
    } else if dir.join("kill-requested").exists() {
        EndCause::Killed
    } else if killed_by_sigkill && cgroup.as_ref().is_some_and(SandboxCgroup::memory_limit_hit) {
        EndCause::MemoryLimit
    } else {
        EndCause::Exited
    };
    let millis = |time: libc::timeval| time.tv_sec as u64 * 1000 + time.tv_usec as u64 / 1000;
    let tree_cpu_ms = millis(usage.ru_utime) + millis(usage.ru_stime) + exec_cpu_ms(dir);
    let peak_memory_kb = (usage.ru_maxrss.max(0) as u64).max(
        cgroup
            .as_ref()
            .and_then(SandboxCgroup::peak_memory_bytes)
            .map_or(0, |bytes| bytes / 1024),
    );
    let exited = Exited {
        exit_code,
        signal,
        ended_by,
        enforcement,
        wall_ms,
        cpu_ms: cgroup
            .as_ref()
            .and_then(SandboxCgroup::cpu_ms)
            .unwrap_or(tree_cpu_ms),
        peak_memory_kb,
        ended_ms: now_ms(),
    };
    cgroup.iter().for_each(SandboxCgroup::remove);
    // The sandbox is over: its working files go, its output stays.
    let _ = std::fs::remove_dir_all(dir.join("work"));
    let _ = std::fs::remove_file(&stdin_fifo);
    let _ = write_atomically(
        &dir.join("exit.json"),
        &serde_json::to_vec(&exited).unwrap_or_default(),
    );
    ExitCode::SUCCESS
}

fn no_usage() -> libc::rusage {
    // SAFETY: rusage is plain data; all zeros is a valid value.
    unsafe { std::mem::zeroed() }
}

/// CPU time of commands `sandbox exec` ran in the sandbox (one number of
/// milliseconds per line of `exec-usage`).
fn exec_cpu_ms(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("exec-usage"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse::<u64>().ok())
        .fold(0, u64::saturating_add)
}
