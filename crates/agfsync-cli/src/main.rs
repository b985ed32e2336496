//! `agfsync`: improve a text-to-image diffusion model by preference
//! optimisation on AI feedback (AGFSync, An et al., AAAI 2025).
//!
//! This binary is a thin layer over the library crates: it parses arguments,
//! sets up logging and progress bars, and maps errors to exit codes.

mod cmd_bench;
mod cmd_pipeline;
mod cmd_sample;
mod cmd_score;
mod cmd_tiny;
mod cmd_train;
mod common;
mod images;

use std::process::ExitCode;

use agfsync_pipeline::Stage;
use clap::{Parser, Subcommand};

/// agfsync: AI-feedback preference optimisation for Stable Diffusion.
///
/// Each stage of the AGFSync loop is a subcommand. Models are diffusers
/// pipeline folders or Hugging Face hub ids (read from the hub cache; set
/// HF_HUB_OFFLINE=1 to never touch the network).
#[derive(Parser, Debug)]
#[command(name = "agfsync", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors and warnings.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate images from a prompt with a Stable Diffusion pipeline.
    Sample(Box<cmd_sample::SampleArgs>),
    /// Score images with the AI-feedback models (CLIP score, aesthetic score):
    /// one JSON line per image.
    ScoreImages(Box<cmd_score::ScoreArgs>),
    /// Write tiny random-weight checkpoints in the real diffusers layout
    /// (for tests and smoke runs).
    TinyModels(cmd_tiny::TinyArgs),
    /// Fine-tune the UNet with Diffusion-DPO on preference pairs (LoRA or full).
    Train(Box<cmd_train::TrainArgs>),
    /// Encode a Pick-a-Pic-style Parquet file (caption, jpg_0, jpg_1,
    /// label_0) into a pairs file for `agfsync train --pairs`.
    ImportPairs(Box<cmd_train::ImportPairsArgs>),
    /// Run the whole loop on a run directory (prompts, questions, generate,
    /// score, pairs, train), skipping what is done. With no directory, runs
    /// the embedded tiny default on CPU in a fresh directory under ./runs.
    Run(cmd_pipeline::RunArgs),
    /// Create a run directory with a commented agfsync.toml (and, for the
    /// tiny preset, tiny random-weight models).
    Init(cmd_pipeline::InitArgs),
    /// Show each stage's progress in a run (read from the store).
    Status(cmd_pipeline::RunTarget),
    /// Stage 1: put the configured prompts into the run.
    Prompts(cmd_pipeline::RunTarget),
    /// Stage 2: put the configured questions into the run.
    Questions(cmd_pipeline::RunTarget),
    /// Stage 3: generate the candidate images (N per prompt).
    Generate(cmd_pipeline::RunTarget),
    /// Stage 4: score every candidate with the configured metrics.
    Score(cmd_pipeline::RunTarget),
    /// Stage 5: choose one preference pair per prompt.
    Pairs(cmd_pipeline::RunTarget),
    /// Stage 7: evaluate base against tuned on the configured benchmark
    /// (same prompts and seeds; scores, paired statistics).
    Eval(cmd_pipeline::RunTarget),
    /// Write the run's report: one self-contained HTML file (summary,
    /// charts, training curves, image grids).
    Report(cmd_pipeline::ReportArgs),
    /// Merge shard stores into a run (same agfsync.toml required).
    Merge(cmd_pipeline::MergeArgs),
    /// Export a run's pairs (Pick-a-Pic Parquet), candidates and scores
    /// (JSONL) or an image-folder view.
    Export(cmd_pipeline::ExportArgs),
    /// Time the hot paths (UNet step, sampling, CLIP score, DPO step) with
    /// the real architectures and random weights: one JSON line each.
    Bench(Box<cmd_bench::BenchArgs>),
}

/// The run directory's log file for commands that work on a run
/// (`DIR/logs/agfsync.log`, appended to), so a long job keeps its history.
fn log_file(cmd: &Command) -> Option<std::path::PathBuf> {
    let dir = match cmd {
        Command::Run(a) => a.dir.clone()?,
        Command::Status(_) => return None,
        Command::Prompts(t)
        | Command::Questions(t)
        | Command::Generate(t)
        | Command::Score(t)
        | Command::Pairs(t)
        | Command::Eval(t) => t.dir.clone(),
        Command::Train(a) => a.run.clone()?,
        Command::Merge(a) => a.out.clone(),
        _ => return None,
    };
    Some(dir.join("logs").join("agfsync.log"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // candle attaches a full backtrace to its errors whenever RUST_BACKTRACE
    // is set; users need the message, so keep library backtraces off unless
    // asked for explicitly (-vv or RUST_LIB_BACKTRACE).
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() && cli.verbose < 2 {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    // candle looks its thread count up on every CPU matrix product, and
    // without RAYON_NUM_THREADS that lookup parses /proc/cpuinfo
    // (num_cpus::get_physical): with small models it took most of the run
    // time. Fix the count once, to the value candle would choose.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var(
            "RAYON_NUM_THREADS",
            num_cpus::get_physical().max(1).to_string(),
        );
    }
    let mut cli = cli;
    if let Command::Run(a) = &mut cli.command {
        cmd_pipeline::choose_default_dir(a);
    }
    common::init_logging(cli.verbose, cli.quiet, log_file(&cli.command).as_deref());
    let result = match cli.command {
        Command::Sample(a) => cmd_sample::run(&a),
        Command::TinyModels(a) => cmd_tiny::run(&a),
        Command::Run(a) => cmd_pipeline::run(&a, cli.quiet),
        Command::Init(a) => cmd_pipeline::init(&a),
        Command::Status(a) => cmd_pipeline::status(&a),
        Command::Prompts(a) => cmd_pipeline::stage(&a, Stage::Prompts, cli.quiet),
        Command::Questions(a) => cmd_pipeline::stage(&a, Stage::Questions, cli.quiet),
        Command::Generate(a) => cmd_pipeline::stage(&a, Stage::Generate, cli.quiet),
        Command::Score(a) => cmd_pipeline::stage(&a, Stage::Score, cli.quiet),
        Command::Pairs(a) => cmd_pipeline::stage(&a, Stage::Pairs, cli.quiet),
        Command::Eval(a) => cmd_pipeline::stage(&a, Stage::Eval, cli.quiet),
        Command::Report(a) => cmd_pipeline::report(&a),
        Command::Merge(a) => cmd_pipeline::merge(&a),
        Command::Export(a) => cmd_pipeline::export(&a),
        Command::Train(a) => cmd_train::run(&a, cli.quiet),
        Command::ImportPairs(a) => cmd_train::run_import(&a),
        Command::ScoreImages(a) => cmd_score::run(&a),
        Command::Bench(a) => cmd_bench::run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
