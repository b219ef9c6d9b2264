//! `sandboxer-host serve`: one long-running host behind an HTTP API.
//!
//! The server owns the home (it keeps the [`Service`] open) and serves:
//! the E2B-compatible control plane ([`e2b`]), the native API under
//! `/api/v1` ([`native`], [`events`]), the operator console at `/ui/`
//! ([`ui`]), `/openapi.json`, `/metrics` and `/healthz`. In the background
//! it reaps, retries and delivers ([`crate::service::background`]) and
//! reloads the extensions directory ([`reload`]). Every request but
//! `/healthz`, `/metrics`, `/openapi.json` and the console (its own login)
//! needs a key in `X-API-KEY`: a tenant's (its own sandboxes and credits)
//! or the operator's. Handlers only translate: the service decides.

pub mod e2b;
pub mod error;
pub mod events;
pub mod metrics;
pub mod native;
pub mod openapi;
pub mod reload;
pub mod ui;

use crate::manager::Retries;
use crate::service::api::{ExtensionListing, ExtensionReportView};
use crate::service::client::{ServerFile, operator_key_file, server_file};
use crate::service::tenants::{self, OPERATOR_KEY_PREFIX, new_key};
use crate::service::{Caller, Service, ServiceConfig, ServiceError, background};
use axum::Router;
use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use error::ApiError;
use metrics::{Metrics, RequestLabels, RouteLabels};
use reload::Reloader;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    pub service: Arc<Service>,
    pub metrics: Arc<Metrics>,
    pub reloader: Arc<Reloader>,
    /// Turns true when the server stops: long-lived streams end then, so the
    /// graceful shutdown does not wait on them forever.
    pub stopping: watch::Receiver<bool>,
    /// The console's signed-in browsers (see [`ui`]).
    pub console_sessions: Arc<ui::Sessions>,
}

impl AppState {
    /// The extensions serving now, with why a changed file did not load.
    pub fn listings(&self) -> Vec<ExtensionListing> {
        self.service
            .catalog()
            .snapshot()
            .entries
            .iter()
            .map(|entry| {
                let mut listing = ExtensionListing::from(entry);
                listing.reload_error = self.reloader.failure(&entry.name);
                listing
            })
            .collect()
    }

    /// One extension in depth, with why a changed file did not load.
    pub async fn extension_report(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<ExtensionReportView, ServiceError> {
        let mut report = self.service.extension_report(caller, name).await?;
        report.listing.reload_error = self.reloader.failure(name);
        Ok(report)
    }
}

/// The caller a request's `X-API-KEY` names; a missing or unknown key is a
/// 401. Without the header, a GET carrying a live console session cookie is
/// the operator (the console's live pages read the API that way); writes
/// always need the key, so a cookie alone never changes anything.
pub struct Authenticated(pub Caller);

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(key) = parts
            .headers
            .get("x-api-key")
            .and_then(|value| value.to_str().ok())
        else {
            if parts.method == axum::http::Method::GET
                && state.console_sessions.signed_in(&parts.headers)
            {
                return Ok(Self(Caller::Operator));
            }
            return Err(ServiceError::Unauthorized(
                "no API key: send it in the X-API-KEY header".into(),
            )
            .into());
        };
        match state.service.authenticate(key.trim())? {
            Some(caller) => Ok(Self(caller)),
            None => Err(ServiceError::Unauthorized("unknown or revoked API key".into()).into()),
        }
    }
}

