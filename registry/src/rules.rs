//! The acceptance rules, each written once: pure functions of (trusted state, offered record,
//! now) to a [`Decision`] or a `Result<_, Reject>`. No I/O, no clock.
//!
//! - Roots and registries, after TUF: [`decide_initial_root`], [`decide_root`],
//!   [`decide_registry`].
//! - ELM records: [`elm_fits`] (domain and seed; the store, the maintainers' workflow and the
//!   network check it) and [`parents_known`] (the parents are the seed or accepted ELMs; what a
//!   maintainer checks before accepting an ELM into the forest).
//! - Registry proposals (a registry gathering maintainers' signatures toward the threshold):
//!   [`check_proposal`] (what any peer relays), [`proposal_extends`] (what a co-signing
//!   maintainer requires of the body), [`threshold_met`].
//! - Claims: [`claim_fits`] (lease bounds and domain) and [`decide_claim`] (that, plus the
//!   node's held claims and its quota, under [`ClaimLimits`]); the store, the network's DHT
//!   and gossip validation call them.

use std::collections::BTreeSet;

use btm_protocol::{
    AcceptedElm, Claim, ContentId, DecodeError, ElmRecord, PublicKey, Record, Registry, Root,
    SignatureError, Signed,
};
use serde::Serialize;

/// What the node trusts now: its root, and the registry it last accepted (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trusted {
    pub root: Signed<Root>,
    pub registry: Option<Signed<Registry>>,
}

/// The outcome of offering a record to the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Decision<T> {
    /// Valid and newer: it becomes the trusted one.
    Accept(T),
    /// Byte-identical to the trusted one: nothing to do, nothing wrong.
    Unchanged,
    /// Refused; the trusted state stays as it was.
    Reject(Reject),
}

impl<T> Decision<T> {
    /// The rejection, if any.
    pub fn rejection(&self) -> Option<&Reject> {
        match self {
            Decision::Reject(r) => Some(r),
            _ => None,
        }
    }
}

/// Which key set a threshold was checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyRole {
    /// The trusted root's keys (registry updates, and the old half of a rotation).
    Trusted,
    /// The offered root's own keys (the new half of a rotation, or a first root).
    Offered,
}

impl std::fmt::Display for KeyRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyRole::Trusted => "trusted",
            KeyRole::Offered => "offered",
        })
    }
}

/// How an envelope's signatures counted against a key set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// Distinct listed keys with a valid signature: what counts toward the threshold.
    pub valid: usize,
    /// Signatures by listed keys that do not verify.
    pub invalid: usize,
    /// Signatures by keys not in the set (ignored).
    pub unknown: usize,
    /// Further signatures by a key that already counted (ignored: a key counts once).
    pub duplicate: usize,
}

/// Counts the signatures of `envelope` against `keys`: each listed key at most once.
pub fn tally<R: Record>(envelope: &Signed<R>, keys: &[PublicKey]) -> Tally {
    let mut counted = BTreeSet::new();
    let mut t = Tally::default();
    for sig in envelope.signatures() {
        if !keys.contains(&sig.key) {
            t.unknown += 1;
        } else if counted.contains(&sig.key) {
            t.duplicate += 1;
        } else if envelope.verifies(sig) {
            counted.insert(sig.key);
            t.valid += 1;
        } else {
            t.invalid += 1;
        }
    }
    t
}

