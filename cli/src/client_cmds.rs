//! Client commands: `forest list` (what the network holds and who verified it), `fetch` (the
//! verified ELMs into a local forest directory), `forest report` (per-domain perplexity of the
//! seed, each ELM, the ensemble and the averages, with a plot), `ensemble` (score or generate
//! text) and `average` (one merged model).
//!
//! A client is a node too: it verifies every ELM itself (signature, hash, shapes, finite values,
//! re-scored perplexity) before `fetch` uses it; `--unverified` takes the others as well.

use btm_model::files::{TOKENIZER_FILE, WEIGHTS_FILE};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use btm_model::data::{self, Corpus, Split};
use btm_model::device::DeviceKind;
use btm_model::forest::average;
use btm_model::forest::ensemble::{self, Ensemble};
use btm_model::forest::posterior::{PriorConfig, Weighting};
use btm_model::forest::report::{self, ForestReport, ReportConfig, ReportRow};
use btm_model::forest::{Forest, manifest};
use btm_model::generate::SampleConfig;
use btm_model::{eval, fsutil};
use btm_net::Node;
use btm_roles::{Client, ClientConfig, Events, FetchRequest, Listing, Stop};
use clap::Args;
use serde::Serialize;

use crate::net::{self, ConfigFile, NetArgs, NodeSettings, short};
use crate::open::open_with_elms;
use crate::plot::{self, PALETTE};
use crate::report::Reporter;
use crate::table::{left, line, num, right};

// ---- forest list -------------------------------------------------------------------------

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Seconds to spend verifying the ELMs found (this node's own verdicts).
    #[arg(long, default_value_t = 20)]
    wait: u64,
}

fn client_settings(a: &NetArgs) -> Result<NodeSettings> {
    let config = ConfigFile::load(a.config.as_deref())?;
    NodeSettings::resolve(a, &config, "runs/client")
}

/// Runs `work` with a client node started from `net`, and always shuts the node down.
fn with_client<T>(
    net_args: &NetArgs,
    wait: u64,
    role: &str,
    json: bool,
    work: impl AsyncFnOnce(&Client, &Node, &Stop, &Events, &Reporter) -> Result<T>,
) -> Result<T> {
    let settings = client_settings(net_args)?;
    net::runtime()?.block_on(async {
        let stop = net::install_stop();
        let node = net::start(&settings).await?;
        let reporter = Reporter::for_command(role, json);
        let client = Client::new(ClientConfig {
            wait_registry: settings.wait_registry,
            wait: Duration::from_secs(wait),
        });
        let result = work(&client, &node, &stop, &reporter.events(), &reporter).await;
        node.shutdown().await;
        result
    })
}

fn print_listing(l: &Listing, me: &str) {
    let seed = l.seed.map(|s| s.to_string()).unwrap_or_default();
    println!(
        "registry v{} (expires in {} h), seed {}",
        l.registry_version,
        l.registry_expires
            .saturating_sub(btm_net::limits::now_secs())
            / 3600,
        &seed[..seed.len().min(8)]
    );
    let cols = [
        left(20),
        left(22),
        left(9),
        left(9),
        right(9),
        left(5),
        left(8),
    ];
    let head = [
        "domain",
        "claims (lease left)",
        "ELM",
        "trainer",
        "claimed",
        "reg",
        "here",
    ];
    println!("{} verified by (+ accept, - reject)", line(&cols, &head));
    for d in &l.domains {
        let claims = d
            .claims
            .iter()
            .map(|(n, s)| format!("{} {s}s", &n[..8]))
            .collect::<Vec<_>>()
            .join(",");
        if d.elms.is_empty() {
            println!("{}", line(&cols, &[&d.name, &claims, "-"]));
        }
        for (i, e) in d.elms.iter().enumerate() {
            let by = e
                .attestations
                .iter()
                .map(|(v, (ok, _))| {
                    let who = if v == me {
                        "me".to_string()
                    } else {
                        v[..8].to_string()
                    };
                    format!("{}{who}", if *ok { "+" } else { "-" })
                })
                .collect::<Vec<_>>()
                .join(" ");
            let cells = [
                if i == 0 { d.name.as_str() } else { "" },
                if i == 0 { claims.as_str() } else { "" },
                &short(&e.id.0),
                &short(e.trainer.as_bytes()),
                &num(e.claimed_ppl, 2),
                if e.in_registry { "yes" } else { "no" },
                match e.verified_here {
                    Some(true) => "ok",
                    Some(false) => "REJECTED",
                    None => "pending",
                },
            ];
            println!("{} {by}", line(&cols, &cells));
        }
    }
}

