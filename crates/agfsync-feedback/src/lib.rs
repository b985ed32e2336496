//! AI feedback for agfsync: the scorers that rank candidate images (CLIP
//! score, aesthetic score, VQA score; HPSv2 for evaluation), their
//! combination, and preference-pair selection.
//!
//! Implemented so far (AGFSync section 4, "Scores"):
//!
//! * [`clip_score::ClipScorer`]: `max(100 * cos, 0)` of CLIP embeddings, on a
//!   transformers `CLIPModel` ([`clip::ClipModel`], with our own vision
//!   tower in [`clip_vision`]);
//! * [`aesthetic::AestheticScorer`]: the LAION improved aesthetic predictor
//!   on CLIP ViT-L/14 image embeddings, loaded from safetensors or, safely,
//!   from the original `.pth` ([`pth`]);
//! * [`hps::HpsScorer`]: HPSv2 (`100 * cos` on the HPS fine-tuned OpenCLIP
//!   ViT-H/14, v2.0 or v2.1 checkpoint recorded in the version), with
//!   HPSv2's own preprocessing and open_clip's tokenisation, on an OpenCLIP
//!   model in open_clip's key layout ([`open_clip::OpenClipModel`]) loaded
//!   from safetensors or the released `.pt`; [`hps::write_tiny_hps`] writes a
//!   tiny random one for tests;
//! * image decoding ([`image_input`]) and transformers' `CLIPImageProcessor`
//!   ([`preprocess`]) reproduced pixel for pixel (both of its backends);
//! * the [`scorer::Scorer`] trait every metric implements, and
//!   [`score_images::score_images`], the batch driver behind
//!   `agfsync score-images` ([`score_images::load_scorers`] loads the models
//!   once).
//!
//! * [`vqa::VqaScorer`]: the VQA score (AGFSync's `100 * correct /
//!   questions`, P(yes), VQAScore) on LLaVA-1.5 ([`llava::Llava`], with the
//!   Llama decoder of `agfsync_models::llama`);
//!
//! Not here: score combination and pair selection live in
//! `agfsync-pipeline`.
//!
//! ```no_run
//! use agfsync_feedback::score_images::{load_scorers, score_images, Metric, ScorerSpec, ScoreImagesOptions};
//! use agfsync_feedback::scorer::ScoreRequest;
//! use agfsync_models::hub::ModelSource;
//!
//! # fn main() -> agfsync_feedback::Result<()> {
//! let spec = ScorerSpec {
//!     metrics: vec![Metric::Clip, Metric::Aesthetic],
//!     clip_model: Some(ModelSource::local("models/clip-vit-large-patch14")),
//!     aesthetic_model: Some("models/sac+logos+ava1-l14-linearMSE.pth".into()),
//!     ..ScorerSpec::default()
//! };
//! let scorers = load_scorers(&spec)?;
//! let images = vec!["a.png".into(), "b.jpg".into()];
//! score_images(&images, &ScoreRequest::prompt("a red cube"), &scorers,
//!              &ScoreImagesOptions::default(), |report| {
//!     println!("{}", report.to_json_line());
//!     Ok(())
//! })?;
//! # Ok(())
//! # }
//! ```

pub mod aesthetic;
pub mod clip;
pub mod clip_score;
pub mod clip_vision;
pub mod error;
pub mod hps;
pub mod image_input;
pub mod jpeg;
pub mod llava;
pub mod open_clip;
pub mod preprocess;
pub mod pth;
pub mod score_images;
pub mod scorer;
pub mod tiny;
pub mod vqa;

pub use error::{FeedbackError, Result};
