//! The compute-matched comparison of the paper, at laptop scale: a dense Transformer-LM, BTM
//! (seed + one ELM per training domain, used by ensembling and by parameter averaging), a
//! random-split ensemble, BTM without a seed phase and DEMix ([`crate::demix`]), all with the
//! same training FLOPs, scored
//! in domain (the 8 training domains' test splits) and out of domain (the 4 evaluation-only
//! domains).
//!
//! Compute matching follows the paper: with a total of `B` updates of one batch size, the dense
//! LM trains `B` updates; BTM's seed trains `s·B` (`s` = [`Config::seed_share`], 0.5 in the
//! paper) and each of the `E` ELMs `(1 - s)·B / E`, so seed + ELMs = `B` updates. Compute is
//! reported in training FLOPs ([`GptConfig::train_flops_per_token`] × tokens).
//!
//! Every training run lives in its own directory under the output directory and is skipped
//! when already finished (`trained.json`), so a killed experiment continues where it stopped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::average::{self, Input};
use super::branch::{self, OptimizerInit, Trained};
use super::manifest::{InitKind, Parent};
use super::posterior::{self, PriorConfig, Weighting};
use super::{Error, Forest};
use crate::config::{GptConfig, Preset};
use crate::data::{self, Corpus, DomainStream, EVAL_DOMAINS, Mixture, Split, TRAIN_DOMAINS};
use crate::gpt::Gpt;
use crate::tokenizer::{self, Tokenizer};
use crate::train::{TrainConfig, Trainer};
use crate::{eval, fsutil, weights};

/// Settings of an experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Architecture preset (every system has this architecture).
    #[serde(with = "preset_name")]
    pub preset: Preset,
    /// `B`: the dense LM's updates; every system gets the FLOPs of these.
    pub total_steps: u64,
    /// Fraction of the budget spent on the seed (the paper: 0.5).
    pub seed_share: f64,
    /// Blocks per update (the same for every run).
    pub batch_size: usize,
    /// Peak learning rate (every run: warm-up 8%, linear decay).
    pub lr: f64,
    /// What a branch does with the seed's optimiser.
    pub optimizer: OptimizerInit,
    /// Test tokens per domain.
    pub eval_tokens: usize,
    /// Dev blocks per domain for the cached prior (the released code uses about 200).
    pub prior_blocks: usize,
    /// k of the top-k ensemble.
    pub top_k: usize,
    /// Bytes of each training domain's train split to use (None: all).
    pub train_bytes: Option<usize>,
    /// Bytes per training domain for the tokenizer.
    pub tokenizer_bytes: usize,
    /// Seed of the initialisation, the data order and the random split.
    pub seed: u64,
    /// Also train the random-split ensemble.
    pub random_split: bool,
    /// Also train ELMs without a seed phase (branched from the random initialisation).
    pub no_seed: bool,
    /// Also train DEMix.
    pub demix: bool,
    /// Points of the dense LM's learning curve to evaluate (0: only the end).
    pub curve_points: usize,
}

impl Config {
    /// A smoke run of a few minutes on 2 cores.
    pub fn quick() -> Self {
        Config {
            preset: Preset::Tiny,
            total_steps: 160,
            seed_share: 0.5,
            batch_size: 4,
            lr: 2e-3,
            optimizer: OptimizerInit::Fresh,
            eval_tokens: 2048,
            prior_blocks: 8,
            top_k: 2,
            train_bytes: Some(400_000),
            tokenizer_bytes: 64 << 10,
            seed: 0,
            random_split: true,
            no_seed: true,
            demix: true,
            curve_points: 2,
        }
    }

    /// The default run: about an hour on 2 cores.
    pub fn standard() -> Self {
        Config {
            total_steps: 2400,
            batch_size: 8,
            eval_tokens: 16_384,
            prior_blocks: 100,
            train_bytes: None,
            tokenizer_bytes: 256 << 10,
            curve_points: 4,
            ..Config::quick()
        }
    }
}

