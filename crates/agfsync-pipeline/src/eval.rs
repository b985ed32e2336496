//! The eval stage and the report (AGFSync section 7): the base model and
//! the tuned one (base + the run's DPO LoRA) generate the benchmark's prompts
//! with the same seeds, every image is scored, and the per-prompt values
//! give paired statistics. Images already made or scored are not redone.
//!
//! Results: `eval_items` / `eval_scores` rows in the store, aggregates in
//! `evaluations`, `eval/<bench>/results.json`, and `agfsync report`'s
//! `report.html`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::Tensor;
use serde::Serialize;

use agfsync_diffusion::pipeline::{
    decode_latents, encode_prompts, random_latents, to_rgb8, Negative,
};
use agfsync_diffusion::rng::Generator;
use agfsync_dpo::data::mix;
use agfsync_eval::benchmarks::{read_hps_prompts_with, read_tifa_with};
use agfsync_eval::report::{GridRow, MetricSummary, Report, TrainPoint};
use agfsync_eval::stats::{chunked_mean_std, paired_bootstrap, PairedComparison};
use agfsync_feedback::image_input::load_image;
use agfsync_feedback::score_images::score_loaded;
use agfsync_feedback::scorer::{Question, ScoreRequest};
use agfsync_models::lora::{apply_lora, LoraFile, LoraMode, LoraTargets};
use agfsync_store::{resolve_inside, write_file_atomic, EvalItemRecord, EvalScoreRecord};

use crate::error::{PipelineError, Result};
use crate::prompts::{builtin_prompts, read_prompt_file_with};
use crate::run::{Run, StageContext};
use crate::stages::{encode_png, StageReport};

/// One benchmark prompt.
#[derive(Clone, Debug)]
pub struct EvalPrompt {
    /// The prompt.
    pub prompt: String,
    /// HPSv2 style, TIFA caption id, or empty.
    pub group: String,
    /// TIFA questions (empty otherwise).
    pub questions: Vec<Question>,
}

/// The benchmark's name (used in paths and rows) and its prompts.
pub fn benchmark(run: &Run) -> Result<(String, Vec<EvalPrompt>)> {
    let spec = run.config.eval.benchmark.clone();
    let limits = run.config.limits.input();
    let (name, mut items): (String, Vec<EvalPrompt>) = if spec == "builtin" {
        // The built-in prompts come with questions: VQA then scores them.
        let items = builtin_prompts()
            .into_iter()
            .map(|p| EvalPrompt {
                questions: crate::prompts::builtin_questions(&p)
                    .unwrap_or_default()
                    .iter()
                    .map(|q| Question {
                        question: q.question.clone(),
                        choices: q.choices.clone(),
                        answer: q.answer.clone(),
                        element_type: q.element_type.clone(),
                        element: q.element.clone(),
                    })
                    .collect(),
                prompt: p.text,
                group: p.category,
            })
            .collect();
        ("builtin".to_string(), items)
    } else if let Some(path) = spec.strip_prefix("tifa:") {
        let caps = read_tifa_with(&run.root.join(path), limits.max_file_bytes)?;
        let items = caps
            .into_iter()
            .map(|c| EvalPrompt {
                prompt: c.caption,
                group: c.id,
                questions: c
                    .questions
                    .into_iter()
                    .map(|q| Question {
                        question: q.question,
                        choices: q.choices,
                        answer: Some(q.answer),
                        element_type: Some(q.element_type),
                        element: Some(q.element),
                    })
                    .collect(),
            })
            .collect();
        ("tifa".to_string(), items)
    } else if let Some(path) = spec.strip_prefix("hps:") {
        let styles = read_hps_prompts_with(&run.root.join(path), limits.max_file_bytes)?;
        let items = styles
            .into_iter()
            .flat_map(|(style, prompts)| {
                prompts.into_iter().map(move |p| EvalPrompt {
                    prompt: p,
                    group: style.clone(),
                    questions: vec![],
                })
            })
            .collect();
        ("hps".to_string(), items)
    } else {
        let items = read_prompt_file_with(&run.root.join(&spec), &limits)?
            .into_iter()
            .map(|p| EvalPrompt {
                prompt: p.text,
                group: p.category,
                questions: vec![],
            })
            .collect();
        ("prompts".to_string(), items)
    };
    if run.config.eval.limit > 0 {
        items.truncate(run.config.eval.limit);
    }
    let source = run
        .root
        .join(spec.split_once(':').map_or(spec.as_str(), |(_, p)| p));
    for (i, item) in items.iter().enumerate() {
        limits.check_chars(&source, &format!("prompt {}", i + 1), &item.prompt)?;
    }
    Ok((name, items))
}

