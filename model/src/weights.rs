//! ELM weights as safetensors, named like Hugging Face's `GPT2LMHeadModel`.
//!
//! A weights file holds one f32 tensor per parameter under its GPT-2 name
//! (`transformer.wte.weight`, `transformer.h.0.attn.c_attn.weight`, ...; the output head is tied
//! to `wte` and not stored) and two metadata entries: `format = "pt"` (what `transformers`
//! expects) and `btm.config`, the [`GptConfig`] as JSON. Loading checks the whole file before
//! building a model: every expected name present and nothing else, every shape and dtype as the
//! configuration implies, every value finite. Errors name the tensor.
//!
//! The format itself (header, names and shapes, checks, metadata, the deterministic writer) is
//! [`btm_protocol::weights`], which parses into borrowed views and does not depend on burn; this
//! module converts between its views and models, copying each tensor once.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use btm_protocol::weights::{self as format, WeightsError};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor, TensorData};

use crate::config::GptConfig;
use crate::files::{HF_CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE};
use crate::gpt::Gpt;
use crate::{Error, fsutil};

pub use btm_protocol::weights::{CONFIG_KEY, MAX_FILE_BYTES, PREFIX};

impl From<WeightsError> for Error {
    fn from(e: WeightsError) -> Self {
        match e {
            WeightsError::Invalid(m) => Error::Weights(m),
            WeightsError::Config(m) => Error::Config(m.to_string()),
            WeightsError::Mismatch { found, expected } => Error::Weights(format!(
                "architecture mismatch: the file holds {:?}, expected {:?}",
                GptConfig::from(found),
                GptConfig::from(expected)
            )),
        }
    }
}

/// One parameter's name, shape and values, in the model's visiting order.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// GPT-2 name without [`PREFIX`], e.g. `h.0.ln_1.weight`.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major f32 values.
    pub values: Vec<f32>,
}

/// Every parameter name the configuration implies (without [`PREFIX`]), in visiting order,
/// with its shape.
pub fn expected_tensors(config: &GptConfig) -> Vec<(String, Vec<usize>)> {
    format::expected_tensors(&(*config).into())
}

/// The exact size in bytes of the weights file of `config` that [`save`] writes.
pub fn expected_size(config: &GptConfig) -> Result<u64, Error> {
    Ok(format::expected_size(&(*config).into())?)
}

impl From<format::Tensor<'_>> for NamedTensor {
    fn from(t: format::Tensor<'_>) -> Self {
        NamedTensor {
            values: t.to_vec(),
            name: t.name,
            shape: t.shape,
        }
    }
}

/// Collects parameters with their dotted module path: their shapes, and their values unless
/// only the shapes are wanted.
#[derive(Default)]
struct Collector {
    path: Vec<String>,
    shapes_only: bool,
    out: Vec<NamedTensor>,
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let (shape, values) = if self.shapes_only {
            let dims: [usize; D] = param.lazy_shape().dims();
            (dims.to_vec(), Vec::new())
        } else {
            let tensor = param.val();
            let shape = tensor.dims().to_vec();
            let values = tensor
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap_or_else(|e| unreachable!("converted to f32 above: {e:?}"));
            (shape, values)
        };
        self.out.push(NamedTensor {
            name: self.path.join("."),
            shape,
            values,
        });
    }
}

/// The model's parameters, named, in visiting order (this order is stable: it is the order of
/// [`expected_tensors`]).
pub fn named_tensors(model: &Gpt) -> Vec<NamedTensor> {
    module_tensors(model)
}

/// The parameters of any module (e.g. [`crate::demix::Demix`]), named by their dotted field
/// path, in visiting order.
pub fn module_tensors<M: Module>(model: &M) -> Vec<NamedTensor> {
    let mut c = Collector::default();
    model.visit(&mut c);
    c.out
}

/// Replaces every parameter by the tensor of the same name.
struct Loader {
    path: Vec<String>,
    tensors: HashMap<String, NamedTensor>,
    device: Device,
}

