//! `bench serve`: sandboxes per second through `sandboxer-host serve`, 64
//! concurrent HTTP clients each creating (`POST /v2/sandboxes`, E2B's route)
//! and killing (`DELETE /sandboxes/{id}`) saas-stub sandboxes, with p50/p99
//! of both requests; and, in the same run, the in-process lifecycle at the
//! same concurrency (the manager called directly, as `bench lifecycle`
//! does). The ratio is what the HTTP front end, the key check and the
//! service layer cost.
//!
//! Three deployments take the same load, in alternating rounds with the
//! in-process baseline so the disk's drift hits all of them:
//! - one server with its ledger in its home (redb);
//! - one server with its ledger in PostgreSQL (`SANDBOXER_STORE`);
//! - three servers, each with its own home, sharing one PostgreSQL ledger,
//!   the 64 clients spread over them round-robin (a load balancer's view).
//!
//! Tenants and keys are each home's own (its state.redb), and a key cannot
//! be imported: the tenant is created on every server, each client uses the
//! key of the server it talks to, and the credits are added once, through
//! the first server, since the ledger is shared.
//!
//! The servers are the real binary (`SANDBOXER_HOST_BIN`, set by `cargo
//! xtask bench`), on free ports of 127.0.0.1, each in a fresh home; the
//! PostgreSQL databases are fresh ones on the cluster `cargo xtask bench`
//! starts (SANDBOXER_TEST_POSTGRES).
//!
//! Goal: at least 0.7x the in-process rate (one server on redb).
//! PostgreSQL has no goal: its rates and ratios are reported.

use crate::pg::{self, ClusterSettings};
use crate::stats::{median, percentile, print_rows, show_ns, write_report};
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const CLIENTS: usize = 64;
const PER_CLIENT: usize = 4;
const ROUNDS: usize = 3;

/// One PostgreSQL deployment's figures (no goal: reported).
#[derive(Serialize)]
struct PostgresServeRun {
    hosts: usize,
    sandboxes: usize,
    per_sec: f64,
    create_p50_ns: f64,
    create_p99_ns: f64,
    kill_p50_ns: f64,
    kill_p99_ns: f64,
    over_in_process: f64,
    over_redb_serve: f64,
}

#[derive(Serialize)]
struct ServeReport {
    clients: usize,
    sandboxes: usize,
    /// One server, its ledger in its home (redb).
    serve_per_sec: f64,
    create_p50_ns: f64,
    create_p99_ns: f64,
    kill_p50_ns: f64,
    kill_p99_ns: f64,
    in_process_per_sec: f64,
    serve_over_in_process: f64,
    goal_serve_over_in_process: f64,
    /// One server with its ledger in PostgreSQL.
    postgres_1_host: PostgresServeRun,
    /// Three servers sharing one PostgreSQL ledger, the clients spread
    /// over them.
    postgres_3_hosts: PostgresServeRun,
    postgres_3_hosts_over_1_host: f64,
    postgres_goal: &'static str,
    postgres_settings: ClusterSettings,
    /// Every deployment's holds, as its journal closed them.
    ledger_audits: Vec<LedgerAudit>,
    /// What the machine offers the servers, the clients, PostgreSQL and the
    /// in-process baseline together.
    cores: usize,
}

/// How the journal closed a deployment's holds: every sandbox was killed,
/// so each should be charged once, none voided or expired.
#[derive(Serialize)]
struct LedgerAudit {
    deployment: String,
    sandboxes: usize,
    charged: usize,
    /// The holds (sandbox attempts) voided instead.
    voided: Vec<String>,
    expired: Vec<String>,
}

impl LedgerAudit {
    fn ok(&self) -> bool {
        self.charged == self.sandboxes && self.voided.is_empty() && self.expired.is_empty()
    }
}

