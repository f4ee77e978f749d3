//! `forest ...` and `experiment`: Branch-Train-Merge over a forest of ELMs (argument parsing,
//! printing and the plot; the work is in `btm_model::forest`).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use btm_model::data::{self, Corpus, Split};
use btm_model::device::DeviceKind;
use btm_model::experiment;
use btm_model::forest::Forest;
use btm_model::forest::average;
use btm_model::forest::branch::OptimizerInit;
use btm_model::forest::ensemble::{self, Ensemble};
use btm_model::forest::manifest::{InitKind, Parent};
use btm_model::forest::posterior::{self, PriorConfig, Weighting};
use btm_model::tokenizer::Tokenizer;
use btm_model::{Preset, eval, weights};
use clap::{Args, Subcommand};

use crate::model_cmds::{TrainBar, model_files};
use crate::open::{open, tokenizer_of};
use crate::plot::plot;
use crate::sampling::GenerationArgs;

fn corpus(arg: &Option<PathBuf>) -> Corpus {
    arg.as_ref().map_or_else(Corpus::bundled, Corpus::new)
}

/// Up to `max_tokens` tokens of a domain's split.
fn domain_tokens(
    corpus: &Corpus,
    tok: &Tokenizer,
    domain: &str,
    split: Split,
    max_tokens: usize,
) -> Result<Vec<u32>> {
    let docs = corpus.documents(domain, split)?;
    let (mut t, _) = data::tokenize_documents(tok, &docs, Some(max_tokens * 8))?;
    t.truncate(max_tokens + 1);
    Ok(t)
}

