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
pub mod seeds;

pub use plan::{Config, Plan, Protocol, SystemResult};

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
use crate::train::{CHECKPOINT_FILE, StepStats, TrainConfig, Trainer};
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
    /// The same with the seed as a ninth member (last), when it was measured.
    #[serde(default)]
    pub seed_member_priors: BTreeMap<String, Vec<f64>>,
    /// Test perplexity of each member alone on each domain: `elm_matrix[domain][member]`,
    /// the members being BTM's ELMs, `seed` and `dense`.
    #[serde(default)]
    pub elm_matrix: BTreeMap<String, BTreeMap<String, f64>>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The test and dev token streams of every domain.
struct EvalData {
    test: Vec<(String, Vec<u32>)>,
    dev: Vec<(String, Vec<u32>)>,
}

impl EvalData {
    /// The bundled corpus's training and evaluation-only domains, then every domain of each
    /// of `extra` (names must not repeat).
    fn load(
        corpus: &Corpus,
        extra: &[PathBuf],
        tok: &Tokenizer,
        test_tokens: usize,
        dev_tokens: usize,
        n_ctx: usize,
    ) -> Result<Self, Error> {
        let mut all: Vec<(Corpus, String)> = TRAIN_DOMAINS
            .iter()
            .chain(EVAL_DOMAINS.iter())
            .map(|d| (corpus.clone(), d.to_string()))
            .collect();
        for dir in extra {
            let c = Corpus::new(dir);
            let domains = c.domains()?;
            if domains.is_empty() {
                return Err(crate::Error::Config(format!(
                    "the evaluation corpus {} has no domains (directories holding valid.jsonl[.zst] and test.jsonl[.zst])",
                    dir.display()
                ))
                .into());
            }
            for d in domains {
                if all.iter().any(|(_, x)| *x == d) {
                    return Err(crate::Error::Config(format!(
                        "the domain {d:?} of {} is already evaluated; rename its directory",
                        dir.display()
                    ))
                    .into());
                }
                all.push((c.clone(), d));
            }
        }
        let take = |c: &Corpus, d: &str, split: Split, n: usize| -> Result<Vec<u32>, Error> {
            let docs = c.documents(d, split)?;
            let (mut t, _) = data::tokenize_documents(tok, &docs, Some(n * 8))?;
            t.truncate(n + 1);
            if t.len() < n_ctx + 1 {
                return Err(crate::Error::Data(format!(
                    "the {split} split of {d:?} has {} tokens, fewer than one block of {}",
                    t.len(),
                    n_ctx + 1
                ))
                .into());
            }
            Ok(t)
        };
        let mut data = EvalData {
            test: Vec::new(),
            dev: Vec::new(),
        };
        for (c, d) in &all {
            data.test
                .push((d.clone(), take(c, d, Split::Test, test_tokens)?));
            data.dev
                .push((d.clone(), take(c, d, Split::Valid, dev_tokens)?));
        }
        Ok(data)
    }

    /// `v[i]` keyed by the `i`-th domain.
    fn by_domain<T>(&self, v: Vec<T>) -> BTreeMap<String, T> {
        self.test.iter().map(|(d, _)| d.clone()).zip(v).collect()
    }
}

fn eval_model(model: &Gpt, data: &EvalData, device: &Device) -> Result<Vec<(String, f64)>, Error> {
    data.test
        .iter()
        .map(|(d, t)| Ok((d.clone(), ppl(&eval::token_logprobs(model, t, 8, device)?))))
        .collect()
}

/// Members' per-token log-probs on every domain: `test[d][j]`, `dev[d][j]`, with the weights
/// file of member `j` in `files[j]`.
#[derive(Clone)]
struct MemberScores {
    names: Vec<String>,
    files: Vec<PathBuf>,
    test: Vec<Vec<Vec<f64>>>,
    dev: Vec<Vec<Vec<f64>>>,
}

impl MemberScores {
    fn new(n_domains: usize) -> Self {
        MemberScores {
            names: Vec::new(),
            files: Vec::new(),
            test: vec![Vec::new(); n_domains],
            dev: vec![Vec::new(); n_domains],
        }
    }

