//! Training: AdamW with the paper's settings, a linear warm-up/decay schedule, gradient
//! accumulation, global gradient-norm clipping, and checkpoints that survive SIGKILL.
//!
//! The optimiser is written here rather than taken from `burn-optim` for two reasons: the
//! paper clips the *global* gradient norm (burn clips per parameter), and a checkpoint must
//! hold the optimiser state in a plain, documented file (`checkpoint.safetensors`: the
//! weights under their GPT-2 names, `adam.m.<name>` and `adam.v.<name>` moments, and the
//! training state as JSON metadata) so that a killed run resumes bit-for-bit.
//!
//! One [`Trainer`] trains every [`Trainable`] model (the ELM [`Gpt`] and
//! [`crate::demix::Demix`]): [`Trainer::step`] does one update, [`Trainer::run`] trains until
//! done or told to stop (checkpointing on the way and reporting each update to a callback, from
//! which callers draw progress), and [`Trainer::new`] resumes a run directory's checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Gradients, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::config::GptConfig;
use crate::data::Mixture;
use crate::gpt::Gpt;
use crate::weights::{self, NamedTensor};
use crate::{Error, fsutil};

pub use crate::files::CHECKPOINT_FILE;

/// Checkpoint metadata key holding the [`TrainState`] as JSON.
pub const TRAIN_STATE_KEY: &str = "btm.train_state";

/// Optimisation settings. Defaults are the paper's (`../shared/BTM-NOTES.md`): Adam β
/// (0.9, 0.95), ε 1e-7, weight decay 0.1, gradient-norm clip 0.1, peak LR 5e-4 with 8% linear
/// warm-up then linear decay to 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimiser updates.
    pub steps: u64,
    /// Blocks per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per update.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Fraction of `schedule_steps` spent warming up.
    pub warmup_frac: f64,
    /// Length of the LR schedule; `None` means `steps`. A branch that continues the seed's
    /// schedule (the released code's behaviour) sets this and `schedule_offset`.
    #[serde(default)]
    pub schedule_steps: Option<u64>,
    /// Position in the schedule of this run's first update.
    #[serde(default)]
    pub schedule_offset: u64,
    /// Adam β1.
    pub beta1: f64,
    /// Adam β2.
    pub beta2: f64,
    /// Adam ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 disables).
    pub grad_clip: f64,
    /// Seed of the data order.
    pub seed: u64,
    /// Sample position in the data of this run's first block: an ELM that reads its domain on
    /// from where the seed left it starts at the blocks the seed read
    /// ([`crate::data::Mixture::blocks_read`]).
    #[serde(default)]
    pub data_offset: u64,
    /// Save a checkpoint every this many updates (0: only at the end).
    pub checkpoint_every: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 1000,
            batch_size: 8,
            grad_accum: 1,
            lr: 5e-4,
            warmup_frac: 0.08,
            schedule_steps: None,
            schedule_offset: 0,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-7,
            weight_decay: 0.1,
            grad_clip: 0.1,
            seed: 0,
            data_offset: 0,
            checkpoint_every: 100,
        }
    }
}

impl TrainConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: &str| Err(Error::Config(m.to_string()));
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad("batch_size and grad_accum must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr must be positive");
        }
        if !(0.0..1.0).contains(&self.warmup_frac) {
            return bad("warmup_frac must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("betas must be in [0, 1)");
        }
        if !(self.eps > 0.0 && self.weight_decay >= 0.0 && self.grad_clip >= 0.0) {
            return bad("eps must be positive; weight_decay and grad_clip non-negative");
        }
        Ok(())
    }

    /// Learning rate of update `step` (0-based, counted within this run).
    pub fn lr_at(&self, step: u64) -> f64 {
        let total = self.schedule_steps.unwrap_or(self.steps).max(1);
        let s = (step + self.schedule_offset).min(total);
        let warmup = ((self.warmup_frac * total as f64).round() as u64).max(1);
        if s < warmup {
            self.lr * (s + 1) as f64 / warmup as f64
        } else {
            self.lr * (total - s) as f64 / (total - warmup).max(1) as f64
        }
    }

    /// Tokens consumed per update for a model of context `n_ctx`.
    pub fn tokens_per_step(&self, n_ctx: usize) -> u64 {
        (self.batch_size * self.grad_accum * n_ctx) as u64
    }
}

