//! `agfsync.toml`: the configuration of a run.
//!
//! Every section and field is documented here and in the commented file
//! that `agfsync init` writes ([`template`]). Unknown keys and wrong types
//! are errors that name the key and its line (serde's `deny_unknown_fields`
//! with the `toml` crate's positions), because a typo silently ignored would
//! cost a user a day of GPU time.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{PipelineError, Result};

/// The file name of a run's config.
pub const CONFIG_FILE: &str = "agfsync.toml";

/// A starting point for `agfsync init`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// Tiny random-weight models written into the run (CPU, minutes).
    Tiny,
    /// Stable Diffusion 1.5 at 512 with CLIP ViT-L/14 and the LAION head.
    Sd15,
    /// SDXL base at 1024.
    Sdxl,
}

impl std::str::FromStr for Preset {
    type Err = PipelineError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "tiny" => Ok(Self::Tiny),
            "sd15" | "sd1.5" => Ok(Self::Sd15),
            "sdxl" => Ok(Self::Sdxl),
            other => Err(PipelineError::Invalid(format!(
                "unknown preset `{other}`: choose tiny, sd15 or sdxl"
            ))),
        }
    }
}

/// The whole run configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Run-wide settings.
    #[serde(default)]
    pub run: RunSection,
    /// The models.
    pub models: ModelsSection,
    /// The LLM that authors prompts and questions (`source = "llm"`): an
    /// OpenAI-compatible server (OpenAI, vLLM, llama.cpp, ollama, TGI). The
    /// API key is named by `api_key_env` (or a private `api_key_file`), never
    /// written here.
    #[serde(default)]
    pub llm: Option<agfsync_author::http::HttpConfig>,
    /// Or an in-process LLM (`source = "llm"` without a server): a
    /// transformers Llama/Qwen2 instruct folder or hub id, run by candle
    /// with JSON-schema-constrained decoding.
    #[serde(default)]
    pub local_llm: Option<LocalLlmSection>,
    /// Where prompts come from.
    #[serde(default)]
    pub prompts: PromptsSection,
    /// Where questions come from.
    #[serde(default)]
    pub questions: QuestionsSection,
    /// Candidate generation.
    #[serde(default)]
    pub generate: GenerateSection,
    /// Scoring.
    #[serde(default)]
    pub score: ScoreSection,
    /// Pair selection.
    #[serde(default)]
    pub pairs: PairsSection,
    /// Diffusion-DPO training.
    #[serde(default)]
    pub train: TrainSection,
    /// Evaluation of base and tuned models.
    #[serde(default)]
    pub eval: EvalSection,
    /// Bounds on outside input (image sizes, prompt lengths, file sizes).
    #[serde(default)]
    pub limits: LimitsSection,
}

/// `[limits]`: inputs beyond these are refused with an error naming the
/// limit, instead of exhausting memory. Raise them for trusted inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Images (candidates, evaluation images) with more pixels than this are
    /// refused before their pixels are decoded (default 178,956,970, the
    /// size Pillow refuses).
    pub max_image_pixels: u64,
    /// Prompts and captions longer than this many characters (prompt files,
    /// TIFA questions) are refused (default 4000; CLIP reads 77 tokens).
    pub max_prompt_chars: usize,
    /// Prompt, TIFA and HPSv2 files larger than this many bytes are refused
    /// before they are read (default 256 MiB).
    pub max_input_file_bytes: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_image_pixels: agfsync_feedback::image_input::DEFAULT_MAX_PIXELS,
            max_prompt_chars: crate::prompts::DEFAULT_MAX_PROMPT_CHARS,
            max_input_file_bytes: crate::prompts::DEFAULT_MAX_INPUT_FILE_BYTES,
        }
    }
}

impl LimitsSection {
    /// The limits that apply to prompt and question files.
    pub fn input(&self) -> crate::prompts::InputLimits {
        crate::prompts::InputLimits {
            max_prompt_chars: self.max_prompt_chars,
            max_file_bytes: self.max_input_file_bytes,
        }
    }

