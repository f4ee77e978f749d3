//! btm-net: the network of a btm node.
//!
//! - **One identity** ([`identity`]): the node's ed25519 key is its libp2p `PeerId`, its iroh
//!   endpoint id and its record-signing key.
//! - **Control plane** ([`swarm`], [`client`]): libp2p with TCP and QUIC, Noise, yamux,
//!   Kademlia, gossipsub (strict signing, application validation), identify, ping, optional
//!   mDNS. One event loop owns the swarm; everything else holds a cheap [`Client`].
//! - **Records on the DHT** ([`keys`], [`validate`]): registry, seed manifest, claims, ELM
//!   records and blob addresses under `btm/1/<network>/...`, validated on every inbound PUT
//!   and every GET result.
//! - **Data plane** ([`blobs`]): iroh-blobs, BLAKE3-verified streaming, resumable; iroh
//!   relays only when configured.
//! - **Eclipse defences** ([`diversity`]): at most a few routing-table peers per subnet;
//!   Kademlia lookups over disjoint paths.
//! - **Claims** ([`claims`]) and **verification** ([`verify`]) as pure functions.
//! - [`Node`] starts it all. The wire formats are in `specs/network.md`.
//!
//! ```no_run
//! # async fn demo(root: Vec<u8>, registry: Vec<u8>) -> Result<(), btm_net::NodeError> {
//! use btm_net::{Node, NodeConfig};
//! let maintainer = Node::start(NodeConfig::loopback("/tmp/m", root.clone())).await?;
//! let mut cfg = NodeConfig::loopback("/tmp/a", root);
//! cfg.bootstrap = maintainer.listen_addrs().await?;
//! let volunteer = Node::start(cfg).await?;
//! maintainer.publish_registry(&registry).await?;
//! volunteer.sync().await?;
//! let claim = volunteer.claim(None).await?;
//! println!("training {}", claim.record().domain);
//! # Ok(()) }
//! ```

pub mod addr;
pub mod blobs;
pub mod claims;
pub mod client;
pub mod diversity;
mod event_loop;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod keys;
pub mod limits;
pub mod node;
pub mod queue;
pub mod record_store;
pub mod swarm;
pub mod validate;
pub mod verify;

pub use client::{Client, Event, NetError, Observed, VerdictReport};
pub use identity::Identity;
pub use keys::{DhtKey, NetworkId, ProviderKey, RecordKey, Topic};
pub use libp2p;
pub use node::{Node, NodeConfig, NodeError, SyncReport};
