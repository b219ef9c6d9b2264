//! Several `serve` processes, each with its own home, sharing one ledger
//! in PostgreSQL (`SANDBOXER_STORE`): a load balancer's view of them.

use crate::pg;
use crate::server::{Server, http, try_http};
use crate::support::*;
use serde_json::Value;

fn host_on(store: &str) -> Server {
    let home = TestHome::new().with_saas_stub().with_shipped_profiles();
    Server::start_with_env(home, &[("SANDBOXER_STORE", store)])
}

#[test]
fn three_servers_on_one_postgresql_make_exactly_ten_of_sixty_four_creates() {
    let _cluster = pg::shared();
    let store = pg::fresh_database("three_servers");
    let hosts: Vec<Server> = (0..3).map(|_| host_on(&store)).collect();
    let explained = hosts[0]
        .home
        .run(&["route", "explain", "--profile", "saas-stub", "--json"])
        .ok()
        .json();
    let estimate =
        sandboxer_credits::parse_credits(explained["candidates"][0]["estimate"].as_str().unwrap())
            .unwrap();
    let credits = sandboxer_credits::format_credits(estimate * 10);
    // Tenants and keys are shared: one key works at every host.
    let key = hosts[0]
        .home
        .run(&["tenant", "create", "burst", "--json"])
        .ok()
        .json()["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    hosts[0]
        .home
        .run(&["credits", "add", &credits, "--tenant", "burst"])
        .ok();
    // Registering it again anywhere is refused: the name is taken.
    let again = hosts[2].home.run(&["tenant", "create", "burst"]).fails(1);
    assert!(
        again.stderr.contains("tenant `burst` already exists"),
        "{}",
        again.stderr
    );
    assert_eq!(
        hosts[1].home.run(&["tenant", "list", "--json"]).ok().json()[0]["name"],
        "burst"
    );

    let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..64)
            .map(|index| {
                let (url, key) = (&hosts[index % 3].url, &key);
                scope.spawn(move || {
                    let (status, _, body) = http(
                        "POST",
                        &format!("{url}/v2/sandboxes"),
                        Some(key),
                        Some(&serde_json::json!({"templateID": "saas-stub"})),
                    );
                    (status, body)
                })
            })
            .collect();
        calls.into_iter().map(|call| call.join().unwrap()).collect()
    });
    let created: Vec<&Value> = answers
        .iter()
        .filter(|(status, _)| *status == 201)
        .map(|(_, body)| body)
        .collect();
    assert_eq!(created.len(), 10, "{answers:?}");
    for (status, body) in answers.iter().filter(|(status, _)| *status != 201) {
        assert_eq!(*status, 402, "{body}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("insufficient credits"), "{message}");
    }
    // Every host sees the same ledger: nothing available, all of it held.
    for host in &hosts {
        let shown = host
            .home
            .run(&["credits", "show", "--tenant", "burst", "--json"])
            .ok()
            .json();
        assert_eq!(shown["available"], "0.000000", "{shown}");
        assert_eq!(shown["held"].as_str(), Some(credits.as_str()), "{shown}");
    }
    let verified = hosts[1]
        .home
        .run(&["ledger", "verify", "--json"])
        .ok()
        .json();
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(verified["open_holds"], 10, "{verified}");
}

#[test]
fn a_store_that_is_not_a_postgresql_url_is_a_usage_error_and_touches_nothing() {
    let home = TestHome::new();
    let run = home
        .command()
        .args(["credits", "show", "--store", "mysql://db/ledger"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("the scheme must be postgres (or postgresql), not `mysql`"),
        "{stderr}"
    );
    assert!(!home.ledger_file().exists(), "nothing was created");
}

#[test]
fn a_store_that_requires_tls_is_refused_saying_why() {
    let home = TestHome::new();
    let run = home
        .command()
        .args(["credits", "show"])
        .env(
            "SANDBOXER_STORE",
            "postgres://sandboxer:hunter2@db.internal:5432/ledger?sslmode=require",
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "postgres://sandboxer:***@db.internal:5432/ledger?sslmode=require asks for sslmode=require, \
             but sandboxer-host connects to PostgreSQL without TLS"
        ),
        "{stderr}"
    );
}

