//! HPSv2 (Wu et al., "Human Preference Score v2: A Solid Benchmark for
//! Evaluating Human Preferences of Text-to-Image Synthesis", 2023): how much
//! people would like an image for its prompt, as an OpenCLIP ViT-H/14
//! fine-tuned on human choices sees it (AGFSync section 7).
//!
//! Reference: the `hpsv2` package 1.2.0: `img_score.py` (`score`),
//! `evaluation.py` (the benchmark) and its vendored open_clip fork
//! (`factory.create_model_and_transforms(..., light_augmentation=True)`,
//! `transform.image_transform(..., resize_longest_max=True)`,
//! `tokenizer.tokenize`). The score is
//! `100 * cos(normalised image features, normalised text features)`, as
//! `evaluation.py` reports it (`img_score.score` returns the bare cosine,
//! kept here in `details["cos"]`); `logit_scale` is not used.
//!
//! Preprocessing is HPSv2's `preprocess_val`, which is *not* CLIP's resize
//! and centre crop: the image becomes a float tensor in `[0, 1]` first
//! (`ToTensor`), then `ResizeMaxSize` scales it so its longest side is 224
//! (`round(side * 224 / longest)`, Python's round-half-even) with
//! torchvision's tensor bicubic resize, pads it to 224 x 224 with zeros,
//! centred (the extra pixel right/bottom), and normalises with OpenAI CLIP's
//! mean and std. The float resize is PyTorch's `interpolate(mode="bicubic")`,
//! whose result depends on the torchvision version: since torchvision 0.17
//! `antialias=True` (Pillow's filter, a = -0.5, widened when shrinking;
//! [`HpsResize::Antialias`], the default, what `pip install hpsv2` runs
//! today), before it `antialias=False` (a = -0.75 over 4 x 4 pixels,
//! [`HpsResize::Legacy`], what HPSv2's published numbers were most likely
//! made with). Both are reproduced to float rounding.
//!
//! Deviations, all where HPSv2 itself fails: HPSv2 keeps RGBA images as four
//! channels (its model then raises); agfsync scores the decoded RGB. An
//! image whose longest side already equals 224 is neither resized nor
//! padded by HPSv2 (a non-square one then raises); agfsync pads it.
//! Prompts are cleaned as open_clip does (HTML entities unescaped twice,
//! whitespace collapsed, lower case) except for `ftfy.fix_text`, which only
//! changes mojibake.
//!
//! The version string names the checkpoint (`v2.0`, `v2.1`, from
//! `--hps-version` or the file name, else `unknown`) and always a
//! fingerprint of the file, because the two checkpoints give different
//! numbers.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use agfsync_models::clip_tokenizer::{write_tiny_clip_tokenizer, ClipTokenizer};
use agfsync_models::hub::{resolve_model, HubOptions};
use agfsync_models::weights::{save_safetensors, RandomWeights};

use crate::clip::files_fingerprint;
use crate::error::{FeedbackError, Result};
use crate::image_input::LoadedImage;
use crate::open_clip::{
    read_open_clip_config, OpenClipCheckpoint, OpenClipConfig, OpenClipModel, OpenClipTextConfig,
    OpenClipVisionConfig,
};
use crate::scorer::{l2_normalise, BatchCache, ImageOutcome, ScoreRequest, ScoreResult, Scorer};

/// Version of the HPS computation; bump when the formula changes.
pub const HPS_SCORE_VERSION: &str = "hpsv2/1 100*cos";

/// The tokenizer HPSv2's ViT-H-14 uses (open_clip's CLIP BPE vocabulary).
pub const DEFAULT_HPS_TOKENIZER: &str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K";

/// File name of the open_clip model config looked for beside a checkpoint.
pub const OPEN_CLIP_CONFIG_FILE: &str = "open_clip_config.json";

