//! Routing: which extension instance serves a profile.
//!
//! For every candidate of the profile's route the router decides whether it
//! is **eligible** (loaded; not cooling down; `estimate-cost` succeeds; the
//! estimate is not above `max_cost`), then orders the eligible ones by the
//! strategy. Estimates are asked of all candidates concurrently. The result,
//! a [`RouteDecision`], says why each ineligible candidate was left out; the
//! lifecycle walks its order for fallback.
//!
//! The router asks the runtime for estimates and reads routing health; it
//! never holds credits and never creates anything.

pub mod estimate_cache;
pub mod health;

use crate::profile::{Profile, Strategy};
use crate::runtime::{CallError, CostEstimate, ExtensionSet, SandboxSpec, kind_name};
use health::{BreakerState, DEFAULT_EXPECTED_LATENCY_MS, HealthError, RouteHealth};
use sandboxer_credits::format_credits;
use serde::Serialize;

/// One candidate as the decision reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Candidate {
    pub name: String,
    /// `self-hosted` or `saas`; none when the instance is not loaded.
    pub kind: Option<&'static str>,
    pub eligible: bool,
    /// Why it is not eligible (none when it is).
    pub reason: Option<String>,
    /// The estimate for the whole ttl, in micro-credits.
    pub estimate: Option<u64>,
    /// The estimate's price per hour of the requested size.
    pub rate_per_hour: Option<u64>,
    /// The observed (or assumed) time to ready.
    pub latency_ms: Option<u64>,
    /// How many creates the latency average is made of.
    pub latency_samples: u64,
    /// 1 for the chosen candidate, 2 for the first fallback, ...
    pub rank: Option<usize>,
    /// `closed`, `open` or `half-open`; none when the instance is not loaded.
    pub breaker: Option<&'static str>,
    /// Whether the estimate failure (if any) is the backend's problem.
    #[serde(skip)]
    pub retryable_failure: bool,
}

/// The candidates of a profile, eligible ones first in the order to try.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteDecision {
    pub profile: String,
    pub strategy: Strategy,
    pub fallback: bool,
    pub max_cost: Option<u64>,
    pub chosen: Option<String>,
    pub candidates: Vec<Candidate>,
}

impl RouteDecision {
    /// The instances to try, in order: all eligible ones when fallback is
    /// on, else only the chosen one.
    pub fn attempt_order(&self) -> Vec<&Candidate> {
        let eligible = self
            .candidates
            .iter()
            .filter(|candidate| candidate.eligible);
        if self.fallback {
            eligible.collect()
        } else {
            eligible.take(1).collect()
        }
    }