/// The models evaluated (`[eval] models`): name and LoRA file (`None` for
/// the base model). `tuned` is left out, with a note, until the run has a
/// trained LoRA.
fn models(run: &Run, notes: &mut Vec<String>) -> Result<Vec<(String, Option<PathBuf>)>> {
    let mut out = Vec::new();
    for spec in &run.config.eval.models {
        match spec.as_str() {
            "base" => out.push(("base".to_string(), None)),
            "tuned" => {
                // Training runs on the whole run: a shard finds its result
                // in the run's own store.
                let root_store;
                let (store, store_dir) = if run.shard == crate::Shard::ALL {
                    (&run.store, run.store_dir.as_path())
                } else {
                    root_store = agfsync_store::Store::open(&run.root)?;
                    (&root_store, run.root.as_path())
                };
                let trained = store
                    .trainings()?
                    .into_iter()
                    .find(|t| t.name == "dpo" && t.status == "done")
                    .and_then(|t| t.result);
                match trained {
                    // A LoRA file, or the `unet/` folder of a full run.
                    Some(rel) => {
                        let p = resolve_inside(store_dir, &rel)?;
                        if !p.exists() {
                            return Err(PipelineError::Invalid(format!(
                                "{}: the training result is missing; rerun `agfsync train`",
                                p.display()
                            )));
                        }
                        out.push(("tuned".to_string(), Some(p)));
                    }
                    None => notes.push("no trained LoRA yet: `tuned` is not evaluated".into()),
                }
            }
            other => {
                let Some((name, path)) = other.split_once('=') else {
                    return Err(PipelineError::Invalid(format!(
                        "eval.models: `{other}` is not base, tuned or NAME=PATH"
                    )));
                };
                let p = run.root.join(path.trim());
                if !p.exists() {
                    return Err(PipelineError::Invalid(format!(
                        "eval.models: {} (model `{name}`) does not exist: give a LoRA file, a \
                         diffusers pipeline folder or a UNet folder, relative to the run",
                        p.display()
                    )));
                }
                out.push((name.trim().to_string(), Some(p)));
            }
        }
    }
    if out.is_empty() {
        return Err(PipelineError::Invalid(
            "eval.models names no model to evaluate".into(),
        ));
    }
    Ok(out)
}

