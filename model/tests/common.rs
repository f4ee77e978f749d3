//! Shared fixtures: the bundled corpus and a small tokenizer trained once per test binary.

use std::sync::OnceLock;

use btm_model::data::{self, Corpus};
use btm_model::tokenizer::Tokenizer;
use btm_model::{GptConfig, Preset};
use burn::tensor::Device;

pub fn corpus() -> Corpus {
    Corpus::bundled()
}

/// A 2048-token BPE trained on 64 kB of each training domain.
pub fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| data::seed_mix_tokenizer(&corpus(), 2048, 64 << 10).unwrap())
}

pub fn tiny() -> GptConfig {
    Preset::Tiny.config().with_vocab(tokenizer().vocab_size())
}

pub fn cpu() -> Device {
    Device::flex()
}

pub fn assert_close(a: f64, b: f64, tol: f64, what: &str) {
    assert!(
        (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs())),
        "{what}: {a} vs {b} (tol {tol})"
    );
}
