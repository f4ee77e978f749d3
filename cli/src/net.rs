//! What the network commands share: where the network is (its root and bootstrap peers), node
//! settings from a TOML file and flags, starting a node on a tokio runtime, waiting for the
//! registry, stop signals, and the status file a long-running node keeps up to date.
//!
//! Precedence: a command-line flag beats the `--config` file, which beats the network
//! description file (`--network`, written by `btm-node seed publish --network-out`), which beats
//! the defaults. Relative paths inside a file are relative to that file's directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use btm_net::blobs::{CertificateDer, RelayUrl};
use btm_net::libp2p::Multiaddr;
use btm_net::{Node, NodeConfig};
use clap::Args;
use serde::{Deserialize, Serialize};

/// The local demo network's description, which `join`, `fetch` and `forest list` use when no
/// network is named.
pub const DEMO_NETWORK: &str = "runs/demo/network.toml";

/// Where a node finds its network and keeps its state.
#[derive(Debug, Args, Clone, Default)]
pub struct NetArgs {
    /// Node configuration file (TOML; see docs/config.md).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Network description file: root and bootstrap peers (default: the local demo network,
    /// runs/demo/network.toml).
    #[arg(long)]
    pub network: Option<PathBuf>,
    /// The node's data directory (key, SQLite store, blobs, training runs, status.json).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Peers to dial at start (multiaddrs ending in /p2p/<peer id>), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub bootstrap: Vec<String>,
    /// The network's trusted root envelope (the file `btm-node registry root-init` wrote).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Addresses to listen on (default: all interfaces, random ports; loopback only when every
    /// bootstrap peer is on loopback).
    #[arg(long, value_delimiter = ',')]
    pub listen: Vec<String>,
    /// Also discover peers on the local network with mDNS.
    #[arg(long)]
    pub mdns: bool,
    /// iroh relay URL(s) for blob transfers through NAT (default: none, direct connections
    /// only), comma-separated.
    #[arg(long = "relay", value_delimiter = ',')]
    pub relays: Vec<String>,
    /// PEM file with extra trust anchors for a self-hosted relay's TLS certificate.
    #[arg(long)]
    pub relay_ca: Option<PathBuf>,
    /// Seconds to wait for a registry with a seed to reach this node.
    #[arg(long)]
    pub wait_registry: Option<u64>,
}

/// The `--config` file. Every key is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Network description file.
    pub network: Option<PathBuf>,
    /// Root envelope file (instead of a network file).
    pub root: Option<PathBuf>,
    #[serde(default)]
    pub bootstrap: Vec<String>,
    #[serde(default)]
    pub listen: Vec<String>,
    pub data_dir: Option<PathBuf>,
    pub mdns: Option<bool>,
    /// iroh relay URLs (none: direct connections only).
    #[serde(default)]
    pub relays: Vec<String>,
    /// PEM trust anchors for a self-hosted relay.
    pub relay_ca: Option<PathBuf>,
    pub wait_registry: Option<u64>,
    /// Compute device for training: cpu, wgpu or cuda.
    pub device: Option<String>,
    /// Domain to claim.
    pub domain: Option<String>,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub claims: ClaimsSection,
}

/// `[train]` of the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub steps: Option<u64>,
    pub batch_size: Option<usize>,
    pub lr: Option<f64>,
    pub checkpoint_every: Option<u64>,
    pub seed: Option<u64>,
}

/// `[claims]` of the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimsSection {
    pub lease_secs: Option<u64>,
}

/// A network description (`network.toml`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkFile {
    /// What this network is.
    #[serde(default)]
    pub name: String,
    /// The first root envelope, hex: it names the network and is trusted out of band.
    pub root: String,
    /// Peers to dial first.
    #[serde(default)]
    pub bootstrap: Vec<String>,
}

const MAX_CONFIG_BYTES: u64 = 1 << 20;

fn read_small(path: &Path) -> Result<String> {
    let bytes = btm_model::fsutil::read_limited(path, MAX_CONFIG_BYTES)?;
    String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8", path.display()))
}