/// Resumable training state, stored in the checkpoint's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Updates done.
    pub step: u64,
    /// Position in the data stream (samples consumed).
    pub data_position: u64,
    /// Tokens trained on.
    pub tokens: u64,
    /// Training FLOPs spent (6·N·tokens convention, see [`GptConfig::train_flops_per_token`]).
    pub flops: f64,
    /// Mean training loss of the last update.
    pub last_loss: Option<f64>,
    /// Loss of each update so far (for curves).
    pub losses: Vec<f32>,
    /// The settings of the run (a resume must use the same).
    pub config: TrainConfig,
    /// The random state. Data order is a pure function of the seed and the position
    /// (ChaCha8 keyed by seed, domain and epoch), so this records how to rebuild it.
    pub rng: RngState,
}

/// How the run's randomness is reproduced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    /// The generator.
    pub kind: String,
    /// Its seed.
    pub seed: u64,
    /// Samples drawn so far.
    pub position: u64,
}

/// One update's figures, passed to the progress callback.
#[derive(Debug, Clone, Serialize)]
pub struct StepStats {
    /// Update number (1-based).
    pub step: u64,
    /// Total updates of the run.
    pub steps: u64,
    /// Mean loss over the update's micro-batches (nats per token).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Training tokens per second of this update.
    pub tokens_per_s: f64,
}

/// Adam moments, one flat tensor per parameter in visiting order.
#[derive(Debug)]
struct AdamState {
    m: Vec<Tensor<1>>,
    v: Vec<Tensor<1>>,
}

impl AdamState {
    /// Zero moments for parameters of `sizes` elements each.
    fn zeros(sizes: &[usize], device: &Device) -> Self {
        let zeros = |n: &usize| Tensor::<1>::zeros([*n], device);
        AdamState {
            m: sizes.iter().map(zeros).collect(),
            v: sizes.iter().map(zeros).collect(),
        }
    }
}

/// Collects flattened gradients in visiting order.
struct GradCollector<'a> {
    grads: &'a Gradients,
    out: Vec<Tensor<1>>,
    missing: usize,
}

impl ModuleVisitor for GradCollector<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        let n = t.shape().num_elements();
        match t.grad(self.grads) {
            Some(g) => self.out.push(g.reshape([n])),
            None => {
                self.missing += 1;
                self.out
                    .push(Tensor::zeros([n], &t.device().without_autodiff()));
            }
        }
    }
}

/// Applies one AdamW update to every parameter.
struct AdamStep<'a> {
    grads: std::vec::IntoIter<Tensor<1>>,
    state: &'a mut AdamState,
    index: usize,
    lr: f64,
    clip_coef: f64,
    bias1: f64,
    bias2: f64,
    cfg: &'a TrainConfig,
}

impl ModuleMapper for AdamStep<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let dims = tensor.dims();
        let n = tensor.shape().num_elements();
        let Some(g) = self.grads.next() else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let g = g.mul_scalar(self.clip_coef);
        let i = self.index;
        self.index += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let m = self.state.m[i].clone().mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1);
        let v = self.state.v[i].clone().mul_scalar(b2) + g.square().mul_scalar(1.0 - b2);
        let p = tensor.inner().reshape([n]);
        let denom = v
            .clone()
            .div_scalar(self.bias2)
            .sqrt()
            .add_scalar(self.cfg.eps);
        let update = m.clone().div_scalar(self.bias1) / denom;
        let p = p.mul_scalar(1.0 - self.lr * self.cfg.weight_decay) - update.mul_scalar(self.lr);
        self.state.m[i] = m;
        self.state.v[i] = v;
        let p = Tensor::from_inner(p.reshape(dims)).require_grad();
        Param::from_mapped_value(id, p, mapper)
    }
}

