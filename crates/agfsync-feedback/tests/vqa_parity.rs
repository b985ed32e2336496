//! Parity of the VQA score with transformers: the fixtures under
//! fixtures/parity/vqa were made by tools/parity/make_vqa_fixtures.py from a
//! tiny random `LlavaForConditionalGeneration` (CLIP tower + Llama LM with
//! grouped-query attention), a word-level tokenizer.json and images written
//! by Pillow. Pixel values, image features, prompt ids, last-position
//! logits, P(yes), greedy answers and multiple-choice log-likelihoods must
//! reproduce the references. Also: the tiny writer, and bad model folders.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agfsync_feedback::image_input::{load_image, DecodeOptions, LoadedImage};
use agfsync_feedback::llava::{write_tiny_llava, Llava, LlavaLoadOptions};
use agfsync_feedback::scorer::{BatchCache, Question, ScoreRequest, Scorer};
use agfsync_feedback::vqa::{VqaOptions, VqaScorer};
use agfsync_models::hub::ModelSource;
use agfsync_models::llama::{LmInput, LogitsAt};
use anyhow::{Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity/vqa")
}

struct Fixture {
    t: HashMap<String, Tensor>,
    j: serde_json::Value,
}

fn fixture() -> Result<Fixture> {
    Ok(Fixture {
        t: candle_core::safetensors::load(root().join("ref.safetensors"), &Device::Cpu)?,
        j: serde_json::from_str(&std::fs::read_to_string(root().join("ref.json"))?)?,
    })
}

impl Fixture {
    fn get(&self, k: &str) -> Result<&Tensor> {
        self.t.get(k).with_context(|| format!("no tensor `{k}`"))
    }
    fn strings(&self, k: &str) -> Result<Vec<String>> {
        self.j[k]
            .as_array()
            .with_context(|| format!("ref.json: {k}"))?
            .iter()
            .map(|x| x.as_str().map(str::to_string).context("string"))
            .collect()
    }
}

fn ids(v: &serde_json::Value) -> Result<Vec<u32>> {
    v.as_array()
        .context("ids")?
        .iter()
        .map(|x| x.as_u64().map(|x| x as u32).context("id"))
        .collect()
}

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar()?)
}

fn model() -> Result<Llava> {
    Ok(Llava::load(
        &ModelSource::local(root().join("tiny-llava")),
        &LlavaLoadOptions::default(),
    )?)
}

fn image(name: &str) -> Result<LoadedImage> {
    Ok(load_image(
        root().join("images").join(name),
        &DecodeOptions::default(),
    )?)
}

fn questions(f: &Fixture) -> Result<Vec<Question>> {
    let mut qs: Vec<Question> = f
        .strings("questions")?
        .into_iter()
        .map(|q| Question {
            question: q,
            choices: vec!["yes".into(), "no".into()],
            ..Question::default()
        })
        .collect();
    for mc in f.j["mc"].as_array().context("mc")? {
        qs.push(Question {
            question: mc["question"].as_str().context("q")?.to_string(),
            choices: mc["choices"]
                .as_array()
                .context("choices")?
                .iter()
                .filter_map(|c| c.as_str().map(str::to_string))
                .collect(),
            answer: Some("red".into()),
            ..Question::default()
        });
    }
    Ok(qs)
}

const VQASCORE_PROMPT: &str = "a red cube on a blue sphere";

