//! Tests of the CLIP tokenizer on the tiny generated tokenizer, plus parity
//! with transformers (fixtures made by tools/parity/make_tokenizer_fixture.py).

use std::path::{Path, PathBuf};

use agfsync_models::clip_tokenizer::{
    bytes_to_unicode, write_tiny_clip_tokenizer, ClipTokenizer, SpecialTokens, TokenizerError,
    DEFAULT_BOS, DEFAULT_EOS, TINY_CLIP_VOCAB_SIZE,
};
use anyhow::{Context, Result};

fn tiny(pad: &str) -> Result<(tempfile::TempDir, ClipTokenizer)> {
    let dir = tempfile::tempdir()?;
    write_tiny_clip_tokenizer(dir.path(), pad)?;
    let tok = ClipTokenizer::from_dir(dir.path())?;
    Ok((dir, tok))
}

fn long_prompt(words: usize) -> String {
    let pool = [
        "a", "photo", "of", "the", "red", "cat", "sitting", "on", "wooden", "table", "bright",
    ];
    (0..words)
        .map(|i| pool[i % pool.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn tiny_tokenizer_layout() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let info = write_tiny_clip_tokenizer(dir.path(), DEFAULT_EOS)?;
    assert_eq!(info.vocab_size, TINY_CLIP_VOCAB_SIZE);
    assert!(info.vocab_size < 1000);
    assert_eq!(info.bos_id as usize, info.vocab_size - 2);
    assert_eq!(info.eos_id as usize, info.vocab_size - 1);
    assert_eq!(info.pad_id, info.eos_id);
    assert_eq!(info.model_max_length, 77);

    let vocab: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("vocab.json"))?)?;
    assert_eq!(vocab.len(), info.vocab_size);
    let bytes = bytes_to_unicode();
    assert_eq!(bytes.len(), 256);
    for (i, (_, c)) in bytes.iter().enumerate() {
        assert_eq!(vocab[&c.to_string()], i);
        assert_eq!(vocab[&format!("{c}</w>")], i + 256);
    }
    assert_eq!(vocab[DEFAULT_BOS], info.bos_id);
    assert_eq!(vocab[DEFAULT_EOS], info.eos_id);

    let merges = std::fs::read_to_string(dir.path().join("merges.txt"))?;
    let mut lines = merges.lines();
    assert_eq!(lines.next(), Some("#version: 0.2"));
    assert_eq!(lines.count(), info.vocab_size - 514);

    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        dir.path().join("tokenizer_config.json"),
    )?)?;
    assert_eq!(config["model_max_length"], 77);
    assert_eq!(config["bos_token"]["content"], DEFAULT_BOS);
    assert!(dir.path().join("special_tokens_map.json").is_file());

    let tok = ClipTokenizer::from_dir(dir.path())?;
    assert_eq!(tok.vocab_size(), info.vocab_size);
    assert_eq!(tok.bos_id(), info.bos_id);
    assert_eq!(tok.eos_id(), info.eos_id);
    assert_eq!(tok.pad_id(), info.pad_id);
    assert_eq!(tok.model_max_length(), 77);

    // Deterministic output.
    let again = tempfile::tempdir()?;
    write_tiny_clip_tokenizer(again.path(), DEFAULT_EOS)?;
    for name in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        assert_eq!(
            std::fs::read(dir.path().join(name))?,
            std::fs::read(again.path().join(name))?,
            "{name}"
        );
    }
    Ok(())
}

#[test]
fn merges_produce_whole_words() -> Result<()> {
    let (_dir, tok) = tiny(DEFAULT_EOS)?;
    // Frequent corpus words become single tokens.
    for word in ["a", "the", "of", "and"] {
        let ids = tok.encode_raw(word)?;
        assert_eq!(ids.len(), 1, "{word}: {ids:?}");
        assert_eq!(tok.inner().id_to_token(ids[0]), Some(format!("{word}</w>")));
    }
    // A word outside the corpus still encodes (down to bytes if needed).
    let ids = tok.encode_raw("zxqv")?;
    assert!(!ids.is_empty());
    assert_eq!(tok.decode(&ids, true)?, "zxqv");
    Ok(())
}

