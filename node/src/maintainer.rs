//! The maintainers' node: holds the seed and every domain's data as blobs, publishes a signed
//! registry version naming them (or one signed with the file workflow), publishes rotated roots,
//! and keeps serving; with `accept_verified` it verifies announced ELMs itself and accepts the
//! ones that pass into a new registry version.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use btm_model::files::{TOKENIZER_FILE, WEIGHTS_FILE};
use btm_model::fsutil;
use btm_net::{Node, Observed};
use btm_protocol::{
    AcceptedElm, Architecture, ClientVersion, ContentId, Domain, EvalSettings, Registry,
    SeedManifest, Signed, SigningKey, TrainingSummary, ppl_to_milli,
};
use btm_registry::{Decision, rules};

use crate::common::short;
use crate::council::{self, Council, Held};
use crate::error::{Error, Result};
use crate::{Event, Events, Phase, Stop};

/// The seed as `btm-node seed train` leaves it.
#[derive(Debug, Clone)]
pub struct SeedFiles {
    pub weights: Vec<u8>,
    pub tokenizer: Vec<u8>,
    pub training: TrainingSummary,
}

impl SeedFiles {
    /// Reads `model.safetensors`, `tokenizer.json` and (if present) `summary.json` of `dir`.
    pub fn load(dir: &Path) -> Result<SeedFiles> {
        let read = |name: &str| -> Result<Vec<u8>> {
            let p = dir.join(name);
            Ok(fsutil::read_limited(&p, 4 << 30)?)
        };
        Ok(SeedFiles {
            weights: read(WEIGHTS_FILE)?,
            tokenizer: read(TOKENIZER_FILE)?,
            training: training_summary(dir),
        })
    }

    /// The seed's architecture from its weights.
    pub fn architecture(&self) -> Result<Architecture> {
        let (cfg, _) = btm_model::weights::parse(&self.weights, None)?;
        Ok(Architecture {
            vocab_size: cfg.vocab_size as u32,
            context: cfg.n_ctx as u32,
            d_model: cfg.d_model as u32,
            heads: cfg.n_heads as u32,
            layers: cfg.n_layers as u32,
        })
    }
}

