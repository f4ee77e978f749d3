//! ELM verification, apart from sockets: the checks every node applies to an ELM record, in
//! order, stopping at the first failure (`specs/network.md`, "Verification"):
//!
//! 1. the record: trainer's signature, a domain of the trusted registry, the seed's architecture
//!    id and tokenizer id ([`check_record`]);
//! 2. the weights: downloaded and hash-verified against the record's weights id (the download
//!    verifies every chunk; [`verify`] hashes the bytes once more);
//! 3. the architecture in the weights file (`btm.config`) is the seed's;
//! 4. the tensors: exactly the expected names, shapes and dtype, every value finite;
//! 5. quality: perplexity re-measured on the domain's registry validation data agrees with the
//!    claim within the domain's tolerance, and is lower than the seed's on the same tokens.

use std::collections::HashMap;

use btm_model::GptConfig;
use btm_model::gpt::Gpt;
use btm_model::tokenizer::Tokenizer;
use btm_protocol::{
    Architecture, ContentId, ElmRecord, Registry, SeedManifest, Signed, milli_to_ppl,
};
use btm_registry::Reject;
use burn::tensor::Device;

/// Why an ELM was rejected (or could not be verified), by step.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Failure {
    /// Step 1: signature, domain, or the seed's architecture/tokenizer ids.
    #[error("record: {0}")]
    Record(#[from] Reject),
    /// Step 2: the weights could not be obtained or do not hash to the record's id.
    #[error("weights download: {0}")]
    Download(String),
    /// Step 3: the weights file's architecture is not the seed's.
    #[error("architecture: {0}")]
    Architecture(String),
    /// Step 4: names, shapes, dtype or non-finite values.
    #[error("weights: {0}")]
    Weights(String),
    /// Step 5: the claimed perplexity is not what we measure.
    #[error(
        "claimed perplexity {claimed:.3} but measured {measured:.3} (tolerance {tolerance_ppm} ppm)"
    )]
    FalseClaim {
        claimed: f64,
        measured: f64,
        tolerance_ppm: u32,
    },
    /// Step 5: no better than the seed on its own domain.
    #[error("perplexity {measured:.3} is not below the seed's {seed:.3} on its domain")]
    WorseThanSeed { measured: f64, seed: f64 },
    /// Acceptance: on the maintainers' withheld pool the ELM does not beat the seed by the
    /// registry's margin.
    #[error(
        "on withheld data perplexity {withheld:.3} is not {margin_ppm} ppm below the seed's {seed:.3}"
    )]
    NoGainOnWithheld {
        withheld: f64,
        seed: f64,
        margin_ppm: u32,
    },
    /// Acceptance: far better on the public `valid` split than on withheld data, relative to
    /// the seed (trained on, or memorised, the public split).
    #[error(
        "withheld perplexity {withheld:.3} is {ratio:.3}x the public one {public:.3}, relative to the seed's ratio (at most {max:.3}x): memorised the public split"
    )]
    Memorised {
        withheld: f64,
        public: f64,
        ratio: f64,
        max: f64,
    },
    /// Our side failed (unreadable validation data, a tokenizer that does not load): no verdict.
    #[error("cannot verify: {0}")]
    Local(String),
}

/// The figures acceptance rests on: perplexities of the ELM on the public `valid` split and on
/// windows sampled afresh from the withheld pool, and the seed's on the same windows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WithheldCheck {
    pub public_ppl: f64,
    pub withheld_ppl: f64,
    pub seed_public_ppl: f64,
    pub seed_withheld_ppl: f64,
    /// Tokens scored on the withheld pool.
    pub tokens: u64,
}

impl WithheldCheck {
    /// How much better the ELM does on the public split than on the withheld pool, relative to
    /// the seed: `(withheld / public) / (seed withheld / seed public)`. About 1 for an ELM that
    /// never saw either (the two sets may differ in difficulty, which the seed's ratio takes
    /// out); well above 1 for one trained on, or memorising, the public split.
    pub fn memorisation(&self) -> f64 {
        (self.withheld_ppl / self.public_ppl) / (self.seed_withheld_ppl / self.seed_public_ppl)
    }
}