impl ModuleMapper for Loader {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.join(".");
        let (id, old, mapper) = param.consume();
        let Some(t) = self.tensors.remove(&name) else {
            // Checked exhaustively before mapping; keeping the old value is unreachable.
            return Param::from_mapped_value(id, old, mapper);
        };
        let shape: [usize; D] = t
            .shape
            .try_into()
            .unwrap_or_else(|_| unreachable!("rank checked against the configuration"));
        let tensor = Tensor::from_data(TensorData::new(t.values, shape), &self.device);
        let tensor = if old.is_require_grad() {
            tensor.require_grad()
        } else {
            tensor
        };
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// Builds a model of `config` from named tensors, which must match it exactly.
pub fn from_named_tensors(
    config: &GptConfig,
    tensors: Vec<NamedTensor>,
    device: &Device,
) -> Result<Gpt, Error> {
    config.validate()?;
    let by_name = by_name(tensors)?;
    check_tensors(config, &by_name)?;
    Ok(load_into(Gpt::init(config, 0, device), by_name, device))
}

/// The tensors by name; a name may appear once.
fn by_name(tensors: Vec<NamedTensor>) -> Result<HashMap<String, NamedTensor>, Error> {
    let mut by_name: HashMap<String, NamedTensor> = HashMap::new();
    for t in tensors {
        if by_name.contains_key(&t.name) {
            return Err(Error::Weights(format!("tensor {:?} appears twice", t.name)));
        }
        by_name.insert(t.name.clone(), t);
    }
    Ok(by_name)
}

/// `skeleton` with every parameter replaced by the tensor of its name (checked beforehand).
fn load_into<M: Module>(skeleton: M, tensors: HashMap<String, NamedTensor>, device: &Device) -> M {
    skeleton.map(&mut Loader {
        path: Vec::new(),
        tensors,
        device: device.clone(),
    })
}

/// Every parameter name of a module (dotted field path, as [`module_tensors`] writes it) with
/// its shape, in visiting order.
pub fn module_shapes<M: Module>(model: &M) -> Vec<(String, Vec<usize>)> {
    let mut c = Collector {
        shapes_only: true,
        ..Collector::default()
    };
    model.visit(&mut c);
    c.out.into_iter().map(|t| (t.name, t.shape)).collect()
}

/// Replaces every parameter of `skeleton` (any module, e.g. [`crate::demix::Demix`]) by the
/// tensor of the same name. The tensors must match the skeleton exactly: every name present
/// with its shape and finite values, nothing else.
pub fn load_named<M: Module>(
    skeleton: M,
    tensors: Vec<NamedTensor>,
    device: &Device,
) -> Result<M, Error> {
    let by_name = by_name(tensors)?;
    check_against(&module_shapes(&skeleton), &by_name)?;
    Ok(load_into(skeleton, by_name, device))
}

fn check_tensors(config: &GptConfig, by_name: &HashMap<String, NamedTensor>) -> Result<(), Error> {
    check_against(&expected_tensors(config), by_name)
}

fn check_against(
    expected: &[(String, Vec<usize>)],
    by_name: &HashMap<String, NamedTensor>,
) -> Result<(), Error> {
    for (name, shape) in expected {
        let Some(t) = by_name.get(name) else {
            return Err(Error::Weights(format!("tensor {PREFIX}{name} is missing")));
        };
        if &t.shape != shape {
            return Err(Error::Weights(format!(
                "tensor {PREFIX}{name} has shape {:?}, expected {shape:?}",
                t.shape
            )));
        }
        if t.values.len() != shape.iter().product::<usize>() {
            return Err(Error::Weights(format!(
                "tensor {PREFIX}{name} has the wrong number of values"
            )));
        }
        if let Some(i) = t.values.iter().position(|v| !v.is_finite()) {
            return Err(Error::Weights(format!(
                "tensor {PREFIX}{name} holds a non-finite value ({}) at flat index {i}",
                t.values[i]
            )));
        }
    }
    if by_name.len() != expected.len() {
        let known: std::collections::HashSet<&str> =
            expected.iter().map(|(n, _)| n.as_str()).collect();
        let mut extra: Vec<&str> = by_name
            .keys()
            .map(String::as_str)
            .filter(|n| !known.contains(n))
            .collect();
        extra.sort_unstable();
        return Err(Error::Weights(format!(
            "unexpected tensors: {}",
            extra.join(", ")
        )));
    }
    Ok(())
}

/// Writes a safetensors file deterministically: tensors in name order, metadata keys sorted
/// (a model's bytes are its identity). All tensors are F32. See [`format::write`].
pub fn write_safetensors<'a>(
    tensors: impl IntoIterator<Item = (String, Vec<usize>, &'a [f32])>,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, Error> {
    Ok(format::write(tensors, metadata)?)
}

/// The metadata of a weights file of architecture `config`: `format = "pt"` and `btm.config`.
pub fn metadata(config: &GptConfig) -> Result<BTreeMap<String, String>, Error> {
    Ok(format::metadata(&(*config).into()))
}

/// The checked architecture in a file's metadata.
pub fn config_from_metadata(meta: &HashMap<String, String>) -> Result<GptConfig, Error> {
    Ok(format::config_from_metadata(meta)?.into())
}

/// A safetensors file's metadata and f32 tensors, split by name.
#[derive(Debug)]
pub struct RawFile {
    /// The metadata.
    pub meta: HashMap<String, String>,
    /// The model's tensors (names under [`PREFIX`], given without it).
    pub model: Vec<NamedTensor>,
    /// Every other tensor (a checkpoint's Adam moments), under its full name.
    pub other: Vec<NamedTensor>,
}

/// Reads a safetensors file's bytes whose tensors are all f32 (a weights file or a checkpoint
/// of any model); checks nothing about the model.
pub fn read_raw(bytes: &[u8]) -> Result<RawFile, Error> {
    let raw = format::parse_raw(bytes)?;
    Ok(RawFile {
        meta: raw.meta,
        model: raw.model.into_iter().map(NamedTensor::from).collect(),
        other: raw.other.into_iter().map(NamedTensor::from).collect(),
    })
}

/// Serialises named tensors with the `btm.config` metadata (deterministically).
pub fn to_bytes(config: &GptConfig, tensors: &[NamedTensor]) -> Result<Vec<u8>, Error> {
    Ok(format::to_bytes(
        &(*config).into(),
        tensors
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice(), t.values.as_slice())),
    )?)
}

