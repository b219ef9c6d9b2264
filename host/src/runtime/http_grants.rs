//! The sidecar's `http` grant and `[secrets]` table: their types, as
//! `ext info` shows them, and how their entries are read.

use serde::Deserialize;
use std::fmt;

/// The scheme an `http` grant pins, when it names one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpScheme {
    Http,
    Https,
}

impl HttpScheme {
    pub fn name(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// One destination the `http` grant allows: `host:port` (either scheme) or
/// `https://host[:port]` (that scheme only). The host is a name, compared
/// without regard to case, or an IP address; only an address named here
/// literally may be loopback, private or link-local (see `egress.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpGrant {
    pub scheme: Option<HttpScheme>,
    /// Lowercase, without the brackets of an IPv6 address.
    pub host: String,
    pub port: u16,
}

impl HttpGrant {
    /// The grant's host as an IP address, when it is one.
    pub fn literal_address(&self) -> Option<std::net::IpAddr> {
        self.host.parse().ok()
    }
}

impl fmt::Display for HttpGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(scheme) = self.scheme {
            write!(f, "{}://", scheme.name())?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl serde::Serialize for HttpGrant {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Where the host reads a secret's value. The value itself is never kept
/// in the sidecar, shown, logged or stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretSource {
    /// An environment variable of the host process.
    Env(String),
    /// A file of the host (its whole text, less one trailing newline).
    File(std::path::PathBuf),
}

/// One `[secrets]` entry: where its value comes from, and the destinations
/// the host may send it to (in a request header the extension asks for by
/// name; see `secrets.rs`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SecretGrant {
    #[serde(flatten)]
    pub source: SecretSource,
    /// Destinations (entries of the `http` grant) that may receive it;
    /// empty means every destination of the `http` grant.
    pub hosts: Vec<HttpGrant>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SecretFile {
    pub env: Option<String>,
    pub file: Option<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// `host:port`, `[v6]:port`, or `http(s)://host[:port]` (the scheme's
/// port by default).
pub(super) fn parse_http_grant(entry: &str) -> Result<HttpGrant, String> {
    let (scheme, rest) = match entry.split_once("://") {
        Some(("https", rest)) => (Some(HttpScheme::Https), rest),
        Some(("http", rest)) => (Some(HttpScheme::Http), rest),
        Some((other, _)) => {
            return Err(format!(
                "\"{entry}\" has the scheme \"{other}\"; only http and https are granted"
            ));
        }
        None => (None, entry),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@', ' ']) {
        return Err(format!(
            "\"{entry}\" must be host:port or a scheme and host, without a path"
        ));
    }
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("\"{entry}\" has an unclosed ["))?;
        (host, after.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(format!("\"{entry}\" has no host"));
    }
    let port = match (port, scheme) {
        (Some(digits), _) => digits
            .parse::<u16>()
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| format!("\"{entry}\" has an invalid port \"{digits}\""))?,
        (None, Some(HttpScheme::Https)) => 443,
        (None, Some(HttpScheme::Http)) => 80,
        (None, None) => {
            return Err(format!(
                "\"{entry}\" must be host:port, or name its scheme (https://{entry})"
            ));
        }
    };
    Ok(HttpGrant {
        scheme,
        host: host.to_ascii_lowercase(),
        port,
    })
}

/// A secret's name is how the extension asks for it: short and plain.
fn valid_secret_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
}

pub(super) fn parse_secret(
    name: &str,
    secret: SecretFile,
    http: &[HttpGrant],
) -> Result<SecretGrant, String> {
    if !valid_secret_name(name) {
        return Err("a secret's name is 1 to 64 letters, digits, '_' or '-'".into());
    }
    let source = match (secret.env, secret.file) {
        (Some(variable), None) if !variable.is_empty() && !variable.contains('=') => {
            SecretSource::Env(variable)
        }
        (None, Some(path)) if !path.is_empty() => SecretSource::File(path.into()),
        (Some(_), Some(_)) => return Err("name either env or file, not both".into()),
        (None, None) => {
            return Err(
                "say where its value comes from: { env = \"VARIABLE\" } or { file = \"/path\" }"
                    .into(),
            );
        }
        _ => return Err("an empty or malformed env or file".into()),
    };
    if http.is_empty() {
        return Err(
            "a secret is only ever sent in HTTP requests: grant `http` destinations under [grants] first"
                .into(),
        );
    }
    let mut hosts = Vec::new();
    for entry in &secret.hosts {
        let grant = parse_http_grant(entry)?;
        if !http
            .iter()
            .any(|granted| granted.host == grant.host && granted.port == grant.port)
        {
            return Err(format!(
                "hosts: \"{entry}\" is not a destination of grants.http"
            ));
        }
        hosts.push(grant);
    }
    Ok(SecretGrant { source, hosts })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::sidecar::Sidecar;
    use std::path::Path;

    #[test]
    fn http_grants_take_host_port_or_a_scheme() {
        let sidecar = Sidecar::parse(
            r#"
            [grants]
            http = ["API.e2b.dev:443", "https://api.example.com", "http://127.0.0.1:3999", "[::1]:8080"]
            [secrets]
            api_key = { env = "SANDBOXER_E2B_API_KEY", hosts = ["api.e2b.dev:443"] }
            token = { file = "/run/token" }
            "#,
            Path::new("ext.toml"),
        )
        .unwrap();
        let shown: Vec<String> = sidecar
            .grants
            .http
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            shown,
            [
                "api.e2b.dev:443",
                "https://api.example.com:443",
                "http://127.0.0.1:3999",
                "[::1]:8080"
            ]
        );
        assert_eq!(
            sidecar.grants.http[2].literal_address(),
            Some("127.0.0.1".parse().unwrap())
        );
        let api_key = &sidecar.grants.secrets["api_key"];
        assert_eq!(
            api_key.source,
            SecretSource::Env("SANDBOXER_E2B_API_KEY".into())
        );
        assert_eq!(api_key.hosts[0].to_string(), "api.e2b.dev:443");
        let json = serde_json::to_string(&sidecar.grants.secrets).unwrap();
        assert_eq!(
            json,
            r#"{"api_key":{"env":"SANDBOXER_E2B_API_KEY","hosts":["api.e2b.dev:443"]},"token":{"file":"/run/token","hosts":[]}}"#
        );
    }
}
