//! Seed, branch and train: how the members of a forest come to be.
//!
//! - The **seed** is an ordinary training run on a [`Mixture`] of all training domains
//!   (domain-balanced batches): [`train`].
//! - A **branch** starts from the seed ([`Init::Seed`]), from the parameter average of
//!   existing ELMs weighted by their domain posterior on the new domain's dev data
//!   ([`Init::PosteriorAverage`], the paper's best; see [`posterior_average_init`]), or from a
//!   random initialisation ([`Init::Random`], the "no seed phase" ablation).
//! - Each ELM then trains on its own domain only ([`train`] on a one-domain [`Mixture`]),
//!   independently of every other. The paper restarts the optimiser (fresh Adam moments, a
//!   new warm-up); [`OptimizerInit::ContinueSeed`] is the released code's behaviour: the seed's
//!   Adam moments and LR schedule carry on ([`train_continuing`]).

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use super::average::{self, Input};
use super::error::Error;
use super::manifest::{Forest, InitKind, Parent, TrainRecord};
use crate::data::Mixture;
use crate::gpt::Gpt;
use crate::train::{CHECKPOINT_FILE, StepStats, TrainConfig, Trainer};
use crate::{content_id, fsutil, weights};

/// Where a new ELM's weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// A copy of the seed LM.
    Seed,
    /// The parameter average of existing ELMs weighted by their domain posterior (cached prior)
    /// on the new domain's dev data, over the `top_k` largest entries (all when `None`).
    PosteriorAverage {
        /// How many ELMs to average.
        top_k: Option<usize>,
    },
    /// A fresh random initialisation with this seed (no seed phase).
    Random {
        /// Initialisation seed.
        seed: u64,
    },
}

impl Init {
    /// The manifest's record of this kind of initialisation.
    pub fn kind(self) -> InitKind {
        match self {
            Init::Seed => InitKind::Seed,
            Init::PosteriorAverage { .. } => InitKind::PosteriorAverage,
            Init::Random { .. } => InitKind::Random,
        }
    }
}

/// What a branch does with the optimiser.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerInit {
    /// The paper: fresh Adam moments and a new warm-up/decay schedule over the ELM's updates.
    #[default]
    Fresh,
    /// The released code: continue the seed's Adam moments and LR schedule (the seed must
    /// have been trained with `schedule_steps` covering the branch's updates too).
    ContinueSeed,
}

/// A finished training run.
#[derive(Debug, Clone, Serialize)]
pub struct Trained {
    /// `model.safetensors` in the run directory.
    pub weights: PathBuf,
    /// Its content id.
    pub id: String,
    /// What this run cost.
    pub record: TrainRecord,
    /// Loss of each update of this run.
    pub losses: Vec<f32>,
}

/// Name of the weights file a run writes.
pub const WEIGHTS_FILE: &str = "model.safetensors";

fn finish(trainer: &Trainer, start_step: u64, run_dir: &Path) -> Result<Trained, Error> {
    let model = trainer.model();
    let path = run_dir.join(WEIGHTS_FILE);
    let bytes = weights::to_bytes(&model.config(), &weights::named_tensors(&model))?;
    fsutil::write_atomic(&path, &bytes)?;
    Ok(Trained {
        weights: path,
        id: content_id(&bytes),
        record: TrainRecord {
            steps: trainer.state.step - start_step,
            tokens: trainer.state.tokens,
            flops: trainer.state.flops,
        },
        losses: trainer.state.losses.clone(),
    })
}

/// Trains `model` on `data` with a fresh optimiser in `run_dir` (resuming a checkpoint there),
/// then writes `run_dir/model.safetensors`. A seed is this on the mix of all training
/// domains; an ELM is this on its one domain.
pub fn train(
    model: Gpt,
    data: &Mixture,
    cfg: TrainConfig,
    run_dir: &Path,
    device: &Device,
    progress: bool,
    on_step: impl FnMut(&StepStats),
) -> Result<Trained, Error> {
    std::fs::create_dir_all(run_dir).map_err(|e| crate::Error::io(run_dir, e))?;
    let mut trainer = Trainer::new(model, cfg, device, Some(run_dir))?;
    trainer.progress = progress;
    trainer.run(data, on_step)?;
    finish(&trainer, 0, run_dir)
}

/// Trains on `data` continuing the optimiser state and schedule of the run whose checkpoint is
/// `parent_run/checkpoint.safetensors` (the released code's branch). `cfg.steps` counts from the
/// parent's first update.
pub fn train_continuing(
    parent_run: &Path,
    data: &Mixture,
    cfg: TrainConfig,
    run_dir: &Path,
    device: &Device,
    progress: bool,
    on_step: impl FnMut(&StepStats),
) -> Result<Trained, Error> {
    std::fs::create_dir_all(run_dir).map_err(|e| crate::Error::io(run_dir, e))?;
    let parent = parent_run.join(CHECKPOINT_FILE);
    let parent_steps = Trainer::resume(&parent, device, None)?.state.step;
    let mut trainer = Trainer::continue_from(&parent, cfg, device, Some(run_dir))?;
    trainer.progress = progress;
    trainer.run(data, on_step)?;
    finish(&trainer, parent_steps, run_dir)
}

/// Writes the initial weights of a branch by the paper's best rule: the parameter average of
/// the forest's ELMs weighted by `prior` (the cached prior of the new domain's dev data, see
/// [`super::ensemble::cached_prior`]), restricted to its `top_k` largest entries. Returns the
/// parents with their weights.
pub fn posterior_average_init(
    forest: &Forest,
    prior: &[f64],
    top_k: Option<usize>,
    out: &Path,
) -> Result<Vec<Parent>, Error> {
    if forest.elms.is_empty() {
        return Err(Error::Empty("average"));
    }
    if prior.len() != forest.elms.len() {
        return Err(Error::BadWeights(format!(
            "{} prior entries for {} ELMs",
            prior.len(),
            forest.elms.len()
        )));
    }
    let sel = super::posterior::top_k(prior, top_k.unwrap_or(prior.len()));
    let inputs: Vec<Input> = sel
        .iter()
        .map(|&(i, w)| Input {
            path: forest.resolve(&forest.elms[i].weights),
            weight: w,
            id: Some(forest.elms[i].weights.id.clone()),
        })
        .collect();
    let summary = average::average_files(&inputs, Some(&forest.architecture), out)?;
    Ok(sel
        .iter()
        .zip(&summary.weights)
        .map(|(&(i, _), &w)| Parent {
            name: forest.elms[i].name.clone(),
            id: forest.elms[i].weights.id.clone(),
            weight: w,
        })
        .collect())
}
