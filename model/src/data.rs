//! The corpus, token streams and packed training blocks.
//!
//! The corpus format is that of `data/corpus` (a copy of the project's 12-domain corpus):
//! `<root>/<domain>/<split>.jsonl` (or `.jsonl.zst`), one `{"id","text"}` document per line.
//! Documents are tokenised and joined with an end-of-text token after each one, then packed
//! into fixed-length blocks of `n_ctx + 1` tokens that overlap by one token, so that every
//! token but the first is a prediction target exactly once per pass.
//!
//! Training order is a pure function of `(seed, position)`: each domain's blocks are visited
//! in a fresh ChaCha-seeded permutation per epoch, and a mixture of several domains takes its
//! samples round-robin from them (domain-balanced batches, as the paper's seed and dense
//! baseline use). A checkpoint therefore only needs the position to resume the exact stream.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::tokenizer::{EOT_ID, Tokenizer};

/// The eight training domains of the bundled corpus.
pub const TRAIN_DOMAINS: [&str; 8] = [
    "bible_kjv",
    "c_headers",
    "debian_changelogs",
    "dict_gcide",
    "kernel_docs",
    "manpages",
    "novels_austen",
    "python_code",
];

/// The four evaluation-only domains (never trained on).
pub const EVAL_DOMAINS: [&str; 4] = ["bible_web", "dict_foldoc", "licenses", "rust_code"];

/// Largest corpus file we read (after decompression).
pub const MAX_SPLIT_BYTES: u64 = 256 << 20;

/// A corpus split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training data.
    Train,
    /// Validation (dev) data.
    Valid,
    /// Test data.
    Test,
}

impl Split {
    /// File stem of the split.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }
}

impl std::str::FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "train" => Ok(Split::Train),
            "valid" => Ok(Split::Valid),
            "test" => Ok(Split::Test),
            _ => Err(Error::Data(format!(
                "unknown split {s:?} (expected train, valid or test)"
            ))),
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One document of the corpus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    /// Where it came from.
    pub id: String,
    /// Its text.
    pub text: String,
}

/// A corpus directory.
#[derive(Debug, Clone)]
pub struct Corpus {
    root: Root,
}

#[derive(Debug, Clone)]
enum Root {
    Dir(PathBuf),
    /// The corpus carried in the program, unpacked on first read ([`crate::bundle`]).
    Carried,
}

impl Corpus {
    /// A corpus rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Corpus {
            root: Root::Dir(root.into()),
        }
    }

    /// `$BTM_CORPUS` when set, else the corpus carried in the program (a copy of `data/corpus`,
    /// unpacked into the user's data directory on first read: see [`crate::bundle`]). Needs no
    /// source tree.
    pub fn bundled() -> Self {
        if let Some(dir) = std::env::var_os("BTM_CORPUS") {
            return Corpus::new(dir);
        }
        Corpus {
            root: Root::Carried,
        }
    }

    /// The root directory (for the carried corpus, its unpacked copy, unpacked now if need be).
    pub fn root(&self) -> Result<&Path, Error> {
        match &self.root {
            Root::Dir(p) => Ok(p),
            Root::Carried => crate::bundle::dir(),
        }
    }

    /// The file holding `domain`'s `split`, compressed or not.
    pub fn path(&self, domain: &str, split: Split) -> Result<PathBuf, Error> {
        if domain.is_empty()
            || !domain
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(Error::Data(format!("invalid domain name {domain:?}")));
        }
        let root = self.root()?;
        let base = root.join(domain).join(format!("{}.jsonl", split.name()));
        if base.exists() {
            return Ok(base);
        }
        let zst = base.with_extension("jsonl.zst");
        if zst.exists() {
            return Ok(zst);
        }
        Err(Error::Data(format!(
            "no {split} split for domain {domain:?} under {} (looked for {} and {})",
            root.display(),
            base.display(),
            zst.display()
        )))
    }

    /// Domains present in the corpus (directories with at least a `valid` split), sorted.
    pub fn domains(&self) -> Result<Vec<String>, Error> {
        let root = self.root()?;
        let rd = std::fs::read_dir(root).map_err(|e| Error::io(root, e))?;
        let mut out = Vec::new();
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() && self.path(&name, Split::Valid).is_ok() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Reads every document of `domain`'s `split`.
    pub fn documents(&self, domain: &str, split: Split) -> Result<Vec<Document>, Error> {
        let path = self.path(domain, split)?;
        read_jsonl(&path)
    }
}