struct ServerProcess {
    child: Child,
    home: tempfile::TempDir,
    url: String,
    store: Option<String>,
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

fn command(binary: &Path, home: &Path, root: &Path, store: Option<&str>) -> Command {
    let mut command = Command::new(binary);
    command
        .env("SANDBOXER_HOME", home)
        .env("SANDBOXER_EXTENSIONS_DIR", home.join("extensions"))
        .env("SANDBOXER_PROFILES_DIR", root.join("profiles"));
    // The redb server must not pick up a store from the caller's shell.
    match store {
        Some(url) => command.env("SANDBOXER_STORE", url),
        None => command.env_remove("SANDBOXER_STORE"),
    };
    command
}

fn start(binary: &Path, root: &Path, store: Option<&str>) -> Result<ServerProcess> {
    let home = tempfile::tempdir()?;
    let dir = home.path().join("extensions");
    std::fs::create_dir_all(&dir)?;
    for file in ["saas-stub.wasm", "saas-stub.toml"] {
        std::fs::copy(root.join("target/extensions").join(file), dir.join(file))?;
    }
    let child = command(binary, home.path(), root, store)
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
    Ok(ServerProcess {
        child,
        home,
        url,
        store: store.map(str::to_string),
    })
}

/// Runs the CLI on the served home (it goes through the server).
fn cli(binary: &Path, server: &ServerProcess, root: &Path, args: &[&str]) -> Result<String> {
    let output = command(binary, server.home.path(), root, server.store.as_deref())
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

/// Servers that share a store, with the tenant `bench`, and what their
/// rounds measured.
struct Deployment {
    /// For messages: "redb, 1 host", "postgres, 3 hosts".
    name: String,
    servers: Vec<ServerProcess>,
    /// `bench`'s key for each server, in the same order (one key).
    keys: Vec<String>,
    seconds: f64,
    creates: Mutex<Vec<f64>>,
    kills: Mutex<Vec<f64>>,
}

impl Deployment {
    fn start(binary: &Path, root: &Path, store: Option<&str>, hosts: usize) -> Result<Self> {
        let servers = (0..hosts)
            .map(|_| start(binary, root, store))
            .collect::<Result<Vec<_>>>()?;
        // Once: tenants and keys are shared by servers on one store (one key
        // works at each), and each home's own on redb (one server).
        let created: serde_json::Value = serde_json::from_str(&cli(
            binary,
            &servers[0],
            root,
            &["tenant", "create", "bench", "--json"],
        )?)?;
        let key = created["api_key"].as_str().context("a key")?.to_string();
        let keys = vec![key; servers.len()];
        // Once: the servers share the ledger.
        cli(
            binary,
            &servers[0],
            root,
            &["credits", "add", "1000000", "--tenant", "bench"],
        )?;
        let name = format!(
            "{}, {hosts} host{}",
            if store.is_some() { "postgres" } else { "redb" },
            if hosts == 1 { "" } else { "s" }
        );
        Ok(Self {
            name,
            servers,
            keys,
            seconds: 0.0,
            creates: Mutex::new(Vec::new()),
            kills: Mutex::new(Vec::new()),
        })
    }

    /// One round: every client creates and kills `PER_CLIENT` sandboxes,
    /// client `i` on server `i % hosts`.
    fn round(&mut self) {
        let started = Instant::now();
        let (servers, keys, creates, kills) =
            (&self.servers, &self.keys, &self.creates, &self.kills);
        std::thread::scope(|scope| {
            for client in 0..CLIENTS {
                let url = &servers[client % servers.len()].url;
                let key = &keys[client % keys.len()];
                scope.spawn(move || {
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
        self.seconds += started.elapsed().as_secs_f64();
    }

    /// `ledger verify` through the first server (the ledger is shared) and
    /// nothing left held on any server, or an error; then how the journal
    /// closed the holds, which the caller checks after writing the report
    /// (a hold voided under a live sandbox still verifies: the sandbox just
    /// goes unbilled).
    fn audit(&self, binary: &Path, root: &Path) -> Result<LedgerAudit> {
        let verify = cli(binary, &self.servers[0], root, &["ledger", "verify"])?;
        anyhow::ensure!(
            verify.contains("ledger ok"),
            "{}: verify: {verify}",
            self.name
        );
        for server in &self.servers {
            let shown: serde_json::Value = serde_json::from_str(&cli(
                binary,
                server,
                root,
                &["credits", "show", "--tenant", "bench", "--json"],
            )?)?;
            anyhow::ensure!(
                shown["held"] == "0.000000",
                "{}: credits still held after every sandbox was killed: {shown}",
                self.name
            );
        }
        let history: Vec<serde_json::Value> = serde_json::from_str(&cli(
            binary,
            &self.servers[0],
            root,
            &[
                "credits", "history", "--tenant", "bench", "--limit", "1000000", "--json",
            ],
        )?)?;
        let closed_by = |kind: &str| {
            history
                .iter()
                .filter(|entry| entry["kind"] == kind)
                .map(|entry| entry["sandbox_id"].as_str().unwrap_or("?").to_string())
                .collect::<Vec<_>>()
        };
        Ok(LedgerAudit {
            deployment: self.name.clone(),
            sandboxes: ROUNDS * CLIENTS * PER_CLIENT,
            charged: closed_by("charge").len(),
            voided: closed_by("void"),
            expired: closed_by("expire"),
        })
    }

    /// Sandboxes per second and sorted create and kill latencies.
    fn results(&self) -> (f64, Vec<f64>, Vec<f64>) {
        let mut creates = std::mem::take(&mut *self.creates.lock().unwrap());
        let mut kills = std::mem::take(&mut *self.kills.lock().unwrap());
        creates.sort_by(f64::total_cmp);
        kills.sort_by(f64::total_cmp);
        let sandboxes = ROUNDS * CLIENTS * PER_CLIENT;
        (sandboxes as f64 / self.seconds, creates, kills)
    }
}

fn latencies(creates: &[f64], kills: &[f64]) -> String {
    format!(
        "create p50 {} p99 {}; kill p50 {} p99 {}",
        show_ns(median(creates)),
        show_ns(percentile(creates, 99.0)),
        show_ns(median(kills)),
        show_ns(percentile(kills, 99.0))
    )
}

pub fn run() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ is in the workspace")
        .to_path_buf();
    let binary = host_binary()?;
    let (one_host_store, three_hosts_store, postgres_settings) = crate::block_on(async {
        anyhow::Ok((
            pg::fresh_database("serve_1_host").await?,
            pg::fresh_database("serve_3_hosts").await?,
            pg::settings().await?,
        ))
    })?;
    let mut redb = Deployment::start(&binary, &root, None, 1)?;
    let mut postgres_1 = Deployment::start(&binary, &root, Some(&one_host_store), 1)?;
    let mut postgres_3 = Deployment::start(&binary, &root, Some(&three_hosts_store), 3)?;

    let mut in_process_secs = 0.0;
    // Alternate with the in-process lifecycle so the disk's drift hits all.
    for _ in 0..ROUNDS {
        redb.round();
        postgres_1.round();
        postgres_3.round();
        let (per_sec, _) = crate::lifecycle::measure_host(CLIENTS, PER_CLIENT)?;
        in_process_secs += (CLIENTS * PER_CLIENT) as f64 / per_sec;
    }
    let ledger_audits = [&redb, &postgres_1, &postgres_3]
        .into_iter()
        .map(|deployment| deployment.audit(&binary, &root))
        .collect::<Result<Vec<_>>>()?;
    let (serve_per_sec, creates, kills) = redb.results();
    let (postgres_1_per_sec, postgres_1_creates, postgres_1_kills) = postgres_1.results();
    let (postgres_3_per_sec, postgres_3_creates, postgres_3_kills) = postgres_3.results();
    drop((redb, postgres_1, postgres_3));

    let sandboxes = ROUNDS * CLIENTS * PER_CLIENT;
    let in_process_per_sec = sandboxes as f64 / in_process_secs;
    let postgres_run =
        |hosts: usize, per_sec: f64, creates: &[f64], kills: &[f64]| PostgresServeRun {
            hosts,
            sandboxes,
            per_sec,
            create_p50_ns: median(creates),
            create_p99_ns: percentile(creates, 99.0),
            kill_p50_ns: median(kills),
            kill_p99_ns: percentile(kills, 99.0),
            over_in_process: per_sec / in_process_per_sec,
            over_redb_serve: per_sec / serve_per_sec,
        };
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
        postgres_1_host: postgres_run(
            1,
            postgres_1_per_sec,
            &postgres_1_creates,
            &postgres_1_kills,
        ),
        postgres_3_hosts: postgres_run(
            3,
            postgres_3_per_sec,
            &postgres_3_creates,
            &postgres_3_kills,
        ),
        postgres_3_hosts_over_1_host: postgres_3_per_sec / postgres_1_per_sec,
        postgres_goal: "no goal: reported",
        postgres_settings,
        ledger_audits,
        cores: std::thread::available_parallelism().map_or(0, usize::from),
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
                "through serve (redb)".into(),
                format!("{serve_per_sec:.0}/s"),
                latencies(&creates, &kills),
            ),
            (
                "through serve, postgres, 1 host".into(),
                format!("{postgres_1_per_sec:.0}/s"),
                latencies(&postgres_1_creates, &postgres_1_kills),
            ),
            (
                "through serve, postgres, 3 hosts".into(),
                format!("{postgres_3_per_sec:.0}/s"),
                latencies(&postgres_3_creates, &postgres_3_kills),
            ),
            (
                "in process".into(),
                format!("{in_process_per_sec:.0}/s"),
                "the manager called directly, same concurrency, redb".into(),
            ),
            (
                "serve (redb) / in process".into(),
                format!("{:.2}x", report.serve_over_in_process),
                format!(
                    "goal ≥ {:.1}x: {verdict}",
                    report.goal_serve_over_in_process
                ),
            ),
            (
                "postgres 1 host / in process".into(),
                format!("{:.2}x", report.postgres_1_host.over_in_process),
                format!(
                    "{:.2}x serve on redb (no goal)",
                    report.postgres_1_host.over_redb_serve
                ),
            ),
            (
                "postgres 3 hosts / in process".into(),
                format!("{:.2}x", report.postgres_3_hosts.over_in_process),
                format!(
                    "{:.2}x serve on redb, {:.2}x postgres 1 host (no goal; {} cores)",
                    report.postgres_3_hosts.over_redb_serve,
                    report.postgres_3_hosts_over_1_host,
                    report.cores
                ),
            ),
        ],
    );
    let path = write_report("serve", &report)?;
    println!("  written to {}", path.display());
    // After the report, so the figures of a run that billed wrongly are
    // kept beside the evidence.
    if let Some(audit) = report.ledger_audits.iter().find(|audit| !audit.ok()) {
        anyhow::bail!(
            "{}: {} sandboxes were killed, but the journal has {} charges; voided holds {:?}, \
             expired holds {:?} (see ledger_audits in {})",
            audit.deployment,
            audit.sandboxes,
            audit.charged,
            audit.voided,
            audit.expired,
            path.display()
        );
    }
    Ok(())
}