/// Pixel values, image features, prompt ids and last-position logits of
/// every (image, prompt), through the cached image prefix.
#[test]
fn llava_matches_transformers() -> Result<()> {
    let f = fixture()?;
    let m = model()?;
    let prompts = f.strings("prompts")?;
    let want_ids = f.j["prompt_input_ids"].as_array().context("ids")?;
    for (p, w) in prompts.iter().zip(want_ids) {
        let got = m.expanded_ids(&m.encode_prompt(p)?);
        assert_eq!(got, ids(w)?, "ids of {p:?}");
    }
    let logits_ref = f.get("logits")?;
    let (mut worst_px, mut worst_feat, mut worst_logit) = (0f32, 0f32, 0f32);
    for (i, name) in f.strings("images")?.iter().enumerate() {
        let key = name.replace('.', "_");
        let img = image(name)?;
        let (px, (h, w)) = m.processor().pixel_values(&img)?;
        let pv = Tensor::from_vec(px, (1, 3, h, w), &Device::Cpu)?;
        worst_px = worst_px.max(max_abs(
            &pv.squeeze(0)?,
            f.get(&format!("pixel_values.{key}"))?,
        )?);
        // Features from the reference pixels isolate the network from preprocessing.
        let ref_pv = f.get(&format!("pixel_values.{key}"))?.unsqueeze(0)?;
        let feats = m.image_features(&ref_pv)?.squeeze(0)?;
        worst_feat = worst_feat.max(max_abs(&feats, f.get(&format!("image_features.{key}"))?)?);
        for (k, p) in prompts.iter().enumerate() {
            let ids = m.encode_prompt(p)?;
            let mut cache = m.prefix_cache(&ids.before, &feats)?;
            let after = Tensor::from_vec(ids.after.clone(), (1, ids.after.len()), &Device::Cpu)?;
            let got = m
                .lm()
                .forward(LmInput::Ids(&after), None, &mut cache, LogitsAt::Last)?
                .squeeze(0)?;
            worst_logit = worst_logit.max(max_abs(&got, &logits_ref.i((i, k))?)?);
        }
    }
    eprintln!("llava max |diff|: pixel values {worst_px:e}, image features {worst_feat:e}, last logits {worst_logit:e}");
    assert!(worst_px < 1e-5, "{worst_px}");
    assert!(worst_feat < 1e-4, "{worst_feat}");
    assert!(worst_logit < 1e-4, "{worst_logit}");
    Ok(())
}

/// The scorer's prompts, P(yes), VQAScore, greedy answers and
/// multiple-choice log-likelihoods (questions batched with left padding).
#[test]
fn vqa_scorer_matches_transformers() -> Result<()> {
    let f = fixture()?;
    let scorer = VqaScorer::new(Arc::new(model()?), VqaOptions::default())?;
    let (yes, no) = scorer.answer_ids();
    assert_eq!(yes, ids(&f.j["yes_ids"])?.as_slice());
    assert_eq!(no, ids(&f.j["no_ids"])?.as_slice());
    let qs = questions(&f)?;
    let prompts = f.strings("prompts")?;
    for (q, p) in qs.iter().zip(&prompts).take(3) {
        assert_eq!(&scorer.chat_prompt(&scorer.question_text(q)), p);
    }
    let mc_split = f.j["mc_split_first_image"].as_array().context("mc split")?;
    assert_eq!(
        scorer.chat_prompt(&scorer.question_text(&qs[3])),
        mc_split[0]["prompt"].as_str().context("prompt")?
    );
    let names = f.strings("images")?;
    let images: Vec<LoadedImage> = names.iter().map(|n| image(n)).collect::<Result<_>>()?;
    let refs: Vec<&LoadedImage> = images.iter().collect();
    let answers = scorer.answer(&refs, VQASCORE_PROMPT, &qs)?;
    let p_yes: Vec<Vec<f64>> = f.get("p_yes")?.to_vec2()?;
    let p_no: Vec<Vec<f64>> = f.get("p_no")?.to_vec2()?;
    let mc: Vec<Vec<Vec<f64>>> = f.get("mc_loglik")?.to_vec3()?;
    let (mut worst_p, mut worst_ll) = (0f64, 0f64);
    for (i, (name, a)) in names.iter().zip(answers).enumerate() {
        let a = a?;
        let greedy = f.j["greedy"][name].as_array().context("greedy")?;
        for k in 0..3 {
            let ans = &a.answers[k];
            worst_p = worst_p
                .max((ans.p_yes.context("p_yes")? - p_yes[i][k]).abs())
                .max((ans.p_no.context("p_no")? - p_no[i][k]).abs());
            assert_eq!(ans.token_ids, ids(&greedy[k])?, "{name} q{k}");
        }
        worst_p = worst_p.max((a.vqascore.context("vqascore")? - p_yes[i][3]).abs());
        for (m, row) in mc[i].iter().enumerate() {
            let got = &a.answers[3 + m].choice_logliks;
            assert_eq!(got.len(), row.len());
            for (g, w) in got.iter().zip(row) {
                worst_ll = worst_ll.max((g - w).abs());
            }
            let best = row
                .iter()
                .enumerate()
                .max_by(|x, y| x.1.total_cmp(y.1))
                .map(|(i, _)| i);
            assert_eq!(a.answers[3 + m].choice, best, "{name} mc{m}");
        }
    }
    eprintln!("vqa max |diff|: P(yes)/P(no) {worst_p:e}, MC log-likelihood {worst_ll:e}");
    assert!(worst_p < 1e-5, "{worst_p}");
    assert!(worst_ll < 1e-3, "{worst_ll}");
    Ok(())
}

