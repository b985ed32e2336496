//! CLIP's byte-level BPE tokenizer, as used by Stable Diffusion text encoders.
//!
//! Stable Diffusion `tokenizer/` folders hold `vocab.json` + `merges.txt` +
//! `tokenizer_config.json` + `special_tokens_map.json`, sometimes also a
//! `tokenizer.json`. [`ClipTokenizer::from_dir`] loads `tokenizer.json` with
//! the `tokenizers` crate when present, and otherwise builds the same
//! pipeline transformers' `CLIPTokenizer` builds from vocab + merges:
//!
//! * normalizer: NFC, `\s+` -> `" "`, lowercase;
//! * pre-tokenizer: split on CLIP's word regex (keeping the matches), then
//!   byte-level mapping (no prefix space);
//! * model: BPE with end-of-word suffix `</w>` and unknown token
//!   `<|endoftext|>`;
//! * decoder: byte-level; post-processor: `bos + tokens + eos`.
//!
//! [`ClipTokenizer::encode_padded`] reproduces `tokenizer(text,
//! padding="max_length", max_length=77, truncation=True)`.
//!
//! [`write_tiny_clip_tokenizer`] writes a small but valid CLIP tokenizer
//! folder for tiny random-weight test pipelines.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// The word-splitting regex of transformers' `CLIPTokenizer`.
pub const CLIP_SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// CLIP's begin-of-text token.
pub const DEFAULT_BOS: &str = "<|startoftext|>";
/// CLIP's end-of-text token (also its unknown token, and SD 1.x's padding).
pub const DEFAULT_EOS: &str = "<|endoftext|>";
/// The context length of CLIP text encoders.
pub const DEFAULT_MAX_LENGTH: usize = 77;

const END_OF_WORD: &str = "</w>";

/// Errors raised while loading or running a CLIP tokenizer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// A file could not be read or written.
    #[error("I/O error on {}: {source}", .path.display())]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON file is malformed.
    #[error("invalid JSON in {}: {source}", .path.display())]
    Json {
        /// The file involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },

    /// A tokenizer file is malformed.
    #[error("invalid tokenizer file {}: {reason}", .path.display())]
    Invalid {
        /// The file involved.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// The folder holds neither `tokenizer.json` nor `vocab.json` + `merges.txt`.
    #[error(
        "{} is not a CLIP tokenizer folder: it needs tokenizer.json, or vocab.json and merges.txt \
         (found: {}). Pass the `tokenizer/` (or `tokenizer_2/`) subfolder of a diffusers pipeline",
        .dir.display(),
        fmt_found(.found)
    )]
    NotATokenizer {
        /// The folder given.
        dir: PathBuf,
        /// The files it holds.
        found: Vec<String>,
    },

    /// A special token named by the config is not in the vocabulary.
    #[error(
        "the {role} token `{token}` of the tokenizer in {} is not in its vocabulary; check \
         tokenizer_config.json / special_tokens_map.json",
        .dir.display()
    )]
    UnknownSpecialToken {
        /// `bos`, `eos`, `pad` or `unk`.
        role: &'static str,
        /// The token text.
        token: String,
        /// The tokenizer folder.
        dir: PathBuf,
    },

    /// The `tokenizers` library failed.
    #[error("tokenizer error while {context}: {source}")]
    Tokenizers {
        /// What was being done.
        context: String,
        /// Underlying error.
        #[source]
        source: tokenizers::Error,
    },

    /// `max_len` cannot hold bos and eos.
    #[error("max_len {max_len} is too small: it must hold at least the bos and eos tokens (2)")]
    MaxLenTooSmall {
        /// The value given.
        max_len: usize,
    },
}

fn fmt_found(found: &[String]) -> String {
    if found.is_empty() {
        "nothing".to_string()
    } else {
        found.join(", ")
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TokenizerError + '_ {
    move |source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn tok_err(context: impl Into<String>) -> impl FnOnce(tokenizers::Error) -> TokenizerError {
    let context = context.into();
    move |source| TokenizerError::Tokenizers { context, source }
}

fn read_json(path: &Path) -> Result<serde_json::Value, TokenizerError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|source| TokenizerError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// One text encoded to a fixed length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// `bos, tokens.., eos, pad..`, exactly `max_len` long.
    pub ids: Vec<u32>,
    /// Whether tokens were dropped to fit `max_len`.
    pub truncated: bool,
    /// Index of the (first) eos token, i.e. the number of tokens before it.
    pub eos_position: usize,
}

/// One special token as configured: its text, and whether it is matched in
/// the normalized (lower-cased) text rather than the raw input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    /// The token text, e.g. `<|endoftext|>`.
    pub content: String,
    /// `AddedToken.normalized`: true when the config gives an object with
    /// `"normalized": true`; plain strings are not normalized.
    pub normalized: bool,
}

