//! The ELM weights file format: safetensors named like Hugging Face's `GPT2LMHeadModel`.
//!
//! A weights file holds one little-endian f32 tensor per parameter under its GPT-2 name
//! (`transformer.wte.weight`, `transformer.h.0.attn.c_attn.weight`, ...; the output head is tied
//! to `wte` and not stored) and two metadata entries: `format = "pt"` (what `transformers`
//! expects) and `btm.config`, the architecture ([`Config`]) as JSON. [`parse`] checks the whole
//! file: every expected name present and nothing else, every shape and dtype as the
//! architecture implies, every value finite. Errors name the tensor.
//!
//! Parsing borrows: a [`Tensor`] is a view of the file's bytes, so checking a file costs no
//! copy of its tensors (the model crate copies each one once, into the model). This module is
//! pure and does not depend on burn, so the fuzz build can use it. The normative description
//! is `specs/model-formats.md`.
//!
//! ```
//! use btm_protocol::weights::{self, Config};
//!
//! let config = Config { vocab_size: 8, n_ctx: 4, d_model: 4, n_heads: 2, n_layers: 1 };
//! let values: Vec<Vec<f32>> = weights::expected_tensors(&config)
//!     .iter()
//!     .map(|(_, shape)| vec![0.5; shape.iter().product()])
//!     .collect();
//! let shapes = weights::expected_tensors(&config);
//! let bytes = weights::to_bytes(
//!     &config,
//!     shapes.iter().zip(&values).map(|((n, s), v)| (n.as_str(), s.as_slice(), v.as_slice())),
//! )?;
//! assert_eq!(bytes.len() as u64, weights::expected_size(&config)?);
//! let parsed = weights::parse(&bytes, Some(&config))?;
//! assert_eq!(parsed.tensors[0].name, "wte.weight");
//! assert!(parsed.tensors[0].values().all(|v| v == 0.5));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};

use safetensors::tensor::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

/// Prefix of every tensor name, as in `GPT2LMHeadModel.state_dict()`.
pub const PREFIX: &str = "transformer.";

/// Metadata key holding the [`Config`] as JSON.
pub const CONFIG_KEY: &str = "btm.config";

/// Largest weights file we accept (the 124M preset is about 500 MB).
pub const MAX_FILE_BYTES: u64 = 4 << 30;

/// The shape of a GPT-2-style decoder as a weights file's `btm.config` states it (the model
/// crate's `GptConfig` converts to and from it; the JSON field names are the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context length: the number of learned positions.
    pub n_ctx: usize,
    /// Model width.
    pub d_model: usize,
    /// Attention heads; must divide `d_model`.
    pub n_heads: usize,
    /// Transformer blocks.
    pub n_layers: usize,
}

impl Config {
    /// Checks that the shape is usable; the error says which bound is broken.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.vocab_size < 2 || self.vocab_size > 1 << 20 {
            return Err("vocab_size must be between 2 and 2^20");
        }
        if self.n_ctx < 2 || self.n_ctx > 1 << 16 {
            return Err("n_ctx must be between 2 and 65536");
        }
        if self.d_model == 0 || self.d_model > 1 << 16 {
            return Err("d_model must be between 1 and 65536");
        }
        if self.n_heads == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            return Err("n_heads must divide d_model");
        }
        if self.n_layers == 0 || self.n_layers > 1024 {
            return Err("n_layers must be between 1 and 1024");
        }
        Ok(())
    }

    /// Total parameters (the tied output head counted once). Cannot overflow for a valid
    /// configuration on a 64-bit target (at most about 2^47).
    pub fn num_params(&self) -> u64 {
        expected_tensors(self)
            .iter()
            .map(|(_, s)| s.iter().map(|&n| n as u64).product::<u64>())
            .sum()
    }
}

/// Why a weights file was rejected. The messages are those the model crate reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeightsError {
    /// Malformed, incomplete or holding non-finite values; the message names the tensor.
    #[error("{0}")]
    Invalid(String),
    /// The `btm.config` metadata parses but is not a usable architecture.
    #[error("{0}")]
    Config(&'static str),
    /// The file's architecture is not the one required.
    #[error("architecture mismatch: the file holds {found:?}, expected {expected:?}")]
    Mismatch {
        /// The file's.
        found: Config,
        /// The one required.
        expected: Config,
    },
}

fn invalid(m: String) -> WeightsError {
    WeightsError::Invalid(m)
}

fn not_safetensors(e: safetensors::SafeTensorError) -> WeightsError {
    invalid(format!("not a safetensors file: {e}"))
}

