//! The BERT encoder (Devlin et al., "BERT: Pre-training of Deep
//! Bidirectional Transformers for Language Understanding", 2019) in
//! inference: the body of BERT-family sentence-embedding models such as
//! bge (Xiao et al., "C-Pack: Packaged Resources To Advance General Chinese
//! Embedding", 2023), which AGFSync uses to drop near-duplicate prompts and
//! questions.
//!
//! Reference: transformers 5.24 `models/bert/modeling_bert.py`
//! (`BertModel`). Tensor names are the checkpoints':
//! `embeddings.{word,position,token_type}_embeddings.weight`,
//! `embeddings.LayerNorm.{weight,bias}`,
//! `encoder.layer.N.attention.self.{query,key,value}`,
//! `encoder.layer.N.attention.output.{dense,LayerNorm}`,
//! `encoder.layer.N.intermediate.dense`, `encoder.layer.N.output.{dense,LayerNorm}`
//! and the optional `pooler.dense`. `BertForX` checkpoints keep the same
//! names under `bert.`, which [`BertModel::new`] detects.
//!
//! Only absolute position embeddings are implemented (every bge and
//! sentence-transformers BERT uses them); a config asking for relative ones
//! is refused rather than silently run with the wrong positions. Layers are
//! post-norm (`LayerNorm(x + sublayer(x))`), as in the paper.
//!
//! [`write_tiny_bert`] writes a tiny random BERT folder in the
//! sentence-transformers layout for tests and the pipeline's tiny preset.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::ModelError;
use crate::nn::{attention, merge_heads, split_heads, Activation, LayerNorm, Linear, Pass};
use crate::weights::{save_safetensors, RandomWeights};

fn default_vocab() -> usize {
    30522
}
fn default_hidden() -> usize {
    768
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    12
}
fn default_intermediate() -> usize {
    3072
}
fn default_act() -> String {
    "gelu".into()
}
fn default_max_pos() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

/// A transformers `BertConfig` (`config.json`). Missing fields take
/// transformers' defaults (bert-base).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Rows of the word embedding table.
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// Width of the residual stream.
    #[serde(default = "default_hidden")]
    pub hidden_size: usize,
    /// Encoder layers.
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads per layer (must divide `hidden_size`).
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    /// Width of the feed-forward block.
    #[serde(default = "default_intermediate")]
    pub intermediate_size: usize,
    /// Feed-forward activation: `gelu` (exact erf, BERT's) or another
    /// name [`Activation::from_name`] knows.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Rows of the absolute position table: the longest input.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Rows of the token type (segment) table.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// Epsilon of every layer norm.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Id of the padding token, used to pad batches.
    #[serde(default)]
    pub pad_token_id: u32,
    /// `absolute` (or absent); relative position types are refused.
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    /// `bert` for BERT checkpoints (informational; RoBERTa-style models
    /// offset their positions and are not this model).
    #[serde(default)]
    pub model_type: Option<String>,
}

impl BertConfig {
    /// Parses a `config.json` and checks that the model can be built from
    /// it.
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the fields the forward depends on; the message says which
    /// field is wrong.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.hidden_size == 0
            || self.num_attention_heads == 0
            || self.hidden_size % self.num_attention_heads != 0
        {
            return Err(format!(
                "hidden_size {} is not a positive multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if Activation::from_name(&self.hidden_act).is_none() {
            return Err(format!(
                "hidden_act `{}` is not supported (gelu, gelu_new, silu, quick_gelu)",
                self.hidden_act
            ));
        }
        if let Some(kind) = &self.position_embedding_type {
            if kind != "absolute" {
                return Err(format!(
                    "position_embedding_type `{kind}` is not implemented (only `absolute`)"
                ));
            }
        }
        if let Some(t) = &self.model_type {
            // Same keys, different maths (position offset by the pad id):
            // loading one as BERT would run without error and embed wrongly.
            if matches!(t.as_str(), "roberta" | "xlm-roberta" | "camembert") {
                return Err(format!(
                    "model_type `{t}` is a RoBERTa-family model, not BERT"
                ));
            }
        }
        if self.max_position_embeddings == 0 || self.vocab_size == 0 || self.type_vocab_size == 0 {
            return Err(
                "vocab_size, max_position_embeddings and type_vocab_size must be positive".into(),
            );
        }
        Ok(())
    }
}

/// Scale of the random embeddings of [`write_tiny_bert`] and of
/// [`RandomWeights`]-built models: O(1), so token identity dominates the
/// residual stream of a random model.
const EMBED_INIT: Init = Init::Randn {
    mean: 0.,
    stdev: 1.0,
};

/// One post-norm encoder layer: transformers' `BertLayer`.
#[derive(Clone, Debug)]
struct BertLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
    heads: usize,
    act: Activation,
}

