//! The compute-matched comparison of the paper, at laptop scale: a dense Transformer-LM, BTM
//! (seed + one ELM per training domain, used by ensembling and by parameter averaging), a
//! random-split ensemble, BTM without a seed phase and DEMix ([`crate::demix`], its row in
//! [`demix_row`]), all with the
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

pub mod demix_row;
pub mod plan;

pub use plan::{Config, Plan, SystemResult};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use self::plan::{ppl, result, train_once};
use crate::config::GptConfig;
use crate::data::{self, Corpus, DomainStream, EVAL_DOMAINS, Mixture, Split, TRAIN_DOMAINS};
use crate::files::TOKENIZER_FILE;
use crate::forest::average;
use crate::forest::branch::{self, OptimizerInit, Start};
use crate::forest::manifest::{InitKind, Parent};
use crate::forest::posterior::{self, PriorConfig, Weighting};
use crate::forest::{Error, Forest};
use crate::gpt::Gpt;
use crate::tokenizer::Tokenizer;
use crate::train::{StepStats, TrainConfig, Trainer};
use crate::{eval, fsutil, weights};

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

fn eval_model(model: &Gpt, data: &EvalData, device: &Device) -> Result<Vec<(String, f64)>, Error> {
    data.test
        .iter()
        .map(|(d, t)| Ok((d.clone(), ppl(&eval::token_logprobs(model, t, 8, device)?))))
        .collect()
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
        let m = average_model(forest, |j| prior[j], tmp, device)?;
        push(
            "average_posterior",
            ppl(&eval::token_logprobs(&m, t, 8, device)?),
        );
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
    let m = average_model(forest, |_| 1.0, tmp, device)?;
    out.push(result(
        &format!("{prefix}_average_uniform"),
        flops,
        1,
        &eval_model(&m, data, device)?,
    ));
    Ok((out, priors))
}

/// The parameter average of a forest's ELMs, ELM `j` with weight `weight(j)`, written to
/// `tmp/average.safetensors` and loaded.
fn average_model(
    forest: &Forest,
    weight: impl Fn(usize) -> f64,
    tmp: &Path,
    device: &Device,
) -> Result<Gpt, Error> {
    let members: Vec<(usize, f64)> = (0..forest.elms.len()).map(|j| (j, weight(j))).collect();
    let path = tmp.join("average.safetensors");
    average::average_members(forest, &members, &path)?;
    Ok(weights::load(&path, Some(&forest.architecture), device)?)
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

/// Runs the whole comparison in `out_dir`; `say` receives progress lines and `on_step` every
/// training update with the name of its run (`dense`, `seed`, `btm/<elm>`, `demix`, ...).
pub fn run(
    cfg: &Config,
    corpus: &Corpus,
    out_dir: &Path,
    device: &Device,
    say: &mut dyn FnMut(&str),
    on_step: &mut dyn FnMut(&str, &StepStats),
) -> Result<Report, Error> {
    let started = Instant::now();
    std::fs::create_dir_all(out_dir).map_err(|e| crate::Error::io(out_dir, e))?;
    let tok_path = out_dir.join(TOKENIZER_FILE);
    let tok = if tok_path.exists() {
        Tokenizer::load(&tok_path)?
    } else {
        say("training the tokenizer on the seed mix");
        let t =
            data::seed_mix_tokenizer(corpus, cfg.preset.config().vocab_size, cfg.tokenizer_bytes)?;
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
        let every = if cfg.curve_points > 0 {
            (plan.dense_steps / cfg.curve_points as u64).max(1)
        } else {
            u64::MAX
        };
        let mut points = Vec::new();
        while !t.finished() {
            on_step("dense", &t.step(&mix_all)?);
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
        branch::finish(&t, 0, &dense_dir)
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
                Start::Fresh(init()),
                &mix_all,
                seed_cfg,
                &seed_dir,
                device,
                |s| on_step("seed", s),
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

    // Trains a forest of one ELM per part (branched from the seed when `from_seed`) and scores
    // its systems; their training FLOPs include the seed's when it branched from it.
    let forest_rows = |name: &str,
                       elm_steps: u64,
                       from_seed: bool,
                       parts: &[(String, Vec<DomainStream>)],
                       say: &mut dyn FnMut(&str),
                       on_step: &mut dyn FnMut(&str, &StepStats)|
     -> Result<(Vec<SystemResult>, Vec<Vec<f64>>), Error> {
        let dir = out_dir.join(name);
        let mut forest = Forest::create(&dir, arch, &tok_path)?;
        if let (true, Some(s)) = (from_seed, &seed) {
            forest.set_seed(&s.weights)?;
        }
        let mut flops = 0.0;
        for (elm, part) in parts {
            let run_dir = dir.join(elm);
            let mix = mixture(part.clone(), cfg.seed)?;
            say(&format!("{name}/{elm}: {elm_steps} updates"));
            let run_name = format!("{name}/{elm}");
            let mut on_step = |s: &StepStats| on_step(&run_name, s);
            let trained = train_once(&run_dir, || match (&seed, from_seed) {
                (Some(_), true) if continuing => {
                    let c = TrainConfig {
                        schedule_steps: Some(plan.seed_steps + plan.elm_steps),
                        ..tc(plan.seed_steps + elm_steps)
                    };
                    branch::train(
                        Start::<Gpt>::Continue(&seed_dir),
                        &mix,
                        c,
                        &run_dir,
                        device,
                        &mut on_step,
                    )
                }
                (Some(s), true) => {
                    let m = weights::load(&s.weights, Some(&arch), device)?;
                    branch::train(
                        Start::Fresh(m),
                        &mix,
                        tc(elm_steps),
                        &run_dir,
                        device,
                        &mut on_step,
                    )
                }
                _ => branch::train(
                    Start::Fresh(init()),
                    &mix,
                    tc(elm_steps),
                    &run_dir,
                    device,
                    &mut on_step,
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
        let base = if from_seed { seed_flops } else { 0.0 };
        forest_systems(name, &forest, base + flops, &data, cfg, &tmp, device, say)
    };
    // Of the ablations' rows, the ensembles and the posterior-weighted average.
    let headline =
        |r: &SystemResult| r.name.ends_with("_ensemble") || r.name.ends_with("average_posterior");

    let domain_parts: Vec<(String, Vec<DomainStream>)> = streams
        .iter()
        .map(|s| (s.domain.clone(), vec![s.clone()]))
        .collect();
    // BTM: one ELM per training domain, branched from the seed, trained on its domain alone.
    let (mut rs, priors) = forest_rows("btm", plan.elm_steps, true, &domain_parts, say, on_step)?;
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
        let (rs, _) = forest_rows("random_split", plan.elm_steps, true, &named, say, on_step)?;
        systems.extend(rs.into_iter().filter(headline));
    }
    if cfg.no_seed && plan.seed_steps > 0 {
        let steps = plan.no_seed_elm_steps;
        let (rs, _) = forest_rows("no_seed", steps, false, &domain_parts, say, on_step)?;
        systems.extend(rs.into_iter().filter(headline));
    }
    if cfg.demix
        && let Some(r) = demix_row::system(
            cfg,
            &plan,
            &arch,
            &streams,
            &data.test,
            &data.dev,
            out_dir,
            device,
            say,
            &mut |s| on_step("demix", s),
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
