//! The stages of the loop. Each is a function from (run, config) to new
//! rows in the run store; each skips work already recorded, so it can be
//! rerun, resumed after a crash, or run on a shard.
//!
//! Units of work (one transaction each): a prompt set (prompts), a prompt's
//! questions, a generation batch (candidates), a prompt's scores, the whole
//! pair table (pairs, cheap and always recomputed), a training checkpoint.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use agfsync_diffusion::pipeline::{
    decode_latents, denoise, encode_prompts, latent_shape, perturb_embeddings, random_latents,
    to_rgb8, DenoiseOptions, Negative, TextConditioning, XlSizes,
};
use agfsync_diffusion::rng::Generator;
use agfsync_diffusion::schedulers::{build, SchedulerConfig, SchedulerKind};
use agfsync_dpo::data::mix;
use agfsync_feedback::image_input::load_image;
use agfsync_feedback::score_images::{load_scorers, score_loaded, Metric, ScorerSpec};
use agfsync_feedback::scorer::{Question, ScoreRequest, Scorer};
use agfsync_models::hub::{resolve_model, HubOptions};
use agfsync_models::stable_diffusion::{LoadOptions, SdFamily, StableDiffusion};
use agfsync_models::weights::save_safetensors;
use agfsync_store::{
    resolve_inside, write_file_atomic, CandidateRecord, PromptRecord, QuestionRecord, ScoreRecord,
};

use crate::combine::{choose_pair, CandidateMetrics};
use crate::error::{PipelineError, Result};
use crate::prompts::{
    builtin_prompts, builtin_questions, read_prompt_file_with, read_tifa_questions_with,
};
use crate::run::{Run, StageContext};

/// The stages, in loop order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Prompts into the store.
    Prompts,
    /// Questions per prompt.
    Questions,
    /// Candidate images.
    Generate,
    /// Scores per candidate.
    Score,
    /// One pair per prompt.
    Pairs,
    /// Diffusion-DPO.
    Train,
    /// Base against tuned on a benchmark.
    Eval,
}

impl Stage {
    /// Every stage, in order.
    pub const ALL: [Stage; 7] = [
        Stage::Prompts,
        Stage::Questions,
        Stage::Generate,
        Stage::Score,
        Stage::Pairs,
        Stage::Train,
        Stage::Eval,
    ];

    /// The stage's name (its subcommand).
    pub fn name(self) -> &'static str {
        match self {
            Stage::Prompts => "prompts",
            Stage::Questions => "questions",
            Stage::Generate => "generate",
            Stage::Score => "score",
            Stage::Pairs => "pairs",
            Stage::Train => "train",
            Stage::Eval => "eval",
        }
    }
}

/// What a stage did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StageReport {
    /// Units done by this call.
    pub done: usize,
    /// Units that were already done and skipped.
    pub skipped: usize,
    /// Remarks for the user.
    pub notes: Vec<String>,
}

/// Runs one stage.
pub fn run_stage(run: &mut Run, stage: Stage, ctx: &StageContext<'_>) -> Result<StageReport> {
    tracing::info!(stage = stage.name(), shard = %run.shard, "stage begins");
    let r = match stage {
        Stage::Prompts => prompts_stage(run, ctx),
        Stage::Questions => questions_stage(run, ctx),
        Stage::Generate => generate_stage(run, ctx),
        Stage::Score => score_stage(run, ctx),
        Stage::Pairs => pairs_stage(run, ctx),
        Stage::Train => crate::train::train_stage(run, ctx),
        Stage::Eval => crate::eval::eval_stage(run, ctx),
    };
    if let Ok(rep) = &r {
        tracing::info!(
            stage = stage.name(),
            done = rep.done,
            skipped = rep.skipped,
            "stage ends"
        );
    }
    r
}

/// The authoring LLM: the server of `[llm]`, or the in-process model of
/// `[local_llm]`.
fn http_llm(run: &Run) -> Result<Box<dyn agfsync_author::Llm>> {
    if let Some(local) = &run.config.local_llm {
        let options = agfsync_author::LocalLlmOptions {
            device: run.device()?,
            max_concurrency: local.max_concurrency.max(1),
            ..agfsync_author::LocalLlmOptions::default()
        };
        return Ok(Box::new(agfsync_author::LocalLlm::open(
            &run.model_path(&local.model),
            &HubOptions::from_env(),
            &options,
        )?));
    }
    let cfg = run.config.llm.clone().ok_or_else(|| {
        PipelineError::Invalid(
            "source = \"llm\" needs an [llm] or [local_llm] section in agfsync.toml".into(),
        )
    })?;
    Ok(Box::new(agfsync_author::http::HttpLlm::new(cfg)?))
}

