//! The node: the event loop, the blob endpoint, the SQLite store and the verification worker,
//! started together with one identity. This is what the CLI's `join` and the tests drive.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use btm_protocol::{
    Attestation, Claim, ContentId, ElmRecord, NodeId, Registry, Root, Signed, Verdict, ppl_to_milli,
};
use btm_registry::{Decision, Store};
use libp2p::gossipsub::{MessageAcceptance, MessageId};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

use crate::addr::AddrRecord;
use crate::blobs::{BlobConfig, BlobError, Blobs, Fetched, Provider};
use crate::claims::{self, Board, ClaimPolicy};
use crate::client::{Client, Event, NetError, Observed};
use crate::identity::{Identity, IdentityError, node_id_of, peer_id_of};
use crate::keys::{NetworkId, ProviderKey, RecordKey, Topic};
use crate::limits::{Clock, ErrorBudget};
use crate::queue::{FairQueue, Full};
use crate::swarm::SwarmConfig;
use crate::validate::Horizons;
use crate::verify::{self, Failure, Verifier};

/// Everything a node needs to start. [`NodeConfig::new`] gives the documented defaults.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Holds `node.key`, `node.db` (SQLite) and `blobs/` (the iroh-blobs store).
    pub data_dir: PathBuf,
    /// The network's first root (an envelope), trusted out of band; names the network.
    pub root: Vec<u8>,
    /// libp2p listen addresses (TCP and QUIC).
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start (`/ip4/../tcp/../p2p/<peer id>`).
    pub bootstrap: Vec<Multiaddr>,
    pub swarm: SwarmConfig,
    pub blobs: BlobConfig,
    pub horizons: Horizons,
    pub claims: ClaimPolicy,
    /// ELM records waiting for verification; beyond this they are ignored (not forwarded).
    pub verify_queue: usize,
    /// ELM records of one trainer waiting for verification (the queue serves trainers in turn,
    /// `queue`); beyond this that trainer's records are ignored.
    pub verify_queue_per_trainer: usize,
    /// Downloads of a trainer's announced weights that may fail (no provider served them)
    /// before its further records are refused without a download; one is forgiven every
    /// `blobs.peer_error_forgive`.
    pub trainer_download_failures: u32,
    /// Verifications run at once.
    pub verify_concurrency: usize,
    /// Timeout of each call into the event loop.
    pub call_timeout: Duration,
    /// This node's clock (the system's unless a test skews it).
    pub clock: Clock,
    /// Use this key instead of `<data_dir>/node.key` (tests, benchmarks).
    pub identity: Option<Identity>,
}

/// Listen addresses on `ip` (an IPv4 address), random ports: TCP and QUIC.
fn tcp_and_quic(ip: &str) -> Vec<Multiaddr> {
    [
        format!("/ip4/{ip}/tcp/0"),
        format!("/ip4/{ip}/udp/0/quic-v1"),
    ]
    .iter()
    .map(|a| a.parse().unwrap_or_else(|_| Multiaddr::empty()))
    .collect()
}

impl NodeConfig {
    /// Defaults: listen on all interfaces, random ports, TCP and QUIC; no bootstrap peers.
    pub fn new(data_dir: impl Into<PathBuf>, root: Vec<u8>) -> NodeConfig {
        NodeConfig {
            data_dir: data_dir.into(),
            root,
            listen: tcp_and_quic("0.0.0.0"),
            bootstrap: vec![],
            swarm: SwarmConfig::default(),
            blobs: BlobConfig::default(),
            horizons: Horizons::default(),
            claims: ClaimPolicy::default(),
            verify_queue: 64,
            verify_queue_per_trainer: 4,
            trainer_download_failures: 3,
            verify_concurrency: 1,
            call_timeout: Duration::from_secs(60),
            clock: Clock::default(),
            identity: None,
        }
    }

    /// Loopback only (tests and local demos): 127.0.0.1, random ports.
    pub fn loopback(data_dir: impl Into<PathBuf>, root: Vec<u8>) -> NodeConfig {
        let mut c = NodeConfig::new(data_dir, root);
        c.listen = tcp_and_quic("127.0.0.1");
        c.blobs.bind = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        c
    }
}

/// Why a node operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("store: {0}")]
    Store(#[from] btm_registry::StoreError),
    #[error("the root is not valid: {0}")]
    Root(String),
    #[error(transparent)]
    Swarm(#[from] crate::swarm::SwarmError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("no trusted registry yet")]
    NoRegistry,
    #[error("refused: {0}")]
    Refused(String),
    #[error("no domain to claim")]
    NoDomain,
    #[error("verification: {0}")]
    Verify(#[from] Failure),
    /// The blob endpoint has neither a direct address nor a relay: peers could not fetch
    /// from this node, so no address record is published.
    #[error(
        "the blob endpoint has no address to publish (no direct address, no relay): peers could not fetch from this node; bind it to a reachable address or configure a relay"
    )]
    NoBlobAddress,
}

