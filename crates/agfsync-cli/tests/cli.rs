//! End-to-end tests of the `agfsync` binary on temporary directories.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_agfsync"));
    c.env("HF_HUB_OFFLINE", "1").env("RUST_BACKTRACE", "1");
    c
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity")
}

fn run(args: &[&str]) -> Result<Output> {
    bin().args(args).output().context("running agfsync")
}

/// Asserts a clean failure: exit code 1 (not a panic's 101), a message that
/// contains `needle`, and no backtrace noise.
fn assert_clean_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(!stderr.contains("   0: "), "backtrace in: {stderr}");
}

/// Width, height, RGB bytes and text chunks of a PNG.
type Png = (u32, u32, Vec<u8>, Vec<(String, String)>);

fn read_png(path: &Path) -> Result<Png> {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path)?));
    let mut reader = dec.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf)?;
    buf.truncate(info.buffer_size());
    let texts = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    Ok((info.width, info.height, buf, texts))
}

fn tiny_models(dir: &Path) -> Result<PathBuf> {
    let out = run(&[
        "tiny-models",
        dir.to_str().context("utf8")?,
        "--preset",
        "sd15",
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(dir.join("tiny-sd15"))
}

/// Runs `agfsync sample` with the settings of the tiny-sd15 DDIM reference
/// (same initial latents) plus `extra` arguments; returns the image as
/// [1, 32, 32, 3] floats, its PNG text chunks and the final latents.
/// An image as floats, its PNG text chunks, and the final latents.
type Sampled = (Tensor, Vec<(String, String)>, Tensor);

fn sample_like_ddim_reference(extra: &[&str]) -> Result<Sampled> {
    let tmp = tempfile::tempdir()?;
    let refs = candle_core::safetensors::load(
        fixtures().join("ref-tiny-sd15-sample-ddim.safetensors"),
        &Device::Cpu,
    )?;
    let latents_file = tmp.path().join("init.safetensors");
    let mut m = std::collections::HashMap::new();
    m.insert("latents".to_string(), refs["init_latents"].clone());
    candle_core::safetensors::save(&m, &latents_file)?;
    let png_out = tmp.path().join("img.png");
    let lat_out = tmp.path().join("final.safetensors");
    let model = fixtures().join("tiny-sd15");
    let mut args = vec![
        "sample",
        "--model",
        model.to_str().context("utf8")?,
        "--prompt",
        "a red cube on a blue table",
        "--negative-prompt",
        "blurry",
        "--steps",
        "8",
        "--guidance-scale",
        "7.5",
        "--scheduler",
        "ddim",
        "--height",
        "32",
        "--width",
        "32",
        "--latents",
        latents_file.to_str().context("utf8")?,
        "--out",
        png_out.to_str().context("utf8")?,
        "--save-latents",
        lat_out.to_str().context("utf8")?,
    ];
    args.extend_from_slice(extra);
    let out = run(&args)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (w, h, rgb, texts) = read_png(&png_out)?;
    assert_eq!((w, h), (32, 32));
    let image =
        (Tensor::from_vec(rgb, (1, 32, 32, 3), &Device::Cpu)?.to_dtype(DType::F32)? / 255.0)?;
    let fin = candle_core::safetensors::load(&lat_out, &Device::Cpu)?;
    Ok((image, texts, fin["latents"].clone()))
}

fn psnr(a: &Tensor, b: &Tensor) -> Result<f64> {
    let mse: f32 = (a - b)?.sqr()?.mean_all()?.to_scalar()?;
    Ok(10.0 * (1.0 / mse as f64).log10())
}

#[test]
fn sample_on_a_diffusers_folder_reproduces_diffusers_images() -> Result<()> {
    // The pipeline folder was saved by diffusers itself; the reference image
    // is diffusers' float output for the same initial latents.
    let refs = candle_core::safetensors::load(
        fixtures().join("ref-tiny-sd15-sample-ddim.safetensors"),
        &Device::Cpu,
    )?;
    let (image, texts, fin) = sample_like_ddim_reference(&[])?;
    let p = psnr(&image, &refs["image"])?;
    assert!(p > 40.0, "PSNR {p:.1} dB");
    let d: f32 = (&fin - &refs["final_latents"])?
        .abs()?
        .max_all()?
        .to_scalar()?;
    assert!(d < 1e-3, "final latents differ by {d}");
    // Generation parameters travel with the image.
    let params = texts
        .iter()
        .find(|(k, _)| k == "agfsync")
        .context("no agfsync text chunk")?;
    let v: serde_json::Value = serde_json::from_str(&params.1)?;
    assert_eq!(v["prompt"], "a red cube on a blue table");
    assert_eq!(v["steps"], 8);
    assert_eq!(v["scheduler"], "ddim");
    assert!(texts
        .iter()
        .any(|(k, t)| k == "parameters" && t.contains("Steps: 8")));
    Ok(())
}

#[test]
fn sample_with_a_lora_reproduces_diffusers_load_lora_weights() -> Result<()> {
    // diffusers' output with load_lora_weights at adapter weight 0.7
    // (fixtures/parity/lora, see its README).
    let refs = candle_core::safetensors::load(
        fixtures().join("lora/ref-sd15-peft.safetensors"),
        &Device::Cpu,
    )?;
    let base = candle_core::safetensors::load(
        fixtures().join("ref-tiny-sd15-sample-ddim.safetensors"),
        &Device::Cpu,
    )?;
    for (file, mode) in [
        ("sd15-peft.safetensors", "merge"),
        ("sd15-peft.safetensors", "attach"),
        ("sd15-kohya.safetensors", "merge"),
    ] {
        let lora = fixtures().join("lora").join(file);
        let (image, texts, _) = sample_like_ddim_reference(&[
            "--lora",
            lora.to_str().context("utf8")?,
            "--lora-scale",
            "0.7",
            "--lora-mode",
            mode,
        ])?;
        let p = psnr(&image, &refs["image"])?;
        assert!(p > 40.0, "{file} {mode}: PSNR {p:.1} dB");
        // ...and the LoRA really changed the image.
        let p_base = psnr(&image, &base["image"])?;
        assert!(p_base < p, "{file}: the adapter had no visible effect");
        let params = texts
            .iter()
            .find(|(k, _)| k == "agfsync")
            .context("params")?;
        assert!(params.1.contains(file), "{}", params.1);
    }
    Ok(())
}

#[test]
fn lora_that_matches_nothing_is_a_clean_error() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let f = tmp.path().join("alien.safetensors");
    let mut m = std::collections::HashMap::new();
    m.insert(
        "lora_unet_nothing_here.lora_down.weight".to_string(),
        Tensor::zeros((4, 8), DType::F32, &Device::Cpu)?,
    );
    m.insert(
        "lora_unet_nothing_here.lora_up.weight".to_string(),
        Tensor::zeros((8, 4), DType::F32, &Device::Cpu)?,
    );
    candle_core::safetensors::save(&m, &f)?;
    let model = fixtures().join("tiny-sd15");
    let out = run(&[
        "sample",
        "--model",
        model.to_str().context("utf8")?,
        "--prompt",
        "x",
        "--lora",
        f.to_str().context("utf8")?,
        "--out",
        tmp.path().join("o.png").to_str().context("utf8")?,
    ])?;
    assert_clean_error(&out, "alien.safetensors");
    assert!(!tmp.path().join("o.png").exists());
    Ok(())
}

#[test]
fn sample_writes_numbered_images_and_is_reproducible() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model = tiny_models(tmp.path())?;
    let m = model.to_str().context("utf8")?;
    let go = |out: &str| -> Result<Output> {
        run(&[
            "sample",
            "--model",
            m,
            "--prompt",
            "a cat",
            "--steps",
            "3",
            "--num-images",
            "3",
            "--batch-size",
            "2",
            "--seed",
            "42",
            "--scheduler",
            "euler-ancestral",
            "--out",
            out,
        ])
    };
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    for d in [&a, &b] {
        let o = go(d.to_str().context("utf8")?)?;
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    for i in 0..3 {
        let name = format!("{i:05}.png");
        let (_, _, pa, _) = read_png(&a.join(&name))?;
        let (_, _, pb, _) = read_png(&b.join(&name))?;
        assert_eq!(pa, pb, "image {i} differs between identical runs");
    }
    let (_, _, p0, _) = read_png(&a.join("00000.png"))?;
    let (_, _, p1, _) = read_png(&a.join("00001.png"))?;
    assert_ne!(p0, p1, "different seeds gave the same image");
    Ok(())
}

#[test]
fn every_scheduler_samples_the_tiny_model() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model = tiny_models(tmp.path())?;
    for s in [
        "ddim",
        "euler",
        "euler-ancestral",
        "dpm++2m",
        "dpm++2m-karras",
    ] {
        let out = tmp.path().join(format!("{s}.png"));
        let o = run(&[
            "sample",
            "--model",
            model.to_str().context("utf8")?,
            "--prompt",
            "a dog",
            "--steps",
            "4",
            "--scheduler",
            s,
            "--out",
            out.to_str().context("utf8")?,
        ])?;
        assert!(
            o.status.success(),
            "{s}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let (w, h, _, _) = read_png(&out)?;
        assert_eq!((w, h), (32, 32), "{s}");
    }
    Ok(())
}

#[test]
fn unknown_scheduler_is_a_clean_error() -> Result<()> {
    let model = fixtures().join("tiny-sd15");
    let out = run(&[
        "sample",
        "--model",
        model.to_str().context("utf8")?,
        "--prompt",
        "x",
        "--scheduler",
        "heun9000",
    ])?;
    assert_clean_error(&out, "unknown scheduler `heun9000`");
    assert_clean_error(&out, "euler-ancestral");
    Ok(())
}

#[test]
fn latents_of_the_wrong_shape_are_a_clean_error() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let f = tmp.path().join("bad.safetensors");
    let mut m = std::collections::HashMap::new();
    m.insert(
        "latents".to_string(),
        Tensor::zeros((1, 4, 5, 5), DType::F32, &Device::Cpu)?,
    );
    candle_core::safetensors::save(&m, &f)?;
    let model = fixtures().join("tiny-sd15");
    let out = run(&[
        "sample",
        "--model",
        model.to_str().context("utf8")?,
        "--prompt",
        "x",
        "--latents",
        f.to_str().context("utf8")?,
        "--out",
        tmp.path().join("o.png").to_str().context("utf8")?,
    ])?;
    assert_clean_error(&out, "[1, 4, 16, 16]");
    assert!(!tmp.path().join("o.png").exists());
    Ok(())
}