#[test]
fn normalisation_and_round_trip() -> Result<()> {
    let (_dir, tok) = tiny(DEFAULT_EOS)?;
    // Lowercasing and whitespace collapse.
    assert_eq!(
        tok.encode_raw("A  PHOTO\tof a\n\nCat")?,
        tok.encode_raw("a photo of a cat")?
    );
    assert_eq!(tok.encode_raw("   a photo   ")?, tok.encode_raw("a photo")?);
    for (text, decoded) in [
        ("A photo of a CAT.", "a photo of a cat ."),
        ("hello, world!!", "hello , world !!"),
        ("the dog's ball isn't here", "the dog 's ball isn 't here"),
        (
            "they're we'll I'm you've he'd",
            "they 're we 'll i 'm you 've he 'd",
        ),
        ("café naïve", "café naïve"),
        ("東京 tower", "東京 tower"),
        ("cats 🐱!", "cats 🐱!"),
        ("2024 rocks", "2 0 2 4 rocks"),
    ] {
        let ids = tok.encode_raw(text)?;
        assert_eq!(tok.decode(&ids, true)?, decoded, "{text}");
    }
    // NFC: a combining accent encodes like the precomposed character.
    assert_eq!(tok.encode_raw("cafe\u{301}")?, tok.encode_raw("café")?);
    // Special tokens in the text are recognised as such.
    let ids = tok.encode_raw("a <|endoftext|> b")?;
    assert!(ids.contains(&tok.eos_id()), "{ids:?}");
    Ok(())
}

#[test]
fn padding_to_max_length() -> Result<()> {
    let (_dir, tok) = tiny(DEFAULT_EOS)?;
    let raw = tok.encode_raw("a photo of a cat")?;
    let enc = tok.encode_padded("a photo of a cat", 77)?;
    assert_eq!(enc.ids.len(), 77);
    assert!(!enc.truncated);
    assert_eq!(enc.ids[0], tok.bos_id());
    assert_eq!(&enc.ids[1..=raw.len()], raw.as_slice());
    assert_eq!(enc.eos_position, raw.len() + 1);
    assert_eq!(enc.ids[enc.eos_position], tok.eos_id());
    assert!(enc.ids[enc.eos_position + 1..]
        .iter()
        .all(|&id| id == tok.pad_id()));

    // Empty prompt: bos, eos, padding.
    let enc = tok.encode_padded("", 77)?;
    assert_eq!(enc.eos_position, 1);
    assert_eq!(&enc.ids[..2], &[tok.bos_id(), tok.eos_id()]);

    let batch = tok.encode_batch_padded(&["a cat", "a dog on the grass"], 16)?;
    assert_eq!(batch.len(), 2);
    assert!(batch.iter().all(|e| e.ids.len() == 16));
    assert_eq!(batch[0], tok.encode_padded("a cat", 16)?);

    assert!(matches!(
        tok.encode_padded("x", 1),
        Err(TokenizerError::MaxLenTooSmall { max_len: 1 })
    ));
    Ok(())
}

#[test]
fn truncation_keeps_eos_last() -> Result<()> {
    let (_dir, tok) = tiny(DEFAULT_EOS)?;
    let prompt = long_prompt(200);
    let raw = tok.encode_raw(&prompt)?;
    assert!(raw.len() > 75);
    let enc = tok.encode_padded(&prompt, 77)?;
    assert!(enc.truncated);
    assert_eq!(enc.ids.len(), 77);
    assert_eq!(enc.ids[0], tok.bos_id());
    assert_eq!(enc.ids[76], tok.eos_id());
    assert_eq!(enc.eos_position, 76);
    assert_eq!(&enc.ids[1..76], &raw[..75]);

    // Exactly 75 tokens fit without truncation.
    let exact: Vec<&str> = std::iter::repeat_n("a", 75).collect();
    let enc = tok.encode_padded(&exact.join(" "), 77)?;
    assert!(!enc.truncated);
    assert_eq!(enc.eos_position, 76);
    let enc = tok.encode_padded(&format!("{} a", exact.join(" ")), 77)?;
    assert!(enc.truncated);
    Ok(())
}

