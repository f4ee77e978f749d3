//! The local store: SQLite (WAL, `synchronous=FULL`), schema migrations by `user_version`, and
//! one IMMEDIATE transaction per state change, in which the trusted state is read, the rules
//! decide, and the change is written. A crash or an I/O error rolls the whole change back.

use std::path::{Path, PathBuf};

use btm_protocol::{Attestation, Claim, ContentId, ElmRecord, PublicKey, Registry, Root, Signed};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use crate::rules::{self, Decision, Reject, Trusted};

/// The schema version this code writes.
pub const SCHEMA_VERSION: i64 = 1;
/// Most live claims one node may hold.
pub const MAX_CLAIMS_PER_NODE: usize = 16;
/// Most ELM records stored per trainer.
pub const MAX_ELMS_PER_TRAINER: usize = 256;
/// Most attestations stored per ELM.
pub const MAX_ATTESTATIONS_PER_ELM: usize = 64;
/// Most known peers; the least recently seen are forgotten first.
pub const MAX_PEERS: usize = 10_000;
/// Longest peer address, in bytes.
pub const MAX_PEER_ADDR_LEN: usize = 256;

/// Migration `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE roots (
    version     INTEGER PRIMARY KEY,
    id          BLOB NOT NULL,
    envelope    BLOB NOT NULL,
    accepted_at INTEGER NOT NULL
);
CREATE TABLE registries (
    version     INTEGER PRIMARY KEY,
    id          BLOB NOT NULL,
    envelope    BLOB NOT NULL,
    accepted_at INTEGER NOT NULL
);
-- The one row naming the trusted root and registry. Written in the same transaction as the
-- rows it points to; it never points at a missing or older row.
CREATE TABLE trusted (
    singleton        INTEGER PRIMARY KEY CHECK (singleton = 0),
    root_version     INTEGER NOT NULL REFERENCES roots(version),
    registry_version INTEGER REFERENCES registries(version),
    registry_id      BLOB
);
-- Validly signed records that conflict with a trusted one of the same version.
CREATE TABLE equivocations (
    kind       TEXT NOT NULL,
    version    INTEGER NOT NULL,
    trusted_id BLOB NOT NULL,
    offered_id BLOB NOT NULL,
    envelope   BLOB NOT NULL,
    seen_at    INTEGER NOT NULL,
    PRIMARY KEY (kind, version, offered_id)
);
CREATE TABLE claims (
    domain        TEXT NOT NULL,
    node          BLOB NOT NULL,
    lease_expires INTEGER NOT NULL,
    envelope      BLOB NOT NULL,
    PRIMARY KEY (domain, node)
);
CREATE TABLE elms (
    id          BLOB PRIMARY KEY,
    domain      TEXT NOT NULL,
    trainer     BLOB NOT NULL,
    envelope    BLOB NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE INDEX elms_by_trainer ON elms (trainer);
CREATE INDEX elms_by_domain ON elms (domain);
CREATE TABLE attestations (
    elm      BLOB NOT NULL REFERENCES elms(id),
    verifier BLOB NOT NULL,
    envelope BLOB NOT NULL,
    PRIMARY KEY (elm, verifier)
);
CREATE TABLE peers (
    node      BLOB PRIMARY KEY,
    addr      TEXT NOT NULL,
    last_seen INTEGER NOT NULL
);
CREATE INDEX peers_by_last_seen ON peers (last_seen);
"#];

/// Why the store could not do what was asked. A rejected record is not an error: it is a
/// [`Decision::Reject`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite failed (I/O error, disk full, locked, ...); the transaction was rolled back.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database was written by a newer client.
    #[error("database schema version {found} is newer than this client supports ({supported})")]
    FutureSchema { found: i64, supported: i64 },
    /// A stored row does not decode (tampering or a bug); nothing is trusted from it.
    #[error("stored {what} is corrupt: {reason}")]
    Corrupt { what: &'static str, reason: String },
    /// No root is trusted yet.
    #[error("no trusted root: initialise the store with a root first")]
    NoRoot,
    /// `init_root` on a store that already trusts a root.
    #[error("the store already trusts root v{0}")]
    AlreadyInitialised(u64),
    /// A value that does not fit a column.
    #[error("{0} too large")]
    OutOfRange(&'static str),
}

/// One recorded equivocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Equivocation {
    /// `"root"` or `"registry"`.
    pub kind: String,
    pub version: u64,
    pub trusted: ContentId,
    pub offered: ContentId,
}

/// A known peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub node: PublicKey,
    pub addr: String,
    pub last_seen: u64,
}

