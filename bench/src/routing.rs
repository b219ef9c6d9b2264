//! `bench routing`: how long a `lowest-cost` decision takes over 1, 4 and 16
//! saas-stub instances with different rates, next to the same estimates
//! called one after another (the work a decision without reuse cannot
//! avoid), measured in the same run. Two decisions: the steady state, where
//! the same spec was priced in the last seconds and every estimate is
//! reused (docs/routing.md), and a cold one, where each decision prices a
//! spec never seen before (another ttl each time) and asks every instance.
//!
//! Goals: 16 candidates under 0.1 ms median with estimates reused, and
//! under 1 ms cold.

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
    /// Every estimate reused from an earlier decision on the same spec.
    decision_median_ns: f64,
    decision_p99_ns: f64,
    /// Every estimate asked of its instance (a spec not seen before).
    cold_decision_median_ns: f64,
    cold_decision_p99_ns: f64,
    sequential_estimates_median_ns: f64,
    decision_over_sequential: f64,
    cold_decision_over_sequential: f64,
}

#[derive(Serialize)]
struct RoutingReport {
    rows: Vec<Row>,
    goal_16_candidates_ns: f64,
    goal_16_candidates_cold_ns: f64,
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
        let set = crate::block_on(runtime.load_dir(&dir))?;
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
        let decision = crate::block_on(router.decide(&profile, &spec, 0))?;
        anyhow::ensure!(
            decision.chosen.as_deref() == names.last().map(String::as_str),
            "the cheapest is chosen"
        );

        let decisions = sample(20, DECISIONS, || {
            black_box(crate::block_on(router.decide(&profile, &spec, 0)).unwrap());
        });
        // Another ttl each time: a spec the cache has never priced.
        let mut ttl = 1_000;
        let cold = sample(20, DECISIONS, || {
            ttl += 1;
            let spec = profile.spec("sbx-bench", Some(ttl));
            black_box(crate::block_on(router.decide(&profile, &spec, 0)).unwrap());
        });
        let extensions: Vec<_> = names
            .iter()
            .map(|name| set.get(name).unwrap().clone())
            .collect();
        let sequential = sample(20, DECISIONS, || {
            for extension in &extensions {
                black_box(crate::block_on(extension.estimate_cost(&spec)).unwrap());
            }
        });
        rows.push(Row {
            candidates: size,
            decision_median_ns: median(&decisions),
            decision_p99_ns: percentile(&decisions, 99.0),
            cold_decision_median_ns: median(&cold),
            cold_decision_p99_ns: percentile(&cold, 99.0),
            sequential_estimates_median_ns: median(&sequential),
            decision_over_sequential: median(&decisions) / median(&sequential),
            cold_decision_over_sequential: median(&cold) / median(&sequential),
        });
    }
    let report = RoutingReport {
        rows,
        goal_16_candidates_ns: 100_000.0,
        goal_16_candidates_cold_ns: 1_000_000.0,
    };
    let verdict = |row: &Row, median: f64, goal: f64, shown: &str| {
        if row.candidates != 16 {
            String::new()
        } else if median < goal {
            format!("; goal < {shown}: meets goal")
        } else {
            format!("; goal < {shown}: MISSES goal")
        }
    };
    let mut printed = Vec::new();
    for row in &report.rows {
        printed.push((
            format!("lowest-cost over {:>2}, reused", row.candidates),
            show_ns(row.decision_median_ns),
            format!(
                "p99 {}; {:.2}x of {} estimates in a row{}",
                show_ns(row.decision_p99_ns),
                row.decision_over_sequential,
                row.candidates,
                verdict(
                    row,
                    row.decision_median_ns,
                    report.goal_16_candidates_ns,
                    "0.1 ms"
                )
            ),
        ));
        printed.push((
            format!("lowest-cost over {:>2}, cold", row.candidates),
            show_ns(row.cold_decision_median_ns),
            format!(
                "p99 {}; {} estimates in a row take {} ({:.2}x){}",
                show_ns(row.cold_decision_p99_ns),
                row.candidates,
                show_ns(row.sequential_estimates_median_ns),
                row.cold_decision_over_sequential,
                verdict(
                    row,
                    row.cold_decision_median_ns,
                    report.goal_16_candidates_cold_ns,
                    "1 ms"
                )
            ),
        ));
    }
    print_rows("routing: decision time (median)", &printed);
    let path = write_report("routing", &report)?;
    println!("\nwritten to {}", path.display());
    Ok(())
}