pub fn list(a: ListArgs, json: bool) -> Result<()> {
    with_client(
        &a.net,
        a.wait,
        "client",
        json,
        async |client, node, stop, events, _| {
            let Some(reg) = client.catch_up(node, stop, events, |_| true).await? else {
                return Ok(());
            };
            let l = Client::listing(node, reg.record())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                print_listing(&l, &node.node_id().to_string());
            }
            Ok(())
        },
    )
}

// ---- fetch -------------------------------------------------------------------------------

#[derive(Debug, Args)]
pub struct FetchArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Forest directory to write: forest.json, seed, tokenizer, ELMs, and each domain's
    /// validation and test data under data/.
    #[arg(long, default_value = "runs/forest")]
    out: PathBuf,
    /// Only ELMs of these domains.
    #[arg(long, value_delimiter = ',')]
    domain: Vec<String>,
    /// Also take ELMs this node rejected or could not verify (not recommended).
    #[arg(long)]
    unverified: bool,
    /// Longest time to spend finding and verifying ELMs, in seconds.
    #[arg(long, default_value_t = 300)]
    wait: u64,
    /// Keep looking until at least this many ELMs are verified (default: verify what is found).
    #[arg(long)]
    min_elms: Option<usize>,
}

pub fn fetch(a: FetchArgs, json: bool) -> Result<()> {
    let req = FetchRequest {
        out: a.out.clone(),
        domains: a.domain.clone(),
        unverified: a.unverified,
        min_elms: a.min_elms,
    };
    with_client(
        &a.net,
        a.wait,
        "fetch",
        json,
        async |client, node, stop, events, _| {
            let Some(rows) = client.fetch(node, &req, stop, events).await? else {
                return Ok(());
            };
            write_verification(node, &req.out, &rows)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            let cols = [left(24), left(9), right(10), right(10), right(9)];
            let head = ["ELM", "record", "claimed", "measured", "accepts"];
            println!("{}  here", line(&cols, &head));
            for r in &rows {
                let here = match r.verified_here {
                    Some(true) => "verified",
                    Some(false) => "REJECTED (--unverified)",
                    None => "unverified (--unverified)",
                };
                let measured = r.measured_ppl.map_or("-".into(), |p| num(p, 2));
                let cells = [
                    r.name.as_str(),
                    &short(&r.id.0),
                    &num(r.claimed_ppl, 2),
                    &measured,
                    &r.verifiers.to_string(),
                ];
                println!("{}  {here}", line(&cols, &cells));
            }
            println!(
                "forest of {} ELMs written to {}",
                rows.len(),
                req.out.join(manifest::MANIFEST_FILE).display()
            );
            Ok(())
        },
    )
}

/// Writes `<forest>/verification.json`: for each fetched ELM (by forest name) its record id,
/// claimed and measured perplexity, and every verdict this node holds (who, accepted, measured
/// perplexity, data pool), for model cards (`forest export-hf`).
fn write_verification(node: &Node, out: &Path, rows: &[btm_roles::FetchedElm]) -> Result<()> {
    let mut doc = serde_json::Map::new();
    for r in rows {
        let atts = node.with_store(|s| s.attestations(&r.id))??;
        let verdicts: Vec<serde_json::Value> = atts
            .iter()
            .map(|a| {
                let a = a.record();
                serde_json::json!({
                    "verifier": a.verifier.to_string(),
                    "accepted": a.verdict == btm_protocol::Verdict::Accept,
                    "measured_ppl": (a.measured_ppl_milli > 0)
                        .then(|| btm_protocol::milli_to_ppl(a.measured_ppl_milli)),
                    "pool": a.pool,
                })
            })
            .collect();
        doc.insert(
            r.name.clone(),
            serde_json::json!({
                "record": r.id.to_string(),
                "domain": r.domain,
                "claimed_ppl": r.claimed_ppl,
                "measured_ppl_here": r.measured_ppl,
                "verified_here": r.verified_here,
                "verdicts": verdicts,
            }),
        );
    }
    fsutil::write_atomic(
        &out.join(VERIFICATION_FILE),
        &serde_json::to_vec_pretty(&serde_json::Value::Object(doc))?,
    )?;
    Ok(())
}

