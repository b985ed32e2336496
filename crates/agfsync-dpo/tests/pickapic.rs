//! Pick-a-Pic Parquet import on the tiny SD 1.5 pipeline and the fixtures of
//! tools/parity/make_pickapic_fixture.py.

use std::path::{Path, PathBuf};

use agfsync_diffusion::pipeline::{encode_prompts, Negative};
use agfsync_dpo::pickapic::{encode_latents, import_parquet, to_pixels, ImportOptions};
use agfsync_dpo::{DpoError, PairDataset};
use agfsync_models::hub::ModelSource;
use agfsync_models::stable_diffusion::{LoadOptions, StableDiffusion};
use anyhow::{Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity")
}

fn tiny_sd() -> Result<StableDiffusion> {
    let src = ModelSource::local(fixtures().join("tiny-sd15"));
    Ok(StableDiffusion::load(&src, &LoadOptions::default())?)
}

fn pairs_file() -> PathBuf {
    fixtures().join("pickapic/pairs.parquet")
}

/// The usable rows of pairs.parquet, in file order: caption and whether
/// jpg_0 is the winner (label_0 = 1).
const USABLE: [(&str, bool); 5] = [
    ("a red cube", true),
    ("a blue sphere", false),
    ("a green cone", true),
    ("a yellow torus", false),
    ("a white cylinder", false),
];

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[test]
fn import_counts_orders_and_encodes_like_the_reference_preprocessing() -> Result<()> {
    let sd = tiny_sd()?;
    let opts = ImportOptions {
        max_bad_fraction: 0.2,
        batch_size: 2, // several VAE batches, one partial
        ..ImportOptions::new(32)
    };
    let (ds, report) = import_parquet(&pairs_file(), &sd, &opts)?;
    assert_eq!(report.rows, 7, "{report}");
    assert_eq!(report.pairs, 5, "{report}");
    assert_eq!(report.ties_dropped, 1, "{report}");
    assert_eq!(report.bad_images, 1, "{report}");
    assert_eq!(report.unlabelled, 0, "{report}");
    assert_eq!(report.jpg_1_preferred, 3, "{report}");
    assert_eq!(report.bad_examples.len(), 1);
    assert!(
        report.bad_examples[0].contains("row 5") && report.bad_examples[0].contains("jpg_1"),
        "{:?}",
        report.bad_examples
    );
    assert_eq!(ds.len(), 5);
    assert_eq!(ds.latent_shape(), (4, 16, 16));
    assert_eq!(ds.prompt_embeds.dims(), [5, 77, 32]);
    assert!(ds.added.is_none());

    // Pillow + torchvision-style preprocessing of the winners and losers,
    // written by the fixture script; recompute their latents here.
    let expected = candle_core::safetensors::load(
        fixtures().join("pickapic/expected_pixels.safetensors"),
        &Device::Cpu,
    )?;
    let cpu = Device::Cpu;
    for (side, latents) in [("winners", &ds.latents_w), ("losers", &ds.latents_l)] {
        let px = expected.get(side).context("expected pixels")?;
        assert_eq!(px.dims(), [5, 32, 32, 3]);
        let rgb: Vec<u8> = px.flatten_all()?.to_vec1::<u8>()?;
        let images = (0..5)
            .map(|k| to_pixels(&rgb[k * 3072..(k + 1) * 3072], 32, &cpu))
            .collect::<Result<Vec<_>, DpoError>>()?;
        let x = Tensor::stack(&images, 0)?;
        // The plain definition: posterior mean times the scaling factor.
        let mean = sd.vae.encode(&x, agfsync_models::nn::Pass::INFERENCE)?.mean;
        let want = (mean * sd.vae.config().scaling_factor)?;
        let d = max_abs_diff(latents, &want)?;
        assert!(d < 1e-4, "{side}: latents differ by {d}");
        // Batching does not change the encoding.
        let one = encode_latents(&sd, &x.i(2..3)?)?;
        assert!(max_abs_diff(&latents.i(2..3)?, &one)? < 1e-4);
    }

    // The captions' embeddings are in file order.
    let captions: Vec<String> = USABLE.iter().map(|(c, _)| c.to_string()).collect();
    let (text, _) = encode_prompts(&sd, &captions, Negative::None, None, None)?;
    assert!(max_abs_diff(&ds.prompt_embeds, &text.cond.to_dtype(DType::F32)?)? < 1e-5);
    Ok(())
}