struct Inner {
    identity: Identity,
    client: Client,
    blobs: Blobs,
    store: Arc<Mutex<Store>>,
    observers: broadcast::Sender<Observed>,
    config: NodeConfig,
    /// Known blob addresses of other nodes.
    addrs: Mutex<HashMap<NodeId, (Provider, u64)>>,
    verifier: Arc<Mutex<Option<Verifier>>>,
    queue: FairQueue<NodeId, Job>,
    /// Announced weights that could not be downloaded, charged to their trainer.
    trainer_failures: Mutex<ErrorBudget<NodeId>>,
}

struct Job {
    envelope: Signed<ElmRecord>,
    message: Option<(MessageId, PeerId)>,
}

/// A running node. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node", &self.node_id())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, NodeError> {
    m.lock()
        .map_err(|_| NodeError::Refused("internal lock poisoned".into()))
}

impl Node {
    /// Starts a node: identity, store (initialised with the root on first start), blob
    /// endpoint, swarm and workers; listens and dials the bootstrap peers.
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        let identity = match &config.identity {
            Some(i) => i.clone(),
            None => Identity::load_or_create(&config.data_dir)?,
        };
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| NodeError::Refused(format!("data dir: {e}")))?;
        let root =
            Signed::<Root>::decode(&config.root).map_err(|e| NodeError::Root(e.to_string()))?;
        let net = NetworkId::of_root(&root);
        let mut store = Store::open(config.data_dir.join("node.db"))?;
        if store.trusted()?.is_none()
            && let Decision::Reject(r) = store.init_root(&config.root, config.clock.now())?
        {
            return Err(NodeError::Root(r.to_string()));
        }
        let trusted = store
            .trusted()?
            .ok_or_else(|| NodeError::Root("no root".into()))?;
        let store = Arc::new(Mutex::new(store));

        let blobs = Blobs::open(
            &config.data_dir.join("blobs"),
            &identity,
            config.blobs.clone(),
        )
        .await?;

        let swarm = crate::swarm::build(&identity, &net, &config.swarm)?;
        let (cmd_tx, cmd_rx) = mpsc::channel(config.swarm.limits.command_queue);
        let (ev_tx, ev_rx) = mpsc::channel(config.swarm.limits.event_queue);
        let (obs_tx, _) = broadcast::channel(4096);
        let event_loop = crate::event_loop::EventLoop::new(crate::event_loop::Parts {
            swarm,
            net,
            commands: cmd_rx,
            events: ev_tx,
            observers: obs_tx.clone(),
            store: store.clone(),
            trusted,
            horizons: config.horizons,
            limits: config.swarm.limits.clone(),
            clock: config.clock,
        });
        let client = Client::new(cmd_tx, net, identity.peer_id(), config.call_timeout);
        let inner = Arc::new(Inner {
            identity,
            client: client.clone(),
            blobs,
            store,
            observers: obs_tx,
            config: config.clone(),
            addrs: Mutex::new(HashMap::new()),
            verifier: Arc::new(Mutex::new(None)),
            queue: FairQueue::new(config.verify_queue_per_trainer, config.verify_queue),
            trainer_failures: Mutex::new(ErrorBudget::new(
                config.trainer_download_failures,
                config.blobs.peer_error_forgive,
                10_000,
            )),
        });
        let mut tasks = vec![tokio::spawn(event_loop.run())];
        tasks.push(tokio::spawn(dispatch(inner.clone(), ev_rx)));
        for _ in 0..config.verify_concurrency.max(1) {
            tasks.push(tokio::spawn(verify_worker(inner.clone())));
        }
        let node = Node {
            inner,
            tasks: Arc::new(Mutex::new(tasks)),
        };
        for addr in &config.listen {
            client.listen(addr.clone()).await?;
        }
        for addr in &config.bootstrap {
            if let Err(e) = client.dial(addr.clone()).await {
                tracing::warn!(%addr, error = %e, "bootstrap peer unreachable");
            }
        }
        if !config.bootstrap.is_empty() {
            let _ = client.bootstrap().await;
        }
        Ok(node)
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.config.data_dir
    }

    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.identity.node_id()
    }

    pub fn peer_id(&self) -> PeerId {
        self.inner.identity.peer_id()
    }

    /// The event loop handle.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The blob endpoint and store.
    pub fn blobs(&self) -> &Blobs {
        &self.inner.blobs
    }

    /// Runs `f` on the SQLite store.
    pub fn with_store<T>(&self, f: impl FnOnce(&mut Store) -> T) -> Result<T, NodeError> {
        Ok(f(&mut *lock(&self.inner.store)?))
    }

    /// Observations of what the node does (lossy for slow receivers).
    pub fn observe(&self) -> broadcast::Receiver<Observed> {
        self.inner.observers.subscribe()
    }

    /// Listen addresses with `/p2p/<peer id>`, for others to bootstrap from.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NodeError> {
        Ok(self.inner.client.listen_addrs().await?)
    }

    /// The trusted registry.
    pub async fn registry(&self) -> Result<Option<Signed<Registry>>, NodeError> {
        Ok(self.inner.client.trusted().await?.registry)
    }

    /// Offers a registry (a maintainer publishing, or an operator importing a file): accepted
    /// ones become trusted, are stored on the DHT with their seed manifest, and gossiped.
    pub async fn publish_registry(
        &self,
        envelope: &[u8],
    ) -> Result<Decision<Signed<Registry>>, NodeError> {
        Ok(self.inner.client.offer_registry(envelope.to_vec()).await?)
    }

    /// The trusted root and registry.
    pub async fn trusted(&self) -> Result<btm_registry::Trusted, NodeError> {
        Ok(self.inner.client.trusted().await?)
    }

    /// Gossips a registry proposal (a registry signed by fewer maintainers than the threshold)
    /// for the other maintainers to co-sign. A proposal sent before, byte for byte, within the
    /// gossip's duplicate window is not sent again (`Ok(false)`).
    pub async fn publish_proposal(&self, envelope: &Signed<Registry>) -> Result<bool, NodeError> {
        match self
            .inner
            .client
            .publish_raw(crate::keys::Topic::Proposals, envelope.encode())
            .await
        {
            Ok(()) => Ok(true),
            // Sent already, or no peer on the topic yet (or every queue full): try again later.
            Err(crate::NetError::Publish(e))
                if ["Duplicate", "NoPeersSubscribedToTopic", "AllQueuesFull"]
                    .iter()
                    .any(|k| e.starts_with(k)) =>
            {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Offers the next root (a maintainers' key rotation, signed by a threshold of the trusted
    /// keys and of its own): an accepted one becomes trusted, is stored on the DHT under its
    /// version and gossiped, and registries are checked against its keys from then on.
    pub async fn publish_root(&self, envelope: &[u8]) -> Result<Decision<Signed<Root>>, NodeError> {
        Ok(self.inner.client.offer_root(envelope.to_vec()).await?)
    }

    /// The trusted root's version.
    pub async fn root_version(&self) -> Result<u64, NodeError> {
        Ok(self.inner.client.trusted().await?.root.record().version)
    }

    /// Walks the root chain on the DHT: asks for the root after the trusted one until there is
    /// none, checking each step against the rotation rules. Returns the trusted root's version.
    pub async fn sync_root(&self) -> Result<u64, NodeError> {
        let c = &self.inner.client;
        loop {
            let current = self.root_version().await?;
            let Some(next) = current.checked_add(1) else {
                return Ok(current);
            };
            let Some(bytes) = c.get_record(RecordKey::Root(next)).await? else {
                return Ok(current);
            };
            match c.offer_root(bytes).await? {
                Decision::Accept(_) => {}
                // Adopted while the query ran (the GET result itself is adopted on arrival).
                Decision::Unchanged => {}
                Decision::Reject(r) => {
                    tracing::warn!(version = next, reason = %r, "a root found on the DHT was refused");
                    return Ok(current);
                }
            }
            if self.root_version().await? == current {
                return Ok(current);
            }
        }
    }

    // --- blobs -------------------------------------------------------------------------

    /// Publishes (or refreshes) this node's blob-address record on the DHT.
    pub async fn publish_addr(&self) -> Result<(), NodeError> {
        let rec = addr_record(
            self.node_id(),
            self.inner.config.clock.now() + self.inner.config.horizons.max_addr_secs,
            self.inner.blobs.addrs(),
            self.inner.blobs.relay_urls(),
        )?;
        let bytes = rec.sign(self.inner.identity.signing_key());
        self.inner
            .client
            .put_record(RecordKey::Addr(self.node_id()), bytes)
            .await?;
        Ok(())
    }

    /// Adds bytes to the blob store and announces this node as a provider.
    pub async fn add_blob(&self, bytes: Vec<u8>) -> Result<ContentId, NodeError> {
        let id = self.inner.blobs.add_bytes(bytes).await?;
        self.provide_blob(id).await?;
        Ok(id)
    }

    /// Adds a file to the blob store and announces this node as a provider.
    pub async fn add_blob_path(&self, path: &Path) -> Result<ContentId, NodeError> {
        let id = self.inner.blobs.add_path(path).await?;
        self.provide_blob(id).await?;
        Ok(id)
    }

    async fn provide_blob(&self, id: ContentId) -> Result<(), NodeError> {
        self.publish_addr().await?;
        self.inner.client.provide(ProviderKey::Blob(id)).await?;
        Ok(())
    }

    /// Downloads a blob from its providers (found on the DHT, plus `hints`), verified as it
    /// streams, then provides it too.
    pub async fn fetch_blob(&self, id: ContentId, hints: &[NodeId]) -> Result<Fetched, NodeError> {
        fetch(&self.inner, id, hints).await
    }

    // --- claims ------------------------------------------------------------------------

    /// The live claims on the registry's domains, as a board.
    pub fn board(&self, registry: &Registry) -> Result<Board, NodeError> {
        let now = self.inner.config.clock.now();
        let store = lock(&self.inner.store)?;
        let mut claims = Vec::new();
        for d in &registry.domains {
            claims.extend(
                store
                    .claims(&d.name, now)?
                    .into_iter()
                    .map(Signed::into_record),
            );
        }
        Ok(Board::from_claims(&claims, now))
    }

    /// Claims `domain`, or the registry's domain with the fewest live claims, with a fresh
    /// lease; publishes the claim on gossip and the DHT. Renewing is claiming again: the claim
    /// keeps the time of this node's first live claim on the domain, and carries `progress`.
    pub async fn claim(&self, domain: Option<&str>) -> Result<Signed<Claim>, NodeError> {
        self.claim_with(domain, None).await
    }

    /// [`Node::claim`] with the training progress a renewal shows.
    pub async fn claim_with(
        &self,
        domain: Option<&str>,
        progress: Option<btm_protocol::ClaimProgress>,
    ) -> Result<Signed<Claim>, NodeError> {
        let registry = self.registry().await?.ok_or(NodeError::NoRegistry)?;
        let now = self.inner.config.clock.now();
        let domain = match domain {
            Some(d) => d.to_string(),
            None => {
                let board = self.board(registry.record())?;
                claims::choose_domain(&board, registry.record(), &self.node_id(), now)
                    .ok_or(NodeError::NoDomain)?
            }
        };
        let me = self.node_id();
        // A renewal keeps its first-claim time; a new claim is first made now, and a move to
        // another domain strictly after the claim it leaves (one claim per node,
        // `rules::decide_claim`), even within the same second.
        let held = lock(&self.inner.store)?.claims_by(&me, now)?;
        let first_claimed = match held.iter().find(|c| c.record().domain == domain) {
            Some(c) => c.record().first_claimed,
            None => held
                .iter()
                .map(|c| c.record().first_claimed.saturating_add(1))
                .fold(now, u64::max),
        };
        let mut envelope = Signed::new(Claim {
            domain: domain.clone(),
            node: me,
            lease_expires: now + self.inner.config.claims.lease_secs,
            first_claimed,
            progress,
        });
        envelope.sign(self.inner.identity.signing_key());
        let bytes = envelope.encode();
        match lock(&self.inner.store)?.put_claim(&bytes, now)? {
            Decision::Reject(r) => return Err(NodeError::Refused(r.to_string())),
            Decision::Accept(_) | Decision::Unchanged => {}
        }
        let c = self.inner.client.clone();
        c.put_record(
            RecordKey::Claim {
                domain: domain.clone(),
                node: self.node_id(),
            },
            bytes.clone(),
        )
        .await?;
        c.provide(ProviderKey::Claimants(domain.clone())).await?;
        // A move: stop providing the domains left behind, so this node is no longer listed
        // (and republished) as one of their claimants.
        for old in held.iter().map(|h| &h.record().domain) {
            if *old != domain {
                c.stop_providing(ProviderKey::Claimants(old.clone()))
                    .await?;
            }
        }
        if let Err(e) = c.publish_raw(Topic::Claims, bytes).await {
            tracing::debug!(error = %e, "gossiping a claim");
        }
        Ok(envelope)
    }

    /// Renews this node's claims that are about to end (per the claim policy).
    pub async fn renew_claims(&self) -> Result<Vec<Signed<Claim>>, NodeError> {
        let registry = self.registry().await?.ok_or(NodeError::NoRegistry)?;
        let board = self.board(registry.record())?;
        let mut out = Vec::new();
        let policy = self.inner.config.claims;
        while let claims::Action::Renew { domain, .. } = claims::next_action(
            &board,
            registry.record(),
            &self.node_id(),
            &policy,
            self.inner.config.clock.now(),
            false,
        ) {
            out.push(self.claim(Some(&domain)).await?);
            if out.len() >= policy.max_own_claims.max(1) {
                break;
            }
        }
        Ok(out)
    }

    // --- announcements -----------------------------------------------------------------

    /// Announces a finished ELM: adds its weights as a blob, signs the record (the trainer is
    /// this node; the weights id is set from the bytes), stores it on the DHT, provides the
    /// weights and gossips the record.
    pub async fn announce(
        &self,
        mut record: ElmRecord,
        weights: Vec<u8>,
    ) -> Result<Signed<ElmRecord>, NodeError> {
        record.trainer = self.node_id();
        record.weights = self.inner.blobs.add_bytes(weights).await?;
        let mut envelope = Signed::new(record);
        envelope.sign(self.inner.identity.signing_key());
        self.announce_signed(&envelope).await?;
        Ok(envelope)
    }

    /// Publishes an already signed ELM record whose weights are in the blob store (also used by
    /// tests to play a dishonest trainer).
    pub async fn announce_signed(&self, envelope: &Signed<ElmRecord>) -> Result<(), NodeError> {
        let e = envelope.record();
        let bytes = envelope.encode();
        let now = self.inner.config.clock.now();
        if let Decision::Reject(r) = lock(&self.inner.store)?.put_elm(&bytes, now)? {
            return Err(NodeError::Refused(r.to_string()));
        }
        self.provide_blob(e.weights).await?;
        let c = &self.inner.client;
        c.put_record(RecordKey::Elm(envelope.id()), bytes.clone())
            .await?;
        c.put_record(
            RecordKey::ElmOf {
                domain: e.domain.clone(),
                node: self.node_id(),
            },
            bytes.clone(),
        )
        .await?;
        c.provide(ProviderKey::Trainers(e.domain.clone())).await?;
        if let Err(err) = c.publish_raw(Topic::Elms, bytes).await {
            tracing::debug!(error = %err, "gossiping an ELM record");
        }
        Ok(())
    }

    /// This node's verdict on an ELM record, if it has one.
    pub fn verdict(&self, elm: &ContentId) -> Result<Option<Attestation>, NodeError> {
        let me = self.node_id();
        Ok(lock(&self.inner.store)?
            .attestations(elm)?
            .into_iter()
            .map(Signed::into_record)
            .find(|a| a.verifier == me))
    }

    /// Verifies an ELM record now (not through the queue) and returns what was measured.
    pub async fn verify_now(
        &self,
        envelope: &Signed<ElmRecord>,
    ) -> Result<verify::Measured, NodeError> {
        Ok(run_verification(&self.inner, envelope).await?)
    }

    // --- catching up -------------------------------------------------------------------

    /// Catches up from the DHT (a late joiner): the newest registry (with its seed), every
    /// domain's live claims, and the ELM records announced on each domain and accepted in the
    /// registry, which are queued for verification.
    pub async fn sync(&self) -> Result<SyncReport, NodeError> {
        let c = &self.inner.client;
        // Registries after a key rotation are signed by keys only the new root lists.
        let mut report = SyncReport {
            root: self.sync_root().await?,
            ..SyncReport::default()
        };
        if let Some(bytes) = c.get_record(RecordKey::Registry).await? {
            report.registry = Signed::<Registry>::decode(&bytes)
                .ok()
                .map(|r| r.record().version);
        }
        let registry = self.registry().await?.ok_or(NodeError::NoRegistry)?;
        let now = self.inner.config.clock.now();
        for d in &registry.record().domains {
            let domain = || d.name.clone();
            let claim = |node| RecordKey::Claim {
                domain: domain(),
                node,
            };
            for bytes in provided_records(c, ProviderKey::Claimants(domain()), claim).await? {
                if let Decision::Accept(_) = lock(&self.inner.store)?.put_claim(&bytes, now)? {
                    report.claims += 1;
                }
            }
            let elm = |node| RecordKey::ElmOf {
                domain: domain(),
                node,
            };
            for bytes in provided_records(c, ProviderKey::Trainers(domain()), elm).await? {
                self.enqueue_record(&bytes, &mut report).await;
            }
        }
        for accepted in &registry.record().elms {
            if let Some(bytes) = c.get_record(RecordKey::Elm(accepted.record)).await? {
                self.enqueue_record(&bytes, &mut report).await;
            }
        }
        Ok(report)
    }

    async fn enqueue(&self, envelope: Signed<ElmRecord>, message: Option<(MessageId, PeerId)>) {
        enqueue(&self.inner, envelope, message).await;
    }

    /// Queues an ELM record found while catching up for verification, counting it.
    async fn enqueue_record(&self, bytes: &[u8], report: &mut SyncReport) {
        if let Ok(envelope) = Signed::<ElmRecord>::decode(bytes) {
            report.elms += 1;
            self.enqueue(envelope, None).await;
        }
    }

    /// Stops the workers and the event loop, and closes the blob endpoint and store.
    pub async fn shutdown(&self) {
        let _ = self.inner.client.shutdown().await;
        if let Ok(tasks) = self.tasks.lock() {
            for t in tasks.iter() {
                t.abort();
            }
        }
        self.inner.blobs.shutdown().await;
    }
}

/// The records that the providers of `provider` keep under `key(their node id)`.
async fn provided_records(
    c: &Client,
    provider: ProviderKey,
    key: impl Fn(NodeId) -> RecordKey,
) -> Result<Vec<Vec<u8>>, NodeError> {
    let mut out = Vec::new();
    for peer in c.providers(provider).await? {
        if let Some(node) = node_id_of(&peer)
            && let Some(bytes) = c.get_record(key(node)).await?
        {
            out.push(bytes);
        }
    }
    Ok(out)
}

/// This node's address record, if it has anything to say: a record with no address and no
/// relay is refused by every peer (and says nothing), so it is an error here.
fn addr_record(
    node: NodeId,
    expires: u64,
    addrs: Vec<std::net::SocketAddr>,
    relays: Vec<iroh::RelayUrl>,
) -> Result<AddrRecord, NodeError> {
    if addrs.is_empty() && relays.is_empty() {
        return Err(NodeError::NoBlobAddress);
    }
    Ok(AddrRecord {
        node,
        expires,
        addrs,
        relays,
    })
}

/// What [`Node::sync`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// The trusted root's version after walking the chain.
    pub root: u64,
    /// The version of the newest registry found, if any.
    pub registry: Option<u64>,
    /// Claims newly stored.
    pub claims: usize,
    /// ELM records found and queued for verification.
    pub elms: usize,
}

// --- worker ---------------------------------------------------------------------------------

async fn dispatch(inner: Arc<Inner>, mut events: mpsc::Receiver<Event>) {
    let lookups = Arc::new(tokio::sync::Semaphore::new(
        inner.config.swarm.limits.max_unknown_lookups.max(1),
    ));
    while let Some(event) = events.recv().await {
        match event {
            Event::ElmOffered {
                envelope, message, ..
            } => enqueue(&inner, *envelope, message).await,
            Event::UnknownElm(id) => {
                let Ok(permit) = lookups.clone().try_acquire_owned() else {
                    tracing::debug!(elm = %id, "skipping a lookup: too many running");
                    continue;
                };
                let inner = inner.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Ok(Some(bytes)) = inner.client.get_record(RecordKey::Elm(id)).await
                        && let Ok(envelope) = Signed::<ElmRecord>::decode(&bytes)
                    {
                        enqueue(&inner, envelope, None).await;
                    }
                });
            }
        }
    }
}

