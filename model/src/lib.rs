//! # btm-model: expert LMs for Branch-Train-Merge
//!
//! The GPT-2-style ELM ([`gpt::Gpt`]), its byte-level BPE tokenizer ([`tokenizer`]), corpus
//! reading and block packing ([`data`]), training with checkpoints that survive SIGKILL
//! ([`train`]), perplexity and bits-per-byte evaluation ([`eval`]), sampling ([`generate`]) and
//! safetensors weights named like Hugging Face's GPT-2 ([`weights`]). No networking here.
//!
//! ```no_run
//! use btm_model::{config::Preset, device::DeviceKind, gpt::Gpt};
//! let device = DeviceKind::Cpu.device().unwrap();
//! let model = Gpt::init(&Preset::Tiny.config(), 42, &device);
//! assert_eq!(model.config().n_layers, 3);
//! ```

// Unit tests may unwrap: a panic there is a failed test, not a crash on untrusted input.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod bench;
pub mod bundle;
pub mod config;
pub mod data;
pub mod demix;
pub mod device;
pub mod eval;
pub mod experiment;
pub mod files;
pub mod forest;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzzing;
pub mod generate;
pub mod gpt;
pub mod tokenizer;
pub mod train;
pub mod weights;

use std::path::{Path, PathBuf};

pub use config::{GptConfig, Preset};
pub use gpt::Gpt;

/// Everything that can go wrong in this crate, in the user's terms.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is larger than we accept.
    #[error("{path}: {len} bytes is more than the limit of {limit}")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// An invalid architecture or setting.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A weights file that is malformed, mismatched or holds non-finite values.
    #[error("bad weights: {0}")]
    Weights(String),
    /// The same error, located in a file.
    #[error("{path}: {source}")]
    InFile {
        /// The file.
        path: PathBuf,
        /// The error.
        source: Box<Error>,
    },
    /// Corpus or data problems.
    #[error("data: {0}")]
    Data(String),
    /// Tokenizer problems.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A checkpoint that cannot be resumed.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The requested compute device is not available in this build or on this machine.
    #[error("device: {0}")]
    Device(String),
    /// Training diverged.
    #[error("training diverged: {0}")]
    Diverged(String),
    /// JSON (de)serialisation.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Attaches the file an error came from.
    pub fn in_file(self, path: &Path) -> Self {
        match self {
            e @ (Error::Io { .. } | Error::TooLarge { .. } | Error::InFile { .. }) => e,
            e => Error::InFile {
                path: path.to_path_buf(),
                source: Box::new(e),
            },
        }
    }
}

/// BLAKE3 content id of some bytes, as lowercase hex (the id the network uses for blobs).
pub fn content_id(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}
