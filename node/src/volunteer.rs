//! The volunteer: joins the network, verifies the registry, downloads the seed and its domain's
//! data by content id, claims a domain (renewing the lease while it trains), branches, trains
//! with checkpoints, measures its ELM the way verifiers will, announces it, and keeps serving
//! blobs and verifying other peers' ELMs until stopped.
//!
//! Everything a restart needs is in the data directory: `join.json` (the domain this node
//! works on and, once announced, its ELM record), `runs/<domain>/` (the training run with its
//! checkpoint and `branch.json`). Stopped or killed, the next start resumes the same claim
//! from the last checkpoint.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use btm_model::data::{DomainStream, Mixture};
use btm_model::device::DeviceKind;
use btm_model::files::{CHECKPOINT_FILE, TOKENIZER_FILE, WEIGHTS_FILE};
use btm_model::forest::manifest::InitKind;
use btm_model::forest::{Forest, branch, ensemble, posterior};
use btm_model::tokenizer::Tokenizer;
use btm_model::train::{RunOutcome, TrainConfig, Trainer};
use btm_model::{fsutil, weights};
use btm_net::Node;
use btm_net::claims::{self, Choice};
use btm_net::verify::{self, Verifier};
use btm_protocol::{ContentId, ElmRecord, Parent, Registry, SeedManifest, Signed, ppl_to_milli};
use serde::{Deserialize, Serialize};

use crate::common::{fetch_reported, own_verdicts, short, wait_registry};
use crate::error::{Error, Result, io};
use crate::{Event, Events, Phase, Stop, serve};

/// How a volunteer chooses the start of its ELM: one of the forest's [`InitKind`]s, or
/// [`Auto`](BranchPolicy::Auto) to choose by what the registry holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BranchPolicy {
    /// The posterior-weighted average of the registry's accepted ELMs when it lists any on other
    /// domains ([`InitKind::PosteriorAverage`]), else the seed ([`InitKind::Seed`]).
    #[default]
    Auto,
    /// Always this start: [`InitKind::Seed`], or [`InitKind::PosteriorAverage`] (an error if the
    /// registry lists no accepted ELMs on other domains). [`InitKind::Random`] is refused: a
    /// network ELM descends from the seed.
    Fixed(InitKind),
}

/// How long a volunteer keeps trying to download the seed or its data before it gives up.
const FETCH_PATIENCE: Duration = Duration::from_secs(300);

/// Tokens of the public validation split scored for the validation curve during training.
pub const VALID_CURVE_TOKENS: usize = 2048;
/// Points of the validation curve in a run (besides the one before the first update).
const VALID_CURVE_POINTS: u64 = 10;

impl std::str::FromStr for BranchPolicy {
    type Err = String;

    /// The command-line names: `auto`, `seed`, or `average` (also `posterior-average`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BranchPolicy::Auto),
            "average" => Ok(BranchPolicy::Fixed(InitKind::PosteriorAverage)),
            _ => match s.parse::<InitKind>() {
                Ok(InitKind::Random) | Err(_) => {
                    Err(format!("unknown branch {s:?} (auto, seed or average)"))
                }
                Ok(kind) => Ok(BranchPolicy::Fixed(kind)),
            },
        }
    }
}

/// The training settings a volunteer controls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    /// Optimiser updates of the ELM.
    pub steps: u64,
    /// Blocks per update.
    pub batch_size: usize,
    /// Peak learning rate (`None`: by model width, 2e-3 up to d=128, 1e-3 up to 512, 5e-4 beyond).
    pub lr: Option<f64>,
    /// Checkpoint every this many updates.
    pub checkpoint_every: u64,
    /// Data order seed.
    pub seed: u64,
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            steps: 300,
            batch_size: 8,
            lr: None,
            checkpoint_every: 25,
            seed: 0,
        }
    }
}

/// Everything a volunteer is told.
#[derive(Debug, Clone)]
pub struct VolunteerConfig {
    /// The node's data directory (join.json and training runs live here).
    pub data_dir: PathBuf,
    /// Domain to claim (default: an open domain with no ELM yet that nobody else holds).
    pub domain: Option<String>,
    /// Compute device for training.
    pub device: DeviceKind,
    pub train: TrainSettings,
    pub branch: BranchPolicy,
    /// ELMs averaged when branching from an average (the largest posterior weights).
    pub branch_top_k: usize,
    /// The claim's lease (renewed every quarter lease while training).
    pub lease_secs: u64,
    /// How long to wait for a registry with a seed.
    pub wait_registry: Duration,
    /// Return once the ELM is announced instead of serving until stopped.
    pub exit_after_announce: bool,
}

