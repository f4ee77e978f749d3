//! btm-testkit: what the integration tests of btm-net (`net/tests/`) and btm-roles
//! (`node/tests/`) share: a one-key test root, the tiny test architecture, nodes on loopback
//! with short timeouts, and waits that poll a condition instead of sleeping a fixed time. Test
//! support only (`publish = false`); each crate's own fixtures (models, data, registries) stay
//! in its `tests/common.rs`.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use btm_model::GptConfig;
use btm_model::device::DeviceKind;
use btm_net::{Node, NodeConfig};
use btm_protocol::{PublicKey, Registry, Root, Signed, SigningKey};
use burn::tensor::Device;

/// The first root of a test network, encoded: `maintainer` alone (threshold 1), valid a year.
pub fn root(maintainer: &SigningKey) -> Vec<u8> {
    let mut root = Signed::new(Root {
        version: 1,
        expires: btm_net::limits::now_secs() + 365 * 86400,
        threshold: 1,
        keys: vec![PublicKey::of(maintainer)],
    });
    root.sign(maintainer);
    root.encode()
}

/// A root of several maintainers, `threshold` of whom must sign, signed by all of them.
pub fn root_of(maintainers: &[SigningKey], threshold: u32) -> Vec<u8> {
    let mut keys: Vec<PublicKey> = maintainers.iter().map(PublicKey::of).collect();
    keys.sort();
    let mut root = Signed::new(Root {
        version: 1,
        expires: btm_net::limits::now_secs() + 365 * 86400,
        threshold,
        keys,
    });
    for k in maintainers {
        root.sign(k);
    }
    root.encode()
}

/// The tiny GPT of the tests (one layer, two heads, 32 positions) for a tokenizer of
/// `vocab_size` tokens, `d_model` wide.
pub fn tiny_gpt(vocab_size: usize, d_model: usize) -> GptConfig {
    GptConfig {
        vocab_size,
        n_ctx: 32,
        d_model,
        n_heads: 2,
        n_layers: 1,
    }
}

/// The train, valid and test files of one domain's slice of the bundled corpus.
#[derive(Debug, Clone)]
pub struct DomainSlice {
    pub name: String,
    pub train: std::path::PathBuf,
    pub valid: std::path::PathBuf,
    pub test: std::path::PathBuf,
}

/// The first `docs` documents of `domain`'s `split` of the bundled corpus as a JSONL file in
/// `out`.
///
/// # Panics
/// When the corpus cannot be read or the file written.
pub fn corpus_slice(
    corpus: &btm_model::data::Corpus,
    domain: &str,
    split: btm_model::data::Split,
    docs: usize,
    out: &Path,
) -> std::path::PathBuf {
    let mut text = String::new();
    let documents = match corpus.documents(domain, split) {
        Ok(d) => d,
        Err(e) => panic!("the corpus: {e}"),
    };
    for d in documents.into_iter().take(docs) {
        text.push_str(&serde_json::json!({"id": d.id, "text": d.text}).to_string());
        text.push('\n');
    }
    let path = out.join(format!("{domain}-{}.jsonl", split.name()));
    if let Err(e) = std::fs::write(&path, text) {
        panic!("writing {}: {e}", path.display());
    }
    path
}

/// The roles' test world in `dir`: slices of `domains` (40 training, 10 valid and 10 test
/// documents each), a 320-token tokenizer trained on their training slices, and a random tiny
/// seed (easy to beat) in `dir/seed` with its tokenizer. Returns the seed directory and the
/// slices.
///
/// # Panics
/// When a file cannot be read or written, or the tokenizer cannot be trained.
pub fn tiny_seed_and_slices(
    dir: &Path,
    domains: &[&str],
) -> (std::path::PathBuf, Vec<DomainSlice>) {
    use btm_model::data::{Corpus, Split};
    use btm_model::files::{TOKENIZER_FILE, WEIGHTS_FILE};
    let corpus = Corpus::bundled();
    let slices: Vec<DomainSlice> = domains
        .iter()
        .map(|d| DomainSlice {
            name: d.to_string(),
            train: corpus_slice(&corpus, d, Split::Train, 40, dir),
            valid: corpus_slice(&corpus, d, Split::Valid, 10, dir),
            test: corpus_slice(&corpus, d, Split::Test, 10, dir),
        })
        .collect();
    let texts: Vec<String> = slices
        .iter()
        .map(|d| std::fs::read_to_string(&d.train).unwrap_or_default())
        .collect();
    let tok = match btm_model::tokenizer::Tokenizer::train(texts.iter().map(String::as_str), 320) {
        Ok(t) => t,
        Err(e) => panic!("the tokenizer: {e}"),
    };
    let config = tiny_gpt(tok.vocab_size(), 32);
    let seed = btm_model::gpt::Gpt::init(&config, 7, &cpu());
    let seed_dir = dir.join("seed");
    let bytes =
        match btm_model::weights::to_bytes(&config, &btm_model::weights::named_tensors(&seed)) {
            Ok(b) => b,
            Err(e) => panic!("the seed's weights: {e}"),
        };
    let written = std::fs::create_dir_all(&seed_dir)
        .and_then(|()| std::fs::write(seed_dir.join(WEIGHTS_FILE), bytes))
        .and_then(|()| std::fs::write(seed_dir.join(TOKENIZER_FILE), tok.json()));
    if let Err(e) = written {
        panic!("writing the seed in {}: {e}", seed_dir.display());
    }
    (seed_dir, slices)
}