/// The compute accounting of an experiment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// ELMs (one per training domain).
    pub n_elms: usize,
    /// Dense LM updates (`B`).
    pub dense_steps: u64,
    /// Seed updates (`s·B`).
    pub seed_steps: u64,
    /// Updates of each ELM (`(1 - s)·B / E`).
    pub elm_steps: u64,
    /// Updates of each ELM without a seed phase (`B / E`).
    pub no_seed_elm_steps: u64,
    /// Tokens per update.
    pub tokens_per_step: u64,
    /// Training FLOPs per token of the architecture.
    pub flops_per_token: f64,
}

impl Plan {
    /// The plan for `cfg` with `n_elms` ELMs and architecture `arch`.
    pub fn new(cfg: &Config, n_elms: usize, arch: &GptConfig) -> Result<Self, Error> {
        if !(0.0..1.0).contains(&cfg.seed_share) {
            return Err(crate::Error::Config("seed_share must be in [0, 1)".into()).into());
        }
        let e = n_elms.max(1) as u64;
        let seed_steps = (cfg.seed_share * cfg.total_steps as f64).round() as u64;
        let elm_steps = (cfg.total_steps - seed_steps) / e;
        if elm_steps == 0 {
            return Err(crate::Error::Config(format!(
                "{} updates leave none for {n_elms} ELMs after the seed's {seed_steps}",
                cfg.total_steps
            ))
            .into());
        }
        Ok(Plan {
            n_elms,
            dense_steps: cfg.total_steps,
            seed_steps,
            elm_steps,
            no_seed_elm_steps: cfg.total_steps / e,
            tokens_per_step: (cfg.batch_size * arch.n_ctx) as u64,
            flops_per_token: arch.train_flops_per_token(),
        })
    }

    /// Training FLOPs of `steps` updates.
    pub fn flops(&self, steps: u64) -> f64 {
        steps as f64 * self.tokens_per_step as f64 * self.flops_per_token
    }

    /// The dense LM's training FLOPs.
    pub fn dense_flops(&self) -> f64 {
        self.flops(self.dense_steps)
    }

    /// BTM's training FLOPs: the seed plus every ELM.
    pub fn btm_flops(&self) -> f64 {
        self.flops(self.seed_steps) + self.n_elms as f64 * self.flops(self.elm_steps)
    }
}

/// One system's scores.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SystemResult {
    /// Name (e.g. `btm_ensemble`).
    pub name: String,
    /// Training FLOPs spent on it (the seed included).
    pub train_flops: f64,
    /// Models run per token at inference.
    pub inference_models: usize,
    /// Test perplexity per training domain.
    pub in_domain: BTreeMap<String, f64>,
    /// Test perplexity per evaluation-only domain.
    pub out_domain: BTreeMap<String, f64>,
    /// Mean of `in_domain`.
    pub mean_in: f64,
    /// Mean of `out_domain`.
    pub mean_out: f64,
}

/// A point of a learning curve.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CurvePoint {
    /// System.
    pub system: String,
    /// Training FLOPs so far.
    pub flops: f64,
    /// Mean in-domain test perplexity.
    pub mean_in: f64,
    /// Mean out-of-domain test perplexity.
    pub mean_out: f64,
}

/// Everything an experiment measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The settings.
    pub config: Config,
    /// The architecture.
    pub architecture: GptConfig,
    /// Parameters per model.
    pub params: usize,
    /// The compute accounting.
    pub plan: Plan,
    /// Content id of the tokenizer.
    pub tokenizer_id: String,
    /// Every system, in the order they were scored.
    pub systems: Vec<SystemResult>,
    /// Learning curves (perplexity against training FLOPs).
    pub curves: Vec<CurvePoint>,
    /// The cached prior of each target domain over BTM's ELMs (in [`TRAIN_DOMAINS`] order).
    pub priors: BTreeMap<String, Vec<f64>>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The test and dev token streams of every domain.
struct EvalData {
    test: Vec<(String, Vec<u32>)>,
    dev: Vec<(String, Vec<u32>)>,
}