/// Mean next-token cross-entropy of `logits [b, t, v]` against `targets [b, t]`.
pub fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    let [b, t, v] = logits.dims();
    let logp = log_softmax(logits.reshape([b * t, v]), 1);
    logp.gather(1, targets.reshape([b * t, 1])).mean().neg()
}

/// Splits a flattened `[batch, n_ctx + 1]` block batch into inputs and targets on `device`.
pub fn batch_tensors(
    flat: &[u32],
    batch: usize,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let width = flat.len() / batch;
    let t = width - 1;
    let mut x = Vec::with_capacity(batch * t);
    let mut y = Vec::with_capacity(batch * t);
    for row in flat.chunks_exact(width) {
        x.extend(row[..t].iter().map(|&v| v as i64));
        y.extend(row[1..].iter().map(|&v| v as i64));
    }
    let x = Tensor::from_data(TensorData::new(x, [batch, t]), device);
    let y = Tensor::from_data(TensorData::new(y, [batch, t]), device);
    (x, y)
}

/// The flattened gradient of every parameter of `model` in visiting order (zeros for a
/// parameter the loss does not depend on).
fn collect_gradients<M: Module>(model: &M, grads: &Gradients) -> Vec<Tensor<1>> {
    let mut c = GradCollector {
        grads,
        out: Vec::new(),
        missing: 0,
    };
    model.visit(&mut c);
    c.out
}

/// One AdamW update of `model` (any module; `grads` from [`collect_gradients`]) with global
/// gradient-norm clipping, as update `step` (0-based) of `cfg`'s schedule. Returns the updated
/// model, the gradient norm before clipping and the learning rate used.
fn adamw_update<M: Module>(
    model: M,
    grads: Vec<Tensor<1>>,
    adam: &mut AdamState,
    step: u64,
    cfg: &TrainConfig,
) -> Result<(M, f64, f64), Error> {
    let sq: Vec<Tensor<1>> = grads.iter().map(|g| g.clone().square().sum()).collect();
    let grad_norm = scalar(Tensor::cat(sq, 0).sum()).sqrt();
    if !grad_norm.is_finite() {
        return Err(Error::Diverged(format!(
            "gradient norm is {grad_norm} at update {}",
            step + 1
        )));
    }
    let clip_coef = if cfg.grad_clip > 0.0 && grad_norm > cfg.grad_clip {
        cfg.grad_clip / (grad_norm + 1e-6)
    } else {
        1.0
    };
    let lr = cfg.lr_at(step);
    let t = (step + 1) as i32;
    let mut mapper = AdamStep {
        grads: grads.into_iter(),
        state: adam,
        index: 0,
        lr,
        clip_coef,
        bias1: 1.0 - cfg.beta1.powi(t),
        bias2: 1.0 - cfg.beta2.powi(t),
        cfg,
    };
    Ok((model.map(&mut mapper), grad_norm, lr))
}

fn scalar(t: Tensor<1>) -> f64 {
    t.into_data()
        .convert::<f64>()
        .try_into_vec::<f64>()
        .ok()
        .and_then(|v| v.first().copied())
        .unwrap_or(f64::NAN)
}

/// A model the [`Trainer`] can train: the ELM ([`Gpt`]) and DEMix ([`crate::demix::Demix`]).
///
/// AdamW visits and maps the parameters through [`Module`]; this trait adds the forward pass
/// of a micro-batch, the architecture (FLOPs accounting and the checkpoint's `btm.config`) and
/// the model's file format (the metadata its files carry and how to rebuild it from a file's
/// tensors), so that one trainer, one checkpoint writer and one resume serve every model.
pub trait Trainable: Module {
    /// Largest checkpoint file [`Trainer::resume`] reads.
    const MAX_CHECKPOINT_BYTES: u64;

