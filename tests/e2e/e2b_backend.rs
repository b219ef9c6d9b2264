//! The shipped `e2b` extension against a stand-in E2B control plane
//! (`tests/e2b/fake_server.py`, through `tests/e2b/faulty_server.py` for
//! injected failures): what it creates and kills there, what it bills, how
//! each provider failure maps to a WIT error, and that a create whose answer
//! never comes leaves nothing running at the provider.

use crate::http_egress::CapturedLog;
use crate::support::{TestHome, built_extensions, install, repo_root, spec};
use sandboxer_host::runtime::{CallError, ExtError, Extension};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

const API_KEY: &str = "e2b_0123456789abcdef0123456789abcdef01234567";
/// The fake's price of the `base` template, in micro-credits per second
/// (its own bill, not the extension's).
const TEMPLATE: &str = "base:1000";

/// A fake E2B control plane on 127.0.0.1, with `faults` given to
/// `faulty_server.py`. Stopped when dropped.
struct FakeE2b {
    child: Child,
    url: String,
    port: u16,
}

impl FakeE2b {
    fn start(faults: &[&str]) -> Self {
        let mut child = Command::new("python3")
            .arg(repo_root().join("tests/e2b/faulty_server.py"))
            .args(["--tenant", &format!("acme:{API_KEY}:1000000000")])
            .args(["--template", TEMPLATE])
            .args(faults)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs the fake E2B server");
        let mut first_line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first_line)
            .unwrap();
        let announced: serde_json::Value = serde_json::from_str(&first_line)
            .unwrap_or_else(|error| panic!("the fake server said {first_line:?}: {error}"));
        let url = announced["url"].as_str().unwrap().to_string();
        let port = url.rsplit(':').next().unwrap().parse().unwrap();
        Self { child, url, port }
    }

    /// `GET path` with the tenant's key: status and JSON body.
    fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-KEY: {API_KEY}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let status = answer[9..12].parse().unwrap();
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        (
            status,
            serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        )
    }

    /// The sandboxes the provider runs for the tenant.
    fn running(&self) -> Vec<serde_json::Value> {
        let (status, body) = self.get("/v2/sandboxes");
        assert_eq!(status, 200, "{body}");
        body.as_array().unwrap().clone()
    }
}

impl Drop for FakeE2b {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Loads the shipped e2b component as `name`, pointed at `provider` with
/// `key` as its secret.
async fn load_e2b(
    home: &TestHome,
    name: &str,
    provider: &FakeE2b,
    key: &str,
    extra: &str,
) -> Arc<Extension> {
    install(&built_extensions(), "e2b", &home.extensions(), name);
    let key_file = home.path().join(format!("{name}.key"));
    std::fs::write(&key_file, key).unwrap();
    let sidecar = format!(
        "[limits]\ntimeout_ms = 10000\n[grants]\nhttp = [\"127.0.0.1:{port}\"]\n[secrets]\napi_key = {{ file = \"{file}\" }}\n[config]\napi_url = \"{url}\"\n{extra}",
        port = provider.port,
        file = key_file.display(),
        url = provider.url,
    );
    std::fs::write(home.extensions().join(format!("{name}.toml")), sidecar).unwrap();
    let set = home.runtime().load_dir(&home.extensions()).await.unwrap();
    set.entry(name)
        .unwrap()
        .status
        .clone()
        .unwrap_or_else(|reason| panic!("{name} was rejected: {reason}"))
}

fn backend_error(outcome: Result<impl std::fmt::Debug, CallError>) -> (ExtError, bool) {
    match outcome {
        Err(error @ CallError::Backend { .. }) => {
            let retryable = error.is_retryable();
            (error.ext_error().unwrap().clone(), retryable)
        }
        other => panic!("expected the extension's own error, got {other:?}"),
    }
}

/// The rate card's price of `spec`'s size for `wall_ms`, billed per started
/// second: 0.0504 per vCPU-hour and 0.0162 per GiB-hour.
pub fn rate_card_price(cpu_millis: u64, memory_mb: u64, wall_ms: u64) -> u64 {
    let billed_ms = wall_ms.div_ceil(1000) * 1000;
    sandboxer_credits::prorate(50_400, cpu_millis, 1000, billed_ms).unwrap()
        + sandboxer_credits::prorate(16_200, memory_mb, 1024, billed_ms).unwrap()
}

#[tokio::test]
async fn create_and_destroy_run_at_the_provider_and_bill_from_the_rate_card() {
    let provider = FakeE2b::start(&[]);
    let home = TestHome::new();
    let log = CapturedLog::start();
    let e2b = load_e2b(&home, "e2b", &provider, API_KEY, "").await;
    assert_eq!(e2b.info.id, "e2b");

    let sandbox = spec("sbx-e2b-1");
    let estimate = e2b.estimate_cost(&sandbox).await.unwrap();
    // One vCPU and one GiB for the spec's hour.
    assert_eq!((estimate.amount, estimate.rate_per_hour), (66_600, 66_600));

    let handle = e2b.create(&sandbox).await.unwrap();
    let running = provider.running();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0]["sandboxID"], handle.backend_ref.as_str());
    assert_eq!(running[0]["templateID"], "base");
    assert_eq!(running[0]["metadata"]["sandboxer_id"], "sbx-e2b-1");
    // Its end is the ttl away from its start.
    let started = &running[0]["startedAt"];
    assert!(started.is_string(), "{running:?}");

    // Idempotent by sandbox id: the same handle, no second sandbox.
    assert_eq!(e2b.create(&sandbox).await.unwrap(), handle);
    // Also for an instance that never recorded it (a crash between the
    // provider's answer and the record; here another home): it finds it by
    // its tag.
    let other_home = TestHome::new();
    let forgetful = load_e2b(&other_home, "e2b", &provider, API_KEY, "").await;
    assert_eq!(forgetful.create(&sandbox).await.unwrap(), handle);
    assert_eq!(provider.running().len(), 1);

    let usage = e2b.destroy(&sandbox, &handle).await.unwrap();
    assert!(provider.running().is_empty(), "destroy kills it at E2B");
    assert!(usage.wall_ms < 3_600_000, "{usage:?}");
    let charge = e2b.meter_actual(&sandbox, usage).await.unwrap();
    assert_eq!(charge, rate_card_price(1000, 1024, usage.wall_ms));
    assert!(
        charge >= 19,
        "at least one second of 1 vCPU and 1 GiB: {charge}"
    );

    // Destroy again: already gone at E2B, still an answer.
    let again = e2b.destroy(&sandbox, &handle).await.unwrap();
    assert!(again.wall_ms <= 3_600_000);

    let state = std::fs::read(home.path().join("state.redb")).unwrap_or_default();
    for (place, text) in [
        ("the log", log.text()),
        (
            "the state store",
            String::from_utf8_lossy(&state).into_owned(),
        ),
        (
            "the grants shown",
            serde_json::to_string(&e2b.grants).unwrap(),
        ),
        ("the handle", format!("{handle:?}")),
    ] {
        assert!(!text.contains(API_KEY), "the API key is in {place}");
    }
}

