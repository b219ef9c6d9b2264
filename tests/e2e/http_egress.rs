//! The `http` capability under attack: a component (`tests/fixtures/http-prober`)
//! that tries what the egress policy must refuse, against local test servers.
//! Each refusal must come back to the extension naming its rule, and the call
//! must end by its deadline with that refusal as its answer.

use crate::support::{TestHome, built_fixtures, install, spec};
use sandboxer_host::runtime::{CallError, ExtError, Extension};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a [`TestServer`] saw and sent.
#[derive(Default)]
pub struct ServerLog {
    pub requests: AtomicUsize,
    pub body_bytes_sent: AtomicU64,
    /// The `X-API-KEY` header of each request that had one.
    pub api_keys: Mutex<Vec<String>>,
    stop: AtomicBool,
}

/// An HTTP/1.1 server on 127.0.0.1 whose answer depends on the path:
/// `/ok` says hello, `/redirect` redirects to a host nobody granted,
/// `/zeros` streams a gigabyte of zeros without a length, `/zeros-declared`
/// declares the gigabyte, `/slow` sends its headers and then nothing.
pub struct TestServer {
    pub port: u16,
    pub log: Arc<ServerLog>,
}

impl TestServer {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(ServerLog::default());
        let server_log = log.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let log = server_log.clone();
                std::thread::spawn(move || serve_connection(stream, &log));
            }
        });
        Self { port, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.log.stop.store(true, Ordering::Relaxed);
    }
}

const GIGABYTE: u64 = 1 << 30;

