//! Reading tensors from PyTorch `.pth` checkpoints (`torch.save`'s zip
//! format) without running any of the pickle's code.
//!
//! Reference: PyTorch `torch/serialization.py` (the zip layout:
//! `{archive}/data.pkl`, `{archive}/data/{key}`, `{archive}/byteorder`) and
//! `torch/_weights_only_unpickler.py` (what `torch.load(weights_only=True)`
//! accepts). The pickle is interpreted by candle's pickle reader, which only
//! builds a tree of objects and never calls anything; this module then
//! walks that tree and accepts exactly a state dict: string keys whose
//! values are tensors (`torch._utils._rebuild_tensor_v2` over a
//! `torch.*Storage`, optionally wrapped by `_rebuild_parameter`), plus
//! `torch.nn.Module.state_dict()`'s `_metadata` (plain data), optionally
//! wrapped as `{'state_dict': ...}` beside plain data. Any other
//! global or non-tensor entry is refused with its name, as a safe loader
//! must: unpickling it in Python would run code or build arbitrary objects.

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

use crate::error::{FeedbackError, Result};

/// The largest `data.pkl` read (a state dict's pickle is a few KB per tensor).
const MAX_PICKLE_BYTES: u64 = 256 << 20;

struct TensorRef {
    key: String,
    dtype: DType,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

/// Reads every tensor of a `torch.save(state_dict)` file, refusing anything
/// that is not a tensor (see the module docs). Tensors are returned in the
/// pickle's order, on the CPU, in their stored dtype.
pub fn read_pth_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file = std::fs::File::open(path).map_err(|source| FeedbackError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_pth_from(std::io::BufReader::new(file), path)
}

/// [`read_pth_state_dict`] of a checkpoint held in memory; `path` only
/// names it in errors. The same checks apply: nothing beyond tensors and
/// plain containers is accepted, and no code is run.
pub fn read_pth_bytes(bytes: &[u8], path: &Path) -> Result<Vec<(String, Tensor)>> {
    read_pth_from(std::io::Cursor::new(bytes), path)
}

fn read_pth_from<R: Read + Seek>(reader: R, path: &Path) -> Result<Vec<(String, Tensor)>> {
    let err = |reason: String| FeedbackError::Weights {
        path: path.to_path_buf(),
        reason,
    };
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| {
        err(format!(
            "not a PyTorch zip checkpoint ({e}); files saved by torch < 1.6 or with \
             _use_new_zipfile_serialization=False are not supported: re-save with a recent \
             torch.save or convert to safetensors"
        ))
    })?;
    let names: Vec<String> = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| err(format!("unreadable zip directory: {e}")))?;
    let pkls: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .collect();
    let pkl = match pkls.as_slice() {
        [one] => (*one).clone(),
        [] => {
            return Err(err(
                "the archive has no `{name}/data.pkl`: not a torch.save file".into(),
            ))
        }
        _ => return Err(err(format!("the archive has several pickles: {pkls:?}"))),
    };
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    if let Ok(mut f) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut order = String::new();
        f.read_to_string(&mut order)
            .map_err(|e| err(format!("cannot read byteorder: {e}")))?;
        if order.trim() != "little" {
            return Err(err(format!(
                "tensors are stored {} endian; only little endian is supported",
                order.trim()
            )));
        }
    }
    let mut bytes = Vec::new();
    {
        let entry = zip
            .by_name(&pkl)
            .map_err(|e| err(format!("cannot open {pkl}: {e}")))?;
        if entry.size() > MAX_PICKLE_BYTES {
            return Err(err(format!(
                "{pkl} is {} bytes, too large for a state dict",
                entry.size()
            )));
        }
        entry
            .take(MAX_PICKLE_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|e| err(format!("cannot read {pkl}: {e}")))?;
    }
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut std::io::Cursor::new(&bytes))
        .map_err(|e| err(format!("cannot parse the pickle {pkl}: {e}")))?;
    let root = stack
        .finalize()
        .map_err(|e| err(format!("cannot parse the pickle {pkl}: {e}")))?;
    let entries = state_dict_entries(root).map_err(&err)?;
    let mut refs = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        if key == "_metadata" {
            plain_data(&value).map_err(|why| err(format!("entry `_metadata`: {why}")))?;
            continue;
        }
        let t = tensor_ref(value).map_err(|why| {
            err(format!(
                "entry `{key}` is not a tensor: {why}. agfsync reads only tensors from .pth \
                 files (as torch.load(weights_only=True) does); convert the checkpoint to \
                 safetensors if it is trusted"
            ))
        })?;
        refs.push((key, t));
    }
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(refs.len());
    for (name, r) in refs {
        if !storages.contains_key(&r.key) {
            let entry_name = format!("{prefix}data/{}", r.key);
            let mut entry = zip.by_name(&entry_name).map_err(|e| {
                err(format!(
                    "tensor `{name}`: storage {entry_name} is missing ({e}): truncated file?"
                ))
            })?;
            let mut buf = Vec::with_capacity(entry.size() as usize);
            entry.read_to_end(&mut buf).map_err(|e| {
                err(format!("tensor `{name}`: cannot read {entry_name} ({e}): truncated or compressed file?"))
            })?;
            storages.insert(r.key.clone(), buf);
        }
        let storage = storages.get(&r.key).map(Vec::as_slice).unwrap_or_default();
        let t = materialise(&r, storage).map_err(|why| err(format!("tensor `{name}`: {why}")))?;
        out.push((name, t));
    }
    Ok(out)
}