#[test]
fn winner_is_jpg_0_exactly_when_label_0_is_one() -> Result<()> {
    // Decode the rows independently and check which image became the winner,
    // comparing latents of our own preprocessing of jpg_0 and jpg_1.
    use agfsync_dpo::pickapic::preprocess_image;
    use agfsync_feedback::image_input::{decode_image, DecodeOptions};
    use agfsync_feedback::preprocess::Resample;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;

    let sd = tiny_sd()?;
    let opts = ImportOptions {
        max_bad_fraction: 0.2,
        ..ImportOptions::new(32)
    };
    let (ds, _) = import_parquet(&pairs_file(), &sd, &opts)?;
    let expected = candle_core::safetensors::load(
        fixtures().join("pickapic/expected_pixels.safetensors"),
        &Device::Cpu,
    )?;
    let pillow = |side: &str, k: usize| -> Result<Vec<u8>> {
        let t = expected.get(side).context("expected pixels")?;
        Ok(t.i(k)?.flatten_all()?.to_vec1::<u8>()?)
    };
    let reader = SerializedFileReader::new(std::fs::File::open(pairs_file())?)?;
    let mut k = 0;
    for row in reader.get_row_iter(None)? {
        let row = row?;
        let mut imgs: Vec<Vec<u8>> = Vec::new();
        let mut label = 0.0;
        let mut caption = String::new();
        for (name, f) in row.get_column_iter() {
            match (name.as_str(), f) {
                ("caption", Field::Str(s)) => caption = s.clone(),
                ("label_0", Field::Double(v)) => label = *v,
                (_, Field::Bytes(b)) => imgs.push(b.data().to_vec()),
                _ => {}
            }
        }
        let decoded = imgs
            .iter()
            .map(|b| decode_image(b, Path::new("x"), &DecodeOptions::default()))
            .collect::<Result<Vec<_>, _>>();
        let Ok(decoded) = decoded else { continue };
        if label == 0.5 {
            continue;
        }
        assert_eq!(caption, USABLE[k].0);
        assert_eq!(label == 1.0, USABLE[k].1);
        let rgb: Vec<Vec<u8>> = decoded
            .iter()
            .map(|img| preprocess_image(img, 32, Resample::Bilinear))
            .collect();
        let lat: Vec<Tensor> = rgb
            .iter()
            .map(|rgb| encode_latents(&sd, &to_pixels(rgb, 32, &Device::Cpu)?.unsqueeze(0)?))
            .collect::<Result<_, DpoError>>()?;
        let (wi, li) = if label == 1.0 { (0, 1) } else { (1, 0) };
        let (w, l) = (&lat[wi], &lat[li]);
        // Pixel-exact with Pillow's resize and torchvision's centre crop.
        assert!(
            rgb[wi] == pillow("winners", k)?,
            "winner pixels of pair {k}"
        );
        assert!(rgb[li] == pillow("losers", k)?, "loser pixels of pair {k}");
        assert!(
            max_abs_diff(&ds.latents_w.i(k..k + 1)?, w)? < 1e-4,
            "pair {k}"
        );
        assert!(
            max_abs_diff(&ds.latents_l.i(k..k + 1)?, l)? < 1e-4,
            "pair {k}"
        );
        k += 1;
    }
    assert_eq!(k, 5);
    Ok(())
}

#[test]
fn saved_pairs_load_back_unchanged() -> Result<()> {
    let sd = tiny_sd()?;
    let opts = ImportOptions {
        max_bad_fraction: 0.2,
        ..ImportOptions::new(32)
    };
    let (ds, _) = import_parquet(&pairs_file(), &sd, &opts)?;
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("pairs.safetensors");
    ds.save(&out)?;
    let back = PairDataset::load(&out, &Device::Cpu)?;
    assert_eq!(max_abs_diff(&ds.latents_w, &back.latents_w)?, 0.0);
    assert_eq!(max_abs_diff(&ds.latents_l, &back.latents_l)?, 0.0);
    assert_eq!(max_abs_diff(&ds.prompt_embeds, &back.prompt_embeds)?, 0.0);
    Ok(())
}

#[test]
fn missing_columns_are_named_with_the_ones_present() -> Result<()> {
    let sd = tiny_sd()?;
    let err = import_parquet(
        &fixtures().join("pickapic/no_label.parquet"),
        &sd,
        &ImportOptions::new(32),
    )
    .err()
    .context("a file without label_0 must be refused")?
    .to_string();
    assert!(
        err.contains("missing Pick-a-Pic column(s) label_0"),
        "{err}"
    );
    assert!(err.contains("the file has caption, jpg_0, jpg_1"), "{err}");
    assert!(err.contains("no_label.parquet"), "{err}");
    Ok(())
}

