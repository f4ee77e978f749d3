//! Root rotation N -> N+1: thresholds of both the old and the new keys (TUF 5.3).

use btm_protocol::{Root, Signed};
use btm_registry::{Decision, KeyRole, Reject};

use crate::common::*;

/// (name, new root, signers, the expected rejection or `None` for accept)
type RotationCase = (
    &'static str,
    btm_protocol::Root,
    Vec<u32>,
    Option<fn(&Reject) -> bool>,
);

#[test]
fn rotation_table() {
    // (name, new root, signers, expected rejection role or None for accept)
    let cases: Vec<RotationCase> = vec![
        (
            "old and new thresholds",
            root(2, &[1, 2, 3], 2),
            vec![0, 1, 3],
            None,
        ),
        (
            "same keys, new threshold",
            root(2, &[0, 1, 2], 3),
            vec![0, 1, 2],
            None,
        ),
        (
            "only new keys sign",
            root(2, &[3, 4], 2),
            vec![3, 4],
            Some(|r| below_threshold(r, KeyRole::Trusted)),
        ),
        (
            "only old keys sign",
            root(2, &[3, 4], 2),
            vec![0, 1],
            Some(|r| below_threshold(r, KeyRole::Offered)),
        ),
        (
            "one old key and the new ones",
            root(2, &[0, 3, 4], 2),
            vec![0, 3, 4],
            Some(|r| below_threshold(r, KeyRole::Trusted)),
        ),
        (
            "skips a version",
            root(3, &[0, 1, 2], 2),
            vec![0, 1, 2],
            Some(|r| {
                *r == Reject::RootNotNext {
                    trusted: 1,
                    offered: 3,
                }
            }),
        ),
        (
            "equivocating root v1",
            root(1, &[0, 1, 2], 1),
            vec![0, 1, 2],
            Some(|r| matches!(r, Reject::Equivocation { version: 1, .. })),
        ),
    ];
    for (name, new_root, signers, want) in cases {
        let (_dir, mut store) = store();
        let before = dump(&store);
        let decision = store
            .update_root(&signed(new_root, &signers).encode(), NOW)
            .unwrap();
        match (want, &decision) {
            (None, Decision::Accept(r)) => assert_eq!(r.record().version, 2, "{name}"),
            (Some(check), Decision::Reject(r)) => {
                assert!(check(r), "{name}: {r:?}");
                assert_eq!(dump(&store), before, "{name}: the store changed");
            }
            (_, other) => panic!("{name}: unexpected {other:?}"),
        }
    }
}

#[test]
fn after_rotation_only_new_keys_sign_registries() {
    let (_dir, mut store) = store();
    let v2 = signed(root(2, &[1, 2, 3], 2), &[0, 1, 3]).encode();
    assert!(accepted(store.update_root(&v2, NOW)));
    // Key 0 was removed: its signature no longer counts.
    let by_old = signed(registry(6, "v6"), &[0, 1]).encode();
    let r = store.update_registry(&by_old, NOW).unwrap();
    assert!(
        matches!(r.rejection(), Some(Reject::BelowThreshold { .. })),
        "{r:?}"
    );
    let by_new = signed(registry(6, "v6"), &[3, 1]).encode();
    assert!(accepted(store.update_registry(&by_new, NOW)));
    // The old root is a rollback now, and the new one is unchanged.
    let v1 = signed(root(1, &[0, 1, 2], 2), &[0, 1]).encode();
    assert_eq!(
        store.update_root(&v1, NOW).unwrap().rejection(),
        Some(&Reject::Rollback {
            trusted: 2,
            offered: 1
        })
    );
    assert_eq!(store.update_root(&v2, NOW).unwrap(), Decision::Unchanged);
    // A chain: v3 signed by v2's keys and its own.
    let v3 = signed(root(3, &[3, 4, 5], 2), &[1, 3, 4]).encode();
    assert!(accepted(store.update_root(&v3, NOW)));
    assert_eq!(store.trusted().unwrap().unwrap().root.record().version, 3);
    // The chain a node on v1 walks: every accepted root, oldest first.
    let chain: Vec<u64> = store
        .roots()
        .unwrap()
        .iter()
        .map(|b| Signed::<Root>::decode(b).unwrap().record().version)
        .collect();
    assert_eq!(chain, [1, 2, 3]);
    assert_eq!(store.roots().unwrap()[1], v2);
}

#[test]
fn a_first_root_must_be_self_signed() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = btm_registry::Store::open(dir.path().join("db")).unwrap();
    let r = store
        .init_root(&signed(root(1, &[0, 1, 2], 2), &[0]).encode(), NOW)
        .unwrap();
    assert!(matches!(
        r.rejection(),
        Some(Reject::BelowThreshold {
            role: KeyRole::Offered,
            ..
        })
    ));
    assert!(store.trusted().unwrap().is_none());
    assert!(matches!(
        store.update_registry(&signed(registry(1, ""), &[0, 1]).encode(), NOW),
        Err(btm_registry::StoreError::NoRoot)
    ));
    let ok = signed(root(1, &[0, 1, 2], 2), &[0, 2]).encode();
    assert!(accepted(store.init_root(&ok, NOW)));
    assert!(matches!(
        store.init_root(&ok, NOW),
        Err(btm_registry::StoreError::AlreadyInitialised(1))
    ));
}

/// Whether `r` is "too few signatures by the `role` root's keys".
fn below_threshold(r: &Reject, role: KeyRole) -> bool {
    matches!(r, Reject::BelowThreshold { role: got, .. } if *got == role)
}