impl BertLayer {
    fn new(cfg: &BertConfig, act: Activation, vb: VarBuilder) -> Result<Self> {
        let (d, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let a = vb.pp("attention");
        let s = a.pp("self");
        Ok(Self {
            query: Linear::new(d, d, true, s.pp("query"))?,
            key: Linear::new(d, d, true, s.pp("key"))?,
            value: Linear::new(d, d, true, s.pp("value"))?,
            attn_out: Linear::new(d, d, true, a.pp("output.dense"))?,
            attn_norm: LayerNorm::new(d, eps, a.pp("output.LayerNorm"))?,
            intermediate: Linear::new(d, i, true, vb.pp("intermediate.dense"))?,
            output: Linear::new(i, d, true, vb.pp("output.dense"))?,
            out_norm: LayerNorm::new(d, eps, vb.pp("output.LayerNorm"))?,
            heads: cfg.num_attention_heads,
            act,
        })
    }

    /// `x` is `[b, n, d]`; `bias` is `[b*heads, 1, n]`, added to the scores.
    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let pass = Pass::INFERENCE;
        let head_dim = x.dim(D::Minus1)? / self.heads;
        let q = split_heads(&self.query.forward(x, pass)?, self.heads)?;
        let k = split_heads(&self.key.forward(x, pass)?, self.heads)?;
        let v = split_heads(&self.value.forward(x, pass)?, self.heads)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        // Scores in f32 so the padding bias (f32::MIN) never overflows to
        // -inf in half precision.
        let o = attention(&q, &k, &v, scale, Some(bias), true, pass)?;
        let o = self.attn_out.forward(&merge_heads(&o, self.heads)?, pass)?;
        let x = self.attn_norm.forward(&(x + o)?, pass)?;
        let h = self.act.forward(&self.intermediate.forward(&x, pass)?)?;
        let h = self.output.forward(&h, pass)?;
        self.out_norm.forward(&(x + h)?, pass)
    }
}

/// transformers' `BertModel` in inference.
#[derive(Clone, Debug)]
pub struct BertModel {
    config: BertConfig,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<BertLayer>,
    pooler: Option<Linear>,
    dtype: DType,
    device: Device,
}