impl EvalData {
    fn load(
        corpus: &Corpus,
        tok: &Tokenizer,
        test_tokens: usize,
        dev_tokens: usize,
    ) -> Result<Self, Error> {
        let take = |d: &str, split: Split, n: usize| -> Result<Vec<u32>, Error> {
            let docs = corpus.documents(d, split)?;
            let (mut t, _) = data::tokenize_documents(tok, &docs, Some(n * 8))?;
            t.truncate(n + 1);
            Ok(t)
        };
        let all: Vec<&str> = TRAIN_DOMAINS
            .iter()
            .chain(EVAL_DOMAINS.iter())
            .copied()
            .collect();
        Ok(EvalData {
            test: all
                .iter()
                .map(|d| Ok((d.to_string(), take(d, Split::Test, test_tokens)?)))
                .collect::<Result<_, Error>>()?,
            dev: all
                .iter()
                .map(|d| Ok((d.to_string(), take(d, Split::Valid, dev_tokens)?)))
                .collect::<Result<_, Error>>()?,
        })
    }
}

fn is_train_domain(d: &str) -> bool {
    TRAIN_DOMAINS.contains(&d)
}

pub(crate) fn result(
    name: &str,
    train_flops: f64,
    inference_models: usize,
    ppl: &[(String, f64)],
) -> SystemResult {
    let mut r = SystemResult {
        name: name.to_string(),
        train_flops,
        inference_models,
        in_domain: BTreeMap::new(),
        out_domain: BTreeMap::new(),
        mean_in: f64::NAN,
        mean_out: f64::NAN,
    };
    for (d, p) in ppl {
        if is_train_domain(d) {
            r.in_domain.insert(d.clone(), *p);
        } else {
            r.out_domain.insert(d.clone(), *p);
        }
    }
    let mean = |m: &BTreeMap<String, f64>| m.values().sum::<f64>() / m.len().max(1) as f64;
    r.mean_in = mean(&r.in_domain);
    r.mean_out = mean(&r.out_domain);
    r
}

pub(crate) fn ppl(logprobs: &[f64]) -> f64 {
    (-logprobs.iter().sum::<f64>() / logprobs.len().max(1) as f64).exp()
}

fn eval_model(model: &Gpt, data: &EvalData, device: &Device) -> Result<Vec<(String, f64)>, Error> {
    data.test
        .iter()
        .map(|(d, t)| Ok((d.clone(), ppl(&eval::token_logprobs(model, t, 8, device)?))))
        .collect()
}

/// Runs `f` unless `dir/trained.json` says the run is done; records its result there.
pub(crate) fn train_once(
    dir: &Path,
    f: impl FnOnce() -> Result<Trained, Error>,
) -> Result<Trained, Error> {
    let marker = dir.join("trained.json");
    if let Ok(bytes) = std::fs::read(&marker)
        && let Ok(t) = serde_json::from_slice::<TrainedOnDisk>(&bytes)
        && dir.join(branch::WEIGHTS_FILE).exists()
    {
        return Ok(Trained {
            weights: dir.join(branch::WEIGHTS_FILE),
            id: t.id,
            record: t.record,
            losses: t.losses,
        });
    }
    let t = f()?;
    let on_disk = TrainedOnDisk {
        id: t.id.clone(),
        record: t.record,
        losses: t.losses.clone(),
    };
    fsutil::write_atomic(&marker, &serde_json::to_vec(&on_disk)?)?;
    Ok(t)
}

#[derive(Serialize, Deserialize)]
struct TrainedOnDisk {
    id: String,
    record: super::manifest::TrainRecord,
    losses: Vec<f32>,
}

/// A forest's ELMs scored on every domain: `test[d][j]`, `dev[d][j]` per-token log-probs.
struct ForestScores {
    test: Vec<Vec<Vec<f64>>>,
    dev: Vec<Vec<Vec<f64>>>,
}

