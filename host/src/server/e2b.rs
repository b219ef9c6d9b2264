//! The E2B-compatible control plane: enough of E2B's REST API for its
//! official SDKs to create, inspect, list, extend, connect to and kill
//! sandboxes unchanged (`tests/e2b/PROTOCOL.md` has what each SDK sends and
//! reads). A `templateID` names a profile; `timeout` seconds is the ttl;
//! `metadata` is kept. Only ready sandboxes exist for E2B: any other state is
//! a 404, as a killed sandbox is on E2B. The in-sandbox `envd` data plane
//! (files, commands) is not served.

use super::error::ApiError;
use super::{AppState, Authenticated};
use crate::manager::now_ms;
use crate::service::api::{CreateSandbox, ErrorBody, SandboxQuery};
use crate::service::{Caller, ServiceError};
use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

/// What the SDKs check `envdVersion` against; no envd runs, but below 0.1.0
/// an SDK deletes the sandbox it just made.
const ENVD_VERSION: &str = "0.6.4";
const CLIENT_ID: &str = "sandboxer";
/// E2B's page size default and cap.
const MAX_PAGE: usize = 100;

/// `POST /sandboxes`, `POST /v2/sandboxes`: E2B's `NewSandbox`; fields the
/// host has no use for (`autoPause`, `secure`, ...) are ignored.
#[derive(Debug, Deserialize, ToSchema)]
pub struct NewSandbox {
    /// A profile name.
    #[serde(rename = "templateID")]
    template_id: String,
    /// Seconds; the profile's ttl when absent.
    timeout: Option<u32>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "envVars")]
    #[allow(dead_code)]
    env_vars: Option<BTreeMap<String, String>>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    mcp: Option<serde_json::Value>,
    #[serde(default, rename = "volumeMounts")]
    #[schema(value_type = Option<Object>)]
    volume_mounts: Option<serde_json::Value>,
}

/// E2B's `Sandbox`: what create and connect answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct E2bSandbox {
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "clientID")]
    client_id: &'static str,
    #[serde(rename = "envdVersion")]
    envd_version: &'static str,
    alias: String,
    domain: Option<String>,
}

/// E2B's `SandboxDetail` and `ListedSandbox`.
#[derive(Debug, Serialize, ToSchema)]
pub struct E2bSandboxDetail {
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "templateID")]
    template_id: String,
    alias: String,
    #[serde(rename = "clientID")]
    client_id: &'static str,
    #[serde(rename = "startedAt")]
    started_at: String,
    #[serde(rename = "endAt")]
    end_at: String,
    #[serde(rename = "envdVersion")]
    envd_version: &'static str,
    #[serde(rename = "cpuCount")]
    cpu_count: u32,
    #[serde(rename = "memoryMB")]
    memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    disk_size_mb: u32,
    /// Always `running`: other states are not E2B sandboxes.
    state: &'static str,
    metadata: BTreeMap<String, String>,
}

fn sandbox_answer(record: &crate::manager::SandboxStatus) -> E2bSandbox {
    E2bSandbox {
        sandbox_id: record.id.clone(),
        template_id: record.profile.clone(),
        client_id: CLIENT_ID,
        envd_version: ENVD_VERSION,
        alias: record.profile.clone(),
        domain: None,
    }
}

fn detail(record: &crate::manager::SandboxStatus) -> E2bSandboxDetail {
    let time = |ms: Option<u64>| crate::ledger::rfc3339_millis(ms.unwrap_or(record.created_at_ms));
    E2bSandboxDetail {
        sandbox_id: record.id.clone(),
        template_id: record.profile.clone(),
        alias: record.profile.clone(),
        client_id: CLIENT_ID,
        started_at: time(record.ready_at_ms),
        end_at: time(record.expires_at_ms),
        envd_version: ENVD_VERSION,
        cpu_count: record.spec.cpu_millis.div_ceil(1000).max(1),
        memory_mb: record.spec.memory_mb,
        disk_size_mb: 0,
        state: "running",
        metadata: record.metadata.clone(),
    }
}