/// What `seed train` recorded in summary.json, if anything.
fn training_summary(seed_dir: &Path) -> TrainingSummary {
    let v: serde_json::Value = std::fs::read(seed_dir.join("summary.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let u = |k: &str| v.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
    TrainingSummary {
        steps: u("steps") as u64,
        tokens: u("tokens") as u64,
        flops: u("flops") as u64,
        valid_ppl_milli: v
            .pointer("/valid_after/perplexity")
            .and_then(serde_json::Value::as_f64)
            .and_then(ppl_to_milli)
            .unwrap_or(0),
    }
}

/// One domain's data files.
#[derive(Debug, Clone)]
pub struct DomainFiles {
    pub name: String,
    pub train: PathBuf,
    pub valid: PathBuf,
    pub test: PathBuf,
}

/// Everything the maintainers' node is told.
#[derive(Debug, Clone)]
pub struct MaintainerConfig {
    /// Maintainer keys that sign new registry versions (a threshold of the root's).
    pub keys: Vec<SigningKey>,
    pub seed: SeedFiles,
    /// A registry signed with the file workflow, published instead of building one.
    pub registry: Option<Signed<Registry>>,
    /// Rotated roots (each version trusted + 1), oldest first, published before the registry.
    pub rotate_roots: Vec<Vec<u8>>,
    /// The domains and their data.
    pub domains: Vec<DomainFiles>,
    /// Validation tokens verifiers score per domain.
    pub eval_tokens: u64,
    /// How far a claimed perplexity may be from a verifier's measurement (ppm).
    pub tolerance_ppm: u32,
    /// Days until a registry version expires.
    pub expires_days: u64,
    /// Verify announced ELMs and accept the ones that pass into a new registry version.
    pub accept_verified: bool,
    /// Share of each domain's training documents withheld as the verification pool (carved
    /// out before any blob is made, never published; the registry commits to its hash).
    /// 0: no pool (acceptance then rests on public data).
    pub withheld_share: f64,
    /// Acceptance: how far below the seed's the ELM's withheld perplexity must be (ppm).
    pub min_gain_ppm: u32,
    /// Acceptance: the most withheld/public perplexity ratio (ppm; memorisation check).
    pub max_memorisation_ppm: u32,
}

/// Defaults of the acceptance settings: beat the seed by 1% on withheld data, and be at most
/// 1.25x worse there than on the public `valid` split, relative to the seed
/// (`WithheldCheck::memorisation`).
pub const DEFAULT_WITHHELD_SHARE: f64 = 0.1;
pub const DEFAULT_MIN_GAIN_PPM: u32 = 10_000;
pub const DEFAULT_MAX_MEMORISATION_PPM: u32 = 1_250_000;

impl MaintainerConfig {
    /// Settings for a small network of tiny models (tests, local trials): verifiers score 512
    /// validation tokens per domain within 1%, registry versions last a day, verified ELMs are
    /// accepted, a quarter of each domain's training documents is withheld (with 40 documents,
    /// a pool the size of `valid`, so that which few documents it holds does not dominate the
    /// memorisation ratio), and the default acceptance margins apply.
    pub fn small_network(
        keys: Vec<SigningKey>,
        seed: SeedFiles,
        domains: Vec<DomainFiles>,
    ) -> MaintainerConfig {
        MaintainerConfig {
            keys,
            seed,
            registry: None,
            rotate_roots: vec![],
            domains,
            eval_tokens: 512,
            tolerance_ppm: 10_000,
            expires_days: 1,
            accept_verified: true,
            withheld_share: 0.25,
            min_gain_ppm: DEFAULT_MIN_GAIN_PPM,
            max_memorisation_ppm: DEFAULT_MAX_MEMORISATION_PPM,
        }
    }
}

/// A domain's training data split in two, both as JSONL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carved {
    /// The documents published for training.
    pub train: Vec<u8>,
    /// The maintainers' withheld verification pool.
    pub withheld: Vec<u8>,
}

/// Splits a domain's training data (JSONL, optionally zstd) into the documents published for
/// training and the withheld verification pool: about `share` of the documents (at least one),
/// chosen by the BLAKE3 of each document's id and text, so the pool is spread over the whole
/// split (a tail would differ from `valid` wherever the split is ordered by source) and the
/// same data always gives the same pool. `None` when there are fewer than 4 documents or
/// `share` is 0.
pub fn carve_withheld(train: &[u8], share: f64) -> std::result::Result<Option<Carved>, String> {
    let docs = btm_net::verify::parse_documents(train)?;
    if docs.len() < 4 || share <= 0.0 || !share.is_finite() {
        return Ok(None);
    }
    let k = ((docs.len() as f64 * share.min(0.5)).round() as usize).clamp(1, docs.len() - 1);
    let jsonl = |d: &[btm_model::data::Document]| -> Vec<u8> {
        let mut out = Vec::new();
        for doc in d {
            // A document of two strings always serialises.
            out.extend(serde_json::to_vec(doc).unwrap_or_default());
            out.push(b'\n');
        }
        out
    };
    // The k documents with the smallest hashes: a uniform sample, deterministic.
    let mut order: Vec<(blake3::Hash, usize)> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut h = blake3::Hasher::new();
            h.update(d.id.as_bytes());
            h.update(&[0]);
            h.update(d.text.as_bytes());
            (h.finalize(), i)
        })
        .collect();
    order.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let pool: BTreeSet<usize> = order.iter().take(k).map(|(_, i)| *i).collect();
    let (withheld, kept): (Vec<_>, Vec<_>) = docs
        .into_iter()
        .enumerate()
        .partition(|(i, _)| pool.contains(i));
    let strip = |v: Vec<(usize, btm_model::data::Document)>| -> Vec<btm_model::data::Document> {
        v.into_iter().map(|(_, d)| d).collect()
    };
    Ok(Some(Carved {
        train: jsonl(&strip(kept)),
        withheld: jsonl(&strip(withheld)),
    }))
}

/// What `publish` put on the network.
#[derive(Debug, Clone)]
pub struct Published {
    pub version: u64,
    pub seed: SeedManifest,
}

/// The maintainers' node.
#[derive(Debug, Clone)]
pub struct Maintainer {
    config: MaintainerConfig,
    /// Each domain's withheld pool (JSONL bytes), kept in memory only.
    withheld: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    /// The seed loaded for acceptance checks (and the pools' tokens), made on first use.
    verifier: Arc<Mutex<Option<btm_net::verify::Verifier>>>,
    /// Proposals on their way to the maintainers' threshold (when this maintainer's keys alone
    /// do not meet it).
    council: Arc<tokio::sync::Mutex<Council>>,
}

/// What a maintainer makes of another's proposal.
enum Judgement {
    /// Sign it: it adds these ELMs, each verified here.
    Sign(Vec<ContentId>),
    /// Not yet: this node has not verified every ELM it adds.
    Wait,
    /// Never: why.
    Refuse(String),
}

