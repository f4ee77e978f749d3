//! The handle through which everything else talks to the event loop: cloneable, bounded
//! command channel, one `oneshot` reply per command, a timeout on every wait.

use std::time::Duration;

use btm_protocol::{ContentId, Registry, Root, Signed};
use btm_registry::{Decision, Trusted};
use libp2p::gossipsub::{MessageAcceptance, MessageId};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use crate::keys::{NetworkId, ProviderKey, RecordKey, Topic};
use crate::validate::Invalid;

/// Why a network operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The event loop has stopped.
    #[error("the network event loop has stopped")]
    Closed,
    /// No answer in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Dialling failed.
    #[error("dial: {0}")]
    Dial(String),
    /// Listening failed.
    #[error("listen: {0}")]
    Listen(String),
    /// Gossip publication failed (e.g. no peers on the topic yet).
    #[error("publish: {0}")]
    Publish(String),
    /// Our own record does not pass the checks every peer applies.
    #[error("invalid record: {0}")]
    Invalid(#[from] Invalid),
    /// A DHT operation failed.
    #[error("dht: {0}")]
    Dht(String),
    /// The local database failed.
    #[error("store: {0}")]
    Store(String),
    /// Too many queries in flight.
    #[error("busy: too many queries in flight")]
    Busy,
}

type Reply<T> = oneshot::Sender<Result<T, NetError>>;

/// Commands to the event loop.
#[derive(Debug)]
pub(crate) enum Command {
    Listen(Multiaddr, Reply<()>),
    Dial(Multiaddr, Reply<()>),
    ListenAddrs(Reply<Vec<Multiaddr>>),
    ConnectedPeers(Reply<Vec<PeerId>>),
    Bootstrap(Reply<()>),
    Publish(Topic, Vec<u8>, Reply<()>),
    Report(MessageId, PeerId, MessageAcceptance, Reply<bool>),
    PutRecord(RecordKey, Vec<u8>, Reply<()>),
    PutRaw(Vec<u8>, Vec<u8>, Reply<()>),
    GetRecord(RecordKey, Reply<Option<Vec<u8>>>),
    LocalRecord(RecordKey, Reply<Option<Vec<u8>>>),
    Provide(ProviderKey, Reply<()>),
    StopProviding(ProviderKey, Reply<()>),
    Providing(ProviderKey, Reply<bool>),
    GetProviders(ProviderKey, Reply<Vec<PeerId>>),
    PeerScore(PeerId, Reply<Option<f64>>),
    PeerAgent(PeerId, Reply<Option<String>>),
    StoreStats(Reply<crate::record_store::StoreStats>),
    GossipPeers(Reply<Vec<(PeerId, usize)>>),
    RoutingTable(Reply<Vec<PeerId>>),
    Trusted(Reply<Trusted>),
    OfferRegistry(Vec<u8>, Reply<Decision<Signed<Registry>>>),
    OfferRoot(Vec<u8>, Reply<Decision<Signed<Root>>>),
    Block(PeerId, bool, Reply<()>),
    Shutdown(Reply<()>),
}

/// A cheap, cloneable handle to the node's event loop.
#[derive(Debug, Clone)]
pub struct Client {
    tx: mpsc::Sender<Command>,
    net: NetworkId,
    peer_id: PeerId,
    timeout: Duration,
}

impl Client {
    pub(crate) fn new(
        tx: mpsc::Sender<Command>,
        net: NetworkId,
        peer_id: PeerId,
        timeout: Duration,
    ) -> Self {
        Client {
            tx,
            net,
            peer_id,
            timeout,
        }
    }

    /// The network this node is on.
    pub fn network(&self) -> NetworkId {
        self.net
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The same handle with another timeout for each call.
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client {
            timeout,
            ..self.clone()
        }
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        tokio::time::timeout(self.timeout, self.tx.send(make(tx)))
            .await
            .map_err(|_| NetError::Timeout(self.timeout))?
            .map_err(|_| NetError::Closed)?;
        tokio::time::timeout(self.timeout, rx)
            .await
            .map_err(|_| NetError::Timeout(self.timeout))?
            .map_err(|_| NetError::Closed)?
    }

    /// Listens on another address.
    pub async fn listen(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.call(|r| Command::Listen(addr, r)).await
    }