#[test]
fn an_unreachable_store_says_where_it_tried_without_the_password() {
    let home = TestHome::new();
    // A port nothing listens on: bind one, then let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let run = home
        .command()
        .args(["credits", "show"])
        .env(
            "SANDBOXER_STORE",
            format!("postgres://sandboxer:hunter2@127.0.0.1:{port}/ledger"),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_ne!(run.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot reach the PostgreSQL store at postgres://sandboxer:***@127.0.0.1:{port}/ledger"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// Each start reconciles: it voids holds no live sandbox owns. On a shared
/// ledger a hold this host has no record of is another host's, and stays.
#[test]
fn a_host_never_voids_the_hold_of_another_hosts_live_sandbox() {
    let _cluster = pg::shared();
    let store = pg::fresh_database("other_hosts_hold");
    let a = TestHome::new()
        .with_saas_stub()
        .with_shipped_profiles()
        .with_env("SANDBOXER_STORE", &store);
    let b = TestHome::new()
        .with_saas_stub()
        .with_shipped_profiles()
        .with_env("SANDBOXER_STORE", &store);
    a.run(&["credits", "add", "5", "--tenant", "acme"]).ok();
    let created = a
        .run(&[
            "sandbox",
            "create",
            "--profile",
            "saas-stub",
            "--tenant",
            "acme",
            "--ttl",
            "600",
            "--json",
        ])
        .ok()
        .json();
    let id = created["id"].as_str().unwrap();
    let held = |home: &TestHome| {
        home.run(&["credits", "show", "--tenant", "acme", "--json"])
            .ok()
            .json()["held"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let before = held(&a);
    assert_ne!(before, "0.000000");
    // B starts (and reconciles) twice; A's sandbox keeps its hold.
    b.run(&["sandbox", "list", "--all"]).ok();
    b.run(&["ledger", "verify"]).ok();
    assert_eq!(held(&b), before, "B left A's hold alone");
    let destroyed = a.run(&["sandbox", "destroy", id, "--json"]).ok().json();
    assert_eq!(destroyed["state"], "destroyed", "{destroyed}");
    assert_eq!(held(&b), "0.000000");
    let history = b
        .run(&["credits", "history", "--tenant", "acme", "--json"])
        .ok()
        .json();
    let kinds: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["charge", "release", "hold", "grant"], "{history}");
}

/// A host that dies leaves its holds with no record on any other host:
/// a running server closes them at their expiry, so the tenant's credits
/// come back while the dead host stays down.
#[test]
fn a_running_server_releases_a_dead_hosts_holds_at_their_expiry() {
    let _cluster = pg::shared();
    let store = pg::fresh_database("dead_hosts_holds");
    let server = host_on(&store);
    server
        .home
        .run(&["credits", "add", "3", "--tenant", "acme"])
        .ok();
    // The dead host: its hold, and nothing else of it anywhere.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let options = sandboxer_host::ledger::LedgerOptions {
            default_credits: 0,
            expire_on_open: false,
        };
        let dead: std::sync::Arc<dyn sandboxer_host::ledger::LedgerStore> = std::sync::Arc::new(
            sandboxer_host::ledger::PgLedger::connect(&store, options)
                .await
                .unwrap(),
        );
        let expires = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            + 1500;
        dead.hold(
            "acme",
            2_000_000,
            "sbx-of-a-dead-host.1",
            "saas-stub",
            expires,
        )
        .await
        .unwrap();
    });
    let held = || {
        server
            .home
            .run(&["credits", "show", "--tenant", "acme", "--json"])
            .ok()
            .json()["held"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(held(), "2.000000");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while held() != "0.000000" {
        assert!(
            std::time::Instant::now() < deadline,
            "the server never expired the hold"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let history = server
        .home
        .run(&["credits", "history", "--tenant", "acme", "--json"])
        .ok()
        .json();
    assert_eq!(history[0]["kind"], "expire", "{history}");
    assert_eq!(history[0]["amount"], "2.000000", "{history}");
}

#[test]
fn a_database_that_does_not_exist_is_named_in_the_databases_own_words() {
    let _cluster = pg::shared();
    let mut url = url::Url::parse(&pg::cluster_url()).unwrap();
    url.set_path("no_such_database");
    let home = TestHome::new();
    let run = home
        .command()
        .args(["credits", "show"])
        .env("SANDBOXER_STORE", url.as_str())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("FATAL: database \"no_such_database\" does not exist (3D000)"),
        "{stderr}"
    );
}

/// SIGKILL a host with live sandboxes: once its leases run out another
/// host takes them over, reaps each at its ttl (or destroys it when asked),
/// through the extension, which finds what it kept at create (the
/// key-value stores are shared), and bills each exactly once.
#[test]
fn a_killed_hosts_sandboxes_are_taken_over_destroyed_and_billed_once() {
    let _cluster = pg::shared();
    let store = pg::fresh_database("takeover");
    let env = [
        ("SANDBOXER_STORE", store.as_str()),
        ("SANDBOXER_LEASE_SECS", "3"),
    ];
    let home = || TestHome::new().with_saas_stub().with_shipped_profiles();
    let mut a = Server::start_with_env(home(), &env);
    let b = Server::start_with_env(home(), &env);
    let key = a
        .home
        .run(&["tenant", "create", "acme", "--json"])
        .ok()
        .json()["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    a.home
        .run(&["credits", "add", "50", "--tenant", "acme"])
        .ok();
    let create = |timeout: u32| {
        let (status, _, body) = http(
            "POST",
            &format!("{}/v2/sandboxes", a.url),
            Some(&key),
            Some(&serde_json::json!({"templateID": "saas-stub", "timeout": timeout})),
        );
        assert_eq!(status, 201, "{body}");
        body["sandboxID"].as_str().unwrap().to_string()
    };
    // Two end on their own soon; two would live ten minutes.
    let short: Vec<String> = (0..2).map(|_| create(6)).collect();
    let long: Vec<String> = (0..2).map(|_| create(600)).collect();
    a.kill();

    // B reaps the short ones at their ttl: only their owner does, so B
    // took them over.
    let state_on_b = |id: &str| b.home.run(&["sandbox", "show", id, "--json"]).ok().json();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for id in &short {
        loop {
            let record = state_on_b(id);
            if record["state"] == "destroyed" {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "B never reaped {id}: {record}"
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }
    // The long ones: destroyed on B when asked.
    for id in &long {
        let destroyed = b
            .home
            .run(&["sandbox", "destroy", id, "--json"])
            .ok()
            .json();
        assert_eq!(destroyed["state"], "destroyed", "{destroyed}");
    }
    for id in short.iter().chain(&long) {
        let record = state_on_b(id);
        assert_eq!(record["state"], "destroyed", "{record}");
        // The extension found its own key-value entry from create: the
        // backend's report was billed, not the host's measurement.
        assert_eq!(record["meter"]["basis"], "metered", "{record}");
    }
    // Exactly one charge per sandbox, nothing voided or expired.
    let history = b
        .home
        .run(&[
            "credits", "history", "--tenant", "acme", "--limit", "1000", "--json",
        ])
        .ok()
        .json();
    let entries = history.as_array().unwrap();
    for id in short.iter().chain(&long) {
        let charges = entries
            .iter()
            .filter(|entry| {
                entry["kind"] == "charge"
                    && entry["sandbox_id"]
                        .as_str()
                        .is_some_and(|hold| hold.starts_with(id.as_str()))
            })
            .count();
        assert_eq!(charges, 1, "{id}: {history}");
    }
    for entry in entries {
        assert!(
            entry["kind"] != "void" && entry["kind"] != "expire",
            "{history}"
        );
    }
    b.home.run(&["ledger", "verify"]).ok();
}

/// The kill drill on `serve` processes: three hosts on one PostgreSQL,
/// creates and kills spread over them, a host SIGKILLed mid-burst each
/// round and started again, and PostgreSQL itself stopped hard and started
/// once mid-run. At the end every sandbox a host acknowledged is destroyed
/// and charged exactly once, no sandbox is charged twice, nothing stays
/// held, and verify passes.
#[test]
fn serve_hosts_killed_mid_burst_and_a_postgresql_crash_lose_and_double_nothing() {
    let _cluster = pg::exclusive();
    let store = pg::fresh_database("serve_drill");
    let env = [
        ("SANDBOXER_STORE", store.as_str()),
        ("SANDBOXER_LEASE_SECS", "3"),
    ];
    let mut hosts: Vec<Server> = (0..3)
        .map(|_| {
            let home = TestHome::new().with_saas_stub().with_shipped_profiles();
            Server::start_with_env(home, &env)
        })
        .collect();
    let key = hosts[0]
        .home
        .run(&["tenant", "create", "drill", "--json"])
        .ok()
        .json()["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    hosts[0]
        .home
        .run(&["credits", "add", "1000", "--tenant", "drill"])
        .ok();

    let mut acknowledged: Vec<String> = Vec::new();
    let mut killed_ok: Vec<String> = Vec::new();
    for round in 0..4 {
        let urls: Vec<String> = hosts.iter().map(|host| host.url.clone()).collect();
        let victim = round % 3;
        // Creates on every host, and kills of what earlier rounds made,
        // while one host is SIGKILLed under them.
        let to_kill: Vec<String> = acknowledged
            .iter()
            .filter(|id| !killed_ok.contains(id))
            .take(3)
            .cloned()
            .collect();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (created, killed) = std::thread::scope(|scope| {
            // Two clients per host create until told to stop.
            let creates: Vec<_> = (0..6)
                .map(|index| {
                    let (url, key, stop) = (urls[index % 3].clone(), key.clone(), &stop);
                    scope.spawn(move || {
                        let mut made = Vec::new();
                        let body = serde_json::json!({"templateID": "saas-stub", "timeout": 600});
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let url = format!("{url}/v2/sandboxes");
                            match try_http("POST", &url, Some(&key), Some(&body)) {
                                Ok((201, _, body)) => {
                                    made.push(body["sandboxID"].as_str().unwrap().to_string());
                                }
                                Ok(_) => {}
                                // The host is down: wait for the round's end.
                                Err(_) => break,
                            }
                        }
                        made
                    })
                })
                .collect();
            let kills: Vec<_> = to_kill
                .iter()
                .enumerate()
                .map(|(index, id)| {
                    let (url, key, id) = (urls[(index + 1) % 3].clone(), key.clone(), id.clone());
                    scope.spawn(move || {
                        let url = format!("{url}/sandboxes/{id}");
                        match try_http("DELETE", &url, Some(&key), None) {
                            Ok((204, _, _)) => Some(id),
                            _ => None,
                        }
                    })
                })
                .collect();
            let pause = |ms| std::thread::sleep(std::time::Duration::from_millis(ms));
            pause(150);
            hosts[victim].kill();
            if round == 1 {
                // PostgreSQL dies too, mid-burst, and comes back.
                pause(50);
                pg::pg_ctl(&["stop", "-m", "immediate"]);
                pause(500);
                pg::pg_ctl(&["start"]);
            }
            pause(200);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            (
                creates
                    .into_iter()
                    .flat_map(|call| call.join().unwrap())
                    .collect::<Vec<_>>(),
                kills
                    .into_iter()
                    .filter_map(|call| call.join().unwrap())
                    .collect::<Vec<_>>(),
            )
        });
        acknowledged.extend(created);
        killed_ok.extend(killed);
        hosts[victim].start_again(&env);
    }
    assert!(
        acknowledged.len() >= 12,
        "too few creates got through: {acknowledged:?}"
    );

    // Everything acknowledged and still live is killed through host 0.
    let operator = hosts[0].operator_key();
    // A host still recovering one answers 409 (it is that host's for now):
    // asked again shortly, it is done.
    for id in &acknowledged {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let (status, _, body) = http(
                "DELETE",
                &format!("{}/sandboxes/{id}", hosts[0].url),
                Some(&key),
                None,
            );
            if status == 204 || status == 404 {
                break;
            }
            assert_eq!(status, 409, "{id}: {body}");
            assert!(std::time::Instant::now() < deadline, "{id}: {body}");
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    }
    // Whatever a killed host left mid-create is recovered by it (it came
    // back) or taken over: nothing stays live.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let records = loop {
        let (status, _, body) = http(
            "GET",
            &format!("{}/api/v1/sandboxes?all=true", hosts[1].url),
            Some(&operator),
            None,
        );
        assert_eq!(status, 200, "{body}");
        let records = body.as_array().cloned().unwrap_or_default();
        let live: Vec<&Value> = records
            .iter()
            .filter(|record| !matches!(record["state"].as_str(), Some("destroyed" | "failed")))
            .collect();
        if live.is_empty() {
            break records;
        }
        // A create whose answer a kill cut off may have finished: its
        // sandbox is ready, and killed like the others.
        for record in live.iter().filter(|record| record["state"] == "ready") {
            let id = record["id"].as_str().unwrap();
            let url = format!("{}/sandboxes/{id}", hosts[1].url);
            let _ = try_http("DELETE", &url, Some(&key), None);
        }
        assert!(std::time::Instant::now() < deadline, "still live: {live:?}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    eprintln!(
        "drill: {} creates acknowledged, {} kills acknowledged, {} records ({} failed)",
        acknowledged.len(),
        killed_ok.len(),
        records.len(),
        records
            .iter()
            .filter(|record| record["state"] == "failed")
            .count()
    );
    for id in &acknowledged {
        let record = records.iter().find(|record| record["id"] == id.as_str());
        let record = record.unwrap_or_else(|| panic!("{id} has no record"));
        assert_eq!(record["state"], "destroyed", "{record}");
    }
    let history = hosts[2]
        .home
        .run(&[
            "credits", "history", "--tenant", "drill", "--limit", "100000", "--json",
        ])
        .ok()
        .json();
    let mut charges = std::collections::HashMap::<String, usize>::new();
    for entry in history.as_array().unwrap() {
        if entry["kind"] == "charge" {
            let hold = entry["sandbox_id"].as_str().unwrap();
            let id = hold.rsplit_once('.').map_or(hold, |(id, _)| id);
            *charges.entry(id.to_string()).or_default() += 1;
        }
    }
    for (id, count) in &charges {
        assert_eq!(*count, 1, "{id} charged {count} times: {history}");
    }
    for id in &acknowledged {
        assert_eq!(
            charges.get(id),
            Some(&1),
            "{id} was never charged: {history}"
        );
    }
    let shown = hosts[1]
        .home
        .run(&["credits", "show", "--tenant", "drill", "--json"])
        .ok()
        .json();
    assert_eq!(shown["held"], "0.000000", "{shown}");
    hosts[0].home.run(&["ledger", "verify"]).ok();
}

#[test]
fn a_lease_shorter_than_three_seconds_is_refused_saying_the_rule() {
    let _cluster = pg::shared();
    let store = pg::fresh_database("short_lease");
    let home = TestHome::new()
        .with_env("SANDBOXER_STORE", &store)
        .with_env("SANDBOXER_LEASE_SECS", "1");
    let run = home.run(&["sandbox", "list"]).fails(2);
    assert!(
        run.stderr
            .contains("SANDBOXER_LEASE_SECS is `1`; it must be whole seconds from 3 to 86400"),
        "{}",
        run.stderr
    );
}

/// A host paused past its lease (or cut off from the database) comes back
/// to find its sandbox taken over: it can neither write the record nor
/// settle the hold with it, so the sandbox is billed once, by the host that
/// owns it now.
#[test]
fn a_host_that_lost_a_sandbox_can_neither_write_its_record_nor_settle_it() {
    use sandboxer_host::ledger::{Joint, LedgerError, LedgerOptions, LedgerStore, PgLedger};
    use sandboxer_host::manager::SandboxStatus;
    use sandboxer_host::state_pg::{PgState, StateWrite};
    use std::sync::Arc;
    use std::time::Duration;
    let _cluster = pg::shared();
    let store = pg::fresh_database("lost_sandbox");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let options = LedgerOptions {
            default_credits: 0,
            expire_on_open: false,
        };
        let ledger: Arc<dyn LedgerStore> =
            Arc::new(PgLedger::connect(&store, options).await.unwrap());
        let lease = Duration::from_secs(3);
        let a = PgState::start(&store, "host-a".into(), lease).unwrap();
        let b = PgState::start(&store, "host-b".into(), lease).unwrap();
        ledger
            .grant("acme", 1_000_000, Some("start"))
            .await
            .unwrap();
        let ready: SandboxStatus = serde_json::from_value(serde_json::json!({
            "id": "sbx-lost", "tenant": "acme", "profile": "saas-stub", "state": "ready",
            "extension": "saas-stub", "kind": "saas",
            "handle": {"backend_ref": "stub-1", "endpoint": null},
            "spec": {"sandbox_id": "sbx-lost", "profile": "saas-stub", "template": "base",
                     "cpu_millis": 1000, "memory_mb": 1024, "ttl_secs": 600,
                     "network": false, "env": [], "command": []},
            "created_at_ms": 1, "ready_at_ms": 2, "expires_at_ms": 600_002,
            "finished_at_ms": null, "updated_at_ms": 2, "attempts": [],
            "meter": {"estimate": 500_000, "hold": 500_000, "hold_id": "sbx-lost.1"},
            "note": null
        }))
        .unwrap();
        a.write_async(StateWrite {
            record: Some(ready.clone()),
            ..StateWrite::default()
        })
        .await
        .unwrap();
        ledger
            .hold("acme", 500_000, "sbx-lost.1", "saas-stub", u64::MAX / 2)
            .await
            .unwrap();
        // A ready SaaS sandbox moves to the host asked to act on it.
        b.claim("sbx-lost").await.unwrap();

        let mut destroyed = ready.clone();
        destroyed.state = serde_json::from_value(serde_json::json!("destroyed")).unwrap();
        let write = a
            .write_async(StateWrite {
                record: Some(destroyed.clone()),
                ..StateWrite::default()
            })
            .await
            .unwrap_err();
        assert!(
            write
                .to_string()
                .contains("sandbox sbx-lost is now served by host host-b"),
            "{write}"
        );
        let late = destroyed.clone();
        let settle = ledger
            .settle_with(
                "sbx-lost.1",
                200_000,
                Joint {
                    record_id: "sbx-lost".into(),
                    owner: a.owner(),
                    then: Box::new(move |_| {
                        Some(StateWrite {
                            record: Some(late),
                            ..StateWrite::default()
                        })
                    }),
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(settle, LedgerError::Fenced(_)), "{settle}");
        // Nothing moved: the hold is open, the record still ready.
        let hold = ledger.hold_record("sbx-lost.1").await.unwrap().unwrap();
        assert_eq!(format!("{:?}", hold.state), "Open");
        assert_eq!(b.record("sbx-lost").unwrap().unwrap().state, ready.state);

        // The owner settles, record and charge in one transaction.
        let finished = destroyed.clone();
        let receipt = ledger
            .settle_with(
                "sbx-lost.1",
                200_000,
                Joint {
                    record_id: "sbx-lost".into(),
                    owner: b.owner(),
                    then: Box::new(move |result| {
                        result.is_ok().then(|| StateWrite {
                            record: Some(finished),
                            ..StateWrite::default()
                        })
                    }),
                },
            )
            .await
            .unwrap();
        assert_eq!(receipt.charged, 200_000);
        assert_eq!(
            b.record("sbx-lost").unwrap().unwrap().state,
            destroyed.state
        );
        assert_eq!(ledger.summary("acme").await.unwrap().balance, 800_000);
    });
}

/// Hosts sharing a store share the webhook: one host at a time delivers
/// it, from one cursor, so every event reaches the hub once, whichever host
/// wrote it; each home's own file still gets every event.
#[test]
fn hosts_sharing_a_store_deliver_each_event_to_the_hub_once() {
    let _cluster = pg::shared();
    let store = pg::fresh_database("shared_hub");
    let (hub, accepted) = crate::lifecycle::flaky_hub(0);
    let env = [
        ("SANDBOXER_STORE", store.as_str()),
        ("SANDBOXER_HUB_URL", hub.as_str()),
    ];
    let home = || TestHome::new().with_saas_stub().with_shipped_profiles();
    let a = Server::start_with_env(home(), &env);
    let b = Server::start_with_env(home(), &env);
    a.home
        .run(&["credits", "add", "5", "--tenant", "acme"])
        .ok();
    for host in [&a, &b, &a, &b] {
        let created = host
            .home
            .run(&[
                "sandbox",
                "create",
                "--profile",
                "saas-stub",
                "--tenant",
                "acme",
                "--json",
            ])
            .ok()
            .json();
        let id = created["id"].as_str().unwrap();
        host.home.run(&["sandbox", "destroy", id]).ok();
    }
    let ids_in = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .map(|line| {
                serde_json::from_str::<Value>(line).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let file_ids = |server: &Server| -> Vec<String> {
        let text =
            std::fs::read_to_string(server.home.path().join("events.jsonl")).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        let mut ids = ids_in(&lines);
        ids.sort();
        ids
    };
    let hub_ids = || -> Vec<String> {
        let mut ids = Vec::new();
        for body in accepted.lock().unwrap().iter() {
            let batch: Vec<Value> = serde_json::from_str(body).unwrap();
            ids.extend(
                batch
                    .iter()
                    .map(|event| event["id"].as_str().unwrap().to_string()),
            );
        }
        ids
    };
    // A grant, then per sandbox a hold, a charge, a release and five
    // lifecycle events (requested to destroyed): 33.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (on_a, on_b) = (file_ids(&a), file_ids(&b));
        let mut at_hub = hub_ids();
        at_hub.sort();
        let mut unique = at_hub.clone();
        unique.dedup();
        assert_eq!(unique, at_hub, "an event reached the hub twice");
        // Then every file and the hub have the same events.
        if on_a.len() >= 33 && on_a == on_b && at_hub == on_a {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a: {} events, b: {} events, hub: {}",
            on_a.len(),
            on_b.len(),
            at_hub.len()
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}
