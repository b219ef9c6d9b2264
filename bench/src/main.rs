//! `cargo xtask bench [runtime|routing|ledger|lifecycle|all]`: each suite measures the host
//! against a baseline measured in the same run, prints a table with the
//! ratios and writes target/bench/<suite>.json. The machine is shared and
//! noisy: read medians and ratios, not single runs.

mod ledger;
mod lifecycle;
mod routing;
mod runtime;
mod sqlite;
mod stats;

fn main() -> anyhow::Result<()> {
    let suite = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    match suite.as_str() {
        "runtime" => runtime::run(),
        "ledger" => ledger::run(),
        "routing" => routing::run(),
        "lifecycle" => lifecycle::run(),
        "all" => {
            runtime::run()?;
            routing::run()?;
            ledger::run()?;
            lifecycle::run()
        }
        other => {
            anyhow::bail!("unknown suite `{other}`: use runtime, routing, ledger, lifecycle or all")
        }
    }
}
