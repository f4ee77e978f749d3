//! Threshold acceptance among maintainers who each hold only their own keys.
//!
//! A registry version gathers signatures as a *proposal*: a registry envelope signed by fewer
//! maintainers than the root's threshold, gossiped on the proposals topic (any peer relays one
//! only if every signature on it is a trusted maintainer's, `rules::check_proposal`). A
//! maintainer co-signs a proposal only when its body adds to the trusted registry nothing but
//! ELMs this maintainer verified itself, on the public split and on its own withheld pool
//! (`rules::proposal_extends`, then its own checks); for the first registry, only when the body
//! is the one it builds itself from the same seed, data and settings. Whoever holds a body
//! signed by the threshold offers it as the registry.
//!
//! Safety: a maintainer signs at most one body per version, so two bodies of one version cannot
//! both reach the threshold through honest maintainers. Liveness: bodies are deterministic
//! (expiry rounded to the day), so maintainers who saw the same verdicts build the same body and
//! their signatures merge; a proposal that gathers no threshold within [`STUCK`] (plus
//! [`RANK_DELAY`] per rank) is given up, and its ELMs are proposed again at a later version; the
//! maintainer of rank r (its key's place in the root) waits r x [`RANK_DELAY`] before proposing,
//! so one usually proposes and the others co-sign.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use btm_protocol::{ContentId, PublicKey, Registry, Root, Signed, SigningKey};

/// How long a proposal may wait for co-signers before this maintainer gives up its version.
pub const STUCK: Duration = Duration::from_secs(45);
/// How long a maintainer of rank r waits (r times this) before proposing what it verified.
pub const RANK_DELAY: Duration = Duration::from_secs(15);
/// How often an unfinished proposal is gossiped again (the gossip drops a repeat of the same
/// bytes for a minute; a proposal with more signatures is new bytes).
pub const RESEND: Duration = Duration::from_secs(10);
/// How long `publish` waits for the other maintainers to co-sign the first registry.
pub const GENESIS_WAIT: Duration = Duration::from_secs(600);

/// The expiry of a registry built `now` to live `days`: rounded down to the day, so that
/// maintainers building the same registry on the same day build the same bytes.
pub fn expiry(now: u64, days: u64) -> u64 {
    (now / 86_400 + days.max(1)) * 86_400
}

/// Whether `keys` alone meet `root`'s threshold (then no proposal is needed).
pub fn keys_meet_threshold(keys: &[SigningKey], root: &Root) -> bool {
    let mine: BTreeSet<PublicKey> = keys
        .iter()
        .map(PublicKey::of)
        .filter(|k| root.keys.contains(k))
        .collect();
    mine.len() >= root.threshold as usize
}

/// This maintainer's rank: the first place of one of its keys among the root's (sorted) keys.
pub fn rank(keys: &[SigningKey], root: &Root) -> u32 {
    let mine: Vec<PublicKey> = keys.iter().map(PublicKey::of).collect();
    root.keys
        .iter()
        .position(|k| mine.contains(k))
        .map_or(u32::MAX, |p| u32::try_from(p).unwrap_or(u32::MAX))
}

/// Whether two registries say the same apart from their version and expiry.
pub fn same_content(a: &Registry, b: &Registry) -> bool {
    a.domains == b.domains
        && a.seed == b.seed
        && a.min_client_version == b.min_client_version
        && a.elms == b.elms
}

/// Adds to `into` the signatures of `from` (the same body) by keys it does not carry yet.
pub fn merge(into: &mut Signed<Registry>, from: &Signed<Registry>) {
    if into.id() != from.id() {
        return;
    }
    for sig in from.signatures() {
        if !into.signatures().iter().any(|s| s.key == sig.key) && into.verifies(sig) {
            into.push_signature(*sig);
        }
    }
}

/// A proposal this maintainer holds: its own, or one it co-signed.
#[derive(Debug, Clone)]
pub struct Held {
    pub env: Signed<Registry>,
    pub since: Instant,
    pub sent: Option<Instant>,
}

/// What a maintainer remembers between proposals.
#[derive(Debug, Default)]
pub struct Council {
    /// The body this maintainer signed at each version: never two per version.
    pub signed: BTreeMap<u64, ContentId>,
    /// The proposal it pushes, with every co-signer's signature merged in.
    pub held: Option<Held>,
    /// A foreign proposal waiting for this node's own verdicts on its ELMs, since when.
    pub waiting: Option<Held>,
    /// Bodies this maintainer will not sign (an ELM failed its own checks).
    pub refused: BTreeSet<ContentId>,
    /// The highest proposal version seen.
    pub seen: u64,
    /// The first registry this maintainer builds, while none is trusted.
    pub genesis: Option<Registry>,
    /// Since when it has had something to propose (for the rank delay).
    pub wanting_since: Option<Instant>,
    /// Where `signed` is kept across restarts, once loaded from there.
    pub file: Option<std::path::PathBuf>,
}

/// The file in a maintainer node's data directory that remembers what it signed.
pub const SIGNED_FILE: &str = "maintainer-signed.json";

