//! One table per THREATS.md row that concerns records. Each case offers bytes to a store that
//! trusts root v1 (keys 0-2, threshold 2) and registry v5, and checks the typed rejection and
//! that the store did not change.

use btm_protocol::*;
use btm_registry::{Decision, KeyRole, Reject, Tally};

use crate::common::*;

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    now: u64,
    check: fn(&Reject) -> bool,
}

/// A case checked at `NOW`.
fn case(name: &'static str, bytes: Vec<u8>, check: fn(&Reject) -> bool) -> Case {
    Case {
        name,
        bytes,
        now: NOW,
        check,
    }
}

fn with_sigs(record: Registry, sigs: Vec<Signature>) -> Vec<u8> {
    let mut env = Signed::new(record);
    for s in sigs {
        env.push_signature(s);
    }
    env.encode()
}

fn sig(i: u32, kind: Kind, body: &[u8]) -> Signature {
    Signature::create(kind, body, &key(i))
}

fn below(
    valid: usize,
    invalid: usize,
    unknown: usize,
    duplicate: usize,
) -> impl Fn(&Reject) -> bool {
    move |r| {
        *r == Reject::BelowThreshold {
            role: KeyRole::Trusted,
            threshold: 2,
            tally: Tally {
                valid,
                invalid,
                unknown,
                duplicate,
            },
        }
    }
}

#[rustfmt::skip]
fn cases() -> Vec<Case> {
    let v6 = registry(6, "v6");
    let body = v6.encode();
    let s = |i| sig(i, Kind::Registry, &body);
    let mut flipped = s(1);
    flipped.bytes[10] ^= 0x40;
    let mut expired = registry(6, "expired");
    expired.expires = NOW - 1;
    let good = signed(v6.clone(), &[0, 1]).encode();
    let mut oversized = good.clone();
    oversized.resize(max_envelope_size(Kind::Registry) + 1, 0);
    let mut nested = vec![0x81u8; 10_000];
    nested.push(0);
    let mut garbage = Vec::with_capacity(4096);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..4096 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        garbage.push(x as u8);
    }

    // Each check is a plain fn so the table stays a table: one case a line.
    vec![
        case("missing: no signatures", with_sigs(v6.clone(), vec![]), |r| matches!(r, Reject::BelowThreshold { tally: Tally { valid: 0, .. }, .. })),
        case("below threshold: one of two", with_sigs(v6.clone(), vec![s(0)]), |r| below(1, 0, 0, 0)(r)),
        // Refused before any signature is verified (TUF: no duplicate keyids).
        case("duplicate: one key three times", with_sigs(v6.clone(), vec![s(0), s(0), s(0)]), |r| matches!(r, Reject::RepeatedSigner(_))),
        case("bad: a flipped signature", with_sigs(v6.clone(), vec![s(0), flipped]), |r| below(1, 1, 0, 0)(r)),
        case("bad: unknown keys are ignored", with_sigs(v6.clone(), vec![s(0), s(5), s(6)]), |r| below(1, 0, 2, 0)(r)),
        case("lifted: key 1's signature over the same bytes as an ELM record", with_sigs(v6.clone(), vec![s(0), sig(1, Kind::Elm, &body)]), |r| below(1, 1, 0, 0)(r)),
        case("lifted: key 1's signature from a root", with_sigs(v6.clone(), vec![s(0), sig(1, Kind::Root, &body)]), |r| below(1, 1, 0, 0)(r)),
        case("expired registry", signed(expired, &[0, 1]).encode(), |r| matches!(r, Reject::Expired { version: 6, .. })),
        Case { now: LATER, ..case("expired trusted root (freeze)", good.clone(), |r| matches!(r, Reject::RootExpired { version: 1, .. })) },
        case("rolled back to v4", signed(registry(4, "v4"), &[0, 1]).encode(), |r| *r == Reject::Rollback { trusted: 5, offered: 4 }),
        case("equivocation: another v5", signed(registry(5, "other v5"), &[1, 2]).encode(), |r| matches!(r, Reject::Equivocation { version: 5, .. })),
        case("oversized", oversized, |r| matches!(r, Reject::Malformed(DecodeError::TooLarge { .. }))),
        case("deeply nested", nested, |r| matches!(r, Reject::Malformed(DecodeError::TooDeep { .. }))),
        case("truncated", good[..good.len() - 7].to_vec(), |r| matches!(r, Reject::Malformed(DecodeError::Truncated))),
        case("trailing bytes", [good.clone(), vec![0]].concat(), |r| matches!(r, Reject::Malformed(DecodeError::TrailingBytes { count: 1 }))),
        case("random bytes", garbage, |r| matches!(r, Reject::Malformed(_))),
        case("a root offered as a registry", signed(root(2, &[0, 1, 2], 2), &[0, 1]).encode(), |r| matches!(r, Reject::Malformed(DecodeError::WrongKind { expected: Kind::Registry, found: 1 }))),
        case("a claim offered as a registry", signed(claim(3, "legal", NOW + 3600), &[3]).encode(), |r| matches!(r, Reject::Malformed(DecodeError::WrongKind { expected: Kind::Registry, found: 4 }))),
    ]
}

