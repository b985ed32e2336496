//! Benchmark (not a test): CLIP score with the CLIP ViT-L/14 architecture
//! (openai/clip-vit-large-patch14 shapes, random weights, f32) on CPU,
//! batch 8 at 224 px. Prints one JSON line with images per second for
//!
//! * `preprocess`: 512x512 RGB -> pixel values (resize, crop, normalise);
//! * `vision`: the vision tower + projection on a `[8, 3, 224, 224]` batch;
//! * `score`: `ClipScorer::score_batch` end to end (preprocess + vision +
//!   cosine with a cached prompt embedding),
//!
//! like tools/bench/bench_clip.py does for transformers on the same machine.
//!
//! Run: `cargo bench -p agfsync-feedback --bench clip_score [-- --iters N --batch B]`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use agfsync_feedback::clip::{ClipConfig, ClipModel};
use agfsync_feedback::clip_score::ClipScorer;
use agfsync_feedback::image_input::LoadedImage;
use agfsync_feedback::preprocess::{ClipImageProcessor, ImageProcessorConfig, ResizeBackend};
use agfsync_feedback::scorer::{BatchCache, ScoreRequest, Scorer};
use agfsync_models::clip_tokenizer::ClipTokenizer;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time<T>(warmup: usize, iters: usize, mut f: impl FnMut() -> T) -> f64 {
    for _ in 0..warmup {
        std::hint::black_box(f());
    }
    median(
        (0..iters)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(f());
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let iters = arg(&args, "--iters", 3);
    let batch = arg(&args, "--batch", 8);
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    // Any CLIP BPE tokenizer works for timing: the prompt is encoded once.
    let tok_dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity/feedback/tiny-clip");
    let tokenizer = ClipTokenizer::from_dir(&tok_dir)?;
    let processor = ClipImageProcessor::new(ImageProcessorConfig::default(), ResizeBackend::Pil)?;
    let model = Arc::new(ClipModel::from_parts(
        ClipConfig::vit_large_patch14(),
        vb,
        tokenizer,
        processor,
        "random ViT-L/14",
    )?);
    let params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    eprintln!(
        "built {:.1}M parameters in {:.1}s",
        params as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );

    // Deterministic 512x512 "photos".
    let images: Vec<LoadedImage> = (0..batch)
        .map(|i| {
            let rgb = (0..512 * 512 * 3)
                .map(|j| ((j * 7 + i * 131 + (j / 1536) * 3) % 251) as u8)
                .collect();
            LoadedImage::from_rgb(format!("img{i}.png"), 512, 512, rgb)
        })
        .collect::<Result<_, _>>()?;
    let refs: Vec<&LoadedImage> = images.iter().collect();

    let pre = time(1, iters, || {
        refs.iter()
            .map(|im| model.processor().pixel_values(im).map(|p| p.0.len()))
            .collect::<Result<Vec<_>, _>>()
    });
    let pv = Tensor::randn(0f32, 1.0, (batch, 3, 224, 224), &dev)?;
    let vision = time(1, iters, || {
        model.image_features(&pv).map(|t| t.dims().to_vec())
    });
    let scorer = ClipScorer::new(model.clone());
    let request = ScoreRequest::prompt("a lighthouse at dusk, oil painting");
    let score = time(1, iters, || {
        scorer
            .score_batch(&refs, &request, &mut BatchCache::new())
            .map(|v| v.len())
    });
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(candle_core::utils::get_num_threads);
    println!(
        "{}",
        serde_json::json!({
            "impl": "agfsync",
            "candle": "0.11.1",
            "arch": "clip-vit-large-patch14",
            "params_m": (params as f64 / 1e6 * 10.0).round() / 10.0,
            "batch": batch,
            "iters": iters,
            "threads": threads,
            "preprocess_images_per_s": batch as f64 / pre,
            "vision_images_per_s": batch as f64 / vision,
            "score_images_per_s": batch as f64 / score,
            "vision_batch_s": vision,
            "score_batch_s": score,
        })
    );
    Ok(())
}