fn describe(o: &Object) -> String {
    match o {
        Object::Class {
            module_name,
            class_name,
        } => format!("the global `{module_name}.{class_name}`"),
        Object::Reduce { callable, .. } => format!("a call of {}", describe(callable)),
        Object::Build { callable, .. } => format!("an object built from {}", describe(callable)),
        Object::Int(_) | Object::Long(_) => "an integer".into(),
        Object::Float(_) => "a float".into(),
        Object::Unicode(s) => format!("the string {s:?}"),
        Object::Bool(_) => "a boolean".into(),
        Object::None => "None".into(),
        Object::Tuple(_) => "a tuple".into(),
        Object::List(_) => "a list".into(),
        Object::Dict(_) => "a dict".into(),
        Object::Mark => "a pickle mark".into(),
        Object::PersistentLoad(_) => "a bare storage reference".into(),
    }
}

/// The top level must be a dict (or an `OrderedDict`, which candle's reader
/// turns into a dict, with `_metadata` merged in by BUILD). A training
/// checkpoint's wrapper, `{'state_dict': {...}, ...}` (how open_clip and
/// HPSv2 save models), is unwrapped; its other entries must be plain data
/// (epoch numbers, names), and anything else is refused by name.
fn state_dict_entries(root: Object) -> std::result::Result<Vec<(String, Object)>, String> {
    let entries = dict_entries(root)?;
    let wrapped = entries
        .iter()
        .any(|(k, v)| k == "state_dict" && matches!(v, Object::Dict(_)));
    if !wrapped {
        return Ok(entries);
    }
    let mut inner = None;
    for (k, v) in entries {
        if k == "state_dict" {
            inner = Some(v);
        } else {
            plain_data(&v).map_err(|why| {
                format!(
                    "the checkpoint's entry `{k}` (beside `state_dict`) {why}; only plain \
                     data may accompany the state dict"
                )
            })?;
        }
    }
    match inner {
        Some(v) => dict_entries(v),
        None => Err("the checkpoint has no `state_dict`".into()),
    }
}

fn dict_entries(root: Object) -> std::result::Result<Vec<(String, Object)>, String> {
    let kv = match root {
        Object::Dict(kv) => kv,
        other => {
            return Err(format!(
                "the checkpoint holds {}, not a state dict of tensors",
                describe(&other)
            ))
        }
    };
    kv.into_iter()
        .map(|(k, v)| match k {
            Object::Unicode(s) => Ok((s, v)),
            other => Err(format!(
                "a state dict key is {}, not a string",
                describe(&other)
            )),
        })
        .collect()
}

/// `_metadata` may hold only dicts, strings and numbers.
fn plain_data(o: &Object) -> std::result::Result<(), String> {
    match o {
        Object::Int(_)
        | Object::Long(_)
        | Object::Float(_)
        | Object::Unicode(_)
        | Object::Bool(_)
        | Object::None => Ok(()),
        Object::Dict(kv) => kv.iter().try_for_each(|(k, v)| {
            plain_data(k)?;
            plain_data(v)
        }),
        Object::Tuple(v) | Object::List(v) => v.iter().try_for_each(plain_data),
        other => Err(format!("holds {}", describe(other))),
    }
}

fn is_class(o: &Object, module: &str, class: &str) -> bool {
    matches!(o, Object::Class { module_name, class_name } if module_name == module && class_name == class)
}