pub(crate) fn eval_stage(run: &mut Run, ctx: &StageContext<'_>) -> Result<StageReport> {
    let mut report = StageReport::default();
    if !run.config.eval.enabled {
        report.notes.push("eval.enabled = false: skipped".into());
        return Ok(report);
    }
    let (bench, items) = benchmark(run)?;
    let models = models(run, &mut report.notes)?;
    // A shard generates and scores its share of the items (the same
    // item-to-shard rule as for prompts); the summary needs every item, so
    // it waits for `agfsync merge` and an `agfsync eval` on the whole run.
    let owned: Vec<usize> = (0..items.len())
        .filter(|&i| run.shard.owns(i as i64))
        .collect();
    for (name, lora) in &models {
        report.done += generate_model(run, ctx, &bench, &items, &owned, name, lora.as_deref())?;
    }
    report.done += score_all(run, ctx, &bench, &items)?;
    if run.shard != crate::Shard::ALL {
        report.notes.push(format!(
            "shard {}: {} of {} items evaluated; merge the shards (`agfsync merge`) and run \
             `agfsync eval` on the whole run for the summary",
            run.shard,
            owned.len(),
            items.len()
        ));
        return Ok(report);
    }
    let results = summarise(run, &bench, &items)?;
    for m in &results.metrics {
        for (model, mean) in &m.means {
            run.store.set_evaluation(
                &bench,
                model,
                &m.metric,
                *mean,
                &m.version,
                &serde_json::json!({"n": m.counts.get(model)}),
            )?;
        }
    }
    let path = run.store_dir.join("eval").join(&bench).join("results.json");
    write_file_atomic(
        &path,
        serde_json::to_string_pretty(&results)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    report.notes.push(format!("results: {}", path.display()));
    Ok(report)
}

fn generate_model(
    run: &mut Run,
    ctx: &StageContext<'_>,
    bench: &str,
    items: &[EvalPrompt],
    owned: &[usize],
    model: &str,
    lora: Option<&std::path::Path>,
) -> Result<usize> {
    let have: std::collections::HashSet<i64> = run
        .store
        .eval_items(bench)?
        .into_iter()
        .filter(|i| i.model == model)
        .map(|i| i.item)
        .collect();
    let todo: Vec<usize> = owned
        .iter()
        .copied()
        .filter(|i| !have.contains(&(*i as i64)))
        .collect();
    if todo.is_empty() {
        return Ok(0);
    }
    // A folder with model_index.json is a whole diffusers pipeline (for
    // example a merged model); another folder is a UNet (a full DPO run's
    // `unet/`) swapped into the base pipeline; a file is a LoRA on the base.
    let pipeline_dir = lora.filter(|p| p.join("model_index.json").is_file());
    let (mut sd, _) = match pipeline_dir {
        Some(dir) => crate::stages::load_sd_from(run, &dir.display().to_string())?,
        None => crate::stages::load_sd_for(run)?,
    };
    if let Some(dir) = lora.filter(|p| p.is_dir() && pipeline_dir.is_none()) {
        let opts = agfsync_models::stable_diffusion::LoadOptions {
            dtype: run.dtype()?,
            device: run.device()?,
            variant: None,
        };
        sd.replace_unet(dir, &opts)?;
    }
    if let Some(path) = lora.filter(|p| p.is_file()) {
        let file = LoraFile::load(path)?;
        apply_lora(&file, &LoraTargets::of(&sd), "tuned", 1.0, LoraMode::Merge)
            .map_err(|e| PipelineError::Invalid(format!("{}: {e}", path.display())))?;
    }
    let g = run.config.generate.clone();
    let device = run.device()?;
    let setup = crate::stages::Sampling::new(&sd, &g)?;
    let (c, h, w) = setup.latent;
    let xl = setup.xl;
    ctx.progress
        .begin(&format!("eval {model}"), todo.len() as u64);
    let mut done = 0;
    for real in todo.chunks(g.batch_size) {
        ctx.check_cancel()?;
        // Every batch runs at the configured size (the last one padded by
        // repeating its last item, dropped afterwards), so that an image's
        // pixels do not depend on which items share its batch: shards and
        // resumed runs give the same images as one uninterrupted run.
        let mut batch = real.to_vec();
        batch.resize(g.batch_size.max(real.len()), real[real.len() - 1]);
        let texts: Vec<String> = batch.iter().map(|&i| items[i].prompt.clone()).collect();
        let neg = if g.guidance_scale > 1.0 {
            Negative::Default
        } else {
            Negative::None
        };
        let (text, _) = encode_prompts(&sd, &texts, neg, None, xl.as_ref())
            .map_err(PipelineError::candle("encoding prompts"))?;
        let seeds: Vec<u64> = batch
            .iter()
            .map(|&i| mix(run.config.eval.seed, 0x6576_616c, i as u64) >> 1)
            .collect();
        let lat = seeds
            .iter()
            .map(|&s| random_latents(&mut Generator::new(s), (1, c, h, w), &device))
            .collect::<candle_core::Result<Vec<_>>>()
            .and_then(|v| Tensor::cat(&v, 0))
            .map_err(PipelineError::candle("initial latents"))?;
        let fin = setup.denoise(&sd, &g, &lat, &text, seeds[0] ^ 0x5eed)?;
        let images = decode_latents(&sd, &fin).map_err(PipelineError::candle("VAE decode"))?;
        let mut records = Vec::new();
        for (j, (iw, ih, rgb)) in to_rgb8(&images)
            .map_err(PipelineError::candle("images"))?
            .into_iter()
            .enumerate()
            .take(real.len())
        {
            let i = batch[j];
            let rel = format!("eval/{bench}/{model}/{i:05}.png");
            let params =
                serde_json::json!({"prompt": items[i].prompt, "seed": seeds[j], "model": model});
            let png = encode_png(iw, ih, &rgb, &[("agfsync", params.to_string())])?;
            write_file_atomic(&resolve_inside(&run.store_dir, &rel)?, &png)?;
            records.push(EvalItemRecord {
                bench: bench.to_string(),
                model: model.to_string(),
                item: i as i64,
                prompt: items[i].prompt.clone(),
                grp: items[i].group.clone(),
                seed: seeds[j],
                image: rel,
            });
        }
        crate::fault::point("eval.before_commit");
        run.store.insert_eval_items(&records)?;
        done += records.len();
        ctx.progress.advance(records.len() as u64);
    }
    ctx.progress.end();
    Ok(done)
}

fn score_all(
    run: &mut Run,
    ctx: &StageContext<'_>,
    bench: &str,
    items: &[EvalPrompt],
) -> Result<usize> {
    let metrics = run.config.eval.metrics.clone();
    let scored: std::collections::HashSet<(String, i64, String)> = run
        .store
        .eval_scores(bench)?
        .into_iter()
        .map(|s| (s.model, s.item, s.metric))
        .collect();
    let todo: Vec<EvalItemRecord> = run
        .store
        .eval_items(bench)?
        .into_iter()
        .filter(|i| {
            metrics
                .iter()
                .any(|m| !scored.contains(&(i.model.clone(), i.item, m.clone())))
        })
        .collect();
    if todo.is_empty() {
        return Ok(0);
    }
    let scorers = crate::stages::load_scorers_for(run, &metrics)?;
    let decode = run.config.limits.decode_options();
    ctx.progress.begin("eval score", todo.len() as u64);
    // One batch per benchmark item: every model's image of that prompt,
    // scored together against the item's prompt and questions.
    let mut by_item: BTreeMap<i64, Vec<&EvalItemRecord>> = BTreeMap::new();
    for it in &todo {
        by_item.entry(it.item).or_default().push(it);
    }
    for (item, group) in by_item {
        ctx.check_cancel()?;
        let images = group
            .iter()
            .map(|it| {
                let path = resolve_inside(&run.store_dir, &it.image)?;
                let img = load_image(&path, &decode);
                Ok((path, img))
            })
            .collect::<Result<Vec<_>>>()?;
        let questions = items
            .get(item as usize)
            .map(|p| p.questions.clone())
            .unwrap_or_default();
        let request = ScoreRequest {
            prompt: &group[0].prompt,
            questions: &questions,
        };
        let mut rows = Vec::new();
        for (it, rep) in group.iter().zip(score_loaded(&images, &request, &scorers)) {
            for o in crate::stages::metric_outcomes(&rep, &scorers) {
                rows.push(EvalScoreRecord {
                    bench: bench.to_string(),
                    model: it.model.clone(),
                    item,
                    metric: o.metric,
                    value: o.value,
                    version: o.version,
                    details: o.details,
                    error: o.error,
                });
            }
        }
        crate::fault::point("eval_score.before_commit");
        run.store.upsert_eval_scores(&rows)?;
        ctx.progress.advance(group.len() as u64);
    }
    ctx.progress.end();
    Ok(todo.len())
}

/// The evaluation's numbers: per metric, each model's mean and the paired
/// comparison of `tuned` against `base`; HPSv2 per style.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EvalResults {
    /// Benchmark name.
    pub benchmark: String,
    /// Models, baseline first.
    pub models: Vec<String>,
    /// Per-metric summaries.
    pub metrics: Vec<MetricSummary>,
    /// Model -> group (style) -> (mean, std over 10 chunks) per metric `metric/group`.
    pub by_group: BTreeMap<String, BTreeMap<String, (f64, f64)>>,
}

