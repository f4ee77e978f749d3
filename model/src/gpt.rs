//! The expert LM: a GPT-2-style decoder.
//!
//! Pre-LayerNorm blocks, a final LayerNorm, GELU (tanh form), feed-forward 4·d, learned
//! positions, tied input/output embeddings, no dropout. Field names follow Hugging Face's
//! `GPT2Model` (`wte`, `wpe`, `h.{i}.ln_1`, `h.{i}.attn.c_attn`, ...), and linear weights are
//! stored `[d_in, d_out]` like GPT-2's `Conv1D`, so a checkpoint maps one-to-one onto a
//! `GPT2LMHeadModel` state dict (see [`crate::weights`]).

use burn::module::{Module, Param};
use burn::tensor::activation::gelu_approximate;
use burn::tensor::module::{attention, embedding, layer_norm, linear};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::config::GptConfig;
pub use crate::config::LAYER_NORM_EPS;

/// Standard deviation of the GPT-2 initialisation.
const INIT_STD: f64 = 0.02;

/// A token (or position) embedding table, `[rows, d]`.
#[derive(Module, Debug)]
pub struct Embedding {
    /// The table.
    pub weight: Param<Tensor<2>>,
}

/// LayerNorm with GPT-2's parameter names.
#[derive(Module, Debug)]
pub struct LayerNorm {
    /// Scale (γ).
    pub weight: Param<Tensor<1>>,
    /// Shift (β).
    pub bias: Param<Tensor<1>>,
}

/// A dense layer stored like GPT-2's `Conv1D`: `weight` is `[d_in, d_out]`.
#[derive(Module, Debug)]
pub struct Conv1D {
    /// `[d_in, d_out]`.
    pub weight: Param<Tensor<2>>,
    /// `[d_out]`.
    pub bias: Param<Tensor<1>>,
}

/// Causal multi-head self-attention.
#[derive(Module, Debug)]
pub struct Attention {
    /// Fused query/key/value projection, `[d, 3d]`.
    pub c_attn: Conv1D,
    /// Output projection, `[d, d]`.
    pub c_proj: Conv1D,
}

/// The feed-forward network.
#[derive(Module, Debug)]
pub struct Mlp {
    /// `[d, 4d]`.
    pub c_fc: Conv1D,
    /// `[4d, d]`.
    pub c_proj: Conv1D,
}

/// One pre-LayerNorm transformer block.
#[derive(Module, Debug)]
pub struct Block {
    /// Norm before attention.
    pub ln_1: LayerNorm,
    /// Attention.
    pub attn: Attention,
    /// Norm before the MLP.
    pub ln_2: LayerNorm,
    /// Feed-forward.
    pub mlp: Mlp,
}

/// The architecture of a decoder with these embeddings, read back from their shapes.
pub(crate) fn shape_config(
    wte: &Embedding,
    wpe: &Embedding,
    n_heads: usize,
    n_layers: usize,
) -> GptConfig {
    let [vocab_size, d_model] = wte.weight.lazy_shape().dims();
    let [n_ctx, _] = wpe.weight.lazy_shape().dims();
    GptConfig {
        vocab_size,
        n_ctx,
        d_model,
        n_heads,
        n_layers,
    }
}

/// The GPT decoder. Build one with [`Gpt::init`] or load one with [`crate::weights::load`].
#[derive(Module, Debug)]
pub struct Gpt {
    /// Token embeddings, also the (tied) output head.
    pub wte: Embedding,
    /// Learned positions.
    pub wpe: Embedding,
    /// The blocks.
    pub h: Vec<Block>,
    /// Final norm.
    pub ln_f: LayerNorm,
    /// Attention heads (not a parameter).
    pub n_heads: usize,
}

/// Deterministic initialiser: GPT-2's N(0, 0.02) weights, zero biases, unit LayerNorm scales,
/// residual projections scaled by 1/sqrt(2L). Values come from a seeded ChaCha stream on the
/// CPU, so the same seed gives the same model on every backend.
struct Init {
    rng: ChaCha8Rng,
    device: Device,
}

impl Init {
    fn normal<const D: usize>(&mut self, shape: [usize; D], std: f64) -> Param<Tensor<D>> {
        let n: usize = shape.iter().product();
        let dist = Normal::new(0.0f64, std).unwrap_or_else(|_| unreachable!("std is positive"));
        let values: Vec<f32> = (0..n).map(|_| dist.sample(&mut self.rng) as f32).collect();
        Param::from_tensor(Tensor::from_data(
            TensorData::new(values, shape),
            &self.device,
        ))
    }

