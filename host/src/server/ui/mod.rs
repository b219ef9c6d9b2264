//! The operator console at `/ui/`: server-rendered pages over the service's
//! operations and answer types (the ones the native API serves), so it adds
//! no logic of its own. It owns only what a browser needs on top: the login
//! that trades the operator key for a session cookie, the session table, the
//! CSRF token of its one form that changes anything (adding credits), and
//! the embedded stylesheet and script. The script only refreshes what is
//! live (route explain, the event stream) by reading the native API with
//! the session cookie, which [`super::Authenticated`] accepts for GETs.
//!
//! The key never travels in a URL and is never logged: it is posted once,
//! checked, and forgotten; the browser holds a random session id in an
//! HttpOnly, SameSite=Strict cookie, valid for [`SESSION_TTL_MS`].

mod html;

use super::AppState;
use crate::manager::now_ms;
use crate::service::api::*;
use crate::service::{Caller, ServiceError};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use html::{esc, facts, notice, or_dash, page, table, url_part};
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Mutex;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "sandboxer_console";
/// How long a login lasts.
pub const SESSION_TTL_MS: u64 = 8 * 60 * 60 * 1000;
/// The most sandboxes one page lists (the newest).
const MAX_ROWS: usize = 500;
/// The journal entries a tenant's page shows.
const HISTORY_ROWS: usize = 50;

/// One signed-in browser.
#[derive(Debug, Clone)]
struct Session {
    /// The token every form of this session carries.
    csrf: String,
    expires_at_ms: u64,
}

/// The signed-in browsers, in memory: a restart signs everyone out.
#[derive(Debug, Default)]
pub struct Sessions {
    /// session id -> session.
    table: Mutex<HashMap<String, Session>>,
}

fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Compares secrets without stopping at the first difference.
fn same_secret(left: &str, right: &str) -> bool {
    left.len() == right.len()
        && left
            .bytes()
            .zip(right.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

impl Sessions {
    fn open(&self) -> (String, Session) {
        let now = now_ms();
        let id = random_token();
        let session = Session {
            csrf: random_token(),
            expires_at_ms: now + SESSION_TTL_MS,
        };
        let mut table = self
            .table
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        table.retain(|_, session| session.expires_at_ms > now);
        table.insert(id.clone(), session.clone());
        (id, session)
    }

    fn find(&self, headers: &HeaderMap) -> Option<(String, Session)> {
        let id = cookie(headers, SESSION_COOKIE)?;
        let table = self
            .table
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        table
            .get(id)
            .filter(|session| session.expires_at_ms > now_ms())
            .map(|session| (id.to_string(), session.clone()))
    }

    /// Whether the request carries a live session cookie.
    pub fn signed_in(&self, headers: &HeaderMap) -> bool {
        self.find(headers).is_some()
    }

    fn close(&self, id: &str) {
        let mut table = self
            .table
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        table.remove(id);
    }
}

/// The console's routes (merged into the server's router).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(to_console))
        .route("/ui/", get(to_console))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/sandboxes", get(sandboxes_page))
        .route("/ui/sandboxes/{id}", get(sandbox_page))
        .route("/ui/tenants", get(tenants_page))
        .route("/ui/tenants/{name}", get(tenant_page))
        .route("/ui/tenants/{name}/credits", post(add_credits))
        .route("/ui/extensions", get(extensions_page))
        .route("/ui/extensions/{name}", get(extension_page))
        .route("/ui/routing", get(routing_page))
        .route("/ui/events", get(events_page))
        .route("/ui/assets/console.css", get(stylesheet))
        .route("/ui/assets/console.js", get(script))
}

/// An HTML answer that no cache keeps and no other site frames.
fn html_response(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'; form-action 'self'"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

fn status_of(error: &ServiceError) -> StatusCode {
    StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// A page whose service call failed: the one-line reason, in the frame.
fn error_page(title: &str, active: &str, csrf: &str, error: &ServiceError) -> Response {
    html_response(
        status_of(error),
        page(
            title,
            active,
            Some(csrf),
            &notice("error", &error.to_string()),
        ),
    )
}

/// The session of a page request, or the way to the login form.
#[allow(clippy::result_large_err)]
fn signed_in(state: &AppState, headers: &HeaderMap) -> Result<Session, Response> {
    state
        .console_sessions
        .find(headers)
        .map(|(_, session)| session)
        .ok_or_else(|| Redirect::to("/ui/login").into_response())
}

async fn to_console(State(state): State<AppState>, headers: HeaderMap) -> Redirect {
    if state.console_sessions.signed_in(&headers) {
        Redirect::to("/ui/sandboxes")
    } else {
        Redirect::to("/ui/login")
    }
}

// ---- login ----

fn login_form(status: StatusCode, message: Option<&str>) -> Response {
    let mut body = String::new();
    if let Some(message) = message {
        body.push_str(&notice("error", message));
    }
    body.push_str(
        "<form method=\"post\" action=\"/ui/login\" class=\"login\">\
         <label for=\"key\">Operator key</label>\
         <input type=\"password\" id=\"key\" name=\"key\" required autocomplete=\"current-password\" autofocus>\
         <button type=\"submit\" id=\"login\">Log in</button>\
         <p class=\"hint\">The key is in <code>&lt;home&gt;/operator.key</code> (or \
         <code>SANDBOXER_OPERATOR_KEY</code>). It is checked once and never kept by the \
         browser: you get a session cookie instead.</p></form>",
    );
    html_response(status, page("Log in", "", None, &body))
}

async fn login_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if state.console_sessions.signed_in(&headers) {
        return Redirect::to("/ui/sandboxes").into_response();
    }
    login_form(StatusCode::OK, None)
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    key: String,
}

async fn login(State(state): State<AppState>, body: Bytes) -> Response {
    let key = serde_urlencoded::from_bytes::<LoginForm>(&body)
        .map(|form| form.key.trim().to_string())
        .unwrap_or_default();
    if key.is_empty() {
        return login_form(StatusCode::UNAUTHORIZED, Some("Enter the operator key."));
    }
    let message = match state.service.authenticate(&key) {
        Ok(Some(Caller::Operator)) => {
            let (id, _) = state.console_sessions.open();
            let cookie = format!(
                "{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
                SESSION_TTL_MS / 1000
            );
            let mut response = Redirect::to("/ui/sandboxes").into_response();
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            return response;
        }
        Ok(Some(Caller::Tenant(_))) => {
            "That is a tenant's key: the console needs the operator key.".to_string()
        }
        Ok(None) => "Wrong key: that is not the operator key (or it was revoked).".to_string(),
        Err(error) => format!("The key could not be checked: {error}"),
    };
    login_form(StatusCode::UNAUTHORIZED, Some(&message))
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let form = serde_urlencoded::from_bytes::<CsrfForm>(&body).ok();
    if let (Some((id, session)), Some(form)) = (state.console_sessions.find(&headers), form)
        && same_secret(&session.csrf, &form.csrf)
    {
        state.console_sessions.close(&id);
    }
    let mut response = Redirect::to("/ui/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "sandboxer_console=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    response
}

// ---- sandboxes ----

#[derive(Debug, Default, Deserialize)]
struct SandboxFilter {
    tenant: Option<String>,
    state: Option<String>,
    extension: Option<String>,
    /// `1`: live sandboxes only (the default lists every record).
    live: Option<String>,
}

const STATES: [&str; 7] = [
    "requested",
    "provisioning",
    "ready",
    "destroying",
    "destroyed",
    "failed",
    "expired",
];

fn select(id: &str, label: &str, options: &[String], chosen: Option<&str>) -> String {
    let mut html = format!(
        "<div class=\"field\"><label for=\"{id}\">{}</label><select id=\"{id}\" name=\"{id}\">\
         <option value=\"\">any</option>",
        esc(label)
    );
    for option in options {
        let selected = if Some(option.as_str()) == chosen {
            " selected"
        } else {
            ""
        };
        let _ = write!(
            html,
            "<option value=\"{0}\"{selected}>{0}</option>",
            esc(option)
        );
    }
    html.push_str("</select></div>");
    html
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|value| !value.is_empty())
}

async fn sandboxes_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(filter): Query<SandboxFilter>,
) -> Response {
    let session = match signed_in(&state, &headers) {
        Ok(session) => session,
        Err(login) => return login,
    };
    let title = "Sandboxes";
    let live_only = filter.live.as_deref() == Some("1");
    let query = SandboxQuery {
        all: !live_only,
        tenant: non_empty(filter.tenant),
        state: non_empty(filter.state),
        extension: non_empty(filter.extension),
    };
    let records = match state.service.list_sandboxes(&Caller::Operator, &query) {
        Ok(records) => records,
        Err(error) => return error_page(title, "/ui/sandboxes", &session.csrf, &error),
    };
    let tenants: Vec<String> = match state.service.all_credits(&Caller::Operator).await {
        Ok(credits) => credits.into_iter().map(|view| view.tenant).collect(),
        Err(error) => return error_page(title, "/ui/sandboxes", &session.csrf, &error),
    };
    let extensions: Vec<String> = state
        .listings()
        .into_iter()
        .map(|listing| listing.name)
        .collect();
    let states: Vec<String> = STATES.iter().map(|state| state.to_string()).collect();
    let mut body = String::from(
        "<form method=\"get\" action=\"/ui/sandboxes\" class=\"filters\" aria-label=\"Filter sandboxes\">",
    );
    body.push_str(&select(
        "tenant",
        "Tenant",
        &tenants,
        query.tenant.as_deref(),
    ));
    body.push_str(&select("state", "State", &states, query.state.as_deref()));
    body.push_str(&select(
        "extension",
        "Extension",
        &extensions,
        query.extension.as_deref(),
    ));
    let _ = write!(
        body,
        "<div class=\"field check\"><input type=\"checkbox\" id=\"live\" name=\"live\" value=\"1\"{}>\
         <label for=\"live\">Live only</label></div><button type=\"submit\" id=\"filter\">Filter</button></form>",
        if live_only { " checked" } else { "" }
    );
    let total = records.len();
    let rows: Vec<Vec<String>> = records
        .iter()
        .rev()
        .take(MAX_ROWS)
        .map(|record| {
            let view = SandboxView::from(record);
            vec![
                format!(
                    "<a href=\"/ui/sandboxes/{}\">{}</a>",
                    url_part(&view.id),
                    esc(&view.id)
                ),
                format!("<span class=\"state {0}\">{0}</span>", esc(&view.state)),
                esc(&view.tenant),
                esc(&view.profile),
                or_dash(view.extension.as_deref()),
                esc(&view.created_at),
                or_dash(view.meter.estimate.as_deref()),
                or_dash(view.meter.actual.as_deref()),
                or_dash(view.meter.drift.as_deref()),
            ]
        })
        .collect();
    let caption = if total > MAX_ROWS {
        format!("The newest {MAX_ROWS} of {total} sandboxes")
    } else {
        format!("{total} sandboxes, newest first")
    };
    body.push_str(&table(
        "sandboxes",
        &caption,
        &[
            "Sandbox",
            "State",
            "Tenant",
            "Profile",
            "Extension",
            "Created",
            "Estimate",
            "Actual",
            "Drift",
        ],
        &rows,
    ));
    html_response(
        StatusCode::OK,
        page(title, "/ui/sandboxes", Some(&session.csrf), &body),
    )
}

fn json_block(value: &impl serde::Serialize) -> String {
    format!(
        "<pre>{}</pre>",
        esc(&serde_json::to_string_pretty(value).unwrap_or_default())
    )
}

async fn sandbox_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let session = match signed_in(&state, &headers) {
        Ok(session) => session,
        Err(login) => return login,
    };
    let title = format!("Sandbox {id}");
    let view = match state.service.show_sandbox(&Caller::Operator, &id) {
        Ok(view) => view,
        Err(error) => return error_page(&title, "/ui/sandboxes", &session.csrf, &error),
    };
    let mut body = String::from("<p><a href=\"/ui/sandboxes\">← All sandboxes</a></p>");
    body.push_str(&facts(&[
        (
            "State",
            format!("<span class=\"state {0}\">{0}</span>", esc(&view.state)),
        ),
        (
            "Tenant",
            format!(
                "<a href=\"/ui/tenants/{}\">{}</a>",
                url_part(&view.tenant),
                esc(&view.tenant)
            ),
        ),
        ("Profile", esc(&view.profile)),
        ("Extension", or_dash(view.extension.as_deref())),
        ("Kind", or_dash(view.kind.as_deref())),
        ("Created", esc(&view.created_at)),
        ("Ready", or_dash(view.ready_at.as_deref())),
        ("Expires", or_dash(view.expires_at.as_deref())),
        ("Finished", or_dash(view.finished_at.as_deref())),
        ("Note", or_dash(view.note.as_deref())),
        ("Destroy failures", view.destroy_failures.to_string()),
    ]));
    let meter = &view.meter;
    body.push_str("<h2>Meter</h2>");
    body.push_str(&facts(&[
        ("Estimate", or_dash(meter.estimate.as_deref())),
        ("Hold", or_dash(meter.hold.as_deref())),
        ("Hold id", or_dash(meter.hold_id.as_deref())),
        ("Actual", or_dash(meter.actual.as_deref())),
        ("Drift (actual − estimate)", or_dash(meter.drift.as_deref())),
        ("Basis", or_dash(meter.basis.as_deref())),
        (
            "Host-measured time",
            meter
                .host_wall_ms
                .map_or_else(|| "—".into(), |ms| format!("{ms} ms")),
        ),
    ]));
    if let Some(charge) = &meter.charge {
        body.push_str("<h2>Charge policy</h2>");
        body.push_str(&facts(&[
            ("Asked (meter-actual)", esc(&charge.asked)),
            ("Ceiling", esc(&charge.ceiling)),
            ("Charged", esc(&charge.charged)),
            ("Disputed", esc(&charge.disputed)),
        ]));
    }
    if let Some(usage) = &meter.reported_usage {
        body.push_str("<h2>Reported usage</h2>");
        body.push_str(&json_block(usage));
    }
    let attempts: Vec<Vec<String>> = view
        .attempts
        .iter()
        .map(|attempt| {
            vec![
                esc(&attempt.extension),
                esc(&attempt.hold_id),
                esc(&attempt.estimate),
                or_dash(attempt.outcome.as_deref()),
            ]
        })
        .collect();
    body.push_str("<h2>Attempts</h2>");
    body.push_str(&table(
        "attempts",
        "Each backend tried, in order",
        &["Extension", "Hold", "Estimate", "Outcome"],
        &attempts,
    ));
    body.push_str("<h2>Handle</h2>");
    body.push_str(&json_block(&view.handle));
    html_response(
        StatusCode::OK,
        page(&title, "/ui/sandboxes", Some(&session.csrf), &body),
    )
}

