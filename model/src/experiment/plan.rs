//! An experiment's settings, its compute plan and the rows it reports, shared by the runner of
//! every system (the experiment's `run` and the DEMix row).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::{GptConfig, Preset};
use crate::data::{EVAL_DOMAINS, TRAIN_DOMAINS};
use crate::files::{TRAINED_FILE, WEIGHTS_FILE};
use crate::forest::Error;
use crate::forest::branch::{OptimizerInit, Trained};
use crate::forest::manifest::TrainRecord;
use crate::fsutil;

/// How BTM's budget of `B` dense updates is split between the seed and the ELMs
/// (`../shared/BTM-NOTES.md`, "Compute matching").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// The released code's (the default): one dense run with an LR schedule of `B` updates;
    /// the seed is its checkpoint at `s·B` (dense and seed share those updates); each of the
    /// `E` ELMs then trains `(1-s)·B` updates at `1/E` of the dense batch, so every ELM's
    /// lineage has `B` sequential updates like the dense LM and the forest has its FLOPs. The
    /// ELMs read their domain on from where the seed left it. With
    /// [`OptimizerInit::ContinueSeed`] they continue the seed's Adam state and schedule.
    #[default]
    UpdateMatched,
    /// Round one's protocol, kept to measure the difference: a separate seed run of `s·B`
    /// updates with its own schedule (decayed to zero), then `(1-s)·B/E` full-batch updates
    /// per ELM, each reading its domain from the start: the same FLOPs, 1/E of the updates.
    FullBatch,
}

impl Protocol {
    /// The protocol of reports written before it was recorded.
    fn before_recorded() -> Self {
        Protocol::FullBatch
    }

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::UpdateMatched => "update-matched",
            Protocol::FullBatch => "full-batch",
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "update-matched" => Ok(Protocol::UpdateMatched),
            "full-batch" => Ok(Protocol::FullBatch),
            _ => Err(format!(
                "unknown protocol {s:?} (update-matched or full-batch)"
            )),
        }
    }
}

/// Settings of an experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Architecture preset (every system has this architecture).
    #[serde(with = "preset_name")]
    pub preset: Preset,
    /// `B`: the dense LM's updates; every system gets the FLOPs of these.
    pub total_steps: u64,
    /// Fraction of the budget spent on the seed (the paper: 0.5).
    pub seed_share: f64,
    /// How the budget is split between the seed and the ELMs.
    #[serde(default = "Protocol::before_recorded")]
    pub protocol: Protocol,
    /// Blocks per update (the same for every run).
    pub batch_size: usize,
    /// Peak learning rate (every run: warm-up 8%, linear decay).
    pub lr: f64,
    /// What a branch does with the seed's optimiser.
    pub optimizer: OptimizerInit,
    /// Test tokens per domain.
    pub eval_tokens: usize,
    /// Dev blocks per domain for the cached prior (the released code uses about 200).
    pub prior_blocks: usize,
    /// k of the top-k ensemble.
    pub top_k: usize,
    /// More values of k to report top-k ensembles for (the sweep; `top_k` is always reported).
    #[serde(default)]
    pub top_k_sweep: Vec<usize>,
    /// Also report the forest with its seed as a member, weighted by the same posterior.
    #[serde(default)]
    pub seed_member: bool,
    /// Bytes of each training domain's train split to use (None: all).
    pub train_bytes: Option<usize>,
    /// Bytes per training domain for the tokenizer.
    pub tokenizer_bytes: usize,
    /// Seed of the initialisation, the data order and the random split.
    pub seed: u64,
    /// Also train the random-split ensemble.
    pub random_split: bool,
    /// Also train ELMs without a seed phase (branched from the random initialisation).
    pub no_seed: bool,
    /// Also train DEMix.
    pub demix: bool,
    /// Points of the dense LM's learning curve to evaluate (0: only the end).
    pub curve_points: usize,
    /// More corpora (the same layout; `valid` and `test` splits suffice) whose every domain is
    /// scored as text nobody here tuned to, with its own cached prior, apart from the bundled
    /// evaluation-only domains.
    #[serde(default)]
    pub eval_corpora: Vec<std::path::PathBuf>,
}