impl VolunteerConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> VolunteerConfig {
        VolunteerConfig {
            data_dir: data_dir.into(),
            domain: None,
            device: DeviceKind::Cpu,
            train: TrainSettings::default(),
            branch: BranchPolicy::Auto,
            branch_top_k: 3,
            lease_secs: 15 * 60,
            wait_registry: Duration::from_secs(120),
            exit_after_announce: false,
        }
    }
}

/// How a volunteer's run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The ELM is announced (and, unless `exit_after_announce`, the node served until stopped).
    Announced(Box<Signed<ElmRecord>>),
    /// Stopped before announcing; the next run resumes.
    Stopped,
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

const JOIN_FILE: &str = "join.json";
const BRANCH_FILE: &str = "branch.json";

fn load_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = fsutil::read_limited(path, 1 << 20)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Damaged {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

fn save_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(v).map_err(|e| Error::Task(e.to_string()))?;
    fsutil::write_atomic(path, &bytes)?;
    Ok(())
}

impl JoinState {
    fn load(path: &Path) -> Result<JoinState> {
        if !path.exists() {
            return Ok(JoinState::default());
        }
        load_json(path)
    }
}

fn unhex(path: &Path, s: &str) -> Result<Vec<u8>> {
    hex::decode(s).map_err(|e| Error::Damaged {
        path: path.to_path_buf(),
        why: format!("not hex: {e}"),
    })
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

/// A volunteer of the network.
#[derive(Debug, Clone)]
pub struct Volunteer {
    config: VolunteerConfig,
    /// The last training update and loss, shown in claim renewals.
    progress: Progress,
}

impl Volunteer {
    pub fn new(config: VolunteerConfig) -> Volunteer {
        Volunteer {
            config,
            progress: Progress::default(),
        }
    }

    /// Works on `node` until the ELM is announced (and then serves until `stop`, unless
    /// `exit_after_announce`), or until `stop`.
    pub async fn run(&self, node: &Node, stop: &Stop, events: &Events) -> Result<Outcome> {
        let c = &self.config;
        events.phase(Phase::WaitingForRegistry);
        let Some(registry) = wait_registry(node, c.wait_registry, stop).await? else {
            events.phase(Phase::Stopped);
            return Ok(Outcome::Stopped);
        };
        let reg = registry.record().clone();
        let seed = reg.seed.clone().ok_or(Error::NoSeed)?;
        events.emit(Event::Registry {
            version: reg.version,
            domains: reg.domains.len(),
            seed: Some(seed.weights),
            accepted: reg.elms.iter().map(|e| e.record).collect(),
        });

        let state_path = c.data_dir.join(JOIN_FILE);
        let mut state = JoinState::load(&state_path)?;
        let network = hex::encode(node.client().network().0.0);
        if !state.network.is_empty() && state.network != network {
            return Err(Error::OtherNetwork {
                dir: c.data_dir.clone(),
            });
        }
        state.network = network;
        if let (Some(w), Some(d)) = (&c.domain, &state.domain)
            && w != d
        {
            return Err(Error::OtherDomain {
                current: d.clone(),
                wanted: w.clone(),
            });
        }

        // Already announced: announce again (refreshes the DHT) and serve.
        if let Some(h) = &state.announced {
            let envelope = Signed::<ElmRecord>::decode(&unhex(&state_path, h)?).map_err(|e| {
                Error::Damaged {
                    path: state_path.clone(),
                    why: format!("its ELM record: {e}"),
                }
            })?;
            node.announce_signed(&envelope).await?;
            events.emit(Event::Announced {
                elm: envelope.id(),
                weights: envelope.record().weights,
                domain: envelope.record().domain.clone(),
                again: true,
            });
            if !c.exit_after_announce {
                serve::serve(node, stop, events).await?;
            }
            return Ok(Outcome::Announced(Box::new(envelope)));
        }

        // A domain: the remembered one, the asked one, or an open one.
        let domain = match state.domain.clone().or(c.domain.clone()) {
            Some(d) => {
                if reg.domain(&d).is_none() {
                    let known: Vec<&str> = reg.domains.iter().map(|d| d.name.as_str()).collect();
                    return Err(Error::UnknownDomain {
                        domain: d,
                        known: known.join(", "),
                    });
                }
                node.claim(Some(&d)).await?;
                d
            }
            None => match claim_open_domain(node, &reg, stop, events).await? {
                Some(d) => d,
                None => {
                    events.phase(Phase::Stopped);
                    return Ok(Outcome::Stopped);
                }
            },
        };
        state.domain = Some(domain.clone());
        save_json(&state_path, &state)?;
        events.emit(Event::Claimed {
            domain: domain.clone(),
            lease_secs: c.lease_secs,
        });
        let renewer = tokio::spawn(renew(
            node.clone(),
            domain.clone(),
            c.lease_secs,
            c.data_dir.join("runs").join(&domain),
            self.progress.clone(),
            events.clone(),
        ));
        let result = self
            .train_and_announce(node, &reg, &seed, &domain, stop, events)
            .await;
        renewer.abort();
        match result? {
            Some(envelope) => {
                state.announced = Some(hex::encode(envelope.encode()));
                save_json(&state_path, &state)?;
                if !c.exit_after_announce {
                    serve::serve(node, stop, events).await?;
                }
                Ok(Outcome::Announced(Box::new(envelope)))
            }
            None => {
                events.phase(Phase::Stopped);
                Ok(Outcome::Stopped)
            }
        }
    }

    async fn fetch(
        &self,
        node: &Node,
        what: &str,
        id: ContentId,
        events: &Events,
    ) -> Result<Vec<u8>> {
        events.emit(Event::Fetching {
            what: what.into(),
            id,
        });
        // Providers may not be found at once (a network still forming, peers busy or hostile,
        // lookups answered with junk): try again with backoff before giving up. Found by the
        // 16-node soak, where four of eleven volunteers gave up at their first failed lookup.
        let deadline = std::time::Instant::now() + FETCH_PATIENCE;
        let mut wait = Duration::from_secs(2);
        loop {
            match fetch_reported(node, what, id, &[], None, events).await {
                Ok(_) => break,
                Err(btm_net::NodeError::Blob(e @ btm_net::blobs::BlobError::Download { .. }))
                    if std::time::Instant::now() + wait < deadline =>
                {
                    events.note(format!(
                        "fetching the {what} failed ({e}); trying again in {} s",
                        wait.as_secs()
                    ));
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let max = btm_net::blobs::BlobConfig::default().max_blob_bytes;
        Ok(node.blobs().read(&id, max).await?)
    }

    async fn train_and_announce(
        &self,
        node: &Node,
        reg: &Registry,
        seed: &SeedManifest,
        domain: &str,
        stop: &Stop,
        events: &Events,
    ) -> Result<Option<Signed<ElmRecord>>> {
        let c = &self.config;
        let d = reg.domain(domain).ok_or_else(|| Error::UnknownDomain {
            domain: domain.into(),
            known: String::new(),
        })?;
        events.phase(Phase::Downloading);
        let seed_weights = self
            .fetch(node, "seed weights", seed.weights, events)
            .await?;
        let tokenizer = self
            .fetch(node, "tokenizer", seed.tokenizer, events)
            .await?;
        let train_data = self.fetch(node, "training data", d.train, events).await?;
        let valid_data = self.fetch(node, "validation data", d.valid, events).await?;

        let run_dir = c.data_dir.join("runs").join(domain);
        std::fs::create_dir_all(&run_dir).map_err(io(&run_dir))?;
        let resuming = run_dir.join(CHECKPOINT_FILE).exists();
        let others: Vec<_> = reg.elms.iter().filter(|e| e.domain != domain).collect();
        let average = !resuming
            && match c.branch {
                BranchPolicy::Auto => !others.is_empty(),
                BranchPolicy::Fixed(InitKind::Seed) => false,
                BranchPolicy::Fixed(InitKind::PosteriorAverage) => {
                    if others.is_empty() {
                        return Err(Error::NoParents);
                    }
                    true
                }
                BranchPolicy::Fixed(InitKind::Random) => return Err(Error::RandomBranch),
            };
        let mut parents = Vec::new();
        if average {
            for e in &others {
                let what = format!("accepted ELM on {}", e.domain);
                let bytes = self.fetch(node, &what, e.weights, events).await?;
                parents.push((e.domain.clone(), e.weights, bytes));
            }
        }
        let t = &c.train;
        let cfg = TrainConfig {
            steps: t.steps,
            batch_size: t.batch_size,
            lr: t
                .lr
                .unwrap_or_else(|| default_lr(seed.architecture.d_model)),
            checkpoint_every: t.checkpoint_every,
            seed: t.seed,
            ..TrainConfig::default()
        };
        events.phase(Phase::Training);
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
            top_k: c.branch_top_k.max(1),
            cfg,
            device: c.device,
        };
        let flag = stop.flag();
        let ev = events.clone();
        let progress = self.progress.clone();
        let outcome =
            tokio::task::spawn_blocking(move || train_blocking(job, &flag, &progress, &ev))
                .await
                .map_err(|e| Error::Task(format!("training: {e}")))??;
        let trained = match outcome {
            TrainOutcome::Stopped { step } => {
                events.emit(Event::TrainingStopped { step });
                return Ok(None);
            }
            TrainOutcome::Done(t) => t,
        };
        events.emit(Event::Trained {
            ppl: trained.ppl,
            seed_ppl: trained.seed_ppl,
        });
        if trained.ppl >= trained.seed_ppl {
            return Err(Error::NotBetterThanSeed {
                domain: domain.into(),
                ppl: trained.ppl,
                seed_ppl: trained.seed_ppl,
            });
        }
        let claimed = ppl_to_milli(trained.ppl).ok_or_else(|| Error::Data {
            domain: domain.into(),
            what: "measured perplexity",
            why: format!("{} is out of range", trained.ppl),
        })?;
        let path = c.data_dir.join("runs").join(domain).join(BRANCH_FILE);
        let record = ElmRecord {
            domain: domain.to_string(),
            parents: parents_of(&path, &trained.branch)?,
            weights: ContentId::of(&trained.weights),
            weights_size: trained.weights.len() as u64,
            architecture: seed.architecture.id(),
            tokenizer: seed.tokenizer,
            steps: trained.steps,
            tokens: trained.tokens,
            flops: trained.flops.max(0.0) as u64,
            claimed_valid_ppl_milli: claimed,
            trainer: node.node_id(),
        };
        let envelope = node.announce(record, trained.weights.clone()).await?;
        events.emit(Event::Announced {
            elm: envelope.id(),
            weights: envelope.record().weights,
            domain: domain.into(),
            again: false,
        });
        Ok(Some(envelope))
    }
}

/// The record's parent list from the branch record: ids as stored, weights in parts per million
/// that always decode (ascending ids, exactly 1,000,000 in all).
fn parents_of(path: &Path, b: &BranchRecord) -> Result<Vec<Parent>> {
    let mut ids = Vec::new();
    for (id, w) in &b.parents {
        let id: ContentId = id.parse().map_err(|e| Error::Damaged {
            path: path.to_path_buf(),
            why: format!("parent id {id}: {e}"),
        })?;
        ids.push((id, *w));
    }
    Parent::from_weights(&ids).map_err(|e| Error::Damaged {
        path: path.to_path_buf(),
        why: format!("parent weights: {e}"),
    })
}

fn default_lr(d_model: u32) -> f64 {
    match d_model {
        0..=128 => 2e-3,
        129..=512 => 1e-3,
        _ => 5e-4,
    }
}

/// Claims a domain nobody else holds, waiting while all open ones are claimed; steps aside when
/// another node claimed the same domain at the same moment and keeps it.
async fn claim_open_domain(
    node: &Node,
    reg: &Registry,
    stop: &Stop,
    events: &Events,
) -> Result<Option<String>> {
    let me = node.node_id();
    let mut lost: BTreeSet<String> = BTreeSet::new();
    loop {
        let _ = node.sync().await;
        let mut skip = domains_with_elms(node, reg)?;
        skip.extend(lost.iter().cloned());
        let board = node.board(reg)?;
        let now = btm_net::limits::now_secs();
        match claims::choose_open_domain(&board, reg, &me, now, &skip) {
            Choice::Free(d) => {
                node.claim(Some(&d)).await?;
                // Claims travel in about a second; look again before starting.
                if stop.sleep(Duration::from_secs(3)).await {
                    return Ok(None);
                }
                let _ = node.sync().await;
                let board = node.board(reg)?;
                match claims::keeper(&board, &d, btm_net::limits::now_secs()) {
                    Some(k) if k != me => {
                        events.emit(Event::ClaimLost {
                            domain: d.clone(),
                            keeper: k,
                        });
                        lost.insert(d);
                    }
                    _ => return Ok(Some(d)),
                }
            }
            Choice::CoTrain(d) => {
                // Every open domain is claimed: a claim is a reservation, not a lock. Train the
                // domain whose claims show the least progress; the better verified ELM wins.
                events.note(format!(
                    "every open domain is claimed; co-training {d}, whose claims show the least progress"
                ));
                node.claim(Some(&d)).await?;
                return Ok(Some(d));
            }
            Choice::AllDone => return Err(Error::AllDomainsDone),
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

/// The training progress a claim renewal shows: the last update and its loss, written by the
/// training loop.
pub(crate) type Progress = Arc<std::sync::Mutex<Option<(u64, f64)>>>;

/// The claim progress to sign: the last update and loss, and the BLAKE3 of the run's current
/// checkpoint (none before the first checkpoint).
/// The checkpoint file is hashed again only when it changed (`seen`: its modification time
/// and hash at the last renewal), not read whole at every renewal.
fn claim_progress(
    progress: &Progress,
    run_dir: &Path,
    seen: &mut Option<(std::time::SystemTime, ContentId)>,
) -> Option<btm_protocol::ClaimProgress> {
    let (step, loss) = (*progress.lock().ok()?)?;
    let path = run_dir.join(CHECKPOINT_FILE);
    let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
    let checkpoint = match *seen {
        Some((at, id)) if at == modified => id,
        _ => {
            let id = ContentId::of(&std::fs::read(&path).ok()?);
            *seen = Some((modified, id));
            id
        }
    };
    Some(btm_protocol::ClaimProgress {
        step,
        loss_milli: ppl_to_milli(loss).unwrap_or(0),
        checkpoint,
    })
}

/// Renews the claim every quarter lease, with the training progress made so far.
async fn renew(
    node: Node,
    domain: String,
    lease: u64,
    run_dir: PathBuf,
    progress: Progress,
    events: Events,
) {
    let every = Duration::from_secs((lease / 4).max(1));
    let mut seen = None;
    loop {
        tokio::time::sleep(every).await;
        let shown = claim_progress(&progress, &run_dir, &mut seen);
        if let Err(e) = node.claim_with(Some(&domain), shown).await {
            events.note(format!(
                "renewing the claim on {domain} failed: {e} (will retry)"
            ));
        }
    }
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

fn documents_stream(tok: &Tokenizer, data: &[u8], domain: &str, n_ctx: usize) -> Result<Vec<u32>> {
    let docs = verify::parse_documents(data).map_err(|why| Error::Data {
        domain: domain.into(),
        what: "data",
        why,
    })?;
    let (tokens, _) = btm_model::data::tokenize_documents(tok, &docs, None)?;
    if tokens.len() < n_ctx + 2 {
        return Err(Error::Data {
            domain: domain.into(),
            what: "data",
            why: format!("only {} tokens", tokens.len()),
        });
    }
    Ok(tokens)
}

fn train_blocking(
    job: TrainJob,
    stop: &Arc<AtomicBool>,
    progress: &Progress,
    events: &Events,
) -> Result<TrainOutcome> {
    let device = job.device.device()?;
    let tok = Tokenizer::from_bytes(&job.tokenizer)?;
    let arch = verify::config_of(&job.seed.architecture);
    let seed_model = {
        let (cfg, tensors) = weights::parse(&job.seed_weights, Some(&arch))?;
        weights::from_named_tensors(&cfg, tensors, &device)?
    };
    let branch_path = job.run_dir.join(BRANCH_FILE);
    let resuming = job.run_dir.join(CHECKPOINT_FILE).exists() && branch_path.exists();
    let (init_model, branch) = if resuming {
        (seed_model, load_json::<BranchRecord>(&branch_path)?)
    } else if job.parents.is_empty() {
        let b = BranchRecord {
            init: InitKind::Seed,
            parents: vec![(hex::encode(job.seed.weights.0), 1.0)],
            names: vec!["seed".into()],
        };
        (seed_model, b)
    } else {
        posterior_branch(&job, &tok, &arch, &device, events)?
    };
    if !resuming {
        save_json(&branch_path, &branch)?;
    }
    events.emit(Event::Branched {
        init: branch.init,
        parents: branch
            .names
            .iter()
            .zip(&branch.parents)
            .map(|(n, (_, w))| (n.clone(), *w))
            .collect(),
    });

    let tokens = documents_stream(&tok, &job.train_data, &job.domain, arch.n_ctx)?;
    let stream = DomainStream::new(job.domain.clone(), tokens, arch.n_ctx)?;
    let data = Mixture::new(vec![stream], job.cfg.seed)?;
    let mut trainer = Trainer::new(init_model, job.cfg.clone(), &device, Some(&job.run_dir))?;
    let start = trainer.state.step;
    events.emit(Event::TrainingStarted(crate::TrainingStart {
        domain: job.domain.clone(),
        steps: job.cfg.steps,
        tokens_per_step: job.cfg.tokens_per_step(arch.n_ctx),
        resumed_from: (start > 0).then_some(start),
    }));
    let steps = job.cfg.steps;
    let curve = ValidationCurve::new(&tok, &job, arch.n_ctx, &device, events);
    curve.score(&trainer);
    let every = (steps / VALID_CURVE_POINTS).max(1);
    let outcome = trainer.run_with(&data, stop, |s, t| {
        if let Ok(mut p) = progress.lock() {
            *p = Some((s.step, s.loss));
        }
        events.emit(Event::Step {
            step: s.step,
            steps,
            loss: s.loss,
            tokens_per_s: s.tokens_per_s,
        });
        if s.step.is_multiple_of(every) || s.step == steps {
            curve.score(t);
        }
    })?;
    if let RunOutcome::Stopped { step } = outcome {
        return Ok(TrainOutcome::Stopped { step });
    }
    let model = trainer.model();
    let bytes = weights::to_bytes(&model.config(), &weights::named_tensors(&model))?;
    fsutil::write_atomic(&job.run_dir.join(WEIGHTS_FILE), &bytes)?;
    events.phase(Phase::Measuring);
    // Measured exactly as verifiers measure it (CPU, the registry's settings).
    let cpu = DeviceKind::Cpu.device()?;
    let mut v =
        Verifier::new(&job.seed, &job.seed_weights, &job.tokenizer, cpu).map_err(Error::Measure)?;
    let m = v
        .measure(&job.registry, &job.domain, &bytes, &job.valid_data)
        .map_err(Error::Measure)?;
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

/// The validation curve during training: perplexity on the first [`VALID_CURVE_TOKENS`] of
/// the domain's public validation split. Monitoring only: a split too short to score, or a
/// failed evaluation, becomes a note, never a failed run.
struct ValidationCurve<'a> {
    tokens: Option<Vec<u32>>,
    device: &'a burn::tensor::Device,
    events: &'a Events,
}

impl<'a> ValidationCurve<'a> {
    fn new(
        tok: &Tokenizer,
        job: &TrainJob,
        n_ctx: usize,
        device: &'a burn::tensor::Device,
        events: &'a Events,
    ) -> ValidationCurve<'a> {
        let tokens = match documents_stream(tok, &job.valid_data, &job.domain, n_ctx) {
            Ok(mut t) => {
                t.truncate(VALID_CURVE_TOKENS);
                Some(t)
            }
            Err(e) => {
                events.note(format!("no validation curve: {e}"));
                None
            }
        };
        ValidationCurve {
            tokens,
            device,
            events,
        }
    }

    fn score(&self, t: &Trainer) {
        let Some(tokens) = &self.tokens else { return };
        match btm_model::eval::evaluate(&t.model(), None, tokens, 8, self.device) {
            Ok(r) => self.events.emit(Event::Validation {
                step: t.state.step,
                ppl: r.perplexity,
                tokens: r.tokens,
            }),
            Err(e) => self.events.note(format!("validation curve: {e}")),
        }
    }
}

/// The paper's branching rule for a new domain: the average of existing ELMs weighted by their
/// domain posterior (cached prior) on the new domain's validation data, top-k.
fn posterior_branch(
    job: &TrainJob,
    tok: &Tokenizer,
    arch: &btm_model::GptConfig,
    device: &burn::tensor::Device,
    events: &Events,
) -> Result<(btm_model::Gpt, BranchRecord)> {
    let dir = job.run_dir.join("parents");
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let tok_path = dir.join(TOKENIZER_FILE);
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
    events.emit(Event::Posterior {
        domain: job.domain.clone(),
        weights: forest
            .elms
            .iter()
            .zip(&prior)
            .map(|(e, p)| (e.name.clone(), *p))
            .collect(),
    });
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
