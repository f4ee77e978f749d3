//! The one task that owns the swarm. It answers commands from [`Client`](crate::client::Client)s,
//! validates everything peers offer before it is stored or forwarded, and hands ELM records to
//! the node's worker for verification.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use btm_protocol::{Attestation, ContentId, Kind, Record, Root, Signed};
use btm_registry::{ClaimLimits, Decision, Reject, Store, Trusted, rules};
use futures::StreamExt;
use libp2p::gossipsub::{self, MessageAcceptance};
use libp2p::kad::{self, store::RecordStore};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{DialError, ListenError, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, mdns};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::client::{Command, Event, NetError, Observed};
use crate::diversity;
use crate::identity::node_id_of;
use crate::keys::{DhtKey, NetworkId, ProviderKey, RecordKey, Topic};
use crate::limits::{Clock, ErrorBudget, Limits, RateLimiter};
use crate::swarm::{Behaviour, BehaviourEvent};
use crate::validate::{self, Freshness, Horizons, Invalid, View};

type Reply<T> = oneshot::Sender<Result<T, NetError>>;

/// The reply, unless too many queries are in flight: then it is answered `Busy`.
fn unless_busy<T>(busy: bool, reply: Reply<T>) -> Option<Reply<T>> {
    if busy {
        let _ = reply.send(Err(NetError::Busy));
        None
    } else {
        Some(reply)
    }
}

/// Files the reply of a DHT query that started, or answers it with the error that stopped it.
fn pending<T, E: std::fmt::Display>(
    queries: &mut HashMap<kad::QueryId, Reply<T>>,
    started: Result<kad::QueryId, E>,
    reply: Reply<T>,
) {
    match started {
        Ok(id) => {
            queries.insert(id, reply);
        }
        Err(e) => {
            let _ = reply.send(Err(NetError::Dht(e.to_string())));
        }
    }
}

/// Which store write a gossip message asks for.
#[derive(Debug, Clone, Copy)]
enum StoreKind {
    Claim,
    Attestation,
}

impl StoreKind {
    fn what(self) -> &'static str {
        match self {
            StoreKind::Claim => "claim",
            StoreKind::Attestation => "attestation",
        }
    }
}

/// A gossip message whose SQLite write runs on the store thread, off the event loop.
struct StoreJob {
    kind: StoreKind,
    data: Vec<u8>,
    message: (gossipsub::MessageId, PeerId),
}

enum StoreOutcome {
    Claim(Decision<Signed<btm_protocol::Claim>>),
    Attestation(Decision<Signed<Attestation>>),
}

struct StoreDone {
    kind: StoreKind,
    message: (gossipsub::MessageId, PeerId),
    outcome: Result<StoreOutcome, String>,
}

/// The store thread: performs the writes in arrival order (claims need the store's quota
/// and supersession rules in one transaction) and sends each result back. It ends when the
/// event loop drops its sender.
fn spawn_store_thread(
    clock: Clock,
    store: Arc<Mutex<Store>>,
    jobs: std::sync::mpsc::Receiver<StoreJob>,
    done: mpsc::Sender<StoreDone>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("btm-store".into())
        .spawn(move || {
            while let Ok(job) = jobs.recv() {
                let outcome = match store.lock() {
                    Err(_) => Err("store lock poisoned".to_string()),
                    Ok(mut s) => match job.kind {
                        StoreKind::Claim => {
                            s.put_claim(&job.data, clock.now()).map(StoreOutcome::Claim)
                        }
                        StoreKind::Attestation => {
                            s.put_attestation(&job.data).map(StoreOutcome::Attestation)
                        }
                    }
                    .map_err(|e| e.to_string()),
                };
                let result = StoreDone {
                    kind: job.kind,
                    message: job.message,
                    outcome,
                };
                if done.blocking_send(result).is_err() {
                    return;
                }
            }
        })
        .map(drop)
}

struct GetQuery {
    key: RecordKey,
    best: Option<Vec<u8>>,
    reply: Reply<Option<Vec<u8>>>,
}

pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    net: NetworkId,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    observers: broadcast::Sender<Observed>,
    store: Arc<Mutex<Store>>,
    trusted: Trusted,
    /// Ids of the accepted roots by version (the chain served under `RecordKey::Root`).
    roots: BTreeMap<u64, ContentId>,
    horizons: Horizons,
    clock: Clock,
    limits: Limits,
    puts: RateLimiter<PeerId>,
    /// Lookups of unknown ELMs named by a peer's attestations.
    lookups: RateLimiter<PeerId>,
    /// Invalid DHT PUTs per peer, forgiven over time (`penalise_puts`).
    bad_puts: ErrorBudget<PeerId>,
    /// Peers whose application score is negative now.
    penalised: HashSet<PeerId>,
    gossip: RateLimiter<PeerId>,
    store_jobs: std::sync::mpsc::SyncSender<StoreJob>,
    store_done: mpsc::Receiver<StoreDone>,
    listen_addrs: Vec<Multiaddr>,
    pending_dial: HashMap<PeerId, Vec<Reply<()>>>,
    pending_get: HashMap<kad::QueryId, GetQuery>,
    pending_providers: HashMap<kad::QueryId, (HashSet<PeerId>, Reply<Vec<PeerId>>)>,
    pending_put: HashMap<kad::QueryId, Reply<()>>,
    pending_provide: HashMap<kad::QueryId, Reply<()>>,
    pending_bootstrap: HashMap<kad::QueryId, Reply<()>>,
    /// Peers one of whose connections we refused (one connection per peer) and when: if the
    /// connection we kept closes soon after, the peer refused it for the same reason.
    refused_dup: HashMap<PeerId, Instant>,
    /// Peers to dial again once their delay is over (see [`EventLoop::redial_later`]).
    redial_tx: mpsc::UnboundedSender<(PeerId, Vec<Multiaddr>)>,
    redial_rx: mpsc::UnboundedReceiver<(PeerId, Vec<Multiaddr>)>,
    /// Redials per peer in the current window (bounded, see [`EventLoop::redial_later`]).
    redials: HashMap<PeerId, (Instant, u8)>,
    /// The agent string each connected peer sent with identify (untrusted text, cut to
    /// [`crate::limits::MAX_AGENT_LEN`]; forgotten when its last connection closes).
    agents: HashMap<PeerId, String>,
}

