//! A BERT-family sentence embedder for near-duplicate removal (AGFSync,
//! An et al. 2024, uses bge-large-en-v1.5: Xiao et al., "C-Pack: Packaged
//! Resources To Advance General Chinese Embedding", 2023).
//!
//! Reference: sentence-transformers' `Transformer` + `Pooling` +
//! `Normalize` modules over transformers' `BertModel`
//! ([`agfsync_models::bert`]). A model is a transformers folder or hub repo
//! with `config.json`, `model.safetensors` and `tokenizer.json`; the
//! pooling comes from the sentence-transformers file
//! `1_Pooling/config.json` (`pooling_mode_cls_token` for bge,
//! `pooling_mode_mean_tokens` for most others) and defaults to the `[CLS]`
//! state when the file is absent, as bge's model card prescribes. Texts are
//! truncated to the model's limit, embedded in padded batches and
//! L2-normalised. bge's query instruction is not prepended: AGFSync embeds
//! documents (prompts and questions) against each other.

use std::path::{Path, PathBuf};

use agfsync_models::bert::{BertConfig, BertModel};
use agfsync_models::hub::{find_weights, resolve_model, HubOptions, ModelSource};
use agfsync_models::weights::open_safetensors;
use candle_core::{DType, Device, IndexOp, Tensor, D};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokenizers::{Tokenizer, TruncationParams};

use crate::embed::Embedder;
use crate::error::{AuthorError, Result};

pub use agfsync_models::bert::write_tiny_bert;

/// How the token states of a text become one vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// The state of the first token (`[CLS]`): bge.
    Cls,
    /// The mean of the real (unpadded) tokens' states.
    Mean,
}

impl Pooling {
    /// The name used in identities and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Cls => "cls",
            Self::Mean => "mean",
        }
    }

    /// Reads a sentence-transformers `1_Pooling/config.json`; exactly one
    /// of the CLS and mean modes must be set and no other mode.
    pub fn from_config(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthorError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |reason: String| {
            AuthorError::Embed(format!(
                "{}: not a usable sentence-transformers pooling config: {reason}",
                path.display()
            ))
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if !v.is_object() {
            return Err(bad("not a JSON object".into()));
        }
        let on = |key: &str| v.get(key).and_then(Value::as_bool) == Some(true);
        for key in [
            "pooling_mode_max_tokens",
            "pooling_mode_mean_sqrt_len_tokens",
            "pooling_mode_weightedmean_tokens",
            "pooling_mode_lasttoken",
        ] {
            if on(key) {
                return Err(bad(format!(
                    "`{key}` is not implemented (cls or mean only)"
                )));
            }
        }
        match (on("pooling_mode_cls_token"), on("pooling_mode_mean_tokens")) {
            (true, false) => Ok(Self::Cls),
            (false, true) => Ok(Self::Mean),
            (true, true) => Err(bad(
                "both CLS and mean pooling (a concatenation) is not implemented".into(),
            )),
            (false, false) => Err(bad(
                "neither `pooling_mode_cls_token` nor `pooling_mode_mean_tokens` is true".into(),
            )),
        }
    }
}

/// Settings of [`BertEmbedder::load`].
#[derive(Clone, Debug)]
pub struct BertEmbedderOptions {
    /// Where the model runs.
    pub device: Device,
    /// Weights and activations dtype (f32 unless memory is short).
    pub dtype: DType,
    /// Texts per forward pass.
    pub batch_size: usize,
    /// Overrides the pooling read from `1_Pooling/config.json`.
    pub pooling: Option<Pooling>,
}

impl Default for BertEmbedderOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            batch_size: 32,
            pooling: None,
        }
    }
}

/// A BERT-family sentence embedder ([`Embedder`]): bge-large-en-v1.5 in
/// AGFSync, or the tiny random model of [`write_tiny_bert`] in tests.
#[derive(Debug)]
pub struct BertEmbedder {
    model: BertModel,
    tokenizer: Tokenizer,
    pooling: Pooling,
    max_len: usize,
    batch_size: usize,
    pad_id: u32,
    identity: String,
}

fn embed_err(path: &Path, reason: impl std::fmt::Display) -> AuthorError {
    AuthorError::Embed(format!("{}: {reason}", path.display()))
}