#[test]
fn latents_file_without_latents_tensor_is_a_clean_error() -> Result<()> {
    let model = fixtures().join("tiny-sd15");
    let f = fixtures().join("ref-tiny-sd15-unet.safetensors");
    let out = run(&[
        "sample",
        "--model",
        model.to_str().context("utf8")?,
        "--prompt",
        "x",
        "--latents",
        f.to_str().context("utf8")?,
    ])?;
    assert_clean_error(&out, "no tensor named `latents`");
    Ok(())
}

#[test]
fn missing_model_is_a_clean_error_naming_where_it_looked() -> Result<()> {
    let out = run(&["sample", "--model", "nobody/no-such-model", "--prompt", "x"])?;
    assert_clean_error(&out, "models--nobody--no-such-model");
    Ok(())
}

#[test]
fn truncated_weights_are_a_clean_error() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model = tiny_models(tmp.path())?;
    let f = model.join("text_encoder/model.safetensors");
    let bytes = std::fs::read(&f)?;
    std::fs::write(&f, &bytes[..bytes.len() - 100])?;
    let out = run(&[
        "sample",
        "--model",
        model.to_str().context("utf8")?,
        "--prompt",
        "x",
    ])?;
    assert_clean_error(&out, "text_encoder/model.safetensors");
    Ok(())
}

