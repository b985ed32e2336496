//! Pieces shared by the subcommands: logging, devices, dtypes, progress.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};

/// Sets up `tracing` output on stderr.
pub fn init_logging(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let ordinal = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .with_context(|| format!("invalid device `{s}`: use cpu, cuda or cuda:N"))?,
                None => bail!("invalid device `{s}`: use cpu, cuda or cuda:N"),
            };
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "device `{s}` needs CUDA, but this agfsync was built without it: rebuild with `cargo build --release --features cuda`"
                );
            }
            Device::new_cuda(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))
        }
    }
}

/// Parses `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "fp16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => bail!("invalid dtype `{s}`: use f32, f16 or bf16"),
    }
}

/// Refuses dtype/device pairs the backend cannot run.
pub fn check_dtype_device(dtype: DType, device: &Device) -> Result<()> {
    if dtype == DType::BF16 && device.is_cpu() {
        bail!("--dtype bf16 needs a CUDA device: the CPU backend has no bf16 matrix products. Use --dtype f32 (or f16) on CPU");
    }
    Ok(())
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