/// One f32 tensor of a file: a view of the file's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor<'a> {
    /// The name; for a model's tensors without [`PREFIX`] (e.g. `h.0.ln_1.weight`).
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// The row-major values as little-endian f32 bytes (`4 * shape.product()` of them).
    pub data: &'a [u8],
}

impl Tensor<'_> {
    /// The number of values.
    pub fn len(&self) -> usize {
        self.data.len() / 4
    }

    /// Whether the tensor holds no values.
    pub fn is_empty(&self) -> bool {
        self.data.len() < 4
    }

    /// The values, decoded on the fly.
    pub fn values(&self) -> impl ExactSizeIterator<Item = f32> + '_ {
        self.data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
    }

    /// The values, copied.
    pub fn to_vec(&self) -> Vec<f32> {
        self.values().collect()
    }
}

/// A checked weights file: its architecture and its tensors in [`expected_tensors`] order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weights<'a> {
    /// The architecture of the file's `btm.config`.
    pub config: Config,
    /// Every parameter (names without [`PREFIX`]), in [`expected_tensors`] order.
    pub tensors: Vec<Tensor<'a>>,
}

/// Every parameter name the configuration implies (without [`PREFIX`]), in the model's
/// visiting order, with its shape.
pub fn expected_tensors(config: &Config) -> Vec<(String, Vec<usize>)> {
    let d = config.d_model;
    let mut out = vec![
        ("wte.weight".to_string(), vec![config.vocab_size, d]),
        ("wpe.weight".to_string(), vec![config.n_ctx, d]),
    ];
    for i in 0..config.n_layers {
        let p = |s: &str| format!("h.{i}.{s}");
        out.extend([
            (p("ln_1.weight"), vec![d]),
            (p("ln_1.bias"), vec![d]),
            (p("attn.c_attn.weight"), vec![d, 3 * d]),
            (p("attn.c_attn.bias"), vec![3 * d]),
            (p("attn.c_proj.weight"), vec![d, d]),
            (p("attn.c_proj.bias"), vec![d]),
            (p("ln_2.weight"), vec![d]),
            (p("ln_2.bias"), vec![d]),
            (p("mlp.c_fc.weight"), vec![d, 4 * d]),
            (p("mlp.c_fc.bias"), vec![4 * d]),
            (p("mlp.c_proj.weight"), vec![4 * d, d]),
            (p("mlp.c_proj.bias"), vec![d]),
        ]);
    }
    out.push(("ln_f.weight".to_string(), vec![d]));
    out.push(("ln_f.bias".to_string(), vec![d]));
    out
}

/// The metadata of a weights file of architecture `config`: `format = "pt"` and `btm.config`.
pub fn metadata(config: &Config) -> BTreeMap<String, String> {
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    // Serialising a struct of integers to JSON cannot fail.
    let json = serde_json::to_string(config).unwrap_or_default();
    metadata.insert(CONFIG_KEY.to_string(), json);
    metadata
}

/// The checked architecture in a file's metadata.
pub fn config_from_metadata(meta: &HashMap<String, String>) -> Result<Config, WeightsError> {
    let json = meta
        .get(CONFIG_KEY)
        .ok_or_else(|| invalid(format!("metadata entry {CONFIG_KEY} is missing")))?;
    let config: Config = serde_json::from_str(json).map_err(|e| {
        invalid(format!(
            "metadata entry {CONFIG_KEY} is not a configuration: {e}"
        ))
    })?;
    config.validate().map_err(WeightsError::Config)?;
    Ok(config)
}

