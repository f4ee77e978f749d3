//! The blob-address record: where a node's iroh endpoint listens. Published on the DHT under
//! [`RecordKey::Addr`](crate::keys::RecordKey::Addr) so that a node that learned a provider's id
//! from a provider record can dial its blob endpoint directly (relays and address-lookup
//! services are disabled unless relays are configured). Format (`specs/network.md`, "Address
//! record"):
//!
//! ```text
//! body = 0x01 || node (32) || expires (u64 big-endian) || n (u8, 1..=8)
//!        || n x (len u8 || UTF-8 socket address, or http(s) relay URL after the addresses)
//! record = body || ed25519 signature by node over "btm-node-addr-v1:" || body
//! ```

use std::net::SocketAddr;

use iroh::RelayUrl;

use btm_protocol::{NodeId, PublicKey, SigningKey};
use ed25519_dalek::Signer;

/// The signature context of address records.
pub const CONTEXT: &[u8] = b"btm-node-addr-v1:";
/// Most entries (addresses and relay URLs) in one record.
pub const MAX_ADDRS: usize = 8;
/// Longest entry.
pub const MAX_ENTRY: usize = 255;
/// Largest encoded record.
pub const MAX_LEN: usize = 1 + 32 + 8 + 1 + MAX_ADDRS * (1 + MAX_ENTRY) + 64;

/// A node's signed blob addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrRecord {
    pub node: NodeId,
    /// Unix seconds; expired at `now >= expires`.
    pub expires: u64,
    pub addrs: Vec<SocketAddr>,
    /// The node's home relay(s), when it uses relays.
    pub relays: Vec<RelayUrl>,
}

/// Why bytes are not a valid address record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("address record is malformed: {0}")]
    Malformed(&'static str),
    #[error("address record signature does not verify")]
    Signature,
}

impl AddrRecord {
    fn body(&self) -> Vec<u8> {
        let mut b = vec![1u8];
        b.extend_from_slice(self.node.as_bytes());
        b.extend_from_slice(&self.expires.to_be_bytes());
        let addrs: Vec<String> = self
            .addrs
            .iter()
            .map(|a| a.to_string())
            .chain(self.relays.iter().map(|r| r.to_string()))
            .filter(|e| e.len() <= MAX_ENTRY)
            .take(MAX_ADDRS)
            .collect();
        b.push(addrs.len() as u8);
        for a in addrs {
            b.push(a.len() as u8);
            b.extend_from_slice(a.as_bytes());
        }
        b
    }

    /// Encodes and signs (the key must be `node`'s).
    pub fn sign(&self, key: &SigningKey) -> Vec<u8> {
        let mut body = self.body();
        let mut msg = CONTEXT.to_vec();
        msg.extend_from_slice(&body);
        body.extend_from_slice(&key.sign(&msg).to_bytes());
        body
    }

    /// Decodes and verifies the signature of `node`.
    pub fn decode(bytes: &[u8]) -> Result<AddrRecord, AddrError> {
        let bad = AddrError::Malformed;
        if bytes.len() > MAX_LEN || bytes.len() < 1 + 32 + 8 + 1 + 64 {
            return Err(bad("length"));
        }
        let (body, sig) = bytes.split_at(bytes.len() - 64);
        if body[0] != 1 {
            return Err(bad("version"));
        }
        let node = PublicKey(body[1..33].try_into().map_err(|_| bad("node"))?);
        let expires = u64::from_be_bytes(body[33..41].try_into().map_err(|_| bad("expires"))?);
        let n = body[41] as usize;
        if n == 0 || n > MAX_ADDRS {
            return Err(bad("address count"));
        }
        let mut rest = &body[42..];
        let (mut addrs, mut relays) = (Vec::with_capacity(n), Vec::new());
        for _ in 0..n {
            let (&len, tail) = rest.split_first().ok_or(bad("truncated"))?;
            let len = len as usize;
            if tail.len() < len {
                return Err(bad("truncated"));
            }
            let s = std::str::from_utf8(&tail[..len]).map_err(|_| bad("address"))?;
            if s.starts_with("https://") || s.starts_with("http://") {
                relays.push(s.parse().map_err(|_| bad("relay url"))?);
            } else {
                addrs.push(s.parse().map_err(|_| bad("address"))?);
            }
            rest = &tail[len..];
        }
        if !rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        let record = AddrRecord {
            node,
            expires,
            addrs,
            relays,
        };
        if record.body() != body {
            return Err(bad("not canonical"));
        }
        let key = ed25519_dalek::VerifyingKey::from_bytes(node.as_bytes())
            .map_err(|_| AddrError::Signature)?;
        let sig = ed25519_dalek::Signature::from_slice(sig).map_err(|_| AddrError::Signature)?;
        let mut msg = CONTEXT.to_vec();
        msg.extend_from_slice(body);
        key.verify_strict(&msg, &sig)
            .map_err(|_| AddrError::Signature)?;
        Ok(record)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let key = btm_protocol::test_key("addr");
        let r = AddrRecord {
            node: PublicKey::of(&key),
            expires: 1_900_000_000,
            addrs: vec![
                "127.0.0.1:4000".parse().unwrap(),
                "[::1]:4001".parse().unwrap(),
            ],
            relays: vec!["https://relay.example.org./".parse().unwrap()],
        };
        let bytes = r.sign(&key);
        assert_eq!(AddrRecord::decode(&bytes).unwrap(), r);
        for i in 0..bytes.len() {
            let mut t = bytes.clone();
            t[i] ^= 1;
            assert!(AddrRecord::decode(&t).is_err(), "flip at {i} accepted");
        }
        assert!(AddrRecord::decode(&bytes[..bytes.len() - 1]).is_err());
        // Signed by someone else.
        let other = btm_protocol::test_key("other");
        assert_eq!(
            AddrRecord::decode(&r.sign(&other)),
            Err(AddrError::Signature)
        );
        // Relay URLs come after the addresses (canonical order); a relay-only record is fine.
        let relay_only = AddrRecord {
            addrs: vec![],
            ..r.clone()
        };
        assert_eq!(
            AddrRecord::decode(&relay_only.sign(&key)).unwrap(),
            relay_only
        );
        let mut body = vec![1u8];
        body.extend_from_slice(r.node.as_bytes());
        body.extend_from_slice(&r.expires.to_be_bytes());
        body.push(2);
        for e in ["https://relay.example.org./", "127.0.0.1:4000"] {
            body.push(e.len() as u8);
            body.extend_from_slice(e.as_bytes());
        }
        let mut msg = CONTEXT.to_vec();
        msg.extend_from_slice(&body);
        body.extend_from_slice(&key.sign(&msg).to_bytes());
        assert_eq!(
            AddrRecord::decode(&body),
            Err(AddrError::Malformed("not canonical"))
        );
    }
}
