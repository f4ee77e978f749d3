//! Signed envelopes: a record's exact encoded bytes plus ed25519 signatures over
//! `kind.context() || body`.

use ciborium::Value;
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::Serialize;

use crate::cbor::{self, Fields, bytes, uint};
use crate::{ContentId, DecodeError, Kind, PublicKey, Record, SignatureError};

/// Most signatures an envelope may carry. Bounds the verification work a peer can cause.
pub const MAX_SIGNATURES: usize = 64;

/// Bytes an envelope may add to its body: the array head, version, kind, body head and
/// `MAX_SIGNATURES` signature pairs of 2 + 34 + 66 bytes each, plus the list head.
pub const ENVELOPE_OVERHEAD: usize = 16 + 3 + MAX_SIGNATURES * 102;

/// The largest envelope accepted for a record kind; checked before parsing.
pub fn max_envelope_size(kind: Kind) -> usize {
    kind.max_size() + ENVELOPE_OVERHEAD
}

/// One ed25519 signature and the key that claims to have made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Signature {
    pub key: PublicKey,
    #[serde(serialize_with = "hex_sig")]
    pub bytes: [u8; 64],
}

fn hex_sig<S: serde::Serializer>(b: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(b))
}

/// The bytes a signature covers: the kind's context string, then the body.
pub fn signing_input(kind: Kind, body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(kind.context().len() + body.len());
    msg.extend_from_slice(kind.context());
    msg.extend_from_slice(body);
    msg
}

impl Signature {
    /// Signs `body` as a record of `kind`.
    pub fn create(kind: Kind, body: &[u8], key: &SigningKey) -> Self {
        use ed25519_dalek::Signer;
        let sig = key.sign(&signing_input(kind, body));
        Signature {
            key: PublicKey::of(key),
            bytes: sig.to_bytes(),
        }
    }

    /// Whether this is a valid signature by `self.key` over `body` as a record of `kind`.
    /// Uses RFC 8032 strict verification (rejects small-order keys and malleable signatures).
    pub fn verifies(&self, kind: Kind, body: &[u8]) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.key.0) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&self.bytes);
        key.verify_strict(&signing_input(kind, body), &sig).is_ok()
    }
}

/// A record with its exact encoded bytes and the signatures over them.
///
/// Signatures keep the order they were added or decoded in; duplicates are representable (a
/// threshold counts each key once, see `btm_registry::rules`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed<R> {
    record: R,
    body: Vec<u8>,
    signatures: Vec<Signature>,
}

impl<R: Record> Signed<R> {
    /// An unsigned envelope around `record`.
    pub fn new(record: R) -> Self {
        let body = record.encode();
        Signed {
            record,
            body,
            signatures: Vec::new(),
        }
    }

    pub fn record(&self) -> &R {
        &self.record
    }

    pub fn into_record(self) -> R {
        self.record
    }

    /// The canonical encoding of the record: what the signatures cover (after the context).
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    pub fn signatures(&self) -> &[Signature] {
        &self.signatures
    }

    /// The record id: BLAKE3 of the body. Independent of the signatures.
    pub fn id(&self) -> ContentId {
        ContentId::of(&self.body)
    }

    /// Adds a signature by `key`, replacing any earlier one by the same key.
    pub fn sign(&mut self, key: &SigningKey) {
        let sig = Signature::create(R::KIND, &self.body, key);
        self.signatures.retain(|s| s.key != sig.key);
        self.signatures.push(sig);
    }

    /// Appends a signature as is: no check, no de-duplication. For combining signature sets
    /// and for tests; `decode` refuses envelopes with more than `MAX_SIGNATURES`.
    pub fn push_signature(&mut self, sig: Signature) {
        self.signatures.push(sig);
    }

    /// Removes all signatures.
    pub fn clear_signatures(&mut self) {
        self.signatures.clear();
    }

    /// Whether `sig` is a valid signature over this record.
    pub fn verifies(&self, sig: &Signature) -> bool {
        sig.verifies(R::KIND, &self.body)
    }

    /// Succeeds if some signature by `key` verifies.
    pub fn verify_by(&self, key: &PublicKey) -> Result<(), SignatureError> {
        let mut found = false;
        for sig in self.signatures.iter().filter(|s| s.key == *key) {
            if self.verifies(sig) {
                return Ok(());
            }
            found = true;
        }
        Err(if found {
            SignatureError::Invalid(*key)
        } else {
            SignatureError::Missing(*key)
        })
    }

    /// The canonical envelope encoding `[1, kind, body, [[key, sig], ...]]`.
    pub fn encode(&self) -> Vec<u8> {
        cbor::to_vec(&Value::Array(vec![
            uint(crate::FORMAT_VERSION),
            uint(R::KIND.number()),
            bytes(&self.body),
            Value::Array(
                self.signatures
                    .iter()
                    .map(|s| Value::Array(vec![bytes(&s.key.0), bytes(&s.bytes)]))
                    .collect(),
            ),
        ]))
    }

    /// Decodes an envelope of kind `R::KIND`: envelope size limit, bounded parsing, the body's
    /// own size limit and rules, and canonical form of both. Does not verify signatures.
    pub fn decode(input: &[u8]) -> Result<Self, DecodeError> {
        let (kind, body, signatures) = parse_envelope(input, R::KIND, max_envelope_size(R::KIND))?;
        if kind != R::KIND.number() {
            return Err(DecodeError::WrongKind {
                expected: R::KIND,
                found: kind,
            });
        }
        let record = R::decode(&body)?;
        let signed = Signed {
            record,
            body,
            signatures,
        };
        if signed.encode() != input {
            return Err(DecodeError::NonCanonical { kind: R::KIND });
        }
        Ok(signed)
    }
}

/// The record kind of an envelope, read without decoding its body.
pub fn envelope_kind(input: &[u8]) -> Result<Kind, DecodeError> {
    let max = Kind::ALL
        .iter()
        .map(|k| max_envelope_size(*k))
        .max()
        .unwrap_or(0);
    let (kind, _, _) = parse_envelope(input, Kind::Registry, max)?;
    Kind::from_number(kind).ok_or(DecodeError::OutOfRange {
        field: "envelope.kind",
    })
}

fn parse_envelope(
    input: &[u8],
    size_kind: Kind,
    max: usize,
) -> Result<(u64, Vec<u8>, Vec<Signature>), DecodeError> {
    let value = cbor::parse(input, size_kind, max)?;
    let mut f = Fields::new(value, "envelope", 4)?;
    let version = f.u64("envelope.format_version")?;
    if version != crate::FORMAT_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            kind: size_kind,
            version,
        });
    }
    let kind = f.u64("envelope.kind")?;
    let body = f.bytes("envelope.body", max)?;
    let signatures = f
        .list("envelope.signatures", MAX_SIGNATURES)?
        .into_iter()
        .map(|v| {
            let mut s = Fields::new(v, "envelope.signatures", 2)?;
            let key = s.key("signature.key")?;
            let raw = s.bytes("signature.bytes", 64)?;
            let found = raw.len();
            let bytes = <[u8; 64]>::try_from(raw).map_err(|_| DecodeError::WrongLength {
                field: "signature.bytes",
                expected: 64,
                found,
            })?;
            Ok(Signature { key, bytes })
        })
        .collect::<Result<Vec<_>, DecodeError>>()?;
    Ok((kind, body, signatures))
}
