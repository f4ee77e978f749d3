//! The maintainers' workflow on files, behind `btm-node keys ...` and `btm-node registry ...`.
//!
//! A draft is a signed-envelope file (`specs/protocol.md`, "Envelopes") that accumulates
//! signatures: one maintainer edits the body (`init`, `add-domain`, `set-seed`, `accept-elm`;
//! any edit drops the signatures, which covered the old body), then each maintainer runs
//! `sign` on it in turn, or signs a copy and the copies are merged with [`combine`]. The file
//! is published once `verify` accepts it. Files are replaced atomically (write, fsync, rename).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use btm_protocol::{
    AcceptedElm, ClientVersion, ContentId, DecodeError, Domain, ElmRecord, Kind, PublicKey, Record,
    Registry, Root, SeedManifest, Signature, Signed, SigningKey, envelope_kind, max_envelope_size,
};
use serde::Serialize;

use crate::rules::{self, Reject, Tally, Trusted};

/// Why a maintainer command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MaintainerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Decode { path: PathBuf, source: DecodeError },
    #[error("{path}: not a key file ({reason})")]
    KeyFile { path: PathBuf, reason: &'static str },
    #[error("{0} already exists (pass --force to overwrite)")]
    Exists(PathBuf),
    #[error("{path}: expected a {expected} file, found a {found}")]
    WrongKind {
        path: PathBuf,
        expected: &'static str,
        found: Kind,
    },
    #[error("the edited record breaks a rule: {0}")]
    Invalid(#[from] DecodeError),
    #[error("domain {0:?} is already in the registry")]
    DuplicateDomain(String),
    #[error("ELM record refused: {0}")]
    Refused(#[from] Reject),
    #[error("{0} and {1} hold different bodies: signatures combine only over identical bytes")]
    DifferentBodies(PathBuf, PathBuf),
    #[error("verifying a registry needs the trusted root file (--root)")]
    RootRequired,
}

type Result<T, E = MaintainerError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl Fn(std::io::Error) -> MaintainerError + '_ {
    move |source| MaintainerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads at most `max` bytes; a longer file is reported as too large without reading it all.
fn read_limited(path: &Path, max: usize, kind: Kind) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(io(path))?;
    let mut bytes = Vec::new();
    file.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io(path))?;
    if bytes.len() > max {
        return Err(MaintainerError::Decode {
            path: path.to_path_buf(),
            source: DecodeError::TooLarge {
                kind,
                size: bytes.len(),
                max,
            },
        });
    }
    Ok(bytes)
}

/// Replaces `path` with `bytes` atomically: a crash leaves the old file or the new one.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn create(path: &Path, bytes: &[u8], force: bool, mode: u32) -> Result<()> {
    if !force && path.exists() {
        return Err(MaintainerError::Exists(path.to_path_buf()));
    }
    write_atomic(path, bytes, mode)
}

/// Reads an envelope file of record type `R`.
pub fn read_envelope<R: Record>(path: &Path) -> Result<Signed<R>> {
    let bytes = read_limited(path, max_envelope_size(R::KIND), R::KIND)?;
    let decode_err = |source| MaintainerError::Decode {
        path: path.to_path_buf(),
        source,
    };
    let found = envelope_kind(&bytes).map_err(decode_err)?;
    if found != R::KIND {
        return Err(MaintainerError::WrongKind {
            path: path.to_path_buf(),
            expected: R::KIND.name(),
            found,
        });
    }
    Signed::<R>::decode(&bytes).map_err(decode_err)
}

