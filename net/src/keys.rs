//! Names on the network: the network id, Kademlia record and provider keys, gossip topics.
//! Pure; the byte forms are normative (`specs/network.md`, "Names").
//!
//! Every name starts with `btm/1/<network>/`, where `<network>` is the hex network id: the
//! content id of the network's first root (BLAKE3 of its body). Nodes shipped with different
//! roots never share keys or topics.

use std::fmt;

use btm_protocol::{ContentId, NodeId, Root, Signed, check_domain_name};

/// The id of a btm network: the content id of its first root.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct NetworkId(pub ContentId);

impl NetworkId {
    /// The network named by its first (shipped) root.
    pub fn of_root(root: &Signed<Root>) -> NetworkId {
        NetworkId(root.id())
    }

    fn prefix(&self) -> String {
        format!("btm/1/{}/", self.0)
    }
}

impl fmt::Display for NetworkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A Kademlia record key: what is stored under it is validated by its kind.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum RecordKey {
    /// The newest registry envelope.
    Registry,
    /// The root envelope of this version (the chain a node on an older root walks).
    Root(u64),
    /// The seed manifest body; must equal the trusted registry's seed.
    Seed,
    /// `node`'s claim envelope on `domain` (its latest lease).
    Claim { domain: String, node: NodeId },
    /// An ELM record envelope, by record id.
    Elm(ContentId),
    /// `node`'s latest ELM record envelope on `domain`.
    ElmOf { domain: String, node: NodeId },
    /// `node`'s blob (iroh) address record.
    Addr(NodeId),
}

/// A Kademlia provider key: the providers are the nodes that hold or do the thing.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum ProviderKey {
    /// Nodes that can serve this blob.
    Blob(ContentId),
    /// Nodes holding a live claim on the domain.
    Claimants(String),
    /// Nodes that announced an ELM on the domain.
    Trainers(String),
}

/// Gossip topics.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Topic {
    Registry,
    Claims,
    Elms,
    Attestations,
    /// Registry versions gathering maintainers' signatures toward the threshold.
    Proposals,
}

impl Topic {
    pub const ALL: [Topic; 5] = [
        Topic::Registry,
        Topic::Claims,
        Topic::Elms,
        Topic::Attestations,
        Topic::Proposals,
    ];

    fn name(self) -> &'static str {
        match self {
            Topic::Registry => "registry",
            Topic::Claims => "claims",
            Topic::Elms => "elms",
            Topic::Attestations => "attestations",
            Topic::Proposals => "proposals",
        }
    }

    /// The topic string, `btm/1/<network>/<name>`.
    pub fn string(self, net: &NetworkId) -> String {
        format!("{}{}", net.prefix(), self.name())
    }

    /// The topic for a topic string of this network.
    pub fn parse(net: &NetworkId, s: &str) -> Option<Topic> {
        let rest = s.strip_prefix(&net.prefix())?;
        Topic::ALL.into_iter().find(|t| t.name() == rest)
    }
}

/// 32 bytes as 64 lower-case hex digits, the only spelling keys use: with upper case allowed,
/// one record could be stored under many DHT keys.
fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if !s
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    s.parse::<ContentId>().ok().map(|c| c.0)
}

/// The `/`-separated parts of a key of this network after its prefix; `None` for a key of
/// another network or not UTF-8.
fn parts_of<'a>(net: &NetworkId, bytes: &'a [u8]) -> Option<Vec<&'a str>> {
    let s = std::str::from_utf8(bytes).ok()?;
    Some(s.strip_prefix(&net.prefix())?.split('/').collect())
}

fn domain_ok(d: &str) -> Option<String> {
    check_domain_name(d, "key.domain")
        .ok()
        .map(|_| d.to_string())
}

/// A Kademlia key of this network: a record key or a provider key. Its byte form is
/// canonical: [`DhtKey::parse`] of [`DhtKey::to_bytes`] gives the key back, and any other
/// spelling parses to `None`.
pub trait DhtKey: Sized {
    /// The key bytes.
    fn to_bytes(&self, net: &NetworkId) -> Vec<u8>;

    /// Parses key bytes of this network; `None` for anything else (such keys are refused).
    fn parse(net: &NetworkId, bytes: &[u8]) -> Option<Self>;

    /// The libp2p form.
    fn kad(&self, net: &NetworkId) -> libp2p::kad::RecordKey {
        libp2p::kad::RecordKey::new(&self.to_bytes(net))
    }
}

impl DhtKey for RecordKey {
    fn to_bytes(&self, net: &NetworkId) -> Vec<u8> {
        let p = net.prefix();
        match self {
            RecordKey::Registry => format!("{p}registry"),
            RecordKey::Root(v) => format!("{p}root/{v}"),
            RecordKey::Seed => format!("{p}seed"),
            RecordKey::Claim { domain, node } => format!("{p}claim/{domain}/{node}"),
            RecordKey::Elm(id) => format!("{p}elm/{id}"),
            RecordKey::ElmOf { domain, node } => format!("{p}elm-of/{domain}/{node}"),
            RecordKey::Addr(node) => format!("{p}addr/{node}"),
        }
        .into_bytes()
    }

