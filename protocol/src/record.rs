//! The record types, their canonical encodings and their field rules.
//!
//! Each top-level record is a CBOR array whose first element is the format version (1); nested
//! structs are arrays in the order of their fields. `specs/protocol.md` lists every field.

use std::collections::BTreeMap;

use ciborium::Value;
use serde::Serialize;

use crate::FORMAT_VERSION;
use crate::cbor::{self, Fields, bytes, strictly_ascending, text, uint};
use crate::{ContentId, DecodeError, NodeId, ParentWeightsError, PublicKey};

/// Most maintainer keys a root may list.
pub const MAX_ROOT_KEYS: usize = 64;
/// Most domains a registry may list.
pub const MAX_DOMAINS: usize = 1024;
/// Most accepted ELMs a registry may list.
pub const MAX_ELMS: usize = 16384;
/// Most parents an ELM may have.
pub const MAX_PARENTS: usize = 64;
/// Longest domain name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Longest domain description, in bytes of UTF-8.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// Highest root or registry version (fits a signed 64-bit integer, as SQLite stores it).
pub const MAX_VERSION: u64 = i64::MAX as u64;
/// Parent weights are parts per million and sum to this.
pub const PPM_ONE: u32 = 1_000_000;

/// The record types. The number is the `kind` field of a signed envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Root = 1,
    Registry = 2,
    Seed = 3,
    Claim = 4,
    Elm = 5,
    Attestation = 6,
}

impl Kind {
    /// All kinds, in number order.
    pub const ALL: [Kind; 6] = [
        Kind::Root,
        Kind::Registry,
        Kind::Seed,
        Kind::Claim,
        Kind::Elm,
        Kind::Attestation,
    ];

    /// The number written in envelopes.
    pub fn number(self) -> u64 {
        self as u64
    }

