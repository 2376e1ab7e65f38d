//! A GGUF (v2/v3) header parser in the style of safetensors': every count, length and
//! offset is bounded by the bytes that remain before it is used to allocate, arithmetic is
//! checked, and any input gives a value or an error, never a panic.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use super::types::GgmlType;
use crate::error::ConvertError;

/// The four bytes a GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Longest tensor name accepted (ggml's own limit is 64).
const MAX_NAME_LEN: u64 = 256;
/// Most dimensions a ggml tensor has.
const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays accepted.
const MAX_DEPTH: u32 = 4;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// Element type id and elements (all of that type).
    Array(u32, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// GGUF metadata value type ids.
pub mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

impl Value {
    /// The value as an unsigned integer, whatever its integer width (negative: None).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// A float value as written: f32 values go through their shortest decimal form, so
    /// `1e-5f32` gives `1e-5`, the number a config.json would hold.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => v.to_string().parse().ok(),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, v) => Some(v),
            _ => None,
        }
    }

    fn type_id(&self) -> u32 {
        use value_type::*;
        match self {
            Value::U8(_) => U8,
            Value::I8(_) => I8,
            Value::U16(_) => U16,
            Value::I16(_) => I16,
            Value::U32(_) => U32,
            Value::I32(_) => I32,
            Value::F32(_) => F32,
            Value::Bool(_) => BOOL,
            Value::Str(_) => STRING,
            Value::Array(..) => ARRAY,
            Value::U64(_) => U64,
            Value::I64(_) => I64,
            Value::F64(_) => F64,
        }
    }

    /// Appends the value's encoding (without its type id) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Value::U8(v) => out.push(*v),
            Value::I8(v) => out.push(*v as u8),
            Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Bool(v) => out.push(u8::from(*v)),
            Value::Str(s) => encode_str(s, out),
            Value::Array(t, items) => {
                out.extend_from_slice(&t.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for i in items {
                    i.encode(out);
                }
            }
            Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        }
    }

    /// Appends the type id and the encoding.
    pub fn encode_typed(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.type_id().to_le_bytes());
        self.encode(out);
    }
}

pub(crate) fn encode_str(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// One tensor-info record.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml `ne`: `ne[0]` is the contiguous dimension (a Hugging Face `[out, in]` weight
    /// has `ne = [in, out]`).
    pub ne: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Byte length of the data.
    pub byte_len: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.ne.iter().product()
    }
}

/// A parsed GGUF header.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// File offset of the data section.
    pub data_offset: u64,
}

impl Header {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// A GGUF file opened for reading: its header, and positioned reads of tensor data.
pub struct GgufFile {
    pub path: PathBuf,
    pub header: Header,
    file: File,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile, ConvertError> {
        let io = crate::error::io(path);
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(crate::error::io(path))?.len();
        let mut reader = BufReader::with_capacity(1 << 20, &file);
        let header = parse(&mut reader, len).map_err(|e| match e {
            ParseError::Io(source) => ConvertError::Io {
                path: path.to_path_buf(),
                source,
            },
            ParseError::Invalid(problem) => ConvertError::Source {
                path: path.to_path_buf(),
                problem: format!("not a valid GGUF file: {problem}"),
            },
        })?;
        drop(reader);
        Ok(GgufFile {
            path: path.to_path_buf(),
            header,
            file,
        })
    }

    /// Reads a whole tensor's data.
    pub fn read(&self, t: &TensorInfo) -> Result<Vec<u8>, ConvertError> {
        use std::os::unix::fs::FileExt;
        let len = usize::try_from(t.byte_len).map_err(|_| self.tensor_error(t, "too large"))?;
        let mut buf = vec![0u8; len];
        // In bounds: `parse` checked offset + byte_len against the file length.
        self.file
            .read_exact_at(&mut buf, self.header.data_offset + t.offset)
            .map_err(crate::error::io(&self.path))?;
        Ok(buf)
    }

    /// Reads `len` bytes at `offset` within a tensor's data.
    pub fn read_range(
        &self,
        t: &TensorInfo,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, ConvertError> {
        use std::os::unix::fs::FileExt;
        if offset.checked_add(len).is_none_or(|end| end > t.byte_len) {
            return Err(self.tensor_error(
                t,
                format!("read of {len} bytes at {offset} is out of bounds"),
            ));
        }
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, self.header.data_offset + t.offset + offset)
            .map_err(crate::error::io(&self.path))?;
        Ok(buf)
    }