fn score_forest(forest: &Forest, data: &EvalData, device: &Device) -> Result<ForestScores, Error> {
    let nd = data.test.len();
    let mut s = ForestScores {
        test: vec![Vec::new(); nd],
        dev: vec![Vec::new(); nd],
    };
    for j in 0..forest.elms.len() {
        let m = forest.load_elm(j, device)?;
        for (d, (_, t)) in data.test.iter().enumerate() {
            s.test[d].push(eval::token_logprobs(&m, t, 8, device)?);
        }
        for (d, (_, t)) in data.dev.iter().enumerate() {
            s.dev[d].push(eval::token_logprobs(&m, t, 8, device)?);
        }
    }
    Ok(s)
}

/// Scores a forest every way: ensembles (cached-prior posterior, top-k, previous-token, uniform)
/// and parameter averages (cached-prior weighted, uniform). Returns the results and the priors.
#[allow(clippy::too_many_arguments)]
fn forest_systems(
    prefix: &str,
    forest: &Forest,
    flops: f64,
    data: &EvalData,
    cfg: &Config,
    averages: bool,
    tmp: &Path,
    device: &Device,
    say: &mut dyn FnMut(&str),
) -> Result<(Vec<SystemResult>, Vec<Vec<f64>>), Error> {
    say(&format!(
        "{prefix}: scoring {} ELMs on {} domains",
        forest.elms.len(),
        data.test.len()
    ));
    let n_ctx = forest.architecture.n_ctx;
    let scores = score_forest(forest, data, device)?;
    let prior_cfg = PriorConfig {
        max_blocks: cfg.prior_blocks,
        ..PriorConfig::default()
    };
    let e = forest.elms.len();
    let mut priors = Vec::new();
    let mut rows: BTreeMap<&str, Vec<(String, f64)>> = BTreeMap::new();
    for (d, (name, t)) in data.test.iter().enumerate() {
        let dev_targets = posterior::block_targets(data.dev[d].1.len(), n_ctx);
        let prior = posterior::estimate_prior(&scores.dev[d], &dev_targets, &prior_cfg);
        let targets = posterior::block_targets(t.len(), n_ctx);
        let lp = &scores.test[d];
        let ln_prior = posterior::ln_all(&prior);
        let mut push = |k: &'static str, v: f64| rows.entry(k).or_default().push((name.clone(), v));
        push(
            "ensemble",
            ppl(&posterior::mix_stream(
                lp,
                &targets,
                &ln_prior,
                Weighting::Posterior,
            )),
        );
        let sel = posterior::top_k(&prior, cfg.top_k);
        let sel_lp: Vec<Vec<f64>> = sel.iter().map(|&(j, _)| lp[j].clone()).collect();
        let sel_prior: Vec<f64> = sel.iter().map(|s| s.1.ln()).collect();
        push(
            "ensemble_topk",
            ppl(&posterior::mix_stream(
                &sel_lp,
                &targets,
                &sel_prior,
                Weighting::Posterior,
            )),
        );
        push(
            "ensemble_prev_token",
            ppl(&posterior::mix_stream(
                lp,
                &targets,
                &ln_prior,
                Weighting::PrevToken,
            )),
        );
        push(
            "ensemble_uniform",
            ppl(&posterior::mix_stream(
                lp,
                &targets,
                &ln_prior,
                Weighting::Uniform,
            )),
        );
        if averages {
            let inputs: Vec<Input> = (0..e)
                .map(|j| Input {
                    path: forest.resolve(&forest.elms[j].weights),
                    weight: prior[j],
                    id: Some(forest.elms[j].weights.id.clone()),
                })
                .collect();
            let out = tmp.join("average.safetensors");
            average::average_files(&inputs, Some(&forest.architecture), &out)?;
            let m = weights::load(&out, Some(&forest.architecture), device)?;
            push(
                "average_posterior",
                ppl(&eval::token_logprobs(&m, t, 8, device)?),
            );
        }
        priors.push(prior);
    }
    let mut out = Vec::new();
    for (k, models) in [
        ("ensemble", e),
        ("ensemble_topk", cfg.top_k.min(e)),
        ("ensemble_prev_token", e),
        ("ensemble_uniform", e),
        ("average_posterior", 1),
    ] {
        if let Some(r) = rows.get(k) {
            out.push(result(&format!("{prefix}_{k}"), flops, models, r));
        }
    }
    if averages {
        let inputs: Vec<Input> = forest
            .elms
            .iter()
            .map(|el| Input {
                path: forest.resolve(&el.weights),
                weight: 1.0,
                id: Some(el.weights.id.clone()),
            })
            .collect();
        let path = tmp.join("average.safetensors");
        average::average_files(&inputs, Some(&forest.architecture), &path)?;
        let m = weights::load(&path, Some(&forest.architecture), device)?;
        out.push(result(
            &format!("{prefix}_average_uniform"),
            flops,
            1,
            &eval_model(&m, data, device)?,
        ));
    }
    Ok((out, priors))
}

