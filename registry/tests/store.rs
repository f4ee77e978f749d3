//! The store: persistence across restarts, atomic changes, migrations, and the per-peer
//! records (claims, ELM records, attestations, peers).

use btm_protocol::*;
use btm_registry::{Decision, Reject, Store, StoreError};

use crate::common::*;

#[test]
fn rollback_protection_survives_a_restart() {
    let (dir, mut store) = store();
    let v6 = signed(registry(6, "v6"), &[0, 1]).encode();
    assert!(accepted(store.update_registry(&v6, NOW)));
    drop(store);
    let mut store = Store::open(dir.path().join("node.db")).unwrap();
    let v5 = signed(registry(5, "v5"), &[0, 1]).encode();
    assert_eq!(
        store.update_registry(&v5, NOW).unwrap().rejection(),
        Some(&Reject::Rollback {
            trusted: 6,
            offered: 5
        })
    );
    assert_eq!(
        store.update_registry(&v6, NOW).unwrap(),
        Decision::Unchanged
    );
}

#[test]
fn an_io_error_mid_transaction_leaves_nothing_half_written() {
    let (_dir, mut store) = store();
    // Make the second write of the update fail, after the registries row is inserted.
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER fail BEFORE UPDATE ON trusted BEGIN SELECT RAISE(ABORT, 'injected I/O error'); END;",
    )
    .unwrap();
    let before = dump(&store);
    let v6 = signed(registry(6, "v6"), &[0, 1]).encode();
    let err = store.update_registry(&v6, NOW).unwrap_err();
    assert!(matches!(err, StoreError::Sqlite(_)), "{err:?}");
    assert_eq!(
        dump(&store),
        before,
        "the registries row was rolled back with the failed update"
    );
    conn.execute_batch("DROP TRIGGER fail;").unwrap();
    assert!(accepted(store.update_registry(&v6, NOW)));
}

#[test]
fn migrations_set_user_version_and_refuse_the_future() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    drop(Store::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    let v: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v, btm_registry::store::SCHEMA_VERSION);
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    drop(Store::open(&path).unwrap()); // reopening is a no-op
    conn.pragma_update(None, "user_version", 99).unwrap();
    assert!(matches!(
        Store::open(&path),
        Err(StoreError::FutureSchema { found: 99, .. })
    ));
}

#[test]
fn a_corrupt_row_is_a_typed_error() {
    let (_dir, store) = store();
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    conn.execute("UPDATE registries SET envelope = x'00'", [])
        .unwrap();
    assert!(matches!(
        store.trusted(),
        Err(StoreError::Corrupt {
            what: "registry",
            ..
        })
    ));
}

fn signed_claim(node: u32, domain: &str, lease: u64) -> Vec<u8> {
    signed(claim(node, domain, lease), &[node]).encode()
}

#[test]
fn claims() {
    let (_dir, mut store) = store();
    assert!(accepted(
        store.put_claim(&signed_claim(3, "legal", NOW + 100), NOW)
    ));
    assert_eq!(
        store
            .put_claim(&signed_claim(3, "legal", NOW + 100), NOW)
            .unwrap(),
        Decision::Unchanged
    );
    let before = dump(&store);
    let rejected = [
        (signed_claim(3, "legal", NOW + 50), Reject::Stale),
        (
            signed_claim(3, "legal", NOW),
            Reject::LeaseExpired {
                lease_expires: NOW,
                now: NOW,
            },
        ),
        (
            signed_claim(3, "medicine", NOW + 100),
            Reject::UnknownDomain("medicine".into()),
        ),
    ];
    for (bytes, want) in rejected {
        assert_eq!(
            store.put_claim(&bytes, NOW).unwrap().rejection(),
            Some(&want)
        );
    }
    assert_eq!(dump(&store), before);
    assert!(accepted(
        store.put_claim(&signed_claim(3, "legal", NOW + 200), NOW)
    ));
    assert!(accepted(
        store.put_claim(&signed_claim(4, "legal", NOW + 200), NOW)
    ));
    assert_eq!(store.claims("legal", NOW).unwrap().len(), 2);
    assert_eq!(store.claims("legal", NOW + 200).unwrap().len(), 0);
    assert_eq!(store.prune_claims(NOW + 200).unwrap(), 2);
}