// ---- tenants ----

async fn tenants_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let session = match signed_in(&state, &headers) {
        Ok(session) => session,
        Err(login) => return login,
    };
    let title = "Tenants";
    let credits = match state.service.all_credits(&Caller::Operator).await {
        Ok(credits) => credits,
        Err(error) => return error_page(title, "/ui/tenants", &session.csrf, &error),
    };
    let registered: HashMap<String, TenantView> =
        match state.service.list_tenants(&Caller::Operator) {
            Ok(tenants) => tenants
                .into_iter()
                .map(|tenant| (tenant.name.clone(), tenant))
                .collect(),
            Err(error) => return error_page(title, "/ui/tenants", &session.csrf, &error),
        };
    let rows: Vec<Vec<String>> = credits
        .iter()
        .map(|view| {
            let key = match registered.get(&view.tenant) {
                Some(tenant) if tenant.revoked_at.is_some() => {
                    format!("{}… (revoked)", esc(&tenant.key_prefix))
                }
                Some(tenant) => format!("{}…", esc(&tenant.key_prefix)),
                None => "—".into(),
            };
            vec![
                format!(
                    "<a href=\"/ui/tenants/{}\">{}</a>",
                    url_part(&view.tenant),
                    esc(&view.tenant)
                ),
                esc(&view.balance),
                esc(&view.held),
                esc(&view.available),
                key,
            ]
        })
        .collect();
    let body = table(
        "tenants",
        "Every tenant's credits",
        &["Tenant", "Balance", "Held", "Available", "API key"],
        &rows,
    );
    html_response(
        StatusCode::OK,
        page(title, "/ui/tenants", Some(&session.csrf), &body),
    )
}

