//! `agfsync`: improve a text-to-image diffusion model by preference
//! optimisation on AI feedback (AGFSync, An et al., AAAI 2025).
//!
//! This binary is a thin layer over the library crates: it parses arguments,
//! sets up logging and progress bars, and maps errors to exit codes.

mod cmd_run;
mod cmd_sample;
mod cmd_score;
mod cmd_tiny;
mod cmd_train;
mod common;
mod images;

use std::process::ExitCode;

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
    /// Run the agfsync job. With no run directory, runs the embedded tiny
    /// default on CPU in a fresh directory under ./runs.
    Run(cmd_run::RunArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // candle attaches a full backtrace to its errors whenever RUST_BACKTRACE
    // is set; users need the message, so keep library backtraces off unless
    // asked for explicitly (-vv or RUST_LIB_BACKTRACE).
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() && cli.verbose < 2 {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    common::init_logging(cli.verbose, cli.quiet);
    let result = match cli.command {
        Command::Sample(a) => cmd_sample::run(&a),
        Command::TinyModels(a) => cmd_tiny::run(&a),
        Command::Run(a) => cmd_run::run(&a),
        Command::Train(a) => cmd_train::run(&a),
        Command::ImportPairs(a) => cmd_train::run_import(&a),
        Command::ScoreImages(a) => cmd_score::run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
