//! Shared fixtures: a maintainer key and root, a tiny seed model and tokenizer, domain data,
//! registries, ELM weights (good and bad), and nodes on loopback.

use std::sync::OnceLock;
use std::time::Duration;

use btm_model::GptConfig;
use btm_model::gpt::Gpt;
use btm_model::tokenizer::Tokenizer;
use btm_model::weights::{self, NamedTensor};
use btm_net::libp2p::PeerId;
use btm_net::verify::Verifier;
use btm_net::{Node, NodeConfig};
use btm_protocol::{
    Architecture, ClientVersion, ContentId, Domain, ElmRecord, EvalSettings, Parent, PublicKey,
    Registry, SeedManifest, Signed, SigningKey, TrainingSummary, test_key,
};
pub use btm_testkit::{wait_each, wait_for, wait_registry_where};

pub const DOMAINS: [&str; 3] = ["alpha", "beta", "gamma"];

/// Everything a test network is made of, built once per test binary.
pub struct Fixture {
    pub maintainer: SigningKey,
    pub root: Vec<u8>,
    pub tokenizer: Vec<u8>,
    pub config: GptConfig,
    pub seed_weights: Vec<u8>,
    pub data: Vec<u8>,
    pub seed: SeedManifest,
    /// An honest ELM: weights better than the seed, and its true perplexity.
    pub good_weights: Vec<u8>,
    pub good_ppl: f64,
    pub seed_ppl: f64,
}

fn text() -> String {
    let mut s = String::new();
    for i in 0..200 {
        s.push_str(&format!(
            "The volunteer {i} trains a small expert model on its domain and shares the weights. "
        ));
    }
    s
}

fn tensors_scaled(model: &Gpt, wte_scale: f32) -> Vec<NamedTensor> {
    let mut t = weights::named_tensors(model);
    for x in t.iter_mut().filter(|t| t.name == "wte.weight") {
        for v in x.values.iter_mut() {
            *v *= wte_scale;
        }
    }
    t
}

pub fn now() -> u64 {
    btm_net::limits::now_secs()
}

pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let maintainer = test_key("btm-net maintainer");
        let root = btm_testkit::root(&maintainer);
        let t = text();
        let tok = Tokenizer::train([t.as_str()].into_iter(), 300).expect("tokenizer");
        let tokenizer = tok.json().to_vec();
        let config = btm_testkit::tiny_gpt(tok.vocab_size(), 16);
        let device = btm_testkit::cpu();
        // A deliberately poor seed (peaked random predictions) so that a plain initialisation
        // beats it: tests need "better than the seed" without training.
        let seed_model = Gpt::init(&config, 1, &device);
        let seed_weights = weights::to_bytes(&config, &tensors_scaled(&seed_model, 60.0)).expect("seed");
        let good_model = Gpt::init(&config, 2, &device);
        let good_weights = weights::to_bytes(&config, &weights::named_tensors(&good_model)).expect("good");
        let mut data = String::new();
        for i in 0..20 {
            data.push_str(&format!(
                "{{\"id\":\"doc{i}\",\"text\":\"The volunteer {i} trains a small expert model.\"}}\n"
            ));
        }
        let data = data.into_bytes();
        let seed = SeedManifest {
            architecture: Architecture {
                vocab_size: config.vocab_size as u32,
                context: config.n_ctx as u32,
                d_model: config.d_model as u32,
                heads: config.n_heads as u32,
                layers: config.n_layers as u32,
            },
            tokenizer: ContentId::of(&tokenizer),
            weights: ContentId::of(&seed_weights),
            training: TrainingSummary {
                steps: 0,
                tokens: 0,
                flops: 0,
                valid_ppl_milli: 0,
            },
            schedule: btm_protocol::Schedule { step: 0, total: 0 },
            optimizer: None,
        };
        let mut f = Fixture {
            maintainer,
            root,
            tokenizer,
            config,
            seed_weights,
            data,
            seed,
            good_weights,
            good_ppl: 0.0,
            seed_ppl: 0.0,
        };
        let m = f.measure(&f.good_weights.clone()).expect("measure");
        f.good_ppl = m.ppl;
        f.seed_ppl = m.seed_ppl;
        assert!(f.good_ppl < f.seed_ppl, "fixture: good {} seed {}", f.good_ppl, f.seed_ppl);
        f
    })
}