#[derive(Debug, Default, Deserialize)]
struct SpendQuery {
    /// Bucket width of the spend chart, in seconds.
    bucket: Option<u64>,
}

const BUCKETS: [(u64, &str); 4] = [
    (60, "minute"),
    (3600, "hour"),
    (86_400, "day"),
    (604_800, "week"),
];

/// A tenant's page, with `message` (kind, text) above it.
async fn render_tenant(
    state: &AppState,
    session: &Session,
    name: &str,
    bucket_secs: u64,
    message: Option<(&str, String)>,
    status: StatusCode,
) -> Response {
    let title = format!("Tenant {name}");
    let caller = Caller::Operator;
    let credits = match state.service.credits(&caller, Some(name)).await {
        Ok(credits) => credits,
        Err(error) => return error_page(&title, "/ui/tenants", &session.csrf, &error),
    };
    let spend = state.service.spend(&caller, Some(name), bucket_secs).await;
    let history = match state
        .service
        .history(&caller, Some(name), HISTORY_ROWS)
        .await
    {
        Ok(history) => history,
        Err(error) => return error_page(&title, "/ui/tenants", &session.csrf, &error),
    };
    let mut body = String::from("<p><a href=\"/ui/tenants\">← All tenants</a></p>");
    if let Some((kind, text)) = message {
        body.push_str(&notice(kind, &text));
    }
    body.push_str(&facts(&[
        ("Balance", esc(&credits.balance)),
        ("Held", esc(&credits.held)),
        ("Available", esc(&credits.available)),
    ]));
    body.push_str("<h2>Spend over time</h2>");
    let _ = write!(
        body,
        "<form method=\"get\" action=\"/ui/tenants/{}\" class=\"filters\">\
         <div class=\"field\"><label for=\"bucket\">Per</label><select id=\"bucket\" name=\"bucket\">",
        url_part(name)
    );
    for (secs, label) in BUCKETS {
        let selected = if secs == bucket_secs { " selected" } else { "" };
        let _ = write!(body, "<option value=\"{secs}\"{selected}>{label}</option>");
    }
    body.push_str("</select></div><button type=\"submit\">Show</button></form>");
    match spend {
        Ok(spend) => {
            let buckets: Vec<(String, String, u64)> = spend
                .buckets
                .iter()
                .map(|bucket| (bucket.start.clone(), bucket.charged.clone(), bucket.charges))
                .collect();
            let _ = write!(
                body,
                "<p>Charged in all: <strong id=\"spend-total\">{}</strong> credits.</p>",
                esc(&spend.total)
            );
            body.push_str(&html::spend_chart(
                &format!("Credits charged to {name} per {bucket_secs} s"),
                &buckets,
            ));
        }
        Err(error) => body.push_str(&notice("error", &error.to_string())),
    }
    body.push_str("<h2>Add credits</h2>");
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/ui/tenants/{}/credits\" class=\"add-credits\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <input type=\"hidden\" name=\"key\" value=\"console-{}\">\
         <div class=\"field\"><label for=\"amount\">Credits to add</label>\
         <input id=\"amount\" name=\"amount\" inputmode=\"decimal\" required placeholder=\"25 or 0.5\"></div>\
         <button type=\"submit\" id=\"add-credits\">Add credits</button>\
         <p class=\"hint\">As <code>credits add</code>: decimal credits, up to six places, above \
         zero. Submitting this form twice adds once.</p></form>",
        url_part(name),
        esc(&session.csrf),
        random_token(),
    );
    let rows: Vec<Vec<String>> = history
        .iter()
        .map(|entry| {
            vec![
                entry.seq.to_string(),
                esc(&entry.time),
                esc(&entry.kind),
                esc(&entry.amount),
                esc(&entry.debit),
                esc(&entry.credit),
                entry.sandbox_id.as_deref().map_or_else(
                    || "—".into(),
                    |id| format!("<a href=\"/ui/sandboxes/{}\">{}</a>", url_part(id), esc(id)),
                ),
            ]
        })
        .collect();
    body.push_str("<h2>Credits history</h2>");
    body.push_str(&table(
        "history",
        &format!("The newest {HISTORY_ROWS} journal entries"),
        &[
            "Seq", "Time", "Kind", "Amount", "Debit", "Credit", "Sandbox",
        ],
        &rows,
    ));
    html_response(
        status,
        page(&title, "/ui/tenants", Some(&session.csrf), &body),
    )
}