#[test]
fn long_prompt_is_truncated_with_a_warning() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let prompt = vec!["word"; 120].join(" ");
    let model = fixtures().join("tiny-sd15");
    let out = run(&[
        "sample",
        "--model",
        model.to_str().context("utf8")?,
        "--prompt",
        &prompt,
        "--steps",
        "2",
        "--out",
        tmp.path().join("o.png").to_str().context("utf8")?,
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("truncated"));
    Ok(())
}

#[test]
fn bf16_on_cpu_and_bad_sizes_are_clean_errors() -> Result<()> {
    let model = fixtures().join("tiny-sd15");
    let m = model.to_str().context("utf8")?;
    assert_clean_error(
        &run(&["sample", "--model", m, "--prompt", "x", "--dtype", "bf16"])?,
        "CUDA",
    );
    assert_clean_error(
        &run(&["sample", "--model", m, "--prompt", "x", "--height", "33"])?,
        "multiples",
    );
    assert_clean_error(
        &run(&["sample", "--model", m, "--prompt", "x", "--steps", "0"])?,
        "--steps",
    );
    assert_clean_error(
        &run(&["sample", "--model", m, "--prompt", "x", "--device", "tpu"])?,
        "cpu, cuda",
    );
    Ok(())
}

#[test]
fn help_explains_the_sample_flags() -> Result<()> {
    let out = run(&["sample", "--help"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--latents",
        "--save-latents",
        "--scheduler",
        "--guidance-scale",
        "--num-images",
        "--dtype",
    ] {
        assert!(text.contains(flag), "missing {flag} in --help");
    }
    Ok(())
}

/// Copies a folder tree (the hub cache stores plain files in snapshots when
/// symlinks are unavailable, so copies are a faithful layout).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dst = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &dst)?;
        } else {
            std::fs::copy(e.path(), dst)?;
        }
    }
    Ok(())
}