    /// The kind with this envelope number.
    pub fn from_number(n: u64) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.number() == n)
    }

    /// A human name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Root => "root",
            Kind::Registry => "registry",
            Kind::Seed => "seed manifest",
            Kind::Claim => "claim",
            Kind::Elm => "ELM record",
            Kind::Attestation => "attestation",
        }
    }

    /// The signature context: every signature covers these ASCII bytes followed by the body.
    pub fn context(self) -> &'static [u8] {
        match self {
            Kind::Root => b"btm-root-v1:",
            Kind::Registry => b"btm-registry-v1:",
            Kind::Seed => b"btm-seed-v1:",
            Kind::Claim => b"btm-claim-v1:",
            Kind::Elm => b"btm-elm-record-v1:",
            Kind::Attestation => b"btm-attestation-v1:",
        }
    }

    /// The largest encoded body accepted; checked before parsing.
    pub fn max_size(self) -> usize {
        match self {
            Kind::Root => 16 * 1024,
            Kind::Registry => 1024 * 1024,
            Kind::Seed => 4 * 1024,
            Kind::Claim => 1024,
            Kind::Elm => 8 * 1024,
            Kind::Attestation => 1024,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A record with one canonical encoding. `decode(encode(r)) == r` and `encode(decode(b)) == b`.
pub trait Record: Sized + Clone + std::fmt::Debug {
    /// The record type.
    const KIND: Kind;

    #[doc(hidden)]
    fn to_value(&self) -> Value;

    #[doc(hidden)]
    fn from_value(value: Value) -> Result<Self, DecodeError>;

    /// The canonical encoding.
    fn encode(&self) -> Vec<u8> {
        cbor::to_vec(&self.to_value())
    }

    /// Decodes the canonical encoding: size limit first, then bounded parsing, the field rules,
    /// and last a re-encoding that must equal the input.
    fn decode(input: &[u8]) -> Result<Self, DecodeError> {
        let value = cbor::parse(input, Self::KIND, Self::KIND.max_size())?;
        let record = Self::from_value(value)?;
        if record.encode() != input {
            return Err(DecodeError::NonCanonical { kind: Self::KIND });
        }
        Ok(record)
    }

    /// Checks the field rules of a record built in memory (what `decode` would check).
    fn validate(&self) -> Result<(), DecodeError> {
        Self::decode(&self.encode()).map(drop)
    }

    /// The BLAKE3 hash of the canonical encoding.
    fn id(&self) -> ContentId {
        ContentId::of(&self.encode())
    }
}

/// Converts a perplexity to integer milli-units (`round(ppl * 1000)`), the wire form.
/// `None` for NaN, infinities, negatives and values of 2^53/1000 or more.
pub fn ppl_to_milli(ppl: f64) -> Option<u64> {
    const LIMIT: f64 = 9_007_199_254_740_992.0; // 2^53
    let scaled = (ppl * 1000.0).round();
    (scaled.is_finite() && (0.0..LIMIT).contains(&scaled)).then_some(scaled as u64)
}

/// Converts integer milli-units back to a perplexity.
pub fn milli_to_ppl(milli: u64) -> f64 {
    milli as f64 / 1000.0
}

// ---------------------------------------------------------------------------------------------

/// The maintainers' root of trust: who may sign registries, and how many must.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Root {
    /// Starts at 1; a rotation publishes version + 1.
    pub version: u64,
    /// Unix seconds after which the root is no longer trusted for registry updates.
    pub expires: u64,
    /// How many distinct listed keys must sign a registry or the next root.
    pub threshold: u32,
    /// The maintainer keys, strictly ascending by bytes.
    pub keys: Vec<PublicKey>,
}

impl Record for Root {
    const KIND: Kind = Kind::Root;

    fn to_value(&self) -> Value {
        Value::Array(vec![
            uint(FORMAT_VERSION),
            uint(self.version),
            uint(self.expires),
            uint(self.threshold.into()),
            Value::Array(self.keys.iter().map(|k| bytes(&k.0)).collect()),
        ])
    }

    fn from_value(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::record(value, Kind::Root, 5)?;
        let version = f.u64("root.version")?;
        let expires = f.u64("root.expires")?;
        let threshold = f.u32("root.threshold")?;
        let keys = f
            .list("root.keys", MAX_ROOT_KEYS)?
            .into_iter()
            .map(|v| cbor::as_key(v, "root.keys"))
            .collect::<Result<Vec<_>, _>>()?;
        strictly_ascending(&keys, "root.keys", |k| *k)?;
        if version == 0 || version > MAX_VERSION {
            return Err(DecodeError::Invalid {
                field: "root.version",
                reason: "must be between 1 and 2^63-1",
            });
        }
        if threshold == 0 || threshold as usize > keys.len() {
            return Err(DecodeError::Invalid {
                field: "root.threshold",
                reason: "must be between 1 and the number of keys",
            });
        }
        Ok(Root {
            version,
            expires,
            threshold,
            keys,
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// The smallest client version allowed to take part, `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ClientVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl ClientVersion {
    pub const fn new(major: u32, minor: u32, patch: u32) -> ClientVersion {
        ClientVersion {
            major,
            minor,
            patch,
        }
    }
}

impl std::fmt::Display for ClientVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl std::str::FromStr for ClientVersion {
    type Err = DecodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = DecodeError::Invalid {
            field: "client version",
            reason: "expected MAJOR.MINOR.PATCH",
        };
        let mut parts = s.split('.').map(|p| p.parse::<u32>());
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(Ok(major)), Some(Ok(minor)), Some(Ok(patch)), None) => Ok(ClientVersion {
                major,
                minor,
                patch,
            }),
            _ => Err(bad),
        }
    }
}

/// How verifiers score an ELM on a domain's held-out data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EvalSettings {
    /// Tokens per evaluation block (non-overlapping blocks).
    pub block_size: u32,
    /// Most tokens of the validation set scored.
    pub max_eval_tokens: u64,
    /// Relative tolerance between claimed and measured perplexity, in parts per million.
    pub ppl_tolerance_ppm: u32,
    /// Acceptance: the ELM's withheld-data perplexity must be below the seed's by at least this
    /// share (parts per million; 0 = merely not worse).
    pub min_gain_ppm: u32,
    /// Acceptance: the ELM's ratio of withheld-data to public-data (`valid`) perplexity, divided
    /// by the seed's same ratio, may be at most this (parts per million, at least 1 000 000);
    /// more means it was trained on, or memorised, the public split.
    pub max_memorisation_ppm: u32,
    /// BLAKE3 commitment to the domain's withheld verification pool (never published as a
    /// blob); `None` when the maintainers keep none (acceptance then rests on public data).
    pub withheld: Option<ContentId>,
}