    fn constant(&self, len: usize, value: f32) -> Param<Tensor<1>> {
        Param::from_tensor(Tensor::from_data(
            TensorData::new(vec![value; len], [len]),
            &self.device,
        ))
    }

    fn layer_norm(&self, d: usize) -> LayerNorm {
        LayerNorm {
            weight: self.constant(d, 1.0),
            bias: self.constant(d, 0.0),
        }
    }

    fn conv1d(&mut self, d_in: usize, d_out: usize, std: f64) -> Conv1D {
        Conv1D {
            weight: self.normal([d_in, d_out], std),
            bias: self.constant(d_out, 0.0),
        }
    }
}

impl Gpt {
    /// A freshly initialised model. The same `(config, seed)` always gives the same weights.
    pub fn init(config: &GptConfig, seed: u64, device: &Device) -> Self {
        let d = config.d_model;
        let mut init = Init {
            rng: ChaCha8Rng::seed_from_u64(seed),
            device: device.clone(),
        };
        let resid_std = INIT_STD / (2.0 * config.n_layers as f64).sqrt();
        let wte = Embedding {
            weight: init.normal([config.vocab_size, d], INIT_STD),
        };
        let wpe = Embedding {
            weight: init.normal([config.n_ctx, d], INIT_STD),
        };
        let h = (0..config.n_layers)
            .map(|_| Block {
                ln_1: init.layer_norm(d),
                attn: Attention {
                    c_attn: init.conv1d(d, 3 * d, INIT_STD),
                    c_proj: init.conv1d(d, d, resid_std),
                },
                ln_2: init.layer_norm(d),
                mlp: Mlp {
                    c_fc: init.conv1d(d, 4 * d, INIT_STD),
                    c_proj: init.conv1d(4 * d, d, resid_std),
                },
            })
            .collect();
        Gpt {
            wte,
            wpe,
            h,
            ln_f: init.layer_norm(d),
            n_heads: config.n_heads,
        }
    }

    /// The architecture, read back from the parameter shapes.
    pub fn config(&self) -> GptConfig {
        shape_config(&self.wte, &self.wpe, self.n_heads, self.h.len())
    }

    /// Next-token logits `[batch, time, vocab]` for tokens `[batch, time]`, `time ≤ n_ctx`.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let [_, t] = tokens.dims();
        let wte = self.wte.weight.val();
        let pos = self.wpe.weight.val().slice(0..t).unsqueeze::<3>();
        let mut x = embedding(wte.clone(), tokens) + pos;
        for block in &self.h {
            x = block.forward(x, self.n_heads);
        }
        let x = self.ln_f.forward(x);
        // Tied output head: logits = x · wteᵀ.
        linear(x, wte.transpose(), None)
    }
}

impl LayerNorm {
    pub(crate) fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        layer_norm(x, self.weight.val(), Some(self.bias.val()), LAYER_NORM_EPS)
    }
}

impl Conv1D {
    fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        linear(x, self.weight.val(), Some(self.bias.val()))
    }
}

impl Attention {
    /// Causal self-attention of an (already normalised) `x [b, t, d]`, projected back to `d`.
    pub(crate) fn forward(&self, x: Tensor<3>, n_heads: usize) -> Tensor<3> {
        let [b, t, d] = x.dims();
        let hd = d / n_heads;
        let qkv = self.c_attn.forward(x);
        let mut parts = qkv
            .chunk(3, 2)
            .into_iter()
            .map(|p| p.reshape([b, t, n_heads, hd]).swap_dims(1, 2));
        let (Some(q), Some(k), Some(v)) = (parts.next(), parts.next(), parts.next()) else {
            unreachable!("chunk(3) of a [b, t, 3d] tensor yields three parts")
        };
        let options = AttentionModuleOptions {
            is_causal: true,
            ..Default::default()
        };
        let y = attention(q, k, v, None, None, options)
            .swap_dims(1, 2)
            .reshape([b, t, d]);
        self.c_proj.forward(y)
    }
}

impl Mlp {
    /// The feed-forward network of an (already normalised) `x [.., d]`.
    pub(crate) fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.c_proj.forward(gelu_approximate(self.c_fc.forward(x)))
    }
}

impl Block {
    fn forward(&self, x: Tensor<3>, n_heads: usize) -> Tensor<3> {
        let x = x.clone() + self.attn.forward(self.ln_1.forward(x), n_heads);
        let y = self.mlp.forward(self.ln_2.forward(x.clone()));
        x + y
    }
}