/// What `fetch` records about each ELM's verification (`<forest>/verification.json`); the
/// model cards of `forest export-hf` read it.
pub const VERIFICATION_FILE: &str = "verification.json";

// ---- forest report -----------------------------------------------------------------------

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The forest (directory or forest.json), e.g. from `btm-node fetch`.
    #[arg(long, default_value = "runs/forest")]
    forest: PathBuf,
    /// Domains to evaluate (default: the domains of the forest's ELMs, then the corpus's evaluation-only domains).
    #[arg(long, value_delimiter = ',')]
    domain: Vec<String>,
    /// Split to score.
    #[arg(long, default_value = "test")]
    split: Split,
    /// Tokens per domain.
    #[arg(long, default_value_t = 8192)]
    max_tokens: usize,
    /// Dev blocks for each domain's cached prior.
    #[arg(long, default_value_t = 64)]
    prior_blocks: usize,
    /// Corpus with the domains' splits (default: the forest's data/ directory, else the bundled corpus).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Where report.json, report.md and report.png go (default: the forest directory).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Compute device.
    #[arg(long, default_value = "cpu")]
    device: DeviceKind,
}

pub fn report(a: ReportArgs, json: bool) -> Result<()> {
    let (forest, tok) = open_with_elms(&a.forest)?;
    let device = a.device.device()?;
    // The forest's fetched data first, then the bundled corpus for the domains it lacks (the
    // evaluation-only ones).
    let corpora = match &a.corpus {
        Some(c) => vec![Corpus::new(c)],
        None if forest.dir().join("data").is_dir() => {
            vec![Corpus::new(forest.dir().join("data")), Corpus::bundled()]
        }
        None => vec![Corpus::bundled()],
    };
    let domains: Vec<String> = if a.domain.is_empty() {
        let mut d: Vec<String> = forest.elms.iter().flat_map(|e| e.domains.clone()).collect();
        d.sort();
        d.dedup();
        // Text no ELM trained on: the corpus's evaluation-only domains, where present.
        let unseen: Vec<String> = data::EVAL_DOMAINS
            .iter()
            .filter(|e| {
                !d.iter().any(|x| x == *e)
                    && corpora
                        .iter()
                        .any(|c| c.path(e, a.split).is_ok() && c.path(e, Split::Valid).is_ok())
            })
            .map(|e| e.to_string())
            .collect();
        d.extend(unseen);
        d
    } else {
        a.domain.clone()
    };
    if forest.seed.is_none() {
        bail!("the forest has no seed (fetch it, or `forest create --seed`)");
    }
    let cfg = ReportConfig {
        split: a.split,
        max_tokens: a.max_tokens,
        prior_blocks: a.prior_blocks,
        domains,
    };
    let bar = crate::model_cmds::ScoreBar::new(!json, report::scorings(&forest, cfg.domains.len()));
    let mut started = false;
    let report = ForestReport::measure(&forest, &tok, &corpora, &cfg, &device, |what| {
        if std::mem::replace(&mut started, true) {
            bar.done();
        }
        bar.scoring(what);
    })?;
    drop(bar);
    let out = a.out.clone().unwrap_or_else(|| forest.dir().to_path_buf());
    std::fs::create_dir_all(&out)?;
    let md = report.markdown();
    fsutil::write_atomic(
        &out.join("report.json"),
        &serde_json::to_vec_pretty(&report)?,
    )?;
    fsutil::write_atomic(&out.join("report.md"), md.as_bytes())?;
    let png = out.join("report.png");
    plot_report(&report, &png)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{md}");
        println!(
            "wrote {} and {}",
            out.join("report.md").display(),
            png.display()
        );
    }
    Ok(())
}