/// A peer's agent string as kept: control characters dropped, at most [`crate::limits::MAX_AGENT_LEN`] bytes.
pub(crate) fn clean_agent(agent: &str) -> String {
    let mut out = String::new();
    for c in agent.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > crate::limits::MAX_AGENT_LEN {
            break;
        }
        out.push(c);
    }
    out
}

/// Redials after a dial race, per peer and window.
const REDIALS: u8 = 2;
const REDIAL_WINDOW: Duration = Duration::from_secs(30);
/// How long a refused duplicate connection explains the loss of the one kept.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(10);

/// Gossip verdict of a refused message: `Reject` (the relay is penalised) only for what is
/// invalid for everyone; `Ignore` for what depends on our state (a domain of a registry we do
/// not have yet, a quota, our clock), so honest relays keep their score.
fn refusal(e: &Invalid) -> MessageAcceptance {
    let state = match e {
        Invalid::Rules(r) => r.depends_on_state(),
        Invalid::NoRegistry => true,
        _ => false,
    };
    if state {
        MessageAcceptance::Ignore
    } else {
        MessageAcceptance::Reject
    }
}

/// Gossip verdict of a message whose record we tried to adopt: `Accept` when it was, `Ignore`
/// when it was not newer after all or could not be stored (our failure, not the relay's).
fn adopted<T, E: std::fmt::Display>(r: Result<Decision<T>, E>, what: &str) -> MessageAcceptance {
    match r {
        Ok(Decision::Accept(_)) => MessageAcceptance::Accept,
        Ok(_) => MessageAcceptance::Ignore,
        Err(e) => {
            tracing::warn!(error = %e, "storing {what}");
            MessageAcceptance::Ignore
        }
    }
}

fn observe(tx: &broadcast::Sender<Observed>, o: Observed) {
    let _ = tx.send(o);
}

/// What the event loop is made from (see [`EventLoop::new`]).
pub(crate) struct Parts {
    pub swarm: Swarm<Behaviour>,
    pub net: NetworkId,
    pub commands: mpsc::Receiver<Command>,
    pub events: mpsc::Sender<Event>,
    pub observers: broadcast::Sender<Observed>,
    pub store: Arc<Mutex<Store>>,
    pub trusted: Trusted,
    pub horizons: Horizons,
    pub limits: Limits,
    pub clock: Clock,
}

impl EventLoop {
    pub(crate) fn new(parts: Parts) -> Self {
        let chain = match parts.store.lock() {
            Ok(s) => s.roots().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "reading the root chain");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        let limits = parts.limits;
        let (store_jobs, jobs) = std::sync::mpsc::sync_channel(limits.store_queue.max(1));
        let (done_tx, store_done) = mpsc::channel(limits.store_queue.max(1));
        if let Err(e) = spawn_store_thread(parts.clock, parts.store.clone(), jobs, done_tx) {
            // Without the thread every queued write is dropped (gossip ignored, never wrong).
            tracing::error!(error = %e, "starting the store thread");
        }
        let (redial_tx, redial_rx) = mpsc::unbounded_channel();
        let mut el = EventLoop {
            store_jobs,
            store_done,
            swarm: parts.swarm,
            net: parts.net,
            commands: parts.commands,
            events: parts.events,
            observers: parts.observers,
            store: parts.store,
            trusted: parts.trusted,
            roots: BTreeMap::new(),
            horizons: parts.horizons,
            clock: parts.clock,
            puts: RateLimiter::new(limits.dht_puts_per_peer, limits.max_tracked_peers),
            lookups: RateLimiter::new(limits.lookups_per_peer, limits.max_tracked_peers),
            bad_puts: ErrorBudget::new(
                limits.bad_puts_per_peer,
                limits.bad_put_forgive,
                limits.max_tracked_peers,
            ),
            penalised: HashSet::new(),
            gossip: RateLimiter::new(limits.gossip_per_peer, limits.max_tracked_peers),
            limits,
            listen_addrs: Vec::new(),
            pending_dial: HashMap::new(),
            pending_get: HashMap::new(),
            pending_providers: HashMap::new(),
            pending_put: HashMap::new(),
            pending_provide: HashMap::new(),
            pending_bootstrap: HashMap::new(),
            refused_dup: HashMap::new(),
            redial_tx,
            redial_rx,
            redials: HashMap::new(),
            agents: HashMap::new(),
        };
        for t in Topic::ALL {
            let topic = gossipsub::IdentTopic::new(t.string(&el.net));
            if let Err(e) = el.swarm.behaviour_mut().gossipsub.subscribe(&topic) {
                tracing::error!(error = %e, "subscribing to {topic}");
            }
        }
        // Serve what we trust from the first moment: every accepted root (so a node on an
        // older root can walk the chain), the registry and its seed.
        for bytes in chain {
            if let Ok(root) = Signed::<Root>::decode(&bytes) {
                el.roots.insert(root.record().version, root.id());
                el.hold(RecordKey::Root(root.record().version), bytes);
            }
        }
        el.roots
            .insert(el.trusted.root.record().version, el.trusted.root.id());
        if let Some(reg) = el.trusted.registry.clone() {
            el.hold(RecordKey::Registry, reg.encode());
            if let Some(seed) = &reg.record().seed {
                el.hold(RecordKey::Seed, seed.encode());
            }
        }
        el
    }

    /// Puts a record we trust into the local DHT store (no network traffic).
    fn hold(&mut self, key: RecordKey, value: Vec<u8>) {
        let record = kad::Record::new(key.kad(&self.net), value);
        if let Err(e) = self.swarm.behaviour_mut().kad.store_mut().put(record) {
            tracing::debug!(error = %e, "holding a record");
        }
    }

