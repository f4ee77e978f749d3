//! Domain claims: a volunteer claims a domain with a signed lease that it renews while it
//! trains. Choosing is pure: functions of (board, input, now) -> decision.
//!
//! Rules (`specs/network.md`, "Claims"): a claim is live while `now < lease_expires`; expired
//! claims free their domain; a node holds at most `max_own_claims` live claims (its own
//! restraint; whether a peer's claim is accepted, stale or over the quota every node enforces
//! is `btm_registry::rules::decide_claim`, called by the store and the DHT); a node choosing a
//! domain picks, among the registry's domains, one with the fewest live claims by *other*
//! nodes, ties broken by BLAKE3(node || domain) so that simultaneous choosers spread out
//! instead of all picking the first name.

use std::collections::BTreeMap;

use btm_protocol::{Claim, NodeId, Registry};

/// Claim timing and quotas.
#[derive(Debug, Clone, Copy)]
pub struct ClaimPolicy {
    /// Lease length asked for, in seconds.
    pub lease_secs: u64,
    /// Renew when less than this much of the lease is left.
    pub renew_before_secs: u64,
    /// Most live claims this node holds at once.
    pub max_own_claims: usize,
}

impl Default for ClaimPolicy {
    fn default() -> Self {
        ClaimPolicy {
            lease_secs: 15 * 60,
            renew_before_secs: 5 * 60,
            max_own_claims: 1,
        }
    }
}

/// The live claims known to a node: domain -> node -> lease end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Board {
    leases: BTreeMap<String, BTreeMap<NodeId, u64>>,
}

impl Board {
    /// A board from claims (expired ones are skipped).
    pub fn from_claims<'a>(claims: impl IntoIterator<Item = &'a Claim>, now: u64) -> Board {
        let mut b = Board::default();
        for c in claims {
            if c.lease_expires > now {
                let slot = b.leases.entry(c.domain.clone()).or_default();
                let e = slot.entry(c.node).or_insert(0);
                *e = (*e).max(c.lease_expires);
            }
        }
        b
    }

    /// Live claims on `domain` at `now`, by nodes other than `except`.
    pub fn live(&self, domain: &str, now: u64, except: Option<&NodeId>) -> usize {
        self.leases.get(domain).map_or(0, |m| {
            m.iter()
                .filter(|(n, l)| **l > now && Some(*n) != except)
                .count()
        })
    }

    /// Live claims held by `node`, as (domain, lease end).
    pub fn held_by(&self, node: &NodeId, now: u64) -> Vec<(String, u64)> {
        self.leases
            .iter()
            .filter_map(|(d, m)| m.get(node).filter(|l| **l > now).map(|l| (d.clone(), *l)))
            .collect()
    }

    /// Forgets expired leases.
    pub fn prune(&mut self, now: u64) {
        for m in self.leases.values_mut() {
            m.retain(|_, l| *l > now);
        }
        self.leases.retain(|_, m| !m.is_empty());
    }
}

/// Which domain `me` should claim: among the registry's domains, fewest live claims by others,
/// then the smallest BLAKE3(me || domain). `None` if the registry has no domains.
pub fn choose_domain(board: &Board, registry: &Registry, me: &NodeId, now: u64) -> Option<String> {
    registry
        .domains
        .iter()
        .map(|d| {
            (
                board.live(&d.name, now, Some(me)),
                rank(me, &d.name),
                d.name.clone(),
            )
        })
        .min()
        .map(|(_, _, name)| name)
}

/// The tie-break rank of `node` on `domain`: BLAKE3(node || domain), smallest first.
fn rank(node: &NodeId, domain: &str) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(node.as_bytes());
    h.update(domain.as_bytes());
    *h.finalize().as_bytes()
}

/// What a volunteer looking for work should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Claim this domain: no other node holds a live claim on it.
    Free(String),
    /// Every domain still without an ELM is claimed by someone else: wait for a lease to lapse.
    AllClaimed,
    /// Every domain of the registry already has an ELM.
    AllDone,
}