/// Reads a JSONL file of `{"id","text"}` documents (zstd-compressed when it ends in `.zst`).
pub fn read_jsonl(path: &Path) -> Result<Vec<Document>, Error> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "zst") {
        Box::new(zstd::Decoder::new(file).map_err(|e| Error::io(path, e))?)
    } else {
        Box::new(file)
    };
    read_documents(reader, path)
}

/// Reads `{"id","text"}` JSONL documents from a reader (already decompressed), at most
/// [`MAX_SPLIT_BYTES`] of them; `path` names the source in errors.
pub fn read_documents(reader: impl Read, path: &Path) -> Result<Vec<Document>, Error> {
    let reader = BufReader::new(reader.take(MAX_SPLIT_BYTES + 1));
    let mut docs = Vec::new();
    let mut total = 0u64;
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        total += line.len() as u64 + 1;
        if total > MAX_SPLIT_BYTES {
            return Err(Error::TooLarge {
                path: path.to_path_buf(),
                len: total,
                limit: MAX_SPLIT_BYTES,
            });
        }
        if line.trim().is_empty() {
            continue;
        }
        let doc: Document = serde_json::from_str(&line).map_err(|e| {
            Error::Data(format!(
                "{}:{}: not a {{\"id\",\"text\"}} document: {e}",
                path.display(),
                i + 1
            ))
        })?;
        docs.push(doc);
    }
    Ok(docs)
}

/// Tokenises documents into one stream with `<|endoftext|>` after each document. Returns the
/// tokens and the number of UTF-8 bytes of text they cover (each end-of-text counts 1 byte).
/// `max_bytes` stops after the document that reaches that many bytes of text.
pub fn tokenize_documents(
    tok: &Tokenizer,
    docs: &[Document],
    max_bytes: Option<usize>,
) -> Result<(Vec<u32>, u64), Error> {
    let mut texts: Vec<&str> = Vec::new();
    let mut bytes = 0u64;
    for d in docs {
        if max_bytes.is_some_and(|m| bytes >= m as u64) {
            break;
        }
        texts.push(&d.text);
        bytes += d.text.len() as u64 + 1;
    }
    let mut out = Vec::with_capacity(bytes as usize / 3);
    for chunk in texts.chunks(256) {
        for ids in tok.encode_batch(chunk)? {
            out.extend_from_slice(&ids);
            out.push(EOT_ID);
        }
    }
    Ok((out, bytes))
}

/// One domain's token stream, cut into blocks of `n_ctx + 1` tokens with stride `n_ctx`.
#[derive(Debug, Clone)]
pub struct DomainStream {
    /// Domain name.
    pub domain: String,
    /// All tokens.
    pub tokens: Vec<u32>,
    /// Block length minus one (the model's context).
    pub n_ctx: usize,
}

impl DomainStream {
    /// Wraps a token stream.
    pub fn new(domain: impl Into<String>, tokens: Vec<u32>, n_ctx: usize) -> Result<Self, Error> {
        let s = DomainStream {
            domain: domain.into(),
            tokens,
            n_ctx,
        };
        if s.num_blocks() == 0 {
            return Err(Error::Data(format!(
                "domain {:?} has {} tokens, fewer than one block of {}",
                s.domain,
                s.tokens.len(),
                n_ctx + 1
            )));
        }
        Ok(s)
    }

    /// Number of complete blocks.
    pub fn num_blocks(&self) -> usize {
        if self.tokens.len() < self.n_ctx + 1 {
            0
        } else {
            (self.tokens.len() - 1) / self.n_ctx
        }
    }

    /// Block `i`: `n_ctx + 1` tokens starting at `i * n_ctx`.
    pub fn block(&self, i: usize) -> &[u32] {
        let start = i * self.n_ctx;
        &self.tokens[start..start + self.n_ctx + 1]
    }
}

/// A deterministic, domain-balanced stream of training blocks over one or more domains.
#[derive(Debug, Clone)]
pub struct Mixture {
    domains: Vec<DomainStream>,
    seed: u64,
    /// The key of each domain's block permutation: its index in the mixture it was made in.
    keys: Vec<u64>,
}

