//! DEMix (Gururangan et al. 2022), the paper's second baseline: a single model whose
//! feed-forward layers are per-domain experts, everything else shared. Not implemented yet:
//! the experiment reports no DEMix row until it is.

use std::path::Path;

use burn::tensor::Device;

use crate::config::GptConfig;
use crate::data::DomainStream;
use crate::forest::Error;
use crate::forest::experiment::{Config, Plan, SystemResult};

/// The DEMix row of the compute-matched experiment (`None` while DEMix is not implemented).
#[allow(clippy::too_many_arguments)]
pub fn experiment_system(
    _cfg: &Config,
    _plan: &Plan,
    _arch: &GptConfig,
    _streams: &[DomainStream],
    _test: &[(String, Vec<u32>)],
    _dev: &[(String, Vec<u32>)],
    _out_dir: &Path,
    _device: &Device,
    _progress: bool,
    say: &mut dyn FnMut(&str),
) -> Result<Option<SystemResult>, Error> {
    say("demix: not implemented yet (no row)");
    Ok(None)
}