    /// The architecture (for DEMix, that of each expert model).
    fn config(&self) -> GptConfig;

    /// Refuses data the model cannot be trained on; by default, blocks longer than its context.
    fn check_data(&self, data: &Mixture) -> Result<(), Error> {
        check_context(&Trainable::config(self), data)
    }

    /// Next-token logits `[batch, time, vocab]` of the micro-batch `inputs`, whose first block
    /// is sample `start` of `data`.
    fn logits(&self, inputs: Tensor<2, Int>, start: u64, data: &Mixture) -> Tensor<3>;

    /// The safetensors metadata of the model's files (`format`, `btm.config`, ...).
    fn metadata(&self) -> Result<BTreeMap<String, String>, Error>;

    /// Rebuilds a model from a file's metadata and its `transformer.*` tensors (names without
    /// [`weights::PREFIX`]), checking every name, shape and value.
    fn from_tensors(
        meta: &HashMap<String, String>,
        tensors: Vec<NamedTensor>,
        device: &Device,
    ) -> Result<Self, Error>;

    /// The model's weights file: every parameter as `transformer.<name>` with
    /// [`Self::metadata`], written deterministically.
    fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        let tensors = weights::module_tensors(self);
        weights::write_safetensors(
            tensors.iter().map(|t| {
                (
                    format!("{}{}", weights::PREFIX, t.name),
                    t.shape.clone(),
                    t.values.as_slice(),
                )
            }),
            &self.metadata()?,
        )
    }
}

/// Refuses data blocks longer than the context of `config`.
pub fn check_context(config: &GptConfig, data: &Mixture) -> Result<(), Error> {
    if data.n_ctx() > config.n_ctx {
        return Err(Error::Config(format!(
            "data blocks of {} tokens exceed the model's context {}",
            data.n_ctx(),
            config.n_ctx
        )));
    }
    Ok(())
}

impl Trainable for Gpt {
    const MAX_CHECKPOINT_BYTES: u64 = 3 * weights::MAX_FILE_BYTES;

    fn config(&self) -> GptConfig {
        Gpt::config(self)
    }

    fn logits(&self, inputs: Tensor<2, Int>, _start: u64, _data: &Mixture) -> Tensor<3> {
        self.forward(inputs)
    }

    fn metadata(&self) -> Result<BTreeMap<String, String>, Error> {
        weights::metadata(&Gpt::config(self))
    }

    fn from_tensors(
        meta: &HashMap<String, String>,
        tensors: Vec<NamedTensor>,
        device: &Device,
    ) -> Result<Self, Error> {
        weights::from_named_tensors(&weights::config_from_metadata(meta)?, tensors, device)
    }
}

/// How [`Trainer::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// Every update is done (and the final checkpoint written).
    Finished,
    /// The stop flag was raised; a checkpoint of update `step` was written.
    Stopped {
        /// Updates done.
        step: u64,
    },
}

/// A training run of any [`Trainable`] model: the model, its AdamW state and where it is in
/// the data, checkpointed into a run directory (`checkpoint.safetensors`).
#[derive(Debug)]
pub struct Trainer<M: Trainable = Gpt> {
    /// The model being trained (on an autodiff device).
    pub model: M,
    /// Progress so far.
    pub state: TrainState,
    adam: AdamState,
    device: Device,
    run_dir: Option<PathBuf>,
}

/// The element count of every parameter of `model`, in visiting order.
fn param_sizes<M: Module>(model: &M) -> Vec<usize> {
    weights::module_shapes(model)
        .iter()
        .map(|(_, s)| s.iter().product())
        .collect()
}

