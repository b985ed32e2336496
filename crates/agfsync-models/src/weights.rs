//! Opening safetensors weights as a [`VarBuilder`], and writing them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{ModelError, Result};

/// Memory-maps `files` (one checkpoint, possibly sharded) and returns a
/// [`VarBuilder`] that converts every tensor to `dtype` on `device`.
///
/// Each file's header is validated up front, so a truncated or damaged file is
/// reported with its path before any model is built.
pub fn open_safetensors(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    for f in files {
        std::fs::metadata(f).map_err(|source| ModelError::Io {
            path: f.clone(),
            source,
        })?;
        check_header(f)?;
    }
    // SAFETY: the files are memory-mapped read-only. Modifying a checkpoint
    // while agfsync reads it is unsupported (as in every safetensors reader);
    // the header and every tensor's byte range were validated above.
    #[allow(unsafe_code)]
    let st = unsafe { MmapedSafetensors::multi(files) }.map_err(|source| ModelError::Weights {
        path: files.first().cloned().unwrap_or_default(),
        source: Box::new(source),
    })?;
    Ok(VarBuilder::from_backend(
        Box::new(st),
        dtype,
        device.clone(),
    ))
}

/// Validates a safetensors file's header and that the file holds every byte
/// the header promises, without mapping it.
fn check_header(path: &Path) -> Result<()> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    check_header_from(f, len, path)
}

/// The checks [`open_safetensors`] makes on each file before mapping it
/// (header length, header JSON, every tensor's bytes present), on a file
/// held in memory; `path` only names it in errors.
pub fn check_safetensors_bytes(bytes: &[u8], path: &Path) -> Result<()> {
    check_header_from(bytes, bytes.len() as u64, path)
}

fn check_header_from(mut f: impl std::io::Read, len: u64, path: &Path) -> Result<()> {
    let err = |msg: String| ModelError::Weights {
        path: path.to_path_buf(),
        source: Box::new(candle_core::Error::Msg(msg)),
    };
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| {
        err(format!(
            "file is {len} bytes, too short for a safetensors header"
        ))
    })?;
    let header_len = u64::from_le_bytes(n);
    if header_len > 100 << 20 || 8 + header_len > len {
        return Err(err(format!(
            "header length {header_len} does not fit in a file of {len} bytes"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(io)?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| err(format!("header is not valid JSON: {e}")))?;
    let mut end = 0u64;
    if let Some(map) = v.as_object() {
        for (name, info) in map {
            if name == "__metadata__" {
                continue;
            }
            let offsets = info
                .get("data_offsets")
                .and_then(|o| o.as_array())
                .ok_or_else(|| err(format!("tensor `{name}` has no data_offsets")))?;
            let stop = offsets.get(1).and_then(|x| x.as_u64()).unwrap_or(0);
            end = end.max(stop);
            check_shape(name, info).map_err(&err)?;
        }
    }
    let have = len - 8 - header_len;
    if end > have {
        return Err(err(format!(
            "the header promises {end} bytes of tensor data but the file holds {have} (truncated)"
        )));
    }
    Ok(())
}

/// Refuses a header entry whose shape no tensor can have: the product of
/// its dimensions (zeros counted as ones) overflows. The safetensors crate
/// accepts such a shape when one dimension is 0 (no bytes needed), and
/// candle's stride computation then overflows.
pub fn check_shape(name: &str, info: &serde_json::Value) -> std::result::Result<(), String> {
    let Some(shape) = info.get("shape").and_then(|s| s.as_array()) else {
        return Ok(()); // the safetensors crate reports a missing shape
    };
    let mut n: usize = 1;
    for d in shape {
        let d = d
            .as_u64()
            .and_then(|d| usize::try_from(d).ok())
            .ok_or_else(|| format!("tensor `{name}` has a dimension {d} that is not a size"))?;
        n = n
            .checked_mul(d.max(1))
            .filter(|n| *n <= isize::MAX as usize)
            .ok_or_else(|| format!("tensor `{name}` has an impossible shape {shape:?}"))?;
    }
    Ok(())
}

/// Writes `tensors` to a safetensors file atomically (temporary file, then
/// rename), so a crash never leaves a half-written checkpoint behind.
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let io = |path: &Path, source: std::io::Error| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    }
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(tensors, &tmp).map_err(|e| {
        io(
            &tmp,
            std::io::Error::other(format!("writing safetensors: {e}")),
        )
    })?;
    // Flush the data before the rename makes it visible: after a power loss
    // the name must not point at a file whose blocks never reached the disk.
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// A [`VarBuilder`] backend that makes up deterministic random weights (from a
/// seed and each tensor's name, following the layer's init hint) and records
/// them, so a freshly built model can be saved as a checkpoint.
#[derive(Clone, Debug)]
pub struct RandomWeights {
    seed: u64,
    made: Arc<Mutex<HashMap<String, Tensor>>>,
}

impl RandomWeights {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            made: Arc::default(),
        }
    }

    /// A [`VarBuilder`] drawing from this generator.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// Every tensor made so far, by name.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        match self.made.lock() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn make(&self, shape: &Shape, name: &str, init: Init) -> candle_core::Result<Tensor> {
        let mut h: u64 = self.seed ^ 0x9e37_79b9_7f4a_7c15;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(h);
        let n = shape.elem_count();
        let dims = shape.dims();
        let fan_in: usize = if dims.len() > 1 {
            dims[1..].iter().product()
        } else {
            dims.first().copied().unwrap_or(1)
        };
        let uniform = |rng: &mut ChaCha8Rng, lo: f64, hi: f64| -> Vec<f32> {
            (0..n).map(|_| rng.gen_range(lo..hi) as f32).collect()
        };
        let data: Vec<f32> = match init {
            Init::Const(v) => vec![v as f32; n],
            Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
            Init::Randn { mean, stdev } => (0..n)
                .map(|_| {
                    // Box-Muller keeps the generator's stream explicit and portable.
                    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
                    let u2: f64 = rng.gen::<f64>();
                    (mean + stdev * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos())
                        as f32
                })
                .collect(),
            Init::Kaiming { .. } => {
                let bound = (3.0 / fan_in.max(1) as f64).sqrt();
                uniform(&mut rng, -bound, bound)
            }
        };
        let t = Tensor::from_vec(data, shape.clone(), &Device::Cpu)?;
        let mut made = match self.made.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        made.insert(name.to_string(), t.clone());
        Ok(t)
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.make(&s, name, h)?.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights: `{name}` requested without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}
