//! `bench lifecycle`: sandboxes per second through the whole lifecycle
//! (route, hold, create, destroy, meter, settle, every record and event) on
//! saas-stub with 1 and 64 concurrent requests, with p50/p99 create latency;
//! and in the same run the floor made of its parts: the bare extension
//! calls (estimate, create, destroy, meter-actual) plus the ledger's hold
//! and settle, at the same concurrency. The two alternate in short rounds,
//! each on its own home, so a shared disk's drift hits both alike; the
//! figure is the median over the rounds of the host's throughput over the
//! floor's in the same round (a disk stall in one round moves one ratio,
//! not the whole figure). The pooled ratio (all sandboxes over all seconds)
//! is printed beside it.
//!
//! Goal: at least 0.7x the floor's throughput at both concurrencies.

use crate::stats::{median, percentile, print_rows, show_ns, write_report};
use anyhow::Result;
use sandboxer_host::ledger::{Ledger, LedgerOptions, LedgerStore};
use sandboxer_host::manager::{CreateRequest, SandboxManager, now_ms};
use sandboxer_host::profile::Profile;
use sandboxer_host::runtime::{ExtensionCatalog, Runtime};
use sandboxer_host::state_db::StateDb;
use serde::Serialize;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

const SOLO: usize = 40;
const CALLERS: usize = 64;
const PER_CALLER: usize = 2;
/// Host and floor alternate this many times (each round SOLO or CALLERS x
/// PER_CALLER sandboxes, a tenth of a second or so).
const ROUNDS: usize = 15;

#[derive(Serialize)]
struct Row {
    concurrency: usize,
    sandboxes: usize,
    host_per_sec: f64,
    create_p50_ns: f64,
    create_p99_ns: f64,
    floor_per_sec: f64,
    /// Median over the rounds of host/floor throughput in the same round.
    host_over_floor: f64,
    /// All the host's sandboxes per second over all the floor's.
    pooled_host_over_floor: f64,
    rounds: usize,
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
    extensions: Arc<ExtensionCatalog>,
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
    let extensions = crate::block_on(runtime.load_dir(&dir))?;
    anyhow::ensure!(extensions.get("saas-stub").is_some(), "saas-stub loads");
    let extensions = Arc::new(ExtensionCatalog::new(extensions));
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

/// The whole lifecycle through the manager, on its own home.
struct HostSide {
    _world: World,
    manager: Arc<SandboxManager>,
    request: Arc<CreateRequest>,
}

impl HostSide {
    fn new() -> Result<Self> {
        let world = world()?;
        let manager = Arc::new(SandboxManager::new(
            Arc::new(ledger(&world)?),
            world.state.clone(),
            world.extensions.clone(),
        ));
        let profile = Profile::parse(
            "[sandbox]\nttl_secs = 60\n[route]\nstrategy = \"explicit\"\nextension = \"saas-stub\"\n",
            Path::new("bench.toml"),
        )?;
        let request = Arc::new(CreateRequest {
            profile,
            tenant: "bench".into(),
            ttl_secs: None,
            command: None,
            metadata: Default::default(),
        });
        Ok(Self {
            _world: world,
            manager,
            request,
        })
    }

