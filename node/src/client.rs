//! The client: a short-lived node that finds the network's ELMs, verifies each itself
//! (signature, hash, shapes, finite values, re-scored perplexity) and writes the verified ones
//! as a local forest, or lists what the network holds and who verified it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use btm_model::files::TOKENIZER_FILE;
use btm_model::forest::Forest;
use btm_model::forest::manifest::{self, InitKind, Parent, TrainRecord};
use btm_model::fsutil;
use btm_model::tokenizer::Tokenizer;
use btm_net::Node;
use btm_protocol::{ContentId, ElmRecord, Registry, Signed, Verdict, milli_to_ppl};
use serde::Serialize;

use crate::common::{fetch_reported, own_verdicts, short, wait_registry};
use crate::error::{Error, Result, io};
use crate::{Events, Phase, Stop};

/// How long to wait for the registry and for verdicts.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub wait_registry: Duration,
    /// Longest time to spend finding and verifying ELMs.
    pub wait: Duration,
}

/// One ELM as the network holds it.
#[derive(Debug, Clone, Serialize)]
pub struct ListedElm {
    pub id: ContentId,
    pub domain: String,
    pub trainer: btm_protocol::NodeId,
    pub claimed_ppl: f64,
    pub in_registry: bool,
    /// This node's verdict (None: not verified yet).
    pub verified_here: Option<bool>,
    /// Verifier node id (hex) -> (accepted, measured perplexity).
    pub attestations: BTreeMap<String, (bool, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ListedDomain {
    pub name: String,
    /// Node id (hex) -> seconds of lease left.
    pub claims: BTreeMap<String, u64>,
    pub elms: Vec<ListedElm>,
}

/// What the network holds, domain by domain.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub registry_version: u64,
    pub registry_expires: u64,
    pub seed: Option<ContentId>,
    pub domains: Vec<ListedDomain>,
}

/// What to fetch.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    /// Forest directory to write.
    pub out: PathBuf,
    /// Only ELMs of these domains (all when empty).
    pub domains: Vec<String>,
    /// Also take ELMs this node rejected or could not verify.
    pub unverified: bool,
    /// Keep looking until at least this many ELMs are verified.
    pub min_elms: Option<usize>,
}

/// One ELM written into the forest.
#[derive(Debug, Clone, Serialize)]
pub struct FetchedElm {
    pub name: String,
    pub domain: String,
    pub id: ContentId,
    pub weights: ContentId,
    pub verified_here: Option<bool>,
    pub measured_ppl: Option<f64>,
    pub claimed_ppl: f64,
    /// Verifiers that accepted it.
    pub verifiers: usize,
}

/// A client of the network.
#[derive(Debug, Clone)]
pub struct Client {
    config: ClientConfig,
}

impl Client {
    pub fn new(config: ClientConfig) -> Client {
        Client { config }
    }

    /// Waits for the registry, catches up from the DHT and lets the verifier work for up to
    /// `wait` (less once every ELM found has a verdict and `enough` holds). `None` when stopped.
    pub async fn catch_up(
        &self,
        node: &Node,
        stop: &Stop,
        events: &Events,
        enough: impl Fn(&[(Signed<ElmRecord>, Option<bool>)]) -> bool,
    ) -> Result<Option<Signed<Registry>>> {
        events.phase(Phase::WaitingForRegistry);
        let Some(reg) = wait_registry(node, self.config.wait_registry, stop).await? else {
            return Ok(None);
        };
        events.emit(crate::Event::Registry {
            version: reg.record().version,
            domains: reg.record().domains.len(),
            seed: reg.record().seed.as_ref().map(|s| s.weights),
            accepted: reg.record().elms.iter().map(|e| e.record).collect(),
        });
        let deadline = Instant::now() + self.config.wait;
        let mut last_sync = Instant::now() - Duration::from_secs(60);
        loop {
            if last_sync.elapsed() > Duration::from_secs(5) {
                let _ = node.sync().await;
                last_sync = Instant::now();
            }
            let elms = own_verdicts(node)?;
            let pending = elms.iter().filter(|(_, v)| v.is_none()).count();
            if (pending == 0 && enough(&elms)) || Instant::now() >= deadline {
                break;
            }
            if stop.sleep(Duration::from_millis(500)).await {
                return Ok(None);
            }
        }
        Ok(node.registry().await?)
    }