async fn enqueue(
    inner: &Arc<Inner>,
    envelope: Signed<ElmRecord>,
    message: Option<(MessageId, PeerId)>,
) {
    let trainer = envelope.record().trainer;
    if let Err((full, job)) = inner.queue.push(trainer, Job { envelope, message }) {
        let reason = match full {
            Full::Key => "this trainer's records already fill its share of the verification queue",
            Full::Total => "verification queue full",
        };
        let _ = inner.observers.send(Observed::Refused {
            what: "elm record",
            from: job.message.as_ref().map(|m| m.1),
            reason: reason.into(),
        });
        if let Some((id, source)) = job.message {
            let _ = inner
                .client
                .report(id, source, MessageAcceptance::Ignore)
                .await;
        }
    }
}

async fn verify_worker(inner: Arc<Inner>) {
    loop {
        let job = inner.queue.pop().await;
        handle_job(&inner, job).await;
    }
}

async fn handle_job(inner: &Arc<Inner>, job: Job) {
    let elm = job.envelope.id();
    let me = inner.identity.node_id();
    // Already judged: answer from the store.
    let known = inner
        .store
        .lock()
        .ok()
        .and_then(|s| s.attestations(&elm).ok())
        .and_then(|atts| {
            atts.into_iter()
                .map(Signed::into_record)
                .find(|a| a.verifier == me)
        });
    let trainer = job.envelope.record().trainer;
    let charged = inner
        .trainer_failures
        .lock()
        .map(|b| b.spent(&trainer, Instant::now()))
        .unwrap_or(false);
    let outcome = match known {
        Some(a) => Ok(a.verdict == Verdict::Accept),
        None if charged => {
            // Its trainer's announced weights could not be downloaded, again and again: do not
            // spend a download on this one until some of that is forgiven.
            let _ = inner.observers.send(Observed::Refused {
                what: "elm record",
                from: job.message.as_ref().map(|m| m.1),
                reason: format!(
                    "the weights its trainer {trainer} announced could not be downloaded {} times; not trying its records for a while",
                    inner.config.trainer_download_failures
                ),
            });
            Err(())
        }
        None => judge_and_attest(inner, &job.envelope).await,
    };
    if let Some((id, source)) = job.message {
        let acceptance = match outcome {
            Ok(true) => MessageAcceptance::Accept,
            Ok(false) => MessageAcceptance::Reject,
            Err(()) => MessageAcceptance::Ignore,
        };
        let _ = inner.client.report(id, source, acceptance).await;
    }
}

