//! Sample records shared by the tests and the checked-in test vectors.

use btm_protocol::*;

pub fn key(i: u32) -> SigningKey {
    test_key(&format!("btm test key {i}"))
}

pub fn id(label: &str) -> ContentId {
    ContentId::of(label.as_bytes())
}

pub fn root() -> Root {
    let mut keys: Vec<PublicKey> = (0..3).map(|i| PublicKey::of(&key(i))).collect();
    keys.sort();
    Root {
        version: 1,
        expires: 1_900_000_000,
        threshold: 2,
        keys,
    }
}

pub fn arch() -> Architecture {
    Architecture {
        vocab_size: 50_257,
        context: 1024,
        d_model: 768,
        heads: 12,
        layers: 12,
    }
}

pub fn seed() -> SeedManifest {
    SeedManifest {
        architecture: arch(),
        tokenizer: id("tokenizer"),
        weights: id("seed weights"),
        training: TrainingSummary {
            steps: 40_000,
            tokens: 20_971_520_000,
            flops: u64::MAX,
            valid_ppl_milli: 23_456,
        },
        schedule: Schedule {
            step: 40_000,
            total: 80_000,
        },
        optimizer: Some(id("seed optimizer state")),
    }
}

pub fn domain(name: &str) -> Domain {
    Domain {
        name: name.into(),
        description: format!("the {name} domain, ünïcödé allowed"),
        train: id(&format!("{name} train")),
        valid: id(&format!("{name} valid")),
        test: id(&format!("{name} test")),
        eval: EvalSettings {
            block_size: 1024,
            max_eval_tokens: 1_048_576,
            ppl_tolerance_ppm: 20_000,
            min_gain_ppm: 10_000,
            max_memorisation_ppm: 1_100_000,
            withheld: Some(id(&format!("{name} withheld pool"))),
        },
    }
}

pub fn elm() -> ElmRecord {
    let mut parents = vec![
        Parent {
            weights: id("seed weights"),
            weight_ppm: 700_000,
        },
        Parent {
            weights: id("other elm weights"),
            weight_ppm: 300_000,
        },
    ];
    parents.sort_by_key(|p| p.weights);
    ElmRecord {
        domain: "legal".into(),
        parents,
        weights: id("legal elm weights"),
        weights_size: arch().weights_size().expect("a valid architecture"),
        architecture: arch().id(),
        tokenizer: id("tokenizer"),
        steps: 1000,
        tokens: 4_096_000,
        flops: 3_000_000_000_000_000,
        claimed_valid_ppl_milli: 18_250,
        trainer: PublicKey::of(&key(3)),
    }
}

pub fn registry() -> Registry {
    let elm = elm();
    Registry {
        version: 1,
        expires: 1_900_000_000,
        min_client_version: ClientVersion::new(0, 1, 0),
        domains: vec![domain("code"), domain("legal")],
        seed: Some(seed()),
        elms: vec![AcceptedElm {
            record: elm.id(),
            domain: elm.domain.clone(),
            weights: elm.weights,
        }],
    }
}

pub fn claim() -> Claim {
    Claim {
        domain: "legal".into(),
        node: PublicKey::of(&key(3)),
        lease_expires: 1_800_000_000,
        first_claimed: 1_799_000_000,
        progress: Some(ClaimProgress {
            step: 250,
            loss_milli: 3_125,
            checkpoint: id("legal checkpoint at step 250"),
        }),
    }
}

pub fn attestation() -> Attestation {
    Attestation {
        verifier: PublicKey::of(&key(4)),
        elm: elm().id(),
        measured_ppl_milli: 18_300,
        verdict: Verdict::Accept,
        pool: EvalPool::Withheld,
    }
}

pub fn signed<R: Record>(record: R, keys: &[u32]) -> Signed<R> {
    let mut s = Signed::new(record);
    for &k in keys {
        s.sign(&key(k));
    }
    s
}
