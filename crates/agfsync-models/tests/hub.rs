//! Tests of model resolution against a fake Hugging Face cache (no network).

use std::path::PathBuf;

use agfsync_models::hub::{
    cached_snapshot, find_weights, read_shard_index, resolve_model, HubError, HubOptions,
    ModelSource, RepoSpec,
};
use anyhow::Result;

mod support;
use support::*;

// ---------------------------------------------------------------------------
// Options from the environment
// ---------------------------------------------------------------------------

#[test]
fn env_cache_dir_precedence() {
    let o = HubOptions::from_lookup(lookup(&[("HOME", "/home/u")]));
    assert_eq!(o.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
    assert!(!o.offline);
    assert!(o.progress);

    let o = HubOptions::from_lookup(lookup(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")]));
    assert_eq!(o.cache_dir, PathBuf::from("/xdg/huggingface/hub"));

    let o = HubOptions::from_lookup(lookup(&[
        ("HOME", "/home/u"),
        ("XDG_CACHE_HOME", "/xdg"),
        ("HF_HOME", "/hf"),
    ]));
    assert_eq!(o.cache_dir, PathBuf::from("/hf/hub"));

    let o = HubOptions::from_lookup(lookup(&[
        ("HOME", "/home/u"),
        ("HF_HOME", "/hf"),
        ("HF_HUB_CACHE", "/explicit"),
    ]));
    assert_eq!(o.cache_dir, PathBuf::from("/explicit"));

    let o = HubOptions::from_lookup(lookup(&[("HOME", "/home/u"), ("HF_HOME", "~/hf")]));
    assert_eq!(o.cache_dir, PathBuf::from("/home/u/hf/hub"));

    // Empty values count as unset.
    let o = HubOptions::from_lookup(lookup(&[("HOME", "/home/u"), ("HF_HUB_CACHE", "")]));
    assert_eq!(o.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
}

#[test]
fn env_offline_flag() {
    for (value, expected) in [
        ("1", true),
        ("true", true),
        ("TRUE", true),
        ("yes", true),
        ("on", true),
        ("0", false),
        ("false", false),
        ("no", false),
        ("", false),
    ] {
        let o = HubOptions::from_lookup(lookup(&[("HOME", "/h"), ("HF_HUB_OFFLINE", value)]));
        assert_eq!(o.offline, expected, "HF_HUB_OFFLINE={value:?}");
    }
    let o = HubOptions::from_lookup(lookup(&[("HOME", "/h"), ("TRANSFORMERS_OFFLINE", "1")]));
    assert!(o.offline);
    let o = HubOptions::from_lookup(lookup(&[
        ("HOME", "/h"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ]));
    assert!(!o.progress);
}

#[test]
fn env_token_sources() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let hf_home = tmp.path().join("hf");
    std::fs::create_dir_all(&hf_home)?;
    let home = hf_home.to_str().expect("utf-8 path");

    let o = HubOptions::from_lookup(lookup(&[("HF_HOME", home)]));
    assert_eq!(o.token, None);

    std::fs::write(hf_home.join("token"), "hf_from_file\n")?;
    let o = HubOptions::from_lookup(lookup(&[("HF_HOME", home)]));
    assert_eq!(o.token.as_deref(), Some("hf_from_file"));

    let o = HubOptions::from_lookup(lookup(&[("HF_HOME", home), ("HF_TOKEN", "hf_env")]));
    assert_eq!(o.token.as_deref(), Some("hf_env"));

    let other = tmp.path().join("elsewhere");
    std::fs::write(&other, "hf_token_path")?;
    let o = HubOptions::from_lookup(lookup(&[
        ("HF_HOME", home),
        ("HF_TOKEN_PATH", other.to_str().expect("utf-8 path")),
    ]));
    assert_eq!(o.token.as_deref(), Some("hf_token_path"));

    // The token never shows up in debug output.
    assert!(!format!("{o:?}").contains("hf_token_path"));
    Ok(())
}

// ---------------------------------------------------------------------------
// Spec parsing
// ---------------------------------------------------------------------------

#[test]
fn repo_spec_parsing() -> Result<()> {
    let s = RepoSpec::parse("org/name")?;
    assert_eq!(
        (s.repo_id.as_str(), s.revision.as_str()),
        ("org/name", "main")
    );
    assert_eq!(s.cache_folder_name(), "models--org--name");

    let s = RepoSpec::parse("stabilityai/stable-diffusion-2-1@fp16")?;
    assert_eq!(s.revision, "fp16");
    let s = RepoSpec::parse("org/name@refs/pr/3")?;
    assert_eq!(s.revision, "refs/pr/3");
    let s = RepoSpec::parse(&format!("org/name@{HASH}"))?;
    assert!(s.revision_is_commit());
    let s = RepoSpec::parse("gpt2")?;
    assert_eq!(s.repo_id, "gpt2");
    Ok(())
}

#[test]
fn invalid_specs_are_rejected_clearly() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let opts = HubOptions::offline(tmp.path());
    for spec in [
        "",
        "   ",
        "org/my model",
        "a/b/c",
        "./does/not/exist",
        "org/../x",
        "../x",
        "org/name@",
        "org/-bad",
        "org//name",
        "org/name@../../etc",
    ] {
        let err = resolve_model(spec, &opts).expect_err(spec);
        assert!(
            matches!(err, HubError::InvalidSpec { .. }),
            "{spec:?}: {err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("neither an existing local folder nor a valid Hugging Face repo id"),
            "{msg}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Resolution
// ---------------------------------------------------------------------------

#[test]
fn local_folder_passthrough() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_local(tmp.path(), &["model_index.json", "unet/config.json"])?;
    // A local folder wins even when offline with an empty cache.
    let cache = tempfile::tempdir()?;
    let src = resolve_model(
        tmp.path().to_str().expect("utf-8 path"),
        &HubOptions::offline(cache.path()),
    )?;
    assert!(src.is_local());
    assert!(src.repo().is_none());
    assert_eq!(src.root(), tmp.path());
    assert!(src.exists("unet/config.json"));
    assert!(!src.exists("vae/config.json"));
    assert_eq!(
        src.file("unet/config.json")?,
        tmp.path().join("unet/config.json")
    );
    assert_eq!(src.list("")?, vec!["model_index.json".to_string()]);
    let err = src.file("vae/config.json").expect_err("missing file");
    assert!(matches!(err, HubError::MissingFile { .. }));
    assert!(err.to_string().contains("vae/config.json"));
    assert!(src.file("../escape").is_err());
    assert!(src.file("/abs").is_err());
    Ok(())
}

#[test]
fn offline_resolution_from_cache() -> Result<()> {
    let cache = tempfile::tempdir()?;
    let snapshot = fake_repo(
        cache.path(),
        "org/tiny-sd",
        Some("main"),
        HASH,
        &[
            ("model_index.json", "{}"),
            ("unet/config.json", "{\"sample_size\": 8}"),
            ("unet/diffusion_pytorch_model.safetensors", "w"),
        ],
    )?;
    let src = resolve_model("org/tiny-sd", &HubOptions::offline(cache.path()))?;
    assert!(!src.is_local());
    assert!(src.is_offline());
    assert_eq!(src.commit(), Some(HASH));
    assert_eq!(src.root(), snapshot);
    assert_eq!(src.repo().map(|r| r.revision.as_str()), Some("main"));
    let config = src.file("unet/config.json")?;
    assert_eq!(std::fs::read_to_string(config)?, "{\"sample_size\": 8}");
    assert!(src.exists("model_index.json"));
    assert!(!src.exists("vae/config.json"));
    assert_eq!(
        src.list("unet")?,
        vec![
            "config.json".to_string(),
            "diffusion_pytorch_model.safetensors".to_string()
        ]
    );
    assert_eq!(src.optional_file("vae/config.json")?, None);

    let err = src.file("vae/config.json").expect_err("not cached");
    assert!(matches!(err, HubError::FileNotCached { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("vae/config.json") && msg.contains("org/tiny-sd"),
        "{msg}"
    );
    assert!(msg.contains("offline"), "{msg}");
    Ok(())
}

#[test]
fn revision_by_commit_hash() -> Result<()> {
    let cache = tempfile::tempdir()?;
    fake_repo(
        cache.path(),
        "org/tiny-sd",
        Some("main"),
        HASH,
        &[("model_index.json", "main")],
    )?;
    // An older snapshot with no ref pointing at it.
    let old = fake_repo(
        cache.path(),
        "org/tiny-sd",
        None,
        OTHER_HASH,
        &[("model_index.json", "old")],
    )?;
    let src = resolve_model(
        &format!("org/tiny-sd@{OTHER_HASH}"),
        &HubOptions::offline(cache.path()),
    )?;
    assert_eq!(src.commit(), Some(OTHER_HASH));
    assert_eq!(src.root(), old);
    assert_eq!(
        std::fs::read_to_string(src.file("model_index.json")?)?,
        "old"
    );

    // A named ref other than main.
    fake_repo(
        cache.path(),
        "org/tiny-sd",
        Some("refs/pr/1"),
        OTHER_HASH,
        &[],
    )?;
    let src = resolve_model("org/tiny-sd@refs/pr/1", &HubOptions::offline(cache.path()))?;
    assert_eq!(src.commit(), Some(OTHER_HASH));
    Ok(())
}

#[test]
fn missing_revision_lists_paths_and_fixes() -> Result<()> {
    let cache = tempfile::tempdir()?;
    fake_repo(
        cache.path(),
        "org/tiny-sd",
        Some("main"),
        HASH,
        &[("model_index.json", "{}")],
    )?;
    let err =
        resolve_model("org/tiny-sd@v2", &HubOptions::offline(cache.path())).expect_err("no v2");
    let HubError::NotCached {
        repo_id,
        revision,
        looked_at,
    } = &err
    else {
        panic!("unexpected error {err:?}");
    };
    assert_eq!(repo_id, "org/tiny-sd");
    assert_eq!(revision, "v2");
    let ref_path = cache.path().join("models--org--tiny-sd/refs/v2");
    assert!(looked_at.contains(&ref_path), "{looked_at:?}");
    let msg = err.to_string();
    assert!(msg.contains("org/tiny-sd") && msg.contains("`v2`"), "{msg}");
    assert!(msg.contains(&ref_path.display().to_string()), "{msg}");
    assert!(msg.contains("HF_HUB_OFFLINE"), "{msg}");
    assert!(msg.contains("HF_HUB_CACHE"), "{msg}");
    assert!(msg.contains("local model folder"), "{msg}");

    // A commit hash that is not cached: the snapshot path is listed.
    let err = resolve_model(
        &format!("org/tiny-sd@{OTHER_HASH}"),
        &HubOptions::offline(cache.path()),
    )
    .expect_err("not cached");
    let msg = err.to_string();
    assert!(
        msg.contains(
            &cache
                .path()
                .join("models--org--tiny-sd/snapshots")
                .join(OTHER_HASH)
                .display()
                .to_string()
        ),
        "{msg}"
    );

    // A repo that is not cached at all.
    let err =
        resolve_model("someone/else", &HubOptions::offline(cache.path())).expect_err("not cached");
    assert!(matches!(err, HubError::NotCached { .. }));
    assert!(err.to_string().contains("models--someone--else"));

    // A ref pointing at a snapshot that was deleted.
    fake_repo(cache.path(), "org/broken", Some("main"), HASH, &[])?;
    std::fs::remove_dir_all(cache.path().join("models--org--broken/snapshots"))?;
    let spec = RepoSpec::parse("org/broken")?;
    let looked = cached_snapshot(cache.path(), &spec).expect_err("dangling ref");
    assert_eq!(looked.len(), 2, "{looked:?}");
    Ok(())
}

// ---------------------------------------------------------------------------
// Weights
// ---------------------------------------------------------------------------

#[test]
fn variant_preference_and_fallback() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_local(
        tmp.path(),
        &[
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.fp16.safetensors",
            "text_encoder/model.bf16.safetensors",
        ],
    )?;
    let src = ModelSource::local(tmp.path());
    let w = find_weights(&src, "unet", "diffusion_pytorch_model", Some("fp16"))?;
    assert_eq!(names(&w), ["diffusion_pytorch_model.fp16.safetensors"]);
    let w = find_weights(&src, "unet", "diffusion_pytorch_model", None)?;
    assert_eq!(names(&w), ["diffusion_pytorch_model.safetensors"]);
    // Requested variant missing: plain file.
    let w = find_weights(&src, "vae", "diffusion_pytorch_model", Some("fp16"))?;
    assert_eq!(names(&w), ["diffusion_pytorch_model.safetensors"]);
    // No plain file: the variants, fp16 first.
    let w = find_weights(&src, "text_encoder", "model", None)?;
    assert_eq!(names(&w), ["model.fp16.safetensors"]);
    let w = find_weights(&src, "text_encoder", "model", Some("bf16"))?;
    assert_eq!(names(&w), ["model.bf16.safetensors"]);
    assert_eq!(w[0], tmp.path().join("text_encoder/model.bf16.safetensors"));
    Ok(())
}

#[test]
fn transformers_root_folder() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_local(tmp.path(), &["config.json", "model.safetensors"])?;
    let src = resolve_model(
        tmp.path().to_str().expect("utf-8 path"),
        &HubOptions::offline(tmp.path().join("no-cache")),
    )?;
    let w = find_weights(&src, "", "model", Some("fp16"))?;
    assert_eq!(w, vec![tmp.path().join("model.safetensors")]);
    Ok(())
}

#[test]
fn sharded_index() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_local(
        tmp.path(),
        &[
            "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
            "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
            "unet/diffusion_pytorch_model.fp16-00001-of-00001.safetensors",
        ],
    )?;
    std::fs::write(
        tmp.path()
            .join("unet/diffusion_pytorch_model.safetensors.index.json"),
        r#"{"metadata": {"total_size": 10}, "weight_map": {
            "a.weight": "diffusion_pytorch_model-00002-of-00002.safetensors",
            "b.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",
            "c.weight": "diffusion_pytorch_model-00002-of-00002.safetensors"}}"#,
    )?;
    std::fs::write(
        tmp.path()
            .join("unet/diffusion_pytorch_model.safetensors.index.fp16.json"),
        r#"{"weight_map": {"a.weight": "diffusion_pytorch_model.fp16-00001-of-00001.safetensors"}}"#,
    )?;
    let src = ModelSource::local(tmp.path());
    let w = find_weights(&src, "unet", "diffusion_pytorch_model", None)?;
    assert_eq!(
        names(&w),
        [
            "diffusion_pytorch_model-00001-of-00002.safetensors",
            "diffusion_pytorch_model-00002-of-00002.safetensors"
        ]
    );
    let w = find_weights(&src, "unet", "diffusion_pytorch_model", Some("fp16"))?;
    assert_eq!(
        names(&w),
        ["diffusion_pytorch_model.fp16-00001-of-00001.safetensors"]
    );

    // A shard named by the index but absent.
    std::fs::remove_file(
        tmp.path()
            .join("unet/diffusion_pytorch_model-00002-of-00002.safetensors"),
    )?;
    let err = find_weights(&src, "unet", "diffusion_pytorch_model", None).expect_err("missing");
    assert!(err
        .to_string()
        .contains("diffusion_pytorch_model-00002-of-00002.safetensors"));
    Ok(())
}

#[test]
fn invalid_shard_index() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("model.safetensors.index.json");
    for (bad, why) in [
        ("not json", "not valid JSON"),
        (r#"{"metadata": {}}"#, "weight_map"),
        (r#"{"weight_map": {}}"#, "empty"),
        (r#"{"weight_map": {"a": "../x.safetensors"}}"#, "shard name"),
        (
            r#"{"weight_map": {"a": "pytorch_model.bin"}}"#,
            ".safetensors",
        ),
    ] {
        std::fs::write(&path, bad)?;
        let err = read_shard_index(&path).expect_err(bad);
        assert!(matches!(err, HubError::InvalidIndex { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(why), "{bad}: {msg}");
        assert!(msg.contains("model.safetensors.index.json"), "{msg}");
    }
    Ok(())
}

#[test]
fn pickle_only_folders_are_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_local(
        tmp.path(),
        &[
            "unet/config.json",
            "unet/diffusion_pytorch_model.bin",
            "text_encoder/pytorch_model.bin",
        ],
    )?;
    let src = ModelSource::local(tmp.path());
    let err = find_weights(&src, "unet", "diffusion_pytorch_model", Some("fp16"))
        .expect_err("pickle only");
    assert!(matches!(err, HubError::PickleOnly { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("diffusion_pytorch_model.bin"), "{msg}");
    assert!(msg.contains("requires safetensors"), "{msg}");
    assert!(msg.contains("python -c"), "{msg}");
    assert!(msg.contains("from diffusers import"), "{msg}");
    assert!(msg.contains("safe_serialization=True"), "{msg}");

    let err = find_weights(&src, "text_encoder", "model", None).expect_err("pickle only");
    assert!(err.to_string().contains("pytorch_model.bin"));
    Ok(())
}

#[test]
fn no_weights_lists_what_was_tried() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_local(tmp.path(), &["vae/config.json"])?;
    let src = ModelSource::local(tmp.path());
    let err = find_weights(&src, "vae", "diffusion_pytorch_model", Some("fp16")).expect_err("none");
    let HubError::WeightsNotFound {
        looked_for,
        present,
        ..
    } = &err
    else {
        panic!("unexpected {err:?}");
    };
    assert_eq!(
        looked_for,
        &[
            "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.safetensors.index.fp16.json",
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.safetensors.index.json",
        ]
    );
    assert_eq!(present, &["config.json"]);
    assert!(err.to_string().contains("vae"));

    let err = find_weights(&src, "unet", "diffusion_pytorch_model", None).expect_err("none");
    assert!(err.to_string().contains("missing or empty"), "{err}");
    Ok(())
}

#[test]
fn weights_from_offline_cache() -> Result<()> {
    let cache = tempfile::tempdir()?;
    fake_repo(
        cache.path(),
        "org/tiny-sd",
        Some("main"),
        HASH,
        &[
            ("unet/config.json", "{}"),
            ("unet/diffusion_pytorch_model.fp16.safetensors", "half"),
            (
                "text_encoder/model.safetensors.index.json",
                r#"{"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}"#,
            ),
            ("text_encoder/model-00001-of-00002.safetensors", "s1"),
        ],
    )?;
    let src = resolve_model("org/tiny-sd", &HubOptions::offline(cache.path()))?;
    let w = find_weights(&src, "unet", "diffusion_pytorch_model", None)?;
    assert_eq!(names(&w), ["diffusion_pytorch_model.fp16.safetensors"]);
    assert_eq!(std::fs::read_to_string(&w[0])?, "half");

    // The second shard was never downloaded: a clear offline error.
    let err = find_weights(&src, "text_encoder", "model", None).expect_err("shard missing");
    assert!(matches!(err, HubError::FileNotCached { .. }), "{err:?}");
    assert!(err
        .to_string()
        .contains("text_encoder/model-00002-of-00002.safetensors"));
    Ok(())
}