#[test]
fn sd2_style_pad_token() -> Result<()> {
    let (dir, tok) = tiny("!")?;
    assert_eq!(tok.pad_id(), 0);
    assert_ne!(tok.pad_id(), tok.eos_id());
    assert_eq!(tok.special_tokens().pad, "!");
    let enc = tok.encode_padded("a cat", 10)?;
    assert_eq!(enc.ids[enc.eos_position], tok.eos_id());
    assert!(enc.ids[enc.eos_position + 1..].iter().all(|&id| id == 0));
    // As in transformers, the SD 2.x pad token "!" is a special token, so a
    // "!" in a prompt encodes as the pad id.
    assert_eq!(tok.encode_raw("wow!")?.last(), Some(&0));
    let special = SpecialTokens::read(dir.path())?;
    assert_eq!(special.bos, DEFAULT_BOS);
    assert!(special.bos.normalized);
    assert_eq!(special.pad, "!");
    assert_eq!(special.model_max_length, Some(77));
    Ok(())
}

#[test]
fn special_tokens_as_strings_or_objects() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": {"content": "</s>", "normalized": false},
            "model_max_length": 1000000000000000019884624838656}"#,
    )?;
    std::fs::write(
        dir.path().join("special_tokens_map.json"),
        r#"{"pad_token": {"__type": "AddedToken", "content": "<pad>"}, "eos_token": "<eos>"}"#,
    )?;
    let s = SpecialTokens::read(dir.path())?;
    assert_eq!(s.bos, "<s>");
    assert!(!s.bos.normalized);
    assert_eq!(s.eos, "<eos>"); // special_tokens_map wins
    assert_eq!(s.pad, "<pad>");
    assert!(!s.pad.normalized);
    assert_eq!(s.unk, DEFAULT_EOS);
    assert_eq!(s.model_max_length, None);
    Ok(())
}

fn copy_configs(from: &Path, to: &Path) -> Result<()> {
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(from.join(name), to.join(name))?;
    }
    Ok(())
}

const SAMPLES: &[&str] = &[
    "a photo of a cat",
    "A PHOTO of a Cat!!!",
    "the dog's ball isn't here, they're gone",
    "café naïve résumé 東京 🐱",
    "numbers 1234 and 3.14 -- ok?",
    "<|startoftext|>inside<|endoftext|>",
    "",
];

#[test]
fn tokenizer_json_matches_vocab_and_merges() -> Result<()> {
    let (dir, from_files) = tiny(DEFAULT_EOS)?;
    let json_dir = tempfile::tempdir()?;
    from_files.save_tokenizer_json(json_dir.path().join("tokenizer.json"))?;
    copy_configs(dir.path(), json_dir.path())?;
    // No vocab.json / merges.txt there: tokenizer.json must be used.
    let from_json = ClipTokenizer::from_dir(json_dir.path())?;
    assert_eq!(from_json.vocab_size(), from_files.vocab_size());
    for text in SAMPLES.iter().copied().chain([long_prompt(120).as_str()]) {
        assert_eq!(
            from_json.encode_padded(text, 77)?,
            from_files.encode_padded(text, 77)?,
            "{text}"
        );
    }
    Ok(())
}

#[test]
fn not_a_tokenizer_folder() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("config.json"), "{}")?;
    let err = ClipTokenizer::from_dir(dir.path()).expect_err("no tokenizer files");
    assert!(matches!(err, TokenizerError::NotATokenizer { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("vocab.json") && msg.contains("config.json"),
        "{msg}"
    );

    // A pad token that is not in the vocabulary.
    let dir = tempfile::tempdir()?;
    assert!(matches!(
        write_tiny_clip_tokenizer(dir.path(), "<pad>"),
        Err(TokenizerError::UnknownSpecialToken { .. })
    ));
    Ok(())
}

// ---------------------------------------------------------------------------
// Parity with transformers
// ---------------------------------------------------------------------------

/// `fixtures/parity/tokenizer`, or `$AGFSYNC_TOKENIZER_FIXTURE_DIR`.
fn fixture_dir() -> PathBuf {
    std::env::var_os("AGFSYNC_TOKENIZER_FIXTURE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity/tokenizer")
        })
}