impl TrainState {
    /// The state of a run that has done nothing yet.
    fn start(cfg: TrainConfig) -> Self {
        TrainState {
            step: 0,
            data_position: cfg.data_offset,
            tokens: 0,
            flops: 0.0,
            last_loss: None,
            losses: Vec::new(),
            rng: RngState {
                kind: "chacha8(seed, domain, epoch) permutations".into(),
                seed: cfg.seed,
                position: cfg.data_offset,
            },
            config: cfg,
        }
    }
}

impl<M: Trainable> Trainer<M> {
    /// Starts a run from `model` (moved to the autodiff version of `device`). When `run_dir`
    /// holds a checkpoint, the run resumes from it instead (its settings must equal `cfg`, its
    /// model have `model`'s architecture).
    pub fn new(
        model: M,
        cfg: TrainConfig,
        device: &Device,
        run_dir: Option<&Path>,
    ) -> Result<Self, Error> {
        cfg.validate()?;
        let device = device.clone().autodiff();
        if let Some(t) = Self::resume_run_dir(run_dir, &device, Some(&model), &cfg)? {
            return Ok(t);
        }
        let plain = device.clone().without_autodiff();
        let model = model.to_device(&plain).train();
        let adam = AdamState::zeros(&param_sizes(&model), &plain);
        Ok(Trainer {
            model,
            state: TrainState::start(cfg),
            adam,
            device,
            run_dir: run_dir.map(Path::to_path_buf),
        })
    }

    /// Starts a run that continues another run's optimiser, as the released BTM code branches an
    /// ELM from the seed: the weights, the Adam moments and the update count come from the
    /// checkpoint file `parent` (so the LR schedule and Adam's bias correction go on where the
    /// parent stopped), while the data position, tokens, FLOPs and losses start afresh for the
    /// new data. `cfg.steps` counts from the parent's first update and must exceed the parent's
    /// updates. When `run_dir` already holds a checkpoint, the run resumes from it instead (its
    /// settings must equal `cfg`).
    pub fn continue_from(
        parent: &Path,
        cfg: TrainConfig,
        device: &Device,
        run_dir: Option<&Path>,
    ) -> Result<Self, Error> {
        cfg.validate()?;
        if let Some(t) = Self::resume_run_dir(run_dir, device, None, &cfg)? {
            return Ok(t);
        }
        let mut t = Self::resume(parent, device)?;
        if cfg.steps <= t.state.step {
            return Err(Error::Config(format!(
                "steps ({}) counts from the parent's first update and must exceed its {} updates",
                cfg.steps, t.state.step
            )));
        }
        let mut state = TrainState::start(cfg);
        state.step = t.state.step;
        state.rng.kind = std::mem::take(&mut t.state.rng.kind);
        t.state = state;
        t.run_dir = run_dir.map(Path::to_path_buf);
        Ok(t)
    }

    /// Resumes from `run_dir`'s checkpoint when there is one; its settings must equal `cfg` and
    /// its model have `expected`'s architecture.
    fn resume_run_dir(
        run_dir: Option<&Path>,
        device: &Device,
        expected: Option<&M>,
        cfg: &TrainConfig,
    ) -> Result<Option<Self>, Error> {
        let Some(dir) = run_dir else { return Ok(None) };
        let ckpt = dir.join(CHECKPOINT_FILE);
        if !ckpt.exists() {
            return Ok(None);
        }
        let t = Self::resume(&ckpt, device)?;
        if let Some(want) = expected
            && want.metadata()? != t.model.metadata()?
        {
            return Err(Error::Checkpoint(format!(
                "{}: its model ({:?}) differs from the one to train ({:?}); use another run directory",
                ckpt.display(),
                t.model.metadata()?,
                want.metadata()?
            )));
        }
        if &t.state.config != cfg {
            return Err(Error::Checkpoint(format!(
                "{} was written with different settings ({:?}); use another run directory or the same settings",
                ckpt.display(),
                t.state.config
            )));
        }
        Ok(Some(Trainer {
            run_dir: Some(dir.to_path_buf()),
            ..t
        }))
    }

