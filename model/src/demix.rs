//! DEMix (Gururangan et al. 2022), the paper's second baseline: a single model whose
//! feed-forward layers are per-domain experts, everything else shared.
//!
//! # The model
//!
//! [`Demix`] is the GPT of [`crate::gpt`] with one change: every block holds `E` feed-forward
//! networks (`experts`, one per training domain) instead of one. Token and position embeddings,
//! LayerNorms, attention and the final norm are shared. A sequence is *routed* to one expert by
//! its domain label, and that expert is the FFN of every block for that sequence; so the model
//! with expert `e` plugged in is an ordinary [`Gpt`] ([`Demix::expert_model`]), and per token
//! DEMix costs exactly what the dense model costs (one FFN active).
//!
//! Initialisation ([`Demix::init`]): the shared parameters and expert 0 are those of
//! `Gpt::init(config, seed)` (the dense baseline's initialisation); expert `e ≥ 1` is the FFN of
//! `Gpt::init(config, seed + e)`, so the experts start independent, as separate modules do in
//! the DEMix code.
//!
//! # Training (compute-matched)
//!
//! Jointly, with domain-routed batches (the one [`Trainer`], [`DemixTrainer`]): update `s` takes the same
//! `batch_size` blocks as the dense LM's update `s`, from the same domain-balanced
//! [`Mixture`] of the `E` training domains, whose sample `k` comes from domain `k mod E`; each
//! block goes through its own domain's expert ([`routes`]). When `E` divides the batch size
//! every update holds `batch_size / E` blocks of every domain (the DEMix setting: each GPU of a
//! data-parallel group holds one domain); otherwise the domains take turns by batch slot (with
//! 4 blocks and 8 domains, updates alternate between domains 0-3 and 4-7) and every domain
//! still gets exactly its share over any `E` consecutive blocks. The loss is the mean
//! cross-entropy over every token of the update, as for the dense LM; the optimiser is the
//! same AdamW with global-norm clipping ([`crate::train`]) over all parameters (an expert not
//! in an update gets a zero gradient; its Adam moments decay and weight decay applies).
//! DEMix trains the dense LM's `B` updates at the same batch size; its training FLOPs are
//! counted as the dense model's ([`GptConfig::train_flops_per_token`] × tokens), since one
//! FFN is active per token.
//!
//! # Inference
//!
//! As the DEMix paper and the BTM comparison do: the experts' next-token distributions are
//! mixed with the domain posterior, exactly as a BTM ensemble mixes its ELMs
//! ([`crate::forest::posterior`]): per target domain, a cached prior over the experts is
//! estimated on that domain's dev data (posterior at each dev block's last position, batches of
//! 16 blocks, EMA α = 0.3, starting uniform), then on test data
//! `ln p(x_i | x_<i) = logsumexp_j(ln P(D = j | x_<i) + ln p_j(x_i | x_<i))` with the posterior
//! `P(D | x_<i) ∝ prior · p(x_<i | D)` over the block's prefix. `p_j` is the shared model run
//! with expert `j`, so inference runs `E` forward passes per token (reported as the models run
//! per token).
//!
//! # Files
//!
//! A DEMix weights file is safetensors like an ELM's (see `specs/model-formats.md`) with
//! tensor names `transformer.<dotted field path>`: the shared ones as in GPT-2
//! (`transformer.wte.weight`, `transformer.h.0.attn.c_attn.weight`, ...), the experts as
//! `transformer.h.<i>.experts.<e>.c_fc.weight` etc., and metadata `btm.config` (the
//! [`GptConfig`]) and `btm.demix.experts` (`E`). A training checkpoint
//! (`checkpoint.safetensors`) adds `adam.m.<name>` / `adam.v.<name>` moments and
//! `btm.train_state`, like an ELM's, so a killed run resumes where it stopped.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::module::{embedding, linear};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::config::GptConfig;
use crate::data::Mixture;
use crate::forest::posterior::{self, PriorConfig, Weighting};
use crate::gpt::{self, Attention, Block, Conv1D, Embedding, Gpt, LayerNorm, Mlp};
use crate::train::{self, Trainable, Trainer};
use crate::weights::{self, NamedTensor};
use crate::{eval, fsutil};

/// Metadata key holding the number of experts.
pub const EXPERTS_KEY: &str = "btm.demix.experts";