/// One row per forward (no padding) gives the same answers as the batch.
#[test]
fn batching_does_not_change_answers() -> Result<()> {
    let f = fixture()?;
    let m = Arc::new(model()?);
    let qs = questions(&f)?;
    let img = image("wide.png")?;
    let batched = VqaScorer::new(m.clone(), VqaOptions::default())?;
    let single = VqaScorer::new(
        m,
        VqaOptions {
            rows_per_forward: 1,
            ..VqaOptions::default()
        },
    )?;
    let a = batched.answer(&[&img], VQASCORE_PROMPT, &qs)?.remove(0)?;
    let b = single.answer(&[&img], VQASCORE_PROMPT, &qs)?.remove(0)?;
    for (x, y) in a.answers.iter().zip(&b.answers) {
        assert_eq!(x.token_ids, y.token_ids);
        assert_eq!(x.choice, y.choice);
        if let (Some(p), Some(q)) = (x.p_yes, y.p_yes) {
            assert!((p - q).abs() < 1e-6, "{p} vs {q}");
        }
    }
    Ok(())
}

fn score(dir: &Path, questions: &[Question]) -> Result<agfsync_feedback::scorer::ScoreResult> {
    let m = Llava::load(&ModelSource::local(dir), &LlavaLoadOptions::default())?;
    let scorer = VqaScorer::new(Arc::new(m), VqaOptions::default())?;
    let img = image("big.png")?;
    let req = ScoreRequest {
        prompt: VQASCORE_PROMPT,
        questions,
    };
    let mut out = scorer.score_batch(&[&img], &req, &mut BatchCache::new())?;
    Ok(out.remove(0)?)
}

/// The tiny writer's folder loads and scores; the same seed writes the
/// same weights.
#[test]
fn tiny_llava_scores_offline() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_tiny_llava(&a, 7)?;
    write_tiny_llava(&b, 7)?;
    assert_eq!(
        std::fs::read(a.join("model.safetensors"))?,
        std::fs::read(b.join("model.safetensors"))?
    );
    let qs = vec![
        Question {
            question: "is there a red cube ?".into(),
            ..Question::default()
        },
        Question {
            question: "What color is the cube ?".into(),
            choices: vec!["red".into(), "blue".into()],
            answer: Some("blue".into()),
            ..Question::default()
        },
    ];
    let r = score(&a, &qs)?;
    assert_eq!(r.metric, "vqa");
    assert!((0.0..=100.0).contains(&r.value));
    for k in [
        "vqascore",
        "p_yes_mean",
        "questions",
        "correct",
        "q0.p_yes",
        "q1.answer",
    ] {
        assert!(r.details.contains_key(k), "{k} missing: {:?}", r.details);
    }
    assert_eq!(r.details["questions"], 2.0);
    assert!(r.version.contains("vqa-score/1"), "{}", r.version);
    // Without questions the value is 100 * VQAScore.
    let r = score(&a, &[])?;
    assert!((r.value - 100.0 * r.details["vqascore"]).abs() < 1e-9);
    Ok(())
}