impl EvalSettings {
    /// The settings of a domain with no withheld pool and the default thresholds.
    pub fn public(block_size: u32, max_eval_tokens: u64, ppl_tolerance_ppm: u32) -> Self {
        EvalSettings {
            block_size,
            max_eval_tokens,
            ppl_tolerance_ppm,
            min_gain_ppm: 0,
            max_memorisation_ppm: 1_250_000,
            withheld: None,
        }
    }
}

/// A domain: a named slice of the corpus with its own data and evaluation rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Domain {
    /// 1 to 64 bytes of `[a-z0-9._-]`, starting with `[a-z0-9]`.
    pub name: String,
    /// Free UTF-8 text, at most 1024 bytes.
    pub description: String,
    pub train: ContentId,
    pub valid: ContentId,
    pub test: ContentId,
    pub eval: EvalSettings,
}

/// Checks the domain-name rule.
pub fn check_domain_name(name: &str, field: &'static str) -> Result<(), DecodeError> {
    let ok_first = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let ok_rest = name.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_' || b == b'-'
    });
    if name.len() > MAX_NAME_LEN {
        Err(DecodeError::TooLong {
            field,
            max: MAX_NAME_LEN,
        })
    } else if ok_first && ok_rest {
        Ok(())
    } else {
        Err(DecodeError::Invalid {
            field,
            reason: "a domain name is [a-z0-9][a-z0-9._-]*",
        })
    }
}

impl Domain {
    fn to_value(&self) -> Value {
        Value::Array(vec![
            text(&self.name),
            text(&self.description),
            bytes(&self.train.0),
            bytes(&self.valid.0),
            bytes(&self.test.0),
            Value::Array(vec![
                uint(self.eval.block_size.into()),
                uint(self.eval.max_eval_tokens),
                uint(self.eval.ppl_tolerance_ppm.into()),
                uint(self.eval.min_gain_ppm.into()),
                uint(self.eval.max_memorisation_ppm.into()),
                self.eval.withheld.map_or(Value::Null, |id| bytes(&id.0)),
            ]),
        ])
    }

    fn from_value(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::new(value, "domain", 6)?;
        let name = f.text("domain.name", MAX_NAME_LEN)?;
        check_domain_name(&name, "domain.name")?;
        let description = f.text("domain.description", MAX_DESCRIPTION_LEN)?;
        let train = f.id("domain.train")?;
        let valid = f.id("domain.valid")?;
        let test = f.id("domain.test")?;
        let mut e = Fields::new(f.next("domain.eval")?, "domain.eval", 6)?;
        let eval = EvalSettings {
            block_size: e.u32("domain.eval.block_size")?,
            max_eval_tokens: e.u64("domain.eval.max_eval_tokens")?,
            ppl_tolerance_ppm: e.u32("domain.eval.ppl_tolerance_ppm")?,
            min_gain_ppm: e.u32("domain.eval.min_gain_ppm")?,
            max_memorisation_ppm: e.u32("domain.eval.max_memorisation_ppm")?,
            withheld: e.opt_id("domain.eval.withheld")?,
        };
        if eval.block_size == 0 || eval.max_eval_tokens < u64::from(eval.block_size) {
            return Err(DecodeError::Invalid {
                field: "domain.eval",
                reason: "block_size must be at least 1 and at most max_eval_tokens",
            });
        }
        if eval.min_gain_ppm >= PPM_ONE || eval.max_memorisation_ppm < PPM_ONE {
            return Err(DecodeError::Invalid {
                field: "domain.eval",
                reason: "min_gain_ppm below 1000000 and max_memorisation_ppm at least 1000000",
            });
        }
        Ok(Domain {
            name,
            description,
            train,
            valid,
            test,
            eval,
        })
    }
}

/// An ELM the maintainers accepted into the forest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AcceptedElm {
    /// The content id of the ELM record (hash of its canonical encoding).
    pub record: ContentId,
    /// Its domain; must be one of the registry's domains.
    pub domain: String,
    /// The content id of its weights.
    pub weights: ContentId,
}

