//! The run store: schema versions, transactions, path safety, Parquet.

use agfsync_store::pickapic::{
    read_pickapic, write_pickapic, write_pickapic_with, Compression, PickapicRow,
};
use agfsync_store::{
    prompt_id, resolve_inside, write_file_atomic, PromptRecord, Store, StoreError, SCHEMA_VERSION,
};
use anyhow::Result;

fn prompt(text: &str, ord: i64) -> PromptRecord {
    PromptRecord {
        pid: prompt_id("animals", text),
        ord,
        category: "animals".into(),
        text: text.into(),
        source: "test".into(),
    }
}

#[test]
fn a_store_from_a_newer_agfsync_is_refused_and_left_alone() -> Result<()> {
    let dir = tempfile::tempdir()?;
    drop(Store::open_or_create(dir.path())?);
    let db = dir.path().join("agfsync.db");
    {
        let conn = rusqlite::Connection::open(&db)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 5)?;
    }
    let before = std::fs::read(&db)?;
    match Store::open(dir.path()) {
        Err(StoreError::NewerSchema { found, .. }) => assert_eq!(found, SCHEMA_VERSION + 5),
        other => panic!("expected NewerSchema, got {other:?}"),
    }
    assert_eq!(std::fs::read(&db)?, before);
    Ok(())
}

#[test]
fn opening_a_directory_without_a_store_names_init() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = Store::open(dir.path()).expect_err("no store").to_string();
    assert!(err.contains("agfsync init"), "{err}");
}

#[test]
fn prompts_are_inserted_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = Store::open_or_create(dir.path())?;
    let p = vec![prompt("a cat", 0), prompt("a dog", 1)];
    assert_eq!(s.insert_prompts(&p)?, 2);
    assert_eq!(s.insert_prompts(&p)?, 0);
    assert_eq!(s.prompts()?, p);
    Ok(())
}

#[test]
fn paths_that_leave_the_run_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for bad in ["/etc/passwd", "../x.png", "images/../../x.png", ""] {
        assert!(resolve_inside(dir.path(), bad).is_err(), "{bad}");
    }
    assert!(resolve_inside(dir.path(), "images/a/0.png").is_ok());
    #[cfg(unix)]
    {
        let outside = tempfile::tempdir()?;
        std::fs::write(outside.path().join("secret"), b"x")?;
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link"))?;
        let err = resolve_inside(dir.path(), "link/secret")
            .expect_err("a symlink out of the run must be refused")
            .to_string();
        assert!(err.contains("symbolic link"), "{err}");
    }
    Ok(())
}

#[test]
fn atomic_writes_replace_whole_files() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let f = dir.path().join("a/b/c.bin");
    write_file_atomic(&f, b"first")?;
    write_file_atomic(&f, b"second")?;
    assert_eq!(std::fs::read(&f)?, b"second");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("a/b"))?.collect();
    assert_eq!(leftovers.len(), 1, "no temporary file may remain");
    Ok(())
}

#[test]
fn pickapic_parquet_round_trips_and_foreign_files_need_the_columns() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let f = dir.path().join("pairs.parquet");
    let rows: Vec<PickapicRow> = (0..300)
        .map(|i| PickapicRow {
            caption: format!("prompt {i} \u{e9}"),
            jpg_0: vec![i as u8; 10 + i % 7],
            jpg_1: vec![255 - i as u8; 3],
            label_0: if i % 3 == 0 { 0.5 } else { 1.0 },
            prompt_id: format!("{i:016x}"),
            reason: "{}".into(),
        })
        .collect();
    write_pickapic(&f, &rows)?;
    assert_eq!(read_pickapic(&f)?, rows);
    // Datasets are published with other codecs too.
    for codec in [
        Compression::GZIP(Default::default()),
        Compression::ZSTD(Default::default()),
        Compression::LZ4_RAW,
        Compression::UNCOMPRESSED,
    ] {
        write_pickapic_with(&f, &rows, codec)?;
        assert_eq!(read_pickapic(&f)?, rows, "{codec:?}");
    }
    std::fs::write(&f, b"not parquet")?;
    assert!(read_pickapic(&f).is_err());
    Ok(())
}

#[test]
fn a_version_one_store_migrates_forward_keeping_its_rows() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("agfsync.db");
    {
        // A store as the first release wrote it: schema 1 only.
        let conn = rusqlite::Connection::open(&db)?;
        conn.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE prompts (pid TEXT PRIMARY KEY, ord INTEGER NOT NULL, category TEXT NOT NULL,
                                   text TEXT NOT NULL, source TEXT NOT NULL);
             INSERT INTO prompts VALUES ('abc', 0, 'animals', 'a cat', 'test');",
        )?;
        conn.pragma_update(None, "user_version", 1)?;
    }
    let mut s = Store::open(dir.path())?;
    assert_eq!(s.prompts()?.len(), 1);
    s.insert_eval_items(&[agfsync_store::EvalItemRecord {
        bench: "b".into(),
        model: "base".into(),
        item: 0,
        prompt: "a cat".into(),
        grp: String::new(),
        seed: 1,
        image: "eval/b/base/0.png".into(),
    }])?;
    assert_eq!(s.eval_items("b")?.len(), 1);
    Ok(())
}

