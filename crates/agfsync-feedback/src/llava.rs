//! LLaVA-1.5 (Liu et al., "Improved Baselines with Visual Instruction
//! Tuning", 2023), the VLM of the VQA score, loaded from a transformers
//! `LlavaForConditionalGeneration` folder (llava-hf/llava-1.5-7b-hf,
//! -13b-hf): `config.json`, `model.safetensors` (or a sharded index),
//! `tokenizer.json` and `preprocessor_config.json`.
//!
//! Reference: transformers 5.24 `models/llava/modeling_llava.py`
//! (`LlavaModel.get_image_features`, `LlavaMultiModalProjector`) and
//! `processing_llava.py` (the `<image>` expansion). The network is the CLIP
//! vision tower ([`crate::clip_vision`], read at `vision_feature_layer`,
//! -2 by default, without running later layers), the class token dropped
//! (`vision_feature_select_strategy` `default`; `full` keeps it), the
//! projector `linear_2(gelu(linear_1(x)))`, and the Llama decoder
//! ([`agfsync_models::llama`]) reading the text embeddings with the
//! projected patches in place of the `<image>` tokens.
//!
//! Two key layouts load: transformers 5's module names
//! (`model.vision_tower.vision_model.*`, `model.multi_modal_projector.*`,
//! `model.language_model.*`, `lm_head.*`), and the legacy names of the hub
//! checkpoints (`vision_tower.vision_model.*`, `multi_modal_projector.*`,
//! `language_model.model.*`, `language_model.lm_head.*`), which
//! transformers 5.24's `save_pretrained` still writes (with the vision
//! tower's `vision_model.` level dropped: `vision_tower.embeddings.*`).
//!
//! The prompt is llava-hf's template, `USER: <image>\n{text} ASSISTANT:`
//! ([`LLAVA15_TEMPLATE`]): a fixed, documented constant rather than the
//! Jinja chat template in `chat_template.json`, whose rendering for one user
//! turn with one image is this string; callers can pass another template.
//! Images are preprocessed by [`ClipImageProcessor`] from the folder's
//! `preprocessor_config.json` (llava-hf uses CLIPImageProcessor: resize the
//! shortest edge to 336, centre-crop 336x336; no padding to square).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use agfsync_models::hub::{find_weights, ModelSource};
use agfsync_models::llama::{CausalLm, KvCache, LlamaConfig, LmInput, LogitsAt};
use agfsync_models::nn::{Activation, Linear, Pass};
use agfsync_models::weights::{open_safetensors, save_safetensors, RandomWeights};

use crate::clip::model_identity;
use crate::clip_vision::{ClipVisionConfig, ClipVisionModel};
use crate::error::{FeedbackError, Result};
use crate::image_input::LoadedImage;
use crate::preprocess::{ClipImageProcessor, ImageProcessorConfig, ResizeBackend, ResizeTarget};

/// llava-hf's prompt for one user turn with one image; `{text}` is replaced
/// by the question.
pub const LLAVA15_TEMPLATE: &str = "USER: <image>\n{text} ASSISTANT:";

/// Which vision tokens reach the projector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureSelect {
    /// Drop the class token (`default`; LLaVA-1.5).
    Default,
    /// Keep every token (`full`).
    Full,
}

/// A transformers `LlavaConfig`.
#[derive(Clone, Debug, PartialEq)]
pub struct LlavaConfig {
    /// The CLIP vision tower.
    pub vision_config: ClipVisionConfig,
    /// The language model.
    pub text_config: LlamaConfig,
    /// The id of the `<image>` placeholder token.
    pub image_token_index: u32,
    /// Vision hidden states read (transformers' indices into
    /// `hidden_states`, negative from the end); several are concatenated.
    pub vision_feature_layer: Vec<i64>,
    /// Whether the class token is dropped.
    pub vision_feature_select_strategy: FeatureSelect,
    /// The projector's activation (`gelu`).
    pub projector_hidden_act: String,
    /// Whether the projector's linears have biases.
    pub multimodal_projector_bias: bool,
}