/// OpenAI CLIP's normalisation (open_clip `constants.py`), as Python
/// floats; torchvision's `Normalize` rounds them to f32.
const MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Which torchvision bicubic tensor resize HPSv2's preprocessing runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HpsResize {
    /// torchvision >= 0.17 (`antialias=True`, the default now).
    #[default]
    Antialias,
    /// torchvision < 0.17 (`antialias=False`, when HPSv2 was published).
    Legacy,
}

impl HpsResize {
    /// The name recorded in versions (`torchvision-aa`, `torchvision-noaa`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Antialias => "torchvision-aa",
            Self::Legacy => "torchvision-noaa",
        }
    }

    /// Parses `aa`/`antialias`/`torchvision-aa` or
    /// `noaa`/`legacy`/`torchvision-noaa`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "aa" | "antialias" | "torchvision-aa" => Some(Self::Antialias),
            "noaa" | "legacy" | "torchvision-noaa" => Some(Self::Legacy),
            _ => None,
        }
    }
}

/// PyTorch's `cubic_convolution1` (`|x| <= 1`).
fn cubic1(x: f32, a: f32) -> f32 {
    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
}

/// PyTorch's `cubic_convolution2` (`1 < |x| < 2`).
fn cubic2(x: f32, a: f32) -> f32 {
    ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
}

/// One output position's taps: first input index and weights.
type Taps = (usize, Vec<f32>);

/// Taps of PyTorch's antialiased bicubic (`_compute_weights_aa`, f32, as
/// for float tensors): Pillow's a = -0.5 filter, widened by the scale when
/// shrinking, normalised to sum 1.
fn taps_aa(input: usize, output: usize) -> Vec<Taps> {
    let scale = input as f32 / output as f32;
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let filter = |x: f32| {
        let x = x.abs();
        if x < 1.0 {
            cubic1(x, -0.5)
        } else if x < 2.0 {
            cubic2(x, -0.5)
        } else {
            0.0
        }
    };
    (0..output)
        .map(|i| {
            let center = scale * (i as f32 + 0.5);
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(input as i64);
            let mut w: Vec<f32> = (xmin..xmax)
                .map(|j| filter((j as f32 - center + 0.5) * invscale))
                .collect();
            let total: f32 = w.iter().fold(0.0, |a, b| a + b);
            if total != 0.0 {
                for x in &mut w {
                    *x /= total;
                }
            }
            (xmin as usize, w)
        })
        .collect()
}

/// Taps of PyTorch's plain bicubic (`upsample_bicubic2d`, align_corners
/// False, f32): a = -0.75 over four pixels, edge pixels repeated.
fn taps_legacy(input: usize, output: usize) -> Vec<[(usize, f32); 4]> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|i| {
            let real = scale * (i as f32 + 0.5) - 0.5;
            let index = (real.floor() as i64).min(input as i64 - 1);
            let t = (real - index as f32).clamp(0.0, 1.0);
            // get_cubic_upsample_coefficients, operation for operation.
            let x2 = 1.0 - t;
            let coeffs = [
                cubic2(t + 1.0, -0.75),
                cubic1(t, -0.75),
                cubic1(x2, -0.75),
                cubic2(x2 + 1.0, -0.75),
            ];
            let mut out = [(0usize, 0.0f32); 4];
            for (k, c) in coeffs.into_iter().enumerate() {
                let at = (index - 1 + k as i64).clamp(0, input as i64 - 1) as usize;
                out[k] = (at, c);
            }
            out
        })
        .collect()
}

