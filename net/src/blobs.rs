//! The data plane: an iroh endpoint (relays and address lookup disabled, direct addresses only)
//! serving an iroh-blobs file store in the data directory. Blobs are addressed by BLAKE3 (the
//! protocol's content ids are iroh-blobs hashes); downloads are verified chunk by chunk as they
//! stream (bao), resume from what is already stored, and are retried from other providers with
//! per-peer error budgets and timeouts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use btm_protocol::{ContentId, NodeId};
use futures::StreamExt;
pub use iroh::RelayUrl;
use iroh::endpoint::presets;
use iroh::protocol::Router;
use iroh::{Endpoint, EndpointAddr, TransportAddr};
use iroh_blobs::api::blobs::BlobStatus;
use iroh_blobs::api::remote::GetProgressItem;
use iroh_blobs::store::fs::FsStore;
use iroh_blobs::store::fs::options::Options;
use iroh_blobs::store::{GcConfig, ProtectOutcome};
use iroh_blobs::{BlobsProtocol, Hash};
pub use rustls_pki_types::CertificateDer;

use crate::identity::{Identity, endpoint_id_of};
use crate::limits::ErrorBudget;

/// The longest opening the store or binding the endpoint may take.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest each step of [`Blobs::shutdown`] may take before it is abandoned.
pub const SHUTDOWN_STEP: Duration = Duration::from_secs(5);

