//! The local backend: real bubblewrap sandboxes started through the host's
//! `process` capability. Each test runs a command inside a sandbox and
//! checks what it could not do (the specific refusal the sandbox gave, not
//! just a failure, which bubblewrap failing to start would also give), or
//! what the host saw it do.
//!
//! Every home here is a fresh temp dir made mode 0700, like a new user's:
//! as root, the sandbox runs as `nobody`, who cannot enter it. These need
//! bubblewrap and user namespaces (`cargo xtask test` installs bubblewrap).
//! Where the machine cannot make a sandbox at all, the tests fail: a
//! workload never runs unsandboxed, and neither do these.

use crate::support::*;
use sandboxer_host::runtime::process::{SpawnSpec, read_state};
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// A home with the local and saas-stub backends and the shipped profiles;
/// `config` adds lines to the local instance's `[config]`.
fn home_with_local(config: &str) -> TestHome {
    let home = TestHome::new().with_saas_stub().with_shipped_profiles();
    // Private, like a new user's home or `mktemp -d`: as root, the sandbox
    // runs as nobody, who cannot enter it.
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    install(&built_extensions(), "local", &home.extensions(), "local");
    std::fs::write(
        home.extensions().join("local.toml"),
        format!("[grants]\nprocess = [\"bwrap\"]\n[config]\n{config}\n"),
    )
    .unwrap();
    home
}

/// A profile on the local backend: `[sandbox]` lines, explicit route.
fn local_profile(home: &TestHome, name: &str, sandbox: &str) {
    std::fs::write(
        home.profiles().join(format!("{name}.toml")),
        format!(
            "description = \"{name}\"\n[sandbox]\n{sandbox}\n[route]\nstrategy = \"explicit\"\nextension = \"local\"\n"
        ),
    )
    .unwrap();
}

/// `run --profile local --json -- CMD...`: the summary and the run, whatever
/// it exited with.
fn run_in_sandbox(home: &TestHome, extra: &[&str], command: &[&str]) -> (serde_json::Value, Run) {
    let mut args = vec!["run", "--profile", "local", "--json"];
    args.extend(extra);
    args.push("--");
    args.extend(command);
    let run = home.run(&args);
    (run.json(), run)
}

/// The command's stderr as `run --json` captured it.
fn stderr_of(summary: &serde_json::Value) -> &str {
    summary["stderr"]["text"].as_str().unwrap_or_default()
}

