//! The maintainers' file workflow, through the library functions behind `btm-node keys` and
//! `btm-node registry`.

use std::path::Path;

use btm_protocol::*;
use btm_registry::maintainer::{self, MaintainerError, RegistryInit};
use btm_registry::{KeyRole, Reject, Store};

use crate::common::*;

fn keys(dir: &Path, n: usize) -> Vec<(std::path::PathBuf, PublicKey)> {
    (0..n)
        .map(|i| {
            let path = dir.join(format!("m{i}.key"));
            let pk = maintainer::generate_key(&path, false).unwrap();
            assert_eq!(maintainer::public_key(&path).unwrap(), pk);
            (path, pk)
        })
        .collect()
}

#[test]
fn three_maintainers_publish_a_registry() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ks = keys(d, 3);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&ks[0].0).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "key files are private");
    }
    assert!(matches!(
        maintainer::generate_key(&ks[0].0, false),
        Err(MaintainerError::Exists(_))
    ));

    // Root: 2 of 3.
    let root_path = d.join("root.cbor");
    let root = Root {
        version: 1,
        expires: LATER,
        threshold: 2,
        keys: ks.iter().map(|k| k.1).collect(),
    };
    maintainer::init_root(&root_path, root, false).unwrap();
    let v = maintainer::verify(&root_path, None, None, NOW).unwrap();
    assert!(matches!(
        v.rejection,
        Some(Reject::BelowThreshold {
            role: KeyRole::Offered,
            ..
        })
    ));
    maintainer::sign(&root_path, &ks[0].0).unwrap();
    maintainer::sign(&root_path, &ks[0].0).unwrap(); // again: replaces, still one
    assert_eq!(
        maintainer::sign(&root_path, &ks[2].0).unwrap().signatures,
        2
    );
    assert!(
        maintainer::verify(&root_path, None, None, NOW)
            .unwrap()
            .accepted()
    );

    // Registry v1 draft, edited, then signed by two maintainers on separate copies.
    let draft = legal_draft(d);
    maintainer::add_domain(&draft, domain("code")).unwrap();
    assert!(matches!(
        maintainer::add_domain(&draft, domain("code")),
        Err(MaintainerError::DuplicateDomain(_))
    ));
    maintainer::set_seed(&draft, seed()).unwrap();
    maintainer::sign(&draft, &ks[1].0).unwrap();
    // An edit after signing drops the signatures that covered the old body.
    let edited = maintainer::add_domain(&draft, domain("medicine")).unwrap();
    assert_eq!(edited.dropped_signatures, 1);
    assert_eq!(
        edited
            .registry
            .record()
            .domains
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>(),
        ["code", "legal", "medicine"]
    );

    let copy = d.join("registry-copy.cbor");
    std::fs::copy(&draft, &copy).unwrap();
    maintainer::sign(&draft, &ks[1].0).unwrap();
    let v = maintainer::verify(&draft, Some(&root_path), None, NOW).unwrap();
    assert!(
        matches!(v.rejection, Some(Reject::BelowThreshold { .. })),
        "{v:?}"
    );
    maintainer::sign(&copy, &ks[2].0).unwrap();
    assert_eq!(maintainer::combine(&draft, &copy).unwrap(), 1);
    assert_eq!(
        maintainer::combine(&draft, &copy).unwrap(),
        0,
        "combining twice adds nothing"
    );
    let v = maintainer::verify(&draft, Some(&root_path), None, NOW).unwrap();
    assert!(v.accepted(), "{v:?}");
    assert_eq!(v.tally.valid, 2);

    // A node accepts what the maintainers published.
    let db = tempfile::tempdir().unwrap();
    let mut store = Store::open(db.path().join("node.db")).unwrap();
    assert!(accepted(
        store.init_root(&std::fs::read(&root_path).unwrap(), NOW)
    ));
    assert!(accepted(
        store.update_registry(&std::fs::read(&draft).unwrap(), NOW)
    ));

    // v2 continues from v1 and accepts an ELM trained on the seed.
    let elm_path = d.join("elm.cbor");
    let mut record = elm(7, 100);
    record.parents = vec![Parent {
        weights: seed().weights,
        weight_ppm: PPM_ONE,
    }];
    std::fs::write(&elm_path, signed(record.clone(), &[7]).encode()).unwrap();
    let v2 = d.join("registry-v2.cbor");
    let init = RegistryInit {
        expires: LATER,
        from: Some(draft.clone()),
        ..Default::default()
    };
    assert_eq!(
        maintainer::init_registry(&v2, init, false)
            .unwrap()
            .record()
            .version,
        2
    );
    let edited = maintainer::accept_elm(&v2, &elm_path).unwrap();
    assert_eq!(edited.registry.record().elms[0].weights, record.weights);
    maintainer::sign(&v2, &ks[0].0).unwrap();
    maintainer::sign(&v2, &ks[1].0).unwrap();
    let v = maintainer::verify(&v2, Some(&root_path), Some(&draft), NOW).unwrap();
    assert!(v.accepted(), "{v:?}");
    // ...and v1 verified against v2 as the trusted one is a rollback.
    let v = maintainer::verify(&draft, Some(&root_path), Some(&v2), NOW).unwrap();
    assert_eq!(
        v.rejection,
        Some(Reject::Rollback {
            trusted: 2,
            offered: 1
        })
    );
    assert!(accepted(
        store.update_registry(&std::fs::read(&v2).unwrap(), NOW)
    ));

    let summary = maintainer::show(&v2).unwrap();
    assert_eq!(summary.kind, Kind::Registry);
    assert_eq!(summary.signature_valid, vec![true, true]);
    assert_eq!(summary.record["version"], 2);
}

