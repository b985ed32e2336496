//! Schedulers and the sampling loop of agfsync.
//!
//! Schedulers live one per file under [`schedulers`] and are swappable behind
//! the [`schedulers::Scheduler`] trait; [`pipeline`] writes the text-to-image
//! loop out plainly, as diffusers' pipelines do.

pub mod pipeline;
pub mod rng;
pub mod schedulers;