/// Like [`choose_domain`], for volunteers: skips the domains in `done` (they have an ELM) and
/// only offers a domain no other node holds a live claim on; ties broken by
/// BLAKE3(me || domain) so that simultaneous choosers spread out.
pub fn choose_open_domain(
    board: &Board,
    registry: &Registry,
    me: &NodeId,
    now: u64,
    done: &std::collections::BTreeSet<String>,
) -> Choice {
    let open: Vec<&str> = registry
        .domains
        .iter()
        .map(|d| d.name.as_str())
        .filter(|d| !done.contains(*d))
        .collect();
    if open.is_empty() {
        return Choice::AllDone;
    }
    open.iter()
        .filter(|d| board.live(d, now, Some(me)) == 0)
        .min_by_key(|d| rank(me, d))
        .map_or(Choice::AllClaimed, |d| Choice::Free(d.to_string()))
}

/// When several nodes claimed one domain at about the same time, the one that keeps it: the
/// live claimant with the smallest BLAKE3(node || domain). Every node computes the same answer
/// from the same board, so the others can step aside without talking.
pub fn keeper(board: &Board, domain: &str, now: u64) -> Option<NodeId> {
    board
        .leases
        .get(domain)?
        .iter()
        .filter(|(_, l)| **l > now)
        .map(|(n, _)| *n)
        .min_by_key(|n| rank(n, domain))
}

/// What a node should do about its own claims now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Claim this domain with a lease until the given time.
    Claim { domain: String, lease_expires: u64 },
    /// Renew the lease on this domain until the given time.
    Renew { domain: String, lease_expires: u64 },
    /// Nothing to do.
    Wait,
}