    pub(crate) async fn run(mut self) {
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some((peer, addrs)) = self.redial_rx.recv() => self.redial(peer, addrs),
                Some(done) = self.store_done.recv() => self.on_store_done(done),
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown(reply)) => {
                        let _ = reply.send(Ok(()));
                        return;
                    }
                    Some(c) => self.on_command(c),
                    None => return,
                },
            }
        }
    }

    fn view(&self) -> View<'_> {
        View {
            trusted: &self.trusted,
            roots: &self.roots,
            now: self.clock.now(),
            horizons: self.horizons,
        }
    }

    fn queries_in_flight(&self) -> usize {
        self.pending_get.len()
            + self.pending_providers.len()
            + self.pending_put.len()
            + self.pending_provide.len()
            + self.pending_bootstrap.len()
    }

    fn topic_hash(&self, t: Topic) -> gossipsub::TopicHash {
        gossipsub::IdentTopic::new(t.string(&self.net)).hash()
    }

    // --- commands ------------------------------------------------------------------------

    fn on_command(&mut self, command: Command) {
        let busy = self.queries_in_flight() >= self.limits.max_pending_queries;
        match command {
            Command::Listen(addr, reply) => {
                let r = self
                    .swarm
                    .listen_on(addr)
                    .map(drop)
                    .map_err(|e| NetError::Listen(e.to_string()));
                let _ = reply.send(r);
            }
            Command::Dial(addr, reply) => {
                let peer = addr.iter().find_map(|p| match p {
                    Protocol::P2p(id) => Some(id),
                    _ => None,
                });
                if let Some(peer) = peer {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, strip_p2p(&addr));
                    if self.swarm.is_connected(&peer) {
                        let _ = reply.send(Ok(()));
                        return;
                    }
                }
                match self.swarm.dial(addr) {
                    Ok(()) => match peer {
                        Some(p) => self.pending_dial.entry(p).or_default().push(reply),
                        None => {
                            let _ = reply.send(Ok(()));
                        }
                    },
                    Err(e) => {
                        let _ = reply.send(Err(NetError::Dial(e.to_string())));
                    }
                }
            }
            Command::ListenAddrs(reply) => {
                let me = *self.swarm.local_peer_id();
                let addrs = self
                    .listen_addrs
                    .iter()
                    .map(|a| a.clone().with(Protocol::P2p(me)))
                    .collect();
                let _ = reply.send(Ok(addrs));
            }
            Command::ConnectedPeers(reply) => {
                let _ = reply.send(Ok(self.swarm.connected_peers().copied().collect()));
            }
            Command::Bootstrap(reply) => {
                let started = self.swarm.behaviour_mut().kad.bootstrap();
                pending(&mut self.pending_bootstrap, started, reply);
            }
            Command::Block(peer, blocked, reply) => {
                let b = &mut self.swarm.behaviour_mut().blocked;
                if blocked {
                    b.block_peer(peer);
                } else {
                    b.unblock_peer(peer);
                }
                let _ = reply.send(Ok(()));
            }
            Command::Publish(topic, data, reply) => {
                let hash = self.topic_hash(topic);
                let r = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(hash, data)
                    .map(drop)
                    .map_err(|e| NetError::Publish(e.to_string()));
                let _ = reply.send(r);
            }
            Command::Report(id, source, acceptance, reply) => {
                let found = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&id, &source, acceptance);
                let _ = reply.send(Ok(found));
            }
            Command::PutRecord(key, value, reply) => {
                let Some(reply) = unless_busy(busy, reply) else {
                    return;
                };
                match self.check_and_store(&key, value, None) {
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                    Ok(record) => {
                        let dht = &mut self.swarm.behaviour_mut().kad;
                        pending(
                            &mut self.pending_put,
                            dht.put_record(record, kad::Quorum::One),
                            reply,
                        );
                    }
                }
            }
            Command::PutRaw(key, value, reply) => {
                let record = kad::Record::new(kad::RecordKey::new(&key), value);
                let dht = &mut self.swarm.behaviour_mut().kad;
                pending(
                    &mut self.pending_put,
                    dht.put_record(record, kad::Quorum::One),
                    reply,
                );
            }
            Command::GetRecord(key, reply) => {
                let Some(reply) = unless_busy(busy, reply) else {
                    return;
                };
                let dht = &mut self.swarm.behaviour_mut().kad;
                let id = dht.get_record(key.kad(&self.net));
                self.pending_get.insert(
                    id,
                    GetQuery {
                        key,
                        best: None,
                        reply,
                    },
                );
            }
            Command::LocalRecord(key, reply) => {
                let v = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .store_mut()
                    .get(&key.kad(&self.net))
                    .map(|r| r.value.clone());
                let _ = reply.send(Ok(v));
            }
            Command::Provide(key, reply) => {
                let Some(reply) = unless_busy(busy, reply) else {
                    return;
                };
                let dht = &mut self.swarm.behaviour_mut().kad;
                let started = dht.start_providing(key.kad(&self.net));
                pending(&mut self.pending_provide, started, reply);
            }
            Command::StopProviding(key, reply) => {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .stop_providing(&key.kad(&self.net));
                let _ = reply.send(Ok(()));
            }
            Command::Providing(key, reply) => {
                let k = key.kad(&self.net);
                let me = *self.swarm.local_peer_id();
                let providing = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .store_mut()
                    .provided()
                    .any(|p| p.key == k && p.provider == me);
                let _ = reply.send(Ok(providing));
            }
            Command::GetProviders(key, reply) => {
                let Some(reply) = unless_busy(busy, reply) else {
                    return;
                };
                let dht = &mut self.swarm.behaviour_mut().kad;
                let id = dht.get_providers(key.kad(&self.net));
                self.pending_providers.insert(id, (HashSet::new(), reply));
            }
            Command::StoreStats(reply) => {
                let _ = reply.send(Ok(self.swarm.behaviour_mut().kad.store_mut().stats()));
            }
            Command::PeerScore(peer, reply) => {
                let _ = reply.send(Ok(self.swarm.behaviour().gossipsub.peer_score(&peer)));
            }
            Command::PeerAgent(peer, reply) => {
                let _ = reply.send(Ok(self.agents.get(&peer).cloned()));
            }
            Command::GossipPeers(reply) => {
                let ours: Vec<_> = Topic::ALL.iter().map(|t| self.topic_hash(*t)).collect();
                let peers = self
                    .swarm
                    .behaviour()
                    .gossipsub
                    .all_peers()
                    .map(|(p, topics)| (*p, topics.iter().filter(|t| ours.contains(t)).count()))
                    .collect();
                let _ = reply.send(Ok(peers));
            }
            Command::RoutingTable(reply) => {
                let peers = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .kbuckets()
                    .flat_map(|b| b.iter().map(|e| *e.node.key.preimage()).collect::<Vec<_>>())
                    .collect();
                let _ = reply.send(Ok(peers));
            }
            Command::Trusted(reply) => {
                let _ = reply.send(Ok(self.trusted.clone()));
            }
            Command::OfferRegistry(bytes, reply) => {
                let r = self.adopt_registry(&bytes);
                if let Ok(Decision::Accept(_)) = &r {
                    self.spread_registry(bytes);
                }
                let _ = reply.send(r);
            }
            Command::OfferRoot(bytes, reply) => {
                let r = self.adopt_root(&bytes);
                if let Ok(Decision::Accept(root)) = &r {
                    self.spread_root(root.record().version, bytes);
                }
                let _ = reply.send(r);
            }
            Command::Shutdown(reply) => {
                let _ = reply.send(Ok(()));
            }
        }
    }

    /// A write in the event loop itself (root and registry adoption only: rare, and the
    /// trusted state must change before the next message is judged).
    fn write_store<T>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, btm_registry::StoreError>,
    ) -> Result<T, NetError> {
        let mut store = self
            .store
            .lock()
            .map_err(|_| NetError::Store("store lock poisoned".into()))?;
        f(&mut store).map_err(|e| NetError::Store(e.to_string()))
    }

    /// Offers the next root to the store's rules; on acceptance it becomes the trusted root
    /// (registries are checked against its keys from now on) and is held on the DHT.
    fn adopt_root(&mut self, bytes: &[u8]) -> Result<Decision<Signed<Root>>, NetError> {
        let decision = self.write_store(|s| s.update_root(bytes, self.clock.now()))?;
        if let Decision::Accept(root) = &decision {
            let version = root.record().version;
            self.trusted.root = root.clone();
            self.roots.insert(version, root.id());
            self.hold(RecordKey::Root(version), bytes.to_vec());
            tracing::info!(version, "root adopted (key rotation)");
            observe(&self.observers, Observed::Root { version });
        }
        Ok(decision)
    }

    /// Stores an adopted root at the closest peers and gossips it on the registry topic.
    fn spread_root(&mut self, version: u64, bytes: Vec<u8>) {
        let net = self.net;
        let _ = self.swarm.behaviour_mut().kad.put_record(
            kad::Record::new(RecordKey::Root(version).kad(&net), bytes.clone()),
            kad::Quorum::One,
        );
        let hash = self.topic_hash(Topic::Registry);
        if let Err(e) = self.swarm.behaviour_mut().gossipsub.publish(hash, bytes) {
            tracing::debug!(error = %e, "gossiping the root");
        }
    }

    /// Adopts a newer root or registry that passed validation under `key`.
    fn adopt_newer(&mut self, key: &RecordKey, value: &[u8]) -> Result<(), NetError> {
        match key {
            RecordKey::Root(_) => self.adopt_root(value).map(drop),
            _ => self.adopt_registry(value).map(drop),
        }
    }

    /// Offers a registry to the store's rules; on acceptance updates the cache.
    fn adopt_registry(
        &mut self,
        bytes: &[u8],
    ) -> Result<Decision<Signed<btm_protocol::Registry>>, NetError> {
        let decision = self.write_store(|s| s.update_registry(bytes, self.clock.now()))?;
        if let Decision::Accept(reg) = &decision {
            self.trusted.registry = Some(reg.clone());
            // Serve what we trust, however it arrived (gossip, a lookup, our own offer): the
            // copy held since the start is our own record, which no copy from a peer replaces,
            // so without this a node that adopted a newer registry through a lookup kept
            // serving the old one (found by the partition test).
            self.hold(RecordKey::Registry, bytes.to_vec());
            if let Some(seed) = &reg.record().seed {
                self.hold(RecordKey::Seed, seed.encode());
            }
            tracing::info!(version = reg.record().version, "registry adopted");
            observe(
                &self.observers,
                Observed::Registry {
                    version: reg.record().version,
                },
            );
        }
        Ok(decision)
    }

    /// The trusted registry's seed manifest, if any.
    fn trusted_seed(&self) -> Option<btm_protocol::SeedManifest> {
        self.trusted
            .registry
            .as_ref()
            .and_then(|r| r.record().seed.clone())
    }

    /// Stores a newly adopted registry (and its seed manifest) locally on the DHT and at the
    /// closest peers, and gossips it.
    fn spread_registry(&mut self, bytes: Vec<u8>) {
        let net = self.net;
        let seed = self.trusted_seed();
        let dht = &mut self.swarm.behaviour_mut().kad;
        let _ = dht.put_record(
            kad::Record::new(RecordKey::Registry.kad(&net), bytes.clone()),
            kad::Quorum::One,
        );
        if let Some(seed) = seed {
            let _ = dht.put_record(
                kad::Record::new(RecordKey::Seed.kad(&net), seed.encode()),
                kad::Quorum::One,
            );
        }
        let hash = self.topic_hash(Topic::Registry);
        if let Err(e) = self.swarm.behaviour_mut().gossipsub.publish(hash, bytes) {
            tracing::debug!(error = %e, "gossiping the registry");
        }
    }

    /// Validates a record for `key` and stores it in the local DHT store if it supersedes what
    /// is held. Returns the record to replicate.
    fn check_and_store(
        &mut self,
        key: &RecordKey,
        value: Vec<u8>,
        from: Option<PeerId>,
    ) -> Result<kad::Record, NetError> {
        let freshness = validate::check_record(&self.view(), key, &value)?;
        if freshness == Freshness::Newer {
            // A newer registry or the next root offered through the DHT: adopt it (the rules
            // run again inside the store's transaction).
            self.adopt_newer(key, &value)?;
        }
        if matches!(freshness, Freshness::Older | Freshness::Ahead) {
            return Err(NetError::Invalid(Invalid::Rules(Reject::Stale)));
        }
        let kkey = key.kad(&self.net);
        let store = self.swarm.behaviour_mut().kad.store_mut();
        if let Some(held) = store.get(&kkey)
            && !validate::supersedes(key, &value, &held.value)
        {
            if held.value == value {
                return Ok(held.into_owned());
            }
            return Err(NetError::Invalid(Invalid::Rules(Reject::Stale)));
        }
        if let RecordKey::Claim { node, .. } = key {
            // The node's claim records held here decide a renewal or a move
            // (`rules::decide_claim`); a move deletes the records of the domains it leaves, so
            // a node holds one claim record on this node's part of the DHT.
            let prefix = format!("btm/1/{}/claim/", self.net);
            let suffix = format!("/{node}");
            let mut held = Vec::new();
            let mut held_keys = Vec::new();
            for r in store.records() {
                let k = r.key.as_ref();
                if k.starts_with(prefix.as_bytes())
                    && k.ends_with(suffix.as_bytes())
                    && let Ok(c) = Signed::<btm_protocol::Claim>::decode(&r.value)
                {
                    held_keys.push((r.key.clone(), c.record().domain.clone()));
                    held.push(c.into_record());
                }
            }
            let claim = Signed::<btm_protocol::Claim>::decode(&value)
                .map_err(|e| Invalid::Rules(e.into()))?;
            let limits = ClaimLimits {
                max_lease_secs: self.horizons.max_lease_secs,
                max_total_lease_secs: rules::MAX_TOTAL_LEASE_SECS,
                grace_secs: rules::CLAIM_GRACE_SECS,
            };
            let registry = self.trusted.registry.as_ref().ok_or(Invalid::NoRegistry)?;
            rules::decide_claim(
                registry.record(),
                claim.record(),
                &held,
                &limits,
                self.clock.now(),
            )
            .map_err(Invalid::Rules)?;
            for (k, domain) in held_keys {
                if domain != claim.record().domain {
                    store.remove(&k);
                }
            }
        }
        let mut record = kad::Record::new(kkey, value);
        record.publisher = from;
        record.expires = expiry_of(key, &record.value, from.is_some(), self.clock.now());
        store
            .put(record.clone())
            .map_err(|e| NetError::Dht(e.to_string()))?;
        Ok(record)
    }

    // --- swarm events --------------------------------------------------------------------

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::debug!(%address, "listening");
                self.listen_addrs.push(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| *a != address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                if endpoint.is_dialer() {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, endpoint.get_remote_address().clone());
                }
                for reply in self.pending_dial.remove(&peer_id).unwrap_or_default() {
                    let _ = reply.send(Ok(()));
                }
                observe(&self.observers, Observed::Connected(peer_id));
            }
            SwarmEvent::IncomingConnectionError {
                peer_id: Some(peer),
                error: ListenError::Denied { .. },
                ..
            } => self.note_refused_duplicate(peer),
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.agents.remove(&peer_id);
                // Simultaneous dials: we refused the peer's connection because we had ours, and
                // the peer refused ours because it had its own. Dial again, the smaller peer id
                // first, so that one connection survives.
                let recent = self
                    .refused_dup
                    .remove(&peer_id)
                    .is_some_and(|t| t.elapsed() < DUPLICATE_WINDOW);
                if recent {
                    self.redial_after_race(peer_id, Vec::new());
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                if matches!(error, DialError::DialPeerConditionFalse(_)) {
                    return;
                }
                if matches!(error, DialError::Denied { .. }) {
                    // Refused by our own limits (a connection to this peer is already open):
                    // the peer is reachable, keep it in the routing table.
                    self.note_refused_duplicate(peer);
                    for reply in self.pending_dial.remove(&peer).unwrap_or_default() {
                        let _ = reply.send(Ok(()));
                    }
                    return;
                }
                // Two nodes dialing each other from their listening ports at the same moment
                // meet in one TCP connection (simultaneous open) that neither can upgrade.
                // Dial again from a new port, the smaller peer id first (bounded per peer).
                if let DialError::Transport(tried) = &error {
                    let addrs: Vec<Multiaddr> = tried.iter().map(|(a, _)| a.clone()).collect();
                    if !self.swarm.is_connected(&peer) && self.redial_after_race(peer, addrs) {
                        return;
                    }
                }
                for reply in self.pending_dial.remove(&peer).unwrap_or_default() {
                    let _ = reply.send(Err(NetError::Dial(error.to_string())));
                }
                // An unreachable peer would slow every later query (each waits for the dial
                // to fail); it comes back when it connects again.
                self.swarm.behaviour_mut().kad.remove_peer(&peer);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                if info.protocol_version != crate::swarm::ID_PROTOCOL {
                    return;
                }
                if self.swarm.is_connected(&peer_id) {
                    self.agents
                        .insert(peer_id, clean_agent(&info.agent_version));
                }
                for addr in info.listen_addrs.into_iter().take(16) {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                let mut peers: Vec<PeerId> = Vec::new();
                for (peer, addr) in list.into_iter().take(64) {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    if !peers.contains(&peer) {
                        peers.push(peer);
                    }
                }
                // Both nodes discover each other at about the same moment; if both dialed, each
                // could keep its own connection and refuse the other's, leaving none. The
                // smaller peer id dials now, the other only if it is still not connected later.
                for peer in peers {
                    if *self.swarm.local_peer_id() < peer {
                        self.redial(peer, Vec::new());
                    } else {
                        self.redial_later(peer, Vec::new(), Duration::from_secs(3));
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => self.on_kad(e),
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => self.on_gossip(propagation_source, message_id, message),
            _ => {}
        }
    }

    /// Remembers that we refused a second connection from or to `peer` (bounded).
    fn note_refused_duplicate(&mut self, peer: PeerId) {
        if self.refused_dup.len() >= 1024 {
            self.refused_dup
                .retain(|_, t| t.elapsed() < DUPLICATE_WINDOW);
        }
        if self.refused_dup.len() < 1024 {
            self.refused_dup.insert(peer, Instant::now());
        }
    }

    /// Dials `peer` from a new port (at `addrs` and the addresses Kademlia and mDNS know)
    /// unless it is connected or being dialed.
    fn redial(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if self.swarm.is_connected(&peer) {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .extend_addresses_through_behaviour()
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .allocate_new_port()
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, error = %e, "dialing again");
        }
    }

    /// Dials `peer` after `delay`, if it is still not connected then.
    fn redial_later(&self, peer: PeerId, addrs: Vec<Multiaddr>, delay: Duration) {
        let tx = self.redial_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send((peer, addrs));
        });
    }

    /// After both sides' dials met and failed: the smaller peer id dials again soon, the other
    /// later (if still unconnected), so the two dials do not meet again. At most
    /// [`REDIALS`] per peer per [`REDIAL_WINDOW`]; false when that budget is spent.
    fn redial_after_race(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) -> bool {
        if self.redials.len() >= 1024 {
            self.redials.retain(|_, (t, _)| t.elapsed() < REDIAL_WINDOW);
            if self.redials.len() >= 1024 {
                return false;
            }
        }
        let entry = self.redials.entry(peer).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= REDIAL_WINDOW {
            *entry = (Instant::now(), 0);
        }
        if entry.1 >= REDIALS {
            return false;
        }
        entry.1 += 1;
        let delay = if *self.swarm.local_peer_id() < peer {
            Duration::from_millis(100)
        } else {
            Duration::from_millis(1500)
        };
        self.redial_later(peer, addrs, delay);
        true
    }

    fn on_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::RoutingUpdated {
                peer,
                is_new_peer: true,
                addresses,
                ..
            } => self.keep_diverse(peer, addresses.first()),
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::PutRecord {
                        source,
                        record: Some(record),
                        ..
                    },
            } => {
                if !self.puts.allow(&source, Instant::now()) {
                    self.refused("dht put", Some(source), "rate limit".into());
                    return;
                }
                let Some(key) = RecordKey::parse(&self.net, record.key.as_ref()) else {
                    self.refused("dht put", Some(source), "unknown key".into());
                    return;
                };
                if self.bad_puts.spent(&source, Instant::now()) {
                    // Not even validated: checking its records is what this peer costs us.
                    self.refused(
                        "dht put",
                        Some(source),
                        "this peer sent too many invalid records; ignored for a while".into(),
                    );
                    return;
                }
                match self.check_and_store(&key, record.value, Some(source)) {
                    Ok(_) => self.penalise_puts(source, false),
                    Err(e) => {
                        let invalid = matches!(&e, NetError::Invalid(i) if matches!(refusal(i), MessageAcceptance::Reject));
                        self.refused("dht put", Some(source), e.to_string());
                        self.penalise_puts(source, invalid);
                    }
                }
            }
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::AddProvider {
                        record: Some(record),
                    },
            } => {
                let source = record.provider;
                if !self.puts.allow(&source, Instant::now()) {
                    self.refused("dht provider", Some(source), "rate limit".into());
                    return;
                }
                let valid = match ProviderKey::parse(&self.net, record.key.as_ref()) {
                    None => Err("unknown key".to_string()),
                    Some(_) if node_id_of(&source).is_none() => {
                        Err("provider is not an ed25519 node".into())
                    }
                    Some(ProviderKey::Claimants(d) | ProviderKey::Trainers(d)) => {
                        match self
                            .trusted
                            .registry
                            .as_ref()
                            .map(|r| r.record().domain(&d).is_some())
                        {
                            Some(true) => Ok(()),
                            _ => Err(format!("unknown domain {d:?}")),
                        }
                    }
                    Some(ProviderKey::Blob(_)) => Ok(()),
                };
                match valid {
                    Ok(()) => {
                        if let Err(e) = self
                            .swarm
                            .behaviour_mut()
                            .kad
                            .store_mut()
                            .add_provider(record)
                        {
                            self.refused("dht provider", Some(source), e.to_string());
                        }
                    }
                    Err(e) => self.refused("dht provider", Some(source), e),
                }
            }
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => match result {
                kad::QueryResult::GetRecord(Ok(kad::GetRecordOk::FoundRecord(pr))) => {
                    self.on_found_record(id, pr);
                    if step.last {
                        self.finish_get(id);
                    }
                }
                kad::QueryResult::GetRecord(Ok(
                    kad::GetRecordOk::FinishedWithNoAdditionalRecord { .. },
                ))
                | kad::QueryResult::GetRecord(Err(_)) => self.finish_get(id),
                kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                    providers,
                    ..
                })) => {
                    if let Some((set, _)) = self.pending_providers.get_mut(&id) {
                        set.extend(
                            providers
                                .into_iter()
                                .take(self.limits.max_providers_per_key),
                        );
                    }
                    if step.last
                        && let Some((set, reply)) = self.pending_providers.remove(&id)
                    {
                        let _ = reply.send(Ok(set.into_iter().collect()));
                    }
                }
                kad::QueryResult::GetProviders(Ok(
                    kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. },
                ))
                | kad::QueryResult::GetProviders(Err(_)) => {
                    if let Some((set, reply)) = self.pending_providers.remove(&id) {
                        let _ = reply.send(Ok(set.into_iter().collect()));
                    }
                }
                kad::QueryResult::PutRecord(r) => {
                    if let Some(reply) = self.pending_put.remove(&id) {
                        // Stored locally already; a quorum failure only means few peers took
                        // it (e.g. a network of one).
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "put record");
                        }
                        let _ = reply.send(Ok(()));
                    }
                }
                kad::QueryResult::StartProviding(r) => {
                    if let Some(reply) = self.pending_provide.remove(&id) {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "start providing");
                        }
                        let _ = reply.send(Ok(()));
                    }
                }
                kad::QueryResult::Bootstrap(r) if step.last || r.is_err() => {
                    if let Some(reply) = self.pending_bootstrap.remove(&id) {
                        let _ = reply.send(r.map(drop).map_err(|e| NetError::Dht(e.to_string())));
                    }
                }
                _ => {}
            },
            _ => {}
        }
    }

    /// Eclipse defence: a peer that just entered the routing table leaves it again if its
    /// subnet already has `max_peers_per_subnet` peers there (`diversity`).
    fn keep_diverse(&mut self, peer: PeerId, addr: &Multiaddr) {
        let (max, local) = (
            self.limits.max_peers_per_subnet,
            self.limits.limit_local_subnets,
        );
        let Some(net) = diversity::subnet(addr, local) else {
            return;
        };
        let others: Vec<diversity::Subnet> = self
            .swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .flat_map(|b| {
                b.iter()
                    .filter(|e| *e.node.key.preimage() != peer)
                    .filter_map(|e| {
                        e.node
                            .value
                            .iter()
                            .next()
                            .and_then(|a| diversity::subnet(a, local))
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        if diversity::over_limit(others, net, max) {
            self.swarm.behaviour_mut().kad.remove_peer(&peer);
            self.refused(
                "routing table",
                Some(peer),
                format!("its subnet already has {max} peers in the routing table"),
            );
        }
    }

    fn on_found_record(&mut self, id: kad::QueryId, pr: kad::PeerRecord) {
        let Some(key) = self.pending_get.get(&id).map(|q| q.key.clone()) else {
            return;
        };
        let value = pr.record.value;
        let verdict = validate::check_record(&self.view(), &key, &value);
        match verdict {
            Err(e) => {
                self.refused("dht get", pr.peer, e.to_string());
            }
            Ok(Freshness::Older) => {}
            Ok(Freshness::Ahead) => {
                // The next root may be found first; a later one is kept as the answer so the
                // caller sees how far the chain goes, but it is not stored.
                if let Some(q) = self.pending_get.get_mut(&id)
                    && q.best.is_none()
                {
                    q.best = Some(value);
                }
            }
            Ok(fresh) => {
                if fresh == Freshness::Newer
                    && let Err(e) = self.adopt_newer(&key, &value)
                {
                    tracing::warn!(error = %e, "adopting a record found on the DHT");
                }
                // Keep a valid copy locally, as Kademlia caching would.
                let _ = self.check_and_store(&key, value.clone(), pr.peer);
                if let Some(q) = self.pending_get.get_mut(&id) {
                    let better = match &q.best {
                        None => true,
                        Some(best) => validate::supersedes(&key, &value, best),
                    };
                    if better {
                        q.best = Some(value);
                    }
                }
            }
        }
    }

    fn finish_get(&mut self, id: kad::QueryId) {
        if let Some(q) = self.pending_get.remove(&id) {
            let _ = q.reply.send(Ok(q.best));
        }
    }

    /// Charges `peer` one invalid DHT PUT (when `invalid`) and sets its gossipsub application
    /// score to minus its outstanding invalid PUTs (weight 10 each, like one rejected gossip
    /// message; eight outstanding graylist it). A valid PUT refreshes the score as the charges
    /// are forgiven.
    fn penalise_puts(&mut self, peer: PeerId, invalid: bool) {
        let now = Instant::now();
        if invalid {
            self.bad_puts.charge(&peer, now);
        }
        let outstanding = self.bad_puts.outstanding(&peer, now);
        if invalid || outstanding > 0 || self.penalised.remove(&peer) {
            if outstanding > 0 {
                self.penalised.insert(peer);
            }
            self.swarm
                .behaviour_mut()
                .gossipsub
                .set_application_score(&peer, -f64::from(outstanding));
        }
    }

    fn refused(&self, what: &'static str, from: Option<PeerId>, reason: String) {
        tracing::debug!(what, ?from, %reason, "refused");
        observe(&self.observers, Observed::Refused { what, from, reason });
    }

    // --- gossip ----------------------------------------------------------------------------

    fn on_gossip(&mut self, source: PeerId, id: gossipsub::MessageId, message: gossipsub::Message) {
        let topic = Topic::ALL
            .into_iter()
            .find(|t| self.topic_hash(*t) == message.topic);
        let acceptance = match topic {
            None => MessageAcceptance::Reject,
            Some(_) if !self.gossip.allow(&source, Instant::now()) => {
                self.refused("gossip", Some(source), "rate limit".into());
                MessageAcceptance::Ignore
            }
            Some(Topic::Registry) => self.on_registry_message(source, &message.data),
            Some(Topic::Proposals) => self.on_proposal_message(source, &message.data),
            Some(Topic::Claims) => match self.on_claim_message(source, &id, message.data) {
                // Held back until the store thread has decided.
                None => return,
                Some(a) => a,
            },
            Some(Topic::Attestations) => {
                match self.on_attestation_message(source, &id, message.data) {
                    None => return,
                    Some(a) => a,
                }
            }
            Some(Topic::Elms) => match self.on_elm_message(source, &id, message.data) {
                // Held back until the worker has verified it.
                None => return,
                Some(a) => a,
            },
        };
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&id, &source, acceptance);
    }

    /// A registry proposal: relayed when only trusted maintainers signed it; maintainers
    /// observe it to co-sign. Nodes do not store proposals.
    fn on_proposal_message(&mut self, source: PeerId, data: &[u8]) -> MessageAcceptance {
        match validate::check_proposal(&self.view(), data) {
            Ok(env) => {
                observe(&self.observers, Observed::Proposal(env));
                MessageAcceptance::Accept
            }
            Err(e) => {
                self.refused("proposal", Some(source), e.to_string());
                refusal(&e)
            }
        }
    }

    /// A root (rotation) on the registry topic.
    fn on_root_message(&mut self, source: PeerId, data: &[u8]) -> MessageAcceptance {
        match validate::check_root(&self.view(), None, data) {
            Ok(Freshness::Newer) => adopted(self.adopt_root(data), "a root"),
            Ok(_) => MessageAcceptance::Ignore,
            Err(e) => {
                self.refused("root", Some(source), e.to_string());
                refusal(&e)
            }
        }
    }

    fn on_registry_message(&mut self, source: PeerId, data: &[u8]) -> MessageAcceptance {
        if matches!(btm_protocol::envelope_kind(data), Ok(Kind::Root)) {
            return self.on_root_message(source, data);
        }
        match validate::check_registry(&self.view(), data) {
            Ok(Freshness::Newer) => adopted(self.adopt_registry(data), "a registry"),
            Ok(_) => MessageAcceptance::Ignore,
            Err(e) => {
                // Equivocation is recorded as evidence by the store.
                if matches!(e, Invalid::Rules(Reject::Equivocation { .. })) {
                    let _ = self.adopt_registry(data);
                }
                self.refused("registry", Some(source), e.to_string());
                refusal(&e)
            }
        }
    }

    /// Cheap checks here; the SQLite write happens on the store thread and the verdict comes
    /// back through [`EventLoop::on_store_done`]. `None`: held until then.
    fn on_claim_message(
        &mut self,
        source: PeerId,
        id: &gossipsub::MessageId,
        data: Vec<u8>,
    ) -> Option<MessageAcceptance> {
        if let Err(e) = validate::check_claim(&self.view(), &data) {
            self.refused("claim", Some(source), e.to_string());
            return Some(refusal(&e));
        }
        self.queue_write(StoreJob {
            kind: StoreKind::Claim,
            data,
            message: (id.clone(), source),
        })
    }

    fn on_attestation_message(
        &mut self,
        source: PeerId,
        id: &gossipsub::MessageId,
        data: Vec<u8>,
    ) -> Option<MessageAcceptance> {
        let att = match Signed::<Attestation>::decode(&data) {
            Ok(a) => a,
            Err(e) => {
                self.refused("attestation", Some(source), e.to_string());
                return Some(MessageAcceptance::Reject);
            }
        };
        if let Err(e) = att.verify_by(&att.record().verifier) {
            self.refused("attestation", Some(source), e.to_string());
            return Some(MessageAcceptance::Reject);
        }
        self.queue_write(StoreJob {
            kind: StoreKind::Attestation,
            data,
            message: (id.clone(), source),
        })
    }

    /// Queues a write for the store thread; a full queue drops the message (ignored, not
    /// held against the sender).
    fn queue_write(&mut self, job: StoreJob) -> Option<MessageAcceptance> {
        let (what, source) = (job.kind.what(), job.message.1);
        match self.store_jobs.try_send(job) {
            Ok(()) => None,
            Err(_) => {
                self.refused(what, Some(source), "store queue full".into());
                Some(MessageAcceptance::Ignore)
            }
        }
    }

    /// A write finished on the store thread: observe it and release the held message.
    fn on_store_done(&mut self, done: StoreDone) {
        let (id, source) = done.message;
        let acceptance = match done.outcome {
            Err(e) => {
                tracing::warn!(error = %e, "storing a {}", done.kind.what());
                MessageAcceptance::Ignore
            }
            Ok(StoreOutcome::Claim(Decision::Accept(c))) => {
                observe(&self.observers, Observed::claim(c.record()));
                MessageAcceptance::Accept
            }
            Ok(StoreOutcome::Attestation(Decision::Accept(a))) => {
                observe(&self.observers, Observed::attestation(a.record()));
                MessageAcceptance::Accept
            }
            Ok(StoreOutcome::Attestation(Decision::Reject(Reject::UnknownElm(elm)))) => {
                // Each costs a DHT lookup: a few per peer, then none (attestations of ELMs
                // nobody announced are the cheapest way to make a node search).
                if self.lookups.allow(&source, Instant::now()) {
                    let _ = self.events.try_send(Event::UnknownElm(elm));
                } else {
                    self.refused(
                        "attestation",
                        Some(source),
                        "names an unknown ELM; lookup rate limit".into(),
                    );
                }
                MessageAcceptance::Ignore
            }
            Ok(
                StoreOutcome::Claim(Decision::Unchanged | Decision::Reject(Reject::Stale))
                | StoreOutcome::Attestation(Decision::Unchanged),
            ) => MessageAcceptance::Ignore,
            Ok(
                StoreOutcome::Claim(Decision::Reject(r))
                | StoreOutcome::Attestation(Decision::Reject(r)),
            ) => {
                self.refused(done.kind.what(), Some(source), r.to_string());
                refusal(&Invalid::Rules(r))
            }
        };
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&id, &source, acceptance);
    }

    /// `None`: held back for verification by the worker.
    fn on_elm_message(
        &mut self,
        source: PeerId,
        id: &gossipsub::MessageId,
        data: Vec<u8>,
    ) -> Option<MessageAcceptance> {
        let envelope = match validate::check_elm(&self.view(), &data) {
            Ok(e) => e,
            Err(e) => {
                self.refused("elm record", Some(source), e.to_string());
                return Some(refusal(&e));
            }
        };
        let elm_id = envelope.id();
        match self.events.try_send(Event::ElmOffered {
            envelope: Box::new(envelope),
            bytes: data,
            message: Some((id.clone(), source)),
        }) {
            Ok(()) => {
                observe(&self.observers, Observed::ElmQueued(elm_id));
                None
            }
            Err(_) => {
                self.refused("elm record", Some(source), "verification queue full".into());
                Some(MessageAcceptance::Ignore)
            }
        }
    }
}

fn strip_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect()
}

