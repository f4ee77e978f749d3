//! Architecture configuration of an ELM and its named presets.

use serde::{Deserialize, Serialize};

use btm_protocol::weights::Config as WeightsConfig;

use crate::Error;

/// LayerNorm epsilon (GPT-2's), of every LayerNorm of the model.
pub const LAYER_NORM_EPS: f64 = 1e-5;

/// The shape of a GPT-2-style decoder. Every ELM of a forest shares one `GptConfig`.
///
/// Field names follow Hugging Face's `GPT2Config` where one exists (`n_embd`, `n_head`,
/// `n_layer`, `n_positions`, `vocab_size`) so that the exported `config.json` is a plain
/// rename away from ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GptConfig {
    /// Vocabulary size (must equal the tokenizer's).
    pub vocab_size: usize,
    /// Context length: the number of learned positions.
    pub n_ctx: usize,
    /// Model width.
    pub d_model: usize,
    /// Attention heads; must divide `d_model`.
    pub n_heads: usize,
    /// Transformer blocks.
    pub n_layers: usize,
}

/// Named architecture presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// Under a million parameters with a 2k vocabulary: for tests.
    Tiny,
    /// A few million parameters: the CPU default for the demo.
    Small,
    /// The 124M GPT-2 shape (50257 tokens, 1024 positions, 768 wide, 12 layers): for GPUs.
    Gpt2Small,
}

impl Preset {
    /// All presets, in size order.
    pub const ALL: [Preset; 3] = [Preset::Tiny, Preset::Small, Preset::Gpt2Small];

    /// The preset's name as used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Gpt2Small => "gpt2-small",
        }
    }

    /// The architecture of this preset.
    pub fn config(self) -> GptConfig {
        match self {
            Preset::Tiny => GptConfig {
                vocab_size: 2048,
                n_ctx: 128,
                d_model: 96,
                n_heads: 4,
                n_layers: 3,
            },
            Preset::Small => GptConfig {
                vocab_size: 4096,
                n_ctx: 256,
                d_model: 256,
                n_heads: 4,
                n_layers: 4,
            },
            Preset::Gpt2Small => GptConfig {
                vocab_size: 50257,
                n_ctx: 1024,
                d_model: 768,
                n_heads: 12,
                n_layers: 12,
            },
        }
    }
}

impl std::str::FromStr for Preset {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown preset {s:?} (expected tiny, small or gpt2-small)"
                ))
            })
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl GptConfig {
    /// Checks that the shape is usable (the bounds are those of a weights file's
    /// `btm.config`, [`btm_protocol::weights::Config::validate`]).
    pub fn validate(&self) -> Result<(), Error> {
        WeightsConfig::from(*self)
            .validate()
            .map_err(|m| Error::Config(m.to_string()))
    }

    /// The same architecture with another vocabulary size (the tokenizer decides it).
    pub fn with_vocab(mut self, vocab_size: usize) -> Self {
        self.vocab_size = vocab_size;
        self
    }

    /// Total parameters (embeddings included; the output head is tied and not counted twice).
    pub fn num_params(&self) -> usize {
        let d = self.d_model;
        let embed = self.vocab_size * d + self.n_ctx * d;
        embed + self.n_layers * self.block_params() + 2 * d
    }

    /// Parameters of one transformer block.
    pub fn block_params(&self) -> usize {
        let d = self.d_model;
        // ln_1, c_attn, attn.c_proj, ln_2, c_fc, mlp.c_proj
        2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    }

    /// Parameters outside the embedding tables.
    pub fn non_embedding_params(&self) -> usize {
        self.num_params() - self.vocab_size * self.d_model - self.n_ctx * self.d_model
    }

    /// Training FLOPs per token, counted as `../shared/bench/torch_gpt.py` does:
    /// 6 × (non-embedding params + the tied head's vocab × d) + attention 12 × L × T × d.
    pub fn train_flops_per_token(&self) -> f64 {
        6.0 * (self.non_embedding_params() + self.vocab_size * self.d_model) as f64
            + 12.0 * (self.n_layers * self.n_ctx * self.d_model) as f64
    }

    /// Forward-only FLOPs per token (one third of training).
    pub fn forward_flops_per_token(&self) -> f64 {
        self.train_flops_per_token() / 3.0
    }

    /// The Hugging Face `GPT2Config` equivalent, as written to `config.json` by `export-hf`.
    pub fn to_hf_config(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_ctx,
            "n_ctx": self.n_ctx,
            "n_embd": self.d_model,
            "n_head": self.n_heads,
            "n_layer": self.n_layers,
            "n_inner": null,
            "activation_function": "gelu_new",
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "layer_norm_epsilon": LAYER_NORM_EPS,
            "initializer_range": 0.02,
            "scale_attn_weights": true,
            "tie_word_embeddings": true,
            "bos_token_id": crate::tokenizer::EOT_ID,
            "eos_token_id": crate::tokenizer::EOT_ID,
            "torch_dtype": "float32",
        })
    }
}

impl From<GptConfig> for WeightsConfig {
    fn from(c: GptConfig) -> Self {
        WeightsConfig {
            vocab_size: c.vocab_size,
            n_ctx: c.n_ctx,
            d_model: c.d_model,
            n_heads: c.n_heads,
            n_layers: c.n_layers,
        }
    }
}

impl From<WeightsConfig> for GptConfig {
    fn from(c: WeightsConfig) -> Self {
        GptConfig {
            vocab_size: c.vocab_size,
            n_ctx: c.n_ctx,
            d_model: c.d_model,
            n_heads: c.n_heads,
            n_layers: c.n_layers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_promised_sizes() {
        let tiny = Preset::Tiny.config();
        tiny.validate().unwrap();
        assert!(
            tiny.num_params() < 1_000_000,
            "tiny has {}",
            tiny.num_params()
        );
        let small = Preset::Small.config();
        assert!((2_000_000..10_000_000).contains(&small.num_params()));
        // GPT-2 small has 124,439,808 parameters.
        assert_eq!(Preset::Gpt2Small.config().num_params(), 124_439_808);
    }

    #[test]
    fn preset_names_round_trip() {
        for p in Preset::ALL {
            assert_eq!(p.name().parse::<Preset>().unwrap(), p);
        }
        assert!("huge".parse::<Preset>().is_err());
    }
}