/// The next action for `me`: renew a lease that is about to end, or claim a new domain while
/// below the quota (and training wants one: `wants_new`).
pub fn next_action(
    board: &Board,
    registry: &Registry,
    me: &NodeId,
    policy: &ClaimPolicy,
    now: u64,
    wants_new: bool,
) -> Action {
    let held = board.held_by(me, now);
    if let Some((domain, _)) = held
        .iter()
        .filter(|(_, l)| l.saturating_sub(now) < policy.renew_before_secs)
        .min_by_key(|(_, l)| *l)
    {
        return Action::Renew {
            domain: domain.clone(),
            lease_expires: now + policy.lease_secs,
        };
    }
    if wants_new && held.len() < policy.max_own_claims {
        let mut others = board.clone();
        for (d, _) in &held {
            // Never pick a domain we already hold.
            others
                .leases
                .entry(d.clone())
                .or_default()
                .insert(*me, u64::MAX);
        }
        let free: Vec<_> = registry
            .domains
            .iter()
            .filter(|d| !held.iter().any(|(h, _)| *h == d.name))
            .cloned()
            .collect();
        let reg = Registry {
            domains: free,
            ..registry.clone()
        };
        if let Some(domain) = choose_domain(&others, &reg, me, now) {
            return Action::Claim {
                domain,
                lease_expires: now + policy.lease_secs,
            };
        }
    }
    Action::Wait
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use btm_protocol::{ClientVersion, ContentId, Domain, EvalSettings, PublicKey};

    fn registry(names: &[&str]) -> Registry {
        Registry {
            version: 1,
            expires: u64::MAX,
            min_client_version: ClientVersion {
                major: 0,
                minor: 1,
                patch: 0,
            },
            domains: names
                .iter()
                .map(|n| Domain {
                    name: n.to_string(),
                    description: String::new(),
                    train: ContentId([1; 32]),
                    valid: ContentId([2; 32]),
                    test: ContentId([3; 32]),
                    eval: EvalSettings {
                        block_size: 8,
                        max_eval_tokens: 64,
                        ppl_tolerance_ppm: 10_000,
                    },
                })
                .collect(),
            seed: None,
            elms: vec![],
        }
    }

    fn node(n: u8) -> NodeId {
        PublicKey([n; 32])
    }

    fn claim(d: &str, n: u8, lease: u64) -> Claim {
        Claim {
            domain: d.into(),
            node: PublicKey([n; 32]),
            lease_expires: lease,
        }
    }

    #[test]
    fn fewest_live_claims_wins_and_expiry_frees() {
        let reg = registry(&["a", "b", "c"]);
        let me = PublicKey([9; 32]);
        let claims = [
            claim("a", 1, 200),
            claim("b", 2, 200),
            claim("b", 3, 200),
            claim("c", 4, 50),
        ];
        let board = Board::from_claims(&claims, 100);
        // c's only claim expired at 50: c is free.
        assert_eq!(choose_domain(&board, &reg, &me, 100).unwrap(), "c");
        // At 250 every lease has ended: any domain, chosen by the hash tie-break.
        let later = choose_domain(&board, &reg, &me, 250).unwrap();
        assert!(reg.domain(&later).is_some());
    }

    #[test]
    fn renew_before_the_lease_ends_and_claim_below_quota() {
        let reg = registry(&["a", "b"]);
        let me = PublicKey([1; 32]);
        let policy = ClaimPolicy {
            lease_secs: 100,
            renew_before_secs: 30,
            max_own_claims: 1,
        };
        let empty = Board::default();
        assert!(matches!(
            next_action(&empty, &reg, &me, &policy, 0, true),
            Action::Claim { .. }
        ));
        assert_eq!(
            next_action(&empty, &reg, &me, &policy, 0, false),
            Action::Wait
        );
        let held = Board::from_claims(&[claim("a", 1, 100)], 0);
        assert_eq!(
            next_action(&held, &reg, &me, &policy, 50, true),
            Action::Wait
        );
        assert_eq!(
            next_action(&held, &reg, &me, &policy, 80, true),
            Action::Renew {
                domain: "a".into(),
                lease_expires: 180
            }
        );
    }

    #[test]
    fn simultaneous_choosers_spread_out() {
        let reg = registry(&["a", "b", "c", "d", "e", "f", "g", "h"]);
        let board = Board::default();
        let picks: std::collections::BTreeSet<_> = (0..8u8)
            .map(|i| choose_domain(&board, &reg, &PublicKey([i; 32]), 0).unwrap())
            .collect();
        assert!(picks.len() >= 3, "eight nodes all picked among {picks:?}");
    }

    #[test]
    fn open_domains_skip_done_and_claimed_ones() {
        let r = registry(&["a", "b", "c"]);
        let me = node(1);
        let other = node(2);
        let mut done = std::collections::BTreeSet::new();
        let board = Board::from_claims(
            &[Claim {
                domain: "a".into(),
                node: other,
                lease_expires: 100,
            }],
            10,
        );
        let pick = |now, done: &_| choose_open_domain(&board, &r, &me, now, done);
        done.insert("b".to_string());
        assert_eq!(pick(10, &done), Choice::Free("c".into()));
        done.insert("c".to_string());
        assert_eq!(pick(10, &done), Choice::AllClaimed);
        // The lease lapses: the domain is free again.
        assert_eq!(pick(100, &done), Choice::Free("a".into()));
        done.insert("a".to_string());
        assert_eq!(pick(10, &done), Choice::AllDone);
    }

    #[test]
    fn one_keeper_per_contested_domain() {
        let claims: Vec<Claim> = (1..=4)
            .map(|i| Claim {
                domain: "a".into(),
                node: node(i),
                lease_expires: 100,
            })
            .collect();
        let board = Board::from_claims(&claims, 10);
        let k = keeper(&board, "a", 10).unwrap();
        // The same from any subset containing the keeper, in any order.
        let mut rev = claims.clone();
        rev.reverse();
        assert_eq!(keeper(&Board::from_claims(&rev, 10), "a", 10), Some(k));
        assert_eq!(keeper(&board, "a", 100), None);
        assert_eq!(keeper(&board, "b", 10), None);
    }
}
