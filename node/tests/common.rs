//! Fixtures: a maintainer key and root, a tokenizer and a (random, hence easy to beat) tiny seed
//! written as `seed train` leaves it, small JSONL slices of four bundled domains, and nodes on
//! loopback.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use btm_net::Node;
use btm_protocol::{SigningKey, test_key};
use btm_roles::{DomainFiles, Event, Events, MaintainerConfig, SeedFiles};
pub use btm_testkit::wait_registry_where;

pub const DOMAINS: [&str; 4] = ["bible_kjv", "manpages", "novels_austen", "python_code"];

pub struct Fixture {
    /// Holds the files below alive.
    _dir: tempfile::TempDir,
    pub maintainer: SigningKey,
    pub root: Vec<u8>,
    pub seed_dir: PathBuf,
    pub domains: Vec<DomainFiles>,
}

/// The roles' form of a test slice.
pub fn domain_files(s: btm_testkit::DomainSlice) -> DomainFiles {
    DomainFiles {
        name: s.name,
        train: s.train,
        valid: s.valid,
        test: s.test,
    }
}

pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let maintainer = test_key("btm-roles maintainer");
        let root = btm_testkit::root(&maintainer);
        let (seed_dir, slices) = btm_testkit::tiny_seed_and_slices(dir.path(), &DOMAINS);
        let domains = slices.into_iter().map(domain_files).collect();
        Fixture {
            _dir: dir,
            maintainer,
            root,
            seed_dir,
            domains,
        }
    })
}

impl Fixture {
    pub fn maintainer_config(&self) -> MaintainerConfig {
        MaintainerConfig::small_network(
            vec![self.maintainer.clone()],
            SeedFiles::load(&self.seed_dir).expect("seed files"),
            self.domains.clone(),
        )
    }
}

/// A node on loopback in `dir`, bootstrapping from `bootstrap`.
pub async fn node(dir: &Path, bootstrap: Option<&Node>) -> Node {
    node_of(dir, &fixture().root, bootstrap).await
}

/// A node of the network with `root`, on loopback in `dir`, bootstrapping from `bootstrap`.
pub async fn node_of(dir: &Path, root: &[u8], bootstrap: Option<&Node>) -> Node {
    let mut c = btm_testkit::loopback_config(dir, root.to_vec());
    if let Some(b) = bootstrap {
        c.bootstrap = b.listen_addrs().await.expect("addrs");
    }
    btm_testkit::start(c).await
}

/// Events kept for assertions.
#[derive(Clone, Default)]
pub struct Recorded(pub Arc<Mutex<Vec<Event>>>);

impl Recorded {
    pub fn events(&self) -> Events {
        let r = self.0.clone();
        Events::new(move |e| r.lock().expect("events").push(e.clone()))
    }

    pub fn all(&self) -> Vec<Event> {
        self.0.lock().expect("events").clone()
    }
}