async fn tenant_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(query): Query<SpendQuery>,
) -> Response {
    let session = match signed_in(&state, &headers) {
        Ok(session) => session,
        Err(login) => return login,
    };
    let bucket = query.bucket.unwrap_or(3600);
    render_tenant(&state, &session, &name, bucket, None, StatusCode::OK).await
}

#[derive(Deserialize)]
struct AddCreditsForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    amount: String,
}

async fn add_credits(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let session = match signed_in(&state, &headers) {
        Ok(session) => session,
        Err(login) => return login,
    };
    let form = match serde_urlencoded::from_bytes::<AddCreditsForm>(&body) {
        Ok(form) if same_secret(&session.csrf, &form.csrf) => form,
        _ => {
            let error = ServiceError::Forbidden(
                "this form is stale or was not sent by the console: reload the page and try again"
                    .into(),
            );
            return error_page(
                &format!("Tenant {name}"),
                "/ui/tenants",
                &session.csrf,
                &error,
            );
        }
    };
    let request = AddCredits {
        amount: form.amount.trim().to_string(),
        key: Some(form.key),
    };
    let (message, status) = match state
        .service
        .add_credits(&Caller::Operator, Some(&name), &request)
        .await
    {
        Ok(grant) if grant.replayed => (
            (
                "info",
                format!(
                    "This form was already submitted: nothing more added (balance {}).",
                    grant.balance
                ),
            ),
            StatusCode::OK,
        ),
        Ok(grant) => (
            (
                "success",
                format!(
                    "Added {} credits to {}: balance {}, available {}.",
                    grant.added, grant.tenant, grant.balance, grant.available
                ),
            ),
            StatusCode::OK,
        ),
        Err(error) => (
            ("error", format!("Nothing added: {error}")),
            status_of(&error),
        ),
    };
    render_tenant(&state, &session, &name, 3600, Some(message), status).await
}