    /// Image decoding options with this pixel limit.
    pub fn decode_options(&self) -> agfsync_feedback::image_input::DecodeOptions {
        agfsync_feedback::image_input::DecodeOptions {
            max_pixels: self.max_image_pixels,
            ..Default::default()
        }
    }
}

/// `[eval]`: base against tuned on a benchmark (`agfsync eval`, `agfsync report`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// `builtin` (the built-in prompts), a prompt file (.txt/.jsonl/.csv),
    /// `tifa:PATH` (TIFA v1.0 question file) or `hps:PATH` (HPSv2 prompt
    /// folder or JSON object).
    pub benchmark: String,
    /// Use only the first N prompts (0: all).
    pub limit: usize,
    /// Seed of the evaluation images (the same for every model).
    pub seed: u64,
    /// Metrics: `clip`, `aesthetic`, `vqa`.
    pub metrics: Vec<String>,
    /// Bootstrap resamples for the confidence intervals.
    pub resamples: usize,
    /// Models compared, the first being the baseline: `base` (the
    /// diffusion model), `tuned` (base + this run's DPO LoRA, once trained)
    /// or `NAME=PATH` (base + another LoRA file, or a whole diffusers
    /// pipeline folder such as a merged model; relative to the run).
    pub models: Vec<String>,
    /// Run the eval stage in `agfsync run`.
    pub enabled: bool,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            benchmark: "builtin".into(),
            limit: 0,
            seed: 1000,
            metrics: vec!["clip".into(), "aesthetic".into()],
            resamples: 2000,
            models: vec!["base".into(), "tuned".into()],
            enabled: true,
        }
    }
}

/// `[local_llm]`: an in-process authoring model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalLlmSection {
    /// A transformers folder (relative to the run) or hub id, e.g.
    /// Qwen/Qwen2.5-7B-Instruct.
    pub model: String,
    /// Requests decoded together, as one padded batch (one forward pass per
    /// token for all of them).
    #[serde(default = "one")]
    pub max_concurrency: usize,
}

fn one() -> usize {
    1
}

/// `[run]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// Master seed: every candidate's seeds derive from it and the prompt id.
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// `f32`, `f16` or `bf16` for inference.
    pub dtype: String,
}

impl Default for RunSection {
    fn default() -> Self {
        Self {
            seed: 0,
            device: "cpu".into(),
            dtype: "f32".into(),
        }
    }
}

/// `[models]`: folders (relative to the run directory) or hub ids.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsSection {
    /// The text-to-image model (a diffusers pipeline folder or hub id).
    pub diffusion: String,
    /// The CLIP model for CLIP score and the aesthetic head.
    #[serde(default)]
    pub clip: Option<String>,
    /// The LAION aesthetic head (`.safetensors` or `.pth`).
    #[serde(default)]
    pub aesthetic: Option<String>,
    /// The VQA model (a transformers LLaVA folder or hub id).
    #[serde(default)]
    pub vqa: Option<String>,
    /// The HPSv2 checkpoint (HPS_v2_compressed.pt / HPS_v2.1_compressed.pt
    /// or a safetensors copy), for evaluation.
    #[serde(default)]
    pub hps: Option<String>,
}

/// `[prompts]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptsSection {
    /// `builtin` (a small set, one prompt per AGFSync category), or a file:
    /// `.txt` (one prompt a line), `.jsonl` (`{"prompt": .., "category": ..}`)
    /// or `.csv` (a `prompt` column, optional `category`).
    pub source: String,
    /// Use only the first N prompts (0: all; file and built-in sources;
    /// LLM authoring is sized by `[prompts.llm]`).
    pub limit: usize,
    /// `source = "llm"`: the prompt template file (rules, few-shot examples,
    /// `{category}` and `{count}`); empty: the built-in AGFSync template.
    pub template: String,
    /// `source = "llm"`: categories, descriptions per call, calls per
    /// category, sampling, seed and the near-duplicate threshold.
    pub llm: agfsync_author::PromptAuthoring,
    /// The sentence-embedding model for near-duplicate removal of authored
    /// prompts and questions: a BERT-family folder or hub id (AGFSync used
    /// BAAI/bge-large-en-v1.5); empty: a bag-of-words embedding.
    pub embedder: String,
}