impl BertEmbedder {
    /// Loads a model folder or hub repo id (`org/name[@revision]`), e.g.
    /// `BAAI/bge-large-en-v1.5`.
    pub fn load(spec: &str, hub: &HubOptions, options: &BertEmbedderOptions) -> Result<Self> {
        let src = resolve_model(spec, hub).map_err(|e| AuthorError::Embed(e.to_string()))?;
        Self::from_source(&src, options)
    }

    /// Loads an already resolved model.
    pub fn from_source(src: &ModelSource, options: &BertEmbedderOptions) -> Result<Self> {
        let hub_err = |e: agfsync_models::hub::HubError| AuthorError::Embed(e.to_string());
        let config_path = src.file("config.json").map_err(hub_err)?;
        let text = std::fs::read_to_string(&config_path).map_err(|source| AuthorError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config = BertConfig::from_json(&text)
            .map_err(|e| embed_err(&config_path, format!("not a usable BERT config: {e}")))?;
        let tokenizer_path = src.optional_file("tokenizer.json").map_err(hub_err)?.ok_or_else(|| {
            AuthorError::Embed(format!(
                "{} has no tokenizer.json, which the sentence embedder needs: save the fast \
                 tokenizer next to the weights (AutoTokenizer.from_pretrained(...).save_pretrained(DIR))",
                src.describe("")
            ))
        })?;
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| embed_err(&tokenizer_path, format!("not a usable tokenizer.json: {e}")))?;
        let vocab = tokenizer.get_vocab_size(true);
        if vocab > config.vocab_size {
            return Err(embed_err(
                &tokenizer_path,
                format!(
                    "the tokenizer has {vocab} tokens but config.json's vocab_size is {}: they \
                     belong to different models",
                    config.vocab_size
                ),
            ));
        }
        let pooling = match options.pooling {
            Some(p) => p,
            None => match src
                .optional_file("1_Pooling/config.json")
                .map_err(hub_err)?
            {
                Some(p) => Pooling::from_config(&p)?,
                None => Pooling::Cls,
            },
        };
        let max_len = max_length(src, &config)?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| {
                embed_err(
                    &tokenizer_path,
                    format!("cannot truncate to {max_len}: {e}"),
                )
            })?;
        // Batches are padded here, to their longest text.
        tokenizer.with_padding(None);
        let pad_id = tokenizer
            .token_to_id("[PAD]")
            .unwrap_or(config.pad_token_id);
        let files = find_weights(src, "", "model", None).map_err(hub_err)?;
        let vb = open_safetensors(&files, options.dtype, &options.device)
            .map_err(|e| AuthorError::Embed(e.to_string()))?;
        let model = BertModel::new(&config, vb).map_err(|e| {
            AuthorError::Embed(format!(
                "{}: the weights do not fit config.json: {e}",
                files
                    .first()
                    .map(|f| f.display().to_string())
                    .unwrap_or_default()
            ))
        })?;
        let identity = identity(src, &config_path, &files, pooling);
        Ok(Self {
            model,
            tokenizer,
            pooling,
            max_len,
            batch_size: options.batch_size.max(1),
            pad_id,
            identity,
        })
    }

    /// The pooling in use.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// The dimension of the embeddings.
    pub fn dim(&self) -> usize {
        self.model.config().hidden_size
    }

    /// The longest input in tokens (special tokens included); longer texts
    /// are truncated.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Token ids of `text` as the model sees them (special tokens added,
    /// truncated).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| AuthorError::Embed(format!("{}: tokenizing: {e}", self.identity)))
    }

    /// The unnormalised-then-normalised embeddings of one padded batch.
    fn embed_batch(&self, rows: &[Vec<u32>]) -> candle_core::Result<Vec<Vec<f32>>> {
        let device = self.model.device();
        let width = rows.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let mut ids = Vec::with_capacity(rows.len() * width);
        let mut mask = Vec::with_capacity(rows.len() * width);
        for r in rows {
            ids.extend_from_slice(r);
            ids.extend(std::iter::repeat_n(self.pad_id, width - r.len()));
            mask.extend(std::iter::repeat_n(1f32, r.len()));
            mask.extend(std::iter::repeat_n(0f32, width - r.len()));
        }
        let n = rows.len();
        let ids = Tensor::from_vec(ids, (n, width), device)?;
        let mask = Tensor::from_vec(mask, (n, width), device)?;
        let hidden = self
            .model
            .forward(&ids, None, Some(&mask))?
            .to_dtype(DType::F32)?;
        let pooled = match self.pooling {
            Pooling::Cls => hidden.i((.., 0))?,
            Pooling::Mean => {
                let m = mask.unsqueeze(2)?;
                let sum = hidden.broadcast_mul(&m)?.sum(1)?;
                let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
                sum.broadcast_div(&count)?
            }
        };
        // F.normalize: x / max(|x|, 1e-12).
        let norm = pooled
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        pooled.broadcast_div(&norm)?.to_vec2()
    }
}