fn stdout_of(summary: &serde_json::Value) -> &str {
    summary["stdout"]["text"].as_str().unwrap_or_default()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Waits (polling) until the sandbox `id` has a process running.
fn wait_until_running(home: &TestHome, id: &str) {
    for _ in 0..1000 {
        if home
            .path()
            .join("sandboxes")
            .join(id)
            .join("process.json")
            .is_file()
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("sandbox {id} never started a process");
}

#[test]
fn run_prints_the_commands_output_and_bills_at_the_local_rate() {
    let home = home_with_local("rate_per_vcpu_hour = \"0.36\"");
    let mode = std::fs::metadata(home.path()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "a private home, like a new user's");
    let run = home
        .run(&[
            "run",
            "--profile",
            "local",
            "--",
            "python3",
            "-c",
            "print(6*7)",
        ])
        .ok();
    assert_eq!(
        run.stdout.lines().next(),
        Some("42"),
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    assert!(run.stdout.contains("on local: destroyed"), "{}", run.stdout);

    let (summary, run) = run_in_sandbox(&home, &[], &["sh", "-c", "echo to-stderr >&2; exit 3"]);
    assert_eq!(run.code, 3, "run exits with the command's own status");
    assert_eq!(summary["exit_code"], 3);
    assert_eq!(summary["exit_status"], 3);
    assert_eq!(summary["ended_by"], "exited");
    assert_eq!(stderr_of(&summary), "to-stderr\n");
    assert_eq!(summary["kind"], "self-hosted");
    // 0.36 credits per vCPU-hour is 0.0001 per second; a short command
    // starts one second.
    assert_eq!(summary["actual"], "0.000100");
    let shown = home.run(&["credits", "show", "--json"]).ok().json();
    assert_eq!(shown["held"], "0.000000");
    home.run(&["ledger", "verify"]).ok();
}

/// A home of `user`: chowned to it, so the binary run as that user owns
/// every file it makes there.
fn hand_over(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    if path.is_dir() && !path.is_symlink() {
        for entry in std::fs::read_dir(path).unwrap() {
            hand_over(&entry.unwrap().path(), uid, gid);
        }
    }
}

/// The uid and gid of a normal user to run the binary as: as root, a test
/// user made for it; otherwise the current user.
fn normal_user() -> (u32, u32) {
    if !is_root() {
        // SAFETY: getuid and getgid have no preconditions.
        return unsafe { (libc::getuid(), libc::getgid()) };
    }
    const USER: &str = "sandboxer-test";
    let id = |flag: &str| {
        std::process::Command::new("id")
            .args([flag, USER])
            .output()
            .ok()
            .filter(|output| output.status.success())
            .and_then(|output| String::from_utf8_lossy(&output.stdout).trim().parse().ok())
    };
    if id("-u").is_none() {
        let made = std::process::Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                USER,
            ])
            .output()
            .expect("useradd runs");
        let stderr = String::from_utf8_lossy(&made.stderr);
        // Another test run may have made it meanwhile.
        assert!(
            made.status.success() || stderr.contains("already exists"),
            "useradd {USER}: {stderr}"
        );
    }
    (id("-u").unwrap(), id("-g").unwrap())
}

#[test]
fn a_private_home_works_as_root_and_as_a_normal_user() {
    // As root (when the tests run as root): the sandbox runs as nobody, who
    // cannot enter the 0700 home; nothing of it has to be reachable.
    let home = home_with_local("");
    let (summary, run) = run_in_sandbox(
        &home,
        &[],
        &["sh", "-c", "id -u; echo 42 > /work/x; cat /work/x"],
    );
    assert_eq!(run.code, 0, "{}\n{summary}", run.stderr);
    let stdout = stdout_of(&summary);
    assert!(stdout.ends_with("\n42\n"), "{stdout}");
    if is_root() {
        assert!(stdout.starts_with("65534\n"), "as nobody: {stdout}");
    }

    // As a normal user, in a 0700 home of its own.
    let (uid, gid) = normal_user();
    let home = home_with_local("");
    local_profile(
        &home,
        "service",
        "ttl_secs = 60\ncommand = [\"sh\", \"-c\", \"echo up > /work/state; sleep 50\"]",
    );
    hand_over(home.path(), uid, gid);
    let as_user = |args: &[&str]| {
        let output = home
            .command()
            .args(args)
            .uid(uid)
            .gid(gid)
            .output()
            .unwrap();
        Run::from(output)
    };
    let run = as_user(&[
        "run",
        "--profile",
        "local",
        "--json",
        "--",
        "python3",
        "-c",
        "print(6*7)",
    ])
    .ok();
    let summary = run.json();
    assert_eq!(stdout_of(&summary), "42\n", "{summary}");
    assert_eq!(summary["state"], "destroyed");
    assert_eq!(
        summary["limits"], "rlimits",
        "a normal user can make no cgroup here"
    );
    // And a sandbox it leaves running can be entered by that user.
    let created = as_user(&["sandbox", "create", "--profile", "service", "--json"])
        .ok()
        .json();
    let id = created["id"].as_str().unwrap();
    wait_until_running(&home, id);
    let run = as_user(&[
        "sandbox",
        "exec",
        id,
        "--",
        "sh",
        "-c",
        "while [ ! -s /work/state ]; do sleep 0.05; done; id -u; cat /work/state",
    ])
    .ok();
    assert_eq!(run.stdout, format!("{uid}\nup\n"));
    as_user(&["sandbox", "destroy", id]).ok();
}

#[test]
fn a_host_file_outside_the_binds_cannot_be_read() {
    let home = home_with_local("");
    home.run(&["credits", "add", "1"]).ok(); // the ledger file exists
    let ledger = home.ledger_file();
    assert!(ledger.is_file());
    let (summary, run) = run_in_sandbox(&home, &[], &["cat", ledger.to_str().unwrap()]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(
        stderr_of(&summary),
        format!("cat: {}: No such file or directory\n", ledger.display())
    );
    let (summary, _) = run_in_sandbox(&home, &[], &["ls", "/root", home.path().to_str().unwrap()]);
    assert!(
        stderr_of(&summary).contains("No such file or directory"),
        "{summary}"
    );
}

#[test]
fn the_hosts_file_system_is_read_only_and_privileges_stay_out() {
    let home = home_with_local("");
    let (summary, run) = run_in_sandbox(&home, &[], &["touch", "/usr/sandboxer-was-here"]);
    assert_eq!(run.code, 1);
    assert!(
        stderr_of(&summary).contains("Read-only file system"),
        "{summary}"
    );
    assert!(!Path::new("/usr/sandboxer-was-here").exists());

    // No capability survives into the sandbox: mounting is refused.
    let script = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nif libc.mount(b'none', b'/tmp', b'tmpfs', 0, None) != 0:\n    print('mount:', os.strerror(ctypes.get_errno()))";
    let (summary, run) = run_in_sandbox(&home, &[], &["python3", "-c", script]);
    assert_eq!(run.code, 0, "{summary}");
    assert_eq!(stdout_of(&summary), "mount: Operation not permitted\n");
}

#[test]
fn the_hosts_loopback_is_out_of_reach() {
    let home = home_with_local("");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!(
        "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')"
    );
    let (summary, run) = run_in_sandbox(&home, &[], &["python3", "-c", &script]);
    assert_eq!(run.code, 1, "the connection must fail");
    assert!(
        stderr_of(&summary).contains("ConnectionRefusedError: [Errno 111] Connection refused"),
        "only the sandbox's own loopback, where nothing listens: {summary}"
    );
    listener.set_nonblocking(true).unwrap();
    assert!(
        listener.accept().is_err(),
        "nothing reached the host's listener"
    );
}

#[test]
fn host_processes_are_invisible() {
    let home = home_with_local("");
    let script = format!(
        "import os; pids = [int(p) for p in os.listdir('/proc') if p.isdigit()]; print(len(pids)); assert {} not in pids; assert len(pids) < 10",
        std::process::id()
    );
    let (summary, run) = run_in_sandbox(&home, &[], &["python3", "-c", &script]);
    assert_eq!(run.code, 0, "{summary}");
    let seen: u32 = stdout_of(&summary).trim().parse().unwrap();
    assert!(seen < 10, "{seen} processes seen");
}

#[test]
fn a_fork_bomb_stops_at_the_process_limit() {
    let home = home_with_local("max_processes = \"20\"");
    let script = "import os, time\nn = 0\ntry:\n    for i in range(200):\n        if os.fork() == 0:\n            time.sleep(5); os._exit(0)\n        n += 1\nexcept OSError as error:\n    print(error)\nprint(n)\nassert n < 20, n";
    let (summary, run) = run_in_sandbox(&home, &[], &["python3", "-c", script]);
    assert_eq!(run.code, 0, "forks stopped below the limit: {summary}");
    assert!(
        stdout_of(&summary).starts_with("[Errno 11] Resource temporarily unavailable\n"),
        "fork refused with EAGAIN: {summary}"
    );
}

#[test]
fn a_memory_hog_is_stopped_at_its_limit() {
    let home = home_with_local("");
    local_profile(&home, "small", "memory_mb = 64\nttl_secs = 30");
    // Touching every byte: an untouched allocation costs no memory.
    let run = home.run(&[
        "run",
        "--profile",
        "small",
        "--json",
        "--",
        "python3",
        "-c",
        "x = b'\\x01' * (512 * 1024 * 1024); print('allocated')",
    ]);
    let summary = run.json();
    assert!(!stdout_of(&summary).contains("allocated"), "{summary}");
    if summary["limits"] == "rlimits" {
        // Per process: the allocation itself fails.
        assert_eq!(run.code, 1, "{summary}");
        assert!(stderr_of(&summary).contains("MemoryError"), "{summary}");
    } else {
        // The tree's cgroup: the kernel kills it at the limit.
        assert_eq!(run.code, 137, "{summary}");
        assert_eq!(summary["ended_by"], "memory-limit", "{summary}");
    }
}

#[test]
fn with_a_cgroup_limits_hold_for_the_whole_tree() {
    let home = home_with_local("");
    local_profile(
        &home,
        "tree",
        "memory_mb = 128\ncpu_millis = 500\nttl_secs = 60",
    );
    // Four children of 40 MiB each: every one under the limit, the tree over.
    let script = "import os, time\npids = []\nfor i in range(4):\n    pid = os.fork()\n    if pid == 0:\n        x = b'\\x01' * (40 << 20); time.sleep(3); os._exit(0)\n    pids.append(pid)\nkilled = sum(os.WIFSIGNALED(os.waitpid(pid, 0)[1]) for pid in pids)\nprint('killed', killed)";
    let run = home.run(&[
        "run",
        "--profile",
        "tree",
        "--json",
        "--",
        "python3",
        "-c",
        script,
    ]);
    let summary = run.json();
    assert_eq!(run.code, 0, "{summary}");
    if summary["limits"] == "rlimits" {
        let shown = home
            .run(&["sandbox", "show", summary["id"].as_str().unwrap(), "--json"])
            .ok()
            .json();
        eprintln!(
            "no cgroup on this machine ({}): limits are per process, so the tree is not held",
            shown["process"]["cgroup_unavailable"]
        );
        assert_eq!(stdout_of(&summary), "killed 0\n");
        return;
    }
    let killed: u32 = stdout_of(&summary)
        .trim()
        .strip_prefix("killed ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(killed >= 1, "the tree's memory is limited: {summary}");

    // Half a vCPU: a busy loop gets at most about half of its wall time.
    let run = home.run(&[
        "run",
        "--profile",
        "tree",
        "--json",
        "--",
        "python3",
        "-c",
        "import time\nend = time.time() + 2\nwhile time.time() < end: pass",
    ]);
    let summary = run.json();
    assert_eq!(run.code, 0, "{summary}");
    let shown = home
        .run(&["sandbox", "show", summary["id"].as_str().unwrap(), "--json"])
        .ok()
        .json();
    let process = &shown["process"];
    let (cpu, wall) = (
        process["cpu_ms"].as_u64().unwrap(),
        process["wall_ms"].as_u64().unwrap(),
    );
    assert!(cpu * 10 <= wall * 7, "cpu {cpu} ms in {wall} ms wall");
}

#[test]
fn the_work_directory_has_a_size_cap() {
    let home = home_with_local("work_mb = \"8\"");
    let (summary, run) = run_in_sandbox(
        &home,
        &[],
        &[
            "python3",
            "-c",
            "open('/work/big', 'wb').write(b'x' * (16 << 20))",
        ],
    );
    assert_eq!(run.code, 1, "{summary}");
    assert!(
        stderr_of(&summary).contains("No space left on device"),
        "{summary}"
    );
}

#[test]
fn the_ttl_kills_a_sleeper_and_run_says_so() {
    let home = home_with_local("");
    let (summary, run) = run_in_sandbox(&home, &["--ttl", "2"], &["sleep", "60"]);
    assert_eq!(summary["state"], "destroyed");
    assert_eq!(run.code, 124, "the ttl's own status: {summary}");
    assert_eq!(summary["exit_status"], 124);
    assert!(
        summary["end"].as_str().unwrap().starts_with("ttl reached"),
        "{summary}"
    );
    let run = home.run(&[
        "run",
        "--profile",
        "local",
        "--ttl",
        "1",
        "--",
        "sleep",
        "60",
    ]);
    assert_eq!(run.code, 124);
    assert!(run.stderr.contains("ttl reached"), "{}", run.stderr);
}

#[test]
fn a_signal_a_stdin_and_ctrl_c_reach_the_run() {
    let home = home_with_local("");
    let (summary, run) = run_in_sandbox(&home, &[], &["sh", "-c", "kill -9 $$"]);
    assert_eq!(run.code, 137, "128 + SIGKILL: {summary}");

    // stdin reaches the command, and its end is the command's EOF.
    let mut child = home
        .command()
        .args([
            "run",
            "--profile",
            "local",
            "--json",
            "--",
            "sh",
            "-c",
            "while read line; do echo got:$line; done; echo eof",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"one\ntwo\n")
        .unwrap();
    let run = Run::from(child.wait_with_output().unwrap()).ok();
    assert_eq!(stdout_of(&run.json()), "got:one\ngot:two\neof\n");

    // Ctrl-C: destroyed and billed, then 130.
    let child = home
        .command()
        .args(["run", "--profile", "local", "--", "sleep", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sandboxes = home.path().join("sandboxes");
    let id = (0..1000)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            std::fs::read_dir(&sandboxes)
                .ok()?
                .filter_map(Result::ok)
                .find(|entry| {
                    entry.path().join("process.json").is_file()
                        && !entry.path().join("exit.json").exists()
                })
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
        })
        .expect("the sandbox starts");
    // SAFETY: a signal to the child we started.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let run = Run::from(child.wait_with_output().unwrap());
    assert_eq!(run.code, 130, "{}", run.stderr);
    assert!(
        run.stdout.contains(&format!("{id} on local: destroyed")),
        "{}",
        run.stdout
    );
    home.run(&["ledger", "verify"]).ok();
}

#[test]
fn exec_runs_inside_a_running_sandbox_and_logs_show_its_output() {
    let home = home_with_local("");
    local_profile(
        &home,
        "service",
        "ttl_secs = 120\ncommand = [\"sh\", \"-c\", \"echo started; id -u > /work/uid; sleep 100\"]",
    );
    let created = home
        .run(&["sandbox", "create", "--profile", "service", "--json"])
        .ok()
        .json();
    let id = created["id"].as_str().unwrap().to_string();
    wait_until_running(&home, &id);
    // The main command has written its files once `started` is logged.
    for _ in 0..500 {
        if home.run(&["sandbox", "logs", &id]).ok().stdout == "started\n" {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let exec = |command: &[&str]| {
        let mut args = vec!["sandbox", "exec", id.as_str(), "--"];
        args.extend(command);
        home.run(&args)
    };
    // Its /work, its user, its hostname, its processes and nothing else.
    let run = exec(&[
        "sh",
        "-c",
        "test \"$(id -u)\" = \"$(cat /work/uid)\" && hostname && ls /proc | grep -c '^[0-9]'",
    ])
    .ok();
    let mut lines = run.stdout.lines();
    assert_eq!(lines.next(), Some("sandbox"), "{}", run.stdout);
    let seen: u32 = lines.next().unwrap().parse().unwrap();
    assert!(seen < 10, "{seen} processes visible");
    let run = exec(&["cat", home.ledger_file().to_str().unwrap()]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("No such file or directory"),
        "{}",
        run.stderr
    );
    assert_eq!(
        exec(&["sh", "-c", "exit 7"]).code,
        7,
        "the command's own status"
    );
    let run = exec(&["no-such-program"]);
    assert_eq!(run.code, 127, "{}", run.stderr);

    let logs = home.run(&["sandbox", "logs", &id]).ok();
    assert_eq!(logs.stdout, "started\n");
    let shown = home.run(&["sandbox", "show", &id, "--json"]).ok().json();
    assert_eq!(shown["process"]["running"], true, "{shown}");
    let limits = shown["process"]["limits"].as_str().unwrap();
    assert!(
        ["cgroup-v2", "cgroup-v1", "rlimits"].contains(&limits),
        "{shown}"
    );

    let destroyed = home.run(&["sandbox", "destroy", &id, "--json"]).ok().json();
    assert_eq!(destroyed["state"], "destroyed");
    let run = exec(&["true"]);
    assert_eq!(run.code, 125);
    assert!(
        run.stderr.contains(&format!("sandbox {id} is not running")),
        "{}",
        run.stderr
    );
    // Its logs outlive it, until the retention time passes.
    assert_eq!(home.run(&["sandbox", "logs", &id]).ok().stdout, "started\n");
    let listed = home
        .command()
        .env("SANDBOXER_SANDBOX_LOG_RETENTION_SECS", "0")
        .args(["sandbox", "list"])
        .output()
        .unwrap();
    let listed = Run::from(listed).ok();
    assert!(
        listed
            .stderr
            .contains(&format!("{id}: ended longer ago than the log retention")),
        "{}",
        listed.stderr
    );
    assert!(!home.path().join("sandboxes").join(&id).exists());
    let run = home.run(&["sandbox", "logs", &id]).fails(1);
    assert!(run.stderr.contains("no sandbox"), "{}", run.stderr);
}

#[test]
fn a_busy_loop_reports_cpu_time_and_an_exited_command_destroys_cleanly() {
    let home = home_with_local("");
    local_profile(
        &home,
        "busy",
        "ttl_secs = 30\ncommand = [\"python3\", \"-c\", \"while True: pass\"]",
    );
    local_profile(&home, "quick", "ttl_secs = 30\ncommand = [\"true\"]");
    let busy = home
        .run(&["sandbox", "create", "--profile", "busy", "--json"])
        .ok()
        .json();
    let quick = home
        .run(&["sandbox", "create", "--profile", "quick", "--json"])
        .ok()
        .json();
    std::thread::sleep(Duration::from_millis(1500));

    let destroyed = home
        .run(&["sandbox", "destroy", busy["id"].as_str().unwrap(), "--json"])
        .ok()
        .json();
    let usage = &destroyed["meter"]["reported_usage"];
    assert!(usage["cpu_ms"].as_u64().unwrap() > 0, "{usage}");
    assert!(usage["wall_ms"].as_u64().unwrap() >= 1000, "{usage}");

    let destroyed = home
        .run(&[
            "sandbox",
            "destroy",
            quick["id"].as_str().unwrap(),
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(destroyed["state"], "destroyed");
    home.run(&["ledger", "verify"]).ok();
}

#[test]
fn without_bubblewrap_burst_sandbox_falls_back_to_the_saas_stub() {
    let home = home_with_local("");
    // A PATH without bubblewrap is a machine without bubblewrap.
    let without = |args: &[&str]| {
        Run::from(
            home.command()
                .env("PATH", "/nonexistent")
                .args(args)
                .output()
                .unwrap(),
        )
    };
    let decision = without(&["route", "explain", "--profile", "burst-sandbox", "--json"])
        .ok()
        .json();
    assert_eq!(decision["chosen"], "saas-stub");
    let local = decision["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|candidate| candidate["name"] == "local")
        .unwrap();
    assert!(
        local["reason"]
            .as_str()
            .unwrap()
            .contains("install bubblewrap (apt-get install bubblewrap)"),
        "{local}"
    );
    let run = without(&["run", "--profile", "burst-sandbox", "--ttl", "1", "--json"])
        .ok()
        .json();
    assert_eq!(run["extension"], "saas-stub");

    let with = home
        .run(&["route", "explain", "--profile", "burst-sandbox", "--json"])
        .ok()
        .json();
    assert_eq!(
        with["chosen"], "local",
        "with bubblewrap, this machine comes first"
    );
}

#[tokio::test]
async fn the_process_capability_starts_only_granted_programs() {
    let home = TestHome::new();
    let fixtures = built_fixtures();
    install(&fixtures, "spawner", &home.extensions(), "wrong-program");
    install(&fixtures, "spawner", &home.extensions(), "ungranted");
    std::fs::write(
        home.extensions().join("wrong-program.toml"),
        "[grants]\nprocess = [\"bwrap\"]\n[config]\nprogram = \"sh\"\n",
    )
    .unwrap();
    let mut runtime = home.runtime();
    runtime.enable_processes(
        home.path().join("sandboxes"),
        env!("CARGO_BIN_EXE_sandboxer-host").into(),
    );
    let set = runtime.load_dir(&home.extensions()).await.unwrap();

    let reason = set.entry("ungranted").unwrap().status.as_ref().unwrap_err();
    assert!(
        reason.contains("sandboxer:extension/process") && reason.contains("not granted"),
        "{reason}"
    );

    let error = set
        .get("wrong-program")
        .unwrap()
        .create(&spec("sbx-escape"))
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("`sh` is not a program this extension is granted (grants: bwrap)"),
        "{error}"
    );
    assert!(
        !home.path().join("sandboxes/sbx-escape/stdout").exists(),
        "nothing was started"
    );
}

/// A home with a spawner instance `name` in `mode`, granted `program`, and
/// a profile of the same name routed to it.
fn home_with_spawner(name: &str, mode: &str, program: &str) -> TestHome {
    let home = home_with_local("");
    install(&built_fixtures(), "spawner", &home.extensions(), name);
    std::fs::write(
        home.extensions().join(format!("{name}.toml")),
        format!("[grants]\nprocess = [\"{program}\"]\n[config]\nmode = \"{mode}\"\nprogram = \"{program}\"\n"),
    )
    .unwrap();
    std::fs::write(
        home.profiles().join(format!("{name}.toml")),
        format!("description = \"{mode}\"\n[sandbox]\nttl_secs = 30\n[route]\nstrategy = \"explicit\"\nextension = \"{name}\"\n"),
    )
    .unwrap();
    home
}

/// Every sandbox directory with a started process.
fn started_processes(home: &TestHome) -> Vec<PathBuf> {
    std::fs::read_dir(home.path().join("sandboxes"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|dir| dir.join("process.json").exists())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn no_program_starts_outside_create_even_from_a_route_explain() {
    let home = home_with_spawner("estimator", "estimate", "sleep");
    let decision = home
        .run(&["route", "explain", "--profile", "estimator", "--json"])
        .fails(1)
        .json();
    let reason = decision["candidates"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains(
            "the process capability starts programs only during `create`, for that call's sandbox"
        ),
        "{reason}"
    );
    assert!(started_processes(&home).is_empty(), "nothing started");
}

#[test]
fn a_made_up_sandbox_id_and_dots_are_refused() {
    let home = home_with_spawner("impostor", "other-sandbox", "sleep");
    let run = home.run(&["run", "--profile", "impostor"]).fails(1);
    assert!(
        run.stderr
            .contains("only for the sandbox this call is about (`sbx-")
            && run.stderr.contains("not `sbx-made-up`"),
        "{}",
        run.stderr
    );
    assert!(!home.path().join("sandboxes/sbx-made-up").exists());

    let home = home_with_spawner("climber", "dots", "sleep");
    let run = home.run(&["run", "--profile", "climber"]).fails(1);
    assert!(
        run.stderr
            .contains("sandbox name \"..\" is invalid: a name made only of dots"),
        "{}",
        run.stderr
    );
    assert!(
        !home.path().join("spawn.json").exists(),
        "nothing written above sandboxes/"
    );
    assert!(started_processes(&home).is_empty());
}

#[test]
fn a_sandbox_that_cannot_be_set_up_fails_the_run() {
    let home = home_with_spawner("broken", "broken-sandbox", "bwrap");
    let run = home
        .run(&["run", "--profile", "broken", "--", "true"])
        .fails(1);
    assert!(
        run.stderr.contains("the sandbox could not be set up: bwrap: Can't find source path /nonexistent-sandboxer-source"),
        "bubblewrap's own words: {}",
        run.stderr
    );
    let listed = home
        .run(&["sandbox", "list", "--all", "--json"])
        .ok()
        .json();
    assert_eq!(listed[0]["state"], "failed", "{listed}");
    home.run(&["ledger", "verify"]).ok();
}

#[test]
fn an_orphan_process_tree_is_killed_by_the_next_start() {
    let home = home_with_local("");
    // A supervised tree with no sandbox record: what a crash between spawn
    // and the record, or a spawn outside any sandbox, leaves.
    let dir = home.path().join("sandboxes/sbx-orphan");
    std::fs::create_dir_all(&dir).unwrap();
    let spec = SpawnSpec {
        sandbox_id: "sbx-orphan".into(),
        program: "/bin/sleep".into(),
        args: vec!["300".into()],
        env: Vec::new(),
        memory_mb: 256,
        cpu_secs: 300,
        cpu_millis: 0,
        max_processes: 8,
        wall_secs: 300,
        run_as: None,
        status_fd: None,
        pipe_stdin: false,
    };
    std::fs::write(dir.join("spawn.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_sandboxer-host"))
        .arg("__supervise")
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success());
    for _ in 0..500 {
        if dir.join("process.json").is_file() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let started: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("process.json")).unwrap()).unwrap();
    let pid = started["pid"].as_i64().unwrap() as i32;
    // SAFETY: signal 0 only checks that the process exists.
    assert_eq!(unsafe { libc::kill(pid, 0) }, 0, "the orphan runs");

    let run = home.run(&["sandbox", "list"]).ok();
    assert!(
        run.stderr
            .contains("reconciled sbx-orphan: a process tree ran without a live sandbox; killed"),
        "{}",
        run.stderr
    );
    // SAFETY: as above.
    assert_ne!(unsafe { libc::kill(pid, 0) }, 0, "the orphan is gone");
    assert!(matches!(
        read_state(&dir),
        Some(sandboxer_host::runtime::process::ProcessState::Exited(_))
    ));
}