/// The maintainers' signed statement of what the network trains: domains, seed, accepted ELMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Registry {
    /// Strictly increases with every publication.
    pub version: u64,
    /// Unix seconds after which clients refuse it (freeze protection).
    pub expires: u64,
    /// Clients older than this must upgrade before taking part.
    pub min_client_version: ClientVersion,
    /// Strictly ascending by name.
    pub domains: Vec<Domain>,
    /// The seed LM, once trained.
    pub seed: Option<SeedManifest>,
    /// Strictly ascending by record id.
    pub elms: Vec<AcceptedElm>,
}

impl Registry {
    /// The domain with this name.
    pub fn domain(&self, name: &str) -> Option<&Domain> {
        self.domains
            .binary_search_by(|d| d.name.as_str().cmp(name))
            .ok()
            .and_then(|i| self.domains.get(i))
    }
}

impl Record for Registry {
    const KIND: Kind = Kind::Registry;

    fn to_value(&self) -> Value {
        let v = self.min_client_version;
        Value::Array(vec![
            uint(FORMAT_VERSION),
            uint(self.version),
            uint(self.expires),
            Value::Array(vec![
                uint(v.major.into()),
                uint(v.minor.into()),
                uint(v.patch.into()),
            ]),
            Value::Array(self.domains.iter().map(Domain::to_value).collect()),
            self.seed
                .as_ref()
                .map_or(Value::Null, SeedManifest::to_value),
            Value::Array(
                self.elms
                    .iter()
                    .map(|e| {
                        Value::Array(vec![
                            bytes(&e.record.0),
                            text(&e.domain),
                            bytes(&e.weights.0),
                        ])
                    })
                    .collect(),
            ),
        ])
    }

    fn from_value(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::record(value, Kind::Registry, 7)?;
        let version = f.u64("registry.version")?;
        let expires = f.u64("registry.expires")?;
        let mut v = Fields::new(
            f.next("registry.min_client_version")?,
            "registry.min_client_version",
            3,
        )?;
        let min_client_version = ClientVersion {
            major: v.u32("registry.min_client_version")?,
            minor: v.u32("registry.min_client_version")?,
            patch: v.u32("registry.min_client_version")?,
        };
        let domains = f
            .list("registry.domains", MAX_DOMAINS)?
            .into_iter()
            .map(Domain::from_value)
            .collect::<Result<Vec<_>, _>>()?;
        strictly_ascending(&domains, "registry.domains", |d| d.name.clone())?;
        let seed = match f.next("registry.seed")? {
            Value::Null => None,
            other => Some(SeedManifest::from_value(other)?),
        };
        let elms = f
            .list("registry.elms", MAX_ELMS)?
            .into_iter()
            .map(|v| {
                let mut e = Fields::new(v, "registry.elms", 3)?;
                Ok(AcceptedElm {
                    record: e.id("registry.elms.record")?,
                    domain: e.text("registry.elms.domain", MAX_NAME_LEN)?,
                    weights: e.id("registry.elms.weights")?,
                })
            })
            .collect::<Result<Vec<_>, DecodeError>>()?;
        strictly_ascending(&elms, "registry.elms", |e| e.record)?;
        if version == 0 || version > MAX_VERSION {
            return Err(DecodeError::Invalid {
                field: "registry.version",
                reason: "must be between 1 and 2^63-1",
            });
        }
        let registry = Registry {
            version,
            expires,
            min_client_version,
            domains,
            seed,
            elms,
        };
        if registry
            .elms
            .iter()
            .any(|e| registry.domain(&e.domain).is_none())
        {
            return Err(DecodeError::Invalid {
                field: "registry.elms.domain",
                reason: "not a domain of this registry",
            });
        }
        Ok(registry)
    }
}

// ---------------------------------------------------------------------------------------------

/// The transformer shape shared by the seed and every ELM of the forest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Architecture {
    pub vocab_size: u32,
    /// Context length in tokens.
    pub context: u32,
    pub d_model: u32,
    pub heads: u32,
    pub layers: u32,
}