/// Resizes a planar `[3, h, w]` f32 image to `[3, oh, ow]` as
/// `torchvision.transforms.functional.resize` does for float tensors with
/// bicubic interpolation. Returns an empty vector when `src` does not hold
/// `3 * h * w` values or a size is zero.
pub fn resize_bicubic_f32(
    src: &[f32],
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    mode: HpsResize,
) -> Vec<f32> {
    if src.len() != 3 * h * w || h == 0 || w == 0 || oh == 0 || ow == 0 {
        return Vec::new();
    }
    match mode {
        HpsResize::Antialias => {
            // Separable, horizontal pass first, a pass skipped when its size
            // does not change (PyTorch's separable_upsample_generic_Nd).
            let mut cur = src.to_vec();
            let mut cw = w;
            if ow != w {
                let taps = taps_aa(w, ow);
                let mut out = vec![0f32; 3 * h * ow];
                for c in 0..3 {
                    for y in 0..h {
                        let row = &cur[(c * h + y) * w..(c * h + y + 1) * w];
                        for (x, (start, wts)) in taps.iter().enumerate() {
                            let mut acc = 0f32;
                            for (k, wt) in wts.iter().enumerate() {
                                acc += row[start + k] * wt;
                            }
                            out[(c * h + y) * ow + x] = acc;
                        }
                    }
                }
                cur = out;
                cw = ow;
            }
            if oh != h {
                let taps = taps_aa(h, oh);
                let mut out = vec![0f32; 3 * oh * cw];
                for c in 0..3 {
                    for (y, (start, wts)) in taps.iter().enumerate() {
                        for x in 0..cw {
                            let mut acc = 0f32;
                            for (k, wt) in wts.iter().enumerate() {
                                acc += cur[(c * h + start + k) * cw + x] * wt;
                            }
                            out[(c * oh + y) * cw + x] = acc;
                        }
                    }
                }
                cur = out;
            }
            cur
        }
        HpsResize::Legacy => {
            // PyTorch's generic kernel: per output pixel, four horizontal
            // sums weighted vertically.
            let ty = taps_legacy(h, oh);
            let tx = taps_legacy(w, ow);
            let mut out = vec![0f32; 3 * oh * ow];
            for c in 0..3 {
                let plane = &src[c * h * w..(c + 1) * h * w];
                for (y, ys) in ty.iter().enumerate() {
                    for (x, xs) in tx.iter().enumerate() {
                        let mut acc = 0f32;
                        for (k, &(yi, wy)) in ys.iter().enumerate() {
                            let row = &plane[yi * w..(yi + 1) * w];
                            let mut t = 0f32;
                            for (j, &(xi, wx)) in xs.iter().enumerate() {
                                if j == 0 {
                                    t = row[xi] * wx;
                                } else {
                                    t += row[xi] * wx;
                                }
                            }
                            if k == 0 {
                                acc = t * wy;
                            } else {
                                acc += t * wy;
                            }
                        }
                        out[(c * oh + y) * ow + x] = acc;
                    }
                }
            }
            out
        }
    }
}

/// HPSv2's `preprocess_val` (see the module docs): `[3, size, size]` f32
/// pixel values of an image.
pub fn hps_pixel_values(image: &LoadedImage, size: usize, mode: HpsResize) -> Result<Vec<f32>> {
    let (h, w) = (image.height as usize, image.width as usize);
    if h == 0 || w == 0 || image.rgb.len() != h * w * 3 {
        return Err(FeedbackError::Image {
            path: image.path.clone(),
            reason: format!("{w}x{h} image with {} bytes of RGB", image.rgb.len()),
        });
    }
    // ToTensor: planar, x / 255 in f32.
    let mut planar = vec![0f32; 3 * h * w];
    for (i, px) in image.rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            planar[c * h * w + i] = f32::from(px[c]) / 255.0;
        }
    }
    // ResizeMaxSize: longest side to `size`, Python's round (half to even).
    let scale = size as f64 / h.max(w) as f64;
    let (nh, nw) = if scale != 1.0 {
        (
            (h as f64 * scale).round_ties_even() as usize,
            (w as f64 * scale).round_ties_even() as usize,
        )
    } else {
        (h, w)
    };
    if nh == 0 || nw == 0 {
        return Err(FeedbackError::Image {
            path: image.path.clone(),
            reason: format!(
                "a {w}x{h} image shrinks to {nw}x{nh} at {size} px on its longest side: too thin to score"
            ),
        });
    }
    let resized = if (nh, nw) == (h, w) {
        planar
    } else {
        resize_bicubic_f32(&planar, (h, w), (nh, nw), mode)
    };
    let (pad_h, pad_w) = (size.saturating_sub(nh), size.saturating_sub(nw));
    if nh > size || nw > size || resized.len() != 3 * nh * nw {
        return Err(FeedbackError::Image {
            path: image.path.clone(),
            reason: format!("internal error: resized to {nw}x{nh} for a {size} px input"),
        });
    }
    let (top, left) = (pad_h / 2, pad_w / 2);
    let mut out = vec![0f32; 3 * size * size];
    for c in 0..3 {
        for y in 0..size {
            for x in 0..size {
                let v = if y >= top && y < top + nh && x >= left && x < left + nw {
                    resized[(c * nh + y - top) * nw + x - left]
                } else {
                    0.0
                };
                out[(c * size + y) * size + x] = (v - MEAN[c] as f32) / STD[c] as f32;
            }
        }
    }
    Ok(out)
}