fn relative_to(file: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        file.parent().unwrap_or(Path::new(".")).join(p)
    }
}

impl ConfigFile {
    /// Reads the config file, or the defaults when there is none.
    pub fn load(path: Option<&Path>) -> Result<ConfigFile> {
        let Some(path) = path else {
            return Ok(ConfigFile::default());
        };
        let mut c: ConfigFile = toml::from_str(&read_small(path)?)
            .with_context(|| format!("{} is not a valid btm config", path.display()))?;
        for p in [
            &mut c.network,
            &mut c.root,
            &mut c.data_dir,
            &mut c.relay_ca,
        ]
        .into_iter()
        .flatten()
        {
            *p = relative_to(path, p);
        }
        Ok(c)
    }
}

impl NetworkFile {
    pub fn load(path: &Path) -> Result<NetworkFile> {
        toml::from_str(&read_small(path)?)
            .with_context(|| format!("{} is not a valid network description", path.display()))
    }

    /// Writes it atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = format!(
            "# btm network description: the trusted root (hex) and peers to dial first.\n{}",
            toml::to_string_pretty(self)?
        );
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        btm_model::fsutil::write_atomic(path, text.as_bytes())?;
        Ok(())
    }
}

/// Settings of a node, resolved from flags, config and network file.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub data_dir: PathBuf,
    pub root: Vec<u8>,
    pub bootstrap: Vec<Multiaddr>,
    pub listen: Vec<Multiaddr>,
    pub mdns: bool,
    pub relays: Vec<RelayUrl>,
    pub relay_roots: Vec<CertificateDer<'static>>,
    pub wait_registry: Duration,
    pub lease_secs: Option<u64>,
}

fn parse_addrs(v: &[String], what: &str) -> Result<Vec<Multiaddr>> {
    v.iter()
        .map(|s| {
            s.parse::<Multiaddr>()
                .with_context(|| format!("{what} {s:?} is not a multiaddr"))
        })
        .collect()
}

