//! Throughput measurements, shaped like `../shared/bench/torch_gpt.py` so that the two can be
//! run side by side: random tokens, the same architecture and optimiser, median step time.

use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::Error;
use crate::config::GptConfig;
use crate::data::{DomainStream, Mixture};
use crate::gpt::Gpt;
use crate::train::{TrainConfig, Trainer};

/// One training-throughput measurement.
#[derive(Debug, Clone, Serialize)]
pub struct TrainBench {
    /// Backend label.
    pub backend: String,
    /// Architecture.
    pub config: GptConfig,
    /// Parameters.
    pub params: usize,
    /// Blocks per step.
    pub batch: usize,
    /// Median step time in milliseconds.
    pub step_ms: f64,
    /// Training tokens per second at the median.
    pub tokens_per_s: f64,
    /// Achieved GFLOP/s, counted as torch_gpt.py does.
    pub gflops: f64,
    /// Every measured step time (ms).
    pub steps_ms: Vec<f64>,
}

/// Times `steps` training updates (after `warmup` untimed ones) of `config` on random tokens.
pub fn train_throughput(
    config: &GptConfig,
    batch: usize,
    steps: usize,
    warmup: usize,
    device: &Device,
    backend: &str,
) -> Result<TrainBench, Error> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let n = (steps + warmup + 1) * batch * config.n_ctx + 1;
    let tokens: Vec<u32> = (0..n)
        .map(|_| rng.random_range(0..config.vocab_size as u32))
        .collect();
    let data = Mixture::new(vec![DomainStream::new("random", tokens, config.n_ctx)?], 0)?;
    let model = Gpt::init(config, 0, device);
    let cfg = TrainConfig {
        steps: (steps + warmup) as u64,
        batch_size: batch,
        checkpoint_every: 0,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(model, cfg, device, None)?;
    let mut times = Vec::new();
    for i in 0..steps + warmup {
        let t0 = Instant::now();
        trainer.step(&data)?;
        let dt = t0.elapsed().as_secs_f64();
        if i >= warmup {
            times.push(dt * 1e3);
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let med = sorted[sorted.len() / 2] / 1e3;
    let tokens = (batch * config.n_ctx) as f64;
    Ok(TrainBench {
        backend: backend.to_string(),
        config: *config,
        params: config.num_params(),
        batch,
        step_ms: med * 1e3,
        tokens_per_s: tokens / med,
        gflops: config.train_flops_per_token() * tokens / med / 1e9,
        steps_ms: times,
    })
}

/// Achieved GFLOP/s of an `n × n` f32 matrix product (the machine's practical peak).
pub fn matmul_gflops(n: usize, reps: usize, device: &Device) -> f64 {
    let a: Tensor<2> = Tensor::random([n, n], Distribution::Default, device);
    let b: Tensor<2> = Tensor::random([n, n], Distribution::Default, device);
    let _ = a.clone().matmul(b.clone()).into_data();
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t0 = Instant::now();
        let _ = a.clone().matmul(b.clone()).into_data();
        best = best.min(t0.elapsed().as_secs_f64());
    }
    2.0 * (n as f64).powi(3) / best / 1e9
}

/// The matrix kernels the CPU backend (burn-flex, through gemm) dispatches to on this machine.
/// gemm picks them at run time; its AVX-512 kernels are compiled in only with the `x86-v4`
/// feature (off by default: slower than its AVX2 kernels where we measured, BENCHMARKS.md).
pub fn cpu_kernels() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        // gemm's x86-v4 level: pulp's V4 (AVX-512 F, BW, CD, DQ and VL).
        let avx512 = has!("avx512f")
            && has!("avx512bw")
            && has!("avx512cd")
            && has!("avx512dq")
            && has!("avx512vl");
        if avx512 && cfg!(feature = "x86-v4") {
            "AVX-512 (x86-64-v4)"
        } else if has!("avx2") && has!("fma") {
            if avx512 {
                "AVX2+FMA (x86-64-v3; the CPU has AVX-512, the x86-v4 feature is off)"
            } else {
                "AVX2+FMA (x86-64-v3)"
            }
        } else {
            "SSE2 (x86-64 baseline)"
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "the target's SIMD (NEON on aarch64)"
    }
}