// ---- extensions ----

fn breaker_text(breaker: &BreakerView) -> String {
    match &breaker.open_until {
        Some(until) => format!("{} until {}", esc(&breaker.state), esc(until)),
        None if breaker.consecutive_failures > 0 => format!(
            "{} ({} failed in a row)",
            esc(&breaker.state),
            breaker.consecutive_failures
        ),
        None => esc(&breaker.state),
    }
}

fn latency_text(latency: &LatencyView) -> String {
    match latency.average_ms {
        Some(ms) => format!("{ms} ms ({} samples)", latency.samples),
        None => "—".into(),
    }
}

async fn extensions_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let session = match signed_in(&state, &headers) {
        Ok(session) => session,
        Err(login) => return login,
    };
    let title = "Extensions";
    let mut reports = Vec::new();
    for listing in state.listings() {
        match state
            .extension_report(&Caller::Operator, &listing.name)
            .await
        {
            Ok(report) => reports.push(report),
            Err(error) => return error_page(title, "/ui/extensions", &session.csrf, &error),
        }
    }
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|report| {
            let listing = &report.listing;
            let why = match (&listing.reason, &listing.reload_error) {
                (Some(reason), _) => esc(reason),
                (None, Some(reload)) => format!("reload failed: {}", esc(reload)),
                (None, None) => "—".into(),
            };
            vec![
                format!(
                    "<a href=\"/ui/extensions/{}\">{}</a>",
                    url_part(&listing.name),
                    esc(&listing.name)
                ),
                format!(
                    "<span class=\"status {0}\">{0}</span>",
                    esc(&listing.status)
                ),
                or_dash(listing.kind.as_deref()),
                or_dash(listing.version.as_deref()),
                why,
                breaker_text(&report.breaker),
                latency_text(&report.latency),
                report.drift.sandboxes.to_string(),
                esc(&report.drift.estimated),
                esc(&report.drift.charged),
                esc(&report.drift.drift),
            ]
        })
        .collect();
    let mut body = table(
        "extensions",
        "Every file of the extensions directory",
        &[
            "Extension",
            "Status",
            "Kind",
            "Version",
            "Why not loaded",
            "Breaker",
            "Latency",
            "Billed",
            "Estimated",
            "Charged",
            "Drift",
        ],
        &rows,
    );
    body.push_str("<h2>Estimate against actual</h2>");
    let points: Vec<(String, String, String)> = reports
        .iter()
        .filter(|report| report.drift.sandboxes > 0)
        .map(|report| {
            (
                report.listing.name.clone(),
                report.drift.estimated.clone(),
                report.drift.charged.clone(),
            )
        })
        .collect();
    body.push_str(&html::drift_chart(
        "Estimated and charged credits per extension, over its billed sandboxes",
        &points,
    ));
    html_response(
        StatusCode::OK,
        page(title, "/ui/extensions", Some(&session.csrf), &body),
    )
}

