//! A minimal TensorBoard event-file writer (scalars), so that
//! `tensorboard --logdir <out>/tensorboard` shows a run's metrics.
//!
//! An event file is a sequence of TFRecords (`u64` length, masked CRC-32C of
//! the length, the payload, masked CRC-32C of the payload), each payload an
//! `Event` protocol buffer. Only the fields needed here are written:
//! `wall_time` (1, double), `step` (2, int64), `file_version` (3, string),
//! `summary` (5: repeated `Value { tag = 1, simple_value = 2 }`) and
//! `session_log` (6: `SessionLog { status = 1 }`, START on resume, which
//! makes TensorBoard drop the orphaned points after the resumed step).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::DpoError;

/// CRC-32C (Castagnoli), bitwise over a table built on first use.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82f6_3b78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_bytes(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(u64::from(field << 3 | 2), out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn event_header(wall_time: f64, step: i64) -> Vec<u8> {
    let mut e = vec![0x09];
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10);
    varint(step as u64, &mut e);
    e
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Writes one event file.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl EventWriter {
    /// Creates `dir` and a new event file in it
    /// (`events.out.tfevents.<secs>.agfsync.<pid>`), starting with the
    /// `brain.Event:2` version record.
    pub fn create(dir: &Path) -> Result<Self, DpoError> {
        std::fs::create_dir_all(dir).map_err(|e| DpoError::io(dir, e))?;
        let t = now();
        let mut path = dir.join(format!(
            "events.out.tfevents.{}.agfsync.{}",
            t as u64,
            std::process::id()
        ));
        let mut k = 1;
        while path.exists() {
            path = dir.join(format!(
                "events.out.tfevents.{}.agfsync.{}.{k}",
                t as u64,
                std::process::id()
            ));
            k += 1;
        }
        let file = std::fs::File::create(&path).map_err(|e| DpoError::io(&path, e))?;
        let mut w = Self { path, file };
        let mut e = event_header(t, 0);
        field_bytes(3, b"brain.Event:2", &mut e);
        w.record(&e)?;
        Ok(w)
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, payload: &[u8]) -> Result<(), DpoError> {
        let len = (payload.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(payload.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        buf.extend_from_slice(payload);
        buf.extend_from_slice(&masked_crc32c(payload).to_le_bytes());
        self.file
            .write_all(&buf)
            .and_then(|_| self.file.flush())
            .map_err(|e| DpoError::io(&self.path, e))
    }

    /// Writes `(tag, value)` scalars for `step`.
    pub fn scalars(&mut self, step: usize, values: &[(&str, f64)]) -> Result<(), DpoError> {
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut val = Vec::new();
            field_bytes(1, tag.as_bytes(), &mut val);
            val.push(0x15);
            val.extend_from_slice(&(*v as f32).to_le_bytes());
            field_bytes(1, &val, &mut summary);
        }
        let mut e = event_header(now(), step as i64);
        field_bytes(5, &summary, &mut e);
        self.record(&e)
    }

    /// Marks a restart at `step` (SessionLog START): TensorBoard discards
    /// points after it from earlier files, as a resumed run rewrites them.
    pub fn session_start(&mut self, step: usize) -> Result<(), DpoError> {
        let mut e = event_header(now(), step as i64);
        field_bytes(6, &[0x08, 0x01], &mut e);
        self.record(&e)
    }

    /// Syncs the file to disk.
    pub fn sync(&mut self) -> Result<(), DpoError> {
        self.file
            .sync_all()
            .map_err(|e| DpoError::io(&self.path, e))
    }
}

/// Reads back the scalars of an event file as `(step, tag, value)`,
/// checking every record's CRCs (for tests and tools).
pub fn read_scalars(path: &Path) -> Result<Vec<(i64, String, f32)>, DpoError> {
    let bytes = std::fs::read(path).map_err(|e| DpoError::io(path, e))?;
    let bad = |r: &str| DpoError::Data {
        path: path.to_path_buf(),
        reason: r.to_string(),
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let len_b = bytes.get(i..i + 8).ok_or_else(|| bad("truncated length"))?;
        let crc_b = bytes
            .get(i + 8..i + 12)
            .ok_or_else(|| bad("truncated crc"))?;
        if masked_crc32c(len_b).to_le_bytes() != crc_b {
            return Err(bad("bad length crc"));
        }
        let mut l8 = [0u8; 8];
        l8.copy_from_slice(len_b);
        let n = u64::from_le_bytes(l8) as usize;
        let payload = bytes
            .get(i + 12..i + 12 + n)
            .ok_or_else(|| bad("truncated record"))?;
        let crc = bytes
            .get(i + 12 + n..i + 16 + n)
            .ok_or_else(|| bad("truncated crc"))?;
        if masked_crc32c(payload).to_le_bytes() != crc {
            return Err(bad("bad payload crc"));
        }
        parse_event(payload, &mut out).ok_or_else(|| bad("malformed event"))?;
        i += 16 + n;
    }
    Ok(out)
}

fn read_varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
        shift += 7;
    }
}

/// Calls `f(field, wire_type, bytes-or-empty, varint)` for each field.
fn fields(b: &[u8], mut f: impl FnMut(u64, u64, &[u8], u64)) -> Option<()> {
    let mut i = 0;
    while i < b.len() {
        let key = read_varint(b, &mut i)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = read_varint(b, &mut i)?;
                f(field, wire, &[], v);
            }
            1 => {
                f(field, wire, b.get(i..i + 8)?, 0);
                i += 8;
            }
            2 => {
                let n = read_varint(b, &mut i)? as usize;
                f(field, wire, b.get(i..i + n)?, 0);
                i += n;
            }
            5 => {
                f(field, wire, b.get(i..i + 4)?, 0);
                i += 4;
            }
            _ => return None,
        }
    }
    Some(())
}

fn parse_event(b: &[u8], out: &mut Vec<(i64, String, f32)>) -> Option<()> {
    let mut step = 0i64;
    let mut summary: Option<Vec<u8>> = None;
    fields(b, |field, _, bytes, v| match field {
        2 => step = v as i64,
        5 => summary = Some(bytes.to_vec()),
        _ => {}
    })?;
    if let Some(s) = summary {
        let mut values = Vec::new();
        fields(&s, |field, _, bytes, _| {
            if field == 1 {
                values.push(bytes.to_vec());
            }
        })?;
        for v in values {
            let mut tag = String::new();
            let mut val = f32::NAN;
            fields(&v, |field, _, bytes, _| match field {
                1 => tag = String::from_utf8_lossy(bytes).into_owned(),
                2 => {
                    let mut a = [0u8; 4];
                    a.copy_from_slice(bytes);
                    val = f32::from_le_bytes(a);
                }
                _ => {}
            })?;
            out.push((step, tag, val));
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_known_values() {
        // RFC 3720 test vector: 32 bytes of zeros -> 0x8a9136aa
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }
}
