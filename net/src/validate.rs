//! Validation of what peers offer: DHT records (on every inbound PUT and every GET result) and
//! the cheap checks of gossip messages. Pure functions of (trusted state, now, bytes) -> outcome.

use std::collections::BTreeMap;

use btm_protocol::{Claim, ContentId, ElmRecord, Record, Registry, Root, SeedManifest, Signed};
use btm_registry::{Decision, Reject, Trusted, decide_registry, decide_root, rules};

use crate::addr::{AddrError, AddrRecord};
use crate::keys::RecordKey;

/// How far ahead a claim's lease or an address record's expiry may lie.
#[derive(Debug, Clone, Copy)]
pub struct Horizons {
    /// Longest lease a claim may ask for, in seconds.
    pub max_lease_secs: u64,
    /// Longest life of an address record, in seconds.
    pub max_addr_secs: u64,
}

impl Default for Horizons {
    fn default() -> Self {
        Horizons {
            max_lease_secs: 2 * 3600,
            max_addr_secs: 24 * 3600,
        }
    }
}

/// What the node trusts at one instant.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub trusted: &'a Trusted,
    /// The ids of the roots this node accepted, by version (the trusted one included).
    pub roots: &'a BTreeMap<u64, ContentId>,
    pub now: u64,
    pub horizons: Horizons,
}

impl View<'_> {
    fn registry(&self) -> Result<&Registry, Invalid> {
        self.trusted
            .registry
            .as_ref()
            .map(Signed::record)
            .ok_or(Invalid::NoRegistry)
    }
}

/// Why an offered record is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Invalid {
    /// Refused by the protocol's rules (malformed, signature, expiry, rollback, ...).
    #[error(transparent)]
    Rules(#[from] Reject),
    /// A well-formed record stored under a key that names something else.
    #[error("record does not match its key")]
    KeyMismatch,
    /// A key outside this network's namespace.
    #[error("unknown key")]
    UnknownKey,
    /// Nothing can be checked against a registry yet.
    #[error("no trusted registry yet")]
    NoRegistry,
    /// A bad address record.
    #[error(transparent)]
    Addr(#[from] AddrError),
    /// A root whose version this node accepted with other content.
    #[error("root v{0} differs from the root v{0} this node accepted")]
    RootConflict(u64),
    /// An address record that has expired or lives too long.
    #[error("address record expiry {expires} is not within ({now}, now + horizon + 10 min]")]
    AddrExpiry { expires: u64, now: u64 },
}

/// How a valid record compares with what is trusted (only roots and registries have
/// versions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// A registry, or the next root, newer than the trusted one: adopt it.
    Newer,
    /// Valid and not older than what is trusted.
    Current,
    /// A validly signed registry older than the trusted one, or an older root this node
    /// never held: keep ours, do not store it.
    Older,
    /// A root more than one version ahead: it cannot be checked until the roots between are
    /// known (walk the chain), so it is neither stored nor held against the sender.
    Ahead,
}

/// Checks a claim envelope: signed by its node, and [`rules::claim_fits`] (a domain of the
/// trusted registry, a lease that has not ended and ends within the horizon). The node's
/// held claims and quota ([`rules::decide_claim`]) are checked where they are known: by the
/// store and the DHT store.
pub fn check_claim(view: &View<'_>, bytes: &[u8]) -> Result<Signed<Claim>, Invalid> {
    let claim = rules::signed_by::<Claim>(bytes, |c| &c.node)?;
    rules::claim_fits(
        view.registry()?,
        claim.record(),
        view.horizons.max_lease_secs,
        view.now,
    )?;
    Ok(claim)
}

/// Checks an ELM record envelope: signed by its trainer, a domain of the trusted registry, the
/// seed's architecture and tokenizer (step 1 of verification, `specs/network.md`).
pub fn check_elm(view: &View<'_>, bytes: &[u8]) -> Result<Signed<ElmRecord>, Invalid> {
    let elm = Signed::<ElmRecord>::decode(bytes).map_err(Reject::from)?;
    check_elm_record(view.registry()?, &elm)?;
    Ok(elm)
}

/// The registry-dependent checks of an ELM record: its trainer's signature and
/// [`rules::elm_fits`].
pub fn check_elm_record(registry: &Registry, elm: &Signed<ElmRecord>) -> Result<(), Reject> {
    let e = elm.record();
    elm.verify_by(&e.trainer)?;
    rules::elm_fits(registry, e)
}

/// Checks a registry envelope against the trusted state.
pub fn check_registry(view: &View<'_>, bytes: &[u8]) -> Result<Freshness, Invalid> {
    match decide_registry(view.trusted, bytes, view.now) {
        Decision::Accept(_) => Ok(Freshness::Newer),
        Decision::Unchanged => Ok(Freshness::Current),
        // Rollback is decided after the signature threshold: a genuine, older registry.
        Decision::Reject(Reject::Rollback { .. }) => Ok(Freshness::Older),
        Decision::Reject(r) => Err(r.into()),
    }
}

/// Checks a registry proposal (gossiped while it gathers maintainers' signatures): see
/// [`rules::check_proposal`].
pub fn check_proposal(view: &View<'_>, bytes: &[u8]) -> Result<Signed<Registry>, Invalid> {
    Ok(rules::check_proposal(view.trusted, bytes, view.now)?)
}