/// When a record leaves the DHT store. Records with a natural end (claims, address records)
/// expire with it; a record from a peer expires at the latest after its kind's TTL
/// ([`validate::record_ttl`]: its publisher republishes it hourly). Our own records without a
/// natural end stay (Kademlia republishes them with its record TTL).
fn expiry_of(key: &RecordKey, value: &[u8], foreign: bool, now: u64) -> Option<Instant> {
    let ttl = foreign.then(|| Instant::now() + validate::record_ttl(key));
    let natural = natural_end(key, value, now);
    match (natural, ttl) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn natural_end(key: &RecordKey, value: &[u8], now: u64) -> Option<Instant> {
    let until = match key {
        RecordKey::Claim { .. } => Signed::<btm_protocol::Claim>::decode(value)
            .ok()
            .map(|c| c.record().lease_expires),
        RecordKey::Addr(_) => crate::addr::AddrRecord::decode(value)
            .ok()
            .map(|a| a.expires),
        _ => None,
    }?;
    let secs = until.saturating_sub(now);
    Some(Instant::now() + Duration::from_secs(secs))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// Agent strings come from any peer: control characters (terminal escapes, new lines) are
    /// dropped and the text is cut at a character boundary within the limit.
    #[test]
    fn agent_strings_are_cut_and_lose_control_characters() {
        assert_eq!(clean_agent("btm-node/0.1.0"), "btm-node/0.1.0");
        assert_eq!(clean_agent("a\u{1b}[31mred\nb"), "a[31mredb");
        let long = "é".repeat(200);
        let cut = clean_agent(&long);
        assert!(cut.len() <= crate::limits::MAX_AGENT_LEN, "{}", cut.len());
        assert_eq!(cut.chars().count(), crate::limits::MAX_AGENT_LEN / 2);
    }

    /// Issue 13: every record a peer stores here leaves the store: at its natural end (a
    /// claim's lease, an address record's expiry) or at its kind's TTL, whichever is first.
    /// Our own records without a natural end stay (Kademlia republishes them). Fails when the
    /// TTL of foreign records is dropped (records then stay for good, filling the store).
    #[test]
    fn foreign_records_expire_own_records_stay() {
        let node = btm_protocol::PublicKey([7; 32]);
        let id = ContentId([9; 32]);
        let keys = [
            RecordKey::Registry,
            RecordKey::Root(2),
            RecordKey::Seed,
            RecordKey::Elm(id),
            RecordKey::ElmOf {
                domain: "d".into(),
                node,
            },
            RecordKey::Claim {
                domain: "d".into(),
                node,
            },
            RecordKey::Addr(node),
        ];
        let now = 1_800_000_000;
        for key in &keys {
            let before = Instant::now();
            let ttl = validate::record_ttl(key);
            assert!(ttl <= Duration::from_secs(48 * 3600), "{key:?}");
            // Undecodable values have no natural end: the TTL bounds them.
            let foreign = expiry_of(key, b"junk", true, now).expect("foreign records expire");
            assert!(foreign <= Instant::now() + ttl, "{key:?}");
            assert!(foreign >= before + ttl, "{key:?}");
            let own = expiry_of(key, b"junk", false, now);
            assert_eq!(own, None, "{key:?}: our own records stay");
        }
        // A claim whose lease ends in ten minutes leaves then, before its 3 h TTL.
        let claimer = btm_protocol::test_key("ttl claimer");
        let mut claim = Signed::new(btm_protocol::Claim {
            domain: "d".into(),
            node: btm_protocol::PublicKey::of(&claimer),
            lease_expires: now + 600,
            first_claimed: now,
            progress: None,
        });
        claim.sign(&claimer);
        let key = RecordKey::Claim {
            domain: "d".into(),
            node: btm_protocol::PublicKey::of(&claimer),
        };
        let at = expiry_of(&key, &claim.encode(), true, now).expect("expires");
        assert!(at <= Instant::now() + Duration::from_secs(600));
        assert!(at > Instant::now() + Duration::from_secs(590));
    }
}