fn serve_connection(stream: TcpStream, log: &ServerLog) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .to_string();
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    content_length = value.parse().unwrap_or(0);
                }
                if name.eq_ignore_ascii_case("x-api-key") {
                    log.api_keys.lock().unwrap().push(value.to_string());
                }
            }
        }
        let mut body = vec![0; content_length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        log.requests.fetch_add(1, Ordering::Relaxed);
        let answered = match path.as_str() {
            "/redirect" => writer.write_all(
                b"HTTP/1.1 302 Found\r\nLocation: http://not-granted.example/\r\nContent-Length: 0\r\n\r\n",
            ),
            "/zeros" | "/zeros-declared" => {
                let head = if path == "/zeros" {
                    "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_string()
                } else {
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {GIGABYTE}\r\n\r\n")
                };
                let _ = writer.write_all(head.as_bytes());
                let chunk = vec![0u8; 64 * 1024];
                let mut sent = 0;
                while sent < GIGABYTE && !log.stop.load(Ordering::Relaxed) {
                    if writer.write_all(&chunk).is_err() {
                        break;
                    }
                    sent += chunk.len() as u64;
                    log.body_bytes_sent
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
                return;
            }
            "/slow" => {
                let _ = writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n");
                // Headers, then nothing: hold the connection until the
                // client gives up (a read sees it close) or the test ends.
                let _ = writer.set_read_timeout(Some(Duration::from_millis(100)));
                let mut byte = [0u8; 1];
                while !log.stop.load(Ordering::Relaxed) {
                    match reader.read(&mut byte) {
                        Ok(0) => return,
                        Ok(_) => {}
                        Err(error)
                            if matches!(
                                error.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => return,
                    }
                }
                return;
            }
            _ => writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
        };
        if answered.is_err() {
            return;
        }
    }
}

/// Installs the prober as `name` with `sidecar` and loads it.
pub async fn load_prober(
    home: &TestHome,
    name: &str,
    sidecar: &str,
) -> Result<Arc<Extension>, String> {
    install(&built_fixtures(), "http-prober", &home.extensions(), name);
    std::fs::write(home.extensions().join(format!("{name}.toml")), sidecar).unwrap();
    let set = home.runtime().load_dir(&home.extensions()).await.unwrap();
    set.entry(name).unwrap().status.clone()
}

/// The prober's create: the handle it answered, or its error.
async fn probe(extension: &Extension) -> Result<String, CallError> {
    extension
        .create(&spec("sbx-probe"))
        .await
        .map(|handle| handle.backend_ref)
}

/// The message of the `unavailable` the prober answers with.
fn refusal(outcome: Result<String, CallError>) -> String {
    match outcome {
        Err(CallError::Backend {
            error: ExtError::Unavailable(message),
            ..
        }) => message,
        other => panic!("expected the prober to answer unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn a_component_importing_wasi_http_needs_the_grant() {
    let home = TestHome::new();
    let reason = load_prober(&home, "no-grant", "[config]\nmode = \"get\"\n")
        .await
        .unwrap_err();
    assert!(
        reason.contains("wasi:http/")
            && reason.contains("not granted")
            && reason.contains("http = [\"host:port\"]"),
        "{reason}"
    );
    assert!(!reason.contains('\n'), "one line: {reason}");
}

#[tokio::test]
async fn granted_destinations_answer_and_others_are_refused_by_rule() {
    let server = TestServer::start();
    let home = TestHome::new();
    let granted = load_prober(
        &home,
        "granted",
        &format!(
            "[grants]\nhttp = [\"127.0.0.1:{}\"]\n[config]\ntarget = \"{}\"\n",
            server.port,
            server.url("/ok")
        ),
    )
    .await
    .unwrap();
    assert_eq!(probe(&granted).await.unwrap(), "status 200, 5 bytes");

    let other = TestServer::start();
    let elsewhere = load_prober(
        &home,
        "elsewhere",
        &format!(
            "[grants]\nhttp = [\"127.0.0.1:{}\"]\n[config]\ntarget = \"{}\"\n",
            server.port,
            other.url("/ok")
        ),
    )
    .await
    .unwrap();
    let message = refusal(probe(&elsewhere).await);
    assert!(
        message.contains("refused by the host's egress policy (not-granted)")
            && message.contains(&format!(
                "http://127.0.0.1:{} is not in the extension's http grant",
                other.port
            )),
        "{message}"
    );
    assert_eq!(
        other.log.requests.load(Ordering::Relaxed),
        0,
        "nothing reached it"
    );
}

#[tokio::test]
async fn a_granted_name_that_resolves_to_loopback_is_refused() {
    let server = TestServer::start();
    let home = TestHome::new();
    // `localhost` is granted by name: only a grant of the literal address
    // may reach loopback.
    let prober = load_prober(
        &home,
        "by-name",
        &format!(
            "[grants]\nhttp = [\"localhost:{port}\"]\n[config]\ntarget = \"http://localhost:{port}/ok\"\n",
            port = server.port
        ),
    )
    .await
    .unwrap();
    let message = refusal(probe(&prober).await);
    assert!(
        message.contains("(private-address)")
            && message.contains("localhost resolves to")
            && message.contains("a loopback address")
            && message.contains("only a grant naming that address literally reaches it"),
        "{message}"
    );
    assert_eq!(server.log.requests.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn redirects_are_not_followed_and_a_followed_one_is_checked_again() {
    let server = TestServer::start();
    let home = TestHome::new();
    let prober = load_prober(
        &home,
        "redirected",
        &format!(
            "[grants]\nhttp = [\"127.0.0.1:{}\"]\n[config]\nmode = \"follow-redirect\"\ntarget = \"{}\"\n",
            server.port,
            server.url("/redirect")
        ),
    )
    .await
    .unwrap();
    let message = refusal(probe(&prober).await);
    assert!(
        message.starts_with("following http://not-granted.example/:")
            && message.contains("(not-granted)")
            && message
                .contains("http://not-granted.example:80 is not in the extension's http grant"),
        "{message}"
    );
    assert_eq!(
        server.log.requests.load(Ordering::Relaxed),
        1,
        "the host sent the first request once and followed nothing itself"
    );
}

#[tokio::test]
async fn a_gigabyte_answer_is_cut_off_at_the_response_budget() {
    let server = TestServer::start();
    let home = TestHome::new();
    for (name, path) in [("streamed", "/zeros"), ("declared", "/zeros-declared")] {
        let prober = load_prober(
            &home,
            name,
            &format!(
                "[limits]\nmemory_mb = 64\nhttp_response_mb = 4\n[grants]\nhttp = [\"127.0.0.1:{}\"]\n[config]\ntarget = \"{}\"\n",
                server.port,
                server.url(path)
            ),
        )
        .await
        .unwrap();
        let message = refusal(probe(&prober).await);
        assert!(
            message.contains("(response-size)") && message.contains("4 MiB"),
            "{name}: {message}"
        );
    }
    // The server could push only what the socket buffers took past the cut.
    let sent = server.log.body_bytes_sent.load(Ordering::Relaxed);
    assert!(
        sent < GIGABYTE / 8,
        "the host read {sent} bytes of the gigabyte"
    );
}

#[tokio::test]
async fn a_server_that_sends_headers_then_nothing_ends_by_the_calls_deadline() {
    let server = TestServer::start();
    let home = TestHome::new();
    let prober = load_prober(
        &home,
        "slow-loris",
        &format!(
            "[limits]\ntimeout_ms = 1500\n[grants]\nhttp = [\"127.0.0.1:{}\"]\n[config]\ntarget = \"{}\"\n",
            server.port,
            server.url("/slow")
        ),
    )
    .await
    .unwrap();
    // Not a host timeout of the whole call: the request ended first, inside
    // the call's deadline, and the extension answered with the reason.
    let message = refusal(probe(&prober).await);
    assert!(
        message.contains("(deadline)")
            && message.contains("the response body did not finish by the request's deadline")
            && message.contains("less 150 ms kept for the extension"),
        "{message}"
    );
}

#[tokio::test]
async fn ten_thousand_requests_in_one_call_stop_at_the_request_budget() {
    let server = TestServer::start();
    let home = TestHome::new();
    let prober = load_prober(
        &home,
        "flood",
        &format!(
            "[grants]\nhttp = [\"127.0.0.1:{}\"]\n[config]\nmode = \"flood\"\ntarget = \"{}\"\n",
            server.port,
            server.url("/ok")
        ),
    )
    .await
    .unwrap();
    let message = refusal(probe(&prober).await);
    assert!(
        message.starts_with("100 of 10000 requests answered; first refusal:")
            && message.contains("(requests-per-call)")
            && message.contains("this call already made 100 requests"),
        "{message}"
    );
    assert_eq!(server.log.requests.load(Ordering::Relaxed), 100);
    // The budget is per call: the next call may send again.
    let again = refusal(probe(&prober).await);
    assert!(again.starts_with("100 of 10000"), "{again}");
}

/// Collects the host's log lines (this thread's) while it lives.
pub struct CapturedLog {
    lines: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl CapturedLog {
    pub fn start() -> Self {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let writer_lines = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || SharedWriter(writer_lines.clone()))
            .finish();
        Self {
            lines,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.lines.lock().unwrap()).into_owned()
    }
}

struct SharedWriter(Arc<Mutex<Vec<u8>>>);

impl Write for SharedWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn refusals_are_logged_with_extension_destination_and_rule() {
    let server = TestServer::start();
    let home = TestHome::new();
    let prober = load_prober(
        &home,
        "logged",
        &format!(
            "[grants]\nhttp = [\"127.0.0.1:{}\"]\n[config]\ntarget = \"http://127.0.0.1:9/\"\n",
            server.port
        ),
    )
    .await
    .unwrap();
    let log = CapturedLog::start();
    refusal(probe(&prober).await);
    let text = log.text();
    assert!(
        text.contains("WARN")
            && text.contains("extension=\"logged\"")
            && text.contains("destination=\"http://127.0.0.1:9\"")
            && text.contains("rule=\"not-granted\""),
        "{text}"
    );
}

#[tokio::test]
async fn secrets_reach_only_their_destination_and_nothing_the_host_keeps() {
    const SECRET: &str = "e2b_5ec7e7000000000000000000000000000000abcd";
    let server = TestServer::start();
    let other = TestServer::start();
    let home = TestHome::new();
    let key_file = home.path().join("api-key");
    std::fs::write(&key_file, format!("{SECRET}\n")).unwrap();
    let sidecar = |target: &str| {
        format!(
            "[grants]\nhttp = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n[secrets]\napi_key = {{ file = \"{}\", hosts = [\"127.0.0.1:{}\"] }}\n[config]\nmode = \"secret\"\ntarget = \"{target}\"\n",
            server.port,
            other.port,
            key_file.display(),
            server.port
        )
    };
    let log = CapturedLog::start();
    let prober = load_prober(&home, "keyed", &sidecar(&server.url("/ok")))
        .await
        .unwrap();
    let answer = probe(&prober).await.unwrap();
    assert_eq!(answer, "status 200, 5 bytes: hello");
    assert_eq!(*server.log.api_keys.lock().unwrap(), [SECRET]);

    // Not granted to the other destination: refused, without the value.
    let elsewhere = load_prober(&home, "keyed-elsewhere", &sidecar(&other.url("/ok")))
        .await
        .unwrap();
    let message = refusal(probe(&elsewhere).await);
    assert!(
        message.contains("(secret)")
            && message.contains(&format!(
                "secret `api_key` is not granted to 127.0.0.1:{}",
                other.port
            )),
        "{message}"
    );
    assert_eq!(other.log.requests.load(Ordering::Relaxed), 0);

    // What `ext info --json` shows of it: where it comes from, not what it is.
    let shown = serde_json::to_string(&prober.grants).unwrap();
    assert!(
        shown.contains("api-key") && shown.contains("\"secrets\""),
        "{shown}"
    );
    let state = std::fs::read(home.path().join("state.redb")).unwrap_or_default();
    for (place, text) in [
        ("the log", log.text()),
        ("the grants shown", shown),
        ("the refusal", message),
        ("the answer", answer),
        ("the extension's Debug", format!("{prober:?}")),
        (
            "the state store",
            String::from_utf8_lossy(&state).into_owned(),
        ),
    ] {
        assert!(!text.contains(SECRET), "the secret is in {place}: {text}");
    }
}

/// An HTTPS server on 127.0.0.1 with a self-signed certificate (made with
/// `openssl` in `dir`): no root the host trusts signed it.
struct SelfSignedServer {
    child: std::process::Child,
    port: u16,
}

impl SelfSignedServer {
    fn start(dir: &std::path::Path) -> Self {
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let made = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl makes a certificate");
        assert!(made.success());
        let script = "import http.server, ssl, sys\n\
            server = http.server.HTTPServer(('127.0.0.1', 0), http.server.BaseHTTPRequestHandler)\n\
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
            context.load_cert_chain(sys.argv[1], sys.argv[2])\n\
            server.socket = context.wrap_socket(server.socket, server_side=True)\n\
            print(server.server_address[1], flush=True)\n\
            server.serve_forever()\n";
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(&cert)
            .arg(&key)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 serves TLS");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().unwrap();
        Self { child, port }
    }
}

impl Drop for SelfSignedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn https_verifies_the_servers_certificate() {
    let home = TestHome::new();
    let server = SelfSignedServer::start(home.path());
    let prober = load_prober(
        &home,
        "tls",
        &format!(
            "[grants]\nhttp = [\"https://127.0.0.1:{port}\"]\n[config]\ntarget = \"https://127.0.0.1:{port}/\"\n",
            port = server.port
        ),
    )
    .await
    .unwrap();
    let message = refusal(probe(&prober).await);
    assert!(
        message.contains(&format!(
            "TLS with https://127.0.0.1:{} failed",
            server.port
        )) && message.contains("invalid peer certificate"),
        "{message}"
    );
}
