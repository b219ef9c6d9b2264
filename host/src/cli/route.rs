//! `route explain`.

use super::args::RouteCommand;
use super::output::{print_json, print_table};
use super::{AlreadyReported, Context};
use anyhow::Result;
use sandboxer_host::service::api::RouteExplainView;

pub async fn run(command: RouteCommand, context: &Context) -> Result<()> {
    let RouteCommand::Explain { profile, ttl, json } = command;
    let api = context.connect_read_only(json).await?;
    let decision = api.route_explain(&profile, ttl).await;
    api.close().await;
    let decision = decision?;
    if json {
        print_json(&decision)?;
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

pub fn print_decision(decision: &RouteExplainView) {
    println!(
        "profile {}: strategy {}, max_cost {}, fallback {}",
        decision.profile,
        decision.strategy,
        decision.max_cost.as_deref().unwrap_or("none"),
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
                candidate.kind.clone().unwrap_or_else(dash),
                candidate.estimate.clone().unwrap_or_else(dash),
                candidate
                    .latency_ms
                    .map_or_else(dash, |latency| format!("{latency} ms")),
                candidate.breaker.clone().unwrap_or_else(dash),
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