    /// Scores one more member, `model` (from `file`), on every domain.
    fn push(
        &mut self,
        name: &str,
        file: &Path,
        model: &Gpt,
        data: &EvalData,
        device: &Device,
    ) -> Result<(), Error> {
        for (d, (_, t)) in data.test.iter().enumerate() {
            self.test[d].push(eval::token_logprobs(model, t, 8, device)?);
        }
        for (d, (_, t)) in data.dev.iter().enumerate() {
            self.dev[d].push(eval::token_logprobs(model, t, 8, device)?);
        }
        self.names.push(name.to_string());
        self.files.push(file.to_path_buf());
        Ok(())
    }

    fn of_forest(forest: &Forest, data: &EvalData, device: &Device) -> Result<Self, Error> {
        let mut s = MemberScores::new(data.test.len());
        for (j, elm) in forest.elms.iter().enumerate() {
            let m = forest.load_elm(j, device)?;
            s.push(&elm.name, &forest.resolve(&elm.weights), &m, data, device)?;
        }
        Ok(s)
    }
}

/// Scores a set of members every way: ensembles (cached-prior posterior, top-k, previous-token,
/// uniform) and parameter averages (cached-prior weighted, and uniform when `uniform_average`).
/// Returns the results and the cached priors of every domain.
#[allow(clippy::too_many_arguments)]
fn forest_systems(
    prefix: &str,
    scores: &MemberScores,
    arch: &GptConfig,
    flops: f64,
    data: &EvalData,
    cfg: &Config,
    top_ks: &[usize],
    uniform_average: bool,
    tmp: &Path,
    device: &Device,
    say: &mut dyn FnMut(&str),
) -> Result<(Vec<SystemResult>, Vec<Vec<f64>>), Error> {
    let e = scores.files.len();
    say(&format!(
        "{prefix}: {e} members on {} domains",
        data.test.len()
    ));
    let n_ctx = arch.n_ctx;
    let prior_cfg = PriorConfig {
        max_blocks: cfg.prior_blocks,
        ..PriorConfig::default()
    };
    let mut priors = Vec::new();
    let mut rows: BTreeMap<String, (usize, Vec<(String, f64)>)> = BTreeMap::new();
    for (d, (name, t)) in data.test.iter().enumerate() {
        let dev_targets = posterior::block_targets(data.dev[d].1.len(), n_ctx);
        let prior = posterior::estimate_prior(&scores.dev[d], &dev_targets, &prior_cfg);
        let targets = posterior::block_targets(t.len(), n_ctx);
        let lp = &scores.test[d];
        let ln_prior = posterior::ln_all(&prior);
        let mut push = |k: String, models: usize, v: f64| {
            rows.entry(k)
                .or_insert_with(|| (models, Vec::new()))
                .1
                .push((name.clone(), v))
        };
        let mix = |w: Weighting| ppl(&posterior::mix_stream(lp, &targets, &ln_prior, w));
        push("ensemble".into(), e, mix(Weighting::Posterior));
        for &k in top_ks {
            let sel = posterior::top_k(&prior, k);
            let sel_lp: Vec<Vec<f64>> = sel.iter().map(|&(j, _)| lp[j].clone()).collect();
            let sel_prior: Vec<f64> = sel.iter().map(|s| s.1.ln()).collect();
            let v = ppl(&posterior::mix_stream(
                &sel_lp,
                &targets,
                &sel_prior,
                Weighting::Posterior,
            ));
            let row = if k == cfg.top_k {
                "ensemble_topk".to_string()
            } else {
                format!("ensemble_top{k}")
            };
            push(row, k.min(e), v);
        }
        push("ensemble_prev_token".into(), e, mix(Weighting::PrevToken));
        push("ensemble_uniform".into(), e, mix(Weighting::Uniform));
        let m = average_model(&scores.files, &prior, arch, tmp, device)?;
        push(
            "average_posterior".into(),
            1,
            ppl(&eval::token_logprobs(&m, t, 8, device)?),
        );
        priors.push(prior);
    }
    let mut order: Vec<String> = vec!["ensemble".into(), "ensemble_topk".into()];
    order.extend(
        top_ks
            .iter()
            .filter(|&&k| k != cfg.top_k)
            .map(|k| format!("ensemble_top{k}")),
    );
    order.extend(
        [
            "ensemble_prev_token",
            "ensemble_uniform",
            "average_posterior",
        ]
        .map(String::from),
    );
    let mut out = Vec::new();
    for k in order {
        if let Some((models, r)) = rows.get(&k) {
            out.push(result(&format!("{prefix}_{k}"), flops, *models, r));
        }
    }
    if uniform_average {
        let m = average_model(&scores.files, &vec![1.0; e], arch, tmp, device)?;
        out.push(result(
            &format!("{prefix}_average_uniform"),
            flops,
            1,
            &eval_model(&m, data, device)?,
        ));
    }
    Ok((out, priors))
}