impl LlavaConfig {
    /// Parses a `LlavaForConditionalGeneration` config.json. Fields missing
    /// from `vision_config` take LlavaConfig's defaults (CLIP ViT-L/14 at
    /// 336 px), as transformers does.
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        if model_type != "llava" {
            return Err(format!(
                "model_type is `{model_type}`, not `llava`: agfsync's VQA score runs \
                 LlavaForConditionalGeneration checkpoints (llava-hf/llava-1.5-7b-hf)"
            ));
        }
        let mut vision = json!({
            "hidden_size": 1024, "intermediate_size": 4096, "patch_size": 14,
            "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16,
            "projection_dim": 768
        });
        if let (Some(dst), Some(src)) = (
            vision.as_object_mut(),
            v.get("vision_config").and_then(Value::as_object),
        ) {
            if let Some(t) = src.get("model_type").and_then(Value::as_str) {
                if t != "clip_vision_model" {
                    return Err(format!(
                        "vision_config.model_type is `{t}`: only CLIP vision towers \
                         (clip_vision_model) are supported"
                    ));
                }
            }
            for (k, x) in src {
                dst.insert(k.clone(), x.clone());
            }
        }
        let vision_config: ClipVisionConfig =
            serde_json::from_value(vision).map_err(|e| format!("vision_config: {e}"))?;
        let text_config = LlamaConfig::from_value(v.get("text_config").unwrap_or(&json!({})))
            .map_err(|e| format!("text_config: {e}"))?;
        let image_token_index = v
            .get("image_token_index")
            .or_else(|| v.get("image_token_id"))
            .map(|x| {
                x.as_u64()
                    .map(|n| n as u32)
                    .ok_or_else(|| format!("`image_token_index` must be an integer, got {x}"))
            })
            .transpose()?
            .unwrap_or(32_000);
        let vision_feature_layer = match v.get("vision_feature_layer") {
            None | Some(Value::Null) => vec![-2],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_i64().ok_or_else(|| {
                        format!("`vision_feature_layer` entry {x} is not an integer")
                    })
                })
                .collect::<std::result::Result<Vec<_>, _>>()?,
            Some(x) => vec![x
                .as_i64()
                .ok_or_else(|| format!("`vision_feature_layer` must be an integer, got {x}"))?],
        };
        let vision_feature_select_strategy = match v
            .get("vision_feature_select_strategy")
            .and_then(Value::as_str)
            .unwrap_or("default")
        {
            "default" => FeatureSelect::Default,
            "full" => FeatureSelect::Full,
            other => {
                return Err(format!(
                    "vision_feature_select_strategy `{other}` is not `default` or `full`"
                ))
            }
        };
        Ok(Self {
            vision_config,
            text_config,
            image_token_index,
            vision_feature_layer,
            vision_feature_select_strategy,
            projector_hidden_act: v
                .get("projector_hidden_act")
                .and_then(Value::as_str)
                .unwrap_or("gelu")
                .to_string(),
            multimodal_projector_bias: v
                .get("multimodal_projector_bias")
                .and_then(Value::as_bool)
                .unwrap_or(true),
        })
    }

    /// Image tokens per image: patches, plus the class token with `full`.
    pub fn image_tokens(&self) -> usize {
        let g = self.vision_config.grid();
        g * g + usize::from(self.vision_feature_select_strategy == FeatureSelect::Full)
    }

    /// The vision hidden-state indices (0 = embeddings, k = after layer k).
    fn feature_indices(&self) -> std::result::Result<Vec<usize>, String> {
        let n = self.vision_config.num_hidden_layers as i64;
        self.vision_feature_layer
            .iter()
            .map(|&l| {
                let i = if l < 0 { n + 1 + l } else { l };
                if (0..=n).contains(&i) {
                    Ok(i as usize)
                } else {
                    Err(format!(
                        "vision_feature_layer {l} is outside a {n}-layer vision tower"
                    ))
                }
            })
            .collect()
    }
}

