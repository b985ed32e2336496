//! Preference pairs from Pick-a-Pic-style Parquet files: the columns
//! `caption` (string), `jpg_0`, `jpg_1` (encoded image bytes) and `label_0`
//! (1 = `jpg_0` preferred, 0 = `jpg_1` preferred, 0.5 = tie).
//!
//! [`import_parquet`] decodes both images of every row, resizes and crops
//! them, encodes them with the pipeline's VAE and the caption with its text
//! encoder(s), and returns a [`PairDataset`] with the winner and loser
//! ordered by `label_0`, plus an [`ImportReport`]. [`PairDataset::save`]
//! writes the result as a pairs file, so the expensive encoding runs once.
//!
//! Preprocessing follows diffusers' `train_diffusion_dpo.py`
//! (`Image.open(...).convert("RGB")`, `transforms.Resize(resolution,
//! BILINEAR)`, `CenterCrop(resolution)`, `ToTensor()`, `Normalize([0.5],
//! [0.5])`):
//!
//! * the shortest side is resized to `resolution` (the long side to
//!   `int(resolution * long / short)`, as torchvision computes it) with
//!   Pillow's antialiased resampling, reproduced exactly by
//!   [`agfsync_feedback::preprocess::resize_u8`] (Pillow 13 pass order).
//!   The filter defaults to bilinear, the DPO script's choice;
//!   [`ImportOptions::filter`] selects bicubic or Lanczos (sharper when
//!   shrinking Pick-a-Pic's 512-1024 px images a lot);
//! * the centre crop's corner is torchvision's
//!   `round((size - crop) / 2)` (rounding half to even);
//! * pixels become `(x / 255 - 0.5) / 0.5` in f32.
//!
//! Latents are the VAE posterior's **mean** times `scaling_factor` (minus
//! `shift_factor` first where a VAE has one): deterministic, so an import is
//! reproducible and a pairs file does not depend on a seed. diffusers' DPO
//! script instead draws `latent_dist.sample()` afresh each step; the
//! posterior's standard deviation of SD's VAE is small (about 1e-2 of the
//! latent scale), so the difference is a slight loss of augmentation.
//! No horizontal flips or random crops are applied.
//!
//! For SDXL, the added time ids are those of a `resolution` x `resolution`
//! image with no crop ([`XlSizes::for_image`]).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use parquet::file::reader::{ChunkReader, FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type;

use agfsync_diffusion::pipeline::{encode_prompts, Negative, XlSizes};
use agfsync_feedback::image_input::{decode_image, DecodeOptions, LoadedImage};
use agfsync_feedback::preprocess::{
    resize_output_size, resize_u8, Resample, ResizeBackend, ResizeTarget,
};
use agfsync_models::nn::Pass;
use agfsync_models::stable_diffusion::{SdFamily, StableDiffusion};

use crate::data::{AddedCond, PairDataset};
use crate::error::DpoError;

/// The columns an import needs.
pub const REQUIRED_COLUMNS: [&str; 4] = ["caption", "jpg_0", "jpg_1", "label_0"];

/// Settings of [`import_parquet`].
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Side of the square training images, in pixels (a multiple of the
    /// VAE's downscale factor).
    pub resolution: usize,
    /// Resampling filter of the shortest-side resize (default bilinear, as
    /// diffusers' DPO script).
    pub filter: Resample,
    /// Stop with an error once more than this fraction of all rows has an
    /// image that fails to decode (default 0.05).
    pub max_bad_fraction: f64,
    /// Pairs per VAE / text-encoder batch.
    pub batch_size: usize,
    /// Images with more pixels than this are refused (decompression bombs);
    /// such a row counts as one with an undecodable image.
    pub max_pixels: u64,
    /// A row (caption and both images) larger than this many bytes stops
    /// the import with an error; a row group whose uncompressed size
    /// exceeds this times its row count is refused before it is read.
    pub max_row_bytes: u64,
}