/// Why a record was refused. Each variant names what was wrong in the user's terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Reject {
    /// The bytes are not a valid record of the expected type.
    #[error("malformed: {0}")]
    Malformed(#[from] DecodeError),
    /// Fewer distinct valid signatures than the threshold.
    #[error(
        "signed by {} distinct {role} keys, {threshold} needed ({} invalid, {} unknown, {} duplicate signatures ignored)",
        tally.valid, tally.invalid, tally.unknown, tally.duplicate
    )]
    BelowThreshold {
        role: KeyRole,
        threshold: u32,
        tally: Tally,
    },
    /// The offered registry's expiry has passed.
    #[error("registry v{version} expired at {expires} (now {now}): cannot update, refusing it")]
    Expired {
        version: u64,
        expires: u64,
        now: u64,
    },
    /// The trusted root has expired: no registry can be accepted until a new root arrives.
    #[error(
        "trusted root v{version} expired at {expires} (now {now}): cannot update (freeze attack or stale maintainers)"
    )]
    RootExpired {
        version: u64,
        expires: u64,
        now: u64,
    },
    /// Older than the trusted version.
    #[error("rollback: offered version {offered} is older than trusted version {trusted}")]
    Rollback { trusted: u64, offered: u64 },
    /// Validly signed, same version as the trusted one, different content: the maintainers
    /// signed two histories. The trusted one stays.
    #[error("equivocation: version {version} is both {trusted} (trusted) and {offered} (offered)")]
    Equivocation {
        version: u64,
        trusted: ContentId,
        offered: ContentId,
    },
    /// A root may only advance one version at a time.
    #[error("root v{offered} does not follow trusted root v{trusted}")]
    RootNotNext { trusted: u64, offered: u64 },
    /// A single-signer record (claim, ELM, attestation) without a valid signature by its signer.
    #[error("{0}")]
    Signature(#[from] SignatureError),
    /// A claim first made further in the future than clocks differ.
    #[error("first claimed at {first_claimed}, more than 10 minutes after now ({now})")]
    FirstClaimAhead { first_claimed: u64, now: u64 },
    /// A claim whose lease has already ended.
    #[error("lease ended at {lease_expires} (now {now})")]
    LeaseExpired { lease_expires: u64, now: u64 },
    /// A claim asking for a lease further ahead than the limits allow.
    #[error("lease until {lease_expires} is more than {max}s ahead of {now}")]
    LeaseTooLong {
        lease_expires: u64,
        now: u64,
        max: u64,
    },
    /// A record naming a domain the trusted registry does not have.
    #[error("unknown domain {0:?}")]
    UnknownDomain(String),
    /// An attestation of an ELM record this node does not hold.
    #[error("unknown ELM record {0}")]
    UnknownElm(ContentId),
    /// A claim older than the one held for the same node and domain.
    #[error("stale: a newer record from the same signer is held")]
    Stale,
    /// A claim held longer in total than the limits allow (`lease_expires - first_claimed`):
    /// a lease renews for a bounded time without an announced ELM.
    #[error("lease until {lease_expires} holds the domain since {first_claimed}, more than {max}s")]
    LeaseCapped {
        first_claimed: u64,
        lease_expires: u64,
        max: u64,
    },
    /// A renewal that moves its first-claim time (a claim cannot be made older or younger
    /// while it lives).
    #[error("a renewal must keep the first-claim time {held} (offered {offered})")]
    FirstClaimMoved { held: u64, offered: u64 },
    /// A renewal past the grace period that shows no more training progress than the claim it
    /// renews.
    #[error("a renewal must show progress past step {held} (offered {offered:?})")]
    NoProgress { held: u64, offered: Option<u64> },
    /// A claim on a domain the node has since moved away from: it holds a live claim on
    /// another domain first made at `latest`, not before this one.
    #[error(
        "the node has since claimed another domain (at {latest}); its claim on {domain:?} from {first_claimed} is superseded"
    )]
    Superseded {
        domain: String,
        first_claimed: u64,
        latest: u64,
    },
    /// The signer already has as many records of this type stored as a peer may.
    #[error("quota: at most {max} stored per signer")]
    Quota { max: usize },
    /// The trusted registry has no seed, or the record does not match it.
    #[error("does not match the seed: {0}")]
    SeedMismatch(&'static str),
    /// An ELM parent that is neither the seed nor an ELM the registry accepted.
    #[error("ELM parent {0} is neither the seed nor an accepted ELM")]
    UnknownParent(ContentId),
    /// A multi-signature envelope carrying two signatures by one key (TUF: no duplicate
    /// keyids). Refused before any signature is verified.
    #[error("key {0} signed the envelope more than once")]
    RepeatedSigner(PublicKey),
    /// More signatures than the key set lists keys. Refused before any signature is verified.
    #[error("{count} signatures, but only {keys} keys may sign")]
    TooManySignatures { count: usize, keys: usize },
    /// A registry proposal must carry at least one signature, every one valid and by a key of
    /// the trusted root.
    #[error(
        "a proposal needs only valid signatures by trusted keys, at least one ({} valid, {} invalid, {} unknown)",
        tally.valid, tally.invalid, tally.unknown
    )]
    ProposalSignatures { tally: Tally },
    /// A proposed registry that changes more than adding ELMs to the trusted one.
    #[error("the proposal does not extend the trusted registry: {0}")]
    NotAnExtension(&'static str),
}

