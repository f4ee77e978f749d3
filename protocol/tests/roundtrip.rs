//! proptest: encode then decode returns the record, and the encoding is canonical.

use btm_protocol::*;
use proptest::collection::vec;
use proptest::prelude::*;

fn content_id() -> impl Strategy<Value = ContentId> {
    any::<[u8; 32]>().prop_map(ContentId)
}

fn public_key() -> impl Strategy<Value = PublicKey> {
    any::<[u8; 32]>().prop_map(PublicKey)
}

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9._-]{0,63}"
}

fn root() -> impl Strategy<Value = Root> {
    (
        1..=MAX_VERSION,
        any::<u64>(),
        vec(public_key(), 1..=MAX_ROOT_KEYS),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(version, expires, mut keys, t)| {
            keys.sort();
            keys.dedup();
            let threshold = (t.index(keys.len()) + 1) as u32;
            Root {
                version,
                expires,
                threshold,
                keys,
            }
        })
}

fn arch() -> impl Strategy<Value = Architecture> {
    (
        1..=u32::MAX,
        1..=u32::MAX,
        1..=4096u32,
        1..=64u32,
        1..=u32::MAX,
    )
        .prop_map(
            |(vocab_size, context, per_head, heads, layers)| Architecture {
                vocab_size,
                context,
                d_model: per_head * heads,
                heads,
                layers,
            },
        )
}

fn seed() -> impl Strategy<Value = SeedManifest> {
    (
        arch(),
        content_id(),
        content_id(),
        any::<[u64; 4]>(),
        any::<[u64; 2]>(),
        proptest::option::of(content_id()),
    )
        .prop_map(
            |(architecture, tokenizer, weights, t, sc, optimizer)| SeedManifest {
                architecture,
                tokenizer,
                weights,
                training: TrainingSummary {
                    steps: t[0],
                    tokens: t[1],
                    flops: t[2],
                    valid_ppl_milli: t[3],
                },
                schedule: Schedule {
                    step: sc[0].min(sc[1]),
                    total: sc[0].max(sc[1]),
                },
                optimizer,
            },
        )
}

fn domain() -> impl Strategy<Value = Domain> {
    (
        name(),
        ".{0,200}",
        content_id(),
        content_id(),
        content_id(),
        1..=u32::MAX,
        any::<u64>(),
        any::<u32>(),
    )
        .prop_map(
            |(name, description, train, valid, test, block_size, extra, ppl_tolerance_ppm)| {
                Domain {
                    name,
                    description,
                    train,
                    valid,
                    test,
                    eval: EvalSettings {
                        block_size,
                        max_eval_tokens: u64::from(block_size).saturating_add(extra),
                        ppl_tolerance_ppm,
                        min_gain_ppm: ppl_tolerance_ppm % PPM_ONE,
                        max_memorisation_ppm: PPM_ONE.saturating_add(ppl_tolerance_ppm),
                        withheld: (block_size % 2 == 0).then_some(train),
                    },
                }
            },
        )
}

fn registry() -> impl Strategy<Value = Registry> {
    (
        1..=MAX_VERSION,
        any::<u64>(),
        any::<[u32; 3]>(),
        vec(domain(), 0..6),
        prop::option::of(seed()),
        vec(
            (content_id(), any::<prop::sample::Index>(), content_id()),
            0..8,
        ),
    )
        .prop_map(|(version, expires, v, mut domains, seed, raw_elms)| {
            domains.sort_by(|a, b| a.name.cmp(&b.name));
            domains.dedup_by(|a, b| a.name == b.name);
            let mut elms: Vec<AcceptedElm> = if domains.is_empty() {
                Vec::new()
            } else {
                raw_elms
                    .into_iter()
                    .map(|(record, i, weights)| AcceptedElm {
                        record,
                        domain: domains[i.index(domains.len())].name.clone(),
                        weights,
                    })
                    .collect()
            };
            elms.sort_by_key(|e| e.record);
            elms.dedup_by_key(|e| e.record);
            Registry {
                version,
                expires,
                min_client_version: ClientVersion {
                    major: v[0],
                    minor: v[1],
                    patch: v[2],
                },
                domains,
                seed,
                elms,
            }
        })
}

fn claim() -> impl Strategy<Value = Claim> {
    (
        name(),
        public_key(),
        any::<[u64; 2]>(),
        proptest::option::of((any::<[u64; 2]>(), content_id())),
    )
        .prop_map(|(domain, node, lease, progress)| Claim {
            domain,
            node,
            lease_expires: lease[0].max(lease[1]),
            first_claimed: lease[0].min(lease[1]),
            progress: progress.map(|(n, checkpoint)| ClaimProgress {
                step: n[0],
                loss_milli: n[1],
                checkpoint,
            }),
        })
}