/// The default of [`ImportOptions::max_row_bytes`]: 64 MiB (Pick-a-Pic rows
/// are a few MB).
pub const DEFAULT_MAX_ROW_BYTES: u64 = 64 << 20;

/// How a refused row's error says to raise the row limit.
const RAISE_ROW_BYTES: &str =
    "raise the limit with `--max-row-bytes` (ImportOptions::max_row_bytes) if the file is trusted";

impl ImportOptions {
    /// Defaults for `resolution`.
    pub fn new(resolution: usize) -> Self {
        Self {
            resolution,
            filter: Resample::Bilinear,
            max_bad_fraction: 0.05,
            batch_size: 8,
            max_pixels: agfsync_feedback::image_input::DEFAULT_MAX_PIXELS,
            max_row_bytes: DEFAULT_MAX_ROW_BYTES,
        }
    }
}

/// What an import found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImportReport {
    /// Rows in the file.
    pub rows: usize,
    /// Pairs in the data set.
    pub pairs: usize,
    /// Rows dropped because `label_0` is 0.5 (a tie).
    pub ties_dropped: usize,
    /// Rows dropped because `label_0` is null or NaN.
    pub unlabelled: usize,
    /// Rows skipped because an image failed to decode.
    pub bad_images: usize,
    /// The first few decode failures (row and reason).
    pub bad_examples: Vec<String>,
    /// Captions cut at the text encoder's 77 tokens.
    pub truncated_captions: usize,
    /// Pairs where `jpg_1` was preferred (and so became the winner).
    pub jpg_1_preferred: usize,
}

impl std::fmt::Display for ImportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rows: {} pairs ({} with jpg_1 preferred), {} ties dropped, {} unlabelled, {} with undecodable images skipped, {} captions truncated to 77 tokens",
            self.rows,
            self.pairs,
            self.jpg_1_preferred,
            self.ties_dropped,
            self.unlabelled,
            self.bad_images,
            self.truncated_captions
        )
    }
}

/// Decodes, resizes (shortest side to `resolution`) and centre-crops one
/// image; returns `resolution * resolution * 3` RGB bytes, row-major.
pub fn preprocess_image(img: &LoadedImage, resolution: usize, filter: Resample) -> Vec<u8> {
    let (h, w) = (img.height as usize, img.width as usize);
    // torchvision leaves the image alone when its short side already fits.
    let (rh, rw) = if h.min(w) == resolution {
        (h, w)
    } else {
        resize_output_size(h, w, ResizeTarget::ShortestEdge(resolution))
    };
    let resized = resize_u8(&img.rgb, (h, w), 3, (rh, rw), filter, ResizeBackend::Pil);
    // torchvision's center_crop: int(round((size - crop) / 2.0)).
    let corner = |size: usize| ((size - resolution) as f64 / 2.0).round_ties_even() as usize;
    let (top, left) = (corner(rh), corner(rw));
    let mut out = Vec::with_capacity(resolution * resolution * 3);
    for y in top..top + resolution {
        let s = (y * rw + left) * 3;
        out.extend_from_slice(&resized[s..s + resolution * 3]);
    }
    out
}

/// RGB bytes (`res x res x 3`) to a `[3, res, res]` f32 tensor in `[-1, 1]`
/// (`ToTensor` then `Normalize([0.5], [0.5])`).
pub fn to_pixels(rgb: &[u8], resolution: usize, device: &Device) -> Result<Tensor, DpoError> {
    let v: Vec<f32> = rgb
        .iter()
        .map(|&x| (x as f32 / 255.0 - 0.5) / 0.5)
        .collect();
    Ok(Tensor::from_vec(v, (resolution, resolution, 3), device)?.permute((2, 0, 1))?)
}