fn tensor_ref(value: Object) -> std::result::Result<TensorRef, String> {
    let Object::Reduce { callable, args } = value else {
        return Err(format!("it is {}", describe(&value)));
    };
    if is_class(&callable, "torch._utils", "_rebuild_parameter") {
        // (tensor, requires_grad, backward_hooks)
        let Object::Tuple(mut a) = *args else {
            return Err("malformed _rebuild_parameter arguments".into());
        };
        if a.is_empty() {
            return Err("malformed _rebuild_parameter arguments".into());
        }
        for extra in &a[1..] {
            plain_data(extra)?;
        }
        return tensor_ref(a.swap_remove(0));
    }
    if !is_class(&callable, "torch._utils", "_rebuild_tensor_v2") {
        return Err(format!(
            "it is {}",
            describe(&Object::Reduce { callable, args })
        ));
    }
    // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
    let Object::Tuple(a) = *args else {
        return Err("malformed _rebuild_tensor_v2 arguments".into());
    };
    if a.len() < 4 {
        return Err("malformed _rebuild_tensor_v2 arguments".into());
    }
    for extra in &a[4..] {
        plain_data(extra)?;
    }
    let Object::PersistentLoad(pid) = &a[0] else {
        return Err(format!("its storage is {}", describe(&a[0])));
    };
    let Object::Tuple(pid) = pid.as_ref() else {
        return Err("malformed storage reference".into());
    };
    let (dtype, key) = match pid.as_slice() {
        [Object::Unicode(kind), Object::Class {
            module_name,
            class_name,
        }, Object::Unicode(key), Object::Unicode(_location), size]
            if kind == "storage" && module_name == "torch" =>
        {
            plain_data(size)?;
            let dtype = match class_name.as_str() {
                "FloatStorage" => DType::F32,
                "DoubleStorage" => DType::F64,
                "HalfStorage" => DType::F16,
                "BFloat16Storage" => DType::BF16,
                "ByteStorage" => DType::U8,
                "LongStorage" => DType::I64,
                other => return Err(format!("storage type torch.{other} is not supported")),
            };
            if key.contains('/') || key.contains("..") {
                return Err(format!("invalid storage key {key:?}"));
            }
            (dtype, key.clone())
        }
        other => {
            let what: Vec<String> = other.iter().map(describe).collect();
            return Err(format!(
                "unexpected storage reference ({})",
                what.join(", ")
            ));
        }
    };
    let int = |o: &Object| -> std::result::Result<usize, String> {
        match o {
            Object::Int(i) if *i >= 0 => Ok(*i as usize),
            Object::Long(i) if *i >= 0 => Ok(*i as usize),
            other => Err(format!(
                "expected a non-negative integer, got {}",
                describe(other)
            )),
        }
    };
    let ints = |o: &Object| -> std::result::Result<Vec<usize>, String> {
        match o {
            Object::Tuple(v) => v.iter().map(int).collect(),
            other => Err(format!(
                "expected a tuple of integers, got {}",
                describe(other)
            )),
        }
    };
    let size = ints(&a[2])?;
    let stride = ints(&a[3])?;
    if size.len() != stride.len() {
        return Err("size and stride differ in length".into());
    }
    Ok(TensorRef {
        key,
        dtype,
        offset: int(&a[1])?,
        size,
        stride,
    })
}

/// Copies a (possibly strided) view out of its storage bytes.
fn materialise(r: &TensorRef, storage: &[u8]) -> std::result::Result<Tensor, String> {
    let es = r.dtype.size_in_bytes();
    let n: usize = r.size.iter().product();
    if n == 0 {
        return Tensor::zeros(r.size.as_slice(), r.dtype, &Device::Cpu).map_err(|e| e.to_string());
    }
    let last = r.offset
        + r.size
            .iter()
            .zip(&r.stride)
            .map(|(s, st)| (s - 1) * st)
            .sum::<usize>();
    if (last + 1) * es > storage.len() {
        return Err(format!(
            "the view needs {} bytes but its storage holds {} (truncated file?)",
            (last + 1) * es,
            storage.len()
        ));
    }
    let mut contiguous = true;
    let mut expect = 1;
    for (s, st) in r.size.iter().zip(&r.stride).rev() {
        if *s != 1 && *st != expect {
            contiguous = false;
        }
        expect *= s;
    }
    if contiguous {
        let bytes = &storage[r.offset * es..(r.offset + n) * es];
        return Tensor::from_raw_buffer(bytes, r.dtype, &r.size, &Device::Cpu)
            .map_err(|e| e.to_string());
    }
    let mut data = Vec::with_capacity(n * es);
    let mut idx = vec![0usize; r.size.len()];
    for _ in 0..n {
        let off = r.offset + idx.iter().zip(&r.stride).map(|(i, s)| i * s).sum::<usize>();
        data.extend_from_slice(&storage[off * es..(off + 1) * es]);
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < r.size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Tensor::from_raw_buffer(&data, r.dtype, &r.size, &Device::Cpu).map_err(|e| e.to_string())
}

/// Whether `path` starts with the zip signature (a `.pth` from torch.save).
pub fn looks_like_pth(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"PK\x03\x04"
}

/// The path of a file in errors (helper for callers wrapping other errors).
pub fn weights_error(path: &Path, reason: impl Into<String>) -> FeedbackError {
    FeedbackError::Weights {
        path: PathBuf::from(path),
        reason: reason.into(),
    }
}
