//! Fuzz checks for btm-net's decoders of untrusted bytes: each feeds arbitrary bytes to a
//! decoder and asserts its invariants, panicking when one breaks. The cargo-fuzz targets in
//! `fuzz/heavy` call these, and the corpus replay test (`tests/fuzz_replay.rs`) runs every
//! committed corpus file through them. Not a stable API.

use crate::addr::{AddrRecord, MAX_ADDRS, MAX_ENTRY, MAX_LEN};
use crate::{DhtKey, NetworkId, ProviderKey, RecordKey, Topic};
use btm_protocol::{ContentId, PublicKey, SigningKey};

/// The network whose keys the `record_key` corpus holds.
pub fn network() -> NetworkId {
    NetworkId(ContentId::of(b"btm fuzz network"))
}

/// The key that signs the `addr_record` corpus.
pub fn addr_key() -> SigningKey {
    btm_protocol::test_key("btm test key 0")
}

/// [`AddrRecord::decode`]: no panic; a decoded record is within the size limits and, when
/// signed by [`addr_key`], re-encodes to exactly the input (ed25519 signatures are
/// deterministic, so the encoding is canonical).
pub fn addr_record(data: &[u8]) {
    let Ok(r) = AddrRecord::decode(data) else {
        return;
    };
    assert!(data.len() <= MAX_LEN);
    let n = r.addrs.len() + r.relays.len();
    assert!((1..=MAX_ADDRS).contains(&n), "{n} addresses");
    for e in r
        .addrs
        .iter()
        .map(|a| a.to_string())
        .chain(r.relays.iter().map(|u| u.to_string()))
    {
        assert!(e.len() <= MAX_ENTRY, "entry {e:?} too long");
    }
    let key = addr_key();
    if r.node == PublicKey::of(&key) {
        assert_eq!(r.sign(&key), data, "not canonical");
    }
}

/// [`RecordKey::parse`], [`ProviderKey::parse`] and [`Topic::parse`] on [`network`]: no panic;
/// a parsed key re-encodes to exactly the input (one key per record).
pub fn record_key(data: &[u8]) {
    let net = network();
    if let Some(k) = RecordKey::parse(&net, data) {
        assert_eq!(k.to_bytes(&net), data, "record key {k:?} not canonical");
    }
    if let Some(k) = ProviderKey::parse(&net, data) {
        assert_eq!(k.to_bytes(&net), data, "provider key {k:?} not canonical");
    }
    if let Ok(s) = std::str::from_utf8(data)
        && let Some(t) = Topic::parse(&net, s)
    {
        assert_eq!(t.string(&net), s, "topic {t:?} not canonical");
    }
}

/// [`crate::verify::parse_documents`] (validation data blobs, JSONL or zstd) and the model's
/// corpus reader ([`btm_model::fuzzing::documents`]): no panic; decompression bounded; every
/// document round-trips through JSON.
pub fn documents(data: &[u8]) {
    if let Ok(docs) = crate::verify::parse_documents(data) {
        let mut total = 0u64;
        for d in &docs {
            total += (d.id.len() + d.text.len()) as u64;
            let json = serde_json::to_string(d).unwrap_or_else(|e| panic!("{e}"));
            let again: btm_model::data::Document =
                serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(&again, d);
        }
        assert!(total <= crate::verify::MAX_DATA_BYTES);
    }
    btm_model::fuzzing::documents(data);
}

/// The forest manifest ([`btm_model::fuzzing::forest_manifest`]).
pub fn forest_manifest(data: &[u8]) {
    btm_model::fuzzing::forest_manifest(data);
}
