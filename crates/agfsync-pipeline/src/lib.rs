//! The AGFSync loop as stages over a run store.
//!
//! A run is a directory with an `agfsync.toml` ([`config`]) and a run store
//! (`agfsync-store`). Every stage ([`stages::Stage`]) is a function from
//! (run, config) to new rows in the store; stages never call each other,
//! and each skips work already recorded, so any stage can be rerun, resumed
//! after a crash, or run on a [`shard::Shard`] of the prompts on another
//! machine and merged back ([`ops::merge`]).
//!
//! ```text
//! prompts -> questions -> generate -> score -> pairs -> train -> eval
//! ```
//!
//! * prompts: the built-in set or an imported list ([`prompts`]);
//! * questions: built-in or imported TIFA questions;
//! * generate: N candidates per prompt, candidate 0 on the clean prompt
//!   embedding, 1..N-1 with Gaussian embedding noise; seeds derived from the
//!   run seed and the prompt id ([`stages::candidate_seeds`]); final latents
//!   kept for training;
//! * score: the configured scorers of `agfsync-feedback`;
//! * pairs: per-prompt normalisation, weights, winner/loser ([`combine`]);
//! * train: Diffusion-DPO on the stored latents ([`train`]);
//! * eval: base against tuned on a benchmark, and the report ([`eval`]).

pub mod bench;
pub mod combine;
pub mod config;
pub mod error;
pub mod eval;
/// Fault injection for the crash tests (the `agfsync-fault` crate).
pub use agfsync_fault as fault;
pub mod ops;
pub mod prompts;
pub mod run;
pub mod shard;
pub mod stages;
pub mod tiny;
pub mod train;

pub use error::{PipelineError, Result};
pub use run::{NoProgress, Progress, Run, StageContext};
pub use shard::Shard;
pub use stages::{run_stage, Stage};