async fn offer(node: &Node, env: &[u8]) -> Result<()> {
    match node.publish_registry(env).await? {
        Decision::Accept(_) | Decision::Unchanged => Ok(()),
        Decision::Reject(r) => Err(Error::Refused {
            what: "the registry".into(),
            why: r.to_string(),
        }),
    }
}

fn sign(registry: Registry, keys: &[SigningKey]) -> Signed<Registry> {
    let mut env = Signed::new(registry);
    for k in keys {
        env.sign(k);
    }
    env
}

impl Maintainer {
    pub fn new(config: MaintainerConfig) -> Maintainer {
        Maintainer {
            config,
            withheld: Arc::default(),
            verifier: Arc::default(),
            council: Arc::default(),
        }
    }

    /// Keeps what this maintainer signs in its node's data directory, so that a restart does not
    /// let it sign a second body at a version it signed.
    async fn remember_signatures(&self, node: &Node) -> Result<()> {
        let file = node.data_dir().join(council::SIGNED_FILE);
        self.council
            .lock()
            .await
            .attach(&file)
            .map_err(|why| Error::Refused {
                what: "the record of registry versions this maintainer signed".into(),
                why,
            })
    }

    /// The withheld pool of `domain`, if this maintainer carved one.
    pub fn withheld(&self, domain: &str) -> Option<Vec<u8>> {
        self.withheld.lock().ok()?.get(domain).cloned()
    }

    /// Adds the seed and the domains' data as blobs, publishes rotated roots and the registry.
    pub async fn publish(&self, node: &Node, events: &Events) -> Result<Published> {
        self.remember_signatures(node).await?;
        let c = &self.config;
        events.phase(Phase::AddingBlobs);
        let seed = SeedManifest {
            architecture: c.seed.architecture()?,
            tokenizer: node.add_blob(c.seed.tokenizer.clone()).await?,
            weights: node.add_blob(c.seed.weights.clone()).await?,
            training: c.seed.training,
            // The seed's run ended with its schedule (no optimiser state is published yet):
            // ELMs start a schedule of their own (see specs/forest.md).
            schedule: btm_protocol::Schedule {
                step: c.seed.training.steps,
                total: c.seed.training.steps,
            },
            optimizer: None,
        };
        // Key rotation: each root is checked by this node's rules, adopted, stored on the DHT
        // under its version and gossiped; nodes that started from an older root walk the chain.
        for (i, bytes) in c.rotate_roots.iter().enumerate() {
            if let Decision::Reject(r) = node.publish_root(bytes).await? {
                return Err(Error::Refused {
                    what: format!("rotated root {}", i + 1),
                    why: r.to_string(),
                });
            }
        }
        let names: Vec<String> = match &c.registry {
            Some(env) => env
                .record()
                .domains
                .iter()
                .map(|d| d.name.clone())
                .collect(),
            None => c.domains.iter().map(|d| d.name.clone()).collect(),
        };
        // Carve withheld pools only when this maintainer builds the registry (a signed registry
        // file already names its data).
        let carve = c.registry.is_none();
        let ids = self.add_domain_blobs(node, &names, carve).await?;
        let envelope = match &c.registry {
            Some(env) => {
                if env.record().seed.as_ref() != Some(&seed) {
                    return Err(Error::Refused {
                        what: "the registry file".into(),
                        why: "it names another seed than the one given".into(),
                    });
                }
                env.clone()
            }
            None => {
                let trusted = node.registry().await?;
                let version = trusted.as_ref().map_or(1, |r| r.record().version + 1);
                let elms = trusted.map(|r| r.record().elms.clone()).unwrap_or_default();
                let mut domains: Vec<Domain> = names
                    .iter()
                    .zip(ids)
                    .map(|(n, ([train, valid, test], withheld))| Domain {
                        name: n.clone(),
                        description: format!("{n} (bundled btm corpus)"),
                        train,
                        valid,
                        test,
                        eval: EvalSettings {
                            min_gain_ppm: c.min_gain_ppm,
                            max_memorisation_ppm: c.max_memorisation_ppm,
                            withheld,
                            ..EvalSettings::public(
                                seed.architecture.context,
                                c.eval_tokens,
                                c.tolerance_ppm,
                            )
                        },
                    })
                    .collect();
                domains.sort_by(|x, y| x.name.cmp(&y.name));
                let registry = Registry {
                    version,
                    expires: council::expiry(btm_net::limits::now_secs(), c.expires_days),
                    min_client_version: ClientVersion::new(0, 1, 0),
                    domains,
                    seed: Some(seed.clone()),
                    elms: elms
                        .into_iter()
                        .filter(|e| names.contains(&e.domain))
                        .collect(),
                };
                let root = node.trusted().await?.root.into_record();
                if !council::keys_meet_threshold(&c.keys, &root) {
                    // The other maintainers co-sign the same registry, built from the same
                    // seed, data and settings.
                    let domains = registry.domains.len();
                    let version = self.gather_genesis(node, registry, events).await?;
                    events.emit(Event::Published {
                        version,
                        domains,
                        seed: seed.weights,
                        added: vec![],
                    });
                    return Ok(Published { version, seed });
                }
                sign(registry, &c.keys)
            }
        };
        offer(node, &envelope.encode()).await?;
        let version = envelope.record().version;
        events.emit(Event::Published {
            version,
            domains: envelope.record().domains.len(),
            seed: seed.weights,
            added: vec![],
        });
        Ok(Published { version, seed })
    }