impl SpecialToken {
    fn plain(content: &str) -> Self {
        Self {
            content: content.to_string(),
            normalized: false,
        }
    }
}

impl PartialEq<&str> for SpecialToken {
    fn eq(&self, other: &&str) -> bool {
        self.content == *other
    }
}

/// Special tokens and limits read from `tokenizer_config.json` and
/// `special_tokens_map.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Begin-of-text token.
    pub bos: SpecialToken,
    /// End-of-text token.
    pub eos: SpecialToken,
    /// Padding token (`<|endoftext|>` for SD 1.x, `!` for SD 2.x).
    pub pad: SpecialToken,
    /// Unknown token.
    pub unk: SpecialToken,
    /// `model_max_length`, when it is a sensible number.
    pub model_max_length: Option<usize>,
}

impl Default for SpecialTokens {
    fn default() -> Self {
        Self {
            bos: SpecialToken::plain(DEFAULT_BOS),
            eos: SpecialToken::plain(DEFAULT_EOS),
            pad: SpecialToken::plain(DEFAULT_EOS),
            unk: SpecialToken::plain(DEFAULT_EOS),
            model_max_length: None,
        }
    }
}

impl SpecialTokens {
    /// Reads the special tokens of a tokenizer folder: CLIP defaults,
    /// overridden by `tokenizer_config.json`, overridden by
    /// `special_tokens_map.json` (as transformers does). Tokens may be plain
    /// strings or `AddedToken` objects (`{"content": ..., "normalized": ...}`).
    /// Missing files are fine.
    pub fn read(dir: &Path) -> Result<Self, TokenizerError> {
        let mut out = Self::default();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let json = read_json(&path)?;
            let token = |key: &str| -> Option<SpecialToken> {
                match json.get(key)? {
                    serde_json::Value::String(s) => Some(SpecialToken::plain(s)),
                    serde_json::Value::Object(o) => Some(SpecialToken {
                        content: o.get("content")?.as_str()?.to_string(),
                        normalized: o
                            .get("normalized")
                            .and_then(|n| n.as_bool())
                            .unwrap_or(false),
                    }),
                    _ => None,
                }
            };
            if let Some(t) = token("bos_token") {
                out.bos = t;
            }
            if let Some(t) = token("eos_token") {
                out.eos = t;
            }
            if let Some(t) = token("pad_token") {
                out.pad = t;
            }
            if let Some(t) = token("unk_token") {
                out.unk = t;
            }
            // transformers writes a huge sentinel (1e30) when unknown.
            if let Some(n) = json.get("model_max_length").and_then(|v| v.as_u64()) {
                if (1..=1_000_000).contains(&n) {
                    out.model_max_length = Some(n as usize);
                }
            }
        }
        Ok(out)
    }

    /// The tokens to register as special added tokens, one per distinct
    /// text. When several roles share a text (SD 1.x: eos = unk = pad), the
    /// last of bos, eos, unk, pad decides the flags, as in transformers.
    fn added_tokens(&self) -> Vec<AddedToken> {
        let mut out: Vec<AddedToken> = Vec::new();
        for t in [&self.bos, &self.eos, &self.unk, &self.pad] {
            let token = AddedToken::from(t.content.clone(), true).normalized(t.normalized);
            match out.iter_mut().find(|a| a.content == t.content) {
                Some(existing) => *existing = token,
                None => out.push(token),
            }
        }
        out
    }
}

/// CLIP's BPE tokenizer with its special-token ids.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    special: SpecialTokens,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