    /// Dials an address (with or without `/p2p/<peer>`); resolves when connected.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.call(|r| Command::Dial(addr, r)).await
    }

    /// The addresses this node listens on (with `/p2p/<peer id>`).
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        self.call(Command::ListenAddrs).await
    }

    /// Peers with an open connection.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, NetError> {
        self.call(Command::ConnectedPeers).await
    }

    /// Runs a Kademlia bootstrap (refreshes the routing table).
    pub async fn bootstrap(&self) -> Result<(), NetError> {
        self.call(Command::Bootstrap).await
    }

    /// Publishes bytes on a topic as they are, without local checks (our own records are
    /// checked by the caller; tests use this to play a misbehaving peer).
    pub async fn publish_raw(&self, topic: Topic, data: Vec<u8>) -> Result<(), NetError> {
        self.call(|r| Command::Publish(topic, data, r)).await
    }

    /// Blocks a peer (`true`: its connections are closed and no new one is made or accepted)
    /// or unblocks it.
    pub async fn block_peer(&self, peer: PeerId, blocked: bool) -> Result<(), NetError> {
        self.call(|r| Command::Block(peer, blocked, r)).await
    }

    /// Reports the outcome of validating a gossip message held back for verification.
    /// Returns false if gossipsub no longer holds the message.
    pub async fn report(
        &self,
        id: MessageId,
        source: PeerId,
        acceptance: MessageAcceptance,
    ) -> Result<bool, NetError> {
        self.call(|r| Command::Report(id, source, acceptance, r))
            .await
    }

    /// Validates a record as every peer would, stores it locally and puts it at the closest
    /// peers.
    pub async fn put_record(&self, key: RecordKey, value: Vec<u8>) -> Result<(), NetError> {
        self.call(|r| Command::PutRecord(key, value, r)).await
    }

    /// Puts any bytes under any key at the closest peers, unchecked. Only for tests that play a
    /// misbehaving peer.
    #[doc(hidden)]
    pub async fn put_record_raw(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), NetError> {
        self.call(|r| Command::PutRaw(key, value, r)).await
    }

    /// Looks a record up; every result is validated and the best valid one is returned.
    pub async fn get_record(&self, key: RecordKey) -> Result<Option<Vec<u8>>, NetError> {
        self.call(|r| Command::GetRecord(key, r)).await
    }

    /// The record held in the local DHT store, if any.
    pub async fn local_record(&self, key: RecordKey) -> Result<Option<Vec<u8>>, NetError> {
        self.call(|r| Command::LocalRecord(key, r)).await
    }

    /// Announces this node as a provider of `key`.
    pub async fn provide(&self, key: ProviderKey) -> Result<(), NetError> {
        self.call(|r| Command::Provide(key, r)).await
    }

    /// Stops providing `key`: the local provider record is removed and no longer republished
    /// (copies at other peers live until their TTL).
    pub async fn stop_providing(&self, key: ProviderKey) -> Result<(), NetError> {
        self.call(|r| Command::StopProviding(key, r)).await
    }

    /// Whether this node provides `key` (and so republishes it).
    pub async fn providing(&self, key: ProviderKey) -> Result<bool, NetError> {
        self.call(|r| Command::Providing(key, r)).await
    }

    /// The providers of `key` found on the DHT (this node included when it provides it).
    pub async fn providers(&self, key: ProviderKey) -> Result<Vec<PeerId>, NetError> {
        self.call(|r| Command::GetProviders(key, r)).await
    }

    /// The gossipsub score of a peer.
    pub async fn peer_score(&self, peer: PeerId) -> Result<Option<f64>, NetError> {
        self.call(|r| Command::PeerScore(peer, r)).await
    }

    /// The agent string a connected peer sent with identify (`btm-node/0.1.0` for ours), cut to
    /// [`crate::limits::MAX_AGENT_LEN`] bytes with control characters dropped. Untrusted:
    /// any peer can send any text.
    pub async fn peer_agent(&self, peer: PeerId) -> Result<Option<String>, NetError> {
        self.call(|r| Command::PeerAgent(peer, r)).await
    }

    /// What the DHT record store holds and has evicted.
    pub async fn store_stats(&self) -> Result<crate::record_store::StoreStats, NetError> {
        self.call(Command::StoreStats).await
    }

    /// Gossip peers and how many of this network's topics each is subscribed to.
    pub async fn gossip_peers(&self) -> Result<Vec<(PeerId, usize)>, NetError> {
        self.call(Command::GossipPeers).await
    }

    /// The peers in the Kademlia routing table.
    pub async fn routing_table(&self) -> Result<Vec<PeerId>, NetError> {
        self.call(Command::RoutingTable).await
    }

    /// The trusted root and registry.
    pub async fn trusted(&self) -> Result<Trusted, NetError> {
        self.call(Command::Trusted).await
    }

    /// Offers a registry envelope to the rules; an accepted one becomes trusted (persisted),
    /// is stored on the DHT and gossiped.
    pub async fn offer_registry(
        &self,
        bytes: Vec<u8>,
    ) -> Result<Decision<Signed<Registry>>, NetError> {
        self.call(|r| Command::OfferRegistry(bytes, r)).await
    }

    /// Offers the next root (a rotation) to the rules; an accepted one becomes trusted
    /// (persisted), is stored on the DHT under its version and gossiped.
    pub async fn offer_root(&self, bytes: Vec<u8>) -> Result<Decision<Signed<Root>>, NetError> {
        self.call(|r| Command::OfferRoot(bytes, r)).await
    }

    /// Stops the event loop.
    pub async fn shutdown(&self) -> Result<(), NetError> {
        self.call(Command::Shutdown).await
    }
}