/// How to load a [`Llava`].
#[derive(Clone, Debug)]
pub struct LlavaLoadOptions {
    /// Compute dtype (F32 reproduces the references; F16/BF16 on GPUs).
    pub dtype: DType,
    /// Where the model runs.
    pub device: Device,
    /// Which transformers image-processor backend to reproduce.
    pub resize_backend: ResizeBackend,
}

impl Default for LlavaLoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            resize_backend: ResizeBackend::Pil,
        }
    }
}

/// A prompt tokenised around its one image: the ids before `<image>`, and
/// the ids after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptIds {
    /// Ids before the image (`<s> USER :` for llava-hf).
    pub before: Vec<u32>,
    /// Ids after the image.
    pub after: Vec<u32>,
}

/// LLaVA-1.5 with its tokenizer and image processor.
#[derive(Debug)]
pub struct Llava {
    config: LlavaConfig,
    vision: ClipVisionModel,
    feature_indices: Vec<usize>,
    linear_1: Linear,
    act: Activation,
    linear_2: Linear,
    lm: CausalLm,
    tokenizer: Tokenizer,
    processor: ClipImageProcessor,
    identity: String,
    device: Device,
}

/// Splits the weights into vision tower, projector, LM body and LM head.
/// Checkpoints name them either as transformers 5's modules do
/// (`model.vision_tower.*`, `model.multi_modal_projector.*`,
/// `model.language_model.*`, `lm_head.*`) or in the legacy layout that the
/// hub's llava-hf files use and transformers 5's `save_pretrained` still
/// writes (`vision_tower.*`, `multi_modal_projector.*`,
/// `language_model.model.*`, `language_model.lm_head.*`). The vision tower
/// itself may or may not have a `vision_model.` level ([`ClipVisionModel`]
/// accepts both). Weights that hold neither (random weights being made)
/// get the legacy names, which every transformers version loads.
fn split_layout(vb: &VarBuilder<'static>) -> [VarBuilder<'static>; 4] {
    if vb.contains_tensor("model.language_model.embed_tokens.weight") {
        [
            vb.pp("model.vision_tower"),
            vb.pp("model.multi_modal_projector"),
            vb.pp("model.language_model"),
            vb.pp("lm_head"),
        ]
    } else {
        [
            vb.pp("vision_tower"),
            vb.pp("multi_modal_projector"),
            vb.pp("language_model.model"),
            vb.pp("language_model.lm_head"),
        ]
    }
}

