//! Registry acceptance and root rotation on any bytes, from a fixed trusted state (root v1 of
//! test keys 0-2, threshold 2; registry v5): a decision, never a panic; anything accepted is a
//! newer, validly signed registry (which random bytes essentially never are).
#![no_main]

use std::sync::OnceLock;

use btm_protocol::{ClientVersion, PublicKey, Registry, Root, Signed, test_key};
use btm_registry::{Decision, Trusted, decide_registry, decide_root};
use libfuzzer_sys::fuzz_target;

fn trusted() -> &'static Trusted {
    static T: OnceLock<Trusted> = OnceLock::new();
    T.get_or_init(|| {
        let keys: Vec<_> = (0..3).map(|i| test_key(&format!("btm test key {i}"))).collect();
        let mut pks: Vec<PublicKey> = keys.iter().map(PublicKey::of).collect();
        pks.sort();
        let mut root = Signed::new(Root { version: 1, expires: 1_900_000_000, threshold: 2, keys: pks });
        let registry = Registry {
            version: 5,
            expires: 1_900_000_000,
            min_client_version: ClientVersion::new(0, 1, 0),
            domains: vec![],
            seed: None,
            elms: vec![],
        };
        let mut registry = Signed::new(registry);
        for k in &keys[..2] {
            root.sign(k);
            registry.sign(k);
        }
        Trusted { root, registry: Some(registry) }
    })
}

fuzz_target!(|data: &[u8]| {
    let t = trusted();
    if let Decision::Accept(r) = decide_registry(t, data, 1_800_000_000) {
        assert!(r.record().version > 5);
        assert!(btm_registry::tally(&r, &t.root.record().keys).valid >= 2);
    }
    if let Decision::Accept(r) = decide_root(&t.root, data) {
        assert_eq!(r.record().version, 2);
    }
});
