//! `bench routing`: how long a `lowest-cost` decision takes over 1, 4 and 16
//! saas-stub instances with different rates, next to the same estimates
//! called one after another (the work the decision cannot avoid), measured
//! in the same run.
//!
//! Goal: 16 candidates under 1 ms median.

use crate::stats::{median, percentile, print_rows, sample, show_ns, write_report};
use anyhow::Result;
use sandboxer_host::profile::Profile;
use sandboxer_host::router::Router;
use sandboxer_host::router::health::RouteHealth;
use sandboxer_host::runtime::Runtime;
use sandboxer_host::state_db::StateDb;
use serde::Serialize;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

const SIZES: [usize; 3] = [1, 4, 16];
const DECISIONS: usize = 400;

#[derive(Serialize)]
struct Row {
    candidates: usize,
    decision_median_ns: f64,
    decision_p99_ns: f64,
    sequential_estimates_median_ns: f64,
    decision_over_sequential: f64,
}

#[derive(Serialize)]
struct RoutingReport {
    rows: Vec<Row>,
    goal_16_candidates_ns: f64,
}

pub fn run() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ is in the workspace");
    let stub = root.join("target/extensions/saas-stub.wasm");
    anyhow::ensure!(
        stub.is_file(),
        "{} is missing: run `cargo xtask build-extensions`",
        stub.display()
    );
    let mut rows = Vec::new();
    for size in SIZES {
        let home = tempfile::tempdir()?;
        let dir = home.path().join("extensions");
        std::fs::create_dir_all(&dir)?;
        let names: Vec<String> = (0..size).map(|index| format!("stub-{index:02}")).collect();
        for (index, name) in names.iter().enumerate() {
            std::fs::copy(&stub, dir.join(format!("{name}.wasm")))?;
            // Different rates, so the order is real work: 0.01, 0.02, ...
            std::fs::write(
                dir.join(format!("{name}.toml")),
                format!("[config]\nrate_per_vcpu_hour = \"0.{:02}\"\n", size - index),
            )?;
        }
        let state = Arc::new(StateDb::new(home.path().join("state.redb")));
        let runtime = Runtime::new(home.path().join("cache"), state.clone())?;
        let set = runtime.load_dir(&dir)?;
        let health = RouteHealth::new(state);
        let list: Vec<String> = names.iter().map(|name| format!("\"{name}\"")).collect();
        let profile = Profile::parse(
            &format!(
                "[route]\nstrategy = \"lowest-cost\"\ncandidates = [{}]\n",
                list.join(", ")
            ),
            Path::new("bench.toml"),
        )?;
        let spec = profile.spec("sbx-bench", None);
        let router = Router::new(&set, &health);
        let decision = router.decide(&profile, &spec, 0)?;
        anyhow::ensure!(
            decision.chosen.as_deref() == names.last().map(String::as_str),
            "the cheapest is chosen"
        );

        let decisions = sample(20, DECISIONS, || {
            black_box(router.decide(&profile, &spec, 0).unwrap());
        });
        let extensions: Vec<_> = names
            .iter()
            .map(|name| set.get(name).unwrap().clone())
            .collect();
        let sequential = sample(20, DECISIONS, || {
            for extension in &extensions {
                black_box(extension.estimate_cost(&spec).unwrap());
            }
        });
        rows.push(Row {
            candidates: size,
            decision_median_ns: median(&decisions),
            decision_p99_ns: percentile(&decisions, 99.0),
            sequential_estimates_median_ns: median(&sequential),
            decision_over_sequential: median(&decisions) / median(&sequential),
        });
    }
    let report = RoutingReport {
        rows,
        goal_16_candidates_ns: 1_000_000.0,
    };
    let mut printed = Vec::new();
    for row in &report.rows {
        let goal = if row.candidates == 16 {
            if row.decision_median_ns < report.goal_16_candidates_ns {
                ", goal < 1 ms: meets goal"
            } else {
                ", goal < 1 ms: MISSES goal"
            }
        } else {
            ""
        };
        printed.push((
            format!("lowest-cost over {:>2}", row.candidates),
            show_ns(row.decision_median_ns),
            format!(
                "p99 {}; {} estimates in a row take {} ({:.2}x){goal}",
                show_ns(row.decision_p99_ns),
                row.candidates,
                show_ns(row.sequential_estimates_median_ns),
                row.decision_over_sequential
            ),
        ));
    }
    print_rows("routing: decision time (median)", &printed);
    let path = write_report("routing", &report)?;
    println!("\nwritten to {}", path.display());
    Ok(())
}
