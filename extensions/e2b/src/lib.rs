//! e2b: a SaaS backend that drives E2B's REST control plane
//! (`tests/e2b/PROTOCOL.md`) over `wasi:http`.
//!
//! - `create`: `POST /sandboxes` with the spec's template, the ttl as its
//!   `timeout` (E2B stops the sandbox then) and metadata `sandboxer_id`
//!   carrying the host's sandbox id. Idempotent by sandbox id: a sandbox
//!   this instance recorded, or one E2B lists with that tag, is returned
//!   instead of a second one.
//! - `destroy`: reads the sandbox's `startedAt` (`GET /sandboxes/{id}`),
//!   then `DELETE /sandboxes/{id}`; the wall time runs from E2B's
//!   `startedAt` (or, when E2B no longer knows the sandbox, from when this
//!   instance created it) to now, and never past the ttl.
//! - `estimate-cost` and `meter-actual`: the rate card of `[config]`, per
//!   vCPU and per GiB of the spec, billed per started second.
//!
//! Errors map to what routing needs: 400 (and an unknown template) is
//! `invalid-spec`; 401/403 `unavailable` with a word about the key; 429
//! `capacity`; 5xx `unavailable`. A request that may have reached E2B but
//! got no answer is ambiguous: before failing, `create` lists sandboxes by
//! its tag and kills what it finds, and keeps the tag to sweep again on
//! later creates until the sandbox's ttl has passed, so an ambiguous create
//! never leaves an unbilled sandbox running.
//!
//! The API key comes from the sidecar's `[secrets] api_key`: the extension
//! asks the host to put it in the `X-API-KEY` header and never sees it.

use sandboxer_sdk::http::{HttpError, Request, Response};
use sandboxer_sdk::*;
use serde::Deserialize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const DEFAULT_API_URL: &str = "https://api.e2b.dev";
const DEFAULT_TEMPLATE: &str = "base";
/// 0.0504 credits per vCPU-hour: 0.000014 per vCPU-second.
const DEFAULT_RATE_PER_VCPU_HOUR: MicroCredits = 50_400;
/// 0.0162 credits per GiB-hour: 0.0000045 per GiB-second.
const DEFAULT_RATE_PER_GIB_HOUR: MicroCredits = 16_200;
const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 15_000;
/// The metadata key that tags a sandbox with the host's sandbox id.
const TAG: &str = "sandboxer_id";
/// Ambiguous creates swept again per create call.
const SWEEP_PER_CREATE: u32 = 4;

struct E2b;

/// E2B's answer to create (the `Sandbox` schema).
#[derive(Deserialize)]
struct Created {
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
}

/// One sandbox of a list, or the detail of one (`startedAt` is in both).
#[derive(Deserialize)]
struct Listed {
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "startedAt", default)]
    started_at: Option<String>,
}

/// E2B's error body.
#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    message: String,
}

fn rate_card() -> Result<pricing::RateCard, ExtError> {
    pricing::RateCard::from_config(DEFAULT_RATE_PER_VCPU_HOUR, DEFAULT_RATE_PER_GIB_HOUR)
}

fn api_url() -> String {
    config::get("api_url")
        .unwrap_or_else(|| DEFAULT_API_URL.into())
        .trim_end_matches('/')
        .to_string()
}

