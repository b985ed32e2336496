//! Parity of the BERT encoder and the sentence embedder with transformers:
//! the fixtures under fixtures/parity/bert were made by
//! tools/parity/make_bert_fixtures.py (a tiny random `BertModel` with a
//! pooler and a lower-casing WordPiece tokenizer). Token ids must be
//! identical; last hidden states of a right-padded batch, the pooler
//! output and the normalised CLS / mean embeddings must agree within 1e-4.

#![cfg(feature = "local")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use agfsync_author::embed::cosine;
use agfsync_author::{BertEmbedder, BertEmbedderOptions, Embedder, Pooling};
use agfsync_models::bert::{BertConfig, BertModel};
use agfsync_models::hub::ModelSource;
use agfsync_models::weights::open_safetensors;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

const TOL: f32 = 1e-4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity/bert")
}

fn refs() -> Result<(HashMap<String, Tensor>, Vec<String>)> {
    let t = candle_core::safetensors::load(root().join("ref.safetensors"), &Device::Cpu)?;
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("ref.json"))?)?;
    let sentences = j["sentences"]
        .as_array()
        .context("sentences")?
        .iter()
        .map(|s| s.as_str().map(String::from).context("sentence"))
        .collect::<Result<Vec<_>>>()?;
    Ok((t, sentences))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn embedder(dir: &Path, pooling: Option<Pooling>) -> Result<BertEmbedder> {
    Ok(BertEmbedder::from_source(
        &ModelSource::local(dir),
        &BertEmbedderOptions {
            pooling,
            ..Default::default()
        },
    )?)
}

fn model() -> Result<BertModel> {
    let dir = root().join("tiny-bert");
    let cfg = BertConfig::from_json(&std::fs::read_to_string(dir.join("config.json"))?)
        .map_err(anyhow::Error::msg)?;
    let vb = open_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu)?;
    Ok(BertModel::new(&cfg, vb)?)
}

#[test]
fn token_ids_match_transformers() -> Result<()> {
    let (t, sentences) = refs()?;
    let e = embedder(&root().join("tiny-bert"), None)?;
    let ids: Vec<Vec<i64>> = t["input_ids"].to_vec2()?;
    let mask: Vec<Vec<i64>> = t["attention_mask"].to_vec2()?;
    assert_eq!(e.max_len(), 64);
    for (k, s) in sentences.iter().enumerate() {
        let n = mask[k].iter().filter(|&&m| m == 1).count();
        let want: Vec<u32> = ids[k][..n].iter().map(|&x| x as u32).collect();
        assert_eq!(e.token_ids(s)?, want, "sentence {k}: {s:?}");
    }
    Ok(())
}

#[test]
fn hidden_states_and_pooler_match_transformers() -> Result<()> {
    let (t, _) = refs()?;
    let m = model()?;
    assert!(m.has_pooler());
    let hidden = m.forward(&t["input_ids"], None, Some(&t["attention_mask"]))?;
    let d_hidden = max_abs_diff(&hidden, &t["last_hidden_state"])?;
    let pooled = m.pool(&hidden)?.context("pooler")?;
    let d_pool = max_abs_diff(&pooled, &t["pooler_output"])?;
    println!("last_hidden_state max abs diff {d_hidden:e}, pooler_output {d_pool:e}");
    assert!(d_hidden < TOL, "last hidden states differ by {d_hidden}");
    assert!(d_pool < TOL, "pooler output differs by {d_pool}");
    Ok(())
}

#[test]
fn cls_and_mean_embeddings_match_sentence_transformers() -> Result<()> {
    let (t, sentences) = refs()?;
    for (pooling, key) in [(None, "cls"), (Some(Pooling::Mean), "mean")] {
        let e = embedder(&root().join("tiny-bert"), pooling)?;
        // The fixture's 1_Pooling/config.json asks for CLS, as bge's does.
        assert_eq!(e.pooling().name(), key);
        let got = e.embed(&sentences)?;
        let want: Vec<Vec<f32>> = t[key].to_vec2()?;
        let mut worst = 0f32;
        for (g, w) in got.iter().zip(&want) {
            for (a, b) in g.iter().zip(w) {
                worst = worst.max((a - b).abs());
            }
        }
        println!("{key} embeddings max abs diff {worst:e}");
        assert!(worst < TOL, "{key} embeddings differ by {worst}");
    }
    Ok(())
}

#[test]
fn punctuation_variants_are_near_duplicates_in_the_fixture() -> Result<()> {
    let (_, sentences) = refs()?;
    let e = embedder(&root().join("tiny-bert"), Some(Pooling::Mean))?;
    let v = e.embed(&sentences)?;
    // Sentences 0 and 1 differ in case and final punctuation only.
    let dup = cosine(&v[0], &v[1]);
    assert!(dup > 0.9, "near duplicates: {dup}");
    for k in 2..v.len() {
        let c = cosine(&v[0], &v[k]);
        assert!(c < dup, "sentence {k}: {c} >= {dup}");
    }
    Ok(())
}
