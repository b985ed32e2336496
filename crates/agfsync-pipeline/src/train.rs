//! The training stage: Diffusion-DPO on the run's pairs, from the stored
//! final latents of the candidates (no VAE round trip), with the prompts
//! encoded by the base model's text encoder(s). Output in `train/dpo/`;
//! an interrupted training resumes from its newest checkpoint.

use std::path::Path;

use candle_core::{Device, Tensor};

use agfsync_diffusion::pipeline::{encode_prompts, Negative, XlSizes};
use agfsync_dpo::data::{AddedCond, PairDataset};
use agfsync_dpo::optim::LrScheduler;
use agfsync_dpo::{train_until, DpoError, ModelSpec, ResumeFrom, TrainConfig, TrainDtype};
use agfsync_models::hub::{resolve_model, HubOptions};
use agfsync_models::stable_diffusion::{LoadOptions, SdFamily, TextEncoders};
use agfsync_store::{CandidateRecord, TrainingRecord};

use crate::error::{PipelineError, Result};
use crate::run::{Run, StageContext};
use crate::shard::Shard;
use crate::stages::{read_latents, StageReport};

/// The training output folder inside a run.
pub const TRAIN_DIR: &str = "train/dpo";

/// The DPO trainer's config from `[train]`.
pub fn train_config(run: &Run) -> Result<TrainConfig> {
    let t = &run.config.train;
    let lr_scheduler = match t.lr_scheduler.as_str() {
        "constant" => LrScheduler::Constant,
        "constant_with_warmup" => LrScheduler::ConstantWithWarmup,
        "cosine" => LrScheduler::Cosine,
        other => {
            return Err(PipelineError::Invalid(format!(
                "train.lr_scheduler = `{other}`: use constant, constant_with_warmup or cosine"
            )))
        }
    };
    let cfg = TrainConfig {
        steps: t.steps,
        lr: t.lr,
        beta: t.beta,
        lora_rank: t.lora_rank,
        full: t.full,
        batch_size: t.batch_size,
        grad_accum: t.grad_accum,
        lr_scheduler,
        warmup_steps: t.warmup_steps,
        max_grad_norm: t.max_grad_norm,
        seed: run.config.run.seed,
        checkpoint_every: t.checkpoint_every,
        gradient_checkpointing: t.gradient_checkpointing,
        dtype: TrainDtype::parse(&t.dtype)
            .map_err(|e| PipelineError::Invalid(format!("train.dtype: {e}")))?,
        ..TrainConfig::default()
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Builds the DPO data set from the run's pairs.
pub fn pair_dataset(run: &Run) -> Result<PairDataset> {
    let pairs: Vec<_> = run
        .store
        .pairs()?
        .into_iter()
        .filter(|p| p.status == "pair")
        .collect();
    if pairs.is_empty() {
        return Err(PipelineError::Invalid(
            "no preference pairs in this run: run `agfsync pairs` first (or check why every \
             prompt was skipped with `agfsync status`)"
                .into(),
        ));
    }
    let prompts: std::collections::HashMap<String, String> = run
        .store
        .prompts()?
        .into_iter()
        .map(|p| (p.pid, p.text))
        .collect();
    let cands: std::collections::HashMap<(String, i64), CandidateRecord> = run
        .store
        .candidates(None)?
        .into_iter()
        .map(|c| ((c.pid.clone(), c.idx), c))
        .collect();
    let mut w = Vec::new();
    let mut l = Vec::new();
    let mut texts = Vec::new();
    let mut size = (0, 0);
    for p in &pairs {
        let get = |idx: Option<i64>| -> Result<&CandidateRecord> {
            idx.and_then(|i| cands.get(&(p.pid.clone(), i)))
                .ok_or_else(|| {
                    PipelineError::Invalid(format!(
                        "pair of prompt {} names a missing candidate",
                        p.pid
                    ))
                })
        };
        let (cw, cl) = (get(p.winner)?, get(p.loser)?);
        size = (cw.height as usize, cw.width as usize);
        w.push(read_latents(&run.store_dir, cw)?);
        l.push(read_latents(&run.store_dir, cl)?);
        texts.push(prompts.get(&p.pid).cloned().unwrap_or_default());
    }
    let cat = |v: &[Tensor]| Tensor::cat(v, 0).map_err(PipelineError::candle("stacking latents"));
    let (latents_w, latents_l) = (cat(&w)?, cat(&l)?);
    // The prompts, encoded once by the base model's text encoder(s).
    let spec = run.model_path(&run.config.models.diffusion);
    let src =
        resolve_model(&spec, &HubOptions::from_env()).map_err(agfsync_models::ModelError::from)?;
    // The text encoders alone: the whole pipeline would load (and copy into
    // memory) a UNet and a VAE the trainer does not use here.
    let sd = TextEncoders::load(
        &src,
        &LoadOptions {
            dtype: candle_core::DType::F32,
            device: Device::Cpu,
            variant: None,
        },
    )?;
    let xl = (sd.family == SdFamily::Xl).then(|| XlSizes::for_image(size.0, size.1));
    let (text, _) = encode_prompts(&sd, &texts, Negative::None, None, xl.as_ref())
        .map_err(PipelineError::candle("encoding the pair prompts"))?;
    let added: Option<AddedCond> = text.added.map(|(c, _)| c);
    Ok(PairDataset::new(latents_w, latents_l, text.cond, added)?)
}

pub(crate) fn train_stage(run: &mut Run, ctx: &StageContext<'_>) -> Result<StageReport> {
    let mut report = StageReport::default();
    if !run.config.train.enabled {
        report.notes.push("train.enabled = false: skipped".into());
        return Ok(report);
    }
    if run.shard != Shard::ALL {
        report.notes.push(format!(
            "shard {}: training runs once on the merged run (`agfsync merge`), not per shard",
            run.shard
        ));
        return Ok(report);
    }
    let cfg = train_config(run)?;
    let out = run.store_dir.join(TRAIN_DIR);
    let name = "dpo".to_string();
    if let Some(t) = run.store.trainings()?.into_iter().find(|t| t.name == name) {
        if t.status == "done"
            && t.steps_done as usize >= cfg.steps
            && t.config == serde_json::json!(cfg)
        {
            report.skipped = 1;
            return Ok(report);
        }
    }
    let data = pair_dataset(run)?;
    let spec_path = run.model_path(&run.config.models.diffusion);
    let src = resolve_model(&spec_path, &HubOptions::from_env())
        .map_err(agfsync_models::ModelError::from)?;
    let spec = ModelSpec::from_pipeline_dir(src.root())?;
    let resume = has_checkpoint(&out).then_some(ResumeFrom::Latest);
    let mut record = TrainingRecord {
        name: name.clone(),
        out: TRAIN_DIR.into(),
        config: serde_json::json!(cfg),
        status: "running".into(),
        steps_done: 0,
        result: None,
    };
    run.store.upsert_training(&record)?;
    ctx.progress.begin("train", cfg.steps as u64);
    let device = run.device()?;
    let cancel = ctx.cancel;
    let mut last_step = 0;
    let stop = || cancel.load(std::sync::atomic::Ordering::SeqCst);
    let result = train_until(
        &spec,
        &data,
        &cfg,
        &out,
        resume,
        &device,
        &mut |m| {
            ctx.progress.advance((m.step - last_step) as u64);
            crate::fault::point("train.step");
            last_step = m.step;
        },
        &stop,
    );
    ctx.progress.end();
    match result {
        Ok(summary) => {
            record.status = "done".into();
            record.steps_done = summary.steps as i64;
            record.result = summary
                .output
                .strip_prefix(&run.store_dir)
                .ok()
                .map(|p| p.display().to_string());
            run.store.upsert_training(&record)?;
            report.done = 1;
            report
                .notes
                .push(format!("weights: {}", summary.output.display()));
            Ok(report)
        }
        Err(DpoError::Interrupted { step, .. }) => {
            record.steps_done = step as i64;
            run.store.upsert_training(&record)?;
            Err(PipelineError::Interrupted)
        }
        Err(e) => {
            record.status = "failed".into();
            run.store.upsert_training(&record)?;
            Err(e.into())
        }
    }
}

fn has_checkpoint(out: &Path) -> bool {
    std::fs::read_dir(out.join("checkpoints"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}