impl Mixture {
    /// A mixture of `domains` (all with the same `n_ctx`); order is derived from `seed`.
    pub fn new(domains: Vec<DomainStream>, seed: u64) -> Result<Self, Error> {
        let Some(first) = domains.first() else {
            return Err(Error::Data("a mixture needs at least one domain".into()));
        };
        if domains.iter().any(|d| d.n_ctx != first.n_ctx) {
            return Err(Error::Data(
                "all domains of a mixture must share n_ctx".into(),
            ));
        }
        let keys = (0..domains.len() as u64).collect();
        Ok(Mixture {
            domains,
            seed,
            keys,
        })
    }

    /// Domain `d` of this mixture alone, in the same block order: sample `k` of the result is
    /// the `k`-th block that this mixture reads from domain `d`. An ELM branched from a seed
    /// trained on this mixture continues its domain where the seed left it by starting at the
    /// number of blocks the seed read from it ([`Mixture::blocks_read`]).
    pub fn only(&self, d: usize) -> Result<Mixture, Error> {
        let Some(dom) = self.domains.get(d) else {
            return Err(Error::Data(format!(
                "the mixture has {} domains, not {}",
                self.domains.len(),
                d + 1
            )));
        };
        Ok(Mixture {
            domains: vec![dom.clone()],
            seed: self.seed,
            keys: vec![self.keys[d]],
        })
    }

    /// How many blocks of domain `d` the first `samples` samples of this mixture hold.
    pub fn blocks_read(&self, d: usize, samples: u64) -> u64 {
        let nd = self.domains.len() as u64;
        let d = d as u64;
        if samples <= d {
            0
        } else {
            (samples - d).div_ceil(nd)
        }
    }

    /// The context length.
    pub fn n_ctx(&self) -> usize {
        self.domains[0].n_ctx
    }

    /// The domains.
    pub fn domains(&self) -> &[DomainStream] {
        &self.domains
    }

    /// The `k`-th sample of the infinite stream: domain `k mod D`, that domain's
    /// `(k div D)`-th block in its epoch-wise permutation.
    pub fn sample(&self, k: u64) -> &[u32] {
        let nd = self.domains.len() as u64;
        let d = (k % nd) as usize;
        let j = k / nd;
        let dom = &self.domains[d];
        let n = dom.num_blocks() as u64;
        let epoch = j / n;
        let perm = permutation(n as usize, self.seed, self.keys[d], epoch);
        dom.block(perm[(j % n) as usize])
    }

    /// The batch at sample position `start`: `batch` blocks, flattened row-major
    /// `[batch, n_ctx + 1]`.
    pub fn batch(&self, start: u64, batch: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(batch * (self.n_ctx() + 1));
        for k in start..start + batch as u64 {
            out.extend_from_slice(self.sample(k));
        }
        out
    }
}

/// The permutation of `0..n` used for `(seed, domain, epoch)`.
fn permutation(n: usize, seed: u64, domain: u64, epoch: u64) -> Vec<usize> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&domain.to_le_bytes());
    key[16..24].copy_from_slice(&epoch.to_le_bytes());
    key[24..].copy_from_slice(b"btm-data");
    let mut rng = ChaCha8Rng::from_seed(key);
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut rng);
    v
}

/// Loads the token streams of `domains`' `split` from `corpus`.
pub fn load_streams(
    corpus: &Corpus,
    tok: &Tokenizer,
    domains: &[&str],
    split: Split,
    n_ctx: usize,
    max_bytes: Option<usize>,
) -> Result<Vec<DomainStream>, Error> {
    domains
        .iter()
        .map(|d| {
            let docs = corpus.documents(d, split)?;
            let (tokens, _) = tokenize_documents(tok, &docs, max_bytes)?;
            DomainStream::new(*d, tokens, n_ctx)
        })
        .collect()
}