impl Config {
    /// A smoke run of a few minutes on 2 cores.
    pub fn quick() -> Self {
        Config {
            preset: Preset::Tiny,
            total_steps: 96,
            seed_share: 0.5,
            protocol: Protocol::UpdateMatched,
            batch_size: 8,
            lr: 2e-3,
            optimizer: OptimizerInit::ContinueSeed,
            eval_tokens: 2048,
            prior_blocks: 8,
            top_k: 2,
            top_k_sweep: vec![1, 4],
            seed_member: true,
            train_bytes: Some(400_000),
            tokenizer_bytes: 64 << 10,
            seed: 0,
            random_split: true,
            no_seed: true,
            demix: true,
            curve_points: 2,
            eval_corpora: Vec::new(),
        }
    }

    /// The default run: about an hour on 2 cores.
    pub fn standard() -> Self {
        Config {
            total_steps: 2400,
            batch_size: 8,
            eval_tokens: 16_384,
            prior_blocks: 200,
            train_bytes: None,
            tokenizer_bytes: 256 << 10,
            curve_points: 4,
            ..Config::quick()
        }
    }
}

/// The compute accounting of an experiment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// ELMs (one per training domain).
    pub n_elms: usize,
    /// Dense LM updates (`B`).
    pub dense_steps: u64,
    /// Seed updates (`s·B`).
    pub seed_steps: u64,
    /// Updates of each ELM: `(1 - s)·B` ([`Protocol::UpdateMatched`]) or `(1 - s)·B / E`
    /// ([`Protocol::FullBatch`]).
    pub elm_steps: u64,
    /// Updates of each ELM without a seed phase: `B` or `B / E`.
    pub no_seed_elm_steps: u64,
    /// Blocks per update of the dense LM and the seed.
    #[serde(default)]
    pub batch_size: usize,
    /// Blocks per update of an ELM: `batch_size / E` or `batch_size`.
    #[serde(default)]
    pub elm_batch_size: usize,
    /// Tokens per update of the dense LM.
    pub tokens_per_step: u64,
    /// Tokens per update of an ELM.
    #[serde(default)]
    pub elm_tokens_per_step: u64,
    /// Training FLOPs per token of the architecture.
    pub flops_per_token: f64,
}

impl Plan {
    /// The plan for `cfg` with `n_elms` ELMs and architecture `arch`.
    pub fn new(cfg: &Config, n_elms: usize, arch: &GptConfig) -> Result<Self, Error> {
        let bad = |m: String| -> Error { crate::Error::Config(m).into() };
        if !(0.0..1.0).contains(&cfg.seed_share) {
            return Err(bad("seed_share must be in [0, 1)".into()));
        }
        if cfg.batch_size == 0 {
            return Err(bad("batch_size must be at least 1".into()));
        }
        let e = n_elms.max(1) as u64;
        let seed_steps = (cfg.seed_share * cfg.total_steps as f64).round() as u64;
        let (elm_steps, no_seed_elm_steps, elm_batch_size) = match cfg.protocol {
            Protocol::UpdateMatched => {
                if !cfg.batch_size.is_multiple_of(e as usize) {
                    return Err(bad(format!(
                        "the update-matched protocol trains each of the {e} ELMs at 1/{e} of the dense batch: \
                         batch_size {} must be a multiple of {e} (whole blocks)",
                        cfg.batch_size
                    )));
                }
                (
                    cfg.total_steps - seed_steps,
                    cfg.total_steps,
                    cfg.batch_size / e as usize,
                )
            }
            Protocol::FullBatch => (
                (cfg.total_steps - seed_steps) / e,
                cfg.total_steps / e,
                cfg.batch_size,
            ),
        };
        if elm_steps == 0 {
            return Err(bad(format!(
                "{} updates leave none for {n_elms} ELMs after the seed's {seed_steps}",
                cfg.total_steps
            )));
        }
        Ok(Plan {
            n_elms,
            dense_steps: cfg.total_steps,
            seed_steps,
            elm_steps,
            no_seed_elm_steps,
            batch_size: cfg.batch_size,
            elm_batch_size,
            tokens_per_step: (cfg.batch_size * arch.n_ctx) as u64,
            elm_tokens_per_step: (elm_batch_size * arch.n_ctx) as u64,
            flops_per_token: arch.train_flops_per_token(),
        })
    }

    /// Training FLOPs of `steps` dense (or seed) updates.
    pub fn flops(&self, steps: u64) -> f64 {
        steps as f64 * self.tokens_per_step as f64 * self.flops_per_token
    }

