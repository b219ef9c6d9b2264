//! The egress policy of the `http` capability: which destinations an
//! extension may reach and which addresses a destination may resolve to.
//!
//! Every outbound request of an extension passes [`EgressPolicy::destination`]
//! (scheme, host and port on the grant) and then [`EgressPolicy::addresses`]
//! (what the host resolved the name to). A name must not resolve to a
//! loopback, private, link-local, shared (CGNAT), cloud-metadata or other
//! non-public address: only a grant that names such an address literally
//! (`127.0.0.1:3999`) reaches it. The host then connects to an address it
//! checked, never resolving the name a second time (DNS rebinding).
//!
//! This module decides; `http_client.rs` sends. Each refusal is an
//! [`EgressRefusal`] naming its rule, for the extension and the host's log.

use super::sidecar::{HttpGrant, HttpScheme};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The rule a request broke, as logs and messages name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressRule {
    /// Scheme, host or port not on the `http` grant.
    NotGranted,
    /// The name resolved to an address only a literal grant may reach.
    PrivateAddress,
    /// The name did not resolve.
    Resolution,
    /// More requests than `limits.http_requests_per_call`.
    RequestsPerCall,
    /// More response bytes than `limits.http_response_mb`.
    ResponseSize,
    /// The request's deadline passed (its own, or the call's less a reserve).
    Deadline,
    /// A secret the request asked for is unknown, unavailable, or not for
    /// this destination.
    Secret,
}

impl EgressRule {
    pub fn name(self) -> &'static str {
        match self {
            Self::NotGranted => "not-granted",
            Self::PrivateAddress => "private-address",
            Self::Resolution => "resolution",
            Self::RequestsPerCall => "requests-per-call",
            Self::ResponseSize => "response-size",
            Self::Deadline => "deadline",
            Self::Secret => "secret",
        }
    }
}

/// Longest refusal detail kept.
pub const MAX_DETAIL_CHARS: usize = 1000;

/// A request the policy refused or ended, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRefusal {
    pub rule: EgressRule,
    pub detail: String,
}

impl EgressRefusal {
    /// The detail is cut to one line of at most [`MAX_DETAIL_CHARS`]: it
    /// may quote a host name the guest wrote.
    pub fn new(rule: EgressRule, detail: impl Into<String>) -> Self {
        Self {
            rule,
            detail: super::error::one_line(&detail.into(), MAX_DETAIL_CHARS),
        }
    }
}

impl fmt::Display for EgressRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refused by the host's egress policy ({}): {}",
            self.rule.name(),
            self.detail
        )
    }
}

/// Where a request goes, as the guest wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub scheme: HttpScheme,
    /// Lowercase; an IPv6 address without brackets.
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}://[{}]:{}", self.scheme.name(), self.host, self.port)
        } else {
            write!(f, "{}://{}:{}", self.scheme.name(), self.host, self.port)
        }
    }
}

/// The destinations of one instance's `http` grant.
#[derive(Debug, Default)]
pub struct EgressPolicy {
    grants: Vec<HttpGrant>,
}

impl EgressPolicy {
    pub fn new(grants: &[HttpGrant]) -> Self {
        Self {
            grants: grants.to_vec(),
        }
    }

    /// The grant that allows `destination`.
    pub fn destination(&self, destination: &Destination) -> Result<&HttpGrant, EgressRefusal> {
        self.grants
            .iter()
            .find(|grant| {
                grant.host == destination.host
                    && grant.port == destination.port
                    && grant
                        .scheme
                        .is_none_or(|scheme| scheme == destination.scheme)
            })
            .ok_or_else(|| {
                let granted: Vec<String> = self.grants.iter().map(ToString::to_string).collect();
                EgressRefusal::new(
                    EgressRule::NotGranted,
                    format!(
                        "{destination} is not in the extension's http grant ({})",
                        if granted.is_empty() {
                            "none".to_string()
                        } else {
                            granted.join(", ")
                        }
                    ),
                )
            })
    }

    /// The addresses the host may connect to for `destination`, from what
    /// its name resolved to: all of them, when none is refused. A literal
    /// grant reaches exactly its own address, whatever range it is in.
    pub fn addresses(
        grant: &HttpGrant,
        destination: &Destination,
        resolved: &[SocketAddr],
    ) -> Result<Vec<SocketAddr>, EgressRefusal> {
        if let Some(literal) = grant.literal_address() {
            return Ok(vec![SocketAddr::new(literal, destination.port)]);
        }
        if resolved.is_empty() {
            return Err(EgressRefusal::new(
                EgressRule::Resolution,
                format!("{} resolved to no address", destination.host),
            ));
        }
        for address in resolved {
            if let Some(range) = refused_range(address.ip()) {
                return Err(EgressRefusal::new(
                    EgressRule::PrivateAddress,
                    format!(
                        "{} resolves to {}, a {range} address; only a grant naming that address literally reaches it",
                        destination.host,
                        address.ip()
                    ),
                ));
            }
        }
        Ok(resolved.to_vec())
    }
}

/// Cloud metadata services, named first so a refusal says what they are.
const METADATA_V4: [Ipv4Addr; 3] = [
    Ipv4Addr::new(169, 254, 169, 254), // AWS, GCP, Azure IMDS, OpenStack, Oracle
    Ipv4Addr::new(168, 63, 129, 16),   // Azure wire server (a public range)
    Ipv4Addr::new(100, 100, 100, 200), // Alibaba Cloud
];
const METADATA_V6: [Ipv6Addr; 1] = [Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254)];