/// Python's `html.unescape` for the entities prompts contain (named
/// `&amp; &lt; &gt; &quot; &apos; &nbsp;` and numeric `&#N;`/`&#xH;`).
fn html_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let end = rest.find(';').filter(|&e| e <= 12);
        let decoded = end.and_then(|e| {
            let body = &rest[1..e];
            let c = match body {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some('\u{a0}'),
                _ => {
                    let num = body.strip_prefix('#')?;
                    let n = match num.strip_prefix(['x', 'X']) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                        None => num.parse::<u32>().ok()?,
                    };
                    char::from_u32(n)
                }
            }?;
            Some((c, e + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// open_clip's `tokenize`: `sot, tokens, eot`, padded with 0 to the context
/// length; longer texts keep their first `context_length - 1` ids and end
/// with eot.
#[derive(Debug, Clone)]
pub struct HpsTokenizer {
    inner: ClipTokenizer,
    identity: String,
}

impl HpsTokenizer {
    /// Wraps a CLIP tokenizer; `identity` names it in versions.
    pub fn new(inner: ClipTokenizer, identity: impl Into<String>) -> Self {
        Self {
            inner,
            identity: identity.into(),
        }
    }

    /// Loads a tokenizer: a folder (tokenizer.json, or vocab.json +
    /// merges.txt), one of those files, or a hub repo id (downloaded or
    /// read from the hub cache, [`DEFAULT_HPS_TOKENIZER`] for HPSv2).
    pub fn load(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_file() {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !matches!(name, "tokenizer.json" | "vocab.json" | "merges.txt") {
                return Err(FeedbackError::Invalid(format!(
                    "--hps-tokenizer {spec}: give a tokenizer folder, its tokenizer.json, or a hub \
                     repo id (default {DEFAULT_HPS_TOKENIZER})"
                )));
            }
            let dir = path.parent().unwrap_or(Path::new("."));
            let inner = ClipTokenizer::from_dir(dir)?;
            return Ok(Self::new(inner, dir_identity(dir)));
        }
        let src = resolve_model(spec, &HubOptions::from_env())?;
        for name in [
            "tokenizer.json",
            "vocab.json",
            "merges.txt",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            src.optional_file(name)?;
        }
        let inner = ClipTokenizer::from_dir(src.root())?;
        let identity = match (src.repo(), src.commit()) {
            (Some(repo), Some(commit)) => format!("{}@{commit}", repo.repo_id),
            _ => dir_identity(src.root()),
        };
        Ok(Self::new(inner, identity))
    }

    /// The underlying tokenizer.
    pub fn inner(&self) -> &ClipTokenizer {
        &self.inner
    }

    /// Where the tokenizer came from.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Token ids of `text` (`context_length` of them) and whether it was
    /// truncated.
    pub fn encode(&self, text: &str, context_length: usize) -> Result<(Vec<u32>, bool)> {
        let clean = html_unescape(&html_unescape(text));
        let enc = self.inner.encode_padded(clean.trim(), context_length)?;
        let mut ids = enc.ids;
        for id in ids.iter_mut().skip(enc.eos_position + 1) {
            *id = 0;
        }
        Ok((ids, enc.truncated))
    }
}

fn dir_identity(dir: &Path) -> String {
    let files: Vec<PathBuf> = ["tokenizer.json", "vocab.json", "merges.txt"]
        .iter()
        .map(|n| dir.join(n))
        .filter(|p| p.is_file())
        .collect();
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    format!("{name}#{}", files_fingerprint(&files))
}

/// `v2.0` / `v2.1` from an HPS checkpoint's file name
/// (`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`), else `None`.
pub fn version_from_file_name(path: &Path) -> Option<&'static str> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    if name.contains("hps_v2.1") || name.contains("hpsv2.1") || name.contains("hps_v2_1") {
        Some("v2.1")
    } else if name.contains("hps_v2_") || name.contains("hps_v2.") || name.contains("hpsv2_") {
        Some("v2.0")
    } else {
        None
    }
}

/// Normalises a `--hps-version` value (`v2.0`, `2.0`, `v2.1`, `2.1`).
pub fn parse_hps_version(v: &str) -> Result<&'static str> {
    match v.trim().trim_start_matches(['v', 'V']) {
        "2" | "2.0" => Ok("v2.0"),
        "2.1" => Ok("v2.1"),
        _ => Err(FeedbackError::Invalid(format!(
            "--hps-version {v}: HPS versions are v2.0 and v2.1"
        ))),
    }
}

