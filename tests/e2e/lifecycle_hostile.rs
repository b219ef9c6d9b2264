//! Hostile extensions against the lifecycle: what an extension says is
//! never enough to overcharge a tenant, and a destroy that keeps failing
//! costs only the commands about it.

use crate::support::*;
use serde_json::Value;

fn home_with(fixture: &str) -> TestHome {
    let home = TestHome::new().with_saas_stub().with_shipped_profiles();
    install(&built_fixtures(), fixture, &home.extensions(), fixture);
    std::fs::write(
        home.profiles().join(format!("{fixture}.toml")),
        format!("[route]\nstrategy = \"explicit\"\nextension = \"{fixture}\"\n"),
    )
    .unwrap();
    home
}

fn events(home: &TestHome) -> Vec<Value> {
    std::fs::read_to_string(home.path().join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn an_absurd_meter_actual_is_charged_at_most_the_hold_and_the_rest_disputed() {
    let home = home_with("overcharge");
    for tenant in ["t1", "t2"] {
        home.run(&["credits", "add", "1", "--tenant", tenant]).ok();
        let summary = home
            .run(&[
                "run",
                "--profile",
                "overcharge",
                "--tenant",
                tenant,
                "--ttl",
                "1",
                "--json",
            ])
            .ok()
            .json();
        // Estimated (and held) 0.001; asked 18,446,744,073,709.551615.
        assert_eq!(summary["state"], "destroyed");
        assert_eq!(summary["estimate"], "0.001000");
        assert_eq!(summary["actual"], "0.001000", "{summary}");
        let shown = home
            .run(&["credits", "show", "--tenant", tenant, "--json"])
            .ok()
            .json();
        assert_eq!(
            shown["balance"], "0.999000",
            "{tenant} never goes below zero"
        );
        assert_eq!(shown["available"], "0.999000");

        let id = summary["id"].as_str().unwrap();
        let record = home.run(&["sandbox", "show", id, "--json"]).ok().json();
        let charge = &record["meter"]["charge"];
        assert_eq!(charge["asked"], "18446744073709.551615");
        assert_eq!(charge["ceiling"], "0.001000");
        assert_eq!(charge["charged"], "0.001000");
        assert_eq!(charge["disputed"], "18446744073709.550615");
        let text = home.run(&["sandbox", "show", id]).ok().stdout;
        assert!(
            text.contains("disputed: meter-actual asked 18446744073709.551615"),
            "{text}"
        );
    }
    // Two tenants' charges: the revenue account did not overflow, and the
    // ledger holds.
    home.run(&["ledger", "verify"]).ok();

    let info = home
        .run(&["ext", "info", "overcharge", "--json"])
        .ok()
        .json();
    assert_eq!(info["disputes"]["sandboxes"], 2);
    // The tally saturates rather than overflow.
    assert_eq!(info["disputes"]["disputed"].as_u64().unwrap(), u64::MAX);
    let disputed: Vec<Value> = events(&home)
        .into_iter()
        .filter(|event| event["type"] == "sandboxer.sandbox.charge_disputed")
        .collect();
    assert_eq!(disputed.len(), 2, "one meter event per disputed charge");
    assert_eq!(disputed[0]["data"]["disputed"], "18446744073709.550615");
    assert_eq!(disputed[0]["data"]["extension"], "overcharge");
}

#[test]
fn an_operator_tolerance_lets_an_instance_charge_above_its_hold() {
    let home = home_with("overcharge");
    std::fs::write(
        home.extensions().join("overcharge.toml"),
        "[billing]\ncharge_tolerance = \"1.5\"\n[config]\nmisbehave = \"overcharge\"\n",
    )
    .unwrap();
    let summary = home
        .run(&["run", "--profile", "overcharge", "--ttl", "1", "--json"])
        .ok()
        .json();
    assert_eq!(summary["actual"], "0.001500", "{summary}");
    home.run(&["ledger", "verify"]).ok();
}

#[test]
fn a_destroy_past_its_deadline_backs_off_and_other_commands_never_retry_it() {
    let home = home_with("slow-destroy");
    let created = home
        .run(&["sandbox", "create", "--profile", "slow-destroy", "--json"])
        .ok()
        .json();
    let id = created["id"].as_str().unwrap().to_string();
    let failed = home.run(&["sandbox", "destroy", &id]).fails(1);
    assert!(
        failed.stderr.contains("timed out")
            || failed.stderr.contains("deadline")
            || failed.stderr.contains("300 ms"),
        "{}",
        failed.stderr
    );
    assert!(
        failed.stderr.contains("retried in 30 s"),
        "{}",
        failed.stderr
    );
    let record = home.run(&["sandbox", "show", &id, "--json"]).ok().json();
    assert_eq!(record["state"], "destroying");
    assert_eq!(record["destroy_failures"], 1);
    assert!(record["retry_at"].is_string());

    // Commands about other things start, reconcile and finish without
    // trying that destroy again.
    let other = home
        .run(&["sandbox", "create", "--profile", "saas-stub", "--json"])
        .ok()
        .json();
    home.run(&["sandbox", "destroy", other["id"].as_str().unwrap()])
        .ok();
    home.run(&["sandbox", "list", "--all"]).ok();
    home.run(&["credits", "show"]).ok();
    let record = home.run(&["sandbox", "show", &id, "--json"]).ok().json();
    assert_eq!(record["destroy_failures"], 1, "nobody else retried it");

    // Asking for it retries at once, and the backoff doubles.
    let again = home.run(&["sandbox", "destroy", &id]).fails(1);
    assert!(again.stderr.contains("retried in 60 s"), "{}", again.stderr);
    let record = home.run(&["sandbox", "show", &id, "--json"]).ok().json();
    assert_eq!(record["destroy_failures"], 2);
    let shown = home.run(&["credits", "show", "--json"]).ok().json();
    assert_eq!(
        shown["held"], "0.001000",
        "the hold stays until it is settled"
    );
    home.run(&["ledger", "verify"]).ok();
}