async fn extension_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let session = match signed_in(&state, &headers) {
        Ok(session) => session,
        Err(login) => return login,
    };
    let title = format!("Extension {name}");
    let report = match state.extension_report(&Caller::Operator, &name).await {
        Ok(report) => report,
        Err(error) => return error_page(&title, "/ui/extensions", &session.csrf, &error),
    };
    let listing = &report.listing;
    let mut body = String::from("<p><a href=\"/ui/extensions\">← All extensions</a></p>");
    if let Some(reason) = &listing.reason {
        body.push_str(&notice("error", &format!("Rejected: {reason}")));
    }
    if let Some(reload) = &listing.reload_error {
        body.push_str(&notice(
            "error",
            &format!("Its file changed but does not load: {reload}"),
        ));
    }
    body.push_str(&facts(&[
        ("Status", esc(&listing.status)),
        ("Id", or_dash(listing.id.as_deref())),
        ("Version", or_dash(listing.version.as_deref())),
        ("Kind", or_dash(listing.kind.as_deref())),
        ("File", esc(&listing.file)),
        ("Breaker", breaker_text(&report.breaker)),
        ("Latency average", latency_text(&report.latency)),
        (
            "Charge tolerance",
            or_dash(report.charge_tolerance.as_deref()),
        ),
    ]));
    if let Some(limits) = &report.limits {
        body.push_str("<h2>Limits</h2>");
        body.push_str(&facts(&[
            ("Timeout", format!("{} ms", limits.timeout_ms)),
            ("Memory", format!("{} MiB", limits.memory_mb)),
            (
                "Fuel",
                limits
                    .fuel
                    .map_or_else(|| "unlimited".into(), |fuel| fuel.to_string()),
            ),
            ("Reuse instances", limits.reuse_instances.to_string()),
            ("Key-value quota", format!("{} MiB", limits.kv_quota_mb)),
        ]));
    }
    if let Some(grants) = &report.grants {
        body.push_str("<h2>Grants</h2>");
        body.push_str(&json_block(grants));
    }
    let drift = &report.drift;
    body.push_str("<h2>Estimate against actual</h2>");
    body.push_str(&facts(&[
        ("Billed sandboxes", drift.sandboxes.to_string()),
        ("Estimated", esc(&drift.estimated)),
        ("Charged", esc(&drift.charged)),
        ("Drift (charged − estimated)", esc(&drift.drift)),
        ("Disputed", esc(&drift.disputed)),
    ]));
    let points: Vec<(String, String, String)> = drift
        .points
        .iter()
        .map(|point| {
            (
                point.sandbox_id.clone(),
                point.estimate.clone(),
                point.actual.clone(),
            )
        })
        .collect();
    body.push_str(&html::drift_chart(
        &format!("Estimate and actual of each billed sandbox of {name}"),
        &points,
    ));
    let rows: Vec<Vec<String>> = drift
        .points
        .iter()
        .map(|point| {
            vec![
                format!(
                    "<a href=\"/ui/sandboxes/{}\">{}</a>",
                    url_part(&point.sandbox_id),
                    esc(&point.sandbox_id)
                ),
                or_dash(point.finished_at.as_deref()),
                esc(&point.estimate),
                esc(&point.actual),
                esc(&point.drift),
            ]
        })
        .collect();
    body.push_str(&table(
        "drift",
        "Billed sandboxes, oldest first",
        &["Sandbox", "Finished", "Estimate", "Actual", "Drift"],
        &rows,
    ));
    html_response(
        StatusCode::OK,
        page(&title, "/ui/extensions", Some(&session.csrf), &body),
    )
}

// ---- routing ----

#[derive(Debug, Default, Deserialize)]
struct RoutingQuery {
    profile: Option<String>,
}

/// The rows of a route explain; the script redraws the same from the API.
fn candidate_rows(view: &RouteExplainView) -> Vec<Vec<String>> {
    view.candidates
        .iter()
        .map(|candidate| {
            vec![
                esc(&candidate.name),
                candidate
                    .rank
                    .map_or_else(|| "—".into(), |rank| rank.to_string()),
                or_dash(candidate.kind.as_deref()),
                if candidate.eligible { "yes" } else { "no" }.into(),
                or_dash(candidate.estimate.as_deref()),
                candidate
                    .latency_ms
                    .map_or_else(|| "—".into(), |ms| format!("{ms} ms")),
                or_dash(candidate.breaker.as_deref()),
                or_dash(candidate.reason.as_deref()),
            ]
        })
        .collect()
}

