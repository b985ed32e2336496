//! Benchmark (not a test): one Diffusion-DPO optimizer step on the real SD
//! 1.5 UNet architecture with random weights, f32 on CPU: one pair (winner
//! and loser through the trained model, both through the reference), 32x32
//! latents, 77-token text conditioning, AdamW. LoRA (rank 4 on
//! to_q/to_k/to_v/to_out.0, the reference is the same UNet with adapters
//! off) or `--full` (the whole UNet against a frozen copy), optionally with
//! `--gradient-checkpointing`. Prints time per step and peak memory as one
//! JSON line, like tools/bench/bench_dpo.py does for diffusers + PEFT.
//!
//! Run: `cargo bench -p agfsync-dpo --bench dpo_step [-- --iters N] [--full] [--gradient-checkpointing]`
//!
//! The random UNet is written once to a temporary diffusers folder (3.4 GB)
//! because the trainer loads models from files, as it does in real runs.

use std::collections::HashMap;
use std::time::Instant;

use agfsync_dpo::data::PairDataset;
use agfsync_dpo::trainer::{ModelSpec, TrainConfig, Trainer};
use agfsync_models::tiny::{tiny_scheduler_config, TinyPreset};
use agfsync_models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use agfsync_models::weights::{save_safetensors, RandomWeights};
use candle_core::{DType, Device, Tensor};

fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let iters = args
        .iter()
        .position(|a| a == "--iters")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(3usize);
    let full = args.iter().any(|a| a == "--full");
    let ckpt = args.iter().any(|a| a == "--gradient-checkpointing");
    let cfg_json = serde_json::json!({
        "sample_size": 64,
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "norm_num_groups": 32,
    });
    let dev = Device::Cpu;
    let dir = tempfile::tempdir()?;
    let unet_dir = dir.path().join("unet");
    std::fs::create_dir_all(&unet_dir)?;
    std::fs::create_dir_all(dir.path().join("scheduler"))?;
    std::fs::write(unet_dir.join("config.json"), cfg_json.to_string())?;
    std::fs::write(
        dir.path().join("scheduler/scheduler_config.json"),
        tiny_scheduler_config(TinyPreset::Sd15).to_string(),
    )?;
    {
        let cfg: UNet2DConditionConfig = serde_json::from_value(cfg_json)?;
        let weights = RandomWeights::new(0);
        UNet2DConditionModel::new(&cfg, weights.var_builder(DType::F32, &dev))?;
        let tensors: HashMap<String, Tensor> = weights.tensors();
        save_safetensors(
            &tensors,
            &unet_dir.join("diffusion_pytorch_model.safetensors"),
        )?;
    }
    let spec = ModelSpec::from_pipeline_dir(dir.path())?;
    let cfg = TrainConfig {
        steps: iters + 1,
        lr: 1e-5,
        full,
        gradient_checkpointing: ckpt,
        batch_size: 1,
        grad_accum: 1,
        ..TrainConfig::default()
    };
    let t0 = Instant::now();
    let mut trainer = Trainer::new(&spec, &cfg, &dev)?;
    eprintln!("trainer built in {:.1}s", t0.elapsed().as_secs_f64());
    let data = PairDataset::new(
        Tensor::randn(0f32, 1.0, (1, 4, 32, 32), &dev)?,
        Tensor::randn(0f32, 1.0, (1, 4, 32, 32), &dev)?,
        Tensor::randn(0f32, 1.0, (1, 77, 768), &dev)?,
        None,
    )?;
    let baseline = status_mib("VmRSS:");
    let mut times = Vec::new();
    for i in 0..iters + 1 {
        let s = Instant::now();
        let m = trainer.train_step(&data)?;
        let dt = s.elapsed().as_secs_f64();
        eprintln!(
            "{} {i}: {dt:.2}s loss {:.4}",
            if i == 0 { "warmup" } else { "step" },
            m.loss
        );
        if i >= 1 {
            times.push(dt);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let peak = status_mib("VmHWM:");
    println!(
        "{}",
        serde_json::json!({
            "impl": "agfsync",
            "mode": if full { "full" } else { "lora" },
            "gradient_checkpointing": ckpt,
            "threads": candle_core::utils::get_num_threads(),
            "iters": iters,
            "median_s": times[times.len() / 2],
            "min_s": times[0],
            "max_s": times[times.len() - 1],
            "peak_rss_mib": peak,
            "baseline_rss_mib": baseline,
            "trainable_params": trainer.trainables().iter().map(|t| t.var.elem_count()).sum::<usize>(),
        })
    );
    Ok(())
}
