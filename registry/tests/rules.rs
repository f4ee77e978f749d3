//! The record rules as pure functions: claims, ELM fit, ELM parents.

use btm_protocol::*;
use btm_registry::{ClaimFit, ClaimLimits, Reject, decide_claim, elm_fits, parents_known};

use crate::common::*;

/// The claims in `held` by `node`, as the rule takes them.
fn held_by(held: &[Claim], node: &NodeId) -> Vec<Claim> {
    held.iter().filter(|c| c.node == *node).cloned().collect()
}

/// Issue 13: one live claim per node. A claim on another domain is a move (it releases the
/// node's other domains) when first made after them; a claim on a domain the node has since
/// moved away from, or a renewal of one, is superseded.
#[test]
fn claims_stale_unknown_expired_and_one_per_node() {
    // (Moved from btm-net's claim board, whose `offer` only its tests used.)
    let mut reg = registry(1, "");
    reg.domains.push(domain("math"));
    let limits = limits(u64::MAX, u64::MAX, u64::MAX);
    let mut held: Vec<Claim> = Vec::new();
    let mut offer = |c: Claim, now: u64| {
        let decision = decide_claim(&reg, &c, &held_by(&held, &c.node), &limits, now);
        if decision.is_ok() {
            // Whoever stores an accepted claim deletes the node's others.
            held.retain(|h| h.node != c.node);
            held.push(c);
        }
        decision
    };
    let first = |c: Claim, first_claimed: u64| Claim { first_claimed, ..c };
    assert_eq!(offer(claim(1, "legal", 200), 100), Ok(ClaimFit::New));
    assert_eq!(offer(claim(1, "legal", 150), 100), Err(Reject::Stale));
    assert_eq!(offer(claim(1, "legal", 200), 100), Err(Reject::Stale));
    assert_eq!(offer(claim(1, "legal", 300), 100), Ok(ClaimFit::Renewal));
    // A second domain first claimed no later than the held one: refused, not a second claim.
    assert_eq!(
        offer(claim(1, "code", 300), 100),
        Err(Reject::Superseded {
            domain: "code".into(),
            first_claimed: 0,
            latest: 0
        })
    );
    // First claimed later: the node moves, and legal is released.
    assert_eq!(
        offer(first(claim(1, "code", 300), 5), 100),
        Ok(ClaimFit::Moves)
    );
    // The old domain cannot come back, not even as a renewal with a later lease.
    assert_eq!(
        offer(claim(1, "legal", 400), 100),
        Err(Reject::Superseded {
            domain: "legal".into(),
            first_claimed: 0,
            latest: 5
        })
    );
    // Another node is not affected.
    assert_eq!(offer(claim(3, "legal", 300), 100), Ok(ClaimFit::New));
    assert_eq!(
        offer(claim(2, "zz", 300), 100),
        Err(Reject::UnknownDomain("zz".into()))
    );
    assert_eq!(offer(claim(2, "legal", 90), 100), lapsed(90, 100));
    assert_eq!(offer(claim(2, "legal", 100), 100), lapsed(100, 100));
    // A first claim further ahead than clocks differ (a node that hopped domains every second
    // for ten minutes) is refused.
    assert_eq!(
        offer(first(claim(5, "math", 300), 100 + 601), 100),
        Err(Reject::FirstClaimAhead {
            first_claimed: 701,
            now: 100
        })
    );
    assert_eq!(
        offer(first(claim(5, "math", 300), 100 + 600), 100),
        Ok(ClaimFit::New)
    );
    // After the lease ends the node is free again, and an ended lease is no renewal.
    assert_eq!(offer(claim(1, "math", 900), 400), Ok(ClaimFit::New));
    assert_eq!(offer(claim(1, "legal", 250), 400), lapsed(250, 400));
}

/// Claim limits: lease horizon, total hold, grace without progress.
fn limits(lease: u64, total: u64, grace: u64) -> ClaimLimits {
    ClaimLimits {
        max_lease_secs: lease,
        max_total_lease_secs: total,
        grace_secs: grace,
    }
}

#[test]
fn claim_lease_horizon() {
    let reg = registry(1, "");
    let limits = limits(3600, u64::MAX, u64::MAX);
    let at = |lease| decide_claim(&reg, &claim(1, "legal", lease), &[], &limits, NOW);
    assert_eq!(at(NOW + 3600), Ok(ClaimFit::New));
    assert_eq!(
        at(NOW + 3601),
        Err(Reject::LeaseTooLong {
            lease_expires: NOW + 3601,
            now: NOW,
            max: 3600
        })
    );
    // No bound: any future lease, even the last second of time.
    let unbounded = ClaimLimits {
        max_lease_secs: u64::MAX,
        ..limits
    };
    assert_eq!(
        decide_claim(&reg, &claim(1, "legal", u64::MAX), &[], &unbounded, NOW),
        Ok(ClaimFit::New)
    );
}

