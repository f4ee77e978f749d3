//! `btm-node seed train|publish`: the maintainers' side on the network. `publish` starts a
//! node that holds the seed and every domain's data as blobs, publishes a signed registry
//! version naming them, writes the network description volunteers and clients start from, and
//! keeps serving; with `--accept-verified` it verifies announced ELMs itself and accepts the ones
//! that pass into a new registry version.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use btm_model::data::{Corpus, Split, TRAIN_DOMAINS};
use btm_net::{Node, Observed};
use btm_protocol::{
    AcceptedElm, Architecture, ClientVersion, ContentId, Domain, EvalSettings, Registry,
    SeedManifest, Signed, SigningKey, TrainingSummary, ppl_to_milli,
};
use btm_registry::Decision;
use clap::{Args, Subcommand};

use crate::model_cmds;
use crate::net::{
    self, ConfigFile, NetArgs, NetworkFile, NodeSettings, Say, StatusFile, Stop, short,
};

#[derive(Debug, Subcommand)]
pub enum SeedCmd {
    /// Train the seed LM on the domain-balanced mix of the eight training domains.
    Train(model_cmds::TrainArgs),
    /// Publish the registry and the seed on the network and serve them; optionally accept verified ELMs.
    Publish(PublishArgs),
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    net: NetArgs,
    /// The seed: a directory holding model.safetensors and tokenizer.json (from `btm-node seed train`).
    #[arg(long, default_value = "runs/seed")]
    seed: PathBuf,
    /// A maintainer key file; repeat until the root's threshold is met.
    #[arg(long = "key", required_unless_present = "registry")]
    keys: Vec<PathBuf>,
    /// Publish this registry file (signed with the file workflow, `btm-node registry ...`)
    /// instead of building and signing one.
    #[arg(long)]
    registry: Option<PathBuf>,
    /// A rotated root (version trusted + 1, signed by a threshold of the old keys and of its
    /// own, from `btm-node registry root-init` and `sign`) to publish before the registry;
    /// repeat for a chain, oldest first. Registries are then signed with the new keys.
    #[arg(long = "rotate-root")]
    rotate_roots: Vec<PathBuf>,
    /// Domains of the registry (default: the eight training domains of the corpus).
    #[arg(long, value_delimiter = ',')]
    domains: Vec<String>,
    /// Corpus root holding the domains' train/valid/test splits (default: the bundled one).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Validation tokens verifiers score per domain.
    #[arg(long, default_value_t = 8192)]
    eval_tokens: u64,
    /// How far a claimed perplexity may be from the verifier's measurement, in parts per million.
    #[arg(long, default_value_t = 10_000)]
    tolerance_ppm: u32,
    /// Days until the registry expires (clients refuse an expired registry).
    #[arg(long, default_value_t = 30)]
    expires_days: u64,
    /// Write the network description (root and this node's addresses) here.
    #[arg(long)]
    network_out: Option<PathBuf>,
    /// Verify announced ELMs and accept the ones that pass into a new registry version.
    #[arg(long)]
    accept_verified: bool,
}

pub fn run_seed(cmd: SeedCmd, json: bool) -> Result<()> {
    match cmd {
        SeedCmd::Train(mut a) => {
            a.seed_mix = true;
            a.domain.clear();
            if a.out.is_none() {
                a.out = Some(PathBuf::from("runs/seed"));
            }
            model_cmds::train(a, json)
        }
        SeedCmd::Publish(a) => publish(a, json),
    }
}