/// Grouped bars per domain: seed, the domain's own ELM, ensemble (without and with the seed),
/// posterior and uniform averages.
fn plot_report(r: &ForestReport, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let series = [
        "seed",
        "own ELM",
        "ensemble",
        "ensemble + seed",
        "avg posterior",
        "avg uniform",
    ];
    let value = |row: &ReportRow, k: usize| match k {
        0 => row.seed,
        1 => row.own_elm.unwrap_or(f64::NAN),
        2 => row.ensemble,
        3 => row.ensemble_with_seed,
        4 => row.average_posterior,
        _ => row.average_uniform,
    };
    let n = r.rows.len().max(1);
    let (w, h) = ((160 * n as u32 + 200).max(700), 520u32);
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let ymax = r
        .rows
        .iter()
        .flat_map(|row| (0..series.len()).map(move |k| value(row, k)))
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max)
        * 1.1;
    let (x0, y0, ph) = (80i32, 50i32, 340i32);
    let pw = w as i32 - x0 - 40;
    let py = |v: f64| y0 + ph - ((v / ymax) * ph as f64) as i32;
    let axis = ShapeStyle::from(&BLACK).stroke_width(1);
    let _ = root.draw(&Rectangle::new([(x0, y0), (x0 + pw, y0 + ph)], axis));
    plot::text(
        &root,
        &format!("perplexity per domain ({} split, lower is better)", r.split),
        20,
        12,
        &BLACK,
    );
    for i in 0..=4 {
        let v = ymax * i as f64 / 4.0;
        let y = py(v);
        let _ = root.draw(&PathElement::new(vec![(x0 - 4, y), (x0, y)], axis));
        plot::text(&root, &format!("{v:.0}"), x0 - 60, y - 4, &BLACK);
    }
    let group = pw / n as i32;
    let bar = (group - 20) / series.len() as i32;
    for (g, row) in r.rows.iter().enumerate() {
        let gx = x0 + g as i32 * group + 10;
        for k in 0..series.len() {
            let v = value(row, k);
            if !v.is_finite() {
                continue;
            }
            let x = gx + k as i32 * bar;
            let color = PALETTE[k % PALETTE.len()];
            let _ = root.draw(&Rectangle::new(
                [(x, py(v)), (x + bar - 2, y0 + ph)],
                color.filled(),
            ));
        }
        let name: String = row
            .domain
            .chars()
            .take((group / 8).max(4) as usize)
            .collect();
        plot::text(&root, &name, gx, y0 + ph + 8, &BLACK);
    }
    for (k, s) in series.iter().enumerate() {
        let (x, y) = (
            x0 + (k as i32 % 3) * 200,
            y0 + ph + 40 + (k as i32 / 3) * 20,
        );
        let color = PALETTE[k % PALETTE.len()];
        let _ = root.draw(&Rectangle::new([(x, y), (x + 12, y + 8)], color.filled()));
        plot::text(&root, s, x + 18, y, &BLACK);
    }
    root.present()
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

// ---- ensemble and average ----------------------------------------------------------------

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["text", "file"])))]
pub struct EnsembleArgs {
    /// The forest (directory or forest.json).
    #[arg(long, default_value = "runs/forest")]
    forest: PathBuf,
    /// Text to score, or the prompt with --generate.
    #[arg(long)]
    text: Option<String>,
    /// File whose text to score, or the prompt with --generate.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Generate this many tokens after the text instead of scoring it.
    #[arg(long)]
    generate: Option<usize>,
    /// Run only the k ELMs with the largest posterior on the text's first blocks.
    #[arg(long)]
    top_k: Option<usize>,
    /// Weights per position: posterior (the paper), prev-token, prior or uniform.
    #[arg(long, default_value = "posterior")]
    weighting: Weighting,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample from the k most likely tokens only (0: all).
    #[arg(long, default_value_t = 40)]
    sample_top_k: usize,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute device.
    #[arg(long, default_value = "cpu")]
    device: DeviceKind,
}

