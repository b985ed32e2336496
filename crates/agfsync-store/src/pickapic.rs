//! Pairs as Pick-a-Pic Parquet: the exchange format of the diffusers and
//! DiffusionDPO training scripts (`caption`, `jpg_0`, `jpg_1`, `label_0`,
//! with `label_0 = 1` when `jpg_0` is preferred, `0.5` for a tie).
//!
//! We write `jpg_0` as the winner, so `label_0` is 1.0 and `label_1` 0.0.
//! The image columns hold our PNG bytes (Pick-a-Pic readers decode with
//! Pillow, which sniffs the format). Two extra columns, `prompt_id` and
//! `agfsync_reason`, carry our ids and the pair's reason; readers that only
//! know Pick-a-Pic ignore them. Row groups hold at most
//! [`ROWS_PER_GROUP`] pairs so readers can stream large exports.

use std::path::Path;
use std::sync::Arc;

pub use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, DoubleType};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{ChunkReader, FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::record::{Field, Row};
use parquet::schema::parser::parse_message_type;

use crate::error::{Result, StoreError};

/// Pairs per row group in exported files.
pub const ROWS_PER_GROUP: usize = 256;

/// One Pick-a-Pic row.
#[derive(Clone, Debug, PartialEq)]
pub struct PickapicRow {
    /// The prompt.
    pub caption: String,
    /// First image (encoded PNG/JPEG bytes).
    pub jpg_0: Vec<u8>,
    /// Second image.
    pub jpg_1: Vec<u8>,
    /// 1.0 when `jpg_0` is preferred, 0.0 when `jpg_1` is, 0.5 a tie.
    pub label_0: f64,
    /// agfsync's prompt id (empty for foreign files).
    pub prompt_id: String,
    /// agfsync's reason for the pair, JSON (empty for foreign files).
    pub reason: String,
}

const SCHEMA: &str = "message pickapic {
    REQUIRED BYTE_ARRAY caption (UTF8);
    REQUIRED BYTE_ARRAY jpg_0;
    REQUIRED BYTE_ARRAY jpg_1;
    REQUIRED DOUBLE label_0;
    REQUIRED DOUBLE label_1;
    REQUIRED BYTE_ARRAY prompt_id (UTF8);
    REQUIRED BYTE_ARRAY agfsync_reason (UTF8);
}";