#[test]
fn sample_resolves_a_hub_id_from_the_cache_offline() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let cache = tmp.path().join("hub");
    let repo = cache.join("models--agfsync-test--tiny-sd15");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    copy_tree(
        &fixtures().join("tiny-sd15"),
        &repo.join("snapshots").join(commit),
    )?;
    std::fs::create_dir_all(repo.join("refs"))?;
    std::fs::write(repo.join("refs/main"), commit)?;
    let png = tmp.path().join("o.png");
    let out = bin()
        .env("HF_HUB_CACHE", &cache)
        .args([
            "sample",
            "--model",
            "agfsync-test/tiny-sd15",
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--out",
            png.to_str().context("utf8")?,
        ])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(png.exists());
    // HF_HOME is honoured too (its hub/ subfolder), and a revision that is
    // not cached is reported with the paths searched.
    let out = bin()
        .env_remove("HF_HUB_CACHE")
        .env("HF_HOME", tmp.path())
        .args([
            "sample",
            "--model",
            "agfsync-test/tiny-sd15@v2",
            "--prompt",
            "a cat",
        ])
        .output()?;
    assert_clean_error(&out, "refs/v2");
    Ok(())
}

#[test]
fn sdxl_samples_with_micro_conditioning_flags() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = run(&[
        "tiny-models",
        tmp.path().to_str().context("utf8")?,
        "--preset",
        "sdxl,sd15",
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let xl = tmp.path().join("tiny-sdxl");
    let sample = |extra: &[&str], name: &str| -> Result<Output> {
        let png = tmp.path().join(name);
        let mut args = vec![
            "sample",
            "--model",
            xl.to_str().context("utf8")?,
            "--prompt",
            "a cat",
            "--steps",
            "3",
            "--seed",
            "5",
            "--out",
            png.to_str().context("utf8")?,
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let plain = sample(&[], "plain.png")?;
    assert!(
        plain.status.success(),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    let cond = sample(
        &["--original-size", "64,64", "--crops-coords-top-left", "8,8"],
        "cond.png",
    )?;
    assert!(
        cond.status.success(),
        "{}",
        String::from_utf8_lossy(&cond.stderr)
    );
    let (_, _, a, _) = read_png(&tmp.path().join("plain.png"))?;
    let (_, _, b, texts) = read_png(&tmp.path().join("cond.png"))?;
    assert_ne!(a, b, "micro-conditioning had no effect");
    let params = texts
        .iter()
        .find(|(k, _)| k == "agfsync")
        .context("params")?;
    assert!(
        params.1.contains("\"original_size\":[64,64]"),
        "{}",
        params.1
    );
    // The SDXL flags make no sense for SD 1.x.
    let sd15 = tmp.path().join("tiny-sd15");
    let bad = run(&[
        "sample",
        "--model",
        sd15.to_str().context("utf8")?,
        "--prompt",
        "x",
        "--original-size",
        "64,64",
    ])?;
    assert_clean_error(&bad, "SDXL");
    let bad = sample(&["--target-size", "64"], "bad.png")?;
    assert_eq!(bad.status.code(), Some(2), "clap usage error expected");
    Ok(())
}

#[test]
fn pickle_checkpoints_and_misplaced_single_file_flags_are_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ckpt = tmp.path().join("model.ckpt");
    std::fs::write(&ckpt, b"not really a pickle")?;
    let out = run(&[
        "sample",
        "--model",
        ckpt.to_str().context("utf8")?,
        "--prompt",
        "x",
    ])?;
    assert_clean_error(&out, "pickle");
    let model = fixtures().join("tiny-sd15");
    let out = run(&[
        "sample",
        "--model",
        model.to_str().context("utf8")?,
        "--prompt",
        "x",
        "--config",
        "some/repo",
    ])?;
    assert_clean_error(&out, "single-file");
    let junk = tmp.path().join("junk.safetensors");
    std::fs::write(&junk, b"\x10\x00\x00\x00\x00\x00\x00\x00{}")?;
    let out = run(&[
        "sample",
        "--model",
        junk.to_str().context("utf8")?,
        "--prompt",
        "x",
    ])?;
    assert_clean_error(&out, "junk.safetensors");
    Ok(())
}

#[test]
fn train_writes_a_lora_that_sample_loads_and_resume_continues() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model = tiny_models(tmp.path())?;
    let pairs = tmp.path().join("pairs.safetensors");
    let dev = Device::Cpu;
    let mut m = std::collections::HashMap::new();
    m.insert(
        "latents_w".to_string(),
        (Tensor::randn(0f32, 1.0, (4, 4, 16, 16), &dev)? + 1.0)?,
    );
    m.insert(
        "latents_l".to_string(),
        Tensor::randn(0f32, 1.0, (4, 4, 16, 16), &dev)?,
    );
    m.insert(
        "prompt_embeds".to_string(),
        Tensor::randn(0f32, 1.0, (4, 77, 32), &dev)?,
    );
    candle_core::safetensors::save(&m, &pairs)?;
    let out = tmp.path().join("dpo");
    let m = model.to_str().context("utf8")?;
    let p = pairs.to_str().context("utf8")?;
    let o = out.to_str().context("utf8")?;
    let r = run(&[
        "train",
        "--model",
        m,
        "--pairs",
        p,
        "--out",
        o,
        "--steps",
        "2",
        "--checkpoint-every",
        "1",
    ])?;
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let lora = out.join("pytorch_lora_weights.safetensors");
    assert!(lora.exists());
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
    // Resume to 3 steps from the latest checkpoint.
    let r = run(&[
        "train", "--model", m, "--pairs", p, "--out", o, "--steps", "3", "--resume", "latest",
    ])?;
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // The exported adapter loads in the sampler.
    let png = tmp.path().join("tuned.png");
    let r = run(&[
        "sample",
        "--model",
        m,
        "--prompt",
        "x",
        "--steps",
        "2",
        "--lora",
        lora.to_str().context("utf8")?,
        "--out",
        png.to_str().context("utf8")?,
    ])?;
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // A resume with a different beta is refused, saying what differs.
    let r = run(&[
        "train", "--model", m, "--pairs", p, "--out", o, "--steps", "4", "--beta", "10",
        "--resume", "latest",
    ])?;
    assert_clean_error(&r, "beta");
    let r = run(&[
        "train", "--model", m, "--pairs", p, "--out", o, "--beta", "0",
    ])?;
    assert_clean_error(&r, "beta");
    Ok(())
}

#[test]
fn score_images_on_a_transformers_clip_folder_matches_the_references() -> Result<()> {
    // tiny-clip was saved by transformers itself; ref.safetensors holds
    // transformers' CLIP scores and the LAION head's aesthetic scores.
    let f = fixtures().join("feedback");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.join("ref.json"))?)?;
    let refs = candle_core::safetensors::load(f.join("ref.safetensors"), &Device::Cpu)?;
    let clip: Vec<Vec<f32>> = refs["clip_score"].to_vec2()?;
    let aes: Vec<f32> = refs["aesthetic"].to_vec1()?;
    let prompt = meta["prompts"][1].as_str().context("prompt")?;
    let images: Vec<String> = meta["images"]
        .as_array()
        .context("images")?
        .iter()
        .map(|i| {
            f.join(i["file"].as_str().unwrap_or_default())
                .display()
                .to_string()
        })
        .collect();
    let mut args = vec![
        "score-images",
        "--prompt",
        prompt,
        "--metrics",
        "clip,aesthetic",
    ];
    let clip_dir = f.join("tiny-clip");
    let head = f.join("aesthetic-head.pth");
    args.extend(["--clip-model", clip_dir.to_str().context("utf8")?]);
    args.extend([
        "--aesthetic-model",
        head.to_str().context("utf8")?,
        "--batch-size",
        "5",
        "--images",
    ]);
    args.extend(images.iter().map(String::as_str));
    let out = run(&args)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), images.len());
    for (i, line) in lines.iter().enumerate() {
        let c = line["scores"]["clip"].as_f64().context("clip")?;
        let a = line["scores"]["aesthetic"].as_f64().context("aesthetic")?;
        assert!(
            (c - clip[i][1] as f64).abs() < 0.05,
            "{}: clip {c} vs {}",
            images[i],
            clip[i][1]
        );
        assert!(
            (a - aes[i] as f64).abs() < 1e-3,
            "{}: aesthetic {a} vs {}",
            images[i],
            aes[i]
        );
        assert!(line["versions"]["clip"]
            .as_str()
            .is_some_and(|v| v.contains("clip-score")));
    }
    // One unreadable image: reported in its line, the others still scored,
    // and the exit status says so.
    let bogus = tempfile::NamedTempFile::new()?;
    std::fs::write(bogus.path(), b"definitely not an image")?;
    let out = run(&[
        "score-images",
        "--prompt",
        prompt,
        "--clip-model",
        clip_dir.to_str().context("utf8")?,
        "--images",
        &images[0],
        bogus.path().to_str().context("utf8")?,
    ])?;
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 2);
    assert!(stdout
        .lines()
        .next()
        .is_some_and(|l| l.contains("\"clip\"")));
    assert!(stdout
        .lines()
        .nth(1)
        .is_some_and(|l| l.contains("not an image")));
    Ok(())
}