impl Llava {
    /// Loads a llava-hf folder or hub repo.
    pub fn load(src: &ModelSource, options: &LlavaLoadOptions) -> Result<Self> {
        let config_path = src.file("config.json")?;
        let text = std::fs::read_to_string(&config_path).map_err(|source| FeedbackError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config = LlavaConfig::from_json(&text).map_err(|reason| FeedbackError::Config {
            path: config_path.clone(),
            what: "LLaVA config (LlavaForConditionalGeneration)",
            reason,
        })?;
        let tokenizer_path = src.optional_file("tokenizer.json")?.ok_or_else(|| {
            FeedbackError::Invalid(format!(
                "{} has no tokenizer.json, which the VQA model needs: save the processor \
                 next to the weights with transformers (AutoProcessor.from_pretrained(...)\
                 .save_pretrained(DIR))",
                src.describe("")
            ))
        })?;
        let tokenizer = load_tokenizer(&tokenizer_path)?;
        let processor_path = src
            .optional_file("preprocessor_config.json")?
            .ok_or_else(|| {
                FeedbackError::Invalid(format!(
                    "{} has no preprocessor_config.json: the VQA model needs its image \
                 processor (save it with AutoProcessor.from_pretrained(...).save_pretrained(DIR))",
                    src.describe("")
                ))
            })?;
        // LlavaImageProcessor can pad to a square before resizing; that is
        // not reproduced, so refuse it rather than score different pixels.
        let raw = crate::error::read_json_value(&processor_path, "image processor config")?;
        if raw.get("do_pad").and_then(Value::as_bool) == Some(true) {
            return Err(FeedbackError::Config {
                path: processor_path,
                what: "image processor config for LLaVA-1.5",
                reason: "`do_pad: true` (pad to square, LlavaImageProcessor) is not implemented; \
                         llava-hf's LLaVA-1.5 checkpoints use CLIPImageProcessor without padding"
                    .into(),
            });
        }
        let processor = ClipImageProcessor::from_file(&processor_path, options.resize_backend)?;
        let files = find_weights(src, "", "model", None)?;
        let vb = open_safetensors(&files, options.dtype, &options.device)?;
        let identity = model_identity(src, &files);
        Self::from_parts(config, vb, tokenizer, processor, identity).map_err(|e| match e {
            FeedbackError::Candle(source) => {
                FeedbackError::Model(agfsync_models::ModelError::Build {
                    component: "LLaVA model".into(),
                    dir: src.root().to_path_buf(),
                    source,
                })
            }
            other => other,
        })
    }

    /// Builds a model from a config and weights (either key layout), with
    /// its tokenizer and image processor; checks that they fit together.
    pub fn from_parts(
        config: LlavaConfig,
        vb: VarBuilder<'static>,
        tokenizer: Tokenizer,
        processor: ClipImageProcessor,
        identity: impl Into<String>,
    ) -> Result<Self> {
        let feature_indices = config.feature_indices().map_err(FeedbackError::Invalid)?;
        let act = Activation::from_name(&config.projector_hidden_act).ok_or_else(|| {
            FeedbackError::Invalid(format!(
                "unknown projector_hidden_act `{}`",
                config.projector_hidden_act
            ))
        })?;
        let n = config.vision_config.image_size;
        if !processor.config().do_center_crop || processor.config().crop_size != (n, n) {
            return Err(FeedbackError::Invalid(format!(
                "the image processor must centre-crop to the vision tower's {n}x{n} input \
                 (do_center_crop {}, crop_size {:?}): preprocessor_config.json does not \
                 belong to this model",
                processor.config().do_center_crop,
                processor.config().crop_size
            )));
        }
        let [vision_vb, proj_vb, body_vb, head_vb] = split_layout(&vb);
        let vision = ClipVisionModel::new(&config.vision_config, None, vision_vb)?;
        let vision_width = config.vision_config.hidden_size * feature_indices.len();
        let text_width = config.text_config.hidden_size;
        let bias = config.multimodal_projector_bias;
        let linear_1 = Linear::new(vision_width, text_width, bias, proj_vb.pp("linear_1"))?;
        let linear_2 = Linear::new(text_width, text_width, bias, proj_vb.pp("linear_2"))?;
        let lm = CausalLm::new(&config.text_config, body_vb, head_vb)?;
        let image_token = tokenizer.id_to_token(config.image_token_index);
        if image_token.as_deref() != Some("<image>") {
            return Err(FeedbackError::Invalid(format!(
                "image_token_index {} is {:?} in the tokenizer, not `<image>`: tokenizer.json \
                 and config.json do not belong together",
                config.image_token_index, image_token
            )));
        }
        Ok(Self {
            config,
            vision,
            feature_indices,
            linear_1,
            act,
            linear_2,
            lm,
            tokenizer,
            processor,
            identity: identity.into(),
            device: vb.device().clone(),
        })
    }

    /// The config.
    pub fn config(&self) -> &LlavaConfig {
        &self.config
    }

    /// The language model.
    pub fn lm(&self) -> &CausalLm {
        &self.lm
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The image processor.
    pub fn processor(&self) -> &ClipImageProcessor {
        &self.processor
    }

    /// `repo@commit` for hub models, else folder name and weights fingerprint.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Image tokens per image (576 for 336 px and patch 14).
    pub fn image_tokens(&self) -> usize {
        self.config.image_tokens()
    }

    /// `get_image_features`: projected image features
    /// (`[b, image_tokens, text_hidden]`) of `pixel_values` (`[b, 3, s, s]`).
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let pass = Pass::INFERENCE;
        let pv = pixel_values.to_device(&self.device)?;
        let mut states = Vec::with_capacity(self.feature_indices.len());
        for &i in &self.feature_indices {
            let h = self.vision.hidden_state(&pv, i, pass)?;
            let h = match self.config.vision_feature_select_strategy {
                FeatureSelect::Default => {
                    let n = h.dim(1)?;
                    h.narrow(1, 1, n - 1)?
                }
                FeatureSelect::Full => h,
            };
            states.push(h);
        }
        let x = if states.len() == 1 {
            states.remove(0)
        } else {
            Tensor::cat(&states, 2)?
        };
        let x = self.linear_1.forward(&x, pass)?;
        let x = self.act.forward(&x)?;
        Ok(self.linear_2.forward(&x, pass)?)
    }

    /// Preprocesses one image and returns its projected features
    /// (`[image_tokens, text_hidden]`).
    pub fn encode_image(&self, image: &LoadedImage) -> Result<Tensor> {
        let (px, (h, w)) = self.processor.pixel_values(image)?;
        let pv = Tensor::from_vec(px, (1, 3, h, w), &self.device)?;
        Ok(self.image_features(&pv)?.squeeze(0)?)
    }

    /// Tokenises `text` (special tokens added, as the processor does) and
    /// returns its ids, `<image>` unexpanded.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| FeedbackError::Invalid(format!("cannot tokenise {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Tokenises a prompt holding exactly one `<image>` and splits it there.
    pub fn encode_prompt(&self, prompt: &str) -> Result<PromptIds> {
        let ids = self.encode_text(prompt)?;
        let img = self.config.image_token_index;
        let at: Vec<usize> = ids
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == img)
            .map(|(i, _)| i)
            .collect();
        match at.as_slice() {
            [i] => Ok(PromptIds {
                before: ids[..*i].to_vec(),
                after: ids[i + 1..].to_vec(),
            }),
            _ => Err(FeedbackError::Invalid(format!(
                "a VQA prompt must hold exactly one `<image>`, {prompt:?} holds {}",
                at.len()
            ))),
        }
    }

