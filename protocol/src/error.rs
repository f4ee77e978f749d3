//! Typed errors for decoding and signature checks.

use crate::Kind;

/// Why bytes are not a valid record. Every decoder returns one of these; none panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input is longer than the limit for its record type; checked before parsing.
    #[error("{kind} is {size} bytes, over the limit of {max}")]
    TooLarge { kind: Kind, size: usize, max: usize },
    /// Arrays, maps or tags nested deeper than the decoder allows.
    #[error("CBOR nested deeper than {max} levels")]
    TooDeep { max: usize },
    /// The input ends inside a CBOR item.
    #[error("input ends inside a CBOR item")]
    Truncated,
    /// Bytes that are not well-formed CBOR.
    #[error("malformed CBOR at byte {offset}")]
    Syntax { offset: usize },
    /// Well-formed CBOR that the decoder cannot represent (e.g. invalid UTF-8 text).
    #[error("unsupported CBOR item: {msg}")]
    Unsupported { msg: String },
    /// Bytes left over after the one top-level item.
    #[error("{count} bytes after the end of the record")]
    TrailingBytes { count: usize },
    /// The record decodes but is not in the one canonical encoding.
    #[error("{kind} is not in canonical encoding")]
    NonCanonical { kind: Kind },
    /// A format version this implementation does not know.
    #[error("{kind}: unsupported format version {version}")]
    UnsupportedVersion { kind: Kind, version: u64 },
    /// An envelope carrying a different record type than the one expected.
    #[error("expected a {expected} envelope, found record kind {found}")]
    WrongKind { expected: Kind, found: u64 },
    /// An array with the wrong number of elements.
    #[error("{field}: expected {expected} elements, found {found}")]
    FieldCount {
        field: &'static str,
        expected: usize,
        found: usize,
    },
    /// A CBOR item of the wrong major type.
    #[error("{field}: expected {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    /// A byte string of the wrong length (ids, keys, signatures).
    #[error("{field}: expected {expected} bytes, found {found}")]
    WrongLength {
        field: &'static str,
        expected: usize,
        found: usize,
    },
    /// An integer outside the field's range.
    #[error("{field}: integer out of range")]
    OutOfRange { field: &'static str },
    /// A list or string longer than the field allows.
    #[error("{field}: longer than {max}")]
    TooLong { field: &'static str, max: usize },
    /// A list that must be strictly ascending (sorted, no duplicates) and is not.
    #[error("{field}: not in strictly ascending order")]
    NotSorted { field: &'static str },
    /// A value that breaks a field's rule.
    #[error("{field}: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
}

/// Why a signature does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// The envelope has no signature by the required key.
    #[error("no signature by {0}")]
    Missing(crate::PublicKey),
    /// A signature by the key is present but does not verify over context and body.
    #[error("signature by {0} does not verify")]
    Invalid(crate::PublicKey),
}

/// Why averaging weights cannot become an ELM's parent list ([`crate::Parent::from_weights`]).
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ParentWeightsError {
    /// No parents at all.
    #[error("no parent weights")]
    Empty,
    /// More distinct parents than an ELM record may list.
    #[error("{count} distinct parents, at most {max} allowed")]
    TooMany { count: usize, max: usize },
    /// A weight that is negative, NaN or infinite.
    #[error("parent {weights}: weight {weight} is not a finite number >= 0")]
    BadWeight {
        weights: crate::ContentId,
        weight: f64,
    },
    /// Every weight is zero: nothing to normalise.
    #[error("every parent weight is zero")]
    AllZero,
}