impl BertModel {
    /// Builds the model from `vb`, reading the checkpoint's names with or
    /// without the `bert.` prefix of `BertForX` heads. The pooler is loaded
    /// when the checkpoint has one (sentence-transformers exports often
    /// drop it).
    pub fn new(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(format!("BERT config: {e}")))?;
        let act = Activation::from_name(&cfg.hidden_act).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "BERT config: unknown hidden_act `{}`",
                cfg.hidden_act
            ))
        })?;
        let vb = if !vb.contains_tensor("embeddings.word_embeddings.weight")
            && vb.contains_tensor("bert.embeddings.word_embeddings.weight")
        {
            vb.pp("bert")
        } else {
            vb
        };
        let d = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let word_embeddings =
            emb.pp("word_embeddings")
                .get_with_hints((cfg.vocab_size, d), "weight", EMBED_INIT)?;
        let position_embeddings = emb.pp("position_embeddings").get_with_hints(
            (cfg.max_position_embeddings, d),
            "weight",
            EMBED_INIT,
        )?;
        let token_type_embeddings = emb.pp("token_type_embeddings").get_with_hints(
            (cfg.type_vocab_size, d),
            "weight",
            EMBED_INIT,
        )?;
        let embeddings_norm = LayerNorm::new(d, cfg.layer_norm_eps, emb.pp("LayerNorm"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| BertLayer::new(cfg, act, vb.pp("encoder.layer").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let pooler = if vb.contains_tensor("pooler.dense.weight") {
            Some(Linear::new(d, d, true, vb.pp("pooler.dense"))?)
        } else {
            None
        };
        Ok(Self {
            config: cfg.clone(),
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embeddings_norm,
            layers,
            pooler,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the weights and of the hidden states.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether the checkpoint has `pooler.dense`.
    pub fn has_pooler(&self) -> bool {
        self.pooler.is_some()
    }

    /// The last hidden states `[b, n, hidden]` of `input_ids` (`[b, n]`).
    ///
    /// `token_type_ids` (`[b, n]`) default to zeros (one segment).
    /// `attention_mask` (`[b, n]`, 1 for real tokens, 0 for padding) keeps
    /// padding out of every real token's attention; without it every
    /// position attends everywhere. Positions are absolute, `0..n`, as
    /// transformers' BERT uses for right-padded batches.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, n) = input_ids.dims2()?;
        if n > self.config.max_position_embeddings {
            candle_core::bail!(
                "BERT: {n} tokens but at most {} positions (truncate the input)",
                self.config.max_position_embeddings
            );
        }
        if n == 0 || b == 0 {
            candle_core::bail!("BERT: empty input of shape [{b}, {n}]");
        }
        let ids = input_ids.to_dtype(DType::U32)?;
        let max_id = ids.max_all()?.to_scalar::<u32>()? as usize;
        if max_id >= self.config.vocab_size {
            candle_core::bail!(
                "BERT: token id {max_id} is outside the vocabulary of {} (tokenizer and model do not match)",
                self.config.vocab_size
            );
        }
        let x = self
            .word_embeddings
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, n, ()))?;
        let types = match token_type_ids {
            Some(t) => {
                let t = t.to_dtype(DType::U32)?;
                if t.dims2()? != (b, n) {
                    candle_core::bail!("BERT: token_type_ids do not have the shape of input_ids");
                }
                let max_t = t.max_all()?.to_scalar::<u32>()? as usize;
                if max_t >= self.config.type_vocab_size {
                    candle_core::bail!(
                        "BERT: token type {max_t} is outside type_vocab_size {}",
                        self.config.type_vocab_size
                    );
                }
                self.token_type_embeddings
                    .index_select(&t.flatten_all()?, 0)?
                    .reshape((b, n, ()))?
            }
            None => self
                .token_type_embeddings
                .i(0)?
                .reshape((1, 1, ()))?
                .broadcast_as(x.shape())?
                .contiguous()?,
        };
        let pos = self.position_embeddings.narrow(0, 0, n)?.unsqueeze(0)?;
        let x = (x + types)?.broadcast_add(&pos)?;
        let mut x = self.embeddings_norm.forward(&x, Pass::INFERENCE)?;

        let heads = self.config.num_attention_heads;
        let bias = match attention_mask {
            Some(m) => {
                if m.dims2()? != (b, n) {
                    candle_core::bail!("BERT: attention_mask does not have the shape of input_ids");
                }
                // transformers' extended mask: (1 - mask) * finfo.min.
                let m = m.to_dtype(DType::F32)?;
                let bias = ((1.0 - m)? * f64::from(f32::MIN))?;
                bias.reshape((b, 1, 1, n))?
                    .broadcast_as((b, heads, 1, n))?
                    .reshape((b * heads, 1, n))?
            }
            None => Tensor::zeros((b * heads, 1, n), DType::F32, &self.device)?,
        };
        for layer in &self.layers {
            x = layer.forward(&x, &bias)?;
        }
        Ok(x)
    }

    /// BERT's pooler, `tanh(dense(h[:, 0]))`, of last hidden states
    /// `[b, n, hidden]`; `None` when the checkpoint has no pooler.
    pub fn pool(&self, hidden: &Tensor) -> Result<Option<Tensor>> {
        match &self.pooler {
            Some(p) => Ok(Some(
                p.forward(&hidden.i((.., 0))?, Pass::INFERENCE)?.tanh()?,
            )),
            None => Ok(None),
        }
    }
}

/// Words of [`write_tiny_bert`]'s vocabulary besides the special tokens,
/// single letters, digits and `##` letter pieces (which let any
/// lower-case ASCII word tokenise without `[UNK]`).
const TINY_WORDS: &str = "the a an of and in on at to with for from by is are was were be \
    this that these those it its there their his her he she they we you i my your our \
    photo picture image painting drawing illustration portrait landscape view scene \
    red blue green yellow black white orange purple pink brown gray grey golden silver \
    cat cats dog dogs horse horses bird birds fish cow sheep lion tiger bear fox wolf \
    man woman men women person people child children boy girl baby family friends \
    car cars bus train plane boat bicycle truck road street city town village house \
    building tower bridge castle church room kitchen table chair bed window door wall \
    tree trees flower flowers grass forest mountain mountains river lake sea ocean beach \
    sky cloud clouds sun moon star stars snow rain water fire light night day morning \
    evening sunset sunrise winter summer spring autumn big small large little tall short \
    old young new beautiful happy sad bright dark wooden glass metal stone cube sphere \
    sitting standing running walking flying swimming riding playing eating holding \
    wearing looking reading sleeping jumping one two three four five many some \
    does do how what where which who why not no yes or but as has have had can";

/// The `tokenizer.json` of the tiny BERT: a lower-casing WordPiece
/// tokenizer as transformers' `BertTokenizerFast` saves it
/// (`BertNormalizer`, `BertPreTokenizer`, `[CLS] $A [SEP]`).
pub fn tiny_bert_tokenizer_json() -> Value {
    let mut vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .map(String::from)
        .to_vec();
    let punct = ".,!?;:'\"-()&/";
    vocab.extend(punct.chars().map(String::from));
    vocab.extend(('0'..='9').map(String::from));
    vocab.extend(('a'..='z').map(String::from));
    vocab.extend(('a'..='z').map(|c| format!("##{c}")));
    for w in TINY_WORDS.split_whitespace() {
        if !vocab.iter().any(|v| v == w) {
            vocab.push(w.to_string());
        }
    }
    let map: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<Value> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true,
                       "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "[SEP]", "type_id": 0}}
            ],
            "pair": [
                {"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
                {"SpecialToken": {"id": "[SEP]", "type_id": 1}}
            ],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}
            }
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": map}
    })
}

