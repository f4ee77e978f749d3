//! The local store: SQLite (WAL, `synchronous=FULL`), schema migrations by `user_version`, and
//! one IMMEDIATE transaction per state change, in which the trusted state is read, the rules
//! decide, and the change is written. A crash or an I/O error rolls the whole change back.

use std::path::{Path, PathBuf};

use btm_protocol::{
    Attestation, Claim, ContentId, ElmRecord, PublicKey, Record, Registry, Root, Signed,
};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use crate::rules::{self, ClaimLimits, Decision, Reject, Trusted};

/// The schema version this code writes.
pub const SCHEMA_VERSION: i64 = 1;
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

/// Writes an accepted root or registry envelope (`bytes`, of record `id`) into `table`
/// (`roots` or `registries`); returns its version as stored.
fn insert_versioned(
    tx: &Transaction<'_>,
    table: &str,
    version: u64,
    id: ContentId,
    bytes: &[u8],
    now: u64,
) -> Result<i64, StoreError> {
    let v = version_i64(version)?;
    tx.execute(
        &format!(
            "INSERT INTO {table} (version, id, envelope, accepted_at) VALUES (?1, ?2, ?3, ?4)"
        ),
        params![v, &id.0[..], bytes, time_i64(now)],
    )?;
    Ok(v)
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

    /// One peer record's transaction: `check` decides (`Ok(None)`: already held), `insert`
    /// writes an accepted one.
    fn put<R: Record>(
        &mut self,
        check: impl FnOnce(&Connection) -> Checked<R>,
        insert: impl FnOnce(&Transaction<'_>, &Signed<R>) -> rusqlite::Result<usize>,
    ) -> Result<Decision<Signed<R>>, StoreError> {
        let tx = self.write()?;
        let decision = match check(&tx)? {
            Err(r) => Decision::Reject(r),
            Ok(None) => Decision::Unchanged,
            Ok(Some(envelope)) => {
                insert(&tx, &envelope)?;
                Decision::Accept(envelope)
            }
        };
        tx.commit()?;
        Ok(decision)
    }

    /// The envelopes of record type `R` that `sql` selects (one column), decoded.
    fn envelopes<R: Record>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        what: &'static str,
    ) -> Result<Vec<Signed<R>>, StoreError> {
        let mut stmt = self.conn.prepare(sql)?;
        let rows = stmt.query_map(params, |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(Signed::<R>::decode(&row?).map_err(corrupt(what))?);
        }
        Ok(out)
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
            let v = insert_versioned(&tx, "roots", root.record().version, root.id(), bytes, now)?;
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
        self.update(
            "root",
            bytes,
            now,
            |trusted| rules::decide_root(&trusted.root, bytes),
            |tx, root| {
                let v =
                    insert_versioned(tx, "roots", root.record().version, root.id(), bytes, now)?;
                tx.execute(
                    "UPDATE trusted SET root_version = ?1 WHERE singleton = 0",
                    [v],
                )?;
                Ok(())
            },
        )
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
        self.update(
            "registry",
            bytes,
            now,
            |trusted| rules::decide_registry(trusted, bytes, now),
            |tx, registry| {
                let v = insert_versioned(
                    tx,
                    "registries",
                    registry.record().version,
                    registry.id(),
                    bytes,
                    now,
                )?;
                tx.execute(
                    "UPDATE trusted SET registry_version = ?1, registry_id = ?2 WHERE singleton = 0",
                    params![v, &registry.id().0[..]],
                )?;
                Ok(())
            },
        )
    }

    /// A root or registry update's transaction: `decide` against the trusted state, `accept`
    /// writes an accepted one, an equivocation is recorded as evidence.
    fn update<R: Record>(
        &mut self,
        kind: &str,
        bytes: &[u8],
        now: u64,
        decide: impl FnOnce(&Trusted) -> Decision<Signed<R>>,
        accept: impl FnOnce(&Transaction<'_>, &Signed<R>) -> Result<(), StoreError>,
    ) -> Result<Decision<Signed<R>>, StoreError> {
        let tx = self.write()?;
        let trusted = load_trusted(&tx)?.ok_or(StoreError::NoRoot)?;
        let decision = decide(&trusted);
        match &decision {
            Decision::Accept(envelope) => accept(&tx, envelope)?,
            Decision::Reject(r) => record_equivocation(&tx, kind, r, bytes, now)?,
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

    /// Stores a claim signed by its node that [`rules::decide_claim`] accepts under
    /// [`CLAIM_LIMITS`] against the node's stored claims (a domain of the trusted registry, a
    /// lease that has not ended; a later lease from the same node for the same domain replaces
    /// an earlier one). A node holds one claim: an accepted claim on another domain (first
    /// made later) deletes its claims elsewhere. Identical bytes are `Unchanged`.
    pub fn put_claim(
        &mut self,
        bytes: &[u8],
        now: u64,
    ) -> Result<Decision<Signed<Claim>>, StoreError> {
        self.put(
            |conn| check_claim(conn, bytes, now),
            |tx, claim| {
                let c = claim.record();
                // One live claim per node: a move releases the node's other domains.
                tx.execute(
                    "DELETE FROM claims WHERE node = ?1 AND domain <> ?2",
                    params![&c.node.0[..], c.domain],
                )?;
                tx.execute(
                    "INSERT OR REPLACE INTO claims (domain, node, lease_expires, envelope) VALUES (?1, ?2, ?3, ?4)",
                    params![c.domain, &c.node.0[..], time_i64(c.lease_expires), bytes],
                )
            },
        )
    }

    /// The stored claims on `domain` whose lease has not ended at `now`.
    pub fn claims(&self, domain: &str, now: u64) -> Result<Vec<Signed<Claim>>, StoreError> {
        self.envelopes(
            "SELECT envelope FROM claims WHERE domain = ?1 AND lease_expires > ?2 ORDER BY node",
            params![domain, time_i64(now)],
            "claim",
        )
    }

    /// The stored claims by `node` whose lease has not ended at `now` (one, unless the store
    /// was written before a node held one claim at a time).
    pub fn claims_by(&self, node: &PublicKey, now: u64) -> Result<Vec<Signed<Claim>>, StoreError> {
        self.envelopes(
            "SELECT envelope FROM claims WHERE node = ?1 AND lease_expires > ?2 ORDER BY domain",
            params![&node.0[..], time_i64(now)],
            "claim",
        )
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

    /// Stores an ELM record signed by its trainer that fits the trusted registry
    /// ([`rules::elm_fits`]: a domain of the registry, the seed's architecture and tokenizer),
    /// at most [`MAX_ELMS_PER_TRAINER`] per trainer.
    pub fn put_elm(
        &mut self,
        bytes: &[u8],
        now: u64,
    ) -> Result<Decision<Signed<ElmRecord>>, StoreError> {
        self.put(
            |conn| check_elm(conn, bytes),
            |tx, elm| {
                let e = elm.record();
                tx.execute(
                    "INSERT INTO elms (id, domain, trainer, envelope, received_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![&elm.id().0[..], e.domain, &e.trainer.0[..], bytes, time_i64(now)],
                )
            },
        )
    }

    /// The ELM record with this id.
    pub fn elm(&self, id: &ContentId) -> Result<Option<Signed<ElmRecord>>, StoreError> {
        Ok(self
            .envelopes(
                "SELECT envelope FROM elms WHERE id = ?1",
                [&id.0[..]],
                "ELM record",
            )?
            .pop())
    }

    /// Every ELM record held, oldest first (at most `limit`).
    pub fn elms(&self, limit: usize) -> Result<Vec<Signed<ElmRecord>>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.envelopes(
            "SELECT envelope FROM elms ORDER BY received_at, id LIMIT ?1",
            [limit],
            "ELM record",
        )
    }

    /// Stores an attestation signed by its verifier, of an ELM record held here. A newer
    /// attestation by the same verifier of the same ELM replaces the old one.
    pub fn put_attestation(
        &mut self,
        bytes: &[u8],
    ) -> Result<Decision<Signed<Attestation>>, StoreError> {
        self.put(
            |conn| check_attestation(conn, bytes),
            |tx, att| {
                let a = att.record();
                tx.execute(
                    "INSERT OR REPLACE INTO attestations (elm, verifier, envelope) VALUES (?1, ?2, ?3)",
                    params![&a.elm.0[..], &a.verifier.0[..], bytes],
                )
            },
        )
    }

    /// The attestations of an ELM record.
    pub fn attestations(&self, elm: &ContentId) -> Result<Vec<Signed<Attestation>>, StoreError> {
        self.envelopes(
            "SELECT envelope FROM attestations WHERE elm = ?1 ORDER BY verifier",
            [&elm.0[..]],
            "attestation",
        )
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

/// The claim rules' numbers here: leases are not bounded by the store (the network bounds
/// them on the way in).
pub const CLAIM_LIMITS: ClaimLimits = ClaimLimits {
    max_lease_secs: u64::MAX,
    max_total_lease_secs: rules::MAX_TOTAL_LEASE_SECS,
    grace_secs: rules::CLAIM_GRACE_SECS,
};

fn check_claim(conn: &Connection, bytes: &[u8], now: u64) -> Checked<Claim> {
    let claim = match rules::signed_by::<Claim>(bytes, |c| &c.node) {
        Ok(c) => c,
        Err(r) => return Ok(Err(r)),
    };
    let c = claim.record();
    let Some(registry) = trusted_registry(conn)? else {
        return Ok(Err(Reject::UnknownDomain(c.domain.clone())));
    };
    let held: Option<Vec<u8>> = conn
        .query_row(
            "SELECT envelope FROM claims WHERE domain = ?1 AND node = ?2",
            params![c.domain, &c.node.0[..]],
            |r| r.get(0),
        )
        .optional()?;
    if held.as_deref() == Some(bytes) {
        return Ok(Ok(None));
    }
    let mut stmt =
        conn.prepare("SELECT envelope FROM claims WHERE node = ?1 AND lease_expires > ?2")?;
    let live: Vec<Claim> = stmt
        .query_map(params![&c.node.0[..], time_i64(now)], |r| {
            r.get::<_, Vec<u8>>(0)
        })?
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .filter_map(|b| Signed::<Claim>::decode(b).ok())
        .map(Signed::into_record)
        .collect();
    Ok(rules::decide_claim(&registry, c, &live, &CLAIM_LIMITS, now).map(|_| Some(claim)))
}

fn check_elm(conn: &Connection, bytes: &[u8]) -> Checked<ElmRecord> {
    let elm = match rules::signed_by::<ElmRecord>(bytes, |e| &e.trainer) {
        Ok(e) => e,
        Err(r) => return Ok(Err(r)),
    };
    let e = elm.record();
    let Some(registry) = trusted_registry(conn)? else {
        return Ok(Err(Reject::UnknownDomain(e.domain.clone())));
    };
    if let Err(r) = rules::elm_fits(&registry, e) {
        return Ok(Err(r));
    }
    if elm_held(conn, &elm.id())? {
        return Ok(Ok(None));
    }
    let quota = below_quota(
        conn,
        "SELECT COUNT(*) FROM elms WHERE trainer = ?1",
        &e.trainer.0,
        MAX_ELMS_PER_TRAINER,
    )?;
    Ok(quota.map(|()| Some(elm)))
}

fn check_attestation(conn: &Connection, bytes: &[u8]) -> Checked<Attestation> {
    let att = match rules::signed_by::<Attestation>(bytes, |a| &a.verifier) {
        Ok(a) => a,
        Err(r) => return Ok(Err(r)),
    };
    let a = att.record();
    if !elm_held(conn, &a.elm)? {
        return Ok(Err(Reject::UnknownElm(a.elm)));
    }
    let held: Option<Vec<u8>> = conn
        .query_row(
            "SELECT envelope FROM attestations WHERE elm = ?1 AND verifier = ?2",
            params![&a.elm.0[..], &a.verifier.0[..]],
            |r| r.get(0),
        )
        .optional()?;
    let quota = match held {
        Some(envelope) if envelope == bytes => return Ok(Ok(None)),
        Some(_) => Ok(()),
        None => below_quota(
            conn,
            "SELECT COUNT(*) FROM attestations WHERE elm = ?1",
            &a.elm.0,
            MAX_ATTESTATIONS_PER_ELM,
        )?,
    };
    Ok(quota.map(|()| Some(att)))
}

/// Whether the ELM record with this id is held.
fn elm_held(conn: &Connection, id: &ContentId) -> Result<bool, StoreError> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM elms WHERE id = ?1)",
        [&id.0[..]],
        |r| r.get(0),
    )?)
}

/// `Quota` if the rows that `count_sql` counts for `key` have reached `max`.
fn below_quota(
    conn: &Connection,
    count_sql: &str,
    key: &[u8],
    max: usize,
) -> Result<Result<(), Reject>, StoreError> {
    let count: i64 = conn.query_row(count_sql, [key], |r| r.get(0))?;
    Ok(if usize::try_from(count).unwrap_or(usize::MAX) >= max {
        Err(Reject::Quota { max })
    } else {
        Ok(())
    })
}
