//! `agfsync score-images`: score image files with the feedback models.

use std::io::Write;
use std::path::PathBuf;

use agfsync_feedback::hps::HpsResize;
use agfsync_feedback::score_images::{
    load_scorers, score_images, Metric, ScoreImagesOptions, ScorerSpec,
};
use agfsync_feedback::scorer::ScoreRequest;
use agfsync_feedback::vqa::{read_questions, VqaOptions, AGFSYNC_QUESTION_TEMPLATE};
use agfsync_models::hub::{resolve_model, HubOptions};
use anyhow::{bail, Result};
use clap::Args;

use crate::common::{check_dtype_device, parse_device, parse_dtype};

/// Arguments of `agfsync score-images`.
#[derive(Args, Debug, Clone)]
pub struct ScoreArgs {
    /// Image files (PNG, JPEG, WebP).
    #[arg(long, num_args = 1.., required = true)]
    pub images: Vec<PathBuf>,
    /// The prompt the images were made from.
    #[arg(long)]
    pub prompt: String,
    /// Refuse images with more pixels than this (decompression bombs).
    #[arg(long, default_value_t = agfsync_feedback::image_input::DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// Metrics, comma separated: clip, aesthetic, vqa, hps.
    #[arg(long, default_value = "clip")]
    pub metrics: String,
    /// CLIP model: a transformers folder or hub id (ViT-L/14 for the
    /// standard CLIP and aesthetic scores).
    #[arg(long)]
    pub clip_model: Option<String>,
    /// LAION aesthetic predictor head (.safetensors or the original .pth).
    #[arg(long)]
    pub aesthetic_model: Option<PathBuf>,
    /// HPSv2 checkpoint: HPS_v2_compressed.pt / HPS_v2.1_compressed.pt (read
    /// without running pickled code) or a safetensors copy in open_clip's layout.
    #[arg(long)]
    pub hps_model: Option<PathBuf>,
    /// HPS tokenizer: a folder, its tokenizer.json, or a hub id. Default: a
    /// `tokenizer/` folder beside the checkpoint, else
    /// laion/CLIP-ViT-H-14-laion2B-s32B-b79K.
    #[arg(long)]
    pub hps_tokenizer: Option<String>,
    /// HPS checkpoint version recorded with the scores: v2.0 or v2.1.
    /// Default: recognised from the file name, else `unknown`.
    #[arg(long)]
    pub hps_version: Option<String>,
    /// open_clip model config (JSON) of the HPS checkpoint. Default:
    /// open_clip_config.json beside it, else inferred (ViT-H-14).
    #[arg(long)]
    pub hps_config: Option<PathBuf>,
    /// torchvision resize HPS preprocessing reproduces: `aa` (torchvision >=
    /// 0.17, antialiased) or `noaa` (older torchvision).
    #[arg(long, default_value = "aa")]
    pub hps_resize: String,
    /// VQA model (`--metrics vqa`): a llava-hf LLaVA-1.5 folder or hub id
    /// (e.g. llava-hf/llava-1.5-7b-hf).
    #[arg(long)]
    pub vqa_model: Option<String>,
    /// Questions about the prompt for the VQA score: a JSON array of
    /// TIFA-style questions ({"question", "choices", "answer", ...}) or
    /// JSONL, one per line. Without it the VQA value is 100 * VQAScore.
    #[arg(long)]
    pub questions: Option<PathBuf>,
    /// VQA question prompt, put inside the model's chat template;
    /// `{question}` and `{choices}` (a Python-style list) are filled in.
    #[arg(long, default_value = AGFSYNC_QUESTION_TEMPLATE)]
    pub vqa_question_template: String,
    /// Longest greedy answer to a yes/no question, in tokens.
    #[arg(long, default_value_t = 6)]
    pub vqa_max_new_tokens: usize,
    /// Images scored together.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// Runs `agfsync score-images`: one JSON line per image on stdout; exits
/// non-zero when any image could not be scored (the others still are).
pub fn run(a: &ScoreArgs) -> Result<()> {
    let metrics = Metric::parse_list(&a.metrics)?;
    let device = parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype)?;
    check_dtype_device(dtype, &device)?;
    let needs_clip = metrics
        .iter()
        .any(|m| matches!(m, Metric::Clip | Metric::Aesthetic));
    let clip_model = match (&a.clip_model, needs_clip) {
        (Some(spec), _) => Some(resolve_model(spec, &HubOptions::from_env())?),
        (None, true) => bail!("--metrics {} needs --clip-model", a.metrics),
        (None, false) => None,
    };
    if metrics.contains(&Metric::Aesthetic) && a.aesthetic_model.is_none() {
        bail!("--metrics aesthetic needs --aesthetic-model (the LAION head file)");
    }
    if metrics.contains(&Metric::Hps) && a.hps_model.is_none() {
        bail!("--metrics hps needs --hps-model (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt)");
    }
    let Some(hps_resize) = HpsResize::from_name(&a.hps_resize) else {
        bail!("--hps-resize {}: choose aa or noaa", a.hps_resize);
    };
    let vqa_model = match (&a.vqa_model, metrics.contains(&Metric::Vqa)) {
        (Some(spec), true) => Some(resolve_model(spec, &HubOptions::from_env())?),
        (None, true) => bail!(
            "--metrics vqa needs --vqa-model (a llava-hf LLaVA-1.5 folder or hub id, \
             e.g. llava-hf/llava-1.5-7b-hf)"
        ),
        (_, false) => None,
    };
    // Read the questions before loading any model: a bad file fails fast.
    let questions = match &a.questions {
        Some(path) => read_questions(path)?,
        None => Vec::new(),
    };
    let spec = ScorerSpec {
        metrics,
        clip_model,
        vqa_model,
        vqa_options: VqaOptions {
            question_template: a.vqa_question_template.clone(),
            max_new_tokens: a.vqa_max_new_tokens.max(1),
            ..VqaOptions::default()
        },
        aesthetic_model: a.aesthetic_model.clone(),
        hps_model: a.hps_model.clone(),
        hps_tokenizer: a.hps_tokenizer.clone(),
        hps_version: a.hps_version.clone(),
        hps_config: a.hps_config.clone(),
        hps_resize,
        dtype,
        device,
        batch_size: a.batch_size,
        ..ScorerSpec::default()
    };
    let scorers = load_scorers(&spec)?;
    let options = ScoreImagesOptions {
        batch_size: a.batch_size,
        decode: agfsync_feedback::image_input::DecodeOptions {
            max_pixels: a.max_pixels,
            ..Default::default()
        },
        ..ScoreImagesOptions::default()
    };
    let stdout = std::io::stdout();
    let summary = score_images(
        &a.images,
        &ScoreRequest {
            prompt: &a.prompt,
            questions: &questions,
        },
        &scorers,
        &options,
        |report| {
            let mut out = stdout.lock();
            writeln!(out, "{}", report.to_json_line()).map_err(|source| {
                agfsync_feedback::error::FeedbackError::Io {
                    path: PathBuf::from("<stdout>"),
                    source,
                }
            })
        },
    )?;
    if summary.failed > 0 {
        bail!(
            "{} of {} images could not be scored (see their `errors` in the output)",
            summary.failed,
            summary.images
        );
    }
    Ok(())
}
