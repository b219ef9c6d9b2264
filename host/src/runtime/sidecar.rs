//! The sidecar file `<instance>.toml` next to an extension's `.wasm`: the
//! operator's limits, grants and config for that instance.
//!
//! Every key is optional; a key the host does not know is an error that
//! names the key, the line and the file, so a typo never silently leaves a
//! limit at its default.

pub use super::http_grants::{HttpGrant, HttpScheme, SecretGrant, SecretSource};
use super::http_grants::{SecretFile, parse_http_grant, parse_secret};
use crate::toml_file::describe_toml_error;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

/// Default wall-clock deadline of one call.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Default cap on an instance's linear memory.
pub const DEFAULT_MEMORY_MB: u64 = 64;
/// Deadline of the `info` call made while loading.
pub const INFO_TIMEOUT_MS: u64 = 1_000;
/// Default quota of key and value bytes in an instance's key-value store.
pub const DEFAULT_KV_QUOTA_MB: u64 = 16;
/// Largest key-value quota a sidecar may set.
pub const MAX_KV_QUOTA_MB: u64 = 1024;
/// Default number of outbound HTTP requests one call may make.
pub const DEFAULT_HTTP_REQUESTS_PER_CALL: u32 = 100;
/// Largest `limits.http_requests_per_call`.
pub const MAX_HTTP_REQUESTS_PER_CALL: u32 = 10_000;
/// Default cap on the response body bytes of all requests of one call.
pub const DEFAULT_HTTP_RESPONSE_MB: u64 = 16;
/// Largest `limits.http_response_mb`.
pub const MAX_HTTP_RESPONSE_MB: u64 = 1024;
/// Default time one outbound HTTP request may take, connect to last byte
/// (the call's own deadline cuts it shorter).
pub const DEFAULT_HTTP_TIMEOUT_MS: u64 = 30_000;

/// The limits each call of an instance runs under.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    /// Wall-clock deadline of one call, in milliseconds.
    pub timeout_ms: u64,
    /// Cap on the total linear memory of one instance, in MiB.
    pub memory_mb: u64,
    /// Fuel (roughly, WebAssembly instructions) one call may burn; none means
    /// only the wall-clock deadline bounds a call.
    pub fuel: Option<u64>,
    /// Keep instances between calls instead of a fresh one per call. Fast
    /// for big guests (Python, JavaScript); the guest's memory, statics
    /// included, then survives from one call to the next.
    pub reuse_instances: bool,
    /// Quota on the bytes of keys and values the instance's key-value store
    /// holds, in MiB.
    pub kv_quota_mb: u64,
    /// Outbound HTTP requests one call may make (with the `http` grant).
    pub http_requests_per_call: u32,
    /// Response body bytes all requests of one call may receive, in MiB.
    pub http_response_mb: u64,
    /// Time one request may take, from connect to its last byte, in
    /// milliseconds; the call's deadline ends it sooner.
    pub http_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout_ms: DEFAULT_TIMEOUT_MS,
            memory_mb: DEFAULT_MEMORY_MB,
            fuel: None,
            reuse_instances: false,
            kv_quota_mb: DEFAULT_KV_QUOTA_MB,
            http_requests_per_call: DEFAULT_HTTP_REQUESTS_PER_CALL,
            http_response_mb: DEFAULT_HTTP_RESPONSE_MB,
            http_timeout_ms: DEFAULT_HTTP_TIMEOUT_MS,
        }
    }
}

impl Limits {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn memory_bytes(&self) -> usize {
        usize::try_from(self.memory_mb.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX)
    }

    pub fn kv_quota_bytes(&self) -> u64 {
        self.kv_quota_mb.saturating_mul(1024 * 1024)
    }

    pub fn http_response_bytes(&self) -> u64 {
        self.http_response_mb.saturating_mul(1024 * 1024)
    }
}

/// One `host:port` the `network` grant allows; port `*` allows any port.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NetworkGrant {
    pub host: String,
    pub port: Option<u16>,
}

impl fmt::Display for NetworkGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.host),
            None => write!(f, "{}:*", self.host),
        }
    }
}

/// Capabilities the operator grants this instance. Everything absent is
/// denied.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Grants {
    /// Outbound TCP connections (`wasi:sockets`) to these addresses only.
    pub network: Vec<NetworkGrant>,
    /// Programs the `process` capability may start (names on the host's
    /// PATH, or paths).
    pub process: Vec<String>,
    /// Outbound HTTP requests (`wasi:http/outgoing-handler`) to these
    /// destinations only, under the host's egress policy.
    pub http: Vec<HttpGrant>,
    /// Secrets the host puts into requests for the extension, by name.
    pub secrets: BTreeMap<String, SecretGrant>,
}