/// The sentence embedder for near-duplicate removal: `[prompts] embedder`
/// (a BERT-family folder or hub id), or a bag-of-words embedding.
fn embedder(run: &Run) -> Result<Box<dyn agfsync_author::Embedder>> {
    let spec = &run.config.prompts.embedder;
    if spec.is_empty() {
        return Ok(Box::new(agfsync_author::BagOfWords::default()));
    }
    let options = agfsync_author::BertEmbedderOptions {
        device: run.device()?,
        ..agfsync_author::BertEmbedderOptions::default()
    };
    Ok(Box::new(agfsync_author::BertEmbedder::load(
        &run.model_path(spec),
        &HubOptions::from_env(),
        &options,
    )?))
}

/// A template file of the config, or the built-in one.
fn template(run: &Run, file: &str, questions: bool) -> Result<agfsync_author::Template> {
    use agfsync_author::template::{PROMPT_PLACEHOLDERS, QUESTION_PLACEHOLDERS};
    Ok(match (file.is_empty(), questions) {
        (true, false) => agfsync_author::Template::default_prompts()?,
        (true, true) => agfsync_author::Template::default_questions()?,
        (false, q) => agfsync_author::Template::from_file(
            &run.root.join(file),
            if q {
                QUESTION_PLACEHOLDERS
            } else {
                PROMPT_PLACEHOLDERS
            },
        )?,
    })
}

/// The prompt set of the config (all shards), in order. LLM-authored
/// prompts are those already authored into the run's (unsharded) store.
pub fn configured_prompts(run: &Run) -> Result<Vec<PromptRecord>> {
    let src = &run.config.prompts.source;
    if src == "llm" {
        return Ok(agfsync_store::Store::open(&run.root)?.prompts()?);
    }
    let mut all = if src == "builtin" {
        builtin_prompts()
    } else {
        read_prompt_file_with(&run.root.join(src), &run.config.limits.input())?
    };
    if run.config.prompts.limit > 0 {
        all.truncate(run.config.prompts.limit);
    }
    Ok(all)
}

fn prompts_stage(run: &mut Run, ctx: &StageContext<'_>) -> Result<StageReport> {
    if run.config.prompts.source == "llm" && run.shard == crate::Shard::ALL {
        return author_prompts_stage(run, ctx);
    }
    if run.config.prompts.source == "llm" && configured_prompts(run)?.is_empty() {
        return Err(PipelineError::Invalid(
            "prompts are authored once for the whole run: run `agfsync prompts DIR` without \
             --shard first, then the shards"
                .into(),
        ));
    }
    let mine: Vec<PromptRecord> = configured_prompts(run)?
        .into_iter()
        .filter(|p| run.shard.owns(p.ord))
        .collect();
    ctx.progress.begin("prompts", mine.len() as u64);
    crate::fault::point("prompts.before_commit");
    let added = run.store.insert_prompts(&mine)?;
    ctx.progress.advance(mine.len() as u64);
    ctx.progress.end();
    Ok(StageReport {
        done: added,
        skipped: mine.len() - added,
        notes: vec![],
    })
}