impl ClipTokenizer {
    /// Loads a tokenizer folder: `tokenizer.json` when present, else
    /// `vocab.json` + `merges.txt`; special tokens come from
    /// `tokenizer_config.json` / `special_tokens_map.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let dir = dir.as_ref();
        let special = SpecialTokens::read(dir)?;
        let json = dir.join("tokenizer.json");
        let from_json = json.is_file();
        let mut tokenizer = if from_json {
            Tokenizer::from_file(&json).map_err(tok_err(format!("loading {}", json.display())))?
        } else {
            let vocab = dir.join("vocab.json");
            let merges = dir.join("merges.txt");
            if !vocab.is_file() || !merges.is_file() {
                let mut found: Vec<String> = std::fs::read_dir(dir)
                    .map_err(io_err(dir))?
                    .filter_map(|e| e.ok()?.file_name().to_str().map(str::to_string))
                    .collect();
                found.sort();
                return Err(TokenizerError::NotATokenizer {
                    dir: dir.to_path_buf(),
                    found,
                });
            }
            build_clip_tokenizer(&vocab, &merges, &special)?
        };
        // Truncation and padding are done by `encode_padded`.
        tokenizer
            .with_truncation(None)
            .map_err(tok_err("disabling truncation"))?;
        tokenizer.with_padding(None);
        // transformers registers every special token as an added token.
        register_special_tokens(&mut tokenizer, &special, from_json)?;
        let id = |role: &'static str, token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::UnknownSpecialToken {
                    role,
                    token: token.to_string(),
                    dir: dir.to_path_buf(),
                })
        };
        let bos_id = id("bos", &special.bos.content)?;
        let eos_id = id("eos", &special.eos.content)?;
        let pad_id = id("pad", &special.pad.content)?;
        id("unk", &special.unk.content)?;
        Ok(Self {
            tokenizer,
            special,
            bos_id,
            eos_id,
            pad_id,
        })
    }

    /// The begin-of-text id.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// The end-of-text id.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The padding id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The special tokens in use.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// `model_max_length` from the config, else 77.
    pub fn model_max_length(&self) -> usize {
        self.special.model_max_length.unwrap_or(DEFAULT_MAX_LENGTH)
    }

    /// Vocabulary size including added tokens (what a text encoder's
    /// `vocab_size` must cover).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids of `text` without bos/eos, padding or truncation.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(tok_err(format!("encoding {text:?}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes `text` as `bos, tokens.., eos` padded with the pad id to
    /// exactly `max_len` ids; longer texts are truncated keeping eos last
    /// (transformers' `padding="max_length", truncation=True`).
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Result<Encoded, TokenizerError> {
        if max_len < 2 {
            return Err(TokenizerError::MaxLenTooSmall { max_len });
        }
        let mut tokens = self.encode_raw(text)?;
        let room = max_len - 2;
        let truncated = tokens.len() > room;
        tokens.truncate(room);
        let mut ids = Vec::with_capacity(max_len);
        ids.push(self.bos_id);
        ids.extend_from_slice(&tokens);
        let eos_position = ids.len();
        ids.push(self.eos_id);
        ids.resize(max_len, self.pad_id);
        Ok(Encoded {
            ids,
            truncated,
            eos_position,
        })
    }

    /// [`ClipTokenizer::encode_padded`] for each text.
    pub fn encode_batch_padded<S: AsRef<str>>(
        &self,
        texts: &[S],
        max_len: usize,
    ) -> Result<Vec<Encoded>, TokenizerError> {
        texts
            .iter()
            .map(|t| self.encode_padded(t.as_ref(), max_len))
            .collect()
    }

    /// Decodes ids to text the way transformers' `CLIPTokenizer.decode`
    /// does: byte-level decoding, `</w>` -> space, trimmed.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        let text = self
            .tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(tok_err("decoding"))?;
        Ok(text.replace(END_OF_WORD, " ").trim().to_string())
    }

    /// Writes the tokenizer as a `tokenizer.json`.
    pub fn save_tokenizer_json(&self, path: impl AsRef<Path>) -> Result<(), TokenizerError> {
        let path = path.as_ref();
        self.tokenizer
            .save(path, true)
            .map_err(tok_err(format!("writing {}", path.display())))
    }
}