fn is_loopback(a: &Multiaddr) -> bool {
    use btm_net::libp2p::multiaddr::Protocol;
    a.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

impl NodeSettings {
    /// Resolves the settings; `default_dir` is the data directory when none is given.
    pub fn resolve(a: &NetArgs, c: &ConfigFile, default_dir: &str) -> Result<NodeSettings> {
        let network_path = a.network.clone().or_else(|| c.network.clone());
        let root_path = a.root.clone().or_else(|| c.root.clone());
        let network = match (&network_path, &root_path) {
            (Some(p), _) => Some(NetworkFile::load(p)?),
            (None, Some(_)) => None,
            (None, None) => {
                let demo = Path::new(DEMO_NETWORK);
                if !demo.exists() {
                    bail!(
                        "no network given and no local demo network is running ({DEMO_NETWORK} is missing): \
                         start one with `btm-node demo --keep-running`, or pass --network FILE \
                         (or --root FILE --bootstrap ADDR)"
                    );
                }
                Some(NetworkFile::load(demo)?)
            }
        };
        let root = match (&root_path, &network) {
            (Some(p), _) => std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
            (None, Some(n)) => hex::decode(n.root.trim()).context("the network file's root")?,
            (None, None) => bail!("no root: pass --root or --network"),
        };
        let mut bootstrap = parse_addrs(&a.bootstrap, "--bootstrap")?;
        if bootstrap.is_empty() {
            bootstrap = parse_addrs(&c.bootstrap, "bootstrap")?;
        }
        if bootstrap.is_empty()
            && let Some(n) = &network
        {
            bootstrap = parse_addrs(&n.bootstrap, "network bootstrap")?;
        }
        let mut listen = parse_addrs(&a.listen, "--listen")?;
        if listen.is_empty() {
            listen = parse_addrs(&c.listen, "listen")?;
        }
        let relay_strings = if a.relays.is_empty() {
            &c.relays
        } else {
            &a.relays
        };
        let relays = relay_strings
            .iter()
            .map(|s| {
                s.parse::<RelayUrl>()
                    .with_context(|| format!("relay {s:?} is not a URL (https://host[:port])"))
            })
            .collect::<Result<Vec<_>>>()?;
        let relay_roots = match a.relay_ca.as_ref().or(c.relay_ca.as_ref()) {
            Some(p) => btm_net::blobs::read_pem_certs(p)?,
            None => Vec::new(),
        };
        let data_dir = a
            .data_dir
            .clone()
            .or_else(|| c.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from(default_dir));
        Ok(NodeSettings {
            data_dir,
            root,
            bootstrap,
            listen,
            mdns: a.mdns || c.mdns.unwrap_or(false),
            relays,
            relay_roots,
            wait_registry: Duration::from_secs(a.wait_registry.or(c.wait_registry).unwrap_or(120)),
            lease_secs: c.claims.lease_secs,
        })
    }

    /// The node configuration: loopback-only when there are no listen addresses given and
    /// every bootstrap peer is on loopback (a local network).
    pub fn node_config(&self) -> NodeConfig {
        let local = self.bootstrap.iter().all(is_loopback);
        let mut cfg = if local {
            NodeConfig::loopback(&self.data_dir, self.root.clone())
        } else {
            NodeConfig::new(&self.data_dir, self.root.clone())
        };
        if !self.listen.is_empty() {
            cfg.listen = self.listen.clone();
        }
        cfg.bootstrap = self.bootstrap.clone();
        cfg.swarm.mdns = self.mdns;
        cfg.blobs.relays = self.relays.clone();
        cfg.blobs.relay_roots = self.relay_roots.clone();
        if let Some(l) = self.lease_secs {
            cfg.claims.lease_secs = l;
            cfg.claims.renew_before_secs = l / 2;
        }
        cfg
    }
}

/// A multi-threaded tokio runtime for a network command.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Starts a node, with a clear error when the data directory is in use or damaged.
pub async fn start(settings: &NodeSettings) -> Result<Node> {
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("creating {}", settings.data_dir.display()))?;
    Node::start(settings.node_config())
        .await
        .with_context(|| format!("starting the node in {}", settings.data_dir.display()))
}

/// Runs a long-lived node: installs the stop signals, starts the node, keeps `status.json`
/// (marked `failed` with the error if `work` fails) and always shuts the node down.
pub async fn run_node(
    settings: &NodeSettings,
    role: &str,
    work: impl AsyncFnOnce(&Node, &StatusFile, &Stop) -> Result<()>,
) -> Result<()> {
    let stop = install_stop();
    let node = start(settings).await?;
    let status = StatusFile::new(&settings.data_dir, role, node.node_id().as_bytes());
    let result = work(&node, &status, &stop).await;
    if let Err(e) = &result {
        status.update(|s| {
            s.phase = "failed".into();
            s.message = format!("{e:#}");
        });
    }
    node.shutdown().await;
    result
}

pub use btm_roles::Stop;

/// A stop request on Ctrl-C or SIGTERM (call inside the runtime).
pub fn install_stop() -> Stop {
    let stop = Stop::new();
    let s = stop.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
            match term {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        s.request();
    });
    stop
}

pub use btm_roles::short;

/// What a running node is doing, kept in `<data dir>/status.json` (written atomically) for
/// people and for `btm-node demo`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub role: String,
    pub node: String,
    pub phase: String,
    pub message: String,
    #[serde(default)]
    pub listen: Vec<String>,
    pub domain: Option<String>,
    pub step: u64,
    pub steps: u64,
    pub loss: Option<f64>,
    /// The update a restarted run resumed from.
    pub resumed_from: Option<u64>,
    /// How the ELM was initialised, and from which parents.
    pub branch: Option<String>,
    /// The announced ELM record's id.
    pub elm: Option<String>,
    pub claimed_ppl: Option<f64>,
    pub seed_ppl: Option<f64>,
    /// This node's verdicts: ELM record id -> accepted.
    #[serde(default)]
    pub verified: BTreeMap<String, bool>,
    /// Registry versions this node published (maintainers).
    #[serde(default)]
    pub registry_version: Option<u64>,
    /// ELM record ids in the trusted registry.
    #[serde(default)]
    pub accepted: Vec<String>,
    /// The web UI's address (`http://ADDR/`), when it serves one.
    #[serde(default)]
    pub ui: Option<String>,
    pub updated: u64,
}