    /// Each domain's train, valid and test splits as blobs (from the config's files by name),
    /// and, with `carve`, the commitment to its withheld pool (carved out of the training data
    /// before the training blob is made; the pool itself is kept here, never added as a blob).
    async fn add_domain_blobs(
        &self,
        node: &Node,
        names: &[String],
        carve: bool,
    ) -> Result<Vec<([ContentId; 3], Option<ContentId>)>> {
        let mut out = Vec::new();
        for n in names {
            let files = self
                .config
                .domains
                .iter()
                .find(|d| d.name == *n)
                .ok_or_else(|| Error::UnknownDomain {
                    domain: n.clone(),
                    known: self
                        .config
                        .domains
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            let mut ids = [ContentId([0; 32]); 3];
            let mut commitment = None;
            for (i, path) in [&files.train, &files.valid, &files.test]
                .into_iter()
                .enumerate()
            {
                let carved = if i == 0 && carve && self.config.withheld_share > 0.0 {
                    let bytes = std::fs::read(path).map_err(crate::error::io(path))?;
                    carve_withheld(&bytes, self.config.withheld_share).map_err(|why| {
                        Error::Data {
                            domain: n.clone(),
                            what: "training data",
                            why,
                        }
                    })?
                } else {
                    None
                };
                ids[i] = match carved {
                    Some(Carved { train, withheld }) => {
                        commitment = Some(ContentId::of(&withheld));
                        if let Ok(mut w) = self.withheld.lock() {
                            w.insert(n.clone(), withheld);
                        }
                        node.add_blob(train).await?
                    }
                    None => node.add_blob_path(path).await?,
                };
            }
            out.push((ids, commitment));
        }
        Ok(out)
    }

    /// Serves until `stop`: reports claims, attestations and verdicts; with `accept_verified`
    /// accepts what this node verified into a new registry version.
    pub async fn serve(&self, node: &Node, stop: &Stop, events: &Events) -> Result<()> {
        self.remember_signatures(node).await?;
        events.phase(Phase::Serving);
        let mut observed = node.observe();
        let mut pending: BTreeSet<ContentId> = BTreeSet::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut sync_every = 0u32;
        loop {
            tokio::select! {
                _ = stop.wait() => break,
                ev = observed.recv() => match ev {
                    Ok(Observed::Claim { domain, node: who, lease_expires }) => {
                        events.emit(Event::ClaimSeen {
                            domain,
                            node: who,
                            lease_left_secs: lease_expires.saturating_sub(btm_net::limits::now_secs()),
                        });
                    }
                    Ok(Observed::Attestation { elm, verifier, accepted }) => {
                        events.emit(Event::Attestation { elm, verifier, accepted });
                    }
                    Ok(Observed::Verifying(elm)) => events.emit(Event::Verifying { elm }),
                    Ok(Observed::Verdict(v)) => {
                        if v.accepted && self.config.accept_verified {
                            pending.insert(v.elm);
                        }
                        events.emit(Event::Verdict(v));
                    }
                    Ok(Observed::Registry { version }) => {
                        crate::common::report_registry(node, version, events).await;
                    }
                    Ok(Observed::Proposal(env)) => {
                        if self.config.accept_verified {
                            self.on_proposal(node, env, &mut pending, events).await;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
                _ = tick.tick() => {
                    if let Err(e) = self.tick(node, &mut pending, events).await {
                        events.note(format!("accepting ELMs failed: {e}"));
                    }
                    sync_every += 1;
                    if sync_every.is_multiple_of(20) {
                        let _ = node.sync().await;
                    }
                }
            }
        }
        events.phase(Phase::Stopped);
        Ok(())
    }

    /// Scores an ELM on its domain's withheld pool (windows sampled afresh) and judges it by
    /// the registry's acceptance settings. `Ok(None)`: the domain has no pool this maintainer
    /// holds.
    pub async fn check_withheld(
        &self,
        node: &Node,
        registry: &Registry,
        elm: &btm_protocol::ElmRecord,
    ) -> std::result::Result<Option<btm_net::verify::WithheldCheck>, String> {
        let Some(domain) = registry.domain(&elm.domain).cloned() else {
            return Err(format!("unknown domain {}", elm.domain));
        };
        let (Some(_), Some(pool)) = (domain.eval.withheld, self.withheld(&elm.domain)) else {
            return Ok(None);
        };
        let seed = registry.seed.clone().ok_or("the registry has no seed")?;
        let max = btm_model::weights::MAX_FILE_BYTES;
        let weights = node
            .blobs()
            .read(&elm.weights, max)
            .await
            .map_err(|e| format!("the ELM's weights: {e}"))?;
        let valid = node
            .blobs()
            .read(&domain.valid, max)
            .await
            .map_err(|e| format!("the public split: {e}"))?;
        // The seed is loaded once; its bytes are copied only when it must be.
        let needs_seed = self
            .verifier
            .lock()
            .map(|g| g.as_ref().is_none_or(|v| v.seed() != &seed))
            .unwrap_or(true);
        let seed_bytes = needs_seed.then(|| {
            (
                self.config.seed.weights.clone(),
                self.config.seed.tokenizer.clone(),
            )
        });
        let registry = registry.clone();
        let name = elm.domain.clone();
        let sample: u64 = rand::random();
        let slot = self.verifier.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = slot
                .lock()
                .map_err(|_| "verifier lock poisoned".to_string())?;
            if let Some((w, t)) = seed_bytes {
                let device = btm_model::device::DeviceKind::Cpu
                    .device()
                    .map_err(|e| e.to_string())?;
                *guard = Some(
                    btm_net::verify::Verifier::new(&seed, &w, &t, device)
                        .map_err(|e| e.to_string())?,
                );
            }
            let v = guard.as_mut().ok_or("no verifier")?;
            let m = v
                .measure_withheld(&registry, &name, &weights, &valid, &pool, sample)
                .map_err(|e| e.to_string())?;
            btm_net::verify::judge_withheld(&domain.eval, &m).map_err(|e| e.to_string())?;
            Ok(Some(m))
        })
        .await
        .map_err(|e| format!("the withheld check: {e}"))?
    }

    /// A new registry version with these verified ELM records accepted (those whose domain is
    /// in the registry, whose parents are the seed or accepted ELMs, and which pass this
    /// maintainer's withheld check), signed with this maintainer's keys: offered as the
    /// registry when they meet the root's threshold, else proposed to the other maintainers.
    /// The ids it will never accept are removed from `ids`.
    pub async fn accept(
        &self,
        node: &Node,
        ids: &mut BTreeSet<ContentId>,
        events: &Events,
    ) -> Result<()> {
        let c = &self.config;
        if c.keys.is_empty() {
            return Err(Error::Refused {
                what: "accepting ELMs".into(),
                why: "no maintainer keys to sign with".into(),
            });
        }
        let trusted = node.trusted().await?;
        let root = trusted.root.record();
        let reg = trusted.registry.as_ref().ok_or(Error::NoSeed)?.record();
        let (mut next, added) = self.extend(node, reg, ids, events).await;
        if added.is_empty() {
            return Ok(());
        }
        next.expires = council::expiry(btm_net::limits::now_secs(), c.expires_days);
        if council::keys_meet_threshold(&c.keys, root) {
            next.version = reg.version + 1;
            return self.finish(node, &sign(next, &c.keys), events).await;
        }
        let mut k = self.council.lock().await;
        next.version = k.next_version(reg.version);
        self.propose(node, &mut k, next, events).await
    }

    /// `reg` with those of `ids` added that this maintainer accepts; the ids refused for good
    /// are removed from `ids`.
    async fn extend(
        &self,
        node: &Node,
        reg: &Registry,
        ids: &mut BTreeSet<ContentId>,
        events: &Events,
    ) -> (Registry, Vec<(ContentId, String)>) {
        let mut next = reg.clone();
        let mut added = Vec::new();
        let mut refused = Vec::new();
        for id in ids.iter() {
            if next.elms.iter().any(|e| e.record == *id) {
                refused.push(*id);
                continue;
            }
            let Ok(Ok(Some(env))) = node.with_store(|s| s.elm(id)) else {
                continue;
            };
            let e = env.record();
            match self.acceptable(node, reg, id, e, events).await {
                Ok(()) => {}
                Err(why) => {
                    events.note(format!("not accepting ELM {}: {why}", short(&id.0)));
                    refused.push(*id);
                    continue;
                }
            }
            next.elms.push(AcceptedElm {
                record: *id,
                domain: e.domain.clone(),
                weights: e.weights,
            });
            added.push((*id, e.domain.clone()));
        }
        for id in refused {
            ids.remove(&id);
        }
        next.elms.sort_by_key(|e| e.record);
        (next, added)
    }

    /// This maintainer's own checks of an ELM for acceptance into `reg`: it fits the seed and a
    /// domain, its parents are the seed or accepted ELMs, and it passes the withheld check.
    async fn acceptable(
        &self,
        node: &Node,
        reg: &Registry,
        id: &ContentId,
        e: &btm_protocol::ElmRecord,
        events: &Events,
    ) -> std::result::Result<(), String> {
        rules::elm_fits(reg, e)
            .and_then(|()| rules::parents_known(reg, e))
            .map_err(|r| r.to_string())?;
        // Acceptance rests on the withheld pool, which the trainer never had.
        match self.check_withheld(node, reg, e).await? {
            Some(m) => events.note(format!(
                "ELM {} on {}'s withheld pool: perplexity {:.3} (seed {:.3}; public split {:.3}, memorisation {:.3}, {} tokens)",
                short(&id.0),
                e.domain,
                m.withheld_ppl,
                m.seed_withheld_ppl,
                m.public_ppl,
                m.memorisation(),
                m.tokens
            )),
            None => events.note(format!(
                "ELM {}: {} has no withheld pool here; accepting on public data only",
                short(&id.0),
                e.domain
            )),
        }
        Ok(())
    }

    /// Offers a registry signed by the threshold, and reports it.
    async fn finish(&self, node: &Node, env: &Signed<Registry>, events: &Events) -> Result<()> {
        let before: Vec<ContentId> = node
            .registry()
            .await?
            .map(|r| r.record().elms.iter().map(|e| e.record).collect())
            .unwrap_or_default();
        offer(node, &env.encode()).await?;
        let r = env.record();
        let added = r
            .elms
            .iter()
            .filter(|e| !before.contains(&e.record))
            .map(|e| (e.record, e.domain.clone()))
            .collect();
        // (`serve` reports the registry itself when the node adopts it.)
        events.emit(Event::Published {
            version: r.version,
            domains: r.domains.len(),
            seed: r.seed.as_ref().map_or(ContentId([0; 32]), |s| s.weights),
            added,
        });
        Ok(())
    }

    /// Signs `body` and gossips it as a proposal (this maintainer's keys fall short of the
    /// threshold); the council pushes it until the threshold signs it or it is given up.
    async fn propose(
        &self,
        node: &Node,
        k: &mut Council,
        body: Registry,
        events: &Events,
    ) -> Result<()> {
        let mut env = Signed::new(body);
        if !k.sign(&mut env, &self.config.keys) {
            return Ok(());
        }
        let r = env.record();
        events.note(format!(
            "proposing registry v{} ({} ELMs) to the other maintainers",
            r.version,
            r.elms.len()
        ));
        k.held = Some(Held {
            env,
            since: std::time::Instant::now(),
            sent: None,
        });
        self.push(node, k, events).await
    }

    /// Offers the held proposal once the threshold signed it, else gossips it again when due.
    async fn push(&self, node: &Node, k: &mut Council, events: &Events) -> Result<()> {
        let root = node.trusted().await?.root.into_record();
        let Some(h) = k.held.as_mut() else {
            return Ok(());
        };
        if rules::threshold_met(&h.env, &root) {
            let env = h.env.clone();
            k.held = None;
            return self.finish(node, &env, events).await;
        }
        if h.sent.is_none_or(|t| t.elapsed() >= council::RESEND) {
            node.publish_proposal(&h.env).await?;
            h.sent = Some(std::time::Instant::now());
        }
        Ok(())
    }

    /// Once a second: accepts or proposes what this node verified, pushes the held proposal,
    /// gives up a stuck one, and retries a foreign proposal that waited for verdicts.
    async fn tick(
        &self,
        node: &Node,
        pending: &mut BTreeSet<ContentId>,
        events: &Events,
    ) -> Result<()> {
        let trusted = node.trusted().await?;
        let root = trusted.root.record().clone();
        let tv = trusted.registry.as_ref().map_or(0, |r| r.record().version);
        if let Some(r) = &trusted.registry {
            pending.retain(|id| !r.record().elms.iter().any(|e| e.record == *id));
        }
        if council::keys_meet_threshold(&self.config.keys, &root) {
            if !pending.is_empty() {
                return self.accept(node, pending, events).await;
            }
            return Ok(());
        }
        let mut k = self.council.lock().await;
        k.settle(tv);
        let rank = council::rank(&self.config.keys, &root);
        let patience = council::STUCK + council::RANK_DELAY * rank.min(64);
        if let Some(h) = &k.held
            && h.since.elapsed() > patience
        {
            let r = h.env.record();
            events.note(format!(
                "registry v{} gathered {} of {} signatures in {} s; giving that version up",
                r.version,
                rules::tally(&h.env, &root.keys).valid,
                root.threshold,
                patience.as_secs()
            ));
            k.held = None;
            k.wanting_since = Some(std::time::Instant::now());
        }
        if k.held.is_some() {
            return self.push(node, &mut k, events).await;
        }
        if let Some(w) = k.waiting.take() {
            if w.since.elapsed() > patience {
                events.note(format!(
                    "registry v{} waited {} s for this node's verdicts on its ELMs; not signing it",
                    w.env.record().version,
                    patience.as_secs()
                ));
                k.refused.insert(w.env.id());
                return Ok(());
            }
            drop(k);
            self.on_proposal(node, w.env, pending, events).await;
            k = self.council.lock().await;
            if k.held.is_some() || k.waiting.is_some() {
                return Ok(());
            }
        }
        let wants = !pending.is_empty() || (trusted.registry.is_none() && k.genesis.is_some());
        if !wants {
            k.wanting_since = None;
            return Ok(());
        }
        let since = *k.wanting_since.get_or_insert_with(std::time::Instant::now);
        if since.elapsed() < council::RANK_DELAY * rank.min(64) {
            return Ok(());
        }
        match &trusted.registry {
            None => {
                let Some(mut body) = k.genesis.clone() else {
                    return Ok(());
                };
                body.version = k.next_version(0);
                body.expires =
                    council::expiry(btm_net::limits::now_secs(), self.config.expires_days);
                self.propose(node, &mut k, body, events).await
            }
            Some(_) => {
                drop(k);
                self.accept(node, pending, events).await
            }
        }
    }

    /// Another maintainer's proposal: merges its signatures into the held one of the same body,
    /// or co-signs it when this maintainer verified everything it adds (and signed no other
    /// body of its version).
    async fn on_proposal(
        &self,
        node: &Node,
        env: Signed<Registry>,
        pending: &mut BTreeSet<ContentId>,
        events: &Events,
    ) {
        let Ok(trusted) = node.trusted().await else {
            return;
        };
        let root = trusted.root.record().clone();
        let tv = trusted.registry.as_ref().map_or(0, |r| r.record().version);
        let v = env.record().version;
        let id = env.id();
        let mut k = self.council.lock().await;
        if v <= tv || k.refused.contains(&id) {
            return;
        }
        k.seen = k.seen.max(v);
        if let Some(h) = k.held.as_mut()
            && h.env.id() == id
        {
            council::merge(&mut h.env, &env);
            h.sent = None;
            if let Err(e) = self.push(node, &mut k, events).await {
                events.note(format!("offering registry v{v} failed: {e}"));
            }
            return;
        }
        if k.signed.get(&v).is_some_and(|s| *s != id) {
            return;
        }
        drop(k);
        let judged = self.judge(node, &trusted, env.record(), events).await;
        let mut k = self.council.lock().await;
        match judged {
            Judgement::Wait => {
                let since = match &k.waiting {
                    Some(w) if w.env.id() == id => w.since,
                    Some(w) if w.env.record().version > v => return,
                    _ => std::time::Instant::now(),
                };
                k.waiting = Some(Held {
                    env,
                    since,
                    sent: None,
                });
            }
            Judgement::Refuse(why) => {
                events.note(format!(
                    "not co-signing registry v{v} ({}): {why}",
                    short(&id.0)
                ));
                k.refused.insert(id);
            }
            Judgement::Sign(added) => {
                let mut env = env;
                if !k.sign(&mut env, &self.config.keys) {
                    return;
                }
                for a in &added {
                    pending.remove(a);
                }
                events.note(format!(
                    "co-signed registry v{v} ({} of {} signatures)",
                    rules::tally(&env, &root.keys).valid,
                    root.threshold
                ));
                k.held = Some(Held {
                    env,
                    since: std::time::Instant::now(),
                    sent: None,
                });
                if let Err(e) = self.push(node, &mut k, events).await {
                    events.note(format!("pushing registry v{v} failed: {e}"));
                }
            }
        }
    }

    /// Whether this maintainer signs `proposed`: the first registry only if it is the one this
    /// maintainer builds; a later one only if it adds nothing but ELMs this node accepted on
    /// the public split and this maintainer accepts on its withheld pool.
    async fn judge(
        &self,
        node: &Node,
        trusted: &btm_registry::Trusted,
        proposed: &Registry,
        events: &Events,
    ) -> Judgement {
        let now = btm_net::limits::now_secs();
        let max_expires = council::expiry(now + 86_400, self.config.expires_days);
        let Some(current) = &trusted.registry else {
            let k = self.council.lock().await;
            return match &k.genesis {
                Some(g) if council::same_content(g, proposed) && proposed.expires <= max_expires => {
                    Judgement::Sign(vec![])
                }
                Some(_) => Judgement::Refuse(
                    "it is not the registry this maintainer builds from its seed, data and settings"
                        .into(),
                ),
                None => Judgement::Wait,
            };
        };
        let reg = current.record();
        let added = match rules::proposal_extends(reg, proposed, max_expires) {
            Ok(a) => a,
            Err(r) => return Judgement::Refuse(r.to_string()),
        };
        // First the verdicts of this node (cheap); the withheld checks only once all are in.
        let mut records = Vec::new();
        for a in &added {
            match node.verdict(&a.record) {
                Ok(Some(att)) if att.verdict == btm_protocol::Verdict::Accept => {}
                Ok(Some(_)) => {
                    return Judgement::Refuse(format!(
                        "ELM {} failed this node's verification",
                        short(&a.record.0)
                    ));
                }
                _ => return Judgement::Wait,
            }
            match node.with_store(|s| s.elm(&a.record)) {
                Ok(Ok(Some(env))) => records.push(env),
                _ => return Judgement::Wait,
            }
        }
        for (a, env) in added.iter().zip(&records) {
            let e = env.record();
            if e.domain != a.domain || e.weights != a.weights {
                return Judgement::Refuse(format!(
                    "ELM {} is listed with another domain or weights than its record's",
                    short(&a.record.0)
                ));
            }
            if let Err(why) = self.acceptable(node, reg, &a.record, e, events).await {
                return Judgement::Refuse(format!("ELM {}: {why}", short(&a.record.0)));
            }
        }
        Judgement::Sign(added.iter().map(|a| a.record).collect())
    }

    /// The first registry when this maintainer's keys fall short of the threshold: proposes the
    /// body it built and co-signs the same body from the others, until a registry is trusted.
    async fn gather_genesis(&self, node: &Node, body: Registry, events: &Events) -> Result<u64> {
        let mut observed = node.observe();
        {
            let mut k = self.council.lock().await;
            k.genesis = Some(body.clone());
            k.wanting_since = Some(std::time::Instant::now());
            self.propose(node, &mut k, body.clone(), events).await?;
        }
        let deadline = std::time::Instant::now() + council::GENESIS_WAIT;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut none = BTreeSet::new();
        loop {
            if let Some(r) = node.registry().await? {
                let r = r.record();
                if r.domains == body.domains && r.seed == body.seed {
                    return Ok(r.version);
                }
                return Err(Error::Refused {
                    what: "publishing the registry".into(),
                    why: format!(
                        "the network trusts registry v{} with other domains or another seed than this maintainer builds",
                        r.version
                    ),
                });
            }
            if std::time::Instant::now() > deadline {
                let root = node.trusted().await?.root.into_record();
                return Err(Error::Refused {
                    what: "publishing the registry".into(),
                    why: format!(
                        "the other maintainers did not co-sign it within {} s (threshold {}, this maintainer holds {} key(s)); start them with the same seed, data and settings",
                        council::GENESIS_WAIT.as_secs(),
                        root.threshold,
                        self.config.keys.len()
                    ),
                });
            }
            tokio::select! {
                ev = observed.recv() => match ev {
                    Ok(Observed::Proposal(env)) => self.on_proposal(node, env, &mut none, events).await,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        return Err(Error::Refused {
                            what: "publishing the registry".into(),
                            why: "the node stopped".into(),
                        });
                    }
                },
                _ = tick.tick() => self.tick(node, &mut none, events).await?,
            }
        }
    }
}
