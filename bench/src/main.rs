//! `cargo xtask bench [runtime|routing|ledger|lifecycle|serve|all]`: each suite measures the host
//! against a baseline measured in the same run, prints a table with the
//! ratios and writes target/bench/<suite>.json. The machine is shared and
//! noisy: read medians and ratios, not single runs.

mod ledger;
mod lifecycle;
mod pg;
mod routing;
mod runtime;
mod serve;
mod sqlite;
mod stats;

/// Drives one future to completion on this thread's runtime: the benches
/// call the host's async API one call at a time (the bare-wasmtime baseline
/// goes through the same, so ratios compare like with like).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime for the benches");
    }
    RUNTIME.with(|runtime| runtime.block_on(future))
}

fn main() -> anyhow::Result<()> {
    let suite = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    match suite.as_str() {
        "runtime" => runtime::run(),
        "ledger" => ledger::run(),
        "routing" => routing::run(),
        "lifecycle" => lifecycle::run(),
        "serve" => serve::run(),
        // Not a suite: the process `runtime` starts to time cached loads.
        "cached-loads" => {
            let mut args = std::env::args().skip(2);
            match (args.next(), args.next()) {
                (Some(home), Some(file)) => runtime::cached_loads_child(
                    std::path::Path::new(&home),
                    std::path::Path::new(&file),
                ),
                _ => anyhow::bail!("usage: sandboxer-bench cached-loads HOME FILE"),
            }
        }
        "all" => {
            runtime::run()?;
            routing::run()?;
            ledger::run()?;
            lifecycle::run()?;
            serve::run()
        }
        other => {
            anyhow::bail!(
                "unknown suite `{other}`: use runtime, routing, ledger, lifecycle, serve or all"
            )
        }
    }
}
