//! `btm-node adversary` (hidden): a hostile peer for soak tests (`bench/soak.sh`, issue 13). It
//! joins a network like `join` does, waits for the registry, then attacks until stopped or
//! `--secs` have passed:
//!
//! - `flood`: garbage DHT PUTs under every kind of the network's record keys and garbage gossip
//!   on every topic, at `--rate` a second;
//! - `bad-elm`: ELM records whose weights are the seed's own or a corrupted copy of them (same
//!   size), with a falsely low claimed perplexity, and records that lie about their weights'
//!   size (published raw, since its own store refuses them: honest peers refuse them before a
//!   download);
//! - `squat`: claims that hop from domain to domain without training, with attestations of ELM
//!   ids nobody announced and false rejections of ELMs it holds.
//!
//! Every step is bounded in time; a failed step is counted, never fatal. It prints one JSON
//! line a second to stdout with the counts so far and keeps them in `status.json`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use btm_net::{Client, DhtKey, NetworkId, Node, RecordKey, Topic};
use btm_protocol::{
    Attestation, ContentId, ElmRecord, EvalPool, Parent, PublicKey, SeedManifest, Signed, Verdict,
};
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::net::{self, ConfigFile, NetArgs, NodeSettings, Say, StatusFile, Stop, short};

#[derive(Debug, Args)]
pub struct AdversaryArgs {
    #[command(flatten)]
    pub net: NetArgs,
    /// An attack to run; repeat for several (default: all of them).
    #[arg(long = "attack", value_enum)]
    pub attacks: Vec<Attack>,
    /// Stop after this many seconds (default: run until Ctrl-C or SIGTERM).
    #[arg(long)]
    pub secs: Option<u64>,
    /// Flood messages (garbage DHT PUTs and gossip) a second.
    #[arg(long, default_value_t = 20)]
    pub rate: u32,
    /// Seconds between bad ELM announcements.
    #[arg(long, default_value_t = 15)]
    pub elm_every: u64,
    /// Seconds between claim hops (each with one forged attestation).
    #[arg(long, default_value_t = 2)]
    pub squat_every: u64,
}

/// What a hostile peer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attack {
    /// Garbage DHT PUTs under the network's record keys and garbage gossip on every topic.
    Flood,
    /// ELM records worse than the seed or garbage, with falsely low claims, or lying sizes.
    BadElm,
    /// Claims hopping between domains without training, and forged attestations.
    Squat,
}

/// The longest one attack step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// What the adversary sent so far (one JSON line a second on stdout).
#[derive(Debug, Default, Clone, Serialize)]
struct Sent {
    /// Seconds since the attacks began.
    secs: u64,
    /// Garbage DHT PUTs.
    puts: u64,
    /// Garbage gossip messages.
    gossip: u64,
    /// ELM records announced with the seed's or corrupted weights and a false claim.
    bad_elms: u64,
    /// ELM records with a lying weights size, published raw.
    lying_elms: u64,
    /// Claims made (each a hop to another domain).
    claims: u64,
    /// Forged attestations.
    attestations: u64,
    /// Steps that failed (refused locally, timed out, no peers to publish to, ...).
    errors: u64,
    /// The last failure, for the log.
    last_error: Option<String>,
}

impl Sent {
    fn fail(&mut self, what: &str, e: impl std::fmt::Display) {
        self.errors += 1;
        self.last_error = Some(format!("{what}: {e}"));
    }
}

/// A small deterministic generator of junk (SplitMix64); nothing here needs to be
/// unpredictable, only varied.
#[derive(Debug)]
struct Junk(u64);

impl Junk {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(n);
        out
    }

    fn id(&mut self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for chunk in out.chunks_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        out
    }
}

