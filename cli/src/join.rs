//! `btm-node join`: a volunteer. Joins the network, verifies the registry, downloads the seed
//! and its domain's data by content id, claims a domain (renewing the lease while it trains),
//! branches, trains with checkpoints, measures its ELM the way verifiers will, announces it,
//! and keeps serving blobs and verifying other peers' ELMs until stopped.
//!
//! Everything a restart needs is in the data directory: `join.json` (the domain this node
//! works on and, once announced, its ELM record), `runs/<domain>/` (the training run with its
//! checkpoint and `branch.json`). Stopped with Ctrl-C or killed, the next start resumes the same
//! claim from the last checkpoint.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use btm_model::data::{DomainStream, Mixture};
use btm_model::device::DeviceKind;
use btm_model::forest::manifest::InitKind;
use btm_model::forest::{Forest, branch, ensemble, posterior};
use btm_model::tokenizer::Tokenizer;
use btm_model::train::{CHECKPOINT_FILE, TrainConfig, Trainer};
use btm_model::{fsutil, weights};
use btm_net::claims::{self, Choice};
use btm_net::verify::{self, Verifier};
use btm_net::{Node, Observed};
use btm_protocol::{
    ContentId, ElmRecord, Parent, Registry, SeedManifest, Signed, Verdict, ppl_to_milli,
};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::net::{self, ConfigFile, NetArgs, NodeSettings, Say, StatusFile, Stop, short};

/// How a new ELM is initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BranchMode {
    /// The posterior-weighted average of the registry's accepted ELMs when it lists any on other
    /// domains, else the seed.
    Auto,
    /// A copy of the seed.
    Seed,
    /// The posterior-weighted average of the registry's accepted ELMs (an error if there are none).
    Average,
}

#[derive(Debug, Args)]
pub struct JoinArgs {
    #[command(flatten)]
    pub net: NetArgs,
    /// Domain to claim (default: a domain of the registry with no ELM yet that nobody else has
    /// claimed; waits for a lease to lapse when all are claimed).
    #[arg(long)]
    pub domain: Option<String>,
    /// Compute device for training: cpu, wgpu or cuda (the latter two need the cargo feature).
    #[arg(long)]
    pub device: Option<DeviceKind>,
    /// Optimiser updates of the ELM.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Blocks per update.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate (default: by model width, 2e-3 for tiny, 1e-3 for small, 5e-4 beyond).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Checkpoint every this many updates.
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// How to branch: auto, seed or average.
    #[arg(long, default_value = "auto")]
    pub branch: BranchMode,
    /// ELMs averaged when branching from an average (the largest posterior weights).
    #[arg(long, default_value_t = 3)]
    pub branch_top_k: usize,
    /// Lease of the domain claim, in seconds (renewed while training).
    #[arg(long)]
    pub lease_secs: Option<u64>,
    /// Exit once the ELM is announced instead of serving and verifying until stopped.
    #[arg(long)]
    pub exit_after_announce: bool,
}

/// `join.json`: what this data directory is working on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct JoinState {
    /// The network (root id) this directory belongs to.
    network: String,
    domain: Option<String>,
    /// The announced ELM record envelope, hex.
    announced: Option<String>,
}

impl JoinState {
    fn load(path: &Path) -> Result<JoinState> {
        if !path.exists() {
            return Ok(JoinState::default());
        }
        let bytes = fsutil::read_limited(path, 1 << 20)?;
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is damaged; move it away to start over in this data directory",
                path.display()
            )
        })
    }

    fn save(&self, path: &Path) -> Result<()> {
        fsutil::write_atomic(path, &serde_json::to_vec_pretty(self)?)?;
        Ok(())
    }
}

/// `runs/<domain>/branch.json`: how the run was initialised (kept so a resumed run announces
/// the same parents).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BranchRecord {
    init: InitKind,
    /// (weights id hex, weight)
    parents: Vec<(String, f64)>,
    /// Names of the parents (seed, or the domains of averaged ELMs).
    names: Vec<String>,
}

