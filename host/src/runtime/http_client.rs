//! The `http` capability as guests use it: every outbound `wasi:http`
//! request goes through [`EgressHooks::send_request`], which applies the
//! egress policy (`egress.rs`), puts granted secrets in (`secrets.rs`), and
//! sends the request itself.
//!
//! For each request, in order: the call's request budget; scheme, host and
//! port on the grant; secret references; the name resolved by the host and
//! every address checked; a connection to a checked address (never a second
//! resolution); TLS for `https` (webpki roots); HTTP/1.1. Redirects are
//! answers like any other: the host follows none, so a guest that follows
//! one sends a new request that is checked again. Every step and the
//! response body end by the request's deadline (its own timeout, and the
//! call's deadline less a reserve so the extension can still answer), and
//! the response bodies of one call share a byte budget.

use super::egress::{Destination, EgressPolicy, EgressRefusal, EgressRule};
use super::http_response::{BudgetedBody, ResponseBudget, response_size_refusal};
use super::secrets::Secrets;
use super::sidecar::{HttpScheme, Limits};
use bytes::Bytes;
use http_body_util::BodyExt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiHttpHooks};

/// The most of a call's time kept back from its requests, so an extension
/// whose request ran out of time can still turn that into its answer.
const MAX_DEADLINE_RESERVE: Duration = Duration::from_secs(1);

type WasiBody = http_body_util::combinators::UnsyncBoxBody<Bytes, HttpError>;
type IoFuture = Box<dyn Future<Output = Result<(), HttpError>> + Send>;
type SendFuture =
    Box<dyn Future<Output = Result<(http::Response<WasiBody>, IoFuture), HttpError>> + Send>;

/// What an instance granted `http` may reach and with what.
#[derive(Debug)]
pub struct HttpCapability {
    pub policy: EgressPolicy,
    pub secrets: Secrets,
    pub requests_per_call: u32,
    pub response_bytes: u64,
    pub request_timeout: Duration,
}

impl HttpCapability {
    pub fn new(policy: EgressPolicy, secrets: Secrets, limits: &Limits) -> Self {
        Self {
            policy,
            secrets,
            requests_per_call: limits.http_requests_per_call,
            response_bytes: limits.http_response_bytes(),
            request_timeout: Duration::from_millis(limits.http_timeout_ms),
        }
    }
}

/// What one call's requests share: how many were made, how many response
/// bytes arrived, and when they must all be over.
#[derive(Debug)]
pub(super) struct CallBudget {
    requests: AtomicU32,
    pub(super) response_bytes: AtomicU64,
    deadline: Instant,
    /// What is kept back from the call's deadline.
    reserve: Duration,
}

impl CallBudget {
    fn new(call_timeout: Duration) -> Self {
        let reserve = (call_timeout / 10).min(MAX_DEADLINE_RESERVE);
        Self {
            requests: AtomicU32::new(0),
            response_bytes: AtomicU64::new(0),
            deadline: Instant::now() + call_timeout.saturating_sub(reserve),
            reserve,
        }
    }
}

/// The `wasi:http` hooks of one call's store.
pub struct EgressHooks {
    extension: Arc<str>,
    /// None: the instance is not granted `http` (it could not have loaded
    /// with an import of it); every request is refused all the same.
    capability: Option<Arc<HttpCapability>>,
    budget: Arc<CallBudget>,
}

impl EgressHooks {
    pub fn new(extension: Arc<str>, capability: Option<Arc<HttpCapability>>) -> Self {
        Self {
            extension,
            capability,
            budget: Arc::new(CallBudget::new(Duration::ZERO)),
        }
    }

    /// A new budget for a call that ends `call_timeout` from now.
    pub fn start_call(&mut self, call_timeout: Duration) {
        self.budget = Arc::new(CallBudget::new(call_timeout));
    }
}

/// Logs a refusal in the host's log and turns it into the error the guest
/// sees: an `internal-error` carrying the rule and the reason.
fn refuse(extension: &str, destination: &str, refusal: EgressRefusal) -> HttpError {
    tracing::warn!(
        extension,
        destination,
        rule = refusal.rule.name(),
        "http request refused: {}",
        refusal.detail
    );
    HttpError::InternalError(Some(refusal.to_string()))
}