fn elm() -> impl Strategy<Value = ElmRecord> {
    (
        name(),
        vec(content_id(), 1..=MAX_PARENTS),
        any::<[u8; 32]>(),
        any::<[u64; 4]>(),
        public_key(),
        any::<[u8; 64]>(),
    )
        .prop_map(|(domain, mut parent_ids, ids, n, trainer, more)| {
            parent_ids.sort();
            parent_ids.dedup();
            // Split 1 000 000 ppm over the parents; the last one takes the remainder.
            let share = PPM_ONE / parent_ids.len() as u32;
            let count = parent_ids.len();
            let parents = parent_ids
                .into_iter()
                .enumerate()
                .map(|(i, weights)| Parent {
                    weights,
                    weight_ppm: if i + 1 == count {
                        PPM_ONE - share * (count as u32 - 1)
                    } else {
                        share
                    },
                })
                .collect();
            ElmRecord {
                domain,
                parents,
                weights: ContentId(ids),
                weights_size: n[0] ^ n[1],
                architecture: ContentId(more[..32].try_into().unwrap()),
                tokenizer: ContentId(more[32..].try_into().unwrap()),
                steps: n[0],
                tokens: n[1],
                flops: n[2],
                claimed_valid_ppl_milli: n[3],
                trainer,
            }
        })
}

fn attestation() -> impl Strategy<Value = Attestation> {
    (
        public_key(),
        content_id(),
        any::<u64>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(verifier, elm, measured_ppl_milli, ok, withheld)| Attestation {
                verifier,
                elm,
                measured_ppl_milli,
                verdict: if ok { Verdict::Accept } else { Verdict::Reject },
                pool: if withheld {
                    EvalPool::Withheld
                } else {
                    EvalPool::Public
                },
            },
        )
}

fn round_trip<R: Record + PartialEq>(record: R) -> Result<(), TestCaseError> {
    let bytes = record.encode();
    let back = R::decode(&bytes).map_err(|e| TestCaseError::fail(format!("{e}: {record:?}")))?;
    prop_assert_eq!(&back, &record);
    prop_assert_eq!(back.encode(), bytes.clone());
    // The envelope round-trips too, signatures included.
    let mut env = Signed::new(record);
    env.sign(&crate::fixtures::key(0));
    let env_bytes = env.encode();
    let env_back =
        Signed::<R>::decode(&env_bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(env_back.body(), &bytes[..]);
    prop_assert!(
        env_back
            .verify_by(&PublicKey::of(&crate::fixtures::key(0)))
            .is_ok()
    );
    prop_assert_eq!(env_back.encode(), env_bytes);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn every_record_round_trips(
        r in root(),
        g in registry(),
        s in seed(),
        c in claim(),
        e in elm(),
        a in attestation(),
    ) {
        round_trip(r)?;
        round_trip(g)?;
        round_trip(s)?;
        round_trip(c)?;
        round_trip(e)?;
        round_trip(a)?;
    }

    #[test]
    fn content_id_hex_round_trips(id in content_id()) {
        prop_assert_eq!(id.to_string().parse::<ContentId>().unwrap(), id);
    }

    /// Any byte string fed to any decoder returns a value or a typed error, never a panic; and
    /// whatever decodes re-encodes to exactly the input.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
        if let Ok(r) = Registry::decode(&bytes) { prop_assert_eq!(r.encode(), bytes.clone()); }
        if let Ok(r) = Root::decode(&bytes) { prop_assert_eq!(r.encode(), bytes.clone()); }
        if let Ok(r) = Claim::decode(&bytes) { prop_assert_eq!(r.encode(), bytes.clone()); }
        if let Ok(r) = ElmRecord::decode(&bytes) { prop_assert_eq!(r.encode(), bytes.clone()); }
        if let Ok(r) = Signed::<Registry>::decode(&bytes) { prop_assert_eq!(r.encode(), bytes.clone()); }
        let _ = envelope_kind(&bytes);
    }

    /// Flipping any one byte of a valid signed envelope gives an error or a failed signature.
    #[test]
    fn one_flipped_byte_is_caught(i in any::<prop::sample::Index>(), x in 1..=255u8) {
        let env = crate::fixtures::signed(crate::fixtures::claim(), &[3]);
        let mut bytes = env.encode();
        let at = i.index(bytes.len());
        bytes[at] ^= x;
        if let Ok(got) = Signed::<Claim>::decode(&bytes) {
            prop_assert!(got.verify_by(&PublicKey::of(&crate::fixtures::key(3))).is_err());
        }
    }
}

#[test]
fn perplexity_milli_units() {
    assert_eq!(ppl_to_milli(23.4567), Some(23_457));
    assert_eq!(ppl_to_milli(0.0), Some(0));
    assert_eq!(ppl_to_milli(f64::NAN), None);
    assert_eq!(ppl_to_milli(f64::INFINITY), None);
    assert_eq!(ppl_to_milli(-1.0), None);
    assert_eq!(ppl_to_milli(1e20), None);
    assert!((milli_to_ppl(23_457) - 23.457).abs() < 1e-9);
}