struct TrainJob {
    run_dir: PathBuf,
    registry: Registry,
    domain: String,
    seed: SeedManifest,
    seed_weights: Vec<u8>,
    tokenizer: Vec<u8>,
    train_data: Vec<u8>,
    valid_data: Vec<u8>,
    /// Accepted ELMs to average from: (domain, weights id, bytes).
    parents: Vec<(String, ContentId, Vec<u8>)>,
    top_k: usize,
    cfg: TrainConfig,
    device: DeviceKind,
    progress: bool,
}

struct Trained {
    weights: Vec<u8>,
    branch: BranchRecord,
    steps: u64,
    tokens: u64,
    flops: f64,
    ppl: f64,
    seed_ppl: f64,
}

enum TrainOutcome {
    Done(Box<Trained>),
    Stopped { step: u64 },
}

fn default_lr(d_model: u32) -> f64 {
    match d_model {
        0..=128 => 2e-3,
        129..=512 => 1e-3,
        _ => 5e-4,
    }
}

pub fn join(a: JoinArgs, json: bool) -> Result<()> {
    let config = ConfigFile::load(a.net.config.as_deref())?;
    let mut settings = NodeSettings::resolve(&a.net, &config, "runs/node")?;
    if let Some(l) = a.lease_secs {
        settings.lease_secs = Some(l);
    }
    net::runtime()?.block_on(run(a, config, settings, json))
}

async fn run(a: JoinArgs, config: ConfigFile, settings: NodeSettings, json: bool) -> Result<()> {
    let say = Say::new("join", json);
    net::run_node(&settings, "volunteer", async |node, status, stop| {
        let addrs = node.listen_addrs().await.unwrap_or_default();
        say.line(format!(
            "node {} up in {} ({} peers to dial)",
            short(node.node_id().as_bytes()),
            settings.data_dir.display(),
            settings.bootstrap.len()
        ));
        status.update(|s| {
            s.phase = "waiting for the registry".into();
            s.listen = addrs.iter().map(ToString::to_string).collect();
        });
        work(&a, &config, &settings, node, status, stop, &say).await
    })
    .await
}

#[allow(clippy::too_many_arguments)]
async fn work(
    a: &JoinArgs,
    config: &ConfigFile,
    settings: &NodeSettings,
    node: &Node,
    status: &StatusFile,
    stop: &Stop,
    say: &Say,
) -> Result<()> {
    let Some(registry) = net::wait_registry(node, settings.wait_registry, stop).await? else {
        return Ok(());
    };
    let reg = registry.record().clone();
    let seed = reg.seed.clone().context("the registry has no seed")?;
    say.line(format!(
        "registry v{} verified: {} domains, seed {} ({} layers, d={}), {} accepted ELMs",
        reg.version,
        reg.domains.len(),
        short(&seed.weights.0),
        seed.architecture.layers,
        seed.architecture.d_model,
        reg.elms.len()
    ));

    let state_path = settings.data_dir.join("join.json");
    let mut state = JoinState::load(&state_path)?;
    let network = net::to_hex(&node.client().network().0.0);
    if !state.network.is_empty() && state.network != network {
        bail!(
            "{} belongs to another network; use another --data-dir",
            settings.data_dir.display()
        );
    }
    state.network = network;
    let wanted = a.domain.clone().or_else(|| config.domain.clone());
    if let (Some(w), Some(d)) = (&wanted, &state.domain)
        && w != d
    {
        bail!(
            "this data directory works on {d:?} (join.json), not {w:?}: use another --data-dir, or drop --domain"
        );
    }

    // Already announced: announce again (refreshes the DHT) and serve.
    if let Some(hex) = &state.announced {
        let envelope = Signed::<ElmRecord>::decode(&net::from_hex(hex)?)
            .context("join.json holds a damaged ELM record")?;
        let domain = envelope.record().domain.clone();
        say.line(format!(
            "resuming: ELM {} on {domain} was announced before; announcing again",
            short(&envelope.id().0)
        ));
        node.announce_signed(&envelope)
            .await
            .context("announcing the ELM again")?;
        status.update(|s| {
            s.domain = Some(domain);
            s.elm = Some(net::to_hex(&envelope.id().0));
            s.phase = "serving".into();
        });
        return serve(a, node, status, stop, say).await;
    }

    // A domain: the remembered one, the asked one, or an open one.
    let domain = match state.domain.clone().or(wanted) {
        Some(d) => {
            if reg.domain(&d).is_none() {
                let names: Vec<&str> = reg.domains.iter().map(|d| d.name.as_str()).collect();
                bail!(
                    "domain {d:?} is not in the registry (it has: {})",
                    names.join(", ")
                );
            }
            node.claim(Some(&d))
                .await
                .with_context(|| format!("claiming {d}"))?;
            d
        }
        None => match claim_open_domain(node, &reg, status, stop, say).await? {
            Some(d) => d,
            None => return Ok(()),
        },
    };
    state.domain = Some(domain.clone());
    state.save(&state_path)?;
    let lease = settings.lease_secs.unwrap_or(15 * 60);
    say.line(format!(
        "claimed {domain} (lease {lease} s, renewed while training)"
    ));
    status.update(|s| {
        s.domain = Some(domain.clone());
        s.phase = "downloading".into();
    });
    let renewer = tokio::spawn(renew(node.clone(), domain.clone(), lease, say.clone()));

    let result = train_and_announce(
        a, config, settings, node, &reg, &seed, &domain, status, stop, say,
    )
    .await;
    renewer.abort();
    match result? {
        Some(envelope) => {
            state.announced = Some(net::to_hex(&envelope.encode()));
            state.save(&state_path)?;
            if a.exit_after_announce {
                return Ok(());
            }
            serve(a, node, status, stop, say).await
        }
        None => Ok(()),
    }
}

