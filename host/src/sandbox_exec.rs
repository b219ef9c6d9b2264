//! `sandboxer-host __exec DIR -- CMD...`: runs a command inside a running
//! sandbox, the way `sandbox exec` does.
//!
//! The command joins what the sandbox's own process has: its cgroup (or,
//! without one, the same resource limits), its user (`nobody` when the host
//! is root), and every namespace of the sandbox's first process (user,
//! mount, pid, network, ipc, uts, cgroup) with its root directory, so it
//! sees the sandbox's `/work`, its processes and nothing of the host.
//! bubblewrap nests a second user namespace inside the one that owns the
//! others, so the helper enters the outer one, then the others, then the
//! inner one. It then starts the command in a new session (no controlling
//! terminal to push keystrokes into), with no new privileges, and records
//! its CPU time in the sandbox's `exec-usage` so the sandbox's usage
//! includes it. Its exit status is the command's (125 when the sandbox
//! cannot be entered).
//!
//! It must run single-threaded: the kernel refuses to move a process that
//! shares its file-system context with other threads into a mount or user
//! namespace. The binary dispatches here before anything starts a thread.

use crate::runtime::process::{ProcessState, SpawnSpec, read_state};
use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode};

/// `sandbox exec`'s status when the sandbox could not be entered.
pub const EXIT_CANNOT_ENTER: u8 = 125;

/// The namespaces entered, besides the user namespaces.
const NAMESPACES: [&str; 6] = ["mnt", "pid", "net", "ipc", "uts", "cgroup"];

/// `ioctl(NS_GET_USERNS)`: the user namespace that owns a namespace.
const NS_GET_USERNS: libc::c_ulong = 0xb701;

/// `__exec DIR -- CMD...`.
pub fn run(dir: &Path, command: &[OsString]) -> ExitCode {
    match enter_and_run(dir, command) {
        Ok(code) => ExitCode::from(code),
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_CANNOT_ENTER)
        }
    }
}

fn os_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn inode(path: &str) -> Option<u64> {
    std::fs::metadata(path).ok().map(|metadata| metadata.ino())
}

fn setns(file: &File, what: &str) -> Result<(), String> {
    // SAFETY: setns on a namespace descriptor we opened.
    if unsafe { libc::setns(file.as_raw_fd(), 0) } != 0 {
        return Err(os_error(&format!(
            "cannot enter the sandbox's {what} namespace"
        )));
    }
    Ok(())
}

