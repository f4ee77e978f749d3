//! Sampling text from an ELM: temperature and top-k, seeded.

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::gpt::Gpt;
use crate::tokenizer::{EOT_ID, Tokenizer};

/// Sampling settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleConfig {
    /// Tokens to generate at most (stops early at `<|endoftext|>`).
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (None: all).
    pub top_k: Option<usize>,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for SampleConfig {
    fn default() -> Self {
        SampleConfig {
            max_new_tokens: 100,
            temperature: 0.8,
            top_k: Some(40),
            seed: 0,
        }
    }
}

/// Draws one token from next-token log-probabilities or logits (any additive constant).
pub fn sample(logits: &[f32], cfg: &SampleConfig, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32)
    };
    if cfg.temperature <= 0.0 {
        return argmax();
    }
    let mut idx: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i].is_finite())
        .collect();
    if let Some(k) = cfg.top_k.filter(|&k| k > 0 && k < idx.len()) {
        idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        idx.truncate(k);
    }
    let max = idx
        .iter()
        .map(|&i| logits[i])
        .fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i] - max) as f64) / cfg.temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    if !(total.is_finite() && total > 0.0) {
        return argmax();
    }
    let mut r = rng.random::<f64>() * total;
    for (w, &i) in weights.iter().zip(&idx) {
        r -= w;
        if r <= 0.0 {
            return i as u32;
        }
    }
    idx.last().map_or(0, |&i| i as u32)
}

/// Next-token logits after `context` (the last `n_ctx` tokens are used).
pub fn next_logits(model: &Gpt, context: &[u32], device: &Device) -> Result<Vec<f32>, Error> {
    let n_ctx = model.config().n_ctx;
    let ctx: Vec<i64> = if context.is_empty() {
        vec![EOT_ID as i64]
    } else {
        context[context.len().saturating_sub(n_ctx)..]
            .iter()
            .map(|&t| t as i64)
            .collect()
    };
    let t = ctx.len();
    let x: Tensor<2, Int> = Tensor::from_data(TensorData::new(ctx, [1, t]), device);
    let logits = model
        .forward(x)
        .slice([0..1, t - 1..t])
        .reshape([model.config().vocab_size]);
    logits
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| Error::Data(format!("reading logits: {e:?}")))
}

/// Continues `prompt` and returns only the generated text.
pub fn generate(
    model: &Gpt,
    tok: &Tokenizer,
    prompt: &str,
    cfg: &SampleConfig,
    device: &Device,
) -> Result<String, Error> {
    let model = model.valid();
    let mut tokens = tok.encode(prompt)?;
    let start = tokens.len();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    for _ in 0..cfg.max_new_tokens {
        let logits = next_logits(&model, &tokens, device)?;
        let next = sample(&logits, cfg, &mut rng);
        if next == EOT_ID {
            break;
        }
        tokens.push(next);
    }
    tok.decode(&tokens[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_top1_is_greedy() {
        let logits = [0.1, 3.0, -1.0, 2.9];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let greedy = SampleConfig {
            temperature: 0.0,
            ..Default::default()
        };
        assert_eq!(sample(&logits, &greedy, &mut rng), 1);
        let top1 = SampleConfig {
            temperature: 1.0,
            top_k: Some(1),
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(sample(&logits, &top1, &mut rng), 1);
        }
    }

    #[test]
    fn top_k_never_samples_outside_the_k_best() {
        let logits = [0.0, 5.0, 4.9, -3.0, 4.8];
        let cfg = SampleConfig {
            temperature: 2.0,
            top_k: Some(3),
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            let s = sample(&logits, &cfg, &mut rng);
            assert!([1, 2, 4].contains(&s), "sampled {s}");
        }
    }
}