fn mixture(streams: Vec<DomainStream>, seed: u64) -> Result<Mixture, Error> {
    Ok(Mixture::new(streams, seed)?)
}

/// Documents of every training domain dealt at random into `parts` parts (each part a
/// domain-balanced mixture of its share of every domain): the random-split baseline's data.
fn random_split(
    corpus: &Corpus,
    tok: &Tokenizer,
    parts: usize,
    max_bytes: Option<usize>,
    n_ctx: usize,
    seed: u64,
) -> Result<Vec<Vec<DomainStream>>, Error> {
    let mut out: Vec<Vec<DomainStream>> = (0..parts).map(|_| Vec::new()).collect();
    for (di, d) in TRAIN_DOMAINS.iter().enumerate() {
        let mut docs = corpus.documents(d, Split::Train)?;
        if let Some(m) = max_bytes {
            let mut used = 0;
            docs.retain(|doc| {
                let keep = used < m;
                used += doc.text.len() + 1;
                keep
            });
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (0x5eed_0000 + di as u64));
        docs.shuffle(&mut rng);
        for (p, part) in out.iter_mut().enumerate() {
            let mine: Vec<data::Document> = docs.iter().skip(p).step_by(parts).cloned().collect();
            let (tokens, _) = data::tokenize_documents(tok, &mine, None)?;
            part.push(DomainStream::new(format!("{d}#{p}"), tokens, n_ctx)?);
        }
    }
    Ok(out)
}