/// The input limit: `max_position_embeddings`, lowered by the tokenizer's
/// `model_max_length` and sentence-transformers' `max_seq_length` when
/// they are set (bge: 512 everywhere).
fn max_length(src: &ModelSource, config: &BertConfig) -> Result<usize> {
    let mut max = config.max_position_embeddings;
    for (file, key) in [
        ("tokenizer_config.json", "model_max_length"),
        ("sentence_bert_config.json", "max_seq_length"),
    ] {
        let Some(path) = src
            .optional_file(file)
            .map_err(|e| AuthorError::Embed(e.to_string()))?
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path).map_err(|source| AuthorError::Io {
            path: path.clone(),
            source,
        })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| embed_err(&path, format!("not valid JSON: {e}")))?;
        // transformers writes a huge sentinel (int(1e30)) when unset; as an
        // f64 it is simply larger than any position table.
        if let Some(n) = v.get(key).and_then(Value::as_f64) {
            if n >= 2.0 && n < max as f64 {
                max = n as usize;
            }
        }
    }
    Ok(max)
}

/// `bert:{repo@commit | folder#sha256 of config and weights header}:{pooling}`.
fn identity(src: &ModelSource, config: &Path, files: &[PathBuf], pooling: Pooling) -> String {
    let what = if let (Some(repo), Some(commit)) = (src.repo(), src.commit()) {
        format!("{}@{commit}", repo.repo_id)
    } else {
        let mut h = Sha256::new();
        for f in std::iter::once(config).chain(files.iter().map(PathBuf::as_path)) {
            // The safetensors header names every tensor with its shape and
            // offsets; with the config it pins the model cheaply.
            if let Ok(bytes) = read_prefix(f, 1 << 20) {
                h.update(&bytes);
            }
        }
        let digest = h.finalize();
        let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
        let name = src
            .root()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| src.root().display().to_string());
        format!("{name}#{hex}")
    };
    format!("bert:{what}:{}", pooling.name())
}

fn read_prefix(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    std::fs::File::open(path)?.take(max).read_to_end(&mut out)?;
    Ok(out)
}

