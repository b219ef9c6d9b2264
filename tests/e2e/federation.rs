//! Federation: host A's shipped `e2b` extension pointed at host B's `serve`
//! (B speaks E2B's control plane), all on 127.0.0.1. A creates on B with a
//! tenant key of B's, both ledgers bill the sandbox, and A falls back to its
//! own saas-stub when B refuses (503), is stopped, or answers too late,
//! without leaving a sandbox running on B. And B's key, A's secret, shows
//! up in none of the places a user or an operator can read.

use crate::e2b_backend::rate_card_price;
use crate::server::{Server, charges_of};
use crate::support::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// B: a served home with the saas-stub and the shipped profiles (the
/// `saas-stub` profile is the template A's `e2b` instance asks for).
fn host_b() -> Server {
    Server::start(TestHome::new().with_saas_stub().with_shipped_profiles())
}

/// A: a home with the saas-stub and the shipped `e2b` component, its `e2b`
/// instance pointed at `api_url` (granted `127.0.0.1:port` literally), B's
/// tenant key in a secret file, and the shipped `e2b` profile asking B for
/// its `saas-stub` profile. `extra_config` goes under `[config]`.
fn host_a(api_url: &str, port: u16, key: &str, extra_config: &str) -> TestHome {
    let home = TestHome::new()
        .with_saas_stub()
        .with_shipped_profiles()
        .with_shared_cache();
    install(&built_extensions(), "e2b", &home.extensions(), "e2b");
    let key_file = home.path().join("host-b.key");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    let sidecar = format!(
        "[limits]\ntimeout_ms = 10000\n\
         [grants]\nhttp = [\"127.0.0.1:{port}\"]\n\
         [secrets]\napi_key = {{ file = \"{file}\" }}\n\
         [config]\napi_url = \"{api_url}\"\n{extra_config}",
        file = key_file.display(),
    );
    std::fs::write(home.extensions().join("e2b.toml"), sidecar).unwrap();
    let profile = home.profiles().join("e2b.toml");
    let shipped = std::fs::read_to_string(&profile).unwrap();
    assert!(shipped.contains("template = \"base\""), "{shipped}");
    std::fs::write(
        &profile,
        shipped.replace("template = \"base\"", "template = \"saas-stub\""),
    )
    .unwrap();
    home.run(&["credits", "add", "5", "--tenant", "alice"]).ok();
    home
}

/// The port of a `http://127.0.0.1:PORT` URL.
fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

/// `run --profile e2b` on A for alice, one second long: its JSON summary.
fn run_e2b(home: &TestHome) -> Value {
    home.run(&[
        "run",
        "--profile",
        "e2b",
        "--tenant",
        "alice",
        "--ttl",
        "1",
        "--json",
    ])
    .ok()
    .json()
}

