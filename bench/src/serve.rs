//! `bench serve`: sandboxes per second through `sandboxer-host serve`, 64
//! concurrent HTTP clients each creating (`POST /v2/sandboxes`, E2B's route)
//! and killing (`DELETE /sandboxes/{id}`) saas-stub sandboxes, with p50/p99
//! of both requests; and, in the same run, the in-process lifecycle at the
//! same concurrency (the manager called directly, as `bench lifecycle`
//! does). The ratio is what the HTTP front end, the key check and the
//! service layer cost.
//!
//! The server is the real binary (`SANDBOXER_HOST_BIN`, set by `cargo xtask
//! bench`), on a free port of 127.0.0.1, in a fresh home.
//!
//! Goal: at least 0.7x the in-process rate.

use crate::stats::{median, percentile, print_rows, show_ns, write_report};
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLIENTS: usize = 64;
const PER_CLIENT: usize = 4;
const ROUNDS: usize = 3;

#[derive(Serialize)]
struct ServeReport {
    clients: usize,
    sandboxes: usize,
    serve_per_sec: f64,
    create_p50_ns: f64,
    create_p99_ns: f64,
    kill_p50_ns: f64,
    kill_p99_ns: f64,
    in_process_per_sec: f64,
    serve_over_in_process: f64,
    goal_serve_over_in_process: f64,
}

