//! Signatures cover the kind's context string plus the exact body bytes.

use btm_protocol::*;

use crate::fixtures::{self, key};

#[test]
fn a_signature_verifies_only_for_its_kind_and_bytes() {
    let env = fixtures::signed(fixtures::claim(), &[3]);
    let sig = env.signatures()[0];
    assert!(sig.verifies(Kind::Claim, env.body()));
    for kind in Kind::ALL.into_iter().filter(|k| *k != Kind::Claim) {
        assert!(
            !sig.verifies(kind, env.body()),
            "a claim signature must not verify as {kind}"
        );
    }
    let mut other = env.body().to_vec();
    other[2] ^= 1;
    assert!(!sig.verifies(Kind::Claim, &other));
}

#[test]
fn a_signature_lifted_onto_another_record_type_fails() {
    // The trainer signs an ELM record. An attacker moves the signature onto an envelope of a
    // different type carrying the same bytes: the context differs, so it cannot verify.
    let elm = fixtures::signed(fixtures::elm(), &[3]);
    let lifted = Signature::create(Kind::Elm, elm.body(), &key(3));
    assert!(lifted.verifies(Kind::Elm, elm.body()));
    assert!(!lifted.verifies(Kind::Attestation, elm.body()));

    // And a signature over a claim's bytes under the ELM context does not verify as a claim.
    let claim = fixtures::claim();
    let mut env = Signed::new(claim.clone());
    env.push_signature(Signature::create(Kind::Elm, env.body(), &key(3)));
    let decoded = Signed::<Claim>::decode(&env.encode()).unwrap();
    assert_eq!(
        decoded.verify_by(&claim.node),
        Err(SignatureError::Invalid(claim.node))
    );
}

#[test]
fn verify_by_reports_missing_and_invalid() {
    let mut env = fixtures::signed(fixtures::claim(), &[3]);
    let k4 = PublicKey::of(&key(4));
    assert_eq!(env.verify_by(&k4), Err(SignatureError::Missing(k4)));
    let mut forged = env.signatures()[0];
    forged.key = k4;
    env.push_signature(forged);
    assert_eq!(env.verify_by(&k4), Err(SignatureError::Invalid(k4)));
    assert!(env.verify_by(&PublicKey::of(&key(3))).is_ok());
}

#[test]
fn signing_twice_with_one_key_keeps_one_signature() {
    let mut env = fixtures::signed(fixtures::root(), &[0, 1, 0]);
    assert_eq!(env.signatures().len(), 2);
    env.clear_signatures();
    assert!(env.signatures().is_empty());
}

#[test]
fn invalid_public_keys_do_not_verify() {
    let env = fixtures::signed(fixtures::claim(), &[3]);
    let mut sig = env.signatures()[0];
    sig.key = PublicKey([0; 32]); // a small-order point: refused by strict verification
    assert!(!sig.verifies(Kind::Claim, env.body()));
    sig.key = PublicKey([0xff; 32]); // not a point at all
    assert!(!sig.verifies(Kind::Claim, env.body()));
}

#[test]
fn envelope_kind_reads_the_kind() {
    assert_eq!(
        envelope_kind(&fixtures::signed(fixtures::registry(), &[0]).encode()),
        Ok(Kind::Registry)
    );
    assert_eq!(
        envelope_kind(&Signed::new(fixtures::root()).encode()),
        Ok(Kind::Root)
    );
    assert!(envelope_kind(b"garbage").is_err());
}