/// Every sandbox record B has (operator view, destroyed ones too).
fn sandboxes_on(home: &TestHome) -> Vec<Value> {
    home.run(&["sandbox", "list", "--all", "--json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .clone()
}

/// B's records made for A's sandbox `a_id` (E2B metadata `sandboxer_id`).
fn made_for(records: &[Value], a_id: &str) -> Vec<Value> {
    records
        .iter()
        .filter(|record| record["metadata"]["sandboxer_id"] == a_id)
        .cloned()
        .collect()
}

/// What a stand-in for B does with a create (`POST /sandboxes`).
#[derive(Clone, Copy)]
enum OnCreate {
    /// Answers 503 itself; B never hears of it.
    Refuse,
    /// Passes it to B, then holds B's answer this long before relaying it.
    HoldAnswer(Duration),
}

/// A relay on 127.0.0.1 in front of B: every request but a create passes
/// through unchanged (one request per connection, as the host's client
/// sends them); a create is refused or answered late. Stops when dropped.
struct Relay {
    url: String,
    port: u16,
    stopping: Arc<AtomicBool>,
}

impl Relay {
    fn start(upstream_port: u16, on_create: OnCreate) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                std::thread::spawn(move || relay_one(client, upstream_port, on_create));
            }
        });
        Self {
            url: format!("http://127.0.0.1:{port}"),
            port,
            stopping,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Reads one whole request (head, then a body by `Content-Length` or
/// chunked) from `client`.
fn read_request(client: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = bytes.windows(4).position(|window| window == b"\r\n\r\n") {
            break at + 4;
        }
        let read = client.read(&mut chunk).ok()?;
        if read == 0 {
            return None;
        }
        bytes.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_ascii_lowercase();
    let length: Option<usize> = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok());
    let chunked = head.contains("transfer-encoding: chunked");
    loop {
        let body = &bytes[head_end..];
        let complete = match length {
            Some(length) => body.len() >= length,
            None => !chunked || body.ends_with(b"0\r\n\r\n"),
        };
        if complete {
            break;
        }
        let read = client.read(&mut chunk).ok()?;
        if read == 0 {
            return None;
        }
        bytes.extend_from_slice(&chunk[..read]);
    }
    let request_line = head.lines().next().unwrap_or_default().to_string();
    // B closes after its answer, so the relay knows where the answer ends.
    let (first_line, rest) = bytes.split_at(head.find("\r\n")? + 2);
    let mut forwarded = first_line.to_vec();
    forwarded.extend_from_slice(b"Connection: close\r\n");
    forwarded.extend_from_slice(rest);
    Some((request_line, forwarded))
}

fn relay_one(mut client: TcpStream, upstream_port: u16, on_create: OnCreate) {
    let Some((request_line, request)) = read_request(&mut client) else {
        return;
    };
    let is_create = request_line.starts_with("post /sandboxes ");
    if is_create && matches!(on_create, OnCreate::Refuse) {
        let body = r#"{"code":503,"message":"no capacity (the federation test's relay)"}"#;
        let _ = write!(
            client,
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = client.shutdown(Shutdown::Write);
        return;
    }
    let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
        return;
    };
    if upstream.write_all(&request).is_err() {
        return;
    }
    let mut answer = Vec::new();
    let _ = upstream.read_to_end(&mut answer);
    if let (true, OnCreate::HoldAnswer(delay)) = (is_create, on_create) {
        std::thread::sleep(delay);
    }
    let _ = client.write_all(&answer);
    let _ = client.shutdown(Shutdown::Write);
}

#[test]
fn a_run_on_a_creates_on_b_and_both_ledgers_bill_it() {
    let b = host_b();
    let key = b.tenant("host-a", "10");
    let a = host_a(&b.url, port_of(&b.url), &key, "");

    let summary = run_e2b(&a);
    assert_eq!(summary["state"], "destroyed", "{summary}");
    assert_eq!(summary["extension"], "e2b", "{summary}");
    let a_id = summary["id"].as_str().unwrap();

    // A billed alice at A's rate card (the e2b sidecar's, per started
    // second of the wall time B reported).
    let record = a.run(&["sandbox", "show", a_id, "--json"]).ok().json();
    let wall_ms = record["meter"]["reported_usage"]["wall_ms"]
        .as_u64()
        .unwrap();
    assert!(wall_ms <= 1000, "never past the ttl: {record}");
    let expected = rate_card_price(1000, 1024, wall_ms);
    assert_eq!(
        summary["actual"],
        sandboxer_credits::format_credits(expected),
        "{record}"
    );
    let a_charges = charges_of(&a, "alice");
    assert_eq!(a_charges.len(), 1, "{a_charges:?}");
    a.run(&["ledger", "verify"]).ok();

    // B made one sandbox for it, for A's tenant key, destroyed it, and
    // billed that tenant at B's saas-stub rates.
    let on_b = made_for(&sandboxes_on(&b.home), a_id);
    assert_eq!(on_b.len(), 1, "{on_b:?}");
    let b_record = &on_b[0];
    assert_eq!(b_record["state"], "destroyed", "{b_record}");
    assert_eq!(b_record["tenant"], "host-a");
    assert_eq!(b_record["extension"], "saas-stub");
    assert_eq!(b_record["metadata"]["sandboxer_profile"], "e2b");
    // A's handle is B's sandbox id.
    assert_eq!(record["handle"]["backend_ref"], b_record["id"], "{record}");
    let b_charges = charges_of(&b.home, "host-a");
    assert_eq!(b_charges.len(), 1, "{b_charges:?}");
    let b_actual = b_record["meter"]["actual"].as_str().unwrap();
    assert_ne!(
        sandboxer_credits::parse_credits(b_actual).unwrap(),
        0,
        "{b_record}"
    );
    b.home.run(&["ledger", "verify"]).ok();
}

/// Runs `e2b` on A against `api_url`, expects the saas-stub to have served
/// it after e2b failed with a message containing `why`, and returns A's
/// sandbox id.
fn falls_back(a: &TestHome, why: &str) -> String {
    let summary = run_e2b(a);
    assert_eq!(summary["state"], "destroyed", "{summary}");
    assert_eq!(summary["extension"], "saas-stub", "{summary}");
    let a_id = summary["id"].as_str().unwrap().to_string();
    let record = a.run(&["sandbox", "show", &a_id, "--json"]).ok().json();
    let attempts = record["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{record}");
    assert_eq!(attempts[0]["extension"], "e2b");
    let outcome = attempts[0]["outcome"].as_str().unwrap_or_default();
    assert!(outcome.contains(why), "e2b's attempt: {outcome}");
    assert_eq!(attempts[1]["extension"], "saas-stub");
    // Alice paid once, for the saas-stub's sandbox.
    assert_eq!(charges_of(a, "alice").len(), 1);
    a.run(&["ledger", "verify"]).ok();
    a_id
}

#[test]
fn a_503_from_b_falls_back_to_the_saas_stub_on_a() {
    let b = host_b();
    let key = b.tenant("host-a", "10");
    let relay = Relay::start(port_of(&b.url), OnCreate::Refuse);
    let a = host_a(&relay.url, relay.port, &key, "");
    let a_id = falls_back(&a, "503");
    assert!(made_for(&sandboxes_on(&b.home), &a_id).is_empty());
    assert!(charges_of(&b.home, "host-a").is_empty());
}

#[test]
fn a_stopped_b_falls_back_to_the_saas_stub_on_a() {
    let mut b = host_b();
    let key = b.tenant("host-a", "10");
    let a = host_a(&b.url, port_of(&b.url), &key, "");
    let (status, log) = b.stop();
    assert!(status.success(), "{log}");
    falls_back(&a, "ConnectionRefused");
    // B's home, opened by the command line now that nothing serves it.
    assert!(sandboxes_on(&b.home).is_empty());
}

#[test]
fn a_b_slower_than_the_request_timeout_falls_back_and_keeps_nothing_on_b() {
    let b = host_b();
    let key = b.tenant("host-a", "10");
    // B makes the sandbox at once; its answer reaches A only after A's
    // create request has given up (2 s; B takes milliseconds to create): the
    // create is ambiguous.
    let relay = Relay::start(
        port_of(&b.url),
        OnCreate::HoldAnswer(Duration::from_secs(6)),
    );
    let a = host_a(
        &relay.url,
        relay.port,
        &key,
        "request_timeout_ms = \"2000\"\n",
    );
    let a_id = falls_back(&a, "did not answer the create in time");
    // A's e2b found what B made by its tag and killed it before falling
    // back: destroyed on B, billed there for its short life.
    let on_b = made_for(&sandboxes_on(&b.home), &a_id);
    assert_eq!(on_b.len(), 1, "{on_b:?}");
    assert_eq!(on_b[0]["state"], "destroyed", "{:?}", on_b[0]);
    assert_eq!(charges_of(&b.home, "host-a").len(), 1);
    b.home.run(&["ledger", "verify"]).ok();
}

/// The bytes of `path`, searched for `secret`.
fn file_holds(path: &std::path::Path, secret: &str) -> bool {
    let bytes = std::fs::read(path).unwrap();
    bytes
        .windows(secret.len())
        .any(|window| window == secret.as_bytes())
}

#[test]
fn bs_key_is_nowhere_a_can_show_or_stores() {
    let mut b = host_b();
    let key = b.tenant("host-a", "10");
    let a_home = host_a(&b.url, port_of(&b.url), &key, "");
    // A profile that has only e2b, for a template B does not have: a run
    // that fails with B's refusal in its message.
    std::fs::write(
        a_home.profiles().join("e2b-only.toml"),
        "name = \"e2b-only\"\ndescription = \"e2b alone\"\n\
         [sandbox]\ntemplate = \"no-such-profile\"\ncpu_millis = 1000\nmemory_mb = 1024\nttl_secs = 60\n\
         [route]\nstrategy = \"explicit\"\nextension = \"e2b\"\n",
    )
    .unwrap();
    // `ext info` shows the grant and where the secret comes from (it
    // opens the home itself: before A's server owns it).
    let info = a_home.run(&["ext", "info", "e2b", "--json"]).ok();
    let json = info.json();
    let b_destination = format!("127.0.0.1:{}", port_of(&b.url));
    assert_eq!(json["grants"]["http"], serde_json::json!([b_destination]));
    let key_file = a_home.path().join("host-b.key");
    assert_eq!(
        json["grants"]["secrets"]["api_key"],
        serde_json::json!({"file": key_file.display().to_string(), "hosts": []})
    );
    let text = a_home.run(&["ext", "info", "e2b"]).ok();
    assert!(
        text.stdout.contains(&format!("http {b_destination}")),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout
            .contains(&format!("secrets: api_key (file {})", key_file.display())),
        "{}",
        text.stdout
    );

    let mut a = Server::start_with_env(a_home, &[("SANDBOXER_LOG", "debug")]);

    // One run through B (A's server runs it), one that B refuses.
    let summary = run_e2b(&a.home);
    assert_eq!(summary["extension"], "e2b", "{summary}");
    let a_id = summary["id"].as_str().unwrap();
    let failed = a
        .home
        .run(&[
            "run",
            "--profile",
            "e2b-only",
            "--tenant",
            "alice",
            "--ttl",
            "1",
        ])
        .fails(1);
    assert!(
        failed.stderr.contains("no-such-profile"),
        "the failure names what B refused: {}",
        failed.stderr
    );
    let shown = a.home.run(&["sandbox", "show", a_id, "--json"]).ok();
    let (status, a_log) = a.stop();
    assert!(status.success(), "{a_log}");
    assert!(
        a_log.contains("e2b"),
        "the server's debug log speaks of the extension: {a_log}"
    );
    let (status, b_log) = b.stop();
    assert!(status.success(), "{b_log}");

    for (place, text) in [
        ("ext info --json", info.stdout.as_str()),
        ("ext info", text.stdout.as_str()),
        ("sandbox show --json", shown.stdout.as_str()),
        ("the failed run's stderr", failed.stderr.as_str()),
        ("the failed run's stdout", failed.stdout.as_str()),
        ("A's server log", a_log.as_str()),
        ("B's server log", b_log.as_str()),
    ] {
        assert!(!text.contains(&key), "B's key is in {place}:\n{text}");
    }
    let events = a.home.path().join("events.jsonl");
    assert!(
        std::fs::read_to_string(&events).unwrap().contains(a_id),
        "events.jsonl has the run's events"
    );
    for file in ["events.jsonl", "state.redb", "ledger.redb"] {
        assert!(
            !file_holds(&a.home.path().join(file), &key),
            "B's key is in A's {file}"
        );
    }
}