impl Council {
    /// Remembers what was signed in `file` from now on, after reading what it already holds
    /// (a restarted maintainer must not sign a second body at a version it signed before).
    /// An unreadable file is an error: signing on without it could equivocate.
    pub fn attach(&mut self, file: &std::path::Path) -> Result<(), String> {
        if self.file.is_some() {
            return Ok(());
        }
        match std::fs::read(file) {
            Ok(bytes) => {
                let held: BTreeMap<u64, String> = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                for (v, id) in held {
                    let id = id
                        .parse::<ContentId>()
                        .map_err(|e| format!("{}: {e}", file.display()))?;
                    self.signed.entry(v).or_insert(id);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", file.display())),
        }
        self.file = Some(file.to_path_buf());
        self.save()
    }

    /// Writes `signed` to the attached file (atomically).
    fn save(&self) -> Result<(), String> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let held: BTreeMap<u64, String> = self
            .signed
            .iter()
            .map(|(v, id)| (*v, id.to_string()))
            .collect();
        let bytes = serde_json::to_vec_pretty(&held).map_err(|e| e.to_string())?;
        btm_model::fsutil::write_atomic(file, &bytes).map_err(|e| e.to_string())
    }

    /// Signs `env` with `keys` unless this maintainer signed another body at its version.
    pub fn sign(&mut self, env: &mut Signed<Registry>, keys: &[SigningKey]) -> bool {
        let v = env.record().version;
        let id = env.id();
        if self.signed.get(&v).is_some_and(|s| *s != id) {
            return false;
        }
        for k in keys {
            env.sign(k);
        }
        let before = self.signed.insert(v, id);
        // Old versions need not be remembered once far behind.
        while self.signed.len() > 256 {
            self.signed.pop_first();
        }
        if before.is_none()
            && let Err(e) = self.save()
        {
            // Not remembered: do not count this signature as given.
            tracing::warn!(error = %e, "cannot remember a signed registry version; not signing");
            self.signed.remove(&v);
            env.clear_signatures();
            return false;
        }
        true
    }

    /// The version a new proposal takes: past the trusted one, every one seen, every one signed.
    pub fn next_version(&self, trusted: u64) -> u64 {
        let signed = self.signed.last_key_value().map_or(0, |(v, _)| *v);
        trusted.max(self.seen).max(signed).saturating_add(1)
    }

    /// Forgets what the trusted registry (version `trusted`) made moot.
    pub fn settle(&mut self, trusted: u64) {
        if self
            .held
            .as_ref()
            .is_some_and(|h| h.env.record().version <= trusted)
        {
            self.held = None;
        }
        if self
            .waiting
            .as_ref()
            .is_some_and(|w| w.env.record().version <= trusted)
        {
            self.waiting = None;
        }
        if self.refused.len() > 1024 {
            self.refused.clear();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use btm_protocol::{ClientVersion, test_key};

    fn registry(version: u64, expires: u64) -> Registry {
        Registry {
            version,
            expires,
            min_client_version: ClientVersion::new(0, 1, 0),
            domains: vec![],
            seed: None,
            elms: vec![],
        }
    }

    #[test]
    fn one_body_per_version_and_signatures_merge() {
        let (a, b) = (test_key("council a"), test_key("council b"));
        let mut c = Council::default();
        let mut one = Signed::new(registry(2, 100));
        assert!(c.sign(&mut one, std::slice::from_ref(&a)));
        // The same body again is fine; another body of version 2 is not.
        assert!(c.sign(&mut Signed::new(registry(2, 100)), std::slice::from_ref(&a)));
        assert!(!c.sign(&mut Signed::new(registry(2, 200)), std::slice::from_ref(&a)));
        assert_eq!(c.next_version(1), 3);
        c.seen = 7;
        assert_eq!(c.next_version(1), 8);
        // B signs the same body elsewhere; merging adds B's signature once, and nothing of
        // another body.
        let mut theirs = Signed::new(registry(2, 100));
        theirs.sign(&b);
        merge(&mut one, &theirs);
        merge(&mut one, &theirs);
        assert_eq!(one.signatures().len(), 2);
        let mut other = Signed::new(registry(2, 200));
        other.sign(&b);
        merge(&mut one, &other);
        assert_eq!(one.signatures().len(), 2);
    }

    /// A restarted maintainer remembers what it signed: it does not sign another body at a
    /// version it signed before the restart.
    #[test]
    fn what_was_signed_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(SIGNED_FILE);
        let a = test_key("council a");
        let mut c = Council::default();
        c.attach(&file).expect("attach");
        assert!(c.sign(&mut Signed::new(registry(2, 100)), std::slice::from_ref(&a)));
        let mut restarted = Council::default();
        restarted.attach(&file).expect("attach again");
        assert!(!restarted.sign(&mut Signed::new(registry(2, 200)), std::slice::from_ref(&a)));
        assert!(restarted.sign(&mut Signed::new(registry(2, 100)), std::slice::from_ref(&a)));
        assert_eq!(restarted.next_version(1), 3);
        // A damaged file is an error, not a fresh start.
        std::fs::write(&file, b"not json").expect("write");
        assert!(Council::default().attach(&file).is_err());
    }

    #[test]
    fn expiry_is_the_same_all_day_and_rank_follows_the_root() {
        let day = 20_000 * 86_400;
        assert_eq!(expiry(day + 1, 30), expiry(day + 86_399, 30));
        assert!(expiry(day + 86_399, 0) > day + 86_399);
        let (a, b) = (test_key("council a"), test_key("council b"));
        let mut keys = vec![PublicKey::of(&a), PublicKey::of(&b)];
        keys.sort();
        let root = Root {
            version: 1,
            expires: u64::MAX,
            threshold: 2,
            keys: keys.clone(),
        };
        let ranks = [
            rank(std::slice::from_ref(&a), &root),
            rank(std::slice::from_ref(&b), &root),
        ];
        assert_eq!(ranks.iter().copied().collect::<BTreeSet<_>>().len(), 2);
        assert!(ranks.contains(&0) && ranks.contains(&1));
        assert!(!keys_meet_threshold(std::slice::from_ref(&a), &root));
        assert!(keys_meet_threshold(&[a.clone(), b], &root));
        assert!(!keys_meet_threshold(&[a.clone(), a], &root));
    }
}
