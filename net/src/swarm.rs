//! The libp2p swarm: TCP and QUIC with Noise and yamux, Kademlia, gossipsub with strict signing
//! and application validation, identify, ping, optional mDNS, and connection limits.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroUsize;
use std::time::Duration;

use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, Swarm, SwarmBuilder, allow_block_list, connection_limits, gossipsub, identify,
    kad, mdns, noise, ping, tcp, yamux,
};

use crate::identity::Identity;
use crate::keys::{NetworkId, Topic};
use crate::limits::Limits;

/// The Kademlia protocol name of btm networks.
pub const KAD_PROTOCOL: &str = "/btm/kad/1.0.0";
/// The identify protocol version string.
pub const ID_PROTOCOL: &str = "/btm/id/1.0.0";
/// Largest gossip message on the registry topic (a registry envelope).
pub fn registry_message_max() -> usize {
    btm_protocol::max_envelope_size(btm_protocol::Kind::Registry)
}
/// Largest gossip message on the other topics (the largest of claims, ELM records,
/// attestations).
pub fn small_message_max() -> usize {
    btm_protocol::max_envelope_size(btm_protocol::Kind::Elm)
}

/// The swarm's behaviours, polled together by the swarm.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    /// Peers this node refuses to connect with (an operator's block list; partitions in tests).
    pub blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub limits: connection_limits::Behaviour,
    pub kad: kad::Behaviour<crate::record_store::BoundedStore>,
    pub gossipsub: gossipsub::Behaviour,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
}

/// Settings of the control plane.
#[derive(Debug, Clone)]
pub struct SwarmConfig {
    pub mdns: bool,
    pub limits: Limits,
    /// Kademlia query timeout.
    pub query_timeout: Duration,
    /// Gossipsub heartbeat.
    pub heartbeat: Duration,
    /// How long an ELM record may wait for its verification before gossipsub forgets it
    /// (it is then not forwarded by us; peers still learn it from the DHT and attestations).
    pub validation_window: Duration,
    /// Connections with no stream are closed after this.
    pub idle_timeout: Duration,
}

impl Default for SwarmConfig {
    fn default() -> Self {
        SwarmConfig {
            mdns: false,
            limits: Limits::default(),
            query_timeout: Duration::from_secs(30),
            heartbeat: Duration::from_millis(700),
            validation_window: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(600),
        }
    }
}

/// Why the swarm could not be built.
#[derive(Debug, thiserror::Error)]
#[error("building the libp2p swarm: {0}")]
pub struct SwarmError(pub String);

fn err(e: impl std::fmt::Display) -> SwarmError {
    SwarmError(e.to_string())
}

fn topic_params() -> gossipsub::TopicScoreParams {
    gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        // Small rewards (the library default of 1 point per millisecond in the mesh would
        // outweigh any penalty within seconds): at most 1 for time in the mesh and 2 for first
        // deliveries per topic, and the positive total is capped by `topic_score_cap`.
        time_in_mesh_weight: 0.1,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 10.0,
        first_message_deliveries_decay: 0.9,
        // Quiet topics: no penalty for a mesh peer that has nothing to deliver.
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        first_message_deliveries_weight: 0.1,
        first_message_deliveries_cap: 20.0,
        // One rejected message costs 10 (scores add (count)^2 x weight): one bad message drops a
        // peer below the gossip threshold (-10), three below the graylist threshold (-80).
        invalid_message_deliveries_weight: -10.0,
        invalid_message_deliveries_decay: 0.99,
        ..Default::default()
    }
}

/// The gossipsub peer-score parameters for this network's topics.
pub fn score_params(net: &NetworkId) -> gossipsub::PeerScoreParams {
    let mut p = gossipsub::PeerScoreParams {
        // Good behaviour can never buy the right to one invalid message (-10).
        topic_score_cap: 5.0,
        // Many honest nodes may share an address (a campus NAT, a local test network).
        ip_colocation_factor_whitelist: HashSet::from([
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]),
        ..Default::default()
    };
    p.topics = Topic::ALL
        .iter()
        .map(|t| {
            (
                gossipsub::IdentTopic::new(t.string(net)).hash(),
                topic_params(),
            )
        })
        .collect::<HashMap<_, _>>();
    p
}