/// Acceptance's rule, alone (specs/network.md, "Acceptance"): the ELM's withheld perplexity is
/// below the seed's by `min_gain_ppm` (strictly below when 0), and its
/// [`WithheldCheck::memorisation`] at most `max_memorisation_ppm / 1e6`.
pub fn judge_withheld(eval: &btm_protocol::EvalSettings, c: &WithheldCheck) -> Result<(), Failure> {
    let margin = f64::from(eval.min_gain_ppm) / 1e6;
    let bound = c.seed_withheld_ppl * (1.0 - margin);
    if !c.withheld_ppl.is_finite() || c.withheld_ppl >= bound {
        return Err(Failure::NoGainOnWithheld {
            withheld: c.withheld_ppl,
            seed: c.seed_withheld_ppl,
            margin_ppm: eval.min_gain_ppm,
        });
    }
    let max = f64::from(eval.max_memorisation_ppm) / 1e6;
    let ratio = c.memorisation();
    if !ratio.is_finite() || ratio > max {
        return Err(Failure::Memorised {
            withheld: c.withheld_ppl,
            public: c.public_ppl,
            ratio,
            max,
        });
    }
    Ok(())
}

impl Failure {
    /// Whether this is a verdict about the ELM (reject it) rather than a local problem.
    pub fn is_verdict(&self) -> bool {
        !matches!(self, Failure::Local(_) | Failure::Download(_))
    }
}

/// What verification measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    pub ppl: f64,
    pub seed_ppl: f64,
    pub tokens: u64,
}

/// Step 1.
pub fn check_record(registry: &Registry, envelope: &Signed<ElmRecord>) -> Result<(), Failure> {
    crate::validate::check_elm_record(registry, envelope).map_err(Failure::Record)
}

/// The model configuration of a protocol architecture.
pub fn config_of(a: &Architecture) -> GptConfig {
    GptConfig {
        vocab_size: a.vocab_size as usize,
        n_ctx: a.context as usize,
        d_model: a.d_model as usize,
        n_heads: a.heads as usize,
        n_layers: a.layers as usize,
    }
}

/// Everything verification needs about the seed, loaded once, and the per-domain caches.
pub struct Verifier {
    device: Device,
    seed: SeedManifest,
    config: GptConfig,
    tokenizer: Tokenizer,
    seed_model: Gpt,
    /// Scored tokens per (validation data id, max tokens).
    tokens: HashMap<(ContentId, u64), Vec<u32>>,
    /// Seed perplexity per (validation data id, block size, max tokens).
    seed_ppl: HashMap<(ContentId, u32, u64), f64>,
    batch: usize,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("seed", &self.seed.weights)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Loads the seed (weights and tokenizer bytes, already hash-verified by the download).
    pub fn new(
        seed: &SeedManifest,
        seed_weights: &[u8],
        tokenizer_json: &[u8],
        device: Device,
    ) -> Result<Verifier, Failure> {
        if ContentId::of(seed_weights) != seed.weights {
            return Err(Failure::Local(
                "seed weights do not match the registry".into(),
            ));
        }
        if ContentId::of(tokenizer_json) != seed.tokenizer {
            return Err(Failure::Local(
                "tokenizer does not match the registry".into(),
            ));
        }
        let config = config_of(&seed.architecture);
        let tokenizer =
            Tokenizer::from_bytes(tokenizer_json).map_err(|e| Failure::Local(e.to_string()))?;
        if tokenizer.vocab_size() != config.vocab_size {
            return Err(Failure::Local(format!(
                "tokenizer has {} tokens, the seed {}",
                tokenizer.vocab_size(),
                config.vocab_size
            )));
        }
        let (cfg, tensors) = btm_model::weights::parse(seed_weights, Some(&config))
            .map_err(|e| Failure::Local(format!("seed weights: {e}")))?;
        let seed_model = btm_model::weights::from_named_tensors(&cfg, tensors, &device)
            .map_err(|e| Failure::Local(format!("seed weights: {e}")))?;
        Ok(Verifier {
            device,
            seed: seed.clone(),
            config,
            tokenizer,
            seed_model,
            tokens: HashMap::new(),
            seed_ppl: HashMap::new(),
            batch: 8,
        })
    }

    /// The seed this verifier scores against.
    pub fn seed(&self) -> &SeedManifest {
        &self.seed
    }

    /// The validation tokens of a domain: documents of the data blob (JSONL, optionally
    /// zstd-compressed), tokenised with the seed's tokenizer, the first `max_eval_tokens + 1`.
    pub fn eval_tokens(
        &mut self,
        data_id: ContentId,
        data: &[u8],
        max_eval_tokens: u64,
    ) -> Result<Vec<u32>, Failure> {
        if let Some(t) = self.tokens.get(&(data_id, max_eval_tokens)) {
            return Ok(t.clone());
        }
        if ContentId::of(data) != data_id {
            return Err(Failure::Local(
                "validation data does not match its id".into(),
            ));
        }
        let docs = parse_documents(data).map_err(Failure::Local)?;
        let (mut tokens, _) = btm_model::data::tokenize_documents(&self.tokenizer, &docs, None)
            .map_err(|e| Failure::Local(e.to_string()))?;
        tokens.truncate(usize::try_from(max_eval_tokens.saturating_add(1)).unwrap_or(usize::MAX));
        if tokens.len() < 2 {
            return Err(Failure::Local(
                "validation data has fewer than two tokens".into(),
            ));
        }
        self.tokens
            .insert((data_id, max_eval_tokens), tokens.clone());
        Ok(tokens)
    }