/// A file's metadata, from its header alone (the tensor data is not looked at).
pub fn read_metadata(bytes: &[u8]) -> Result<HashMap<String, String>, WeightsError> {
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(not_safetensors)?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// The checked architecture of a file, from its header alone.
pub fn read_config(bytes: &[u8]) -> Result<Config, WeightsError> {
    config_from_metadata(&read_metadata(bytes)?)
}

/// Parses and checks a weights file's bytes without copying its tensors. `expected`, when
/// given, must equal the file's architecture (a forest member must have the forest's).
///
/// Checks, in order: the header; the `btm.config` metadata; the architecture against
/// `expected`; every stored tensor (in name order) is under [`PREFIX`] and F32; every expected
/// tensor (in [`expected_tensors`] order) is present with its shape and finite values; nothing
/// else is stored.
pub fn parse<'a>(bytes: &'a [u8], expected: Option<&Config>) -> Result<Weights<'a>, WeightsError> {
    let config = read_config(bytes)?;
    if let Some(want) = expected
        && want != &config
    {
        return Err(WeightsError::Mismatch {
            found: config,
            expected: *want,
        });
    }
    let st = SafeTensors::deserialize(bytes).map_err(not_safetensors)?;
    let mut names = st.names();
    names.sort_unstable();
    let mut by_name: HashMap<&str, safetensors::tensor::TensorView<'a>> = HashMap::new();
    for full in names {
        let view = st
            .tensor(full)
            .map_err(|e| invalid(format!("tensor {full}: {e}")))?;
        let Some(name) = full.strip_prefix(PREFIX) else {
            return Err(invalid(format!("unexpected tensor {full}")));
        };
        if view.dtype() != Dtype::F32 {
            return Err(invalid(format!(
                "tensor {full} has dtype {:?}, expected F32",
                view.dtype()
            )));
        }
        by_name.insert(name, view);
    }
    let expected = expected_tensors(&config);
    let mut tensors = Vec::with_capacity(expected.len());
    for (name, shape) in &expected {
        let Some(view) = by_name.get(name.as_str()) else {
            return Err(invalid(format!("tensor {PREFIX}{name} is missing")));
        };
        if view.shape() != shape.as_slice() {
            return Err(invalid(format!(
                "tensor {PREFIX}{name} has shape {:?}, expected {shape:?}",
                view.shape()
            )));
        }
        let t = Tensor {
            name: name.clone(),
            shape: shape.clone(),
            data: view.data(),
        };
        if !t.data.len().is_multiple_of(4) || t.len() != shape.iter().product::<usize>() {
            return Err(invalid(format!(
                "tensor {PREFIX}{name} has the wrong number of values"
            )));
        }
        if let Some((i, v)) = t.values().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(invalid(format!(
                "tensor {PREFIX}{name} holds a non-finite value ({v}) at flat index {i}"
            )));
        }
        tensors.push(t);
    }
    if by_name.len() != expected.len() {
        let known: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        let mut extra: Vec<&str> = by_name
            .keys()
            .copied()
            .filter(|n| !known.contains(n))
            .collect();
        extra.sort_unstable();
        return Err(invalid(format!("unexpected tensors: {}", extra.join(", "))));
    }
    Ok(Weights { config, tensors })
}

/// A safetensors file whose tensors are all f32 (a weights file or a checkpoint of any
/// model), split by name; nothing about the model is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFile<'a> {
    /// The metadata.
    pub meta: HashMap<String, String>,
    /// The tensors under [`PREFIX`] (named without it), in name order.
    pub model: Vec<Tensor<'a>>,
    /// Every other tensor (a checkpoint's Adam moments), under its full name, in name order.
    pub other: Vec<Tensor<'a>>,
}

/// Parses a safetensors file whose tensors are all f32 without copying them.
pub fn parse_raw(bytes: &[u8]) -> Result<RawFile<'_>, WeightsError> {
    let meta = read_metadata(bytes)?;
    let st = SafeTensors::deserialize(bytes).map_err(not_safetensors)?;
    let mut raw = RawFile {
        meta,
        model: Vec::new(),
        other: Vec::new(),
    };
    let mut views = st.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, view) in views {
        if view.dtype() != Dtype::F32 {
            return Err(invalid(format!(
                "tensor {name} has dtype {:?}, expected F32",
                view.dtype()
            )));
        }
        let (list, name) = match name.strip_prefix(PREFIX) {
            Some(n) => (&mut raw.model, n.to_string()),
            None => (&mut raw.other, name),
        };
        list.push(Tensor {
            name,
            shape: view.shape().to_vec(),
            data: view.data(),
        });
    }
    Ok(raw)
}

/// The header (length prefix excluded) of a deterministic file: tensors in name order with
/// consecutive offsets, metadata keys sorted, padded with spaces so the data starts 8-aligned.
/// Returns the header and the data length in bytes.
fn header<'n>(
    tensors: impl IntoIterator<Item = (&'n str, &'n [usize])>,
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, usize), WeightsError> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let meta: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    }
    let mut offset = 0usize;
    for (name, shape) in tensors {
        if name == "__metadata__" || header.contains_key(name) {
            return Err(invalid(format!(
                "tensor name {name:?} is reserved or repeated"
            )));
        }
        let bytes = shape
            .iter()
            .try_fold(4usize, |a, &n| a.checked_mul(n))
            .ok_or_else(|| invalid(format!("tensor {name}: shape {shape:?} is too large")))?;
        let end = offset
            .checked_add(bytes)
            .ok_or_else(|| invalid("tensors too large".to_string()))?;
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| invalid(format!("header: {e}")))?;
    // The data section starts 8-aligned; safetensors pads the header with spaces.
    while !(8 + json.len()).is_multiple_of(8) {
        json.push(b' ');
    }
    Ok((json, offset))
}

