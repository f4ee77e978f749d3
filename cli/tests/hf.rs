//! Issue 16: `forest export-hf` writes folders that transformers loads with the perplexity
//! `btm-node eval` measures (scripts/check_hf_export.py), with a model card and the ensemble
//! recipe beside them.
//!
//! The transformers check needs a Python with torch, transformers, tokenizers and zstandard:
//! `$BTM_PYTHON`, else `python3`. Without one the check prints SKIPPED (the export itself is
//! still tested), unless `BTM_REQUIRE_TRANSFORMERS` is set.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use btm_model::files::{TOKENIZER_FILE, WEIGHTS_FILE};
use btm_model::gpt::Gpt;
use btm_model::tokenizer::Tokenizer;
use btm_model::weights;

fn btm(args: &[&str]) -> Output {
    btm_testkit::output_ok(
        Command::new(env!("CARGO_BIN_EXE_btm-node")).args(args),
        &format!("btm-node {args:?}"),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// A Python that can run scripts/check_hf_export.py.
fn python() -> Option<PathBuf> {
    let exe =
        std::env::var_os("BTM_PYTHON").map_or_else(|| PathBuf::from("python3"), PathBuf::from);
    let ok = Command::new(&exe)
        .args(["-c", "import torch, transformers, tokenizers, zstandard"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(exe)
}

/// A random tiny GPT with a small tokenizer, as a model directory.
fn tiny_model(dir: &Path, seed: u64) {
    let corpus = btm_model::data::Corpus::bundled();
    let docs = corpus
        .documents("bible_kjv", btm_model::data::Split::Train)
        .expect("corpus");
    let text: String = docs.iter().take(20).map(|d| d.text.as_str()).collect();
    let tok = Tokenizer::train(std::iter::once(text.as_str()), 300).expect("tokenizer");
    let config = btm_testkit::tiny_gpt(tok.vocab_size(), 32);
    let model = Gpt::init(&config, seed, &btm_testkit::cpu());
    std::fs::create_dir_all(dir).expect("model dir");
    std::fs::write(
        dir.join(WEIGHTS_FILE),
        weights::to_bytes(&config, &weights::named_tensors(&model)).expect("weights"),
    )
    .expect("write weights");
    std::fs::write(dir.join(TOKENIZER_FILE), tok.json()).expect("write tokenizer");
}

/// Issue 16: a forest of two ELMs exported; cards, recipe and averages present; the ELM's
/// folder scores the same perplexity in transformers as in btm-node.
#[test]
fn forest_export_hf_loads_in_transformers_with_the_same_perplexity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    tiny_model(&d.join("seed"), 1);
    // Two "ELMs": other random initialisations with the same tokenizer.
    for (name, seed) in [("bible_kjv", 2), ("manpages", 3)] {
        let m = d.join(name);
        tiny_model(&m, seed);
        std::fs::copy(d.join("seed").join(TOKENIZER_FILE), m.join(TOKENIZER_FILE))
            .expect("same tokenizer");
    }
    let forest = d.join("forest");
    btm(&[
        "forest",
        "create",
        "--dir",
        s(&forest),
        "--tokenizer",
        s(&d.join("seed").join(TOKENIZER_FILE)),
        "--seed",
        s(&d.join("seed")),
    ]);
    for name in ["bible_kjv", "manpages"] {
        btm(&[
            "forest",
            "add",
            "--forest",
            s(&forest),
            "--elm",
            s(&d.join(name)),
            "--domain",
            name,
        ]);
    }
    let out = d.join("hf");
    btm(&[
        "forest",
        "export-hf",
        "--forest",
        s(&forest),
        "--out",
        s(&out),
        "--average-text",
        "And God said, Let there be light",
    ]);
    for folder in [
        "bible_kjv",
        "manpages",
        "average-uniform",
        "average-posterior",
    ] {
        for f in [
            "model.safetensors",
            "config.json",
            "tokenizer.json",
            "README.md",
            "btm.json",
        ] {
            assert!(out.join(folder).join(f).is_file(), "{folder}/{f} missing");
        }
    }
    let card = std::fs::read_to_string(out.join("bible_kjv").join("README.md")).expect("card");
    assert!(card.contains("library_name: transformers"), "{card}");
    assert!(
        card.contains("Public domain") || card.contains("public domain"),
        "no licence: {card}"
    );
    assert!(card.contains("\"parents\""), "{card}");
    let recipe: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("ensemble.json")).expect("recipe"))
            .expect("recipe is JSON");
    assert_eq!(
        recipe["members"].as_array().map(Vec::len),
        Some(2),
        "{recipe}"
    );

    let Some(py) = python() else {
        assert!(
            std::env::var_os("BTM_REQUIRE_TRANSFORMERS").is_none(),
            "BTM_REQUIRE_TRANSFORMERS is set but no Python with torch, transformers, tokenizers and zstandard was found (set BTM_PYTHON)"
        );
        eprintln!(
            "SKIPPED the transformers check of forest_export_hf: no Python with torch, transformers, \
             tokenizers and zstandard (set BTM_PYTHON); the export itself was checked"
        );
        return;
    };
    // One ELM and the posterior-weighted average: both load with the perplexity btm-node
    // measures.
    for folder in ["bible_kjv", "average-posterior"] {
        check_in_transformers(&py, &out.join(folder), d);
    }
}

/// Scores an exported folder with `btm-node eval` and with transformers
/// (scripts/check_hf_export.py), which fails unless the two perplexities agree.
fn check_in_transformers(py: &Path, elm: &Path, d: &Path) {
    let eval = btm(&[
        "--json",
        "eval",
        "--model",
        s(elm),
        "--domain",
        "bible_kjv",
        "--max-tokens",
        "512",
    ]);
    let btm_json = d.join("btm.json");
    std::fs::write(&btm_json, &eval.stdout).expect("write eval");
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let check = btm_testkit::output_ok(
        Command::new(py)
            .env("HF_HUB_OFFLINE", "1")
            .arg(checkout.join("scripts").join("check_hf_export.py"))
            .arg(elm)
            .arg(checkout.join("data/corpus/bible_kjv/valid.jsonl.zst"))
            .arg("512")
            .arg(&btm_json),
        "check_hf_export.py (transformers and btm-node must agree)",
    );
    eprintln!("{}", String::from_utf8_lossy(&check.stdout).trim());
}