/// Runs the whole comparison in `out_dir`; `say` receives progress lines.
pub fn run(
    cfg: &Config,
    corpus: &Corpus,
    out_dir: &Path,
    device: &Device,
    progress: bool,
    say: &mut dyn FnMut(&str),
) -> Result<Report, Error> {
    let started = Instant::now();
    std::fs::create_dir_all(out_dir).map_err(|e| crate::Error::io(out_dir, e))?;
    let tok_path = out_dir.join("tokenizer.json");
    let tok = if tok_path.exists() {
        Tokenizer::load(&tok_path)?
    } else {
        say("training the tokenizer on the seed mix");
        let t =
            tokenizer::train_seed_mix(corpus, cfg.preset.config().vocab_size, cfg.tokenizer_bytes)?;
        t.save(&tok_path)?;
        t
    };
    let arch = cfg.preset.config().with_vocab(tok.vocab_size());
    let plan = Plan::new(cfg, TRAIN_DOMAINS.len(), &arch)?;
    say(&format!(
        "plan: dense {} updates; seed {} + {} ELMs x {} updates; {} tokens/update; {:.3e} FLOPs each",
        plan.dense_steps,
        plan.seed_steps,
        plan.n_elms,
        plan.elm_steps,
        plan.tokens_per_step,
        plan.dense_flops()
    ));
    say("tokenising the corpus");
    let streams = data::load_streams(
        corpus,
        &tok,
        &TRAIN_DOMAINS,
        Split::Train,
        arch.n_ctx,
        cfg.train_bytes,
    )?;
    let data = EvalData::load(corpus, &tok, cfg.eval_tokens, cfg.prior_blocks * arch.n_ctx)?;
    let init = || Gpt::init(&arch, cfg.seed, device);
    let tc = |steps: u64| TrainConfig {
        steps,
        batch_size: cfg.batch_size,
        lr: cfg.lr,
        seed: cfg.seed,
        checkpoint_every: 100,
        ..TrainConfig::default()
    };
    let tmp = out_dir.join("tmp");
    std::fs::create_dir_all(&tmp).map_err(|e| crate::Error::io(&tmp, e))?;
    let mut systems = Vec::new();
    let mut curves = Vec::new();

    // Dense Transformer-LM on the balanced mix, the whole budget, with a learning curve.
    let dense_dir = out_dir.join("dense");
    let mix_all = mixture(streams.clone(), cfg.seed)?;
    say(&format!(
        "dense: {} updates on the mix of {} domains",
        plan.dense_steps,
        TRAIN_DOMAINS.len()
    ));
    let dense = train_once(&dense_dir, || {
        let mut t = Trainer::new(init(), tc(plan.dense_steps), device, Some(&dense_dir))?;
        t.progress = progress;
        let every = if cfg.curve_points > 0 {
            (plan.dense_steps / cfg.curve_points as u64).max(1)
        } else {
            u64::MAX
        };
        let mut points = Vec::new();
        while !t.finished() {
            t.step(&mix_all)?;
            if t.state.step % every == 0 && !t.finished() {
                let r = result(
                    "dense",
                    t.state.flops,
                    1,
                    &eval_model(&t.model(), &data, device)?,
                );
                say(&format!(
                    "  dense at {} updates: in {:.2} out {:.2}",
                    t.state.step, r.mean_in, r.mean_out
                ));
                points.push(CurvePoint {
                    system: "dense".into(),
                    flops: r.train_flops,
                    mean_in: r.mean_in,
                    mean_out: r.mean_out,
                });
                t.save_checkpoint()?;
            }
        }
        t.save_checkpoint()?;
        fsutil::write_atomic(&dense_dir.join("curve.json"), &serde_json::to_vec(&points)?)?;
        let model = t.model();
        let path = dense_dir.join(branch::WEIGHTS_FILE);
        weights::save(&model, &path)?;
        Ok(Trained {
            id: crate::content_id(&std::fs::read(&path).map_err(|e| crate::Error::io(&path, e))?),
            weights: path,
            record: super::manifest::TrainRecord {
                steps: t.state.step,
                tokens: t.state.tokens,
                flops: t.state.flops,
            },
            losses: t.state.losses.clone(),
        })
    })?;
    if let Ok(bytes) = std::fs::read(dense_dir.join("curve.json")) {
        curves.extend(serde_json::from_slice::<Vec<CurvePoint>>(&bytes).unwrap_or_default());
    }
    let dense_model = weights::load(&dense.weights, Some(&arch), device)?;
    let r = result(
        "dense",
        dense.record.flops,
        1,
        &eval_model(&dense_model, &data, device)?,
    );
    say(&format!("dense: in {:.2} out {:.2}", r.mean_in, r.mean_out));
    curves.push(CurvePoint {
        system: "dense".into(),
        flops: r.train_flops,
        mean_in: r.mean_in,
        mean_out: r.mean_out,
    });
    systems.push(r);
    drop(dense_model);

    // The seed.
    let seed_dir = out_dir.join("seed");
    let continuing = cfg.optimizer == OptimizerInit::ContinueSeed;
    let seed_cfg = TrainConfig {
        schedule_steps: continuing.then_some(plan.seed_steps + plan.elm_steps),
        ..tc(plan.seed_steps)
    };
    let seed = if plan.seed_steps > 0 {
        say(&format!("seed: {} updates on the mix", plan.seed_steps));
        let s = train_once(&seed_dir, || {
            branch::train(
                init(),
                &mix_all,
                seed_cfg,
                &seed_dir,
                device,
                progress,
                |_| {},
            )
        })?;
        let m = weights::load(&s.weights, Some(&arch), device)?;
        let r = result("seed", s.record.flops, 1, &eval_model(&m, &data, device)?);
        say(&format!("seed: in {:.2} out {:.2}", r.mean_in, r.mean_out));
        curves.push(CurvePoint {
            system: "btm".into(),
            flops: r.train_flops,
            mean_in: r.mean_in,
            mean_out: r.mean_out,
        });
        systems.push(r);
        Some(s)
    } else {
        None
    };
    let seed_flops = seed.as_ref().map_or(0.0, |s| s.record.flops);

    // BTM: one ELM per training domain, branched from the seed, trained on its domain alone.
    let build_forest = |name: &str,
                        elm_steps: u64,
                        from_seed: bool,
                        parts: &[(String, Vec<DomainStream>)],
                        say: &mut dyn FnMut(&str)|
     -> Result<(Forest, f64), Error> {
        let dir = out_dir.join(name);
        let mut forest = Forest::create(&dir, arch, &tok_path)?;
        if let (true, Some(s)) = (from_seed, &seed) {
            forest.set_seed(&s.weights)?;
        }
        let mut flops = 0.0;
        for (elm, part) in parts {
            let run_dir = dir.join(elm);
            let data = mixture(part.clone(), cfg.seed)?;
            say(&format!("{name}/{elm}: {elm_steps} updates"));
            let trained = train_once(&run_dir, || match (&seed, from_seed) {
                (Some(_), true) if continuing => {
                    let c = TrainConfig {
                        schedule_steps: Some(plan.seed_steps + plan.elm_steps),
                        ..tc(plan.seed_steps + elm_steps)
                    };
                    branch::train_continuing(
                        &seed_dir,
                        &data,
                        c,
                        &run_dir,
                        device,
                        progress,
                        |_| {},
                    )
                }
                (Some(s), true) => {
                    let m = weights::load(&s.weights, Some(&arch), device)?;
                    branch::train(m, &data, tc(elm_steps), &run_dir, device, progress, |_| {})
                }
                _ => branch::train(
                    init(),
                    &data,
                    tc(elm_steps),
                    &run_dir,
                    device,
                    progress,
                    |_| {},
                ),
            })?;
            flops += trained.record.flops;
            let (init_kind, parents) = match (&seed, from_seed) {
                (Some(s), true) => (
                    InitKind::Seed,
                    vec![Parent {
                        name: "seed".into(),
                        id: s.id.clone(),
                        weight: 1.0,
                    }],
                ),
                _ => (InitKind::Random, vec![]),
            };
            let domains = part.iter().map(|p| p.domain.clone()).collect();
            forest.add(
                elm,
                domains,
                &trained.weights,
                &tok.id(),
                init_kind,
                parents,
                Some(trained.record),
            )?;
        }
        forest.save()?;
        Ok((forest, flops))
    };

    let domain_parts: Vec<(String, Vec<DomainStream>)> = streams
        .iter()
        .map(|s| (s.domain.clone(), vec![s.clone()]))
        .collect();
    let (btm, btm_flops) = build_forest("btm", plan.elm_steps, true, &domain_parts, say)?;
    let (mut rs, priors) = forest_systems(
        "btm",
        &btm,
        seed_flops + btm_flops,
        &data,
        cfg,
        true,
        &tmp,
        device,
        say,
    )?;
    if let Some(r) = rs.first() {
        curves.push(CurvePoint {
            system: "btm".into(),
            flops: r.train_flops,
            mean_in: r.mean_in,
            mean_out: r.mean_out,
        });
    }
    systems.append(&mut rs);

    if cfg.random_split {
        let parts = random_split(
            corpus,
            &tok,
            TRAIN_DOMAINS.len(),
            cfg.train_bytes,
            arch.n_ctx,
            cfg.seed,
        )?;
        let named: Vec<(String, Vec<DomainStream>)> = parts
            .into_iter()
            .enumerate()
            .map(|(i, p)| (format!("split{i}"), p))
            .collect();
        let (f, fl) = build_forest("random_split", plan.elm_steps, true, &named, say)?;
        let (rs, _) = forest_systems(
            "random_split",
            &f,
            seed_flops + fl,
            &data,
            cfg,
            true,
            &tmp,
            device,
            say,
        )?;
        systems
            .extend(rs.into_iter().filter(|r| {
                r.name.ends_with("_ensemble") || r.name.ends_with("average_posterior")
            }));
    }
    if cfg.no_seed && plan.seed_steps > 0 {
        let (f, fl) = build_forest("no_seed", plan.no_seed_elm_steps, false, &domain_parts, say)?;
        let (rs, _) = forest_systems("no_seed", &f, fl, &data, cfg, true, &tmp, device, say)?;
        systems
            .extend(rs.into_iter().filter(|r| {
                r.name.ends_with("_ensemble") || r.name.ends_with("average_posterior")
            }));
    }
    if cfg.demix
        && let Some(r) = crate::demix::experiment_system(
            cfg, &plan, &arch, &streams, &data.test, &data.dev, out_dir, device, progress, say,
        )?
    {
        systems.push(r);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let report = Report {
        config: cfg.clone(),
        architecture: arch,
        params: arch.num_params(),
        plan,
        tokenizer_id: tok.id(),
        systems,
        curves,
        priors: TRAIN_DOMAINS
            .iter()
            .chain(EVAL_DOMAINS.iter())
            .zip(priors)
            .map(|(d, p)| (d.to_string(), p))
            .collect(),
        seconds: started.elapsed().as_secs_f64(),
    };
    fsutil::write_atomic(
        &out_dir.join("results.json"),
        &serde_json::to_vec_pretty(&report)?,
    )?;
    fsutil::write_atomic(&out_dir.join("results.md"), markdown(&report).as_bytes())?;
    Ok(report)
}

/// The Markdown tables of a report: a summary (mean perplexities, compute) and per-domain
/// perplexities.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let c = &r.config;
    s.push_str(&format!(
        "Preset `{}` ({} parameters, n_ctx {}), budget {} updates of {} tokens ({:.3e} training FLOPs), seed share {:.0}%, \
         ELMs {} x {} updates, optimiser at branch: {:?}, {} test tokens per domain, cached prior from {} dev blocks, top-k k = {}. \
         Wall clock {:.0} s.\n\n",
        c.preset,
        r.params,
        r.architecture.n_ctx,
        r.plan.dense_steps,
        r.plan.tokens_per_step,
        r.plan.dense_flops(),
        100.0 * c.seed_share,
        r.plan.n_elms,
        r.plan.elm_steps,
        c.optimizer,
        c.eval_tokens,
        c.prior_blocks,
        c.top_k,
        r.seconds
    ));
    s.push_str("| system | train FLOPs | models run / token | in-domain ppl (mean of 8) | out-of-domain ppl (mean of 4) |\n");
    s.push_str("|---|---:|---:|---:|---:|\n");
    for x in &r.systems {
        s.push_str(&format!(
            "| {} | {:.3e} | {} | {:.2} | {:.2} |\n",
            x.name, x.train_flops, x.inference_models, x.mean_in, x.mean_out
        ));
    }
    let domains: Vec<&String> = r
        .systems
        .first()
        .map(|x| x.in_domain.keys().chain(x.out_domain.keys()).collect())
        .unwrap_or_default();
    s.push_str("\nPer-domain test perplexity (the last four are never trained on):\n\n| system |");
    for d in &domains {
        s.push_str(&format!(" {d} |"));
    }
    s.push_str("\n|---|");
    s.push_str(&"---:|".repeat(domains.len()));
    s.push('\n');
    for x in &r.systems {
        s.push_str(&format!("| {} |", x.name));
        for d in &domains {
            let v = x
                .in_domain
                .get(*d)
                .or_else(|| x.out_domain.get(*d))
                .copied()
                .unwrap_or(f64::NAN);
            s.push_str(&format!(" {v:.2} |"));
        }
        s.push('\n');
    }
    s
}

/// Where an experiment writes its report files.
pub fn report_paths(out_dir: &Path) -> [PathBuf; 3] {
    [
        out_dir.join("results.json"),
        out_dir.join("results.md"),
        out_dir.join("results.png"),
    ]
}

/// `Preset` as its command-line name in JSON.
mod preset_name {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::config::Preset;

    pub fn serialize<S: Serializer>(p: &Preset, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(p.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Preset, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