impl Architecture {
    fn to_value(self) -> Value {
        Value::Array(
            [
                self.vocab_size,
                self.context,
                self.d_model,
                self.heads,
                self.layers,
            ]
            .into_iter()
            .map(|n| uint(n.into()))
            .collect(),
        )
    }

    fn from_value(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::new(value, "architecture", 5)?;
        let arch = Architecture {
            vocab_size: f.u32("architecture.vocab_size")?,
            context: f.u32("architecture.context")?,
            d_model: f.u32("architecture.d_model")?,
            heads: f.u32("architecture.heads")?,
            layers: f.u32("architecture.layers")?,
        };
        let positive = [
            arch.vocab_size,
            arch.context,
            arch.d_model,
            arch.heads,
            arch.layers,
        ]
        .iter()
        .all(|&n| n > 0);
        if !positive || !arch.d_model.is_multiple_of(arch.heads) {
            return Err(DecodeError::Invalid {
                field: "architecture",
                reason: "all sizes must be positive and d_model divisible by heads",
            });
        }
        Ok(arch)
    }

    /// The shape as the weights format states it.
    pub fn weights_config(&self) -> crate::weights::Config {
        crate::weights::Config {
            vocab_size: self.vocab_size as usize,
            n_ctx: self.context as usize,
            d_model: self.d_model as usize,
            n_heads: self.heads as usize,
            n_layers: self.layers as usize,
        }
    }

    /// The exact size of a weights file of this shape (`weights::expected_size`), or `None` if
    /// the shape is not a valid model.
    pub fn weights_size(&self) -> Option<u64> {
        crate::weights::expected_size(&self.weights_config()).ok()
    }

    /// The architecture id: BLAKE3 of the canonical encoding of this 5-element array.
    pub fn id(&self) -> ContentId {
        ContentId::of(&cbor::to_vec(&self.to_value()))
    }
}

/// What it took to train a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TrainingSummary {
    pub steps: u64,
    pub tokens: u64,
    /// Training FLOPs (about 6 * parameters * tokens), saturating at 2^64 - 1.
    pub flops: u64,
    /// Validation perplexity on the domain mix, in milli-units.
    pub valid_ppl_milli: u64,
}

/// The seed LM every ELM branches from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeedManifest {
    pub architecture: Architecture,
    pub tokenizer: ContentId,
    pub weights: ContentId,
    pub training: TrainingSummary,
    /// Where the seed stands in its learning-rate schedule: ELMs that continue the seed's run
    /// (the released BTM code) take the schedule from `step` on.
    pub schedule: Schedule,
    /// The seed's optimiser state (a blob), for ELMs that continue it; `None` if not published.
    pub optimizer: Option<ContentId>,
}

/// A position in a training run's learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Schedule {
    /// Updates done so far.
    pub step: u64,
    /// The schedule's length in updates (`step <= total`).
    pub total: u64,
}

impl Record for SeedManifest {
    const KIND: Kind = Kind::Seed;

    fn to_value(&self) -> Value {
        let t = self.training;
        Value::Array(vec![
            uint(FORMAT_VERSION),
            self.architecture.to_value(),
            bytes(&self.tokenizer.0),
            bytes(&self.weights.0),
            Value::Array(vec![
                uint(t.steps),
                uint(t.tokens),
                uint(t.flops),
                uint(t.valid_ppl_milli),
            ]),
            Value::Array(vec![uint(self.schedule.step), uint(self.schedule.total)]),
            self.optimizer.map_or(Value::Null, |id| bytes(&id.0)),
        ])
    }

