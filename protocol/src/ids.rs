//! Content ids (BLAKE3) and public keys (ed25519), both 32 bytes, shown as lowercase hex.

use std::fmt;
use std::str::FromStr;

/// Why a hex string is not a 32-byte id or key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseIdError {
    /// Not 64 hex digits.
    #[error("expected 64 hex digits, found {0} characters")]
    Length(usize),
    /// A character that is not a hex digit.
    #[error("not a hex string: {0}")]
    Hex(#[from] hex::FromHexError),
}

fn parse32(s: &str) -> Result<[u8; 32], ParseIdError> {
    if s.len() != 64 {
        return Err(ParseIdError::Length(s.len()));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out)?;
    Ok(out)
}

macro_rules! id32 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The 32 raw bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), hex::encode(self.0))
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse32(s).map(Self)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}

id32!(
    /// A BLAKE3-256 hash naming a blob or a record: data shards, weights, tokenizers, and the
    /// canonical encoding of records (see `specs/protocol.md`, "Content ids").
    ContentId
);

id32!(
    /// An ed25519 public key (RFC 8032 encoding). Maintainer keys and node ids are both this.
    PublicKey
);

/// A node is named by its ed25519 public key.
pub type NodeId = PublicKey;

impl ContentId {
    /// The BLAKE3 hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }
}

impl PublicKey {
    /// The public half of a signing key.
    pub fn of(key: &ed25519_dalek::SigningKey) -> Self {
        Self(key.verifying_key().to_bytes())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors() {
        let id = ContentId::of(b"abc");
        let parsed: ContentId = id.to_string().parse().unwrap();
        assert_eq!(parsed, id);
        assert_eq!("ab".parse::<ContentId>(), Err(ParseIdError::Length(2)));
        assert!(matches!(
            "z".repeat(64).parse::<PublicKey>(),
            Err(ParseIdError::Hex(_))
        ));
        // BLAKE3 of "abc", from the BLAKE3 reference test vectors.
        assert_eq!(
            id.to_string(),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }
}