/// What the event loop hands to the node's worker.
#[derive(Debug)]
pub enum Event {
    /// An ELM record passed the cheap checks and awaits full verification. `message` is the
    /// gossip message to accept or reject once verified (None when it came from the DHT).
    ElmOffered {
        envelope: Box<Signed<btm_protocol::ElmRecord>>,
        bytes: Vec<u8>,
        message: Option<(MessageId, PeerId)>,
    },
    /// An attestation named an ELM record we do not hold.
    UnknownElm(ContentId),
}

/// This node's verdict on an ELM, as observers hear it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VerdictReport {
    /// The ELM record.
    pub elm: ContentId,
    /// Whether this node accepts it.
    pub accepted: bool,
    /// The perplexity this node measured, when it scored the ELM.
    pub measured_ppl: Option<f64>,
    /// Why (a rejection's reason, or how an acceptance was reached).
    pub reason: String,
}

impl VerdictReport {
    /// The outcome in words: "accepted, perplexity 12.34", "accepted (why)" or "rejected: why".
    pub fn outcome(&self) -> String {
        match (self.accepted, self.measured_ppl) {
            (true, Some(p)) => format!("accepted, perplexity {p:.2}"),
            (true, None) => format!("accepted ({})", self.reason),
            (false, _) => format!("rejected: {}", self.reason),
        }
    }
}

/// What happened, for observers (tests, the CLI's progress output). Lossy: a slow observer
/// misses events rather than slowing the node.
#[derive(Debug, Clone)]
pub enum Observed {
    /// A peer connected.
    Connected(PeerId),
    /// A registry became trusted.
    Registry { version: u64 },
    /// A root became trusted (a rotation).
    Root { version: u64 },
    /// A claim was accepted and stored.
    Claim {
        domain: String,
        node: btm_protocol::NodeId,
        lease_expires: u64,
    },
    /// An ELM record passed the cheap checks and was queued for verification.
    ElmQueued(ContentId),
    /// A verification started (its weights are fetched, then scored).
    Verifying(ContentId),
    /// A verification finished.
    Verdict(VerdictReport),
    /// An attestation was stored.
    Attestation {
        elm: ContentId,
        verifier: btm_protocol::NodeId,
        accepted: bool,
    },
    /// A registry proposal passed the relay checks (every signature a trusted maintainer's,
    /// newer than the trusted registry): for maintainers to co-sign.
    Proposal(Signed<btm_protocol::Registry>),
    /// Something a peer sent was refused.
    Refused {
        what: &'static str,
        from: Option<PeerId>,
        reason: String,
    },
}

impl Observed {
    /// A claim was accepted into the store.
    pub(crate) fn claim(c: &btm_protocol::Claim) -> Observed {
        Observed::Claim {
            domain: c.domain.clone(),
            node: c.node,
            lease_expires: c.lease_expires,
        }
    }

    /// An attestation was accepted into the store.
    pub(crate) fn attestation(a: &btm_protocol::Attestation) -> Observed {
        Observed::Attestation {
            elm: a.elm,
            verifier: a.verifier,
            accepted: a.verdict == btm_protocol::Verdict::Accept,
        }
    }
}
