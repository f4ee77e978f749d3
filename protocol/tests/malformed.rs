//! Table-driven: malformed, non-canonical, oversized, deeply nested, truncated and garbage
//! inputs each give the expected typed error.

use btm_protocol::*;

use crate::fixtures;

/// A CBOR head with the shortest argument encoding.
pub fn head(major: u8, n: u64) -> Vec<u8> {
    let m = major << 5;
    match n {
        0..=23 => vec![m | n as u8],
        24..=0xff => vec![m | 24, n as u8],
        0x100..=0xffff => [vec![m | 25], (n as u16).to_be_bytes().to_vec()].concat(),
        0x1_0000..=0xffff_ffff => [vec![m | 26], (n as u32).to_be_bytes().to_vec()].concat(),
        _ => [vec![m | 27], n.to_be_bytes().to_vec()].concat(),
    }
}

/// The format version's head.
pub fn version() -> Vec<u8> {
    head(0, FORMAT_VERSION)
}

/// A claim encoded by hand from its parts, so single parts can be made wrong; `first_claimed`
/// and `progress` are the fixture's.
pub fn claim_bytes(version: Vec<u8>, domain: &str, node: &[u8], lease: Vec<u8>) -> Vec<u8> {
    let c = fixtures::claim();
    let p = c.progress.expect("the fixture claim has progress");
    [
        head(4, 6),
        version,
        head(3, domain.len() as u64),
        domain.as_bytes().to_vec(),
        head(2, node.len() as u64),
        node.to_vec(),
        lease,
        head(0, c.first_claimed),
        head(4, 3),
        head(0, p.step),
        head(0, p.loss_milli),
        head(2, 32),
        p.checkpoint.0.to_vec(),
    ]
    .concat()
}

fn good_claim() -> Vec<u8> {
    let c = fixtures::claim();
    claim_bytes(version(), &c.domain, &c.node.0, head(0, c.lease_expires))
}

fn kind_of(e: &DecodeError) -> String {
    let s = format!("{e:?}");
    s.split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn hand_built_claim_matches_encoder() {
    assert_eq!(good_claim(), fixtures::claim().encode());
}

#[test]
fn malformed_claims_table() {
    let c = fixtures::claim();
    let node = c.node.0;
    let mut long_lease = vec![0x1b];
    long_lease.extend_from_slice(&c.lease_expires.to_be_bytes());
    let early_lease = head(0, c.first_claimed - 1);
    let mut indefinite = vec![0x9f];
    indefinite.extend_from_slice(&good_claim()[1..]);
    indefinite.push(0xff);
    let mut nested = vec![0x81; 200];
    nested.push(0x00);
    let mut map = good_claim();
    map[0] = 0xa3; // a map of three pairs instead of an array of six
    let mut tagged = vec![0xd8, 0x18];
    tagged.extend(good_claim());

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty input", vec![], "Truncated"),
        (
            "truncated by one byte",
            good_claim()[..good_claim().len() - 1].to_vec(),
            "Truncated",
        ),
        ("truncated to the head", vec![0x84], "Truncated"),
        (
            "trailing byte",
            [good_claim(), vec![0x00]].concat(),
            "TrailingBytes",
        ),
        (
            "non-shortest integer",
            claim_bytes(version(), &c.domain, &node, long_lease),
            "NonCanonical",
        ),
        ("indefinite-length array", indefinite, "NonCanonical"),
        (
            "format version 1 (round one)",
            claim_bytes(head(0, 1), &c.domain, &node, head(0, c.lease_expires)),
            "UnsupportedVersion",
        ),
        (
            "version as text",
            claim_bytes(vec![0x61, b'1'], &c.domain, &node, head(0, c.lease_expires)),
            "WrongType",
        ),
        (
            "node of 31 bytes",
            claim_bytes(version(), &c.domain, &node[..31], head(0, c.lease_expires)),
            "WrongLength",
        ),
        (
            "negative lease",
            claim_bytes(version(), &c.domain, &node, vec![0x20]),
            "OutOfRange",
        ),
        (
            "float lease",
            claim_bytes(version(), &c.domain, &node, vec![0xf9, 0x3c, 0x00]),
            "WrongType",
        ),
        (
            "upper-case domain",
            claim_bytes(version(), "Legal", &node, head(0, c.lease_expires)),
            "Invalid",
        ),
        (
            "empty domain",
            claim_bytes(version(), "", &node, head(0, c.lease_expires)),
            "Invalid",
        ),
        (
            "domain of 65 bytes",
            claim_bytes(version(), &"a".repeat(65), &node, head(0, c.lease_expires)),
            "TooLong",
        ),
        (
            "lease ending before the first claim",
            claim_bytes(version(), &c.domain, &node, early_lease),
            "Invalid",
        ),
        ("map instead of array", map, "WrongType"),
        ("tagged record", tagged, "WrongType"),
        ("deeply nested arrays", nested, "TooDeep"),
        (
            "oversized",
            vec![0u8; Kind::Claim.max_size() + 1],
            "TooLarge",
        ),
        (
            "three fields",
            [
                head(4, 3),
                head(0, 1),
                head(3, 1),
                b"a".to_vec(),
                head(0, 1),
            ]
            .concat(),
            "FieldCount",
        ),
        ("reserved simple value", vec![0xf8, 0x10], "Unsupported"),
        ("break outside indefinite item", vec![0xff], "Unsupported"),
        (
            "invalid UTF-8 text",
            [head(4, 6), version(), vec![0x62, 0xff, 0xfe]].concat(),
            "Syntax",
        ),
        (
            "byte string claiming 2^63 bytes",
            vec![0x5b, 0x80, 0, 0, 0, 0, 0, 0, 0],
            "Truncated",
        ),
        (
            "array claiming 2^63 items",
            vec![0x9b, 0x80, 0, 0, 0, 0, 0, 0, 0],
            "Truncated",
        ),
    ];
    for (what, bytes, want) in cases {
        match Claim::decode(&bytes) {
            Ok(c) => panic!("{what}: decoded to {c:?}"),
            Err(e) => assert_eq!(kind_of(&e), want, "{what}: got {e:?}"),
        }
    }
}