/// Registers the special tokens as added tokens (transformers does this for
/// every special token). Tokens a `tokenizer.json` already defines keep its
/// flags when `keep_existing` is set.
fn register_special_tokens(
    tokenizer: &mut Tokenizer,
    special: &SpecialTokens,
    keep_existing: bool,
) -> Result<(), TokenizerError> {
    let existing: BTreeSet<String> = tokenizer
        .get_added_tokens_decoder()
        .values()
        .map(|t| t.content.clone())
        .collect();
    let tokens: Vec<AddedToken> = special
        .added_tokens()
        .into_iter()
        .filter(|t| !(keep_existing && existing.contains(&t.content)))
        .collect();
    tokenizer
        .add_special_tokens(tokens)
        .map_err(tok_err("registering the special tokens"))?;
    Ok(())
}

/// Reads `merges.txt`: one `left right` pair a line, `#version` lines skipped.
fn read_merges(path: &Path) -> Result<Merges, TokenizerError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push((a.to_string(), b.to_string()));
            }
            _ => {
                return Err(TokenizerError::Invalid {
                    path: path.to_path_buf(),
                    reason: format!("line {} is not a `left right` merge: {line:?}", n + 1),
                })
            }
        }
    }
    Ok(merges)
}

fn read_vocab(path: &Path) -> Result<Vocab, TokenizerError> {
    let json = read_json(path)?;
    let map = json.as_object().ok_or_else(|| TokenizerError::Invalid {
        path: path.to_path_buf(),
        reason: "expected a JSON object of token -> id".to_string(),
    })?;
    map.iter()
        .map(|(token, id)| {
            let id = id
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| TokenizerError::Invalid {
                    path: path.to_path_buf(),
                    reason: format!("the id of {token:?} is not a small non-negative integer"),
                })?;
            Ok((token.clone(), id))
        })
        .collect()
}

/// Builds the CLIP tokenizer pipeline from `vocab.json` + `merges.txt`, as
/// transformers' `CLIPTokenizer` does.
fn build_clip_tokenizer(
    vocab_path: &Path,
    merges_path: &Path,
    special: &SpecialTokens,
) -> Result<Tokenizer, TokenizerError> {
    let vocab = read_vocab(vocab_path)?;
    let merges = read_merges(merges_path)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(special.unk.content.clone())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(END_OF_WORD.to_string())
        .fuse_unk(false)
        .build()
        .map_err(tok_err(format!(
            "building BPE from {} and {}",
            vocab_path.display(),
            merges_path.display()
        )))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let whitespace = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".to_string()),
        " ",
    )
    .map_err(tok_err("compiling the whitespace regex"))?;
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])))
        .map_err(tok_err("setting the normalizer"))?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_REGEX.to_string()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(tok_err("compiling the CLIP split regex"))?;
    // Python's `ByteLevel(add_prefix_space=False)`: trim_offsets and
    // use_regex keep their default (true).
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let id = |role: &'static str, token: &str| {
        tokenizer
            .token_to_id(token)
            .ok_or_else(|| TokenizerError::UnknownSpecialToken {
                role,
                token: token.to_string(),
                dir: vocab_path.parent().unwrap_or(vocab_path).to_path_buf(),
            })
    };
    let eos = (
        special.eos.content.clone(),
        id("eos", &special.eos.content)?,
    );
    let bos = (
        special.bos.content.clone(),
        id("bos", &special.bos.content)?,
    );
    tokenizer.with_post_processor(Some(
        RobertaProcessing::new(eos, bos)
            .trim_offsets(false)
            .add_prefix_space(false),
    ));
    Ok(tokenizer)
}

// ---------------------------------------------------------------------------
// Tiny tokenizer for test pipelines
// ---------------------------------------------------------------------------

/// GPT-2/CLIP's reversible byte -> printable-char table, in vocabulary order
/// (printable Latin-1 bytes first, then the rest shifted above U+0100).
pub fn bytes_to_unicode() -> Vec<(u8, char)> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut table: Vec<(u8, char)> = (0..=255u8)
        .filter(|&b| printable(b))
        .map(|b| (b, char::from(b)))
        .collect();
    let mut n = 0u32;
    for b in 0..=255u8 {
        if !printable(b) {
            table.push((b, char::from_u32(256 + n).unwrap_or('?')));
            n += 1;
        }
    }
    table
}

