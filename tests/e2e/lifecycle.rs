//! The main job end to end through the real binary: run, the sandbox
//! commands, billing, fallback, a trap during destroy, SIGKILL during run,
//! and webhook delivery.

use crate::support::*;
use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A home with saas-stub and the shipped profiles.
fn lifecycle_home() -> TestHome {
    TestHome::new().with_saas_stub().with_shipped_profiles()
}

fn events(home: &TestHome) -> Vec<serde_json::Value> {
    std::fs::read_to_string(home.path().join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn run_bills_the_tenant_exactly_the_actual() {
    let home = lifecycle_home();
    home.run(&["credits", "add", "10", "--tenant", "t1"]).ok();
    let summary = home
        .run(&[
            "run",
            "--profile",
            "saas-stub",
            "--tenant",
            "t1",
            "--ttl",
            "2",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(summary["state"], "destroyed");
    assert_eq!(summary["extension"], "saas-stub");
    assert_eq!(summary["kind"], "saas");
    let actual = sandboxer_credits::parse_credits(summary["actual"].as_str().unwrap()).unwrap();
    assert!(actual > 0);
    // Two seconds of 1 vCPU + 1 GiB: the estimate, since the stub bills up to the ttl.
    assert_eq!(summary["estimate"], "0.000037");
    assert_eq!(summary["actual"], "0.000037");

    let shown = home
        .run(&["credits", "show", "--tenant", "t1", "--json"])
        .ok()
        .json();
    let expected = sandboxer_credits::format_credits(10_000_000 - actual);
    assert_eq!(shown["available"], expected);
    assert_eq!(shown["balance"], expected);
    assert_eq!(summary["balance_after"], expected);
    assert_eq!(shown["held"], "0.000000");
    home.run(&["ledger", "verify"]).ok();

    let sandbox_id = summary["id"].as_str().unwrap();
    let record = home
        .run(&["sandbox", "show", sandbox_id, "--json"])
        .ok()
        .json();
    assert_eq!(record["state"], "destroyed");
    assert_eq!(record["meter"]["actual"], "0.000037");
    assert_eq!(record["meter"]["drift"], "0.000000");
    assert!(record["meter"]["host_wall_ms"].as_u64().unwrap() >= 2000);
    assert!(
        record["meter"]["reported_usage"]["wall_ms"]
            .as_u64()
            .unwrap()
            >= 2000
    );

    let types: Vec<String> = events(&home)
        .iter()
        .map(|event| event["type"].as_str().unwrap().to_string())
        .collect();
    for expected in [
        "sandboxer.credits.held",
        "sandboxer.credits.released",
        "sandboxer.credits.charged",
        "sandboxer.sandbox.requested",
        "sandboxer.sandbox.provisioning",
        "sandboxer.sandbox.ready",
        "sandboxer.sandbox.destroying",
        "sandboxer.sandbox.destroyed",
    ] {
        assert!(
            types.iter().any(|kind| kind == expected),
            "{expected} in {types:?}"
        );
    }
    let ids: BTreeSet<String> = events(&home)
        .iter()
        .map(|event| event["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), types.len(), "every event once in the file");
    let tail = home.run(&["events", "tail", "--limit", "2"]).ok();
    assert_eq!(tail.stdout.lines().count(), 2);
}

#[test]
fn insufficient_credits_create_nothing_and_change_nothing() {
    let home = lifecycle_home();
    home.run(&["credits", "add", "0.000001", "--tenant", "poor"])
        .ok();
    let run = home
        .run(&[
            "run",
            "--profile",
            "saas-stub",
            "--tenant",
            "poor",
            "--ttl",
            "2",
        ])
        .fails(1);
    assert!(
        run.stderr.contains(
            "insufficient credits: tenant `poor` has 0.000001 available, 0.000037 needed"
        ),
        "{}",
        run.stderr
    );
    let shown = home
        .run(&["credits", "show", "--tenant", "poor", "--json"])
        .ok()
        .json();
    assert_eq!(
        (shown["balance"].as_str(), shown["held"].as_str()),
        (Some("0.000001"), Some("0.000000"))
    );
    let live = home.run(&["sandbox", "list", "--json"]).ok().json();
    assert_eq!(live, serde_json::json!([]), "no live record");
    let all = home
        .run(&["sandbox", "list", "--all", "--json"])
        .ok()
        .json();
    assert_eq!(all[0]["state"], "failed");
    assert!(
        all[0]["handle"].is_null(),
        "the extension's create was never called"
    );
    let history = home
        .run(&["credits", "history", "--tenant", "poor", "--json"])
        .ok()
        .json();
    assert_eq!(
        history.as_array().unwrap().len(),
        1,
        "only the grant: no hold was written"
    );
    home.run(&["ledger", "verify"]).ok();
}

#[test]
fn an_unavailable_backend_falls_back_to_the_next_candidate() {
    let home = lifecycle_home();
    install(&built_fixtures(), "hostile", &home.extensions(), "down");
    std::fs::write(
        home.extensions().join("down.toml"),
        "[config]\nmisbehave = \"unavailable\"\nestimate = \"0.000001\"\n",
    )
    .unwrap();
    std::fs::write(
        home.profiles().join("fallback.toml"),
        "description = \"cheapest first\"\n[route]\nstrategy = \"lowest-cost\"\ncandidates = [\"saas-stub\", \"down\"]\n",
    )
    .unwrap();
    let record = home
        .run(&["sandbox", "create", "--profile", "fallback", "--json"])
        .ok()
        .json();
    assert_eq!(record["state"], "ready");
    assert_eq!(record["extension"], "saas-stub");
    let attempts = record["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0]["extension"], "down");
    assert!(
        attempts[0]["outcome"]
            .as_str()
            .unwrap()
            .contains("unavailable: this backend is always down")
    );
    assert_eq!(attempts[1]["outcome"], "ready");

    let id = record["id"].as_str().unwrap();
    let destroyed = home.run(&["sandbox", "destroy", id, "--json"]).ok().json();
    assert_eq!(destroyed["state"], "destroyed");
    let history = home.run(&["credits", "history", "--json"]).ok().json();
    let kinds: Vec<(&str, &str)> = history
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|entry| Some((entry["kind"].as_str()?, entry["sandbox_id"].as_str()?)))
        .collect();
    let first_hold = format!("{id}.1");
    let second_hold = format!("{id}.2");
    assert!(kinds.contains(&("void", first_hold.as_str())), "{kinds:?}");
    assert!(
        kinds.contains(&("charge", second_hold.as_str())),
        "{kinds:?}"
    );
    home.run(&["ledger", "verify"]).ok();
}

#[test]
fn a_trap_during_destroy_keeps_the_hold_until_retried_or_forced() {
    let home = lifecycle_home();
    install(
        &built_fixtures(),
        "trap-in-destroy",
        &home.extensions(),
        "trap-in-destroy",
    );
    std::fs::write(
        home.profiles().join("trappy.toml"),
        "description = \"x\"\n[route]\nstrategy = \"explicit\"\nextension = \"trap-in-destroy\"\n",
    )
    .unwrap();
    let record = home
        .run(&["sandbox", "create", "--profile", "trappy", "--json"])
        .ok()
        .json();
    let id = record["id"].as_str().unwrap().to_string();

    // Lived a little, so the host has wall time to bill.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let failed = home.run(&["sandbox", "destroy", &id]).fails(1);
    assert!(
        failed.stderr.contains("trapped")
            && failed
                .stderr
                .contains("stays destroying with its hold open and is retried in 30 s"),
        "{}",
        failed.stderr
    );
    let shown = home.run(&["credits", "show", "--json"]).ok().json();
    assert_eq!(shown["held"], "0.001000", "the hold stays");
    home.run(&["ledger", "verify"]).ok();
    let record = home.run(&["sandbox", "show", &id, "--json"]).ok().json();
    assert_eq!(record["state"], "destroying");

    let forced = home
        .run(&["sandbox", "destroy", &id, "--force", "--json"])
        .ok()
        .json();
    assert_eq!(forced["state"], "destroyed");
    let note = forced["note"].as_str().unwrap();
    assert!(
        note.starts_with("forced after: extension `trap-in-destroy` destroy: trapped")
            && note.ends_with("billed the host-measured wall time"),
        "{note}"
    );
    // The backend could not report: the host bills what it measured, at
    // the estimate's rate (0.001 credits an hour), rounded up.
    assert_eq!(forced["meter"]["basis"], "host-measured");
    let wall_ms = forced["meter"]["host_wall_ms"].as_u64().unwrap();
    assert!(wall_ms >= 1100, "{wall_ms}");
    let expected = (1_000 * u128::from(wall_ms)).div_ceil(3_600_000) as u64;
    assert_eq!(
        forced["meter"]["actual"],
        sandboxer_credits::format_credits(expected)
    );
    let shown = home.run(&["credits", "show", "--json"]).ok().json();
    assert_eq!(
        (shown["held"].as_str(), shown["balance"].as_str()),
        (
            Some("0.000000"),
            Some(sandboxer_credits::format_credits(10_000_000 - expected).as_str())
        )
    );
    home.run(&["ledger", "verify"]).ok();
}

/// meter-actual reads what destroy wrote to the key-value store, though
/// the host commits both calls' writes only with the record that ends the
/// sandbox; and when meter-actual fails, the usage and destroy's writes are
/// kept, so the retry prices them without destroying again.
#[test]
fn meter_actual_reads_what_destroy_wrote_and_a_failed_one_keeps_it() {
    let home = TestHome::new();
    home.run(&["credits", "add", "10"]).ok();
    install(
        &built_fixtures(),
        "note-in-kv",
        &home.extensions(),
        "note-in-kv",
    );
    std::fs::write(
        home.profiles().join("noted.toml"),
        "description = \"x\"\n[route]\nstrategy = \"explicit\"\nextension = \"note-in-kv\"\n",
    )
    .unwrap();
    let create = || {
        let record = home
            .run(&["sandbox", "create", "--profile", "noted", "--json"])
            .ok()
            .json();
        record["id"].as_str().unwrap().to_string()
    };

    // One destroy, priced from its own note: 500 micro-credits.
    let id = create();
    let destroyed = home.run(&["sandbox", "destroy", &id, "--json"]).ok().json();
    assert_eq!(destroyed["state"], "destroyed", "{destroyed}");
    assert_eq!(destroyed["meter"]["actual"], "0.000500", "{destroyed}");

    // Pricing down: the destroy happened, meter-actual failed.
    let sidecar = home.extensions().join("note-in-kv.toml");
    let working = std::fs::read_to_string(&sidecar).unwrap();
    std::fs::write(&sidecar, format!("{working}meter = \"unavailable\"\n")).unwrap();
    let id = create();
    let failed = home.run(&["sandbox", "destroy", &id]).fails(1);
    assert!(
        failed.stderr.contains("pricing is down")
            && failed
                .stderr
                .contains("stays destroying with its hold open"),
        "{}",
        failed.stderr
    );
    let record = home.run(&["sandbox", "show", &id, "--json"]).ok().json();
    assert_eq!(record["state"], "destroying");
    assert_eq!(
        record["meter"]["reported_usage"]["wall_ms"], 1000,
        "the usage destroy reported is kept: {record}"
    );

    // Pricing back: the retry prices the kept usage from the kept note.
    // Had the note been lost, meter-actual would fail; had destroy run
    // again, it would count two destroys and ask 0.001000.
    std::fs::write(&sidecar, &working).unwrap();
    let retried = home.run(&["sandbox", "destroy", &id, "--json"]).ok().json();
    assert_eq!(retried["state"], "destroyed", "{retried}");
    assert_eq!(retried["meter"]["actual"], "0.000500", "{retried}");
    assert_eq!(retried["meter"]["basis"], "metered");
    home.run(&["ledger", "verify"]).ok();
}

#[test]
fn a_missing_extension_keeps_the_sandbox_until_forced() {
    let home = lifecycle_home();
    let record = home
        .run(&["sandbox", "create", "--profile", "saas-stub", "--json"])
        .ok()
        .json();
    let id = record["id"].as_str().unwrap().to_string();
    std::fs::remove_file(home.extensions().join("saas-stub.wasm")).unwrap();
    let refused = home.run(&["sandbox", "destroy", &id]).fails(1);
    assert!(
        refused.stderr.contains("which is not loaded") && refused.stderr.contains("--force"),
        "{}",
        refused.stderr
    );
    assert_eq!(
        home.run(&["sandbox", "show", &id, "--json"]).ok().json()["state"],
        "ready"
    );
    let forced = home
        .run(&["sandbox", "destroy", &id, "--force", "--json"])
        .ok()
        .json();
    assert!(forced["note"].as_str().unwrap().contains("is not loaded"));
    home.run(&["ledger", "verify"]).ok();
}

#[test]
fn sigkill_during_run_is_reconciled_and_settled_exactly_once() {
    let home = lifecycle_home();
    home.run(&["credits", "add", "50", "--tenant", "k"]).ok();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for round in 0..6u64 {
        let mut child = home
            .command()
            .args([
                "run",
                "--profile",
                "saas-stub",
                "--tenant",
                "k",
                "--ttl",
                "1",
                "--json",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Anywhere from mid-create to mid-wait.
        std::thread::sleep(Duration::from_millis((seed / (round + 1)) % 900 + 20));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    std::thread::sleep(Duration::from_millis(1200)); // every ttl has passed
    let listed = home.run(&["sandbox", "list", "--all", "--json"]).ok();
    let records = listed.json();
    for record in records.as_array().unwrap() {
        let state = record["state"].as_str().unwrap();
        assert!(
            state == "destroyed" || state == "failed",
            "seed {seed}: {record}"
        );
    }
    let verify = home.run(&["ledger", "verify", "--json"]).ok().json();
    assert_eq!(verify["open_holds"], 0, "seed {seed}");

    let history = home
        .run(&[
            "credits", "history", "--tenant", "k", "--limit", "1000", "--json",
        ])
        .ok()
        .json();
    let mut charges: HashMap<String, usize> = HashMap::new();
    for entry in history.as_array().unwrap() {
        if entry["kind"] == "charge" {
            let hold = entry["sandbox_id"].as_str().unwrap();
            *charges
                .entry(hold.rsplit_once('.').unwrap().0.to_string())
                .or_default() += 1;
        }
    }
    for record in records.as_array().unwrap() {
        let id = record["id"].as_str().unwrap();
        let expected =
            usize::from(record["state"] == "destroyed" && record["meter"]["actual"] != "0.000000");
        assert_eq!(
            charges.get(id).copied().unwrap_or(0),
            expected,
            "seed {seed}: {id} charged exactly once: {record}"
        );
    }
}

/// An HTTP server on 127.0.0.1 that answers 500 to its first `failures`
/// posts, then 200, and keeps every body it accepted.
pub fn flaky_hub(failures: usize) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let bodies = accepted.clone();
    std::thread::spawn(move || {
        let mut seen = 0;
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            seen += 1;
            let status = if seen <= failures {
                "500 Internal Server Error"
            } else {
                bodies
                    .lock()
                    .unwrap()
                    .push(String::from_utf8(body).unwrap());
                "200 OK"
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    (url, accepted)
}

#[test]
fn the_webhook_gets_every_event_despite_failures_and_downtime() {
    let home = lifecycle_home();
    // The hub is down: nothing is lost, events wait.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let down = home
        .run(&[
            "--hub-url",
            &format!("http://{closed}/events"),
            "credits",
            "add",
            "1",
            "--tenant",
            "w",
        ])
        .ok();
    assert!(
        down.stderr.contains("events could not reach the hub"),
        "{}",
        down.stderr
    );
    let run = Run::from(
        home.command()
            .env("SANDBOXER_HUB_URL", format!("http://{closed}/events"))
            .args([
                "sandbox",
                "create",
                "--profile",
                "saas-stub",
                "--tenant",
                "w",
                "--json",
            ])
            .output()
            .unwrap(),
    )
    .ok();
    assert!(
        run.stderr.contains("events could not reach the hub"),
        "{}",
        run.stderr
    );
    let id = run.json()["id"].as_str().unwrap().to_string();

    // The hub is back but fails the first post: the command posts once, warns
    // and goes on; the events wait in the outbox.
    let (url, accepted) = flaky_hub(1);
    let failed = home
        .run(&["--hub-url", &url, "sandbox", "destroy", &id])
        .ok();
    assert!(
        failed.stderr.contains("they wait in the outbox"),
        "{}",
        failed.stderr
    );
    // A command that writes no event does not contact the hub.
    home.run(&["--hub-url", &url, "credits", "show", "--tenant", "w"])
        .ok();
    assert!(accepted.lock().unwrap().is_empty());
    // The next command that writes events delivers everything waiting.
    home.run(&["--hub-url", &url, "credits", "add", "1", "--tenant", "w"])
        .ok();

    let in_file: BTreeSet<String> = events(&home)
        .iter()
        .map(|event| event["id"].as_str().unwrap().to_string())
        .collect();
    let mut received = Vec::new();
    for body in accepted.lock().unwrap().iter() {
        let batch: Vec<serde_json::Value> = serde_json::from_str(body).unwrap();
        received.extend(
            batch
                .into_iter()
                .map(|event| event["id"].as_str().unwrap().to_string()),
        );
    }
    let unique: BTreeSet<String> = received.iter().cloned().collect();
    assert_eq!(unique, in_file, "every event reached the hub");
    assert_eq!(
        in_file.len(),
        10,
        "two grants, hold, release, charge and five lifecycle events: {in_file:?}"
    );
}

/// Connections a listener that never accepts has queued: the kernel
/// completes each handshake, so a client connects, sends and waits for an
/// answer that never comes (a hub that hangs).
fn queued_connections(blackhole: &TcpListener) -> usize {
    blackhole.set_nonblocking(true).unwrap();
    let mut count = 0;
    // Kept open until counted, so none is counted twice.
    let mut streams = Vec::new();
    while let Ok((stream, _)) = blackhole.accept() {
        streams.push(stream);
        count += 1;
    }
    blackhole.set_nonblocking(false).unwrap();
    count
}

#[test]
fn a_hub_that_hangs_or_refuses_costs_one_attempt_and_the_events_wait() {
    let home = lifecycle_home();
    let blackhole = TcpListener::bind("127.0.0.1:0").unwrap();
    let hanging = format!("http://{}/events", blackhole.local_addr().unwrap());

    let added = home
        .run(&[
            "--hub-url",
            &hanging,
            "credits",
            "add",
            "2",
            "--tenant",
            "w",
        ])
        .ok();
    assert!(added.stdout.contains("added 2"), "{}", added.stdout);
    assert!(
        added.stderr.contains("events could not reach the hub")
            && added.stderr.contains("they wait in the outbox"),
        "{}",
        added.stderr
    );
    assert_eq!(
        queued_connections(&blackhole),
        1,
        "one post, no retry loop on the command path"
    );

    // Nothing new to deliver: a read does not contact the hub at all.
    let shown = home
        .run(&["--hub-url", &hanging, "credits", "show", "--tenant", "w"])
        .ok();
    assert!(!shown.stderr.contains("hub"), "{}", shown.stderr);
    assert_eq!(queued_connections(&blackhole), 0);

    // A hub that refuses connections: the same one warning.
    let refused = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let added = home
        .run(&[
            "--hub-url",
            &format!("http://{refused}/events"),
            "credits",
            "add",
            "1",
            "--tenant",
            "w",
        ])
        .ok();
    let warnings: Vec<&str> = added
        .stderr
        .lines()
        .filter(|line| line.starts_with("warning:"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", added.stderr);
    assert!(
        warnings[0].contains("they wait in the outbox"),
        "{}",
        added.stderr
    );

    // Nothing was lost: a hub that answers gets both grants.
    let (url, accepted) = flaky_hub(0);
    home.run(&["--hub-url", &url, "credits", "add", "1", "--tenant", "w"])
        .ok();
    let received: usize = accepted
        .lock()
        .unwrap()
        .iter()
        .map(|body| {
            serde_json::from_str::<Vec<serde_json::Value>>(body)
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(received, events(&home).len(), "every event reached the hub");
    assert_eq!(received, 3, "three grants");
}

#[test]
fn a_hub_url_that_is_not_an_http_url_is_a_usage_error_before_anything_runs() {
    let home = lifecycle_home();
    for (url, says) in [
        (
            "ftp://hub.example/events",
            "the scheme must be http or https, not `ftp`",
        ),
        ("hub.example/events", "relative URL without a base"),
        ("http://", "empty host"),
    ] {
        let refused = home
            .run(&["--hub-url", url, "credits", "add", "1", "--tenant", "w"])
            .fails(2);
        assert!(
            refused.stderr.contains("--hub-url") && refused.stderr.contains(says),
            "{url}: {}",
            refused.stderr
        );
    }
    // The environment variable is checked the same way, and under --json
    // the refusal is JSON too.
    let refused = Run::from(
        home.command()
            .env("SANDBOXER_HUB_URL", "mailto:ops@hub.example")
            .args(["credits", "show", "--json"])
            .output()
            .unwrap(),
    )
    .fails(2);
    let error = &refused.json()["error"];
    assert_eq!(error["kind"], "usage", "{}", refused.stdout);
    assert!(
        error["message"].as_str().unwrap().contains("not `mailto`"),
        "{}",
        refused.stdout
    );
    assert!(
        !home.ledger_file().exists(),
        "a usage error touches nothing"
    );
}