/// Summarises the evaluation scores of a benchmark (reads only; the eval
/// stage records the aggregates in the store's `evaluations` table).
pub fn summarise(run: &Run, bench: &str, items: &[EvalPrompt]) -> Result<EvalResults> {
    let scores = run.store.eval_scores(bench)?;
    let mut models: Vec<String> = Vec::new();
    for s in &scores {
        if !models.contains(&s.model) {
            models.push(s.model.clone());
        }
    }
    // The config's order: the first model is the baseline.
    let order = &run.config.eval.models;
    let rank = |m: &String| {
        order
            .iter()
            .position(|o| o == m || o.split_once('=').is_some_and(|(n, _)| n.trim() == m))
            .unwrap_or(usize::MAX)
    };
    models.sort_by_key(|m| (rank(m), m.clone()));
    let mut metrics: Vec<String> = scores.iter().map(|s| s.metric.clone()).collect();
    metrics.sort();
    metrics.dedup();
    let mut out = EvalResults {
        benchmark: bench.to_string(),
        models: models.clone(),
        ..EvalResults::default()
    };
    // model -> metric -> item -> value
    let mut table: BTreeMap<&str, BTreeMap<&str, BTreeMap<i64, f64>>> = BTreeMap::new();
    let mut versions: BTreeMap<&str, &str> = BTreeMap::new();
    for s in &scores {
        if let Some(v) = s.value {
            table
                .entry(&s.model)
                .or_default()
                .entry(&s.metric)
                .or_default()
                .insert(s.item, v);
            versions.insert(&s.metric, &s.version);
        }
    }
    for m in &metrics {
        let mut summary = MetricSummary {
            metric: m.clone(),
            version: versions
                .get(m.as_str())
                .map(|v| v.to_string())
                .unwrap_or_default(),
            ..MetricSummary::default()
        };
        for model in &models {
            if let Some(vals) = table.get(model.as_str()).and_then(|t| t.get(m.as_str())) {
                let v: Vec<f64> = vals.values().copied().collect();
                let mean = agfsync_eval::stats::mean(&v);
                summary.means.insert(model.clone(), mean);
                summary.counts.insert(model.clone(), v.len());
                // Per group (HPSv2 style): mean and spread over 10 chunks.
                let mut groups: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
                for (item, val) in vals {
                    if let Some(p) = items.get(*item as usize) {
                        groups.entry(p.group.as_str()).or_default().push(*val);
                    }
                }
                if bench == "hps" {
                    for (g, v) in groups {
                        out.by_group
                            .entry(model.clone())
                            .or_default()
                            .insert(format!("{m}/{g}"), chunked_mean_std(&v, 10));
                    }
                }
            }
        }
        if let [a, b, ..] = models.as_slice() {
            summary.comparison = paired(
                &table,
                a,
                b,
                m,
                run.config.eval.resamples,
                run.config.eval.seed,
            );
        }
        out.metrics.push(summary);
    }
    Ok(out)
}

