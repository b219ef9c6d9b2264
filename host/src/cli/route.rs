//! `route explain`.

use super::AlreadyReported;
use super::args::RouteCommand;
use super::ext::open_runtime_with_state;
use super::output::{print_json, print_table};
use anyhow::Result;
use sandboxer_credits::format_credits;
use sandboxer_host::paths::HostPaths;
use sandboxer_host::profile::{MAX_TTL_SECS, Profile};
use sandboxer_host::router::health::RouteHealth;
use sandboxer_host::router::{RouteDecision, Router};
use serde_json::json;

pub fn run(command: RouteCommand, paths: &HostPaths) -> Result<()> {
    match command {
        RouteCommand::Explain { profile, ttl, json } => {
            let profile = Profile::find(&profile, &paths.profiles_dir)?;
            if let Some(ttl) = ttl {
                anyhow::ensure!(
                    (1..=MAX_TTL_SECS).contains(&ttl),
                    "--ttl must be between 1 and {MAX_TTL_SECS} seconds"
                );
            }
            let (runtime, state) = open_runtime_with_state(paths)?;
            let extensions = runtime.load_dir(&paths.extensions_dir)?;
            let health = RouteHealth::new(state);
            let spec = profile.spec("route-explain", ttl);
            let decision = Router::new(&extensions, &health).decide(&profile, &spec, now_ms())?;
            if json {
                print_json(&decision_json(&decision))?;
            } else {
                print_decision(&decision);
            }
            if decision.chosen.is_none() {
                eprintln!(
                    "error: no eligible backend for profile `{}`: {}",
                    decision.profile,
                    decision.reasons()
                );
                return Err(AlreadyReported.into());
            }
            Ok(())
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// `route explain --json`: estimates as decimal-credit strings.
pub fn decision_json(decision: &RouteDecision) -> serde_json::Value {
    let candidates: Vec<_> = decision
        .candidates
        .iter()
        .map(|candidate| {
            json!({
                "name": candidate.name,
                "kind": candidate.kind,
                "eligible": candidate.eligible,
                "reason": candidate.reason,
                "estimate": candidate.estimate.map(format_credits),
                "latency_ms": candidate.latency_ms,
                "latency_samples": candidate.latency_samples,
                "breaker": candidate.breaker,
                "rank": candidate.rank,
            })
        })
        .collect();
    json!({
        "profile": decision.profile,
        "strategy": decision.strategy,
        "fallback": decision.fallback,
        "max_cost": decision.max_cost.map(format_credits),
        "chosen": decision.chosen,
        "candidates": candidates,
    })
}

pub fn print_decision(decision: &RouteDecision) {
    println!(
        "profile {}: strategy {}, max_cost {}, fallback {}",
        decision.profile,
        decision.strategy,
        decision
            .max_cost
            .map_or_else(|| "none".to_string(), format_credits),
        if decision.fallback { "on" } else { "off" }
    );
    let dash = || "-".to_string();
    let rows: Vec<Vec<String>> = decision
        .candidates
        .iter()
        .map(|candidate| {
            vec![
                candidate.rank.map_or_else(dash, |rank| rank.to_string()),
                candidate.name.clone(),
                candidate.kind.map_or_else(dash, str::to_string),
                candidate.estimate.map_or_else(dash, format_credits),
                candidate
                    .latency_ms
                    .map_or_else(dash, |latency| format!("{latency} ms")),
                candidate.breaker.map_or_else(dash, str::to_string),
                candidate.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(
        &[
            "RANK", "NAME", "KIND", "ESTIMATE", "LATENCY", "BREAKER", "WHY NOT",
        ],
        &rows,
    );
    match &decision.chosen {
        Some(chosen) => println!("chosen: {chosen}"),
        None => println!("chosen: none"),
    }
}