#[tokio::test]
async fn provider_failures_map_to_the_wit_errors_routing_needs() {
    // A home per instance: each holds its own state store.
    let home = TestHome::new();

    // 400: E2B takes timeouts up to a day.
    let provider = FakeE2b::start(&[]);
    let e2b = load_e2b(&home, "e2b", &provider, API_KEY, "").await;
    let mut too_long = spec("sbx-e2b-400");
    too_long.ttl_secs = 100_000;
    let (error, retryable) = backend_error(e2b.create(&too_long).await);
    assert!(
        matches!(&error, ExtError::InvalidSpec(message) if message.contains("E2B answered 400") && message.contains("timeout must be")),
        "{error:?}"
    );
    assert!(!retryable, "a bad spec is not tried elsewhere");

    // 401: a key E2B does not know; the message says so, without the key.
    let wrong_key = "e2b_ffffffffffffffffffffffffffffffffffffffff";
    let wrong_home = TestHome::new();
    let refused = load_e2b(&wrong_home, "e2b", &provider, wrong_key, "").await;
    let outcome = refused.create(&spec("sbx-e2b-401")).await;
    let shown = format!("{}", outcome.as_ref().unwrap_err());
    let (error, retryable) = backend_error(outcome);
    assert!(
        matches!(&error, ExtError::Unavailable(message) if message.contains("E2B answered 401") && message.contains("E2B refused the API key")),
        "{error:?}"
    );
    assert!(retryable, "routing falls back");
    assert!(
        !shown.contains(wrong_key) && !shown.contains(API_KEY),
        "{shown}"
    );

    for (status, expected) in [("429", "capacity"), ("503", "unavailable")] {
        let failing = FakeE2b::start(&["--fail-create", status]);
        let failing_home = TestHome::new();
        let e2b = load_e2b(&failing_home, "e2b", &failing, API_KEY, "").await;
        let (error, retryable) =
            backend_error(e2b.create(&spec(&format!("sbx-e2b-{status}"))).await);
        let case = match &error {
            ExtError::Capacity(message) => ("capacity", message),
            ExtError::Unavailable(message) => ("unavailable", message),
            other => panic!("{status}: {other:?}"),
        };
        assert_eq!(case.0, expected, "{status}: {error:?}");
        assert!(
            case.1.contains(&format!("E2B answered {status}")),
            "{error:?}"
        );
        assert!(retryable, "{status} falls back");
        assert!(failing.running().is_empty());
    }
}

#[tokio::test]
async fn a_create_whose_answer_never_comes_leaves_nothing_at_the_provider() {
    // The provider creates the sandbox, then answers three seconds later;
    // the extension gives up after one.
    let provider = FakeE2b::start(&["--slow-create", "3"]);
    let home = TestHome::new();
    let e2b = load_e2b(
        &home,
        "e2b",
        &provider,
        API_KEY,
        "request_timeout_ms = 1000\n",
    )
    .await;
    let (error, retryable) = backend_error(e2b.create(&spec("sbx-e2b-slow")).await);
    assert!(
        matches!(&error, ExtError::Unavailable(message)
            if message.starts_with("E2B did not answer the create in time")
            && message.contains("found and killed 1 sandbox(es) it left at E2B")),
        "{error:?}"
    );
    assert!(retryable, "routing falls back to the next backend");
    assert!(
        provider.running().is_empty(),
        "the sandbox the create left was killed: {:?}",
        provider.running()
    );
}
