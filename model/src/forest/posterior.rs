//! The domain posterior and the mixtures it weights, in log space (pure `f64` arithmetic, no
//! models).
//!
//! Notation: a forest of `E` ELMs; a block of the evaluation stream has `L` targets, and
//! `lp[j][i] = ln p_j(x_i | x_<i)` is ELM `j`'s log-probability of target `i` given the block's
//! prefix. With a prior `P(D = j)`, the ensemble's log-probability of target `i` is
//!
//! ```text
//! ln p(x_i | x_<i) = logsumexp_j( ln w_j[i] + lp[j][i] ),
//! ln w_j[i]        = ln P(D = j) + sum_{s < i} lp[j][s]  -  logsumexp_k( same for k ),
//! ```
//!
//! that is `w[i] = P(D | x_<i)`, the domain posterior given the block's prefix. Products of
//! hundreds of probabilities underflow `f64`; sums of logs do not.

use serde::{Deserialize, Serialize};

/// How an ensemble weights its ELMs at each position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// The paper: `w[i] = P(D | x_<i) ∝ P(D) · p(x_<i | D)` over the block's whole prefix.
    #[default]
    Posterior,
    /// The released code (`hadasah/btm`, `kernelmachine/demix`): `w_j[i] ∝ P(D = j) ·
    /// p_j(x_{i-1})`, only the previous token's likelihood; `w[0]` is uniform at the start of
    /// every block.
    PrevToken,
    /// The prior alone, the same at every position.
    Prior,
    /// `1/E` for every ELM (a baseline).
    Uniform,
}

impl Weighting {
    /// All weightings.
    pub const ALL: [Weighting; 4] = [
        Weighting::Posterior,
        Weighting::PrevToken,
        Weighting::Prior,
        Weighting::Uniform,
    ];

    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Weighting::Posterior => "posterior",
            Weighting::PrevToken => "prev_token",
            Weighting::Prior => "prior",
            Weighting::Uniform => "uniform",
        }
    }
}

impl std::str::FromStr for Weighting {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Weighting::ALL
            .into_iter()
            .find(|w| w.name() == s || w.name().replace('_', "-") == s)
            .ok_or_else(|| {
                crate::Error::Config(format!(
                    "unknown weighting {s:?} (expected posterior, prev-token, prior or uniform)"
                ))
            })
    }
}

impl std::fmt::Display for Weighting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `ln Σ exp(v)`, stable; `-inf` for an empty slice or all `-inf`.
pub fn logsumexp(v: &[f64]) -> f64 {
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    if max == f64::INFINITY {
        return f64::INFINITY;
    }
    max + v.iter().map(|x| (x - max).exp()).sum::<f64>().ln()
}

/// Shifts `v` so that `logsumexp(v) == 0` (a log-distribution).
pub fn log_normalize(v: &mut [f64]) {
    let z = logsumexp(v);
    if z.is_finite() {
        v.iter_mut().for_each(|x| *x -= z);
    }
}

/// Log of a probability vector (zeros become `-inf`).
pub fn ln_all(p: &[f64]) -> Vec<f64> {
    p.iter().map(|&x| x.ln()).collect()
}

/// `exp` of a log vector.
pub fn exp_all(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| x.exp()).collect()
}

/// The ensemble's view of one block.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockMix {
    /// The mixture's log-probability of each target.
    pub logprobs: Vec<f64>,
    /// The domain posterior after the whole block (what the next position would use), as a
    /// log-distribution over the ELMs; under [`Weighting::Posterior`] it is
    /// `ln P(D | x_block)`.
    pub final_log_weights: Vec<f64>,
    /// The log-weights used at every target, `[target][elm]`, when requested.
    pub log_weights: Option<Vec<Vec<f64>>>,
}

/// Mixes one block. `lp[j]` holds ELM `j`'s log-probabilities of the block's targets (all of
/// one length); `log_prior` is a log-distribution over the same ELMs.
#[allow(clippy::needless_range_loop)] // `i` indexes every ELM's row
pub fn mix_block(
    lp: &[&[f64]],
    log_prior: &[f64],
    weighting: Weighting,
    keep_weights: bool,
) -> BlockMix {
    let e = lp.len();
    let len = lp.first().map_or(0, |l| l.len());
    debug_assert!(lp.iter().all(|l| l.len() == len) && log_prior.len() == e);
    let uniform = vec![-(e as f64).ln(); e];
    let mut prior = log_prior.to_vec();
    log_normalize(&mut prior);
    // State: unnormalised log-weights of the next position.
    let mut state: Vec<f64> = match weighting {
        Weighting::Posterior | Weighting::Prior => prior.clone(),
        Weighting::PrevToken | Weighting::Uniform => uniform.clone(),
    };
    let mut logprobs = Vec::with_capacity(len);
    let mut kept = keep_weights.then(|| Vec::with_capacity(len));
    let mut w = vec![0.0; e];
    let mut terms = vec![0.0; e];
    for i in 0..len {
        w.copy_from_slice(&state);
        log_normalize(&mut w);
        for j in 0..e {
            terms[j] = w[j] + lp[j][i];
        }
        logprobs.push(logsumexp(&terms));
        if let Some(k) = kept.as_mut() {
            k.push(w.clone());
        }
        match weighting {
            Weighting::Posterior => (0..e).for_each(|j| state[j] += lp[j][i]),
            Weighting::PrevToken => (0..e).for_each(|j| state[j] = prior[j] + lp[j][i]),
            Weighting::Prior | Weighting::Uniform => {}
        }
    }
    log_normalize(&mut state);
    BlockMix {
        logprobs,
        final_log_weights: state,
        log_weights: kept,
    }
}