    fn parse(net: &NetworkId, bytes: &[u8]) -> Option<RecordKey> {
        match parts_of(net, bytes)?.as_slice() {
            ["registry"] => Some(RecordKey::Registry),
            // Canonical decimal only, so one version has one key.
            ["root", v]
                if v.bytes().all(|b| b.is_ascii_digit()) && (!v.starts_with('0') || *v == "0") =>
            {
                Some(RecordKey::Root(v.parse().ok()?))
            }
            ["seed"] => Some(RecordKey::Seed),
            ["claim", d, n] => Some(RecordKey::Claim {
                domain: domain_ok(d)?,
                node: btm_protocol::PublicKey(parse_hex32(n)?),
            }),
            ["elm", id] => Some(RecordKey::Elm(ContentId(parse_hex32(id)?))),
            ["elm-of", d, n] => Some(RecordKey::ElmOf {
                domain: domain_ok(d)?,
                node: btm_protocol::PublicKey(parse_hex32(n)?),
            }),
            ["addr", n] => Some(RecordKey::Addr(btm_protocol::PublicKey(parse_hex32(n)?))),
            _ => None,
        }
    }
}

impl DhtKey for ProviderKey {
    fn to_bytes(&self, net: &NetworkId) -> Vec<u8> {
        let p = net.prefix();
        match self {
            ProviderKey::Blob(id) => format!("{p}blob/{id}"),
            ProviderKey::Claimants(d) => format!("{p}claimants/{d}"),
            ProviderKey::Trainers(d) => format!("{p}trainers/{d}"),
        }
        .into_bytes()
    }

    fn parse(net: &NetworkId, bytes: &[u8]) -> Option<ProviderKey> {
        match parts_of(net, bytes)?.as_slice() {
            ["blob", id] => Some(ProviderKey::Blob(ContentId(parse_hex32(id)?))),
            ["claimants", d] => Some(ProviderKey::Claimants(domain_ok(d)?)),
            ["trainers", d] => Some(ProviderKey::Trainers(domain_ok(d)?)),
            _ => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_foreign_keys_are_refused() {
        let net = NetworkId(ContentId::of(b"root"));
        let node = btm_protocol::PublicKey([7; 32]);
        for k in [
            RecordKey::Registry,
            RecordKey::Seed,
            RecordKey::Claim {
                domain: "legal".into(),
                node,
            },
            RecordKey::Elm(ContentId::of(b"x")),
            RecordKey::ElmOf {
                domain: "a.b_c-d".into(),
                node,
            },
            RecordKey::Addr(node),
            RecordKey::Root(1),
            RecordKey::Root(u64::MAX),
        ] {
            assert_eq!(RecordKey::parse(&net, &k.to_bytes(&net)), Some(k));
        }
        for v in ["01", "+1", "", "1x", "18446744073709551616"] {
            let key = format!("btm/1/{net}/root/{v}");
            assert_eq!(RecordKey::parse(&net, key.as_bytes()), None, "{v}");
        }
        for k in [
            ProviderKey::Blob(ContentId::of(b"y")),
            ProviderKey::Claimants("legal".into()),
            ProviderKey::Trainers("legal".into()),
        ] {
            assert_eq!(ProviderKey::parse(&net, &k.to_bytes(&net)), Some(k));
        }
        let other = NetworkId(ContentId::of(b"other root"));
        assert_eq!(
            RecordKey::parse(&other, &RecordKey::Registry.to_bytes(&net)),
            None
        );
        let bad = format!("btm/1/{net}/claim/Not-A-Domain/{node}");
        assert_eq!(RecordKey::parse(&net, bad.as_bytes()), None);
        assert_eq!(RecordKey::parse(&net, &[0xff, 0xfe]), None);
        for t in Topic::ALL {
            assert_eq!(Topic::parse(&net, &t.string(&net)), Some(t));
        }
    }

    /// One key, one spelling: hex in keys is lower case only. Found by the `record_key` fuzz
    /// target (an upper-case digit in a claim's node id parsed to the same key as the
    /// lower-case one, so one record could be stored under many DHT keys).
    #[test]
    fn keys_with_upper_case_hex_are_refused() {
        let net = NetworkId(ContentId::of(b"root"));
        let node = btm_protocol::PublicKey([0xab; 32]);
        let id = ContentId([0xcd; 32]);
        let upper = |s: String| s.to_uppercase();
        let claim = format!("btm/1/{net}/claim/legal/{}", upper(node.to_string()));
        let elm = format!("btm/1/{net}/elm/{}", upper(id.to_string()));
        let addr = format!("btm/1/{net}/addr/{}", upper(node.to_string()));
        for k in [claim, elm, addr] {
            assert_eq!(RecordKey::parse(&net, k.as_bytes()), None, "{k}");
        }
        let blob = format!("btm/1/{net}/blob/{}", upper(id.to_string()));
        assert_eq!(ProviderKey::parse(&net, blob.as_bytes()), None, "{blob}");
    }
}
