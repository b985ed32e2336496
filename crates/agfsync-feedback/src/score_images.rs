//! Scoring image files with several metrics: what `agfsync score-images`
//! runs. Models are loaded once ([`load_scorers`]); images are decoded in
//! parallel and scored in batches ([`score_images`]); each image yields one
//! [`ImageReport`] (one JSON line), with per-image errors (unreadable file,
//! truncated PNG, ...) reported in it while the other images are scored.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use agfsync_models::hub::ModelSource;

use crate::aesthetic::{AestheticHead, AestheticScorer};
use crate::clip::{ClipLoadOptions, ClipModel};
use crate::clip_score::ClipScorer;
use crate::error::{FeedbackError, Result};
use crate::hps::{HpsLoadOptions, HpsResize, HpsScorer};
use crate::image_input::{load_image, DecodeOptions, LoadedImage};
use crate::llava::{Llava, LlavaLoadOptions};
use crate::preprocess::ResizeBackend;
use crate::scorer::{BatchCache, ScoreRequest, Scorer};
use crate::vqa::{VqaOptions, VqaScorer};

/// A metric `score-images` can compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    /// CLIP score (`--clip-model`).
    Clip,
    /// LAION aesthetic score (`--aesthetic-model` on `--clip-model`).
    Aesthetic,
    /// VQA score (`--vqa-model`, `--questions`): LLaVA-1.5.
    Vqa,
    /// HPSv2 (`--hps-model`).
    Hps,
}

impl Metric {
    /// The metric's name (`clip`, `aesthetic`, `vqa`, `hps`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Clip => "clip",
            Self::Aesthetic => "aesthetic",
            Self::Vqa => "vqa",
            Self::Hps => "hps",
        }
    }

    /// Parses a comma-separated list such as `clip,aesthetic`
    /// (duplicates removed, order kept).
    pub fn parse_list(list: &str) -> Result<Vec<Self>> {
        let mut out = Vec::new();
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let m = match part.to_ascii_lowercase().as_str() {
                "clip" | "clip_score" | "clipscore" => Self::Clip,
                "aesthetic" | "aes" => Self::Aesthetic,
                "vqa" => Self::Vqa,
                "hps" | "hpsv2" => Self::Hps,
                other => {
                    return Err(FeedbackError::Invalid(format!(
                        "unknown metric `{other}`: choose from clip, aesthetic, vqa, hps"
                    )))
                }
            };
            if !out.contains(&m) {
                out.push(m);
            }
        }
        if out.is_empty() {
            return Err(FeedbackError::Invalid(
                "no metric given: choose from clip, aesthetic, vqa, hps".into(),
            ));
        }
        Ok(out)
    }
}

/// Everything [`load_scorers`] needs (the flags of `score-images`).
#[derive(Clone, Debug)]
pub struct ScorerSpec {
    /// The metrics, in output order.
    pub metrics: Vec<Metric>,
    /// A transformers CLIPModel (CLIP ViT-L/14 for the aesthetic head).
    pub clip_model: Option<ModelSource>,
    /// The aesthetic head (`.safetensors` or `.pth`).
    pub aesthetic_model: Option<PathBuf>,
    /// The VQA model (a llava-hf LLaVA-1.5 folder or hub id).
    pub vqa_model: Option<ModelSource>,
    /// How the VQA scorer prompts its model.
    pub vqa_options: VqaOptions,
    /// The HPSv2 checkpoint (`.pt` as released, or safetensors).
    pub hps_model: Option<PathBuf>,
    /// The HPS tokenizer (folder, file or hub id; see
    /// [`HpsLoadOptions::tokenizer`]).
    pub hps_tokenizer: Option<String>,
    /// `v2.0` / `v2.1` (default: from the checkpoint's file name).
    pub hps_version: Option<String>,
    /// An open_clip model config for the HPS checkpoint (default: beside
    /// it, else inferred from its shapes).
    pub hps_config: Option<PathBuf>,
    /// Which torchvision resize HPS preprocessing reproduces.
    pub hps_resize: HpsResize,
    /// Compute dtype.
    pub dtype: DType,
    /// Device.
    pub device: Device,
    /// Which transformers preprocessing to reproduce.
    pub resize_backend: ResizeBackend,
    /// Images per forward pass.
    pub batch_size: usize,
}

impl Default for ScorerSpec {
    fn default() -> Self {
        Self {
            metrics: vec![Metric::Clip],
            clip_model: None,
            aesthetic_model: None,
            vqa_model: None,
            vqa_options: VqaOptions::default(),
            hps_model: None,
            hps_tokenizer: None,
            hps_version: None,
            hps_config: None,
            hps_resize: HpsResize::default(),
            dtype: DType::F32,
            device: Device::Cpu,
            resize_backend: ResizeBackend::Pil,
            batch_size: 8,
        }
    }
}