impl Embedder for BertEmbedder {
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let rows = texts
            .iter()
            .map(|t| self.token_ids(t))
            .collect::<Result<Vec<_>>>()?;
        // Longest first, so each batch pads little; results go back in
        // input order.
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(rows[i].len()));
        let mut out = vec![Vec::new(); rows.len()];
        for chunk in order.chunks(self.batch_size) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| rows[i].clone()).collect();
            let vectors = self
                .embed_batch(&batch)
                .map_err(|e| AuthorError::Embed(format!("{}: {e}", self.identity)))?;
            for (&i, v) in chunk.iter().zip(vectors) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::embed::cosine;

    fn tiny() -> (tempfile::TempDir, BertEmbedder) {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_bert(dir.path(), 3).unwrap();
        let e = BertEmbedder::from_source(
            &ModelSource::local(dir.path()),
            &BertEmbedderOptions::default(),
        )
        .unwrap();
        (dir, e)
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn near_duplicates_are_close_and_unrelated_texts_apart() {
        let (_d, e) = tiny();
        assert_eq!(e.pooling(), Pooling::Mean);
        let v = e
            .embed(&strings(&[
                "A red cat sitting on a wooden table.",
                "a red cat sitting on a wooden table!",
                "Two horses running on the beach at sunset",
                "an old stone bridge over the river at night",
            ]))
            .unwrap();
        let dup = cosine(&v[0], &v[1]);
        assert!(dup > 0.9, "near duplicates: {dup}");
        for (a, b) in [(0, 2), (0, 3), (2, 3)] {
            let c = cosine(&v[a], &v[b]);
            assert!(
                c < dup - 0.05 && c < 0.9,
                "unrelated {a} {b}: {c} (dup {dup})"
            );
        }
    }

    #[test]
    fn batching_and_order_do_not_change_vectors() {
        let (_d, e) = tiny();
        let texts = strings(&[
            "a dog",
            "a very long sentence about the blue sea and the mountains in winter",
            "",
            "cat",
        ]);
        let all = e.embed(&texts).unwrap();
        for (i, t) in texts.iter().enumerate() {
            let one = e.embed(std::slice::from_ref(t)).unwrap();
            let diff = one[0]
                .iter()
                .zip(&all[i])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "{t:?}: {diff}");
            let norm: f32 = all[i].iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4);
        }
        assert!(e.embed(&[]).unwrap().is_empty());
    }

    #[test]
    fn long_texts_are_truncated() {
        let (_d, e) = tiny();
        let long = "the red cat ".repeat(200);
        assert_eq!(e.token_ids(&long).unwrap().len(), 64);
        assert_eq!(e.embed(&[long]).unwrap()[0].len(), 32);
    }

    #[test]
    fn identity_is_stable_and_names_pooling() {
        let (d, e) = tiny();
        let again = BertEmbedder::from_source(
            &ModelSource::local(d.path()),
            &BertEmbedderOptions {
                pooling: Some(Pooling::Cls),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(e.identity().starts_with("bert:"), "{}", e.identity());
        assert!(e.identity().ends_with(":mean"));
        assert!(again.identity().ends_with(":cls"));
        assert_eq!(
            e.identity().trim_end_matches(":mean"),
            again.identity().trim_end_matches(":cls")
        );
    }

    fn load_err(dir: &Path) -> String {
        BertEmbedder::from_source(&ModelSource::local(dir), &BertEmbedderOptions::default())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn bad_folders_name_the_file() {
        let (d, _) = tiny();
        let p = d.path();
        std::fs::rename(p.join("tokenizer.json"), p.join("t.json")).unwrap();
        let e = load_err(p);
        assert!(e.contains("tokenizer.json"), "{e}");
        std::fs::write(p.join("tokenizer.json"), "{not json").unwrap();
        let e = load_err(p);
        assert!(e.contains("tokenizer.json"), "{e}");
        std::fs::rename(p.join("t.json"), p.join("tokenizer.json")).unwrap();

        let cfg = std::fs::read_to_string(p.join("config.json")).unwrap();
        std::fs::write(
            p.join("config.json"),
            cfg.replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 5"),
        )
        .unwrap();
        let e = load_err(p);
        assert!(
            e.contains("config.json") && e.contains("num_attention_heads"),
            "{e}"
        );
        std::fs::write(
            p.join("config.json"),
            cfg.replace("\"hidden_size\": 32", "\"hidden_size\": 64"),
        )
        .unwrap();
        let e = load_err(p);
        assert!(e.contains("model.safetensors"), "{e}");
        std::fs::write(p.join("config.json"), "[1, 2]").unwrap();
        let e = load_err(p);
        assert!(e.contains("config.json"), "{e}");
        std::fs::write(p.join("config.json"), &cfg).unwrap();

        std::fs::write(
            p.join("1_Pooling/config.json"),
            r#"{"pooling_mode_max_tokens": true}"#,
        )
        .unwrap();
        let e = load_err(p);
        assert!(e.contains("1_Pooling") && e.contains("max_tokens"), "{e}");
        std::fs::remove_file(p.join("1_Pooling/config.json")).unwrap();
        let e = BertEmbedder::from_source(&ModelSource::local(p), &BertEmbedderOptions::default())
            .unwrap();
        assert_eq!(e.pooling(), Pooling::Cls, "CLS is the default");

        std::fs::remove_file(p.join("model.safetensors")).unwrap();
        let e = load_err(p);
        assert!(e.contains("model.safetensors"), "{e}");
        std::fs::remove_file(p.join("config.json")).unwrap();
        let e = load_err(p);
        assert!(e.contains("config.json"), "{e}");
    }
}
