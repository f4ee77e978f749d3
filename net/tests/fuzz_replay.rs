//! Replays every committed fuzz corpus file of the net and model targets
//! (`fuzz/corpus/<target>/`) through the same checks the cargo-fuzz targets in `fuzz/heavy`
//! run (`btm_net::fuzzing`). `write_net_seed_corpus` (ignored) rewrites those corpora with the
//! real writers.

use std::io::Write;
use std::path::PathBuf;

use btm_net::fuzzing as checks;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn replay(target: &str, check: fn(&[u8])) {
    let dir = corpus_dir(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "{} is empty", dir.display());
    for p in paths {
        eprintln!("{}", p.display());
        check(&std::fs::read(&p).unwrap());
    }
}

#[test]
fn fuzz_corpus_net_and_model_targets_replay() {
    replay("addr_record", checks::addr_record);
    replay("record_key", checks::record_key);
    replay("documents", checks::documents);
    replay("forest_manifest", checks::forest_manifest);
}

fn write(target: &str, files: Vec<(String, Vec<u8>)>) {
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

#[test]
#[ignore = "writes fuzz/corpus/{addr_record,record_key,documents,forest_manifest}; run by fuzz/seed-corpus.sh"]
fn write_net_seed_corpus() {
    use btm_net::addr::AddrRecord;
    use btm_net::{DhtKey, ProviderKey, RecordKey, Topic};
    use btm_protocol::{ContentId, PublicKey};

    let key = checks::addr_key();
    let node = PublicKey::of(&key);
    let rec = AddrRecord {
        node,
        expires: 1_900_000_000,
        addrs: vec![
            "127.0.0.1:4433".parse().unwrap(),
            "[::1]:4433".parse().unwrap(),
        ],
        relays: vec!["https://relay.example.org/".parse().unwrap()],
    };
    let good = rec.sign(&key);
    let mut flipped = good.clone();
    flipped[45] ^= 1;
    let one = AddrRecord {
        addrs: vec!["10.0.0.1:1".parse().unwrap()],
        relays: vec![],
        ..rec.clone()
    }
    .sign(&key);
    write(
        "addr_record",
        vec![
            ("valid".into(), good.clone()),
            ("valid-one".into(), one),
            ("bad-signature".into(), flipped),
            ("truncated".into(), good[..good.len() - 1].to_vec()),
        ],
    );

    let net = checks::network();
    let id = ContentId::of(b"x");
    let mut keys: Vec<(String, Vec<u8>)> = [
        RecordKey::Registry,
        RecordKey::Root(0),
        RecordKey::Root(17),
        RecordKey::Seed,
        RecordKey::Claim {
            domain: "legal".into(),
            node,
        },
        RecordKey::Elm(id),
        RecordKey::ElmOf {
            domain: "rust_code".into(),
            node,
        },
        RecordKey::Addr(node),
    ]
    .iter()
    .enumerate()
    .map(|(i, k)| (format!("record-{i}"), k.to_bytes(&net)))
    .collect();
    for (i, k) in [
        ProviderKey::Blob(id),
        ProviderKey::Claimants("legal".into()),
        ProviderKey::Trainers("legal".into()),
    ]
    .iter()
    .enumerate()
    {
        keys.push((format!("provider-{i}"), k.to_bytes(&net)));
    }
    for (i, t) in Topic::ALL.iter().enumerate() {
        keys.push((format!("topic-{i}"), t.string(&net).into_bytes()));
    }
    let root = String::from_utf8(RecordKey::Root(0).to_bytes(&net)).unwrap();
    keys.push(("root-leading-zero".into(), format!("{root}7").into_bytes()));
    keys.push(("foreign".into(), b"btm/1/00/registry".to_vec()));
    write("record_key", keys);

    let jsonl =
        b"{\"id\":\"a\",\"text\":\"hello world\"}\n\n{\"id\":\"b\",\"text\":\"\\u00e9t\\u00e9\"}\n"
            .to_vec();
    let mut enc = zstd::Encoder::new(Vec::new(), 3).unwrap();
    enc.write_all(&jsonl).unwrap();
    let zst = enc.finish().unwrap();
    write(
        "documents",
        vec![
            ("jsonl".into(), jsonl.clone()),
            ("zst".into(), zst.clone()),
            ("zst-truncated".into(), zst[..zst.len() / 2].to_vec()),
            ("bad-line".into(), b"{\"id\":\"a\"}\n".to_vec()),
            (
                "not-utf8".into(),
                b"{\"id\":\"\xff\",\"text\":\"\"}\n".to_vec(),
            ),
        ],
    );

    let forest = serde_json::json!({
        "format": "btm-forest/1",
        "architecture": {"vocab_size": 2048, "n_ctx": 128, "d_model": 96, "n_heads": 4, "n_layers": 3},
        "tokenizer": {"path": "tokenizer.json", "id": ContentId::of(b"t").to_string()},
        "seed": {"path": "seed.safetensors", "id": ContentId::of(b"s").to_string()},
        "elms": [{
            "name": "legal", "domains": ["legal"], "init": "posterior_average",
            "weights": {"path": "elms/legal.safetensors", "id": ContentId::of(b"l").to_string()},
            "parents": [{"name": "seed", "id": ContentId::of(b"s").to_string(), "weight": 0.75}],
            "train": {"steps": 10, "tokens": 1280, "flops": 1.5e9}
        }]
    });
    let valid = serde_json::to_vec_pretty(&forest).unwrap();
    assert!(
        btm_model::forest::Forest::from_json(&valid, std::path::Path::new("f/forest.json")).is_ok()
    );
    let mut twice = forest.clone();
    let elm = twice["elms"][0].clone();
    twice["elms"].as_array_mut().unwrap().push(elm);
    write(
        "forest_manifest",
        vec![
            ("valid".into(), valid),
            ("repeated-elm".into(), serde_json::to_vec(&twice).unwrap()),
            (
                "bad-format".into(),
                b"{\"format\":\"btm-forest/2\"}".to_vec(),
            ),
        ],
    );
}