fn input_text(text: &Option<String>, file: &Option<PathBuf>) -> Result<String> {
    match (text, file) {
        (Some(t), _) => Ok(t.clone()),
        (None, Some(f)) => {
            let bytes = fsutil::read_limited(f, data::MAX_SPLIT_BYTES)?;
            String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8", f.display()))
        }
        (None, None) => bail!("pass --text or --file"),
    }
}

/// The cached prior of `tokens` over the forest (uniform when too short to say).
pub(crate) fn prior_on(
    forest: &Forest,
    tokens: &[u32],
    device: &burn::tensor::Device,
) -> Result<Vec<f64>> {
    let e = forest.elms.len();
    if tokens.len() < 2 {
        return Ok(vec![1.0 / e as f64; e]);
    }
    Ok(ensemble::cached_prior(
        forest,
        tokens,
        &PriorConfig {
            max_blocks: 16,
            ..PriorConfig::default()
        },
        8,
        device,
    )?)
}

#[derive(Debug, Serialize)]
struct Scored {
    tokens: u64,
    perplexity: f64,
    bits_per_byte: f64,
    members: Vec<(String, f64)>,
    single: Vec<(String, f64)>,
}

pub fn ensemble(a: EnsembleArgs, json: bool) -> Result<()> {
    let (forest, tok) = open_with_elms(&a.forest)?;
    let device = a.device.device()?;
    let text = input_text(&a.text, &a.file)?;
    let mut tokens = vec![btm_model::tokenizer::EOT_ID];
    tokens.extend(tok.encode(&text)?);
    let prior = if a.top_k.is_some() || a.weighting == Weighting::Prior {
        prior_on(&forest, &tokens, &device)?
    } else {
        vec![1.0 / forest.elms.len() as f64; forest.elms.len()]
    };
    let (ens, chosen) =
        Ensemble::from_forest(&forest, Some(&prior), a.top_k, a.weighting, &device)?;
    let members: Vec<(String, f64)> = chosen
        .iter()
        .map(|&i| (forest.elms[i].name.clone(), prior[i]))
        .collect();
    if let Some(n) = a.generate {
        let cfg = SampleConfig {
            max_new_tokens: n,
            temperature: a.temperature,
            top_k: (a.sample_top_k > 0).then_some(a.sample_top_k),
            seed: a.seed,
        };
        let out = ens.generate(&tok, &text, &cfg)?;
        if json {
            println!(
                "{}",
                serde_json::json!({"prompt": text, "generated": out, "members": members})
            );
        } else {
            println!("{text}{out}");
        }
        return Ok(());
    }
    if tokens.len() < 2 {
        bail!("the text is too short to score");
    }
    let r = ens.evaluate(Some(&tok), &tokens, 8)?;
    let single = forest
        .elms
        .iter()
        .enumerate()
        .map(|(i, e)| -> Result<(String, f64)> {
            let m = forest.load_elm(i, &device)?;
            Ok((
                e.name.clone(),
                eval::evaluate(&m, None, &tokens, 8, &device)?.perplexity,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let s = Scored {
        tokens: r.tokens,
        perplexity: r.perplexity,
        bits_per_byte: r.bits_per_byte,
        members,
        single,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!(
            "ensemble of {} ({} weighting): perplexity {:.2}, {:.4} bits/byte over {} tokens",
            s.members
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            a.weighting.name(),
            s.perplexity,
            s.bits_per_byte,
            s.tokens
        );
        for (n, p) in &s.single {
            println!("  ELM {n:<24} alone: perplexity {p:.2}");
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct AverageArgs {
    /// The forest (directory or forest.json).
    #[arg(long, default_value = "runs/forest")]
    forest: PathBuf,
    /// Weight the ELMs by their domain posterior on this text (default: uniform).
    #[arg(long)]
    target_text: Option<String>,
    /// Weight the ELMs by their domain posterior on this file's text.
    #[arg(long, conflicts_with = "target_text")]
    target_file: Option<PathBuf>,
    /// Average only the k ELMs with the largest weights.
    #[arg(long)]
    top_k: Option<usize>,
    /// Output directory: model.safetensors and tokenizer.json, usable by eval and generate.
    #[arg(long)]
    out: PathBuf,
    /// Compute device (for the posterior).
    #[arg(long, default_value = "cpu")]
    device: DeviceKind,
}

pub fn average(a: AverageArgs, json: bool) -> Result<()> {
    let (forest, tok) = open_with_elms(&a.forest)?;
    let targeted = a.target_text.is_some() || a.target_file.is_some();
    let prior = if targeted {
        let text = input_text(&a.target_text, &a.target_file)?;
        let mut tokens = vec![btm_model::tokenizer::EOT_ID];
        tokens.extend(tok.encode(&text)?);
        prior_on(&forest, &tokens, &a.device.device()?)?
    } else {
        vec![1.0; forest.elms.len()]
    };
    let sel = btm_model::forest::posterior::top_k(&prior, a.top_k.unwrap_or(prior.len()));
    std::fs::create_dir_all(&a.out)?;
    let path = a.out.join(WEIGHTS_FILE);
    let summary = average::average_members(&forest, &sel, &path)?;
    tok.save(&a.out.join(TOKENIZER_FILE))?;
    let weights: Vec<(String, f64)> = sel
        .iter()
        .zip(&summary.weights)
        .map(|(&(i, _), &w)| (forest.elms[i].name.clone(), w))
        .collect();
    if json {
        println!(
            "{}",
            serde_json::json!({"out": path, "id": summary.id, "weights": weights})
        );
    } else {
        println!(
            "{} average of {} ELMs written to {} (blake3 {})",
            if targeted {
                "posterior-weighted"
            } else {
                "uniform"
            },
            weights.len(),
            path.display(),
            &summary.id[..16]
        );
        for (n, w) in &weights {
            println!("  {n:<24} {w:.3}");
        }
    }
    Ok(())
}

// ---- ui ----------------------------------------------------------------------------------

#[derive(Debug, Args)]
pub struct UiCmdArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Address of the web UI (loopback by default; port 0 picks a free one).
    #[arg(long, default_value = crate::ui::DEFAULT_ADDR)]
    addr: std::net::SocketAddr,
    /// The forest the forest page shows (from `btm-node fetch`; its report from `forest report`).
    #[arg(long, default_value = "runs/forest")]
    forest: PathBuf,
}

/// `btm-node ui`: a client node that follows the network (and verifies the ELMs it hears of)
/// and serves the web UI until stopped.
pub fn ui(a: UiCmdArgs, json: bool) -> Result<()> {
    let settings = client_settings(&a.net)?;
    net::runtime()?.block_on(net::run_node(
        &settings,
        "client",
        async |node, status, stop| {
            let reporter = Reporter::new("ui", json, Some(status.clone()));
            let ui = crate::ui::Ui::start(
                node,
                crate::ui::UiConfig {
                    addr: a.addr,
                    role: "client".into(),
                    data_dir: settings.data_dir.clone(),
                    forest: Some(a.forest.clone()),
                },
            )
            .await?;
            if !a.addr.ip().is_loopback() {
                reporter.line(format!(
                    "warning: the web UI listens on {}, reachable from other machines",
                    a.addr
                ));
            }
            reporter.line(format!("web UI on {} (Ctrl-C to stop)", ui.url()));
            let url = ui.url();
            status.update(|s| s.ui = Some(url));
            let events = ui.tee(reporter.events());
            events.phase(btm_roles::Phase::WaitingForRegistry);
            match btm_roles::wait_registry(node, settings.wait_registry, stop).await {
                Ok(None) => return Ok(()),
                Ok(Some(r)) => {
                    let r = r.record();
                    events.emit(btm_roles::Event::Registry {
                        version: r.version,
                        domains: r.domains.len(),
                        seed: r.seed.as_ref().map(|s| s.weights),
                        accepted: r.elms.iter().map(|e| e.record).collect(),
                    });
                }
                Err(e) => reporter.line(format!("{e}; serving the UI and still looking")),
            }
            btm_roles::serve(node, stop, &events).await?;
            drop(ui);
            Ok(())
        },
    ))
}