/// Reads an envelope file of any kind: its bytes and its record kind.
fn read_any(path: &Path) -> Result<(Vec<u8>, Kind)> {
    let max = Kind::ALL
        .iter()
        .map(|k| max_envelope_size(*k))
        .max()
        .unwrap_or(0);
    let bytes = read_limited(path, max, Kind::Registry)?;
    let kind = envelope_kind(&bytes).map_err(|source| MaintainerError::Decode {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((bytes, kind))
}

fn file_kind(path: &Path) -> Result<Kind> {
    read_any(path).map(|(_, kind)| kind)
}

// --- keys -------------------------------------------------------------------------------------

/// Creates a new ed25519 key from the OS random source and writes its 32-byte seed as hex to
/// `path` (mode 0600). Returns the public key.
pub fn generate_key(path: &Path, force: bool) -> Result<PublicKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| MaintainerError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let key = SigningKey::from_bytes(&seed);
    create(
        path,
        format!("{}\n", hex::encode(seed)).as_bytes(),
        force,
        0o600,
    )?;
    Ok(PublicKey::of(&key))
}

/// Reads a key file written by [`generate_key`].
pub fn load_key(path: &Path) -> Result<SigningKey> {
    let bad = |reason| MaintainerError::KeyFile {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = read_limited(path, 256, Kind::Root)
        .map_err(|_| bad("unreadable or larger than 256 bytes"))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| bad("not text"))?
        .trim();
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text, &mut seed).map_err(|_| bad("expected 64 hex digits"))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The public key of a key file.
pub fn public_key(path: &Path) -> Result<PublicKey> {
    load_key(path).map(|k| PublicKey::of(&k))
}

// --- drafts -----------------------------------------------------------------------------------

/// Writes an unsigned root listing `keys` (sorted and de-duplicated).
pub fn init_root(out: &Path, mut root: Root, force: bool) -> Result<Signed<Root>> {
    root.keys.sort();
    root.keys.dedup();
    root.validate()?;
    let env = Signed::new(root);
    create(out, &env.encode(), force, 0o644)?;
    Ok(env)
}

/// What a new registry draft starts from.
#[derive(Debug, Clone, Default)]
pub struct RegistryInit {
    /// Defaults to the previous version + 1, or 1.
    pub version: Option<u64>,
    pub expires: u64,
    /// Defaults to the previous registry's, or 0.1.0.
    pub min_client_version: Option<ClientVersion>,
    /// A published registry to continue from: its domains, seed and ELMs are kept.
    pub from: Option<PathBuf>,
}

/// Writes an unsigned registry draft.
pub fn init_registry(out: &Path, init: RegistryInit, force: bool) -> Result<Signed<Registry>> {
    let previous = init
        .from
        .as_deref()
        .map(read_envelope::<Registry>)
        .transpose()?
        .map(Signed::into_record);
    let default_client = ClientVersion::new(0, 1, 0);
    let registry = match previous {
        Some(prev) => Registry {
            version: init.version.unwrap_or(prev.version.saturating_add(1)),
            expires: init.expires,
            min_client_version: init.min_client_version.unwrap_or(prev.min_client_version),
            ..prev
        },
        None => Registry {
            version: init.version.unwrap_or(1),
            expires: init.expires,
            min_client_version: init.min_client_version.unwrap_or(default_client),
            domains: Vec::new(),
            seed: None,
            elms: Vec::new(),
        },
    };
    registry.validate()?;
    let env = Signed::new(registry);
    create(out, &env.encode(), force, 0o644)?;
    Ok(env)
}

/// The result of an edit: the new draft, and how many signatures the edit invalidated.
#[derive(Debug, Clone)]
pub struct Edited {
    pub registry: Signed<Registry>,
    pub dropped_signatures: usize,
}

/// Applies `change` to the registry draft at `path`. If the body changes, the signatures over
/// the old body are dropped.
pub fn edit(path: &Path, change: impl FnOnce(&mut Registry) -> Result<()>) -> Result<Edited> {
    let old = read_envelope::<Registry>(path)?;
    let mut registry = old.record().clone();
    change(&mut registry)?;
    registry.validate()?;
    if registry.encode() == old.body() {
        return Ok(Edited {
            registry: old,
            dropped_signatures: 0,
        });
    }
    let env = Signed::new(registry);
    write_atomic(path, &env.encode(), 0o644)?;
    Ok(Edited {
        registry: env,
        dropped_signatures: old.signatures().len(),
    })
}

/// Adds a domain to the draft.
pub fn add_domain(path: &Path, domain: Domain) -> Result<Edited> {
    edit(path, |r| {
        match r.domains.binary_search_by(|d| d.name.cmp(&domain.name)) {
            Ok(_) => Err(MaintainerError::DuplicateDomain(domain.name)),
            Err(at) => {
                r.domains.insert(at, domain);
                Ok(())
            }
        }
    })
}

/// Sets (or replaces) the seed of the draft.
pub fn set_seed(path: &Path, seed: SeedManifest) -> Result<Edited> {
    edit(path, |r| {
        r.seed = Some(seed);
        Ok(())
    })
}

/// Accepts the ELM record in `elm_path` into the draft, after checking its trainer's signature
/// and, against the draft, that it fits the seed and a domain ([`rules::elm_fits`]) and that
/// its parents are the seed or accepted ELMs ([`rules::parents_known`]).
pub fn accept_elm(path: &Path, elm_path: &Path) -> Result<Edited> {
    let elm = read_envelope::<ElmRecord>(elm_path)?;
    let e = elm.record();
    elm.verify_by(&e.trainer).map_err(Reject::from)?;
    edit(path, |r| {
        rules::elm_fits(r, e)?;
        rules::parents_known(r, e)?;
        let accepted = AcceptedElm {
            record: elm.id(),
            domain: e.domain.clone(),
            weights: e.weights,
        };
        if let Err(at) = r.elms.binary_search_by(|a| a.record.cmp(&accepted.record)) {
            r.elms.insert(at, accepted);
        }
        Ok(())
    })
}

// --- signatures -------------------------------------------------------------------------------

/// The result of signing a file.
#[derive(Debug, Clone, Serialize)]
pub struct Signing {
    pub kind: Kind,
    pub id: ContentId,
    pub key: PublicKey,
    /// Signatures on the file after signing.
    pub signatures: usize,
}

fn sign_as<R: Record>(path: &Path, key: &SigningKey) -> Result<Signing> {
    let mut env = read_envelope::<R>(path)?;
    env.sign(key);
    write_atomic(path, &env.encode(), 0o644)?;
    Ok(Signing {
        kind: R::KIND,
        id: env.id(),
        key: PublicKey::of(key),
        signatures: env.signatures().len(),
    })
}

/// Adds the signature of the key in `key_path` to the root or registry file at `path`,
/// replacing an earlier signature by the same key.
pub fn sign(path: &Path, key_path: &Path) -> Result<Signing> {
    let key = load_key(key_path)?;
    match file_kind(path)? {
        Kind::Root => sign_as::<Root>(path, &key),
        Kind::Registry => sign_as::<Registry>(path, &key),
        found => Err(MaintainerError::WrongKind {
            path: path.to_path_buf(),
            expected: "root or registry",
            found,
        }),
    }
}

fn combine_as<R: Record>(path: &Path, other: &Path) -> Result<usize> {
    let mut env = read_envelope::<R>(path)?;
    let theirs = read_envelope::<R>(other)?;
    if env.body() != theirs.body() {
        return Err(MaintainerError::DifferentBodies(
            path.to_path_buf(),
            other.to_path_buf(),
        ));
    }
    let mut added = 0;
    for sig in theirs.signatures() {
        let have = env
            .signatures()
            .iter()
            .any(|s| s.key == sig.key && env.verifies(s));
        if !have && env.verifies(sig) {
            env.push_signature(*sig);
            added += 1;
        }
    }
    write_atomic(path, &env.encode(), 0o644)?;
    Ok(added)
}

/// Copies into `path` the valid signatures of `other` (same kind, byte-identical body) by keys
/// that have not signed `path`. Returns how many were added.
pub fn combine(path: &Path, other: &Path) -> Result<usize> {
    match file_kind(path)? {
        Kind::Root => combine_as::<Root>(path, other),
        Kind::Registry => combine_as::<Registry>(path, other),
        found => Err(MaintainerError::WrongKind {
            path: path.to_path_buf(),
            expected: "root or registry",
            found,
        }),
    }
}

// --- show and verify --------------------------------------------------------------------------

/// A root or registry file, for display.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub kind: Kind,
    /// The record id (BLAKE3 of the body).
    pub id: ContentId,
    pub body_bytes: usize,
    pub record: serde_json::Value,
    pub signatures: Vec<Signature>,
    /// Whether each signature verifies over this body (not whether its key is trusted).
    pub signature_valid: Vec<bool>,
}

