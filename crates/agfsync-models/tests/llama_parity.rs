//! Parity of the Llama / Qwen2 decoder with transformers: the fixtures under
//! fixtures/parity/vqa were made by tools/parity/make_vqa_fixtures.py (a
//! tiny random `Qwen2ForCausalLM` with q/k/v biases, tied embeddings and
//! grouped-query attention, and the Llama LM inside a tiny random
//! `LlavaForConditionalGeneration`). Logits of every position, greedy
//! continuations, left-padded batches and cached (incremental) decoding
//! must all reproduce the unpadded, uncached references. A tiny random
//! `Qwen3ForCausalLM` (per-head query/key norms, no biases, its own head
//! width) is under fixtures/parity/qwen3, from
//! tools/parity/make_qwen3_fixtures.py.

use std::collections::HashMap;
use std::path::PathBuf;

use agfsync_models::llama::{CausalLm, KvCache, LlamaConfig, LmInput, LogitsAt};
use agfsync_models::weights::open_safetensors;
use anyhow::{Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity/vqa")
}

fn refs() -> Result<(HashMap<String, Tensor>, serde_json::Value)> {
    let t = candle_core::safetensors::load(root().join("ref.safetensors"), &Device::Cpu)?;
    let j = serde_json::from_str(&std::fs::read_to_string(root().join("ref.json"))?)?;
    Ok((t, j))
}

fn seqs(v: &serde_json::Value) -> Result<Vec<Vec<u32>>> {
    v.as_array()
        .context("sequences")?
        .iter()
        .map(|s| {
            s.as_array()
                .context("sequence")?
                .iter()
                .map(|x| x.as_u64().map(|x| x as u32).context("id"))
                .collect()
        })
        .collect()
}

fn qwen2() -> Result<CausalLm> {
    let dir = root().join("tiny-qwen2");
    let cfg = LlamaConfig::from_json(&std::fs::read_to_string(dir.join("config.json"))?)
        .map_err(anyhow::Error::msg)?;
    assert_eq!(cfg.model_type, "qwen2");
    assert!(cfg.qkv_bias && !cfg.o_bias && cfg.tie_word_embeddings);
    assert_eq!(cfg.rope_theta, 1e6);
    let vb = open_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu)?;
    Ok(CausalLm::new_causal_lm(&cfg, vb)?)
}