/// Every route, with its state.
pub fn router(state: AppState) -> Router {
    Router::new()
        // E2B-compatible control plane.
        .route("/sandboxes", post(e2b::create).get(e2b::list_v1))
        .route("/v2/sandboxes", post(e2b::create).get(e2b::list))
        .route(
            "/sandboxes/{sandboxID}",
            get(e2b::get_info).delete(e2b::kill),
        )
        .route("/sandboxes/{sandboxID}/timeout", post(e2b::set_timeout))
        .route("/sandboxes/{sandboxID}/connect", post(e2b::connect))
        .route("/v2/sandboxes/{sandboxID}/connect", post(e2b::connect))
        // Native API.
        .route(
            "/api/v1/sandboxes",
            post(native::create_sandbox).get(native::list_sandboxes),
        )
        .route(
            "/api/v1/sandboxes/{id}",
            get(native::show_sandbox).delete(native::destroy_sandbox),
        )
        .route("/api/v1/sandboxes/{id}/timeout", post(native::set_timeout))
        .route(
            "/api/v1/credits/{tenant}",
            get(native::credits).post(native::add_credits),
        )
        .route("/api/v1/credits/{tenant}/history", get(native::history))
        .route("/api/v1/ledger/verify", get(native::verify))
        .route("/api/v1/extensions", get(native::extensions))
        .route("/api/v1/route/{profile}", get(native::route_explain))
        .route(
            "/api/v1/tenants",
            post(native::create_tenant).get(native::list_tenants),
        )
        .route(
            "/api/v1/tenants/{name}",
            axum::routing::delete(native::revoke_tenant),
        )
        .route("/api/v1/reload", post(native::reload))
        .route("/api/v1/credits", get(native::all_credits))
        .route("/api/v1/credits/{tenant}/spend", get(native::spend))
        .route("/api/v1/profiles", get(native::profiles))
        .route("/api/v1/extensions/{name}", get(native::extension_report))
        .route("/api/v1/events", get(events::stream))
        .route("/openapi.json", get(openapi_json))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .merge(ui::routes())
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_request,
        ))
        .with_state(state)
}

async fn openapi_json() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi::document(),
    )
        .into_response()
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    let service = state.service.clone();
    let metrics = state.metrics.clone();
    let text = tokio::task::spawn_blocking(move || metrics.render(&service))
        .await
        .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn healthz() -> Response {
    axum::Json(serde_json::json!({"ok": true})).into_response()
}

/// Counts each request by route pattern and status, and times it.
async fn count_request(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |path| path.as_str().to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            method: method.clone(),
            route: route.clone(),
            status: response.status().as_u16(),
        })
        .inc();
    state
        .metrics
        .latency
        .get_or_create(&RouteLabels { method, route })
        .observe(started.elapsed().as_secs_f64());
    response
}

/// How `serve` was asked to run.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// `host:port` to listen on (`127.0.0.1:0` picks a free port).
    pub listen: String,
    /// A file holding the operator key, instead of SANDBOXER_OPERATOR_KEY or
    /// `<home>/operator.key`.
    pub operator_key_file: Option<PathBuf>,
}

/// The operator key this server accepts: SANDBOXER_OPERATOR_KEY, else the
/// given file, else `<home>/operator.key` (made, mode 0600, when missing).
fn operator_key(config: &ServiceConfig, options: &ServeOptions) -> Result<String, ServiceError> {
    if let Ok(key) = std::env::var("SANDBOXER_OPERATOR_KEY")
        && !key.trim().is_empty()
    {
        return Ok(key.trim().to_string());
    }
    let read = |path: &std::path::Path| -> Result<Option<String>, ServiceError> {
        match std::fs::read_to_string(path) {
            Ok(text) if !text.trim().is_empty() => Ok(Some(text.trim().to_string())),
            Ok(_) => Err(ServiceError::InvalidInput(format!(
                "{} is empty: it should hold the operator key",
                path.display()
            ))),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(ServiceError::Internal(format!(
                "cannot read {}: {error}",
                path.display()
            ))),
        }
    };
    if let Some(path) = &options.operator_key_file {
        return read(path)?.ok_or_else(|| {
            ServiceError::InvalidInput(format!("no operator key file at {}", path.display()))
        });
    }
    let path = operator_key_file(&config.paths);
    if let Some(key) = read(&path)? {
        return Ok(key);
    }
    let key = new_key(OPERATOR_KEY_PREFIX);
    write_private(&path, &format!("{key}\n"))?;
    Ok(key)
}