/// Reads the PEM certificates in `path` (trust anchors of a self-hosted relay).
pub fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, BlobError> {
    use rustls_pki_types::pem::PemObject;
    let bad = |e: String| BlobError::Start(format!("relay certificates {}: {e}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

/// Limits of the data plane.
#[derive(Debug, Clone)]
pub struct BlobConfig {
    /// Where the iroh endpoint binds (UDP).
    pub bind: SocketAddr,
    /// iroh relays to use (for nodes behind NAT); none by default: direct addresses only.
    pub relays: Vec<RelayUrl>,
    /// Extra trust anchors for the relays' TLS certificates (a self-hosted relay), on top of
    /// the built-in web PKI roots.
    pub relay_roots: Vec<CertificateDer<'static>>,
    /// Time to connect to one provider.
    pub connect_timeout: Duration,
    /// Longest time one transfer attempt may take.
    pub transfer_timeout: Duration,
    /// Longest time one blob's download may take over all its attempts: providers that
    /// trickle just fast enough to dodge the stall timeout cannot hold it longer.
    pub blob_deadline: Duration,
    /// Longest time without progress before an attempt is abandoned (a stalled peer).
    pub stall_timeout: Duration,
    /// Failed attempts a provider may have outstanding before we stop asking it.
    pub peer_error_budget: u32,
    /// One failed attempt is forgiven every this long (a restarted peer is asked again).
    pub peer_error_forgive: Duration,
    /// Largest blob we download.
    pub max_blob_bytes: u64,
    /// Most providers tried for one blob.
    pub max_attempts: usize,
    /// How often the store deletes blobs no tag keeps ([`Blobs::forget`], partial downloads
    /// nobody is resuming). Downloads in progress are protected.
    pub gc_interval: Duration,
}

impl Default for BlobConfig {
    fn default() -> Self {
        BlobConfig {
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            relays: Vec::new(),
            relay_roots: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            transfer_timeout: Duration::from_secs(600),
            blob_deadline: Duration::from_secs(1800),
            stall_timeout: Duration::from_secs(30),
            peer_error_budget: 3,
            peer_error_forgive: Duration::from_secs(600),
            max_blob_bytes: btm_model::weights::MAX_FILE_BYTES,
            max_attempts: 8,
            gc_interval: Duration::from_secs(600),
        }
    }
}

/// A node that may serve a blob: its id and its direct addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    pub node: NodeId,
    pub addrs: Vec<SocketAddr>,
    /// Relays the node can be reached through (its address record's relay URLs).
    pub relays: Vec<RelayUrl>,
}

impl Provider {
    /// A provider reachable at direct addresses only.
    pub fn direct(node: NodeId, addrs: Vec<SocketAddr>) -> Provider {
        Provider {
            node,
            addrs,
            relays: Vec::new(),
        }
    }
}

/// Why a blob operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// The endpoint or the store could not be started.
    #[error("blob endpoint: {0}")]
    Start(String),
    /// The local store failed.
    #[error("blob store: {0}")]
    Store(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The blob is not (completely) stored here.
    #[error("blob {0} is not stored here")]
    Missing(ContentId),
    /// The blob is larger than allowed.
    #[error("blob {id} is larger than {max} bytes")]
    TooLarge { id: ContentId, max: u64 },
    /// This node could not store what it received (a full disk, an I/O error): not the
    /// provider's fault, and no other provider would do better.
    #[error("could not store {id} here: {why}")]
    Local { id: ContentId, why: String },
    /// Every provider failed; the last error of each is listed.
    #[error("could not download {id}: {}", describe(.attempts))]
    Download {
        id: ContentId,
        attempts: Vec<(NodeId, String)>,
    },
}

/// Below this many free bytes the store's disk counts as full.
const LOW_DISK: u64 = 1 << 20;

/// Free bytes (for an unprivileged user) on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Marks an attempt's error as this node's own failure (see [`BlobError::Local`]).
const LOCAL: &str = "local: ";

/// An error and its sources, each said once ("local failure: writing ...: No space left on
/// device (os error 28)").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}

fn describe(attempts: &[(NodeId, String)]) -> String {
    if attempts.is_empty() {
        return "no usable provider".into();
    }
    attempts
        .iter()
        .map(|(n, e)| format!("{}: {e}", &n.to_string()[..8]))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What a successful download did.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The provider that completed it (`None` if it was already stored).
    pub from: Option<NodeId>,
    /// Payload bytes received in the successful attempt.
    pub bytes: u64,
    pub elapsed: Duration,
    /// Failed attempts before it.
    pub failures: Vec<(NodeId, String)>,
}

/// Provider events for get requests (push stays disabled, as by default): a task adds the
/// bytes of every transfer that ends to `served`. It ends when the router drops the sender.
fn count_served(
    served: Arc<std::sync::atomic::AtomicU64>,
) -> iroh_blobs::provider::events::EventSender {
    use iroh_blobs::provider::events::{
        EventMask, EventSender, ProviderMessage, RequestMode, RequestUpdate,
    };
    let mask = EventMask {
        get: RequestMode::NotifyLog,
        get_many: RequestMode::NotifyLog,
        ..EventMask::DEFAULT
    };
    let (sender, mut rx) = EventSender::channel(64, mask);
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let mut updates = match msg {
                ProviderMessage::GetRequestReceivedNotify(m) => m.rx,
                ProviderMessage::GetManyRequestReceivedNotify(m) => m.rx,
                _ => continue,
            };
            let served = served.clone();
            tokio::spawn(async move {
                while let Ok(Some(update)) = updates.recv().await {
                    let stats = match update {
                        RequestUpdate::Completed(c) => c.stats,
                        RequestUpdate::Aborted(a) => a.stats,
                        _ => continue,
                    };
                    served.fetch_add(
                        stats.payload_bytes_sent + stats.other_bytes_sent,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
            });
        }
    });
    sender
}

/// The node's blob endpoint and store.
#[derive(Clone)]
pub struct Blobs {
    inner: Arc<Inner>,
}

struct Inner {
    router: Router,
    store: FsStore,
    /// The store's directory (its disk's free space tells a full disk from a bad provider).
    dir: PathBuf,
    config: BlobConfig,
    /// Failed attempts per provider, forgiven over time.
    errors: Mutex<ErrorBudget<NodeId>>,
    /// Bytes received on download connections.
    received: std::sync::atomic::AtomicU64,
    /// Bytes sent to peers that downloaded from us (payload and verification hashes of every
    /// transfer that ended, completed or aborted).
    served: Arc<std::sync::atomic::AtomicU64>,
    /// Blobs being downloaded now: kept by the garbage collector until they are complete and
    /// tagged, or abandoned.
    in_flight: InFlight,
    /// Bytes received so far by the current attempt of each download in progress.
    progress: Progress,
}

type Progress = Arc<Mutex<HashMap<Hash, u64>>>;

type InFlight = Arc<Mutex<HashMap<Hash, usize>>>;

/// Marks a blob as being downloaded for as long as it lives.
struct Downloading {
    set: InFlight,
    progress: Progress,
    hash: Hash,
}

impl Downloading {
    fn new(set: &InFlight, progress: &Progress, hash: Hash) -> Downloading {
        if let Ok(mut m) = set.lock() {
            *m.entry(hash).or_default() += 1;
        }
        Downloading {
            set: set.clone(),
            progress: progress.clone(),
            hash,
        }
    }
}

impl Drop for Downloading {
    fn drop(&mut self) {
        if let Ok(mut m) = self.set.lock()
            && let Some(n) = m.get_mut(&self.hash)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.hash);
                if let Ok(mut p) = self.progress.lock() {
                    p.remove(&self.hash);
                }
            }
        }
    }
}