/// Writes a safetensors file deterministically: tensors in name order, metadata keys sorted
/// (a model's bytes are its identity). All tensors are F32.
pub fn write<'a>(
    tensors: impl IntoIterator<Item = (String, Vec<usize>, &'a [f32])>,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, WeightsError> {
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, shape, values) in &tensors {
        if shape.iter().product::<usize>() != values.len() {
            return Err(invalid(format!(
                "tensor {name}: shape {shape:?} does not match {} values",
                values.len()
            )));
        }
    }
    let (json, data_len) = header(
        tensors.iter().map(|(n, s, _)| (n.as_str(), s.as_slice())),
        metadata,
    )?;
    let mut out = Vec::with_capacity(8 + json.len() + data_len);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, _, values) in &tensors {
        for v in *values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    Ok(out)
}

/// Writes a weights file of `config`: the model's tensors (names without [`PREFIX`]) with the
/// [`metadata`] of `config`. Does not check the tensors against `config`.
pub fn to_bytes<'a>(
    config: &Config,
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize], &'a [f32])>,
) -> Result<Vec<u8>, WeightsError> {
    write(
        tensors
            .into_iter()
            .map(|(n, s, v)| (format!("{PREFIX}{n}"), s.to_vec(), v)),
        &metadata(config),
    )
}

/// The exact size in bytes of the weights file of architecture `config` that [`write`] (and
/// so the model crate) produces: a node can reject an announced blob of any other size before
/// downloading it. Errors only for an invalid `config`.
pub fn expected_size(config: &Config) -> Result<u64, WeightsError> {
    config.validate().map_err(WeightsError::Config)?;
    let mut names: Vec<(String, Vec<usize>)> = expected_tensors(config)
        .into_iter()
        .map(|(n, s)| (format!("{PREFIX}{n}"), s))
        .collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    let (json, data_len) = header(
        names.iter().map(|(n, s)| (n.as_str(), s.as_slice())),
        &metadata(config),
    )?;
    Ok(8 + json.len() as u64 + data_len as u64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn file(config: &Config, value: f32) -> Vec<u8> {
        crate::fuzzing::weights_file(config, |_| value)
    }

    fn configs() -> Vec<Config> {
        vec![
            Config {
                vocab_size: 2,
                n_ctx: 2,
                d_model: 1,
                n_heads: 1,
                n_layers: 1,
            },
            Config {
                vocab_size: 300,
                n_ctx: 16,
                d_model: 8,
                n_heads: 2,
                n_layers: 2,
            },
            Config {
                vocab_size: 2048,
                n_ctx: 128,
                d_model: 96,
                n_heads: 4,
                n_layers: 3,
            },
            Config {
                vocab_size: 1000,
                n_ctx: 64,
                d_model: 16,
                n_heads: 4,
                n_layers: 11,
            },
        ]
    }

    #[test]
    fn expected_size_is_the_written_size() {
        for c in configs() {
            let bytes = file(&c, 0.25);
            assert_eq!(expected_size(&c).unwrap(), bytes.len() as u64, "{c:?}");
            let w = parse(&bytes, Some(&c)).unwrap();
            assert_eq!(w.config, c);
            assert_eq!(w.tensors.len(), expected_tensors(&c).len());
            assert_eq!(
                w.tensors.iter().map(|t| t.len() as u64).sum::<u64>(),
                c.num_params()
            );
        }
    }

    #[test]
    fn views_borrow_the_file() {
        let c = configs()[1];
        let bytes = file(&c, 1.5);
        let w = parse(&bytes, None).unwrap();
        let range = bytes.as_ptr_range();
        for t in &w.tensors {
            assert!(range.contains(&t.data.as_ptr()), "{} was copied", t.name);
            assert!(t.values().all(|v| v == 1.5));
        }
    }

    #[test]
    fn mismatch_and_non_finite_are_rejected() {
        let c = configs()[1];
        let mut other = c;
        other.n_layers += 1;
        let bytes = file(&c, 0.0);
        assert!(matches!(
            parse(&bytes, Some(&other)),
            Err(WeightsError::Mismatch { .. })
        ));
        let nan = file(&c, f32::NAN);
        let err = parse(&nan, None).unwrap_err().to_string();
        assert!(err.contains("non-finite"), "{err}");
        let mut bad = c;
        bad.n_heads = 3;
        assert_eq!(
            expected_size(&bad),
            Err(WeightsError::Config("n_heads must divide d_model"))
        );
    }
}