    /// The ids transformers' processor feeds the model: `<image>` repeated
    /// once per image token.
    pub fn expanded_ids(&self, prompt: &PromptIds) -> Vec<u32> {
        let mut out = prompt.before.clone();
        out.extend(std::iter::repeat_n(
            self.config.image_token_index,
            self.image_tokens(),
        ));
        out.extend_from_slice(&prompt.after);
        out
    }

    /// Runs the shared part of every prompt about one image (the ids before
    /// the image, then the image features `[image_tokens, hidden]`) into a
    /// one-row cache; continue it with [`KvCache::repeat_rows`].
    pub fn prefix_cache(&self, before: &[u32], features: &Tensor) -> Result<KvCache> {
        let feats = features
            .to_device(&self.device)?
            .to_dtype(self.lm.dtype())?;
        let embeds = if before.is_empty() {
            feats.unsqueeze(0)?
        } else {
            let ids = Tensor::from_vec(before.to_vec(), (1, before.len()), &self.device)?;
            let text = self.lm.embed(&ids)?;
            Tensor::cat(&[&text, &feats.unsqueeze(0)?], 1)?
        };
        let mut cache = KvCache::new();
        self.lm.forward(
            LmInput::Embeds(&embeds),
            None,
            &mut cache,
            LogitsAt::Nothing,
        )?;
        Ok(cache)
    }

    /// The ids that count as the answer `word` (`yes` or `no`): every
    /// token that is the first token of `Word`, `word`, ` Word` or ` word`
    /// and decodes, trimmed and lower-cased, to exactly `word`.
    pub fn answer_token_ids(&self, word: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let cap = capitalise(word);
        for v in [
            cap.clone(),
            word.to_string(),
            format!(" {cap}"),
            format!(" {word}"),
        ] {
            let Ok(enc) = self.tokenizer.encode(v.as_str(), false) else {
                continue;
            };
            let Some(&first) = enc.get_ids().first() else {
                continue;
            };
            let decoded = self.tokenizer.decode(&[first], false).unwrap_or_default();
            if decoded.trim().to_lowercase() == word && !out.contains(&first) {
                out.push(first);
            }
        }
        out.sort_unstable();
        out
    }

    /// Decodes generated ids (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }
}

