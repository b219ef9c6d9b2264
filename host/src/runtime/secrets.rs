//! Secrets the operator gives an instance (`[secrets]` in its sidecar), and
//! how they reach a provider without passing through the extension.
//!
//! The extension never holds a secret's value. It writes a reference as the
//! whole value of a request header (`X-API-KEY: {{secret:api_key}}`); the
//! host, after the egress checks pass, puts the value in its place on the
//! way out, and only for a destination the secret is granted to. So the
//! value cannot end up in the extension's logs, errors, key-value store or
//! answers, nor in anything the host records from them; the host itself
//! never prints it ([`SecretValue`]'s `Debug` and `Display` are redacted).
//!
//! Values are read once, when the extension loads: from an environment
//! variable of the host process or from a file. One that cannot be read
//! does not stop the load; each request that asks for it is refused with
//! the reason (naming the variable or file, never a value).

use super::egress::{EgressRefusal, EgressRule};
use super::sidecar::{HttpGrant, SecretGrant, SecretSource};
use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;

/// A header value of exactly `{{secret:NAME}}` asks for secret `NAME`.
pub const REFERENCE_PREFIX: &str = "{{secret:";
pub const REFERENCE_SUFFIX: &str = "}}";
/// Largest secret value read from a file or variable.
pub const MAX_SECRET_BYTES: usize = 16 * 1024;

/// A secret's value: shown nowhere.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

#[derive(Debug)]
struct ResolvedSecret {
    value: Result<SecretValue, String>,
    /// Destinations it may be sent to; empty: every destination granted.
    hosts: Vec<HttpGrant>,
}

/// The secrets of one instance, read at load.
#[derive(Debug, Default)]
pub struct Secrets {
    entries: BTreeMap<String, ResolvedSecret>,
}

impl Secrets {
    /// Reads every secret's value now.
    pub fn resolve(grants: &BTreeMap<String, SecretGrant>) -> Self {
        let entries = grants
            .iter()
            .map(|(name, grant)| {
                let value = read_source(&grant.source);
                // Said once per request that asks for it (a refusal with
                // the rule), not on every load: an instance whose key is
                // not set yet is still listed, estimated and routed around.
                if let Err(reason) = &value {
                    tracing::debug!(secret = %name, "secret unavailable: {reason}");
                }
                (
                    name.clone(),
                    ResolvedSecret {
                        value,
                        hosts: grant.hosts.clone(),
                    },
                )
            })
            .collect();
        Self { entries }
    }

    /// Which secret a header value asks for, when it is a reference.
    pub fn reference(header_value: &[u8]) -> Option<&str> {
        std::str::from_utf8(header_value)
            .ok()?
            .strip_prefix(REFERENCE_PREFIX)?
            .strip_suffix(REFERENCE_SUFFIX)
    }

    /// The value of `name` for a request allowed by `grant`.
    pub fn value_for(&self, name: &str, grant: &HttpGrant) -> Result<&SecretValue, EgressRefusal> {
        let refusal = |detail: String| EgressRefusal::new(EgressRule::Secret, detail);
        let shown_name = super::error::one_line(name, 64);
        let secret = self.entries.get(name).ok_or_else(|| {
            refusal(format!(
                "the request asks for secret `{shown_name}`, which the extension's sidecar does not grant"
            ))
        })?;
        if !secret.hosts.is_empty()
            && !secret
                .hosts
                .iter()
                .any(|host| host.host == grant.host && host.port == grant.port)
        {
            return Err(refusal(format!(
                "secret `{shown_name}` is not granted to {grant}"
            )));
        }
        secret
            .value
            .as_ref()
            .map_err(|reason| refusal(format!("secret `{shown_name}` is unavailable: {reason}")))
    }
}

fn read_source(source: &SecretSource) -> Result<SecretValue, String> {
    let text = match source {
        SecretSource::Env(variable) => match std::env::var(variable) {
            Ok(text) => text,
            Err(std::env::VarError::NotPresent) => {
                return Err(format!("the environment variable {variable} is not set"));
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(format!("the environment variable {variable} is not UTF-8"));
            }
        },
        SecretSource::File(path) => {
            let mut text = String::new();
            std::fs::File::open(path)
                .and_then(|file| {
                    file.take(MAX_SECRET_BYTES as u64 + 1)
                        .read_to_string(&mut text)
                })
                .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
            let trimmed = text
                .strip_suffix('\n')
                .map(|rest| rest.strip_suffix('\r').unwrap_or(rest));
            trimmed.map(str::to_string).unwrap_or(text)
        }
    };
    let from = match source {
        SecretSource::Env(variable) => format!("the environment variable {variable}"),
        SecretSource::File(path) => path.display().to_string(),
    };
    if text.is_empty() {
        return Err(format!("{from} is empty"));
    }
    if text.len() > MAX_SECRET_BYTES {
        return Err(format!("{from} holds more than {MAX_SECRET_BYTES} bytes"));
    }
    // It travels as a header value.
    if text
        .bytes()
        .any(|byte| byte < 0x20 && byte != b'\t' || byte == 0x7f)
    {
        return Err(format!(
            "{from} holds control characters, which a header value cannot carry"
        ));
    }
    Ok(SecretValue(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(host: &str, port: u16) -> HttpGrant {
        HttpGrant {
            scheme: None,
            host: host.into(),
            port,
        }
    }

    #[test]
    fn references_are_whole_header_values() {
        assert_eq!(Secrets::reference(b"{{secret:api_key}}"), Some("api_key"));
        assert_eq!(Secrets::reference(b"Bearer {{secret:api_key}}"), None);
        assert_eq!(Secrets::reference(b"plain"), None);
    }

    #[test]
    fn values_come_from_files_and_go_only_to_their_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("key");
        std::fs::write(&key_file, "e2b_0123\n").unwrap();
        let mut grants = BTreeMap::new();
        grants.insert(
            "api_key".to_string(),
            SecretGrant {
                source: SecretSource::File(key_file),
                hosts: vec![grant("api.e2b.dev", 443)],
            },
        );
        grants.insert(
            "missing".to_string(),
            SecretGrant {
                source: SecretSource::Env("SANDBOXER_TEST_SURELY_UNSET_VARIABLE".into()),
                hosts: Vec::new(),
            },
        );
        let secrets = Secrets::resolve(&grants);
        let value = secrets
            .value_for("api_key", &grant("api.e2b.dev", 443))
            .unwrap();
        assert_eq!(value.expose(), "e2b_0123");
        assert_eq!(format!("{value:?} {value}"), "<secret> <secret>");
        assert!(
            format!("{secrets:?}").contains("<secret>")
                && !format!("{secrets:?}").contains("e2b_0123")
        );
        let elsewhere = secrets
            .value_for("api_key", &grant("127.0.0.1", 3999))
            .unwrap_err();
        assert!(
            elsewhere.detail.contains("not granted to 127.0.0.1:3999"),
            "{elsewhere}"
        );
        let missing = secrets
            .value_for("missing", &grant("api.e2b.dev", 443))
            .unwrap_err();
        assert!(
            missing
                .detail
                .contains("SANDBOXER_TEST_SURELY_UNSET_VARIABLE is not set"),
            "{missing}"
        );
        let unknown = secrets
            .value_for("other", &grant("api.e2b.dev", 443))
            .unwrap_err();
        assert_eq!(unknown.rule, EgressRule::Secret);
    }
}