/// A transformer block with one feed-forward expert per domain.
#[derive(Module, Debug)]
pub struct DemixBlock {
    /// Norm before attention (shared).
    pub ln_1: LayerNorm,
    /// Attention (shared).
    pub attn: Attention,
    /// Norm before the feed-forward (shared).
    pub ln_2: LayerNorm,
    /// One feed-forward network per domain.
    pub experts: Vec<Mlp>,
}

/// The DEMix model: a GPT whose feed-forward layers are per-domain experts.
#[derive(Module, Debug)]
pub struct Demix {
    /// Token embeddings, also the (tied) output head.
    pub wte: Embedding,
    /// Learned positions.
    pub wpe: Embedding,
    /// The blocks.
    pub h: Vec<DemixBlock>,
    /// Final norm.
    pub ln_f: LayerNorm,
    /// Attention heads (not a parameter).
    pub n_heads: usize,
}

/// A copy of a parameter with its own identity (so that two experts copied from one FFN are
/// trained as two parameters).
fn fresh<const D: usize>(p: &Param<Tensor<D>>) -> Param<Tensor<D>> {
    Param::from_tensor(p.val())
}

fn fresh_mlp(m: &Mlp) -> Mlp {
    let conv = |c: &Conv1D| Conv1D {
        weight: fresh(&c.weight),
        bias: fresh(&c.bias),
    };
    Mlp {
        c_fc: conv(&m.c_fc),
        c_proj: conv(&m.c_proj),
    }
}

/// Sequences grouped by expert: `(expert, indices into the batch)`, and the inverse
/// permutation that puts the concatenated groups back into batch order.
struct Routing {
    groups: Vec<(usize, Tensor<1, Int>)>,
    inverse: Option<Tensor<1, Int>>,
}

impl Routing {
    fn new(routes: &[usize], device: &Device) -> Self {
        let mut by_expert: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, &e) in routes.iter().enumerate() {
            by_expert.entry(e).or_default().push(i);
        }
        let index = |v: &[usize]| {
            let v: Vec<i64> = v.iter().map(|&i| i as i64).collect();
            let n = v.len();
            Tensor::<1, Int>::from_data(TensorData::new(v, [n]), device)
        };
        if by_expert.len() == 1 {
            let (&e, rows) = by_expert.iter().next().unwrap_or_else(|| unreachable!());
            return Routing {
                groups: vec![(e, index(rows))],
                inverse: None,
            };
        }
        let order: Vec<usize> = by_expert.values().flatten().copied().collect();
        let mut inverse = vec![0usize; order.len()];
        for (pos, &i) in order.iter().enumerate() {
            inverse[i] = pos;
        }
        Routing {
            groups: by_expert
                .iter()
                .map(|(&e, rows)| (e, index(rows)))
                .collect(),
            inverse: Some(index(&inverse)),
        }
    }
}

impl DemixBlock {
    fn forward(&self, x: Tensor<3>, n_heads: usize, routing: &Routing) -> Tensor<3> {
        let x = x.clone() + self.attn.forward(self.ln_1.forward(x), n_heads);
        let h = self.ln_2.forward(x.clone());
        let y = match &routing.inverse {
            None => self.experts[routing.groups[0].0].forward(h),
            Some(inverse) => {
                let parts: Vec<Tensor<3>> = routing
                    .groups
                    .iter()
                    .map(|(e, rows)| self.experts[*e].forward(h.clone().select(0, rows.clone())))
                    .collect();
                Tensor::cat(parts, 0).select(0, inverse.clone())
            }
        };
        x + y
    }
}

impl Demix {
    /// A DEMix whose shared parameters are `dense`'s and whose `n_experts` experts are all
    /// copies of `dense`'s feed-forward layers (each its own parameter).
    pub fn from_dense(dense: &Gpt, n_experts: usize) -> Self {
        Demix {
            wte: Embedding {
                weight: fresh(&dense.wte.weight),
            },
            wpe: Embedding {
                weight: fresh(&dense.wpe.weight),
            },
            h: dense
                .h
                .iter()
                .map(|b| DemixBlock {
                    ln_1: LayerNorm {
                        weight: fresh(&b.ln_1.weight),
                        bias: fresh(&b.ln_1.bias),
                    },
                    attn: Attention {
                        c_attn: Conv1D {
                            weight: fresh(&b.attn.c_attn.weight),
                            bias: fresh(&b.attn.c_attn.bias),
                        },
                        c_proj: Conv1D {
                            weight: fresh(&b.attn.c_proj.weight),
                            bias: fresh(&b.attn.c_proj.bias),
                        },
                    },
                    ln_2: LayerNorm {
                        weight: fresh(&b.ln_2.weight),
                        bias: fresh(&b.ln_2.bias),
                    },
                    experts: (0..n_experts).map(|_| fresh_mlp(&b.mlp)).collect(),
                })
                .collect(),
            ln_f: LayerNorm {
                weight: fresh(&dense.ln_f.weight),
                bias: fresh(&dense.ln_f.bias),
            },
            n_heads: dense.n_heads,
        }
    }