fn paired(
    table: &BTreeMap<&str, BTreeMap<&str, BTreeMap<i64, f64>>>,
    a: &str,
    b: &str,
    metric: &str,
    resamples: usize,
    seed: u64,
) -> Option<PairedComparison> {
    let ta = table.get(a)?.get(metric)?;
    let tb = table.get(b)?.get(metric)?;
    let (va, vb): (Vec<f64>, Vec<f64>) = ta
        .iter()
        .filter_map(|(i, x)| Some((*x, *tb.get(i)?)))
        .unzip();
    paired_bootstrap(&va, &vb, resamples.max(1), 0.95, seed).ok()
}

/// Builds the report of a run: the evaluation's summary, the training
/// curve, and an image grid (up to `max_rows` prompts).
pub fn build_report(run: &Run, max_rows: usize) -> Result<Report> {
    let (bench, items) = benchmark(run)?;
    let results = summarise(run, &bench, &items)?;
    let mut report = Report {
        title: format!(
            "agfsync report: {}",
            run.root
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ),
        models: results.models.clone(),
        metrics: results.metrics.clone(),
        ..Report::default()
    };
    for (model, groups) in &results.by_group {
        for (k, v) in groups {
            if let Some(style) = k.strip_prefix("hps/") {
                report
                    .hps_by_style
                    .entry(model.clone())
                    .or_default()
                    .insert(style.to_string(), *v);
            }
        }
    }
    if bench == "tifa" {
        // TIFA per element type, from the VQA scorer's per-question results.
        let scores = run.store.eval_scores(&bench)?;
        for model in &results.models {
            let mut by_type: BTreeMap<String, (f64, f64)> = BTreeMap::new();
            for s in scores
                .iter()
                .filter(|s| &s.model == model && s.metric == "vqa")
            {
                let Some(item) = items.get(s.item as usize) else {
                    continue;
                };
                for (qi, q) in item.questions.iter().enumerate() {
                    if let Some(c) = s.details.get(&format!("q{qi}.correct")) {
                        let e = by_type
                            .entry(q.element_type.clone().unwrap_or_else(|| "other".into()))
                            .or_default();
                        e.0 += c;
                        e.1 += 1.0;
                    }
                }
            }
            if !by_type.is_empty() {
                report.tifa_by_type.insert(
                    model.clone(),
                    by_type.into_iter().map(|(k, (c, n))| (k, c / n)).collect(),
                );
            }
        }
    }
    let metrics_path = run
        .store_dir
        .join(crate::train::TRAIN_DIR)
        .join("metrics.jsonl");
    if let Ok(text) = std::fs::read_to_string(&metrics_path) {
        for line in text.lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                if let (Some(step), Some(loss)) = (v["step"].as_f64(), v["loss"].as_f64()) {
                    report.training.push(TrainPoint {
                        step,
                        loss,
                        accuracy: v["implicit_acc"].as_f64(),
                    });
                }
            }
        }
    }
    let all = run.store.eval_items(&bench)?;
    let scores = run.store.eval_scores(&bench)?;
    for (i, p) in items.iter().enumerate().take(max_rows) {
        let mut row = GridRow {
            prompt: p.prompt.clone(),
            ..GridRow::default()
        };
        for model in &results.models {
            let Some(it) = all.iter().find(|x| &x.model == model && x.item == i as i64) else {
                continue;
            };
            row.seed = it.seed;
            let path = resolve_inside(&run.store_dir, &it.image)?;
            let png = std::fs::read(&path).map_err(|e| PipelineError::io(&path, e))?;
            let s: BTreeMap<String, f64> = scores
                .iter()
                .filter(|s| &s.model == model && s.item == i as i64)
                .filter_map(|s| Some((s.metric.clone(), s.value?)))
                .collect();
            row.images.push((model.clone(), png, s));
        }
        if !row.images.is_empty() {
            report.grid.push(row);
        }
    }
    report.notes.push(format!(
        "benchmark `{bench}` ({} prompts), eval seed {}, {} bootstrap resamples, 95% intervals",
        items.len(),
        run.config.eval.seed,
        run.config.eval.resamples
    ));
    Ok(report)
}