/// Training text for the tiny tokenizer's merges: plain English plus the
/// vocabulary of image prompts.
const TINY_CORPUS: &str = "\
a photo of a cat sitting on a wooden table next to a window with the sun shining in. \
a painting of a red house in the mountains under a blue sky with white clouds. \
an astronaut riding a horse on the moon, digital art, highly detailed, trending on artstation. \
a portrait of an old man with a long beard and a hat, oil painting, dramatic lighting. \
two dogs playing with a ball in the green grass of a park in the summer afternoon. \
a bowl of fresh fruit on the kitchen counter, still life, soft light, high resolution. \
the city at night with bright lights and people walking in the rain under their umbrellas. \
a little girl reading a book in the garden surrounded by flowers and butterflies. \
a beautiful landscape with a river, a forest and snowy mountains at sunset, photorealistic. \
a black and white photograph of a train station in the early morning with fog. \
a cute robot holding a flower, three dimensional render, studio lighting, sharp focus. \
there is a small boat on the lake and a bird flying over the water near the shore. \
the quick brown fox jumps over the lazy dog while the children are laughing and singing. \
this is a picture of a beautiful woman wearing a yellow dress standing in front of a building. \
three people are sitting at a restaurant table eating pizza and drinking coffee together. \
an illustration of a castle on a hill with a dragon flying above it, fantasy art, concept art. \
the man is riding a bicycle down the street past the shops and the old church tower. \
a close up of a colorful bird perched on a branch of a tree in the tropical rain forest. \
a plate of food with rice, vegetables and chicken on a table in a bright modern kitchen. \
the ocean waves are crashing against the rocks on the beach during a storm at dusk. \
a group of students standing in front of their school holding books and talking happily. \
a vintage car parked on the side of a road in the desert with cactus plants around it. \
the teddy bear is sitting on the bed next to the pillow in the children's bedroom. \
a sign that says hello world written in large letters on a brick wall in the city. \
an elephant walking through the tall grass of the savanna with the family following behind. \
masterpiece, best quality, ultra detailed, cinematic, volumetric light, octane render, bokeh. \
";

/// Number of merges the tiny tokenizer learns (its vocab is 512 + this + 2).
const TINY_MERGES: usize = 400;

/// Vocabulary size of the tokenizer written by [`write_tiny_clip_tokenizer`]
/// (256 byte tokens, 256 end-of-word byte tokens, the merges, bos and eos).
pub const TINY_CLIP_VOCAB_SIZE: usize = 512 + TINY_MERGES + 2;

/// What [`write_tiny_clip_tokenizer`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TinyClipTokenizer {
    /// Vocabulary size (for the text encoder config's `vocab_size`).
    pub vocab_size: usize,
    /// Id of `<|startoftext|>`.
    pub bos_id: u32,
    /// Id of `<|endoftext|>`.
    pub eos_id: u32,
    /// Id of the padding token.
    pub pad_id: u32,
    /// `model_max_length` written to the config (77).
    pub model_max_length: usize,
}

/// Learns `count` BPE merges from [`TINY_CORPUS`] deterministically: most
/// frequent adjacent pair first, ties broken by the smaller pair.
fn learn_tiny_merges(count: usize, base: &BTreeSet<String>) -> Vec<(String, String)> {
    let mut word_counts: BTreeMap<&str, usize> = BTreeMap::new();
    for word in TINY_CORPUS
        .split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| !w.is_empty())
    {
        *word_counts.entry(word).or_default() += 1;
    }
    let mut words: Vec<(Vec<String>, usize)> = word_counts
        .into_iter()
        .map(|(w, n)| {
            let chars: Vec<char> = w.chars().collect();
            let last = chars.len() - 1;
            let symbols = chars
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if i == last {
                        format!("{c}{END_OF_WORD}")
                    } else {
                        c.to_string()
                    }
                })
                .collect();
            (symbols, n)
        })
        .collect();
    let mut vocab = base.clone();
    let mut banned: BTreeSet<(String, String)> = BTreeSet::new();
    let mut merges = Vec::new();
    while merges.len() < count {
        let mut pairs: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for (symbols, n) in &words {
            for w in symbols.windows(2) {
                *pairs.entry((w[0].as_str(), w[1].as_str())).or_default() += n;
            }
        }
        let mut best: Option<((&str, &str), usize)> = None;
        for (pair, n) in pairs {
            if banned.contains(&(pair.0.to_string(), pair.1.to_string())) {
                continue;
            }
            if best.is_none_or(|(_, b)| n > b) {
                best = Some((pair, n));
            }
        }
        let Some(((a, b), _)) = best else { break };
        let (a, b) = (a.to_string(), b.to_string());
        let merged = format!("{a}{b}");
        if !vocab.insert(merged.clone()) {
            // Another pair already produced this token: never merge this one.
            banned.insert((a, b));
            continue;
        }
        for (symbols, _) in &mut words {
            let mut i = 0;
            while i + 1 < symbols.len() {
                if symbols[i] == a && symbols[i + 1] == b {
                    symbols[i] = merged.clone();
                    symbols.remove(i + 1);
                }
                i += 1;
            }
        }
        merges.push((a, b));
    }
    merges
}

