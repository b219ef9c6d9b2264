//! Routing with real extension instances: each strategy, ties, every
//! ineligibility reason, max_cost, the breaker, a property test, and the
//! acceptance run of `route explain` as a new user would try it.

use crate::support::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sandboxer_host::profile::Profile;
use sandboxer_host::router::health::{BASE_COOLDOWN_MS, FAILURE_THRESHOLD, RouteHealth};
use sandboxer_host::router::{RouteDecision, Router};
use sandboxer_host::runtime::ExtensionSet;
use sandboxer_host::state_db::StateDb;
use std::path::Path;
use std::sync::Arc;

const NOW: u64 = 1_800_000_000_000;

/// A home with named instances: saas-stub copies at given vCPU rates, and
/// hostile copies with given sidecars.
struct World {
    home: TestHome,
    set: ExtensionSet,
    health: RouteHealth,
}

fn stub(home: &TestHome, name: &str, rate_per_vcpu_hour: &str) {
    install(&built_extensions(), "saas-stub", &home.extensions(), name);
    std::fs::write(
        home.extensions().join(format!("{name}.toml")),
        format!(
            "[config]\nrate_per_vcpu_hour = \"{rate_per_vcpu_hour}\"\nrate_per_gib_hour = \"0\"\n"
        ),
    )
    .unwrap();
}

fn fixture(home: &TestHome, name: &str, sidecar: &str) {
    install(&built_fixtures(), "hostile", &home.extensions(), name);
    std::fs::write(home.extensions().join(format!("{name}.toml")), sidecar).unwrap();
}

impl World {
    async fn new(setup: impl FnOnce(&TestHome)) -> Self {
        let home = TestHome::new();
        setup(&home);
        let set = home.runtime().load_dir(&home.extensions()).await.unwrap();
        let health = RouteHealth::new(Arc::new(StateDb::new(home.path().join("state.redb"))));
        Self { home, set, health }
    }

    async fn decide(&self, profile_text: &str, now: u64) -> RouteDecision {
        let profile = Profile::parse(profile_text, Path::new("test.toml")).unwrap();
        let spec = profile.spec("sbx-route", None);
        Router::new(&self.set, &self.health)
            .decide(&profile, &spec, now)
            .await
            .unwrap()
    }
}

fn route(strategy: &str, candidates: &[&str], extra: &str) -> String {
    let list: Vec<String> = candidates
        .iter()
        .map(|name| format!("\"{name}\""))
        .collect();
    format!(
        "[sandbox]\ncpu_millis = 1000\nmemory_mb = 1024\nttl_secs = 3600\n[route]\nstrategy = \"{strategy}\"\ncandidates = [{}]\n{extra}",
        list.join(", ")
    )
}

fn order(decision: &RouteDecision) -> Vec<&str> {
    decision
        .attempt_order()
        .iter()
        .map(|candidate| candidate.name.as_str())
        .collect()
}

fn reason<'a>(decision: &'a RouteDecision, name: &str) -> &'a str {
    let candidate = decision
        .candidates
        .iter()
        .find(|candidate| candidate.name == name)
        .unwrap();
    assert!(!candidate.eligible, "{name} should be ineligible");
    candidate.reason.as_deref().unwrap()
}

#[tokio::test]
async fn explicit_takes_the_named_instance_even_when_dearer() {
    let world = World::new(|home| {
        stub(home, "cheap", "0.01");
        stub(home, "pricey", "1.0");
    })
    .await;
    let decision = world
        .decide(
            "[route]\nstrategy = \"explicit\"\nextension = \"pricey\"\n",
            NOW,
        )
        .await;
    assert_eq!(decision.chosen.as_deref(), Some("pricey"));
    assert_eq!(order(&decision), ["pricey"]);
}

#[tokio::test]
async fn lowest_cost_orders_by_estimate_and_ties_keep_the_listed_order() {
    let world = World::new(|home| {
        stub(home, "a", "0.5");
        stub(home, "b", "0.1");
        stub(home, "c", "0.5");
        stub(home, "d", "0.3");
    })
    .await;
    let decision = world
        .decide(&route("lowest-cost", &["c", "a", "b", "d"], ""), NOW)
        .await;
    assert_eq!(
        order(&decision),
        ["b", "d", "c", "a"],
        "cheapest first; c before a as listed"
    );
    let ranks: Vec<_> = decision
        .candidates
        .iter()
        .map(|candidate| candidate.rank)
        .collect();
    assert_eq!(ranks, [Some(1), Some(2), Some(3), Some(4)]);
    assert_eq!(decision.candidates[0].estimate, Some(100_000));
}