struct ServerProcess {
    child: Child,
    home: tempfile::TempDir,
    url: String,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // SAFETY: signalling the child this bench started.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

fn host_binary() -> Result<PathBuf> {
    let path = std::env::var_os("SANDBOXER_HOST_BIN")
        .map(PathBuf::from)
        .context("SANDBOXER_HOST_BIN is not set: run `cargo xtask bench serve`")?;
    anyhow::ensure!(path.is_file(), "{} is not built", path.display());
    Ok(path)
}

fn command(binary: &Path, home: &Path, root: &Path) -> Command {
    let mut command = Command::new(binary);
    command
        .env("SANDBOXER_HOME", home)
        .env("SANDBOXER_EXTENSIONS_DIR", home.join("extensions"))
        .env("SANDBOXER_PROFILES_DIR", root.join("profiles"));
    command
}

fn start(binary: &Path, root: &Path) -> Result<ServerProcess> {
    let home = tempfile::tempdir()?;
    let dir = home.path().join("extensions");
    std::fs::create_dir_all(&dir)?;
    for file in ["saas-stub.wasm", "saas-stub.toml"] {
        std::fs::copy(root.join("target/extensions").join(file), dir.join(file))?;
    }
    let child = command(binary, home.path(), root)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let url = loop {
        if let Ok(text) = std::fs::read_to_string(home.path().join("server.json"))
            && let Ok(json) = serde_json::from_str::<serde_json::Value>(&text)
        {
            break json["url"].as_str().unwrap_or_default().to_string();
        }
        anyhow::ensure!(Instant::now() < deadline, "serve did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(ServerProcess { child, home, url })
}

/// Runs the CLI on the served home (it goes through the server).
fn cli(binary: &Path, server: &ServerProcess, root: &Path, args: &[&str]) -> Result<String> {
    let output = command(binary, server.home.path(), root)
        .args(args)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "sandboxer-host {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// One round: every client creates and kills `PER_CLIENT` sandboxes.
fn round(url: &str, key: &str, creates: &Mutex<Vec<f64>>, kills: &Mutex<Vec<f64>>) -> f64 {
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..CLIENTS {
            scope.spawn(|| {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .timeout_global(Some(Duration::from_secs(120)))
                    .build()
                    .into();
                for _ in 0..PER_CLIENT {
                    let begun = Instant::now();
                    let text = agent
                        .post(&format!("{url}/v2/sandboxes"))
                        .header("x-api-key", key)
                        .header("content-type", "application/json")
                        .send(r#"{"templateID":"saas-stub","timeout":300}"#)
                        .expect("create")
                        .into_body()
                        .read_to_string()
                        .expect("a create answer");
                    let answer: serde_json::Value =
                        serde_json::from_str(&text).expect("a create answer");
                    creates
                        .lock()
                        .unwrap()
                        .push(begun.elapsed().as_nanos() as f64);
                    let id = answer["sandboxID"].as_str().expect("an id");
                    let begun = Instant::now();
                    agent
                        .delete(&format!("{url}/sandboxes/{id}"))
                        .header("x-api-key", key)
                        .call()
                        .expect("kill");
                    kills
                        .lock()
                        .unwrap()
                        .push(begun.elapsed().as_nanos() as f64);
                }
            });
        }
    });
    started.elapsed().as_secs_f64()
}

pub fn run() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ is in the workspace")
        .to_path_buf();
    let binary = host_binary()?;
    let server = start(&binary, &root)?;
    let created: serde_json::Value = serde_json::from_str(&cli(
        &binary,
        &server,
        &root,
        &["tenant", "create", "bench", "--json"],
    )?)?;
    let key = created["api_key"].as_str().context("a key")?.to_string();
    cli(
        &binary,
        &server,
        &root,
        &["credits", "add", "1000000", "--tenant", "bench"],
    )?;

    let creates = Arc::new(Mutex::new(Vec::new()));
    let kills = Arc::new(Mutex::new(Vec::new()));
    let (mut serve_secs, mut in_process_secs) = (0.0, 0.0);
    // Alternate with the in-process lifecycle so the disk's drift hits both.
    for _ in 0..ROUNDS {
        serve_secs += round(&server.url, &key, &creates, &kills);
        let (per_sec, _) = crate::lifecycle::measure_host(CLIENTS, PER_CLIENT)?;
        in_process_secs += (CLIENTS * PER_CLIENT) as f64 / per_sec;
    }
    let verify = cli(&binary, &server, &root, &["ledger", "verify"])?;
    anyhow::ensure!(verify.contains("ledger ok"), "verify: {verify}");
    drop(server);

    let sandboxes = ROUNDS * CLIENTS * PER_CLIENT;
    let mut creates = std::mem::take(&mut *creates.lock().unwrap());
    let mut kills = std::mem::take(&mut *kills.lock().unwrap());
    creates.sort_by(f64::total_cmp);
    kills.sort_by(f64::total_cmp);
    let serve_per_sec = sandboxes as f64 / serve_secs;
    let in_process_per_sec = sandboxes as f64 / in_process_secs;
    let report = ServeReport {
        clients: CLIENTS,
        sandboxes,
        serve_per_sec,
        create_p50_ns: median(&creates),
        create_p99_ns: percentile(&creates, 99.0),
        kill_p50_ns: median(&kills),
        kill_p99_ns: percentile(&kills, 99.0),
        in_process_per_sec,
        serve_over_in_process: serve_per_sec / in_process_per_sec,
        goal_serve_over_in_process: 0.7,
    };
    let verdict = if report.serve_over_in_process >= report.goal_serve_over_in_process {
        "meets goal"
    } else {
        "MISSES goal"
    };
    print_rows(
        &format!("serve: {CLIENTS} HTTP clients creating and killing saas-stub sandboxes"),
        &[
            (
                "through serve".into(),
                format!("{serve_per_sec:.0}/s"),
                format!(
                    "create p50 {} p99 {}; kill p50 {} p99 {}",
                    show_ns(report.create_p50_ns),
                    show_ns(report.create_p99_ns),
                    show_ns(report.kill_p50_ns),
                    show_ns(report.kill_p99_ns)
                ),
            ),
            (
                "in process".into(),
                format!("{in_process_per_sec:.0}/s"),
                "the manager called directly, same concurrency".into(),
            ),
            (
                "serve / in process".into(),
                format!("{:.2}x", report.serve_over_in_process),
                format!(
                    "goal ≥ {:.1}x: {verdict}",
                    report.goal_serve_over_in_process
                ),
            ),
        ],
    );
    let path = write_report("serve", &report)?;
    println!("  written to {}", path.display());
    Ok(())
}
