//! CLIP score (Hessel et al., "CLIPScore: A Reference-free Evaluation
//! Metric for Image Captioning", 2021, in torchmetrics' form): the agreement
//! of an image with its prompt.
//!
//! `score = max(100 * cos(image_embeds, text_embeds), 0)` with the projected,
//! L2-normalised CLIP features (AGFSync section 4; the AGFSync code used
//! `logit_scale.exp() * cos` unclamped, which equals `100 * cos` for OpenAI's
//! models but is not clamped). Prompts over 77 tokens are truncated by
//! tokens, keeping the end-of-text token (torchmetrics cuts the token ids
//! after tokenising, which drops it). The raw cosine is kept in
//! `details["cos"]`.

use std::sync::{Arc, Mutex};

use candle_core::Tensor;

use crate::clip::ClipModel;
use crate::error::{FeedbackError, Result};
use crate::image_input::LoadedImage;
use crate::scorer::{l2_normalise, BatchCache, ImageOutcome, ScoreRequest, ScoreResult, Scorer};

/// Version of the CLIP score computation; bump when the formula changes.
pub const CLIP_SCORE_VERSION: &str = "clip-score/1 max(100*cos,0)";

/// The CLIP score metric.
#[derive(Debug)]
pub struct ClipScorer {
    model: Arc<ClipModel>,
    version: String,
    batch_size: usize,
    /// The last prompt's normalised embedding (a batch shares one prompt).
    last_prompt: Mutex<Option<(String, Tensor, bool)>>,
}

impl ClipScorer {
    /// A scorer on `model` (share the `Arc` with an aesthetic scorer to
    /// encode each image once).
    pub fn new(model: Arc<ClipModel>) -> Self {
        let version = format!(
            "{CLIP_SCORE_VERSION}; model={}; preprocess=transformers-{}",
            model.identity(),
            model.processor().backend().name()
        );
        Self {
            model,
            version,
            batch_size: 8,
            last_prompt: Mutex::new(None),
        }
    }

    /// Sets the preferred batch size.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// The CLIP model.
    pub fn model(&self) -> &Arc<ClipModel> {
        &self.model
    }

    /// The prompt's normalised text embedding (`[1, dim]`) and whether it
    /// was truncated.
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
        let enc = self.model.encode_texts(&[prompt])?;
        let t = l2_normalise(&enc.embeds.to_device(&candle_core::Device::Cpu)?)?;
        let tr = enc.truncated.first().copied().unwrap_or(false);
        *guard = Some((prompt.to_string(), t.clone(), tr));
        Ok((t, tr))
    }

    /// `100 * cos` between each image and each prompt, unclamped:
    /// `[images, prompts]` (f32). For evaluation tables and tests.
    pub fn cosine_matrix(&self, images: &[&LoadedImage], prompts: &[&str]) -> Result<Tensor> {
        let rows = self.model.encode_images(images, None)?;
        let mut feats = Vec::with_capacity(rows.len());
        for (r, img) in rows.into_iter().zip(images) {
            feats.push(r.map_err(|reason| FeedbackError::Image {
                path: img.path.clone(),
                reason,
            })?);
        }
        let img = l2_normalise(&Tensor::stack(&feats, 0)?)?;
        let txt = l2_normalise(
            &self
                .model
                .encode_texts(prompts)?
                .embeds
                .to_device(img.device())?,
        )?;
        Ok(img.matmul(&txt.t()?)?)
    }
}

impl Scorer for ClipScorer {
    fn name(&self) -> &str {
        "clip"
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
        cache: &mut BatchCache,
    ) -> Result<Vec<ImageOutcome>> {
        let (text, truncated) = self.prompt_embedding(request.prompt)?;
        let text = text.squeeze(0)?;
        let rows = self.model.encode_images(images, Some(cache))?;
        let mut out = Vec::with_capacity(images.len());
        for (row, img) in rows.into_iter().zip(images) {
            let emb = match row {
                Ok(e) => e,
                Err(reason) => {
                    out.push(Err(FeedbackError::Image {
                        path: img.path.clone(),
                        reason,
                    }));
                    continue;
                }
            };
            let e = l2_normalise(&emb.unsqueeze(0)?)?.squeeze(0)?;
            let cos = f64::from((e * &text)?.sum_all()?.to_scalar::<f32>()?);
            let mut result = ScoreResult {
                metric: "clip".into(),
                value: (100.0 * cos).max(0.0),
                version: self.version.clone(),
                details: [("cos".to_string(), cos)].into_iter().collect(),
                notes: Vec::new(),
            };
            if truncated {
                result
                    .notes
                    .push("prompt truncated to the 77-token CLIP window".into());
            }
            out.push(Ok(result));
        }
        Ok(out)
    }
}