impl Fixture {
    pub fn registry(&self, version: u64, expires: u64) -> Registry {
        Registry {
            version,
            expires,
            min_client_version: ClientVersion::new(0, 1, 0),
            domains: DOMAINS
                .iter()
                .map(|n| Domain {
                    name: n.to_string(),
                    description: format!("test domain {n}"),
                    train: ContentId::of(&self.data),
                    valid: ContentId::of(&self.data),
                    test: ContentId::of(&self.data),
                    eval: EvalSettings::public(32, 512, 20_000),
                })
                .collect(),
            seed: Some(self.seed.clone()),
            elms: vec![],
        }
    }

    /// A registry envelope signed by the maintainer.
    pub fn signed_registry(&self, version: u64, expires: u64) -> Vec<u8> {
        let mut r = Signed::new(self.registry(version, expires));
        r.sign(&self.maintainer);
        r.encode()
    }

    pub fn measure(
        &self,
        weights: &[u8],
    ) -> Result<btm_net::verify::Measured, btm_net::verify::Failure> {
        let device = btm_testkit::cpu();
        let mut v = Verifier::new(&self.seed, &self.seed_weights, &self.tokenizer, device)?;
        v.measure(&self.registry(1, u64::MAX), DOMAINS[0], weights, &self.data)
    }

    /// An ELM record for `weights` on `domain`, claiming `ppl`, trained by `trainer`.
    pub fn elm(&self, domain: &str, weights: &[u8], ppl: f64, trainer: PublicKey) -> ElmRecord {
        ElmRecord {
            domain: domain.into(),
            parents: vec![Parent {
                weights: self.seed.weights,
                weight_ppm: 1_000_000,
            }],
            weights: ContentId::of(weights),
            weights_size: weights.len() as u64,
            architecture: self.seed.architecture.id(),
            tokenizer: self.seed.tokenizer,
            steps: 10,
            tokens: 1000,
            flops: 1,
            claimed_valid_ppl_milli: btm_protocol::ppl_to_milli(ppl).expect("ppl"),
            trainer,
        }
    }

    /// Weights from the good model with `edit` applied to its tensors.
    pub fn edited_weights(&self, edit: impl FnOnce(&mut Vec<NamedTensor>)) -> Vec<u8> {
        let device = btm_testkit::cpu();
        let model = weights::from_named_tensors(
            &self.config,
            weights::parse(&self.good_weights, Some(&self.config))
                .expect("parse")
                .1,
            &device,
        )
        .expect("model");
        let mut t = weights::named_tensors(&model);
        edit(&mut t);
        weights::to_bytes(&self.config, &t).expect("to_bytes")
    }

    /// Weights worse than the seed: the seed's peaked embedding, sharpened further.
    pub fn worse_weights(&self) -> Vec<u8> {
        let device = btm_testkit::cpu();
        let (cfg, t) = weights::parse(&self.seed_weights, Some(&self.config)).expect("seed");
        let model = weights::from_named_tensors(&cfg, t, &device).expect("model");
        weights::to_bytes(&self.config, &tensors_scaled(&model, 1.25)).expect("to_bytes")
    }
}

/// A test network on loopback: the first node is the maintainer's.
pub struct Net {
    pub dirs: Vec<tempfile::TempDir>,
    pub nodes: Vec<Node>,
}

pub fn config(dir: &std::path::Path) -> NodeConfig {
    btm_testkit::loopback_config(dir, fixture().root.clone())
}

impl Net {
    /// Starts `n` nodes; node i > 0 bootstraps from node 0.
    pub async fn start(n: usize) -> Net {
        Self::start_with(n, |_, c| c).await
    }