/// Scaled latents of `pixels` (`[b, 3, res, res]` in `[-1, 1]`): the VAE
/// posterior mean times `scaling_factor`, in f32.
pub fn encode_latents(sd: &StableDiffusion, pixels: &Tensor) -> Result<Tensor, DpoError> {
    let cfg = sd.vae.config();
    let x = pixels
        .to_device(sd.vae.device())?
        .to_dtype(sd.vae.dtype())?;
    let mut mean = sd
        .vae
        .encode(&x, Pass::INFERENCE)?
        .mean
        .to_dtype(DType::F32)?;
    if let Some(shift) = cfg.shift_factor {
        mean = (mean - shift)?;
    }
    Ok((mean * cfg.scaling_factor)?.to_device(&Device::Cpu)?)
}

/// One labelled, decoded row waiting for its batch.
struct Pending {
    caption: String,
    winner: Vec<u8>,
    loser: Vec<u8>,
}

/// Accumulates encoded batches.
#[derive(Default)]
struct Encoded {
    latents_w: Vec<Tensor>,
    latents_l: Vec<Tensor>,
    embeds: Vec<Tensor>,
    text_embeds: Vec<Tensor>,
    time_ids: Vec<Tensor>,
}

/// Reads the Pick-a-Pic-style Parquet file at `path` and encodes its pairs
/// with `sd` (see the module docs). Tensors of the data set are f32 on the
/// CPU. Errors: a missing column (naming the missing and the present ones),
/// more bad rows than `max_bad_fraction` allows, no pair left.
pub fn import_parquet(
    path: &Path,
    sd: &StableDiffusion,
    opts: &ImportOptions,
) -> Result<(PairDataset, ImportReport), DpoError> {
    let data_err = |reason: String| DpoError::Data {
        path: path.to_path_buf(),
        reason,
    };
    let factor = sd.vae.config().scale_factor();
    if opts.resolution == 0 || opts.resolution % factor != 0 {
        return Err(data_err(format!(
            "resolution {} must be a positive multiple of the VAE's downscale factor {factor}",
            opts.resolution
        )));
    }
    let file = std::fs::File::open(path).map_err(|e| DpoError::io(path, e))?;
    let mut pending: Vec<Pending> = Vec::new();
    let mut enc = Encoded::default();
    let mut report = read_pairs(file, path, opts, &mut |pair, report| {
        pending.push(pair);
        if pending.len() >= opts.batch_size.max(1) {
            encode_batch(sd, &mut pending, opts.resolution, &mut enc, report)?;
        }
        Ok(())
    })?;
    encode_batch(sd, &mut pending, opts.resolution, &mut enc, &mut report)?;
    if report.pairs == 0 {
        return Err(data_err(format!("no usable pair in the file ({report})")));
    }
    let cat = |v: &[Tensor]| -> Result<Tensor, DpoError> { Ok(Tensor::cat(v, 0)?) };
    let added = if enc.text_embeds.is_empty() {
        None
    } else {
        Some(AddedCond {
            text_embeds: cat(&enc.text_embeds)?,
            time_ids: cat(&enc.time_ids)?,
        })
    };
    let mut ds = PairDataset::new(
        cat(&enc.latents_w)?,
        cat(&enc.latents_l)?,
        cat(&enc.embeds)?,
        added,
    )?;
    ds.source = path.to_path_buf();
    Ok((ds, report))
}

/// Reads, decodes and preprocesses every pair of a Pick-a-Pic-style Parquet
/// file held in memory, without encoding: the checks of [`import_parquet`]
/// (columns, labels, images, size limits) and its report, `pairs` counting
/// the usable rows. `path` only names the file in errors.
pub fn check_parquet_bytes(
    bytes: Vec<u8>,
    path: &Path,
    opts: &ImportOptions,
) -> Result<ImportReport, DpoError> {
    if opts.resolution == 0 {
        return Err(DpoError::Data {
            path: path.to_path_buf(),
            reason: "resolution must be positive".into(),
        });
    }
    read_pairs(bytes::Bytes::from(bytes), path, opts, &mut |_, report| {
        report.pairs += 1;
        Ok(())
    })
}