/// How to load an [`HpsScorer`].
#[derive(Clone, Debug)]
pub struct HpsLoadOptions {
    /// An open_clip model config; default: `open_clip_config.json` beside
    /// the checkpoint if present, else the architecture the tensor shapes
    /// imply (ViT-H-14 for the HPS checkpoints).
    pub config: Option<PathBuf>,
    /// Tokenizer folder, file or hub id; default: a `tokenizer/` folder
    /// beside the checkpoint if present, else [`DEFAULT_HPS_TOKENIZER`].
    pub tokenizer: Option<String>,
    /// `v2.0` or `v2.1`; default: recognised from the file name.
    pub version: Option<String>,
    /// Which torchvision resize to reproduce.
    pub resize: HpsResize,
    /// Compute dtype.
    pub dtype: DType,
    /// Device.
    pub device: Device,
    /// Images per forward pass.
    pub batch_size: usize,
}

impl Default for HpsLoadOptions {
    fn default() -> Self {
        Self {
            config: None,
            tokenizer: None,
            version: None,
            resize: HpsResize::default(),
            dtype: DType::F32,
            device: Device::Cpu,
            batch_size: 8,
        }
    }
}

/// The HPSv2 metric.
#[derive(Debug)]
pub struct HpsScorer {
    model: OpenClipModel,
    tokenizer: HpsTokenizer,
    resize: HpsResize,
    version: String,
    batch_size: usize,
    /// The last prompt's normalised embedding (a batch shares one prompt).
    last_prompt: Mutex<Option<(String, Tensor, bool)>>,
}

