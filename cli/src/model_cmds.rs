//! `train`, `eval`, `generate`, `export-hf` and `tokenizer`: single-model commands.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use btm_model::data::{self, Corpus, Mixture, Split};
use btm_model::device::DeviceKind;
use btm_model::eval::{self, EvalResult};
use btm_model::files::{TOKENIZER_FILE, WEIGHTS_FILE};
use btm_model::tokenizer::Tokenizer;
use btm_model::train::{StepStats, TrainConfig, Trainer};
use btm_model::{Gpt, Preset, weights};
use clap::Args;
use indicatif::ProgressBar;
use serde::Serialize;

use crate::sampling::GenerationArgs;
use crate::table::{left, line, num, right};

/// Where a model lives: a directory with `model.safetensors` and `tokenizer.json`, or a
/// weights file plus `--tokenizer` (default: `tokenizer.json` beside it).
pub(crate) fn resolve_model(path: &Path, tokenizer: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    let (w, t) = model_files(path);
    let t = tokenizer.map(Path::to_path_buf).unwrap_or(t);
    if !w.exists() {
        bail!(
            "no weights at {} (expected a model directory or a .safetensors file)",
            w.display()
        );
    }
    if !t.exists() {
        bail!("no tokenizer at {} (pass --tokenizer)", t.display());
    }
    Ok((w, t))
}

/// The weights and tokenizer files of a model directory, or of a weights file (the tokenizer
/// beside it).
pub(crate) fn model_files(path: &Path) -> (PathBuf, PathBuf) {
    if path.is_dir() {
        (path.join(WEIGHTS_FILE), path.join(TOKENIZER_FILE))
    } else {
        let dir = path.parent().unwrap_or(Path::new("."));
        (path.to_path_buf(), dir.join(TOKENIZER_FILE))
    }
}

/// A progress bar per training run, drawn from a trainer's per-update callback (nothing when
/// hidden, as with `--json`). A run's bar is cleared after its last update.
#[derive(Debug)]
pub(crate) struct TrainBar {
    shown: bool,
    run: String,
    bar: Option<ProgressBar>,
    ema_tps: Option<f64>,
}

/// A progress bar over the scorings of a command (`eval`, `forest eval`, `forest report`):
/// one position per scoring, the current one named in the message; hidden with `--json`.
#[derive(Debug)]
pub(crate) struct ScoreBar {
    bar: Option<ProgressBar>,
}

impl ScoreBar {
    pub(crate) fn new(shown: bool, scorings: u64) -> ScoreBar {
        let bar = shown.then(|| {
            let bar = ProgressBar::new(scorings);
            bar.set_style(crate::report::bar_style(
                "{spinner} score [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})",
            ));
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            bar
        });
        ScoreBar { bar }
    }

    /// Names the scoring that starts now.
    pub(crate) fn scoring(&self, what: impl Into<String>) {
        if let Some(b) = &self.bar {
            b.set_message(what.into());
        }
    }

    /// One scoring is done.
    pub(crate) fn done(&self) {
        if let Some(b) = &self.bar {
            b.inc(1);
        }
    }

    /// Runs `f` (which prints) with the bar hidden.
    pub(crate) fn suspend(&self, f: impl FnOnce()) {
        match &self.bar {
            Some(bar) => bar.suspend(f),
            None => f(),
        }
    }
}

impl Drop for ScoreBar {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl TrainBar {
    pub(crate) fn new(shown: bool) -> Self {
        TrainBar {
            shown,
            run: String::new(),
            bar: None,
            ema_tps: None,
        }
    }

    /// Shows update `s` of the run named `run` (a new name starts a new bar).
    pub(crate) fn update(&mut self, run: &str, s: &StepStats) {
        if !self.shown {
            return;
        }
        if self.bar.is_none() || self.run != run {
            self.finish();
            let bar = ProgressBar::new(s.steps);
            bar.set_style(crate::report::bar_style(&format!(
                "{{spinner}} {run} [{{bar:30}}] {{pos}}/{{len}} {{msg}} ({{elapsed}}<{{eta}})"
            )));
            self.run = run.to_string();
            self.bar = Some(bar);
            self.ema_tps = None;
        }
        let tps = self
            .ema_tps
            .map_or(s.tokens_per_s, |e| 0.9 * e + 0.1 * s.tokens_per_s);
        self.ema_tps = Some(tps);
        if let Some(bar) = &self.bar {
            bar.set_position(s.step);
            bar.set_message(format!("loss {:.3} lr {:.2e} {tps:.0} tok/s", s.loss, s.lr));
        }
        if s.step >= s.steps {
            self.finish();
        }
    }