/// The row loop of an import: hands each usable pair to `sink`.
fn read_pairs<R: ChunkReader + 'static>(
    input: R,
    path: &Path,
    opts: &ImportOptions,
    sink: &mut dyn FnMut(Pending, &mut ImportReport) -> Result<(), DpoError>,
) -> Result<ImportReport, DpoError> {
    let data_err = |reason: String| DpoError::Data {
        path: path.to_path_buf(),
        reason,
    };
    if !(0.0..=1.0).contains(&opts.max_bad_fraction) {
        return Err(data_err(format!(
            "max_bad_fraction {} must lie in [0, 1]",
            opts.max_bad_fraction
        )));
    }
    let file_len = input.len();
    let reader = SerializedFileReader::new(input)
        .map_err(|e| data_err(format!("not a readable Parquet file: {e}")))?;
    agfsync_store::pickapic::check_column_ranges(&reader, file_len).map_err(data_err)?;
    let meta = reader.metadata().file_metadata();
    let schema = meta.schema();
    let present: Vec<String> = schema
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    let missing: Vec<&str> = REQUIRED_COLUMNS
        .iter()
        .copied()
        .filter(|c| !present.iter().any(|p| p == c))
        .collect();
    if !missing.is_empty() {
        return Err(data_err(format!(
            "missing Pick-a-Pic column(s) {}; the file has {} (needed: caption, jpg_0, jpg_1, label_0)",
            missing.join(", "),
            if present.is_empty() {
                "no columns".to_string()
            } else {
                present.join(", ")
            }
        )));
    }
    let fields = schema
        .get_fields()
        .iter()
        .filter(|f| REQUIRED_COLUMNS.contains(&f.name()))
        .cloned()
        .collect();
    let projection = Type::group_type_builder(schema.name())
        .with_fields(fields)
        .build()
        .map_err(|e| data_err(format!("projecting the columns: {e}")))?;
    agfsync_store::pickapic::check_row_group_sizes(&reader, opts.max_row_bytes).map_err(
        |what| {
            data_err(format!(
                "{what}, more than the {} allowed per row; {RAISE_ROW_BYTES}",
                opts.max_row_bytes
            ))
        },
    )?;
    let total_rows = usize::try_from(meta.num_rows()).unwrap_or(0);
    let max_bad = opts.max_bad_fraction * total_rows as f64;
    let rows = agfsync_store::pickapic::GuardedRows::new(
        reader
            .get_row_iter(Some(projection))
            .map_err(|e| data_err(format!("reading rows: {e}")))?,
    );

    let mut report = ImportReport::default();
    let decode_opts = DecodeOptions {
        max_pixels: opts.max_pixels,
        ..DecodeOptions::default()
    };
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| data_err(format!("row {i}: {e}")))?;
        report.rows += 1;
        let size = agfsync_store::pickapic::row_bytes(&row);
        if size > opts.max_row_bytes {
            return Err(data_err(format!(
                "row {i} holds {size} bytes, more than the {} allowed per row; {RAISE_ROW_BYTES}",
                opts.max_row_bytes
            )));
        }
        let mut caption = None;
        let mut label = None;
        let mut jpg = [None, None];
        for (name, field) in row.get_column_iter() {
            match (name.as_str(), field) {
                ("caption", Field::Str(s)) => caption = Some(s.clone()),
                ("caption", Field::Null) => caption = Some(String::new()),
                ("label_0", Field::Double(v)) => label = Some(*v),
                ("label_0", Field::Float(v)) => label = Some(f64::from(*v)),
                ("label_0", Field::Int(v)) => label = Some(f64::from(*v)),
                ("label_0", Field::Long(v)) => label = Some(*v as f64),
                ("label_0", Field::Null) => label = None,
                ("jpg_0", Field::Bytes(b)) => jpg[0] = Some(b.data()),
                ("jpg_1", Field::Bytes(b)) => jpg[1] = Some(b.data()),
                ("jpg_0" | "jpg_1", Field::Null) => {}
                (n, other) => {
                    return Err(data_err(format!(
                        "row {i}: column `{n}` holds {other:?}; expected caption: string, jpg_0/jpg_1: binary, label_0: number"
                    )))
                }
            }
        }
        let label = match label {
            Some(l) if !l.is_nan() => l,
            _ => {
                report.unlabelled += 1;
                continue;
            }
        };
        if label == 0.5 {
            report.ties_dropped += 1;
            continue;
        }
        let mut decoded = Vec::with_capacity(2);
        let mut failure = None;
        for (k, bytes) in jpg.iter().enumerate() {
            let name = PathBuf::from(format!("{}[row {i}].jpg_{k}", path.display()));
            match bytes {
                None => failure = Some(format!("row {i}: jpg_{k} is null")),
                Some(b) => match decode_image(b, &name, &decode_opts) {
                    Ok(img) => decoded.push(preprocess_image(&img, opts.resolution, opts.filter)),
                    Err(e) => failure = Some(format!("row {i}: jpg_{k}: {e}")),
                },
            }
            if failure.is_some() {
                break;
            }
        }
        if let Some(why) = failure {
            report.bad_images += 1;
            if report.bad_examples.len() < 5 {
                report.bad_examples.push(why);
            }
            if report.bad_images as f64 > max_bad {
                return Err(data_err(format!(
                    "{} of {total_rows} rows have images that fail to decode, more than the allowed fraction {} (first: {})",
                    report.bad_images,
                    opts.max_bad_fraction,
                    report.bad_examples.join("; ")
                )));
            }
            continue;
        }
        let loser = decoded.pop().unwrap_or_default();
        let winner = decoded.pop().unwrap_or_default();
        // label_0 > 0.5: jpg_0 is preferred; otherwise jpg_1.
        let (winner, loser) = if label > 0.5 {
            (winner, loser)
        } else {
            report.jpg_1_preferred += 1;
            (loser, winner)
        };
        sink(
            Pending {
                caption: caption.unwrap_or_default(),
                winner,
                loser,
            },
            &mut report,
        )?;
    }
    Ok(report)
}