    /// `name: reason` for every ineligible candidate, for error messages.
    pub fn reasons(&self) -> String {
        self.candidates
            .iter()
            .filter(|candidate| !candidate.eligible)
            .map(|candidate| {
                format!(
                    "{}: {}",
                    candidate.name,
                    candidate.reason.as_deref().unwrap_or("ineligible")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Health(#[from] HealthError),
}

pub struct Router<'a> {
    extensions: &'a ExtensionSet,
    health: &'a RouteHealth,
}

impl<'a> Router<'a> {
    pub fn new(extensions: &'a ExtensionSet, health: &'a RouteHealth) -> Self {
        Self { extensions, health }
    }

    /// Decides the order in which `profile`'s candidates should serve
    /// `spec`. Creates nothing and holds nothing.
    pub async fn decide(
        &self,
        profile: &Profile,
        spec: &SandboxSpec,
        now_ms: u64,
    ) -> Result<RouteDecision, RouterError> {
        let route = &profile.route;
        let health = self.health.read(&route.candidates)?;
        let mut candidates = Vec::with_capacity(route.candidates.len());
        let mut to_estimate = Vec::new();
        for (name, (breaker, latency)) in route.candidates.iter().zip(health) {
            let mut candidate = Candidate {
                name: name.clone(),
                kind: None,
                eligible: false,
                reason: None,
                estimate: None,
                rate_per_hour: None,
                latency_ms: None,
                latency_samples: 0,
                rank: None,
                breaker: None,
                retryable_failure: false,
            };
            match self.extensions.entry(name) {
                None => {
                    candidate.reason =
                        Some("no extension with this name in the extensions directory".into())
                }
                Some(entry) => match &entry.status {
                    Err(reason) => candidate.reason = Some(format!("rejected: {reason}")),
                    Ok(extension) => {
                        candidate.kind = Some(kind_name(extension.info.kind));
                        candidate.latency_samples = latency.samples;
                        candidate.latency_ms = Some(if latency.samples > 0 {
                            latency.average_ms
                        } else {
                            extension
                                .routing
                                .expected_latency_ms
                                .unwrap_or(DEFAULT_EXPECTED_LATENCY_MS)
                        });
                        match breaker.state(now_ms) {
                            BreakerState::Open { until_ms } => {
                                candidate.breaker = Some("open");
                                candidate.reason = Some(format!(
                                    "cooling down after {} consecutive failures; tried again in {} s",
                                    breaker.consecutive_failures,
                                    until_ms.saturating_sub(now_ms).div_ceil(1000)
                                ));
                            }
                            state => {
                                candidate.breaker = Some(if state == BreakerState::HalfOpen {
                                    "half-open"
                                } else {
                                    "closed"
                                });
                                to_estimate.push((candidates.len(), extension.clone()));
                            }
                        }
                    }
                },
            }
            candidates.push(candidate);
        }

        let lookup = estimate_cache::EstimateLookup::new(&to_estimate, spec);
        let fresh = estimate_all(lookup.misses(), lookup.spec()).await;
        for (index, outcome) in lookup.finish(fresh) {
            let candidate = &mut candidates[index];
            match outcome {
                Ok(estimate) => {
                    candidate.estimate = Some(estimate.amount);
                    candidate.rate_per_hour = Some(estimate.rate_per_hour);
                    match route.max_cost {
                        Some(max_cost) if estimate.amount > max_cost => {
                            candidate.reason = Some(format!(
                                "estimate {} is above max_cost {}",
                                format_credits(estimate.amount),
                                format_credits(max_cost)
                            ));
                        }
                        _ => candidate.eligible = true,
                    }
                }
                Err(error) => {
                    candidate.retryable_failure = error.is_retryable();
                    candidate.reason = Some(format!("estimate-cost failed: {error}"));
                }
            }
        }

        let mut eligible: Vec<usize> = (0..candidates.len())
            .filter(|index| candidates[*index].eligible)
            .collect();
        // Stable sorts: ties keep the listed order.
        match route.strategy {
            Strategy::Explicit => {}
            Strategy::PreferSelfHosted => {
                eligible.sort_by_key(|index| candidates[*index].kind != Some("self-hosted"))
            }
            Strategy::LowestCost => eligible.sort_by_key(|index| candidates[*index].estimate),
            Strategy::LowestLatency => eligible.sort_by_key(|index| candidates[*index].latency_ms),
        }
        for (rank, index) in eligible.iter().enumerate() {
            candidates[*index].rank = Some(rank + 1);
        }
        let chosen = eligible
            .first()
            .map(|index| candidates[*index].name.clone());
        // Eligible candidates in rank order, then the rest in listed order.
        let mut ordered: Vec<Candidate> = eligible
            .iter()
            .map(|index| candidates[*index].clone())
            .collect();
        ordered.extend(
            candidates
                .into_iter()
                .filter(|candidate| !candidate.eligible),
        );

        Ok(RouteDecision {
            profile: profile.name.clone(),
            strategy: route.strategy,
            fallback: route.fallback,
            max_cost: route.max_cost,
            chosen,
            candidates: ordered,
        })
    }
}

type EstimateJob = (usize, std::sync::Arc<crate::runtime::Extension>);

/// Runs every estimate and returns them by candidate index.
///
/// All of them at once on the caller's task: most estimates are pure
/// arithmetic (tens of microseconds, each yielding only when done), but one
/// may wait on the network, and then the others go on meanwhile.
async fn estimate_all(
    jobs: &[EstimateJob],
    spec: &SandboxSpec,
) -> Vec<(usize, Result<CostEstimate, CallError>)> {
    let asks = jobs
        .iter()
        .map(|(index, extension)| async move { (*index, extension.estimate_cost(spec).await) });
    futures_util::future::join_all(asks).await
}