impl Default for PromptsSection {
    fn default() -> Self {
        Self {
            source: "builtin".into(),
            limit: 0,
            template: String::new(),
            llm: agfsync_author::PromptAuthoring::default(),
            embedder: String::new(),
        }
    }
}

/// `[questions]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuestionsSection {
    /// `builtin` (hand-written questions of the built-in prompts), `none`,
    /// or a TIFA-format JSON file (a list of objects with `caption`,
    /// `question`, `choices`, `answer`, `element_type`, `element`).
    pub source: String,
    /// `source = "llm"`: the question template file; empty: the built-in one.
    pub template: String,
    /// `source = "llm"`: calls per prompt, questions per call, sampling,
    /// seed, duplicate threshold, minimum questions, grounding rule.
    pub llm: agfsync_author::QuestionAuthoring,
}

impl Default for QuestionsSection {
    fn default() -> Self {
        Self {
            source: "builtin".into(),
            template: String::new(),
            llm: agfsync_author::QuestionAuthoring::default(),
        }
    }
}

/// `[generate]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateSection {
    /// Candidates per prompt (AGFSync: 8).
    pub candidates: usize,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale.
    pub guidance_scale: f64,
    /// Scheduler (`ddim`, `euler`, `euler_a`, `dpm++2m`, `dpm++2m_karras`,
    /// `lcm`); empty: the model's own.
    pub scheduler: String,
    /// Image width (0: the model's native size).
    pub width: usize,
    /// Image height (0: the model's native size).
    pub height: usize,
    /// Gaussian noise on the prompt embedding of candidates 1..N-1.
    pub embedding_noise: f64,
    /// Images per UNet batch (across prompts).
    pub batch_size: usize,
    /// Negative prompt (empty: none).
    pub negative_prompt: String,
}

impl Default for GenerateSection {
    fn default() -> Self {
        Self {
            candidates: 8,
            steps: 15,
            guidance_scale: 4.5,
            scheduler: String::new(),
            width: 0,
            height: 0,
            embedding_noise: 0.1,
            batch_size: 4,
            negative_prompt: String::new(),
        }
    }
}

/// `[score]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoreSection {
    /// Metrics to compute: `clip`, `aesthetic`, `vqa`.
    pub metrics: Vec<String>,
    /// Images per scoring batch.
    pub batch_size: usize,
}

impl Default for ScoreSection {
    fn default() -> Self {
        Self {
            metrics: vec!["clip".into(), "aesthetic".into()],
            batch_size: 8,
        }
    }
}

/// How metrics are put on one scale within a prompt's candidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Normalise {
    /// `(x - mean) / std` within the prompt (0 when all are equal).
    Zscore,
    /// `(x - min) / (max - min)` within the prompt (0 when all are equal).
    Minmax,
    /// Raw values, as AGFSync's public code summed them.
    Raw,
}

/// `[pairs]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PairsSection {
    /// Weight of each metric in the combined score.
    pub weights: std::collections::BTreeMap<String, f64>,
    /// Per-prompt normalisation before weighting.
    pub normalise: Normalise,
    /// Drop a prompt whose winner and loser differ by less than this (in
    /// combined-score units).
    pub min_gap: f64,
}

impl Default for PairsSection {
    fn default() -> Self {
        Self {
            weights: [("clip".to_string(), 0.85), ("aesthetic".to_string(), 0.15)]
                .into_iter()
                .collect(),
            normalise: Normalise::Zscore,
            min_gap: 0.0,
        }
    }
}

