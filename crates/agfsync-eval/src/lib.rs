//! Evaluation for agfsync (AGFSync section 7): benchmark files (TIFA v1.0,
//! HPSv2), TIFA accuracy overall and per element type, HPSv2 per style,
//! paired statistics of two models on the same prompts and seeds, and the
//! self-contained HTML report.
//!
//! Generating and scoring the benchmark images is the pipeline's `eval`
//! stage; this crate holds the pure parts, so each is tested on hand-made
//! data with known answers.

pub mod benchmarks;
pub mod error;
pub mod report;
pub mod stats;

pub use error::{EvalError, Result};