/// The garbage collector of the store: every `interval` it deletes the blobs that no tag keeps,
/// except those being downloaded (`in_flight`). If the set cannot be read, the run is skipped.
fn gc_config(interval: Duration, in_flight: InFlight) -> GcConfig {
    GcConfig {
        interval,
        add_protected: Some(Arc::new(move |live| {
            let now: Option<Vec<Hash>> = in_flight.lock().ok().map(|m| m.keys().copied().collect());
            Box::pin(async move {
                match now {
                    Some(hashes) => {
                        live.extend(hashes);
                        ProtectOutcome::Continue
                    }
                    None => ProtectOutcome::Abort,
                }
            })
        })),
    }
}

impl std::fmt::Debug for Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blobs")
            .field("id", &self.inner.router.endpoint().id())
            .finish_non_exhaustive()
    }
}

fn hash(id: &ContentId) -> Hash {
    Hash::from(*id.as_bytes())
}

impl Blobs {
    /// Opens the file store in `dir` and binds the endpoint with the node's key.
    pub async fn open(
        dir: &Path,
        identity: &Identity,
        config: BlobConfig,
    ) -> Result<Blobs, BlobError> {
        std::fs::create_dir_all(dir).map_err(|source| BlobError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let in_flight = InFlight::default();
        let mut options = Options::new(dir);
        options.gc = Some(gc_config(config.gc_interval, in_flight.clone()));
        let store = tokio::time::timeout(
            START_TIMEOUT,
            FsStore::load_with_opts(dir.join("blobs.db"), options),
        )
        .await
        .map_err(|_| {
            BlobError::Start(format!(
                "store in {}: not open after {START_TIMEOUT:?} (is another process using it?)",
                dir.display()
            ))
        })?
        .map_err(|e| BlobError::Start(format!("store in {}: {e}", dir.display())))?;
        let relay_mode = if config.relays.is_empty() {
            iroh::RelayMode::Disabled
        } else {
            iroh::RelayMode::Custom(config.relays.iter().cloned().collect())
        };
        let mut builder = Endpoint::builder(presets::Minimal)
            .secret_key(identity.iroh_secret())
            .relay_mode(relay_mode);
        if !config.relay_roots.is_empty() {
            builder = builder.ca_tls_config(
                iroh::tls::CaTlsConfig::embedded().with_extra_roots(config.relay_roots.clone()),
            );
        }
        let bound = builder
            .clear_address_lookup()
            .clear_ip_transports()
            .bind_addr(config.bind)
            .map_err(|e| BlobError::Start(format!("bind address {}: {e}", config.bind)))?
            .alpns(vec![iroh_blobs::ALPN.to_vec()]);
        let endpoint = tokio::time::timeout(START_TIMEOUT, bound.bind())
            .await
            .map_err(|_| BlobError::Start(format!("endpoint: not bound after {START_TIMEOUT:?}")))?
            .map_err(|e| BlobError::Start(format!("endpoint: {e}")))?;
        let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let blobs = BlobsProtocol::new(&store, Some(count_served(served.clone())));
        let router = Router::builder(endpoint)
            .accept(iroh_blobs::ALPN, blobs)
            .spawn();
        let errors = Mutex::new(ErrorBudget::new(
            config.peer_error_budget,
            config.peer_error_forgive,
            10_000,
        ));
        let blobs = Blobs {
            inner: Arc::new(Inner {
                router,
                store,
                dir: dir.to_path_buf(),
                config,
                errors,
                received: std::sync::atomic::AtomicU64::new(0),
                served,
                in_flight,
                progress: Progress::default(),
            }),
        };
        blobs.sweep_orphans().await;
        Ok(blobs)
    }

    /// The direct addresses peers can dial.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let ep = self.inner.router.endpoint();
        let mut out: Vec<SocketAddr> = ep
            .addr()
            .addrs
            .iter()
            .filter_map(|a| match a {
                TransportAddr::Ip(s) => Some(*s),
                _ => None,
            })
            .collect();
        if out.is_empty() {
            out = ep
                .bound_sockets()
                .into_iter()
                .filter(|s| !s.ip().is_unspecified())
                .collect();
        }
        out.sort();
        out.dedup();
        out.truncate(crate::addr::MAX_ADDRS);
        out
    }