/// The CPU device.
///
/// # Panics
/// When the CPU backend cannot start.
pub fn cpu() -> Device {
    match DeviceKind::Cpu.device() {
        Ok(d) => d,
        Err(e) => panic!("the CPU device: {e}"),
    }
}

/// A loopback node in `dir` on the network of `root`, with timeouts short enough for tests.
pub fn loopback_config(dir: &Path, root: Vec<u8>) -> NodeConfig {
    let mut c = NodeConfig::loopback(dir, root);
    c.swarm.query_timeout = Duration::from_secs(10);
    c.blobs.connect_timeout = Duration::from_secs(5);
    c.blobs.stall_timeout = Duration::from_secs(10);
    c.call_timeout = Duration::from_secs(30);
    c
}

/// Starts a node and waits until its listeners are up (two addresses reported: TCP and QUIC).
///
/// # Panics
/// When the node does not start or does not listen within 10 seconds.
pub async fn start(config: NodeConfig) -> Node {
    let node = match Node::start(config).await {
        Ok(n) => n,
        Err(e) => panic!("starting a node: {e}"),
    };
    let n = node.clone();
    wait_for("listen addresses", Duration::from_secs(10), move || {
        let n = n.clone();
        async move { n.listen_addrs().await.is_ok_and(|a| a.len() >= 2) }
    })
    .await;
    node
}

/// How long one network test may run, runtime shutdown included, before [`run`] fails it.
pub const TEST_LIMIT: Duration = Duration::from_secs(300);

/// Runs the async body of a network test on a multi-thread runtime of `workers` threads, under
/// a watchdog: if the test (its body, or the shutdown of its runtime) has not finished within
/// [`TEST_LIMIT`], the watchdog names it and ends the whole test binary with a failure. A
/// future that never resolves, or a blocking task the runtime waits for on drop, then fails
/// the run in minutes instead of holding CI until its time limit with no word of where.
/// Tasks still running when the body returns get 5 seconds to stop, then are left behind.
///
/// # Panics
/// When the runtime cannot be built, or as the body panics.
pub fn run<F: Future<Output = ()>>(workers: usize, body: F) {
    let test = std::thread::current()
        .name()
        .unwrap_or("a network test")
        .to_string();
    let (done, watched) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = watched.recv_timeout(TEST_LIMIT) {
            eprintln!(
                "btm-testkit watchdog: {test} did not finish within {TEST_LIMIT:?}; \
                 ending the test binary (a hung future or a task the runtime waited for)"
            );
            std::process::exit(101);
        }
    });
    // `done` drops (and the watchdog stands down) on return, or on a panic in the body once the
    // runtime has dropped: it is declared first, and locals drop in reverse order.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("a tokio runtime: {e}"),
    };
    rt.block_on(body);
    rt.shutdown_timeout(Duration::from_secs(5));
    drop(done);
    let _ = watchdog.join();
}

/// Polls `check` until it holds.
///
/// # Panics
/// When it still does not hold after `timeout` (a failed test).
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`wait_for`] `check(node)` on each of `nodes` in turn.
pub async fn wait_each<F, Fut>(what: &str, timeout: Duration, nodes: &[Node], check: F)
where
    F: Fn(Node) -> Fut,
    Fut: Future<Output = bool>,
{
    for n in nodes {
        wait_for(what, timeout, || check(n.clone())).await;
    }
}

/// Waits until each of `nodes` trusts a registry for which `holds` is true.
pub async fn wait_registry_where(
    what: &str,
    timeout: Duration,
    nodes: &[Node],
    holds: impl Fn(&Registry) -> bool + Copy,
) {
    wait_each(what, timeout, nodes, |n| async move {
        n.registry()
            .await
            .ok()
            .flatten()
            .is_some_and(|r| holds(r.record()))
    })
    .await;
}

/// `unshare` making a new namespace of `kind` (`--net`, `--mount`): directly as root, inside a
/// user namespace otherwise.
pub fn unshare(kind: &str) -> std::process::Command {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false);
    let mut c = std::process::Command::new("unshare");
    if !root {
        c.arg("--user").arg("--map-root-user");
    }
    c.arg(kind);
    c
}

/// Whether the namespace probe `probe` worked. If not, the test `test` is SKIPPED (printed),
/// unless `BTM_REQUIRE_NETNS` is set (as CI does), which turns that into a failure naming
/// `what` could not be made.
pub fn namespace_available(
    test: &str,
    what: &str,
    probe: std::io::Result<std::process::Output>,
) -> bool {
    let why = match probe {
        Ok(o) if o.status.success() => return true,
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
        Err(e) => format!("unshare: {e}"),
    };
    assert!(
        std::env::var_os("BTM_REQUIRE_NETNS").is_none(),
        "BTM_REQUIRE_NETNS is set but {what} cannot be made: {why}"
    );
    eprintln!("SKIPPED {test}: no {what} ({why}); set BTM_REQUIRE_NETNS=1 to require it");
    false
}

/// Runs `cmd` to its end and returns its output; panics, showing the status and both streams,
/// unless it exited successfully. `what` names the command in the message.
pub fn output_ok(cmd: &mut std::process::Command, what: &str) -> std::process::Output {
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) => panic!("running {what}: {e}"),
    };
    assert!(
        out.status.success(),
        "{what}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