fn pq_err(path: &Path) -> impl Fn(parquet::errors::ParquetError) -> StoreError + '_ {
    move |e| StoreError::Parquet {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Writes `rows` to `path` (Snappy-compressed; atomically: a temporary file
/// renamed into place).
pub fn write_pickapic(path: &Path, rows: &[PickapicRow]) -> Result<()> {
    write_pickapic_with(path, rows, Compression::SNAPPY)
}

/// [`write_pickapic`] with another codec (gzip, zstd, LZ4, none).
pub fn write_pickapic_with(path: &Path, rows: &[PickapicRow], codec: Compression) -> Result<()> {
    let e = pq_err(path);
    let schema = Arc::new(parse_message_type(SCHEMA).map_err(&e)?);
    let props = Arc::new(WriterProperties::builder().set_compression(codec).build());
    let mut buf: Vec<u8> = Vec::new();
    {
        let mut writer = SerializedFileWriter::new(&mut buf, schema, props).map_err(&e)?;
        for group in rows.chunks(ROWS_PER_GROUP) {
            let mut rg = writer.next_row_group().map_err(&e)?;
            let mut col_index = 0;
            while let Some(mut col) = rg.next_column().map_err(&e)? {
                let bytes = |f: &dyn Fn(&PickapicRow) -> &[u8]| -> Vec<ByteArray> {
                    group
                        .iter()
                        .map(|r| ByteArray::from(f(r).to_vec()))
                        .collect()
                };
                match col_index {
                    0 => col.typed::<ByteArrayType>().write_batch(
                        &bytes(&|r| r.caption.as_bytes()),
                        None,
                        None,
                    ),
                    1 => {
                        col.typed::<ByteArrayType>()
                            .write_batch(&bytes(&|r| &r.jpg_0), None, None)
                    }
                    2 => {
                        col.typed::<ByteArrayType>()
                            .write_batch(&bytes(&|r| &r.jpg_1), None, None)
                    }
                    3 => {
                        let v: Vec<f64> = group.iter().map(|r| r.label_0).collect();
                        col.typed::<DoubleType>().write_batch(&v, None, None)
                    }
                    4 => {
                        let v: Vec<f64> = group.iter().map(|r| 1.0 - r.label_0).collect();
                        col.typed::<DoubleType>().write_batch(&v, None, None)
                    }
                    5 => col.typed::<ByteArrayType>().write_batch(
                        &bytes(&|r| r.prompt_id.as_bytes()),
                        None,
                        None,
                    ),
                    _ => col.typed::<ByteArrayType>().write_batch(
                        &bytes(&|r| r.reason.as_bytes()),
                        None,
                        None,
                    ),
                }
                .map_err(&e)?;
                col.close().map_err(&e)?;
                col_index += 1;
            }
            rg.close().map_err(&e)?;
        }
        writer.close().map_err(&e)?;
    }
    crate::write_file_atomic(path, &buf)
}

/// The default row size limit of [`read_pickapic`]: 64 MiB.
pub const DEFAULT_MAX_ROW_BYTES: u64 = 64 << 20;

/// Reads the Pick-a-Pic columns of a Parquet file (ours or anyone's: the
/// agfsync columns are optional). Errors name the missing column. Rows over
/// [`DEFAULT_MAX_ROW_BYTES`] are refused.
pub fn read_pickapic(path: &Path) -> Result<Vec<PickapicRow>> {
    read_pickapic_with(path, DEFAULT_MAX_ROW_BYTES)
}

/// [`read_pickapic`] refusing rows larger than `max_row_bytes`.
pub fn read_pickapic_with(path: &Path, max_row_bytes: u64) -> Result<Vec<PickapicRow>> {
    let file = std::fs::File::open(path).map_err(|err| StoreError::io(path, err))?;
    read_rows(file, path, max_row_bytes)
}

/// [`read_pickapic_with`] of a file held in memory (`path` names it in
/// errors).
pub fn read_pickapic_bytes(
    bytes: Vec<u8>,
    path: &Path,
    max_row_bytes: u64,
) -> Result<Vec<PickapicRow>> {
    read_rows(bytes::Bytes::from(bytes), path, max_row_bytes)
}

/// Refuses a footer whose column chunks lie outside the file (negative
/// offsets or sizes, or past the end): the parquet crate asserts on such
/// chunks when it builds their readers, and a failed assertion is a panic.
/// The error is the reason, for the caller to wrap with the file's name.
pub fn check_column_ranges<R: ChunkReader + 'static>(
    reader: &SerializedFileReader<R>,
    file_len: u64,
) -> std::result::Result<(), String> {
    for (g, rg) in reader.metadata().row_groups().iter().enumerate() {
        for (c, col) in rg.columns().iter().enumerate() {
            let start = col
                .dictionary_page_offset()
                .unwrap_or_else(|| col.data_page_offset());
            let len = col.compressed_size();
            let end = u64::try_from(start)
                .ok()
                .zip(u64::try_from(len).ok())
                .and_then(|(s, l)| s.checked_add(l));
            if end.is_none_or(|end| end > file_len) {
                return Err(format!(
                    "corrupt footer: row group {g}, column {c} ({}) claims bytes {start}..+{len} \
                     of a {file_len}-byte file",
                    col.column_path()
                ));
            }
        }
    }
    Ok(())
}

/// Refuses, before any page is decompressed, a row group larger than
/// `max_row_bytes` times its rows (it holds at least one row over the
/// limit). The error says which group holds how much, for the caller to
/// complete with the limit.
pub fn check_row_group_sizes<R: ChunkReader + 'static>(
    reader: &SerializedFileReader<R>,
    max_row_bytes: u64,
) -> std::result::Result<(), String> {
    for (g, rg) in reader.metadata().row_groups().iter().enumerate() {
        let rows = u64::try_from(rg.num_rows()).unwrap_or(0);
        let bytes = u64::try_from(rg.total_byte_size()).unwrap_or(u64::MAX);
        if bytes > max_row_bytes.saturating_mul(rows.max(1)) {
            return Err(format!("row group {g} holds {bytes} bytes in {rows} rows"));
        }
    }
    Ok(())
}