/// Issue 13: one live claim per node. A flood of claims on every domain from one node leaves
/// it holding one (each a move that releases the last), an older claim cannot come back, and
/// other nodes are not affected.
#[test]
fn a_claim_flood_from_one_node_leaves_it_one_claim() {
    let (_dir, mut store) = store();
    let mut reg = registry(6, "many domains");
    reg.domains = (0..17).map(|i| domain(&format!("d{i:03}"))).collect();
    assert!(accepted(
        store.update_registry(&signed(reg, &[0, 1]).encode(), NOW)
    ));
    let at = |node: u32, domain: &str, first: u64| {
        let c = Claim {
            first_claimed: first,
            ..claim(node, domain, NOW + 3600)
        };
        signed(c, &[node]).encode()
    };
    for i in 0..17u64 {
        assert!(accepted(
            store.put_claim(&at(3, &format!("d{i:03}"), NOW + i), NOW + i)
        ));
    }
    let held = store.claims_by(&pk(3), NOW + 17).unwrap();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].record().domain, "d016");
    assert!(store.claims("d000", NOW + 17).unwrap().is_empty());
    // Replaying an older claim of the flood is refused.
    assert!(matches!(
        store
            .put_claim(&at(3, "d000", NOW), NOW + 17)
            .unwrap()
            .rejection(),
        Some(Reject::Superseded { .. })
    ));
    // Another node is not affected.
    assert!(accepted(
        store.put_claim(&signed_claim(4, "d000", NOW + 3600), NOW + 17)
    ));
    assert_eq!(store.claims_by(&pk(3), NOW + 17).unwrap().len(), 1);
}

#[test]
fn elm_records_and_attestations() {
    let (_dir, mut store) = store();
    let record = signed(elm(3, 10), &[3]);
    let mut wrong_arch = elm(3, 11);
    wrong_arch.architecture = ContentId::of(b"another shape");
    let mut wrong_domain = elm(3, 12);
    wrong_domain.domain = "medicine".into();
    let att = |verifier: u32, of: ContentId| {
        signed(
            Attestation {
                verifier: pk(verifier),
                elm: of,
                measured_ppl_milli: 50_100,
                verdict: Verdict::Accept,
                pool: EvalPool::Public,
            },
            &[verifier],
        )
        .encode()
    };
    // An attestation of an ELM we do not hold is refused.
    assert_eq!(
        store
            .put_attestation(&att(4, record.id()))
            .unwrap()
            .rejection(),
        Some(&Reject::UnknownElm(record.id()))
    );
    assert!(accepted(store.put_elm(&record.encode(), NOW)));
    assert_eq!(
        store.put_elm(&record.encode(), NOW).unwrap(),
        Decision::Unchanged
    );
    let before = dump(&store);
    let r = store
        .put_elm(&signed(wrong_arch, &[3]).encode(), NOW)
        .unwrap();
    assert!(
        matches!(r.rejection(), Some(Reject::SeedMismatch(_))),
        "{r:?}"
    );
    let r = store
        .put_elm(&signed(wrong_domain, &[3]).encode(), NOW)
        .unwrap();
    assert_eq!(
        r.rejection(),
        Some(&Reject::UnknownDomain("medicine".into()))
    );
    assert_eq!(dump(&store), before);
    assert_eq!(
        store.elm(&record.id()).unwrap().unwrap().record(),
        record.record()
    );

    assert!(accepted(store.put_attestation(&att(4, record.id()))));
    assert!(accepted(store.put_attestation(&att(5, record.id()))));
    let forged = {
        let mut env = Signed::new(Attestation {
            verifier: pk(6),
            elm: record.id(),
            measured_ppl_milli: 1,
            verdict: Verdict::Reject,
            pool: EvalPool::Public,
        });
        env.sign(&key(4));
        env.encode()
    };
    assert!(matches!(
        store.put_attestation(&forged).unwrap().rejection(),
        Some(Reject::Signature(_))
    ));
    assert_eq!(store.attestations(&record.id()).unwrap().len(), 2);
}

#[test]
fn peers_are_bounded_and_ordered() {
    let (_dir, mut store) = store();
    store
        .put_peer(&pk(3), "/ip4/127.0.0.1/tcp/4001", NOW)
        .unwrap();
    store
        .put_peer(&pk(4), "/ip4/127.0.0.2/tcp/4001", NOW + 1)
        .unwrap();
    store
        .put_peer(&pk(3), "/ip4/127.0.0.3/tcp/4001", NOW + 2)
        .unwrap();
    let peers = store.peers().unwrap();
    assert_eq!(peers.len(), 2);
    assert_eq!(peers[0].node, pk(3));
    assert_eq!(peers[0].addr, "/ip4/127.0.0.3/tcp/4001");
    assert!(matches!(
        store.put_peer(&pk(5), &"x".repeat(300), NOW),
        Err(StoreError::OutOfRange(_))
    ));
}