fn llava_lm() -> Result<CausalLm> {
    let dir = root().join("tiny-llava");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let cfg = LlamaConfig::from_value(&v["text_config"]).map_err(anyhow::Error::msg)?;
    assert!(!cfg.qkv_bias && cfg.num_key_value_heads == 2);
    let vb = open_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu)?;
    Ok(CausalLm::new(
        &cfg,
        vb.pp("language_model.model"),
        vb.pp("language_model.lm_head"),
    )?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn ids(s: &[u32]) -> Result<Tensor> {
    Ok(Tensor::from_vec(s.to_vec(), (1, s.len()), &Device::Cpu)?)
}

/// Every position's logits of each sequence alone, against the reference.
fn check_logits(
    lm: &CausalLm,
    sequences: &[Vec<u32>],
    key: &str,
    t: &HashMap<String, Tensor>,
) -> Result<f32> {
    let mut worst = 0f32;
    for (k, s) in sequences.iter().enumerate() {
        let mut cache = KvCache::new();
        let got = lm
            .forward(LmInput::Ids(&ids(s)?), None, &mut cache, LogitsAt::All)?
            .squeeze(0)?;
        let want = &t[&format!("{key}.{k}")];
        worst = worst.max(max_abs_diff(&got, want)?);
    }
    Ok(worst)
}

/// All sequences in one left-padded batch: each row's real positions must
/// match its reference.
fn check_padded_batch(
    lm: &CausalLm,
    sequences: &[Vec<u32>],
    key: &str,
    t: &HashMap<String, Tensor>,
) -> Result<f32> {
    let width = sequences.iter().map(Vec::len).max().context("empty")?;
    let mut flat = Vec::new();
    let mut mask = Vec::new();
    for s in sequences {
        let pad = width - s.len();
        flat.extend(std::iter::repeat_n(0u32, pad));
        flat.extend_from_slice(s);
        mask.extend(std::iter::repeat_n(0f32, pad));
        mask.extend(std::iter::repeat_n(1f32, s.len()));
    }
    let n = sequences.len();
    let input = Tensor::from_vec(flat, (n, width), &Device::Cpu)?;
    let mask = Tensor::from_vec(mask, (n, width), &Device::Cpu)?;
    let mut cache = KvCache::new();
    let got = lm.forward(LmInput::Ids(&input), Some(&mask), &mut cache, LogitsAt::All)?;
    let mut worst = 0f32;
    for (k, s) in sequences.iter().enumerate() {
        let pad = width - s.len();
        let row = got.i((k, pad..width))?;
        worst = worst.max(max_abs_diff(&row, &t[&format!("{key}.{k}")])?);
    }
    Ok(worst)
}

/// Feeding a sequence in two parts through the cache gives the same logits.
fn check_incremental(lm: &CausalLm, s: &[u32], want: &Tensor) -> Result<f32> {
    let split = s.len() / 2;
    let mut cache = KvCache::new();
    let a = lm.forward(
        LmInput::Ids(&ids(&s[..split])?),
        None,
        &mut cache,
        LogitsAt::All,
    )?;
    let b = lm.forward(
        LmInput::Ids(&ids(&s[split..])?),
        None,
        &mut cache,
        LogitsAt::All,
    )?;
    let got = Tensor::cat(&[&a.squeeze(0)?, &b.squeeze(0)?], 0)?;
    max_abs_diff(&got, want)
}

#[test]
fn qwen2_logits_match_transformers() -> Result<()> {
    let (t, j) = refs()?;
    let lm = qwen2()?;
    let sequences = seqs(&j["qwen2_sequences"])?;
    let single = check_logits(&lm, &sequences, "qwen2_logits", &t)?;
    let padded = check_padded_batch(&lm, &sequences, "qwen2_logits", &t)?;
    let incremental = check_incremental(&lm, &sequences[2], &t["qwen2_logits.2"])?;
    eprintln!("qwen2 max |logit diff|: single {single:e}, padded batch {padded:e}, incremental {incremental:e}");
    assert!(single < 1e-4, "{single}");
    assert!(padded < 1e-4, "{padded}");
    assert!(incremental < 1e-4, "{incremental}");
    Ok(())
}

#[test]
fn qwen3_logits_and_greedy_match_transformers() -> Result<()> {
    let root = root().join("../qwen3");
    let t = candle_core::safetensors::load(root.join("ref.safetensors"), &Device::Cpu)?;
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("ref.json"))?)?;
    let dir = root.join("tiny-qwen3");
    let cfg = LlamaConfig::from_json(&std::fs::read_to_string(dir.join("config.json"))?)
        .map_err(anyhow::Error::msg)?;
    assert_eq!(cfg.model_type, "qwen3");
    assert!(cfg.qk_norm && !cfg.qkv_bias && !cfg.tie_word_embeddings);
    // head_dim 12 is not hidden_size / heads (32 / 4).
    assert_eq!(cfg.head_dim, 12);
    let vb = open_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu)?;
    let lm = CausalLm::new_causal_lm(&cfg, vb)?;
    let sequences = seqs(&j["sequences"])?;
    let single = check_logits(&lm, &sequences, "logits", &t)?;
    let padded = check_padded_batch(&lm, &sequences, "logits", &t)?;
    let incremental = check_incremental(&lm, &sequences[2], &t["logits.2"])?;
    eprintln!("qwen3 max |logit diff|: single {single:e}, padded batch {padded:e}, incremental {incremental:e}");
    assert!(single < 1e-4, "{single}");
    assert!(padded < 1e-4, "{padded}");
    assert!(incremental < 1e-4, "{incremental}");
    for (k, s) in sequences.iter().enumerate() {
        let want: Vec<u32> = j["greedy"][k.to_string()]
            .as_array()
            .context("greedy")?
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect();
        let mut cache = KvCache::new();
        let (got, _) = lm.generate_greedy(LmInput::Ids(&ids(s)?), None, &mut cache, 6, &[])?;
        assert_eq!(got[0], want, "continuation of {s:?}");
    }
    Ok(())
}