#[test]
fn elm_fits_the_seed_and_a_domain() {
    let reg = registry(1, "");
    assert_eq!(elm_fits(&reg, &elm(3, 1)), Ok(()));
    let mut other = elm(3, 1);
    other.domain = "math".into();
    assert_eq!(
        elm_fits(&reg, &other),
        Err(Reject::UnknownDomain("math".into()))
    );
    let mut arch = elm(3, 1);
    arch.architecture = ContentId::of(b"another shape");
    assert!(matches!(
        elm_fits(&reg, &arch),
        Err(Reject::SeedMismatch(_))
    ));
    let mut tok = elm(3, 1);
    tok.tokenizer = ContentId::of(b"another tokenizer");
    assert!(matches!(elm_fits(&reg, &tok), Err(Reject::SeedMismatch(_))));
    let seedless = Registry { seed: None, ..reg };
    assert!(matches!(
        elm_fits(&seedless, &elm(3, 1)),
        Err(Reject::SeedMismatch(_))
    ));
}

#[test]
fn parents_are_the_seed_or_accepted_elms() {
    let mut reg = registry(1, "");
    let first = elm(3, 1);
    assert_eq!(parents_known(&reg, &first), Ok(()));
    let mut child = elm(3, 2);
    child.parents = Parent::from_weights(&[(seed().weights, 1.0), (first.weights, 2.0)]).unwrap();
    assert_eq!(
        parents_known(&reg, &child),
        Err(Reject::UnknownParent(first.weights))
    );
    reg.elms.push(AcceptedElm {
        record: first.id(),
        domain: first.domain.clone(),
        weights: first.weights,
    });
    assert_eq!(parents_known(&reg, &child), Ok(()));
    // Without a seed only accepted ELMs are parents.
    let seedless = Registry { seed: None, ..reg };
    assert_eq!(
        parents_known(&seedless, &child),
        Err(Reject::UnknownParent(seed().weights))
    );
}

/// THREATS: envelopes built to cost signature checks. 64 invalid signatures under one listed
/// key, or more signatures than the root lists keys: refused before any signature is verified
/// (the tally of a refusal that verified nothing is empty).
#[test]
fn repeated_signers_are_refused_before_any_signature_is_verified() {
    use btm_registry::{Decision, Trusted, decide_registry, decide_root, tally};
    let now = NOW;
    let trusted = Trusted {
        root: signed(root(1, &[1, 2, 3], 2), &[1, 2, 3]),
        registry: None,
    };
    let verified = |d: &Decision<Signed<Registry>>| match d {
        Decision::Reject(Reject::BelowThreshold { tally, .. }) => tally.valid + tally.invalid,
        _ => 0,
    };
    // One listed key, 64 bad signatures.
    let mut env = Signed::new(registry(1, "costly"));
    for i in 0..MAX_SIGNATURES {
        let mut sig = Signature::create(Kind::Registry, env.body(), &key(1));
        sig.bytes[(i % 60) + 1] ^= 0x10;
        env.push_signature(sig);
    }
    let d = decide_registry(&trusted, &env.encode(), now);
    assert!(matches!(d, Decision::Reject(_)), "{d:?}");
    assert_eq!(
        verified(&d),
        0,
        "verified signatures of a repeated key: {d:?}"
    );
    assert!(
        matches!(d, Decision::Reject(Reject::RepeatedSigner(_))),
        "{d:?}"
    );
    // Two valid signatures by listed keys, a third key repeated: refused as a whole.
    let mut env = Signed::new(registry(1, "repeat"));
    env.sign(&key(1));
    env.sign(&key(2));
    env.push_signature(Signature::create(Kind::Registry, env.body(), &key(2)));
    let d = decide_registry(&trusted, &env.encode(), now);
    assert!(matches!(d, Decision::Reject(_)), "{d:?}");
    assert_eq!(verified(&d), 0, "{d:?}");
    // More signatures than the root lists keys (distinct, unknown ones included).
    let mut env = Signed::new(registry(1, "many"));
    for i in 1..=5 {
        env.sign(&key(i));
    }
    let d = decide_registry(&trusted, &env.encode(), now);
    assert!(matches!(d, Decision::Reject(_)), "{d:?}");
    assert_eq!(verified(&d), 0, "{d:?}");
    // The same checks guard root rotation.
    let mut next = Signed::new(root(2, &[1, 2, 3], 2));
    for _ in 0..8 {
        next.push_signature(Signature::create(Kind::Root, next.body(), &key(1)));
    }
    let d = decide_root(&trusted.root, &next.encode());
    let root_verified = match &d {
        Decision::Reject(Reject::BelowThreshold { tally, .. }) => tally.valid + tally.invalid,
        _ => 0,
    };
    assert!(matches!(d, Decision::Reject(_)), "{d:?}");
    assert_eq!(root_verified, 0, "{d:?}");
    // A well-formed envelope is still tallied as before.
    let mut ok = Signed::new(registry(1, "fine"));
    ok.sign(&key(1));
    ok.sign(&key(3));
    assert_eq!(tally(&ok, &trusted.root.record().keys).valid, 2);
    assert!(matches!(
        decide_registry(&trusted, &ok.encode(), now),
        Decision::Accept(_)
    ));
}