/// Authors the prompt set with the LLM, one category per unit: a category
/// is recorded as authored in the same transaction as its prompts, so a
/// rerun after a crash or Ctrl-C continues with the next category.
fn author_prompts_stage(run: &mut Run, ctx: &StageContext<'_>) -> Result<StageReport> {
    const KEY: &str = "prompts_authored_categories";
    let mut report = StageReport::default();
    let mut done: Vec<String> = run
        .store
        .meta(KEY)?
        .and_then(|v| serde_json::from_str(&v).ok())
        .unwrap_or_default();
    let cfg = run.config.prompts.llm.clone();
    let todo: Vec<(usize, String)> = cfg
        .categories
        .iter()
        .cloned()
        .enumerate()
        .filter(|(_, c)| !done.contains(c))
        .collect();
    report.skipped = cfg.categories.len() - todo.len();
    if todo.is_empty() {
        return Ok(report);
    }
    let llm = http_llm(run)?;
    let embedder = embedder(run)?;
    let tpl = template(run, &run.config.prompts.template, false)?;
    ctx.progress.begin("prompts (llm)", todo.len() as u64);
    let (mut calls, mut failed, mut dups, mut kept) = (0, 0, 0, 0);
    for (ci, category) in todo {
        ctx.check_cancel()?;
        let one = agfsync_author::PromptAuthoring {
            categories: vec![category.clone()],
            ..cfg.clone()
        };
        let out = agfsync_author::author_prompts(llm.as_ref(), embedder.as_ref(), &tpl, &one)?;
        calls += out.stats.calls;
        failed += out.stats.failed_calls;
        dups += out.stats.duplicates;
        kept += out.stats.kept;
        // Positions by category, so the prompt set's order is the same
        // whichever categories a rerun had left to do.
        let records = agfsync_author::prompt_records(&out.prompts, ci as i64 * 1_000_000);
        done.push(category);
        let value = serde_json::to_string(&done).unwrap_or_default();
        report.done += run.store.insert_prompts_with_meta(&records, KEY, &value)?;
        ctx.progress.advance(1);
    }
    ctx.progress.end();
    report.notes.push(format!(
        "{calls} calls ({failed} failed), {dups} near duplicates dropped, {kept} prompts kept"
    ));
    Ok(report)
}

/// Authors questions for the prompts that have none, a few prompts per
/// transaction. Prompts left with too few questions get an empty set marked
/// `dropped:`, and are not generated.
fn author_questions_stage(run: &mut Run, ctx: &StageContext<'_>) -> Result<StageReport> {
    let mut report = StageReport::default();
    let have = run.store.prompts_with_questions()?;
    let todo: Vec<PromptRecord> = run
        .store
        .prompts()?
        .into_iter()
        .filter(|p| !have.contains(&p.pid))
        .collect();
    report.skipped = have.len();
    if todo.is_empty() {
        return Ok(report);
    }
    let llm = http_llm(run)?;
    let embedder = embedder(run)?;
    let tpl = template(run, &run.config.questions.template, true)?;
    let cfg = run.config.questions.llm.clone();
    ctx.progress.begin("questions (llm)", todo.len() as u64);
    let mut dropped = 0;
    for chunk in todo.chunks(8) {
        ctx.check_cancel()?;
        let out =
            agfsync_author::author_questions(llm.as_ref(), embedder.as_ref(), &tpl, chunk, &cfg)?;
        for set in &out.sets {
            if set.kept {
                run.store
                    .set_questions(&set.pid, &set.to_records(), &set.source())?;
            } else {
                dropped += 1;
                let why = format!(
                    "dropped: {} questions left, fewer than {}",
                    set.questions.len(),
                    cfg.min_questions
                );
                run.store.set_questions(&set.pid, &[], &why)?;
            }
            report.done += 1;
        }
        ctx.progress.advance(chunk.len() as u64);
    }
    ctx.progress.end();
    if dropped > 0 {
        report.notes.push(format!(
            "{dropped} prompt(s) dropped with fewer than {} questions",
            cfg.min_questions
        ));
    }
    Ok(report)
}

fn questions_stage(run: &mut Run, ctx: &StageContext<'_>) -> Result<StageReport> {
    if run.config.questions.source == "llm" {
        return author_questions_stage(run, ctx);
    }
    let src = run.config.questions.source.clone();
    let prompts = run.store.prompts()?;
    let have = run.store.prompts_with_questions()?;
    let mut report = StageReport::default();
    if src == "none" {
        report
            .notes
            .push("questions.source = none: no questions (the vqa metric needs them)".into());
        return Ok(report);
    }
    let tifa = if src == "builtin" {
        None
    } else {
        Some(read_tifa_questions_with(
            &run.root.join(&src),
            &run.config.limits.input(),
        )?)
    };
    ctx.progress.begin("questions", prompts.len() as u64);
    let mut missing = 0;
    for p in &prompts {
        ctx.check_cancel()?;
        if have.contains(&p.pid) {
            report.skipped += 1;
            ctx.progress.advance(1);
            continue;
        }
        let qs: Option<Vec<QuestionRecord>> = match &tifa {
            None => builtin_questions(p),
            Some(map) => map.get(&p.text).map(|qs| {
                qs.iter()
                    .map(|q| QuestionRecord {
                        pid: p.pid.clone(),
                        ..q.clone()
                    })
                    .collect()
            }),
        };
        match qs {
            Some(qs) => {
                run.store.set_questions(&p.pid, &qs, &src)?;
                crate::fault::point("questions.after_commit");
                report.done += 1;
            }
            None => missing += 1,
        }
        ctx.progress.advance(1);
    }
    ctx.progress.end();
    if missing > 0 {
        report.notes.push(format!(
            "{missing} prompt(s) have no questions in `{src}` (the vqa metric skips them)"
        ));
    }
    Ok(report)
}