/// Missing files are named with the fix; a config of another model type is
/// refused with what is supported.
#[test]
fn bad_model_folders_are_explained() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("llava");
    write_tiny_llava(&dir, 1)?;
    let load = |d: &Path| Llava::load(&ModelSource::local(d), &LlavaLoadOptions::default());

    std::fs::rename(dir.join("tokenizer.json"), tmp.path().join("tok.json"))?;
    let e = load(&dir).expect_err("no tokenizer").to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("save_pretrained"),
        "{e}"
    );
    std::fs::rename(tmp.path().join("tok.json"), dir.join("tokenizer.json"))?;

    std::fs::rename(
        dir.join("preprocessor_config.json"),
        tmp.path().join("p.json"),
    )?;
    let e = load(&dir).expect_err("no processor").to_string();
    assert!(e.contains("preprocessor_config.json"), "{e}");
    std::fs::rename(
        tmp.path().join("p.json"),
        dir.join("preprocessor_config.json"),
    )?;

    let pre = std::fs::read_to_string(dir.join("preprocessor_config.json"))?;
    std::fs::write(
        dir.join("preprocessor_config.json"),
        pre.replacen('{', "{\"do_pad\": true,", 1),
    )?;
    let e = load(&dir).expect_err("pad to square").to_string();
    assert!(
        e.contains("do_pad") && e.contains("preprocessor_config.json"),
        "{e}"
    );
    std::fs::write(dir.join("preprocessor_config.json"), &pre)?;

    std::fs::rename(dir.join("model.safetensors"), tmp.path().join("m.st"))?;
    let e = load(&dir).expect_err("no weights").to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::rename(tmp.path().join("m.st"), dir.join("model.safetensors"))?;

    let cfg = std::fs::read_to_string(dir.join("config.json"))?;
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"llava\"", "\"qwen2_vl\""),
    )?;
    let e = load(&dir).expect_err("wrong type").to_string();
    assert!(e.contains("config.json") && e.contains("llava"), "{e}");
    std::fs::write(dir.join("config.json"), &cfg)?;

    std::fs::write(dir.join("tokenizer.json"), "{ not json")?;
    let e = load(&dir).expect_err("bad tokenizer").to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    Ok(())
}

/// The other key layouts load to the same model: transformers 5's module
/// names (`model.vision_tower.vision_model.*`, `model.language_model.*`,
/// `lm_head.*`), and the hub's llava-hf names (`vision_tower.vision_model.*`,
/// `language_model.model.*`) in a sharded checkpoint.
#[test]
fn every_key_layout_and_sharding_load() -> Result<()> {
    let f = fixture()?;
    let src = root().join("tiny-llava");
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu)?;
    let rename = |k: &str, modules: bool| -> String {
        let k = match k.strip_prefix("vision_tower.") {
            Some(rest) => format!("vision_tower.vision_model.{rest}"),
            None => k.to_string(),
        };
        if !modules {
            return k;
        }
        if let Some(rest) = k.strip_prefix("language_model.model.") {
            format!("model.language_model.{rest}")
        } else if let Some(rest) = k.strip_prefix("language_model.lm_head.") {
            format!("lm_head.{rest}")
        } else {
            format!("model.{k}")
        }
    };
    let tmp = tempfile::tempdir()?;
    let prompt = &f.strings("prompts")?[0];
    let want = f.get("logits")?.i((0, 0))?;
    for (name, modules, sharded) in [("modules", true, false), ("hub", false, true)] {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir)?;
        for file in ["config.json", "tokenizer.json", "preprocessor_config.json"] {
            std::fs::copy(src.join(file), dir.join(file))?;
        }
        let renamed: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, v)| (rename(k, modules), v.clone()))
            .collect();
        if sharded {
            let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
            let mut map = serde_json::Map::new();
            for (k, v) in renamed {
                let s = usize::from(k.starts_with("language_model."));
                let file = format!("model-0000{}-of-00002.safetensors", s + 1);
                map.insert(k.clone(), serde_json::Value::String(file));
                shards[s].insert(k, v);
            }
            for (s, shard) in shards.iter().enumerate() {
                candle_core::safetensors::save(
                    shard,
                    dir.join(format!("model-0000{}-of-00002.safetensors", s + 1)),
                )?;
            }
            let index = serde_json::json!({"metadata": {}, "weight_map": map});
            std::fs::write(
                dir.join("model.safetensors.index.json"),
                serde_json::to_string(&index)?,
            )?;
        } else {
            candle_core::safetensors::save(&renamed, dir.join("model.safetensors"))?;
        }
        let m = Llava::load(&ModelSource::local(&dir), &LlavaLoadOptions::default())?;
        let feats = m
            .image_features(&f.get("pixel_values.wide_png")?.unsqueeze(0)?)?
            .squeeze(0)?;
        let ids = m.encode_prompt(prompt)?;
        let mut cache = m.prefix_cache(&ids.before, &feats)?;
        let after = Tensor::from_vec(ids.after.clone(), (1, ids.after.len()), &Device::Cpu)?;
        let got = m
            .lm()
            .forward(LmInput::Ids(&after), None, &mut cache, LogitsAt::Last)?
            .squeeze(0)?;
        let d = max_abs(&got, &want)?;
        assert!(d < 1e-4, "{name}: {d}");
    }
    Ok(())
}