    fn from_value(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::record(value, Kind::Seed, 7)?;
        let architecture = Architecture::from_value(f.next("seed.architecture")?)?;
        let tokenizer = f.id("seed.tokenizer")?;
        let weights = f.id("seed.weights")?;
        let mut t = Fields::new(f.next("seed.training")?, "seed.training", 4)?;
        let training = TrainingSummary {
            steps: t.u64("seed.training.steps")?,
            tokens: t.u64("seed.training.tokens")?,
            flops: t.u64("seed.training.flops")?,
            valid_ppl_milli: t.u64("seed.training.valid_ppl_milli")?,
        };
        let mut sc = Fields::new(f.next("seed.schedule")?, "seed.schedule", 2)?;
        let schedule = Schedule {
            step: sc.u64("seed.schedule.step")?,
            total: sc.u64("seed.schedule.total")?,
        };
        if schedule.step > schedule.total {
            return Err(DecodeError::Invalid {
                field: "seed.schedule",
                reason: "step must not exceed total",
            });
        }
        let optimizer = f.opt_id("seed.optimizer")?;
        Ok(SeedManifest {
            architecture,
            tokenizer,
            weights,
            training,
            schedule,
            optimizer,
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// A node's announcement that it is training a domain until its lease expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Claim {
    pub domain: String,
    /// The claiming node; the claim's envelope must carry its signature.
    pub node: NodeId,
    /// Unix seconds.
    pub lease_expires: u64,
    /// When this node first claimed this domain (Unix seconds); renewals keep it, so the total
    /// lease held without an announced ELM is `lease_expires - first_claimed`.
    pub first_claimed: u64,
    /// Training progress so far, signed with the claim; a renewal must show more of it.
    pub progress: Option<ClaimProgress>,
}

/// A claimant's training progress: what renewing a lease costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ClaimProgress {
    /// Updates done.
    pub step: u64,
    /// Training loss at `step`, milli-units.
    pub loss_milli: u64,
    /// BLAKE3 of the checkpoint's weights at `step`.
    pub checkpoint: ContentId,
}

impl Record for Claim {
    const KIND: Kind = Kind::Claim;

    fn to_value(&self) -> Value {
        Value::Array(vec![
            uint(FORMAT_VERSION),
            text(&self.domain),
            bytes(&self.node.0),
            uint(self.lease_expires),
            uint(self.first_claimed),
            self.progress.map_or(Value::Null, |p| {
                Value::Array(vec![
                    uint(p.step),
                    uint(p.loss_milli),
                    bytes(&p.checkpoint.0),
                ])
            }),
        ])
    }

    fn from_value(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::record(value, Kind::Claim, 6)?;
        let domain = f.text("claim.domain", MAX_NAME_LEN)?;
        check_domain_name(&domain, "claim.domain")?;
        let node = f.key("claim.node")?;
        let lease_expires = f.u64("claim.lease_expires")?;
        let first_claimed = f.u64("claim.first_claimed")?;
        if first_claimed > lease_expires {
            return Err(DecodeError::Invalid {
                field: "claim.first_claimed",
                reason: "the first claim cannot come after the lease's end",
            });
        }
        let progress = match f.next("claim.progress")? {
            Value::Null => None,
            other => {
                let mut p = Fields::new(other, "claim.progress", 3)?;
                Some(ClaimProgress {
                    step: p.u64("claim.progress.step")?,
                    loss_milli: p.u64("claim.progress.loss_milli")?,
                    checkpoint: p.id("claim.progress.checkpoint")?,
                })
            }
        };
        Ok(Claim {
            domain,
            node,
            lease_expires,
            first_claimed,
            progress,
        })
    }
}

/// One model an ELM was branched from, with its averaging weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Parent {
    /// The weights id of the seed or of an accepted ELM.
    pub weights: ContentId,
    /// Parts per million; the weights of all parents sum to 1 000 000.
    pub weight_ppm: u32,
}

impl Parent {
    /// The parent list of an ELM branched from a weighted average of `weights` (weights id,
    /// averaging weight), in the form decoding requires: strictly ascending by weights id,
    /// `weight_ppm` summing to exactly [`PPM_ONE`].
    ///
    /// The weights are normalised to shares of their sum; each share becomes parts per million
    /// by the largest-remainder method (every parent gets the floor of its exact ppm, and the
    /// ppm left over go one each to the largest fractional parts, ties to the smaller id), so
    /// each `weight_ppm` is within 1 of the exact share and the sum is exact. Entries with the
    /// same id are merged (their weights add up): averaging the same weights twice is one
    /// parent with the combined weight. Every distinct id stays a parent, even one whose share
    /// rounds to 0 ppm (zero weights are allowed as long as one weight is positive).
    ///
    /// Errors: no entries, more than [`MAX_PARENTS`] distinct ids, a weight that is negative,
    /// NaN or infinite, or weights that are all zero.
    pub fn from_weights(weights: &[(ContentId, f64)]) -> Result<Vec<Parent>, ParentWeightsError> {
        if weights.is_empty() {
            return Err(ParentWeightsError::Empty);
        }
        if let Some(&(id, weight)) = weights.iter().find(|(_, w)| !(w.is_finite() && *w >= 0.0)) {
            return Err(ParentWeightsError::BadWeight {
                weights: id,
                weight,
            });
        }
        // Scaled by the largest weight first, so that sums of huge weights stay finite.
        let max = weights.iter().map(|(_, w)| *w).fold(0.0, f64::max);
        if max <= 0.0 {
            return Err(ParentWeightsError::AllZero);
        }
        let mut merged: BTreeMap<ContentId, f64> = BTreeMap::new();
        for (id, w) in weights {
            *merged.entry(*id).or_insert(0.0) += w / max;
        }
        if merged.len() > MAX_PARENTS {
            return Err(ParentWeightsError::TooMany {
                count: merged.len(),
                max: MAX_PARENTS,
            });
        }
        let total: f64 = merged.values().sum();
        // Exact shares in ppm (in id order), and their floors.
        let exact: Vec<f64> = merged
            .values()
            .map(|w| w / total * f64::from(PPM_ONE))
            .collect();
        let mut ppm: Vec<u32> = exact
            .iter()
            .map(|e| e.floor().clamp(0.0, f64::from(PPM_ONE)) as u32)
            .collect();
        let mut sum: u32 = ppm.iter().sum();
        // The ppm left over go one each to the largest fractional parts, ties to the smaller
        // id, never to a zero share. Exactly, fewer are left than there are positive fractional
        // parts; the loops also absorb a float rounding error either way.
        let fraction = |i: usize| exact.get(i).map_or(0.0, |e| e - e.floor());
        let mut order: Vec<usize> = (0..exact.len())
            .filter(|&i| exact.get(i).is_some_and(|e| *e > 0.0))
            .collect();
        order.sort_by(|&a, &b| fraction(b).total_cmp(&fraction(a)).then(a.cmp(&b)));
        for &i in order.iter().cycle() {
            if sum >= PPM_ONE {
                break;
            }
            if let Some(p) = ppm.get_mut(i) {
                *p += 1;
                sum += 1;
            }
        }
        for &i in order.iter().rev().cycle() {
            if sum <= PPM_ONE {
                break;
            }
            if let Some(p) = ppm.get_mut(i).filter(|p| **p > 0) {
                *p -= 1;
                sum -= 1;
            }
        }
        Ok(merged
            .into_keys()
            .zip(ppm)
            .map(|(weights, weight_ppm)| Parent {
                weights,
                weight_ppm,
            })
            .collect())
    }
}

/// A trained ELM, as its trainer announces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ElmRecord {
    pub domain: String,
    /// 1 to 64 parents, strictly ascending by weights id, weights summing to 1 000 000 ppm.
    pub parents: Vec<Parent>,
    pub weights: ContentId,
    /// The weights file's exact size in bytes, which the architecture determines
    /// (`weights::expected_size`): peers refuse any other size before fetching a byte.
    pub weights_size: u64,
    /// `Architecture::id` of its shape.
    pub architecture: ContentId,
    pub tokenizer: ContentId,
    pub steps: u64,
    pub tokens: u64,
    pub flops: u64,
    /// The trainer's validation perplexity on the domain, milli-units.
    pub claimed_valid_ppl_milli: u64,
    /// The training node; the record's envelope must carry its signature.
    pub trainer: NodeId,
}