    pub async fn start_with(n: usize, tweak: impl Fn(usize, NodeConfig) -> NodeConfig) -> Net {
        let mut net = Net {
            dirs: vec![],
            nodes: vec![],
        };
        for i in 0..n {
            net.add(|c| tweak(i, c)).await;
        }
        net
    }

    /// Adds a node bootstrapping from node 0.
    pub async fn add(&mut self, tweak: impl FnOnce(NodeConfig) -> NodeConfig) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = config(dir.path());
        if let Some(first) = self.nodes.first() {
            c.bootstrap = first.listen_addrs().await.expect("addrs");
        }
        let node = btm_testkit::start(tweak(c)).await;
        self.dirs.push(dir);
        self.nodes.push(node.clone());
        node
    }

    pub async fn shutdown(self) {
        for n in &self.nodes {
            n.shutdown().await;
        }
    }
}

/// Waits (30 seconds at most) until `holds` is true of each node's network client.
pub async fn wait_clients<F, Fut>(what: &str, nodes: &[Node], holds: F)
where
    F: Fn(btm_net::Client) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let timeout = Duration::from_secs(30);
    wait_each(what, timeout, nodes, |n| holds(n.client().clone())).await;
}

/// Waits until each of `nodes` sees each of `peers` subscribed to every topic.
pub async fn wait_gossip_peers(nodes: &[Node], peers: &[Node]) {
    for pid in peers.iter().map(Node::peer_id) {
        let all_topics = |ps: Vec<(PeerId, usize)>| ps.contains(&(pid, btm_net::Topic::ALL.len()));
        wait_clients("gossip subscriptions", nodes, |c| async move {
            c.gossip_peers().await.is_ok_and(all_topics)
        })
        .await;
    }
}

/// Waits until every node trusts registry `version`.
pub async fn wait_registry(nodes: &[Node], version: u64) {
    let timeout = Duration::from_secs(30);
    wait_registry_where("the registry", timeout, nodes, |r| r.version >= version).await;
}

/// Waits until every node has a gossipsub peer on every topic (so that a publication reaches
/// them): here, until each is connected to at least `k` peers.
pub async fn wait_connected(nodes: &[Node], k: usize) {
    wait_clients("connections", nodes, |c| async move {
        c.connected_peers().await.is_ok_and(|p| p.len() >= k)
    })
    .await;
}

/// The maintainer publishes the registry and provides the seed blobs and data.
pub async fn publish_world(maintainer: &Node) {
    let f = fixture();
    for b in [&f.seed_weights, &f.tokenizer, &f.data] {
        maintainer.add_blob(b.to_vec()).await.expect("add blob");
    }
    let d = maintainer
        .publish_registry(&f.signed_registry(1, now() + 86400))
        .await
        .expect("publish");
    assert!(matches!(d, btm_registry::Decision::Accept(_)), "{d:?}");
}

/// Waits until `node` has a verdict on `elm`; returns whether it accepted.
/// The version of the registry `node` trusts (None before it trusts one).
pub async fn trusted_version(node: &Node) -> Option<u64> {
    node.registry()
        .await
        .ok()
        .flatten()
        .map(|r| r.record().version)
}

pub async fn wait_verdict(node: &Node, elm: ContentId) -> bool {
    let n = node.clone();
    wait_for("a verdict", Duration::from_secs(90), move || {
        let n = n.clone();
        async move { n.verdict(&elm).ok().flatten().is_some() }
    })
    .await;
    node.verdict(&elm)
        .ok()
        .flatten()
        .is_some_and(|a| a.verdict == btm_protocol::Verdict::Accept)
}

/// Waits until `node` has stored a live claim by `who` on `domain`.
pub async fn wait_claim(node: &Node, domain: &str, who: btm_protocol::NodeId, within: Duration) {
    let (n, domain) = (node.clone(), domain.to_string());
    wait_for("the claim", within, move || {
        let (n, domain) = (n.clone(), domain.clone());
        async move {
            n.with_store(|s| {
                s.claims(&domain, now())
                    .map(|c| c.iter().any(|c| c.record().node == who))
            })
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false)
        }
    })
    .await;
}