/// The marker of a verification in progress: `<data dir>/verifying/<record id>`. It is made
/// before the ELM is loaded and removed when a verdict (or a clean failure) is reached, so one
/// left behind means the node died verifying that ELM (out of memory, killed).
fn verifying_marker(inner: &Inner, elm: &ContentId) -> PathBuf {
    inner
        .config
        .data_dir
        .join("verifying")
        .join(elm.to_string())
}

/// Ok(verdict) when a verdict was reached (and attested); Err when we could not verify.
async fn judge_and_attest(inner: &Arc<Inner>, envelope: &Signed<ElmRecord>) -> Result<bool, ()> {
    let elm = envelope.id();
    // A crash while verifying one ELM must not loop: if an earlier verification of this ELM
    // never finished, do not try it again.
    let marker = verifying_marker(inner, &elm);
    if marker.exists() {
        tracing::warn!(%elm, "an earlier verification of this ELM did not finish; not verifying it again");
        let _ = inner.observers.send(Observed::Refused {
            what: "elm verification",
            from: None,
            reason: "an earlier verification of it did not finish (the node crashed or was killed); not trying again".into(),
        });
        return Err(());
    }
    let _ = inner.observers.send(Observed::Verifying(elm));
    let result = run_verification(inner, envelope).await;
    let (verdict, measured, reason) = match &result {
        Ok(m) => (Verdict::Accept, Some(m.ppl), "accepted".to_string()),
        Err(f) if f.is_verdict() => (Verdict::Reject, None, f.to_string()),
        Err(f) => {
            tracing::info!(%elm, error = %f, "could not verify");
            if matches!(f, Failure::Download(_))
                && let Ok(mut b) = inner.trainer_failures.lock()
            {
                // Failed downloads cost the announcer, not only the providers tried.
                b.charge(&envelope.record().trainer, Instant::now());
            }
            let _ = inner.observers.send(Observed::Refused {
                what: "elm verification",
                from: None,
                reason: f.to_string(),
            });
            return Err(());
        }
    };
    tracing::info!(%elm, ?verdict, %reason, "verified");
    let now = inner.config.clock.now();
    let bytes = envelope.encode();
    let attestation = {
        let mut a = Signed::new(Attestation {
            verifier: inner.identity.node_id(),
            elm,
            measured_ppl_milli: measured.and_then(ppl_to_milli).unwrap_or(0),
            verdict,
            pool: btm_protocol::EvalPool::Public,
        });
        a.sign(inner.identity.signing_key());
        a
    };
    if let Ok(mut store) = inner.store.lock() {
        // Step 1 passed, so the store's ELM rules pass too; an ELM must be held to attest it.
        if let Err(e) = store.put_elm(&bytes, now) {
            tracing::warn!(error = %e, "storing an ELM record");
        }
        if let Err(e) = store.put_attestation(&attestation.encode()) {
            tracing::warn!(error = %e, "storing our attestation");
        }
    }
    let _ = inner
        .observers
        .send(Observed::Verdict(crate::VerdictReport {
            elm,
            accepted: verdict == Verdict::Accept,
            measured_ppl: measured,
            reason,
        }));
    let c = inner.client.clone();
    let weights = envelope.record().weights;
    let accepted = verdict == Verdict::Accept;
    if !accepted && !weights_still_needed(inner, &weights).await {
        // Rejected weights are not kept: the store's collector deletes them.
        if let Err(e) = inner.blobs.forget(&weights).await {
            tracing::warn!(%weights, error = %e, "forgetting rejected weights");
        }
    }
    tokio::spawn(async move {
        if let Err(e) = c
            .publish_raw(Topic::Attestations, attestation.encode())
            .await
        {
            tracing::debug!(error = %e, "gossiping an attestation");
        }
        if accepted {
            let _ = c.provide(ProviderKey::Blob(weights)).await;
        }
    });
    Ok(accepted)
}