    /// Loads a checkpoint file; the run directory becomes the file's directory.
    pub fn resume(path: &Path, device: &Device) -> Result<Self, Error> {
        let device = device.clone().autodiff();
        let plain = device.clone().without_autodiff();
        let bytes = fsutil::read_limited(path, M::MAX_CHECKPOINT_BYTES)?;
        let raw = weights::read_raw(&bytes).map_err(|e| e.in_file(path))?;
        let state: TrainState =
            serde_json::from_str(raw.meta.get(TRAIN_STATE_KEY).ok_or_else(|| {
                Error::Checkpoint(format!("{}: no {TRAIN_STATE_KEY} metadata", path.display()))
            })?)?;
        let model = M::from_tensors(&raw.meta, raw.model, &plain)
            .map_err(|e| e.in_file(path))?
            .train();
        let mut moments: HashMap<String, Vec<f32>> =
            raw.other.into_iter().map(|t| (t.name, t.values)).collect();
        let mut adam = AdamState {
            m: Vec::new(),
            v: Vec::new(),
        };
        for (name, shape) in weights::module_shapes(&model) {
            let n: usize = shape.iter().product();
            for (kind, dst) in [("m", &mut adam.m), ("v", &mut adam.v)] {
                let key = format!("adam.{kind}.{name}");
                let values = moments.remove(&key).ok_or_else(|| {
                    Error::Checkpoint(format!("{}: {key} is missing", path.display()))
                })?;
                if values.len() != n || values.iter().any(|v| !v.is_finite()) {
                    return Err(Error::Checkpoint(format!(
                        "{}: {key} is malformed",
                        path.display()
                    )));
                }
                dst.push(Tensor::from_data(TensorData::new(values, [n]), &plain));
            }
        }
        Ok(Trainer {
            model,
            state,
            adam,
            device,
            run_dir: path.parent().map(Path::to_path_buf),
        })
    }

    /// Writes `checkpoint.safetensors` into the run directory atomically: the weights under
    /// their file names, the Adam moments as `adam.m.<name>` / `adam.v.<name>`, the model's
    /// metadata and the training state. Without a run directory, writes nothing.
    pub fn save_checkpoint(&self) -> Result<Option<PathBuf>, Error> {
        let Some(dir) = &self.run_dir else {
            return Ok(None);
        };
        let path = dir.join(CHECKPOINT_FILE);
        self.write_checkpoint(&path)?;
        Ok(Some(path))
    }