pub fn adversary(a: AdversaryArgs, json: bool) -> Result<()> {
    let config = ConfigFile::load(a.net.config.as_deref())?;
    let settings = NodeSettings::resolve(&a.net, &config, "runs/adversary")?;
    let attacks = if a.attacks.is_empty() {
        vec![Attack::Flood, Attack::BadElm, Attack::Squat]
    } else {
        a.attacks.clone()
    };
    let say = Say::new("adversary", json);
    net::runtime()?.block_on(net::run_node(
        &settings,
        "adversary",
        async |node, status, stop| {
            let addrs = node.listen_addrs().await.unwrap_or_default();
            status.update(|s| {
                s.listen = addrs.iter().map(ToString::to_string).collect();
                s.phase = "waiting for the registry".into();
            });
            say.line(format!(
                "node {} up in {}; attacks: {}",
                short(node.node_id().as_bytes()),
                settings.data_dir.display(),
                attacks
                    .iter()
                    .map(|x| format!("{x:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            let Some(registry) = btm_roles::wait_registry(node, settings.wait_registry, stop)
                .await
                .context("waiting for the registry")?
            else {
                status.update(|s| s.phase = "stopped".into());
                return Ok(());
            };
            let plan = Plan {
                attacks: attacks.clone(),
                secs: a.secs,
                rate: a.rate.max(1),
                elm_every: Duration::from_secs(a.elm_every.max(1)),
                squat_every: Duration::from_secs(a.squat_every.max(1)),
            };
            let sent = attack(node, registry.record(), &plan, status, stop).await?;
            say.line(format!(
                "stopped after {} s: {} PUTs, {} gossip, {} bad and {} lying ELMs, {} claims, {} attestations, {} errors",
                sent.secs,
                sent.puts,
                sent.gossip,
                sent.bad_elms,
                sent.lying_elms,
                sent.claims,
                sent.attestations,
                sent.errors
            ));
            Ok(())
        },
    ))
}

/// The attacks and their pace.
#[derive(Debug, Clone)]
struct Plan {
    attacks: Vec<Attack>,
    secs: Option<u64>,
    rate: u32,
    elm_every: Duration,
    squat_every: Duration,
}

/// Runs a step unless a stop comes first, within [`STEP_TIMEOUT`]; `false` if it timed out.
async fn bounded(stop: &Stop, step: impl std::future::Future<Output = ()>) -> bool {
    tokio::select! {
        _ = stop.wait() => true,
        r = tokio::time::timeout(STEP_TIMEOUT, step) => r.is_ok(),
    }
}

/// The attack loop: one flood message per tick, a claim hop and a bad ELM when theirs are due.
async fn attack(
    node: &Node,
    registry: &btm_protocol::Registry,
    plan: &Plan,
    status: &StatusFile,
    stop: &Stop,
) -> Result<Sent> {
    let seed = registry
        .seed
        .clone()
        .context("the registry names no seed")?;
    let domains: Vec<String> = registry.domains.iter().map(|d| d.name.clone()).collect();
    let net = node.client().network();
    let client = node.client().with_timeout(Duration::from_secs(5));
    let mut rng = Junk(
        node.node_id()
            .0
            .iter()
            .fold(btm_net::limits::now_secs(), |h, b| {
                h.rotate_left(8) ^ u64::from(*b)
            }),
    );
    let has = |x: Attack| plan.attacks.contains(&x);
    let started = Instant::now();
    let deadline = plan.secs.map(|s| started + Duration::from_secs(s));
    let mut sent = Sent::default();
    let mut seed_bytes: Option<Vec<u8>> = None;
    let (mut hops, mut elms) = (0u64, 0u64);
    let mut next_squat = started;
    let mut next_elm = started;
    let mut next_report = started + Duration::from_secs(1);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(plan.rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    status.update(|s| s.phase = "attacking".into());
    loop {
        tokio::select! {
            _ = stop.wait() => break,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break;
        }
        if has(Attack::Flood) {
            let ok = bounded(stop, flood(&client, &net, &domains, &mut rng, &mut sent)).await;
            if !ok {
                sent.fail("flood", "timed out");
            }
        }
        if has(Attack::Squat) && now >= next_squat {
            let ok = bounded(
                stop,
                squat(node, &client, &domains, hops, &mut rng, &mut sent),
            )
            .await;
            if !ok {
                sent.fail("squat", "timed out");
            }
            hops += 1;
            next_squat = Instant::now() + plan.squat_every;
        }
        if has(Attack::BadElm) && now >= next_elm {
            let ok = bounded(
                stop,
                bad_elm(
                    node,
                    &client,
                    &net,
                    &seed,
                    &domains,
                    &mut seed_bytes,
                    elms,
                    &mut rng,
                    &mut sent,
                ),
            )
            .await;
            if !ok {
                sent.fail("bad ELM", "timed out");
            }
            elms += 1;
            next_elm = Instant::now() + plan.elm_every;
        }
        if Instant::now() >= next_report {
            sent.secs = started.elapsed().as_secs();
            report(&sent, status);
            next_report = Instant::now() + Duration::from_secs(1);
        }
    }
    sent.secs = started.elapsed().as_secs();
    report(&sent, status);
    status.update(|s| s.phase = "stopped".into());
    Ok(sent)
}

/// One JSON line on stdout and the counts in `status.json`.
fn report(sent: &Sent, status: &StatusFile) {
    match serde_json::to_string(sent) {
        Ok(line) => {
            println!("{line}");
            status.update(|s| s.message = line);
        }
        Err(e) => tracing::warn!(error = %e, "encoding the adversary's counts"),
    }
}

/// A key of the network of any record kind, with junk in its variable parts.
fn junk_key(net: &NetworkId, domains: &[String], rng: &mut Junk) -> Vec<u8> {
    let domain = domains
        .get(rng.below(domains.len()))
        .cloned()
        .unwrap_or_else(|| "junk".into());
    let node = PublicKey(rng.id());
    let key = match rng.next() % 7 {
        0 => RecordKey::Registry,
        1 => RecordKey::Root(1 + rng.next() % 4),
        2 => RecordKey::Seed,
        3 => RecordKey::Claim { domain, node },
        4 => RecordKey::Elm(ContentId(rng.id())),
        5 => RecordKey::ElmOf { domain, node },
        _ => RecordKey::Addr(node),
    };
    key.to_bytes(net)
}

/// One garbage DHT PUT or one garbage gossip message.
async fn flood(
    client: &Client,
    net: &NetworkId,
    domains: &[String],
    rng: &mut Junk,
    sent: &mut Sent,
) {
    let len = 16 + rng.below(2032);
    let junk = rng.bytes(len);
    if rng.next().is_multiple_of(2) {
        let key = junk_key(net, domains, rng);
        sent.puts += 1;
        if let Err(e) = client.put_record_raw(key, junk).await {
            sent.fail("garbage PUT", e);
        }
    } else {
        let topic = Topic::ALL[rng.below(Topic::ALL.len())];
        sent.gossip += 1;
        if let Err(e) = client.publish_raw(topic, junk).await {
            sent.fail("garbage gossip", e);
        }
    }
}

/// A claim on the next domain (moving this node's one claim there), then a forged attestation:
/// of an ELM id nobody announced (accepting it), or every other time a false rejection of an
/// ELM record of another trainer that this node holds.
async fn squat(
    node: &Node,
    client: &Client,
    domains: &[String],
    hop: u64,
    rng: &mut Junk,
    sent: &mut Sent,
) {
    if !domains.is_empty() {
        let d = &domains[(hop % domains.len() as u64) as usize];
        sent.claims += 1;
        if let Err(e) = node.claim(Some(d)).await {
            sent.fail("claim", e);
        }
    }
    let me = node.node_id();
    let honest: Vec<ContentId> = node
        .with_store(|s| s.elms(256))
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.record().trainer != me)
        .map(|e| e.id())
        .collect();
    let (elm, verdict) = match honest.get(rng.below(honest.len())) {
        Some(id) if hop % 2 == 1 => (*id, Verdict::Reject),
        _ => (ContentId(rng.id()), Verdict::Accept),
    };
    let mut att = Signed::new(Attestation {
        verifier: me,
        elm,
        measured_ppl_milli: 1_000 + rng.next() % 1_000,
        verdict,
        pool: EvalPool::Public,
    });
    att.sign(node.identity().signing_key());
    sent.attestations += 1;
    if let Err(e) = client.publish_raw(Topic::Attestations, att.encode()).await {
        sent.fail("forged attestation", e);
    }
}

/// Flips bytes in the second half (the tensor data, after the safetensors header): the same
/// size, worse or non-finite weights.
fn corrupt(w: &mut [u8], rng: &mut Junk) {
    let half = w.len() / 2;
    let stride = 61 + rng.below(64);
    for b in w.iter_mut().skip(half).step_by(stride) {
        *b ^= 0xa5;
    }
}

/// A bad ELM on the next domain, in turn: the seed's weights with a falsely low claim, a
/// corrupted copy of them (same size) with a falsely low claim, or a record whose weights size
/// lies (refused by honest peers before any download; published raw since this node's own
/// store refuses it too).
#[allow(clippy::too_many_arguments)]
async fn bad_elm(
    node: &Node,
    client: &Client,
    net: &NetworkId,
    seed: &SeedManifest,
    domains: &[String],
    seed_bytes: &mut Option<Vec<u8>>,
    n: u64,
    rng: &mut Junk,
    sent: &mut Sent,
) {
    let Some(domain) = domains
        .get((n / 3) as usize % domains.len().max(1))
        .cloned()
    else {
        return;
    };
    let parents = match Parent::from_weights(&[(seed.weights, 1.0)]) {
        Ok(p) => p,
        Err(e) => {
            sent.fail("bad ELM parents", e);
            return;
        }
    };
    let me = node.node_id();
    let mut record = ElmRecord {
        domain: domain.clone(),
        parents,
        weights: ContentId([0; 32]),
        weights_size: 0,
        architecture: seed.architecture.id(),
        tokenizer: seed.tokenizer,
        steps: 40,
        tokens: 20_480 * (n + 1),
        flops: rng.next() >> 20,
        // A perplexity of 1.0 to 1.5: far below anything a tiny model reaches.
        claimed_valid_ppl_milli: 1_000 + rng.next() % 500,
        trainer: me,
    };
    if n % 3 == 2 {
        record.weights = ContentId(rng.id());
        record.weights_size = seed
            .architecture
            .weights_size()
            .unwrap_or(1 << 20)
            .saturating_mul(4);
        let mut env = Signed::new(record);
        env.sign(node.identity().signing_key());
        let bytes = env.encode();
        sent.lying_elms += 1;
        for key in [
            RecordKey::Elm(env.id()),
            RecordKey::ElmOf { domain, node: me },
        ] {
            if let Err(e) = client
                .put_record_raw(key.to_bytes(net), bytes.clone())
                .await
            {
                sent.fail("lying ELM record PUT", e);
            }
        }
        if let Err(e) = client.publish_raw(Topic::Elms, bytes).await {
            sent.fail("lying ELM gossip", e);
        }
        return;
    }
    if seed_bytes.is_none() {
        if let Err(e) = node.fetch_blob(seed.weights, &[]).await {
            sent.fail("fetching the seed", e);
            return;
        }
        let max = btm_net::blobs::BlobConfig::default().max_blob_bytes;
        match node.blobs().read(&seed.weights, max).await {
            Ok(b) => *seed_bytes = Some(b),
            Err(e) => {
                sent.fail("reading the seed", e);
                return;
            }
        }
    }
    let Some(base) = seed_bytes.as_ref() else {
        return;
    };
    let mut weights = base.clone();
    if n % 3 == 1 {
        corrupt(&mut weights, rng);
    }
    record.weights_size = weights.len() as u64;
    sent.bad_elms += 1;
    if let Err(e) = node.announce(record, weights).await {
        sent.fail("bad ELM announcement", e);
    }
}