/// Writes a tiny but valid CLIP tokenizer folder into `dir` (created if
/// needed): `vocab.json` (the 256 byte-level characters, the same with
/// `</w>`, a few hundred merges learnt from a small English corpus, then
/// `<|startoftext|>` and `<|endoftext|>`), `merges.txt` (with the
/// `#version: 0.2` header), and SD 1.5-style `tokenizer_config.json` and
/// `special_tokens_map.json` with `model_max_length` 77 and the given
/// `pad_token` (`"<|endoftext|>"` like SD 1.x, or `"!"` like SD 2.x).
///
/// The output is deterministic; its vocabulary size is
/// [`TINY_CLIP_VOCAB_SIZE`] (< 1000).
pub fn write_tiny_clip_tokenizer(
    dir: &Path,
    pad_token: &str,
) -> Result<TinyClipTokenizer, TokenizerError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let bytes = bytes_to_unicode();
    let mut tokens: Vec<String> = bytes.iter().map(|(_, c)| c.to_string()).collect();
    tokens.extend(bytes.iter().map(|(_, c)| format!("{c}{END_OF_WORD}")));
    let base: BTreeSet<String> = tokens.iter().cloned().collect();
    let merges = learn_tiny_merges(TINY_MERGES, &base);
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.push(DEFAULT_BOS.to_string());
    tokens.push(DEFAULT_EOS.to_string());

    let index: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    if index.len() != tokens.len() {
        return Err(TokenizerError::Invalid {
            path: dir.join("vocab.json"),
            reason: "duplicate tokens in the generated vocabulary".to_string(),
        });
    }
    let Some(&pad_index) = index.get(pad_token) else {
        return Err(TokenizerError::UnknownSpecialToken {
            role: "pad",
            token: pad_token.to_string(),
            dir: dir.to_path_buf(),
        });
    };

    let to_json = |v: &str| serde_json::to_string(v).unwrap_or_else(|_| format!("\"{v}\""));
    let vocab_json = format!(
        "{{{}}}\n",
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{}: {i}", to_json(t)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut merges_txt = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        merges_txt.push_str(&format!("{a} {b}\n"));
    }
    let added = |content: &str| {
        serde_json::json!({
            "content": content,
            "lstrip": false,
            "normalized": true,
            "rstrip": false,
            "single_word": false,
        })
    };
    let special_map = serde_json::json!({
        "bos_token": added(DEFAULT_BOS),
        "eos_token": added(DEFAULT_EOS),
        "pad_token": pad_token,
        "unk_token": added(DEFAULT_EOS),
    });
    let config = serde_json::json!({
        "add_prefix_space": false,
        "bos_token": added(DEFAULT_BOS),
        "do_lower_case": true,
        "eos_token": added(DEFAULT_EOS),
        "errors": "replace",
        "model_max_length": DEFAULT_MAX_LENGTH,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added(DEFAULT_EOS),
    });
    let pretty = |v: &serde_json::Value| {
        serde_json::to_string_pretty(v)
            .map(|s| s + "\n")
            .unwrap_or_default()
    };
    for (name, contents) in [
        ("vocab.json", vocab_json),
        ("merges.txt", merges_txt),
        ("special_tokens_map.json", pretty(&special_map)),
        ("tokenizer_config.json", pretty(&config)),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, contents).map_err(io_err(&path))?;
    }
    let id = |i: usize| u32::try_from(i).unwrap_or(u32::MAX);
    Ok(TinyClipTokenizer {
        vocab_size: tokens.len(),
        bos_id: id(tokens.len() - 2),
        eos_id: id(tokens.len() - 1),
        pad_id: id(pad_index),
        model_max_length: DEFAULT_MAX_LENGTH,
    })
}