/// The node's SQLite database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

fn version_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::OutOfRange("version"))
}

/// Timestamps are compared in Rust on decoded records; the column only orders and prunes, so it
/// saturates.
fn time_i64(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

fn corrupt(what: &'static str) -> impl Fn(btm_protocol::DecodeError) -> StoreError {
    move |e| StoreError::Corrupt {
        what,
        reason: e.to_string(),
    }
}

fn id_of(bytes: Vec<u8>, what: &'static str) -> Result<ContentId, StoreError> {
    <[u8; 32]>::try_from(bytes)
        .map(ContentId)
        .map_err(|_| StoreError::Corrupt {
            what,
            reason: "id is not 32 bytes".into(),
        })
}

fn load_trusted(conn: &Connection) -> Result<Option<Trusted>, StoreError> {
    let row: Option<(i64, Option<i64>)> = conn
        .query_row(
            "SELECT root_version, registry_version FROM trusted WHERE singleton = 0",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((root_version, registry_version)) = row else {
        return Ok(None);
    };
    let root_bytes: Vec<u8> = conn.query_row(
        "SELECT envelope FROM roots WHERE version = ?1",
        [root_version],
        |r| r.get(0),
    )?;
    let root = Signed::<Root>::decode(&root_bytes).map_err(corrupt("root"))?;
    let registry = match registry_version {
        None => None,
        Some(v) => {
            let bytes: Vec<u8> = conn.query_row(
                "SELECT envelope FROM registries WHERE version = ?1",
                [v],
                |r| r.get(0),
            )?;
            Some(Signed::<Registry>::decode(&bytes).map_err(corrupt("registry"))?)
        }
    };
    Ok(Some(Trusted { root, registry }))
}

fn record_equivocation(
    tx: &Transaction<'_>,
    kind: &str,
    reject: &Reject,
    envelope: &[u8],
    now: u64,
) -> Result<(), StoreError> {
    if let Reject::Equivocation {
        version,
        trusted,
        offered,
    } = reject
    {
        tx.execute(
            "INSERT OR IGNORE INTO equivocations (kind, version, trusted_id, offered_id, envelope, seen_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![kind, version_i64(*version)?, &trusted.0[..], &offered.0[..], envelope, time_i64(now)],
        )?;
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        let path = path.as_ref().to_path_buf();
        let mut conn = Connection::open(&path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        migrate(&mut conn)?;
        Ok(Store { conn, path })
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self) -> Result<Transaction<'_>, StoreError> {
        Ok(self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?)
    }

    /// The trusted root and registry, if a root has been installed.
    pub fn trusted(&self) -> Result<Option<Trusted>, StoreError> {
        load_trusted(&self.conn)
    }

    /// Installs the first root (shipped with the client or given by the operator). It must be
    /// signed by a threshold of its own keys.
    pub fn init_root(
        &mut self,
        bytes: &[u8],
        now: u64,
    ) -> Result<Decision<Signed<Root>>, StoreError> {
        let tx = self.write()?;
        if let Some(t) = load_trusted(&tx)? {
            return Err(StoreError::AlreadyInitialised(t.root.record().version));
        }
        let decision = rules::decide_initial_root(bytes);
        if let Decision::Accept(root) = &decision {
            let v = version_i64(root.record().version)?;
            tx.execute(
                "INSERT INTO roots (version, id, envelope, accepted_at) VALUES (?1, ?2, ?3, ?4)",
                params![v, &root.id().0[..], bytes, time_i64(now)],
            )?;
            tx.execute(
                "INSERT INTO trusted (singleton, root_version) VALUES (0, ?1)",
                [v],
            )?;
        }
        tx.commit()?;
        Ok(decision)
    }

    /// Offers the next root (rotation). See [`rules::decide_root`].
    pub fn update_root(
        &mut self,
        bytes: &[u8],
        now: u64,
    ) -> Result<Decision<Signed<Root>>, StoreError> {
        let tx = self.write()?;
        let trusted = load_trusted(&tx)?.ok_or(StoreError::NoRoot)?;
        let decision = rules::decide_root(&trusted.root, bytes);
        match &decision {
            Decision::Accept(root) => {
                let v = version_i64(root.record().version)?;
                tx.execute(
                    "INSERT INTO roots (version, id, envelope, accepted_at) VALUES (?1, ?2, ?3, ?4)",
                    params![v, &root.id().0[..], bytes, time_i64(now)],
                )?;
                tx.execute(
                    "UPDATE trusted SET root_version = ?1 WHERE singleton = 0",
                    [v],
                )?;
            }
            Decision::Reject(r) => record_equivocation(&tx, "root", r, bytes, now)?,
            Decision::Unchanged => {}
        }
        tx.commit()?;
        Ok(decision)
    }

    /// The accepted roots, oldest first (envelopes): the chain a node that trusts an older
    /// root walks to reach the current one.
    pub fn roots(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT envelope FROM roots ORDER BY version")?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Offers a registry. See [`rules::decide_registry`]. An equivocation is recorded as
    /// evidence (see [`Store::equivocations`]); the trusted registry stays.
    pub fn update_registry(
        &mut self,
        bytes: &[u8],
        now: u64,
    ) -> Result<Decision<Signed<Registry>>, StoreError> {
        let tx = self.write()?;
        let trusted = load_trusted(&tx)?.ok_or(StoreError::NoRoot)?;
        let decision = rules::decide_registry(&trusted, bytes, now);
        match &decision {
            Decision::Accept(registry) => {
                let v = version_i64(registry.record().version)?;
                let id = registry.id();
                tx.execute(
                    "INSERT INTO registries (version, id, envelope, accepted_at) VALUES (?1, ?2, ?3, ?4)",
                    params![v, &id.0[..], bytes, time_i64(now)],
                )?;
                tx.execute(
                    "UPDATE trusted SET registry_version = ?1, registry_id = ?2 WHERE singleton = 0",
                    params![v, &id.0[..]],
                )?;
            }
            Decision::Reject(r) => record_equivocation(&tx, "registry", r, bytes, now)?,
            Decision::Unchanged => {}
        }
        tx.commit()?;
        Ok(decision)
    }

    /// The equivocations seen so far.
    pub fn equivocations(&self) -> Result<Vec<Equivocation>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT kind, version, trusted_id, offered_id FROM equivocations ORDER BY kind, version")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, Vec<u8>>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (kind, version, trusted, offered) = row?;
            out.push(Equivocation {
                kind,
                version: u64::try_from(version).map_err(|_| StoreError::OutOfRange("version"))?,
                trusted: id_of(trusted, "equivocation")?,
                offered: id_of(offered, "equivocation")?,
            });
        }
        Ok(out)
    }

    /// Stores a claim signed by its node, for a domain of the trusted registry, whose lease has
    /// not ended. A later lease from the same node for the same domain replaces an earlier one.
    pub fn put_claim(
        &mut self,
        bytes: &[u8],
        now: u64,
    ) -> Result<Decision<Signed<Claim>>, StoreError> {
        let tx = self.write()?;
        let decision = match check_claim(&tx, bytes, now)? {
            Err(r) => Decision::Reject(r),
            Ok(None) => Decision::Unchanged,
            Ok(Some(claim)) => {
                let c = claim.record();
                tx.execute(
                    "INSERT OR REPLACE INTO claims (domain, node, lease_expires, envelope) VALUES (?1, ?2, ?3, ?4)",
                    params![c.domain, &c.node.0[..], time_i64(c.lease_expires), bytes],
                )?;
                Decision::Accept(claim)
            }
        };
        tx.commit()?;
        Ok(decision)
    }

    /// The stored claims on `domain` whose lease has not ended at `now`.
    pub fn claims(&self, domain: &str, now: u64) -> Result<Vec<Signed<Claim>>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT envelope FROM claims WHERE domain = ?1 AND lease_expires > ?2 ORDER BY node",
        )?;
        let rows = stmt.query_map(params![domain, time_i64(now)], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(Signed::<Claim>::decode(&row?).map_err(corrupt("claim"))?);
        }
        Ok(out)
    }

    /// Deletes claims whose lease has ended; returns how many.
    pub fn prune_claims(&mut self, now: u64) -> Result<usize, StoreError> {
        let tx = self.write()?;
        let n = tx.execute(
            "DELETE FROM claims WHERE lease_expires <= ?1",
            [time_i64(now)],
        )?;
        tx.commit()?;
        Ok(n)
    }

    /// Stores an ELM record signed by its trainer, for a domain of the trusted registry, with
    /// the seed's architecture and tokenizer.
    pub fn put_elm(
        &mut self,
        bytes: &[u8],
        now: u64,
    ) -> Result<Decision<Signed<ElmRecord>>, StoreError> {
        let tx = self.write()?;
        let decision = match check_elm(&tx, bytes)? {
            Err(r) => Decision::Reject(r),
            Ok(None) => Decision::Unchanged,
            Ok(Some(elm)) => {
                let e = elm.record();
                tx.execute(
                    "INSERT INTO elms (id, domain, trainer, envelope, received_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![&elm.id().0[..], e.domain, &e.trainer.0[..], bytes, time_i64(now)],
                )?;
                Decision::Accept(elm)
            }
        };
        tx.commit()?;
        Ok(decision)
    }

    /// The ELM record with this id.
    pub fn elm(&self, id: &ContentId) -> Result<Option<Signed<ElmRecord>>, StoreError> {
        let bytes: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT envelope FROM elms WHERE id = ?1",
                [&id.0[..]],
                |r| r.get(0),
            )
            .optional()?;
        bytes
            .map(|b| Signed::<ElmRecord>::decode(&b).map_err(corrupt("ELM record")))
            .transpose()
    }

    /// Every ELM record held, oldest first (at most `limit`).
    pub fn elms(&self, limit: usize) -> Result<Vec<Signed<ElmRecord>>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT envelope FROM elms ORDER BY received_at, id LIMIT ?1")?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map([limit], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(Signed::<ElmRecord>::decode(&row?).map_err(corrupt("ELM record"))?);
        }
        Ok(out)
    }

    /// Stores an attestation signed by its verifier, of an ELM record held here. A newer
    /// attestation by the same verifier of the same ELM replaces the old one.
    pub fn put_attestation(
        &mut self,
        bytes: &[u8],
    ) -> Result<Decision<Signed<Attestation>>, StoreError> {
        let tx = self.write()?;
        let decision = match check_attestation(&tx, bytes)? {
            Err(r) => Decision::Reject(r),
            Ok(None) => Decision::Unchanged,
            Ok(Some(att)) => {
                let a = att.record();
                tx.execute(
                    "INSERT OR REPLACE INTO attestations (elm, verifier, envelope) VALUES (?1, ?2, ?3)",
                    params![&a.elm.0[..], &a.verifier.0[..], bytes],
                )?;
                Decision::Accept(att)
            }
        };
        tx.commit()?;
        Ok(decision)
    }

    /// The attestations of an ELM record.
    pub fn attestations(&self, elm: &ContentId) -> Result<Vec<Signed<Attestation>>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT envelope FROM attestations WHERE elm = ?1 ORDER BY verifier")?;
        let rows = stmt.query_map([&elm.0[..]], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(Signed::<Attestation>::decode(&row?).map_err(corrupt("attestation"))?);
        }
        Ok(out)
    }

    /// Records that `node` was seen at `addr`. Keeps at most [`MAX_PEERS`] peers.
    pub fn put_peer(&mut self, node: &PublicKey, addr: &str, now: u64) -> Result<(), StoreError> {
        if addr.len() > MAX_PEER_ADDR_LEN {
            return Err(StoreError::OutOfRange("peer address"));
        }
        let tx = self.write()?;
        tx.execute(
            "INSERT INTO peers (node, addr, last_seen) VALUES (?1, ?2, ?3)
             ON CONFLICT (node) DO UPDATE SET addr = excluded.addr, last_seen = MAX(last_seen, excluded.last_seen)",
            params![&node.0[..], addr, time_i64(now)],
        )?;
        tx.execute(
            "DELETE FROM peers WHERE node IN (SELECT node FROM peers ORDER BY last_seen DESC, node LIMIT -1 OFFSET ?1)",
            [MAX_PEERS as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Known peers, most recently seen first.
    pub fn peers(&self) -> Result<Vec<Peer>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT node, addr, last_seen FROM peers ORDER BY last_seen DESC, node")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (node, addr, last_seen) = row?;
            let node =
                <[u8; 32]>::try_from(node)
                    .map(PublicKey)
                    .map_err(|_| StoreError::Corrupt {
                        what: "peer",
                        reason: "node id is not 32 bytes".into(),
                    })?;
            out.push(Peer {
                node,
                addr,
                last_seen: u64::try_from(last_seen).unwrap_or(0),
            });
        }
        Ok(out)
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::FutureSchema {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(found).unwrap_or(0))
    {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

type Checked<T> = Result<Result<Option<Signed<T>>, Reject>, StoreError>;

fn trusted_registry(conn: &Connection) -> Result<Option<Registry>, StoreError> {
    Ok(load_trusted(conn)?
        .and_then(|t| t.registry)
        .map(Signed::into_record))
}

fn check_claim(conn: &Connection, bytes: &[u8], now: u64) -> Checked<Claim> {
    let claim = match Signed::<Claim>::decode(bytes) {
        Ok(c) => c,
        Err(e) => return Ok(Err(e.into())),
    };
    let c = claim.record();
    if let Err(e) = claim.verify_by(&c.node) {
        return Ok(Err(e.into()));
    }
    if c.lease_expires <= now {
        return Ok(Err(Reject::LeaseExpired {
            lease_expires: c.lease_expires,
            now,
        }));
    }
    if trusted_registry(conn)?.is_none_or(|r| r.domain(&c.domain).is_none()) {
        return Ok(Err(Reject::UnknownDomain(c.domain.clone())));
    }
    let held: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT lease_expires, envelope FROM claims WHERE domain = ?1 AND node = ?2",
            params![c.domain, &c.node.0[..]],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    match held {
        Some((_, envelope)) if envelope == bytes => return Ok(Ok(None)),
        Some((lease, _)) if lease >= time_i64(c.lease_expires) => return Ok(Err(Reject::Stale)),
        Some(_) => {}
        None => {
            let live: i64 = conn.query_row(
                "SELECT COUNT(*) FROM claims WHERE node = ?1 AND lease_expires > ?2",
                params![&c.node.0[..], time_i64(now)],
                |r| r.get(0),
            )?;
            if live >= MAX_CLAIMS_PER_NODE as i64 {
                return Ok(Err(Reject::Quota {
                    max: MAX_CLAIMS_PER_NODE,
                }));
            }
        }
    }
    Ok(Ok(Some(claim)))
}

fn check_elm(conn: &Connection, bytes: &[u8]) -> Checked<ElmRecord> {
    let elm = match Signed::<ElmRecord>::decode(bytes) {
        Ok(e) => e,
        Err(e) => return Ok(Err(e.into())),
    };
    let e = elm.record();
    if let Err(err) = elm.verify_by(&e.trainer) {
        return Ok(Err(err.into()));
    }
    let Some(registry) = trusted_registry(conn)? else {
        return Ok(Err(Reject::UnknownDomain(e.domain.clone())));
    };
    if registry.domain(&e.domain).is_none() {
        return Ok(Err(Reject::UnknownDomain(e.domain.clone())));
    }
    let Some(seed) = &registry.seed else {
        return Ok(Err(Reject::SeedMismatch("the registry has no seed yet")));
    };
    if e.architecture != seed.architecture.id() {
        return Ok(Err(Reject::SeedMismatch(
            "architecture differs from the seed's",
        )));
    }
    if e.tokenizer != seed.tokenizer {
        return Ok(Err(Reject::SeedMismatch(
            "tokenizer differs from the seed's",
        )));
    }
    let exists: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM elms WHERE id = ?1)",
        [&elm.id().0[..]],
        |r| r.get(0),
    )?;
    if exists {
        return Ok(Ok(None));
    }
    let count: i64 = conn.query_row(
        "SELECT COUNT(*) FROM elms WHERE trainer = ?1",
        [&e.trainer.0[..]],
        |r| r.get(0),
    )?;
    if count >= MAX_ELMS_PER_TRAINER as i64 {
        return Ok(Err(Reject::Quota {
            max: MAX_ELMS_PER_TRAINER,
        }));
    }
    Ok(Ok(Some(elm)))
}

fn check_attestation(conn: &Connection, bytes: &[u8]) -> Checked<Attestation> {
    let att = match Signed::<Attestation>::decode(bytes) {
        Ok(a) => a,
        Err(e) => return Ok(Err(e.into())),
    };
    let a = att.record();
    if let Err(e) = att.verify_by(&a.verifier) {
        return Ok(Err(e.into()));
    }
    let known: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM elms WHERE id = ?1)",
        [&a.elm.0[..]],
        |r| r.get(0),
    )?;
    if !known {
        return Ok(Err(Reject::UnknownElm(a.elm)));
    }
    let held: Option<Vec<u8>> = conn
        .query_row(
            "SELECT envelope FROM attestations WHERE elm = ?1 AND verifier = ?2",
            params![&a.elm.0[..], &a.verifier.0[..]],
            |r| r.get(0),
        )
        .optional()?;
    match held {
        Some(envelope) if envelope == bytes => return Ok(Ok(None)),
        Some(_) => {}
        None => {
            let count: i64 = conn.query_row(
                "SELECT COUNT(*) FROM attestations WHERE elm = ?1",
                [&a.elm.0[..]],
                |r| r.get(0),
            )?;
            if count >= MAX_ATTESTATIONS_PER_ELM as i64 {
                return Ok(Err(Reject::Quota {
                    max: MAX_ATTESTATIONS_PER_ELM,
                }));
            }
        }
    }
    Ok(Ok(Some(att)))
}