    /// What the network holds: per domain, live claims and ELMs with every verdict known here.
    pub fn listing(node: &Node, reg: &Registry) -> Result<Listing> {
        let now = btm_net::limits::now_secs();
        let elms = own_verdicts(node)?;
        let mut domains = Vec::new();
        for d in &reg.domains {
            let claims = node
                .with_store(|s| s.claims(&d.name, now))??
                .into_iter()
                .map(|c| {
                    let c = c.into_record();
                    (c.node.to_string(), c.lease_expires.saturating_sub(now))
                })
                .collect();
            let mut listed = Vec::new();
            for (env, verdict) in elms.iter().filter(|(e, _)| e.record().domain == d.name) {
                let id = env.id();
                let attestations = node
                    .with_store(|s| s.attestations(&id))??
                    .into_iter()
                    .map(|a| {
                        let a = a.into_record();
                        (
                            a.verifier.to_string(),
                            (
                                a.verdict == Verdict::Accept,
                                milli_to_ppl(a.measured_ppl_milli),
                            ),
                        )
                    })
                    .collect();
                let e = env.record();
                listed.push(ListedElm {
                    id,
                    domain: e.domain.clone(),
                    trainer: e.trainer,
                    claimed_ppl: milli_to_ppl(e.claimed_valid_ppl_milli),
                    in_registry: reg.elms.iter().any(|x| x.record == id),
                    verified_here: *verdict,
                    attestations,
                });
            }
            domains.push(ListedDomain {
                name: d.name.clone(),
                claims,
                elms: listed,
            });
        }
        Ok(Listing {
            registry_version: reg.version,
            registry_expires: reg.expires,
            seed: reg.seed.as_ref().map(|s| s.weights),
            domains,
        })
    }