impl Reject {
    /// Whether the refusal depends on the receiver's state (its registry, its store, its
    /// clock) rather than on the bytes alone: such a record may be valid for a peer with a
    /// newer registry or another clock, so whoever relayed it is not at fault (gossipsub
    /// `Ignore`, not `Reject`).
    pub fn depends_on_state(&self) -> bool {
        matches!(
            self,
            Reject::UnknownDomain(_)
                | Reject::UnknownElm(_)
                | Reject::UnknownParent(_)
                | Reject::SeedMismatch(_)
                | Reject::Quota { .. }
                | Reject::Stale
                | Reject::Rollback { .. }
                | Reject::RootNotNext { .. }
                | Reject::LeaseExpired { .. }
                | Reject::LeaseTooLong { .. }
                | Reject::FirstClaimMoved { .. }
                | Reject::NoProgress { .. }
                | Reject::Superseded { .. }
                | Reject::FirstClaimAhead { .. }
                | Reject::NotAnExtension(_)
        ) || matches!(
            // Signed by keys of a root this node has not adopted yet: not the relay's fault.
            self,
            Reject::ProposalSignatures { tally } if tally.invalid == 0 && tally.unknown > 0
        )
    }
}

/// The checks that cost no signature verification, run before [`tally`]: at most one
/// signature per key and no more signatures than `keys` lists. An envelope built to cost
/// verifications (64 signatures under one key) is refused here.
pub fn cheap_signature_checks<R: Record>(
    envelope: &Signed<R>,
    keys: &[PublicKey],
) -> Result<(), Reject> {
    let sigs = envelope.signatures();
    let mut seen = BTreeSet::new();
    for sig in sigs {
        if !seen.insert(sig.key) {
            return Err(Reject::RepeatedSigner(sig.key));
        }
    }
    if sigs.len() > keys.len() {
        return Err(Reject::TooManySignatures {
            count: sigs.len(),
            keys: keys.len(),
        });
    }
    Ok(())
}

/// Whether a threshold of `root`'s keys signed `envelope` (`role` names that root in the
/// rejection).
fn signed_by_threshold<R: Record>(
    envelope: &Signed<R>,
    root: &Root,
    role: KeyRole,
) -> Result<(), Reject> {
    let tally = tally(envelope, &root.keys);
    if tally.valid >= root.threshold as usize {
        Ok(())
    } else {
        Err(Reject::BelowThreshold {
            role,
            threshold: root.threshold,
            tally,
        })
    }
}

/// The trusted root has not expired ("expired" means `now >= expires`).
fn root_live(root: &Root, now: u64) -> Result<(), Reject> {
    live(root.version, root.expires, now, true)
}

/// A registry has not expired.
fn registry_live(registry: &Registry, now: u64) -> Result<(), Reject> {
    live(registry.version, registry.expires, now, false)
}

/// A root (`is_root`) or registry of `version` has not expired.
fn live(version: u64, expires: u64, now: u64, is_root: bool) -> Result<(), Reject> {
    if now < expires {
        return Ok(());
    }
    Err(if is_root {
        Reject::RootExpired {
            version,
            expires,
            now,
        }
    } else {
        Reject::Expired {
            version,
            expires,
            now,
        }
    })
}