    /// A freshly initialised DEMix: shared parameters and expert 0 from `Gpt::init(config,
    /// seed)`, expert `e` from the feed-forward layers of `Gpt::init(config, seed + e)`.
    pub fn init(config: &GptConfig, n_experts: usize, seed: u64, device: &Device) -> Self {
        let mut m = Demix::from_dense(&Gpt::init(config, seed, device), n_experts);
        for e in 1..n_experts {
            let other = Gpt::init(config, seed.wrapping_add(e as u64), device);
            m.set_expert(e, &other);
        }
        m
    }

    /// Replaces expert `e` of every block by (a copy of) `dense`'s feed-forward layers.
    ///
    /// # Panics
    /// When `e` is not an expert or `dense` has another number of blocks.
    pub fn set_expert(&mut self, e: usize, dense: &Gpt) {
        assert_eq!(self.h.len(), dense.h.len(), "number of blocks");
        for (b, d) in self.h.iter_mut().zip(&dense.h) {
            b.experts[e] = fresh_mlp(&d.mlp);
        }
    }

    /// Number of experts (domains).
    pub fn n_experts(&self) -> usize {
        self.h.first().map_or(0, |b| b.experts.len())
    }

    /// The architecture of each expert model, read back from the parameter shapes.
    pub fn config(&self) -> GptConfig {
        gpt::shape_config(&self.wte, &self.wpe, self.n_heads, self.h.len())
    }

    /// The shared model with expert `e` as its feed-forward layers: an ordinary GPT, which
    /// computes exactly what DEMix computes for a sequence routed to `e`.
    ///
    /// # Panics
    /// When `e` is not an expert.
    pub fn expert_model(&self, e: usize) -> Gpt {
        Gpt {
            wte: self.wte.clone(),
            wpe: self.wpe.clone(),
            h: self
                .h
                .iter()
                .map(|b| Block {
                    ln_1: b.ln_1.clone(),
                    attn: b.attn.clone(),
                    ln_2: b.ln_2.clone(),
                    mlp: b.experts[e].clone(),
                })
                .collect(),
            ln_f: self.ln_f.clone(),
            n_heads: self.n_heads,
        }
    }

    /// Next-token logits `[batch, time, vocab]` for tokens `[batch, time]`, sequence `i` going
    /// through expert `routes[i]`.
    ///
    /// # Panics
    /// When `routes` does not have one entry per sequence or names a missing expert.
    pub fn forward(&self, tokens: Tensor<2, Int>, routes: &[usize]) -> Tensor<3> {
        let [b, t] = tokens.dims();
        assert_eq!(routes.len(), b, "one route per sequence");
        let n = self.n_experts();
        assert!(
            routes.iter().all(|&e| e < n),
            "routes {routes:?} name an expert beyond {n}"
        );
        let routing = Routing::new(routes, &tokens.device());
        let wte = self.wte.weight.val();
        let pos = self.wpe.weight.val().narrow(0, 0, t).unsqueeze::<3>();
        let mut x = embedding(wte.clone(), tokens) + pos;
        for block in &self.h {
            x = block.forward(x, self.n_heads, &routing);
        }
        let x = self.ln_f.forward(x);
        linear(x, wte.transpose(), None)
    }
}

/// The expert of each block of a batch that starts at sample `start` of a [`Mixture`] of
/// `n_domains` domains: sample `k` comes from domain `k mod n_domains`
/// ([`Mixture::sample`]), and goes through that domain's expert.
pub fn routes(start: u64, batch: usize, n_domains: usize) -> Vec<usize> {
    (0..batch as u64)
        .map(|i| ((start + i) % n_domains.max(1) as u64) as usize)
        .collect()
}

impl Trainable for Demix {
    const MAX_CHECKPOINT_BYTES: u64 = 3 * 16 * weights::MAX_FILE_BYTES;

    fn config(&self) -> GptConfig {
        Demix::config(self)
    }

