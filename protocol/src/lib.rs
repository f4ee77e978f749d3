//! btm-protocol: the records of the btm network, their one canonical CBOR encoding, and signed
//! envelopes. Pure: no I/O, no clock. The normative description is `specs/protocol.md`.
//!
//! ```
//! use btm_protocol::{Claim, PublicKey, Record, Signed, SigningKey};
//!
//! let key = SigningKey::from_bytes(&[7; 32]);
//! let claim = Claim {
//!     domain: "legal".into(),
//!     node: PublicKey::of(&key),
//!     lease_expires: 1_900_000_000,
//!     first_claimed: 1_899_999_100,
//!     progress: None,
//! };
//! let mut envelope = Signed::new(claim);
//! envelope.sign(&key);
//! let bytes = envelope.encode();
//!
//! let received = Signed::<Claim>::decode(&bytes)?;
//! received.verify_by(&received.record().node)?;
//! assert_eq!(received.record().domain, "legal");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod cbor;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod ids;
mod record;
mod signed;
pub mod weights;

pub use cbor::MAX_DEPTH;

/// The wire format version this code speaks: the first element of every record body and
/// envelope. Version 2 (this round) added the ELM's weights size, claim progress, the
/// acceptance thresholds and withheld-pool commitment of a domain's evaluation settings, and the
/// seed's schedule position and optimiser state.
pub const FORMAT_VERSION: u64 = 2;
pub use ed25519_dalek::SigningKey;
pub use error::{DecodeError, ParentWeightsError, SignatureError};
pub use ids::{ContentId, NodeId, ParseIdError, PublicKey};
pub use record::{
    AcceptedElm, Architecture, Attestation, Claim, ClaimProgress, ClientVersion, Domain, ElmRecord,
    EvalPool, EvalSettings, Kind, MAX_DESCRIPTION_LEN, MAX_DOMAINS, MAX_ELMS, MAX_NAME_LEN,
    MAX_PARENTS, MAX_ROOT_KEYS, MAX_VERSION, PPM_ONE, Parent, Record, Registry, Root, Schedule,
    SeedManifest, TrainingSummary, Verdict, check_domain_name, milli_to_ppl, ppl_to_milli,
};
pub use signed::{
    ENVELOPE_OVERHEAD, MAX_SIGNATURES, Signature, Signed, envelope_kind, max_envelope_size,
    signing_input,
};

/// The fixed test key of `specs/protocol.md`: the ed25519 seed is BLAKE3(`label`).
/// Test vectors use labels `"btm test key 0"`, `"btm test key 1"`, ...
pub fn test_key(label: &str) -> SigningKey {
    SigningKey::from_bytes(blake3::hash(label.as_bytes()).as_bytes())
}