    /// Perplexity on `windows` of `tokens`: one contiguous window is scored in blocks
    /// ([`perplexity`]); spread windows each on its own.
    fn windows_perplexity(
        &self,
        model: &Gpt,
        tokens: &[u32],
        windows: &[std::ops::Range<usize>],
        block_size: u32,
    ) -> Result<f64, Failure> {
        if let [w] = windows {
            return perplexity(
                model,
                &tokens[w.clone()],
                block_size,
                self.batch,
                &self.device,
            );
        }
        let mut nll = 0.0;
        let mut n = 0usize;
        for w in windows {
            let lp = btm_model::eval::token_logprobs(model, &tokens[w.clone()], 1, &self.device)
                .map_err(|e| Failure::Local(e.to_string()))?;
            nll -= lp.iter().sum::<f64>();
            n += lp.len();
        }
        if n == 0 {
            return Err(Failure::Local("nothing to score".into()));
        }
        Ok((nll / n as f64).exp())
    }

    /// Acceptance's measurement (maintainers only): checks the weights as [`Verifier::measure`]
    /// does and scores them on the public `valid` split and on windows of the withheld pool
    /// (`withheld`, which must hash to the registry's commitment), sampled afresh from
    /// `sample_seed`: as many windows of `block_size + 1` tokens as `max_eval_tokens` allows,
    /// at random positions. The seed is scored on the same windows.
    pub fn measure_withheld(
        &mut self,
        registry: &Registry,
        domain: &str,
        weights: &[u8],
        valid_data: &[u8],
        withheld: &[u8],
        sample_seed: u64,
    ) -> Result<WithheldCheck, Failure> {
        use rand::{Rng, SeedableRng};
        let d = domain_of(registry, domain)?;
        let ev = d.eval;
        let Some(commitment) = ev.withheld else {
            return Err(Failure::Local(format!(
                "the registry commits to no withheld pool for {domain}"
            )));
        };
        if ContentId::of(withheld) != commitment {
            return Err(Failure::Local(
                "the withheld pool does not match the registry's commitment".into(),
            ));
        }
        let model = self.load_checked(weights)?;
        let public = self.measure_loaded(&d, &model, valid_data)?;
        // All of the pool's tokens, tokenised once per verifier.
        let pool = self.eval_tokens(commitment, withheld, u64::MAX)?;
        let block = (ev.block_size as usize).clamp(1, self.config.n_ctx);
        if pool.len() < block + 1 {
            return Err(Failure::Local(format!(
                "the withheld pool has {} tokens, fewer than one window of {}",
                pool.len(),
                block + 1
            )));
        }
        let windows = (usize::try_from(ev.max_eval_tokens).unwrap_or(usize::MAX) / block).max(1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(sample_seed);
        let starts: Vec<usize> = (0..windows)
            .map(|_| rng.random_range(0..=pool.len() - block - 1))
            .collect();
        let score = |m: &Gpt| -> Result<f64, Failure> {
            let mut nll = 0.0;
            let mut n = 0usize;
            for &s in &starts {
                let lp =
                    btm_model::eval::token_logprobs(m, &pool[s..s + block + 1], 1, &self.device)
                        .map_err(|e| Failure::Local(e.to_string()))?;
                nll -= lp.iter().sum::<f64>();
                n += lp.len();
            }
            Ok((nll / n.max(1) as f64).exp())
        };
        Ok(WithheldCheck {
            public_ppl: public.ppl,
            seed_public_ppl: public.seed_ppl,
            withheld_ppl: score(&model)?,
            seed_withheld_ppl: score(&self.seed_model)?,
            tokens: (starts.len() * block) as u64,
        })
    }

    /// Steps 2-5 for a record that passed step 1, given its weights bytes and the domain's
    /// validation data bytes.
    pub fn verify(
        &mut self,
        registry: &Registry,
        envelope: &Signed<ElmRecord>,
        weights: &[u8],
        valid_data: &[u8],
    ) -> Result<Measured, Failure> {
        let e = envelope.record();
        // 2. The bytes are the record's weights.
        if ContentId::of(weights) != e.weights {
            return Err(Failure::Download(
                "weights do not hash to the record's weights id".into(),
            ));
        }
        let m = self.measure(registry, &e.domain, weights, valid_data)?;
        let tolerance = registry
            .domain(&e.domain)
            .map_or(0, |d| d.eval.ppl_tolerance_ppm);
        judge(e.claimed_valid_ppl_milli, tolerance, &m)?;
        Ok(m)
    }

    /// Steps 3-5 without the judgement: checks the weights and measures their perplexity (and
    /// the seed's) on `domain`'s validation data. Trainers use this to make their claim.
    pub fn measure(
        &mut self,
        registry: &Registry,
        domain: &str,
        weights: &[u8],
        valid_data: &[u8],
    ) -> Result<Measured, Failure> {
        let domain = domain_of(registry, domain)?;
        let model = self.load_checked(weights)?;
        self.measure_loaded(&domain, &model, valid_data)
    }

    /// Steps 3-4: the architecture in the file is the seed's; names, shapes, dtype and finite
    /// values; the model, loaded.
    fn load_checked(&self, weights: &[u8]) -> Result<Gpt, Failure> {
        let file_config = read_config(weights).map_err(Failure::Architecture)?;
        if file_config != self.config {
            return Err(Failure::Architecture(format!(
                "the file holds {file_config:?}, the seed is {:?}",
                self.config
            )));
        }
        let (cfg, tensors) = btm_model::weights::parse(weights, Some(&self.config))
            .map_err(|e| Failure::Weights(e.to_string()))?;
        btm_model::weights::from_named_tensors(&cfg, tensors, &self.device)
            .map_err(|e| Failure::Weights(e.to_string()))
    }

    /// Step 5's measurement: `model` and the seed on `domain`'s validation data.
    fn measure_loaded(
        &mut self,
        domain: &btm_protocol::Domain,
        model: &Gpt,
        valid_data: &[u8],
    ) -> Result<Measured, Failure> {
        let ev = domain.eval;
        let all = self.eval_tokens(domain.valid, valid_data, u64::MAX)?;
        let block = (ev.block_size as usize).clamp(1, self.config.n_ctx);
        let windows = scored_windows(all.len(), block, ev.max_eval_tokens);
        let key = (domain.valid, ev.block_size, ev.max_eval_tokens);
        let seed_ppl = match self.seed_ppl.get(&key) {
            Some(p) => *p,
            None => {
                let p = self.windows_perplexity(&self.seed_model, &all, &windows, ev.block_size)?;
                self.seed_ppl.insert(key, p);
                p
            }
        };
        let measured = self.windows_perplexity(model, &all, &windows, ev.block_size)?;
        Ok(Measured {
            ppl: measured,
            seed_ppl,
            tokens: windows.iter().map(|w| w.len() as u64 - 1).sum(),
        })
    }
}

/// Step 5's rule, alone: the claim must be within `tolerance_ppm` (relative to the claim) of
/// the measurement, and the measurement strictly below the seed's.
pub fn judge(claimed_milli: u64, tolerance_ppm: u32, m: &Measured) -> Result<(), Failure> {
    let claimed = milli_to_ppl(claimed_milli);
    let tol = f64::from(tolerance_ppm) / 1e6;
    if !m.ppl.is_finite() || (m.ppl - claimed).abs() > tol * claimed + 5e-4 {
        return Err(Failure::FalseClaim {
            claimed,
            measured: m.ppl,
            tolerance_ppm,
        });
    }
    if m.ppl >= m.seed_ppl {
        return Err(Failure::WorseThanSeed {
            measured: m.ppl,
            seed: m.seed_ppl,
        });
    }
    Ok(())
}

/// The token ranges of a `valid` split of `n` tokens that the quality check scores: the whole
/// split when it has at most `max_eval_tokens + 1` tokens (one range, scored in blocks);
/// otherwise `max(1, max_eval_tokens / block)` windows of `block + 1` tokens spread evenly over
/// it, the first at its start and the last at its end, so that the score represents the
/// whole split and not its first few documents (specs/network.md, section 7).
pub fn scored_windows(n: usize, block: usize, max_eval_tokens: u64) -> Vec<std::ops::Range<usize>> {
    let block = block.max(1);
    let max = usize::try_from(max_eval_tokens).unwrap_or(usize::MAX);
    if n < 2 {
        return Vec::new();
    }
    if n <= max.saturating_add(1) || n < block + 1 {
        return std::iter::once(0..n).collect();
    }
    let k = (max / block).max(1);
    let last = n - block - 1;
    (0..k)
        .map(|i| {
            let start = if k == 1 {
                0
            } else {
                ((i as u128 * last as u128) / (k as u128 - 1)) as usize
            };
            start..start + block + 1
        })
        .collect()
}

/// Perplexity of `model` on `tokens` in non-overlapping blocks of `min(block_size, n_ctx)`
/// predicted tokens. On the windows of [`scored_windows`], this is what trainers must report
/// as `claimed_valid_ppl_milli`.
pub fn perplexity(
    model: &Gpt,
    tokens: &[u32],
    block_size: u32,
    batch: usize,
    device: &Device,
) -> Result<f64, Failure> {
    let n_ctx = model.config().n_ctx;
    let block = (block_size as usize).clamp(1, n_ctx);
    let lp = if block == n_ctx {
        btm_model::eval::token_logprobs(model, tokens, batch, device)
            .map_err(|e| Failure::Local(e.to_string()))?
    } else {
        let mut all = Vec::with_capacity(tokens.len());
        let mut start = 0;
        while start + 1 < tokens.len() {
            let end = (start + block + 1).min(tokens.len());
            all.extend(
                btm_model::eval::token_logprobs(model, &tokens[start..end], 1, device)
                    .map_err(|e| Failure::Local(e.to_string()))?,
            );
            start += block;
        }
        all
    };
    if lp.is_empty() {
        return Err(Failure::Local("nothing to score".into()));
    }
    let nll = -lp.iter().sum::<f64>() / lp.len() as f64;
    Ok(nll.exp())
}

/// The registry's domain named `name`, or `UnknownDomain`.
fn domain_of(registry: &Registry, name: &str) -> Result<btm_protocol::Domain, Failure> {
    registry
        .domain(name)
        .cloned()
        .ok_or_else(|| Failure::Record(Reject::UnknownDomain(name.to_string())))
}

/// The `btm.config` metadata of a safetensors file.
fn read_config(bytes: &[u8]) -> Result<GptConfig, String> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| format!("not a safetensors file: {e}"))?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("btm.config"))
        .ok_or("metadata entry btm.config is missing")?;
    serde_json::from_str(json).map_err(|e| format!("btm.config: {e}"))
}

