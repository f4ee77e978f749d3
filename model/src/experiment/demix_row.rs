//! The DEMix row of the compute-matched experiment ([`crate::demix`] trained and scored like
//! the other systems of [`super`]).

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use super::plan::{Config, Plan, SystemResult, ppl, result, train_once};
use crate::config::GptConfig;
use crate::data::{DomainStream, Mixture};
use crate::demix::{self, Demix};
use crate::forest::Error;
use crate::forest::branch;
use crate::forest::posterior::PriorConfig;
use crate::fsutil;
use crate::train::{StepStats, TrainConfig};

/// What the experiment writes next to the DEMix run: the cached prior of each target domain
/// over the experts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemixEval {
    /// Expert `j` is training domain `experts[j]`.
    pub experts: Vec<String>,
    /// Cached prior per target domain.
    pub priors: BTreeMap<String, Vec<f64>>,
}

/// The DEMix row of the compute-matched experiment: trains DEMix in `out_dir/demix` (skipped
/// when `trained.json` says it is done; resumed from its checkpoint when killed) for the dense
/// LM's `B` updates of `batch_size` blocks on the domain-balanced mixture of `streams` (one
/// expert per stream, in order), then scores it on every test stream by the posterior mixture
/// of its experts with a cached prior from the matching dev stream.
#[allow(clippy::too_many_arguments)]
pub fn system(
    cfg: &Config,
    plan: &Plan,
    arch: &GptConfig,
    streams: &[DomainStream],
    test: &[(String, Vec<u32>)],
    dev: &[(String, Vec<u32>)],
    out_dir: &Path,
    device: &Device,
    say: &mut dyn FnMut(&str),
    on_step: &mut dyn FnMut(&StepStats),
) -> Result<Option<SystemResult>, Error> {
    let n = streams.len();
    if n == 0 {
        return Err(crate::Error::Config("DEMix needs at least one training domain".into()).into());
    }
    let dir = out_dir.join("demix");
    std::fs::create_dir_all(&dir).map_err(|e| crate::Error::io(&dir, e))?;
    say(&format!(
        "demix: {} updates of {} blocks routed by domain to {n} experts",
        plan.dense_steps, cfg.batch_size
    ));
    let tc = TrainConfig {
        steps: plan.dense_steps,
        batch_size: cfg.batch_size,
        lr: cfg.lr,
        seed: cfg.seed,
        checkpoint_every: 100,
        ..TrainConfig::default()
    };
    let trained = train_once(&dir, || {
        let data = Mixture::new(streams.to_vec(), cfg.seed)?;
        let model = Demix::init(arch, n, cfg.seed, device);
        branch::train(
            branch::Start::Fresh(model),
            &data,
            tc,
            &dir,
            device,
            on_step,
        )
    })?;
    let model = demix::load(&trained.weights, Some(arch), device)?;
    let prior_cfg = PriorConfig {
        max_blocks: cfg.prior_blocks,
        ..PriorConfig::default()
    };
    say(&format!(
        "demix: scoring {n} experts on {} domains",
        test.len()
    ));
    let mut ppls = Vec::new();
    let mut priors = BTreeMap::new();
    for (name, t) in test {
        let d = dev
            .iter()
            .find(|(dn, _)| dn == name)
            .map(|(_, d)| d.as_slice())
            .ok_or_else(|| crate::Error::Data(format!("no dev tokens for domain {name}")))?;
        let (lp, prior) = demix::mixture_logprobs(&model, t, d, &prior_cfg, device)?;
        ppls.push((name.clone(), ppl(&lp)));
        priors.insert(name.clone(), prior);
    }
    let record = DemixEval {
        experts: streams.iter().map(|s| s.domain.clone()).collect(),
        priors,
    };
    fsutil::write_atomic(
        &dir.join("priors.json"),
        &serde_json::to_vec_pretty(&record)?,
    )?;
    let r = result("demix", trained.record.flops, n, &ppls);
    say(&format!("demix: in {:.2} out {:.2}", r.mean_in, r.mean_out));
    Ok(Some(r))
}
