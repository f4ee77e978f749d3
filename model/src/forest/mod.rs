//! Branch-Train-Merge over a forest of expert LMs (ELMs).
//!
//! The loop of the paper (Li et al. 2022), with no networking:
//!
//! 1. **Seed**: one LM trained on the domain-balanced mix of the training domains
//!    ([`branch::train`] on a [`crate::data::Mixture`] of all of them).
//! 2. **Branch**: a new ELM starts from the seed or from the parameter average of existing ELMs
//!    weighted by their domain posterior on the new domain's dev data ([`branch::Init`]).
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
pub mod manifest;
pub mod posterior;

pub use ensemble::Ensemble;
pub use manifest::{Forest, ForestElm, Parent};
pub use posterior::Weighting;

use std::path::PathBuf;

use crate::config::GptConfig;

/// What can go wrong with a forest, in the user's terms.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An ELM whose architecture is not the forest's.
    #[error("ELM {elm:?} has architecture {found:?}, but the forest's is {expected:?}")]
    ArchitectureMismatch {
        /// The ELM.
        elm: String,
        /// The forest's architecture.
        expected: GptConfig,
        /// The ELM's.
        found: GptConfig,
    },
    /// An ELM trained with another tokenizer.
    #[error("ELM {elm:?} uses tokenizer {found}, but the forest's is {expected}")]
    TokenizerMismatch {
        /// The ELM.
        elm: String,
        /// The forest's tokenizer id.
        expected: String,
        /// The ELM's.
        found: String,
    },
    /// A name used twice.
    #[error("the forest already has an ELM named {0:?}")]
    DuplicateElm(String),
    /// A name the forest does not have.
    #[error("the forest has no ELM named {0:?}")]
    UnknownElm(String),
    /// A file whose bytes are not the ones the manifest names.
    #[error("{path}: content id {found} differs from the manifest's {expected}")]
    ContentMismatch {
        /// The file.
        path: PathBuf,
        /// The id in the manifest.
        expected: String,
        /// The file's id.
        found: String,
    },
    /// An operation that needs ELMs on an empty forest (or an empty selection).
    #[error("no ELMs to {0}")]
    Empty(&'static str),
    /// Mixture or averaging weights that are not a usable distribution.
    #[error("bad weights: {0}")]
    BadWeights(String),
    /// A manifest that does not parse or has the wrong format.
    #[error("{path}: not a forest manifest: {reason}")]
    BadManifest {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A model, data or file error underneath.
    #[error(transparent)]
    Model(#[from] crate::Error),
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Model(crate::Error::Json(e))
    }
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
