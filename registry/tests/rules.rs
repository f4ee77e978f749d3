//! The record rules as pure functions: claims, ELM fit, ELM parents.

use btm_protocol::*;
use btm_registry::{ClaimFit, ClaimLimits, Reject, decide_claim, elm_fits, parents_known};

use crate::common::*;

/// The claims in `held` by `node`, as the rule takes them.
fn held_by(held: &[Claim], node: &NodeId) -> Vec<(String, u64)> {
    held.iter()
        .filter(|c| c.node == *node)
        .map(|c| (c.domain.clone(), c.lease_expires))
        .collect()
}

#[test]
fn claims_stale_quota_unknown_expired() {
    // (Moved from btm-net's claim board, whose `offer` only its tests used.)
    let mut reg = registry(1, "");
    reg.domains.push(domain("math"));
    let limits = ClaimLimits {
        max_live_per_node: 2,
        max_lease_secs: u64::MAX,
    };
    let mut held: Vec<Claim> = Vec::new();
    let mut offer = |c: Claim, now: u64| {
        let decision = decide_claim(&reg, &c, &held_by(&held, &c.node), &limits, now);
        if decision.is_ok() {
            held.retain(|h| !(h.domain == c.domain && h.node == c.node));
            held.push(c);
        }
        decision
    };
    assert_eq!(offer(claim(1, "legal", 200), 100), Ok(ClaimFit::New));
    assert_eq!(offer(claim(1, "legal", 150), 100), Err(Reject::Stale));
    assert_eq!(offer(claim(1, "legal", 200), 100), Err(Reject::Stale));
    assert_eq!(offer(claim(1, "legal", 300), 100), Ok(ClaimFit::Renewal));
    assert_eq!(offer(claim(1, "code", 300), 100), Ok(ClaimFit::New));
    assert_eq!(
        offer(claim(1, "math", 300), 100),
        Err(Reject::Quota { max: 2 })
    );
    assert_eq!(
        offer(claim(2, "zz", 300), 100),
        Err(Reject::UnknownDomain("zz".into()))
    );
    assert_eq!(
        offer(claim(2, "legal", 90), 100),
        Err(Reject::LeaseExpired {
            lease_expires: 90,
            now: 100
        })
    );
    assert_eq!(
        offer(claim(2, "legal", 100), 100),
        Err(Reject::LeaseExpired {
            lease_expires: 100,
            now: 100
        })
    );
    // After the leases end the quota is free again, and an ended lease is no renewal.
    assert_eq!(offer(claim(1, "math", 900), 400), Ok(ClaimFit::New));
    assert_eq!(
        offer(claim(1, "legal", 250), 400),
        Err(Reject::LeaseExpired {
            lease_expires: 250,
            now: 400
        })
    );
    assert_eq!(offer(claim(1, "legal", 900), 400), Ok(ClaimFit::New));
}

#[test]
fn claim_lease_horizon() {
    let reg = registry(1, "");
    let limits = ClaimLimits {
        max_live_per_node: 16,
        max_lease_secs: 3600,
    };
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