#[test]
fn registry_threats_are_rejected_and_change_nothing() {
    for case in cases() {
        let (_dir, mut store) = store();
        let before = dump(&store);
        let decision = store.update_registry(&case.bytes, case.now).unwrap();
        match &decision {
            Decision::Reject(r) => assert!((case.check)(r), "{}: wrong rejection {r:?}", case.name),
            other => panic!("{}: not rejected: {other:?}", case.name),
        }
        assert_eq!(dump(&store), before, "{}: the store changed", case.name);
        let trusted = store.trusted().unwrap().unwrap();
        assert_eq!(
            trusted.registry.unwrap().record().version,
            5,
            "{}",
            case.name
        );
        let equivocations = store.equivocations().unwrap();
        if case.name.starts_with("equivocation") {
            assert_eq!(equivocations.len(), 1, "the conflict is reported");
            assert_eq!(equivocations[0].version, 5);
        } else {
            assert!(equivocations.is_empty(), "{}", case.name);
        }
    }
}

#[test]
fn the_valid_update_is_accepted() {
    // The control for the table: the same store accepts a proper v6, then reports it unchanged.
    let (_dir, mut store) = store();
    let good = signed(registry(6, "v6"), &[2, 0]).encode();
    assert!(accepted(store.update_registry(&good, NOW)));
    assert_eq!(
        store.update_registry(&good, NOW).unwrap(),
        Decision::Unchanged
    );
    // An extra signature by an unknown key does not spoil a valid threshold (repeated keys and
    // more signatures than listed keys are refused: `rules::cheap_signature_checks`).
    let mut padded = Signed::new(registry(7, "v7"));
    for i in [5, 0, 1] {
        padded.push_signature(sig(i, Kind::Registry, padded.body()));
    }
    assert!(accepted(store.update_registry(&padded.encode(), NOW)));
    assert_eq!(
        store
            .trusted()
            .unwrap()
            .unwrap()
            .registry
            .unwrap()
            .record()
            .version,
        7
    );
}

#[test]
fn single_signer_records_reject_bad_signatures_and_change_nothing() {
    let (_dir, mut store) = store();
    let claim = claim(3, "legal", NOW + 3600);
    let mut lifted = Signed::new(claim.clone());
    lifted.push_signature(sig(3, Kind::Elm, lifted.body()));
    let mut elm_lifted = Signed::new(elm(3, 10));
    elm_lifted.push_signature(sig(3, Kind::Claim, elm_lifted.body()));
    let before = dump(&store);
    let cases: Vec<(&str, Result<Option<Reject>, btm_registry::StoreError>)> = vec![
        (
            "claim signed by someone else",
            store
                .put_claim(&signed(claim.clone(), &[4]).encode(), NOW)
                .map(|d| d.rejection().cloned()),
        ),
        (
            "claim unsigned",
            store
                .put_claim(&Signed::new(claim.clone()).encode(), NOW)
                .map(|d| d.rejection().cloned()),
        ),
        (
            "claim signature lifted from an ELM context",
            store
                .put_claim(&lifted.encode(), NOW)
                .map(|d| d.rejection().cloned()),
        ),
        (
            "ELM signature lifted from a claim context",
            store
                .put_elm(&elm_lifted.encode(), NOW)
                .map(|d| d.rejection().cloned()),
        ),
        (
            "ELM signed by another node",
            store
                .put_elm(&signed(elm(3, 10), &[4]).encode(), NOW)
                .map(|d| d.rejection().cloned()),
        ),
    ];
    for (name, got) in cases {
        let r = got.unwrap().unwrap_or_else(|| panic!("{name}: accepted"));
        assert!(matches!(r, Reject::Signature(_)), "{name}: {r:?}");
    }
    assert_eq!(dump(&store), before);
}