/// A status shared between tasks, saved on every change.
#[derive(Debug, Clone)]
pub struct StatusFile {
    path: PathBuf,
    status: Arc<Mutex<Status>>,
}

impl StatusFile {
    pub fn new(data_dir: &Path, role: &str, node: &[u8]) -> StatusFile {
        let s = StatusFile {
            path: data_dir.join("status.json"),
            status: Arc::new(Mutex::new(Status {
                role: role.into(),
                node: hex::encode(node),
                ..Status::default()
            })),
        };
        s.update(|_| {});
        s
    }

    /// Applies `f` and writes the file (errors are logged: a status is not worth failing for).
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        let Ok(mut s) = self.status.lock() else {
            return;
        };
        f(&mut s);
        s.updated = btm_net::limits::now_secs();
        match serde_json::to_vec_pretty(&*s) {
            Ok(bytes) => {
                if let Err(e) = btm_model::fsutil::write_atomic(&self.path, &bytes) {
                    tracing::warn!(error = %e, "writing status.json");
                }
            }
            Err(e) => tracing::warn!(error = %e, "encoding status.json"),
        }
    }

    /// Reads a status file another process writes.
    pub fn read(path: &Path) -> Option<Status> {
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// Progress lines on stderr, prefixed with the role (silent with --json).
#[derive(Debug, Clone)]
pub struct Say {
    prefix: String,
    quiet: bool,
}

impl Say {
    pub fn new(prefix: &str, quiet: bool) -> Say {
        Say {
            prefix: prefix.into(),
            quiet,
        }
    }

    pub fn line(&self, m: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("[{}] {}", self.prefix, m.as_ref());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn args(relays: &[&str], relay_ca: Option<PathBuf>) -> NetArgs {
        NetArgs {
            root: Some(PathBuf::from("Cargo.toml")),
            relays: relays.iter().map(|s| s.to_string()).collect(),
            relay_ca,
            ..NetArgs::default()
        }
    }

    #[test]
    fn relays_reach_the_node_config_and_bad_ones_are_named() {
        let c = ConfigFile::default();
        let s = NodeSettings::resolve(&args(&[], None), &c, "d").unwrap();
        assert!(
            s.node_config().blobs.relays.is_empty(),
            "relays are off by default"
        );

        let s =
            NodeSettings::resolve(&args(&["https://relay.example.org"], None), &c, "d").unwrap();
        let cfg = s.node_config();
        assert_eq!(cfg.blobs.relays.len(), 1);
        assert!(cfg.blobs.relay_roots.is_empty());

        let e = NodeSettings::resolve(&args(&["not a url"], None), &c, "d").unwrap_err();
        assert!(
            format!("{e:#}").contains("relay \"not a url\" is not a URL"),
            "{e:#}"
        );

        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("ca.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let e = NodeSettings::resolve(&args(&[], Some(empty)), &c, "d").unwrap_err();
        assert!(format!("{e:#}").contains("no PEM certificate"), "{e:#}");
        let e = NodeSettings::resolve(&args(&[], Some(dir.path().join("missing.pem"))), &c, "d")
            .unwrap_err();
        assert!(format!("{e:#}").contains("missing.pem"), "{e:#}");

        // From the config file, relative to it.
        let cfg_path = dir.path().join("node.toml");
        std::fs::write(&cfg_path, "relays = [\"https://relay.example.org:8443\"]\n").unwrap();
        let c = ConfigFile::load(Some(&cfg_path)).unwrap();
        let s = NodeSettings::resolve(&args(&[], None), &c, "d").unwrap();
        assert_eq!(s.relays[0].to_string(), "https://relay.example.org:8443/");
    }
}