    /// Writes the checkpoint that [`Self::save_checkpoint`] writes to `path` instead (a branch
    /// point of this run that another run continues from, say).
    pub fn write_checkpoint(&self, path: &Path) -> Result<(), Error> {
        let tensors = weights::module_tensors(&self.model);
        let mut moments: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        for (kind, list) in [("m", &self.adam.m), ("v", &self.adam.v)] {
            for (t, tensor) in tensors.iter().zip(list) {
                let values = tensor
                    .to_data()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .map_err(|e| Error::Checkpoint(format!("reading optimiser state: {e:?}")))?;
                moments.push((
                    format!("adam.{kind}.{}", t.name),
                    vec![values.len()],
                    values,
                ));
            }
        }
        let entries = tensors
            .iter()
            .map(|t| {
                (
                    format!("{}{}", weights::PREFIX, t.name),
                    t.shape.clone(),
                    t.values.as_slice(),
                )
            })
            .chain(
                moments
                    .iter()
                    .map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice())),
            );
        let mut meta = self.model.metadata()?;
        meta.insert(
            TRAIN_STATE_KEY.to_string(),
            serde_json::to_string(&self.state)?,
        );
        let bytes = weights::write_safetensors(entries, &meta)?;
        fsutil::write_atomic(path, &bytes)
    }

    /// Whether every update has been done.
    pub fn finished(&self) -> bool {
        self.state.step >= self.state.config.steps
    }

    /// One optimiser update over `grad_accum` micro-batches of `data`.
    pub fn step(&mut self, data: &Mixture) -> Result<StepStats, Error> {
        let cfg = self.state.config.clone();
        let started = Instant::now();
        let n_ctx = data.n_ctx();
        let model_cfg = Trainable::config(&self.model);
        self.model.check_data(data)?;
        let mut acc: Option<Vec<Tensor<1>>> = None;
        let mut loss_sum = 0.0;
        for _ in 0..cfg.grad_accum {
            let start = self.state.data_position;
            let flat = data.batch(start, cfg.batch_size);
            self.state.data_position += cfg.batch_size as u64;
            let (x, y) = batch_tensors(&flat, cfg.batch_size, &self.device);
            let loss = cross_entropy(self.model.logits(x, start, data), y);
            let grads = loss.clone().div_scalar(cfg.grad_accum as f64).backward();
            loss_sum += scalar(loss.inner());
            let g = collect_gradients(&self.model, &grads);
            acc = Some(match acc {
                None => g,
                Some(prev) => prev.into_iter().zip(g).map(|(a, b)| a + b).collect(),
            });
        }
        let grads = acc.unwrap_or_default();
        let loss = loss_sum / cfg.grad_accum as f64;
        if !loss.is_finite() {
            return Err(Error::Diverged(format!(
                "loss is {loss} at update {}",
                self.state.step + 1
            )));
        }
        let (model, grad_norm, lr) = adamw_update(
            self.model.clone(),
            grads,
            &mut self.adam,
            self.state.step,
            &cfg,
        )?;
        self.model = model;
        let tokens = cfg.tokens_per_step(n_ctx);
        self.state.step += 1;
        self.state.tokens += tokens;
        // DEMix counts as its dense model: one expert is active per token.
        self.state.flops += model_cfg.train_flops_per_token() * tokens as f64;
        self.state.last_loss = Some(loss);
        self.state.losses.push(loss as f32);
        self.state.rng.position = self.state.data_position;
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        Ok(StepStats {
            step: self.state.step,
            steps: cfg.steps,
            loss,
            lr,
            grad_norm,
            tokens_per_s: tokens as f64 / secs,
        })
    }

    /// Trains until every update is done or `stop` is raised (it is read before each update),
    /// checkpointing every `checkpoint_every` updates, when stopped and at the end. `on_step`
    /// sees every update (callers draw progress from it).
    pub fn run(
        &mut self,
        data: &Mixture,
        stop: &AtomicBool,
        mut on_step: impl FnMut(&StepStats),
    ) -> Result<RunOutcome, Error> {
        self.run_with(data, stop, |s, _| on_step(s))
    }

    /// [`Self::run`], with `on_step` also seeing the trainer after each update (to score the
    /// model on validation data as it trains, say).
    pub fn run_with(
        &mut self,
        data: &Mixture,
        stop: &AtomicBool,
        mut on_step: impl FnMut(&StepStats, &Self),
    ) -> Result<RunOutcome, Error> {
        let every = self.state.config.checkpoint_every;
        while !self.finished() {
            if stop.load(Ordering::SeqCst) {
                self.save_checkpoint()?;
                return Ok(RunOutcome::Stopped {
                    step: self.state.step,
                });
            }
            let stats = self.step(data)?;
            on_step(&stats, self);
            if every > 0 && self.state.step.is_multiple_of(every) && !self.finished() {
                self.save_checkpoint()?;
            }
        }
        self.save_checkpoint()?;
        Ok(RunOutcome::Finished)
    }

    /// [`Self::run`] with no way to stop it: trains every update.
    pub fn run_to_end(
        &mut self,
        data: &Mixture,
        on_step: impl FnMut(&StepStats),
    ) -> Result<(), Error> {
        self.run(data, &AtomicBool::new(false), on_step).map(|_| ())
    }

    /// The trained model without autodiff (for evaluation and saving).
    pub fn model(&self) -> M {
        self.model.valid()
    }
}
