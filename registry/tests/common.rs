//! Keys, records and store helpers shared by the tests.

use btm_protocol::*;
use btm_registry::{Decision, Store, StoreError, maintainer};

pub const NOW: u64 = 1_800_000_000;
pub const LATER: u64 = 1_900_000_000;

/// Whether the store accepted a change (it must not fail).
pub fn accepted<T>(decision: Result<Decision<T>, StoreError>) -> bool {
    matches!(decision.unwrap(), Decision::Accept(_))
}

pub fn key(i: u32) -> SigningKey {
    test_key(&format!("btm test key {i}"))
}

pub fn pk(i: u32) -> PublicKey {
    PublicKey::of(&key(i))
}

pub fn root(version: u64, keys: &[u32], threshold: u32) -> Root {
    let mut keys: Vec<PublicKey> = keys.iter().map(|&i| pk(i)).collect();
    keys.sort();
    Root {
        version,
        expires: LATER,
        threshold,
        keys,
    }
}

pub fn signed<R: Record>(record: R, signers: &[u32]) -> Signed<R> {
    let mut env = Signed::new(record);
    for &i in signers {
        env.sign(&key(i));
    }
    env
}

pub fn arch() -> Architecture {
    Architecture {
        vocab_size: 512,
        context: 64,
        d_model: 64,
        heads: 4,
        layers: 2,
    }
}

pub fn seed() -> SeedManifest {
    SeedManifest {
        architecture: arch(),
        tokenizer: ContentId::of(b"tokenizer"),
        weights: ContentId::of(b"seed weights"),
        training: TrainingSummary {
            steps: 100,
            tokens: 6400,
            flops: 1_000_000,
            valid_ppl_milli: 90_000,
        },
        schedule: Schedule {
            step: 100,
            total: 100,
        },
        optimizer: None,
    }
}

pub fn domain(name: &str) -> Domain {
    Domain {
        name: name.into(),
        description: String::new(),
        train: ContentId::of(format!("{name}/train").as_bytes()),
        valid: ContentId::of(format!("{name}/valid").as_bytes()),
        test: ContentId::of(format!("{name}/test").as_bytes()),
        eval: EvalSettings::public(64, 65_536, 20_000),
    }
}

/// Registry `version`, with a note in a domain description so two registries of one version can
/// differ.
pub fn registry(version: u64, note: &str) -> Registry {
    let mut legal = domain("legal");
    legal.description = note.into();
    Registry {
        version,
        expires: LATER,
        min_client_version: ClientVersion::new(0, 1, 0),
        domains: vec![domain("code"), legal],
        seed: Some(seed()),
        elms: vec![],
    }
}

/// A claim by test key `node` on `domain` until `lease_expires`.
pub fn claim(node: u32, domain: &str, lease_expires: u64) -> Claim {
    Claim {
        domain: domain.into(),
        node: pk(node),
        lease_expires,
        // Claimed at NOW (leases before NOW: at time 0, as the pure rule tests count time).
        first_claimed: if lease_expires >= NOW { NOW } else { 0 },
        progress: None,
    }
}

pub fn elm(trainer: u32, steps: u64) -> ElmRecord {
    ElmRecord {
        domain: "legal".into(),
        parents: vec![Parent {
            weights: seed().weights,
            weight_ppm: PPM_ONE,
        }],
        weights: ContentId::of(format!("elm {trainer} {steps}").as_bytes()),
        weights_size: arch().weights_size().expect("a valid architecture"),
        architecture: arch().id(),
        tokenizer: seed().tokenizer,
        steps,
        tokens: steps * 64,
        flops: steps * 1000,
        claimed_valid_ppl_milli: 50_000,
        trainer: pk(trainer),
    }
}

/// An unsigned registry draft file in `dir` (v1, expiring `LATER`) with the domain "legal".
pub fn legal_draft(dir: &std::path::Path) -> std::path::PathBuf {
    let draft = dir.join("registry.cbor");
    maintainer::init_registry(
        &draft,
        maintainer::RegistryInit {
            expires: LATER,
            ..Default::default()
        },
        false,
    )
    .unwrap();
    maintainer::add_domain(&draft, domain("legal")).unwrap();
    draft
}

/// A fresh store trusting root v1 (keys 0, 1, 2; threshold 2) and registry v5.
pub fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path().join("node.db")).unwrap();
    let root = signed(root(1, &[0, 1, 2], 2), &[0, 1]);
    assert!(matches!(
        store.init_root(&root.encode(), NOW).unwrap(),
        btm_registry::Decision::Accept(_)
    ));
    let reg = signed(registry(5, "v5"), &[0, 1]);
    assert!(matches!(
        store.update_registry(&reg.encode(), NOW).unwrap(),
        btm_registry::Decision::Accept(_)
    ));
    (dir, store)
}

/// Every row of every table that holds trusted state or peer data (all but `equivocations`,
/// which collects evidence), as text: equal dumps mean an unchanged store.
pub fn dump(store: &Store) -> String {
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    let mut out = String::new();
    for table in [
        "roots",
        "registries",
        "trusted",
        "claims",
        "elms",
        "attestations",
        "peers",
    ] {
        let mut stmt = conn
            .prepare(&format!("SELECT * FROM {table} ORDER BY 1, 2"))
            .unwrap();
        let n = stmt.column_count();
        let rows = stmt
            .query_map([], |r| {
                let cols: Vec<String> = (0..n)
                    .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                    .collect();
                Ok(cols.join("|"))
            })
            .unwrap();
        out.push_str(table);
        out.push('\n');
        for row in rows {
            out.push_str(&row.unwrap());
            out.push('\n');
        }
    }
    out
}