/// The parameter average of weights files `files[j]` with weights `w[j]`, written to
/// `tmp/average.safetensors` and loaded.
fn average_model(
    files: &[PathBuf],
    w: &[f64],
    arch: &GptConfig,
    tmp: &Path,
    device: &Device,
) -> Result<Gpt, Error> {
    let inputs: Vec<average::Input> = files
        .iter()
        .zip(w)
        .map(|(path, &weight)| average::Input {
            path: path.clone(),
            weight,
            id: None,
        })
        .collect();
    let path = tmp.join("average.safetensors");
    average::average_files(&inputs, Some(arch), &path)?;
    Ok(weights::load(&path, Some(arch), device)?)
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

/// The report in `out_dir/results.json` when that run is finished with the settings `cfg`;
/// an error when it holds a report of other settings.
fn finished_report(out_dir: &Path, cfg: &Config) -> Result<Option<Report>, Error> {
    let path = out_dir.join("results.json");
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(None);
    };
    let report: Report = serde_json::from_slice(&bytes).map_err(|e| {
        crate::Error::Config(format!(
            "{} is not an experiment report ({e}); move it away to rerun",
            path.display()
        ))
    })?;
    if &report.config != cfg {
        return Err(crate::Error::Config(format!(
            "{} holds a finished run with other settings; use another output directory",
            path.display()
        ))
        .into());
    }
    Ok(Some(report))
}

/// One ELM-to-be: its name, its data, where in that data it starts and its domains.
struct Part {
    name: String,
    data: Mixture,
    data_offset: u64,
    domains: Vec<String>,
}

impl Part {
    /// One domain's stream alone, read from its start.
    fn alone(s: &DomainStream, seed: u64) -> Result<Self, Error> {
        Ok(Part {
            name: s.domain.clone(),
            data: mixture(vec![s.clone()], seed)?,
            data_offset: 0,
            domains: vec![s.domain.clone()],
        })
    }
}

/// Writes the seed of the update-matched protocol: `t`'s weights (`model.safetensors`) and
/// its whole training state (`checkpoint.safetensors`: Adam moments, update count and data
/// position) into `seed_dir`, for the ELMs to continue.
fn snapshot_seed(t: &Trainer, seed_dir: &Path) -> Result<branch::Trained, Error> {
    std::fs::create_dir_all(seed_dir).map_err(|e| crate::Error::io(seed_dir, e))?;
    t.write_checkpoint(&seed_dir.join(CHECKPOINT_FILE))?;
    branch::finish(t, 0, seed_dir)
}