/// A 64-bit number from a prompt id, for seeding.
fn pid_number(pid: &str) -> u64 {
    u64::from_str_radix(pid.get(..16).unwrap_or(pid), 16).unwrap_or_else(|_| {
        pid.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    })
}

/// The seeds of candidate `idx` of prompt `pid`: initial latents, and the
/// prompt-embedding noise (`None` for candidate 0, the clean one). They
/// depend only on the run seed, the prompt and the index, so shards, batch
/// sizes and reruns give the same candidates.
pub fn candidate_seeds(run_seed: u64, pid: &str, idx: usize) -> (u64, Option<u64>) {
    let p = pid_number(pid);
    let seed = mix(run_seed, p, idx as u64) >> 1;
    let noise = (idx > 0).then(|| mix(run_seed ^ 0x656d_6264, p, idx as u64) >> 1);
    (seed, noise)
}

/// Encodes a PNG with tEXt chunks (the candidate's parameters).
pub fn encode_png(
    width: usize,
    height: usize,
    rgb: &[u8],
    texts: &[(&str, String)],
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in texts {
            enc.add_text_chunk((*k).to_string(), v.clone())
                .map_err(|e| PipelineError::Invalid(format!("PNG text chunk: {e}")))?;
        }
        let mut w = enc
            .write_header()
            .map_err(|e| PipelineError::Invalid(format!("PNG header: {e}")))?;
        w.write_image_data(rgb)
            .map_err(|e| PipelineError::Invalid(format!("PNG data: {e}")))?;
    }
    Ok(out)
}

/// Weight files under a model folder, sorted (for its identity).
fn weight_files(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "safetensors") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Loads the diffusion model and its identity: `repo@commit` from the hub,
/// or the folder name and a fingerprint of its weight files (the same on
/// every machine, unlike a path).
pub(crate) fn load_sd_for(run: &Run) -> Result<(StableDiffusion, String)> {
    load_sd_from(run, &run.model_path(&run.config.models.diffusion))
}

/// Loads a diffusers pipeline (folder or hub id) with the run's device and
/// dtype, and its identity.
pub(crate) fn load_sd_from(run: &Run, spec: &str) -> Result<(StableDiffusion, String)> {
    let src =
        resolve_model(spec, &HubOptions::from_env()).map_err(agfsync_models::ModelError::from)?;
    tracing::info!("loading {}", src);
    let identity = agfsync_feedback::clip::model_identity(&src, &weight_files(src.root()));
    let sd = StableDiffusion::load(
        &src,
        &LoadOptions {
            dtype: run.dtype()?,
            device: run.device()?,
            variant: None,
        },
    )?;
    Ok((sd, identity))
}