/// Claims a domain nobody else holds, waiting while all open ones are claimed; steps aside when
/// another node claimed the same domain at the same moment and keeps it.
async fn claim_open_domain(
    node: &Node,
    reg: &Registry,
    status: &StatusFile,
    stop: &Stop,
    say: &Say,
) -> Result<Option<String>> {
    let me = node.node_id();
    let mut told = false;
    let mut lost: BTreeSet<String> = BTreeSet::new();
    loop {
        let _ = node.sync().await;
        let done = domains_with_elms(node, reg)?;
        let mut skip = done.clone();
        skip.extend(lost.iter().cloned());
        let board = node.board(reg)?;
        let now = btm_net::limits::now_secs();
        match claims::choose_open_domain(&board, reg, &me, now, &skip) {
            Choice::Free(d) => {
                node.claim(Some(&d))
                    .await
                    .with_context(|| format!("claiming {d}"))?;
                // Claims travel in about a second; look again before starting.
                if net::sleep_or_stop(stop, Duration::from_secs(3)).await {
                    return Ok(None);
                }
                let _ = node.sync().await;
                let board = node.board(reg)?;
                match claims::keeper(&board, &d, btm_net::limits::now_secs()) {
                    Some(k) if k != me => {
                        say.line(format!(
                            "{d} was claimed by {} at the same time; it keeps it, choosing again",
                            short(k.as_bytes())
                        ));
                        lost.insert(d);
                    }
                    _ => return Ok(Some(d)),
                }
            }
            Choice::AllClaimed => {
                if !told {
                    say.line(
                        "every domain without an ELM is claimed; waiting for a lease to lapse",
                    );
                    status.update(|s| s.phase = "waiting for a free domain".into());
                    told = true;
                }
                lost.clear();
                if net::sleep_or_stop(stop, Duration::from_secs(2)).await {
                    return Ok(None);
                }
            }
            Choice::AllDone => bail!(
                "every domain of the registry already has an ELM; pass --domain to train another one for a domain"
            ),
        }
    }
}

/// Domains with an ELM accepted in the registry or accepted by this node's verification.
fn domains_with_elms(node: &Node, reg: &Registry) -> Result<BTreeSet<String>> {
    let mut done: BTreeSet<String> = reg.elms.iter().map(|e| e.domain.clone()).collect();
    done.extend(
        own_verdicts(node)?
            .into_iter()
            .filter(|(_, verdict)| *verdict == Some(true))
            .map(|(e, _)| e.record().domain.clone()),
    );
    Ok(done)
}

