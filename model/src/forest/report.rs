//! The forest report: per domain, the perplexity of the seed, of every ELM (the ELM x domain
//! matrix, which shows forgetting and the best single ELM for each domain), of the ensemble
//! under the domain's cached prior, and of the posterior-weighted and uniform averages.

use std::collections::BTreeMap;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use super::average;
use super::ensemble::{self, Ensemble};
use super::error::Error;
use super::manifest::Forest;
use super::posterior::{PriorConfig, Weighting};
use crate::data::{self, Corpus, Split};
use crate::eval;
use crate::gpt::Gpt;
use crate::tokenizer::Tokenizer;
use crate::weights;

/// Blocks scored at once.
const BATCH: usize = 8;

/// What a report scores.
#[derive(Debug, Clone)]
pub struct ReportConfig {
    /// The domains (rows).
    pub domains: Vec<String>,
    /// The split scored.
    pub split: Split,
    /// Tokens per domain.
    pub max_tokens: usize,
    /// Dev blocks (of the `valid` split) for each domain's cached prior.
    pub prior_blocks: usize,
}

/// Perplexities of one domain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReportRow {
    /// The domain.
    pub domain: String,
    /// The seed's perplexity.
    pub seed: f64,
    /// ELM name -> perplexity.
    pub elms: BTreeMap<String, f64>,
    /// The best ELM trained on this domain, if any.
    pub own_elm: Option<f64>,
    /// The ensemble under the domain's cached prior.
    pub ensemble: f64,
    /// The ensemble of the ELMs and the seed under the domain's cached prior over all of them
    /// ([`Forest::with_seed_member`]).
    #[serde(default = "nan")]
    pub ensemble_with_seed: f64,
    /// The parameter average weighted by the domain's cached prior.
    pub average_posterior: f64,
    /// The uniform parameter average.
    pub average_uniform: f64,
}

fn nan() -> f64 {
    f64::NAN
}

/// A whole report: one row per domain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForestReport {
    /// The split scored.
    pub split: String,
    /// Tokens per domain.
    pub tokens_per_domain: usize,
    /// The ELMs, in forest order.
    pub elms: Vec<String>,
    /// One row per domain.
    pub rows: Vec<ReportRow>,
}

/// The scorings a report makes, for a progress bar: per domain, the ensemble, the ensemble
/// with the seed, every ELM, the seed and the two averages.
pub fn scorings(forest: &Forest, domains: usize) -> u64 {
    (domains * (forest.elms.len() + 5)) as u64
}