impl WasiHttpHooks for EgressHooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> SendFuture {
        let extension = self.extension.clone();
        let failed = |error: HttpError| -> SendFuture { Box::new(async move { Err(error) }) };
        let shown_uri = super::error::one_line(&request.uri().to_string(), 300);
        let Some(capability) = self.capability.clone() else {
            return failed(refuse(
                &extension,
                &shown_uri,
                EgressRefusal::new(
                    EgressRule::NotGranted,
                    "the extension has no http grant".to_string(),
                ),
            ));
        };
        // Counted when the guest sends, not when the host gets round to it,
        // so a flood is refused from the first request past the limit.
        let made = self.budget.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if made > capability.requests_per_call {
            let refusal = EgressRefusal::new(
                EgressRule::RequestsPerCall,
                format!(
                    "this call already made {} requests, its limit (limits.http_requests_per_call)",
                    capability.requests_per_call
                ),
            );
            // One line per call in the log, not one per refused request.
            let error = if made == capability.requests_per_call + 1 {
                refuse(&extension, &shown_uri, refusal)
            } else {
                HttpError::InternalError(Some(refusal.to_string()))
            };
            return failed(error);
        }
        let budget = self.budget.clone();
        Box::new(async move { send(extension, capability, budget, request, options).await })
    }
}

fn destination_of(uri: &http::Uri) -> Result<Destination, EgressRefusal> {
    let scheme = match uri.scheme_str() {
        Some("http") => HttpScheme::Http,
        Some("https") => HttpScheme::Https,
        other => {
            return Err(EgressRefusal::new(
                EgressRule::NotGranted,
                format!(
                    "the scheme {:?} is not http or https",
                    other.unwrap_or("(none)")
                ),
            ));
        }
    };
    let host = uri
        .host()
        .filter(|host| !host.is_empty())
        .ok_or_else(|| EgressRefusal::new(EgressRule::NotGranted, "the request names no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let port = uri.port_u16().unwrap_or(match scheme {
        HttpScheme::Http => 80,
        HttpScheme::Https => 443,
    });
    Ok(Destination { scheme, host, port })
}