/// Renews the claim every quarter lease.
async fn renew(node: Node, domain: String, lease: u64, say: Say) {
    let every = Duration::from_secs((lease / 4).max(1));
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = node.claim(Some(&domain)).await {
            say.line(format!(
                "renewing the claim on {domain} failed: {e} (will retry)"
            ));
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn train_and_announce(
    a: &JoinArgs,
    config: &ConfigFile,
    settings: &NodeSettings,
    node: &Node,
    reg: &Registry,
    seed: &SeedManifest,
    domain: &str,
    status: &StatusFile,
    stop: &Stop,
    say: &Say,
) -> Result<Option<Signed<ElmRecord>>> {
    let d = reg.domain(domain).context("domain vanished")?.clone();
    let max = btm_net::blobs::BlobConfig::default().max_blob_bytes;
    let mut fetched = Vec::new();
    for (what, id) in [
        ("seed weights", seed.weights),
        ("tokenizer", seed.tokenizer),
        ("training data", d.train),
        ("validation data", d.valid),
    ] {
        say.line(format!("fetching the {what} ({})", short(&id.0)));
        let f = node
            .fetch_blob(id, &[])
            .await
            .with_context(|| format!("downloading the {what} {id}"))?;
        let _ = f;
        fetched.push(node.blobs().read(&id, max).await?);
    }
    let valid_data = fetched.pop().unwrap_or_default();
    let train_data = fetched.pop().unwrap_or_default();
    let tokenizer = fetched.pop().unwrap_or_default();
    let seed_weights = fetched.pop().unwrap_or_default();

    let run_dir = settings.data_dir.join("runs").join(domain);
    std::fs::create_dir_all(&run_dir)?;
    let resuming = run_dir.join(CHECKPOINT_FILE).exists();
    let others: Vec<_> = reg.elms.iter().filter(|e| e.domain != domain).collect();
    let average = !resuming
        && match a.branch {
            BranchMode::Seed => false,
            BranchMode::Auto => !others.is_empty(),
            BranchMode::Average => {
                if others.is_empty() {
                    bail!("--branch average: the registry lists no accepted ELMs on other domains");
                }
                true
            }
        };
    let mut parents = Vec::new();
    if average {
        for e in &others {
            say.line(format!(
                "fetching accepted ELM {} ({}) to branch from",
                short(&e.record.0),
                e.domain
            ));
            node.fetch_blob(e.weights, &[])
                .await
                .with_context(|| format!("downloading ELM weights {}", e.weights))?;
            parents.push((
                e.domain.clone(),
                e.weights,
                node.blobs().read(&e.weights, max).await?,
            ));
        }
    }

    let t = &config.train;
    let cfg = TrainConfig {
        steps: a.steps.or(t.steps).unwrap_or(300),
        batch_size: a.batch_size.or(t.batch_size).unwrap_or(8),
        lr: a
            .lr
            .or(t.lr)
            .unwrap_or_else(|| default_lr(seed.architecture.d_model)),
        checkpoint_every: a.checkpoint_every.or(t.checkpoint_every).unwrap_or(25),
        seed: t.seed.unwrap_or(0),
        ..TrainConfig::default()
    };
    let device = match (a.device, &config.device) {
        (Some(d), _) => d,
        (None, Some(s)) => s
            .parse()
            .map_err(|e| anyhow::anyhow!("config device: {e}"))?,
        (None, None) => DeviceKind::Cpu,
    };
    status.update(|s| {
        s.phase = "training".into();
        s.steps = cfg.steps;
    });
    let job = TrainJob {
        run_dir,
        registry: reg.clone(),
        domain: domain.to_string(),
        seed: seed.clone(),
        seed_weights,
        tokenizer,
        train_data,
        valid_data,
        parents,
        top_k: a.branch_top_k.max(1),
        cfg,
        device,
        progress: !say.quiet(),
    };
    let flag = stop.flag();
    let st = status.clone();
    let sy = say.clone();
    let outcome = tokio::task::spawn_blocking(move || train_blocking(job, &flag, &st, &sy))
        .await
        .context("the training task")??;
    let trained = match outcome {
        TrainOutcome::Stopped { step } => {
            say.line(format!(
                "stopped at update {step}; run the same command again to resume from the checkpoint"
            ));
            status.update(|s| s.phase = "stopped".into());
            return Ok(None);
        }
        TrainOutcome::Done(t) => t,
    };
    say.line(format!(
        "trained: validation perplexity {:.2} (seed {:.2}) on {domain}",
        trained.ppl, trained.seed_ppl
    ));
    if trained.ppl >= trained.seed_ppl {
        bail!(
            "the ELM ({:.2}) does not beat the seed ({:.2}) on {domain}: every verifier would reject it; \
             train longer (--steps) or with another learning rate (--lr), in a fresh --data-dir",
            trained.ppl,
            trained.seed_ppl
        );
    }
    let claimed = ppl_to_milli(trained.ppl).context("perplexity out of range")?;
    let record = ElmRecord {
        domain: domain.to_string(),
        parents: trained
            .branch
            .parents
            .iter()
            .map(|(id, w)| -> Result<Parent> {
                Ok(Parent {
                    weights: ContentId(
                        net::from_hex(id)?
                            .try_into()
                            .map_err(|_| anyhow::anyhow!("bad parent id"))?,
                    ),
                    weight_ppm: (w * 1e6).round().clamp(0.0, 1e6) as u32,
                })
            })
            .collect::<Result<_>>()?,
        weights: ContentId::of(&trained.weights),
        architecture: seed.architecture.id(),
        tokenizer: seed.tokenizer,
        steps: trained.steps,
        tokens: trained.tokens,
        flops: trained.flops.max(0.0) as u64,
        claimed_valid_ppl_milli: claimed,
        trainer: node.node_id(),
    };
    let envelope = node
        .announce(record, trained.weights.clone())
        .await
        .context("announcing the ELM")?;
    say.line(format!(
        "announced ELM {} on {domain}: weights {} served from this node",
        short(&envelope.id().0),
        short(&envelope.record().weights.0)
    ));
    status.update(|s| {
        s.phase = "serving".into();
        s.elm = Some(net::to_hex(&envelope.id().0));
        s.claimed_ppl = Some(trained.ppl);
        s.seed_ppl = Some(trained.seed_ppl);
    });
    Ok(Some(envelope))
}

fn documents_stream(tok: &Tokenizer, data: &[u8], domain: &str, n_ctx: usize) -> Result<Vec<u32>> {
    let docs = verify::parse_documents(data).map_err(|e| anyhow::anyhow!("{domain} data: {e}"))?;
    let (tokens, _) = btm_model::data::tokenize_documents(tok, &docs, None)?;
    if tokens.len() < n_ctx + 2 {
        bail!("{domain}'s training data has only {} tokens", tokens.len());
    }
    Ok(tokens)
}

fn train_blocking(
    job: TrainJob,
    stop: &Arc<AtomicBool>,
    status: &StatusFile,
    say: &Say,
) -> Result<TrainOutcome> {
    let device = job.device.device()?;
    let tok = Tokenizer::from_bytes(&job.tokenizer)?;
    let arch = verify::config_of(&job.seed.architecture);
    let seed_model = {
        let (cfg, tensors) = weights::parse(&job.seed_weights, Some(&arch))?;
        weights::from_named_tensors(&cfg, tensors, &device)?
    };
    let branch_path = job.run_dir.join("branch.json");
    let resuming = job.run_dir.join(CHECKPOINT_FILE).exists() && branch_path.exists();
    let (init_model, branch) = if resuming {
        let b: BranchRecord = serde_json::from_slice(&fsutil::read_limited(&branch_path, 1 << 20)?)
            .context("branch.json is damaged")?;
        (seed_model, b)
    } else if job.parents.is_empty() {
        let b = BranchRecord {
            init: InitKind::Seed,
            parents: vec![(net::to_hex(&job.seed.weights.0), 1.0)],
            names: vec!["seed".into()],
        };
        (seed_model, b)
    } else {
        posterior_branch(&job, &tok, &arch, &device, say)?
    };
    if !resuming {
        fsutil::write_atomic(&branch_path, &serde_json::to_vec_pretty(&branch)?)?;
    }
    let branch_desc = format!(
        "{} ({})",
        match branch.init {
            InitKind::Seed => "from the seed",
            InitKind::PosteriorAverage => "from the posterior-weighted average",
            InitKind::Random => "from a random initialisation",
        },
        branch
            .names
            .iter()
            .zip(&branch.parents)
            .map(|(n, (_, w))| format!("{n} {w:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    status.update(|s| s.branch = Some(branch_desc.clone()));

    let tokens = documents_stream(&tok, &job.train_data, &job.domain, arch.n_ctx)?;
    let stream = DomainStream::new(job.domain.clone(), tokens, arch.n_ctx)?;
    let data = Mixture::new(vec![stream], job.cfg.seed)?;
    let mut trainer = Trainer::new(init_model, job.cfg.clone(), &device, Some(&job.run_dir))?;
    let start = trainer.state.step;
    if start > 0 {
        say.line(format!(
            "resuming {} at update {start}/{} from its checkpoint",
            job.run_dir.display(),
            job.cfg.steps
        ));
        status.update(|s| s.resumed_from = Some(start));
    } else {
        say.line(format!(
            "branching {branch_desc}; training {} updates of {} tokens on {}",
            job.cfg.steps,
            job.cfg.tokens_per_step(arch.n_ctx),
            job.domain
        ));
    }
    let bar = if job.progress {
        let bar = indicatif::ProgressBar::new(job.cfg.steps);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} train [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_position(start);
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let every = job.cfg.checkpoint_every;
    while !trainer.finished() {
        if stop.load(Ordering::SeqCst) {
            trainer.save_checkpoint()?;
            bar.finish_and_clear();
            return Ok(TrainOutcome::Stopped {
                step: trainer.state.step,
            });
        }
        let s = trainer.step(&data)?;
        bar.set_position(s.step);
        bar.set_message(format!("loss {:.3} {:.0} tok/s", s.loss, s.tokens_per_s));
        status.update(|st| {
            st.step = s.step;
            st.loss = Some(s.loss);
        });
        if every > 0 && s.step % every == 0 && !trainer.finished() {
            trainer.save_checkpoint()?;
        }
    }
    bar.finish_and_clear();
    trainer.save_checkpoint()?;
    let model = trainer.model();
    let bytes = weights::to_bytes(&model.config(), &weights::named_tensors(&model))?;
    fsutil::write_atomic(&job.run_dir.join(branch::WEIGHTS_FILE), &bytes)?;
    status.update(|s| s.phase = "measuring".into());
    // Measured exactly as verifiers measure it (CPU, the registry's settings).
    let cpu = DeviceKind::Cpu.device()?;
    let mut v = Verifier::new(&job.seed, &job.seed_weights, &job.tokenizer, cpu)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let m = v
        .measure(&job.registry, &job.domain, &bytes, &job.valid_data)
        .map_err(|e| anyhow::anyhow!("measuring the ELM: {e}"))?;
    Ok(TrainOutcome::Done(Box::new(Trained {
        weights: bytes,
        branch,
        steps: trainer.state.step,
        tokens: trainer.state.tokens,
        flops: trainer.state.flops,
        ppl: m.ppl,
        seed_ppl: m.seed_ppl,
    })))
}

/// The paper's branching rule for a new domain: the average of existing ELMs weighted by their
/// domain posterior (cached prior) on the new domain's validation data, top-k.
fn posterior_branch(
    job: &TrainJob,
    tok: &Tokenizer,
    arch: &btm_model::GptConfig,
    device: &burn::tensor::Device,
    say: &Say,
) -> Result<(btm_model::Gpt, BranchRecord)> {
    let dir = job.run_dir.join("parents");
    std::fs::create_dir_all(&dir)?;
    let tok_path = dir.join("tokenizer.json");
    fsutil::write_atomic(&tok_path, &job.tokenizer)?;
    let mut forest = Forest::create(&dir, *arch, &tok_path)?;
    for (domain, id, bytes) in &job.parents {
        let path = dir.join(format!("{domain}-{}.safetensors", short(&id.0)));
        fsutil::write_atomic(&path, bytes)?;
        let name = if forest.elms.iter().any(|e| e.name == *domain) {
            format!("{domain}-{}", short(&id.0))
        } else {
            domain.clone()
        };
        forest.add(
            &name,
            vec![domain.clone()],
            &path,
            &tok.id(),
            InitKind::Seed,
            vec![],
            None,
        )?;
    }
    let valid = documents_stream(tok, &job.valid_data, &job.domain, arch.n_ctx)?;
    let cfg = posterior::PriorConfig {
        max_blocks: 64,
        ..posterior::PriorConfig::default()
    };
    let prior = ensemble::cached_prior(&forest, &valid, &cfg, 8, device)?;
    let init = job.run_dir.join("init.safetensors");
    let parents = branch::posterior_average_init(&forest, &prior, Some(job.top_k), &init)?;
    say.line(format!(
        "posterior of {}'s validation data over the accepted ELMs: {}",
        job.domain,
        forest
            .elms
            .iter()
            .zip(&prior)
            .map(|(e, p)| format!("{} {p:.2}", e.name))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let model = weights::load(&init, Some(arch), device)?;
    Ok((
        model,
        BranchRecord {
            init: InitKind::PosteriorAverage,
            parents: parents.iter().map(|p| (p.id.clone(), p.weight)).collect(),
            names: parents.iter().map(|p| p.name.clone()).collect(),
        },
    ))
}

/// Serves blobs and verifies other peers' ELMs until stopped; keeps the status current.
async fn serve(
    a: &JoinArgs,
    node: &Node,
    status: &StatusFile,
    stop: &Stop,
    say: &Say,
) -> Result<()> {
    let _ = a;
    say.line("serving blobs and verifying other ELMs (Ctrl-C to stop)");
    let mut events = node.observe();
    // Verdicts reached while training were observed by nobody: take them from the store.
    let refresh = || {
        if let Ok(v) = own_verdicts(node) {
            status.update(|s| {
                for (e, verdict) in v {
                    if let Some(ok) = verdict {
                        s.verified.insert(net::to_hex(&e.id().0), ok);
                    }
                }
            });
        }
    };
    refresh();
    let mut tick = tokio::time::interval(Duration::from_secs(20));
    loop {
        tokio::select! {
            _ = stop.wait() => break,
            ev = events.recv() => match ev {
                Ok(Observed::Verdict { elm, accepted, measured_ppl, reason }) => {
                    say.line(format!(
                        "verified ELM {}: {} ({})",
                        short(&elm.0),
                        if accepted { "accepted" } else { "rejected" },
                        measured_ppl.map_or(reason, |p| format!("perplexity {p:.2}"))
                    ));
                    status.update(|s| {
                        s.verified.insert(net::to_hex(&elm.0), accepted);
                    });
                }
                Ok(Observed::Registry { version }) => {
                    if let Ok(Some(r)) = node.registry().await {
                        let accepted: Vec<String> =
                            r.record().elms.iter().map(|e| net::to_hex(&e.record.0)).collect();
                        say.line(format!("registry v{version}: {} accepted ELMs", accepted.len()));
                        status.update(|s| {
                            s.registry_version = Some(version);
                            s.accepted = accepted;
                        });
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            _ = tick.tick() => {
                // Catch up on anything gossip missed, keep the address record fresh.
                let _ = node.sync().await;
                let _ = node.publish_addr().await;
                refresh();
            }
        }
    }
    say.line("stopping");
    status.update(|s| s.phase = "stopped".into());
    Ok(())
}

/// Used by `forest list` and `fetch`: this node's verdict on each held ELM record.
pub fn own_verdicts(node: &Node) -> Result<Vec<(Signed<ElmRecord>, Option<bool>)>> {
    let me = node.node_id();
    node.with_store(|s| -> Result<_> {
        let mut out = Vec::new();
        for e in s.elms(10_000)? {
            let v = s
                .attestations(&e.id())?
                .into_iter()
                .map(Signed::into_record)
                .find(|a| a.verifier == me)
                .map(|a| a.verdict == Verdict::Accept);
            out.push((e, v));
        }
        Ok(out)
    })?
}