impl HpsScorer {
    /// Loads an HPS checkpoint (`.pt` as released, `.pth`, or
    /// `.safetensors`, open_clip key layout) and its tokenizer.
    pub fn load(checkpoint: &Path, options: &HpsLoadOptions) -> Result<Self> {
        let dir = checkpoint.parent().unwrap_or(Path::new("."));
        let config_path = options.config.clone().or_else(|| {
            let p = dir.join(OPEN_CLIP_CONFIG_FILE);
            p.is_file().then_some(p)
        });
        let config = match &config_path {
            Some(p) => Some(read_open_clip_config(p)?),
            None => None,
        };
        let version = match &options.version {
            Some(v) => parse_hps_version(v)?,
            None => version_from_file_name(checkpoint).unwrap_or("unknown"),
        };
        let tokenizer_spec = options.tokenizer.clone().unwrap_or_else(|| {
            let local = dir.join("tokenizer");
            if local.is_dir() {
                local.display().to_string()
            } else {
                DEFAULT_HPS_TOKENIZER.to_string()
            }
        });
        let ckpt = OpenClipCheckpoint::open(checkpoint, options.dtype, &options.device)?;
        let model = ckpt.build(config.as_ref())?;
        let tokenizer = HpsTokenizer::load(&tokenizer_spec)?;
        let vocab = model.config().text_cfg.vocab_size;
        if tokenizer.inner().vocab_size() > vocab {
            return Err(FeedbackError::Invalid(format!(
                "the tokenizer {} has {} tokens but the HPS model {} has a vocabulary of {vocab}: \
                 pass the tokenizer the model was trained with (--hps-tokenizer, default \
                 {DEFAULT_HPS_TOKENIZER})",
                tokenizer.identity(),
                tokenizer.inner().vocab_size(),
                checkpoint.display()
            )));
        }
        let name = checkpoint
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| checkpoint.display().to_string());
        let identity = format!("{name}#{}", files_fingerprint(&[checkpoint.to_path_buf()]));
        Ok(Self::from_parts(
            model,
            tokenizer,
            version,
            &identity,
            options.resize,
            options.batch_size,
        ))
    }

    /// A scorer over an already built model (tests, benchmarks).
    pub fn from_parts(
        model: OpenClipModel,
        tokenizer: HpsTokenizer,
        hps_version: &str,
        identity: &str,
        resize: HpsResize,
        batch_size: usize,
    ) -> Self {
        let version = format!(
            "{HPS_SCORE_VERSION}; checkpoint={hps_version}; model={identity}; tokenizer={}; \
             preprocess=hpsv2-resize-longest-pad-{}",
            tokenizer.identity(),
            resize.name()
        );
        Self {
            model,
            tokenizer,
            resize,
            version,
            batch_size: batch_size.max(1),
            last_prompt: Mutex::new(None),
        }
    }

    /// The model.
    pub fn model(&self) -> &OpenClipModel {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &HpsTokenizer {
        &self.tokenizer
    }

    /// HPSv2's preprocessing of one image (`[3, s, s]` f32, `s` the
    /// model's image size).
    pub fn pixel_values(&self, image: &LoadedImage) -> Result<Vec<f32>> {
        hps_pixel_values(
            image,
            self.model.config().vision_cfg.image_size,
            self.resize,
        )
    }

    /// Token ids of prompts (`[n, context_length]` u32) and which were
    /// truncated.
    pub fn input_ids<S: AsRef<str>>(&self, prompts: &[S]) -> Result<(Tensor, Vec<bool>)> {
        let n = self.model.config().text_cfg.context_length;
        let mut ids = Vec::with_capacity(prompts.len() * n);
        let mut truncated = Vec::with_capacity(prompts.len());
        for p in prompts {
            let (i, t) = self.tokenizer.encode(p.as_ref(), n)?;
            ids.extend(i);
            truncated.push(t);
        }
        Ok((
            Tensor::from_vec(ids, (prompts.len(), n), &Device::Cpu)?,
            truncated,
        ))
    }

    /// `100 * cos` between each image and each prompt: `[images, prompts]`
    /// (f32). For evaluation tables and tests.
    pub fn score_matrix<S: AsRef<str>>(
        &self,
        images: &[&LoadedImage],
        prompts: &[S],
    ) -> Result<Tensor> {
        let s = self.model.config().vision_cfg.image_size;
        let mut px = Vec::with_capacity(images.len() * 3 * s * s);
        for img in images {
            px.extend(self.pixel_values(img)?);
        }
        let px = Tensor::from_vec(px, (images.len(), 3, s, s), &Device::Cpu)?;
        let img = l2_normalise(&self.model.encode_image(&px)?.to_device(&Device::Cpu)?)?;
        let (ids, _) = self.input_ids(prompts)?;
        let txt = l2_normalise(&self.model.encode_text(&ids)?.to_device(&Device::Cpu)?)?;
        Ok((img.matmul(&txt.t()?)? * 100.0)?)
    }

    fn prompt_embedding(&self, prompt: &str) -> Result<(Tensor, bool)> {
        let mut guard = match self.last_prompt.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some((p, t, tr)) = guard.as_ref() {
            if p == prompt {
                return Ok((t.clone(), *tr));
            }
        }
        let (ids, truncated) = self.input_ids(&[prompt])?;
        let t = l2_normalise(&self.model.encode_text(&ids)?.to_device(&Device::Cpu)?)?;
        let tr = truncated.first().copied().unwrap_or(false);
        *guard = Some((prompt.to_string(), t.clone(), tr));
        Ok((t, tr))
    }
}