#[test]
fn pickapic_row_over_the_limit_is_refused_with_the_limit_named() -> anyhow::Result<()> {
    use agfsync_store::pickapic::{read_pickapic_bytes, read_pickapic_with, write_pickapic};
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("pairs.parquet");
    let row = agfsync_store::pickapic::PickapicRow {
        caption: "a cat".into(),
        jpg_0: vec![7; 3000],
        jpg_1: vec![8; 3000],
        label_0: 1.0,
        prompt_id: String::new(),
        reason: String::new(),
    };
    write_pickapic(&path, &[row.clone(), row])?;
    assert_eq!(read_pickapic_with(&path, 1 << 20)?.len(), 2);
    let err = read_pickapic_with(&path, 5000)
        .expect_err("a 6 kB row is over a 5000-byte limit")
        .to_string();
    assert!(err.contains("5000 bytes allowed per row"), "{err}");
    assert!(err.contains("read_pickapic_with"), "{err}");
    let bytes = std::fs::read(&path)?;
    assert!(read_pickapic_bytes(bytes, &path, 5000).is_err());
    Ok(())
}

/// Writes the Parquet seeds of the `pickapic_parquet` fuzz target with our
/// own writer (`cargo test -p agfsync-store --test store -- --ignored
/// write_fuzz_seeds`).
#[test]
#[ignore = "writes fuzz/corpus/pickapic_parquet; run by hand"]
fn write_fuzz_seeds() -> anyhow::Result<()> {
    use agfsync_store::pickapic::{write_pickapic_with, Compression, PickapicRow};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let img = |f: &str| std::fs::read(root.join("fixtures/parity/feedback/images").join(f));
    let out = root.join("fuzz/corpus/pickapic_parquet");
    std::fs::create_dir_all(&out)?;
    let row = |label_0: f64, a: Vec<u8>, b: Vec<u8>| PickapicRow {
        caption: "a red cube".into(),
        jpg_0: a,
        jpg_1: b,
        label_0,
        prompt_id: "p1".into(),
        reason: "{}".into(),
    };
    let (png, jpg) = (img("bilevel.png")?, img("tiny.jpg")?);
    write_pickapic_with(
        &out.join("two_rows.parquet"),
        &[
            row(1.0, png.clone(), jpg.clone()),
            row(0.5, png.clone(), png.clone()),
        ],
        Compression::UNCOMPRESSED,
    )?;
    write_pickapic_with(
        &out.join("snappy.parquet"),
        &[row(0.0, jpg, png.clone())],
        Compression::SNAPPY,
    )?;
    write_pickapic_with(
        &out.join("bad_image.parquet"),
        &[row(1.0, b"not an image".to_vec(), png)],
        Compression::UNCOMPRESSED,
    )?;
    Ok(())
}

/// Regression (found by the `pickapic_parquet` fuzz target): a 22-byte
/// Parquet file whose footer declares a list of about two billion elements
/// made parquet 57 reserve the whole list and abort the process; parquet 60
/// bounds list sizes by the input, so the file is refused with an error.
// Found by the pickapic_parquet fuzz target: a footer whose column chunk
// starts at a negative offset made the parquet crate's reader assert
// (a panic) when the rows were read.
#[test]
fn parquet_negative_column_offset_is_refused_not_a_panic() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_regressions/parquet_negative_column_offset.parquet");
    let bytes = std::fs::read(&path).expect("the regression input is in the repository");
    let err = agfsync_store::pickapic::read_pickapic_bytes(bytes, &path, 64 << 20)
        .expect_err("a corrupt footer must be refused");
    let msg = err.to_string();
    assert!(msg.contains("parquet_negative_column_offset"), "{msg}");
    assert!(msg.contains("corrupt footer"), "{msg}");
}

// Also found by the fuzz target: pages that make the parquet crate's
// decoder assert while a row is read (a bit-packed run longer than its
// buffer; a dictionary-encoded page without a dictionary page). The panic is
// caught and returned as an error naming the file and the row.
#[test]
fn parquet_pages_that_make_the_decoder_assert_are_refused_not_a_panic() {
    for name in [
        "parquet_bit_packed_run_past_buffer",
        "parquet_dictionary_page_missing",
        "parquet_negative_column_offset_dpo",
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/fuzz_regressions/{name}.parquet"));
        let bytes = std::fs::read(&path).expect("the regression input is in the repository");
        let err = agfsync_store::pickapic::read_pickapic_bytes(bytes, &path, 64 << 20)
            .expect_err("a corrupt file must be refused");
        assert!(err.to_string().contains(name), "{err}");
    }
}

#[test]
fn parquet_thrift_list_capacity_is_refused_not_aborted() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_regressions/parquet_thrift_list_capacity.parquet");
    let bytes = std::fs::read(&path).expect("the regression input is in the repository");
    let err = agfsync_store::pickapic::read_pickapic_bytes(bytes, &path, 64 << 20)
        .expect_err("a corrupt footer must be refused");
    assert!(
        err.to_string().contains("parquet_thrift_list_capacity"),
        "{err}"
    );
}
