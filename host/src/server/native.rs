//! The native API (`/api/v1`): what E2B has no words for, and what the
//! command line uses while a server owns the home. Each handler checks the
//! caller's key, calls the service and answers its type; nothing else.

use super::error::ApiError;
use super::{AppState, Authenticated};
use crate::service::api::*;
use crate::service::{Caller, ServiceError};
use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::IntoParams;

type Answer<T> = Result<Json<T>, ApiError>;

fn body<T>(json: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    Ok(json?.0)
}

fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    Ok(query?.0)
}

#[utoipa::path(post, path = "/api/v1/sandboxes", tag = "sandboxes",
    request_body = CreateSandbox,
    responses((status = 201, body = SandboxView), (status = 402, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn create_sandbox(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    request: Result<Json<CreateSandbox>, JsonRejection>,
) -> Result<(StatusCode, Json<SandboxView>), ApiError> {
    let created = state
        .service
        .create_sandbox(&caller, body(request)?)
        .await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ListParams {
    /// Every record, not only live ones.
    #[serde(default)]
    all: bool,
    tenant: Option<String>,
    state: Option<String>,
    extension: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/sandboxes", tag = "sandboxes", params(ListParams),
    responses((status = 200, body = Vec<SandboxView>)), security(("api_key" = [])))]
pub async fn list_sandboxes(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Answer<Vec<SandboxView>> {
    let params = query(params)?;
    let records = state.service.list_sandboxes(
        &caller,
        &SandboxQuery {
            all: params.all,
            tenant: params.tenant,
            state: params.state,
            extension: params.extension,
        },
    )?;
    Ok(Json(records.iter().map(SandboxView::from).collect()))
}

#[utoipa::path(get, path = "/api/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path)),
    responses((status = 200, body = SandboxView), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn show_sandbox(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path(id): Path<String>,
) -> Answer<SandboxView> {
    Ok(Json(state.service.show_sandbox(&caller, &id)?))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct DestroyParams {
    /// Close it even if it cannot be destroyed, billing the host-measured time (operator only).
    #[serde(default)]
    force: bool,
}

#[utoipa::path(delete, path = "/api/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path), DestroyParams),
    responses((status = 200, body = SandboxView), (status = 404, body = ErrorBody),
              (status = 503, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn destroy_sandbox(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path(id): Path<String>,
    params: Result<Query<DestroyParams>, QueryRejection>,
) -> Answer<SandboxView> {
    let force = query(params)?.force;
    Ok(Json(
        state.service.destroy_sandbox(&caller, &id, force).await?,
    ))
}

#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/timeout", tag = "sandboxes",
    params(("id" = String, Path)), request_body = SetTimeout,
    responses((status = 200, body = SandboxView), (status = 402, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn set_timeout(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path(id): Path<String>,
    request: Result<Json<SetTimeout>, JsonRejection>,
) -> Answer<SandboxView> {
    let timeout = body(request)?.timeout;
    let ends = crate::manager::now_ms() + u64::from(timeout) * 1000;
    Ok(Json(
        state
            .service
            .set_sandbox_end(&caller, &id, ends, false)
            .await?,
    ))
}

#[utoipa::path(get, path = "/api/v1/credits/{tenant}", tag = "credits",
    params(("tenant" = String, Path)),
    responses((status = 200, body = CreditsView), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn credits(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
) -> Answer<CreditsView> {
    Ok(Json(state.service.credits(&caller, Some(&tenant)).await?))
}

#[utoipa::path(post, path = "/api/v1/credits/{tenant}", tag = "credits",
    params(("tenant" = String, Path)), request_body = AddCredits,
    responses((status = 200, body = GrantView), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn add_credits(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    request: Result<Json<AddCredits>, JsonRejection>,
) -> Answer<GrantView> {
    let request = body(request)?;
    Ok(Json(
        state
            .service
            .add_credits(&caller, Some(&tenant), &request)
            .await?,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct HistoryParams {
    /// How many entries, newest first (default 20).
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/api/v1/credits/{tenant}/history", tag = "credits",
    params(("tenant" = String, Path), HistoryParams),
    responses((status = 200, body = Vec<EntryView>), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn history(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    params: Result<Query<HistoryParams>, QueryRejection>,
) -> Answer<Vec<EntryView>> {
    let limit = query(params)?.limit.unwrap_or(20).min(100_000);
    Ok(Json(
        state.service.history(&caller, Some(&tenant), limit).await?,
    ))
}

#[utoipa::path(get, path = "/api/v1/ledger/verify", tag = "credits",
    responses((status = 200, body = VerifyView), (status = 403, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn verify(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Answer<VerifyView> {
    Ok(Json(state.service.verify(&caller).await?))
}

#[utoipa::path(get, path = "/api/v1/extensions", tag = "extensions",
    responses((status = 200, body = Vec<ExtensionListing>)), security(("api_key" = [])))]
pub async fn extensions(
    State(state): State<AppState>,
    Authenticated(_caller): Authenticated,
) -> Answer<Vec<ExtensionListing>> {
    Ok(Json(state.listings()))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct RouteParams {
    /// Price the sandbox for this many seconds instead of the profile's ttl.
    ttl: Option<u32>,
}

#[utoipa::path(get, path = "/api/v1/route/{profile}", tag = "extensions",
    params(("profile" = String, Path), RouteParams),
    responses((status = 200, body = RouteExplainView), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn route_explain(
    State(state): State<AppState>,
    Authenticated(_caller): Authenticated,
    Path(profile): Path<String>,
    params: Result<Query<RouteParams>, QueryRejection>,
) -> Answer<RouteExplainView> {
    let ttl = query(params)?.ttl;
    let decision = state.service.route_explain(&profile, ttl).await?;
    Ok(Json(RouteExplainView::from(&decision)))
}

#[utoipa::path(post, path = "/api/v1/tenants", tag = "tenants", request_body = CreateTenant,
    responses((status = 201, body = TenantCreated), (status = 403, body = ErrorBody),
              (status = 409, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn create_tenant(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    request: Result<Json<CreateTenant>, JsonRejection>,
) -> Result<(StatusCode, Json<TenantCreated>), ApiError> {
    let name = body(request)?.name;
    let created = state.service.create_tenant(&caller, &name).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[utoipa::path(get, path = "/api/v1/tenants", tag = "tenants",
    responses((status = 200, body = Vec<TenantView>), (status = 403, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_tenants(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Answer<Vec<TenantView>> {
    Ok(Json(state.service.list_tenants(&caller)?))
}

#[utoipa::path(delete, path = "/api/v1/tenants/{name}", tag = "tenants",
    params(("name" = String, Path)),
    responses((status = 200, body = TenantView), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn revoke_tenant(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path(name): Path<String>,
) -> Answer<TenantView> {
    Ok(Json(state.service.revoke_tenant(&caller, &name).await?))
}

#[utoipa::path(post, path = "/api/v1/reload", tag = "extensions",
    responses((status = 200, body = Vec<ExtensionListing>), (status = 403, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn reload(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Answer<Vec<ExtensionListing>> {
    if caller != Caller::Operator {
        return Err(ServiceError::Forbidden("reloading needs the operator's key".into()).into());
    }
    state
        .reloader
        .reload_now(&state.service, &state.metrics)
        .await;
    Ok(Json(state.listings()))
}

#[utoipa::path(get, path = "/api/v1/credits", tag = "credits",
    responses((status = 200, body = Vec<CreditsView>), (status = 403, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn all_credits(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Answer<Vec<CreditsView>> {
    Ok(Json(state.service.all_credits(&caller).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct SpendParams {
    /// Width of each bucket in seconds (default 3600).
    bucket_secs: Option<u64>,
}

#[utoipa::path(get, path = "/api/v1/credits/{tenant}/spend", tag = "credits",
    params(("tenant" = String, Path), SpendParams),
    responses((status = 200, body = SpendView), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn spend(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    params: Result<Query<SpendParams>, QueryRejection>,
) -> Answer<SpendView> {
    let bucket_secs = query(params)?.bucket_secs.unwrap_or(3600);
    Ok(Json(
        state
            .service
            .spend(&caller, Some(&tenant), bucket_secs)
            .await?,
    ))
}

#[utoipa::path(get, path = "/api/v1/profiles", tag = "extensions",
    responses((status = 200, body = Vec<ProfileView>)), security(("api_key" = [])))]
pub async fn profiles(
    State(state): State<AppState>,
    Authenticated(_caller): Authenticated,
) -> Answer<Vec<ProfileView>> {
    Ok(Json(state.service.list_profiles()))
}

#[utoipa::path(get, path = "/api/v1/extensions/{name}", tag = "extensions",
    params(("name" = String, Path)),
    responses((status = 200, body = ExtensionReportView), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn extension_report(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path(name): Path<String>,
) -> Answer<ExtensionReportView> {
    Ok(Json(state.extension_report(&caller, &name).await?))
}