/// A running (ready) sandbox of the caller's, or E2B's 404.
fn running(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<crate::manager::SandboxStatus, ApiError> {
    let record = state.service.sandbox(caller, id)?;
    if record.state != crate::manager::SandboxState::Ready {
        return Err(ServiceError::NotFound(format!("sandbox {id} not found")).into());
    }
    Ok(record)
}

#[utoipa::path(post, path = "/v2/sandboxes", tag = "e2b", request_body = NewSandbox,
    responses((status = 201, body = E2bSandbox), (status = 402, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn create(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    request: Result<Json<NewSandbox>, JsonRejection>,
) -> Result<(StatusCode, Json<E2bSandbox>), ApiError> {
    let request = request?.0;
    if request.mcp.is_some() || request.volume_mounts.is_some() {
        return Err(ServiceError::InvalidInput(
            "mcp and volumeMounts are not supported by sandboxer-host".into(),
        )
        .into());
    }
    let created = state
        .service
        .create_sandbox(
            &caller,
            CreateSandbox {
                profile: request.template_id,
                tenant: None,
                ttl_secs: request.timeout,
                command: None,
                metadata: request.metadata.unwrap_or_default(),
            },
        )
        .await?;
    let record = state.service.sandbox(&caller, &created.id)?;
    Ok((StatusCode::CREATED, Json(sandbox_answer(&record))))
}

#[utoipa::path(get, path = "/sandboxes/{sandboxID}", tag = "e2b",
    params(("sandboxID" = String, Path)),
    responses((status = 200, body = E2bSandboxDetail), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_info(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path(id): Path<String>,
) -> Result<Json<E2bSandboxDetail>, ApiError> {
    Ok(Json(detail(&running(&state, &caller, &id)?)))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ListParams {
    /// `key=value&...`, each key and value percent-encoded once more.
    metadata: Option<String>,
    /// Comma-separated subset of `running`, `paused`.
    state: Option<String>,
    limit: Option<usize>,
    #[serde(rename = "nextToken")]
    next_token: Option<String>,
}

#[utoipa::path(get, path = "/v2/sandboxes", tag = "e2b", params(ListParams),
    responses((status = 200, body = Vec<E2bSandboxDetail>,
               headers(("X-Next-Token" = String, description = "present when another page exists")))),
    security(("api_key" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let params = params?.0;
    let filter = match &params.metadata {
        Some(encoded) => metadata_filter(encoded)?,
        None => Vec::new(),
    };
    let wants_running = params
        .state
        .as_deref()
        .is_none_or(|states| states.split(',').any(|state| state.trim() == "running"));
    let limit = params.limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
    let after = params
        .next_token
        .as_deref()
        .map(|token| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(token)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| {
                    ServiceError::InvalidInput(format!(
                        "nextToken {token:?} is not one this server gave"
                    ))
                })
        })
        .transpose()?;
    let mut records = if wants_running {
        state.service.list_sandboxes(
            &caller,
            &SandboxQuery {
                state: Some("ready".into()),
                ..SandboxQuery::default()
            },
        )?
    } else {
        Vec::new()
    };
    records.retain(|record| {
        filter
            .iter()
            .all(|(key, value)| record.metadata.get(key) == Some(value))
    });
    // Oldest first, by (created, id): the token is the last id of a page.
    records.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
    if let Some(after) = &after
        && let Some(position) = records.iter().position(|record| &record.id == after)
    {
        records.drain(..=position);
    }
    let more = records.len() > limit;
    records.truncate(limit);
    let page: Vec<E2bSandboxDetail> = records.iter().map(detail).collect();
    let mut response = Json(page).into_response();
    if more && let Some(last) = records.last() {
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&last.id);
        if let Ok(value) = HeaderValue::from_str(&token) {
            response.headers_mut().insert("x-next-token", value);
        }
    }
    Ok(response)
}

/// `GET /sandboxes` (SDKs 1.x): every running sandbox, no paging.
#[utoipa::path(get, path = "/sandboxes", tag = "e2b",
    responses((status = 200, body = Vec<E2bSandboxDetail>)), security(("api_key" = [])))]
pub async fn list_v1(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Vec<E2bSandboxDetail>>, ApiError> {
    let params = params?.0;
    let filter = match &params.metadata {
        Some(encoded) => metadata_filter(encoded)?,
        None => Vec::new(),
    };
    let records = state.service.list_sandboxes(
        &caller,
        &SandboxQuery {
            state: Some("ready".into()),
            ..SandboxQuery::default()
        },
    )?;
    Ok(Json(
        records
            .iter()
            .filter(|record| {
                filter
                    .iter()
                    .all(|(key, value)| record.metadata.get(key) == Some(value))
            })
            .map(detail)
            .collect(),
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct TimeoutBody {
    /// The sandbox now ends this many seconds from now.
    timeout: u32,
}

#[utoipa::path(post, path = "/sandboxes/{sandboxID}/timeout", tag = "e2b",
    params(("sandboxID" = String, Path)), request_body = TimeoutBody,
    responses((status = 204), (status = 402, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn set_timeout(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path(id): Path<String>,
    request: Result<Json<TimeoutBody>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let timeout = request?.0.timeout;
    running(&state, &caller, &id)?;
    let ends = now_ms() + u64::from(timeout) * 1000;
    state
        .service
        .set_sandbox_end(&caller, &id, ends, false)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ConnectBody {
    /// Seconds from now; the end only moves later.
    timeout: Option<u32>,
}

#[utoipa::path(post, path = "/v2/sandboxes/{sandboxID}/connect", tag = "e2b",
    params(("sandboxID" = String, Path)), request_body = ConnectBody,
    responses((status = 200, body = E2bSandbox), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn connect(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path(id): Path<String>,
    request: Result<Json<ConnectBody>, JsonRejection>,
) -> Result<Json<E2bSandbox>, ApiError> {
    // An empty body is a connect without a timeout.
    let timeout = request.map(|body| body.0.timeout).unwrap_or(None);
    let record = running(&state, &caller, &id)?;
    let record = match timeout {
        Some(timeout) => {
            let ends = now_ms() + u64::from(timeout) * 1000;
            state
                .service
                .set_sandbox_end(&caller, &id, ends, true)
                .await?;
            state.service.sandbox(&caller, &id)?
        }
        None => record,
    };
    Ok(Json(sandbox_answer(&record)))
}

#[utoipa::path(delete, path = "/sandboxes/{sandboxID}", tag = "e2b",
    params(("sandboxID" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("api_key" = [])))]
pub async fn kill(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    running(&state, &caller, &id)?;
    match state.service.destroy_sandbox(&caller, &id, false).await {
        Ok(_) => Ok(StatusCode::NO_CONTENT),
        Err(error) => {
            // A destroy that failed for now is retried in the background
            // (and billed then): for E2B the sandbox is gone.
            let retried = state.service.sandbox(&caller, &id).is_ok_and(|record| {
                record.state == crate::manager::SandboxState::Destroying
                    && record.retry_at_ms.is_some()
            });
            if retried {
                tracing::warn!("kill of {id}: {error}; retried in the background");
                return Ok(StatusCode::NO_CONTENT);
            }
            Err(error.into())
        }
    }
}

/// The pairs of E2B's `metadata` filter: the parameter's value (decoded
/// once, as any query value) is form-encoded pairs whose keys and values
/// were percent-encoded once more.
pub fn metadata_filter(encoded: &str) -> Result<Vec<(String, String)>, ServiceError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(encoded).map_err(|error| {
        ServiceError::InvalidInput(format!("the metadata filter does not parse: {error}"))
    })?;
    pairs
        .into_iter()
        .map(|(key, value)| Ok((percent_decode(&key)?, percent_decode(&value)?)))
        .collect()
}

fn percent_decode(text: &str) -> Result<String, ServiceError> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' && index + 2 < bytes.len() + 1 {
            let hex = text.get(index + 1..index + 3).ok_or_else(|| {
                ServiceError::InvalidInput(format!("bad percent-escape in {text:?}"))
            })?;
            let byte = u8::from_str_radix(hex, 16).map_err(|_| {
                ServiceError::InvalidInput(format!("bad percent-escape in {text:?}"))
            })?;
            decoded.push(byte);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(decoded)
        .map_err(|_| ServiceError::InvalidInput(format!("{text:?} is not UTF-8 once decoded")))
}

/// Whether an E2B request came with a key at all (the SDKs always send one).
pub fn has_key(headers: &HeaderMap) -> bool {
    headers.contains_key("x-api-key")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::run::parse_rfc3339_ms;

    #[test]
    fn the_metadata_filter_is_decoded_twice_as_both_sdks_encode_it() {
        // {"run": "x", "note": "a b/c=d&e"} as Python sends it, once decoded.
        let python = "run=x&note=a%2520b%252Fc%253Dd%2526e";
        assert_eq!(
            metadata_filter(python).unwrap(),
            [
                ("run".to_string(), "x".to_string()),
                ("note".to_string(), "a b/c=d&e".to_string())
            ]
        );
        assert!(metadata_filter("run=%zz").is_err());
    }

    #[test]
    fn times_round_trip_through_the_shape_the_sdks_parse() {
        let at = crate::ledger::rfc3339_millis(1_764_505_200_123);
        assert_eq!(parse_rfc3339_ms(&at), Some(1_764_505_200_123));
    }
}
