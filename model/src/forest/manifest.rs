//! The forest manifest: which ELMs make up a forest, their domains, parents and content ids.
//!
//! A forest is a JSON file (`forest.json`, specified in `specs/forest.md`) next to the files it
//! names. Every ELM shares the forest's architecture and tokenizer; [`Forest::add`] refuses
//! anything else with a typed [`Error`]. Files are named by path (relative to the manifest's
//! directory) and identified by the BLAKE3 hash of their bytes, which [`Forest::load_elm`] and
//! [`Forest::verify`] check.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use super::error::Error;
use crate::config::GptConfig;
use crate::gpt::Gpt;
use crate::{content_id, fsutil, weights};

/// The member name of the seed in [`Forest::with_seed_member`].
pub const SEED_MEMBER: &str = "seed";

/// The `format` field of a manifest.
pub const FORMAT: &str = "btm-forest/1";
pub use crate::files::MANIFEST_FILE;
/// Largest manifest we read.
pub const MAX_MANIFEST_BYTES: u64 = 16 << 20;
/// Most ELMs a forest may hold.
pub const MAX_ELMS: usize = 65_536;

/// A file the manifest refers to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// Path, relative to the manifest's directory unless absolute.
    pub path: String,
    /// BLAKE3 of the file's bytes (lowercase hex).
    pub id: String,
}

/// A model an ELM was initialised from, with its weight in the initialisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parent {
    /// Its name in the forest (`seed` for the seed LM).
    pub name: String,
    /// Content id of its weights.
    pub id: String,
    /// Its weight in the parameter average the ELM started from (1.0 for a single parent).
    pub weight: f64,
}

/// How a branch (a new ELM) starts, as the manifest records it (`"seed"`,
/// `"posterior_average"` or `"random"`). What it starts from is in [`ForestElm::parents`]; the
/// settings of each kind are arguments where it is made (the `top_k` of
/// [`super::branch::posterior_average_init`], the seed of a random initialisation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitKind {
    /// Branched from (a copy of) the seed LM.
    Seed,
    /// The parameter average of existing ELMs weighted by their domain posterior (cached
    /// prior) on the new domain's dev data: the paper's best.
    PosteriorAverage,
    /// From a random initialisation (no seed phase).
    Random,
}

impl std::str::FromStr for InitKind {
    type Err = crate::Error;

    /// The command-line names: `seed`, `posterior-average` (or `posterior_average`), `random`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "seed" => Ok(InitKind::Seed),
            "posterior-average" | "posterior_average" => Ok(InitKind::PosteriorAverage),
            "random" => Ok(InitKind::Random),
            other => Err(crate::Error::Config(format!(
                "unknown initialisation {other:?} (seed, posterior-average or random)"
            ))),
        }
    }
}

/// What training an ELM cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    /// Optimiser updates of this ELM's own training.
    pub steps: u64,
    /// Training tokens.
    pub tokens: u64,
    /// Training FLOPs (6·N·tokens convention).
    pub flops: f64,
}

/// One member of a forest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForestElm {
    /// Unique name within the forest (usually the domain).
    pub name: String,
    /// The domain(s) it was trained on.
    pub domains: Vec<String>,
    /// Its weights (`model.safetensors` format).
    pub weights: FileRef,
    /// How it was initialised.
    pub init: InitKind,
    /// Its parents and their weights (empty for a random initialisation).
    #[serde(default)]
    pub parents: Vec<Parent>,
    /// What its training cost, when known.
    #[serde(default)]
    pub train: Option<TrainRecord>,
}

/// An ELMforest: ELMs that share one architecture and one tokenizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Forest {
    /// Always [`FORMAT`].
    pub format: String,
    /// The architecture every member has.
    pub architecture: GptConfig,
    /// The tokenizer every member uses.
    pub tokenizer: FileRef,
    /// The seed LM the members descend from, when there is one.
    #[serde(default)]
    pub seed: Option<FileRef>,
    /// The members, in the order they were added.
    pub elms: Vec<ForestElm>,
    /// Where the manifest lives (paths are relative to it).
    #[serde(skip)]
    dir: PathBuf,
}

fn relative(dir: &Path, path: &Path) -> String {
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (d, p) = (abs(dir), abs(path));
    match p.strip_prefix(&d) {
        Ok(rel) => rel.to_string_lossy().into_owned(),
        Err(_) => p.to_string_lossy().into_owned(),
    }
}

