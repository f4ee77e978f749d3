//! Branch-Train-Merge over a forest of expert LMs (ELMs).
//!
//! The loop of the paper (Li et al. 2022), with no networking:
//!
//! 1. **Seed**: one LM trained on the domain-balanced mix of the training domains
//!    ([`branch::train`] on a [`crate::data::Mixture`] of all of them).
//! 2. **Branch**: a new ELM starts from the seed or from the parameter average of existing ELMs
//!    weighted by their domain posterior on the new domain's dev data
//!    ([`manifest::InitKind`]).
//! 3. **Train**: on its own domain only, independently ([`branch::train`]).
//! 4. **Merge**: add it to the [`Forest`] manifest (which refuses a different architecture or
//!    tokenizer).
//!
//! A forest is used by **ensembling** ([`ensemble`]: mix the ELMs' next-token distributions
//! by the domain posterior, [`posterior`]) or by **parameter averaging** ([`average`], which
//! streams over the ELM files and writes an ordinary model file).
//!
//! ```no_run
//! use btm_model::forest::{Forest, posterior::{self, Weighting}};
//! let forest = Forest::open(std::path::Path::new("runs/forest/forest.json")).unwrap();
//! // A cached prior estimated on dev data picks the two best ELMs for a target domain...
//! let prior = vec![0.7, 0.2, 0.1];
//! let chosen = posterior::top_k(&prior, 2);
//! // ...and only those two need to run.
//! assert_eq!(chosen.len(), 2);
//! # let _ = (forest, Weighting::Posterior);
//! ```

pub mod average;
pub mod branch;
pub mod ensemble;
mod error;
pub mod manifest;
pub mod posterior;
pub mod report;

pub use average::peak_rss_bytes;
pub use ensemble::Ensemble;
pub use error::Error;
pub use manifest::{Forest, ForestElm, Parent};
pub use posterior::Weighting;