fn generate_stage(run: &mut Run, ctx: &StageContext<'_>) -> Result<StageReport> {
    let g = run.config.generate.clone();
    let dropped = run.store.dropped_prompts()?;
    let prompts: Vec<PromptRecord> = run
        .store
        .prompts()?
        .into_iter()
        .filter(|p| !dropped.contains(&p.pid))
        .collect();
    let have: HashSet<(String, i64)> = run
        .store
        .candidates(None)?
        .into_iter()
        .map(|c| (c.pid, c.idx))
        .collect();
    let todo: Vec<(&PromptRecord, usize)> = prompts
        .iter()
        .flat_map(|p| (0..g.candidates).map(move |i| (p, i)))
        .filter(|(p, i)| !have.contains(&(p.pid.clone(), *i as i64)))
        .collect();
    let mut report = StageReport {
        skipped: prompts.len() * g.candidates - todo.len(),
        ..StageReport::default()
    };
    if todo.is_empty() {
        return Ok(report);
    }
    let (sd, model_id) = load_sd_for(run)?;
    let device = run.device()?;
    let setup = Sampling::new(&sd, &g)?;
    let (height, width) = (setup.height, setup.width);
    let (c, h, w) = setup.latent;
    let xl = setup.xl;
    let kind = setup.kind;
    ctx.progress.begin("generate", todo.len() as u64);
    for batch in todo.chunks(g.batch_size) {
        ctx.check_cancel()?;
        let texts: Vec<String> = batch.iter().map(|(p, _)| p.text.clone()).collect();
        let negs: Vec<String> = vec![g.negative_prompt.clone(); batch.len()];
        let neg = match (g.guidance_scale > 1.0, g.negative_prompt.is_empty()) {
            (false, _) => Negative::None,
            (true, true) => Negative::Default,
            (true, false) => Negative::Prompts(&negs),
        };
        let (text, _) = encode_prompts(&sd, &texts, neg, None, xl.as_ref())
            .map_err(PipelineError::candle("encoding prompts"))?;
        let mut rows = Vec::with_capacity(batch.len());
        let mut latents = Vec::with_capacity(batch.len());
        let mut records = Vec::with_capacity(batch.len());
        for (j, (p, i)) in batch.iter().enumerate() {
            let (seed, noise_seed) = candidate_seeds(run.config.run.seed, &p.pid, *i);
            let row = text
                .cond
                .narrow(0, j, 1)
                .map_err(PipelineError::candle("conditioning"))?;
            let row = match noise_seed {
                Some(ns) => perturb_embeddings(&row, g.embedding_noise, &mut Generator::new(ns))
                    .map_err(PipelineError::candle("embedding noise"))?,
                None => row,
            };
            rows.push(row);
            latents.push(
                random_latents(&mut Generator::new(seed), (1, c, h, w), &device)
                    .map_err(PipelineError::candle("initial latents"))?,
            );
            let dir = &p.pid;
            records.push(CandidateRecord {
                pid: p.pid.clone(),
                idx: *i as i64,
                model: model_id.clone(),
                scheduler: kind.to_string(),
                steps: g.steps as i64,
                guidance: g.guidance_scale,
                width: width as i64,
                height: height as i64,
                seed,
                noise_seed,
                noise_ratio: if noise_seed.is_some() {
                    g.embedding_noise
                } else {
                    0.0
                },
                image: format!("images/{dir}/{i}.png"),
                latents: format!("latents/{dir}/{i}.safetensors"),
            });
        }
        // Every UNet call runs at the configured batch size: the last batch
        // is padded by repeating its last row, and the padding is dropped
        // afterwards. Matrix kernels may sum in a different order for a
        // different batch size, and a candidate's pixels must not depend on
        // how the prompts were split into shards or where a rerun resumed.
        let real = batch.len();
        let pad = g.batch_size - real;
        let text = if pad > 0 {
            let repeat = |t: &Tensor| -> candle_core::Result<Tensor> {
                let last = t.narrow(0, real - 1, 1)?;
                let mut parts = vec![t.clone()];
                parts.extend(std::iter::repeat_n(last, pad));
                Tensor::cat(&parts, 0)
            };
            let perr = |e| PipelineError::candle("padding the last batch")(e);
            for _ in 0..pad {
                rows.push(rows[real - 1].clone());
                latents.push(latents[real - 1].clone());
            }
            let added = match &text.added {
                Some((c, u)) => Some((
                    agfsync_models::unet_2d_condition::AddedCondition {
                        text_embeds: repeat(&c.text_embeds).map_err(perr)?,
                        time_ids: repeat(&c.time_ids).map_err(perr)?,
                    },
                    agfsync_models::unet_2d_condition::AddedCondition {
                        text_embeds: repeat(&u.text_embeds).map_err(perr)?,
                        time_ids: repeat(&u.time_ids).map_err(perr)?,
                    },
                )),
                None => None,
            };
            TextConditioning {
                cond: text.cond.clone(),
                uncond: text
                    .uncond
                    .as_ref()
                    .map(&repeat)
                    .transpose()
                    .map_err(perr)?,
                added,
            }
        } else {
            text
        };
        let cond = Tensor::cat(&rows, 0).map_err(PipelineError::candle("conditioning"))?;
        let text = TextConditioning { cond, ..text };
        let init = Tensor::cat(&latents, 0).map_err(PipelineError::candle("latents"))?;
        // Stochastic schedulers draw from a generator of the batch's first
        // seed (their images then depend on the batch; DDIM, Euler, DPM++
        // and LCM's final step aside, the loop is deterministic).
        let fin = setup.denoise(&sd, &g, &init, &text, records[0].seed ^ 0x5eed)?;
        let images = decode_latents(&sd, &fin).map_err(PipelineError::candle("VAE decode"))?;
        let (fin, images) = if pad > 0 {
            (
                fin.narrow(0, 0, real)
                    .map_err(PipelineError::candle("unpadding"))?,
                images
                    .narrow(0, 0, real)
                    .map_err(PipelineError::candle("unpadding"))?,
            )
        } else {
            (fin, images)
        };
        let fin = fin
            .to_dtype(DType::F32)
            .and_then(|t| t.to_device(&Device::Cpu))
            .map_err(PipelineError::candle("latents to CPU"))?;
        for (j, (iw, ih, rgb)) in to_rgb8(&images)
            .map_err(PipelineError::candle("images"))?
            .into_iter()
            .enumerate()
        {
            let rec = &records[j];
            let params = serde_json::json!({
                "prompt": batch[j].0.text,
                "candidate": rec,
                "agfsync_version": env!("CARGO_PKG_VERSION"),
            });
            let png = encode_png(iw, ih, &rgb, &[("agfsync", params.to_string())])?;
            let image_path = resolve_inside(&run.store_dir, &rec.image)?;
            crate::fault::disk_full("generate.image")
                .map_err(|e| PipelineError::io(&image_path, e))?;
            write_file_atomic(&image_path, &png)?;
            let lat = fin
                .narrow(0, j, 1)
                .map_err(PipelineError::candle("latents"))?;
            let mut t = HashMap::new();
            t.insert("latents".to_string(), lat);
            save_safetensors(&t, &resolve_inside(&run.store_dir, &rec.latents)?)?;
        }
        // The unit is done when its rows are committed, after its files.
        crate::fault::point("generate.before_commit");
        run.store.insert_candidates(&records)?;
        crate::fault::point("generate.after_commit");
        report.done += records.len();
        ctx.progress.advance(records.len() as u64);
    }
    ctx.progress.end();
    Ok(report)
}

