//! `btm-node`: the command-line front end of the btm network.
//!
//! This crate only parses arguments and prints; the work lives in the library crates.

mod forest_cmds;
mod maintainer;
mod model_cmds;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// btm: train language models together with Branch-Train-Merge.
#[derive(Debug, Parser)]
#[command(name = "btm-node", version, about, long_about = None)]
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
    /// Maintainer and node keys.
    #[command(subcommand)]
    Keys(maintainer::KeysCmd),
    /// The maintainers' signed domain registry (works on files; several maintainers sign one version).
    #[command(subcommand)]
    Registry(maintainer::RegistryCmd),
    /// Measure training throughput and matrix-product peak (compare with torch_gpt.py).
    Bench(model_cmds::BenchArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BTM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
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
        Command::Keys(c) => maintainer::run_keys(c, cli.json),
        Command::Registry(c) => maintainer::run_registry(c, cli.json),
    }
}