    /// Training FLOPs of `steps` updates of one ELM.
    pub fn elm_flops(&self, steps: u64) -> f64 {
        steps as f64 * self.elm_tokens_per_step as f64 * self.flops_per_token
    }

    /// The dense LM's training FLOPs.
    pub fn dense_flops(&self) -> f64 {
        self.flops(self.dense_steps)
    }

    /// BTM's training FLOPs: the seed plus every ELM.
    pub fn btm_flops(&self) -> f64 {
        self.flops(self.seed_steps) + self.n_elms as f64 * self.elm_flops(self.elm_steps)
    }
}

/// One system's scores.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SystemResult {
    /// Name (e.g. `btm_ensemble`).
    pub name: String,
    /// Training FLOPs spent on it (the seed included).
    pub train_flops: f64,
    /// Models run per token at inference.
    pub inference_models: usize,
    /// Test perplexity per training domain.
    pub in_domain: BTreeMap<String, f64>,
    /// Test perplexity per evaluation-only domain.
    pub out_domain: BTreeMap<String, f64>,
    /// Mean of `in_domain`.
    pub mean_in: f64,
    /// Mean of `out_domain`.
    pub mean_out: f64,
    /// Test perplexity per domain of the extra evaluation corpora (`--eval-corpus`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra_domain: BTreeMap<String, f64>,
    /// Mean of `extra_domain` (NaN without extra corpora).
    #[serde(default = "nan", skip_serializing_if = "is_nan")]
    pub mean_extra: f64,
}

fn nan() -> f64 {
    f64::NAN
}

fn is_nan(v: &f64) -> bool {
    v.is_nan()
}

pub(crate) fn result(
    name: &str,
    train_flops: f64,
    inference_models: usize,
    ppl: &[(String, f64)],
) -> SystemResult {
    let mut r = SystemResult {
        name: name.to_string(),
        train_flops,
        inference_models,
        in_domain: BTreeMap::new(),
        out_domain: BTreeMap::new(),
        mean_in: f64::NAN,
        mean_out: f64::NAN,
        extra_domain: BTreeMap::new(),
        mean_extra: f64::NAN,
    };
    for (d, p) in ppl {
        let map = if TRAIN_DOMAINS.contains(&d.as_str()) {
            &mut r.in_domain
        } else if EVAL_DOMAINS.contains(&d.as_str()) {
            &mut r.out_domain
        } else {
            &mut r.extra_domain
        };
        map.insert(d.clone(), *p);
    }
    let mean = |m: &BTreeMap<String, f64>| m.values().sum::<f64>() / m.len() as f64;
    r.mean_in = mean(&r.in_domain);
    r.mean_out = mean(&r.out_domain);
    r.mean_extra = mean(&r.extra_domain);
    r
}

pub(crate) fn ppl(logprobs: &[f64]) -> f64 {
    (-logprobs.iter().sum::<f64>() / logprobs.len().max(1) as f64).exp()
}

/// Runs `f` unless `dir/trained.json` says the run is done; records its result there.
pub(crate) fn train_once(
    dir: &Path,
    f: impl FnOnce() -> Result<Trained, Error>,
) -> Result<Trained, Error> {
    let marker = dir.join(TRAINED_FILE);
    if let Ok(bytes) = std::fs::read(&marker)
        && let Ok(t) = serde_json::from_slice::<TrainedOnDisk>(&bytes)
        && dir.join(WEIGHTS_FILE).exists()
    {
        return Ok(Trained {
            weights: dir.join(WEIGHTS_FILE),
            id: t.id,
            record: t.record,
            losses: t.losses,
        });
    }
    let t = f()?;
    let on_disk = TrainedOnDisk {
        id: t.id.clone(),
        record: t.record,
        losses: t.losses.clone(),
    };
    fsutil::write_atomic(&marker, &serde_json::to_vec(&on_disk)?)?;
    Ok(t)
}

#[derive(Serialize, Deserialize)]
struct TrainedOnDisk {
    id: String,
    record: TrainRecord,
    losses: Vec<f32>,
}

/// `Preset` as its command-line name in JSON.
mod preset_name {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::config::Preset;

    pub fn serialize<S: Serializer>(p: &Preset, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(p.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Preset, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