/// Parses and checks a safetensors file's bytes ([`format::parse`], which borrows), then copies
/// each tensor once. `expected`, when given, must equal the file's configuration (a forest
/// member must have the forest's architecture).
pub fn parse(
    bytes: &[u8],
    expected: Option<&GptConfig>,
) -> Result<(GptConfig, Vec<NamedTensor>), Error> {
    let expected = expected.map(|c| format::Config::from(*c));
    let parsed = format::parse(bytes, expected.as_ref())?;
    let tensors = parsed.tensors.into_iter().map(NamedTensor::from).collect();
    Ok((parsed.config.into(), tensors))
}

/// Saves a model atomically (write to a temporary file, fsync, rename).
pub fn save(model: &Gpt, path: &Path) -> Result<(), Error> {
    let bytes = to_bytes(&model.config(), &named_tensors(model))?;
    fsutil::write_atomic(path, &bytes)
}

/// Reads and checks a weights file without building a model.
pub fn read(
    path: &Path,
    expected: Option<&GptConfig>,
) -> Result<(GptConfig, Vec<NamedTensor>), Error> {
    let bytes = fsutil::read_limited(path, MAX_FILE_BYTES)?;
    parse(&bytes, expected).map_err(|e| e.in_file(path))
}

/// Loads a model, checking every name, shape, dtype and value.
pub fn load(path: &Path, expected: Option<&GptConfig>, device: &Device) -> Result<Gpt, Error> {
    let (config, tensors) = read(path, expected)?;
    from_named_tensors(&config, tensors, device).map_err(|e| e.in_file(path))
}

/// Writes a Hugging Face `GPT2LMHeadModel` directory: `model.safetensors`, `config.json` and,
/// when given, `tokenizer.json`.
pub fn export_hf(model: &Gpt, tokenizer_json: Option<&[u8]>, dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    save(model, &dir.join(WEIGHTS_FILE))?;
    let cfg = serde_json::to_vec_pretty(&model.config().to_hf_config())?;
    fsutil::write_atomic(&dir.join(HF_CONFIG_FILE), &cfg)?;
    if let Some(tok) = tokenizer_json {
        fsutil::write_atomic(&dir.join(TOKENIZER_FILE), tok)?;
    }
    Ok(())
}