/// Whether weights this node just rejected under one record are still needed here: they are
/// the seed's, an ELM's the registry accepted, or weights this node accepted under another
/// record (the same bytes announced twice). If that cannot be told, they are kept.
async fn weights_still_needed(inner: &Inner, weights: &ContentId) -> bool {
    let Ok(trusted) = inner.client.trusted().await else {
        return true;
    };
    if let Some(reg) = trusted.registry.as_ref().map(Signed::record)
        && (reg.seed.as_ref().is_some_and(|s| s.weights == *weights)
            || reg.elms.iter().any(|e| e.weights == *weights))
    {
        return true;
    }
    let me = inner.identity.node_id();
    let Ok(store) = inner.store.lock() else {
        return true;
    };
    let Ok(elms) = store.elms(usize::MAX) else {
        return true;
    };
    elms.iter()
        .filter(|e| e.record().weights == *weights)
        .any(|e| {
            store.attestations(&e.id()).map_or(true, |atts| {
                atts.iter().any(|a| {
                    let a = a.record();
                    a.verifier == me && a.verdict == Verdict::Accept
                })
            })
        })
}

/// Steps 1-5 for one record: fetches what is missing, then scores on a blocking thread.
async fn run_verification(
    inner: &Arc<Inner>,
    envelope: &Signed<ElmRecord>,
) -> Result<verify::Measured, Failure> {
    let registry = inner
        .client
        .trusted()
        .await
        .map_err(|e| Failure::Local(e.to_string()))?
        .registry
        .ok_or_else(|| Failure::Local("no trusted registry".into()))?
        .into_record();
    verify::check_record(&registry, envelope)?;
    let e = envelope.record();
    let seed = registry
        .seed
        .clone()
        .ok_or_else(|| Failure::Local("the registry has no seed".into()))?;
    let domain = registry
        .domain(&e.domain)
        .cloned()
        .ok_or_else(|| Failure::Local("domain vanished".into()))?;
    let trainer = [e.trainer];
    fetch_sized(inner, e.weights, Some(e.weights_size), &trainer, false)
        .await
        .map_err(|err| Failure::Download(err.to_string()))?;
    for id in [seed.weights, seed.tokenizer, domain.valid] {
        fetch(inner, id, &[])
            .await
            .map_err(|err| Failure::Local(err.to_string()))?;
    }
    let max = inner.config.blobs.max_blob_bytes;
    let weights = inner
        .blobs
        .read(&e.weights, max)
        .await
        .map_err(|err| Failure::Download(err.to_string()))?;
    let valid = inner
        .blobs
        .read(&domain.valid, max)
        .await
        .map_err(|err| Failure::Local(err.to_string()))?;
    let needs_seed = inner
        .verifier
        .lock()
        .map(|v| v.as_ref().is_none_or(|v| v.seed() != &seed))
        .unwrap_or(true);
    let seed_bytes = if needs_seed {
        Some((
            inner
                .blobs
                .read(&seed.weights, max)
                .await
                .map_err(|err| Failure::Local(err.to_string()))?,
            inner
                .blobs
                .read(&seed.tokenizer, max)
                .await
                .map_err(|err| Failure::Local(err.to_string()))?,
        ))
    } else {
        None
    };
    // From here the ELM is loaded and scored (memory and time): mark it, so that a crash here
    // is not repeated on the next start.
    let marker = verifying_marker(inner, &envelope.id());
    if let Some(dir) = marker.parent()
        && let Err(e) = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&marker, b""))
    {
        tracing::warn!(error = %e, "writing the verification marker");
    }
    let slot = inner.verifier.clone();
    let envelope = envelope.clone();
    let scored = tokio::task::spawn_blocking(move || {
        let mut guard = slot
            .lock()
            .map_err(|_| Failure::Local("verifier lock poisoned".into()))?;
        if let Some((w, t)) = seed_bytes {
            let device = btm_model::device::DeviceKind::Cpu
                .device()
                .map_err(|e| Failure::Local(e.to_string()))?;
            *guard = Some(Verifier::new(&seed, &w, &t, device)?);
        }
        let v = guard
            .as_mut()
            .ok_or_else(|| Failure::Local("no verifier".into()))?;
        v.verify(&registry, &envelope, &weights, &valid)
    })
    .await;
    // A scoring that panicked counts as a crash: the marker stays, the ELM is not tried again.
    if scored.is_ok() {
        let _ = std::fs::remove_file(&marker);
    }
    scored.map_err(|e| Failure::Local(format!("verification task: {e}")))?
}

