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

/// Most bytes read from a JSON file of a checkpoint (config, generation config, tokenizer
/// config, shard index): far more than any real one holds.
pub const MAX_JSON_BYTES: u64 = 16 << 20;
/// Most bytes read from tokenizer.json: the `.tern` format's limit on the tokenizer section.
pub const MAX_TOKENIZER_BYTES: u64 = tern_format::limits::MAX_TOKENIZER_LEN;

/// Opens a file for reading after checking that it is a regular file (a FIFO would block
/// `open`, a device would never end), and checks again what was opened.
pub fn open_regular(path: &Path) -> Result<(File, u64)> {
    let not_regular = |kind| ConvertError::Source {
        path: path.to_path_buf(),
        problem: format!(
            "{}, not a regular file: refusing to read it",
            tern_format::file_kind(kind)
        ),
    };
    let kind = std::fs::metadata(path).map_err(io(path))?.file_type();
    if !kind.is_file() {
        return Err(not_regular(kind));
    }
    let file = File::open(path).map_err(io(path))?;
    let meta = file.metadata().map_err(io(path))?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    Ok((file, meta.len()))
}

/// Reads a whole regular file of at most `cap` bytes.
pub fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let (file, len) = open_regular(path)?;
    let too_large = || ConvertError::Source {
        path: path.to_path_buf(),
        problem: format!("larger than the {cap}-byte limit for this file"),
    };
    if len > cap {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // The length can grow after the check: never read more than the cap.
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(io(path))?;
    if bytes.len() as u64 > cap {
        return Err(too_large());
    }
    Ok(bytes)
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = read_capped(path, MAX_JSON_BYTES)?;
    serde_json::from_slice(&bytes).map_err(|e| ConvertError::Source {
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

/// Reads tokenizer.json and checks that the `tokenizers` crate loads it, so a broken one
/// fails the conversion rather than the first `generate`.
fn read_tokenizer(path: &Path) -> Result<Vec<u8>> {
    let bytes = read_capped(path, MAX_TOKENIZER_BYTES)?;
    let bad = |problem: String| ConvertError::Source {
        path: path.to_path_buf(),
        problem: format!("not a tokenizer the tokenizers library can load: {problem}"),
    };
    // tokenizers 0.22 panics on some malformed decoders (`expect("Helper")`, found by
    // fuzz/convert_config): a panic is a refusal too.
    match std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(&bytes).map(drop)) {
        Ok(Ok(())) => Ok(bytes),
        Ok(Err(e)) => Err(bad(e.to_string())),
        Err(_) => Err(bad("the tokenizers library panicked on it".into())),
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
            Some(read_tokenizer(&tokenizer_path)?)
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
            let (file, len) = open_regular(&path)?;
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

/// Largest safetensors header accepted: the safetensors crate's limit.
pub const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// Parses and validates one safetensors header by the safetensors crate's own rules
/// (`SafeTensors::read_metadata`, which needs the whole file in memory): a header of at
/// most 100 MB of UTF-8 JSON; tensors, taken in order of their `data_offsets`, laid end
/// to end from offset 0 with no gap or overlap, each range exactly the bytes of its shape
/// and dtype; and the data filling the rest of the file exactly, with no trailing bytes.
pub fn read_header(path: &Path, file: &File, len: u64, shard: usize) -> Result<Vec<SourceTensor>> {
    let n = header_len(path, len, |buf| file.read_exact_at(buf, 0))?;
    let mut header = vec![0u8; n as usize];
    file.read_exact_at(&mut header, 8).map_err(io(path))?;
    parse_header(path, &header, len, shard)
}

/// As [`read_header`], on the bytes of a whole safetensors file (the fuzz target's entry).
pub fn read_header_bytes(path: &Path, bytes: &[u8]) -> Result<Vec<SourceTensor>> {
    let len = bytes.len() as u64;
    let n = header_len(path, len, |buf| {
        buf.copy_from_slice(&bytes[..8]);
        Ok(())
    })?;
    parse_header(path, &bytes[8..8 + n as usize], len, 0)
}

fn not_safetensors(path: &Path, problem: String) -> ConvertError {
    ConvertError::Source {
        path: path.to_path_buf(),
        problem: format!("not a valid safetensors file: {problem}"),
    }
}

/// The header length of a `len`-byte file, from its first 8 bytes, checked to fit.
fn header_len(
    path: &Path,
    len: u64,
    read8: impl FnOnce(&mut [u8]) -> std::io::Result<()>,
) -> Result<u64> {
    if len < 8 {
        return Err(not_safetensors(path, format!("{len} bytes is too short")));
    }
    let mut n = [0u8; 8];
    read8(&mut n).map_err(io(path))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_SAFETENSORS_HEADER || n > len - 8 {
        return Err(not_safetensors(
            path,
            format!(
                "header length {n} does not fit the {len}-byte file (at most {MAX_SAFETENSORS_HEADER})"
            ),
        ));
    }
    Ok(n)
}

/// Validates the JSON header (`header`, `n` bytes) of a `len`-byte safetensors file.
fn parse_header(path: &Path, header: &[u8], len: u64, shard: usize) -> Result<Vec<SourceTensor>> {
    let bad = |problem: String| not_safetensors(path, problem);
    let n = header.len() as u64;
    let header = std::str::from_utf8(header).map_err(|e| bad(format!("header: {e}")))?;
    let meta: safetensors::tensor::Metadata =
        serde_json::from_str(header).map_err(|e| bad(format!("header: {e}")))?;
    let data_start = 8 + n;
    let data_len = len - data_start;
    let mut infos: Vec<(String, &safetensors::tensor::TensorInfo)> =
        meta.tensors().into_iter().collect();
    infos.sort_by(|a, b| (a.1.data_offsets, &a.0).cmp(&(b.1.data_offsets, &b.0)));
    let mut out = Vec::new();
    let mut end = 0u64;
    for (name, info) in infos {
        let tensor_error = |problem: String| ConvertError::Tensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            problem,
        };
        let (s, e) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
        if s != end || e < s {
            return Err(tensor_error(format!(
                "data [{s}, {e}) does not start where the previous tensor's ends ({end}): \
                 safetensors data must be contiguous, without gaps or overlaps"
            )));
        }
        if e > data_len {
            return Err(tensor_error(format!(
                "data [{s}, {e}) lies outside the shard's {data_len} data bytes (truncated file?)"
            )));
        }
        let elems = info
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        let bytes = elems.and_then(|n| n.checked_mul(info.dtype.size() as u64));
        if bytes != Some(e - s) {
            return Err(tensor_error(format!(
                "{} bytes for shape {:?} of {:?}",
                e - s,
                info.shape,
                info.dtype
            )));
        }
        end = e;
        out.push(SourceTensor {
            name,
            dtype: info.dtype,
            shape: info.shape.iter().map(|&d| d as u64).collect(),
            shard,
            start: data_start + s,
            len: e - s,
        });
    }
    if end != data_len {
        return Err(bad(format!(
            "the tensors' data ends at byte {end} of {data_len}: {} trailing bytes",
            data_len - end
        )));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::SmallRng, Rng, SeedableRng};

    /// A safetensors file from a header's JSON and a data length.
    fn file(header: &str, data_len: usize) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        bytes
    }

    fn ours(bytes: &[u8]) -> Result<Vec<SourceTensor>> {
        read_header_bytes(Path::new("model.safetensors"), bytes)
    }

    fn crates(bytes: &[u8]) -> bool {
        safetensors::SafeTensors::read_metadata(bytes).is_ok()
    }

    #[test]
    fn containers_the_crate_refuses_are_refused() {
        let two = |a: (u32, u32), b: (u32, u32)| {
            format!(
                r#"{{"a":{{"dtype":"F32","shape":[2],"data_offsets":[{},{}]}},"b":{{"dtype":"F32","shape":[2],"data_offsets":[{},{}]}}}}"#,
                a.0, a.1, b.0, b.1
            )
        };
        let cases = [
            ("overlapping", file(&two((0, 8), (0, 8)), 8), "contiguous"),
            ("overlapping", file(&two((0, 8), (4, 12)), 12), "contiguous"),
            (
                "gap before the first",
                file(&two((4, 12), (12, 20)), 20),
                "contiguous",
            ),
            (
                "gap between",
                file(&two((0, 8), (12, 20)), 20),
                "contiguous",
            ),
            (
                "trailing bytes",
                file(&two((0, 8), (8, 16)), 20),
                "trailing",
            ),
            ("truncated", file(&two((0, 8), (8, 16)), 12), "outside"),
        ];
        for (what, bytes, says) in cases {
            assert!(!crates(&bytes), "{what}: the crate accepts it");
            let e = ours(&bytes).expect_err(what).to_string();
            assert!(e.contains(says), "{what}: {e}");
        }
        let header = two((8, 16), (0, 8));
        let good = file(&header, 16);
        assert!(crates(&good));
        let t = ours(&good).unwrap();
        let a_start = 8 + header.len() as u64 + 8;
        assert_eq!(
            (t[0].name.as_str(), t[0].start, t[0].len),
            ("a", a_start, 8)
        );
    }

    /// Random small headers: ours accepts exactly what the crate accepts.
    #[test]
    fn agrees_with_the_crate_on_random_headers() {
        let mut rng = SmallRng::seed_from_u64(0);
        let mut next = |n: u64| rng.random_range(0..n);
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..20_000 {
            let tensors = next(4);
            let mut entries = Vec::new();
            let mut at = 0u64;
            for i in 0..tensors {
                let dims = next(3);
                let shape: Vec<u64> = (0..dims).map(|_| next(4)).collect();
                let bytes = 2 * shape.iter().product::<u64>();
                let s = if next(4) == 0 { next(12) } else { at };
                let e = if next(4) == 0 {
                    s + next(12)
                } else {
                    s + bytes
                };
                at = e;
                entries.push(format!(
                    r#""t{i}":{{"dtype":"BF16","shape":{shape:?},"data_offsets":[{s},{e}]}}"#
                ));
            }
            let data = if next(3) == 0 { next(24) } else { at };
            let bytes = file(&format!("{{{}}}", entries.join(",")), data as usize);
            let ok = ours(&bytes).is_ok();
            assert_eq!(ok, crates(&bytes), "{}", String::from_utf8_lossy(&bytes));
            if ok {
                accepted += 1;
            } else {
                refused += 1;
            }
        }
        assert!(accepted > 1000 && refused > 1000, "{accepted} / {refused}");
    }
}