    pub fn tensor_error(&self, t: &TensorInfo, problem: impl Into<String>) -> ConvertError {
        ConvertError::Tensor {
            path: self.path.clone(),
            tensor: t.name.clone(),
            problem: problem.into(),
        }
    }

    pub fn error(&self, problem: impl Into<String>) -> ConvertError {
        ConvertError::Source {
            path: self.path.clone(),
            problem: problem.into(),
        }
    }
}

/// Why a header did not parse.
#[derive(Debug)]
pub enum ParseError {
    Io(std::io::Error),
    Invalid(String),
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::Io(e) => write!(f, "{e}"),
            ParseError::Invalid(p) => f.write_str(p),
        }
    }
}

fn invalid<T>(problem: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError::Invalid(problem.into()))
}

/// Parses the header of a GGUF byte slice (the whole file).
pub fn parse_bytes(bytes: &[u8]) -> Result<Header, ParseError> {
    parse(&mut std::io::Cursor::new(bytes), bytes.len() as u64)
}

/// A reader that knows how many bytes the file has left, so that no count read from the
/// file makes it allocate more than the file could hold.
struct Bounded<'a, R> {
    inner: &'a mut R,
    pos: u64,
    len: u64,
}

impl<R: Read> Bounded<'_, R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ParseError> {
        if self.remaining() < N as u64 {
            return invalid(format!(
                "truncated: {what} at byte {} runs past the end of the file ({} bytes)",
                self.pos, self.len
            ));
        }
        let mut b = [0u8; N];
        self.inner.read_exact(&mut b).map_err(ParseError::Io)?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32, ParseError> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, ParseError> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str, max: u64) -> Result<String, ParseError> {
        let n = self.u64(what)?;
        if n > max || n > self.remaining() {
            return invalid(format!(
                "{what} at byte {} claims {n} bytes (at most {} possible)",
                self.pos - 8,
                max.min(self.remaining())
            ));
        }
        let mut buf = vec![0u8; n as usize];
        self.inner.read_exact(&mut buf).map_err(ParseError::Io)?;
        self.pos += n;
        String::from_utf8(buf).or_else(|_| invalid(format!("{what} is not UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value, ParseError> {
        use value_type::*;
        Ok(match ty {
            U8 => Value::U8(self.bytes::<1>(key)?[0]),
            I8 => Value::I8(self.bytes::<1>(key)?[0] as i8),
            U16 => Value::U16(u16::from_le_bytes(self.bytes(key)?)),
            I16 => Value::I16(i16::from_le_bytes(self.bytes(key)?)),
            U32 => Value::U32(self.u32(key)?),
            I32 => Value::I32(i32::from_le_bytes(self.bytes(key)?)),
            F32 => Value::F32(f32::from_le_bytes(self.bytes(key)?)),
            BOOL => match self.bytes::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return invalid(format!("{key}: boolean byte {b}")),
            },
            STRING => Value::Str(self.string(key, u64::MAX)?),
            ARRAY => {
                if depth >= MAX_DEPTH {
                    return invalid(format!("{key}: arrays nested too deeply"));
                }
                let elem = self.u32(key)?;
                let n = self.u64(key)?;
                // Every element takes at least one byte.
                if n > self.remaining() {
                    return invalid(format!(
                        "{key}: array of {n} elements in {} remaining bytes",
                        self.remaining()
                    ));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(elem, items)
            }
            U64 => Value::U64(self.u64(key)?),
            I64 => Value::I64(i64::from_le_bytes(self.bytes(key)?)),
            F64 => Value::F64(f64::from_le_bytes(self.bytes(key)?)),
            other => return invalid(format!("{key}: unknown value type {other}")),
        })
    }
}

/// Parses a GGUF header from `reader`, positioned at the start of a file of `len` bytes.
pub fn parse<R: Read>(reader: &mut R, len: u64) -> Result<Header, ParseError> {
    let mut r = Bounded {
        inner: reader,
        pos: 0,
        len,
    };
    if r.bytes::<4>("magic")? != MAGIC {
        return invalid("no GGUF magic");
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return invalid(format!("GGUF version {version} (tern reads 2 and 3)"));
    }
    let n_tensors = r.u64("tensor count")?;
    let n_kv = r.u64("metadata count")?;
    // A key-value pair takes at least 13 bytes, a tensor info at least 24.
    if n_kv > r.remaining() / 13 || n_tensors > r.remaining() / 24 {
        return invalid(format!(
            "{n_kv} metadata pairs and {n_tensors} tensors cannot fit in {len} bytes"
        ));
    }
    let mut metadata: Vec<(String, Value)> = Vec::with_capacity(n_kv as usize);
    for i in 0..n_kv {
        let key = r.string(&format!("key of metadata pair {i}"), 65535)?;
        let ty = r.u32(&key)?;
        let value = r.value(ty, &key, 0)?;
        if metadata.iter().any(|(k, _)| *k == key) {
            return invalid(format!("metadata key {key:?} appears twice"));
        }
        metadata.push((key, value));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some((_, v)) => {
            return invalid(format!(
                "general.alignment {v:?} is not a power of two (u32)"
            ))
        }
    };
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = r.string(&format!("name of tensor {i}"), MAX_NAME_LEN)?;
        let n_dims = r.u32(&name)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return invalid(format!("tensor {name:?}: {n_dims} dimensions"));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            ne.push(r.u64(&name)?);
        }
        let type_id = r.u32(&name)?;
        let offset = r.u64(&name)?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
            ParseError::Invalid(format!(
                "tensor {name:?}: ggml type {type_id} is not one tern knows"
            ))
        })?;
        let byte_len = ggml_type
            .byte_len(&ne)
            .map_err(|p| ParseError::Invalid(format!("tensor {name:?} ({ggml_type}): {p}")))?;
        if offset % alignment != 0 {
            return invalid(format!(
                "tensor {name:?}: offset {offset} is not a multiple of the alignment {alignment}"
            ));
        }
        if tensors.iter().any(|t| t.name == name) {
            return invalid(format!("tensor {name:?} appears twice"));
        }
        tensors.push(TensorInfo {
            name,
            ne,
            ggml_type,
            offset,
            byte_len,
        });
    }
    let data_offset = r
        .pos
        .checked_next_multiple_of(alignment)
        .filter(|&d| d <= len)
        .map_or_else(|| invalid("no room for the data section"), Ok)?;
    let data_len = len - data_offset;
    for t in &tensors {
        match t.offset.checked_add(t.byte_len) {
            Some(end) if end <= data_len => {}
            _ => {
                return invalid(format!(
                    "tensor {:?}: data at {}..+{} runs past the end of the data section ({data_len} bytes)",
                    t.name, t.offset, t.byte_len
                ))
            }
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A small valid GGUF: two metadata pairs (one an array), one F32 tensor.
    fn sample() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        encode_str("general.architecture", &mut b);
        Value::Str("bitnet".into()).encode_typed(&mut b);
        encode_str("tokenizer.ggml.tokens", &mut b);
        Value::Array(
            value_type::STRING,
            vec![Value::Str("a".into()), Value::Str("b".into())],
        )
        .encode_typed(&mut b);
        encode_str("output_norm.weight", &mut b);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&4u64.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.resize(b.len().next_multiple_of(32), 0);
        b.extend_from_slice(&[0u8; 16]);
        b
    }

    #[test]
    fn sample_parses() {
        let h = parse_bytes(&sample()).unwrap();
        assert_eq!(
            h.get("general.architecture").and_then(Value::as_str),
            Some("bitnet")
        );
        assert_eq!(h.tensors[0].byte_len, 16);
        assert_eq!(h.data_offset % 32, 0);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let b = sample();
        for len in 0..b.len() {
            assert!(parse_bytes(&b[..len]).is_err(), "length {len}");
        }
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        let mut b = sample();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes()); // metadata count
        assert!(parse_bytes(&b).is_err());
        let mut b = sample();
        b[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes()); // tensor count
        assert!(parse_bytes(&b).is_err());
    }

    proptest! {
        #[test]
        fn mutations_never_panic(edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut b = sample();
            let n = b.len();
            for (at, v) in edits {
                b[at % n] = v;
            }
            let _ = parse_bytes(&b);
        }

        #[test]
        fn random_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&3u32.to_le_bytes());
            b.extend_from_slice(&tail);
            let _ = parse_bytes(&b);
        }
    }
}