/// `[train]`: Diffusion-DPO (see `agfsync train --help` for each).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Run the training stage in `agfsync run`.
    pub enabled: bool,
    /// Optimizer steps.
    pub steps: usize,
    /// Learning rate.
    pub lr: f64,
    /// DPO beta.
    pub beta: f64,
    /// LoRA rank (ignored with `full`).
    pub lora_rank: usize,
    /// Train the whole UNet.
    pub full: bool,
    /// Pairs per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per step.
    pub grad_accum: usize,
    /// `constant`, `constant_with_warmup` or `cosine`.
    pub lr_scheduler: String,
    /// Warmup steps.
    pub warmup_steps: usize,
    /// Gradient-norm clip (0: off).
    pub max_grad_norm: f64,
    /// Checkpoint every N steps.
    pub checkpoint_every: usize,
    /// Recompute UNet activations in the backward pass (less memory, about
    /// a third more compute).
    pub gradient_checkpointing: bool,
    /// UNet compute precision: `f32`, `bf16` or `f16` (trained weights,
    /// gradients and optimizer state stay f32).
    pub dtype: String,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            enabled: true,
            steps: 1000,
            lr: 1e-5,
            beta: 5000.0,
            lora_rank: 4,
            full: false,
            batch_size: 1,
            grad_accum: 1,
            lr_scheduler: "constant".into(),
            warmup_steps: 0,
            max_grad_norm: 1.0,
            checkpoint_every: 250,
            gradient_checkpointing: false,
            dtype: "f32".into(),
        }
    }
}

impl RunConfig {
    /// Parses `agfsync.toml` text; errors name the key and line.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self> {
        let cfg: Self = toml::from_str(text).map_err(|e| PipelineError::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads a run's `agfsync.toml`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| PipelineError::io(path, e))?;
        Self::from_toml(&text, path)
    }

    /// Checks values serde cannot.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| {
            Err(PipelineError::Config {
                path: path.to_path_buf(),
                reason,
            })
        };
        let g = &self.generate;
        if g.candidates < 2 {
            return bad(format!(
                "generate.candidates = {}: a preference pair needs at least 2 candidates per prompt",
                g.candidates
            ));
        }
        if g.steps == 0 || g.batch_size == 0 || self.score.batch_size == 0 {
            return bad(
                "generate.steps, generate.batch_size and score.batch_size must be at least 1"
                    .into(),
            );
        }
        if !(0.0..=10.0).contains(&g.embedding_noise) {
            return bad(format!(
                "generate.embedding_noise = {} is outside 0..10 (AGFSync uses 0.1)",
                g.embedding_noise
            ));
        }
        for m in self.score.metrics.iter().chain(&self.eval.metrics) {
            if !["clip", "aesthetic", "vqa", "hps"].contains(&m.as_str()) {
                return bad(format!(
                    "score.metrics / eval.metrics: unknown metric `{m}` (choose from clip, \
                     aesthetic, vqa, hps)"
                ));
            }
            let needs = match m.as_str() {
                "clip" | "aesthetic" => ("clip", self.models.clip.is_some()),
                "vqa" => ("vqa", self.models.vqa.is_some()),
                _ => ("hps", self.models.hps.is_some()),
            };
            if !needs.1 {
                return bad(format!(
                    "the `{m}` metric needs models.{} to be set",
                    needs.0
                ));
            }
            if m == "aesthetic" && self.models.aesthetic.is_none() {
                return bad(
                    "the `aesthetic` metric needs models.aesthetic (the LAION head)".into(),
                );
            }
        }
        for (m, w) in &self.pairs.weights {
            if !self.score.metrics.contains(m) {
                return bad(format!(
                    "pairs.weights.{m} = {w}, but `{m}` is not in score.metrics {:?}",
                    self.score.metrics
                ));
            }
            if !w.is_finite() {
                return bad(format!("pairs.weights.{m} must be a finite number"));
            }
        }
        if self.pairs.weights.values().all(|w| *w == 0.0) {
            return bad("pairs.weights: every weight is zero, so no candidate can win".into());
        }
        if (self.prompts.source == "llm" || self.questions.source == "llm")
            && self.llm.is_none()
            && self.local_llm.is_none()
        {
            return bad(
                "prompts.source or questions.source is \"llm\" but there is neither an [llm] \
                 section (base_url, model, api_key_env) nor a [local_llm] one (model)"
                    .into(),
            );
        }
        if self.llm.is_some() && self.local_llm.is_some() {
            return bad("give [llm] (a server) or [local_llm] (in process), not both".into());
        }
        let l = &self.limits;
        if l.max_image_pixels == 0 || l.max_prompt_chars == 0 || l.max_input_file_bytes == 0 {
            return bad("limits.* must be at least 1".into());
        }
        if self.pairs.min_gap < 0.0 {
            return bad("pairs.min_gap must not be negative".into());
        }
        Ok(())
    }

    /// A fingerprint of everything that decides the data (models, prompts,
    /// generation, scoring): shards can be merged only when it matches.
    /// Device and dtype of inference and the training section are left out.
    pub fn data_fingerprint(&self) -> String {
        let v = serde_json::json!({
            "seed": self.run.seed,
            "models": self.models,
            "prompts": self.prompts,
            "questions": self.questions,
            "generate": self.generate,
            "metrics": self.score.metrics,
        });
        agfsync_store::prompt_id("config", &v.to_string())
    }
}

