//! Evaluation: per-token log-probabilities, perplexity and bits per byte on non-overlapping
//! blocks.
//!
//! A token stream is cut into blocks of `n_ctx + 1` tokens with stride `n_ctx` (the last one
//! may be shorter); within a block, token `i ≥ 1` is predicted from tokens `0..i`. Every token
//! but the stream's first is therefore scored exactly once. Perplexity is
//! `exp(-1/N Σ log p(x_t | x_<t))`; bits per byte is `-Σ log2 p / bytes`, where `bytes` counts
//! the UTF-8 bytes the scored tokens stand for (an end-of-text token counts 1).

use burn::module::Module;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::gpt::Gpt;
use crate::tokenizer::Tokenizer;

/// Summary of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Tokens scored.
    pub tokens: u64,
    /// UTF-8 bytes those tokens stand for.
    pub bytes: u64,
    /// Mean negative log-likelihood in nats per token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Bits per UTF-8 byte.
    pub bits_per_byte: f64,
}

impl EvalResult {
    /// Summarises per-token log-probabilities (natural log) of `targets`.
    pub fn from_logprobs(logprobs: &[f64], targets: &[u32], tok: Option<&Tokenizer>) -> Self {
        let n = logprobs.len().max(1) as f64;
        let nll: f64 = -logprobs.iter().sum::<f64>();
        let bytes: u64 = match tok {
            Some(t) => targets.iter().map(|&id| t.token_bytes(id) as u64).sum(),
            None => 0,
        };
        let loss = nll / n;
        EvalResult {
            tokens: logprobs.len() as u64,
            bytes,
            loss,
            perplexity: loss.exp(),
            bits_per_byte: if bytes > 0 {
                nll / std::f64::consts::LN_2 / bytes as f64
            } else {
                f64::NAN
            },
        }
    }
}

/// The blocks (start offset, length in tokens) covering a stream of `len` tokens.
pub fn blocks(len: usize, n_ctx: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    while start + 1 < len {
        let l = (n_ctx + 1).min(len - start);
        out.push((start, l));
        start += n_ctx;
    }
    out
}

/// Log-probabilities (natural log) of each `tokens[i]` (i ≥ 1) given its block's prefix, in
/// stream order: `len - 1` values.
pub fn token_logprobs(
    model: &Gpt,
    tokens: &[u32],
    batch: usize,
    device: &Device,
) -> Result<Vec<f64>, Error> {
    let model = model.valid();
    let n_ctx = model.config().n_ctx;
    let vocab = model.config().vocab_size;
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Data(format!(
            "token id {bad} is outside the model's vocabulary of {vocab}"
        )));
    }
    let all = blocks(tokens.len(), n_ctx);
    let mut out = Vec::with_capacity(tokens.len().saturating_sub(1));
    // Full-length blocks go in batches; a shorter final block goes alone.
    let (full, short): (Vec<_>, Vec<_>) = all.into_iter().partition(|&(_, l)| l == n_ctx + 1);
    for group in full.chunks(batch.max(1)).chain(short.chunks(1)) {
        let l = group[0].1;
        let b = group.len();
        let mut x = Vec::with_capacity(b * (l - 1));
        let mut y = Vec::with_capacity(b * (l - 1));
        for &(s, _) in group {
            x.extend(tokens[s..s + l - 1].iter().map(|&t| t as i64));
            y.extend(tokens[s + 1..s + l].iter().map(|&t| t as i64));
        }
        let x: Tensor<2, Int> = Tensor::from_data(TensorData::new(x, [b, l - 1]), device);
        let y: Tensor<3, Int> = Tensor::from_data(TensorData::new(y, [b, l - 1, 1]), device);
        let lp = log_softmax(model.forward(x), 2).gather(2, y);
        let values = lp
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| Error::Data(format!("reading log-probabilities: {e:?}")))?;
        out.extend(values.into_iter().map(f64::from));
    }
    Ok(out)
}

/// Evaluates `model` on a token stream.
pub fn evaluate(
    model: &Gpt,
    tok: Option<&Tokenizer>,
    tokens: &[u32],
    batch: usize,
    device: &Device,
) -> Result<EvalResult, Error> {
    if tokens.len() < 2 {
        return Err(Error::Data("need at least two tokens to evaluate".into()));
    }
    let lp = token_logprobs(model, tokens, batch, device)?;
    Ok(EvalResult::from_logprobs(&lp, &tokens[1..], tok))
}