/// Runs the whole comparison in `out_dir`; `say` receives progress lines and `on_step` every
/// training update with the name of its run (`dense`, `seed`, `btm/<elm>`, `demix`, ...). A
/// finished run (`results.json` with the same settings) is returned as it is.
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
    if let Some(r) = finished_report(out_dir, cfg)? {
        say(&format!(
            "{}: finished before, with these settings",
            out_dir.display()
        ));
        return Ok(r);
    }
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
    let update_matched = cfg.protocol == Protocol::UpdateMatched;
    let continuing = cfg.optimizer == OptimizerInit::ContinueSeed;
    say(&format!(
        "plan ({}): dense {} updates of {} blocks; seed {} updates{}; {} ELMs x {} updates of {} blocks; {:.3e} FLOPs each",
        cfg.protocol.name(),
        plan.dense_steps,
        plan.batch_size,
        plan.seed_steps,
        if update_matched {
            " (the dense run's checkpoint)"
        } else {
            ""
        },
        plan.n_elms,
        plan.elm_steps,
        plan.elm_batch_size,
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
    let data = EvalData::load(
        corpus,
        &cfg.eval_corpora,
        &tok,
        cfg.eval_tokens,
        cfg.prior_blocks * arch.n_ctx,
        arch.n_ctx,
    )?;
    let init = || Gpt::init(&arch, cfg.seed, device);
    let tc = |steps: u64, batch_size: usize| TrainConfig {
        steps,
        batch_size,
        lr: cfg.lr,
        seed: cfg.seed,
        checkpoint_every: 100,
        ..TrainConfig::default()
    };
    let tmp = out_dir.join("tmp");
    std::fs::create_dir_all(&tmp).map_err(|e| crate::Error::io(&tmp, e))?;
    let mut systems = Vec::new();
    let mut curves = Vec::new();

    // Dense Transformer-LM on the balanced mix, the whole budget, with a learning curve. In
    // the update-matched protocol its checkpoint at s·B is the seed.
    let dense_dir = out_dir.join("dense");
    let seed_dir = out_dir.join("seed");
    let mix_all = mixture(streams.clone(), cfg.seed)?;
    let seed_from_dense = update_matched && plan.seed_steps > 0;
    say(&format!(
        "dense: {} updates on the mix of {} domains",
        plan.dense_steps,
        TRAIN_DOMAINS.len()
    ));
    let dense = train_once(&dense_dir, || {
        let mut t = Trainer::new(
            init(),
            tc(plan.dense_steps, cfg.batch_size),
            device,
            Some(&dense_dir),
        )?;
        let every = if cfg.curve_points > 0 {
            (plan.dense_steps / cfg.curve_points as u64).max(1)
        } else {
            u64::MAX
        };
        let curve_file = dense_dir.join("curve.json");
        let mut points: Vec<CurvePoint> = std::fs::read(&curve_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        points.retain(|p| p.flops <= t.state.flops);
        while !t.finished() {
            on_step("dense", &t.step(&mix_all)?);
            if seed_from_dense && t.state.step == plan.seed_steps {
                train_once(&seed_dir, || snapshot_seed(&t, &seed_dir))?;
            }
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
                fsutil::write_atomic(&curve_file, &serde_json::to_vec(&points)?)?;
                t.save_checkpoint()?;
            }
        }
        t.save_checkpoint()?;
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
    let dense_ppl: BTreeMap<String, f64> = r
        .in_domain
        .iter()
        .chain(&r.out_domain)
        .chain(&r.extra_domain)
        .map(|(d, p)| (d.clone(), *p))
        .collect();
    systems.push(r);
    drop(dense_model);

    // The seed: the dense run's checkpoint (update-matched), or a run of its own.
    let seed = if plan.seed_steps == 0 {
        None
    } else if seed_from_dense {
        Some(train_once(&seed_dir, || {
            Err(crate::Error::Checkpoint(format!(
                "the dense run in {} finished without its checkpoint at update {} (the seed); delete it to rerun",
                dense_dir.display(),
                plan.seed_steps
            ))
            .into())
        })?)
    } else {
        let seed_cfg = TrainConfig {
            schedule_steps: continuing.then_some(plan.seed_steps + plan.elm_steps),
            ..tc(plan.seed_steps, cfg.batch_size)
        };
        say(&format!("seed: {} updates on the mix", plan.seed_steps));
        Some(train_once(&seed_dir, || {
            branch::train(
                Start::Fresh(init()),
                &mix_all,
                seed_cfg,
                &seed_dir,
                device,
                |s| on_step("seed", s),
            )
        })?)
    };
    let seed_flops = seed.as_ref().map_or(0.0, |s| s.record.flops);
    let seed_model = match &seed {
        Some(s) => {
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
            Some(m)
        }
        None => None,
    };

    // Trains one ELM per part (branched from the seed when `from_seed`) into the forest
    // `out_dir/name`; returns the forest and its training FLOPs (the seed's included when the
    // ELMs branched from it).
    let train_forest = |name: &str,
                        from_seed: bool,
                        parts: &[Part],
                        say: &mut dyn FnMut(&str),
                        on_step: &mut dyn FnMut(&str, &StepStats)|
     -> Result<(Forest, f64), Error> {
        let dir = out_dir.join(name);
        let mut forest = Forest::create(&dir, arch, &tok_path)?;
        let seed = seed.as_ref().filter(|_| from_seed);
        if let Some(s) = seed {
            forest.set_seed(&s.weights)?;
        }
        let steps = if seed.is_some() {
            plan.elm_steps
        } else {
            plan.no_seed_elm_steps
        };
        let mut flops = 0.0;
        for part in parts {
            let run_dir = dir.join(&part.name);
            say(&format!(
                "{name}/{}: {steps} updates of {} blocks",
                part.name, plan.elm_batch_size
            ));
            let run_name = format!("{name}/{}", part.name);
            let mut on_step = |s: &StepStats| on_step(&run_name, s);
            let own = TrainConfig {
                data_offset: part.data_offset,
                ..tc(steps, plan.elm_batch_size)
            };
            let trained = train_once(&run_dir, || match seed {
                Some(_) if continuing => {
                    // `steps` counts from the seed's first update; the schedule goes on to B
                    // (update-matched) or to the seed's and the ELM's updates (full-batch).
                    let c = TrainConfig {
                        steps: plan.seed_steps + steps,
                        schedule_steps: (!update_matched)
                            .then_some(plan.seed_steps + plan.elm_steps),
                        ..own
                    };
                    branch::train(
                        Start::<Gpt>::Continue(&seed_dir),
                        &part.data,
                        c,
                        &run_dir,
                        device,
                        &mut on_step,
                    )
                }
                Some(s) => {
                    let m = weights::load(&s.weights, Some(&arch), device)?;
                    branch::train(
                        Start::Fresh(m),
                        &part.data,
                        own,
                        &run_dir,
                        device,
                        &mut on_step,
                    )
                }
                None => branch::train(
                    Start::Fresh(init()),
                    &part.data,
                    own,
                    &run_dir,
                    device,
                    &mut on_step,
                ),
            })?;
            flops += trained.record.flops;
            let (init_kind, parents) = match seed {
                Some(s) => (
                    InitKind::Seed,
                    vec![Parent {
                        name: "seed".into(),
                        id: s.id.clone(),
                        weight: 1.0,
                    }],
                ),
                None => (InitKind::Random, vec![]),
            };
            forest.add(
                &part.name,
                part.domains.clone(),
                &trained.weights,
                &tok.id(),
                init_kind,
                parents,
                Some(trained.record),
            )?;
        }
        forest.save()?;
        let base = if seed.is_some() { seed_flops } else { 0.0 };
        Ok((forest, base + flops))
    };
    // An ablation: trains its forest and keeps, of its rows, the ensemble and the
    // posterior-weighted average (the uniform average is not computed).
    let ablation = |name: &str,
                    from_seed: bool,
                    parts: &[Part],
                    say: &mut dyn FnMut(&str),
                    on_step: &mut dyn FnMut(&str, &StepStats)|
     -> Result<Vec<SystemResult>, Error> {
        let (f, flops) = train_forest(name, from_seed, parts, say, on_step)?;
        let scores = MemberScores::of_forest(&f, &data, device)?;
        let (rs, _) = forest_systems(
            name,
            &scores,
            &arch,
            flops,
            &data,
            cfg,
            &[cfg.top_k],
            false,
            &tmp,
            device,
            say,
        )?;
        Ok(rs
            .into_iter()
            .filter(|r| r.name.ends_with("_ensemble") || r.name.ends_with("average_posterior"))
            .collect())
    };

    // BTM: one ELM per training domain, branched from the seed, trained on its domain alone
    // (update-matched: reading on from where the seed left it).
    let domain_parts = streams
        .iter()
        .enumerate()
        .map(|(d, s)| {
            Ok(if update_matched {
                Part {
                    name: s.domain.clone(),
                    data: mix_all.only(d)?,
                    data_offset: mix_all.blocks_read(d, plan.seed_steps * plan.batch_size as u64),
                    domains: vec![s.domain.clone()],
                }
            } else {
                Part::alone(s, cfg.seed)?
            })
        })
        .collect::<Result<Vec<Part>, Error>>()?;
    let (forest, btm_flops) = train_forest("btm", true, &domain_parts, say, on_step)?;
    say(&format!("btm: scoring {} ELMs", forest.elms.len()));
    let mut scores = MemberScores::of_forest(&forest, &data, device)?;
    let mut top_ks = vec![cfg.top_k];
    top_ks.extend(
        cfg.top_k_sweep
            .iter()
            .copied()
            .filter(|&k| k >= 1 && k < forest.elms.len()),
    );
    top_ks.sort_unstable();
    top_ks.dedup();
    let (mut rs, priors) = forest_systems(
        "btm", &scores, &arch, btm_flops, &data, cfg, &top_ks, true, &tmp, device, say,
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
    // Each member's perplexity on every domain (forgetting, and the best single ELM for each
    // unseen domain), with the seed and the dense LM beside them.
    let mut elm_matrix: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    if let (Some(s), Some(m)) = (&seed, &seed_model) {
        scores.push("seed", &s.weights, m, &data, device)?;
    }
    for (d, (dname, _)) in data.test.iter().enumerate() {
        let row = elm_matrix.entry(dname.clone()).or_default();
        for (j, name) in scores.names.iter().enumerate() {
            row.insert(name.clone(), ppl(&scores.test[d][j]));
        }
        if let Some(p) = dense_ppl.get(dname) {
            row.insert("dense".into(), *p);
        }
    }
    // The forest with its seed as one more member, weighted by the same posterior.
    let mut seed_member_priors = BTreeMap::new();
    if cfg.seed_member && seed.is_some() {
        let (rs, p) = forest_systems(
            "btm_seed_member",
            &scores,
            &arch,
            btm_flops,
            &data,
            cfg,
            &[cfg.top_k],
            true,
            &tmp,
            device,
            say,
        )?;
        systems.extend(rs);
        seed_member_priors = data.by_domain(p);
    }
    drop(scores);

    if cfg.random_split {
        let parts = random_split(
            corpus,
            &tok,
            TRAIN_DOMAINS.len(),
            cfg.train_bytes,
            arch.n_ctx,
            cfg.seed,
        )?;
        let parts = parts
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                Ok(Part {
                    name: format!("split{i}"),
                    domains: p.iter().map(|s| s.domain.clone()).collect(),
                    data: mixture(p, cfg.seed)?,
                    data_offset: 0,
                })
            })
            .collect::<Result<Vec<Part>, Error>>()?;
        systems.extend(ablation("random_split", true, &parts, say, on_step)?);
    }
    if cfg.no_seed && plan.seed_steps > 0 {
        let parts = streams
            .iter()
            .map(|s| Part::alone(s, cfg.seed))
            .collect::<Result<Vec<Part>, Error>>()?;
        systems.extend(ablation("no_seed", false, &parts, say, on_step)?);
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
        priors: data.by_domain(priors),
        seed_member_priors,
        elm_matrix,
        seconds: started.elapsed().as_secs_f64(),
    };
    fsutil::write_atomic(&out_dir.join("results.md"), markdown(&report).as_bytes())?;
    fsutil::write_atomic(
        &out_dir.join("results.json"),
        &serde_json::to_vec_pretty(&report)?,
    )?;
    Ok(report)
}

/// The Markdown tables of a report: a summary (mean perplexities, compute) and per-domain
/// perplexities.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let c = &r.config;
    s.push_str(&format!(
        "Preset `{}` ({} parameters, n_ctx {}), budget {} updates of {} blocks ({:.3e} training FLOPs), protocol {}, \
         seed share {:.0}% ({} updates{}), ELMs {} x {} updates of {} blocks, optimiser at branch: {:?}, {} test tokens per domain, \
         cached prior from {} dev blocks, top-k k = {}, seed {}. Wall clock {:.0} s.\n\n",
        c.preset,
        r.params,
        r.architecture.n_ctx,
        r.plan.dense_steps,
        c.batch_size,
        r.plan.dense_flops(),
        c.protocol.name(),
        100.0 * c.seed_share,
        r.plan.seed_steps,
        if c.protocol == Protocol::UpdateMatched {
            ", the dense run's checkpoint"
        } else {
            ""
        },
        r.plan.n_elms,
        r.plan.elm_steps,
        r.plan.elm_batch_size,
        c.optimizer,
        c.eval_tokens,
        c.prior_blocks,
        c.top_k,
        c.seed,
        r.seconds
    ));
    let extra = r.systems.iter().any(|x| !x.extra_domain.is_empty());
    s.push_str(
        "| system | train FLOPs | models run / token | in-domain ppl (mean of 8) | out-of-domain ppl (mean of 4) |",
    );
    s.push_str(if extra {
        " extra corpora ppl (mean) |\n|---|---:|---:|---:|---:|---:|\n"
    } else {
        "\n|---|---:|---:|---:|---:|\n"
    });
    for x in &r.systems {
        s.push_str(&format!(
            "| {} | {:.3e} | {} | {:.2} | {:.2} |",
            x.name, x.train_flops, x.inference_models, x.mean_in, x.mean_out
        ));
        if extra {
            s.push_str(&format!(" {:.2} |", x.mean_extra));
        }
        s.push('\n');
    }
    let domains: Vec<&String> = r
        .systems
        .first()
        .map(|x| {
            x.in_domain
                .keys()
                .chain(x.out_domain.keys())
                .chain(x.extra_domain.keys())
                .collect()
        })
        .unwrap_or_default();
    s.push_str("\nPer-domain test perplexity (the training domains, then the evaluation-only ones):\n\n| system |");
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
                .or_else(|| x.extra_domain.get(*d))
                .copied()
                .unwrap_or(f64::NAN);
            s.push_str(&format!(" {v:.2} |"));
        }
        s.push('\n');
    }
    s.push_str(&matrix_markdown(&r.elm_matrix));
    s
}

