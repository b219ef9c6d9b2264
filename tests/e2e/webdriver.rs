//! A small W3C WebDriver client over HTTP (ureq), enough to drive a real
//! headless Chromium through Debian's `chromedriver`: navigate, find, type,
//! click, run a script, take a screenshot, read cookies. A crate would do
//! the same over an async stack; this is the few calls the console test
//! needs, on the HTTP client the tests already use.

use base64::Engine;
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The key W3C WebDriver names an element by.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Panics with how to install the browser when it is missing.
pub fn require_chromium() {
    for path in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(path).is_file(),
            "{path} is missing: the console's browser test needs Debian's chromium and \
             chromium-driver (`cargo xtask test` installs them, or `apt-get install chromium \
             chromium-driver`)"
        );
    }
}

/// A running chromedriver with one headless Chromium session; both end on
/// drop.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    agent: ureq::Agent,
    /// Chromium's profile, fresh for this test.
    _profile: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Browser {
    /// Starts chromedriver and a headless Chromium of `width`×`height`.
    pub fn start(width: u32, height: u32) -> Self {
        require_chromium();
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = agent
                .get(&format!("{base}/status"))
                .call()
                .ok()
                .and_then(|response| response.into_body().read_to_string().ok())
                .and_then(|text| serde_json::from_str::<Value>(&text).ok())
                .is_some_and(|status| status["value"]["ready"] == true);
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().unwrap();
        let mut browser = Self {
            driver,
            base,
            session: String::new(),
            agent,
            _profile: profile,
        };
        // These flags keep Chromium off the network it cannot reach here
        // (without them it floods the closed network with background
        // requests) and out of the sandbox a container does not allow.
        let args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let created = browser.call(
            "POST",
            "/session",
            Some(json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            }}})),
        );
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {created}"))
            .to_string();
        browser
    }

    /// One WebDriver command; returns its `value`, panicking on an error.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.try_call(method, path, body)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// One WebDriver command; its `value`, or what went wrong.
    fn try_call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let response = match method {
            "GET" => self.agent.get(&url).call(),
            "DELETE" => self.agent.delete(&url).call(),
            _ => self
                .agent
                .post(&url)
                .header("content-type", "application/json")
                .send(body.unwrap_or_else(|| json!({})).to_string().as_bytes()),
        }
        .map_err(|error| format!("WebDriver {method} {path}: {error}"))?;
        let status = response.status().as_u16();
        let answer: Value = response
            .into_body()
            .read_to_string()
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or(Value::Null);
        if status != 200 {
            return Err(format!(
                "WebDriver {method} {path} answered {status}: {answer}"
            ));
        }
        Ok(answer["value"].clone())
    }

    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    pub fn goto(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({"url": url})));
    }

    pub fn url(&self) -> String {
        self.session_call("GET", "/url", None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The element `css` selects (it must exist).
    pub fn find(&self, css: &str) -> String {
        let found = self.session_call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        found[ELEMENT_KEY]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_string()
    }

    pub fn text(&self, css: &str) -> String {
        let element = self.find(css);
        self.session_call("GET", &format!("/element/{element}/text"), None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css);
        self.session_call(
            "POST",
            &format!("/element/{element}/clear"),
            Some(json!({})),
        );
        self.session_call(
            "POST",
            &format!("/element/{element}/value"),
            Some(json!({"text": text})),
        );
    }

    pub fn click(&self, css: &str) {
        let element = self.find(css);
        self.session_call(
            "POST",
            &format!("/element/{element}/click"),
            Some(json!({})),
        );
    }

    /// Clicks what submits a form or follows a link, and waits until the
    /// next page has loaded (WebDriver's click does not wait for a
    /// navigation it starts).
    pub fn click_and_wait(&self, css: &str) {
        self.script(
            "document.documentElement.dataset.leaving = 'yes';",
            json!([]),
        );
        self.click(css);
        self.wait_for(
            "the next page",
            "return document.readyState === 'complete' \
                 && document.documentElement.dataset.leaving === undefined;",
        );
    }

    /// Runs `script` (a function body; `arguments` are `args`) and returns
    /// what it returns, awaiting a promise.
    pub fn script(&self, script: &str, args: Value) -> Value {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
    }

    /// The text of each cell of each body row of the table `css`.
    pub fn rows(&self, css: &str) -> Vec<Vec<String>> {
        let rows = self.script(
            "return Array.from(document.querySelectorAll(arguments[0] + ' tbody tr'))\
             .filter(row => !row.querySelector('.empty'))\
             .map(row => Array.from(row.cells).map(cell => cell.textContent.trim()));",
            json!([css]),
        );
        serde_json::from_value(rows).unwrap()
    }

    /// The value of `attribute` on every element `css` selects.
    pub fn attributes(&self, css: &str, attribute: &str) -> Vec<String> {
        let values = self.script(
            "return Array.from(document.querySelectorAll(arguments[0]))\
             .map(element => element.getAttribute(arguments[1]));",
            json!([css, attribute]),
        );
        serde_json::from_value(values).unwrap()
    }

    pub fn cookies(&self) -> Vec<Value> {
        serde_json::from_value(self.session_call("GET", "/cookie", None)).unwrap()
    }

    pub fn resize(&self, width: u32, height: u32) {
        self.session_call(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        );
    }

    /// Saves a PNG of the viewport.
    pub fn screenshot(&self, path: &Path) {
        let encoded = self.session_call("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// Waits (bounded) until `script` returns true.
    pub fn wait_for(&self, what: &str, script: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let body = json!({"script": script, "args": []});
        let path = format!("/session/{}/execute/sync", self.session);
        // A script run while the page changes may fail: try again.
        while self.try_call("POST", &path, Some(body.clone())) != Ok(Value::Bool(true)) {
            assert!(Instant::now() < deadline, "gave up waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let url = format!("{}/session/{}", self.base, self.session);
            let _ = self.agent.delete(&url).call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