impl ForestReport {
    /// Scores the forest on `cfg.domains`, each read from the first of `corpora` that holds
    /// its split. `progress` hears the name of each scoring before it starts (as many as
    /// [`scorings`]).
    pub fn measure(
        forest: &Forest,
        tok: &Tokenizer,
        corpora: &[Corpus],
        cfg: &ReportConfig,
        device: &Device,
        mut progress: impl FnMut(String),
    ) -> Result<ForestReport, Error> {
        let seed = forest.seed.as_ref().ok_or(Error::NoSeed("report on"))?;
        let seed_model = weights::load(&forest.resolve(seed), Some(&forest.architecture), device)?;
        let with_seed = forest.with_seed_member()?;
        let elm_models = (0..forest.elms.len())
            .map(|i| forest.load_elm(i, device))
            .collect::<Result<Vec<_>, _>>()?;
        let average = |weights: &[f64]| -> Result<Gpt, Error> {
            let members: Vec<(&Gpt, f64)> =
                elm_models.iter().zip(weights.iter().copied()).collect();
            average::average_models(&members, device)
        };
        let uniform = average(&vec![1.0; elm_models.len()])?;
        let ppl = |m: &Gpt, t: &[u32]| -> Result<f64, Error> {
            Ok(eval::evaluate(m, None, t, BATCH, device)?.perplexity)
        };
        let n_ctx = forest.architecture.n_ctx;
        let mut rows = Vec::new();
        for d in &cfg.domains {
            let corpus = corpora
                .iter()
                .find(|c| c.path(d, cfg.split).is_ok() && c.path(d, Split::Valid).is_ok())
                .or(corpora.first())
                .ok_or(Error::Model(crate::Error::Config(
                    "a report needs a corpus".into(),
                )))?;
            let docs = corpus.documents(d, cfg.split)?;
            let (mut test, _) = data::tokenize_documents(tok, &docs, Some(cfg.max_tokens * 8))?;
            test.truncate(cfg.max_tokens + 1);
            let dev_docs = corpus.documents(d, Split::Valid)?;
            let (dev, _) =
                data::tokenize_documents(tok, &dev_docs, Some(cfg.prior_blocks * n_ctx * 8))?;
            let prior_cfg = PriorConfig {
                max_blocks: cfg.prior_blocks,
                ..PriorConfig::default()
            };
            let prior = ensemble::cached_prior(forest, &dev, &prior_cfg, BATCH, device)?;
            let (ens, _) =
                Ensemble::from_forest(forest, Some(&prior), None, Weighting::Posterior, device)?;
            progress(format!("{d}: ensemble"));
            let ensemble_ppl = ens.evaluate(None, &test, BATCH)?.perplexity;
            drop(ens);
            let prior_s = ensemble::cached_prior(&with_seed, &dev, &prior_cfg, BATCH, device)?;
            let (ens, _) = Ensemble::from_forest(
                &with_seed,
                Some(&prior_s),
                None,
                Weighting::Posterior,
                device,
            )?;
            progress(format!("{d}: ensemble with the seed"));
            let ensemble_with_seed = ens.evaluate(None, &test, BATCH)?.perplexity;
            drop(ens);
            let post = average(&prior)?;
            let mut elms = BTreeMap::new();
            let mut own = None;
            for (e, m) in forest.elms.iter().zip(&elm_models) {
                progress(format!("{d}: ELM {}", e.name));
                let p = ppl(m, &test)?;
                if e.domains.iter().any(|x| x == d) {
                    own = Some(own.map_or(p, |o: f64| o.min(p)));
                }
                elms.insert(e.name.clone(), p);
            }
            progress(format!("{d}: seed"));
            let seed = ppl(&seed_model, &test)?;
            progress(format!("{d}: posterior-weighted average"));
            let average_posterior = ppl(&post, &test)?;
            progress(format!("{d}: uniform average"));
            let average_uniform = ppl(&uniform, &test)?;
            rows.push(ReportRow {
                domain: d.clone(),
                seed,
                elms,
                own_elm: own,
                ensemble: ensemble_ppl,
                ensemble_with_seed,
                average_posterior,
                average_uniform,
            });
        }
        Ok(ForestReport {
            split: cfg.split.to_string(),
            tokens_per_domain: cfg.max_tokens,
            elms: forest.names().iter().map(ToString::to_string).collect(),
            rows,
        })
    }

    /// The report as a Markdown table: one row per domain, the best value in bold.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "Perplexity on the {} split ({} tokens per domain; lower is better)\n\n| domain | seed |",
            self.split, self.tokens_per_domain
        );
        for e in &self.elms {
            s.push_str(&format!(" ELM {e} |"));
        }
        s.push_str(" ensemble | ensemble + seed | avg (posterior) | avg (uniform) |\n|---|---:|");
        for _ in &self.elms {
            s.push_str("---:|");
        }
        s.push_str("---:|---:|---:|---:|\n");
        for row in &self.rows {
            let mut vals = vec![row.seed];
            vals.extend(
                self.elms
                    .iter()
                    .map(|e| row.elms.get(e).copied().unwrap_or(f64::NAN)),
            );
            vals.extend([
                row.ensemble,
                row.ensemble_with_seed,
                row.average_posterior,
                row.average_uniform,
            ]);
            let best = vals
                .iter()
                .copied()
                .filter(|v| v.is_finite())
                .fold(f64::INFINITY, f64::min);
            s.push_str(&format!("| {} |", row.domain));
            for v in vals {
                if v == best {
                    s.push_str(&format!(" **{v:.2}** |"));
                } else {
                    s.push_str(&format!(" {v:.2} |"));
                }
            }
            s.push('\n');
        }
        for (what, own) in [
            ("the forest's domains", true),
            ("domains no ELM trained on", false),
        ] {
            let rows: Vec<&ReportRow> = self
                .rows
                .iter()
                .filter(|r| r.own_elm.is_some() == own)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let mean = |f: fn(&ReportRow) -> f64| {
                rows.iter().map(|r| f(r)).sum::<f64>() / rows.len() as f64
            };
            s.push_str(&format!(
                "\nMean over {what} ({}): seed {:.2}, ensemble {:.2} ({:.2}x the seed), ensemble + seed {:.2} ({:.2}x), avg (posterior) {:.2}.\n",
                rows.len(),
                mean(|r| r.seed),
                mean(|r| r.ensemble),
                mean(|r| r.ensemble) / mean(|r| r.seed),
                mean(|r| r.ensemble_with_seed),
                mean(|r| r.ensemble_with_seed) / mean(|r| r.seed),
                mean(|r| r.average_posterior),
            ));
        }
        s
    }
}