impl Scorer for HpsScorer {
    fn name(&self) -> &str {
        "hps"
    }

    fn version(&self) -> &str {
        &self.version
    }

    fn preferred_batch_size(&self) -> usize {
        self.batch_size
    }

    fn score_batch(
        &self,
        images: &[&LoadedImage],
        request: &ScoreRequest<'_>,
        _cache: &mut BatchCache,
    ) -> Result<Vec<ImageOutcome>> {
        let (text, truncated) = self.prompt_embedding(request.prompt)?;
        let text = text.squeeze(0)?;
        let s = self.model.config().vision_cfg.image_size;
        let mut out: Vec<ImageOutcome> = Vec::with_capacity(images.len());
        let mut ok = Vec::new();
        let mut pixels = Vec::new();
        for (i, img) in images.iter().enumerate() {
            match self.pixel_values(img) {
                Ok(px) => {
                    pixels.extend(px);
                    ok.push(i);
                    out.push(Err(FeedbackError::Invalid(String::new())));
                }
                Err(e) => out.push(Err(e)),
            }
        }
        for (chunk_ix, chunk) in ok.chunks(self.batch_size).enumerate() {
            let start = chunk_ix * self.batch_size * 3 * s * s;
            let px = Tensor::from_vec(
                pixels[start..start + chunk.len() * 3 * s * s].to_vec(),
                (chunk.len(), 3, s, s),
                &Device::Cpu,
            )?;
            let feats = l2_normalise(&self.model.encode_image(&px)?.to_device(&Device::Cpu)?)?;
            let cos: Vec<f32> = feats
                .matmul(&text.unsqueeze(1)?)?
                .flatten_all()?
                .to_vec1()?;
            for (&i, c) in chunk.iter().zip(cos) {
                let cos = f64::from(c);
                let mut result = ScoreResult {
                    metric: "hps".into(),
                    value: 100.0 * cos,
                    version: self.version.clone(),
                    details: [("cos".to_string(), cos)].into_iter().collect(),
                    notes: Vec::new(),
                };
                if truncated {
                    result
                        .notes
                        .push("prompt truncated to the 77-token CLIP window".into());
                }
                out[i] = Ok(result);
            }
        }
        Ok(out)
    }
}

/// The open_clip config of [`write_tiny_hps`]'s model (and of the parity
/// fixtures): 32-wide towers of two layers, 56 px images in 14 px patches.
pub fn tiny_hps_config(vocab_size: usize) -> OpenClipConfig {
    OpenClipConfig {
        embed_dim: 32,
        quick_gelu: false,
        vision_cfg: OpenClipVisionConfig {
            image_size: 56,
            layers: 2,
            width: 32,
            head_width: 8,
            mlp_ratio: 4.0,
            patch_size: 14,
        },
        text_cfg: OpenClipTextConfig {
            context_length: 77,
            vocab_size,
            width: 32,
            heads: 4,
            layers: 2,
            mlp_ratio: 4.0,
        },
    }
}

