//! Fuzz checks for this crate's decoders of untrusted bytes: each feeds arbitrary bytes to a
//! decoder and asserts its invariants, panicking when one breaks. The cargo-fuzz targets in
//! `fuzz/heavy/` call these, and the corpus replay test (`tests/fuzz_replay.rs`) runs every
//! committed corpus file through them. Not a stable API.

use std::path::Path;

use crate::data::{self, Document, MAX_SPLIT_BYTES};
use crate::forest::Forest;
use crate::forest::manifest::{MAX_ELMS, MAX_MANIFEST_BYTES};

/// The zstd frame magic.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Every document re-encodes to JSON that decodes to itself; the text is bounded by the input.
fn check_documents(docs: &[Document], decoded_len: u64) {
    let mut total = 0u64;
    for d in docs {
        total += (d.id.len() + d.text.len()) as u64;
        let json = match serde_json::to_string(d) {
            Ok(j) => j,
            Err(e) => panic!("a document does not re-encode: {e}"),
        };
        match serde_json::from_str::<Document>(&json) {
            Ok(again) => assert_eq!(&again, d),
            Err(e) => panic!("a re-encoded document does not decode: {e}"),
        }
    }
    assert!(total <= decoded_len, "documents larger than their source");
    assert!(total <= MAX_SPLIT_BYTES);
}

/// The corpus reader ([`data::read_documents`]) on `data` as a JSONL file and, when it starts
/// with the zstd magic, as a `.jsonl.zst` file: no panic, decompression bounded by
/// [`MAX_SPLIT_BYTES`], documents that round-trip through JSON.
pub fn documents(data: &[u8]) {
    let path = Path::new("fuzz.jsonl");
    if let Ok(docs) = data::read_documents(data, path) {
        check_documents(&docs, data.len() as u64);
    }
    if data.starts_with(&ZSTD_MAGIC)
        && let Ok(decoder) = zstd::Decoder::new(data)
    {
        // Bound what the check itself can be made to allocate, as the reader does.
        if let Ok(docs) = data::read_documents(decoder, Path::new("fuzz.jsonl.zst")) {
            check_documents(&docs, MAX_SPLIT_BYTES);
        }
    }
}

/// [`Forest::from_json`] on `data`: no panic; a manifest that parses has a valid
/// architecture, at most [`MAX_ELMS`] uniquely named ELMs, and survives a save/parse round trip
/// unchanged.
pub fn forest_manifest(data: &[u8]) {
    let path = Path::new("fuzz/forest.json");
    let Ok(forest) = Forest::from_json(data, path) else {
        return;
    };
    assert!((data.len() as u64) <= MAX_MANIFEST_BYTES);
    assert!(forest.architecture.validate().is_ok());
    assert!(forest.elms.len() <= MAX_ELMS);
    let names = forest.names();
    let unique: std::collections::HashSet<&str> = names.iter().copied().collect();
    assert_eq!(unique.len(), names.len(), "repeated ELM names");
    let json = match serde_json::to_vec_pretty(&forest) {
        Ok(j) => j,
        Err(e) => panic!("a manifest does not re-encode: {e}"),
    };
    match Forest::from_json(&json, path) {
        Ok(again) => assert_eq!(again, forest, "a manifest changed in a round trip"),
        Err(e) => panic!("a re-encoded manifest does not parse: {e}"),
    }
}

#[cfg(test)]
mod tests {
    /// The fuzzer's one finding in this crate: a `flops` of 1.5000008888888892e71 read back
    /// one bit off until serde_json parsed floats exactly (its float round-trip feature).
    #[test]
    fn a_manifest_float_survives_a_round_trip() {
        super::forest_manifest(include_bytes!(
            "../../fuzz/corpus/forest_manifest/float-round-trip"
        ));
    }
}