/// Finds providers of a blob (DHT plus hints), resolves their addresses, downloads.
async fn fetch(inner: &Arc<Inner>, id: ContentId, hints: &[NodeId]) -> Result<Fetched, NodeError> {
    fetch_sized(inner, id, None, hints, true).await
}

/// [`fetch`] of a blob of known size: a provider whose blob has another size is refused before
/// its body is fetched. With `provide` false the node does not offer the blob afterwards (an
/// ELM's weights are provided only once this node has accepted them).
async fn fetch_sized(
    inner: &Arc<Inner>,
    id: ContentId,
    size: Option<u64>,
    hints: &[NodeId],
    provide: bool,
) -> Result<Fetched, NodeError> {
    if inner.blobs.has(&id).await {
        return Ok(inner.blobs.fetch(&id, &[]).await?);
    }
    let me = inner.identity.node_id();
    let mut nodes: Vec<NodeId> = hints.to_vec();
    for peer in inner.client.providers(ProviderKey::Blob(id)).await? {
        if let Some(n) = node_id_of(&peer)
            && !nodes.contains(&n)
        {
            nodes.push(n);
        }
    }
    nodes.retain(|n| *n != me);
    // Peers we are connected to are alive: try them first. A provider record outlives the node
    // that made it, and every dead provider tried first costs a lookup and a connect timeout.
    let connected: Vec<NodeId> = inner
        .client
        .connected_peers()
        .await
        .unwrap_or_default()
        .iter()
        .filter_map(node_id_of)
        .collect();
    nodes.sort_by_key(|n| !connected.contains(n));
    // Resolve and try one provider at a time, so that a live one early in the list is used
    // without waiting on the addresses of the rest.
    let mut failures = Vec::new();
    let mut fetched = None;
    for node in nodes
        .into_iter()
        .take(inner.config.blobs.max_attempts.max(1))
    {
        let Some(provider) = resolve(inner, &node).await else {
            failures.push((node, "no address record".to_string()));
            continue;
        };
        match inner.blobs.fetch_sized(&id, size, &[provider]).await {
            Ok(mut f) => {
                failures.append(&mut f.failures);
                f.failures = std::mem::take(&mut failures);
                fetched = Some(f);
                break;
            }
            Err(BlobError::Download { attempts, .. }) => failures.extend(attempts),
            Err(e) => return Err(e.into()),
        }
    }
    let Some(fetched) = fetched else {
        return Err(BlobError::Download {
            id,
            attempts: failures,
        }
        .into());
    };
    if provide {
        let c = inner.client.clone();
        tokio::spawn(async move {
            let _ = c.provide(ProviderKey::Blob(id)).await;
        });
    }
    Ok(fetched)
}