fn enter_and_run(dir: &Path, command: &[OsString]) -> Result<u8, String> {
    let id = dir
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (program, args) = command
        .split_first()
        .ok_or_else(|| "no command to run".to_string())?;
    let started = match read_state(dir) {
        Some(ProcessState::Running { started }) => started,
        Some(ProcessState::Exited(exited)) => {
            return Err(format!(
                "sandbox {id} is not running: {}",
                crate::sandbox_io::describe_end(&exited)
            ));
        }
        None => return Err(format!("sandbox {id} has no process on this machine")),
    };
    let spec: SpawnSpec = std::fs::read(dir.join("spawn.json"))
        .map_err(|error| error.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|error| error.to_string()))
        .map_err(|error| format!("cannot read the sandbox's spawn.json: {error}"))?;
    let target = started
        .namespace_pid
        .filter(|&pid| crate::supervisor::parent_of(pid) == Some(started.pid))
        .ok_or_else(|| {
            format!("sandbox {id} has no namespaces to enter (its program did not report them)")
        })?;

    // Everything is opened while the helper still may: as root, before it
    // becomes the sandbox user.
    let open =
        |path: String| File::open(&path).map_err(|error| format!("cannot open {path}: {error}"));
    let user = open(format!("/proc/{target}/ns/user"))?;
    let mut others = Vec::new();
    for name in NAMESPACES {
        // One the sandbox shares with the host (the network, when granted)
        // is not entered: the host's own is not the sandbox's to give.
        if inode(&format!("/proc/{target}/ns/{name}")) != inode(&format!("/proc/self/ns/{name}")) {
            others.push((name, open(format!("/proc/{target}/ns/{name}"))?));
        }
    }
    let owner = others
        .iter()
        .find(|(name, _)| *name == "mnt")
        .map(|(_, mount)| {
            // SAFETY: the ioctl returns a new descriptor or -1.
            let fd = unsafe { libc::ioctl(mount.as_raw_fd(), NS_GET_USERNS) };
            if fd < 0 {
                return Err(os_error("cannot find the sandbox's user namespace"));
            }
            // SAFETY: a fresh descriptor that nothing else owns.
            Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
        })
        .transpose()?;
    let root = open(format!("/proc/{target}/root"))?;
    let mut usage_record = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join("exec-usage"))
        .map_err(|error| format!("cannot open the sandbox's exec-usage: {error}"))?;

    if let Some(cgroup) = &started.cgroup {
        for procs in cgroup.procs_files() {
            std::fs::write(&procs, "0").map_err(|error| {
                format!(
                    "cannot join the sandbox's cgroup {}: {error}",
                    procs.display()
                )
            })?;
        }
    } else {
        apply_rlimits(&spec)?;
    }
    if let Some((uid, gid)) = spec.run_as {
        // SAFETY: plain system calls on our own credentials.
        let dropped = unsafe {
            libc::setgroups(0, std::ptr::null()) == 0
                && libc::setgid(gid) == 0
                && libc::setuid(uid) == 0
        };
        if !dropped {
            return Err(os_error("cannot become the sandbox user"));
        }
    }

    let user_inode = user.metadata().map(|metadata| metadata.ino()).ok();
    let own_user = inode("/proc/self/ns/user");
    let outer = owner.filter(|outer| {
        let outer_inode = outer.metadata().map(|metadata| metadata.ino()).ok();
        outer_inode != user_inode && outer_inode != own_user
    });
    if let Some(outer) = &outer {
        setns(outer, "outer user")?;
    } else if user_inode != own_user {
        setns(&user, "user")?;
    }
    for (name, file) in &others {
        setns(file, name)?;
    }
    if outer.is_some() {
        setns(&user, "user")?;
    }
    // SAFETY: changing this process's root and working directory.
    unsafe {
        if libc::fchdir(root.as_raw_fd()) != 0 || libc::chroot(c".".as_ptr()) != 0 {
            return Err(os_error("cannot enter the sandbox's root directory"));
        }
        if libc::chdir(c"/work".as_ptr()) != 0 && libc::chdir(c"/".as_ptr()) != 0 {
            return Err(os_error("cannot change to the sandbox's working directory"));
        }
        // Whatever it runs gains nothing: no setuid, no capabilities.
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        for capability in 0..64 {
            libc::prctl(libc::PR_CAPBSET_DROP, capability, 0, 0, 0);
        }
    }
    drop((user, others, root));

    let mut child = Command::new(program);
    child
        .args(args)
        .env_clear()
        .envs(spec.env.iter().map(|(key, value)| (key, value)));
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        child.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = child.spawn().map_err(|error| {
        let code = match error.kind() {
            std::io::ErrorKind::NotFound => 127,
            _ => 126,
        };
        eprintln!(
            "error: cannot run {} in sandbox {id}: {error}",
            program.to_string_lossy()
        );
        code
    });
    let child = match child {
        Ok(child) => child,
        Err(code) => return Ok(code),
    };
    let (status, usage) = wait(child.id() as i32);
    let millis = |time: libc::timeval| time.tv_sec as u64 * 1000 + time.tv_usec as u64 / 1000;
    let _ = writeln!(
        usage_record,
        "{}",
        millis(usage.ru_utime) + millis(usage.ru_stime)
    );
    Ok(if libc::WIFSIGNALED(status) {
        128u8.saturating_add(libc::WTERMSIG(status) as u8)
    } else {
        libc::WEXITSTATUS(status) as u8
    })
}

/// The sandbox's per-process limits, when it has no cgroup to join.
fn apply_rlimits(spec: &SpawnSpec) -> Result<(), String> {
    let mut max_processes = spec.max_processes;
    if spec.run_as.is_none() {
        max_processes =
            max_processes.saturating_add(crate::supervisor::processes_of_current_user());
    }
    for (resource, value) in [
        (libc::RLIMIT_AS, u64::from(spec.memory_mb) * 1024 * 1024),
        (libc::RLIMIT_CPU, u64::from(spec.cpu_secs.max(1))),
        (libc::RLIMIT_NPROC, u64::from(max_processes.max(1))),
        (libc::RLIMIT_CORE, 0),
    ] {
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(resource, &limit) } != 0 {
            return Err(os_error("cannot apply the sandbox's limits"));
        }
    }
    Ok(())
}

fn wait(pid: i32) -> (libc::c_int, libc::rusage) {
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data the kernel fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waiting for our own child, with valid out-pointers.
        let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if waited == pid
            || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
        {
            return (status, usage);
        }
    }
}