#[test]
fn accept_elm_checks_signature_domain_seed_and_parents() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let draft = legal_draft(d);
    let elm_path = d.join("elm.cbor");
    let write = |r: ElmRecord, signer: u32| {
        std::fs::write(&elm_path, signed(r, &[signer]).encode()).unwrap()
    };

    write(elm(7, 1), 7);
    assert!(matches!(
        maintainer::accept_elm(&draft, &elm_path),
        Err(MaintainerError::Refused(Reject::SeedMismatch(_)))
    ));
    maintainer::set_seed(&draft, seed()).unwrap();
    write(elm(7, 1), 8);
    assert!(matches!(
        maintainer::accept_elm(&draft, &elm_path),
        Err(MaintainerError::Refused(Reject::Signature(_)))
    ));
    let mut other_domain = elm(7, 1);
    other_domain.domain = "code".into();
    write(other_domain, 7);
    assert!(matches!(
        maintainer::accept_elm(&draft, &elm_path),
        Err(MaintainerError::Refused(Reject::UnknownDomain(_)))
    ));
    let mut orphan = elm(7, 1);
    orphan.parents = vec![Parent {
        weights: ContentId::of(b"nobody"),
        weight_ppm: PPM_ONE,
    }];
    write(orphan, 7);
    assert!(matches!(
        maintainer::accept_elm(&draft, &elm_path),
        Err(MaintainerError::Refused(Reject::UnknownParent(_)))
    ));
    write(elm(7, 1), 7);
    maintainer::accept_elm(&draft, &elm_path).unwrap();
    // Accepting it twice changes nothing.
    let again = maintainer::accept_elm(&draft, &elm_path).unwrap();
    assert_eq!(again.registry.record().elms.len(), 1);
    // A child of the accepted ELM may now be accepted too.
    let mut child = elm(7, 2);
    child.parents = vec![Parent {
        weights: elm(7, 1).weights,
        weight_ppm: PPM_ONE,
    }];
    write(child, 7);
    assert_eq!(
        maintainer::accept_elm(&draft, &elm_path)
            .unwrap()
            .registry
            .record()
            .elms
            .len(),
        2
    );
}

#[test]
fn bad_files_give_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = d.join("bad.key");
    std::fs::write(&key, "not hex\n").unwrap();
    assert!(matches!(
        maintainer::load_key(&key),
        Err(MaintainerError::KeyFile { .. })
    ));
    assert!(matches!(
        maintainer::load_key(&d.join("missing.key")),
        Err(MaintainerError::KeyFile { .. })
    ));
    let garbage = d.join("garbage.cbor");
    std::fs::write(&garbage, [0xffu8; 100]).unwrap();
    assert!(matches!(
        maintainer::show(&garbage),
        Err(MaintainerError::Decode { .. })
    ));
    let huge = d.join("huge.cbor");
    std::fs::write(&huge, vec![0u8; 3 << 20]).unwrap();
    assert!(matches!(
        maintainer::show(&huge),
        Err(MaintainerError::Decode {
            source: DecodeError::TooLarge { .. },
            ..
        })
    ));
    let claim_path = d.join("claim.cbor");
    std::fs::write(
        &claim_path,
        signed(claim(3, "legal", NOW + 3600), &[3]).encode(),
    )
    .unwrap();
    let claim = claim_path;
    let good_key = d.join("good.key");
    maintainer::generate_key(&good_key, false).unwrap();
    assert!(matches!(
        maintainer::sign(&claim, &good_key),
        Err(MaintainerError::WrongKind {
            found: Kind::Claim,
            ..
        })
    ));
    assert!(matches!(
        maintainer::add_domain(&claim, domain("x")),
        Err(MaintainerError::WrongKind { .. })
    ));
    assert_eq!(maintainer::show(&claim).unwrap().kind, Kind::Claim);
    let reg = d.join("r.cbor");
    maintainer::init_registry(
        &reg,
        RegistryInit {
            expires: LATER,
            ..Default::default()
        },
        false,
    )
    .unwrap();
    assert!(matches!(
        maintainer::verify(&reg, None, None, NOW),
        Err(MaintainerError::RootRequired)
    ));
    let mut bad = domain("Bad Name");
    bad.name = "Bad Name".into();
    assert!(matches!(
        maintainer::add_domain(&reg, bad),
        Err(MaintainerError::Invalid(_))
    ));
    let data = d.join("shard.bin");
    std::fs::write(&data, b"abc").unwrap();
    assert_eq!(maintainer::hash_file(&data).unwrap(), ContentId::of(b"abc"));
}
