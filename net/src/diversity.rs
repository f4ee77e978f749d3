//! Routing-table diversity, an eclipse defence: one operator with many node ids but few
//! addresses must not fill a node's Kademlia routing table. Peers are grouped by subnet (IPv4
//! /24, IPv6 /48) and at most [`Limits::max_peers_per_subnet`](crate::limits::Limits) of
//! each subnet are kept. Loopback, private and link-local addresses are exempt unless
//! `limit_local` is set (a campus or a test network shares one subnet honestly).

use std::net::IpAddr;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;

/// A group of addresses likely to be under one operator's control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subnet {
    V4([u8; 3]),
    V6([u8; 6]),
}

fn is_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            v6.is_loopback()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link local
        }
    }
}

/// The subnet of the first IP address in `addr`; `None` when it has none, or it is local and
/// `limit_local` is off.
pub fn subnet(addr: &Multiaddr, limit_local: bool) -> Option<Subnet> {
    let ip = addr.iter().find_map(|p| match p {
        Protocol::Ip4(a) => Some(IpAddr::V4(a)),
        Protocol::Ip6(a) => Some(IpAddr::V6(a)),
        _ => None,
    })?;
    if !limit_local && is_local(&ip) {
        return None;
    }
    Some(match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            Subnet::V4([o[0], o[1], o[2]])
        }
        IpAddr::V6(a) => {
            let o = a.octets();
            Subnet::V6([o[0], o[1], o[2], o[3], o[4], o[5]])
        }
    })
}

/// Whether a peer in `new` may not join a table whose other peers are in `others`.
pub fn over_limit(others: impl IntoIterator<Item = Subnet>, new: Subnet, max: usize) -> bool {
    others.into_iter().filter(|s| *s == new).count() >= max
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn a(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn subnets_group_by_prefix_and_exempt_local_addresses() {
        let x = subnet(&a("/ip4/203.0.113.7/tcp/4001"), false).unwrap();
        assert_eq!(
            x,
            subnet(&a("/ip4/203.0.113.200/udp/9/quic-v1"), false).unwrap()
        );
        assert_ne!(Some(x), subnet(&a("/ip4/203.0.114.7/tcp/1"), false));
        let y = subnet(&a("/ip6/2001:db8:1:2::1/tcp/1"), false).unwrap();
        assert_eq!(Some(y), subnet(&a("/ip6/2001:db8:1:ffff::9/tcp/1"), false));
        assert_ne!(Some(y), subnet(&a("/ip6/2001:db8:2::1/tcp/1"), false));
        for local in [
            "/ip4/127.0.0.1/tcp/1",
            "/ip4/10.1.2.3/tcp/1",
            "/ip4/192.168.0.4/tcp/1",
            "/ip4/169.254.1.1/tcp/1",
            "/ip6/::1/tcp/1",
            "/ip6/fd00::2/tcp/1",
            "/ip6/fe80::1/tcp/1",
        ] {
            assert_eq!(subnet(&a(local), false), None, "{local}");
            assert!(subnet(&a(local), true).is_some(), "{local}");
        }
        assert_eq!(subnet(&a("/dns4/example.org/tcp/1"), true), None);
    }

    #[test]
    fn at_most_max_per_subnet() {
        let s = subnet(&a("/ip4/198.51.100.1/tcp/1"), false).unwrap();
        let t = subnet(&a("/ip4/198.51.101.1/tcp/1"), false).unwrap();
        assert!(!over_limit([s, t, t], s, 2));
        assert!(over_limit([s, s, t], s, 2));
        assert!(!over_limit([], s, 1));
        assert!(over_limit([], s, 0));
    }
}