fn summary<R: Record + Serialize>(env: &Signed<R>) -> Summary {
    Summary {
        kind: R::KIND,
        id: env.id(),
        body_bytes: env.body().len(),
        record: serde_json::to_value(env.record()).unwrap_or(serde_json::Value::Null),
        signatures: env.signatures().to_vec(),
        signature_valid: env.signatures().iter().map(|s| env.verifies(s)).collect(),
    }
}

/// Reads any envelope file for display.
pub fn show(path: &Path) -> Result<Summary> {
    Ok(match file_kind(path)? {
        Kind::Root => summary(&read_envelope::<Root>(path)?),
        Kind::Registry => summary(&read_envelope::<Registry>(path)?),
        Kind::Seed => summary(&read_envelope::<SeedManifest>(path)?),
        Kind::Claim => summary(&read_envelope::<btm_protocol::Claim>(path)?),
        Kind::Elm => summary(&read_envelope::<ElmRecord>(path)?),
        Kind::Attestation => summary(&read_envelope::<btm_protocol::Attestation>(path)?),
    })
}

/// What `verify` concluded.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    pub kind: Kind,
    pub id: ContentId,
    pub version: u64,
    /// The signatures counted against the keys that must sign (the trusted root's, or for a
    /// first root its own).
    pub tally: Tally,
    pub threshold: u32,
    /// `None` if it would be accepted (or is identical to the trusted one).
    #[serde(serialize_with = "display_opt")]
    pub rejection: Option<Reject>,
}

