//! The sampling flags, declared once for every command that generates text.

use btm_model::generate::SampleConfig;
use clap::Args;

/// How to draw each token: `--temperature`, `--sample-top-k` and `--seed`.
///
/// A command without another `--top-k` may rename the top-k flag with
/// `#[command(mut_arg("sample_top_k", |a| a.long("top-k")))]` (as `generate` does).
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Sample from the k most likely tokens only (0: all).
    #[arg(long, default_value_t = 40)]
    pub sample_top_k: usize,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    /// The model crate's settings for generating up to `max_new_tokens` tokens.
    pub fn config(&self, max_new_tokens: usize) -> SampleConfig {
        SampleConfig {
            max_new_tokens,
            temperature: self.temperature,
            top_k: (self.sample_top_k > 0).then_some(self.sample_top_k),
            seed: self.seed,
        }
    }
}

/// `--max-new-tokens` and the sampling flags.
#[derive(Debug, Clone, Args)]
pub struct GenerationArgs {
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 100)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

impl GenerationArgs {
    /// The model crate's sampling settings.
    pub fn config(&self) -> SampleConfig {
        self.sampling.config(self.max_new_tokens)
    }
}

impl From<&GenerationArgs> for SampleConfig {
    fn from(a: &GenerationArgs) -> Self {
        a.config()
    }
}