fn file_ref(dir: &Path, path: &Path, limit: u64) -> Result<(FileRef, Vec<u8>), Error> {
    let bytes = fsutil::read_limited(path, limit)?;
    Ok((
        FileRef {
            path: relative(dir, path),
            id: content_id(&bytes),
        },
        bytes,
    ))
}

impl Forest {
    /// A new, empty forest whose manifest will live in `dir`, for `architecture` and the
    /// tokenizer file `tokenizer` (usually `dir/tokenizer.json`).
    pub fn create(dir: &Path, architecture: GptConfig, tokenizer: &Path) -> Result<Self, Error> {
        architecture.validate()?;
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
        let (tok, bytes) = file_ref(dir, tokenizer, crate::tokenizer::MAX_FILE_BYTES)?;
        let parsed =
            crate::tokenizer::Tokenizer::from_bytes(&bytes).map_err(|e| e.in_file(tokenizer))?;
        if parsed.vocab_size() != architecture.vocab_size {
            return Err(crate::Error::Config(format!(
                "the tokenizer has {} tokens but the architecture {}",
                parsed.vocab_size(),
                architecture.vocab_size
            ))
            .into());
        }
        Ok(Forest {
            format: FORMAT.to_string(),
            architecture,
            tokenizer: tok,
            seed: None,
            elms: Vec::new(),
            dir: dir.to_path_buf(),
        })
    }

    /// Reads a manifest (checks its format, names and size; not the files: see [`Self::verify`]).
    pub fn open(path: &Path) -> Result<Self, Error> {
        let bytes = fsutil::read_limited(path, MAX_MANIFEST_BYTES)?;
        Self::from_json(&bytes, path)
    }