/// Resolves a model path of the config: relative paths are relative to the
/// run directory; anything else that does not exist is a hub id.
pub fn resolve_model_path(run_dir: &Path, spec: &str) -> String {
    let p = PathBuf::from(spec);
    if p.is_absolute() {
        return spec.to_string();
    }
    let local = run_dir.join(&p);
    if local.exists() || spec.starts_with("./") || spec.starts_with("models/") {
        local.display().to_string()
    } else {
        spec.to_string()
    }
}

/// The commented `agfsync.toml` that `agfsync init` writes for a preset.
pub fn template(preset: Preset) -> String {
    let text = template_text(preset);
    if preset == Preset::Tiny {
        // The tiny default exercises every metric and must finish in
        // minutes: evaluate 4 prompts.
        text.replace("limit = 0\nseed = 1000", "limit = 4\nseed = 1000")
            .replace(
                "metrics = [\"clip\", \"aesthetic\"]\nbatch_size",
                "metrics = [\"clip\", \"aesthetic\", \"vqa\"]\nbatch_size",
            )
            .replace(
                "weights = { clip = 0.85, aesthetic = 0.15 }",
                "weights = { clip = 0.4, aesthetic = 0.2, vqa = 0.4 }",
            )
            .replace(
                "metrics = [\"clip\", \"aesthetic\"]\nresamples",
                "metrics = [\"clip\", \"aesthetic\", \"vqa\", \"hps\"]\nresamples",
            )
    } else {
        text
    }
}

