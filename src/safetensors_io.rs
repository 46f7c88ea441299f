//! Reading and writing named f32 tensors in safetensors files (the CLI's and the model's format).

use std::collections::BTreeMap;
use std::path::Path;

use std::io::Read;

use safetensors::tensor::{Dtype as StDtype, Metadata, TensorView};

use crate::error::{Error, Result};
use crate::tensor::{checked_numel, try_grow, Tensor};

/// Largest header accepted (the safetensors crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// All float tensors of a file, converted to f32 (f32, f16, bf16 and f64 are accepted), by name.
#[derive(Debug, Default, Clone)]
pub struct TensorFile {
    pub tensors: BTreeMap<String, Tensor<f32>>,
    /// Tensors of other element types (e.g. BatchNorm's `num_batches_tracked`), by name, with
    /// their dtype: never read as values, so asking for one is an error, not zeros.
    pub non_float: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
}

impl TensorFile {
    /// Reads a safetensors file from disk, one tensor at a time: the file's bytes are never all
    /// in memory beside the converted tensors.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io = |source| Error::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        let mut r = std::io::BufReader::new(file);
        let parsed = if !meta.is_file() && !meta.is_dir() {
            // A pipe or a device has no length up front: read it whole.
            let mut bytes = Vec::new();
            r.read_to_end(&mut bytes).map_err(io)?;
            Self::from_bytes(&bytes)
        } else {
            Self::parse(r, meta.len(), &path.display().to_string())
        };
        parsed.map_err(|e| match e {
            Error::SafeTensors(m) => Error::SafeTensors(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses safetensors bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::parse(bytes, bytes.len() as u64, "<bytes>")
    }

    /// Parses a safetensors stream of `len` bytes: the header (validated by the safetensors
    /// crate: dtypes, shapes, contiguous offsets), then each tensor in file order. A stream that
    /// ends early is a corrupt file; any other read failure an I/O error on `origin`.
    fn parse(mut r: impl Read, len: u64, origin: &str) -> Result<Self> {
        let bad = |m: String| Error::SafeTensors(m);
        let read_err = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                bad("the file ends before the data its header describes".into())
            } else {
                Error::Io {
                    path: origin.to_string(),
                    source: e,
                }
            }
        };
        let mut n = [0u8; 8];
        r.read_exact(&mut n).map_err(read_err)?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER_BYTES || n > len.saturating_sub(8) {
            return Err(bad(format!(
                "header length {n} exceeds the file ({len} bytes) or {MAX_HEADER_BYTES}"
            )));
        }
        let mut header = vec![0u8; n as usize];
        r.read_exact(&mut header).map_err(read_err)?;
        let meta: Metadata =
            serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
        if (8 + n).checked_add(meta.data_len() as u64) != Some(len) {
            return Err(bad(format!(
                "the header describes {} bytes of data, the file holds {}",
                meta.data_len(),
                len - 8 - n
            )));
        }
        let mut tensors = BTreeMap::new();
        let mut non_float = BTreeMap::new();
        let mut bytes = Vec::new();
        // In file order (the header validated that the offsets are contiguous from 0).
        let mut infos: Vec<_> = meta.tensors().into_iter().collect();
        infos.sort_by_key(|(_, info)| info.data_offsets);
        for (name, info) in infos {
            let (start, end) = info.data_offsets;
            // Bounded by the file's length (checked above), so it cannot exceed the input.
            bytes.clear();
            try_grow(&mut bytes, end - start, 0, "a tensor being read")?;
            r.read_exact(&mut bytes).map_err(read_err)?;
            let view = TensorView::new(info.dtype, info.shape.clone(), &bytes)
                .map_err(|e| bad(format!("tensor '{name}': {e}")))?;
            match view_to_f32(&name, &view)? {
                Some(t) => {
                    tensors.insert(name, t);
                }
                None => {
                    non_float.insert(name, format!("{:?}", info.dtype));
                }
            }
        }
        let metadata = meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        Ok(TensorFile {
            tensors,
            non_float,
            metadata,
        })
    }

    /// The tensor `name`, or an error naming it.
    pub fn get(&self, name: &str) -> Result<&Tensor<f32>> {
        self.get_optional(name)?
            .ok_or_else(|| Error::Weights(format!("tensor '{name}' not found in file")))
    }

