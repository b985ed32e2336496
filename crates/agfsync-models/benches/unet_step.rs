//! Benchmark (not a test): one denoising step of the real SD 1.5 (or, with
//! `--arch sdxl`, SDXL) UNet architecture with random weights, f32 on CPU, batch 2 (classifier-free
//! guidance) at 32x32 latents, per-sample timesteps. Prints time per step
//! and peak memory as one JSON line, like tools/bench/bench_unet.py does for
//! diffusers/PyTorch on the same machine.
//!
//! Run: `cargo bench -p agfsync-models --bench unet_step [-- --iters N] [--arch sdxl]`

use std::time::Instant;

use agfsync_models::nn::Pass;
use agfsync_models::unet_2d_condition::{
    AddedCondition, UNet2DConditionConfig, UNet2DConditionModel,
};
use agfsync_models::weights::RandomWeights;
use candle_core::{DType, Device, Tensor};

fn rss_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let iters = args
        .iter()
        .position(|a| a == "--iters")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(5usize);
    let sdxl = args.iter().any(|a| a == "sdxl");
    let cfg_json = if sdxl {
        serde_json::json!({
            "sample_size": 128,
            "block_out_channels": [320, 640, 1280],
            "layers_per_block": 2,
            "transformer_layers_per_block": [1, 2, 10],
            "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048,
            "use_linear_projection": true,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "norm_num_groups": 32,
        })
    } else {
        serde_json::json!({
            "sample_size": 64,
            "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "norm_num_groups": 32,
        })
    };
    let cfg: UNet2DConditionConfig =
        serde_json::from_value(cfg_json).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let weights = RandomWeights::new(0);
    let unet = UNet2DConditionModel::new(&cfg, weights.var_builder(DType::F32, &dev))?;
    drop(weights);
    eprintln!("built in {:.1}s", t0.elapsed().as_secs_f64());
    let x = Tensor::randn(0f32, 1.0, (2, 4, 32, 32), &dev)?;
    let t = Tensor::new(&[901f32, 901.0], &dev)?;
    let ctx_dim = if sdxl { 2048 } else { 768 };
    let ctx = Tensor::randn(0f32, 1.0, (2, 77, ctx_dim), &dev)?;
    let added = if sdxl {
        Some(AddedCondition {
            text_embeds: Tensor::randn(0f32, 1.0, (2, 1280), &dev)?,
            time_ids: Tensor::new(&[[1024f32, 1024., 0., 0., 1024., 1024.]; 2], &dev)?,
        })
    } else {
        None
    };
    let baseline = rss_mib("VmRSS:");
    let mut times = Vec::new();
    for i in 0..iters + 2 {
        let s = Instant::now();
        let y = unet.forward(&x, &t, &ctx, added.as_ref(), Pass::INFERENCE)?;
        let _ = y.sum_all()?.to_scalar::<f32>()?;
        if i >= 2 {
            times.push(s.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let peak = rss_mib("VmHWM:");
    println!(
        "{}",
        serde_json::json!({
            "impl": "agfsync",
            "arch": if sdxl { "sdxl" } else { "sd15" },
            "threads": candle_core::utils::get_num_threads(),
            "iters": iters,
            "median_s": median,
            "min_s": times[0],
            "max_s": times[times.len() - 1],
            "peak_rss_mib": peak,
            "baseline_rss_mib": baseline,
            "forward_peak_above_baseline_mib": peak - baseline,
        })
    );
    Ok(())
}