async fn send(
    extension: Arc<str>,
    capability: Arc<HttpCapability>,
    budget: Arc<CallBudget>,
    mut request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
) -> Result<(http::Response<WasiBody>, IoFuture), HttpError> {
    let shown_uri = super::error::one_line(&request.uri().to_string(), 300);
    let destination =
        destination_of(request.uri()).map_err(|refusal| refuse(&extension, &shown_uri, refusal))?;
    // The guest wrote the host name: what logs and messages show is cut.
    let shown = super::error::one_line(&destination.to_string(), 300);
    let refused = |refusal: EgressRefusal| refuse(&extension, &shown, refusal);
    let grant = capability
        .policy
        .destination(&destination)
        .map_err(refused)?;

    for value in request.headers_mut().values_mut() {
        let Some(name) = Secrets::reference(value.as_bytes()).map(str::to_string) else {
            continue;
        };
        let secret = capability
            .secrets
            .value_for(&name, grant)
            .map_err(refused)?;
        let mut filled = http::HeaderValue::from_str(secret.expose()).map_err(|_| {
            refused(EgressRefusal::new(
                EgressRule::Secret,
                format!("secret `{name}` is not a valid header value"),
            ))
        })?;
        filled.set_sensitive(true);
        *value = filled;
    }

    let request_timeout = capability.request_timeout;
    let deadline = budget.deadline.min(Instant::now() + request_timeout);
    let timed_out = |step: &str| {
        refused(EgressRefusal::new(
            EgressRule::Deadline,
            format!(
                "{step} did not finish by the request's deadline (the extension's own timeout, limits.http_timeout_ms = {}, or the call's deadline less {} ms kept for the extension to answer)",
                request_timeout.as_millis(),
                budget.reserve.as_millis()
            ),
        ))
    };
    let shorter = |from: Option<Duration>| {
        from.map_or(deadline, |timeout| deadline.min(Instant::now() + timeout))
    };
    let connect_deadline = shorter(options.and_then(|options| options.connect_timeout));
    let first_byte_deadline = shorter(options.and_then(|options| options.first_byte_timeout));

    let literal = destination.host.parse::<IpAddr>().ok();
    let resolved: Vec<SocketAddr> = match literal {
        Some(ip) => vec![SocketAddr::new(ip, destination.port)],
        None => tokio::time::timeout_at(
            connect_deadline,
            tokio::net::lookup_host((destination.host.as_str(), destination.port)),
        )
        .await
        .map_err(|_| timed_out("resolving the name"))?
        .map_err(|error| {
            refused(EgressRefusal::new(
                EgressRule::Resolution,
                format!("cannot resolve {}: {error}", destination.host),
            ))
        })?
        .collect(),
    };
    let addresses = EgressPolicy::addresses(grant, &destination, &resolved).map_err(refused)?;

    let mut last_error = None;
    let mut connected = None;
    for address in &addresses {
        match tokio::time::timeout_at(connect_deadline, tokio::net::TcpStream::connect(address))
            .await
        {
            Ok(Ok(stream)) => {
                connected = Some(stream);
                break;
            }
            Ok(Err(error)) => last_error = Some((address, error)),
            Err(_) => return Err(timed_out("connecting")),
        }
    }
    let stream = match (connected, last_error) {
        (Some(stream), _) => stream,
        (None, Some((_, error))) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err(HttpError::ConnectionRefused);
        }
        (None, error) => {
            return Err(HttpError::InternalError(Some(match error {
                Some((address, error)) => format!("cannot connect to {shown} ({address}): {error}"),
                None => format!("cannot connect to {shown}: no address"),
            })));
        }
    };
    let _ = stream.set_nodelay(true);

    let stream: Box<dyn Stream> = match destination.scheme {
        HttpScheme::Http => Box::new(stream),
        HttpScheme::Https => {
            let server_name = match literal {
                Some(ip) => rustls::pki_types::ServerName::IpAddress(ip.into()),
                None => rustls::pki_types::ServerName::try_from(destination.host.clone()).map_err(
                    |error| {
                        HttpError::InternalError(Some(format!(
                            "{} is not a name TLS can verify: {error}",
                            destination.host
                        )))
                    },
                )?,
            };
            let connector = tokio_rustls::TlsConnector::from(tls_config());
            let tls =
                tokio::time::timeout_at(connect_deadline, connector.connect(server_name, stream))
                    .await
                    .map_err(|_| timed_out("the TLS handshake"))?
                    .map_err(|error| {
                        HttpError::InternalError(Some(format!("TLS with {shown} failed: {error}")))
                    })?;
            Box::new(tls)
        }
    };

    let (mut sender, connection) = tokio::time::timeout_at(
        connect_deadline,
        hyper::client::conn::http1::handshake::<_, WasiBody>(TokioIo::new(stream)),
    )
    .await
    .map_err(|_| timed_out("the HTTP handshake"))?
    .map_err(|error| {
        HttpError::InternalError(Some(format!("HTTP with {shown} failed: {error}")))
    })?;
    // The connection is driven on its own task (aborted when the guest drops
    // the response, or the call's store goes) while the request is sent.
    let connection = wasmtime_wasi::runtime::spawn(connection);

    // The request line carries only the path: the host already chose where
    // the request goes.
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |path| path.as_str())
        .to_string();
    *request.uri_mut() = http::Uri::try_from(path)
        .map_err(|error| HttpError::InternalError(Some(format!("invalid path: {error}"))))?;

    let response = tokio::time::timeout_at(first_byte_deadline, sender.send_request(request))
        .await
        .map_err(|_| timed_out("waiting for the response"))?
        .map_err(|error| {
            HttpError::InternalError(Some(format!("the request to {shown} failed: {error}")))
        })?;

    let limit = capability.response_bytes;
    let used = budget.response_bytes.load(Ordering::Relaxed);
    let declared = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if let Some(declared) = declared
        && declared > limit.saturating_sub(used)
    {
        return Err(refused(response_size_refusal(limit, Some(declared))));
    }

    let (head, incoming) = response.into_parts();
    let body = BudgetedBody::new(
        incoming,
        ResponseBudget {
            bytes: budget.clone(),
            limit,
            deadline,
            reserve: budget.reserve,
            request_timeout,
        },
        extension.clone(),
        shown.clone(),
    );
    let io: IoFuture = Box::new(async move {
        match connection.await {
            Ok(()) => Ok(()),
            Err(error) => Err(HttpError::InternalError(Some(error.to_string()))),
        }
    });
    Ok((http::Response::from_parts(head, body.boxed_unsync()), io))
}

trait Stream: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static {}
impl<T> Stream for T where T: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static {}

/// One TLS configuration for the process: webpki's roots, ring's crypto.
fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}
