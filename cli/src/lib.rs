//! `btm-node`: the command-line front end of the btm network.
//!
//! This crate only parses arguments, drives the library crates and prints; the work lives in
//! the library crates. It is a library too so that the end-to-end tests (`tests/`) can build the
//! same program under another name.

mod adversary;
mod client_cmds;
mod demo;
mod forest_cmds;
mod hf_export;
mod join;
mod maintainer;
mod model_cmds;
mod net;
mod node_status;
mod open;
mod plot;
mod publish;
mod report;
mod sampling;
mod table;
#[doc(hidden)]
pub mod ui;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// `btm-node --version`: this program's version and the protocol it speaks (the format version
/// of records and envelopes, and the network's Kademlia protocol).
fn version() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        format!(
            "{} (protocol {}, {})",
            env!("CARGO_PKG_VERSION"),
            btm_protocol::FORMAT_VERSION,
            btm_net::swarm::KAD_PROTOCOL
        )
    })
}

/// btm: train language models together with Branch-Train-Merge.
#[derive(Debug, Parser)]
#[command(name = "btm-node", version = version(), about, long_about = None)]
struct Cli {
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train an ELM (or a seed, with several domains) on the bundled corpus.
    Train(model_cmds::TrainArgs),
    /// Evaluate a model's perplexity and bits per byte on a domain.
    Eval(model_cmds::EvalArgs),
    /// Generate text from a model.
    Generate(model_cmds::GenerateArgs),
    /// Export a model as a Hugging Face GPT2LMHeadModel directory.
    ExportHf(model_cmds::ExportArgs),
    /// Train a byte-level BPE tokenizer on the seed mix.
    Tokenizer(model_cmds::TokenizerArgs),
    /// Branch-Train-Merge over a forest of ELMs: create, add, remove, show, prior, eval, generate, average.
    #[command(subcommand)]
    Forest(forest_cmds::ForestCmd),
    /// The compute-matched BTM experiment: dense LM, ELMforest (ensemble and averages), random splits, no seed.
    Experiment(forest_cmds::ExperimentArgs),
    /// Plot BTM minus the dense LM over finished experiments (a budget curve or a seed-share sweep).
    ExperimentPlot(forest_cmds::ExperimentPlotArgs),
    /// Maintainer and node keys.
    #[command(subcommand)]
    Keys(maintainer::KeysCmd),
    /// The maintainers' signed domain registry (works on files; several maintainers sign one version).
    #[command(subcommand)]
    Registry(maintainer::RegistryCmd),
    /// Measure training throughput and matrix-product peak (compare with torch_gpt.py).
    Bench(model_cmds::BenchArgs),
    /// Volunteer: join a network, claim a domain, branch, train, announce, verify others.
    Join(join::JoinArgs),
    /// Maintainer: train the seed LM, or publish the registry and seed on the network.
    #[command(subcommand)]
    Seed(publish::SeedCmd),
    /// Client: fetch the verified ELMs of a network into a local forest directory.
    Fetch(client_cmds::FetchArgs),
    /// Client: score or generate text with a forest's domain-posterior ensemble.
    Ensemble(client_cmds::EnsembleArgs),
    /// Client: average a forest's ELMs into one model (uniform, or weighted for a target text).
    Average(client_cmds::AverageArgs),
    /// Client: serve the web UI of a client node (the network, its domains, a local forest) until stopped.
    Ui(client_cmds::UiCmdArgs),
    /// A node's state from its data directory (or a network file) as a table.
    Status(node_status::StatusArgs),
    /// Run a whole local network on the bundled corpus: a maintainer, volunteers and a client as processes.
    Demo(demo::DemoArgs),
    /// A hostile peer for soak tests: floods, bad ELMs, claim squatting (bench/soak.sh).
    #[command(hide = true)]
    Adversary(adversary::AdversaryArgs),
}

/// Runs the program: parses the command line, runs the command, exits 1 with a message on error.
pub fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BTM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {}", error_text(&e));
        std::process::exit(1);
    }
}

/// An error and its causes on one line, each said once.
///
/// The library crates' error types follow the convention of putting their cause in their own
/// message (`"{path}: {source}"`) and also returning it from `source()`, so anyhow's `{:#}`
/// said every cause twice ("f.json: No such file or directory (os error 2): No such file or
/// directory (os error 2)"). Here a cause whose text is already in the message is left out;
/// any other is appended after ": ".
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            // Said already, in its parent's words.
        } else {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => model_cmds::train(a, cli.json),
        Command::Eval(a) => model_cmds::eval(a, cli.json),
        Command::Generate(a) => model_cmds::generate(a, cli.json),
        Command::ExportHf(a) => model_cmds::export_hf(a, cli.json),
        Command::Tokenizer(a) => model_cmds::tokenizer(a, cli.json),
        Command::Bench(a) => model_cmds::bench(a, cli.json),
        Command::Forest(c) => forest_cmds::run_forest(c, cli.json),
        Command::Experiment(a) => forest_cmds::experiment(a, cli.json),
        Command::ExperimentPlot(a) => forest_cmds::experiment_plot(a, cli.json),
        Command::Keys(c) => maintainer::run_keys(c, cli.json),
        Command::Registry(c) => maintainer::run_registry(c, cli.json),
        Command::Join(a) => join::join(a, cli.json),
        Command::Seed(c) => publish::run_seed(c, cli.json),
        Command::Fetch(a) => client_cmds::fetch(a, cli.json),
        Command::Ensemble(a) => client_cmds::ensemble(a, cli.json),
        Command::Average(a) => client_cmds::average(a, cli.json),
        Command::Ui(a) => client_cmds::ui(a, cli.json),
        Command::Status(a) => node_status::status(a, cli.json),
        Command::Demo(a) => demo::demo(a, cli.json),
        Command::Adversary(a) => adversary::adversary(a, cli.json),
    }
}