/// Loads every requested scorer once. CLIP score and aesthetic score share
/// one CLIP model (and, per batch, its image embeddings).
pub fn load_scorers(spec: &ScorerSpec) -> Result<Vec<Box<dyn Scorer>>> {
    let mut clip: Option<Arc<ClipModel>> = None;
    let mut get_clip = |why: &str| -> Result<Arc<ClipModel>> {
        if let Some(c) = &clip {
            return Ok(c.clone());
        }
        let src = spec.clip_model.as_ref().ok_or_else(|| {
            FeedbackError::Invalid(format!(
                "{why} needs --clip-model (a transformers CLIPModel folder or hub id, \
                 e.g. openai/clip-vit-large-patch14)"
            ))
        })?;
        let model = Arc::new(ClipModel::load_with(
            src,
            &ClipLoadOptions {
                dtype: spec.dtype,
                device: spec.device.clone(),
                resize_backend: spec.resize_backend,
            },
        )?);
        clip = Some(model.clone());
        Ok(model)
    };
    let mut out: Vec<Box<dyn Scorer>> = Vec::new();
    for m in &spec.metrics {
        match m {
            Metric::Clip => {
                let c = get_clip("the clip metric")?;
                out.push(Box::new(
                    ClipScorer::new(c).with_batch_size(spec.batch_size),
                ));
            }
            Metric::Aesthetic => {
                let path = spec.aesthetic_model.as_ref().ok_or_else(|| {
                    FeedbackError::Invalid(
                        "the aesthetic metric needs --aesthetic-model (the LAION head, \
                         sac+logos+ava1-l14-linearMSE.pth or a safetensors copy)"
                            .into(),
                    )
                })?;
                // Read the head first: a bad head file fails fast, before CLIP loads.
                let head = AestheticHead::load(path, &spec.device)?;
                let c = get_clip("the aesthetic metric (CLIP ViT-L/14 image embeddings)")?;
                out.push(Box::new(
                    AestheticScorer::new(c, head)?.with_batch_size(spec.batch_size),
                ));
            }
            Metric::Hps => {
                let path = spec.hps_model.as_ref().ok_or_else(|| {
                    FeedbackError::Invalid(
                        "the hps metric needs --hps-model (HPS_v2_compressed.pt or \
                         HPS_v2.1_compressed.pt from the xswu/HPSv2 hub repo, or a safetensors copy)"
                            .into(),
                    )
                })?;
                out.push(Box::new(HpsScorer::load(
                    path,
                    &HpsLoadOptions {
                        config: spec.hps_config.clone(),
                        tokenizer: spec.hps_tokenizer.clone(),
                        version: spec.hps_version.clone(),
                        resize: spec.hps_resize,
                        dtype: spec.dtype,
                        device: spec.device.clone(),
                        batch_size: spec.batch_size,
                    },
                )?));
            }
            Metric::Vqa => {
                let src = spec.vqa_model.as_ref().ok_or_else(|| {
                    FeedbackError::Invalid(
                        "the vqa metric needs --vqa-model (a llava-hf LLaVA-1.5 folder or hub \
                         id, e.g. llava-hf/llava-1.5-7b-hf)"
                            .into(),
                    )
                })?;
                let model = Llava::load(
                    src,
                    &LlavaLoadOptions {
                        dtype: spec.dtype,
                        device: spec.device.clone(),
                        resize_backend: spec.resize_backend,
                    },
                )?;
                out.push(Box::new(
                    VqaScorer::new(Arc::new(model), spec.vqa_options.clone())?
                        .with_batch_size(spec.batch_size),
                ));
            }
        }
    }
    Ok(out)
}

/// Options of [`score_images`].
#[derive(Clone, Debug)]
pub struct ScoreImagesOptions {
    /// Images decoded and scored together.
    pub batch_size: usize,
    /// Image decoding.
    pub decode: DecodeOptions,
    /// Threads decoding images (0 = one per core).
    pub decode_threads: usize,
}

impl Default for ScoreImagesOptions {
    fn default() -> Self {
        Self {
            batch_size: 8,
            decode: DecodeOptions::default(),
            decode_threads: 0,
        }
    }
}

/// The scores of one image: one JSON line of `score-images`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageReport {
    /// The image file.
    pub image: PathBuf,
    /// Metric -> value.
    pub scores: BTreeMap<String, f64>,
    /// Metric -> version string of the scorer that made the value.
    pub versions: BTreeMap<String, String>,
    /// Metric -> secondary values (e.g. `clip.cos`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, BTreeMap<String, f64>>,
    /// Remarks (e.g. a truncated prompt).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Metric (or `image` for decoding) -> error message.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub errors: BTreeMap<String, String>,
}

impl ImageReport {
    /// Whether every requested metric produced a score.
    pub fn is_complete(&self) -> bool {
        self.errors.is_empty()
    }