#[test]
fn qwen2_greedy_matches_transformers_generate() -> Result<()> {
    let (_, j) = refs()?;
    let lm = qwen2()?;
    let sequences = seqs(&j["qwen2_sequences"])?;
    let want = seqs(&j["qwen2_greedy"])?;
    for (s, w) in sequences.iter().zip(&want) {
        let mut cache = KvCache::new();
        let (got, _) = lm.generate_greedy(LmInput::Ids(&ids(s)?), None, &mut cache, 5, &[95])?;
        let w: Vec<u32> = w.iter().copied().take_while(|&x| x != 95).collect();
        assert_eq!(got[0], w, "continuation of {s:?}");
    }
    Ok(())
}

#[test]
fn llava_language_model_matches_transformers() -> Result<()> {
    let (t, j) = refs()?;
    let lm = llava_lm()?;
    let sequences = seqs(&j["llama_sequences"])?;
    let single = check_logits(&lm, &sequences, "llama_logits", &t)?;
    let padded = check_padded_batch(&lm, &sequences, "llama_logits", &t)?;
    let incremental = check_incremental(&lm, &sequences[2], &t["llama_logits.2"])?;
    eprintln!("llama max |logit diff|: single {single:e}, padded batch {padded:e}, incremental {incremental:e}");
    assert!(single < 1e-4, "{single}");
    assert!(padded < 1e-4, "{padded}");
    assert!(incremental < 1e-4, "{incremental}");
    // Greedy in a padded batch equals each reference continuation.
    let want = seqs(&j["llama_greedy"])?;
    let width = sequences.iter().map(Vec::len).max().context("empty")?;
    let (mut flat, mut mask) = (Vec::new(), Vec::new());
    for s in &sequences {
        flat.extend(std::iter::repeat_n(0u32, width - s.len()));
        flat.extend_from_slice(s);
        mask.extend(std::iter::repeat_n(0f32, width - s.len()));
        mask.extend(std::iter::repeat_n(1f32, s.len()));
    }
    let n = sequences.len();
    let input = Tensor::from_vec(flat, (n, width), &Device::Cpu)?;
    let mask = Tensor::from_vec(mask, (n, width), &Device::Cpu)?;
    let mut cache = KvCache::new();
    let (got, _) = lm.generate_greedy(LmInput::Ids(&input), Some(&mask), &mut cache, 5, &[])?;
    assert_eq!(got, want);
    Ok(())
}

#[test]
fn configs_transformers_4_and_5_and_bad_ones() {
    let v4 = r#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "rope_theta": 500000.0}"#;
    let c = LlamaConfig::from_json(v4).expect("v4 config");
    assert_eq!(
        (c.head_dim, c.num_key_value_heads, c.rope_theta),
        (16, 4, 500000.0)
    );
    assert_eq!(c.vocab_size, 32000);
    let v5 = r#"{"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}}"#;
    let c = LlamaConfig::from_json(v5).expect("v5 config");
    assert_eq!(
        (c.rope_theta, c.qkv_bias, c.vocab_size),
        (1e6, true, 151_936)
    );
    let scaled = r#"{"model_type": "llama", "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0}}"#;
    let e = LlamaConfig::from_json(scaled).expect_err("llama3 scaling");
    assert!(e.contains("llama3"), "{e}");
    let gqa = r#"{"num_attention_heads": 6, "num_key_value_heads": 4}"#;
    assert!(LlamaConfig::from_json(gqa).is_err());
    assert!(LlamaConfig::from_json(r#"{"model_type": "gpt2"}"#).is_err());
    assert!(LlamaConfig::from_json(r#"{"hidden_size": "big"}"#).is_err());
}

/// A Qwen2 checkpoint whose config says `llama` still gets its q/k/v
/// biases: they are detected from the weights.
#[test]
fn qkv_biases_are_detected_from_the_weights() -> Result<()> {
    let (t, j) = refs()?;
    let dir = root().join("tiny-qwen2");
    let text = std::fs::read_to_string(dir.join("config.json"))?;
    let mut v: serde_json::Value = serde_json::from_str(&text)?;
    v["model_type"] = "llama".into();
    let cfg = LlamaConfig::from_value(&v).map_err(anyhow::Error::msg)?;
    assert!(!cfg.qkv_bias);
    let vb = open_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu)?;
    let lm = CausalLm::new_causal_lm(&cfg, vb)?;
    let sequences = seqs(&j["qwen2_sequences"])?;
    let d = check_logits(&lm, &sequences, "qwen2_logits", &t)?;
    assert!(d < 1e-4, "{d}");
    Ok(())
}