/// Trains the network's tokenizer on the seed mix: the first `bytes_per_domain` bytes of each
/// training domain's train split of `corpus`, domains in sorted order. Deterministic: the same
/// corpus and settings give the same `tokenizer.json` bytes.
pub fn seed_mix_tokenizer(
    corpus: &Corpus,
    vocab_size: usize,
    bytes_per_domain: usize,
) -> Result<Tokenizer, Error> {
    let mut texts: Vec<String> = Vec::new();
    for domain in TRAIN_DOMAINS {
        let docs = corpus.documents(domain, Split::Train)?;
        let mut used = 0;
        for d in docs {
            if used >= bytes_per_domain {
                break;
            }
            used += d.text.len();
            texts.push(d.text);
        }
    }
    Tokenizer::train(texts.iter().map(String::as_str), vocab_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(name: &str, n: u32, ctx: usize) -> DomainStream {
        offset_stream(name, 0, n, ctx)
    }

    fn offset_stream(name: &str, from: u32, n: u32, ctx: usize) -> DomainStream {
        DomainStream::new(name, (from..from + n).collect(), ctx).unwrap()
    }

    #[test]
    fn blocks_overlap_by_one_token_and_cover_every_target_once() {
        let s = stream("a", 10, 3);
        assert_eq!(s.num_blocks(), 3);
        assert_eq!(s.block(0), &[0, 1, 2, 3]);
        assert_eq!(s.block(1), &[3, 4, 5, 6]);
        assert_eq!(s.block(2), &[6, 7, 8, 9]);
    }

    #[test]
    fn mixture_is_balanced_and_deterministic() {
        let m = Mixture::new(
            vec![stream("a", 100, 4), offset_stream("b", 100, 1000, 4)],
            7,
        )
        .unwrap();
        let again = Mixture::new(
            vec![stream("a", 100, 4), offset_stream("b", 100, 1000, 4)],
            7,
        )
        .unwrap();
        for k in 0..200 {
            assert_eq!(m.sample(k), again.sample(k));
            let first = m.sample(k)[0];
            // Even samples come from domain a (tokens < 100), odd ones from b.
            assert_eq!(k % 2 == 0, first < 100, "sample {k}");
        }
        // A different seed gives a different order.
        let other = Mixture::new(vec![stream("a", 100, 4), stream("b", 1000, 4)], 8).unwrap();
        assert!((0..20).any(|k| m.sample(k) != other.sample(k)));
    }

    #[test]
    fn one_domain_of_a_mixture_continues_where_the_mixture_left_it() {
        let m = Mixture::new(
            vec![
                stream("a", 100, 4),
                offset_stream("b", 100, 200, 4),
                offset_stream("c", 300, 60, 4),
            ],
            3,
        )
        .unwrap();
        for d in 0..3 {
            let alone = m.only(d).unwrap();
            // Every block the mixture reads from domain d, in order, over several epochs.
            let from_mix: Vec<&[u32]> = (0..120u64)
                .filter(|k| k % 3 == d as u64)
                .map(|k| m.sample(k))
                .collect();
            let from_alone: Vec<&[u32]> = (0..from_mix.len() as u64)
                .map(|k| alone.sample(k))
                .collect();
            assert_eq!(from_mix, from_alone, "domain {d}");
            // After 10 samples the mixture has read 4 blocks of a and 3 of b and c, so the
            // one-domain stream goes on at that block.
            let read = m.blocks_read(d, 10);
            assert_eq!(read, [4, 3, 3][d]);
            let next_in_mix = (10..).find(|k| k % 3 == d as u64).unwrap();
            assert_eq!(alone.sample(read), m.sample(next_in_mix));
        }
        assert_eq!(m.blocks_read(2, 2), 0);
        assert!(m.only(3).is_err());
        // A one-domain mixture made afresh shuffles with key 0: only domain 0 agrees.
        let fresh = Mixture::new(vec![offset_stream("b", 100, 200, 4)], 3).unwrap();
        assert!((0..20).any(|k| fresh.sample(k) != m.only(1).unwrap().sample(k)));
    }

    #[test]
    fn each_epoch_visits_every_block_once() {
        let m = Mixture::new(vec![stream("a", 41, 4)], 1).unwrap();
        let mut firsts: Vec<u32> = (0..10).map(|k| m.sample(k)[0]).collect();
        firsts.sort_unstable();
        assert_eq!(firsts, (0..10).map(|i| i * 4).collect::<Vec<_>>());
    }

    #[test]
    fn short_domains_and_bad_names_are_refused() {
        assert!(DomainStream::new("a", vec![1, 2], 4).is_err());
        assert!(
            Corpus::new("/nonexistent")
                .path("../etc", Split::Train)
                .is_err()
        );
    }
}