#[tokio::test]
async fn prefer_self_hosted_puts_self_hosted_first_in_listed_order() {
    let world = World::new(|home| {
        stub(home, "cloud-a", "0.1");
        fixture(home, "box-1", "[config]\nkind = \"self-hosted\"\n");
        stub(home, "cloud-b", "0.01");
        fixture(home, "box-2", "[config]\nkind = \"self-hosted\"\n");
    })
    .await;
    let decision = world
        .decide(
            &route(
                "prefer-self-hosted",
                &["cloud-a", "box-2", "cloud-b", "box-1"],
                "",
            ),
            NOW,
        )
        .await;
    assert_eq!(order(&decision), ["box-2", "box-1", "cloud-a", "cloud-b"]);
    assert_eq!(decision.candidates[0].kind, Some("self-hosted"));
}

#[tokio::test]
async fn lowest_latency_uses_measured_averages_and_tries_the_unmeasured() {
    let world = World::new(|home| {
        stub(home, "slow", "0.1");
        stub(home, "fast", "0.1");
        stub(home, "new", "0.1");
        stub(home, "hinted", "0.1");
        std::fs::write(
            home.extensions().join("hinted.toml"),
            "[routing]\nexpected_latency_ms = 300\n[config]\nrate_per_vcpu_hour = \"0.1\"\n",
        )
        .unwrap();
    })
    .await;
    world.health.record_latency("slow", 900).await.unwrap();
    world.health.record_latency("fast", 200).await.unwrap();
    world.health.record_latency("fast", 250).await.unwrap();
    let decision = world
        .decide(
            &route("lowest-latency", &["slow", "fast", "hinted", "new"], ""),
            NOW,
        )
        .await;
    assert_eq!(
        order(&decision),
        ["new", "fast", "hinted", "slow"],
        "no samples and no hint: 0 ms, tried first"
    );
    let fast = decision
        .candidates
        .iter()
        .find(|candidate| candidate.name == "fast")
        .unwrap();
    assert_eq!((fast.latency_ms, fast.latency_samples), (Some(210), 2));
    // The average is in the state store: a new runtime sees it.
    let again = World {
        set: world
            .home
            .runtime()
            .load_dir(&world.home.extensions())
            .await
            .unwrap(),
        ..world
    };
    assert_eq!(
        order(
            &again
                .decide(&route("lowest-latency", &["slow", "fast"], ""), NOW)
                .await
        ),
        ["fast", "slow"]
    );
}

#[tokio::test]
async fn every_ineligible_candidate_says_why() {
    let world = World::new(|home| {
        stub(home, "ok", "0.1");
        stub(home, "dear", "5");
        stub(home, "flaky", "0.1");
        fixture(
            home,
            "broken",
            "[config]\nmisbehave = \"trap\"\nin = \"estimate-cost\"\n",
        );
        fixture(
            home,
            "spinning",
            "[limits]\ntimeout_ms = 100\n[config]\nmisbehave = \"endless-loop\"\n",
        );
        std::fs::write(home.extensions().join("junk.wasm"), b"junk").unwrap();
    })
    .await;
    for _ in 0..FAILURE_THRESHOLD {
        world
            .health
            .record_outcome("flaky", false, NOW)
            .await
            .unwrap();
    }
    let decision = world
        .decide(
            &route(
                "lowest-cost",
                &[
                    "missing", "junk", "flaky", "broken", "spinning", "dear", "ok",
                ],
                "max_cost = \"1\"",
            ),
            NOW + 1_000,
        )
        .await;
    assert_eq!(decision.chosen.as_deref(), Some("ok"));
    assert_eq!(
        reason(&decision, "missing"),
        "no extension with this name in the extensions directory"
    );
    assert!(reason(&decision, "junk").starts_with("rejected: not WebAssembly"));
    assert_eq!(
        reason(&decision, "flaky"),
        "cooling down after 3 consecutive failures; tried again in 4 s"
    );
    assert!(
        reason(&decision, "broken")
            .starts_with("estimate-cost failed: extension `broken` estimate-cost: trapped")
    );
    assert!(reason(&decision, "spinning").contains("stopped at its wall-clock limit of 100 ms"));
    assert_eq!(
        reason(&decision, "dear"),
        "estimate 5.000000 is above max_cost 1.000000"
    );
    assert_eq!(decision.candidates[0].name, "ok", "the eligible come first");
    let listed: Vec<_> = decision.candidates[1..]
        .iter()
        .map(|candidate| candidate.name.as_str())
        .collect();
    assert_eq!(
        listed,
        ["missing", "junk", "flaky", "broken", "spinning", "dear"],
        "then the rest, as listed"
    );
}