    /// Runs `f` (which prints) with the current bar hidden.
    pub(crate) fn suspend(&self, f: impl FnOnce()) {
        match &self.bar {
            Some(bar) => bar.suspend(f),
            None => f(),
        }
    }

    /// Clears the current bar.
    pub(crate) fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn corpus(arg: &Option<PathBuf>) -> Corpus {
    arg.as_ref().map_or_else(Corpus::bundled, Corpus::new)
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Domain(s) to train on; several give a domain-balanced mix (as a seed LM uses).
    #[arg(long, value_delimiter = ',', default_value = "novels_austen")]
    pub(crate) domain: Vec<String>,
    /// Train on the balanced mix of all eight training domains (a seed LM).
    #[arg(long, conflicts_with = "domain")]
    pub(crate) seed_mix: bool,
    /// Architecture preset: tiny, small or gpt2-small.
    #[arg(long, default_value = "small")]
    pub(crate) preset: Preset,
    /// Optimiser updates.
    #[arg(long, default_value_t = 300)]
    pub(crate) steps: u64,
    /// Blocks per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub(crate) batch_size: usize,
    /// Micro-batches per update.
    #[arg(long, default_value_t = 1)]
    pub(crate) grad_accum: usize,
    /// Peak learning rate (the paper uses 5e-4 at 125M; small models like more).
    #[arg(long)]
    pub(crate) lr: Option<f64>,
    /// Fraction of updates spent warming up.
    #[arg(long, default_value_t = 0.08)]
    pub(crate) warmup_frac: f64,
    /// Global gradient-norm clip.
    #[arg(long, default_value_t = 0.1)]
    pub(crate) grad_clip: f64,
    /// Decoupled weight decay.
    #[arg(long, default_value_t = 0.1)]
    pub(crate) weight_decay: f64,
    /// Seed of the initialisation and the data order.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Checkpoint every this many updates (0: only at the end).
    #[arg(long, default_value_t = 50)]
    pub(crate) checkpoint_every: u64,
    /// Start from these weights (a model directory or .safetensors) instead of a fresh init.
    #[arg(long)]
    pub(crate) init: Option<PathBuf>,
    /// Tokenizer to use (default: the run's, the init model's, or a new one trained on the seed mix).
    #[arg(long)]
    pub(crate) tokenizer: Option<PathBuf>,
    /// Run directory (weights, tokenizer, checkpoint, summary). Rerunning resumes from its checkpoint.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Compute device: cpu, wgpu or cuda (the latter two need the matching cargo feature).
    #[arg(long, default_value = "cpu")]
    pub(crate) device: DeviceKind,
    /// Corpus root (default: $BTM_CORPUS, else the copy of data/corpus carried in btm-node).
    #[arg(long)]
    pub(crate) corpus: Option<PathBuf>,
    /// Tokens of the validation split to evaluate before and after training.
    #[arg(long, default_value_t = 16384)]
    pub(crate) eval_tokens: usize,
}

#[derive(Debug, Serialize)]
struct TrainSummary {
    domains: Vec<String>,
    preset: String,
    params: usize,
    steps: u64,
    tokens: u64,
    flops: f64,
    seconds: f64,
    tokens_per_s: f64,
    first_loss: Option<f32>,
    final_loss: Option<f64>,
    valid_before: EvalResult,
    valid_after: EvalResult,
    weights: PathBuf,
    weights_id: String,
    tokenizer_id: String,
}

pub fn train(a: TrainArgs, json: bool) -> Result<()> {
    let corpus = corpus(&a.corpus);
    let domains: Vec<String> = if a.seed_mix {
        data::TRAIN_DOMAINS.iter().map(|s| s.to_string()).collect()
    } else {
        a.domain.clone()
    };
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(if a.seed_mix {
            "seed".to_string()
        } else {
            domains.join("+")
        })
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let device = a.device.device()?;
    let say = |m: &str| {
        if !json {
            eprintln!("{m}");
        }
    };

    // Tokenizer: explicit, the run's own (resume), the init model's, or a fresh seed-mix one.
    let run_tok = out.join(TOKENIZER_FILE);
    let tok_path = a
        .tokenizer
        .clone()
        .or_else(|| run_tok.exists().then(|| run_tok.clone()))
        .or_else(|| {
            a.init
                .as_ref()
                .and_then(|p| resolve_model(p, None).ok())
                .map(|(_, t)| t)
        });
    let preset_cfg = a.preset.config();
    let tok = match tok_path {
        Some(p) => Tokenizer::load(&p)?,
        None => {
            say(&format!(
                "training a {}-token byte-level BPE on the seed mix...",
                preset_cfg.vocab_size
            ));
            data::seed_mix_tokenizer(&corpus, preset_cfg.vocab_size, 256 << 10)?
        }
    };
    tok.save(&run_tok)?;

    let model_cfg = preset_cfg.with_vocab(tok.vocab_size());
    let model = match &a.init {
        Some(p) => {
            let (w, _) = resolve_model(p, None)?;
            say(&format!("branching from {}", w.display()));
            weights::load(&w, Some(&model_cfg), &device)?
        }
        None => Gpt::init(&model_cfg, a.seed, &device),
    };

    say(&format!(
        "tokenising {} ({} tokens of context)...",
        domains.join(", "),
        model_cfg.n_ctx
    ));
    let names: Vec<&str> = domains.iter().map(String::as_str).collect();
    let streams = data::load_streams(&corpus, &tok, &names, Split::Train, model_cfg.n_ctx, None)?;
    let mixture = Mixture::new(streams, a.seed)?;
    let valid = valid_tokens(&corpus, &tok, &names, a.eval_tokens)?;
    let before = eval::evaluate(&model, Some(&tok), &valid, 8, &device)?;

    let lr = a.lr.unwrap_or(match a.preset {
        Preset::Tiny => 2e-3,
        Preset::Small => 1e-3,
        Preset::Gpt2Small => 5e-4,
    });
    let cfg = TrainConfig {
        steps: a.steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        lr,
        warmup_frac: a.warmup_frac,
        grad_clip: a.grad_clip,
        weight_decay: a.weight_decay,
        seed: a.seed,
        checkpoint_every: a.checkpoint_every,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(model, cfg, &device, Some(&out))?;
    if trainer.state.step > 0 {
        say(&format!(
            "resuming {} at update {}/{}",
            out.display(),
            trainer.state.step,
            a.steps
        ));
    }
    say(&format!(
        "training {} ({} parameters) on {} for {} updates of {} tokens on {}",
        a.preset,
        model_cfg.num_params(),
        domains.join(", "),
        a.steps,
        trainer.state.config.tokens_per_step(model_cfg.n_ctx),
        a.device
    ));
    let mut bar = TrainBar::new(!json);
    let started = Instant::now();
    let start_tokens = trainer.state.tokens;
    trainer.run_to_end(&mixture, |s| bar.update("train", s))?;
    bar.finish();
    let secs = started.elapsed().as_secs_f64();
    let model = trainer.model();
    let weights_path = out.join(WEIGHTS_FILE);
    weights::save(&model, &weights_path)?;
    let after = eval::evaluate(&model, Some(&tok), &valid, 8, &device)?;
    let weights_id = btm_model::content_id(&std::fs::read(&weights_path)?);
    let summary = TrainSummary {
        domains,
        preset: a.preset.to_string(),
        params: model_cfg.num_params(),
        steps: trainer.state.step,
        tokens: trainer.state.tokens,
        flops: trainer.state.flops,
        seconds: secs,
        tokens_per_s: (trainer.state.tokens - start_tokens) as f64 / secs.max(1e-9),
        first_loss: trainer.state.losses.first().copied(),
        final_loss: trainer.state.last_loss,
        valid_before: before,
        valid_after: after,
        weights: weights_path,
        weights_id,
        tokenizer_id: tok.id(),
    };
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "\ntrained {} updates, {} tokens, {:.2e} FLOPs in {:.0}s ({:.0} tokens/s)",
            summary.steps, summary.tokens, summary.flops, secs, summary.tokens_per_s
        );
        let cols = [left(12), right(10), right(10), right(8)];
        println!("{}", line(&cols, &["valid", "loss", "ppl", "bpb"]));
        for (what, r) in [("before", &before), ("after", &after)] {
            let cells = [
                what,
                &num(r.loss, 4),
                &num(r.perplexity, 2),
                &num(r.bits_per_byte, 4),
            ];
            println!("{}", line(&cols, &cells));
        }
        println!(
            "weights: {} (blake3 {})",
            summary.weights.display(),
            &summary.weights_id[..16]
        );
    }
    Ok(())
}

/// The first `max_tokens` tokens of each domain's validation split, concatenated per domain.
fn valid_tokens(
    corpus: &Corpus,
    tok: &Tokenizer,
    domains: &[&str],
    max_tokens: usize,
) -> Result<Vec<u32>> {
    let per = (max_tokens / domains.len().max(1)).max(2);
    let mut out = Vec::new();
    for d in domains {
        let docs = corpus.documents(d, Split::Valid)?;
        let (mut t, _) = data::tokenize_documents(tok, &docs, Some(per * 8))?;
        t.truncate(per);
        out.extend(t);
    }
    Ok(out)
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model directory (model.safetensors + tokenizer.json) or a .safetensors file.
    #[arg(long)]
    model: PathBuf,
    /// Tokenizer, when not beside the weights.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Domains to evaluate (default: all twelve of the corpus).
    #[arg(long, value_delimiter = ',')]
    domain: Vec<String>,
    /// Split.
    #[arg(long, default_value = "valid")]
    split: Split,
    /// Tokens per domain at most (0: the whole split).
    #[arg(long, default_value_t = 16384)]
    max_tokens: usize,
    /// Blocks per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Compute device.
    #[arg(long, default_value = "cpu")]
    device: DeviceKind,
    /// Corpus root (default: $BTM_CORPUS, else the copy of data/corpus carried in btm-node).
    #[arg(long)]
    corpus: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct EvalRow {
    domain: String,
    split: Split,
    #[serde(flatten)]
    result: EvalResult,
}

pub fn eval(a: EvalArgs, json: bool) -> Result<()> {
    let corpus = corpus(&a.corpus);
    let (w, t) = resolve_model(&a.model, a.tokenizer.as_deref())?;
    let device = a.device.device()?;
    let tok = Tokenizer::load(&t)?;
    let model = weights::load(&w, None, &device)?;
    if model.config().vocab_size != tok.vocab_size() {
        bail!(
            "the model has {} tokens but the tokenizer {}: they do not belong together",
            model.config().vocab_size,
            tok.vocab_size()
        );
    }
    let domains: Vec<String> = if a.domain.is_empty() {
        data::TRAIN_DOMAINS
            .iter()
            .chain(data::EVAL_DOMAINS.iter())
            .map(|s| s.to_string())
            .collect()
    } else {
        a.domain.clone()
    };
    let mut rows = Vec::new();
    let bar = ScoreBar::new(!json, domains.len() as u64);
    for d in &domains {
        bar.scoring(d.as_str());
        let docs = corpus.documents(d, a.split)?;
        let limit = (a.max_tokens > 0).then_some(a.max_tokens * 8);
        let (mut tokens, _) = data::tokenize_documents(&tok, &docs, limit)?;
        if a.max_tokens > 0 {
            tokens.truncate(a.max_tokens + 1);
        }
        let result = eval::evaluate(&model, Some(&tok), &tokens, a.batch_size, &device)?;
        bar.done();
        if !json {
            bar.suspend(|| eprintln!("{d}: ppl {:.2}", result.perplexity));
        }
        rows.push(EvalRow {
            domain: d.clone(),
            split: a.split,
            result,
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        let cols = [left(20), right(8), right(10), right(10), right(8)];
        println!(
            "{}",
            line(&cols, &["domain", "split", "tokens", "ppl", "bpb"])
        );
        for r in &rows {
            let cells = [
                r.domain.as_str(),
                &r.split.to_string(),
                &r.result.tokens.to_string(),
                &num(r.result.perplexity, 2),
                &num(r.result.bits_per_byte, 4),
            ];
            println!("{}", line(&cols, &cells));
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
#[command(mut_arg("sample_top_k", |a| a.long("top-k").value_name("TOP_K")))]
pub struct GenerateArgs {
    /// Model directory or .safetensors file.
    #[arg(long)]
    model: PathBuf,
    /// Tokenizer, when not beside the weights.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Text to continue.
    #[arg(long, default_value = "")]
    prompt: String,
    #[command(flatten)]
    sampling: GenerationArgs,
    /// Compute device.
    #[arg(long, default_value = "cpu")]
    device: DeviceKind,
}

pub fn generate(a: GenerateArgs, json: bool) -> Result<()> {
    let (w, t) = resolve_model(&a.model, a.tokenizer.as_deref())?;
    let device = a.device.device()?;
    let tok = Tokenizer::load(&t)?;
    let model = weights::load(&w, None, &device)?;
    let cfg = a.sampling.config();
    let text = btm_model::generate::generate(&model, &tok, &a.prompt, &cfg, &device)?;
    print_completion(json, &a.prompt, &text, ("settings", serde_json::json!(cfg)));
    Ok(())
}

/// Prints a completion after its prompt, or with `json` one object: the prompt, the completion
/// and one more field, `extra`.
pub(crate) fn print_completion(
    json: bool,
    prompt: &str,
    completion: &str,
    extra: (&str, serde_json::Value),
) {
    if json {
        let mut out = serde_json::json!({"prompt": prompt, "completion": completion});
        out[extra.0] = extra.1;
        println!("{out}");
    } else {
        println!("{prompt}{completion}");
    }
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Model directory or .safetensors file.
    #[arg(long)]
    model: PathBuf,
    /// Tokenizer, when not beside the weights.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Output directory (model.safetensors, config.json, tokenizer.json).
    #[arg(long)]
    out: PathBuf,
}

pub fn export_hf(a: ExportArgs, json: bool) -> Result<()> {
    let (w, t) = resolve_model(&a.model, a.tokenizer.as_deref())?;
    let device = DeviceKind::Cpu.device()?;
    let tok = Tokenizer::load(&t)?;
    let model = weights::load(&w, None, &device)?;
    weights::export_hf(&model, Some(tok.json()), &a.out)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"out": a.out, "config": model.config().to_hf_config()})
        );
    } else {
        println!(
            "wrote {} (load with transformers.GPT2LMHeadModel.from_pretrained)",
            a.out.display()
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct TokenizerArgs {
    /// Vocabulary size, the end-of-text token and the 256 byte tokens included.
    #[arg(long, default_value_t = 4096)]
    vocab: usize,
    /// Bytes of each training domain's train split to learn from.
    #[arg(long, default_value_t = 262144)]
    bytes_per_domain: usize,
    /// Output file.
    #[arg(long, default_value = TOKENIZER_FILE)]
    out: PathBuf,
    /// Corpus root (default: $BTM_CORPUS, else the copy of data/corpus carried in btm-node).
    #[arg(long)]
    corpus: Option<PathBuf>,
}

pub fn tokenizer(a: TokenizerArgs, json: bool) -> Result<()> {
    let tok = data::seed_mix_tokenizer(&corpus(&a.corpus), a.vocab, a.bytes_per_domain)?;
    tok.save(&a.out)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"out": a.out, "vocab_size": tok.vocab_size(), "id": tok.id()})
        );
    } else {
        println!(
            "wrote {} ({} tokens, blake3 {})",
            a.out.display(),
            tok.vocab_size(),
            tok.id()
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Architecture preset.
    #[arg(long, default_value = "small")]
    preset: Preset,
    /// Blocks per step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Measured steps.
    #[arg(long, default_value_t = 12)]
    steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Also measure an n×n f32 matrix product (0: skip).
    #[arg(long, default_value_t = 2048)]
    matmul: usize,
    /// Compute device.
    #[arg(long, default_value = "cpu")]
    device: DeviceKind,
}

pub fn bench(a: BenchArgs, json: bool) -> Result<()> {
    let device = a.device.device()?;
    let backend = match a.device {
        DeviceKind::Cpu => "burn-flex".to_string(),
        other => format!("burn-{other}"),
    };
    let peak = (a.matmul > 0).then(|| btm_model::bench::matmul_gflops(a.matmul, 5, &device));
    let r = btm_model::bench::train_throughput(
        &a.preset.config(),
        a.batch,
        a.steps,
        a.warmup,
        &device,
        &backend,
    )?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "train": r,
                "matmul_gflops": peak,
                "matmul_n": a.matmul,
                "cpu_kernels": btm_model::bench::cpu_kernels(),
            })
        );
    } else {
        for (i, ms) in r.steps_ms.iter().enumerate() {
            println!("step {i}: {ms:.1} ms");
        }
        if let Some(p) = peak {
            println!("MATMUL n={} gflops={p:.1}", a.matmul);
        }
        if matches!(a.device, DeviceKind::Cpu) {
            println!("KERNELS {}", btm_model::bench::cpu_kernels());
        }
        println!(
            "RESULT backend={} tokens_per_s={:.0} step_ms={:.1} gflops={:.1} params={}",
            r.backend, r.tokens_per_s, r.step_ms, r.gflops, r.params
        );
    }
    Ok(())
}
