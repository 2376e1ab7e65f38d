//! Reading a Hugging Face checkpoint folder: config, tokenizer files and safetensors
//! shards. Tensor data is read with positioned reads, one tensor (or chunk) at a time, so
//! memory stays bounded by the largest tensor rather than the model.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::Value;

use crate::error::{io, ConvertError, Result};

/// Where one tensor lives.
#[derive(Clone, Debug)]
pub struct SourceTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub shard: usize,
    /// Absolute byte range in the shard file.
    pub start: u64,
    pub len: u64,
}

pub struct Shard {
    pub path: PathBuf,
    pub file: File,
    pub len: u64,
}

/// A checkpoint folder, opened and indexed (headers only).
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: Value,
    pub tokenizer_json: Option<Vec<u8>>,
    pub tokenizer_config: Option<Value>,
    pub generation_config: Option<Value>,
    pub shards: Vec<Shard>,
    /// Sorted by name, so every walk over it is deterministic.
    pub tensors: BTreeMap<String, SourceTensor>,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|e| ConvertError::Source {
        path: path.to_path_buf(),
        problem: format!("invalid JSON: {e}"),
    })
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            return Err(ConvertError::NotFound(format!(
                "{}: no config.json: not a Hugging Face model folder",
                dir.display()
            )));
        }
        let config = read_json(&config_path)?;
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer_json = if tokenizer_path.exists() {
            Some(std::fs::read(&tokenizer_path).map_err(io(&tokenizer_path))?)
        } else {
            None
        };
        let tokenizer_config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let generation_config = read_optional_json(&dir.join("generation_config.json"))?;

        let shard_names = shard_names(dir)?;
        let mut shards = Vec::new();
        let mut tensors = BTreeMap::new();
        for name in &shard_names {
            let path = dir.join(name);
            let file = File::open(&path).map_err(io(&path))?;
            let len = file.metadata().map_err(io(&path))?.len();
            let index = shards.len();
            for t in read_header(&path, &file, len, index)? {
                if let Some(prev) = tensors.insert(t.name.clone(), t) {
                    return Err(ConvertError::Source {
                        path: path.clone(),
                        problem: format!(
                            "tensor {:?} also appears in {}",
                            prev.name,
                            shards_name(&shards, prev.shard)
                        ),
                    });
                }
            }
            shards.push(Shard { path, file, len });
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            tokenizer_json,
            tokenizer_config,
            generation_config,
            shards,
            tensors,
        })
    }

    /// Every file the conversion depends on, for provenance.
    pub fn source_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = [
            "config.json",
            "generation_config.json",
            "model.safetensors.index.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
        .iter()
        .map(|n| self.dir.join(n))
        .filter(|p| p.exists())
        .collect();
        files.extend(self.shards.iter().map(|s| s.path.clone()));
        files.sort();
        files
    }

    pub fn get(&self, name: &str) -> Option<&SourceTensor> {
        self.tensors.get(name)
    }

    pub fn shard_path(&self, t: &SourceTensor) -> &Path {
        &self.shards[t.shard].path
    }

    /// Reads `len` bytes at `offset` within tensor `t`'s data.
    pub fn read_range(&self, t: &SourceTensor, offset: u64, buf: &mut [u8]) -> Result<()> {
        let shard = &self.shards[t.shard];
        debug_assert!(offset + buf.len() as u64 <= t.len);
        shard
            .file
            .read_exact_at(buf, t.start + offset)
            .map_err(io(&shard.path))
    }

    /// Reads a whole tensor.
    pub fn read(&self, t: &SourceTensor) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; t.len as usize];
        self.read_range(t, 0, &mut buf)?;
        Ok(buf)
    }

    pub fn tensor_error(&self, t: &SourceTensor, problem: impl Into<String>) -> ConvertError {
        ConvertError::Tensor {
            path: self.shard_path(t).to_path_buf(),
            tensor: t.name.clone(),
            problem: problem.into(),
        }
    }
}

fn shards_name(shards: &[Shard], i: usize) -> String {
    shards
        .get(i)
        .map_or_else(|| "another shard".into(), |s| s.path.display().to_string())
}

/// The safetensors files of a folder: from model.safetensors.index.json when present,
/// else model.safetensors.
fn shard_names(dir: &Path) -> Result<Vec<String>> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.exists() {
        let index = read_json(&index_path)?;
        let map = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ConvertError::Source {
                path: index_path.clone(),
                problem: "no \"weight_map\" object".into(),
            })?;
        let mut names: Vec<String> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| ConvertError::Source {
                path: index_path.clone(),
                problem: format!("weight_map entry for {tensor:?} is not a file name"),
            })?;
            if file.contains('/') || file.contains("..") {
                return Err(ConvertError::Source {
                    path: index_path.clone(),
                    problem: format!("shard name {file:?} points outside the folder"),
                });
            }
            if !names.iter().any(|n| n == file) {
                names.push(file.to_string());
            }
        }
        names.sort();
        return Ok(names);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec!["model.safetensors".into()]);
    }
    Err(ConvertError::NotFound(format!(
        "{}: neither model.safetensors nor model.safetensors.index.json",
        dir.display()
    )))
}

/// Parses and validates one safetensors header.
fn read_header(path: &Path, file: &File, len: u64, shard: usize) -> Result<Vec<SourceTensor>> {
    let bad = |problem: String| ConvertError::Source {
        path: path.to_path_buf(),
        problem: format!("not a valid safetensors file: {problem}"),
    };
    let mut n = [0u8; 8];
    if len < 8 {
        return Err(bad(format!("{len} bytes is too short")));
    }
    file.read_exact_at(&mut n, 0).map_err(io(path))?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 || 8 + n > len {
        return Err(bad(format!(
            "header length {n} does not fit the {len}-byte file"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact_at(&mut header, 8).map_err(io(path))?;
    let meta: safetensors::tensor::Metadata =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let data_start = 8 + n;
    let data_len = len - data_start;
    let mut out = Vec::new();
    let mut infos: Vec<(String, &safetensors::tensor::TensorInfo)> =
        meta.tensors().into_iter().collect();
    infos.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, info) in infos {
        let (s, e) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
        let elems = info
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        let bytes = elems.and_then(|n| n.checked_mul(info.dtype.size() as u64));
        if e < s || e > data_len {
            return Err(ConvertError::Tensor {
                path: path.to_path_buf(),
                tensor: name,
                problem: format!(
                    "data [{s}, {e}) lies outside the shard's {data_len} data bytes (truncated file?)"
                ),
            });
        }
        if bytes != Some(e - s) {
            return Err(ConvertError::Tensor {
                path: path.to_path_buf(),
                tensor: name,
                problem: format!(
                    "{} bytes for shape {:?} of {:?}",
                    e - s,
                    info.shape,
                    info.dtype
                ),
            });
        }
        out.push(SourceTensor {
            name,
            dtype: info.dtype,
            shape: info.shape.iter().map(|&d| d as u64).collect(),
            shard,
            start: data_start + s,
            len: e - s,
        });
    }
    Ok(out)
}

/// A JSON config value as u64.
pub fn get_u64(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

/// A JSON config value as f64.
pub fn get_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// Token ids given as a number or a list.
pub fn get_ids(v: &Value, key: &str) -> Vec<u32> {
    match v.get(key) {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// Counts per dtype, for error messages that list what was found.
pub fn describe_dtypes(tensors: &BTreeMap<String, SourceTensor>) -> String {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for t in tensors.values() {
        *counts.entry(format!("{:?}", t.dtype)).or_default() += 1;
    }
    let mut v: Vec<_> = counts
        .into_iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    v.sort();
    v.join(", ")
}
