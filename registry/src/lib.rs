//! btm-registry: the maintainers' signed registry. The acceptance rules, each written once
//! ([`rules`], pure; roots and registries after TUF, ELM records, claims), the node's SQLite
//! store ([`store`]), and the file-based maintainer workflow behind `btm-node keys` and
//! `btm-node registry` ([`maintainer`]).
//!
//! ```
//! use btm_protocol::{ClientVersion, Registry, Root, PublicKey, Signed, test_key};
//! use btm_registry::{Decision, Trusted, decide_registry};
//!
//! let (a, b) = (test_key("a"), test_key("b"));
//! let mut keys = vec![PublicKey::of(&a), PublicKey::of(&b)];
//! keys.sort();
//! let mut root = Signed::new(Root { version: 1, expires: 2_000_000_000, threshold: 2, keys });
//! root.sign(&a);
//! root.sign(&b);
//! let trusted = Trusted { root, registry: None };
//!
//! let registry = Registry {
//!     version: 1, expires: 2_000_000_000, min_client_version: ClientVersion::new(0, 1, 0),
//!     domains: vec![], seed: None, elms: vec![],
//! };
//! let mut envelope = Signed::new(registry);
//! envelope.sign(&a);
//! assert!(matches!(decide_registry(&trusted, &envelope.encode(), 1_800_000_000), Decision::Reject(_)));
//! envelope.sign(&b);
//! assert!(matches!(decide_registry(&trusted, &envelope.encode(), 1_800_000_000), Decision::Accept(_)));
//! ```

pub mod maintainer;
pub mod rules;
pub mod store;

pub use rules::{
    ClaimFit, ClaimLimits, Decision, KeyRole, Reject, Tally, Trusted, cheap_signature_checks,
    check_proposal, claim_fits, decide_claim, decide_initial_root, decide_registry, decide_root,
    elm_fits, parents_known, proposal_extends, signed_by, tally, threshold_met,
};
pub use store::{Store, StoreError};
