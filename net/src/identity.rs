//! One identity per node: an ed25519 key that is at once its libp2p `PeerId`, its iroh endpoint
//! id and the key that signs its claims, ELM records and attestations.
//!
//! The key lives in `<data dir>/node.key` in the maintainers' key-file format (the 32-byte
//! ed25519 seed as 64 hex digits and a newline, mode 0600), created on first start.

use std::path::{Path, PathBuf};

use btm_protocol::{NodeId, PublicKey, SigningKey};
use libp2p::PeerId;

/// File name of the node key inside the data directory.
pub const KEY_FILE: &str = "node.key";

/// Why the node key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading, creating or protecting the key file failed.
    #[error("node key {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The key file exists but is not a key.
    #[error("node key: {0}")]
    KeyFile(#[from] btm_registry::maintainer::MaintainerError),
}

/// A node's key and the three names derived from it.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node", &self.node_id())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads `<dir>/node.key`, creating the directory and a fresh key (mode 0600) on first start.
    /// A key file readable by others is tightened to 0600.
    pub fn load_or_create(dir: &Path) -> Result<Identity, IdentityError> {
        let path = dir.join(KEY_FILE);
        let io = |source| IdentityError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        if !path.exists() {
            btm_registry::maintainer::generate_key(&path, false)?;
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).map_err(io)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "node key was readable by others; setting mode 0600");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(io)?;
            }
        }
        let key = btm_registry::maintainer::load_key(&path)?;
        Ok(Identity { key })
    }

    /// An identity from a key held in memory (tests, benchmarks).
    pub fn from_key(key: SigningKey) -> Identity {
        Identity { key }
    }

    /// The record-signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// The node id: the ed25519 public key, as records name it.
    pub fn node_id(&self) -> NodeId {
        PublicKey::of(&self.key)
    }

    /// The same key as a libp2p keypair.
    pub fn keypair(&self) -> libp2p::identity::Keypair {
        let mut seed = self.key.to_bytes();
        // `ed25519_from_bytes` zeroes its input; it cannot fail on 32 bytes.
        libp2p::identity::Keypair::ed25519_from_bytes(&mut seed)
            .unwrap_or_else(|_| unreachable!("an ed25519 seed is 32 bytes"))
    }

    /// The libp2p peer id.
    pub fn peer_id(&self) -> PeerId {
        self.keypair().public().to_peer_id()
    }

    /// The same key as an iroh secret key; its public key is the iroh endpoint id.
    pub fn iroh_secret(&self) -> iroh::SecretKey {
        iroh::SecretKey::from_bytes(&self.key.to_bytes())
    }
}

/// The libp2p peer id of a node id.
pub fn peer_id_of(node: &NodeId) -> Option<PeerId> {
    let key = libp2p::identity::ed25519::PublicKey::try_from_bytes(node.as_bytes()).ok()?;
    Some(libp2p::identity::PublicKey::from(key).to_peer_id())
}

/// The node id behind a peer id, when it names an inline ed25519 key (every btm node's does).
pub fn node_id_of(peer: &PeerId) -> Option<NodeId> {
    let mh = libp2p::multihash::Multihash::<64>::from_bytes(&peer.to_bytes()).ok()?;
    if mh.code() != 0 {
        return None;
    }
    let key = libp2p::identity::PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    let ed = key.try_into_ed25519().ok()?;
    Some(PublicKey(ed.to_bytes()))
}

/// The iroh endpoint id of a node id.
pub fn endpoint_id_of(node: &NodeId) -> Option<iroh::EndpointId> {
    iroh::EndpointId::from_bytes(node.as_bytes()).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn one_key_three_names() {
        let id = Identity::from_key(btm_protocol::test_key("node"));
        let node = id.node_id();
        assert_eq!(peer_id_of(&node), Some(id.peer_id()));
        assert_eq!(node_id_of(&id.peer_id()), Some(node));
        assert_eq!(id.iroh_secret().public().as_bytes(), node.as_bytes());
        assert_eq!(endpoint_id_of(&node), Some(id.iroh_secret().public()));
    }

    #[test]
    fn created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path()).unwrap();
        let b = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.node_id(), b.node_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