#[test]
fn too_many_undecodable_images_stop_the_import() -> Result<()> {
    let sd = tiny_sd()?;
    // 1 bad row of 7 (14%): above the default 5% and above 10%.
    for frac in [None, Some(0.1)] {
        let mut opts = ImportOptions::new(32);
        if let Some(f) = frac {
            opts.max_bad_fraction = f;
        }
        let err = import_parquet(&pairs_file(), &sd, &opts)
            .err()
            .context("the import must stop")?
            .to_string();
        assert!(
            err.contains("1 of 7 rows have images that fail to decode"),
            "{err}"
        );
        assert!(err.contains("row 5: jpg_1"), "{err}");
    }
    Ok(())
}

#[test]
fn bad_resolution_and_non_parquet_files_are_clean_errors() -> Result<()> {
    let sd = tiny_sd()?;
    let err = import_parquet(&pairs_file(), &sd, &ImportOptions::new(33))
        .err()
        .context("odd resolution")?
        .to_string();
    assert!(
        err.contains("multiple of the VAE's downscale factor 2"),
        "{err}"
    );
    let not_parquet = fixtures().join("pickapic/expected_pixels.safetensors");
    let err = import_parquet(&not_parquet, &sd, &ImportOptions::new(32))
        .err()
        .context("not parquet")?
        .to_string();
    assert!(err.contains("not a readable Parquet file"), "{err}");
    Ok(())
}

#[test]
fn parquet_row_over_max_row_bytes_is_refused_with_the_limit_named() -> Result<()> {
    use agfsync_dpo::pickapic::check_parquet_bytes;
    let bytes = std::fs::read(pairs_file())?;
    let opts = ImportOptions {
        max_bad_fraction: 0.2,
        ..ImportOptions::new(32)
    };
    let report = check_parquet_bytes(bytes.clone(), &pairs_file(), &opts)?;
    assert_eq!(report.pairs, 5, "{report}");
    let small = ImportOptions {
        max_row_bytes: 200,
        ..opts.clone()
    };
    let err = check_parquet_bytes(bytes, &pairs_file(), &small)
        .expect_err("rows of a few kB are over a 200-byte limit")
        .to_string();
    assert!(err.contains("200 allowed per row"), "{err}");
    assert!(err.contains("--max-row-bytes"), "{err}");
    Ok(())
}

#[test]
fn parquet_image_over_max_pixels_is_refused_with_the_limit_named() -> Result<()> {
    use agfsync_dpo::pickapic::check_parquet_bytes;
    let opts = ImportOptions {
        max_bad_fraction: 1.0,
        max_pixels: 16,
        ..ImportOptions::new(32)
    };
    let report = check_parquet_bytes(std::fs::read(pairs_file())?, &pairs_file(), &opts)?;
    assert_eq!(report.pairs, 0, "{report}");
    assert!(report.bad_images >= 5, "{report}");
    let first = &report.bad_examples[0];
    assert!(first.contains("16 pixels allowed"), "{first}");
    assert!(first.contains("--max-pixels"), "{first}");
    Ok(())
}

// Found by the pickapic_parquet fuzz target: footers with a column chunk at
// a negative offset, and pages that make the parquet crate's decoder assert
// (a bit-packed run longer than its buffer, a dictionary-encoded page
// without a dictionary). Each is an error naming the file, not a panic.
#[test]
fn corrupt_parquet_pages_and_footers_are_refused_not_a_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agfsync-store/tests/fuzz_regressions");
    for name in [
        "parquet_negative_column_offset",
        "parquet_negative_column_offset_dpo",
        "parquet_bit_packed_run_past_buffer",
        "parquet_dictionary_page_missing",
    ] {
        let path = dir.join(format!("{name}.parquet"));
        let bytes = std::fs::read(&path).expect("the regression input is in the repository");
        let opts = ImportOptions {
            max_bad_fraction: 1.0,
            ..ImportOptions::new(8)
        };
        let err = agfsync_dpo::pickapic::check_parquet_bytes(bytes, &path, &opts)
            .expect_err("a corrupt file must be refused");
        assert!(err.to_string().contains(name), "{err}");
    }
}