/// What sampling needs besides the prompts, fixed for a stage: image and
/// latent size, scheduler, SDXL micro-conditioning.
pub(crate) struct Sampling {
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Latent channels, height, width.
    pub latent: (usize, usize, usize),
    /// The scheduler.
    pub kind: SchedulerKind,
    config: SchedulerConfig,
    /// SDXL sizes.
    pub xl: Option<XlSizes>,
}

impl Sampling {
    /// The setup of `[generate]` for a loaded model.
    pub(crate) fn new(sd: &StableDiffusion, g: &crate::config::GenerateSection) -> Result<Self> {
        let native = sd.unet.config().sample_size * sd.vae.config().scale_factor();
        let height = if g.height == 0 { native } else { g.height };
        let width = if g.width == 0 { native } else { g.width };
        let (_, c, h, w) =
            latent_shape(sd, 1, height, width).map_err(PipelineError::candle("latent shape"))?;
        let config = SchedulerConfig::from_json_str(&sd.scheduler_config)
            .map_err(|e| PipelineError::Invalid(format!("the model's scheduler config: {e}")))?;
        let kind = if g.scheduler.is_empty() {
            SchedulerKind::from_class_name(&config.class_name)
        } else {
            g.scheduler.parse::<SchedulerKind>()
        }
        .map_err(|e| PipelineError::Invalid(format!("generate.scheduler: {e}")))?;
        let xl = (sd.family == SdFamily::Xl).then(|| XlSizes::for_image(height, width));
        Ok(Self {
            height,
            width,
            latent: (c, h, w),
            kind,
            config,
            xl,
        })
    }