    /// Refuses data whose domains are not one per expert (block `k` of the stream goes through
    /// expert `k mod E`) or whose blocks exceed the context.
    fn check_data(&self, data: &Mixture) -> Result<(), crate::Error> {
        let e = self.n_experts();
        if data.domains().len() != e {
            return Err(crate::Error::Config(format!(
                "DEMix has {e} experts but the data {} domains",
                data.domains().len()
            )));
        }
        train::check_context(&Demix::config(self), data)
    }

    /// Routes block `i` of the micro-batch to the expert of its domain ([`routes`]).
    fn logits(&self, inputs: Tensor<2, Int>, start: u64, _data: &Mixture) -> Tensor<3> {
        let [batch, _] = inputs.dims();
        let r = routes(start, batch, self.n_experts());
        self.forward(inputs, &r)
    }

    fn metadata(&self) -> Result<BTreeMap<String, String>, crate::Error> {
        let mut meta = weights::metadata(&Demix::config(self))?;
        meta.insert(EXPERTS_KEY.to_string(), self.n_experts().to_string());
        Ok(meta)
    }

    fn from_tensors(
        meta: &HashMap<String, String>,
        tensors: Vec<NamedTensor>,
        device: &Device,
    ) -> Result<Self, crate::Error> {
        let config = weights::config_from_metadata(meta)?;
        let experts: usize = meta
            .get(EXPERTS_KEY)
            .and_then(|s| s.parse().ok())
            .filter(|&e| e > 0)
            .ok_or_else(|| {
                crate::Error::Weights(format!("metadata entry {EXPERTS_KEY} is missing or bad"))
            })?;
        let skeleton = Demix::from_dense(&Gpt::init(&config, 0, device), experts);
        weights::load_named(skeleton, tensors, device)
    }
}

/// Saves a DEMix model atomically (format: see the module documentation).
pub fn save(model: &Demix, path: &Path) -> Result<(), crate::Error> {
    fsutil::write_atomic(path, &model.to_bytes()?)
}

/// Loads a DEMix model, checking every name, shape and value; `expected`, when given, must
/// equal the file's architecture.
pub fn load(
    path: &Path,
    expected: Option<&GptConfig>,
    device: &Device,
) -> Result<Demix, crate::Error> {
    let bytes = fsutil::read_limited(path, weights::MAX_FILE_BYTES * 16)?;
    let load = || -> Result<Demix, crate::Error> {
        let raw = weights::read_raw(&bytes)?;
        if let Some(t) = raw.other.first() {
            return Err(crate::Error::Weights(format!(
                "unexpected tensor {}",
                t.name
            )));
        }
        let model = Demix::from_tensors(&raw.meta, raw.model, device)?;
        if let Some(want) = expected
            && want != &model.config()
        {
            return Err(crate::Error::Weights(format!(
                "architecture mismatch: the file holds {:?}, expected {want:?}",
                model.config()
            )));
        }
        Ok(model)
    };
    load().map_err(|e| e.in_file(path))
}

/// A DEMix training run: the one [`Trainer`] with domain-routed batches (same settings,
/// schedule, clipping, FLOPs accounting and checkpoint layout as an ELM's run).
pub type DemixTrainer = Trainer<Demix>;

/// Per-token log-probabilities of `tokens` ([`eval::token_logprobs`]) under each expert:
/// `[expert][target]`.
pub fn expert_logprobs(
    model: &Demix,
    tokens: &[u32],
    batch: usize,
    device: &Device,
) -> Result<Vec<Vec<f64>>, crate::Error> {
    (0..model.n_experts())
        .map(|e| eval::token_logprobs(&model.expert_model(e), tokens, batch, device))
        .collect()
}

/// DEMix's log-probabilities of a target domain's test tokens: the experts mixed by the domain
/// posterior with a cached prior estimated on that domain's dev tokens (the BTM ensemble's
/// rule, [`posterior`]). Returns the log-probabilities and the prior.
pub fn mixture_logprobs(
    model: &Demix,
    test: &[u32],
    dev: &[u32],
    prior_cfg: &PriorConfig,
    device: &Device,
) -> Result<(Vec<f64>, Vec<f64>), crate::Error> {
    let n_ctx = model.config().n_ctx;
    let dev_lp = expert_logprobs(model, dev, 8, device)?;
    let prior = posterior::estimate_prior(
        &dev_lp,
        &posterior::block_targets(dev.len(), n_ctx),
        prior_cfg,
    );
    let test_lp = expert_logprobs(model, test, 8, device)?;
    let lp = posterior::mix_stream(
        &test_lp,
        &posterior::block_targets(test.len(), n_ctx),
        &posterior::ln_all(&prior),
        Weighting::Posterior,
    );
    Ok((lp, prior))
}
