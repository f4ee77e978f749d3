//! Domain claims: a volunteer claims a domain with a signed lease that it renews while it
//! trains. Choosing is pure: functions of (board, input, now) -> decision.
//!
//! Rules (`specs/network.md`, "Claims"): a claim is live while `now < lease_expires`; expired
//! claims free their domain; a node holds one live claim (a claim on another domain, first
//! made later, moves it there and releases the domain it held; whether a peer's claim is
//! accepted, stale or superseded every node decides with `btm_registry::rules::decide_claim`,
//! called by the store and the DHT); a node choosing a
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
    /// Most live claims this node holds at once (the network keeps one per node: a second
    /// claim moves the first).
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

/// One node's claim on one domain, as the board keeps it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lease {
    /// Lease end (Unix seconds).
    pub expires: u64,
    /// When the node first claimed the domain (kept across renewals).
    pub first_claimed: u64,
    /// Training updates the claim shows (0 without progress).
    pub step: u64,
}

/// The live claims known to a node: domain -> node -> lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Board {
    leases: BTreeMap<String, BTreeMap<NodeId, Lease>>,
}

impl Board {
    /// A board from claims (expired ones are skipped; of one node's claims on one domain the
    /// latest lease counts).
    pub fn from_claims<'a>(claims: impl IntoIterator<Item = &'a Claim>, now: u64) -> Board {
        let mut b = Board::default();
        for c in claims {
            if c.lease_expires > now {
                let slot = b.leases.entry(c.domain.clone()).or_default();
                let lease = Lease {
                    expires: c.lease_expires,
                    first_claimed: c.first_claimed,
                    step: c.progress.map_or(0, |p| p.step),
                };
                let e = slot.entry(c.node).or_default();
                if lease.expires > e.expires {
                    *e = lease;
                }
            }
        }
        b
    }

    /// Live claims on `domain` at `now`, by nodes other than `except`.
    pub fn live(&self, domain: &str, now: u64, except: Option<&NodeId>) -> usize {
        self.leases.get(domain).map_or(0, |m| {
            m.iter()
                .filter(|(n, l)| l.expires > now && Some(*n) != except)
                .count()
        })
    }

    /// The most training progress (updates) any live claim on `domain` shows, by nodes other
    /// than `except`.
    pub fn progress(&self, domain: &str, now: u64, except: Option<&NodeId>) -> u64 {
        self.leases.get(domain).map_or(0, |m| {
            m.iter()
                .filter(|(n, l)| l.expires > now && Some(*n) != except)
                .map(|(_, l)| l.step)
                .max()
                .unwrap_or(0)
        })
    }

    /// Live claims held by `node`, as (domain, lease end).
    pub fn held_by(&self, node: &NodeId, now: u64) -> Vec<(String, u64)> {
        self.leases
            .iter()
            .filter_map(|(d, m)| {
                m.get(node)
                    .filter(|l| l.expires > now)
                    .map(|l| (d.clone(), l.expires))
            })
            .collect()
    }

    /// Forgets expired leases.
    pub fn prune(&mut self, now: u64) {
        for m in self.leases.values_mut() {
            m.retain(|_, l| l.expires > now);
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
    /// Every domain still without an ELM is claimed by someone else: claim and train this one
    /// too, the one whose claims show the least training progress. A claim is a reservation,
    /// not a lock: the registry accepts the better verified ELM, so holding claims without
    /// training wins nothing, and a newcomer never waits on squatters.
    CoTrain(String),
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
    if let Some(d) = open
        .iter()
        .filter(|d| board.live(d, now, Some(me)) == 0)
        .min_by_key(|d| rank(me, d))
    {
        return Choice::Free(d.to_string());
    }
    let least = open
        .iter()
        .min_by_key(|d| {
            (
                board.progress(d, now, Some(me)),
                board.live(d, now, Some(me)),
                rank(me, d),
            )
        })
        .map(|d| d.to_string());
    least.map_or(Choice::AllDone, Choice::CoTrain)
}

/// When several nodes claimed one domain, the one that keeps it: the live claim first made
/// (earliest `first_claimed`), then the smallest BLAKE3(node || domain) among claims made in
/// the same second. An earlier live claim is never displaced by a tie-break anyone can grind
/// (a key ground for a small hash only wins ties); backdating `first_claimed` is bounded by
/// the total-lease cap (`rules::MAX_TOTAL_LEASE_SECS`). Every node computes the same answer
/// from the same board, so the others can step aside without talking.
pub fn keeper(board: &Board, domain: &str, now: u64) -> Option<NodeId> {
    board
        .leases
        .get(domain)?
        .iter()
        .filter(|(_, l)| l.expires > now)
        .min_by_key(|(n, l)| (l.first_claimed, rank(n, domain)))
        .map(|(n, _)| *n)
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
            others.leases.entry(d.clone()).or_default().insert(
                *me,
                Lease {
                    expires: u64::MAX,
                    ..Lease::default()
                },
            );
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
            min_client_version: ClientVersion::new(0, 1, 0),
            domains: names
                .iter()
                .map(|n| Domain {
                    name: n.to_string(),
                    description: String::new(),
                    train: ContentId([1; 32]),
                    valid: ContentId([2; 32]),
                    test: ContentId([3; 32]),
                    eval: EvalSettings::public(8, 64, 10_000),
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
            first_claimed: 0,
            progress: None,
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
                first_claimed: 0,
                progress: None,
            }],
            10,
        );
        let pick = |now, done: &_| choose_open_domain(&board, &r, &me, now, done);
        done.insert("b".to_string());
        assert_eq!(pick(10, &done), Choice::Free("c".into()));
        done.insert("c".to_string());
        assert_eq!(pick(10, &done), Choice::CoTrain("a".into()));
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
                first_claimed: 0,
                progress: None,
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

    fn claim_at(d: &str, who: PublicKey, first: u64, lease: u64, step: Option<u64>) -> Claim {
        Claim {
            domain: d.into(),
            node: who,
            lease_expires: lease,
            first_claimed: first,
            progress: step.map(|s| btm_protocol::ClaimProgress {
                step: s,
                loss_milli: 3_000,
                checkpoint: ContentId::of(&s.to_le_bytes()),
            }),
        }
    }

    /// A key ground offline for the smallest BLAKE3(node || domain) of `domain`.
    fn ground_key(domain: &str, tries: u32) -> PublicKey {
        (0..tries)
            .map(|i| {
                let mut k = [0u8; 32];
                k[..4].copy_from_slice(&i.to_le_bytes());
                k[31] = 0xee;
                PublicKey(k)
            })
            .min_by_key(|k| rank(k, domain))
            .unwrap()
    }

    /// THREATS (issue 13): domain squatting. Sybils with ground keys claim every domain, one
    /// of them also the domain an honest node claimed a minute earlier. The honest claim keeps
    /// its domain (an earlier claim is not displaced by a ground key), and a newcomer does not
    /// wait for any lease: it co-trains the domain whose claims show the least progress.
    #[test]
    fn squatters_with_ground_keys_neither_displace_nor_block() {
        let names = ["a", "b", "c", "d"];
        let reg = registry(&names);
        let honest = node(7);
        let newcomer = node(8);
        let now = 1_000;
        let mut claims = vec![claim_at("a", honest, now - 60, now + 840, Some(40))];
        for d in names {
            let sybil = ground_key(d, 2_000);
            assert!(rank(&sybil, d) < rank(&honest, d), "the key was not ground");
            // Claimed now (later than the honest claim), no progress: holding, not training.
            claims.push(claim_at(d, sybil, now, now + 900, None));
        }
        // The honest node shows progress on a, the sybils none anywhere.
        let board = Board::from_claims(&claims, now);
        assert_eq!(keeper(&board, "a", now), Some(honest));
        let choice = choose_open_domain(&board, &reg, &newcomer, now, &Default::default());
        assert!(matches!(choice, Choice::CoTrain(_)), "{choice:?}");
        // Every domain is held; the newcomer joins one at once instead of waiting a lease. When
        // claims show (possibly fake) progress, it joins the one that shows the least.
        let mut progressed = claims.clone();
        for c in progressed.iter_mut().filter(|c| c.domain != "c") {
            c.progress = Some(btm_protocol::ClaimProgress {
                step: 500,
                loss_milli: 2_000,
                checkpoint: ContentId([9; 32]),
            });
        }
        let board = Board::from_claims(&progressed, now);
        assert_eq!(
            choose_open_domain(&board, &reg, &newcomer, now, &Default::default()),
            Choice::CoTrain("c".into()),
            "the domain whose claims show the least progress"
        );
        // Claims made in the same second: the tie-break decides, as before.
        let tie = Board::from_claims(
            &[
                claim_at("a", honest, now, now + 900, None),
                claim_at("a", ground_key("a", 2_000), now, now + 900, None),
            ],
            now,
        );
        assert_eq!(keeper(&tie, "a", now), Some(ground_key("a", 2_000)));
    }
}