    /// Runs the denoising loop on a batch with a fresh scheduler; noise
    /// drawn during sampling comes from `rng_seed`.
    pub(crate) fn denoise(
        &self,
        sd: &StableDiffusion,
        g: &crate::config::GenerateSection,
        init: &Tensor,
        text: &TextConditioning,
        rng_seed: u64,
    ) -> Result<Tensor> {
        let mut scheduler = build(self.kind, &self.config)
            .map_err(|e| PipelineError::Invalid(format!("scheduler: {e}")))?;
        scheduler
            .set_timesteps(g.steps)
            .map_err(|e| PipelineError::Invalid(format!("scheduler: {e}")))?;
        denoise(
            sd,
            scheduler.as_mut(),
            init,
            text,
            &DenoiseOptions {
                guidance_scale: g.guidance_scale,
            },
            &mut Generator::new(rng_seed),
            &mut |_, _| {},
        )
        .map_err(PipelineError::candle("denoising"))
    }
}

/// The scorers of the config's metrics.
pub fn load_run_scorers(run: &Run) -> Result<Vec<Box<dyn Scorer>>> {
    load_scorers_for(run, &run.config.score.metrics)
}

/// The scorers of `metrics`, with the models of the config.
pub fn load_scorers_for(run: &Run, metrics: &[String]) -> Result<Vec<Box<dyn Scorer>>> {
    let m = &run.config.models;
    let metrics = metrics
        .iter()
        .map(|s| Metric::parse_list(s).map(|v| v[0]))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let hub = HubOptions::from_env();
    let resolve = |spec: &Option<String>| -> Result<Option<agfsync_models::hub::ModelSource>> {
        spec.as_ref()
            .map(|s| {
                resolve_model(&run.model_path(s), &hub)
                    .map_err(|e| agfsync_models::ModelError::from(e).into())
            })
            .transpose()
    };
    let spec = ScorerSpec {
        metrics,
        clip_model: resolve(&m.clip)?,
        aesthetic_model: m.aesthetic.as_ref().map(|a| run.model_path(a).into()),
        vqa_model: resolve(&m.vqa)?,
        hps_model: m.hps.as_ref().map(|a| run.model_path(a).into()),
        dtype: run.dtype()?,
        device: run.device()?,
        batch_size: run.config.score.batch_size,
        ..ScorerSpec::default()
    };
    Ok(load_scorers(&spec)?)
}

fn to_question(q: &QuestionRecord) -> Question {
    Question {
        question: q.question.clone(),
        choices: q.choices.clone(),
        answer: q.answer.clone(),
        element_type: q.element_type.clone(),
        element: q.element.clone(),
    }
}

/// One metric's result for one image, as the store records it.
pub(crate) struct MetricOutcome {
    pub metric: String,
    pub value: Option<f64>,
    pub version: String,
    pub details: BTreeMap<String, f64>,
    pub error: Option<String>,
}

/// Every scorer's outcome in an image's report: the value, or the error of
/// the metric (or of decoding the image) with no value.
pub(crate) fn metric_outcomes(
    rep: &agfsync_feedback::score_images::ImageReport,
    scorers: &[Box<dyn Scorer>],
) -> Vec<MetricOutcome> {
    scorers
        .iter()
        .map(|s| {
            let metric = s.name().to_string();
            let error = rep
                .errors
                .get(&metric)
                .or_else(|| rep.errors.get("image"))
                .cloned();
            MetricOutcome {
                value: if error.is_some() {
                    None
                } else {
                    rep.scores.get(&metric).copied()
                },
                version: rep
                    .versions
                    .get(&metric)
                    .cloned()
                    .unwrap_or_else(|| s.version().to_string()),
                details: rep.details.get(&metric).cloned().unwrap_or_default(),
                metric,
                error,
            }
        })
        .collect()
}