impl Record for ElmRecord {
    const KIND: Kind = Kind::Elm;

    fn to_value(&self) -> Value {
        Value::Array(vec![
            uint(FORMAT_VERSION),
            text(&self.domain),
            Value::Array(
                self.parents
                    .iter()
                    .map(|p| Value::Array(vec![bytes(&p.weights.0), uint(p.weight_ppm.into())]))
                    .collect(),
            ),
            bytes(&self.weights.0),
            uint(self.weights_size),
            bytes(&self.architecture.0),
            bytes(&self.tokenizer.0),
            uint(self.steps),
            uint(self.tokens),
            uint(self.flops),
            uint(self.claimed_valid_ppl_milli),
            bytes(&self.trainer.0),
        ])
    }

    fn from_value(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::record(value, Kind::Elm, 12)?;
        let domain = f.text("elm.domain", MAX_NAME_LEN)?;
        check_domain_name(&domain, "elm.domain")?;
        let parents = f
            .list("elm.parents", MAX_PARENTS)?
            .into_iter()
            .map(|v| {
                let mut p = Fields::new(v, "elm.parents", 2)?;
                Ok(Parent {
                    weights: p.id("elm.parents.weights")?,
                    weight_ppm: p.u32("elm.parents.weight_ppm")?,
                })
            })
            .collect::<Result<Vec<_>, DecodeError>>()?;
        strictly_ascending(&parents, "elm.parents", |p| p.weights)?;
        let total: u64 = parents.iter().map(|p| u64::from(p.weight_ppm)).sum();
        if parents.is_empty() || total != u64::from(PPM_ONE) {
            return Err(DecodeError::Invalid {
                field: "elm.parents",
                reason: "at least one parent, weights summing to 1000000 ppm",
            });
        }
        Ok(ElmRecord {
            domain,
            parents,
            weights: f.id("elm.weights")?,
            weights_size: f.u64("elm.weights_size")?,
            architecture: f.id("elm.architecture")?,
            tokenizer: f.id("elm.tokenizer")?,
            steps: f.u64("elm.steps")?,
            tokens: f.u64("elm.tokens")?,
            flops: f.u64("elm.flops")?,
            claimed_valid_ppl_milli: f.u64("elm.claimed_valid_ppl_milli")?,
            trainer: f.key("elm.trainer")?,
        })
    }
}