fn decided<T>(r: Result<Decision<T>, Reject>) -> Decision<T> {
    r.unwrap_or_else(Decision::Reject)
}

/// A first root, trusted out of band (shipped with the client): it must at least be signed by
/// a threshold of its own keys.
pub fn decide_initial_root(bytes: &[u8]) -> Decision<Signed<Root>> {
    decided(initial_root(bytes))
}

fn initial_root(bytes: &[u8]) -> Result<Decision<Signed<Root>>, Reject> {
    {
        let offered = Signed::<Root>::decode(bytes)?;
        let root = offered.record();
        cheap_signature_checks(&offered, &root.keys)?;
        signed_by_threshold(&offered, root, KeyRole::Offered)?;
        Ok(Decision::Accept(offered))
    }
}

/// Root rotation N -> N+1 (TUF 5.3): the new root must be signed by a threshold of the trusted
/// root's keys and by a threshold of its own keys. Expiry is not checked here (an expired
/// intermediate root may still be a step in a chain); [`decide_registry`] refuses to work under
/// an expired root.
pub fn decide_root(trusted: &Signed<Root>, bytes: &[u8]) -> Decision<Signed<Root>> {
    decided(root_update(trusted, bytes))
}

fn root_update(trusted: &Signed<Root>, bytes: &[u8]) -> Result<Decision<Signed<Root>>, Reject> {
    {
        let offered = Signed::<Root>::decode(bytes)?;
        let (old, new) = (trusted.record(), offered.record());
        if offered.id() == trusted.id() {
            return Ok(Decision::Unchanged);
        }
        if new.version < old.version {
            return Err(Reject::Rollback {
                trusted: old.version,
                offered: new.version,
            });
        }
        // Signed by the old keys and the new ones: the envelope may carry both sets.
        let both: BTreeSet<PublicKey> = old.keys.iter().chain(&new.keys).copied().collect();
        cheap_signature_checks(&offered, &both.into_iter().collect::<Vec<_>>())?;
        signed_by_threshold(&offered, old, KeyRole::Trusted)?;
        if new.version == old.version {
            return Err(Reject::Equivocation {
                version: new.version,
                trusted: trusted.id(),
                offered: offered.id(),
            });
        }
        if new.version != old.version + 1 {
            return Err(Reject::RootNotNext {
                trusted: old.version,
                offered: new.version,
            });
        }
        signed_by_threshold(&offered, new, KeyRole::Offered)?;
        Ok(Decision::Accept(offered))
    }
}

/// A registry update (TUF 5.3/5.4 adapted): the trusted root must not have expired; the
/// registry must be signed by a threshold of distinct trusted-root keys, be newer than the
/// trusted registry (same version and different bytes is equivocation), and not be expired.
/// "Expired" means `now >= expires`.
pub fn decide_registry(trusted: &Trusted, bytes: &[u8], now: u64) -> Decision<Signed<Registry>> {
    decided(registry_update(trusted, bytes, now))
}

fn registry_update(
    trusted: &Trusted,
    bytes: &[u8],
    now: u64,
) -> Result<Decision<Signed<Registry>>, Reject> {
    {
        let offered = Signed::<Registry>::decode(bytes)?;
        let root = trusted.root.record();
        root_live(root, now)?;
        if let Some(current) = &trusted.registry
            && current.id() == offered.id()
        {
            return Ok(Decision::Unchanged);
        }
        cheap_signature_checks(&offered, &root.keys)?;
        signed_by_threshold(&offered, root, KeyRole::Trusted)?;
        let new = offered.record();
        if let Some(current) = &trusted.registry {
            let old = current.record();
            if new.version < old.version {
                return Err(Reject::Rollback {
                    trusted: old.version,
                    offered: new.version,
                });
            }
            if new.version == old.version {
                return Err(Reject::Equivocation {
                    version: new.version,
                    trusted: current.id(),
                    offered: offered.id(),
                });
            }
        }
        registry_live(new, now)?;
        Ok(Decision::Accept(offered))
    }
}