fn score_stage(run: &mut Run, ctx: &StageContext<'_>) -> Result<StageReport> {
    let prompts = run.store.prompts()?;
    let candidates = run.store.candidates(None)?;
    let existing: HashMap<(String, i64, String), String> = run
        .store
        .scores()?
        .into_iter()
        .map(|s| ((s.pid, s.idx, s.metric), s.version))
        .collect();
    let mut by_prompt: BTreeMap<&str, Vec<&CandidateRecord>> = BTreeMap::new();
    for c in &candidates {
        by_prompt.entry(c.pid.as_str()).or_default().push(c);
    }
    let metrics = run.config.score.metrics.clone();
    let pending = |c: &CandidateRecord| {
        metrics
            .iter()
            .any(|m| !existing.contains_key(&(c.pid.clone(), c.idx, m.clone())))
    };
    let todo: Vec<&PromptRecord> = prompts
        .iter()
        .filter(|p| {
            by_prompt
                .get(p.pid.as_str())
                .is_some_and(|cs| cs.iter().any(|c| pending(c)))
        })
        .collect();
    let mut report = StageReport {
        skipped: by_prompt.len() - todo.len(),
        ..StageReport::default()
    };
    if todo.is_empty() {
        return Ok(report);
    }
    let scorers = load_run_scorers(run)?;
    let decode = run.config.limits.decode_options();
    ctx.progress.begin("score", todo.len() as u64);
    for p in todo {
        ctx.check_cancel()?;
        let cands: Vec<&CandidateRecord> = by_prompt[p.pid.as_str()]
            .iter()
            .copied()
            .filter(|c| pending(c))
            .collect();
        let questions: Vec<Question> = run
            .store
            .questions(&p.pid)?
            .iter()
            .map(to_question)
            .collect();
        let images: Vec<_> = cands
            .iter()
            .map(|c| match resolve_inside(&run.store_dir, &c.image) {
                Ok(path) => {
                    let img = load_image(&path, &decode);
                    (path, img)
                }
                Err(e) => (
                    c.image.clone().into(),
                    Err(agfsync_feedback::FeedbackError::Invalid(e.to_string())),
                ),
            })
            .collect();
        let request = ScoreRequest {
            prompt: &p.text,
            questions: &questions,
        };
        let reports = score_loaded(&images, &request, &scorers);
        let mut rows = Vec::new();
        for (c, rep) in cands.iter().zip(reports) {
            for o in metric_outcomes(&rep, &scorers) {
                rows.push(ScoreRecord {
                    pid: c.pid.clone(),
                    idx: c.idx,
                    metric: o.metric,
                    value: o.value,
                    version: o.version,
                    details: o.details,
                    error: o.error,
                });
            }
        }
        crate::fault::point("score.before_commit");
        run.store.upsert_scores(&rows)?;
        report.done += 1;
        ctx.progress.advance(1);
    }
    ctx.progress.end();
    Ok(report)
}

fn pairs_stage(run: &mut Run, ctx: &StageContext<'_>) -> Result<StageReport> {
    let cfg = &run.config.pairs;
    let prompts = run.store.prompts()?;
    // Candidates grouped by prompt once (candidates() is ordered by prompt
    // and index), so the stage stays linear in the size of the run.
    let mut by_prompt: HashMap<String, Vec<(i64, CandidateMetrics)>> = HashMap::new();
    for c in run.store.candidates(None)? {
        by_prompt
            .entry(c.pid)
            .or_default()
            .push((c.idx, CandidateMetrics::new()));
    }
    for s in run.store.scores()? {
        if let Some(group) = by_prompt.get_mut(&s.pid) {
            if let Some((_, m)) = group.iter_mut().find(|(i, _)| *i == s.idx) {
                m.insert(s.metric, s.value);
            }
        }
    }
    ctx.progress.begin("pairs", prompts.len() as u64);
    let mut records = Vec::new();
    for p in &prompts {
        let Some(cands) = by_prompt.get(&p.pid) else {
            continue;
        };
        records.push(choose_pair(
            &p.pid,
            cands,
            &cfg.weights,
            cfg.normalise,
            cfg.min_gap,
        ));
        ctx.progress.advance(1);
    }
    crate::fault::point("pairs.before_commit");
    run.store.replace_pairs(&records)?;
    ctx.progress.end();
    let pairs = records.iter().filter(|r| r.status == "pair").count();
    let mut notes = Vec::new();
    let skipped = records.len() - pairs;
    if skipped > 0 {
        let mut why: BTreeMap<&str, usize> = BTreeMap::new();
        for r in records.iter().filter(|r| r.status != "pair") {
            *why.entry(r.status.as_str()).or_default() += 1;
        }
        notes.push(format!("{skipped} prompt(s) gave no pair: {why:?}"));
    }
    Ok(StageReport {
        done: pairs,
        skipped,
        notes,
    })
}

/// Reads a candidate's final latents (`[1, C, H, W]`).
pub fn read_latents(store_dir: &Path, c: &CandidateRecord) -> Result<Tensor> {
    let path = resolve_inside(store_dir, &c.latents)?;
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(PipelineError::candle(format!("reading {}", path.display())))?;
    t.remove("latents").ok_or_else(|| PipelineError::Input {
        path,
        reason: "no `latents` tensor".into(),
    })
}