    /// The relays peers can reach this node through: its home relay once connected, else the
    /// configured ones. Empty without relays.
    pub fn relay_urls(&self) -> Vec<RelayUrl> {
        if self.inner.config.relays.is_empty() {
            return Vec::new();
        }
        let home: Vec<RelayUrl> = self
            .inner
            .router
            .endpoint()
            .addr()
            .relay_urls()
            .cloned()
            .collect();
        if home.is_empty() {
            self.inner.config.relays.clone()
        } else {
            home
        }
    }

    /// Waits (at most `within`) until the endpoint is connected to its home relay; true at
    /// once without relays.
    pub async fn wait_relay(&self, within: Duration) -> bool {
        if self.inner.config.relays.is_empty() {
            return true;
        }
        tokio::time::timeout(within, self.inner.router.endpoint().online())
            .await
            .is_ok()
    }

    /// Adds bytes; returns their content id. The blob is kept (named tag `btm/<id>`).
    pub async fn add_bytes(&self, bytes: impl Into<bytes::Bytes>) -> Result<ContentId, BlobError> {
        let bytes: bytes::Bytes = bytes.into();
        let id = ContentId::of(&bytes);
        self.inner
            .store
            .add_bytes(bytes)
            .with_named_tag(format!("btm/{id}"))
            .await
            .map_err(|e| BlobError::Store(e.to_string()))?;
        self.commit().await?;
        Ok(id)
    }

    /// Commits the store's pending writes to disk. The store batches its database writes; a
    /// blob is reported added or downloaded only once they are committed, so a node killed
    /// right after does not lose it (found by the SIGKILL test: without this, a blob added
    /// just before the kill was missing after the restart).
    async fn commit(&self) -> Result<(), BlobError> {
        self.inner
            .store
            .sync_db()
            .await
            .map_err(|e| BlobError::Store(format!("committing to disk: {e}")))
    }

    /// Adds a file (copied into the store); returns its content id.
    pub async fn add_path(&self, path: &Path) -> Result<ContentId, BlobError> {
        let abs = std::path::absolute(path).map_err(|source| BlobError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let haf = self
            .inner
            .store
            .add_path(&abs)
            .temp_tag()
            .await
            .map_err(|e| BlobError::Store(format!("{}: {e}", path.display())))?;
        let id = ContentId(*haf.hash().as_bytes());
        self.inner
            .store
            .tags()
            .set(format!("btm/{id}"), haf.hash_and_format())
            .await
            .map_err(|e| BlobError::Store(e.to_string()))?;
        self.commit().await?;
        Ok(id)
    }

    /// Removes download files the store's database does not know. On a full disk a data file
    /// is written but the entry naming it is never committed, so the collector (which works
    /// from the database) would never free those bytes: the disk stayed full across restarts
    /// (found by the full-disk test). Run when the store opens, before anything is added.
    async fn sweep_orphans(&self) {
        let data = self.inner.dir.join("data");
        let Ok(entries) = std::fs::read_dir(&data) else {
            return;
        };
        let mut freed = 0u64;
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name
                .split_once('.')
                .and_then(|(hex, _)| hex.parse::<ContentId>().ok())
            else {
                continue;
            };
            if matches!(self.status(&id).await, Ok(BlobStatus::NotFound)) {
                let len = e.metadata().map_or(0, |m| m.len());
                match std::fs::remove_file(e.path()) {
                    Ok(()) => freed += len,
                    Err(err) => {
                        tracing::warn!(path = %e.path().display(), error = %err, "removing an orphaned download file");
                    }
                }
            }
        }
        if freed > 0 {
            tracing::info!(
                bytes = freed,
                "removed download files the store did not record"
            );
        }
    }

