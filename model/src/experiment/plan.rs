//! An experiment's settings, its compute plan and the rows it reports, shared by the runner of
//! every system (the experiment's `run` and the DEMix row).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::{GptConfig, Preset};
use crate::data::TRAIN_DOMAINS;
use crate::files::{TRAINED_FILE, WEIGHTS_FILE};
use crate::forest::Error;
use crate::forest::branch::{OptimizerInit, Trained};
use crate::forest::manifest::TrainRecord;
use crate::fsutil;

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
}

impl Config {
    /// A smoke run of a few minutes on 2 cores.
    pub fn quick() -> Self {
        Config {
            preset: Preset::Tiny,
            total_steps: 160,
            seed_share: 0.5,
            batch_size: 4,
            lr: 2e-3,
            optimizer: OptimizerInit::Fresh,
            eval_tokens: 2048,
            prior_blocks: 8,
            top_k: 2,
            train_bytes: Some(400_000),
            tokenizer_bytes: 64 << 10,
            seed: 0,
            random_split: true,
            no_seed: true,
            demix: true,
            curve_points: 2,
        }
    }

    /// The default run: about an hour on 2 cores.
    pub fn standard() -> Self {
        Config {
            total_steps: 2400,
            batch_size: 8,
            eval_tokens: 16_384,
            prior_blocks: 100,
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
    /// Updates of each ELM (`(1 - s)·B / E`).
    pub elm_steps: u64,
    /// Updates of each ELM without a seed phase (`B / E`).
    pub no_seed_elm_steps: u64,
    /// Tokens per update.
    pub tokens_per_step: u64,
    /// Training FLOPs per token of the architecture.
    pub flops_per_token: f64,
}

impl Plan {
    /// The plan for `cfg` with `n_elms` ELMs and architecture `arch`.
    pub fn new(cfg: &Config, n_elms: usize, arch: &GptConfig) -> Result<Self, Error> {
        if !(0.0..1.0).contains(&cfg.seed_share) {
            return Err(crate::Error::Config("seed_share must be in [0, 1)".into()).into());
        }
        let e = n_elms.max(1) as u64;
        let seed_steps = (cfg.seed_share * cfg.total_steps as f64).round() as u64;
        let elm_steps = (cfg.total_steps - seed_steps) / e;
        if elm_steps == 0 {
            return Err(crate::Error::Config(format!(
                "{} updates leave none for {n_elms} ELMs after the seed's {seed_steps}",
                cfg.total_steps
            ))
            .into());
        }
        Ok(Plan {
            n_elms,
            dense_steps: cfg.total_steps,
            seed_steps,
            elm_steps,
            no_seed_elm_steps: cfg.total_steps / e,
            tokens_per_step: (cfg.batch_size * arch.n_ctx) as u64,
            flops_per_token: arch.train_flops_per_token(),
        })
    }

    /// Training FLOPs of `steps` updates.
    pub fn flops(&self, steps: u64) -> f64 {
        steps as f64 * self.tokens_per_step as f64 * self.flops_per_token
    }

    /// The dense LM's training FLOPs.
    pub fn dense_flops(&self) -> f64 {
        self.flops(self.dense_steps)
    }

    /// BTM's training FLOPs: the seed plus every ELM.
    pub fn btm_flops(&self) -> f64 {
        self.flops(self.seed_steps) + self.n_elms as f64 * self.flops(self.elm_steps)
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
}

fn is_train_domain(d: &str) -> bool {
    TRAIN_DOMAINS.contains(&d)
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
    };
    for (d, p) in ppl {
        if is_train_domain(d) {
            r.in_domain.insert(d.clone(), *p);
        } else {
            r.out_domain.insert(d.clone(), *p);
        }
    }
    let mean = |m: &BTreeMap<String, f64>| m.values().sum::<f64>() / m.len().max(1) as f64;
    r.mean_in = mean(&r.in_domain);
    r.mean_out = mean(&r.out_domain);
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