    /// Seconds for `callers` x `per_caller` sandboxes; each create's
    /// latency is added to `latencies`.
    fn round(
        &self,
        executor: &tokio::runtime::Runtime,
        callers: usize,
        per_caller: usize,
        latencies: &Arc<Mutex<Vec<f64>>>,
    ) -> f64 {
        let started = Instant::now();
        executor.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..callers {
                let (manager, request, latencies) = (
                    self.manager.clone(),
                    self.request.clone(),
                    latencies.clone(),
                );
                tasks.spawn(async move {
                    for _ in 0..per_caller {
                        let create_started = Instant::now();
                        let record = manager.create(&request).await.expect("create");
                        latencies
                            .lock()
                            .unwrap()
                            .push(create_started.elapsed().as_nanos() as f64);
                        manager.destroy(&record.id, false).await.expect("destroy");
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        });
        started.elapsed().as_secs_f64()
    }
}

/// The parts alone, on another home: the four extension calls and the two
/// ledger operations.
struct FloorSide {
    world: World,
    ledger: Arc<dyn LedgerStore>,
    profile: Arc<Profile>,
}

impl FloorSide {
    fn new() -> Result<Self> {
        let world = world()?;
        let ledger = ledger(&world)?;
        let profile = Profile::parse(
            "[route]\nstrategy = \"explicit\"\nextension = \"saas-stub\"\n",
            Path::new("bench.toml"),
        )?;
        Ok(Self {
            world,
            ledger: Arc::new(ledger),
            profile: Arc::new(profile),
        })
    }

    fn round(
        &self,
        executor: &tokio::runtime::Runtime,
        round: usize,
        callers: usize,
        per_caller: usize,
    ) -> f64 {
        let stub = self
            .world
            .extensions
            .snapshot()
            .get("saas-stub")
            .unwrap()
            .clone();
        let expires = now_ms() + 3_600_000;
        let started = Instant::now();
        executor.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for caller in 0..callers {
                let (ledger, stub, profile) =
                    (self.ledger.clone(), stub.clone(), self.profile.clone());
                tasks.spawn(async move {
                    for index in 0..per_caller {
                        let id = format!("floor-{round}-{caller}-{index}");
                        let spec = profile.spec(&id, Some(60));
                        let estimate = stub.estimate_cost(&spec).await.unwrap();
                        ledger
                            .hold("bench", estimate.amount, &id, "saas-stub", expires)
                            .await
                            .unwrap();
                        let handle = stub.create(&spec).await.unwrap();
                        let usage = stub.destroy(&spec, &handle).await.unwrap();
                        let actual = stub.meter_actual(&spec, usage).await.unwrap();
                        ledger.settle(&id, actual).await.unwrap();
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        });
        started.elapsed().as_secs_f64()
    }
}

/// The host side alone, one round of `callers` x `per_caller` sandboxes on
/// a fresh home: (sandboxes/s, create latencies). `bench serve` compares the
/// HTTP path with it.
pub fn measure_host(callers: usize, per_caller: usize) -> Result<(f64, Vec<f64>)> {
    let host = HostSide::new()?;
    let executor = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let secs = host.round(&executor, callers, per_caller, &latencies);
    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap());
    latencies.sort_by(f64::total_cmp);
    Ok(((callers * per_caller) as f64 / secs, latencies))
}

struct Measured {
    host_per_sec: f64,
    floor_per_sec: f64,
    /// Sorted host/floor throughput ratios, one per round.
    round_ratios: Vec<f64>,
    latencies: Vec<f64>,
}

/// Host and floor in alternating rounds, so that the shared disk's drift
/// hits both alike.
fn measure(callers: usize, per_caller: usize) -> Result<Measured> {
    let host = HostSide::new()?;
    let floor = FloorSide::new()?;
    // The server's shape: two worker threads, the callers as tasks.
    let executor = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let (mut host_secs, mut floor_secs) = (0.0, 0.0);
    let mut round_ratios = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let host_round = host.round(&executor, callers, per_caller, &latencies);
        let floor_round = floor.round(&executor, round, callers, per_caller);
        // Same sandboxes in each: throughput over throughput is the
        // floor's seconds over the host's.
        round_ratios.push(floor_round / host_round);
        host_secs += host_round;
        floor_secs += floor_round;
    }
    round_ratios.sort_by(f64::total_cmp);
    anyhow::ensure!(
        executor.block_on(host.manager.ledger().verify())?.ok,
        "the ledger stays consistent"
    );
    let sandboxes = (ROUNDS * callers * per_caller) as f64;
    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap());
    latencies.sort_by(f64::total_cmp);
    Ok(Measured {
        host_per_sec: sandboxes / host_secs,
        floor_per_sec: sandboxes / floor_secs,
        round_ratios,
        latencies,
    })
}

pub fn run() -> Result<()> {
    let mut rows = Vec::new();
    for (concurrency, per_caller) in [(1, SOLO), (CALLERS, PER_CALLER)] {
        let measured = measure(concurrency, per_caller)?;
        rows.push(Row {
            concurrency,
            sandboxes: ROUNDS * concurrency * per_caller,
            host_per_sec: measured.host_per_sec,
            create_p50_ns: median(&measured.latencies),
            create_p99_ns: percentile(&measured.latencies, 99.0),
            floor_per_sec: measured.floor_per_sec,
            host_over_floor: median(&measured.round_ratios),
            pooled_host_over_floor: measured.host_per_sec / measured.floor_per_sec,
            rounds: ROUNDS,
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
                    "create p50 {} p99 {}; floor {:.0}/s; {:.2}x of the floor, median of {} rounds (goal >= {:.1}: {verdict}; pooled {:.2}x)",
                    show_ns(row.create_p50_ns),
                    show_ns(row.create_p99_ns),
                    row.floor_per_sec,
                    row.host_over_floor,
                    row.rounds,
                    report.goal_host_over_floor,
                    row.pooled_host_over_floor
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