    /// Parses a manifest's bytes read from `path` (which names it in errors and whose parent
    /// becomes the forest's directory); checks what [`Self::open`] checks.
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<Self, Error> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(Error::BadManifest {
                path: path.to_path_buf(),
                reason: format!("over {MAX_MANIFEST_BYTES} bytes"),
            });
        }
        let bad = |reason: String| Error::BadManifest {
            path: path.to_path_buf(),
            reason,
        };
        let mut f: Forest = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if f.format != FORMAT {
            return Err(bad(format!("format {:?}, expected {FORMAT:?}", f.format)));
        }
        f.architecture.validate().map_err(|e| bad(e.to_string()))?;
        if f.elms.len() > MAX_ELMS {
            return Err(bad(format!(
                "{} ELMs, more than the limit of {MAX_ELMS}",
                f.elms.len()
            )));
        }
        let mut names = std::collections::HashSet::new();
        for e in &f.elms {
            if !names.insert(e.name.as_str()) {
                return Err(bad(format!("ELM name {:?} appears twice", e.name)));
            }
        }
        f.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(f)
    }

    /// The manifest's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The default manifest path, `dir/forest.json`.
    pub fn manifest_path(&self) -> PathBuf {
        self.dir.join(MANIFEST_FILE)
    }

    /// Writes the manifest atomically to `dir/forest.json`.
    pub fn save(&self) -> Result<PathBuf, Error> {
        let path = self.manifest_path();
        let mut bytes = serde_json::to_vec_pretty(self)?;
        bytes.push(b'\n');
        fsutil::write_atomic(&path, &bytes)?;
        Ok(path)
    }

    /// Resolves a manifest path.
    pub fn resolve(&self, r: &FileRef) -> PathBuf {
        let p = Path::new(&r.path);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    /// This forest with its seed as one more member, named [`SEED_MEMBER`] and last, so that
    /// ensembles and averages weigh the seed by the same domain posterior as the ELMs (as
    /// FlexOlmo keeps its public model among its experts). In memory only; nothing is written.
    pub fn with_seed_member(&self) -> Result<Forest, Error> {
        let seed = self
            .seed
            .clone()
            .ok_or(Error::NoSeed("ensemble it with its ELMs"))?;
        if self.elms.iter().any(|e| e.name == SEED_MEMBER) {
            return Err(Error::DuplicateElm(SEED_MEMBER.to_string()));
        }
        let mut f = self.clone();
        f.elms.push(ForestElm {
            name: SEED_MEMBER.to_string(),
            domains: Vec::new(),
            weights: seed,
            init: InitKind::Random,
            parents: Vec::new(),
            train: None,
        });
        Ok(f)
    }

    /// Names of the members.
    pub fn names(&self) -> Vec<&str> {
        self.elms.iter().map(|e| e.name.as_str()).collect()
    }

    /// The index of the member named `name`.
    pub fn index(&self, name: &str) -> Result<usize, Error> {
        self.elms
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(|| Error::UnknownElm(name.to_string()))
    }

    /// Checks a weights file against the forest; returns its reference.
    fn check_weights(&self, elm: &str, path: &Path) -> Result<FileRef, Error> {
        let (r, bytes) = file_ref(&self.dir, path, weights::MAX_FILE_BYTES)?;
        let (found, _) = weights::parse(&bytes, None).map_err(|e| e.in_file(path))?;
        if found != self.architecture {
            return Err(Error::ArchitectureMismatch {
                elm: elm.to_string(),
                expected: self.architecture,
                found,
            });
        }
        Ok(r)
    }

    /// Records the seed LM (same architecture required).
    pub fn set_seed(&mut self, weights: &Path) -> Result<(), Error> {
        self.seed = Some(self.check_weights("seed", weights)?);
        Ok(())
    }

    /// Merges an ELM into the forest. `tokenizer_id` is the content id of the tokenizer it was
    /// trained with; both it and the weights' architecture must be the forest's.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        name: &str,
        domains: Vec<String>,
        weights: &Path,
        tokenizer_id: &str,
        init: InitKind,
        parents: Vec<Parent>,
        train: Option<TrainRecord>,
    ) -> Result<&ForestElm, Error> {
        if self.elms.iter().any(|e| e.name == name) {
            return Err(Error::DuplicateElm(name.to_string()));
        }
        if self.elms.len() >= MAX_ELMS {
            return Err(
                crate::Error::Config(format!("a forest holds at most {MAX_ELMS} ELMs")).into(),
            );
        }
        if tokenizer_id != self.tokenizer.id {
            return Err(Error::TokenizerMismatch {
                elm: name.to_string(),
                expected: self.tokenizer.id.clone(),
                found: tokenizer_id.to_string(),
            });
        }
        let weights = self.check_weights(name, weights)?;
        self.elms.push(ForestElm {
            name: name.to_string(),
            domains,
            weights,
            init,
            parents,
            train,
        });
        Ok(&self.elms[self.elms.len() - 1])
    }

    /// Removes an ELM; returns its record.
    pub fn remove(&mut self, name: &str) -> Result<ForestElm, Error> {
        let i = self.index(name)?;
        Ok(self.elms.remove(i))
    }

    /// Reads member `i`'s weights, checking the content id and the architecture.
    pub fn read_elm(&self, i: usize) -> Result<Vec<weights::NamedTensor>, Error> {
        let elm = self.elms.get(i).ok_or(Error::Empty("read"))?;
        let path = self.resolve(&elm.weights);
        let bytes = fsutil::read_limited(&path, weights::MAX_FILE_BYTES)?;
        let found = content_id(&bytes);
        if found != elm.weights.id {
            return Err(Error::ContentMismatch {
                path,
                expected: elm.weights.id.clone(),
                found,
            });
        }
        let (_, tensors) =
            weights::parse(&bytes, Some(&self.architecture)).map_err(|e| e.in_file(&path))?;
        Ok(tensors)
    }

    /// Loads member `i` as a model.
    pub fn load_elm(&self, i: usize, device: &Device) -> Result<Gpt, Error> {
        let tensors = self.read_elm(i)?;
        Ok(weights::from_named_tensors(
            &self.architecture,
            tensors,
            device,
        )?)
    }

    /// Checks every file the manifest names: content ids, architectures, the tokenizer.
    pub fn verify(&self) -> Result<(), Error> {
        let tok_path = self.resolve(&self.tokenizer);
        let bytes = fsutil::read_limited(&tok_path, crate::tokenizer::MAX_FILE_BYTES)?;
        let found = content_id(&bytes);
        if found != self.tokenizer.id {
            return Err(Error::ContentMismatch {
                path: tok_path,
                expected: self.tokenizer.id.clone(),
                found,
            });
        }
        for i in 0..self.elms.len() {
            self.read_elm(i)?;
        }
        Ok(())
    }
}
