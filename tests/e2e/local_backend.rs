//! The local backend: real bubblewrap sandboxes started through the host's
//! `process` capability. Each test runs a command inside a sandbox and
//! checks what it could not do (or what the host saw it do).
//!
//! These need bubblewrap and user namespaces; `.ci/run` installs
//! bubblewrap. Where the machine cannot make a sandbox at all, the tests
//! fail: a workload never runs unsandboxed, and neither do these.

use crate::support::*;
use std::net::TcpListener;
use std::time::{Duration, Instant};

/// A home with the local and saas-stub backends and the shipped profiles;
/// `config` adds lines to the local instance's `[config]`.
fn home_with_local(config: &str) -> TestHome {
    let home = TestHome::new().with_saas_stub().with_shipped_profiles();
    install(&built_extensions(), "local", &home.extensions(), "local");
    std::fs::write(
        home.extensions().join("local.toml"),
        format!("[grants]\nprocess = [\"bwrap\"]\n[config]\n{config}\n"),
    )
    .unwrap();
    home
}

/// `run --profile local --json -- CMD...`: the summary and the command's stderr.
fn run_in_sandbox(home: &TestHome, extra: &[&str], command: &[&str]) -> (serde_json::Value, Run) {
    let mut args = vec!["run", "--profile", "local", "--json"];
    args.extend(extra);
    args.push("--");
    args.extend(command);
    let run = home.run(&args).ok();
    (run.json(), run)
}

#[test]
fn run_prints_the_commands_output_and_bills_at_the_local_rate() {
    let home = home_with_local("rate_per_vcpu_hour = \"0.36\"");
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

    let (summary, _) = run_in_sandbox(&home, &[], &["sh", "-c", "echo to-stderr >&2; exit 3"]);
    assert_eq!(summary["exit_code"], 3);
    assert_eq!(summary["kind"], "self-hosted");
    // 0.36 credits per vCPU-hour is 0.0001 per second; a short command
    // starts one second.
    assert_eq!(summary["actual"], "0.000100");
    let shown = home.run(&["credits", "show", "--json"]).ok().json();
    assert_eq!(shown["held"], "0.000000");
    home.run(&["ledger", "verify"]).ok();
}

#[test]
fn a_host_file_outside_the_binds_cannot_be_read() {
    let home = home_with_local("");
    home.run(&["credits", "show"]).ok(); // the ledger file exists
    let ledger = home.ledger_file();
    assert!(ledger.is_file());
    let (summary, run) = run_in_sandbox(&home, &[], &["cat", ledger.to_str().unwrap()]);
    assert_ne!(summary["exit_code"], 0, "{}", run.stderr);
}

#[test]
fn the_hosts_loopback_is_out_of_reach() {
    let home = home_with_local("");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!(
        "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')"
    );
    let (summary, _) = run_in_sandbox(&home, &[], &["python3", "-c", &script]);
    assert_ne!(summary["exit_code"], 0, "the connection must fail");
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
    assert_eq!(summary["exit_code"], 0, "{}", run.stderr);
}

#[test]
fn a_fork_bomb_stops_at_the_process_limit() {
    let home = home_with_local("max_processes = \"20\"");
    let script = "import os, time\nn = 0\ntry:\n    for i in range(200):\n        if os.fork() == 0:\n            time.sleep(5); os._exit(0)\n        n += 1\nexcept OSError:\n    pass\nprint(n)\nassert n < 20, n";
    let started = Instant::now();
    let (summary, run) = run_in_sandbox(&home, &[], &["python3", "-c", script]);
    assert_eq!(
        summary["exit_code"], 0,
        "forks stopped below the limit: {}",
        run.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_memory_hog_is_stopped_at_its_limit() {
    let home = home_with_local("");
    std::fs::write(
        home.profiles().join("small.toml"),
        "description = \"64 MiB\"\n[sandbox]\nmemory_mb = 64\nttl_secs = 30\n[route]\nstrategy = \"explicit\"\nextension = \"local\"\n",
    )
    .unwrap();
    let run = home
        .run(&[
            "run",
            "--profile",
            "small",
            "--json",
            "--",
            "python3",
            "-c",
            "x = bytearray(512 * 1024 * 1024); print('allocated')",
        ])
        .ok();
    let summary = run.json();
    assert_ne!(
        summary["exit_code"], 0,
        "a 512 MiB allocation under a 64 MiB limit fails"
    );
    assert!(!run.stdout.contains("allocated"));
}

#[test]
fn the_ttl_kills_a_sleeper() {
    let home = home_with_local("");
    let started = Instant::now();
    let (summary, _) = run_in_sandbox(&home, &["--ttl", "2"], &["sleep", "60"]);
    let elapsed = started.elapsed();
    assert_eq!(summary["state"], "destroyed");
    assert_eq!(summary["exit_code"], 137, "killed by SIGKILL at the ttl");
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
}

#[test]
fn a_busy_loop_reports_cpu_time_and_an_exited_command_destroys_cleanly() {
    let home = home_with_local("");
    std::fs::write(
        home.profiles().join("busy.toml"),
        "description = \"spin\"\n[sandbox]\nttl_secs = 30\ncommand = [\"python3\", \"-c\", \"while True: pass\"]\n[route]\nstrategy = \"explicit\"\nextension = \"local\"\n",
    )
    .unwrap();
    std::fs::write(
        home.profiles().join("quick.toml"),
        "description = \"done at once\"\n[sandbox]\nttl_secs = 30\ncommand = [\"true\"]\n[route]\nstrategy = \"explicit\"\nextension = \"local\"\n",
    )
    .unwrap();
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

#[test]
fn the_process_capability_starts_only_granted_programs() {
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
    let set = runtime.load_dir(&home.extensions()).unwrap();

    let reason = set.entry("ungranted").unwrap().status.as_ref().unwrap_err();
    assert!(
        reason.contains("sandboxer:extension/process") && reason.contains("not granted"),
        "{reason}"
    );

    let error = set
        .get("wrong-program")
        .unwrap()
        .create(&spec("sbx-escape"))
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
