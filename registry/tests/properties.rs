//! proptest: the threshold rule counts each listed key once, whatever the mix of valid,
//! invalid, unknown and repeated signatures.

use std::collections::BTreeSet;

use btm_protocol::*;
use btm_registry::{Decision, Trusted, decide_registry, tally};
use proptest::prelude::*;

use crate::common::*;

/// One signature to put on the envelope: by test key `key`, valid or with a flipped byte.
#[derive(Debug, Clone)]
struct Sig {
    key: u32,
    valid: bool,
}

fn sigs() -> impl Strategy<Value = Vec<Sig>> {
    prop::collection::vec(
        (0..8u32, prop::bool::weighted(0.8)).prop_map(|(key, valid)| Sig { key, valid }),
        0..12,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn accept_iff_distinct_valid_listed_keys_meet_the_threshold(
        listed in prop::sample::subsequence((0..6u32).collect::<Vec<_>>(), 1..=6),
        t in any::<prop::sample::Index>(),
        signatures in sigs(),
    ) {
        let threshold = (t.index(listed.len()) + 1) as u32;
        let trusted = Trusted { root: signed(root(1, &listed, threshold), &listed), registry: None };
        let mut env = Signed::new(registry(1, "p"));
        for s in &signatures {
            let mut sig = Signature::create(Kind::Registry, env.body(), &key(s.key));
            if !s.valid {
                sig.bytes[5] ^= 0x10;
            }
            env.push_signature(sig);
        }
        let distinct: BTreeSet<u32> =
            signatures.iter().filter(|s| s.valid && listed.contains(&s.key)).map(|s| s.key).collect();
        let t = tally(&env, &trusted.root.record().keys);
        // `tally` stops counting a key at its first valid signature; `distinct` is the set.
        prop_assert_eq!(t.valid, distinct.len());
        let decision = decide_registry(&trusted, &env.encode(), NOW);
        // Repeated signers, or more signatures than listed keys, are refused before any
        // verification (`rules::cheap_signature_checks`).
        let keys: BTreeSet<u32> = signatures.iter().map(|s| s.key).collect();
        let cheap_ok = keys.len() == signatures.len() && signatures.len() <= listed.len();
        prop_assert_eq!(
            matches!(decision, Decision::Accept(_)),
            cheap_ok && distinct.len() >= threshold as usize
        );
    }
}