/// Most bytes of validation data after decompression.
pub const MAX_DATA_BYTES: u64 = btm_model::data::MAX_SPLIT_BYTES;

/// JSONL documents from a data blob (zstd-compressed if it starts with the zstd magic).
pub fn parse_documents(data: &[u8]) -> Result<Vec<btm_model::data::Document>, String> {
    use std::io::Read;
    let text = if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let mut out = Vec::new();
        zstd::Decoder::new(data)
            .map_err(|e| e.to_string())?
            .take(MAX_DATA_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| format!("zstd: {e}"))?;
        if out.len() as u64 > MAX_DATA_BYTES {
            return Err(format!("validation data is over {MAX_DATA_BYTES} bytes"));
        }
        out
    } else {
        data.to_vec()
    };
    let text = String::from_utf8(text).map_err(|_| "validation data is not UTF-8".to_string())?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_tolerance_and_seed() {
        let m = Measured {
            ppl: 100.0,
            seed_ppl: 200.0,
            tokens: 10,
        };
        assert!(judge(100_500, 10_000, &m).is_ok());
        assert!(matches!(
            judge(90_000, 10_000, &m),
            Err(Failure::FalseClaim { .. })
        ));
        let worse = Measured {
            seed_ppl: 99.0,
            ..m
        };
        assert!(matches!(
            judge(100_000, 10_000, &worse),
            Err(Failure::WorseThanSeed { .. })
        ));
        let nan = Measured { ppl: f64::NAN, ..m };
        assert!(judge(100_000, 10_000, &nan).is_err());
    }

    #[test]
    fn scored_windows_cover_a_short_split_whole_and_spread_over_a_long_one() {
        // At most max + 1 tokens: the whole split, one range (scored in blocks).
        assert_eq!(
            scored_windows(100, 16, 99),
            std::iter::once(0..100).collect::<Vec<_>>()
        );
        assert_eq!(
            scored_windows(1, 16, 99),
            Vec::<std::ops::Range<usize>>::new()
        );
        // Longer: max / block windows of block + 1 tokens from the start to the end.
        let w = scored_windows(10_000, 16, 64);
        assert_eq!(w.len(), 4);
        assert_eq!(w[0], 0..17);
        assert_eq!(w[3], 10_000 - 17..10_000);
        assert!(w.iter().all(|r| r.len() == 17));
        assert!(w.windows(2).all(|p| p[1].start > p[0].end));
        // One window when max < block.
        assert_eq!(
            scored_windows(10_000, 16, 8),
            std::iter::once(0..17).collect::<Vec<_>>()
        );
    }
}