    /// Tags the blob `btm/<id>` so the garbage collector keeps it.
    async fn keep(&self, id: &ContentId) -> Result<(), BlobError> {
        self.inner
            .store
            .tags()
            .set(format!("btm/{id}"), hash(id))
            .await
            .map_err(|e| BlobError::Store(e.to_string()))?;
        self.commit().await
    }

    /// Drops the tag that keeps the blob: the garbage collector deletes its bytes on its next
    /// run (every [`BlobConfig::gc_interval`]) unless a download or [`Blobs::add_bytes`] keeps
    /// it again first. Rejected weights are forgotten this way.
    pub async fn forget(&self, id: &ContentId) -> Result<(), BlobError> {
        self.inner
            .store
            .tags()
            .delete(format!("btm/{id}"))
            .await
            .map(|_| ())
            .map_err(|e| BlobError::Store(e.to_string()))
    }

    /// Whether the whole blob is stored here.
    pub async fn has(&self, id: &ContentId) -> bool {
        matches!(
            self.inner.store.blobs().status(hash(id)).await,
            Ok(BlobStatus::Complete { .. })
        )
    }

    /// How the blob is stored here.
    pub async fn status(&self, id: &ContentId) -> Result<BlobStatus, BlobError> {
        self.inner
            .store
            .blobs()
            .status(hash(id))
            .await
            .map_err(|e| BlobError::Store(e.to_string()))
    }

    /// Reads a whole stored blob of at most `max` bytes.
    pub async fn read(&self, id: &ContentId, max: u64) -> Result<Vec<u8>, BlobError> {
        match self.status(id).await? {
            BlobStatus::Complete { size } if size > max => {
                Err(BlobError::TooLarge { id: *id, max })
            }
            BlobStatus::Complete { .. } => self
                .inner
                .store
                .blobs()
                .get_bytes(hash(id))
                .await
                .map(|b| b.to_vec())
                .map_err(|e| BlobError::Store(e.to_string())),
            _ => Err(BlobError::Missing(*id)),
        }
    }