/// A verifier's judgement of an ELM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Re-scored within tolerance of its claim and no worse than the seed on its domain.
    Accept = 0,
    /// Anything else.
    Reject = 1,
}

/// A verifier's signed measurement of an ELM on its domain's held-out data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attestation {
    /// The verifying node; the envelope must carry its signature.
    pub verifier: NodeId,
    /// The ELM record id.
    pub elm: ContentId,
    pub measured_ppl_milli: u64,
    pub verdict: Verdict,
    /// Which data the measurement used.
    pub pool: EvalPool,
}

/// The data a verdict rests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EvalPool {
    /// The domain's published `valid` split: a quick check any peer can make, on data the
    /// trainer also had. It cannot establish acceptance.
    Public = 0,
    /// The maintainers' withheld verification pool (committed to in the registry).
    Withheld = 1,
}

impl Record for Attestation {
    const KIND: Kind = Kind::Attestation;

    fn to_value(&self) -> Value {
        Value::Array(vec![
            uint(FORMAT_VERSION),
            bytes(&self.verifier.0),
            bytes(&self.elm.0),
            uint(self.measured_ppl_milli),
            uint(self.verdict as u64),
            uint(self.pool as u64),
        ])
    }

    fn from_value(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::record(value, Kind::Attestation, 6)?;
        let verifier = f.key("attestation.verifier")?;
        let elm = f.id("attestation.elm")?;
        let measured_ppl_milli = f.u64("attestation.measured_ppl_milli")?;
        let verdict = one_of(
            f.u64("attestation.verdict")?,
            [Verdict::Accept, Verdict::Reject],
            "attestation.verdict",
        )?;
        let pool = one_of(
            f.u64("attestation.pool")?,
            [EvalPool::Public, EvalPool::Withheld],
            "attestation.pool",
        )?;
        Ok(Attestation {
            verifier,
            elm,
            measured_ppl_milli,
            verdict,
            pool,
        })
    }
}

/// The enum value numbered `n` (its position in `values`), or `OutOfRange`.
fn one_of<T: Copy, const N: usize>(
    n: u64,
    values: [T; N],
    field: &'static str,
) -> Result<T, DecodeError> {
    usize::try_from(n)
        .ok()
        .and_then(|i| values.get(i).copied())
        .ok_or(DecodeError::OutOfRange { field })
}
