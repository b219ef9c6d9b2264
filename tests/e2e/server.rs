//! `sandboxer-host serve`, driven as its users do: the official E2B SDKs
//! (Python and JavaScript, pinned, from `target/tools`), plain HTTP on the
//! native API, and the command line on the same home while the server owns
//! it.

use crate::support::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `serve` on a free port of 127.0.0.1, stopped (SIGTERM) on drop.
pub struct Server {
    pub home: TestHome,
    child: Option<Child>,
    pub url: String,
}

impl Server {
    pub fn start(home: TestHome) -> Self {
        Self::start_with_env(home, &[])
    }

    /// Starts it with these environment variables set too (its log level).
    pub fn start_with_env(home: TestHome, env: &[(&str, &str)]) -> Self {
        let (child, url) = Self::spawn(&home, env);
        Self {
            home,
            child: Some(child),
            url,
        }
    }

    /// Starts a killed (or stopped) server again on the same home.
    pub fn start_again(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "the server is still running");
        // A killed server leaves its file behind.
        let _ = std::fs::remove_file(self.home.path().join("server.json"));
        let (child, url) = Self::spawn(&self.home, env);
        self.child = Some(child);
        self.url = url;
    }

    fn spawn(home: &TestHome, env: &[(&str, &str)]) -> (Child, String) {
        let child = home
            .command()
            .envs(env.iter().copied())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let file = home.path().join("server.json");
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = loop {
            if let Ok(text) = std::fs::read_to_string(&file)
                && let Ok(json) = serde_json::from_str::<Value>(&text)
            {
                break json["url"].as_str().unwrap().to_string();
            }
            assert!(Instant::now() < deadline, "serve did not start in 60 s");
            std::thread::sleep(Duration::from_millis(50));
        };
        (child, url)
    }

    pub fn operator_key(&self) -> String {
        std::fs::read_to_string(self.home.path().join("operator.key"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// A tenant with a key and `credits` credits (added by the CLI, which
    /// goes through the server).
    pub fn tenant(&self, name: &str, credits: &str) -> String {
        let created = self
            .home
            .run(&["tenant", "create", name, "--json"])
            .ok()
            .json();
        self.home
            .run(&["credits", "add", credits, "--tenant", name])
            .ok();
        created["api_key"].as_str().unwrap().to_string()
    }

    /// Sends SIGKILL: the host dies mid-whatever, as in a crash.
    pub fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Sends SIGTERM and returns how the server ended, with its stderr.
    pub fn stop(&mut self) -> (std::process::ExitStatus, String) {
        let child = self.child.take().unwrap();
        // SAFETY: signalling a child process this test started.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let output = child.wait_with_output().unwrap();
        (
            output.status,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// One HTTP request; returns (status, headers, body as JSON or text).
pub fn http(
    method: &str,
    url: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> (u16, Vec<(String, String)>, Value) {
    try_http(method, url, key, body).unwrap()
}

/// An HTTP answer: status, headers, body as JSON or text.
pub type Answer = (u16, Vec<(String, String)>, Value);

/// [`http`], answering a transport failure (a server killed mid-request)
/// instead of panicking.
pub fn try_http(
    method: &str,
    url: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> Result<Answer, ureq::Error> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let with_key = |request: ureq::RequestBuilder<ureq::typestate::WithoutBody>| match key {
        Some(key) => request.header("x-api-key", key),
        None => request,
    };
    let response = match (method, body) {
        ("GET", _) => with_key(agent.get(url)).call(),
        ("DELETE", _) => with_key(agent.delete(url)).call(),
        (_, body) => {
            let mut request = agent.post(url).header("content-type", "application/json");
            if let Some(key) = key {
                request = request.header("x-api-key", key);
            }
            request.send(body.map(Value::to_string).unwrap_or_default().as_bytes())
        }
    }?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.to_string(),
                value.to_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let text = response.into_body().read_to_string().unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, headers, body))
}

fn served_home() -> TestHome {
    TestHome::new().with_saas_stub().with_shipped_profiles()
}

/// Runs an E2B SDK scenario client (`python` or `js`) against the server.
fn scenario(sdk: &str, url: &str, key: &str, args: &[&str]) -> (i32, Value) {
    let root = repo_root();
    let mut command = match sdk {
        "python" => {
            let mut command = Command::new("python3");
            command.arg(root.join("tests/e2b/python/scenario.py"));
            command
        }
        _ => {
            let mut command = Command::new("node");
            command.arg(root.join("tests/e2b/js/scenario.mjs"));
            command
        }
    };
    assert!(
        sdk_installed(&root, sdk),
        "the pinned E2B {sdk} SDK is not in target/tools: run `cargo xtask install-e2b-sdks` (or `cargo xtask test`)"
    );
    let output = command
        .args(args)
        .env("E2B_API_URL", url)
        .env("E2B_API_KEY", key)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|error| {
        panic!(
            "{sdk} scenario {args:?} printed no JSON ({error}): {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code().unwrap_or(-1), report)
}

fn sdk_installed(root: &Path, sdk: &str) -> bool {
    match sdk {
        "python" => root.join("target/tools/e2b-python/e2b").is_dir(),
        _ => root.join("target/tools/e2b-js/node_modules/e2b").is_dir(),
    }
}

pub fn charges_of(home: &TestHome, tenant: &str) -> Vec<Value> {
    home.run(&["credits", "history", "--tenant", tenant, "--json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["kind"] == "charge")
        .cloned()
        .collect()
}

#[test]
fn the_official_e2b_sdks_create_inspect_list_extend_and_kill() {
    let server = Server::start(served_home());
    for sdk in ["python", "js"] {
        let tenant = format!("{sdk}-tenant");
        let key = server.tenant(&tenant, "1");
        let run = format!("run-{sdk}");
        let (code, report) = scenario(
            sdk,
            &server.url,
            &key,
            &[
                "lifecycle",
                "--template",
                "saas-stub",
                "--metadata",
                &format!("run={run}"),
                "--timeout",
                "30",
            ],
        );
        assert_eq!(code, 0, "{sdk}: {report}");
        assert_eq!(report["ok"], true, "{sdk}: {report}");
        let id = report["sandbox_id"].as_str().unwrap();
        // The kill billed it: one charge in the tenant's history.
        let charges = charges_of(&server.home, &tenant);
        assert_eq!(charges.len(), 1, "{sdk}: {charges:?}");
        assert!(
            charges[0]["sandbox_id"].as_str().unwrap().starts_with(id),
            "{charges:?}"
        );
        let record = server
            .home
            .run(&["sandbox", "show", id, "--json"])
            .ok()
            .json();
        assert_eq!(record["state"], "destroyed");
        assert_eq!(record["metadata"]["run"], run.as_str());
    }
    server.home.run(&["ledger", "verify"]).ok();
}

#[test]
fn another_tenants_key_sees_and_kills_nothing() {
    let server = Server::start(served_home());
    let owner = server.tenant("owner", "1");
    let intruder = server.tenant("intruder", "1");
    let (code, created) = scenario(
        "python",
        &server.url,
        &owner,
        &["create", "--template", "saas-stub", "--timeout", "60"],
    );
    assert_eq!(code, 0, "{created}");
    let id = created["sandbox_id"].as_str().unwrap().to_string();
    for sdk in ["python", "js"] {
        let (code, report) = scenario(
            sdk,
            &server.url,
            &intruder,
            &["foreign", "--sandbox-id", &id],
        );
        assert_eq!(code, 0, "{sdk}: {report}");
        let (_, killed) = scenario(sdk, &server.url, &intruder, &["kill", "--sandbox-id", &id]);
        assert_eq!(killed["steps"][0]["returned"], false, "{sdk}: {killed}");
    }
    // Native API: another tenant's sandbox is a 404, not a 403.
    let (status, _, body) = http(
        "GET",
        &format!("{}/api/v1/sandboxes/{id}", server.url),
        Some(&intruder),
        None,
    );
    assert_eq!((status, body["code"].as_u64()), (404, Some(404)), "{body}");
    // Still alive for its owner.
    let (status, _, body) = http(
        "GET",
        &format!("{}/sandboxes/{id}", server.url),
        Some(&owner),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "running");
    // No key, or a wrong one: 401 with a JSON body.
    let (status, _, body) = http("GET", &format!("{}/v2/sandboxes", server.url), None, None);
    assert_eq!(status, 401);
    assert_eq!(body["code"], 401);
    assert!(
        body["message"].as_str().unwrap().contains("X-API-KEY"),
        "{body}"
    );
    let (status, _, body) = http(
        "GET",
        &format!("{}/v2/sandboxes", server.url),
        Some("e2b_0000000000000000000000000000000000000000"),
        None,
    );
    assert_eq!(
        (status, body["message"].as_str()),
        (401, Some("unknown or revoked API key"))
    );
    // A tenant cannot add credits to itself.
    let (status, _, body) = http(
        "POST",
        &format!("{}/api/v1/credits/intruder", server.url),
        Some(&intruder),
        Some(&serde_json::json!({"amount": "100"})),
    );
    assert_eq!(status, 403, "{body}");
    // A revoked key stops working at once.
    server.home.run(&["tenant", "revoke", "intruder"]).ok();
    let (status, _, _) = http(
        "GET",
        &format!("{}/v2/sandboxes", server.url),
        Some(&intruder),
        None,
    );
    assert_eq!(status, 401);
}

#[test]
fn sixty_four_concurrent_creates_on_credits_for_ten_make_exactly_ten() {
    let server = Server::start(served_home());
    let explained = server
        .home
        .run(&["route", "explain", "--profile", "saas-stub", "--json"])
        .ok()
        .json();
    let estimate =
        sandboxer_credits::parse_credits(explained["candidates"][0]["estimate"].as_str().unwrap())
            .unwrap();
    let credits = sandboxer_credits::format_credits(estimate * 10);
    let key = server.tenant("burst", &credits);
    // The JS SDK: it sends every body chunked, 64 connections at once.
    let (_, report) = scenario(
        "js",
        &server.url,
        &key,
        &["burst", "--template", "saas-stub", "--count", "64"],
    );
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["created"].as_array().unwrap().len(), 10, "{report}");
    let refused: u64 = report["refused"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(label, count)| {
            assert!(label.ends_with("402"), "refused otherwise: {label}");
            count.as_u64().unwrap()
        })
        .sum();
    assert_eq!(refused, 54, "{report}");
    let message = report["refusal_messages"][0].as_str().unwrap();
    assert!(message.contains("insufficient credits"), "{message}");
    let shown = server
        .home
        .run(&["credits", "show", "--tenant", "burst", "--json"])
        .ok()
        .json();
    assert_eq!(shown["available"], "0.000000", "{shown}");
    assert_eq!(shown["held"].as_str(), Some(credits.as_str()));
    server.home.run(&["ledger", "verify"]).ok();
}

#[test]
fn the_command_line_works_on_a_served_home_through_the_server() {
    let server = Server::start(served_home());
    let home = &server.home;
    home.run(&["credits", "add", "5", "--tenant", "cli"]).ok();
    let report = home
        .run(&[
            "run",
            "--profile",
            "saas-stub",
            "--tenant",
            "cli",
            "--ttl",
            "1",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(report["state"], "destroyed");
    let created = home
        .run(&[
            "sandbox",
            "create",
            "--profile",
            "saas-stub",
            "--tenant",
            "cli",
            "--json",
        ])
        .ok()
        .json();
    let id = created["id"].as_str().unwrap();
    let listed = home.run(&["sandbox", "list", "--json"]).ok().json();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|record| record["id"] == id)
    );
    home.run(&["sandbox", "destroy", id]).ok();
    home.run(&["ledger", "verify"]).ok();
    let extensions = home.run(&["ext", "list", "--json"]).ok().json();
    assert_eq!(extensions[0]["name"], "saas-stub");
    // The operator key is the server's; a tenant cannot do operator work.
    let (status, _, body) = http(
        "GET",
        &format!("{}/api/v1/tenants", server.url),
        Some(&server.operator_key()),
        None,
    );
    assert_eq!(status, 200, "{body}");
}

#[test]
fn the_server_reaps_on_time_and_stops_cleanly_on_sigterm() {
    let mut server = Server::start(served_home());
    let key = server.tenant("reaped", "1");
    let (status, _, body) = http(
        "POST",
        &format!("{}/v2/sandboxes", server.url),
        Some(&key),
        Some(&serde_json::json!({"templateID": "saas-stub", "timeout": 1})),
    );
    assert_eq!(status, 201, "{body}");
    let id = body["sandboxID"].as_str().unwrap().to_string();
    // Nobody asks: the server's own pass destroys and bills it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, _, record) = http(
            "GET",
            &format!("{}/api/v1/sandboxes/{id}", server.url),
            Some(&key),
            None,
        );
        if record["state"] == "destroyed" {
            break;
        }
        assert!(Instant::now() < deadline, "not reaped: {record}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(charges_of(&server.home, "reaped").len(), 1);
    let (status, stderr) = server.stop();
    assert!(status.success(), "serve exited with {status}: {stderr}");
    assert!(stderr.contains("stopped"), "{stderr}");
    assert!(
        !server.home.path().join("server.json").exists(),
        "server.json is removed on exit"
    );
    // The home is free again: commands open it themselves.
    server.home.run(&["ledger", "verify"]).ok();
}

#[test]
fn errors_are_json_and_unimplemented_e2b_routes_are_501() {
    let server = Server::start(served_home());
    let key = server.tenant("errors", "0.000001");
    for (method, path, body, status) in [
        ("GET", "/sandboxes/sbx-nope", None, 404),
        ("POST", "/sandboxes/sbx-nope/pause", None, 501),
        ("GET", "/no/such/route", None, 404),
        ("PUT", "/v2/sandboxes", None, 405),
        (
            "POST",
            "/v2/sandboxes",
            Some(serde_json::json!({"nope": 1})),
            400,
        ),
        (
            "POST",
            "/v2/sandboxes",
            Some(serde_json::json!({"templateID": "no-such-profile"})),
            404,
        ),
        (
            "POST",
            "/v2/sandboxes",
            Some(serde_json::json!({"templateID": "saas-stub", "timeout": 600})),
            402,
        ),
    ] {
        let url = format!("{}{path}", server.url);
        let (got, headers, answer) = if method == "PUT" {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            let response = agent.put(&url).header("x-api-key", &key).send("").unwrap();
            let status = response.status().as_u16();
            let text = response.into_body().read_to_string().unwrap();
            (status, Vec::new(), serde_json::from_str(&text).unwrap())
        } else {
            http(method, &url, Some(&key), body.as_ref())
        };
        assert_eq!(got, status, "{method} {path}: {answer}");
        assert_eq!(answer["code"], status, "{method} {path}: {answer}");
        assert!(answer["message"].is_string(), "{answer}");
        if status == 402 {
            let message = answer["message"].as_str().unwrap();
            assert!(message.contains("insufficient credits"), "{message}");
            assert!(
                headers
                    .iter()
                    .any(|(name, value)| name == "should-retry" && value == "false"),
                "{headers:?}"
            );
        }
    }
    let (status, _, document) = http("GET", &format!("{}/openapi.json", server.url), None, None);
    assert_eq!(status, 200);
    assert!(document["paths"]["/v2/sandboxes"].is_object(), "{document}");
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("docs/openapi.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        document, committed,
        "the served document is docs/openapi.json"
    );
}

#[test]
fn metrics_count_requests_sandboxes_and_extension_calls() {
    let server = Server::start(served_home());
    let key = server.tenant("metered", "1");
    let (status, _, _) = http(
        "POST",
        &format!("{}/v2/sandboxes", server.url),
        Some(&key),
        Some(&serde_json::json!({"templateID": "saas-stub", "timeout": 60})),
    );
    assert_eq!(status, 201);
    let (status, _, text) = http("GET", &format!("{}/metrics", server.url), None, None);
    assert_eq!(status, 200);
    let text = text.as_str().unwrap().to_string();
    for line in [
        "sandboxer_http_requests_total{method=\"POST\",route=\"/v2/sandboxes\",status=\"201\"} 1",
        "sandboxer_sandboxes{state=\"ready\"} 1",
        "sandboxer_holds_open 1",
        "sandboxer_extension_calls{instance=\"saas-stub\",function=\"create\",outcome=\"ok\"} 1",
        "sandboxer_breaker_open{instance=\"saas-stub\"} 0",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(
        text.contains("sandboxer_http_request_duration_seconds_bucket"),
        "{text}"
    );
}

#[test]
fn replacing_an_extension_while_requests_run_fails_none_of_them() {
    let server = Server::start(served_home());
    let key = server.tenant("swapper", "10");
    let dir = server.home.extensions();
    let stub = std::fs::read(dir.join("saas-stub.wasm")).unwrap();
    let url = server.url.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (url, key, stop) = (url.clone(), key.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut outcomes = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (status, _, body) = http(
                        "POST",
                        &format!("{url}/v2/sandboxes"),
                        Some(&key),
                        Some(&serde_json::json!({"templateID": "saas-stub", "timeout": 60})),
                    );
                    if status == 201 {
                        let id = body["sandboxID"].as_str().unwrap();
                        let (killed, _, _) =
                            http("DELETE", &format!("{url}/sandboxes/{id}"), Some(&key), None);
                        outcomes.push((killed, body));
                    } else {
                        outcomes.push((status, body));
                    }
                }
                outcomes
            })
        })
        .collect();
    // Swaps, as an operator deploys: a new file renamed into place; then a
    // broken file written in place, then the good one back.
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(1200));
        let staged = dir.join(format!(".saas-stub.wasm.{round}"));
        std::fs::write(&staged, &stub).unwrap();
        std::fs::rename(&staged, dir.join("saas-stub.wasm")).unwrap();
    }
    let replace = |bytes: &[u8]| {
        let staged = dir.join(".saas-stub.wasm.next");
        std::fs::write(&staged, bytes).unwrap();
        std::fs::rename(&staged, dir.join("saas-stub.wasm")).unwrap();
    };
    std::thread::sleep(Duration::from_millis(1200));
    replace(b"\0asm broken");
    std::thread::sleep(Duration::from_millis(2500));
    let listed = server.home.run(&["ext", "list", "--json"]).ok().json();
    let stub_entry = &listed[0];
    assert_eq!(
        stub_entry["status"], "loaded",
        "the old version keeps serving: {listed}"
    );
    assert!(
        stub_entry["reload_error"].as_str().is_some(),
        "the failed reload is reported: {listed}"
    );
    replace(&stub);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for worker in workers {
        for (status, body) in worker.join().unwrap() {
            total += 1;
            assert_eq!(
                status, 204,
                "a request failed during a swap: {status} {body}"
            );
        }
    }
    assert!(total >= 8, "only {total} requests ran during the swaps");
    let listed = server.home.run(&["ext", "list", "--json"]).ok().json();
    assert!(listed[0]["reload_error"].is_null(), "{listed}");
    let (_, _, text) = http("GET", &format!("{}/metrics", server.url), None, None);
    assert!(
        text.as_str()
            .unwrap()
            .contains("sandboxer_extension_reload_failures_total 1"),
        "{text}"
    );
    server.home.run(&["ledger", "verify"]).ok();
}