/// The member x domain perplexity table: one row per domain, one column per member; the best
/// ELM of each domain in bold.
pub fn matrix_markdown(m: &BTreeMap<String, BTreeMap<String, f64>>) -> String {
    let mut s = String::new();
    let Some(first) = m.values().next() else {
        return s;
    };
    // Training domains first (their own ELM on the diagonal), then the evaluation-only ones.
    let domains: Vec<&String> = TRAIN_DOMAINS
        .iter()
        .chain(EVAL_DOMAINS.iter())
        .filter_map(|d| m.get_key_value(*d).map(|(k, _)| k))
        .chain(m.keys().filter(|k| {
            !TRAIN_DOMAINS.contains(&k.as_str()) && !EVAL_DOMAINS.contains(&k.as_str())
        }))
        .collect();
    let mut members: Vec<&String> = first
        .keys()
        .filter(|k| *k != "seed" && *k != "dense")
        .collect();
    members.sort_by_key(|k| {
        TRAIN_DOMAINS
            .iter()
            .position(|d| d == k)
            .unwrap_or(usize::MAX)
    });
    let extra: Vec<&String> = first
        .keys()
        .filter(|k| *k == "seed" || *k == "dense")
        .collect();
    s.push_str("\nEach model alone, test perplexity (rows: the text; columns: the ELM trained on that domain, the seed and the dense LM; bold: the best ELM):\n\n| text \\ model |");
    for k in members.iter().chain(&extra) {
        s.push_str(&format!(" {k} |"));
    }
    s.push_str("\n|---|");
    s.push_str(&"---:|".repeat(members.len() + extra.len()));
    s.push('\n');
    for d in domains {
        let row = &m[d];
        let best = members
            .iter()
            .filter_map(|k| row.get(*k).map(|v| (*k, *v)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(k, _)| k);
        s.push_str(&format!("| {d} |"));
        for k in members.iter().chain(&extra) {
            match row.get(*k) {
                Some(v) if Some(*k) == best => s.push_str(&format!(" **{v:.2}** |")),
                Some(v) => s.push_str(&format!(" {v:.2} |")),
                None => s.push_str(" |"),
            }
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
