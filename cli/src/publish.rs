//! `btm-node seed train|publish`: the maintainers' side on the network. `publish` starts a
//! node that holds the seed and every domain's data as blobs, publishes a signed registry
//! version naming them, writes the network description volunteers and clients start from, and
//! keeps serving; with `--accept-verified` it verifies announced ELMs itself and accepts the ones
//! that pass into a new registry version.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use btm_model::data::{Corpus, Split, TRAIN_DOMAINS};
use btm_protocol::Registry;
use btm_roles::{DomainFiles, Maintainer, MaintainerConfig, SeedFiles};
use clap::{Args, Subcommand};

use crate::model_cmds;
use crate::net::{self, ConfigFile, NetArgs, NetworkFile, NodeSettings};
use crate::report::Reporter;

#[derive(Debug, Subcommand)]
pub enum SeedCmd {
    /// Train the seed LM on the domain-balanced mix of the eight training domains.
    Train(Box<model_cmds::TrainArgs>),
    /// Publish the registry and the seed on the network and serve them; optionally accept verified ELMs.
    Publish(Box<PublishArgs>),
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    net: NetArgs,
    /// The seed: a directory holding model.safetensors and tokenizer.json (from `btm-node seed train`).
    #[arg(long, default_value = "runs/seed")]
    seed: PathBuf,
    /// A maintainer key file (repeatable). Keys short of the root's threshold propose each
    /// registry version to the other maintainers, who co-sign what they verified themselves.
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
    /// Share of each domain's training documents withheld as the maintainers' verification
    /// pool (never published; acceptance is decided on it). 0: none.
    #[arg(long, default_value_t = btm_roles::maintainer::DEFAULT_WITHHELD_SHARE)]
    withheld_share: f64,
    /// Acceptance: how far below the seed's an ELM's withheld-data perplexity must be (ppm).
    #[arg(long, default_value_t = btm_roles::maintainer::DEFAULT_MIN_GAIN_PPM)]
    min_gain_ppm: u32,
    /// Acceptance: the largest ratio of withheld-data to public-data perplexity (ppm); more
    /// means the ELM memorised the public split.
    #[arg(long, default_value_t = btm_roles::maintainer::DEFAULT_MAX_MEMORISATION_PPM)]
    max_memorisation_ppm: u32,
    #[command(flatten)]
    ui: crate::ui::UiArgs,
}

pub fn run_seed(cmd: SeedCmd, json: bool) -> Result<()> {
    match cmd {
        SeedCmd::Train(mut a) => {
            a.seed_mix = true;
            a.domain.clear();
            if a.out.is_none() {
                a.out = Some(PathBuf::from("runs/seed"));
            }
            model_cmds::train(*a, json)
        }
        SeedCmd::Publish(a) => publish(*a, json),
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
        .map(|p| btm_registry::maintainer::load_key(p).context("reading a maintainer key"))
        .collect::<Result<Vec<_>>>()?;
    let corpus = a.corpus.clone().map_or_else(Corpus::bundled, Corpus::new);
    let registry = match &a.registry {
        Some(p) => Some(btm_registry::maintainer::read_envelope::<Registry>(p)?),
        None => None,
    };
    let names: Vec<String> = match (&registry, a.domains.is_empty()) {
        (Some(r), _) => r.record().domains.iter().map(|d| d.name.clone()).collect(),
        (None, true) => TRAIN_DOMAINS.iter().map(|s| s.to_string()).collect(),
        (None, false) => {
            let mut d = a.domains.clone();
            d.sort();
            d.dedup();
            d
        }
    };
    let domains = names
        .iter()
        .map(|n| -> Result<DomainFiles> {
            Ok(DomainFiles {
                name: n.clone(),
                train: corpus.path(n, Split::Train)?,
                valid: corpus.path(n, Split::Valid)?,
                test: corpus.path(n, Split::Test)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let rotate_roots = a
        .rotate_roots
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .collect::<Result<Vec<_>>>()?;
    let seed =
        SeedFiles::load(&a.seed).with_context(|| format!("the seed in {}", a.seed.display()))?;
    let maintainer = Maintainer::new(MaintainerConfig {
        keys,
        seed,
        registry,
        rotate_roots,
        domains,
        eval_tokens: a.eval_tokens,
        tolerance_ppm: a.tolerance_ppm,
        expires_days: a.expires_days,
        accept_verified: a.accept_verified,
        withheld_share: a.withheld_share,
        min_gain_ppm: a.min_gain_ppm,
        max_memorisation_ppm: a.max_memorisation_ppm,
    });
    net::runtime()?.block_on(net::run_node(
        &settings,
        "maintainer",
        async |node, status, stop| {
            let reporter = Reporter::new("maintainer", json, Some(status.clone()));
            let (ui, events) = crate::ui::role_events(
                &a.ui,
                node,
                "maintainer",
                &settings.data_dir,
                status,
                &reporter,
            )
            .await?;
            // The network description first: other maintainers start from it to co-sign the
            // first registry when one key does not meet the root's threshold.
            let addrs = node.listen_addrs().await?;
            if let Some(out) = &a.network_out {
                NetworkFile {
                    name: "btm network".into(),
                    root: hex::encode(&settings.root),
                    bootstrap: addrs.iter().map(ToString::to_string).collect(),
                }
                .save(out)?;
                reporter.line(format!("network description written to {}", out.display()));
            }
            status.update(|s| s.listen = addrs.iter().map(ToString::to_string).collect());
            maintainer.publish(node, &events).await?;
            reporter.line(if a.accept_verified {
                "serving; verifying announced ELMs and accepting the ones that pass (Ctrl-C to stop)"
            } else {
                "serving (Ctrl-C to stop)"
            });
            maintainer.serve(node, stop, &events).await?;
            drop(ui);
            Ok(())
        },
    ))
}
