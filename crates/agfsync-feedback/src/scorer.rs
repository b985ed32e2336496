//! The interface every metric implements (CLIP score, aesthetic score,
//! VQA score, HPSv2), and what a score records.
//!
//! A [`Scorer`] is built once (its models loaded once) and then called with
//! batches of decoded images that share one prompt. It returns one outcome
//! per image, so one image that cannot be scored does not sink its batch.
//! Every [`ScoreResult`] carries the scorer's version string: the method,
//! the model identity (hub commit or local fingerprint) and the
//! preprocessing, so stored scores say exactly how they were made.
//!
//! How the metrics still to come fit: the VQA scorer reads
//! [`ScoreRequest::questions`] and reports the AGFSync score
//! (`100 * yes / questions`) as the value, with the mean P(yes), VQAScore
//! and per-question answers in `details`/`notes`; HPSv2 is a CLIP-like
//! scorer on OpenCLIP ViT-H/14 whose version string names the v2.0 or v2.1
//! checkpoint. Scorers that share a backbone share image features through
//! [`BatchCache`].

use std::collections::{BTreeMap, HashMap};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{FeedbackError, Result};
use crate::image_input::LoadedImage;

/// A TIFA-style question about an image (AGFSync section 2). Only the VQA
/// scorer reads questions; field names are TIFA's.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Question {
    /// The question text.
    pub question: String,
    /// Answer choices (`["yes", "no"]` for yes/no questions; more for
    /// TIFA's multiple-choice questions).
    #[serde(default)]
    pub choices: Vec<String>,
    /// The answer the prompt implies, when known.
    #[serde(default)]
    pub answer: Option<String>,
    /// TIFA element type (object, attribute, counting, ...).
    #[serde(default)]
    pub element_type: Option<String>,
    /// The element the question is about.
    #[serde(default)]
    pub element: Option<String>,
}

/// What a batch of images is scored against.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScoreRequest<'a> {
    /// The prompt the images were generated from.
    pub prompt: &'a str,
    /// Questions about the prompt (VQA); empty for the other metrics.
    pub questions: &'a [Question],
}

impl<'a> ScoreRequest<'a> {
    /// A request with a prompt and no questions.
    pub fn prompt(prompt: &'a str) -> Self {
        Self {
            prompt,
            questions: &[],
        }
    }
}

/// One metric's score of one image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoreResult {
    /// The metric (`clip`, `aesthetic`, `vqa`, `hps`).
    pub metric: String,
    /// The headline value (CLIP score on 0..100, aesthetic about 1..10).
    pub value: f64,
    /// How the value was made: method, model identity, preprocessing.
    pub version: String,
    /// Secondary values (for example the raw cosine).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, f64>,
    /// Remarks worth keeping with the score (for example a truncated prompt).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// The outcome for one image: its score, or why it has none.
pub type ImageOutcome = std::result::Result<ScoreResult, FeedbackError>;

/// Scratch space shared by the scorers of one batch: two metrics on the same
/// backbone (CLIP score and aesthetic score on ViT-L/14) compute the image
/// embeddings once. Create a fresh one for every batch.
#[derive(Debug, Default)]
pub struct BatchCache {
    image_features: HashMap<String, Vec<std::result::Result<Tensor, String>>>,
}

impl BatchCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Per-image features stored under `key` (one entry per batch image).
    pub fn image_features(&self, key: &str) -> Option<&[std::result::Result<Tensor, String>]> {
        self.image_features.get(key).map(Vec::as_slice)
    }

    /// Stores per-image features under `key`.
    pub fn insert_image_features(
        &mut self,
        key: String,
        rows: Vec<std::result::Result<Tensor, String>>,
    ) {
        self.image_features.insert(key, rows);
    }
}

/// A metric that scores images.
pub trait Scorer: Send + Sync {
    /// The metric's name, the key of its scores (`clip`, `aesthetic`, ...).
    fn name(&self) -> &str;

    /// The version string recorded with every score.
    fn version(&self) -> &str;

    /// A good batch size for this scorer on its device.
    fn preferred_batch_size(&self) -> usize {
        8
    }

    /// Scores `images` (all made from `request.prompt`), one outcome per
    /// image in order. An `Err` return means the whole batch failed (a model
    /// error); per-image problems are per-image outcomes.
    fn score_batch(
        &self,
        images: &[&LoadedImage],
        request: &ScoreRequest<'_>,
        cache: &mut BatchCache,
    ) -> Result<Vec<ImageOutcome>>;
}

/// L2-normalises the rows of `x` (`[n, d]`), leaving all-zero rows at zero
/// (numpy's `x / norm` with zero norms replaced by 1, as in LAION's code).
pub fn l2_normalise(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(candle_core::D::Minus1)?.sqrt()?;
    let ones = norm.ones_like()?;
    let safe = norm.eq(0.0)?.where_cond(&ones, &norm)?;
    x.broadcast_div(&safe)
}