/// Writes a tiny random BERT sentence-embedding folder in the
/// sentence-transformers layout: `config.json` (2 layers, width 32, 4
/// heads, 64 positions), `model.safetensors` (no pooler),
/// `tokenizer.json` and `tokenizer_config.json` (the WordPiece tokenizer of
/// [`tiny_bert_tokenizer_json`]) and `1_Pooling/config.json` (mean
/// pooling: on a random model the mean of the token states behaves like a
/// bag of words, so near duplicates stay close and unrelated texts apart,
/// while the CLS state of a random model barely depends on the input).
/// The same `seed` writes the same files.
pub fn write_tiny_bert(dir: &Path, seed: u64) -> crate::Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    let pooling_dir = dir.join("1_Pooling");
    std::fs::create_dir_all(&pooling_dir).map_err(io(&pooling_dir))?;
    let tokenizer = tiny_bert_tokenizer_json();
    let vocab_size = tokenizer["model"]["vocab"]
        .as_object()
        .map(serde_json::Map::len)
        .unwrap_or(0);
    let config = json!({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
    });
    let cfg: BertConfig =
        serde_json::from_value(config.clone()).map_err(|source| ModelError::Config {
            path: dir.join("config.json"),
            what: "BERT config",
            source,
        })?;
    let rw = RandomWeights::new(seed);
    BertModel::new(&cfg, rw.var_builder(DType::F32, &Device::Cpu))?;
    let tensors: HashMap<String, Tensor> = rw.tensors();
    save_safetensors(&tensors, &dir.join("model.safetensors"))?;
    let write = |name: &Path, v: &Value| -> crate::Result<()> {
        let text = serde_json::to_string_pretty(v).map_err(|e| ModelError::Io {
            path: name.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(name, text + "\n").map_err(io(name))
    };
    write(&dir.join("config.json"), &config)?;
    write(&dir.join("tokenizer.json"), &tokenizer)?;
    write(
        &dir.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": true,
            "model_max_length": 64,
            "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
            "unk_token": "[UNK]", "mask_token": "[MASK]"
        }),
    )?;
    write(
        &pooling_dir.join("config.json"),
        &json!({
            "word_embedding_dimension": 32,
            "pooling_mode_cls_token": false,
            "pooling_mode_mean_tokens": true,
            "pooling_mode_max_tokens": false,
            "pooling_mode_mean_sqrt_len_tokens": false
        }),
    )?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::weights::open_safetensors;

    fn tiny() -> (tempfile::TempDir, BertModel) {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_bert(dir.path(), 7).unwrap();
        let cfg = BertConfig::from_json(
            &std::fs::read_to_string(dir.path().join("config.json")).unwrap(),
        )
        .unwrap();
        let vb = open_safetensors(
            &[dir.path().join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        (dir, BertModel::new(&cfg, vb).unwrap())
    }

    #[test]
    fn padding_does_not_change_real_tokens() {
        let (_d, m) = tiny();
        let alone = Tensor::new(&[[2u32, 40, 41, 3]], &Device::Cpu).unwrap();
        let a = m.forward(&alone, None, None).unwrap();
        let padded = Tensor::new(
            &[[2u32, 40, 41, 3, 0, 0], [2, 50, 51, 52, 53, 3]],
            &Device::Cpu,
        )
        .unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
        let b = m.forward(&padded, None, Some(&mask)).unwrap();
        let diff = (a.i(0).unwrap() - b.i((0, 0..4)).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn bert_prefix_is_accepted() {
        let (dir, m) = tiny();
        let t = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)
            .unwrap();
        let prefixed: HashMap<String, Tensor> = t
            .into_iter()
            .map(|(k, v)| (format!("bert.{k}"), v))
            .collect();
        let path = dir.path().join("prefixed.safetensors");
        save_safetensors(&prefixed, &path).unwrap();
        let vb = open_safetensors(&[path], DType::F32, &Device::Cpu).unwrap();
        let m2 = BertModel::new(m.config(), vb).unwrap();
        let ids = Tensor::new(&[[2u32, 60, 61, 3]], &Device::Cpu).unwrap();
        let a = m.forward(&ids, None, None).unwrap();
        let b = m2.forward(&ids, None, None).unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let (_d, m) = tiny();
        let too_long = Tensor::zeros((1, 65), DType::U32, &Device::Cpu).unwrap();
        assert!(m.forward(&too_long, None, None).is_err());
        let bad_id = Tensor::new(&[[2u32, 100_000, 3]], &Device::Cpu).unwrap();
        let e = m.forward(&bad_id, None, None).unwrap_err().to_string();
        assert!(e.contains("vocabulary"), "{e}");
        let mask = Tensor::new(&[[1u32, 1]], &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[2u32, 5, 3]], &Device::Cpu).unwrap();
        assert!(m.forward(&ids, None, Some(&mask)).is_err());
    }

    #[test]
    fn config_is_validated() {
        assert!(
            BertConfig::from_json(r#"{"hidden_size": 30, "num_attention_heads": 4}"#)
                .unwrap_err()
                .contains("num_attention_heads")
        );
        assert!(
            BertConfig::from_json(r#"{"position_embedding_type": "relative_key"}"#)
                .unwrap_err()
                .contains("relative_key")
        );
        assert!(BertConfig::from_json(r#"{"hidden_act": "relu6x"}"#).is_err());
        assert!(BertConfig::from_json(r#"{"hidden_size": "big"}"#).is_err());
        let d = BertConfig::from_json("{}").unwrap();
        assert_eq!((d.hidden_size, d.layer_norm_eps), (768, 1e-12));
    }
}