/// Writes a file only its owner can read.
fn write_private(path: &std::path::Path, text: &str) -> Result<(), ServiceError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()).map(|()| file));
    match &mut file {
        Ok(file) => file
            .sync_all()
            .map_err(|error| ServiceError::Internal(format!("{}: {error}", path.display()))),
        Err(error) => Err(ServiceError::Internal(format!(
            "cannot write {}: {error}",
            path.display()
        ))),
    }
}

/// Runs the server until SIGTERM or SIGINT: then it stops accepting,
/// finishes the requests in flight, delivers events and returns. `say` gets
/// the lines an operator should see (where it listens, where the key is).
pub async fn serve(
    config: ServiceConfig,
    options: ServeOptions,
    say: impl Fn(&str),
) -> Result<(), ServiceError> {
    let listener = tokio::net::TcpListener::bind(&options.listen)
        .await
        .map_err(|error| {
            ServiceError::InvalidInput(format!("cannot listen on {}: {error}", options.listen))
        })?;
    let address = listener
        .local_addr()
        .map_err(|error| ServiceError::Internal(error.to_string()))?;
    let reloader = Arc::new(Reloader::default());
    reloader
        .remember_current(&config.paths.extensions_dir)
        .await;
    let service = Arc::new(Service::open(config.clone()).await?);
    // The extensions now, so the first request does not pay for loading.
    if let Err(error) = service.extensions().await {
        say(&format!("warning: {error}"));
    }
    match service.reconcile(Retries::Due).await {
        Ok(report) => {
            for action in &report.actions {
                say(&format!("reconciled {action}"));
            }
        }
        Err(error) => say(&format!("warning: reconcile failed: {error}")),
    }
    let key = operator_key(&config, &options)?;
    tenants::add_operator_key(service.state(), &key, crate::manager::now_ms())
        .await
        .map_err(|error| ServiceError::Internal(error.to_string()))?;
    let url = format!("http://{address}");
    let file = ServerFile {
        url: url.clone(),
        pid: std::process::id(),
        started_at: crate::ledger::rfc3339_millis(crate::manager::now_ms()),
    };
    let server_json = server_file(&config.paths);
    std::fs::write(
        &server_json,
        serde_json::to_string_pretty(&file).unwrap_or_default(),
    )
    .map_err(|error| {
        ServiceError::Internal(format!("cannot write {}: {error}", server_json.display()))
    })?;
    say(&format!("serving {} on {url}", config.paths.home.display()));
    if options.operator_key_file.is_none() && std::env::var_os("SANDBOXER_OPERATOR_KEY").is_none() {
        say(&format!(
            "operator key in {}",
            operator_key_file(&config.paths).display()
        ));
    }

    let metrics = Arc::new(Metrics::default());
    let (stop, stopped) = watch::channel(false);
    let state = AppState {
        service: service.clone(),
        metrics: metrics.clone(),
        reloader: reloader.clone(),
        stopping: stopped.clone(),
        console_sessions: Arc::default(),
    };
    let upkeep = tokio::spawn(background::run(service.clone(), stopped.clone()));
    let watcher = tokio::spawn(reload::watch(
        reloader,
        service.clone(),
        metrics,
        stopped.clone(),
    ));
    let stop = Arc::new(stop);
    let stop_on_signal = stop.clone();
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            // Ends the event streams, so in-flight requests can finish.
            let _ = stop_on_signal.send(true);
        })
        .await;
    let _ = stop.send(true);
    let _ = upkeep.await;
    let _ = watcher.await;
    let _ = std::fs::remove_file(&server_json);
    if let Ok(service) = Arc::try_unwrap(service)
        && let Some(warning) = service.close().await
    {
        say(&format!("warning: {warning}"));
    }
    say("stopped");
    served.map_err(|error| ServiceError::Internal(format!("the server failed: {error}")))
}

/// SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
