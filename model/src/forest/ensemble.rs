//! Ensembling a forest: the ELMs' next-token distributions mixed by the domain posterior.
//!
//! Scoring works ELM by ELM: each selected ELM scores the whole stream
//! ([`crate::eval::token_logprobs`]), then [`posterior::mix_stream`] mixes the per-token
//! log-probabilities block by block. With a forest on disk ([`score_forest`],
//! [`cached_prior`]) only one ELM is in memory at a time, and with top-k only the `k` selected
//! ELMs run, so the cost grows with `k`, not with the forest's size. Generation
//! ([`Ensemble::generate`]) mixes the full next-token distributions.

use burn::module::Module;
use burn::tensor::Device;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::error::Error;
use super::manifest::Forest;
use super::posterior::{self, PriorConfig, Weighting};
use crate::eval::{self, EvalResult};
use crate::generate::{self, SampleConfig};
use crate::gpt::Gpt;
use crate::tokenizer::{EOT_ID, Tokenizer};

/// Every ELM's per-token log-probabilities of `tokens` (stream order, as
/// [`eval::token_logprobs`]).
pub fn elm_logprobs(
    models: &[&Gpt],
    tokens: &[u32],
    batch: usize,
    device: &Device,
) -> Result<Vec<Vec<f64>>, Error> {
    models
        .iter()
        .map(|m| eval::token_logprobs(m, tokens, batch, device).map_err(Error::from))
        .collect()
}

/// Per-token log-probabilities of `tokens` under the forest members `indices`, loading one
/// ELM at a time.
pub fn forest_logprobs(
    forest: &Forest,
    indices: &[usize],
    tokens: &[u32],
    batch: usize,
    device: &Device,
) -> Result<Vec<Vec<f64>>, Error> {
    indices
        .iter()
        .map(|&i| {
            let model = forest.load_elm(i, device)?;
            Ok(eval::token_logprobs(&model, tokens, batch, device)?)
        })
        .collect()
}

/// The cached prior of a target domain over every member of `forest`, estimated on its dev
/// tokens (see [`posterior::estimate_prior`]).
pub fn cached_prior(
    forest: &Forest,
    dev_tokens: &[u32],
    cfg: &PriorConfig,
    batch: usize,
    device: &Device,
) -> Result<Vec<f64>, Error> {
    if forest.elms.is_empty() {
        return Err(Error::Empty("estimate a prior over"));
    }
    let n_ctx = forest.architecture.n_ctx;
    // Only the blocks the estimate uses are scored.
    let limit = (cfg.max_blocks * n_ctx + 1).min(dev_tokens.len());
    let dev = &dev_tokens[..limit];
    let all: Vec<usize> = (0..forest.elms.len()).collect();
    let lp = forest_logprobs(forest, &all, dev, batch, device)?;
    Ok(posterior::estimate_prior(
        &lp,
        &posterior::block_targets(dev.len(), n_ctx),
        cfg,
    ))
}

/// Scores `tokens` with the ensemble of the forest members `selection` (`(index, prior)`
/// pairs, e.g. from [`posterior::top_k`]): only those ELMs run, one at a time.
pub fn score_forest(
    forest: &Forest,
    selection: &[(usize, f64)],
    tokens: &[u32],
    weighting: Weighting,
    batch: usize,
    device: &Device,
) -> Result<Vec<f64>, Error> {
    if selection.is_empty() {
        return Err(Error::Empty("ensemble"));
    }
    let indices: Vec<usize> = selection.iter().map(|s| s.0).collect();
    let prior =
        super::average::normalize_weights(&selection.iter().map(|s| s.1).collect::<Vec<_>>())?;
    let lp = forest_logprobs(forest, &indices, tokens, batch, device)?;
    let targets = posterior::block_targets(tokens.len(), forest.architecture.n_ctx);
    Ok(posterior::mix_stream(
        &lp,
        &targets,
        &posterior::ln_all(&prior),
        weighting,
    ))
}

/// ELMs held in memory with a prior over them and a weighting: an ensemble LM.
#[derive(Debug)]
pub struct Ensemble {
    members: Vec<Gpt>,
    log_prior: Vec<f64>,
    weighting: Weighting,
    device: Device,
}

impl Ensemble {
    /// An ensemble of `members` (one architecture) under `prior` (non-negative, normalised here).
    pub fn new(
        members: Vec<Gpt>,
        prior: &[f64],
        weighting: Weighting,
        device: &Device,
    ) -> Result<Self, Error> {
        let Some(first) = members.first() else {
            return Err(Error::Empty("ensemble"));
        };
        let cfg = first.config();
        if let Some(m) = members.iter().find(|m| m.config() != cfg) {
            return Err(Error::ArchitectureMismatch {
                elm: "(ensemble member)".into(),
                expected: cfg,
                found: m.config(),
            });
        }
        if prior.len() != members.len() {
            return Err(Error::BadWeights(format!(
                "{} prior entries for {} ELMs",
                prior.len(),
                members.len()
            )));
        }
        let prior = super::average::normalize_weights(prior)?;
        Ok(Ensemble {
            members: members.into_iter().map(|m| m.valid()).collect(),
            log_prior: posterior::ln_all(&prior),
            weighting,
            device: device.clone(),
        })
    }