/// Issue 13, claims that cannot be squatted: a lease renews only with the same first-claim
/// time and, past the grace period, more training progress; the total hold is capped, so a
/// backdated first claim is refused too.
#[test]
fn claims_renew_only_with_progress_and_are_capped() {
    let reg = registry(1, "");
    let limits = limits(900, 3600, 1800);
    let t0 = NOW;
    let c = |lease: u64, first: u64, step: Option<u64>| Claim {
        progress: step.map(|s| ClaimProgress {
            step: s,
            loss_milli: 3_000,
            checkpoint: ContentId::of(&s.to_le_bytes()),
        }),
        first_claimed: first,
        ..claim(1, "legal", lease)
    };
    let first = c(t0 + 900, t0, None);
    assert_eq!(
        decide_claim(&reg, &first, &[], &limits, t0),
        Ok(ClaimFit::New)
    );
    let held = [first.clone()];
    // Within the grace period a renewal needs no progress.
    assert_eq!(
        decide_claim(&reg, &c(t0 + 1200, t0, None), &held, &limits, t0 + 300),
        Ok(ClaimFit::Renewal)
    );
    // The first-claim time cannot move.
    assert_eq!(
        decide_claim(&reg, &c(t0 + 1200, t0 + 10, None), &held, &limits, t0 + 300),
        Err(Reject::FirstClaimMoved {
            held: t0,
            offered: t0 + 10
        })
    );
    // Past the grace period: progress or no renewal.
    let late = c(t0 + 1700, t0, Some(100));
    let renew = |step: Option<u64>| {
        decide_claim(
            &reg,
            &c(t0 + 2400, t0, step),
            std::slice::from_ref(&late),
            &limits,
            t0 + 1500,
        )
    };
    assert_eq!(
        renew(None),
        Err(Reject::NoProgress {
            held: 100,
            offered: None
        })
    );
    assert_eq!(
        renew(Some(100)),
        Err(Reject::NoProgress {
            held: 100,
            offered: Some(100)
        })
    );
    assert_eq!(renew(Some(180)), Ok(ClaimFit::Renewal));
    // The total hold is capped, progress or not.
    assert_eq!(
        decide_claim(
            &reg,
            &c(t0 + 3700, t0, Some(900)),
            &[late],
            &limits,
            t0 + 2900
        ),
        Err(Reject::LeaseCapped {
            first_claimed: t0,
            lease_expires: t0 + 3700,
            max: 3600
        })
    );
    // A new claim backdated to look earlier than everyone else's is refused by the same cap.
    assert_eq!(
        decide_claim(&reg, &c(t0 + 900, t0 - 3000, None), &[], &limits, t0),
        Err(Reject::LeaseCapped {
            first_claimed: t0 - 3000,
            lease_expires: t0 + 900,
            max: 3600
        })
    );
}

/// The rejection of a claim whose lease ended at `lease_expires`, offered at `now`.
fn lapsed(lease_expires: u64, now: u64) -> Result<ClaimFit, Reject> {
    Err(Reject::LeaseExpired { lease_expires, now })
}