async fn routing_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<RoutingQuery>,
) -> Response {
    let session = match signed_in(&state, &headers) {
        Ok(session) => session,
        Err(login) => return login,
    };
    let title = "Routing";
    let profiles = state.service.list_profiles();
    let chosen = non_empty(query.profile);
    let names: Vec<String> = profiles
        .iter()
        .map(|profile| profile.name.clone())
        .collect();
    let mut body = String::from(
        "<form method=\"get\" action=\"/ui/routing\" class=\"filters\" aria-label=\"Pick a profile\">",
    );
    body.push_str(&select("profile", "Profile", &names, chosen.as_deref()));
    body.push_str("<button type=\"submit\" id=\"explain\">Explain</button></form>");
    match chosen {
        None => body.push_str("<p>Pick a profile to see how it would route now.</p>"),
        Some(profile) => match state.service.route_explain(&profile, None).await {
            Ok(decision) => {
                let view = RouteExplainView::from(&decision);
                body.push_str(&facts(&[
                    ("Strategy", esc(&view.strategy)),
                    ("Fallback", view.fallback.to_string()),
                    ("Max cost", or_dash(view.max_cost.as_deref())),
                    (
                        "Chosen",
                        format!(
                            "<span id=\"chosen\">{}</span>",
                            or_dash(view.chosen.as_deref())
                        ),
                    ),
                ]));
                let _ = write!(
                    body,
                    "<div id=\"route-live\" data-profile=\"{}\" aria-live=\"polite\">",
                    esc(&profile)
                );
                body.push_str(&table(
                    "candidates",
                    "Candidates, as route explain ranks them (refreshed every 2 s)",
                    &[
                        "Candidate",
                        "Rank",
                        "Kind",
                        "Eligible",
                        "Estimate",
                        "Latency",
                        "Breaker",
                        "Why not",
                    ],
                    &candidate_rows(&view),
                ));
                body.push_str("</div>");
            }
            Err(error) => body.push_str(&notice("error", &error.to_string())),
        },
    }
    let rows: Vec<Vec<String>> = profiles
        .iter()
        .map(|profile| {
            vec![
                format!(
                    "<a href=\"/ui/routing?profile={}\">{}</a>",
                    url_part(&profile.name),
                    esc(&profile.name)
                ),
                or_dash(profile.strategy.as_deref()),
                esc(&profile.candidates.join(", ")),
                match &profile.error {
                    Some(error) => format!("<span class=\"bad\">{}</span>", esc(error)),
                    None => esc(&profile.description),
                },
            ]
        })
        .collect();
    body.push_str("<h2>Profiles</h2>");
    body.push_str(&table(
        "profiles",
        "The profiles directory",
        &["Profile", "Strategy", "Candidates", "Description"],
        &rows,
    ));
    html_response(
        StatusCode::OK,
        page(title, "/ui/routing", Some(&session.csrf), &body),
    )
}

// ---- events ----

async fn events_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let session = match signed_in(&state, &headers) {
        Ok(session) => session,
        Err(login) => return login,
    };
    let mut body = String::from(
        "<p id=\"events-status\" role=\"status\">Connecting to the event stream…</p>\
         <div id=\"events-live\" data-source=\"/api/v1/events?from=start\">",
    );
    body.push_str(&table(
        "events",
        "Meter and lifecycle events, newest first",
        &["Time", "Type", "Tenant", "Sandbox", "Amount or state"],
        &[],
    ));
    body.push_str("</div>");
    html_response(
        StatusCode::OK,
        page("Events", "/ui/events", Some(&session.csrf), &body),
    )
}

// ---- assets ----

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("console.css"),
    )
        .into_response()
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("console.js"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_found_by_its_cookie_and_gone_after_logout() {
        let sessions = Sessions::default();
        let (id, session) = sessions.open();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("other=1; {SESSION_COOKIE}={id}")).unwrap(),
        );
        let (found, found_session) = sessions.find(&headers).unwrap();
        assert_eq!(found, id);
        assert_eq!(found_session.csrf, session.csrf);
        sessions.close(&id);
        assert!(!sessions.signed_in(&headers));
        let mut forged = HeaderMap::new();
        forged.insert(
            header::COOKIE,
            HeaderValue::from_static("sandboxer_console=guess"),
        );
        assert!(!sessions.signed_in(&forged));
    }

    #[test]
    fn secrets_compare_equal_only_when_equal() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }
}
