//! The supervisor of one sandbox process: `sandboxer-host __supervise DIR`.
//!
//! The `process` capability starts it; it forks its real self into a new
//! session and returns at once, so the real supervisor belongs to init and
//! outlives the host command. The real one reads `DIR/spawn.json`, starts
//! the program in its own process group with the limits applied (and as the
//! sandbox user when the host is root), records `DIR/process.json`, kills
//! the group when its wall-clock lifetime ends, waits for it, and records
//! `DIR/exit.json` with the exit status and the tree's usage.
//!
//! It is its own small process: nothing here may run inside the host,
//! whose threads make forking unsafe.

use crate::runtime::process::{Exited, SpawnSpec, Started};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// Writes a file whole or not at all (a reader never sees half of it).
fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, contents)?;
    std::fs::rename(&temporary, path)
}

/// How many processes the current (real) user has.
fn processes_of_current_user() -> u32 {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() }.to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.bytes().all(|byte| byte.is_ascii_digit()))
        })
        .filter(|entry| {
            std::fs::read_to_string(entry.path().join("status")).is_ok_and(|status| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("Uid:"))
                    .and_then(|ids| ids.split_whitespace().next())
                    .is_some_and(|real| real == uid)
            })
        })
        .count() as u32
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

/// `__supervise-run DIR`: the real supervisor.
pub fn run(dir: &Path) -> ExitCode {
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

    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(key, value)| (key, value)))
        .current_dir(dir)
        .stdin(Stdio::null())
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
    // SAFETY: only async-signal-safe calls (setpgid, setrlimit, setgroups,
    // setgid, setuid) run between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let limit = |resource, value: u64| {
                let limit = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                if libc::setrlimit(resource, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            limit(libc::RLIMIT_AS, u64::from(limits.memory_mb) * 1024 * 1024)?;
            limit(libc::RLIMIT_CPU, u64::from(limits.cpu_secs.max(1)))?;
            limit(libc::RLIMIT_NPROC, u64::from(limits.max_processes.max(1)))?;
            limit(libc::RLIMIT_CORE, 0)?;
            if let Some((uid, gid)) = limits.run_as
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started_at = Instant::now();
    let child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            return fail(
                dir,
                &format!("cannot start {}: {error}", spec.program.display()),
            );
        }
    };
    let pid = child.id() as i32;
    let started = Started {
        pid,
        supervisor_pid: std::process::id() as i32,
        started_ms: now_ms(),
    };
    if let Err(error) = write_atomically(
        &dir.join("process.json"),
        &serde_json::to_vec(&started).unwrap_or_default(),
    ) {
        // SAFETY: killing the group just started; nobody could track it.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        return fail(dir, &format!("cannot record the process: {error}"));
    }

    // The wall-clock lifetime, enforced even if no host command comes by.
    let wall = Duration::from_secs(u64::from(spec.wall_secs.max(1)));
    std::thread::spawn(move || {
        std::thread::sleep(wall);
        // SAFETY: a signal to the sandbox's own process group.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    });

    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data the kernel fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waiting for our own child, with valid out-pointers.
        let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if waited == pid {
            break;
        }
        if waited == -1 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
        {
            break;
        }
    }
    // Whatever the program left in its group goes with it.
    // SAFETY: a signal to the sandbox's own process group.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    let millis = |time: libc::timeval| time.tv_sec as u64 * 1000 + time.tv_usec as u64 / 1000;
    let exited = Exited {
        exit_code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
        wall_ms: started_at.elapsed().as_millis() as u64,
        cpu_ms: millis(usage.ru_utime) + millis(usage.ru_stime),
        peak_memory_kb: usage.ru_maxrss.max(0) as u64,
    };
    let _ = write_atomically(
        &dir.join("exit.json"),
        &serde_json::to_vec(&exited).unwrap_or_default(),
    );
    ExitCode::SUCCESS
}