/// Manage and use a forest of ELMs.
#[derive(Debug, Subcommand)]
pub enum ForestCmd {
    /// Create an empty forest (a forest.json manifest) for an architecture and tokenizer.
    Create(CreateArgs),
    /// Merge a trained ELM into the forest (refused unless architecture and tokenizer match).
    Add(AddArgs),
    /// Remove an ELM from the forest.
    Remove(RemoveArgs),
    /// List the ELMs (and check every file's content id with --verify).
    Show(ShowArgs),
    /// Estimate the cached prior of a target domain over the forest's ELMs on its dev data.
    Prior(PriorArgs),
    /// Perplexity of the ensemble (domain posterior, top-k, previous-token or uniform weights).
    Eval(EnsembleEvalArgs),
    /// Generate text from the ensemble (mixing the ELMs' full next-token distributions).
    Generate(EnsembleGenerateArgs),
    /// Average ELMs' parameters (uniformly or by a target domain's cached prior) into one model file.
    Average(AverageArgs),
    /// On the network: domains, live claims, ELM records, their verification state and who verified them.
    List(crate::client_cmds::ListArgs),
    /// Per-domain perplexity of the seed, each ELM, the ensemble and the averages, as a table and a PNG.
    Report(crate::client_cmds::ReportArgs),
    /// Each ELM (and averages) as a transformers-loadable folder with a model card, and the ensemble recipe.
    ExportHf(crate::hf_export::ExportHfArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Directory of the forest (forest.json is written there).
    #[arg(long)]
    dir: PathBuf,
    /// The tokenizer every ELM uses.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Take the architecture (and the seed) from this seed model directory or .safetensors.
    #[arg(long)]
    seed: PathBuf,
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The forest (directory or forest.json).
    #[arg(long)]
    forest: PathBuf,
    /// The ELM's run directory (model.safetensors + tokenizer.json) or weights file.
    #[arg(long)]
    elm: PathBuf,
    /// Its name in the forest (default: the directory name).
    #[arg(long)]
    name: Option<String>,
    /// The domain(s) it was trained on.
    #[arg(long, value_delimiter = ',')]
    domain: Vec<String>,
    /// How it was initialised: seed, posterior-average or random.
    #[arg(long, default_value = "seed")]
    init: String,
    /// Parents as NAME:WEIGHT (default: the forest's seed with weight 1 for --init seed).
    #[arg(long, value_delimiter = ',')]
    parent: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// The forest.
    #[arg(long)]
    forest: PathBuf,
    /// The ELM to remove.
    #[arg(long)]
    name: String,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The forest.
    #[arg(long)]
    forest: PathBuf,
    /// Re-hash every file and check it against the manifest.
    #[arg(long)]
    verify: bool,
}

#[derive(Debug, Args)]
pub struct PriorArgs {
    /// The forest.
    #[arg(long)]
    forest: PathBuf,
    /// Target domain (its valid split is the dev data).
    #[arg(long)]
    domain: String,
    /// Dev blocks used (the released code: about 200).
    #[arg(long, default_value_t = 200)]
    blocks: usize,
    /// Blocks per batch of the moving average.
    #[arg(long, default_value_t = 16)]
    batch_blocks: usize,
    /// Weight of each new batch in the moving average.
    #[arg(long, default_value_t = 0.3)]
    alpha: f64,
    /// Compute device.
    #[arg(long, default_value = "cpu")]
    device: DeviceKind,
    /// Corpus root (default: $BTM_CORPUS, else the copy of data/corpus carried in btm-node).
    #[arg(long)]
    corpus: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct EnsembleOpts {
    /// The forest.
    #[arg(long)]
    forest: PathBuf,
    /// Target domain whose cached prior (estimated on its dev data) weights the ELMs; without it the prior is uniform.
    #[arg(long)]
    prior_domain: Option<String>,
    /// Dev blocks for the cached prior.
    #[arg(long, default_value_t = 200)]
    prior_blocks: usize,
    /// Run only the k ELMs with the largest prior.
    #[arg(long)]
    top_k: Option<usize>,
    /// Weights per position: posterior (the paper), prev-token (the released code), prior or uniform.
    #[arg(long, default_value = "posterior")]
    weighting: Weighting,
    /// Compute device.
    #[arg(long, default_value = "cpu")]
    device: DeviceKind,
    /// Corpus root (default: $BTM_CORPUS, else the copy of data/corpus carried in btm-node).
    #[arg(long)]
    corpus: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct EnsembleEvalArgs {
    #[command(flatten)]
    opts: EnsembleOpts,
    /// Domains to evaluate.
    #[arg(long, value_delimiter = ',', required = true)]
    domain: Vec<String>,
    /// Split.
    #[arg(long, default_value = "test")]
    split: Split,
    /// Tokens per domain.
    #[arg(long, default_value_t = 16384)]
    max_tokens: usize,
}

#[derive(Debug, Args)]
pub struct EnsembleGenerateArgs {
    #[command(flatten)]
    opts: EnsembleOpts,
    /// Text to continue.
    #[arg(long, default_value = "")]
    prompt: String,
    #[command(flatten)]
    sampling: GenerationArgs,
}

#[derive(Debug, Args)]
pub struct AverageArgs {
    #[command(flatten)]
    opts: EnsembleOpts,
    /// Output weights file.
    #[arg(long)]
    out: PathBuf,
}

/// Opens the options' forest with its tokenizer and the prior they ask for.
fn open_with_prior(o: &EnsembleOpts) -> Result<(Forest, Tokenizer, Vec<f64>)> {
    let f = open(&o.forest)?;
    let tok = tokenizer_of(&f)?;
    let prior = prior_of(&f, o, &tok)?;
    Ok((f, tok, prior))
}

/// The prior the options ask for: a target domain's cached prior or uniform.
fn prior_of(forest: &Forest, o: &EnsembleOpts, tok: &Tokenizer) -> Result<Vec<f64>> {
    let e = forest.elms.len();
    if e == 0 {
        bail!("the forest has no ELMs");
    }
    match &o.prior_domain {
        None => Ok(vec![1.0 / e as f64; e]),
        Some(d) => {
            let dev = domain_tokens(
                &corpus(&o.corpus),
                tok,
                d,
                Split::Valid,
                o.prior_blocks * forest.architecture.n_ctx,
            )?;
            let cfg = PriorConfig {
                max_blocks: o.prior_blocks,
                ..PriorConfig::default()
            };
            Ok(ensemble::cached_prior(
                forest,
                &dev,
                &cfg,
                8,
                &o.device.device()?,
            )?)
        }
    }
}

pub fn run_forest(cmd: ForestCmd, json: bool) -> Result<()> {
    match cmd {
        ForestCmd::List(a) => crate::client_cmds::list(a, json),
        ForestCmd::Report(a) => crate::client_cmds::report(a, json),
        ForestCmd::ExportHf(a) => crate::hf_export::export_hf(a, json),
        ForestCmd::Create(a) => {
            let (seed_w, _) = model_files(&a.seed);
            let (arch, _) = weights::read(&seed_w, None)?;
            let mut f = Forest::create(&a.dir, arch, &a.tokenizer)?;
            f.set_seed(&seed_w)?;
            let path = f.save()?;
            print(
                json,
                &f,
                &format!(
                    "created {} ({} parameters per ELM)",
                    path.display(),
                    arch.num_params()
                ),
            )
        }
        ForestCmd::Add(a) => {
            let mut f = open(&a.forest)?;
            let (w, t) = model_files(&a.elm);
            let tok_id = btm_model::content_id(
                &std::fs::read(&t).with_context(|| format!("reading {}", t.display()))?,
            );
            let name = a.name.clone().unwrap_or_else(|| {
                a.elm
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "elm".into())
            });
            let init: InitKind = a.init.parse()?;
            let mut parents = Vec::new();
            for p in &a.parent {
                let (n, w) = p
                    .split_once(':')
                    .with_context(|| format!("--parent {p:?} is not NAME:WEIGHT"))?;
                let id = if n == "seed" {
                    f.seed
                        .as_ref()
                        .map(|s| s.id.clone())
                        .context("the forest has no seed")?
                } else {
                    f.elms[f.index(n)?].weights.id.clone()
                };
                parents.push(Parent {
                    name: n.to_string(),
                    id,
                    weight: w.parse().with_context(|| format!("weight in {p:?}"))?,
                });
            }
            if parents.is_empty()
                && init == InitKind::Seed
                && let Some(s) = &f.seed
            {
                parents.push(Parent {
                    name: "seed".into(),
                    id: s.id.clone(),
                    weight: 1.0,
                });
            }
            let domains = if a.domain.is_empty() {
                vec![name.clone()]
            } else {
                a.domain.clone()
            };
            f.add(&name, domains, &w, &tok_id, init, parents, None)?;
            f.save()?;
            print(
                json,
                &f,
                &format!("added {name}; the forest has {} ELMs", f.elms.len()),
            )
        }
        ForestCmd::Remove(a) => {
            let mut f = open(&a.forest)?;
            f.remove(&a.name)?;
            f.save()?;
            print(
                json,
                &f,
                &format!("removed {}; the forest has {} ELMs", a.name, f.elms.len()),
            )
        }
        ForestCmd::Show(a) => {
            let f = open(&a.forest)?;
            if a.verify {
                f.verify()?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&f)?);
            } else {
                println!(
                    "architecture {:?}, tokenizer {}",
                    f.architecture,
                    &f.tokenizer.id[..16]
                );
                for e in &f.elms {
                    let parents: Vec<String> = e
                        .parents
                        .iter()
                        .map(|p| format!("{}:{:.3}", p.name, p.weight))
                        .collect();
                    println!(
                        "{:<20} {:<30} {:?} [{}] {}",
                        e.name,
                        e.domains.join(","),
                        e.init,
                        parents.join(" "),
                        &e.weights.id[..16]
                    );
                }
                if a.verify {
                    println!("every file matches its content id");
                }
            }
            Ok(())
        }
        ForestCmd::Prior(a) => {
            let f = open(&a.forest)?;
            let tok = tokenizer_of(&f)?;
            let dev = domain_tokens(
                &corpus(&a.corpus),
                &tok,
                &a.domain,
                Split::Valid,
                a.blocks * f.architecture.n_ctx,
            )?;
            let cfg = PriorConfig {
                batch_blocks: a.batch_blocks,
                max_blocks: a.blocks,
                alpha: a.alpha,
            };
            let prior = ensemble::cached_prior(&f, &dev, &cfg, 8, &a.device.device()?)?;
            if json {
                let m: serde_json::Map<String, serde_json::Value> = f
                    .names()
                    .iter()
                    .zip(&prior)
                    .map(|(n, p)| (n.to_string(), (*p).into()))
                    .collect();
                println!("{}", serde_json::json!({"domain": a.domain, "prior": m}));
            } else {
                for (n, p) in f.names().iter().zip(&prior) {
                    println!("{n:<20} {p:.4}");
                }
            }
            Ok(())
        }
        ForestCmd::Eval(a) => {
            let (f, tok, prior) = open_with_prior(&a.opts)?;
            let device = a.opts.device.device()?;
            let sel = posterior::top_k(&prior, a.opts.top_k.unwrap_or(prior.len()));
            let mut rows = Vec::new();
            let bar = crate::model_cmds::ScoreBar::new(!json, a.domain.len() as u64);
            for d in &a.domain {
                bar.scoring(d.as_str());
                let t = domain_tokens(&corpus(&a.opts.corpus), &tok, d, a.split, a.max_tokens)?;
                let lp = ensemble::score_forest(&f, &sel, &t, a.opts.weighting, 8, &device)?;
                let r = eval::EvalResult::from_logprobs(&lp, &t[1..], Some(&tok));
                bar.done();
                rows.push(serde_json::json!({"domain": d, "split": a.split, "elms": sel.iter().map(|s| f.elms[s.0].name.clone()).collect::<Vec<_>>(), "result": r}));
                if !json {
                    bar.suspend(|| {
                        println!(
                            "{d:<20} ppl {:>9.2} bpb {:.4} ({} ELMs, {})",
                            r.perplexity,
                            r.bits_per_byte,
                            sel.len(),
                            a.opts.weighting
                        )
                    });
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            }
            Ok(())
        }
        ForestCmd::Generate(a) => {
            let (f, tok, prior) = open_with_prior(&a.opts)?;
            let device = a.opts.device.device()?;
            let (e, chosen) =
                Ensemble::from_forest(&f, Some(&prior), a.opts.top_k, a.opts.weighting, &device)?;
            let text = e.generate(&tok, &a.prompt, &a.sampling.config())?;
            let names: Vec<&str> = chosen.iter().map(|&i| f.elms[i].name.as_str()).collect();
            let elms = ("elms", serde_json::json!(names));
            crate::model_cmds::print_completion(json, &a.prompt, &text, elms);
            Ok(())
        }
        ForestCmd::Average(a) => {
            let (f, _, prior) = open_with_prior(&a.opts)?;
            let sel = posterior::top_k(&prior, a.opts.top_k.unwrap_or(prior.len()));
            let s = average::average_members(&f, &sel, &a.out)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "wrote {} (blake3 {}), the average of {} ELMs; peak RSS {:.1} MiB",
                    a.out.display(),
                    &s.id[..16],
                    s.files_read,
                    s.peak_rss_bytes.unwrap_or(0) as f64 / (1 << 20) as f64
                );
            }
            Ok(())
        }
    }
}

