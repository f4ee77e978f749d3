//! Seed, branch and train: how the members of a forest come to be.
//!
//! - The **seed** is an ordinary training run on a [`Mixture`] of all training domains
//!   (domain-balanced batches): [`train`].
//! - A **branch** starts from the seed ([`InitKind::Seed`]), from the parameter average of
//!   existing ELMs weighted by their domain posterior on the new domain's dev data
//!   ([`InitKind::PosteriorAverage`], the paper's best; see [`posterior_average_init`]), or
//!   from a random initialisation ([`InitKind::Random`], the "no seed phase" ablation); the
//!   manifest records which ([`super::manifest::ForestElm::init`]).
//! - Each ELM then trains on its own domain only ([`train`] on a one-domain [`Mixture`]),
//!   independently of every other. [`OptimizerInit::Fresh`] restarts the optimiser (fresh Adam
//!   moments, a new warm-up); [`OptimizerInit::ContinueSeed`] is the released code's behaviour
//!   (the paper is silent): the seed's Adam moments and LR schedule carry on
//!   ([`Start::Continue`]).

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use super::average;
use super::error::Error;
pub use super::manifest::InitKind;
use super::manifest::{Forest, Parent, TrainRecord};
use crate::data::Mixture;
use crate::train::{CHECKPOINT_FILE, StepStats, TrainConfig, Trainable, Trainer};
use crate::{content_id, fsutil};

/// What a branch does with the optimiser.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerInit {
    /// Fresh Adam moments and a new warm-up/decay schedule over the ELM's updates (round one's
    /// choice; the paper does not say).
    #[default]
    Fresh,
    /// The released code: continue the seed's Adam moments and LR schedule (the seed's schedule
    /// must cover the branch's updates too: the experiment's update-matched protocol makes the
    /// seed the dense run's checkpoint, whose schedule is the whole budget).
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

pub use crate::files::WEIGHTS_FILE;

/// Writes the trained model of `trainer` to `run_dir/model.safetensors`; its record counts the
/// updates after `start_step` (the parent's, for a run that continued another).
pub fn finish<M: Trainable>(
    trainer: &Trainer<M>,
    start_step: u64,
    run_dir: &Path,
) -> Result<Trained, Error> {
    let path = run_dir.join(WEIGHTS_FILE);
    let bytes = trainer.model().to_bytes()?;
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

/// Where a training run starts.
#[derive(Debug)]
pub enum Start<'a, M> {
    /// From these weights, with a fresh optimiser and schedule. A seed is this on the mix of all
    /// training domains; an ELM branched the paper's way is this on its one domain.
    Fresh(M),
    /// Continuing the optimiser state and schedule of the run whose checkpoint is
    /// `dir/checkpoint.safetensors` (the released code's branch); `cfg.steps` then counts from
    /// that run's first update.
    Continue(&'a Path),
}

/// Trains on `data` from `start` in `run_dir` (resuming a checkpoint there), then writes
/// `run_dir/model.safetensors`. `on_step` sees every update.
pub fn train<M: Trainable>(
    start: Start<'_, M>,
    data: &Mixture,
    cfg: TrainConfig,
    run_dir: &Path,
    device: &Device,
    on_step: impl FnMut(&StepStats),
) -> Result<Trained, Error> {
    create_dir(run_dir)?;
    let (trainer, start_step) = match start {
        Start::Fresh(model) => (Trainer::new(model, cfg, device, Some(run_dir))?, 0),
        Start::Continue(parent_run) => {
            let parent = parent_run.join(CHECKPOINT_FILE);
            let parent_steps = Trainer::<M>::resume(&parent, device)?.state.step;
            let t = Trainer::<M>::continue_from(&parent, cfg, device, Some(run_dir))?;
            (t, parent_steps)
        }
    };
    run_and_finish(trainer, data, start_step, run_dir, on_step)
}

fn create_dir(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e).into())
}

fn run_and_finish<M: Trainable>(
    mut trainer: Trainer<M>,
    data: &Mixture,
    start_step: u64,
    run_dir: &Path,
    on_step: impl FnMut(&StepStats),
) -> Result<Trained, Error> {
    trainer.run_to_end(data, on_step)?;
    finish(&trainer, start_step, run_dir)
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
    let summary = average::average_members(forest, &sel, out)?;
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