    /// The tensor `name` if the file has it; an error if it exists with a non-float dtype.
    pub fn get_optional(&self, name: &str) -> Result<Option<&Tensor<f32>>> {
        if let Some(dtype) = self.non_float.get(name) {
            return Err(Error::DType(format!(
                "tensor '{name}' has dtype {dtype}; expected F32, F16, BF16 or F64"
            )));
        }
        Ok(self.tensors.get(name))
    }

    /// Removes and returns the tensor `name`, or an error naming it.
    pub fn take(&mut self, name: &str) -> Result<Tensor<f32>> {
        self.get_optional(name)?;
        self.tensors
            .remove(name)
            .ok_or_else(|| Error::Weights(format!("tensor '{name}' not found in file")))
    }
}

/// The tensor as f32, or None for a non-float tensor.
fn view_to_f32(name: &str, view: &TensorView<'_>) -> Result<Option<Tensor<f32>>> {
    let shape = view.shape().to_vec();
    let numel = checked_numel(&shape)?;
    let bytes = view.data();
    let data: Vec<f32> = match view.dtype() {
        StDtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        StDtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| {
                let v = f64::from_le_bytes(b.try_into().expect("chunk of 8"));
                // A finite value beyond f32's range would silently become infinite.
                if v.is_finite() && (v as f32).is_infinite() {
                    Err(Error::SafeTensors(format!(
                        "tensor '{name}' holds {v:e}, beyond the range of f32"
                    )))
                } else {
                    Ok(v as f32)
                }
            })
            .collect::<Result<_>>()?,
        StDtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        StDtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        StDtype::I64
        | StDtype::I32
        | StDtype::I16
        | StDtype::I8
        | StDtype::U64
        | StDtype::U32
        | StDtype::U16
        | StDtype::U8
        | StDtype::BOOL => {
            return Ok(None);
        }
        other => {
            return Err(Error::SafeTensors(format!(
                "tensor '{name}' has unsupported dtype {other:?}"
            )));
        }
    };
    if data.len() != numel {
        return Err(Error::SafeTensors(format!(
            "tensor '{name}' holds {} values, its shape {shape:?} needs {numel}",
            data.len()
        )));
    }
    Tensor::from_vec(&shape, data).map(Some)
}

/// Writes f32 tensors to a safetensors file: written to a temporary name unique to this call
/// beside `path`, then renamed, so a failure (disk full, `path` a directory, ...) leaves neither
/// a half-written file nor the temporary one, and concurrent writers never share a temporary.
pub fn write(
    path: impl AsRef<Path>,
    tensors: &[(&str, &Tensor<f32>)],
    metadata: Option<BTreeMap<String, String>>,
) -> Result<()> {
    let bytes = to_bytes(tensors, metadata)?;
    write_atomically(path.as_ref(), &bytes)
}

/// Writes `bytes` to `path` through a hidden temporary beside it, renamed into place: a reader
/// never sees a half-written file, and a failed write leaves nothing behind.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = partial_path(path);
    let result = std::fs::write(&tmp, bytes)
        .map_err(|source| Error::Io {
            path: tmp.display().to_string(),
            source,
        })
        .and_then(|()| {
            std::fs::rename(&tmp, path).map_err(|source| Error::Io {
                path: path.display().to_string(),
                source,
            })
        });
    if result.is_err() {
        // Best effort: the temporary may not exist (the write itself failed to create it).
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Checks before long work that [`write_atomically`] can create its temporary beside `path`
/// (an existing but read-only directory fails here, not after the work); leaves nothing behind.
pub fn check_writable(path: &Path) -> Result<()> {
    let tmp = partial_path(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|source| Error::Io {
            path: tmp.display().to_string(),
            source,
        })?;
    std::fs::remove_file(&tmp).map_err(|source| Error::Io {
        path: tmp.display().to_string(),
        source,
    })
}

/// `DIR/.NAME.PID.SEQ.partial` for `DIR/NAME`: hidden, and unique per process and call.
fn partial_path(path: &Path) -> std::path::PathBuf {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    path.with_file_name(format!(".{name}.{}.{seq}.partial", std::process::id()))
}

/// Serialises f32 tensors to safetensors bytes.
pub fn to_bytes(
    tensors: &[(&str, &Tensor<f32>)],
    metadata: Option<BTreeMap<String, String>>,
) -> Result<Vec<u8>> {
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let bytes = t.data().iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.to_string(), t.shape().to_vec(), bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = raw
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(StDtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::SafeTensors(e.to_string()))
        })
        .collect::<Result<_>>()?;
    let meta = metadata.map(|m| m.into_iter().collect());
    safetensors::serialize(views, meta).map_err(|e| Error::SafeTensors(e.to_string()))
}