    /// The report as one line of JSON (no trailing newline).
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(
                "{{\"image\":{:?},\"errors\":{{\"report\":{:?}}}}}",
                self.image.display().to_string(),
                e.to_string()
            )
        })
    }
}

/// Counts over a [`score_images`] run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScoreSummary {
    /// Images seen.
    pub images: usize,
    /// Images with every requested score.
    pub complete: usize,
    /// Images with at least one error.
    pub failed: usize,
}

/// Scores already-decoded images (each `Ok` image gets every scorer's score;
/// `Err` entries are images that could not be decoded). One report per
/// entry, in order.
pub fn score_loaded(
    images: &[(PathBuf, Result<LoadedImage>)],
    request: &ScoreRequest<'_>,
    scorers: &[Box<dyn Scorer>],
) -> Vec<ImageReport> {
    let mut reports: Vec<ImageReport> = images
        .iter()
        .map(|(p, r)| {
            let mut rep = ImageReport {
                image: p.clone(),
                ..ImageReport::default()
            };
            if let Err(e) = r {
                rep.errors.insert("image".into(), e.to_string());
            }
            rep
        })
        .collect();
    let ok: Vec<(usize, &LoadedImage)> = images
        .iter()
        .enumerate()
        .filter_map(|(i, (_, r))| r.as_ref().ok().map(|img| (i, img)))
        .collect();
    if ok.is_empty() {
        return reports;
    }
    let batch: Vec<&LoadedImage> = ok.iter().map(|(_, img)| *img).collect();
    let mut cache = BatchCache::new();
    for scorer in scorers {
        let name = scorer.name().to_string();
        match scorer.score_batch(&batch, request, &mut cache) {
            Ok(outcomes) if outcomes.len() != ok.len() => {
                for &(i, _) in &ok {
                    reports[i].errors.insert(
                        name.clone(),
                        format!(
                            "internal error: {} outcomes for {} images",
                            outcomes.len(),
                            ok.len()
                        ),
                    );
                }
            }
            Ok(outcomes) => {
                for (&(i, _), outcome) in ok.iter().zip(outcomes) {
                    let rep = &mut reports[i];
                    match outcome {
                        Ok(r) => {
                            rep.scores.insert(name.clone(), r.value);
                            rep.versions.insert(name.clone(), r.version);
                            if !r.details.is_empty() {
                                rep.details.insert(name.clone(), r.details);
                            }
                            for n in r.notes {
                                if !rep.notes.contains(&n) {
                                    rep.notes.push(n);
                                }
                            }
                        }
                        Err(e) => {
                            rep.errors.insert(name.clone(), e.to_string());
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(metric = %name, error = %e, "a batch failed");
                for &(i, _) in &ok {
                    reports[i]
                        .errors
                        .insert(name.clone(), format!("batch failed: {e}"));
                }
            }
        }
    }
    reports
}

fn decode_all(
    paths: &[PathBuf],
    options: &ScoreImagesOptions,
) -> Vec<(PathBuf, Result<LoadedImage>)> {
    let threads = match options.decode_threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    }
    .min(paths.len())
    .max(1);
    if threads == 1 {
        return paths
            .iter()
            .map(|p| (p.clone(), load_image(p, &options.decode)))
            .collect();
    }
    let mut out: Vec<Option<(PathBuf, Result<LoadedImage>)>> = paths.iter().map(|_| None).collect();
    let chunk = paths.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (slots, ps) in out.chunks_mut(chunk).zip(paths.chunks(chunk)) {
            s.spawn(move || {
                for (slot, p) in slots.iter_mut().zip(ps) {
                    *slot = Some((p.clone(), load_image(p, &options.decode)));
                }
            });
        }
    });
    out.into_iter()
        .zip(paths)
        .map(|(o, p)| {
            o.unwrap_or_else(|| {
                (
                    p.clone(),
                    Err(FeedbackError::Invalid("decoding thread panicked".into())),
                )
            })
        })
        .collect()
}

/// Scores image files against one prompt: decodes and scores
/// `options.batch_size` images at a time and hands each image's report to
/// `on_report` in input order (write it out as a JSON line). Unreadable
/// images get a report with an `image` error; the rest are still scored.
/// Only an error returned by `on_report` stops the run.
pub fn score_images(
    paths: &[PathBuf],
    request: &ScoreRequest<'_>,
    scorers: &[Box<dyn Scorer>],
    options: &ScoreImagesOptions,
    mut on_report: impl FnMut(ImageReport) -> Result<()>,
) -> Result<ScoreSummary> {
    let mut summary = ScoreSummary::default();
    for chunk in paths.chunks(options.batch_size.max(1)) {
        let images = decode_all(chunk, options);
        for rep in score_loaded(&images, request, scorers) {
            summary.images += 1;
            if rep.is_complete() {
                summary.complete += 1;
            } else {
                summary.failed += 1;
            }
            on_report(rep)?;
        }
    }
    Ok(summary)
}