fn display_opt<S: serde::Serializer>(r: &Option<Reject>, s: S) -> Result<S::Ok, S::Error> {
    match r {
        Some(r) => s.collect_str(r),
        None => s.serialize_none(),
    }
}

impl Verification {
    pub fn accepted(&self) -> bool {
        self.rejection.is_none()
    }
}

/// Runs the node's acceptance rules on a file, as a node would at time `now`.
///
/// - A root: with `root` (the trusted root file) as a rotation from it, else as a first root.
/// - A registry: against the trusted root `root` and, if given, the `previous` registry the
///   node already trusts (for rollback and equivocation).
pub fn verify(
    path: &Path,
    root: Option<&Path>,
    previous: Option<&Path>,
    now: u64,
) -> Result<Verification> {
    let (bytes, kind) = read_any(path)?;
    let decode_err = |source| MaintainerError::Decode {
        path: path.to_path_buf(),
        source,
    };
    match kind {
        Kind::Root => {
            let offered = Signed::<Root>::decode(&bytes).map_err(decode_err)?;
            let (decision, keys) = match root {
                Some(trusted_path) => {
                    let trusted = read_envelope::<Root>(trusted_path)?;
                    (rules::decide_root(&trusted, &bytes), trusted.into_record())
                }
                None => (rules::decide_initial_root(&bytes), offered.record().clone()),
            };
            let version = offered.record().version;
            Ok(verification(&offered, version, &keys, decision.rejection()))
        }
        Kind::Registry => {
            let offered = Signed::<Registry>::decode(&bytes).map_err(decode_err)?;
            let root = read_envelope::<Root>(root.ok_or(MaintainerError::RootRequired)?)?;
            let registry = previous.map(read_envelope::<Registry>).transpose()?;
            let trusted = Trusted { root, registry };
            let decision = rules::decide_registry(&trusted, &bytes, now);
            let version = offered.record().version;
            Ok(verification(
                &offered,
                version,
                trusted.root.record(),
                decision.rejection(),
            ))
        }
        found => Err(MaintainerError::WrongKind {
            path: path.to_path_buf(),
            expected: "root or registry",
            found,
        }),
    }
}

/// What `verify` reports on `offered` (of `version`), whose signatures count against `keys`.
fn verification<R: Record>(
    offered: &Signed<R>,
    version: u64,
    keys: &Root,
    rejection: Option<&Reject>,
) -> Verification {
    Verification {
        kind: R::KIND,
        id: offered.id(),
        version,
        tally: rules::tally(offered, &keys.keys),
        threshold: keys.threshold,
        rejection: rejection.cloned(),
    }
}

/// The BLAKE3 content id of a file (data shards, weights, tokenizers), read in 1 MiB chunks.
pub fn hash_file(path: &Path) -> Result<ContentId> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(buf.get(..n).unwrap_or_default());
    }
    Ok(ContentId(*hasher.finalize().as_bytes()))
}
