//! Shared fixtures: the bundled corpus and a small tokenizer trained once per test binary.

use std::sync::OnceLock;

use btm_model::data::{self, Corpus};
use btm_model::tokenizer::Tokenizer;
use btm_model::train::TrainConfig;
use btm_model::weights::NamedTensor;
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

/// A run of `steps` updates of `batch_size` blocks at peak learning rate `lr`, with no
/// checkpoints.
pub fn short_run(steps: u64, batch_size: usize, lr: f64) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size,
        lr,
        checkpoint_every: 0,
        ..Default::default()
    }
}

/// The largest absolute difference between two equally long value lists.
pub fn max_abs_diff(x: &[f32], y: &[f32]) -> f32 {
    x.iter()
        .zip(y)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0f32, f32::max)
}

/// Asserts that two models have the same tensors, by name, with values within `tol`.
pub fn assert_same_tensors(a: &[NamedTensor], b: &[NamedTensor], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.name, y.name);
        let d = max_abs_diff(&x.values, &y.values);
        assert!(d < tol, "{} differs by {d}", x.name);
    }
}