/// The bytes a decoded row holds: its strings and byte arrays, 8 for any
/// other field.
pub fn row_bytes(row: &Row) -> u64 {
    row.get_column_iter()
        .map(|(_, f)| match f {
            Field::Str(s) => s.len() as u64,
            Field::Bytes(b) => b.len() as u64,
            _ => 8,
        })
        .sum()
}

/// The rows of a Parquet record iterator, with a panic of the parquet crate
/// while decoding a row (it asserts on some malformed pages: a bit-packed
/// run longer than its buffer, a dictionary-encoded page without a
/// dictionary) returned as an error instead of unwinding through the
/// caller. Iteration ends after such an error.
pub struct GuardedRows<I> {
    inner: I,
    failed: bool,
}

impl<I> GuardedRows<I> {
    /// Guards `rows`.
    pub fn new(rows: I) -> Self {
        Self {
            inner: rows,
            failed: false,
        }
    }
}

impl<I: Iterator<Item = parquet::errors::Result<Row>>> Iterator for GuardedRows<I> {
    type Item = std::result::Result<Row, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.inner.next())) {
            Ok(row) => row.map(|r| r.map_err(|e| e.to_string())),
            Err(panic) => {
                self.failed = true;
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown".into());
                Some(Err(format!(
                    "corrupt data pages: the Parquet decoder failed ({what})"
                )))
            }
        }
    }
}

fn read_rows<R: ChunkReader + 'static>(
    input: R,
    path: &Path,
    max_row_bytes: u64,
) -> Result<Vec<PickapicRow>> {
    let e = pq_err(path);
    let file_len = input.len();
    let reader = SerializedFileReader::new(input).map_err(&e)?;
    check_column_ranges(&reader, file_len).map_err(|reason| StoreError::Parquet {
        path: path.to_path_buf(),
        reason,
    })?;
    let too_big = |what: String| StoreError::Parquet {
        path: path.to_path_buf(),
        reason: format!(
            "{what}, more than the {max_row_bytes} bytes allowed per row; pass a larger \
             limit to read_pickapic_with if the file is trusted"
        ),
    };
    check_row_group_sizes(&reader, max_row_bytes).map_err(too_big)?;
    let present: Vec<String> = reader
        .metadata()
        .file_metadata()
        .schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    for need in ["caption", "jpg_0", "jpg_1", "label_0"] {
        if !present.iter().any(|p| p == need) {
            return Err(StoreError::Parquet {
                path: path.to_path_buf(),
                reason: format!(
                    "missing Pick-a-Pic column `{need}` (the file has: {})",
                    present.join(", ")
                ),
            });
        }
    }
    let mut out = Vec::new();
    let rows = GuardedRows::new(reader.get_row_iter(None).map_err(&e)?);
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|reason| StoreError::Parquet {
            path: path.to_path_buf(),
            reason: format!("row {i}: {reason}"),
        })?;
        let size = row_bytes(&row);
        if size > max_row_bytes {
            return Err(too_big(format!("row {i} holds {size} bytes")));
        }
        let mut r = PickapicRow {
            caption: String::new(),
            jpg_0: Vec::new(),
            jpg_1: Vec::new(),
            label_0: f64::NAN,
            prompt_id: String::new(),
            reason: String::new(),
        };
        for (name, field) in row.get_column_iter() {
            match (name.as_str(), field) {
                ("caption", Field::Str(s)) => r.caption = s.clone(),
                ("jpg_0", Field::Bytes(b)) => r.jpg_0 = b.data().to_vec(),
                ("jpg_1", Field::Bytes(b)) => r.jpg_1 = b.data().to_vec(),
                ("label_0", Field::Double(v)) => r.label_0 = *v,
                ("label_0", Field::Float(v)) => r.label_0 = f64::from(*v),
                ("prompt_id", Field::Str(s)) => r.prompt_id = s.clone(),
                ("agfsync_reason", Field::Str(s)) => r.reason = s.clone(),
                _ => {}
            }
        }
        if !r.label_0.is_finite() {
            return Err(StoreError::Parquet {
                path: path.to_path_buf(),
                reason: format!("row {i}: `label_0` is missing or not a number"),
            });
        }
        out.push(r);
    }
    Ok(out)
}