const TOKENIZER_FILES: [&str; 4] = [
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Writes the tiny tokenizer folders the parity script feeds to
/// transformers. Run by tools/parity/make_tokenizer_fixture.py:
/// `AGFSYNC_TOKENIZER_FIXTURE_DIR=... cargo test --test clip_tokenizer
/// write_parity_tokenizer_folders -- --ignored`.
#[test]
#[ignore = "fixture generator, run by tools/parity/make_tokenizer_fixture.py"]
fn write_parity_tokenizer_folders() -> Result<()> {
    let out = fixture_dir();
    write_tiny_clip_tokenizer(&out.join("tiny-sd15"), DEFAULT_EOS)?;
    write_tiny_clip_tokenizer(&out.join("tiny-sd2"), "!")?;
    Ok(())
}

fn ids_of(v: &serde_json::Value) -> Result<Vec<u32>> {
    v.as_array()
        .context("expected an array of ids")?
        .iter()
        .map(|x| {
            x.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .context("bad id")
        })
        .collect()
}

#[test]
fn parity_with_transformers() -> Result<()> {
    let fixtures = fixture_dir();
    let ids_path = fixtures.join("ids.json");
    let text = std::fs::read_to_string(&ids_path).with_context(|| {
        format!(
            "missing {}; run `python tools/parity/make_tokenizer_fixture.py`",
            ids_path.display()
        )
    })?;
    let fixture: serde_json::Value = serde_json::from_str(&text)?;
    let max_len = fixture["max_length"].as_u64().context("max_length")? as usize;

    for (variant, pad) in [("tiny-sd15", DEFAULT_EOS), ("tiny-sd2", "!")] {
        let folder = fixtures.join(variant);
        // The fixture folder must be what the writer produces today.
        let fresh = tempfile::tempdir()?;
        write_tiny_clip_tokenizer(fresh.path(), pad)?;
        for name in TOKENIZER_FILES {
            assert_eq!(
                std::fs::read(folder.join(name))
                    .with_context(|| format!("{}/{name}", folder.display()))?,
                std::fs::read(fresh.path().join(name))?,
                "{variant}/{name} is stale: rerun python tools/parity/make_tokenizer_fixture.py"
            );
        }
        let from_files = ClipTokenizer::from_dir(&folder)?;

        // transformers' own tokenizer.json, next to the same configs.
        let json_dir = tempfile::tempdir()?;
        std::fs::copy(
            fixtures.join(format!("{variant}.tokenizer.json")),
            json_dir.path().join("tokenizer.json"),
        )?;
        copy_configs(&folder, json_dir.path())?;
        let from_json = ClipTokenizer::from_dir(json_dir.path())?;

        let expected = &fixture["tokenizers"][variant];
        assert_eq!(expected["pad_token_id"], from_files.pad_id(), "{variant}");
        assert_eq!(expected["bos_token_id"], from_files.bos_id(), "{variant}");
        assert_eq!(expected["eos_token_id"], from_files.eos_id(), "{variant}");

        let cases = fixture["cases"].as_array().context("cases")?;
        assert!(cases.len() >= 15);
        for case in cases {
            let text = case["text"].as_str().context("text")?;
            let want = &case[variant];
            let padded = ids_of(&want["padded"])?;
            let raw = ids_of(&want["raw"])?;
            for (name, tok) in [
                ("vocab+merges", &from_files),
                ("tokenizer.json", &from_json),
            ] {
                assert_eq!(
                    tok.encode_raw(text)?,
                    raw,
                    "{variant} {name}: raw ids of {text:?}"
                );
                let enc = tok.encode_padded(text, max_len)?;
                assert_eq!(enc.ids, padded, "{variant} {name}: padded ids of {text:?}");
                assert_eq!(
                    enc.truncated,
                    want["truncated"].as_bool().context("truncated")?,
                    "{variant} {name}: truncated flag of {text:?}"
                );
            }
        }
    }
    Ok(())
}