/// What the operator tells routing about an instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RoutingHints {
    /// Time to ready to assume before any create has been measured.
    pub expected_latency_ms: Option<u64>,
}

/// How far the host lets an instance's own price stand (see docs/payments.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BillingPolicy {
    /// The most an instance may charge, in millionths of what the host can
    /// justify (the hold, or the estimate's rate over the wall time the host
    /// measured when that is more): 1_000_000 charges at most that. The rest
    /// of what `meter-actual` asks is recorded as disputed, never charged.
    pub charge_tolerance_ppm: u64,
}

impl Default for BillingPolicy {
    fn default() -> Self {
        Self {
            charge_tolerance_ppm: 1_000_000,
        }
    }
}

/// Largest `billing.charge_tolerance`: ten times what the host can justify.
pub const MAX_CHARGE_TOLERANCE_PPM: u64 = 10_000_000;

/// A parsed sidecar, with defaults filled in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sidecar {
    pub limits: Limits,
    pub grants: Grants,
    pub routing: RoutingHints,
    pub billing: BillingPolicy,
    /// `[config]` values as text, read by the extension through `config-get`.
    pub config: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct SidecarError {
    pub file: String,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SidecarFile {
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    grants: GrantsFile,
    #[serde(default)]
    routing: RoutingFile,
    #[serde(default)]
    billing: BillingFile,
    #[serde(default)]
    config: toml::Table,
    #[serde(default)]
    secrets: BTreeMap<String, SecretFile>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BillingFile {
    /// Decimal text such as "1.25"; a string so no float is involved.
    charge_tolerance: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RoutingFile {
    expected_latency_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    timeout_ms: Option<u64>,
    memory_mb: Option<u64>,
    fuel: Option<u64>,
    reuse_instances: Option<bool>,
    kv_quota_mb: Option<u64>,
    http_requests_per_call: Option<u32>,
    http_response_mb: Option<u64>,
    http_timeout_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GrantsFile {
    #[serde(default)]
    network: Vec<String>,
    #[serde(default)]
    process: Vec<String>,
    #[serde(default)]
    http: Vec<String>,
}

impl Sidecar {
    /// Reads `path`; a missing file is the default sidecar.
    pub fn load(path: &Path) -> Result<Self, SidecarError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(error) => Err(SidecarError {
                file: path.display().to_string(),
                message: format!("cannot read: {error}"),
            }),
        }
    }

    /// Parses sidecar text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, SidecarError> {
        let error = |message: String| SidecarError {
            file: path.display().to_string(),
            message,
        };
        let file: SidecarFile = toml::from_str(text)
            .map_err(|toml_error| error(describe_toml_error(text, &toml_error)))?;

        let mut limits = Limits::default();
        if let Some(timeout_ms) = file.limits.timeout_ms {
            if !(1..=3_600_000).contains(&timeout_ms) {
                return Err(error(format!(
                    "limits.timeout_ms must be between 1 and 3600000, got {timeout_ms}"
                )));
            }
            limits.timeout_ms = timeout_ms;
        }
        if let Some(memory_mb) = file.limits.memory_mb {
            if !(1..=4096).contains(&memory_mb) {
                return Err(error(format!(
                    "limits.memory_mb must be between 1 and 4096, got {memory_mb}"
                )));
            }
            limits.memory_mb = memory_mb;
        }
        if let Some(fuel) = file.limits.fuel {
            if fuel == 0 {
                return Err(error(
                    "limits.fuel must be above zero; leave it out for no fuel limit".into(),
                ));
            }
            limits.fuel = Some(fuel);
        }
        limits.reuse_instances = file.limits.reuse_instances.unwrap_or(false);
        if let Some(kv_quota_mb) = file.limits.kv_quota_mb {
            if kv_quota_mb > MAX_KV_QUOTA_MB {
                return Err(error(format!(
                    "limits.kv_quota_mb must be between 0 and {MAX_KV_QUOTA_MB}, got {kv_quota_mb}"
                )));
            }
            limits.kv_quota_mb = kv_quota_mb;
        }
        if let Some(requests) = file.limits.http_requests_per_call {
            if !(1..=MAX_HTTP_REQUESTS_PER_CALL).contains(&requests) {
                return Err(error(format!(
                    "limits.http_requests_per_call must be between 1 and {MAX_HTTP_REQUESTS_PER_CALL}, got {requests}"
                )));
            }
            limits.http_requests_per_call = requests;
        }
        if let Some(response_mb) = file.limits.http_response_mb {
            if !(1..=MAX_HTTP_RESPONSE_MB).contains(&response_mb) {
                return Err(error(format!(
                    "limits.http_response_mb must be between 1 and {MAX_HTTP_RESPONSE_MB}, got {response_mb}"
                )));
            }
            limits.http_response_mb = response_mb;
        }
        if let Some(http_timeout_ms) = file.limits.http_timeout_ms {
            if !(1..=3_600_000).contains(&http_timeout_ms) {
                return Err(error(format!(
                    "limits.http_timeout_ms must be between 1 and 3600000, got {http_timeout_ms}"
                )));
            }
            limits.http_timeout_ms = http_timeout_ms;
        }

        let network = file
            .grants
            .network
            .iter()
            .map(|entry| {
                parse_network_grant(entry)
                    .map_err(|message| error(format!("grants.network: {message}")))
            })
            .collect::<Result<_, _>>()?;

        let mut config = BTreeMap::new();
        for (key, value) in file.config {
            let text = match value {
                toml::Value::String(text) => text,
                toml::Value::Integer(number) => number.to_string(),
                // Shortest text that reads back as the same float: "0.01"
                // stays "0.01". Quoting amounts avoids floats altogether.
                toml::Value::Float(number) => number.to_string(),
                toml::Value::Boolean(flag) => flag.to_string(),
                toml::Value::Datetime(datetime) => datetime.to_string(),
                toml::Value::Array(_) | toml::Value::Table(_) => {
                    return Err(error(format!(
                        "config.{key} must be a string, number or boolean, not {}",
                        value.type_str()
                    )));
                }
            };
            config.insert(key, text);
        }

        let routing = RoutingHints {
            expected_latency_ms: file.routing.expected_latency_ms,
        };
        let mut billing = BillingPolicy::default();
        if let Some(text) = &file.billing.charge_tolerance {
            let ppm = sandboxer_credits::parse_credits(text)
                .ok()
                .filter(|ppm| (1_000_000..=MAX_CHARGE_TOLERANCE_PPM).contains(ppm))
                .ok_or_else(|| {
                    error(format!(
                        "billing.charge_tolerance must be a decimal between \"1\" and \"10\" (at most 6 places), got {text:?}"
                    ))
                })?;
            billing.charge_tolerance_ppm = ppm;
        }
        if let Some(empty) = file
            .grants
            .process
            .iter()
            .find(|program| program.trim().is_empty())
        {
            return Err(error(format!("grants.process: {empty:?} is not a program")));
        }
        let http: Vec<HttpGrant> = file
            .grants
            .http
            .iter()
            .map(|entry| {
                parse_http_grant(entry).map_err(|message| error(format!("grants.http: {message}")))
            })
            .collect::<Result<_, _>>()?;
        let mut secrets = BTreeMap::new();
        for (name, secret) in file.secrets {
            let secret = parse_secret(&name, secret, &http)
                .map_err(|message| error(format!("secrets.{name}: {message}")))?;
            secrets.insert(name, secret);
        }
        let grants = Grants {
            network,
            process: file.grants.process,
            http,
            secrets,
        };
        Ok(Self {
            limits,
            grants,
            routing,
            billing,
            config,
        })
    }
}

fn parse_network_grant(entry: &str) -> Result<NetworkGrant, String> {
    let (host, port) = entry
        .rsplit_once(':')
        .ok_or_else(|| format!("\"{entry}\" must be host:port (port may be *)"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("\"{entry}\" has no host"));
    }
    let port = match port {
        "*" => None,
        digits => Some(
            digits
                .parse::<u16>()
                .map_err(|_| format!("\"{entry}\" has an invalid port \"{digits}\""))?,
        ),
    };
    Ok(NetworkGrant {
        host: host.to_string(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Sidecar, SidecarError> {
        Sidecar::parse(text, Path::new("ext.toml"))
    }

    #[test]
    fn empty_sidecar_means_documented_defaults() {
        let sidecar = parse("").unwrap();
        assert_eq!(
            sidecar.limits,
            Limits {
                timeout_ms: 10_000,
                memory_mb: 64,
                fuel: None,
                reuse_instances: false,
                kv_quota_mb: 16,
                http_requests_per_call: 100,
                http_response_mb: 16,
                http_timeout_ms: 30_000,
            }
        );
        assert!(sidecar.grants.network.is_empty());
        assert!(sidecar.config.is_empty());
    }

    #[test]
    fn reads_limits_grants_and_config_as_text() {
        let sidecar = parse(
            r#"
            [limits]
            timeout_ms = 250
            memory_mb = 16
            fuel = 1000000
            reuse_instances = true
            kv_quota_mb = 2
            [grants]
            network = ["127.0.0.1:8080", "api.example.com:*", "[::1]:443"]
            [routing]
            expected_latency_ms = 750
            [config]
            rate = "0.01"
            float_rate = 0.01
            count = 3
            on = true
            "#,
        )
        .unwrap();
        assert_eq!(
            sidecar.limits,
            Limits {
                timeout_ms: 250,
                memory_mb: 16,
                fuel: Some(1_000_000),
                reuse_instances: true,
                kv_quota_mb: 2,
                http_requests_per_call: 100,
                http_response_mb: 16,
                http_timeout_ms: 30_000,
            }
        );
        assert_eq!(sidecar.limits.kv_quota_bytes(), 2 * 1024 * 1024);
        let grants: Vec<String> = sidecar
            .grants
            .network
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(grants, ["127.0.0.1:8080", "api.example.com:*", "::1:443"]);
        assert_eq!(sidecar.config["rate"], "0.01");
        assert_eq!(sidecar.config["float_rate"], "0.01");
        assert_eq!(sidecar.config["count"], "3");
        assert_eq!(sidecar.config["on"], "true");
        assert_eq!(sidecar.routing.expected_latency_ms, Some(750));
        assert_eq!(sidecar.billing.charge_tolerance_ppm, 1_000_000);
        let tolerant = parse("[billing]\ncharge_tolerance = \"1.25\"").unwrap();
        assert_eq!(tolerant.billing.charge_tolerance_ppm, 1_250_000);
    }

    #[test]
    fn unknown_keys_name_the_key_line_and_file() {
        let error = parse("[limits]\ntimeout_ms = 5\nmemroy_mb = 3\n")
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("ext.toml: line 3:"), "{error}");
        assert!(error.contains("memroy_mb"), "{error}");
        let error = parse("[grant]\nnetwork = []\n").unwrap_err().to_string();
        assert!(
            error.contains("line 1") && error.contains("grant"),
            "{error}"
        );
        assert!(!error.contains('\n'), "one line: {error}");
    }

    #[test]
    fn rejects_out_of_range_limits_and_bad_values() {
        for (text, needle) in [
            ("[limits]\ntimeout_ms = 0", "timeout_ms"),
            ("[limits]\nmemory_mb = 100000", "memory_mb"),
            ("[limits]\nfuel = 0", "fuel"),
            (
                "[limits]\nkv_quota_mb = 5000",
                "kv_quota_mb must be between 0 and 1024",
            ),
            ("[limits]\ntimeout_ms = \"fast\"", "line 2"),
            ("[grants]\nnetwork = [\"nohost\"]", "host:port"),
            ("[grants]\nnetwork = [\"h:99999\"]", "invalid port"),
            ("[config]\nrates = [1, 2]", "config.rates"),
            (
                "[billing]\ncharge_tolerance = \"0.5\"",
                "between \"1\" and \"10\"",
            ),
            ("[billing]\ncharge_tolerance = \"11\"", "charge_tolerance"),
            ("[billing]\ncharge_tolerance = 1.5", "line 2"),
            (
                "[grants]\nhttp = [\"api.example.com\"]",
                "must be host:port",
            ),
            (
                "[grants]\nhttp = [\"ftp://a.example\"]",
                "only http and https",
            ),
            (
                "[grants]\nhttp = [\"https://a.example/v1\"]",
                "without a path",
            ),
            ("[grants]\nhttp = [\"a.example:0\"]", "invalid port"),
            (
                "[limits]\nhttp_requests_per_call = 0",
                "http_requests_per_call must be between 1 and 10000",
            ),
            ("[limits]\nhttp_response_mb = 0", "http_response_mb"),
            ("[limits]\nhttp_timeout_ms = 0", "http_timeout_ms"),
            (
                "[grants]\nhttp = [\"a.example:443\"]\n[secrets]\nkey = {}",
                "secrets.key: say where its value comes from",
            ),
            (
                "[grants]\nhttp = [\"a.example:443\"]\n[secrets]\nkey = { env = \"K\", file = \"/k\" }",
                "not both",
            ),
            (
                "[secrets]\nkey = { env = \"K\" }",
                "grant `http` destinations under [grants] first",
            ),
            (
                "[grants]\nhttp = [\"a.example:443\"]\n[secrets]\nkey = { env = \"K\", hosts = [\"b.example:443\"] }",
                "is not a destination of grants.http",
            ),
            (
                "[grants]\nhttp = [\"a.example:443\"]\n[secrets]\nkey = { env = \"K\", header = \"X\" }",
                "header",
            ),
            (
                "[grants]\nhttp = [\"a.example:443\"]\n[secrets]\n\"bad name\" = { env = \"K\" }",
                "a secret's name is",
            ),
        ] {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(needle), "{text:?} gave {error}");
        }
    }
}
