//! What a component may import, checked against what the operator granted.
//!
//! A component imports interfaces by name. The contract (`sandboxer:extension`
//! 0.1.x) is always provided. WASI's CLI, clock, I/O, random and filesystem
//! interfaces are linked with an empty context (no environment, no
//! preopened directories, no stdio), because every Rust guest imports them
//! through std even when it uses none. `wasi:sockets` is linked the same way
//! (language runtimes such as Python's import it whole): without a `network`
//! grant every socket operation is denied when it is tried. The host's own
//! capabilities (`process`) and outbound HTTP (`wasi:http`, the `http`
//! grant) load only with their grant. Anything else is refused at load,
//! with the interface named.

use super::sidecar::Grants;

const CONTRACT_PACKAGE: &str = "sandboxer:extension";
const CONTRACT_MAJOR_MINOR: &str = "0.1";

/// An import the component asks for, as `ext info` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImportedInterface {
    pub name: String,
    /// `contract`, `wasi` (linked empty) or the grant it needs (`network`).
    pub provided_as: &'static str,
}

/// Classifies every import; the first one that cannot be satisfied is the
/// reason the component is rejected.
pub fn check_imports<'a>(
    imports: impl IntoIterator<Item = &'a str>,
    grants: &Grants,
) -> Result<Vec<ImportedInterface>, String> {
    let mut accepted = Vec::new();
    for name in imports {
        let provided_as = classify(name, grants)?;
        accepted.push(ImportedInterface {
            name: name.to_string(),
            provided_as,
        });
    }
    accepted.sort_by(|left, right| left.name.cmp(&right.name));
    Ok(accepted)
}

fn classify(name: &str, grants: &Grants) -> Result<&'static str, String> {
    let (path, version) = name.split_once('@').unwrap_or((name, ""));
    let (package, interface) = path.split_once('/').unwrap_or((path, ""));
    let major_minor = version.split('.').take(2).collect::<Vec<_>>().join(".");

    if package == CONTRACT_PACKAGE {
        return if major_minor != CONTRACT_MAJOR_MINOR {
            Err(format!(
                "imports `{name}`: it was built for {CONTRACT_PACKAGE}@{version}, this host speaks {CONTRACT_PACKAGE}@{CONTRACT_MAJOR_MINOR}.x"
            ))
        } else if path.ends_with("/process") {
            if grants.process.is_empty() {
                Err(format!(
                    "imports `{name}` (starting programs on the host), which the operator has not granted: add `process = [\"program\"]` under [grants] in its sidecar"
                ))
            } else {
                Ok("process")
            }
        } else {
            Ok("contract")
        };
    }

    let Some(wasi_package) = package.strip_prefix("wasi:") else {
        return Err(format!(
            "imports `{name}`, which this host does not provide"
        ));
    };
    if major_minor != "0.2" {
        return Err(format!(
            "imports `{name}`: this host provides WASI 0.2 only"
        ));
    }
    match wasi_package {
        "cli" | "clocks" | "io" | "random" | "filesystem" => Ok("wasi"),
        "http" if !matches!(interface, "outgoing-handler" | "types") => Err(format!(
            "imports `{name}`, which this host does not provide (of wasi:http, only outgoing-handler and types)"
        )),
        "http" if grants.http.is_empty() => Err(format!(
            "imports `{name}` (outbound HTTP requests), which the operator has not granted: add `http = [\"host:port\"]` under [grants] in its sidecar"
        )),
        "http" => Ok("http"),
        "sockets" if !grants.network.is_empty() => Ok("network"),
        // Linked, and every use denied: no grant, no network.
        "sockets" => Ok("wasi, network denied"),
        _ => Err(format!(
            "imports `{name}`, which this host does not provide"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::sidecar::NetworkGrant;

    #[test]
    fn contract_and_plain_wasi_are_always_provided() {
        let imports = [
            "sandboxer:extension/host@0.1.0",
            "wasi:cli/stdout@0.2.6",
            "wasi:clocks/wall-clock@0.2.0",
        ];
        let accepted = check_imports(imports, &Grants::default()).unwrap();
        let provided: Vec<_> = accepted.iter().map(|import| import.provided_as).collect();
        assert_eq!(provided, ["contract", "wasi", "wasi"]);
    }

    #[test]
    fn sockets_are_denied_unless_the_network_is_granted() {
        let accepted = check_imports(["wasi:sockets/tcp@0.2.6"], &Grants::default()).unwrap();
        assert_eq!(accepted[0].provided_as, "wasi, network denied");
        let grants = Grants {
            network: vec![NetworkGrant {
                host: "127.0.0.1".into(),
                port: Some(80),
            }],
            ..Grants::default()
        };
        let accepted = check_imports(["wasi:sockets/tcp@0.2.6"], &grants).unwrap();
        assert_eq!(accepted[0].provided_as, "network");
    }

    #[test]
    fn the_process_capability_needs_its_grant() {
        let name = "sandboxer:extension/process@0.1.0";
        let error = check_imports([name], &Grants::default()).unwrap_err();
        assert!(
            error.contains("not granted") && error.contains("process"),
            "{error}"
        );
        let grants = Grants {
            process: vec!["bwrap".into()],
            ..Grants::default()
        };
        assert_eq!(
            check_imports([name], &grants).unwrap()[0].provided_as,
            "process"
        );
    }

    #[test]
    fn outbound_http_needs_its_grant() {
        let name = "wasi:http/outgoing-handler@0.2.4";
        let error = check_imports([name], &Grants::default()).unwrap_err();
        assert!(
            error.contains(name) && error.contains("not granted") && error.contains("http = ["),
            "{error}"
        );
        let grants = Grants {
            http: vec![crate::runtime::sidecar::HttpGrant {
                scheme: None,
                host: "api.e2b.dev".into(),
                port: 443,
            }],
            ..Grants::default()
        };
        let accepted = check_imports([name, "wasi:http/types@0.2.4"], &grants).unwrap();
        assert!(accepted.iter().all(|import| import.provided_as == "http"));
    }

    #[test]
    fn unknown_interfaces_and_other_versions_are_named() {
        for (name, needle) in [
            ("acme:secrets/vault@1.0.0", "does not provide"),
            ("wasi:http/incoming-handler@0.2.0", "does not provide"),
            ("wasi:cli/stdout@0.3.0", "WASI 0.2 only"),
            (
                "sandboxer:extension/host@0.2.0",
                "speaks sandboxer:extension@0.1.x",
            ),
        ] {
            let error = check_imports([name], &Grants::default()).unwrap_err();
            assert!(error.contains(name) && error.contains(needle), "{error}");
        }
    }
}