    /// Finds and verifies ELMs, then writes the verified ones (with the seed, the tokenizer and
    /// each domain's validation and test data) as a forest in `req.out`. `None` when stopped.
    pub async fn fetch(
        &self,
        node: &Node,
        req: &FetchRequest,
        stop: &Stop,
        events: &Events,
    ) -> Result<Option<Vec<FetchedElm>>> {
        let wanted = |d: &str| req.domains.is_empty() || req.domains.iter().any(|x| x == d);
        let min = req.min_elms;
        let Some(reg) = self
            .catch_up(node, stop, events, |elms| {
                let ok = elms
                    .iter()
                    .filter(|(e, v)| *v == Some(true) && wanted(&e.record().domain))
                    .count();
                min.is_none_or(|m| ok >= m)
            })
            .await?
        else {
            return Ok(None);
        };
        let reg = reg.into_record();
        let seed = reg.seed.clone().ok_or(Error::NoSeed)?;
        let elms: Vec<_> = own_verdicts(node)?
            .into_iter()
            .filter(|(e, v)| wanted(&e.record().domain) && (req.unverified || *v == Some(true)))
            .collect();
        if let Some(m) = req.min_elms
            && elms.len() < m
        {
            return Err(Error::NotEnough(format!(
                "only {} verified ELMs after {} s (wanted {m}); try again later or wait longer",
                elms.len(),
                self.config.wait.as_secs()
            )));
        }
        if elms.is_empty() {
            return Err(Error::NotEnough(
                "no verified ELMs on the network yet".into(),
            ));
        }
        events.phase(Phase::Downloading);
        let out = &req.out;
        let elms_dir = out.join("elms");
        std::fs::create_dir_all(&elms_dir).map_err(io(&elms_dir))?;
        for (what, id) in [("seed", seed.weights), ("tokenizer", seed.tokenizer)] {
            events.emit(crate::Event::Fetching {
                what: what.into(),
                id,
            });
            fetch_reported(node, what, id, &[], None, events).await?;
        }
        let seed_path = out.join("seed.safetensors");
        let tok_path = out.join(TOKENIZER_FILE);
        node.blobs().export(&seed.weights, &seed_path).await?;
        node.blobs().export(&seed.tokenizer, &tok_path).await?;
        let tok = Tokenizer::load(&tok_path)?;
        let arch = btm_net::verify::config_of(&seed.architecture);
        let manifest_path = out.join(manifest::MANIFEST_FILE);
        if manifest_path.exists() {
            std::fs::remove_file(&manifest_path).map_err(io(&manifest_path))?;
        }
        let mut forest = Forest::create(out, arch, &tok_path)?;
        forest.set_seed(&seed_path)?;
        let mut domains_done = Vec::new();
        let mut rows = Vec::new();
        let mut names_of: BTreeMap<ContentId, String> = BTreeMap::new();
        names_of.insert(seed.weights, "seed".into());
        let me = node.node_id();
        for (env, verdict) in &elms {
            let e = env.record();
            let id = env.id();
            let what = format!("{} ELM's weights", e.domain);
            events.emit(crate::Event::Fetching {
                what: what.clone(),
                id: e.weights,
            });
            fetch_reported(
                node,
                &what,
                e.weights,
                &[e.trainer],
                Some(e.weights_size),
                events,
            )
            .await?;
            let path = elms_dir.join(format!("{}-{}.safetensors", e.domain, short(&id.0)));
            node.blobs().export(&e.weights, &path).await?;
            let name = if forest.elms.iter().any(|x| x.name == e.domain) {
                format!("{}-{}", e.domain, short(&id.0))
            } else {
                e.domain.clone()
            };
            let init = if e.parents.len() == 1 && e.parents[0].weights == seed.weights {
                InitKind::Seed
            } else {
                InitKind::PosteriorAverage
            };
            let parents = e
                .parents
                .iter()
                .map(|p| Parent {
                    name: names_of
                        .get(&p.weights)
                        .cloned()
                        .unwrap_or_else(|| short(&p.weights.0)),
                    id: p.weights.to_string(),
                    weight: f64::from(p.weight_ppm) / 1e6,
                })
                .collect();
            forest.add(
                &name,
                vec![e.domain.clone()],
                &path,
                &tok.id(),
                init,
                parents,
                Some(TrainRecord {
                    steps: e.steps,
                    tokens: e.tokens,
                    flops: e.flops as f64,
                }),
            )?;
            names_of.insert(e.weights, name.clone());
            if !domains_done.contains(&e.domain)
                && let Some(d) = reg.domain(&e.domain)
            {
                write_domain_data(node, out, &e.domain, d.valid, d.test).await?;
                domains_done.push(e.domain.clone());
            }
            let atts = node.with_store(|s| s.attestations(&id))??;
            let measured = atts
                .iter()
                .map(|a| a.record())
                .find(|a| a.verifier == me && a.verdict == Verdict::Accept)
                .map(|a| milli_to_ppl(a.measured_ppl_milli));
            rows.push(FetchedElm {
                name,
                domain: e.domain.clone(),
                id,
                weights: e.weights,
                verified_here: *verdict,
                measured_ppl: measured,
                claimed_ppl: milli_to_ppl(e.claimed_valid_ppl_milli),
                verifiers: atts
                    .iter()
                    .filter(|a| a.record().verdict == Verdict::Accept)
                    .count(),
            });
        }
        forest.save()?;
        Ok(Some(rows))
    }
}

/// A domain's validation and test data under `<out>/data/<domain>/`, for reports and priors.
async fn write_domain_data(
    node: &Node,
    out: &Path,
    domain: &str,
    valid: ContentId,
    test: ContentId,
) -> Result<()> {
    let max = btm_net::blobs::BlobConfig::default().max_blob_bytes;
    for (split, blob) in [("valid", valid), ("test", test)] {
        node.fetch_blob(blob, &[]).await?;
        let bytes = node.blobs().read(&blob, max).await?;
        let ext = if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            "jsonl.zst"
        } else {
            "jsonl"
        };
        let dir = out.join("data").join(domain);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        fsutil::write_atomic(&dir.join(format!("{split}.{ext}")), &bytes)?;
    }
    Ok(())
}