/// The kind of non-public address `ip` is, or none for a public address.
pub fn refused_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => refused_v6(v6),
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match () {
        _ if METADATA_V4.contains(&ip) => "cloud metadata",
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_private() => "private (RFC 1918)",
        _ if ip.is_link_local() => "link-local",
        _ if a == 100 && (64..128).contains(&b) => "shared (CGNAT, RFC 6598)",
        _ if a == 0 => "this-network",
        _ if ip.is_broadcast() => "broadcast",
        _ if ip.is_multicast() || a >= 240 => "multicast or reserved",
        _ if a == 192 && b == 0 && c == 0 => "IETF protocol assignment",
        _ if ip.is_documentation() => "documentation",
        _ if a == 198 && (b == 18 || b == 19) => "benchmarking",
        _ => return None,
    })
}

fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if METADATA_V6.contains(&ip) {
        return Some("cloud metadata");
    }
    // An IPv4 address carried inside IPv6 is judged as that IPv4 address.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return refused_v4(v4);
    }
    let segments = ip.segments();
    let embedded = |high: u16, low: u16| {
        Ipv4Addr::new((high >> 8) as u8, high as u8, (low >> 8) as u8, low as u8)
    };
    // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) reach the IPv4 address
    // inside them.
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return refused_v4(embedded(segments[6], segments[7]));
    }
    if segments[0] == 0x2002 {
        return refused_v4(embedded(segments[1], segments[2]));
    }
    Some(match () {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() => "unspecified",
        _ if segments[0] & 0xfe00 == 0xfc00 => "unique local (ULA)",
        _ if segments[0] & 0xffc0 == 0xfe80 => "link-local",
        _ if segments[0] & 0xffc0 == 0xfec0 => "site-local",
        _ if ip.is_multicast() => "multicast",
        _ if segments[0] == 0x2001 && segments[1] == 0x0db8 => "documentation",
        // IPv4-compatible (::a.b.c.d, deprecated) and the rest of ::/8.
        _ if segments[0] == 0 => "reserved",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(scheme: Option<HttpScheme>, host: &str, port: u16) -> HttpGrant {
        HttpGrant {
            scheme,
            host: host.into(),
            port,
        }
    }

    fn destination(scheme: HttpScheme, host: &str, port: u16) -> Destination {
        Destination {
            scheme,
            host: host.into(),
            port,
        }
    }

    #[test]
    fn only_granted_scheme_host_and_port_pass() {
        let policy = EgressPolicy::new(&[
            grant(None, "api.e2b.dev", 443),
            grant(Some(HttpScheme::Https), "pinned.example", 443),
        ]);
        assert!(
            policy
                .destination(&destination(HttpScheme::Https, "api.e2b.dev", 443))
                .is_ok()
        );
        for refused in [
            destination(HttpScheme::Https, "api.e2b.dev", 444),
            destination(HttpScheme::Https, "evil.example", 443),
            destination(HttpScheme::Http, "pinned.example", 443),
        ] {
            let refusal = policy.destination(&refused).unwrap_err();
            assert_eq!(refusal.rule, EgressRule::NotGranted);
            assert!(
                refusal.to_string().contains(&refused.to_string())
                    && refusal.to_string().contains("(not-granted)"),
                "{refusal}"
            );
        }
    }

    #[test]
    fn names_must_resolve_to_public_addresses_unless_granted_literally() {
        let by_name = grant(None, "localhost", 3999);
        let to = destination(HttpScheme::Http, "localhost", 3999);
        let loopback: SocketAddr = "127.0.0.1:3999".parse().unwrap();
        let refusal = EgressPolicy::addresses(&by_name, &to, &[loopback]).unwrap_err();
        assert_eq!(refusal.rule, EgressRule::PrivateAddress);
        assert!(
            refusal.detail.contains("127.0.0.1, a loopback address"),
            "{refusal}"
        );
        let public: SocketAddr = "93.184.216.34:3999".parse().unwrap();
        assert_eq!(
            EgressPolicy::addresses(&by_name, &to, &[public]).unwrap(),
            [public]
        );
        // One bad answer among good ones refuses the whole request.
        assert!(EgressPolicy::addresses(&by_name, &to, &[public, loopback]).is_err());
        let literal = grant(None, "127.0.0.1", 3999);
        let to_literal = destination(HttpScheme::Http, "127.0.0.1", 3999);
        assert_eq!(
            EgressPolicy::addresses(&literal, &to_literal, &[]).unwrap(),
            [loopback]
        );
    }

    #[test]
    fn non_public_ranges_are_named() {
        for (address, range) in [
            ("169.254.169.254", "cloud metadata"),
            ("168.63.129.16", "cloud metadata"),
            ("fd00:ec2::254", "cloud metadata"),
            ("127.0.0.53", "loopback"),
            ("10.1.2.3", "private (RFC 1918)"),
            ("172.16.0.1", "private (RFC 1918)"),
            ("192.168.1.1", "private (RFC 1918)"),
            ("169.254.1.1", "link-local"),
            ("100.64.0.1", "shared (CGNAT, RFC 6598)"),
            ("100.127.255.255", "shared (CGNAT, RFC 6598)"),
            ("0.0.0.0", "this-network"),
            ("255.255.255.255", "broadcast"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fd12:3456::1", "unique local (ULA)"),
            ("fe80::1", "link-local"),
            ("::ffff:10.0.0.1", "private (RFC 1918)"),
            ("::ffff:169.254.169.254", "cloud metadata"),
            ("64:ff9b::7f00:1", "loopback"),
            ("2002:c0a8:0101::1", "private (RFC 1918)"),
        ] {
            assert_eq!(
                refused_range(address.parse().unwrap()),
                Some(range),
                "{address}"
            );
        }
        for public in [
            "1.1.1.1",
            "100.128.0.1",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(refused_range(public.parse().unwrap()), None, "{public}");
        }
    }
}
