//! The canonical CBOR subset (see `specs/protocol.md`, "Encoding"): decoding through ciborium
//! with a size limit and a recursion limit, then a field-by-field reader over `ciborium::Value`.

use ciborium::Value;

use crate::{ContentId, DecodeError, Kind, PublicKey};

/// Arrays/tags may nest at most this deep. Our deepest record nests 4 levels.
pub const MAX_DEPTH: usize = 16;

/// Parses exactly one CBOR item of at most `max` bytes. Trailing bytes are an error.
pub(crate) fn parse(bytes: &[u8], kind: Kind, max: usize) -> Result<Value, DecodeError> {
    if bytes.len() > max {
        return Err(DecodeError::TooLarge {
            kind,
            size: bytes.len(),
            max,
        });
    }
    let mut rest = bytes;
    let value: Value = ciborium::de::from_reader_with_recursion_limit(&mut rest, MAX_DEPTH)
        .map_err(|e| match e {
            ciborium::de::Error::Io(_) => DecodeError::Truncated,
            ciborium::de::Error::Syntax(offset) => DecodeError::Syntax { offset },
            ciborium::de::Error::Semantic(_, msg) => DecodeError::Unsupported { msg },
            ciborium::de::Error::RecursionLimitExceeded => DecodeError::TooDeep { max: MAX_DEPTH },
        })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes { count: rest.len() });
    }
    Ok(value)
}

/// Serialises a value built by this crate. Such values hold only unsigned integers, byte and
/// text strings, arrays and null, which ciborium writes with definite lengths and the shortest
/// heads; writing into a `Vec` has no I/O failure.
pub(crate) fn to_vec(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    // Not reachable: `Vec`'s writer never fails and our values contain no type ciborium refuses.
    #[allow(clippy::expect_used)]
    ciborium::ser::into_writer(value, &mut out).expect("serialising a protocol Value into a Vec");
    out
}

pub(crate) fn uint(n: u64) -> Value {
    Value::Integer(n.into())
}

pub(crate) fn bytes(b: &[u8]) -> Value {
    Value::Bytes(b.to_vec())
}

pub(crate) fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

/// Reads the elements of one CBOR array in order.
pub(crate) struct Fields {
    items: std::vec::IntoIter<Value>,
}

impl Fields {
    /// `value` must be an array of exactly `len` elements.
    pub(crate) fn new(value: Value, field: &'static str, len: usize) -> Result<Self, DecodeError> {
        let items = array(value, field, len)?;
        if items.len() != len {
            return Err(DecodeError::FieldCount {
                field,
                expected: len,
                found: items.len(),
            });
        }
        Ok(Self {
            items: items.into_iter(),
        })
    }

    /// A top-level record: an array whose first element is the format version, which must be
    /// [`crate::FORMAT_VERSION`].
    pub(crate) fn record(value: Value, kind: Kind, len: usize) -> Result<Self, DecodeError> {
        let mut f = Self::new(value, kind.name(), len)?;
        let version = f.u64("format_version")?;
        if version != crate::FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion { kind, version });
        }
        Ok(f)
    }

    pub(crate) fn next(&mut self, field: &'static str) -> Result<Value, DecodeError> {
        // `new` checked the length, so this only fails if a caller reads too many fields.
        self.items.next().ok_or(DecodeError::FieldCount {
            field,
            expected: 1,
            found: 0,
        })
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        as_u64(self.next(field)?, field)
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        u32::try_from(self.u64(field)?).map_err(|_| DecodeError::OutOfRange { field })
    }

    pub(crate) fn id(&mut self, field: &'static str) -> Result<ContentId, DecodeError> {
        as_id(self.next(field)?, field)
    }

    /// An id or null.
    pub(crate) fn opt_id(&mut self, field: &'static str) -> Result<Option<ContentId>, DecodeError> {
        match self.next(field)? {
            Value::Null => Ok(None),
            other => as_id(other, field).map(Some),
        }
    }

    pub(crate) fn key(&mut self, field: &'static str) -> Result<PublicKey, DecodeError> {
        as_key(self.next(field)?, field)
    }

    pub(crate) fn text(&mut self, field: &'static str, max: usize) -> Result<String, DecodeError> {
        let s = match self.next(field)? {
            Value::Text(s) => s,
            _ => return Err(wrong_type(field, "a text string")),
        };
        at_most(s.len(), s, field, max)
    }

    pub(crate) fn bytes(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<Vec<u8>, DecodeError> {
        match self.next(field)? {
            Value::Bytes(b) if b.len() > max => Err(DecodeError::TooLong { field, max }),
            Value::Bytes(b) => Ok(b),
            _ => Err(wrong_type(field, "a byte string")),
        }
    }

    /// An array of at most `max` elements.
    pub(crate) fn list(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<Vec<Value>, DecodeError> {
        array(self.next(field)?, field, max)
    }
}

/// A value that is not of the type `field` needs.
fn wrong_type(field: &'static str, expected: &'static str) -> DecodeError {
    DecodeError::WrongType { field, expected }
}

/// `value` when its `len` is at most `max`.
fn at_most<T>(len: usize, value: T, field: &'static str, max: usize) -> Result<T, DecodeError> {
    if len <= max {
        Ok(value)
    } else {
        Err(DecodeError::TooLong { field, max })
    }
}

/// An array of at most `max` elements.
pub(crate) fn array(
    value: Value,
    field: &'static str,
    max: usize,
) -> Result<Vec<Value>, DecodeError> {
    match value {
        Value::Array(items) => at_most(items.len(), items, field, max),
        _ => Err(wrong_type(field, "an array")),
    }
}

pub(crate) fn as_u64(value: Value, field: &'static str) -> Result<u64, DecodeError> {
    match value {
        Value::Integer(i) => u64::try_from(i).map_err(|_| DecodeError::OutOfRange { field }),
        _ => Err(wrong_type(field, "an unsigned integer")),
    }
}

fn as_32(value: Value, field: &'static str) -> Result<[u8; 32], DecodeError> {
    match value {
        Value::Bytes(b) => {
            let found = b.len();
            <[u8; 32]>::try_from(b).map_err(|_| DecodeError::WrongLength {
                field,
                expected: 32,
                found,
            })
        }
        _ => Err(wrong_type(field, "a byte string")),
    }
}

pub(crate) fn as_id(value: Value, field: &'static str) -> Result<ContentId, DecodeError> {
    as_32(value, field).map(ContentId)
}

pub(crate) fn as_key(value: Value, field: &'static str) -> Result<PublicKey, DecodeError> {
    as_32(value, field).map(PublicKey)
}

/// Checks that `items` is strictly ascending by `key`.
pub(crate) fn strictly_ascending<T, K: Ord>(
    items: &[T],
    field: &'static str,
    key: impl Fn(&T) -> K,
) -> Result<(), DecodeError> {
    if items.windows(2).all(|w| key(&w[0]) < key(&w[1])) {
        Ok(())
    } else {
        Err(DecodeError::NotSorted { field })
    }
}