fn capitalise(word: &str) -> String {
    let mut c = word.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Reads a `tokenizer.json`, naming the file on failure.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path).map_err(|e| FeedbackError::Config {
        path: path.to_path_buf(),
        what: "tokenizer (tokenizer.json)",
        reason: e.to_string(),
    })
}

/// The words of [`write_tiny_llava`]'s tokenizer: the template, the VQA
/// prompts and a few content words.
const TINY_WORDS: &str =
    "USER ASSISTANT : Question Choices Answer [ ] ' , yes no Yes No Does this \
     figure show \" ? Please answer or a an the is there are of in on red blue green cube sphere \
     cat dog What How many color one two three Is . photo image";

/// The word-level `tokenizer.json` of the tiny LLaVA: whitespace split,
/// punctuation isolated, `<s>` prepended, `<image>` an added special token
/// (the same construction as tools/parity/make_vqa_fixtures.py).
pub fn tiny_tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    for w in ["<unk>", "<s>", "</s>", "<pad>"]
        .into_iter()
        .chain(TINY_WORDS.split_whitespace())
    {
        if !vocab.contains_key(w) {
            let id = vocab.len();
            vocab.insert(w.to_string(), json!(id));
        }
    }
    let image_id = vocab.len();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{
            "id": image_id, "content": "<image>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }],
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "WhitespaceSplit"},
            {"type": "Punctuation", "behavior": "Isolated"}
        ]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}
            ],
            "pair": [
                {"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}}
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

/// Writes a tiny random LLaVA-1.5 folder in the transformers layout
/// (config.json, model.safetensors, tokenizer.json,
/// preprocessor_config.json): CLIP tower 28 px / patch 7 (16 image
/// tokens), 2-layer Llama LM with grouped-query attention, a word-level
/// tokenizer that knows `Yes`/`yes`/`No`/`no` and the template words. Runs
/// offline in well under a second; the same `seed` writes the same files.
pub fn write_tiny_llava(dir: &Path, seed: u64) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FeedbackError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tok_json = tiny_tokenizer_json();
    let vocab_size = tok_json["model"]["vocab"]
        .as_object()
        .map_or(0, serde_json::Map::len)
        + 1;
    let image_id = vocab_size - 1;
    let config = json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": image_id,
        "image_seq_length": 16,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": true,
        "tie_word_embeddings": false,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "text_config": {
            "model_type": "llama", "vocab_size": vocab_size, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 3, "tie_word_embeddings": false,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": 28, "patch_size": 7,
            "hidden_act": "quick_gelu", "projection_dim": 16, "layer_norm_eps": 1e-5
        }
    });
    let processor = json!({
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": true, "size": {"shortest_edge": 28}, "resample": 3,
        "do_center_crop": true, "crop_size": {"height": 28, "width": 28},
        "do_rescale": true, "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": true
    });
    let write_json = |name: &str, v: &Value| -> Result<()> {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(v)
            .map_err(|e| FeedbackError::Invalid(format!("serialising {name}: {e}")))?;
        std::fs::write(&path, text + "\n").map_err(io(&path))
    };
    write_json("config.json", &config)?;
    write_json("tokenizer.json", &tok_json)?;
    write_json("preprocessor_config.json", &processor)?;
    let cfg = LlavaConfig::from_json(&config.to_string())
        .map_err(|e| FeedbackError::Invalid(format!("tiny LLaVA config: {e}")))?;
    let tokenizer = load_tokenizer(&dir.join("tokenizer.json"))?;
    let proc_cfg = ImageProcessorConfig {
        size: ResizeTarget::ShortestEdge(28),
        crop_size: (28, 28),
        ..ImageProcessorConfig::default()
    };
    let processor = ClipImageProcessor::new(proc_cfg, ResizeBackend::Pil)?;
    let weights = RandomWeights::new(seed);
    Llava::from_parts(
        cfg,
        weights.var_builder(DType::F32, &Device::Cpu),
        tokenizer,
        processor,
        "tiny",
    )?;
    let tensors: std::collections::HashMap<String, Tensor> = weights.tensors();
    save_safetensors(&tensors, &dir.join("model.safetensors"))?;
    Ok(())
}