fn publish(a: PublishArgs, json: bool) -> Result<()> {
    let config = ConfigFile::load(a.net.config.as_deref())?;
    if a.net.root.is_none()
        && a.net.network.is_none()
        && config.root.is_none()
        && config.network.is_none()
    {
        bail!("pass --root with the network's root envelope (from `btm-node registry root-init`)");
    }
    let settings = NodeSettings::resolve(&a.net, &config, "runs/maintainer")?;
    let keys = a
        .keys
        .iter()
        .map(|p| {
            btm_registry::maintainer::load_key(p).with_context(|| format!("key {}", p.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    net::runtime()?.block_on(run(a, settings, keys, json))
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The seed's architecture from its weights file.
fn architecture(weights: &[u8]) -> Result<Architecture> {
    let (cfg, _) = btm_model::weights::parse(weights, None).context("the seed weights")?;
    Ok(Architecture {
        vocab_size: cfg.vocab_size as u32,
        context: cfg.n_ctx as u32,
        d_model: cfg.d_model as u32,
        heads: cfg.n_heads as u32,
        layers: cfg.n_layers as u32,
    })
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

fn sign(registry: Registry, keys: &[SigningKey]) -> Signed<Registry> {
    let mut env = Signed::new(registry);
    for k in keys {
        env.sign(k);
    }
    env
}

async fn offer(node: &Node, env: &[u8]) -> Result<()> {
    match node.publish_registry(env).await? {
        Decision::Accept(_) | Decision::Unchanged => Ok(()),
        Decision::Reject(r) => bail!("the registry was refused: {r}"),
    }
}

async fn run(
    a: PublishArgs,
    settings: NodeSettings,
    keys: Vec<SigningKey>,
    json: bool,
) -> Result<()> {
    let say = Say::new("maintainer", json);
    net::run_node(&settings, "maintainer", async |node, status, stop| {
        serve(&a, &settings, &keys, node, status, stop, &say).await
    })
    .await
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    a: &PublishArgs,
    settings: &NodeSettings,
    keys: &[SigningKey],
    node: &Node,
    status: &StatusFile,
    stop: &Stop,
    say: &Say,
) -> Result<()> {
    let corpus = a.corpus.clone().map_or_else(Corpus::bundled, Corpus::new);
    status.update(|s| s.phase = "adding blobs".into());

    // The seed.
    let seed_weights = read_file(&a.seed.join("model.safetensors"))?;
    let tokenizer = read_file(&a.seed.join("tokenizer.json"))?;
    let seed = SeedManifest {
        architecture: architecture(&seed_weights)?,
        tokenizer: node.add_blob(tokenizer).await?,
        weights: node.add_blob(seed_weights).await?,
        training: training_summary(&a.seed),
    };
    say.line(format!(
        "seed {} and tokenizer {} added",
        short(&seed.weights.0),
        short(&seed.tokenizer.0)
    ));

    // Key rotation: each root is checked by this node's rules, adopted, stored on the DHT under
    // its version and gossiped; nodes that started from an older root walk the chain.
    for path in &a.rotate_roots {
        let bytes = read_file(path)?;
        match node.publish_root(&bytes).await? {
            Decision::Accept(r) => say.line(format!(
                "root v{} published ({} keys, threshold {})",
                r.record().version,
                r.record().keys.len(),
                r.record().threshold
            )),
            Decision::Unchanged => {}
            Decision::Reject(r) => bail!("the root {} was refused: {r}", path.display()),
        }
    }

    // The registry: the given file, or a new version built here.
    let envelope = match &a.registry {
        Some(path) => {
            let env: Signed<Registry> = btm_registry::maintainer::read_envelope(path)?;
            let names: Vec<String> = env
                .record()
                .domains
                .iter()
                .map(|d| d.name.clone())
                .collect();
            add_domain_blobs(node, &corpus, &names, say).await?;
            if env.record().seed.as_ref() != Some(&seed) {
                bail!(
                    "{} names another seed than {} holds",
                    path.display(),
                    a.seed.display()
                );
            }
            env
        }
        None => {
            let names: Vec<String> = if a.domains.is_empty() {
                TRAIN_DOMAINS.iter().map(|s| s.to_string()).collect()
            } else {
                a.domains.clone()
            };
            let ids = add_domain_blobs(node, &corpus, &names, say).await?;
            let trusted = node.registry().await?;
            let version = trusted.as_ref().map_or(1, |r| r.record().version + 1);
            let elms = trusted.map(|r| r.record().elms.clone()).unwrap_or_default();
            let mut domains: Vec<Domain> = names
                .iter()
                .zip(ids)
                .map(|(n, [train, valid, test])| Domain {
                    name: n.clone(),
                    description: format!("{n} (bundled btm corpus)"),
                    train,
                    valid,
                    test,
                    eval: EvalSettings {
                        block_size: seed.architecture.context,
                        max_eval_tokens: a.eval_tokens,
                        ppl_tolerance_ppm: a.tolerance_ppm,
                    },
                })
                .collect();
            domains.sort_by(|x, y| x.name.cmp(&y.name));
            let registry = Registry {
                version,
                expires: btm_net::limits::now_secs() + a.expires_days * 86_400,
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
            sign(registry, keys)
        }
    };
    offer(node, &envelope.encode()).await?;
    let version = envelope.record().version;
    say.line(format!(
        "published registry v{version}: {} domains, seed {}",
        envelope.record().domains.len(),
        short(&seed.weights.0)
    ));
    let addrs = node.listen_addrs().await?;
    if let Some(out) = &a.network_out {
        NetworkFile {
            name: "btm network".into(),
            root: net::to_hex(&settings.root),
            bootstrap: addrs.iter().map(ToString::to_string).collect(),
        }
        .save(out)?;
        say.line(format!("network description written to {}", out.display()));
    }
    status.update(|s| {
        s.phase = "serving".into();
        s.registry_version = Some(version);
        s.listen = addrs.iter().map(ToString::to_string).collect();
    });

    // Serve: report claims and attestations, accept what this node verified.
    say.line(if a.accept_verified {
        "serving; verifying announced ELMs and accepting the ones that pass (Ctrl-C to stop)"
    } else {
        "serving (Ctrl-C to stop)"
    });
    let mut events = node.observe();
    let mut pending: BTreeSet<ContentId> = BTreeSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut sync_every = 0u32;
    loop {
        tokio::select! {
            _ = stop.wait() => break,
            ev = events.recv() => match ev {
                Ok(Observed::Claim { domain, node: who, lease_expires }) => say.line(format!(
                    "claim: {} on {domain} for {} s",
                    short(who.as_bytes()),
                    lease_expires.saturating_sub(btm_net::limits::now_secs())
                )),
                Ok(Observed::Attestation { elm, verifier, accepted }) => say.line(format!(
                    "attestation: {} {} ELM {}",
                    short(verifier.as_bytes()),
                    if accepted { "accepts" } else { "rejects" },
                    short(&elm.0)
                )),
                Ok(Observed::Verdict { elm, accepted, measured_ppl, reason }) => {
                    say.line(format!(
                        "verified ELM {}: {}",
                        short(&elm.0),
                        if accepted {
                            format!("accepted, perplexity {:.2}", measured_ppl.unwrap_or(f64::NAN))
                        } else {
                            format!("rejected: {reason}")
                        }
                    ));
                    status.update(|s| {
                        s.verified.insert(net::to_hex(&elm.0), accepted);
                    });
                    if accepted && a.accept_verified {
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
                    if let Err(e) = accept(node, keys, &ids, a.expires_days, status, say).await {
                        say.line(format!("accepting ELMs failed: {e:#}"));
                    }
                }
                sync_every += 1;
                if sync_every.is_multiple_of(20) {
                    let _ = node.sync().await;
                }
            }
        }
    }
    say.line("stopping");
    status.update(|s| s.phase = "stopped".into());
    Ok(())
}

/// Adds each domain's train, valid and test splits as blobs; returns their ids.
async fn add_domain_blobs(
    node: &Node,
    corpus: &Corpus,
    names: &[String],
    say: &Say,
) -> Result<Vec<[ContentId; 3]>> {
    let mut out = Vec::new();
    for n in names {
        let mut ids = [ContentId([0; 32]); 3];
        for (i, split) in [Split::Train, Split::Valid, Split::Test]
            .into_iter()
            .enumerate()
        {
            let path = corpus.path(n, split)?;
            ids[i] = node
                .add_blob_path(&path)
                .await
                .with_context(|| format!("adding {}", path.display()))?;
        }
        out.push(ids);
    }
    say.line(format!("domain data added: {}", names.join(", ")));
    Ok(out)
}

/// A new registry version with these verified ELM records accepted.
async fn accept(
    node: &Node,
    keys: &[SigningKey],
    ids: &BTreeSet<ContentId>,
    expires_days: u64,
    status: &StatusFile,
    say: &Say,
) -> Result<()> {
    if keys.is_empty() {
        bail!("no maintainer keys to sign with");
    }
    let trusted = node.registry().await?.context("no trusted registry")?;
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
        if reg.domain(&e.domain).is_none() {
            continue;
        }
        reg.elms.push(AcceptedElm {
            record: *id,
            domain: e.domain.clone(),
            weights: e.weights,
        });
        added.push(format!("{} ({})", short(&id.0), e.domain));
    }
    if added.is_empty() {
        return Ok(());
    }
    reg.elms.sort_by_key(|e| e.record);
    reg.version += 1;
    reg.expires = btm_net::limits::now_secs() + expires_days * 86_400;
    let env = sign(reg, keys);
    offer(node, &env.encode()).await?;
    let version = env.record().version;
    say.line(format!("registry v{version} accepts {}", added.join(", ")));
    status.update(|s| {
        s.registry_version = Some(version);
        s.accepted = env
            .record()
            .elms
            .iter()
            .map(|e| net::to_hex(&e.record.0))
            .collect();
    });
    Ok(())
}