// --- registry proposals -----------------------------------------------------------------------

/// Whether a threshold of `root`'s keys signed `envelope`.
pub fn threshold_met<R: Record>(envelope: &Signed<R>, root: &Root) -> bool {
    tally(envelope, &root.keys).valid >= root.threshold as usize
}

/// A registry proposal: a registry envelope on its way to the threshold, signed so far by
/// some maintainers. Every peer relays one that carries at least one signature, each valid and
/// by a key of the trusted root (so only maintainers can propose), whose version is newer than
/// the trusted registry's and which has not expired. Whether a maintainer co-signs it is
/// [`proposal_extends`]'s question and its own verification's.
pub fn check_proposal(
    trusted: &Trusted,
    bytes: &[u8],
    now: u64,
) -> Result<Signed<Registry>, Reject> {
    let offered = Signed::<Registry>::decode(bytes)?;
    let root = trusted.root.record();
    root_live(root, now)?;
    cheap_signature_checks(&offered, &root.keys)?;
    let tally = tally(&offered, &root.keys);
    if tally.valid == 0 || tally.invalid > 0 || tally.unknown > 0 {
        return Err(Reject::ProposalSignatures { tally });
    }
    let new = offered.record();
    if let Some(current) = &trusted.registry {
        let old = current.record().version;
        if new.version <= old {
            return Err(Reject::Rollback {
                trusted: old,
                offered: new.version,
            });
        }
    }
    registry_live(new, now)?;
    Ok(offered)
}

/// The ELMs a proposed registry adds to `trusted`, when that is all it changes: a newer
/// version, the same domains, seed and client version, every accepted ELM kept, the list
/// strictly ascending, at least one added, and an expiry no later than `max_expires`.
/// A maintainer co-signs only such a proposal, and only if it verified every added ELM itself.
pub fn proposal_extends<'a>(
    trusted: &Registry,
    proposed: &'a Registry,
    max_expires: u64,
) -> Result<Vec<&'a AcceptedElm>, Reject> {
    if proposed.version <= trusted.version {
        return Err(Reject::Rollback {
            trusted: trusted.version,
            offered: proposed.version,
        });
    }
    if proposed.domains != trusted.domains {
        return Err(Reject::NotAnExtension("the domains differ"));
    }
    if proposed.seed != trusted.seed {
        return Err(Reject::NotAnExtension("the seed differs"));
    }
    if proposed.min_client_version != trusted.min_client_version {
        return Err(Reject::NotAnExtension("the minimum client version differs"));
    }
    if proposed.expires > max_expires {
        return Err(Reject::NotAnExtension(
            "it expires later than a co-signer allows",
        ));
    }
    if !proposed.elms.windows(2).all(|w| w[0].record < w[1].record) {
        return Err(Reject::NotAnExtension(
            "its ELMs are not strictly ascending by record id",
        ));
    }
    if trusted.elms.iter().any(|e| !proposed.elms.contains(e)) {
        return Err(Reject::NotAnExtension("it drops an accepted ELM"));
    }
    let added: Vec<&AcceptedElm> = proposed
        .elms
        .iter()
        .filter(|e| !trusted.elms.contains(e))
        .collect();
    if added.is_empty() {
        return Err(Reject::NotAnExtension("it adds no ELM"));
    }
    Ok(added)
}

// --- single-signer records ---------------------------------------------------------------------

/// Decodes an envelope of a single-signer record (claim, ELM record, attestation) and checks
/// that it carries a valid signature by the key the record names (`signer`).
pub fn signed_by<R: Record>(
    bytes: &[u8],
    signer: impl FnOnce(&R) -> &PublicKey,
) -> Result<Signed<R>, Reject> {
    let envelope = Signed::<R>::decode(bytes)?;
    envelope.verify_by(signer(envelope.record()))?;
    Ok(envelope)
}