/// Checks a root envelope (of `version`, when it was found under a key) against the chain this
/// node accepted: a root it holds is current, the next one must pass the rotation rules
/// (thresholds of the trusted keys and of its own), a later one waits for the chain.
pub fn check_root(
    view: &View<'_>,
    version: Option<u64>,
    bytes: &[u8],
) -> Result<Freshness, Invalid> {
    let root = Signed::<Root>::decode(bytes).map_err(Reject::from)?;
    let v = root.record().version;
    if version.is_some_and(|k| k != v) {
        return Err(Invalid::KeyMismatch);
    }
    let current = view.trusted.root.record().version;
    if v <= current {
        return match view.roots.get(&v) {
            Some(id) if *id == root.id() => Ok(Freshness::Current),
            Some(_) => Err(Invalid::RootConflict(v)),
            None => Ok(Freshness::Older),
        };
    }
    if v > current.saturating_add(1) {
        return Ok(Freshness::Ahead);
    }
    match decide_root(&view.trusted.root, bytes) {
        Decision::Accept(_) => Ok(Freshness::Newer),
        Decision::Unchanged => Ok(Freshness::Current),
        Decision::Reject(r) => Err(r.into()),
    }
}

/// A record that passed its checks is current when it is the one its key names (domain, node or
/// id), else refused.
fn current_if_keyed(matches: bool) -> Result<Freshness, Invalid> {
    if matches {
        Ok(Freshness::Current)
    } else {
        Err(Invalid::KeyMismatch)
    }
}

/// Checks a value offered under a DHT key (inbound PUT or GET result).
pub fn check_record(view: &View<'_>, key: &RecordKey, value: &[u8]) -> Result<Freshness, Invalid> {
    match key {
        RecordKey::Registry => check_registry(view, value),
        RecordKey::Root(v) => check_root(view, Some(*v), value),
        RecordKey::Seed => {
            let seed = SeedManifest::decode(value).map_err(Reject::from)?;
            match &view.registry()?.seed {
                Some(s) if *s == seed => Ok(Freshness::Current),
                _ => Err(Reject::SeedMismatch("not the trusted registry's seed").into()),
            }
        }
        RecordKey::Claim { domain, node } => {
            let claim = check_claim(view, value)?;
            let c = claim.record();
            current_if_keyed(c.domain == *domain && c.node == *node)
        }
        RecordKey::Elm(id) => current_if_keyed(check_elm(view, value)?.id() == *id),
        RecordKey::ElmOf { domain, node } => {
            let elm = check_elm(view, value)?;
            let e = elm.record();
            current_if_keyed(e.domain == *domain && e.trainer == *node)
        }
        RecordKey::Addr(node) => {
            let a = AddrRecord::decode(value)?;
            current_if_keyed(a.node == *node)?;
            // A publisher's clock may run ahead of ours by as much as clocks differ.
            let horizon = view
                .horizons
                .max_addr_secs
                .saturating_add(btm_registry::rules::MAX_CLOCK_AHEAD_SECS);
            if a.expires <= view.now || a.expires > view.now.saturating_add(horizon) {
                return Err(Invalid::AddrExpiry {
                    expires: a.expires,
                    now: view.now,
                });
            }
            Ok(Freshness::Current)
        }
    }
}

/// Whether a valid `new` value should replace the `held` one under `key` (a stable choice: the
/// newest registry version, the latest lease, the latest address expiry; content-addressed keys
/// never change; an ELM-of slot takes its owner's latest signature).
pub fn supersedes(key: &RecordKey, new: &[u8], held: &[u8]) -> bool {
    if new == held {
        return false;
    }
    match key {
        RecordKey::Registry => newer(new, held, |b| {
            Signed::<Registry>::decode(b)
                .map(|r| r.record().version)
                .ok()
        }),
        RecordKey::Claim { .. } => newer(new, held, |b| {
            Signed::<Claim>::decode(b)
                .map(|c| c.record().lease_expires)
                .ok()
        }),
        RecordKey::Addr(_) => newer(new, held, |b| AddrRecord::decode(b).map(|a| a.expires).ok()),
        RecordKey::ElmOf { .. } => true,
        // One version, one root; content-addressed records never change.
        RecordKey::Root(_) | RecordKey::Seed | RecordKey::Elm(_) => false,
    }
}

/// Whether `new` comes after `held` by `order` (a held value without an order, one that does
/// not decode, is always replaced).
fn newer(new: &[u8], held: &[u8], order: impl Fn(&[u8]) -> Option<u64>) -> bool {
    let held = order(held);
    matches!((order(new), held), (Some(n), Some(h)) if n > h) || held.is_none()
}

/// How long a record received from a peer is kept at most, by kind (`specs/network.md`,
/// "Limits"). Publishers republish every hour, so every TTL is well above that.
pub fn record_ttl(key: &RecordKey) -> std::time::Duration {
    let hours = match key {
        RecordKey::Claim { .. } => 3,
        RecordKey::Addr(_) => 25,
        RecordKey::Registry
        | RecordKey::Root(_)
        | RecordKey::Seed
        | RecordKey::Elm(_)
        | RecordKey::ElmOf { .. } => 48,
    };
    std::time::Duration::from_secs(hours * 3600)
}

/// The content id a record key's value must hash to, if it is content-addressed by record id.
pub fn expected_id(key: &RecordKey) -> Option<ContentId> {
    match key {
        RecordKey::Elm(id) => Some(*id),
        _ => None,
    }
}