/// Encodes and empties `pending`.
fn encode_batch(
    sd: &StableDiffusion,
    pending: &mut Vec<Pending>,
    resolution: usize,
    enc: &mut Encoded,
    report: &mut ImportReport,
) -> Result<(), DpoError> {
    if pending.is_empty() {
        return Ok(());
    }
    let cpu = Device::Cpu;
    let mut pixels = Vec::with_capacity(2 * pending.len());
    for p in pending.iter() {
        pixels.push(to_pixels(&p.winner, resolution, &cpu)?);
    }
    for p in pending.iter() {
        pixels.push(to_pixels(&p.loser, resolution, &cpu)?);
    }
    let n = pending.len();
    let latents = encode_latents(sd, &Tensor::stack(&pixels, 0)?)?;
    enc.latents_w.push(latents.narrow(0, 0, n)?);
    enc.latents_l.push(latents.narrow(0, n, n)?);
    let captions: Vec<String> = pending.iter().map(|p| p.caption.clone()).collect();
    let xl = XlSizes::for_image(resolution, resolution);
    let xl = (sd.family == SdFamily::Xl).then_some(&xl);
    let (text, er) = encode_prompts(sd, &captions, Negative::None, None, xl)?;
    report.truncated_captions += er.truncated.len();
    enc.embeds
        .push(text.cond.to_dtype(DType::F32)?.to_device(&cpu)?);
    if let Some((added, _)) = text.added {
        enc.text_embeds
            .push(added.text_embeds.to_dtype(DType::F32)?.to_device(&cpu)?);
        enc.time_ids
            .push(added.time_ids.to_dtype(DType::F32)?.to_device(&cpu)?);
    }
    report.pairs += n;
    pending.clear();
    Ok(())
}