/// Splits a stream's per-target values into its blocks: `block_targets[b]` values each.
fn block_ranges(block_targets: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut start = 0;
    block_targets
        .iter()
        .map(|&n| {
            let r = start..start + n;
            start += n;
            r
        })
        .collect()
}

/// The number of targets in each evaluation block of a stream of `len` tokens (see
/// [`crate::eval::blocks`]).
pub fn block_targets(len: usize, n_ctx: usize) -> Vec<usize> {
    crate::eval::blocks(len, n_ctx)
        .into_iter()
        .map(|(_, l)| l - 1)
        .collect()
}

/// Mixes a whole stream: `lp[j]` is ELM `j`'s [`crate::eval::token_logprobs`] output, cut into
/// blocks by `block_targets`. The posterior restarts at every block (each block is scored with
/// only its own prefix as context).
pub fn mix_stream(
    lp: &[Vec<f64>],
    block_targets: &[usize],
    log_prior: &[f64],
    weighting: Weighting,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(lp.first().map_or(0, Vec::len));
    for r in block_ranges(block_targets) {
        let views: Vec<&[f64]> = lp.iter().map(|l| &l[r.clone()]).collect();
        out.extend(mix_block(&views, log_prior, weighting, false).logprobs);
    }
    out
}

/// Settings of the cached-prior estimate (defaults: the released code's).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PriorConfig {
    /// Blocks per batch.
    pub batch_blocks: usize,
    /// Dev blocks used at most.
    pub max_blocks: usize,
    /// Exponential-moving-average weight of each new batch.
    pub alpha: f64,
}

impl Default for PriorConfig {
    fn default() -> Self {
        PriorConfig {
            batch_blocks: 16,
            max_blocks: 200,
            alpha: 0.3,
        }
    }
}

/// Estimates the cached prior `P(D)` of a target domain from its dev data, as the released
/// code does: the prior starts uniform; for each batch of blocks, the domain posterior at the
/// last position of each block (computed with the current prior) is averaged over the batch,
/// and the prior moves towards that average by an exponential moving average,
/// `prior <- (1 - alpha) * prior + alpha * mean_posterior`. Returns a probability vector.
pub fn estimate_prior(lp: &[Vec<f64>], block_targets: &[usize], cfg: &PriorConfig) -> Vec<f64> {
    let e = lp.len();
    let mut prior = vec![1.0 / e as f64; e];
    let ranges: Vec<_> = block_ranges(block_targets)
        .into_iter()
        .take(cfg.max_blocks)
        .collect();
    for batch in ranges.chunks(cfg.batch_blocks.max(1)) {
        let log_prior = ln_all(&prior);
        let mut mean = vec![0.0; e];
        for r in batch {
            let views: Vec<&[f64]> = lp.iter().map(|l| &l[r.clone()]).collect();
            let post = mix_block(&views, &log_prior, Weighting::Posterior, false).final_log_weights;
            for (m, p) in mean.iter_mut().zip(&post) {
                *m += p.exp() / batch.len() as f64;
            }
        }
        for (p, m) in prior.iter_mut().zip(&mean) {
            *p = (1.0 - cfg.alpha) * *p + cfg.alpha * m;
        }
        let s: f64 = prior.iter().sum();
        prior.iter_mut().for_each(|p| *p /= s);
    }
    prior
}

/// Keeps the `k` largest entries of a prior (ties go to the lower index), zeroes the rest and
/// renormalises. Returns `(elm index, weight)` in index order.
pub fn top_k(prior: &[f64], k: usize) -> Vec<(usize, f64)> {
    let mut idx: Vec<usize> = (0..prior.len()).collect();
    idx.sort_by(|&a, &b| prior[b].total_cmp(&prior[a]).then(a.cmp(&b)));
    idx.truncate(k.max(1));
    idx.sort_unstable();
    let total: f64 = idx.iter().map(|&i| prior[i]).sum();
    idx.into_iter()
        .map(|i| {
            (
                i,
                if total > 0.0 {
                    prior[i] / total
                } else {
                    1.0 / k.max(1) as f64
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logsumexp_is_stable() {
        assert!((logsumexp(&[-1000.0, -1000.0]) - (-1000.0 + 2f64.ln())).abs() < 1e-12);
        assert_eq!(logsumexp(&[]), f64::NEG_INFINITY);
        assert!((logsumexp(&[0.0, f64::NEG_INFINITY]) - 0.0).abs() < 1e-15);
    }

    #[test]
    fn top_k_keeps_the_largest_and_renormalises() {
        let t = top_k(&[0.1, 0.5, 0.15, 0.25], 2);
        assert_eq!(t.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
        assert!((t[0].1 - 0.5 / 0.75).abs() < 1e-15);
        assert_eq!(top_k(&[0.3, 0.3, 0.4], 1), vec![(2, 1.0)]);
    }

    #[test]
    fn prev_token_weights_start_uniform() {
        let a = [-1.0, -2.0, -3.0];
        let b = [-3.0, -2.0, -1.0];
        let m = mix_block(&[&a, &b], &ln_all(&[0.9, 0.1]), Weighting::PrevToken, true);
        let w = m.log_weights.unwrap();
        assert!((w[0][0].exp() - 0.5).abs() < 1e-12);
        // Position 1 uses prior * p(previous target).
        let expect = 0.9 * (-1.0f64).exp() / (0.9 * (-1.0f64).exp() + 0.1 * (-3.0f64).exp());
        assert!((w[1][0].exp() - expect).abs() < 1e-12);
    }
}
