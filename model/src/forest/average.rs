//! Parameter averaging: `theta = sum_i w_i * theta_i` over every tensor (embeddings, positions
//! and norms included).
//!
//! [`average_files`] streams: it reads one ELM file at a time and adds it into one running
//! `f32` sum, so memory stays at about two models (the sum and the file being read) whatever
//! the number of ELMs. The result is an ordinary `model.safetensors`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde::Serialize;

use super::error::Error;
use super::manifest::Forest;
use crate::config::GptConfig;
use crate::gpt::Gpt;
use crate::weights::{self, NamedTensor};
use crate::{content_id, fsutil};

/// Checks averaging (or mixture) weights and scales them to sum to 1. Weights must be finite
/// and non-negative with a positive sum; weights that already sum to exactly 1 are returned
/// unchanged.
pub fn normalize_weights(w: &[f64]) -> Result<Vec<f64>, Error> {
    if w.is_empty() {
        return Err(Error::Empty("average"));
    }
    if let Some(bad) = w.iter().find(|x| !x.is_finite() || **x < 0.0) {
        return Err(Error::BadWeights(format!(
            "weight {bad} is not a finite non-negative number"
        )));
    }
    let s: f64 = w.iter().sum();
    if s <= 0.0 {
        return Err(Error::BadWeights("the weights sum to zero".into()));
    }
    Ok(if s == 1.0 {
        w.to_vec()
    } else {
        w.iter().map(|x| x / s).collect()
    })
}

/// One input of an average.
#[derive(Debug, Clone)]
pub struct Input {
    /// A `model.safetensors` file.
    pub path: PathBuf,
    /// Its weight.
    pub weight: f64,
    /// Its expected content id, when known (a forest's manifest gives it).
    pub id: Option<String>,
}

/// What an average did.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The architecture.
    pub architecture: GptConfig,
    /// Files read (inputs of weight 0 are skipped).
    pub files_read: usize,
    /// The normalised weights, in input order.
    pub weights: Vec<f64>,
    /// Content id of the written file.
    pub id: String,
    /// Peak resident memory of the process at the end, when the OS reports it.
    pub peak_rss_bytes: Option<u64>,
}

/// Adds `weight` times the tensors of a weights file's bytes into `acc` (created on the first
/// call), checking the file with [`btm_protocol::weights::parse`], which does not copy it.
fn accumulate(
    bytes: &[u8],
    weight: f32,
    expected: Option<&GptConfig>,
    acc: &mut Option<(GptConfig, Vec<NamedTensor>)>,
) -> Result<(), crate::Error> {
    let want = expected
        .copied()
        .or(acc.as_ref().map(|(c, _)| *c))
        .map(btm_protocol::weights::Config::from);
    let parsed = btm_protocol::weights::parse(bytes, want.as_ref())?;
    let acc = acc.get_or_insert_with(|| {
        let t = parsed
            .tensors
            .iter()
            .map(|t| NamedTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                values: vec![0.0; t.len()],
            })
            .collect();
        (parsed.config.into(), t)
    });
    // Both are in `expected_tensors` order of the same architecture.
    for (a, t) in acc.1.iter_mut().zip(&parsed.tensors) {
        for (a, v) in a.values.iter_mut().zip(t.values()) {
            *a += weight * v;
        }
    }
    Ok(())
}

/// Averages members of `forest` into `out`: `members` are (index into `forest.elms`, weight)
/// pairs. Each file is checked against its manifest id and the forest's architecture.
pub fn average_members(
    forest: &Forest,
    members: &[(usize, f64)],
    out: &Path,
) -> Result<Summary, Error> {
    let inputs: Vec<Input> = members
        .iter()
        .map(|&(i, weight)| {
            let file = &forest.elms[i].weights;
            Input {
                path: forest.resolve(file),
                weight,
                id: Some(file.id.clone()),
            }
        })
        .collect();
    average_files(&inputs, Some(&forest.architecture), out)
}

/// Averages weights files into `out`, one file in memory at a time. `expected`, when given,
/// is the architecture every input must have (otherwise the first file's). Inputs of weight 0
/// are not read.
pub fn average_files(
    inputs: &[Input],
    expected: Option<&GptConfig>,
    out: &Path,
) -> Result<Summary, Error> {
    let w = normalize_weights(&inputs.iter().map(|i| i.weight).collect::<Vec<_>>())?;
    let mut acc: Option<(GptConfig, Vec<NamedTensor>)> = None;
    let mut files_read = 0;
    for (input, &wi) in inputs.iter().zip(&w) {
        if wi == 0.0 {
            continue;
        }
        let bytes = fsutil::read_limited(&input.path, weights::MAX_FILE_BYTES)?;
        if let Some(id) = &input.id {
            let found = content_id(&bytes);
            if &found != id {
                return Err(Error::ContentMismatch {
                    path: input.path.clone(),
                    expected: id.clone(),
                    found,
                });
            }
        }
        accumulate(&bytes, wi as f32, expected, &mut acc).map_err(|e| e.in_file(&input.path))?;
        files_read += 1;
    }
    let Some((config, tensors)) = acc else {
        return Err(Error::Empty("average"));
    };
    let bytes = weights::to_bytes(&config, &tensors)?;
    drop(tensors);
    fsutil::write_atomic(out, &bytes)?;
    Ok(Summary {
        architecture: config,
        files_read,
        weights: w,
        id: content_id(&bytes),
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// Averages named tensors in memory (all of one architecture, in [`weights::named_tensors`]
/// order).
pub fn average_tensors(inputs: &[(&[NamedTensor], f64)]) -> Result<Vec<NamedTensor>, Error> {
    let w = normalize_weights(&inputs.iter().map(|i| i.1).collect::<Vec<_>>())?;
    let Some((first, _)) = inputs.first() else {
        return Err(Error::Empty("average"));
    };
    let mut out: Vec<NamedTensor> = first
        .iter()
        .map(|t| NamedTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            values: vec![0.0; t.values.len()],
        })
        .collect();
    for ((tensors, _), &wi) in inputs.iter().zip(&w) {
        if wi == 0.0 {
            continue;
        }
        let by_name: HashMap<&str, &NamedTensor> =
            tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        if by_name.len() != out.len() {
            return Err(
                crate::Error::Weights("models to average have different tensors".into()).into(),
            );
        }
        for o in out.iter_mut() {
            let t = by_name
                .get(o.name.as_str())
                .filter(|t| t.shape == o.shape)
                .ok_or_else(|| {
                    crate::Error::Weights(format!(
                        "tensor {} is missing or has another shape",
                        o.name
                    ))
                })?;
            for (a, v) in o.values.iter_mut().zip(&t.values) {
                *a += wi as f32 * v;
            }
        }
    }
    Ok(out)
}

/// Averages models in memory.
pub fn average_models(models: &[(&Gpt, f64)], device: &Device) -> Result<Gpt, Error> {
    let Some((first, _)) = models.first() else {
        return Err(Error::Empty("average"));
    };
    let config = first.config();
    let tensors: Vec<Vec<NamedTensor>> = models
        .iter()
        .map(|(m, _)| weights::named_tensors(m))
        .collect();
    for m in models {
        if m.0.config() != config {
            return Err(Error::ArchitectureMismatch {
                elm: "(average input)".into(),
                expected: config,
                found: m.0.config(),
            });
        }
    }
    let inputs: Vec<(&[NamedTensor], f64)> = tensors
        .iter()
        .map(Vec::as_slice)
        .zip(models.iter().map(|m| m.1))
        .collect();
    let avg = average_tensors(&inputs)?;
    Ok(weights::from_named_tensors(&config, avg, device)?)
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