#[test]
fn train_and_import_pairs_read_pick_a_pic_parquet() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model = fixtures().join("tiny-sd15");
    let m = model.to_str().context("utf8")?;
    let parquet = fixtures().join("pickapic/pairs.parquet");
    let p = parquet.to_str().context("utf8")?;
    let out = tmp.path().join("dpo");
    let o = out.to_str().context("utf8")?;
    // The fixture has 1 undecodable row of 7: allow it.
    let r = run(&[
        "train",
        "--model",
        m,
        "--pairs",
        p,
        "--out",
        o,
        "--steps",
        "1",
        "--max-bad-fraction",
        "0.2",
    ])?;
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    assert!(
        stderr.contains("7 rows: 5 pairs") && stderr.contains("1 ties dropped"),
        "{stderr}"
    );
    assert!(out.join("pytorch_lora_weights.safetensors").exists());
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    assert_eq!(metrics.lines().count(), 1, "{metrics}");
    // With the default 5% the bad row stops the import.
    let r = run(&[
        "train", "--model", m, "--pairs", p, "--out", o, "--steps", "1",
    ])?;
    assert_clean_error(&r, "fail to decode");
    // import-pairs writes a pairs file that train reads.
    let pairs = tmp.path().join("pairs.safetensors");
    let r = run(&[
        "import-pairs",
        "--model",
        m,
        "--parquet",
        p,
        "--out",
        pairs.to_str().context("utf8")?,
        "--max-bad-fraction",
        "0.2",
    ])?;
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let t = candle_core::safetensors::load(&pairs, &Device::Cpu)?;
    assert_eq!(
        t.get("latents_w").context("latents_w")?.dims(),
        [5, 4, 16, 16]
    );
    let out2 = tmp.path().join("dpo2");
    let r = run(&[
        "train",
        "--model",
        m,
        "--pairs",
        pairs.to_str().context("utf8")?,
        "--out",
        out2.to_str().context("utf8")?,
        "--steps",
        "1",
    ])?;
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // A file without label_0 names the missing column.
    let no_label = fixtures().join("pickapic/no_label.parquet");
    let r = run(&[
        "train",
        "--model",
        m,
        "--pairs",
        no_label.to_str().context("utf8")?,
        "--out",
        o,
    ])?;
    assert_clean_error(&r, "missing Pick-a-Pic column(s) label_0");
    Ok(())
}