/// Issue 13: acceptance needs a threshold of maintainers. A proposal (a registry on its way to
/// the threshold) is relayed only when every signature on it is a trusted maintainer's, and a
/// co-signer signs only a body that adds ELMs to the trusted registry and changes nothing else.
#[test]
fn proposals_carry_only_maintainer_signatures_and_only_add_elms() {
    use btm_registry::{Tally, Trusted, check_proposal, proposal_extends, threshold_met};
    let root = signed(root(1, &[1, 2, 3], 2), &[1, 2, 3]);
    let v1 = signed(registry(1, ""), &[1, 2]);
    let trusted = Trusted {
        root: root.clone(),
        registry: Some(v1.clone()),
    };
    let accepted = |i: u8| AcceptedElm {
        record: ContentId([i; 32]),
        domain: "legal".into(),
        weights: ContentId([i + 100; 32]),
    };
    let mut body = registry(2, "");
    body.elms = vec![accepted(1)];
    let check = |env: &Signed<Registry>| check_proposal(&trusted, &env.encode(), NOW);

    // One maintainer's signature: a proposal, not yet a registry.
    let one = signed(body.clone(), &[1]);
    assert!(check(&one).is_ok());
    assert!(!threshold_met(&one, root.record()));
    assert!(threshold_met(&signed(body.clone(), &[1, 3]), root.record()));
    // No signature, a stranger's, or a forged one: refused (a stranger cannot propose).
    let tally = |valid, invalid, unknown| Tally {
        valid,
        invalid,
        unknown,
        duplicate: 0,
    };
    assert_eq!(
        check(&signed(body.clone(), &[])),
        Err(Reject::ProposalSignatures {
            tally: tally(0, 0, 0)
        })
    );
    let stranger = check(&signed(body.clone(), &[1, 9]));
    assert_eq!(
        stranger,
        Err(Reject::ProposalSignatures {
            tally: tally(1, 0, 1)
        })
    );
    // An unknown key may be a rotated root's: not the relay's fault. A forged one is.
    assert!(stranger.unwrap_err().depends_on_state());
    let mut forged = one.clone();
    let other = signed(registry(2, "other"), &[2]);
    forged.push_signature(other.signatures()[0]);
    let refused = check(&forged).unwrap_err();
    assert_eq!(
        refused,
        Reject::ProposalSignatures {
            tally: tally(1, 1, 0)
        }
    );
    assert!(!refused.depends_on_state());
    // Not newer than the trusted registry, or expired: refused.
    assert!(matches!(
        check(&signed(registry(1, "x"), &[1])),
        Err(Reject::Rollback { .. })
    ));
    let mut old = body.clone();
    old.expires = NOW - 1;
    assert!(matches!(
        check(&signed(old, &[1])),
        Err(Reject::Expired { .. })
    ));

    // What a co-signer requires of the body.
    let t = v1.record();
    assert_eq!(
        proposal_extends(t, &body, LATER).unwrap(),
        vec![&accepted(1)]
    );
    let refuse = |f: &dyn Fn(&mut Registry), why: &str| {
        let mut b = body.clone();
        f(&mut b);
        assert_eq!(
            proposal_extends(t, &b, LATER),
            Err(Reject::NotAnExtension(match why {
                "domains" => "the domains differ",
                "seed" => "the seed differs",
                "client" => "the minimum client version differs",
                "expiry" => "it expires later than a co-signer allows",
                "order" => "its ELMs are not strictly ascending by record id",
                "none" => "it adds no ELM",
                _ => unreachable!(),
            })),
            "{why}"
        );
    };
    refuse(&|b| b.domains[0].description = "changed".into(), "domains");
    refuse(&|b| b.seed = None, "seed");
    refuse(&|b| b.min_client_version.minor = 9, "client");
    refuse(&|b| b.expires = LATER + 1, "expiry");
    refuse(&|b| b.elms = vec![accepted(2), accepted(1)], "order");
    refuse(&|b| b.elms = vec![accepted(1), accepted(1)], "order");
    refuse(&|b| b.elms.clear(), "none");
    // Dropping an accepted ELM is not an extension either.
    let mut v2 = body.clone();
    v2.elms = vec![accepted(1)];
    let mut v3 = registry(3, "");
    v3.elms = vec![accepted(2)];
    assert_eq!(
        proposal_extends(&v2, &v3, LATER),
        Err(Reject::NotAnExtension("it drops an accepted ELM"))
    );
    v3.elms = vec![accepted(1), accepted(2)];
    assert_eq!(
        proposal_extends(&v2, &v3, LATER).unwrap(),
        vec![&accepted(2)]
    );
    assert!(matches!(
        proposal_extends(&v2, &v2, LATER),
        Err(Reject::Rollback { .. })
    ));
}