fn template_text(preset: Preset) -> String {
    let (models, generate, train, prompts) = match preset {
        Preset::Tiny => (
            "# Tiny random-weight models, written into models/ by `agfsync init`.\n\
             # Their images are noise by design: this preset tests the machinery.\n\
             diffusion = \"models/tiny-sd15\"\n\
             clip = \"models/tiny-clip\"\n\
             aesthetic = \"models/tiny-aesthetic.safetensors\"\n\
             vqa = \"models/tiny-llava\"\n\
             hps = \"models/tiny-hps/tiny-hps.safetensors\"\n",
            "candidates = 4\nsteps = 4\nguidance_scale = 4.5\nscheduler = \"ddim\"\n\
             width = 64\nheight = 64\nembedding_noise = 0.1\nbatch_size = 4\n",
            "enabled = true\nsteps = 4\nlr = 1e-4\nbeta = 5000.0\nlora_rank = 4\n\
             checkpoint_every = 2\n",
            "source = \"builtin\"\nlimit = 4\n",
        ),
        Preset::Sd15 => (
            "diffusion = \"stable-diffusion-v1-5/stable-diffusion-v1-5\"\n\
             clip = \"openai/clip-vit-large-patch14\"\n\
             # The LAION improved aesthetic predictor (download it yourself:\n\
             # sac+logos+ava1-l14-linearMSE.pth) put next to this file.\n\
             aesthetic = \"models/sac+logos+ava1-l14-linearMSE.pth\"\n\
             # vqa = \"llava-hf/llava-1.5-7b-hf\"\n\
             # hps = \"models/HPS_v2.1_compressed.pt\"\n",
            "candidates = 8\nsteps = 15\nguidance_scale = 4.5\nscheduler = \"\"\n\
             width = 512\nheight = 512\nembedding_noise = 0.1\nbatch_size = 8\n",
            "enabled = true\nsteps = 1000\nlr = 1e-5\nbeta = 5000.0\nlora_rank = 4\n\
             checkpoint_every = 250\n",
            "source = \"builtin\"\nlimit = 0\n",
        ),
        Preset::Sdxl => (
            "diffusion = \"stabilityai/stable-diffusion-xl-base-1.0\"\n\
             clip = \"openai/clip-vit-large-patch14\"\n\
             aesthetic = \"models/sac+logos+ava1-l14-linearMSE.pth\"\n\
             # vqa = \"llava-hf/llava-1.5-7b-hf\"\n\
             # hps = \"models/HPS_v2.1_compressed.pt\"\n",
            "candidates = 8\nsteps = 15\nguidance_scale = 4.5\nscheduler = \"\"\n\
             width = 1024\nheight = 1024\nembedding_noise = 0.1\nbatch_size = 2\n",
            "enabled = true\nsteps = 1000\nlr = 1e-6\nbeta = 5000.0\nlora_rank = 4\n\
             lr_scheduler = \"cosine\"\ngrad_accum = 4\ncheckpoint_every = 250\n",
            "source = \"builtin\"\nlimit = 0\n",
        ),
    };
    format!(
        "# agfsync run configuration (AGFSync: An et al., AAAI 2025).\n\
         # Every key is documented; unknown keys are errors. Stages read this file\n\
         # each time they run, but prompts, candidates and scores already in the\n\
         # store are not redone: start a new run to change generation settings.\n\
         \n\
         # To author prompts and questions with an LLM, add:\n\
         # [llm]\n\
         # base_url = \"http://localhost:8000/v1\"   # any OpenAI-compatible server\n\
         # model = \"Qwen/Qwen2.5-7B-Instruct\"\n\
         # api_key_env = \"OPENAI_API_KEY\"         # the variable's name, not the key\n\
         # structured_output = true\n\
         \n\
         [run]\n\
         # Master seed: each candidate's seeds derive from it and the prompt.\n\
         seed = 0\n\
         # cpu, cuda or cuda:N; f32, f16 or bf16.\n\
         device = \"cpu\"\n\
         dtype = \"f32\"\n\
         \n\
         [models]\n\
         # Paths are relative to this directory; anything else is a hub id.\n\
         {models}\
         \n\
         [prompts]\n\
         # builtin (one prompt per AGFSync category), llm (authored by the [llm]\n\
         # server; settings in [prompts.llm]), or a .txt (one a line),\n\
         # .jsonl ({{\"prompt\": .., \"category\": ..}}) or .csv (prompt[,category]) file.\n\
         {prompts}\
         # embedder = \"BAAI/bge-large-en-v1.5\"   # near duplicates of authored prompts\n\
         \n\
         [questions]\n\
         # builtin (questions of the built-in prompts), llm ([questions.llm]), none,\n\
         # or a TIFA JSON file.\n\
         source = \"builtin\"\n\
         \n\
         [generate]\n\
         # N candidates per prompt; candidate 0 uses the clean prompt embedding,\n\
         # 1..N-1 add embedding_noise * N(0, I) to it (AGFSync section 3).\n\
         # scheduler: ddim, euler, euler_a, dpm++2m, dpm++2m_karras, lcm, or \"\" for\n\
         # the model's own. width/height 0: the model's native size.\n\
         {generate}\
         negative_prompt = \"\"\n\
         \n\
         [score]\n\
         # clip, aesthetic, vqa (vqa needs models.vqa and questions), hps.\n\
         metrics = [\"clip\", \"aesthetic\"]\n\
         batch_size = 8\n\
         \n\
         [pairs]\n\
         # Combined score = sum of weight * normalised metric, per prompt.\n\
         # normalise: zscore, minmax or raw (AGFSync's public code summed raw scores).\n\
         weights = {{ clip = 0.85, aesthetic = 0.15 }}\n\
         normalise = \"zscore\"\n\
         # Drop a prompt whose winner and loser differ by less than this.\n\
         min_gap = 0.0\n\
         \n\
         [train]\n\
         # Diffusion-DPO on the pairs (LoRA unless full = true); see `agfsync train --help`.\n\
         {train}\
         \n\
         [eval]\n\
         # Base against tuned (the training's LoRA), same prompts and seeds.\n\
         # benchmark: builtin, a prompt file, tifa:PATH or hps:PATH.\n\
         benchmark = \"builtin\"\n\
         limit = 0\n\
         seed = 1000\n\
         metrics = [\"clip\", \"aesthetic\"]\n\
         resamples = 2000\n\
         # base, tuned (this run's LoRA) or NAME=PATH (a LoRA file or a pipeline folder).\n\
         models = [\"base\", \"tuned\"]\n\
         enabled = true\n\
         \n\
         # [limits]\n\
         # Outside input beyond these is refused (raise them for trusted files).\n\
         # max_image_pixels = 178956970\n\
         # max_prompt_chars = 4000\n\
         # max_input_file_bytes = 268435456\n"
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn every_template_parses_and_validates() {
        for p in [Preset::Tiny, Preset::Sd15, Preset::Sdxl] {
            let cfg = RunConfig::from_toml(&template(p), Path::new("agfsync.toml"));
            assert!(cfg.is_ok(), "{p:?}: {cfg:?}");
        }
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = template(Preset::Tiny).replace("min_gap = 0.0", "min_gap = 0.0\nmin_gapp = 1");
        let err = RunConfig::from_toml(&text, Path::new("run/agfsync.toml"))
            .expect_err("a misspelt key must be refused")
            .to_string();
        assert!(err.contains("min_gapp"), "{err}");
        assert!(err.contains("run/agfsync.toml"), "{err}");
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let text = template(Preset::Tiny).replace("candidates = 4", "candidates = \"four\"");
        let err = RunConfig::from_toml(&text, Path::new("agfsync.toml"))
            .expect_err("a string for an integer must be refused")
            .to_string();
        assert!(
            err.contains("candidates") || err.contains("integer"),
            "{err}"
        );
    }

    #[test]
    fn weights_must_name_scored_metrics() {
        let text = template(Preset::Tiny).replace("clip = 0.4,", "clip = 0.4, hps = 1.0,");
        let err = RunConfig::from_toml(&text, Path::new("agfsync.toml"))
            .expect_err("a weight on an unscored metric must be refused")
            .to_string();
        assert!(err.contains("pairs.weights.hps"), "{err}");
    }

    #[test]
    fn fingerprint_ignores_device_but_not_seed() {
        let a = RunConfig::from_toml(&template(Preset::Tiny), Path::new("x")).unwrap();
        let mut b = a.clone();
        b.run.device = "cuda".into();
        assert_eq!(a.data_fingerprint(), b.data_fingerprint());
        b.run.seed = 1;
        assert_ne!(a.data_fingerprint(), b.data_fingerprint());
    }
}