#[tokio::test]
async fn the_breaker_opens_cools_down_and_probes() {
    let world = World::new(|home| {
        stub(home, "primary", "0.1");
        stub(home, "backup", "0.2");
    })
    .await;
    let profile = route("lowest-cost", &["primary", "backup"], "");
    for _ in 0..FAILURE_THRESHOLD {
        world
            .health
            .record_outcome("primary", false, NOW)
            .await
            .unwrap();
    }
    let cooling = world.decide(&profile, NOW + 1).await;
    assert_eq!(order(&cooling), ["backup"]);
    assert_eq!(cooling.candidates[1].breaker, Some("open"));

    let probing = world.decide(&profile, NOW + BASE_COOLDOWN_MS).await;
    assert_eq!(
        order(&probing),
        ["primary", "backup"],
        "cooled down: eligible again as a probe"
    );
    assert_eq!(probing.candidates[0].breaker, Some("half-open"));

    // The probe fails: open again, for twice as long.
    world
        .health
        .record_outcome("primary", false, NOW + BASE_COOLDOWN_MS)
        .await
        .unwrap();
    assert_eq!(
        order(&world.decide(&profile, NOW + 2 * BASE_COOLDOWN_MS).await),
        ["backup"]
    );
    assert_eq!(
        order(&world.decide(&profile, NOW + 3 * BASE_COOLDOWN_MS).await),
        ["primary", "backup"]
    );

    // The next probe succeeds: closed.
    world
        .health
        .record_outcome("primary", true, NOW + 3 * BASE_COOLDOWN_MS)
        .await
        .unwrap();
    assert_eq!(
        world
            .decide(&profile, NOW + 3 * BASE_COOLDOWN_MS)
            .await
            .candidates[0]
            .breaker,
        Some("closed")
    );
}

#[tokio::test]
async fn slow_estimates_are_asked_concurrently() {
    let world = World::new(|home| {
        for name in ["slow-1", "slow-2", "slow-3", "slow-4"] {
            fixture(
                home,
                name,
                "[limits]\ntimeout_ms = 5000\n[config]\nmisbehave = \"sleep\"\nsleep_ms = 400\n",
            );
        }
    })
    .await;
    let started = std::time::Instant::now();
    let decision = world
        .decide(
            &route("lowest-cost", &["slow-1", "slow-2", "slow-3", "slow-4"], ""),
            NOW,
        )
        .await;
    let elapsed = started.elapsed();
    assert_eq!(order(&decision).len(), 4);
    // One after another they would take 1.6 s.
    assert!(
        elapsed < std::time::Duration::from_millis(1200),
        "four 400 ms estimates took {elapsed:?}"
    );
}

#[tokio::test]
async fn without_fallback_only_the_chosen_one_is_tried() {
    let world = World::new(|home| {
        stub(home, "a", "0.1");
        stub(home, "b", "0.2");
    })
    .await;
    let decision = world
        .decide(&route("lowest-cost", &["a", "b"], "fallback = false"), NOW)
        .await;
    assert_eq!(order(&decision), ["a"]);
    assert_eq!(
        decision
            .candidates
            .iter()
            .filter(|candidate| candidate.eligible)
            .count(),
        2
    );
}