    /// Copies a stored blob to a file.
    pub async fn export(&self, id: &ContentId, path: &Path) -> Result<(), BlobError> {
        if !self.has(id).await {
            return Err(BlobError::Missing(*id));
        }
        let abs = std::path::absolute(path).map_err(|source| BlobError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        self.inner
            .store
            .blobs()
            .export(hash(id), abs)
            .finish()
            .await
            .map(drop)
            .map_err(|e| BlobError::Store(e.to_string()))
    }

    /// Failed attempts charged to a provider and not yet forgiven.
    pub fn errors_of(&self, node: &NodeId) -> u32 {
        self.inner
            .errors
            .lock()
            .map(|m| m.outstanding(node, Instant::now()))
            .unwrap_or(0)
    }

    fn charge(&self, node: &NodeId) {
        if let Ok(mut m) = self.inner.errors.lock() {
            m.charge(node, Instant::now());
        }
    }

    /// Downloads a blob, trying `providers` in order until one completes it. Every chunk is
    /// verified against `id` as it arrives; a bad chunk ends the attempt and is not stored.
    /// What earlier attempts stored (verified chunks) is kept, so a retry resumes.
    pub async fn fetch(
        &self,
        id: &ContentId,
        providers: &[Provider],
    ) -> Result<Fetched, BlobError> {
        self.fetch_sized(id, None, providers).await
    }

    /// [`BlobStore::fetch`] of a blob whose exact size the caller knows (an ELM record states
    /// its weights' size): each provider is first asked for the blob's last chunk, which proves
    /// the size (BLAKE3 tree); a provider whose blob has another size is refused (and charged)
    /// before a byte of the body is fetched.
    pub async fn fetch_sized(
        &self,
        id: &ContentId,
        size: Option<u64>,
        providers: &[Provider],
    ) -> Result<Fetched, BlobError> {
        let start = Instant::now();
        let _downloading = Downloading::new(&self.inner.in_flight, &self.inner.progress, hash(id));
        if self.has(id).await {
            // Keep it (again, if it was forgotten and the collector has not run yet).
            self.keep(id).await?;
            return Ok(Fetched {
                from: None,
                bytes: 0,
                elapsed: start.elapsed(),
                failures: vec![],
            });
        }
        let cfg = &self.inner.config;
        let me = self.inner.router.endpoint().id();
        let mut failures = Vec::new();
        let deadline = start + cfg.blob_deadline;
        for p in providers.iter().take(cfg.max_attempts) {
            if p.node.as_bytes() == me.as_bytes() {
                continue;
            }
            if Instant::now() >= deadline {
                failures.push((
                    p.node,
                    format!(
                        "not tried: the blob's {:?} deadline passed",
                        cfg.blob_deadline
                    ),
                ));
                continue;
            }
            let spent = self
                .inner
                .errors
                .lock()
                .map(|m| m.spent(&p.node, Instant::now()))
                .unwrap_or(false);
            if spent {
                failures.push((p.node, "error budget spent".to_string()));
                continue;
            }
            match self.attempt(id, size, p, deadline).await {
                Ok(bytes) => {
                    self.keep(id).await?;
                    return Ok(Fetched {
                        from: Some(p.node),
                        bytes,
                        elapsed: start.elapsed(),
                        failures,
                    });
                }
                Err(e) => {
                    if let Some(free) = free_bytes(&self.inner.dir)
                        && free < LOW_DISK
                    {
                        return Err(BlobError::Local {
                            id: *id,
                            why: format!(
                                "the disk holding {} is full ({free} bytes free): free some space and try again (the attempt said: {e})",
                                self.inner.dir.display()
                            ),
                        });
                    }
                    if let Some(why) = e.strip_prefix(LOCAL) {
                        tracing::warn!(blob = %id, error = %why, "could not store a download");
                        return Err(BlobError::Local {
                            id: *id,
                            why: why.to_string(),
                        });
                    }
                    tracing::debug!(blob = %id, provider = %p.node, error = %e, "download attempt failed");
                    self.charge(&p.node);
                    failures.push((p.node, e));
                }
            }
        }
        Err(BlobError::Download {
            id: *id,
            attempts: failures,
        })
    }

    /// One provider, until `deadline` at the latest (the blob's, over all attempts).
    async fn attempt(
        &self,
        id: &ContentId,
        size: Option<u64>,
        p: &Provider,
        deadline: Instant,
    ) -> Result<u64, String> {
        let cfg = &self.inner.config;
        let endpoint_id = endpoint_id_of(&p.node).ok_or("not a valid endpoint id")?;
        if p.addrs.is_empty() && p.relays.is_empty() {
            return Err("no address".into());
        }
        let addr = EndpointAddr::from_parts(
            endpoint_id,
            p.addrs
                .iter()
                .map(|a| TransportAddr::Ip(*a))
                .chain(p.relays.iter().map(|r| TransportAddr::Relay(r.clone()))),
        );
        let conn = tokio::time::timeout(
            cfg.connect_timeout
                .min(deadline.saturating_duration_since(Instant::now())),
            self.inner.router.endpoint().connect(addr, iroh_blobs::ALPN),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
        let result = self.transfer(&conn, id, size, deadline).await;
        let received = conn.stats().udp_rx.bytes;
        self.inner
            .received
            .fetch_add(received, std::sync::atomic::Ordering::Relaxed);
        conn.close(0u32.into(), b"done");
        let bytes = result?;
        if !self.has(id).await {
            return Err("transfer finished but the blob is incomplete".into());
        }
        Ok(bytes)
    }

    /// One download over an open connection: the size proof (when `size` is known), then the
    /// body, each chunk verified as it arrives.
    async fn transfer(
        &self,
        conn: &iroh::endpoint::Connection,
        id: &ContentId,
        size: Option<u64>,
        blob_deadline: Instant,
    ) -> Result<u64, String> {
        let cfg = &self.inner.config;
        // Size before bytes: the last chunk and its proof (a few KiB) show the blob's size.
        if let Some(want) = size {
            let proved = tokio::time::timeout(
                cfg.stall_timeout
                    .min(blob_deadline.saturating_duration_since(Instant::now())),
                iroh_blobs::get::request::get_verified_size(conn, &hash(id)),
            )
            .await
            .map_err(|_| "timed out proving the blob's size".to_string())?
            .map_err(|e| format!("proving the blob's size: {e}"))?;
            if proved.0 != want {
                return Err(format!(
                    "the provider's blob is {} bytes, the announcement says {want}",
                    proved.0
                ));
            }
        }
        let progress = self.inner.store.remote().fetch(conn.clone(), hash(id));
        let mut stream = std::pin::pin!(progress.stream());
        let deadline = blob_deadline.min(Instant::now() + cfg.transfer_timeout);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = left.min(cfg.stall_timeout);
            match tokio::time::timeout(wait, stream.next()).await {
                Err(_) if Instant::now() >= blob_deadline => {
                    return Err(format!(
                        "timed out: the blob's {:?} deadline passed",
                        cfg.blob_deadline
                    ));
                }
                Err(_) => return Err("timed out (stalled or too slow)".to_string()),
                Ok(None) => return Err("transfer ended without a result".to_string()),
                Ok(Some(GetProgressItem::Progress(n))) => {
                    if n > cfg.max_blob_bytes {
                        return Err(format!("more than {} bytes", cfg.max_blob_bytes));
                    }
                    if let Ok(mut p) = self.inner.progress.lock() {
                        p.insert(hash(id), n);
                    }
                }
                Ok(Some(GetProgressItem::Done(stats))) => return Ok(stats.payload_bytes_read),
                Ok(Some(GetProgressItem::Error(e))) => {
                    let local = matches!(e, iroh_blobs::get::GetError::LocalFailure { .. });
                    let chain = error_chain(&e);
                    return Err(if local {
                        format!("{LOCAL}{chain}")
                    } else {
                        chain
                    });
                }
            }
        }
    }

    /// Bytes received on download connections so far (QUIC datagrams, headers included).
    pub fn bytes_received(&self) -> u64 {
        self.inner
            .received
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes the current attempt of a download in progress has received so far (None when the
    /// blob is not being downloaded, or no byte of it has arrived yet).
    pub fn download_progress(&self, id: &ContentId) -> Option<u64> {
        self.inner.progress.lock().ok()?.get(&hash(id)).copied()
    }

    /// Bytes sent to peers downloading from this node so far (payload and verification hashes
    /// of every transfer that ended; one in progress counts when it ends).
    pub fn bytes_served(&self) -> u64 {
        self.inner.served.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the endpoint and flushes the store.
    ///
    /// Each step (router, endpoint, store) gets [`SHUTDOWN_STEP`]; one that takes longer is
    /// abandoned with a warning, so a peer that never acknowledges a close cannot hold the
    /// node's shutdown open.
    pub async fn shutdown(&self) {
        use tokio::time::timeout;
        match timeout(SHUTDOWN_STEP, self.inner.router.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "blob router shutdown"),
            Err(_) => tracing::warn!("blob router did not stop within {SHUTDOWN_STEP:?}"),
        }
        if timeout(SHUTDOWN_STEP, self.inner.router.endpoint().close())
            .await
            .is_err()
        {
            tracing::warn!("blob endpoint did not close within {SHUTDOWN_STEP:?}");
        }
        match timeout(SHUTDOWN_STEP, self.inner.store.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "blob store shutdown"),
            Err(_) => tracing::warn!("blob store did not stop within {SHUTDOWN_STEP:?}"),
        }
    }
}
