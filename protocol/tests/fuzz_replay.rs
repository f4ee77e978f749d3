//! Replays every committed fuzz corpus file of the protocol targets (`fuzz/corpus/<target>/`)
//! through the same checks the cargo-fuzz targets run (`btm_protocol::fuzzing`).
//! `write_weights_seed_corpus` (ignored) rewrites the seed corpus with the real writer.

use std::path::PathBuf;

use btm_protocol::fuzzing::weights_file as file;
use btm_protocol::weights::{self, Config};

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Every file of a target's committed corpus.
pub fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "{} is empty", dir.display());
    out
}

#[test]
fn fuzz_corpus_weights_replays() {
    for (path, bytes) in corpus("weights") {
        eprintln!("{}", path.display());
        btm_protocol::fuzzing::weights(&bytes);
    }
}

#[test]
#[ignore = "writes fuzz/corpus/weights; run by fuzz/seed-corpus.sh"]
fn write_weights_seed_corpus() {
    let dir = corpus_dir("weights");
    std::fs::create_dir_all(&dir).unwrap();
    let tiny = Config {
        vocab_size: 2,
        n_ctx: 2,
        d_model: 1,
        n_heads: 1,
        n_layers: 1,
    };
    let small = Config {
        vocab_size: 64,
        n_ctx: 8,
        d_model: 4,
        n_heads: 2,
        n_layers: 2,
    };
    let good = file(&tiny, |i| i as f32 * 0.5 - 1.0);
    let mut files: Vec<(&str, Vec<u8>)> = vec![
        ("valid-tiny", good.clone()),
        ("valid-small", file(&small, |i| (i as f32).sin())),
        ("nan", file(&tiny, |i| if i == 1 { f32::NAN } else { 0.0 })),
        ("truncated", good[..good.len() - 3].to_vec()),
        ("header-only", good[..good.len() / 2].to_vec()),
        ("empty", Vec::new()),
    ];
    let mut bad_len = good.clone();
    bad_len[0] ^= 0x10;
    files.push(("bad-header-length", bad_len));
    let mut other = tiny;
    other.n_layers = 2;
    // The tensors of `tiny` under the metadata of `other`: a tensor is missing.
    let mut meta = weights::metadata(&other);
    meta.insert("extra".into(), "x".into());
    let shapes = weights::expected_tensors(&tiny);
    let zeros: Vec<Vec<f32>> = shapes
        .iter()
        .map(|(_, s)| vec![0.0; s.iter().product()])
        .collect();
    let entries = |extra: bool| {
        let mut v: Vec<(String, Vec<usize>, &[f32])> = shapes
            .iter()
            .zip(&zeros)
            .map(|((n, s), z)| (format!("{}{n}", weights::PREFIX), s.clone(), z.as_slice()))
            .collect();
        if extra {
            v.push(("adam.m.wte.weight".into(), vec![1], &[0.0][..]));
        }
        v
    };
    files.push((
        "missing-tensor",
        weights::write(entries(false), &meta).unwrap(),
    ));
    files.push((
        "extra-tensor",
        weights::write(entries(true), &weights::metadata(&tiny)).unwrap(),
    ));
    files.push((
        "no-config",
        weights::write(entries(false), &Default::default()).unwrap(),
    ));
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