/// Writes a tiny random HPS model into `dir` (created if needed), without
/// network: `tiny-hps.safetensors` (open_clip layout, the path returned),
/// `open_clip_config.json` and `tokenizer/` (a tiny CLIP BPE tokenizer),
/// which [`HpsScorer::load`] finds beside the checkpoint. Deterministic for
/// a `seed`.
pub fn write_tiny_hps(dir: &Path, seed: u64) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|source| FeedbackError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let tok = write_tiny_clip_tokenizer(&dir.join("tokenizer"), "<|endoftext|>")?;
    let cfg = tiny_hps_config(tok.vocab_size);
    let config_path = dir.join(OPEN_CLIP_CONFIG_FILE);
    let json = serde_json::to_string_pretty(&cfg).map_err(|e| {
        FeedbackError::Invalid(format!("cannot serialise the tiny HPS config: {e}"))
    })?;
    std::fs::write(&config_path, json + "\n").map_err(|source| FeedbackError::Io {
        path: config_path.clone(),
        source,
    })?;
    let rw = RandomWeights::new(seed);
    OpenClipModel::new(&cfg, rw.var_builder(DType::F32, &Device::Cpu))?;
    let path = dir.join("tiny-hps.safetensors");
    save_safetensors(&rw.tensors(), &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_released_file_names() {
        let v = |n: &str| version_from_file_name(Path::new(n));
        assert_eq!(v("/m/HPS_v2_compressed.pt"), Some("v2.0"));
        assert_eq!(v("HPS_v2.1_compressed.pt"), Some("v2.1"));
        assert_eq!(v("HPS_v2.1_compressed.safetensors"), Some("v2.1"));
        assert_eq!(v("model.pt"), None);
        assert_eq!(parse_hps_version("v2.1").ok(), Some("v2.1"));
        assert_eq!(parse_hps_version("2.0").ok(), Some("v2.0"));
        assert!(parse_hps_version("v3").is_err());
    }

    #[test]
    fn html_entities_are_unescaped_like_python() {
        assert_eq!(html_unescape("a &amp;amp; b"), "a &amp; b");
        assert_eq!(html_unescape(&html_unescape("a &amp;amp; b")), "a & b");
        assert_eq!(
            html_unescape("&#39;x&#x41;&lt;&bogus; & y"),
            "'xA<&bogus; & y"
        );
    }

    #[test]
    fn exact_longest_side_is_padded_and_too_thin_images_are_errors() -> Result<()> {
        // 56x20 has its longest side at 56 already: HPSv2 would neither
        // resize nor pad (and then fail); we pad, so the image is scored.
        let img = LoadedImage::from_rgb("w.png", 56, 20, vec![255; 56 * 20 * 3])?;
        let px = hps_pixel_values(&img, 56, HpsResize::Antialias)?;
        assert_eq!(px.len(), 3 * 56 * 56);
        let white = (1.0 - MEAN[0] as f32) / STD[0] as f32;
        let black = -(MEAN[0] as f32) / STD[0] as f32;
        assert_eq!(
            px[17 * 56],
            black,
            "row 17 is padding (36 rows: 18 above, 18 below)"
        );
        assert_eq!(px[18 * 56], white, "row 18 is the image");
        assert_eq!(px[38 * 56], black, "row 38 is padding");
        let thin = LoadedImage::from_rgb("t.png", 1000, 1, vec![0; 1000 * 3])?;
        let e = hps_pixel_values(&thin, 56, HpsResize::Antialias);
        assert!(e.is_err_and(|e| e.to_string().contains("too thin")));
        Ok(())
    }

    #[test]
    fn same_size_resize_is_the_identity_and_upscales_interpolate() {
        let src: Vec<f32> = (0..3 * 4 * 5).map(|i| i as f32 / 60.0).collect();
        for mode in [HpsResize::Antialias, HpsResize::Legacy] {
            let same = resize_bicubic_f32(&src, (4, 5), (4, 5), mode);
            let worst = same
                .iter()
                .zip(&src)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-6, "{mode:?}: {worst}");
            let up = resize_bicubic_f32(&src, (4, 5), (8, 10), mode);
            assert_eq!(up.len(), 3 * 8 * 10);
            assert!(up.iter().all(|v| v.is_finite()));
        }
    }
}
