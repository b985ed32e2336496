//! Pieces shared by the subcommands: logging, devices, dtypes, progress.

use anyhow::Result;
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};

/// Sets up `tracing` output on stderr and, for commands on a run, appended
/// to the run's log file (with timestamps and all fields, at debug level).
pub fn init_logging(verbose: u8, quiet: bool, file: Option<&std::path::Path>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_filter(filter);
    let file_layer = file.and_then(|path| {
        let dir = path.parent()?;
        // The log sits beside the run's own files: make the folder only when
        // the run directory itself exists (a typo must not create it).
        if !dir.parent().is_some_and(|run| run.is_dir()) {
            return None;
        }
        std::fs::create_dir_all(dir).ok()?;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()?;
        Some(
            tracing_subscriber::fmt::layer()
                .with_writer(std::sync::Mutex::new(f))
                .with_ansi(false)
                .with_filter(tracing_subscriber::filter::LevelFilter::DEBUG),
        )
    });
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(file_layer)
        .try_init();
}

/// Parses `cpu`, `cuda` or `cuda:N` (the pipeline's parser: one set of
/// rules and messages for flags and agfsync.toml).
pub fn parse_device(s: &str) -> Result<Device> {
    Ok(agfsync_pipeline::run::parse_device(s)?)
}

/// Parses `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(agfsync_pipeline::run::parse_dtype(s)?)
}

/// Refuses dtype/device pairs the backend cannot run.
pub fn check_dtype_device(dtype: DType, device: &Device) -> Result<()> {
    Ok(agfsync_pipeline::run::check_dtype_device(dtype, device)?)
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let style =
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    pb.set_style(style);
    pb.set_message(what.to_string());
    pb
}
