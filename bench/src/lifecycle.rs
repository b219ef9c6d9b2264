//! `bench lifecycle`: sandboxes per second through the whole lifecycle
//! (route, hold, create, destroy, meter, settle, every record and event) on
//! saas-stub with 1 and 64 concurrent requests, with p50/p99 create latency;
//! and in the same run the floor made of its parts: the bare extension
//! calls (estimate, create, destroy, meter-actual) plus the ledger's hold
//! and settle, at the same concurrency.
//!
//! Goal: at least 0.7x the floor's throughput at both concurrencies.

use crate::stats::{median, percentile, print_rows, show_ns, write_report};
use anyhow::Result;
use sandboxer_host::ledger::{Ledger, LedgerOptions};
use sandboxer_host::manager::{CreateRequest, SandboxManager, now_ms};
use sandboxer_host::profile::Profile;
use sandboxer_host::runtime::{ExtensionSet, Runtime};
use sandboxer_host::state_db::StateDb;
use serde::Serialize;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

const SOLO: usize = 100;
const CALLERS: usize = 64;
const PER_CALLER: usize = 8;

#[derive(Serialize)]
struct Row {
    concurrency: usize,
    sandboxes: usize,
    host_per_sec: f64,
    create_p50_ns: f64,
    create_p99_ns: f64,
    floor_per_sec: f64,
    host_over_floor: f64,
}

#[derive(Serialize)]
struct LifecycleReport {
    rows: Vec<Row>,
    goal_host_over_floor: f64,
}

struct World {
    _home: tempfile::TempDir,
    _runtime: Runtime,
    state: Arc<StateDb>,
    extensions: ExtensionSet,
    ledger_path: std::path::PathBuf,
}

fn world() -> Result<World> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ is in the workspace");
    let home = tempfile::tempdir()?;
    let dir = home.path().join("extensions");
    std::fs::create_dir_all(&dir)?;
    for file in ["saas-stub.wasm", "saas-stub.toml"] {
        std::fs::copy(root.join("target/extensions").join(file), dir.join(file))?;
    }
    let state = Arc::new(StateDb::new(home.path().join("state.redb")));
    let runtime = Runtime::new(home.path().join("cache"), state.clone())?;
    let extensions = runtime.load_dir(&dir)?;
    anyhow::ensure!(extensions.get("saas-stub").is_some(), "saas-stub loads");
    let ledger_path = home.path().join("ledger.redb");
    Ok(World {
        _home: home,
        _runtime: runtime,
        state,
        extensions,
        ledger_path,
    })
}

fn ledger(world: &World) -> Result<Ledger> {
    let ledger = Ledger::open(
        &world.ledger_path,
        LedgerOptions {
            default_credits: 0,
            expire_on_open: false,
        },
    )?;
    ledger.grant("bench", 1_000_000_000_000, Some("bench"))?;
    Ok(ledger)
}

/// Sandboxes per second through the manager, and each create's latency.
fn through_host(callers: usize, per_caller: usize) -> Result<(f64, Vec<f64>)> {
    let world = world()?;
    let manager = Arc::new(SandboxManager::new(
        ledger(&world)?,
        world.state.clone(),
        world.extensions.clone(),
    ));
    let profile = Profile::parse(
        "[sandbox]\nttl_secs = 60\n[route]\nstrategy = \"explicit\"\nextension = \"saas-stub\"\n",
        Path::new("bench.toml"),
    )?;
    let request = CreateRequest {
        profile,
        tenant: "bench".into(),
        ttl_secs: None,
        command: None,
    };
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..callers {
            scope.spawn(|| {
                for _ in 0..per_caller {
                    let create_started = Instant::now();
                    let record = manager.create(&request).expect("create");
                    latencies
                        .lock()
                        .unwrap()
                        .push(create_started.elapsed().as_nanos() as f64);
                    manager.destroy(&record.id, false).expect("destroy");
                }
            });
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    anyhow::ensure!(manager.ledger().verify()?.ok, "the ledger stays consistent");
    let mut latencies = latencies.lock().unwrap().clone();
    latencies.sort_by(f64::total_cmp);
    Ok(((callers * per_caller) as f64 / elapsed, latencies))
}

/// The parts alone: the four extension calls and the two ledger operations.
fn floor(callers: usize, per_caller: usize) -> Result<f64> {
    let world = world()?;
    let ledger = ledger(&world)?;
    let stub = world.extensions.get("saas-stub").unwrap().clone();
    let profile = Profile::parse(
        "[route]\nstrategy = \"explicit\"\nextension = \"saas-stub\"\n",
        Path::new("bench.toml"),
    )?;
    let expires = now_ms() + 3_600_000;
    let started = Instant::now();
    std::thread::scope(|scope| {
        for caller in 0..callers {
            let (ledger, stub, profile) = (&ledger, &stub, &profile);
            scope.spawn(move || {
                for index in 0..per_caller {
                    let id = format!("floor-{caller}-{index}");
                    let spec = profile.spec(&id, Some(60));
                    let estimate = stub.estimate_cost(&spec).unwrap();
                    ledger
                        .hold("bench", estimate.amount, &id, "saas-stub", expires)
                        .unwrap();
                    let handle = stub.create(&spec).unwrap();
                    let usage = stub.destroy(&spec, &handle).unwrap();
                    let actual = stub.meter_actual(&spec, usage).unwrap();
                    ledger.settle(&id, actual).unwrap();
                }
            });
        }
    });
    Ok((callers * per_caller) as f64 / started.elapsed().as_secs_f64())
}

pub fn run() -> Result<()> {
    let mut rows = Vec::new();
    for (concurrency, per_caller) in [(1, SOLO), (CALLERS, PER_CALLER)] {
        let (host_per_sec, latencies) = through_host(concurrency, per_caller)?;
        let floor_per_sec = floor(concurrency, per_caller)?;
        rows.push(Row {
            concurrency,
            sandboxes: concurrency * per_caller,
            host_per_sec,
            create_p50_ns: median(&latencies),
            create_p99_ns: percentile(&latencies, 99.0),
            floor_per_sec,
            host_over_floor: host_per_sec / floor_per_sec,
        });
    }
    let report = LifecycleReport {
        rows,
        goal_host_over_floor: 0.7,
    };
    let printed: Vec<_> = report
        .rows
        .iter()
        .map(|row| {
            let verdict = if row.host_over_floor >= report.goal_host_over_floor { "meets goal" } else { "MISSES goal" };
            (
                format!("{:>2} concurrent", row.concurrency),
                format!("{:.0}/s", row.host_per_sec),
                format!(
                    "create p50 {} p99 {}; floor {:.0}/s; {:.2}x of the floor (goal >= {:.1}: {verdict})",
                    show_ns(row.create_p50_ns),
                    show_ns(row.create_p99_ns),
                    row.floor_per_sec,
                    row.host_over_floor,
                    report.goal_host_over_floor
                ),
            )
        })
        .collect();
    print_rows(
        "lifecycle: sandboxes per second, create to settled",
        &printed,
    );
    let path = write_report("lifecycle", &report)?;
    println!("\nwritten to {}", path.display());
    Ok(())
}