    /// Loads the forest members a prior selects: all of them, or the `top_k` largest entries
    /// (renormalised). `prior` `None` means uniform. Returns the ensemble and the chosen indices.
    pub fn from_forest(
        forest: &Forest,
        prior: Option<&[f64]>,
        top_k: Option<usize>,
        weighting: Weighting,
        device: &Device,
    ) -> Result<(Self, Vec<usize>), Error> {
        let e = forest.elms.len();
        let uniform = vec![1.0 / e.max(1) as f64; e];
        let prior = prior.unwrap_or(&uniform);
        if prior.len() != e {
            return Err(Error::BadWeights(format!(
                "{} prior entries for {e} ELMs",
                prior.len()
            )));
        }
        let sel = posterior::top_k(prior, top_k.unwrap_or(e).min(e));
        let models = sel
            .iter()
            .map(|&(i, _)| forest.load_elm(i, device))
            .collect::<Result<Vec<_>, _>>()?;
        let w: Vec<f64> = sel.iter().map(|s| s.1).collect();
        Ok((
            Ensemble::new(models, &w, weighting, device)?,
            sel.into_iter().map(|s| s.0).collect(),
        ))
    }

    /// The number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether it has no members (never true for a constructed ensemble).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The mixture's log-probability of each token of `tokens` (i ≥ 1), scored on
    /// non-overlapping blocks exactly as [`eval::token_logprobs`] scores one model.
    pub fn token_logprobs(&self, tokens: &[u32], batch: usize) -> Result<Vec<f64>, Error> {
        let refs: Vec<&Gpt> = self.members.iter().collect();
        let lp = elm_logprobs(&refs, tokens, batch, &self.device)?;
        let n_ctx = self.members[0].config().n_ctx;
        Ok(posterior::mix_stream(
            &lp,
            &posterior::block_targets(tokens.len(), n_ctx),
            &self.log_prior,
            self.weighting,
        ))
    }

    /// Perplexity and bits per byte of the ensemble on a token stream.
    pub fn evaluate(
        &self,
        tok: Option<&Tokenizer>,
        tokens: &[u32],
        batch: usize,
    ) -> Result<EvalResult, Error> {
        if tokens.len() < 2 {
            return Err(crate::Error::Data("need at least two tokens to evaluate".into()).into());
        }
        let lp = self.token_logprobs(tokens, batch)?;
        Ok(EvalResult::from_logprobs(&lp, &tokens[1..], tok))
    }

    /// The log-weights state after reading `context` (unnormalised): what the next position uses.
    fn state_after(&self, context: &[u32]) -> Result<Vec<f64>, Error> {
        let e = self.members.len();
        let uniform = vec![-(e as f64).ln(); e];
        if context.len() < 2 {
            return Ok(match self.weighting {
                Weighting::Posterior | Weighting::Prior => self.log_prior.clone(),
                Weighting::PrevToken | Weighting::Uniform => uniform,
            });
        }
        Ok(match self.weighting {
            Weighting::Uniform => uniform,
            Weighting::Prior => self.log_prior.clone(),
            Weighting::Posterior | Weighting::PrevToken => {
                let mut state = self.log_prior.clone();
                for (j, m) in self.members.iter().enumerate() {
                    let lp = eval::token_logprobs(m, context, 8, &self.device)?;
                    state[j] += if self.weighting == Weighting::Posterior {
                        lp.iter().sum::<f64>()
                    } else {
                        lp.last().copied().unwrap_or(0.0)
                    };
                }
                state
            }
        })
    }

    /// The mixture's next-token log-distribution after `context` (full vocabulary).
    pub fn next_logprobs(&self, context: &[u32]) -> Result<Vec<f64>, Error> {
        let state = self.state_after(context)?;
        Ok(self.mix_next(context, &state)?.0)
    }

    /// Mixes the members' next-token log-distributions under the (unnormalised) log-weights
    /// `state`; also returns each member's distribution.
    fn mix_next(&self, context: &[u32], state: &[f64]) -> Result<(Vec<f64>, Vec<Vec<f64>>), Error> {
        let mut w = state.to_vec();
        posterior::log_normalize(&mut w);
        let per: Vec<Vec<f64>> = self
            .members
            .iter()
            .map(|m| {
                let logits = generate::next_logits(m, context, &self.device)?;
                let l: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
                let z = posterior::logsumexp(&l);
                Ok(l.into_iter().map(|x| x - z).collect())
            })
            .collect::<Result<_, Error>>()?;
        let vocab = per[0].len();
        let mut terms = vec![0.0; per.len()];
        let mix = (0..vocab)
            .map(|v| {
                for (j, p) in per.iter().enumerate() {
                    terms[j] = w[j] + p[v];
                }
                posterior::logsumexp(&terms)
            })
            .collect();
        Ok((mix, per))
    }

    /// Continues `prompt` by sampling from the mixture of the members' full next-token
    /// distributions; the domain posterior is updated after every token (over the whole
    /// history, also past the context window). Returns only the generated text.
    pub fn generate(
        &self,
        tok: &Tokenizer,
        prompt: &str,
        cfg: &SampleConfig,
    ) -> Result<String, Error> {
        let mut tokens = tok.encode(prompt)?;
        let start = tokens.len();
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut state = self.state_after(&tokens)?;
        for _ in 0..cfg.max_new_tokens {
            let (mix, per) = self.mix_next(&tokens, &state)?;
            let logits: Vec<f32> = mix.iter().map(|&x| x as f32).collect();
            let next = generate::sample(&logits, cfg, &mut rng);
            if next == EOT_ID {
                break;
            }
            if !tokens.is_empty() {
                for (j, p) in per.iter().enumerate() {
                    match self.weighting {
                        Weighting::Posterior => state[j] += p[next as usize],
                        Weighting::PrevToken => state[j] = self.log_prior[j] + p[next as usize],
                        Weighting::Prior | Weighting::Uniform => {}
                    }
                }
            }
            tokens.push(next);
        }
        Ok(tok.decode(&tokens[start..])?)
    }
}