fn request_timeout() -> Duration {
    let millis = config::get("request_timeout_ms")
        .and_then(|text| text.parse::<u64>().ok())
        .unwrap_or(DEFAULT_REQUEST_TIMEOUT_MS);
    Duration::from_millis(millis)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

fn validate(spec: &SandboxSpec) -> Result<(), ExtError> {
    if spec.cpu_millis == 0 || spec.memory_mb == 0 {
        return Err(ExtError::InvalidSpec(format!(
            "cpu_millis and memory_mb must be above zero (got {} and {})",
            spec.cpu_millis, spec.memory_mb
        )));
    }
    if spec.ttl_secs == 0 {
        return Err(ExtError::InvalidSpec("ttl_secs must be above zero".into()));
    }
    Ok(())
}

/// A request to E2B with the key the host fills in.
fn api(request: Request) -> Request {
    request
        .secret_header("X-API-KEY", "api_key")
        .timeout(request_timeout())
}

/// Percent-encodes everything but unreserved characters.
fn encode(text: &str) -> String {
    let mut encoded = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// E2B's error message from a failed answer, cut short.
fn provider_message(response: &Response) -> String {
    let message = response
        .json::<ApiError>()
        .map(|error| error.message)
        .unwrap_or_else(|_| response.text());
    message.chars().take(300).collect()
}

/// What an answer other than success means for routing.
fn status_error(what: &str, response: &Response) -> ExtError {
    let status = response.status;
    let message = format!(
        "{what}: E2B answered {status}: {}",
        provider_message(response)
    );
    match status {
        400 | 422 => ExtError::InvalidSpec(message),
        401 | 403 => ExtError::Unavailable(format!(
            "{message} (E2B refused the API key: check the key behind [secrets] api_key in the sidecar)"
        )),
        404 => ExtError::NotFound(message),
        429 => ExtError::Capacity(message),
        402 | 500..=599 => ExtError::Unavailable(message),
        _ => ExtError::Internal(message),
    }
}

fn transport_error(what: &str, error: &HttpError) -> ExtError {
    ExtError::Unavailable(format!("{what}: {}", error.message))
}

fn record_key(sandbox_id: &str) -> String {
    format!("sandbox/{sandbox_id}")
}

fn ambiguous_key(sandbox_id: &str) -> String {
    format!("ambiguous/{sandbox_id}")
}

fn store(key: &str, value: &str) -> Result<(), ExtError> {
    kv::set_str(key, value).map_err(|error| ExtError::Internal(format!("kv {key}: {error}")))
}

/// What this instance remembers of a sandbox it created:
/// `<e2b id> <created at, ms since the epoch>`.
fn recorded(sandbox_id: &str) -> Option<(String, u64)> {
    let text = kv::get_str(&record_key(sandbox_id))?;
    let (provider_id, created_ms) = text.split_once(' ')?;
    Some((provider_id.to_string(), created_ms.parse().ok()?))
}

/// Sandboxes E2B lists with this instance's tag for `sandbox_id`.
fn tagged(sandbox_id: &str) -> Result<Vec<Listed>, ExtError> {
    let filter = encode(&format!("{TAG}={sandbox_id}"));
    let url = format!("{}/v2/sandboxes?metadata={filter}", api_url());
    let response = api(Request::get(&url))
        .send()
        .map_err(|error| transport_error("listing sandboxes", &error))?;
    if !response.is_success() {
        return Err(status_error("listing sandboxes", &response));
    }
    response
        .json::<Vec<Listed>>()
        .map_err(|error| ExtError::Internal(error.message))
}

/// Kills one sandbox at E2B; true when it existed.
fn kill(provider_id: &str) -> Result<bool, ExtError> {
    let url = format!("{}/sandboxes/{}", api_url(), encode(provider_id));
    let response = api(Request::delete(&url))
        .send()
        .map_err(|error| transport_error("killing the sandbox", &error))?;
    match response.status {
        200..=299 => Ok(true),
        404 => Ok(false),
        _ => Err(status_error("killing the sandbox", &response)),
    }
}

/// Kills every sandbox tagged `sandbox_id`; how many there were.
fn kill_tagged(sandbox_id: &str) -> Result<usize, ExtError> {
    let found = tagged(sandbox_id)?;
    for sandbox in &found {
        kill(&sandbox.sandbox_id)?;
    }
    Ok(found.len())
}

/// Creates that got no answer: swept again until their ttl has passed
/// (E2B has stopped anything they made by then).
fn sweep_ambiguous() {
    for key in kv::keys("ambiguous/", SWEEP_PER_CREATE) {
        let sandbox_id = &key["ambiguous/".len()..];
        let until_ms = kv::get_str(&key)
            .and_then(|text| text.parse::<u64>().ok())
            .unwrap_or(0);
        match kill_tagged(sandbox_id) {
            Ok(killed) if killed > 0 || now_ms() > until_ms => {
                log::info(&format!(
                    "swept the ambiguous create of {sandbox_id}: killed {killed}"
                ));
                kv::delete(&key);
            }
            Ok(_) => {}
            Err(error) => log::warn(&format!(
                "cannot sweep the ambiguous create of {sandbox_id} yet: {error:?}"
            )),
        }
    }
}

/// A create whose answer never came: the sandbox may exist at E2B. Kill
/// what carries the tag; if nothing does (yet), remember to look again.
fn clean_up_ambiguous(spec: &SandboxSpec, error: &HttpError) -> ExtError {
    let outcome = match kill_tagged(&spec.sandbox_id) {
        Ok(0) => {
            let until_ms = now_ms().saturating_add(u64::from(spec.ttl_secs) * 1000);
            let _ = store(&ambiguous_key(&spec.sandbox_id), &until_ms.to_string());
            "none found yet; later creates look again until its ttl has passed".to_string()
        }
        Ok(killed) => format!("found and killed {killed} sandbox(es) it left at E2B"),
        Err(cleanup) => {
            let until_ms = now_ms().saturating_add(u64::from(spec.ttl_secs) * 1000);
            let _ = store(&ambiguous_key(&spec.sandbox_id), &until_ms.to_string());
            format!("cannot look for what it left yet ({cleanup:?}); later creates look again")
        }
    };
    log::warn(&format!(
        "create of {} got no answer ({}): {outcome}",
        spec.sandbox_id, error.message
    ));
    ExtError::Unavailable(format!(
        "E2B did not answer the create in time ({}); {outcome}",
        error.message
    ))
}

/// Parses RFC 3339 (`2026-11-30T14:49:44.123Z`, or with an offset) into
/// milliseconds since the epoch.
fn parse_rfc3339_ms(text: &str) -> Option<u64> {
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = text.get(range)?;
        digits
            .bytes()
            .all(|byte| byte.is_ascii_digit())
            .then(|| digits.parse().ok())?
    };
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    let mut rest = text.get(19..)?;
    let mut millis = 0i64;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        let kept = &fraction[..digits.min(3)];
        millis = format!("{kept:0<3}").parse().ok()?;
        rest = &fraction[digits..];
    }
    let offset_minutes = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let hours: i64 = rest.get(1..3)?.parse().ok()?;
            let minutes: i64 = rest.get(4..6)?.parse().ok()?;
            sign * (hours * 60 + minutes)
        }
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let shifted_year = if month <= 2 { year - 1 } else { year };
    let era = shifted_year.div_euclid(400);
    let year_of_era = shifted_year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    u64::try_from(seconds * 1000 + millis).ok()
}

