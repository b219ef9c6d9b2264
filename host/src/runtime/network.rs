//! The WASI context each call starts from: empty, plus the outbound TCP
//! addresses of the `network` grant.
//!
//! Empty means no environment variables, no arguments, no preopened
//! directories, no stdin, and stdout/stderr discarded. With a `network`
//! grant the guest may open TCP connections to the granted addresses only;
//! host names in the grant are resolved once, when the extension loads.

use super::sidecar::NetworkGrant;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use wasmtime_wasi::sockets::SocketAddrUse;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder};

/// Addresses an instance may connect to; empty denies all networking.
#[derive(Debug, Default)]
pub struct NetworkPolicy {
    allowed: Vec<(IpAddr, Option<u16>)>,
    /// Whether the guest may resolve names (only when a grant names a host).
    name_lookup: bool,
}

impl NetworkPolicy {
    pub fn from_grants(grants: &[NetworkGrant]) -> Self {
        let mut policy = Self::default();
        for grant in grants {
            if let Ok(ip) = grant.host.parse::<IpAddr>() {
                policy.allowed.push((ip, grant.port));
                continue;
            }
            policy.name_lookup = true;
            match (grant.host.as_str(), grant.port.unwrap_or(0)).to_socket_addrs() {
                Ok(addresses) => policy
                    .allowed
                    .extend(addresses.map(|address| (address.ip(), grant.port))),
                Err(error) => {
                    tracing::warn!(grant = %grant, "cannot resolve a granted host; it stays unreachable: {error}")
                }
            }
        }
        policy
    }

    /// Whether an outbound connection to `address` is granted.
    pub fn allows(&self, address: &SocketAddr) -> bool {
        self.allowed
            .iter()
            .any(|(ip, port)| *ip == address.ip() && port.is_none_or(|port| port == address.port()))
    }

    /// The grant is for outbound TCP: connecting to a granted address, and
    /// the implicit bind to a wildcard address and ephemeral port that a
    /// connect performs first. Listening, accepting and explicit binds are
    /// never granted.
    fn permits(&self, address: &SocketAddr, use_: SocketAddrUse) -> bool {
        match use_ {
            SocketAddrUse::TcpConnect => self.allows(address),
            SocketAddrUse::TcpBind => address.ip().is_unspecified() && address.port() == 0,
            _ => false,
        }
    }

    pub fn wasi_context(self: &Arc<Self>) -> WasiCtx {
        let mut builder = WasiCtxBuilder::new();
        builder.allow_udp(false);
        if self.allowed.is_empty() {
            builder.allow_tcp(false);
        } else {
            builder
                .allow_tcp(true)
                .allow_ip_name_lookup(self.name_lookup);
            let policy = self.clone();
            builder.socket_addr_check(move |address, use_| {
                let allowed = policy.permits(&address, use_);
                Box::pin(async move { allowed })
            });
        }
        builder.build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_only_granted_addresses_and_ports() {
        let grants = [
            NetworkGrant {
                host: "127.0.0.1".into(),
                port: Some(8080),
            },
            NetworkGrant {
                host: "10.0.0.1".into(),
                port: None,
            },
        ];
        let policy = NetworkPolicy::from_grants(&grants);
        assert!(policy.allows(&"127.0.0.1:8080".parse().unwrap()));
        assert!(!policy.allows(&"127.0.0.1:8081".parse().unwrap()));
        assert!(policy.allows(&"10.0.0.1:1".parse().unwrap()));
        assert!(!policy.allows(&"10.0.0.2:1".parse().unwrap()));
        assert!(!NetworkPolicy::default().allows(&"127.0.0.1:8080".parse().unwrap()));
        assert!(
            policy.permits(&"0.0.0.0:0".parse().unwrap(), SocketAddrUse::TcpBind),
            "the implicit bind of a connect"
        );
        assert!(!policy.permits(&"0.0.0.0:8080".parse().unwrap(), SocketAddrUse::TcpBind));
        assert!(!policy.permits(&"127.0.0.1:8080".parse().unwrap(), SocketAddrUse::TcpListen));
    }
}