// --- ELM records -------------------------------------------------------------------------------

/// Whether an ELM record fits the forest of `registry`: its domain is one of the registry's
/// (`UnknownDomain`), the registry has a seed, and the record's architecture id and tokenizer
/// equal the seed's (`SeedMismatch`). The trainer's signature is the caller's to check (on the
/// envelope); the parents are [`parents_known`]'s.
pub fn elm_fits(registry: &Registry, elm: &ElmRecord) -> Result<(), Reject> {
    if registry.domain(&elm.domain).is_none() {
        return Err(Reject::UnknownDomain(elm.domain.clone()));
    }
    let Some(seed) = &registry.seed else {
        return Err(Reject::SeedMismatch("the registry has no seed yet"));
    };
    if elm.architecture != seed.architecture.id() {
        return Err(Reject::SeedMismatch("architecture differs from the seed's"));
    }
    if elm.tokenizer != seed.tokenizer {
        return Err(Reject::SeedMismatch("tokenizer differs from the seed's"));
    }
    if Some(elm.weights_size) != seed.architecture.weights_size() {
        return Err(Reject::SeedMismatch(
            "weights size is not the size the seed's architecture determines",
        ));
    }
    Ok(())
}

/// Whether every parent of an ELM record is the seed of `registry` or an ELM it accepted
/// (compared by weights id), else `UnknownParent` naming the first that is not. An ELM branched
/// from weights the maintainers never accepted does not enter the forest: the maintainers'
/// workflow (`accept-elm`) checks this, and so must a maintainer role accepting ELMs from the
/// network. Without a seed only accepted ELMs count.
pub fn parents_known(registry: &Registry, elm: &ElmRecord) -> Result<(), Reject> {
    let known = |w: &ContentId| {
        registry.seed.as_ref().is_some_and(|s| s.weights == *w)
            || registry.elms.iter().any(|a| a.weights == *w)
    };
    match elm.parents.iter().find(|p| !known(&p.weights)) {
        Some(p) => Err(Reject::UnknownParent(p.weights)),
        None => Ok(()),
    }
}

// --- claims ------------------------------------------------------------------------------------

/// The policy numbers of claim acceptance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimLimits {
    /// Longest lease a claim may ask for, in seconds after now (`u64::MAX`: no bound).
    pub max_lease_secs: u64,
    /// Longest a claim may hold its domain in total, renewals included
    /// (`lease_expires - first_claimed`).
    pub max_total_lease_secs: u64,
    /// How long (from the first claim) renewals may show no training progress: downloading
    /// and branching come first.
    pub grace_secs: u64,
}

/// Longest total hold of a domain by one claim: 12 hours.
pub const MAX_TOTAL_LEASE_SECS: u64 = 12 * 3600;
/// How far ahead of the receiver's clock a claim's first-claim time may be: clocks differ by a
/// few minutes, and a node that moves between domains within a second stamps the move a second
/// later (`specs/network.md`, 5.2).
pub const MAX_CLOCK_AHEAD_SECS: u64 = 10 * 60;

/// Renewals without progress are accepted for the first 30 minutes of a claim.
pub const CLAIM_GRACE_SECS: u64 = 30 * 60;

/// What an acceptable claim is to the claims already held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimFit {
    /// The node holds no live claim.
    New,
    /// A later lease for the live claim the node holds on the domain.
    Renewal,
    /// The node moves to this domain: its live claims on other domains, all first made
    /// before this one, are released (the caller deletes them). One live claim per node.
    Moves,
}

