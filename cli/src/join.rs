//! `btm-node join`: a volunteer (`btm_roles::Volunteer`) with its settings from flags and the
//! config file, its events drawn as lines, a training bar and `status.json`.

use anyhow::Result;
use btm_model::device::DeviceKind;
use btm_roles::{BranchPolicy, TrainSettings, Volunteer, VolunteerConfig};
use clap::Args;

use crate::net::{self, ConfigFile, NetArgs, NodeSettings, short};
use crate::report::Reporter;

#[derive(Debug, Args)]
pub struct JoinArgs {
    #[command(flatten)]
    pub net: NetArgs,
    /// Domain to claim (default: a domain of the registry with no ELM yet that nobody else has
    /// claimed; waits for a lease to lapse when all are claimed).
    #[arg(long)]
    pub domain: Option<String>,
    /// Compute device for training: cpu, wgpu or cuda (the latter two need the cargo feature).
    #[arg(long)]
    pub device: Option<DeviceKind>,
    /// Optimiser updates of the ELM.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Blocks per update.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate (default: by model width, 2e-3 for tiny, 1e-3 for small, 5e-4 beyond).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Checkpoint every this many updates.
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// How to branch: auto (the posterior-weighted average of the registry's accepted ELMs on
    /// other domains when it lists any, else the seed), seed, or average (an error without
    /// accepted ELMs).
    #[arg(long, default_value = "auto")]
    pub branch: BranchPolicy,
    /// ELMs averaged when branching from an average (the largest posterior weights).
    #[arg(long, default_value_t = 3)]
    pub branch_top_k: usize,
    /// Lease of the domain claim, in seconds (renewed while training).
    #[arg(long)]
    pub lease_secs: Option<u64>,
    /// Exit once the ELM is announced instead of serving and verifying until stopped.
    #[arg(long)]
    pub exit_after_announce: bool,
    #[command(flatten)]
    pub ui: crate::ui::UiArgs,
}

/// The volunteer's configuration from flags, the config file and the node settings.
fn volunteer_config(
    a: &JoinArgs,
    config: &ConfigFile,
    settings: &NodeSettings,
) -> Result<VolunteerConfig> {
    let t = &config.train;
    let d = TrainSettings::default();
    let device = match (a.device, &config.device) {
        (Some(d), _) => d,
        (None, Some(s)) => s
            .parse()
            .map_err(|e| anyhow::anyhow!("config device: {e}"))?,
        (None, None) => DeviceKind::Cpu,
    };
    Ok(VolunteerConfig {
        data_dir: settings.data_dir.clone(),
        domain: a.domain.clone().or_else(|| config.domain.clone()),
        device,
        train: TrainSettings {
            steps: a.steps.or(t.steps).unwrap_or(d.steps),
            batch_size: a.batch_size.or(t.batch_size).unwrap_or(d.batch_size),
            lr: a.lr.or(t.lr),
            checkpoint_every: a
                .checkpoint_every
                .or(t.checkpoint_every)
                .unwrap_or(d.checkpoint_every),
            seed: t.seed.unwrap_or(d.seed),
        },
        branch: a.branch,
        branch_top_k: a.branch_top_k,
        lease_secs: settings.lease_secs.unwrap_or(15 * 60),
        wait_registry: settings.wait_registry,
        exit_after_announce: a.exit_after_announce,
    })
}

pub fn join(a: JoinArgs, json: bool) -> Result<()> {
    let config = ConfigFile::load(a.net.config.as_deref())?;
    let mut settings = NodeSettings::resolve(&a.net, &config, "runs/node")?;
    if let Some(l) = a.lease_secs {
        settings.lease_secs = Some(l);
    }
    let vc = volunteer_config(&a, &config, &settings)?;
    net::runtime()?.block_on(net::run_node(
        &settings,
        "volunteer",
        async |node, status, stop| {
            let addrs = node.listen_addrs().await.unwrap_or_default();
            let reporter = Reporter::new("join", json, Some(status.clone()));
            reporter.line(format!(
                "node {} up in {} ({} peers to dial)",
                short(node.node_id().as_bytes()),
                settings.data_dir.display(),
                settings.bootstrap.len()
            ));
            status.update(|s| s.listen = addrs.iter().map(ToString::to_string).collect());
            let (ui, events) = crate::ui::role_events(
                &a.ui,
                node,
                "volunteer",
                &settings.data_dir,
                status,
                &reporter,
            )
            .await?;
            Volunteer::new(vc).run(node, stop, &events).await?;
            drop(ui);
            Ok(())
        },
    ))
}