fn gossip_config(net: &NetworkId, cfg: &SwarmConfig) -> Result<gossipsub::Config, SwarmError> {
    let heartbeats = (cfg.validation_window.as_millis() / cfg.heartbeat.as_millis().max(1)).max(5);
    let mut b = gossipsub::ConfigBuilder::default();
    b.validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .heartbeat_interval(cfg.heartbeat)
        .heartbeat_initial_delay(Duration::from_millis(100))
        .history_length(heartbeats as usize)
        .history_gossip(3)
        .duplicate_cache_time(cfg.validation_window.max(Duration::from_secs(60)))
        .max_transmit_size(registry_message_max() + 1024)
        // Content addressing: the same record published twice is one message.
        .message_id_fn(|m: &gossipsub::Message| {
            gossipsub::MessageId::from(blake3::hash(&m.data).as_bytes().to_vec())
        });
    for t in Topic::ALL {
        let max = if matches!(t, Topic::Registry | Topic::Proposals) {
            registry_message_max()
        } else {
            small_message_max()
        } + 1024;
        b.set_topic_max_transmit_size(gossipsub::IdentTopic::new(t.string(net)).hash(), max);
    }
    b.build().map_err(err)
}

/// Builds the swarm for `identity` on network `net`.
pub(crate) fn build(
    identity: &Identity,
    net: &NetworkId,
    cfg: &SwarmConfig,
) -> Result<Swarm<Behaviour>, SwarmError> {
    let keypair = identity.keypair();
    let peer_id = identity.peer_id();
    let limits = cfg.limits.clone();
    let gossip = gossip_config(net, cfg)?;
    let scores = score_params(net);
    let query_timeout = cfg.query_timeout;
    let use_mdns = cfg.mdns;
    let swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(err)?
        .with_quic_config(|mut c| {
            // A dead peer's QUIC dial fails only at the handshake timeout; keep it short so
            // DHT queries that meet one are not held up.
            c.handshake_timeout = Duration::from_secs(3);
            c
        })
        .with_behaviour(|key| {
            let mut kcfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
            kcfg.set_record_filtering(kad::StoreInserts::FilterBoth)
                .set_query_timeout(query_timeout)
                // S/Kademlia: lookups proceed over disjoint paths, so one honest path suffices
                // to find a record even when other paths run through liars (eclipse).
                .disjoint_query_paths(true)
                .set_max_packet_size(registry_message_max() + 4096)
                .set_replication_factor(NonZeroUsize::new(8).unwrap_or(NonZeroUsize::MIN))
                .set_publication_interval(Some(Duration::from_secs(3600)))
                .set_record_ttl(Some(Duration::from_secs(48 * 3600)))
                .set_provider_record_ttl(Some(Duration::from_secs(48 * 3600)));
            let store = crate::record_store::BoundedStore::new(
                peer_id,
                kad::store::MemoryStoreConfig {
                    max_records: limits.max_dht_records,
                    max_value_bytes: registry_message_max(),
                    max_providers_per_key: limits.max_providers_per_key,
                    max_provided_keys: limits.max_provided_keys,
                },
                limits.max_dht_records_per_peer,
            );
            let mut kad = kad::Behaviour::with_config(peer_id, store, kcfg);
            // Loopback and LAN nodes never learn a confirmed external address; answer queries
            // anyway.
            kad.set_mode(Some(kad::Mode::Server));
            let mut gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip,
            )?;
            gossipsub.with_peer_score(scores, gossipsub::PeerScoreThresholds::default())?;
            let mdns = if use_mdns {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    peer_id,
                )?)
            } else {
                None
            };
            Ok(Behaviour {
                blocked: allow_block_list::Behaviour::default(),
                limits: connection_limits::Behaviour::new(
                    connection_limits::ConnectionLimits::default()
                        .with_max_established(Some(limits.max_connections))
                        .with_max_established_per_peer(Some(limits.max_connections_per_peer))
                        .with_max_pending_incoming(Some(limits.max_pending_incoming)),
                ),
                kad,
                gossipsub,
                identify: identify::Behaviour::new(
                    identify::Config::new(ID_PROTOCOL.to_string(), key.public())
                        .with_agent_version(format!("btm-node/{}", env!("CARGO_PKG_VERSION"))),
                ),
                ping: ping::Behaviour::new(ping::Config::new()),
                mdns: Toggle::from(mdns),
            })
        })
        .map_err(err)?
        .with_swarm_config(|c| c.with_idle_connection_timeout(cfg.idle_timeout))
        .build();
    Ok(swarm)
}