#[tokio::test]
async fn chosen_is_always_eligible_and_never_beaten_on_cost() {
    let seed = 7;
    let mut rng = StdRng::seed_from_u64(seed);
    let names: Vec<String> = (0..8).map(|index| format!("i{index}")).collect();
    let rates: Vec<u64> = names
        .iter()
        .map(|_| rng.random_range(0..5) * 100_000)
        .collect();
    let world = World::new(|home| {
        for (name, rate) in names.iter().zip(&rates) {
            stub(home, name, &sandboxer_credits::format_credits(*rate));
        }
    })
    .await;
    for case in 0..60 {
        let context = format!("seed {seed} case {case}");
        let count = rng.random_range(1..=names.len());
        let mut candidates: Vec<&str> = names.iter().map(String::as_str).collect();
        for index in (1..candidates.len()).rev() {
            candidates.swap(index, rng.random_range(0..=index));
        }
        candidates.truncate(count);
        if rng.random_bool(0.3) {
            let victim = candidates[rng.random_range(0..candidates.len())];
            for _ in 0..FAILURE_THRESHOLD {
                world
                    .health
                    .record_outcome(victim, false, NOW + case * 1_000_000)
                    .await
                    .unwrap();
            }
        }
        let max_cost = if rng.random_bool(0.5) {
            format!("max_cost = \"0.{}\"", rng.random_range(0..5))
        } else {
            String::new()
        };
        let decision = world
            .decide(
                &route("lowest-cost", &candidates, &max_cost),
                NOW + case * 1_000_000 + 1,
            )
            .await;
        match &decision.chosen {
            None => assert!(
                decision
                    .candidates
                    .iter()
                    .all(|candidate| !candidate.eligible),
                "{context}"
            ),
            Some(chosen) => {
                let chosen = decision
                    .candidates
                    .iter()
                    .find(|candidate| &candidate.name == chosen)
                    .unwrap();
                assert!(chosen.eligible && chosen.rank == Some(1), "{context}");
                for other in decision
                    .candidates
                    .iter()
                    .filter(|candidate| candidate.eligible)
                {
                    assert!(
                        other.estimate >= chosen.estimate,
                        "{context}: {} is cheaper than {}",
                        other.name,
                        chosen.name
                    );
                }
                if let Some(max_cost) = decision.max_cost {
                    assert!(chosen.estimate.unwrap() <= max_cost, "{context}");
                }
            }
        }
        for candidate in &decision.candidates {
            assert_eq!(
                candidate.eligible,
                candidate.reason.is_none(),
                "{context}: reason iff ineligible"
            );
            assert_eq!(
                candidate.eligible,
                candidate.rank.is_some(),
                "{context}: rank iff eligible"
            );
        }
    }
}

/// The acceptance, through the binary.
#[test]
fn route_explain_picks_the_cheaper_copy_and_explains_a_max_cost_below_both() {
    let home = TestHome::new();
    stub(&home, "cheap", "0.01");
    stub(&home, "pricey", "1.0");
    let profiles = home.path().join("profiles");
    std::fs::create_dir_all(&profiles).unwrap();
    let write_profile = |name: &str, extra: &str| {
        std::fs::write(
            profiles.join(format!("{name}.toml")),
            format!("description = \"test\"\n[route]\nstrategy = \"lowest-cost\"\ncandidates = [\"pricey\", \"cheap\"]\n{extra}"),
        )
        .unwrap();
    };
    write_profile("cheapest", "");
    let explain = |profile: &str| {
        home.command()
            .env("SANDBOXER_PROFILES_DIR", &profiles)
            .args(["route", "explain", "--profile", profile, "--json"])
            .output()
            .unwrap()
    };

    let decision = Run::from(explain("cheapest")).ok().json();
    assert_eq!(decision["chosen"], "cheap");
    assert_eq!(decision["strategy"], "lowest-cost");
    assert_eq!(
        decision["candidates"][0]["estimate"], "0.000834",
        "0.01 × 1 vCPU × 300 s, rounded up"
    );
    assert_eq!(decision["candidates"][0]["rank"], 1);

    stub(&home, "cheap", "1.0");
    stub(&home, "pricey", "0.01");
    assert_eq!(
        Run::from(explain("cheapest")).ok().json()["chosen"],
        "pricey"
    );

    write_profile("tight", "max_cost = \"0.0001\"");
    let run = Run::from(explain("tight")).fails(1);
    let decision = run.json();
    assert!(decision["chosen"].is_null());
    for candidate in decision["candidates"].as_array().unwrap() {
        assert_eq!(candidate["eligible"], false);
        assert!(
            candidate["reason"]
                .as_str()
                .unwrap()
                .contains("is above max_cost 0.000100"),
            "{candidate}"
        );
    }
    assert!(run.stderr.contains("no eligible backend for profile `tight`: pricey: estimate 0.000834 is above max_cost 0.000100; cheap: estimate 0.083334"), "{}", run.stderr);

    let text = home
        .command()
        .env("SANDBOXER_PROFILES_DIR", &profiles)
        .args(["route", "explain", "--profile", "cheapest"])
        .output()
        .unwrap();
    let text = Run::from(text).ok();
    assert!(text.stdout.contains("chosen: pricey"), "{}", text.stdout);
}
