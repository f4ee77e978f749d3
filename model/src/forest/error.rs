//! What can go wrong with a forest.

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
    /// An operation that needs the forest's seed on a forest without one.
    #[error(
        "the forest has no seed LM (to {0}); create it with one (`forest create --seed`) or fetch it from a network"
    )]
    NoSeed(&'static str),
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