impl Backend for E2b {
    fn info() -> ExtensionInfo {
        ExtensionInfo {
            id: "e2b".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: BackendKind::Saas,
            description:
                "E2B cloud sandboxes over its REST API, billed per second from a rate card".into(),
        }
    }

    fn estimate_cost(spec: SandboxSpec) -> Result<CostEstimate, ExtError> {
        validate(&spec)?;
        rate_card()?.estimate(&spec)
    }

    fn create(spec: SandboxSpec) -> Result<SandboxHandle, ExtError> {
        validate(&spec)?;
        let handle = |provider_id: String| SandboxHandle {
            backend_ref: provider_id,
            endpoint: None,
        };
        if let Some((provider_id, _)) = recorded(&spec.sandbox_id) {
            return Ok(handle(provider_id));
        }
        sweep_ambiguous();
        // A create retried after a crash: E2B may already run it.
        if let Some(existing) = tagged(&spec.sandbox_id)?.into_iter().next() {
            let started_ms = existing
                .started_at
                .as_deref()
                .and_then(parse_rfc3339_ms)
                .unwrap_or_else(now_ms);
            store(
                &record_key(&spec.sandbox_id),
                &format!("{} {started_ms}", existing.sandbox_id),
            )?;
            return Ok(handle(existing.sandbox_id));
        }

        let template = if spec.template.is_empty() {
            DEFAULT_TEMPLATE
        } else {
            spec.template.as_str()
        };
        let body = serde_json::json!({
            "templateID": template,
            "timeout": spec.ttl_secs,
            "metadata": { TAG: spec.sandbox_id, "sandboxer_profile": spec.profile },
            "envVars": spec.env.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        });
        let created_ms = now_ms();
        let request = api(Request::post(&format!("{}/sandboxes", api_url())))
            .json(&body)
            .map_err(|error| ExtError::Internal(error.message))?;
        let response = match request.send() {
            Ok(response) => response,
            Err(error) if error.sent => return Err(clean_up_ambiguous(&spec, &error)),
            Err(error) => return Err(transport_error("creating the sandbox", &error)),
        };
        match response.status {
            200..=299 => {}
            404 => {
                return Err(ExtError::InvalidSpec(format!(
                    "E2B has no template {template:?}: {}",
                    provider_message(&response)
                )));
            }
            _ => return Err(status_error("creating the sandbox", &response)),
        }
        let created: Created = response
            .json()
            .map_err(|error| ExtError::Internal(error.message))?;
        store(
            &record_key(&spec.sandbox_id),
            &format!("{} {created_ms}", created.sandbox_id),
        )?;
        log::info(&format!(
            "created E2B sandbox {} for {}",
            created.sandbox_id, spec.sandbox_id
        ));
        Ok(handle(created.sandbox_id))
    }

