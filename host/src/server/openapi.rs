//! The OpenAPI 3 document of the whole API, generated from the handlers'
//! and types' annotations, served at `/openapi.json`. `docs/openapi.json` is
//! a copy a test keeps equal (`SANDBOXER_UPDATE_OPENAPI=1 cargo test
//! openapi` rewrites it).

use super::{e2b, events, native};
use crate::service::api::*;
use crate::service::run::RunReport;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi};

struct ApiKeyHeader;

impl Modify for ApiKeyHeader {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-API-KEY",
                "A tenant's key (`sandboxer-host tenant create`) or the operator's",
            ))),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sandboxer-host",
        description = "Sandboxes through WebAssembly backend extensions, billed in credits: the native API, and the part of E2B's control plane its SDKs use (see docs/server.md).",
    ),
    paths(
        native::create_sandbox,
        native::list_sandboxes,
        native::show_sandbox,
        native::destroy_sandbox,
        native::set_timeout,
        native::credits,
        native::add_credits,
        native::history,
        native::verify,
        native::extensions,
        native::route_explain,
        native::create_tenant,
        native::list_tenants,
        native::revoke_tenant,
        native::reload,
        native::all_credits,
        native::spend,
        native::profiles,
        native::extension_report,
        events::stream,
        e2b::create,
        e2b::get_info,
        e2b::list,
        e2b::list_v1,
        e2b::set_timeout,
        e2b::connect,
        e2b::kill,
    ),
    components(schemas(
        CreateSandbox, SandboxView, AttemptView, MeterView, ChargeView, SandboxQuery,
        CreditsView, AddCredits, GrantView, EntryView, ExtensionListing, CandidateView,
        RouteExplainView, CreateTenant, TenantView, TenantCreated, SetTimeout, ErrorBody,
        VerifyView, ViolationView, RunReport, SpendView, SpendBucket, ProfileView, LimitsView,
        BreakerView, LatencyView, DriftPoint, DriftView, ExtensionReportView,
        e2b::NewSandbox, e2b::E2bSandbox, e2b::E2bSandboxDetail, e2b::TimeoutBody, e2b::ConnectBody,
    )),
    modifiers(&ApiKeyHeader),
    tags(
        (name = "sandboxes", description = "Create, inspect, extend and destroy sandboxes"),
        (name = "credits", description = "Balances, grants, the journal, ledger verify"),
        (name = "extensions", description = "Loaded extensions, routing, reload"),
        (name = "tenants", description = "Tenants and their API keys (operator)"),
        (name = "events", description = "Meter events as they happen"),
        (name = "e2b", description = "E2B-compatible control plane (SDKs 2.x)"),
    )
)]
pub struct ApiDoc;

/// The document, as served.
pub fn document() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|error| format!("{{\"error\": \"{error}\"}}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn openapi_json_in_docs_is_what_the_code_generates() {
        let generated = super::document() + "\n";
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
        if std::env::var_os("SANDBOXER_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/openapi.json is not what the code generates: run \
             `SANDBOXER_UPDATE_OPENAPI=1 cargo test -p sandboxer-host --lib openapi` and commit it"
        );
    }
}