/// The claim's own bounds: its lease has not ended (`LeaseExpired`; a lease ending at `now`
/// has ended), it is at most `max_lease_secs` ahead of `now` (`LeaseTooLong`), it was first
/// made at most [`MAX_CLOCK_AHEAD_SECS`] after `now` (`FirstClaimAhead`), and its domain is
/// one of the registry's (`UnknownDomain`). The node's signature is the caller's to check.
pub fn claim_fits(
    registry: &Registry,
    claim: &Claim,
    max_lease_secs: u64,
    now: u64,
) -> Result<(), Reject> {
    if claim.lease_expires <= now {
        return Err(Reject::LeaseExpired {
            lease_expires: claim.lease_expires,
            now,
        });
    }
    if claim.lease_expires > now.saturating_add(max_lease_secs) {
        return Err(Reject::LeaseTooLong {
            lease_expires: claim.lease_expires,
            now,
            max: max_lease_secs,
        });
    }
    if claim.first_claimed > now.saturating_add(MAX_CLOCK_AHEAD_SECS) {
        return Err(Reject::FirstClaimAhead {
            first_claimed: claim.first_claimed,
            now,
        });
    }
    if registry.domain(&claim.domain).is_none() {
        return Err(Reject::UnknownDomain(claim.domain.clone()));
    }
    Ok(())
}

/// Whether a claim is acceptable, given the claims its node already holds (`held`: the claims
/// by `claim.node` that the deciding party holds; expired ones are ignored), the limits and
/// `now`: [`claim_fits`], and its total hold `lease_expires - first_claimed` at most
/// `max_total_lease_secs` (`LeaseCapped`). If the node holds a live claim on the domain, this
/// is a renewal: the lease must be later (`Stale`), the first-claim time the same
/// (`FirstClaimMoved`), and the progress no less, and past `grace_secs` from the first claim
/// strictly more, than the held claim's (`NoProgress`). Otherwise it is new, or a move from
/// the node's live claims on other domains, which must all have been first made before this
/// one (`Superseded`: the node has since moved on, so an older claim, or a renewal of one,
/// cannot come back). A node holds one live claim at a time, in every store and on the DHT:
/// whoever stores an accepted claim deletes the node's claims on other domains.
pub fn decide_claim(
    registry: &Registry,
    claim: &Claim,
    held: &[Claim],
    limits: &ClaimLimits,
    now: u64,
) -> Result<ClaimFit, Reject> {
    claim_fits(registry, claim, limits.max_lease_secs, now)?;
    let total = claim.lease_expires.saturating_sub(claim.first_claimed);
    if total > limits.max_total_lease_secs {
        return Err(Reject::LeaseCapped {
            first_claimed: claim.first_claimed,
            lease_expires: claim.lease_expires,
            max: limits.max_total_lease_secs,
        });
    }
    let live = held.iter().filter(|c| c.lease_expires > now);
    let (same, others): (Vec<&Claim>, Vec<&Claim>) = live.partition(|c| c.domain == claim.domain);
    let latest_other = others.iter().map(|c| c.first_claimed).max();
    if let Some(latest) = latest_other
        && latest >= claim.first_claimed
    {
        return Err(Reject::Superseded {
            domain: claim.domain.clone(),
            first_claimed: claim.first_claimed,
            latest,
        });
    }
    let Some(h) = same.into_iter().max_by_key(|c| c.lease_expires) else {
        return Ok(match latest_other {
            None => ClaimFit::New,
            Some(_) => ClaimFit::Moves,
        });
    };
    if h.lease_expires >= claim.lease_expires {
        return Err(Reject::Stale);
    }
    if h.first_claimed != claim.first_claimed {
        return Err(Reject::FirstClaimMoved {
            held: h.first_claimed,
            offered: claim.first_claimed,
        });
    }
    let step = |c: &Claim| c.progress.map(|p| p.step);
    let (old, new) = (step(h), step(claim));
    let in_grace = total <= limits.grace_secs;
    let advanced = match (old, new) {
        (_, None) => old.is_none() && in_grace,
        (None, Some(_)) => true,
        (Some(o), Some(n)) => n > o || (n == o && in_grace),
    };
    if !advanced {
        return Err(Reject::NoProgress {
            held: old.unwrap_or(0),
            offered: new,
        });
    }
    Ok(ClaimFit::Renewal)
}