/// Each case breaks one field rule of the fixture `base` builds: decoding its encoding, and
/// `validate`, fail with `want`.
type Case<R> = (&'static str, fn(&mut R), &'static str);

fn refused<R: Record>(base: fn() -> R, cases: &[Case<R>]) {
    for (what, break_it, want) in cases {
        let mut record = base();
        break_it(&mut record);
        let e = R::decode(&record.encode()).expect_err(what);
        assert_eq!(kind_of(&e), *want, "{what}: {e:?}");
        assert_eq!(
            record.validate().map_err(|e| kind_of(&e)),
            Err((*want).to_owned()),
            "{what}"
        );
    }
}

#[rustfmt::skip]
#[test]
fn record_rules_table() {
    refused(fixtures::root, &[
        ("unsorted keys", |r| r.keys.reverse(), "NotSorted"),
        ("duplicate keys", |r| r.keys.push(r.keys[2]), "NotSorted"),
        ("threshold 0", |r| r.threshold = 0, "Invalid"),
        ("threshold over the key count", |r| r.threshold = 4, "Invalid"),
        ("no keys", |r| { r.keys.clear(); r.threshold = 1 }, "Invalid"),
        ("version 0", |r| r.version = 0, "Invalid"),
    ]);
    refused(fixtures::registry, &[
        ("ELM of an unknown domain", |r| r.elms[0].domain = "medicine".into(), "Invalid"),
        ("domains not sorted", |r| r.domains.reverse(), "NotSorted"),
        ("block size 0", |r| r.domains[0].eval.block_size = 0, "Invalid"),
        ("d_model not divisible by heads", |r| r.seed.as_mut().unwrap().architecture.heads = 7, "Invalid"),
        ("a gain of 100% required", |r| r.domains[0].eval.min_gain_ppm = PPM_ONE, "Invalid"),
        ("memorisation ratio below 1", |r| r.domains[0].eval.max_memorisation_ppm = PPM_ONE - 1, "Invalid"),
        ("seed past its schedule's end", |r| {
            let seed = r.seed.as_mut().unwrap();
            seed.schedule.step = seed.schedule.total + 1;
        }, "Invalid"),
    ]);
    refused(fixtures::elm, &[
        ("weights sum to 1000001", |r| r.parents[0].weight_ppm += 1, "Invalid"),
        ("no parents", |r| r.parents.clear(), "Invalid"),
    ]);

    let mut bad_verdict = fixtures::attestation().encode();
    let last = bad_verdict.len() - 2; // verdict, then pool
    bad_verdict[last] = 0x02;
    assert_eq!(
        Attestation::decode(&bad_verdict),
        Err(DecodeError::OutOfRange {
            field: "attestation.verdict"
        })
    );
    let mut bad_pool = fixtures::attestation().encode();
    let last = bad_pool.len() - 1;
    bad_pool[last] = 0x02;
    assert_eq!(
        Attestation::decode(&bad_pool),
        Err(DecodeError::OutOfRange {
            field: "attestation.pool"
        })
    );
}

