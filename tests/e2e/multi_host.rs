//! Several `serve` processes, each with its own home, sharing one ledger
//! in PostgreSQL (`SANDBOXER_STORE`): a load balancer's view of them.

use crate::pg;
use crate::server::{Server, http};
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
    // Tenants and keys are each home's own: the tenant is registered on
    // every host, its credits added once (the ledger is shared).
    let keys: Vec<String> = hosts
        .iter()
        .map(|host| {
            host.home
                .run(&["tenant", "create", "burst", "--json"])
                .ok()
                .json()["api_key"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    hosts[0]
        .home
        .run(&["credits", "add", &credits, "--tenant", "burst"])
        .ok();

    let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..64)
            .map(|index| {
                let (url, key) = (&hosts[index % 3].url, &keys[index % 3]);
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