/// A node's blob addresses, from the cache or its DHT address record.
async fn resolve(inner: &Arc<Inner>, node: &NodeId) -> Option<Provider> {
    let now = inner.config.clock.now();
    if let Ok(cache) = inner.addrs.lock()
        && let Some((provider, exp)) = cache.get(node)
        && *exp > now
    {
        return Some(provider.clone());
    }
    let bytes = inner
        .client
        .get_record(RecordKey::Addr(*node))
        .await
        .ok()??;
    let rec = AddrRecord::decode(&bytes).ok()?;
    if rec.node != *node || rec.expires <= now {
        return None;
    }
    let provider = Provider {
        node: *node,
        addrs: rec.addrs,
        relays: rec.relays,
    };
    if let Ok(mut cache) = inner.addrs.lock() {
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(*node, (provider.clone(), rec.expires));
    }
    let _ = peer_id_of(node);
    Some(provider)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// Issue 13: a blob endpoint with no address is a clear error, not a record every peer
    /// refuses as malformed.
    #[test]
    fn an_address_record_needs_an_address() {
        let key = btm_protocol::test_key("addr");
        let node = btm_protocol::PublicKey::of(&key);
        let err = addr_record(node, 10, vec![], vec![]).expect_err("nothing to publish");
        assert!(matches!(err, NodeError::NoBlobAddress));
        assert!(err.to_string().contains("no address to publish"), "{err}");
        let rec = addr_record(node, 10, vec!["127.0.0.1:4000".parse().unwrap()], vec![])
            .expect("an address");
        let decoded = AddrRecord::decode(&rec.sign(&key)).expect("valid for peers");
        assert_eq!(decoded, rec);
        // What the old code published instead: a record with no entry, which peers refuse.
        let empty = AddrRecord {
            node,
            expires: 10,
            addrs: vec![],
            relays: vec![],
        };
        assert!(AddrRecord::decode(&empty.sign(&key)).is_err());
    }
}
