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
        }
    }

    /// The withheld pool of `domain`, if this maintainer carved one.
    pub fn withheld(&self, domain: &str) -> Option<Vec<u8>> {
        self.withheld.lock().ok()?.get(domain).cloned()
    }

    /// Adds the seed and the domains' data as blobs, publishes rotated roots and the registry.
    pub async fn publish(&self, node: &Node, events: &Events) -> Result<Published> {
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
                    expires: btm_net::limits::now_secs() + c.expires_days * 86_400,
                    min_client_version: ClientVersion {
                        major: 0,
                        minor: 1,
                        patch: 0,
                    },
                    domains,
                    seed: Some(seed.clone()),
                    elms: elms
                        .into_iter()
                        .filter(|e| names.contains(&e.domain))
                        .collect(),
                };
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
                    Ok(Observed::Verdict { elm, accepted, measured_ppl, reason }) => {
                        events.emit(Event::Verdict { elm, accepted, measured_ppl, reason });
                        if accepted && self.config.accept_verified {
                            pending.insert(elm);
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
                _ = tick.tick() => {
                    if !pending.is_empty() {
                        let ids = std::mem::take(&mut pending);
                        if let Err(e) = self.accept(node, &ids, events).await {
                            events.note(format!("accepting ELMs failed: {e}"));
                        }
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
    /// in the registry and whose parents are the seed or accepted ELMs).
    pub async fn accept(
        &self,
        node: &Node,
        ids: &BTreeSet<ContentId>,
        events: &Events,
    ) -> Result<()> {
        let c = &self.config;
        if c.keys.is_empty() {
            return Err(Error::Refused {
                what: "accepting ELMs".into(),
                why: "no maintainer keys to sign with".into(),
            });
        }
        let trusted = node.registry().await?.ok_or(Error::NoSeed)?;
        let mut reg = trusted.record().clone();
        let mut added = Vec::new();
        for id in ids {
            if reg.elms.iter().any(|e| e.record == *id) {
                continue;
            }
            let Some(env) = node.with_store(|s| s.elm(id))?? else {
                continue;
            };
            let e = env.record();
            let fits = rules::elm_fits(&reg, e).and_then(|()| rules::parents_known(&reg, e));
            if let Err(r) = fits {
                events.note(format!("not accepting ELM {}: {r}", short(&id.0)));
                continue;
            }
            // Acceptance rests on the withheld pool, which the trainer never had.
            match self.check_withheld(node, &reg, e).await {
                Ok(Some(m)) => events.note(format!(
                    "ELM {} on {}'s withheld pool: perplexity {:.3} (seed {:.3}; public split {:.3}, memorisation {:.3}, {} tokens)",
                    short(&id.0),
                    e.domain,
                    m.withheld_ppl,
                    m.seed_withheld_ppl,
                    m.public_ppl,
                    m.memorisation(),
                    m.tokens
                )),
                Ok(None) => events.note(format!(
                    "ELM {}: {} has no withheld pool here; accepting on public data only",
                    short(&id.0),
                    e.domain
                )),
                Err(why) => {
                    events.note(format!("not accepting ELM {}: {why}", short(&id.0)));
                    continue;
                }
            }
            reg.elms.push(AcceptedElm {
                record: *id,
                domain: e.domain.clone(),
                weights: e.weights,
            });
            added.push((*id, e.domain.clone()));
        }
        if added.is_empty() {
            return Ok(());
        }
        reg.elms.sort_by_key(|e| e.record);
        reg.version += 1;
        reg.expires = btm_net::limits::now_secs() + c.expires_days * 86_400;
        let env = sign(reg, &c.keys);
        offer(node, &env.encode()).await?;
        let r = env.record();
        events.emit(Event::Published {
            version: r.version,
            domains: r.domains.len(),
            seed: r.seed.as_ref().map_or(ContentId([0; 32]), |s| s.weights),
            added,
        });
        events.emit(Event::Registry {
            version: r.version,
            domains: r.domains.len(),
            seed: r.seed.as_ref().map(|s| s.weights),
            accepted: r.elms.iter().map(|e| e.record).collect(),
        });
        Ok(())
    }
}