#[test]
fn size_limit_is_checked_before_parsing() {
    // Garbage that would be a syntax error is reported as too large: nothing was parsed.
    for kind in Kind::ALL {
        let bytes = vec![0xffu8; kind.max_size() + 1];
        let e = match kind {
            Kind::Root => Root::decode(&bytes).err(),
            Kind::Registry => Registry::decode(&bytes).err(),
            Kind::Seed => SeedManifest::decode(&bytes).err(),
            Kind::Claim => Claim::decode(&bytes).err(),
            Kind::Elm => ElmRecord::decode(&bytes).err(),
            Kind::Attestation => Attestation::decode(&bytes).err(),
        };
        assert_eq!(
            e,
            Some(DecodeError::TooLarge {
                kind,
                size: kind.max_size() + 1,
                max: kind.max_size()
            })
        );
    }
    let env = vec![0xffu8; max_envelope_size(Kind::Claim) + 1];
    assert!(matches!(
        Signed::<Claim>::decode(&env),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn envelope_rules_table() {
    let good = fixtures::signed(fixtures::claim(), &[3]);
    let body = good.body().to_vec();
    let sig = good.signatures()[0];
    let env = |parts: Vec<Vec<u8>>| parts.concat();
    // The four elements: envelope version, record kind, body, signatures.
    let envelope = |version: u64, kind: u64, body: &[u8], sigs: Vec<u8>| {
        env(vec![
            head(4, 4),
            head(0, version),
            head(0, kind),
            head(2, body.len() as u64),
            body.to_vec(),
            sigs,
        ])
    };
    let sigs = |n: u64| {
        let mut out = head(4, n);
        for _ in 0..n {
            out.extend(head(4, 2));
            out.extend(head(2, 32));
            out.extend(sig.key.0);
            out.extend(head(2, 64));
            out.extend(sig.bytes);
        }
        out
    };
    let over = MAX_SIGNATURES as u64 + 1;
    let short_sig = [
        head(4, 1),
        head(4, 2),
        head(2, 32),
        sig.key.0.to_vec(),
        head(2, 63),
        sig.bytes[..63].to_vec(),
    ]
    .concat();
    let mut bad_body = body.clone();
    bad_body[1] = 0x01; // format version 1 (round one) inside the body
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "envelope version 1 (round one)",
            envelope(1, 4, &body, sigs(1)),
            "UnsupportedVersion",
        ),
        (
            "registry kind on a claim",
            envelope(FORMAT_VERSION, 2, &body, sigs(1)),
            "WrongKind",
        ),
        (
            "unknown kind",
            envelope(FORMAT_VERSION, 99, &body, sigs(1)),
            "WrongKind",
        ),
        (
            "too many signatures",
            envelope(FORMAT_VERSION, 4, &body, sigs(over)),
            "TooLong",
        ),
        (
            "63-byte signature",
            envelope(FORMAT_VERSION, 4, &body, short_sig),
            "WrongLength",
        ),
        (
            "body not canonical",
            envelope(FORMAT_VERSION, 4, &bad_body, sigs(1)),
            "UnsupportedVersion",
        ),
        (
            "body as text",
            env(vec![
                head(4, 4),
                version(),
                head(0, 4),
                head(3, 1),
                b"x".to_vec(),
                sigs(1),
            ]),
            "WrongType",
        ),
        (
            "three elements",
            env(vec![
                head(4, 3),
                version(),
                head(0, 4),
                head(2, body.len() as u64),
                body.clone(),
            ]),
            "FieldCount",
        ),
    ];
    assert_eq!(
        envelope(FORMAT_VERSION, 4, &body, sigs(1)),
        good.encode(),
        "the hand-built envelope matches the encoder"
    );
    for (what, bytes, want) in cases {
        let e = Signed::<Claim>::decode(&bytes).expect_err(what);
        assert_eq!(kind_of(&e), want, "{what}: {e:?}");
    }
}