fn print(json: bool, f: &Forest, msg: &str) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(f)?);
    } else {
        println!("{msg}");
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct ExperimentArgs {
    /// A smoke run of a few minutes (tiny budget, few eval tokens).
    #[arg(long)]
    quick: bool,
    /// Output directory (rerunning continues a killed run).
    #[arg(long, default_value = "runs/experiment")]
    out: PathBuf,
    /// Share of the compute spent on the seed (the paper: 0.5).
    #[arg(long)]
    seed_share: Option<f64>,
    /// Total budget in updates of the dense LM (default: 2400, or 160 with --quick).
    #[arg(long)]
    steps: Option<u64>,
    /// Blocks per update.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Architecture preset.
    #[arg(long)]
    preset: Option<Preset>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// How the budget is split: update-matched (the released code: the seed is the dense run's
    /// checkpoint at s*B, each ELM trains (1-s)*B updates at 1/E of the batch) or full-batch
    /// (round one: (1-s)*B/E full-batch updates per ELM after a separate seed run).
    #[arg(long, default_value = "update-matched")]
    protocol: experiment::Protocol,
    /// What a branch does with the seed's optimiser: continue its Adam state and LR schedule
    /// (the released code) or start afresh (default: continue for update-matched, fresh for
    /// full-batch, as each was run).
    #[arg(long, value_parser = ["continue", "fresh"])]
    optimizer: Option<String>,
    /// Seed of the initialisation and the data order (the first of --seeds).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run the whole experiment with this many seeds (seed, seed+1, ...) in OUT/seed<k>, then
    /// write each system's mean and standard deviation and the findings' verdicts to
    /// OUT/summary.{json,md}. Finished seeds are not rerun.
    #[arg(long)]
    seeds: Option<usize>,
    /// Dev blocks per domain for the cached prior.
    #[arg(long)]
    prior_blocks: Option<usize>,
    /// Also score every domain of this corpus (same layout; valid and test splits suffice) as
    /// text the forest never trained on, with its own cached prior (repeatable).
    #[arg(long = "eval-corpus", value_name = "DIR")]
    eval_corpus: Vec<PathBuf>,
    /// Test tokens per domain.
    #[arg(long)]
    eval_tokens: Option<usize>,
    /// k of the top-k ensemble.
    #[arg(long)]
    top_k: Option<usize>,
    /// Skip the random-split, no-seed and DEMix baselines.
    #[arg(long)]
    no_baselines: bool,
    /// Compute device.
    #[arg(long, default_value = "cpu")]
    device: DeviceKind,
    /// Corpus root (default: $BTM_CORPUS, else the copy of data/corpus carried in btm-node).
    #[arg(long)]
    corpus: Option<PathBuf>,
}

pub fn experiment(a: ExperimentArgs, json: bool) -> Result<()> {
    let base = if a.quick {
        experiment::Config::quick()
    } else {
        experiment::Config::standard()
    };
    let baselines = !a.no_baselines;
    let optimizer = match (a.optimizer.as_deref(), a.protocol) {
        (Some("continue"), _) | (None, experiment::Protocol::UpdateMatched) => {
            OptimizerInit::ContinueSeed
        }
        _ => OptimizerInit::Fresh,
    };
    let cfg = experiment::Config {
        seed_share: a.seed_share.unwrap_or(base.seed_share),
        protocol: a.protocol,
        total_steps: a.steps.unwrap_or(base.total_steps),
        batch_size: a.batch_size.unwrap_or(base.batch_size),
        preset: a.preset.unwrap_or(base.preset),
        lr: a.lr.unwrap_or(base.lr),
        eval_tokens: a.eval_tokens.unwrap_or(base.eval_tokens),
        prior_blocks: a.prior_blocks.unwrap_or(base.prior_blocks),
        top_k: a.top_k.unwrap_or(base.top_k),
        optimizer,
        seed: a.seed,
        eval_corpora: a.eval_corpus.clone(),
        random_split: base.random_split && baselines,
        no_seed: base.no_seed && baselines,
        demix: base.demix && baselines,
        ..base
    };
    let device = a.device.device()?;
    let corpus = corpus(&a.corpus);
    let runs: Vec<(experiment::Config, PathBuf)> = match a.seeds {
        None => vec![(cfg, a.out.clone())],
        Some(0) => anyhow::bail!("--seeds must be at least 1"),
        Some(n) => (0..n as u64)
            .map(|k| {
                let seed = a.seed + k;
                (
                    experiment::Config {
                        seed,
                        ..cfg.clone()
                    },
                    a.out.join(format!("seed{seed}")),
                )
            })
            .collect(),
    };
    let mut reports = Vec::new();
    for (cfg, out) in &runs {
        let bar = std::cell::RefCell::new(TrainBar::new(!json));
        let report = experiment::run(
            cfg,
            &corpus,
            out,
            &device,
            &mut |m| {
                if !json {
                    bar.borrow().suspend(|| eprintln!("{m}"));
                }
            },
            &mut |run, s| bar.borrow_mut().update(run, s),
        )?;
        bar.borrow_mut().finish();
        let [js, md, png] = experiment::report_paths(out);
        plot(&report, &png)?;
        if !json {
            println!("{}", experiment::markdown(&report));
            println!(
                "wrote {}, {} and {}",
                js.display(),
                md.display(),
                png.display()
            );
        }
        reports.push(report);
    }
    if a.seeds.is_some() {
        let summary = experiment::seeds::Summary::of(&reports);
        let (js, md) = (a.out.join("summary.json"), a.out.join("summary.md"));
        btm_model::fsutil::write_atomic(&js, &serde_json::to_vec_pretty(&summary)?)?;
        btm_model::fsutil::write_atomic(&md, summary.markdown().as_bytes())?;
        if json {
            println!("{}", serde_json::to_string_pretty(&summary)?);
        } else {
            println!("{}", summary.markdown());
            println!("wrote {} and {}", js.display(), md.display());
        }
    } else if json {
        println!("{}", serde_json::to_string_pretty(&reports[0])?);
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct ExperimentPlotArgs {
    /// Finished experiment directories: each holds results.json, or seed<k>/results.json from
    /// --seeds.
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    /// The x axis: training FLOPs (a budget curve) or the seed share (a sweep).
    #[arg(long, default_value = "flops", value_parser = ["flops", "seed-share"])]
    x: String,
    /// Output PNG.
    #[arg(long)]
    out: PathBuf,
}

/// The reports of a finished experiment directory: `dir/results.json`, else every
/// `dir/seed<k>/results.json`.
fn finished_reports(dir: &std::path::Path) -> Result<Vec<experiment::Report>> {
    let read = |p: &std::path::Path| -> Result<experiment::Report> {
        serde_json::from_slice(
            &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("{} is not an experiment report", p.display()))
    };
    let single = dir.join("results.json");
    if single.exists() {
        return Ok(vec![read(&single)?]);
    }
    let mut seeds: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seed"))
                && p.join("results.json").exists()
        })
        .collect();
    seeds.sort();
    if seeds.is_empty() {
        bail!(
            "{} holds no finished experiment (results.json or seed<k>/results.json)",
            dir.display()
        );
    }
    seeds
        .iter()
        .map(|p| read(&p.join("results.json")))
        .collect()
}

pub fn experiment_plot(a: ExperimentPlotArgs, json: bool) -> Result<()> {
    use experiment::seeds::{Side, paired_diff};
    const SERIES: [&str; 4] = [
        "btm_ensemble",
        "btm_ensemble_prev_token",
        "btm_average_posterior",
        "btm_seed_member_ensemble",
    ];
    let by_flops = a.x == "flops";
    let mut points = Vec::new();
    let mut rows = Vec::new();
    for dir in &a.dirs {
        let runs = finished_reports(dir)?;
        let c = &runs[0].config;
        let (x, label) = if by_flops {
            (runs[0].plan.dense_flops(), format!("B={}", c.total_steps))
        } else {
            (c.seed_share, format!("s={}", c.seed_share))
        };
        let series: Vec<[(f64, f64); 2]> = SERIES
            .iter()
            .map(|name| {
                [Side::InDomain, Side::OutOfDomain].map(|side| {
                    paired_diff(&runs, name, "dense", side)
                        .map_or((f64::NAN, 0.0), |d| (d.mean, d.sd))
                })
            })
            .collect();
        rows.push(serde_json::json!({
            "dir": dir, "x": x, "label": label, "seeds": runs.len(),
            "series": SERIES.iter().zip(&series).map(|(n, s)| serde_json::json!({
                "system": n, "in_pct": s[0].0, "in_sd": s[0].1, "out_pct": s[1].0, "out_sd": s[1].1,
            })).collect::<Vec<_>>(),
        }));
        points.push(crate::plot::ComparePoint { x, label, series });
    }
    points.sort_by(|p, q| p.x.total_cmp(&q.x));
    let (title, x_name) = if by_flops {
        (
            "BTM minus the compute-matched dense LM against the budget",
            "training FLOPs (log)",
        )
    } else {
        (
            "BTM minus the compute-matched dense LM against the seed share",
            "seed share",
        )
    };
    crate::plot::plot_compare(title, x_name, by_flops, &SERIES, &points, &a.out)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "| point | system | in domain vs dense | out of domain vs dense |\n|---|---|---:|---:|"
        );
        for p in &points {
            for (name, s) in SERIES.iter().zip(&p.series) {
                println!(
                    "| {} | {} | {:+.1}% ± {:.1} | {:+.1}% ± {:.1} |",
                    p.label, name, s[0].0, s[0].1, s[1].0, s[1].1
                );
            }
        }
        println!("wrote {}", a.out.display());
    }
    Ok(())
}