    fn destroy(spec: SandboxSpec, handle: SandboxHandle) -> Result<Usage, ExtError> {
        let provider_id = handle.backend_ref;
        let detail_url = format!("{}/sandboxes/{}", api_url(), encode(&provider_id));
        let detail = api(Request::get(&detail_url))
            .send()
            .map_err(|error| transport_error("reading the sandbox", &error))?;
        let provider_started_ms = match detail.status {
            200..=299 => detail
                .json::<Listed>()
                .ok()
                .and_then(|listed| listed.started_at)
                .as_deref()
                .and_then(parse_rfc3339_ms),
            // Gone already (its ttl ran out, or a destroy was retried).
            404 => None,
            _ => return Err(status_error("reading the sandbox", &detail)),
        };
        kill(&provider_id)?;
        let host_started_ms = recorded(&spec.sandbox_id).map(|(_, created_ms)| created_ms);
        kv::delete(&record_key(&spec.sandbox_id));
        let now = now_ms();
        let started_ms = provider_started_ms.or(host_started_ms).unwrap_or(now);
        let ttl_ms = u64::from(spec.ttl_secs) * 1000;
        Ok(Usage {
            // E2B stops a sandbox at its timeout: nothing runs past the ttl.
            wall_ms: now.saturating_sub(started_ms).min(ttl_ms),
            cpu_ms: 0,
            memory_mb_ms: 0,
            egress_bytes: 0,
        })
    }

    fn meter_actual(spec: SandboxSpec, usage: Usage) -> Result<MicroCredits, ExtError> {
        rate_card()?.actual(&spec, usage.wall_ms)
    }
}

export_backend!(E2b);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_read_as_epoch_milliseconds() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2026-11-30T14:49:44.123Z"),
            Some(1_796_050_184_123)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-11-30T15:49:44.123456789+01:00"),
            Some(1_796_050_184_123)
        );
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
    }

    #[test]
    fn metadata_filters_are_percent_encoded() {
        assert_eq!(encode("sandboxer_id=sbx-1a"), "sandboxer_id%3Dsbx-1a");
    }
}
