//! What can go wrong in a role, in the user's terms.

use std::path::PathBuf;

/// Why a role stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Node(#[from] btm_net::NodeError),
    #[error(transparent)]
    Blob(#[from] btm_net::blobs::BlobError),
    #[error("store: {0}")]
    Store(#[from] btm_registry::StoreError),
    #[error(transparent)]
    Model(#[from] btm_model::Error),
    #[error(transparent)]
    Forest(#[from] btm_model::forest::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file this role keeps (join.json, branch.json) is damaged.
    #[error("{path} is damaged ({why}); move it away to start over in this data directory")]
    Damaged { path: PathBuf, why: String },
    #[error(
        "no registry with a seed reached this node within {secs} s: is a maintainer node running, \
         and are the network file / --bootstrap addresses right?"
    )]
    NoRegistry { secs: u64 },
    #[error("the registry has no seed")]
    NoSeed,
    #[error("domain {domain:?} is not in the registry (it has: {known})")]
    UnknownDomain { domain: String, known: String },
    #[error("{dir} belongs to another network; use another data directory")]
    OtherNetwork { dir: PathBuf },
    #[error(
        "this data directory works on {current:?} (join.json), not {wanted:?}: use another data directory, or drop the domain"
    )]
    OtherDomain { current: String, wanted: String },
    #[error(
        "every domain of the registry already has an ELM; name a domain to train another one for it"
    )]
    AllDomainsDone,
    #[error("branching from an average: the registry lists no accepted ELMs on other domains")]
    NoParents,
    #[error(
        "a volunteer branches from the seed or from accepted ELMs, not from a random initialisation"
    )]
    RandomBranch,
    #[error(
        "the ELM ({ppl:.2}) does not beat the seed ({seed_ppl:.2}) on {domain}: every verifier would reject it; \
         train longer or with another learning rate, in a fresh data directory"
    )]
    NotBetterThanSeed {
        domain: String,
        ppl: f64,
        seed_ppl: f64,
    },
    /// The domain's data cannot be used (not JSONL, too few tokens).
    #[error("{domain}'s {what}: {why}")]
    Data {
        domain: String,
        what: &'static str,
        why: String,
    },
    /// Measuring or verifying failed on this side.
    #[error("measuring the ELM: {0}")]
    Measure(btm_net::verify::Failure),
    /// The network refused what this node published.
    #[error("{what} was refused: {why}")]
    Refused { what: String, why: String },
    /// Too few ELMs passed for a client's request.
    #[error("{0}")]
    NotEnough(String),
    #[error("a background task failed: {0}")]
    Task(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a path to an I/O error.
pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
