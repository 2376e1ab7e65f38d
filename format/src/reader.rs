use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::{
    checksum, expected_tensors, limits, Error, Layout, Metadata, Problem, TensorProblem,
    HEADER_LEN, MAGIC, MAJOR,
};

/// One entry of the tensor directory, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub layout_id: u16,
    /// `None` only for a layout introduced by a newer minor version.
    pub layout: Option<Layout>,
    pub shape: Vec<u64>,
    pub offset: u64,
    pub byte_len: u64,
    pub scale: f32,
    pub checksum: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }

    fn range(&self) -> Range<usize> {
        // Validated at parse time to lie inside the file, so it fits in usize.
        self.offset as usize..(self.offset + self.byte_len) as usize
    }
}

/// Everything the validated prefix of a file says (docs/format.md §2–§5).
#[derive(Clone, Debug)]
pub struct Parsed {
    pub major: u16,
    pub minor: u16,
    pub alignment: u32,
    pub metadata: Metadata,
    /// The metadata JSON exactly as stored.
    pub metadata_json: String,
    pub tokenizer: Range<usize>,
    /// Bytes before the first tensor: header, metadata, tokenizer, directory.
    pub prefix_len: u64,
    pub tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

impl Parsed {
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }
}

/// A tensor whose bytes do not match their checksum.
#[derive(Clone, Debug, PartialEq)]
pub struct ChecksumMismatch {
    pub name: String,
    pub stored: u64,
    pub computed: u64,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    what: &'static str,
    base: u64,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Problem> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(Problem::Directory(format!(
                "{} ends early at byte {} of the directory",
                self.what,
                self.base + self.bytes.len() as u64
            )));
        };
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Problem> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, Problem> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, Problem> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, Problem> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, Problem> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn f32(&mut self) -> Result<f32, Problem> {
        Ok(f32::from_le_bytes(self.array()?))
    }
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Validates a whole `.tern` file given as bytes (docs/format.md §7). Reads only the
/// prefix (header, metadata, tokenizer, directory), never tensor data. Never panics.
pub fn parse(bytes: &[u8]) -> Result<Parsed, Problem> {
    let file_len = bytes.len() as u64;
    if bytes.len() < HEADER_LEN {
        return Err(Problem::Truncated {
            what: "header",
            needed: HEADER_LEN as u64,
            available: file_len,
        });
    }
    if bytes[..8] != MAGIC {
        return Err(Problem::BadMagic);
    }
    let major = u16::from_le_bytes([bytes[8], bytes[9]]);
    let minor = u16::from_le_bytes([bytes[10], bytes[11]]);
    if major != MAJOR {
        return Err(Problem::UnsupportedMajor {
            major,
            minor,
            supported: MAJOR,
        });
    }
    let alignment = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    if !alignment.is_power_of_two()
        || !(limits::MIN_ALIGNMENT..=limits::MAX_ALIGNMENT).contains(&alignment)
    {
        return Err(Problem::BadAlignment(alignment));
    }
    let (meta_off, meta_len) = (le_u64(bytes, 16), le_u64(bytes, 24));
    let (tok_off, tok_len) = (le_u64(bytes, 32), le_u64(bytes, 40));
    let (dir_off, dir_len) = (le_u64(bytes, 48), le_u64(bytes, 56));

    // Sections follow each other: each offset is where the previous section ends.
    let sections = [
        (
            "metadata",
            meta_off,
            meta_len,
            HEADER_LEN as u64,
            limits::MAX_META_LEN,
        ),
        (
            "tokenizer",
            tok_off,
            tok_len,
            meta_off.saturating_add(meta_len),
            limits::MAX_TOKENIZER_LEN,
        ),
        // A directory can't be bigger than the largest count of largest entries.
        (
            "directory",
            dir_off,
            dir_len,
            tok_off.saturating_add(tok_len),
            1 << 28,
        ),
    ];
    for (section, offset, len, expected, max) in sections {
        if offset != expected {
            return Err(Problem::SectionOffset {
                section,
                offset,
                expected,
            });
        }
        if len > max {
            return Err(Problem::SectionTooLarge { section, len, max });
        }
        // Offsets and lengths are bounded above, so these sums cannot overflow.
        if offset + len > file_len {
            return Err(Problem::Truncated {
                what: section,
                needed: offset + len,
                available: file_len,
            });
        }
    }
    let prefix_len = dir_off + dir_len;
    if dir_len < 16 {
        return Err(Problem::Directory(format!(
            "{dir_len} bytes is too short for a directory"
        )));
    }
    let body_end = (prefix_len - 8) as usize;
    let stored = le_u64(bytes, body_end);
    let computed = checksum(&bytes[..body_end]);
    if stored != computed {
        return Err(Problem::HeaderChecksum { stored, computed });
    }

    let meta_bytes = &bytes[meta_off as usize..(meta_off + meta_len) as usize];
    let metadata_json = std::str::from_utf8(meta_bytes)
        .map_err(|e| Problem::MetadataUtf8(e.to_string()))?
        .to_string();
    let metadata: Metadata =
        serde_json::from_str(&metadata_json).map_err(|e| Problem::MetadataJson(e.to_string()))?;
    metadata.config.validate().map_err(Problem::Config)?;
    if metadata.config.since_minor() > minor {
        return Err(Problem::Config(format!(
            "the config uses RoPE scaling, linear biases or dense linears, which need format 1.{}, but the file says 1.{minor}",
            metadata.config.since_minor()
        )));
    }

    let tensors = parse_directory(
        &bytes[dir_off as usize..body_end],
        dir_off,
        prefix_len,
        file_len,
        alignment,
        minor,
    )?;
    let mut index = HashMap::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        if index.insert(t.name.clone(), i).is_some() {
            return Err(Problem::DuplicateTensor(t.name.clone()));
        }
    }
    check_overlaps(&tensors)?;
    check_against_config(&metadata, &tensors, &index)?;

    Ok(Parsed {
        major,
        minor,
        alignment,
        metadata,
        metadata_json,
        tokenizer: tok_off as usize..(tok_off + tok_len) as usize,
        prefix_len,
        tensors,
        index,
    })
}

fn parse_directory(
    dir: &[u8],
    dir_off: u64,
    data_start: u64,
    file_len: u64,
    alignment: u32,
    minor: u16,
) -> Result<Vec<TensorInfo>, Problem> {
    let mut cur = Cursor {
        bytes: dir,
        pos: 0,
        what: "the tensor count",
        base: dir_off,
    };
    let count = cur.u32()?;
    if count > limits::MAX_TENSORS {
        return Err(Problem::Directory(format!(
            "{count} tensors is more than the limit of {}",
            limits::MAX_TENSORS
        )));
    }
    let reserved = cur.u32()?;
    if reserved != 0 {
        return Err(Problem::Directory(format!(
            "reserved field is {reserved}, must be 0"
        )));
    }
    let mut tensors = Vec::with_capacity(count.min(1024) as usize);
    for i in 0..count {
        cur.what = "a tensor entry";
        let name_len = cur.u16()? as usize;
        let name_bytes = cur.take(name_len)?;
        let name = match std::str::from_utf8(name_bytes) {
            Ok(n) if !n.is_empty() && n.len() <= limits::MAX_NAME_LEN => n.to_string(),
            _ => {
                return Err(Problem::Tensor {
                    name: format!("#{i}"),
                    problem: TensorProblem::BadName,
                })
            }
        };
        let bad = |problem| Problem::Tensor {
            name: name.clone(),
            problem,
        };
        let layout_id = cur.u16()?;
        let ndim = cur.u8()?;
        if ndim == 0 || ndim > limits::MAX_NDIM {
            return Err(bad(TensorProblem::BadNdim(ndim)));
        }
        let mut shape = Vec::with_capacity(ndim as usize);
        for index in 0..ndim as usize {
            let value = cur.u64()?;
            if value == 0 || value > limits::MAX_DIM {
                return Err(bad(TensorProblem::BadDim { index, value }));
            }
            shape.push(value);
        }
        let offset = cur.u64()?;
        let byte_len = cur.u64()?;
        let scale = cur.f32()?;
        let checksum = cur.u64()?;

        let layout = Layout::from_id(layout_id);
        match layout {
            Some(layout) => {
                if layout.since_minor() > minor {
                    return Err(bad(TensorProblem::LayoutNewerThanFile {
                        layout: layout.name(),
                        since: layout.since_minor(),
                        minor,
                    }));
                }
                let expected = layout.byte_len(&shape).map_err(&bad)?;
                if expected != byte_len {
                    return Err(bad(TensorProblem::ByteLength {
                        expected,
                        got: byte_len,
                    }));
                }
                if layout.unit_scale() && scale != 1.0 && scale.is_finite() && scale > 0.0 {
                    return Err(bad(TensorProblem::FloatScale(scale)));
                }
            }
            None if minor > crate::MINOR => {} // a newer minor's layout: skipped, not used
            None => return Err(bad(TensorProblem::UnknownLayout(layout_id))),
        }
        if offset % u64::from(alignment) != 0 {
            return Err(bad(TensorProblem::Misaligned { offset, alignment }));
        }
        let inside = offset >= data_start
            && offset
                .checked_add(byte_len)
                .is_some_and(|end| end <= file_len);
        if !inside {
            return Err(bad(TensorProblem::OutOfBounds {
                offset,
                len: byte_len,
                file_len,
            }));
        }
        if !(scale.is_finite() && scale > 0.0) {
            return Err(bad(TensorProblem::BadScale(scale)));
        }
        tensors.push(TensorInfo {
            name,
            layout_id,
            layout,
            shape,
            offset,
            byte_len,
            scale,
            checksum,
        });
    }
    if cur.pos != dir.len() {
        return Err(Problem::Directory(format!(
            "{} bytes left over after {count} entries",
            dir.len() - cur.pos
        )));
    }
    Ok(tensors)
}

fn check_overlaps(tensors: &[TensorInfo]) -> Result<(), Problem> {
    let mut order: Vec<&TensorInfo> = tensors.iter().filter(|t| t.byte_len > 0).collect();
    order.sort_by_key(|t| t.offset);
    for pair in order.windows(2) {
        if pair[0].offset + pair[0].byte_len > pair[1].offset {
            return Err(Problem::Overlap {
                first: pair[0].name.clone(),
                second: pair[1].name.clone(),
            });
        }
    }
    Ok(())
}

fn check_against_config(
    metadata: &Metadata,
    tensors: &[TensorInfo],
    index: &HashMap<String, usize>,
) -> Result<(), Problem> {
    let expected = expected_tensors(&metadata.config);
    let mut wanted = std::collections::HashSet::with_capacity(expected.len());
    for (name, shape, role) in expected {
        let Some(&i) = index.get(&name) else {
            return Err(Problem::MissingTensor(name));
        };
        let t = &tensors[i];
        if t.shape != shape {
            return Err(Problem::Tensor {
                name,
                problem: TensorProblem::Shape {
                    expected: shape,
                    got: t.shape.clone(),
                },
            });
        }
        if let Some(layout) = t.layout {
            if !role.allows(layout) {
                return Err(Problem::Tensor {
                    name,
                    problem: TensorProblem::LayoutNotAllowed(layout),
                });
            }
        }
        wanted.insert(name);
    }
    if let Some(extra) = tensors.iter().find(|t| !wanted.contains(&t.name)) {
        return Err(Problem::UnexpectedTensor(extra.name.clone()));
    }
    Ok(())
}

/// A validated, memory-mapped `.tern` file. Tensor data is borrowed from the mapping:
/// nothing is copied.
pub struct TernFile {
    path: PathBuf,
    map: memmap2::Mmap,
    parsed: Parsed,
}

impl TernFile {
    /// Maps and validates a file. Costs O(header): tensor data is not read.
    pub fn open(path: impl AsRef<Path>) -> Result<TernFile, Error> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        // A FIFO or device would block `open` or never end: look before opening, and
        // again at what was opened.
        let kind = std::fs::metadata(&path).map_err(io)?.file_type();
        if !kind.is_file() {
            return Err(not_regular(path, kind));
        }
        let file = File::open(&path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(not_regular(path, meta.file_type()));
        }
        let len = meta.len();
        if len < HEADER_LEN as u64 {
            return Err(Error::Invalid {
                path,
                problem: Problem::Truncated {
                    what: "header",
                    needed: HEADER_LEN as u64,
                    available: len,
                },
            });
        }
        let map = map_file(&file).map_err(io)?;
        let parsed = parse(&map).map_err(|problem| Error::Invalid {
            path: path.clone(),
            problem,
        })?;
        Ok(TernFile { path, map, parsed })
    }

    /// The fraction of the file mapped with 2 MiB page-table entries, from
    /// `/proc/self/smaps` (`None` where there is none): of the pages touched so far, so ask
    /// after reading the weights. Decode walks every weight page once per token, and on
    /// 4 KiB pages that costs it up to a quarter of its speed (docs/performance.md).
    pub fn huge_page_fraction(&self) -> Option<f64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        pmd_mapped_bytes(&smaps, self.map.as_ptr() as usize)
            .map(|b| b as f64 / self.map.len().max(1) as f64)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn parsed(&self) -> &Parsed {
        &self.parsed
    }

    pub fn metadata(&self) -> &Metadata {
        &self.parsed.metadata
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.parsed.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.parsed.tensor(name)
    }

    /// The tokenizer.json bytes embedded in the file (possibly empty).
    pub fn tokenizer_json(&self) -> &[u8] {
        &self.map[self.parsed.tokenizer.clone()]
    }

    /// The raw bytes of a tensor, borrowed from the mapping.
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.range()]
    }

    /// Looks a tensor up by name, with an error naming the file if it is absent.
    pub fn require(&self, name: &str) -> Result<&TensorInfo, Error> {
        self.tensor(name).ok_or_else(|| Error::Invalid {
            path: self.path.clone(),
            problem: Problem::MissingTensor(name.to_string()),
        })
    }

    /// A tensor's data as 16-bit words (F16 or BF16 bits).
    pub fn view_u16(&self, t: &TensorInfo) -> Result<&[u16], Error> {
        self.view(t, &[Layout::F16, Layout::Bf16], "16-bit floats")
    }

    /// A tensor's data as f32 (F32 layout).
    pub fn view_f32(&self, t: &TensorInfo) -> Result<&[f32], Error> {
        self.view(t, &[Layout::F32], "f32")
    }

    fn view<T: bytemuck::Pod>(
        &self,
        t: &TensorInfo,
        layouts: &[Layout],
        wanted: &'static str,
    ) -> Result<&[T], Error> {
        let bad = |problem| Error::Invalid {
            path: self.path.clone(),
            problem: Problem::Tensor {
                name: t.name.clone(),
                problem,
            },
        };
        if !t.layout.is_some_and(|l| layouts.contains(&l)) {
            return Err(bad(TensorProblem::WrongLayout {
                found: t
                    .layout
                    .map_or(format!("id {}", t.layout_id), |l| l.to_string()),
                wanted,
            }));
        }
        bytemuck::try_cast_slice(self.data(t))
            .map_err(|_| bad(TensorProblem::ViewAlignment(std::mem::size_of::<T>())))
    }

    /// Verifies every tensor's checksum, using up to `threads` threads. Returns the damaged ones.
    pub fn verify_checksums(&self, threads: usize) -> Vec<ChecksumMismatch> {
        let tensors = &self.parsed.tensors;
        let next = std::sync::atomic::AtomicUsize::new(0);
        let bad = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(t) = tensors.get(i) else { break };
                    let computed = checksum(self.data(t));
                    if computed != t.checksum {
                        bad.lock()
                            .expect("no panics while held")
                            .push(ChecksumMismatch {
                                name: t.name.clone(),
                                stored: t.checksum,
                                computed,
                            });
                    }
                });
            }
        });
        let mut bad = bad.into_inner().expect("no panics while held");
        bad.sort_by_key(|m| self.parsed.index[&m.name]);
        bad
    }

    /// Checks that every ternary tensor holds only valid codes (TQ2: no code 3; TQ1: only
    /// the 243 valid bytes; padding = trit 0) and that every Q8_ROW row scale is finite
    /// and non-negative.
    pub fn verify_trits(&self) -> Result<(), Error> {
        let bad = |t: &TensorInfo, problem| Error::Invalid {
            path: self.path.clone(),
            problem: Problem::Tensor {
                name: t.name.clone(),
                problem,
            },
        };
        for t in &self.parsed.tensors {
            let Some(layout) = t.layout else { continue };
            let cols = t.shape.get(1).copied().unwrap_or(0);
            let find: fn(&[u8], usize) -> Option<usize> = match layout {
                Layout::Tq2 => crate::tq2::find_invalid,
                Layout::Tq1 => crate::tq1::find_invalid,
                Layout::Q8Row => {
                    let stride = crate::q8row::row_stride(cols) as usize;
                    for (row, rec) in self.data(t).chunks_exact(stride).enumerate() {
                        let s = crate::q8row::row_scale(rec);
                        if !(s.is_finite() && s >= 0.0) {
                            return Err(bad(t, TensorProblem::BadRowScale { row: row as u64 }));
                        }
                    }
                    continue;
                }
                _ => continue,
            };
            let row_bytes = layout.ternary_row_bytes(cols).expect("ternary") as usize;
            for (row, bytes) in self.data(t).chunks_exact(row_bytes).enumerate() {
                if let Some(col) = find(bytes, cols as usize) {
                    return Err(bad(
                        t,
                        TensorProblem::InvalidTrit {
                            row: row as u64,
                            col: col as u64,
                        },
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks that every float value is finite: each element of the F32, F16 and BF16
    /// tensors (embeddings, norms, head) and each Q8_ROW row scale. The first NaN or
    /// infinity is reported with its tensor and element index (as llama.cpp's
    /// `--check-tensors` does): checksums only prove the bytes are the ones written, not
    /// that a writer wrote numbers.
    pub fn verify_floats(&self) -> Result<(), Error> {
        for t in &self.parsed.tensors {
            if let Some(element) = t.layout.and_then(|l| first_non_finite(l, t, self.data(t))) {
                return Err(Error::Invalid {
                    path: self.path.clone(),
                    problem: Problem::Tensor {
                        name: t.name.clone(),
                        problem: TensorProblem::NonFinite { element },
                    },
                });
            }
        }
        Ok(())
    }
}

/// Index of the first NaN or infinite value of a float tensor's bytes (for Q8_ROW, of the
/// first row whose scale is not finite), judged on the exponent bits alone.
fn first_non_finite(layout: Layout, t: &TensorInfo, bytes: &[u8]) -> Option<u64> {
    let at = |i: Option<usize>| i.map(|i| i as u64);
    match layout {
        Layout::F32 => at(bytes.chunks_exact(4).position(|b| {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7f80_0000 == 0x7f80_0000
        })),
        Layout::F16 => at(bytes
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00)),
        Layout::Bf16 => at(bytes
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7f80 == 0x7f80)),
        Layout::Q8Row => {
            let cols = t.shape.get(1).copied().unwrap_or(0);
            let stride = usize::try_from(crate::q8row::row_stride(cols)).ok()?;
            at(bytes
                .chunks_exact(stride)
                .position(|rec| !crate::q8row::row_scale(rec).is_finite()))
        }
        _ => None,
    }
}

fn not_regular(path: PathBuf, kind: std::fs::FileType) -> Error {
    Error::Invalid {
        path,
        problem: Problem::NotRegularFile(file_kind(kind)),
    }
}

/// What a non-regular file is, for error messages.
pub fn file_kind(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// `FilePmdMapped` of the mapping that starts at `start`, in bytes, from the text of
/// `/proc/self/smaps` (a header line `start-end perms ...` and then `Key: value kB` lines
/// for each mapping).
fn pmd_mapped_bytes(smaps: &str, start: usize) -> Option<u64> {
    let mut ours = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, _)) = first.split_once('-') {
            if let Ok(a) = usize::from_str_radix(a, 16) {
                ours = a == start;
                continue;
            }
        }
        if let (true, Some(v)) = (ours, line.strip_prefix("FilePmdMapped:")) {
            let kb: u64 = v.trim().trim_end_matches("kB").trim().parse().ok()?;
            return kb.checked_mul(1024);
        }
    }
    None
}

#[allow(unsafe_code)]
fn map_file(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the mapping is read-only and private to this process. If another process
    // truncates or rewrites the file while it is mapped, reads may fault (SIGBUS) or see
    // new bytes; that is the documented contract of reading a .tern file (docs/format.md):
    // files are written to a temporary name and renamed, never modified in place.
    let map = unsafe { memmap2::Mmap::map(file) }?;
    // Pages read in from now on come in 2 MiB folios where the kernel can, mapped with one
    // huge-page entry each: decode walks every weight page once per token, and 4 KiB pages
    // cost it up to a quarter of its speed (docs/performance.md). Only advice: a kernel without
    // transparent huge pages refuses it, and the mapping works as before.
    #[cfg(target_os = "linux")]
    let _ = map.advise(memmap2::Advice::HugePage);
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::pmd_mapped_bytes;

    #[test]
    fn pmd_mapped_bytes_reads_the_right_mapping() {
        let smaps = "\
7f0000000000-7f0000200000 r--s 00000000 fd:01 12 /m/other.tern
Size:               2048 kB
FilePmdMapped:      2048 kB
7f0000400000-7f0000a00000 r--s 00000000 fd:01 13 /m/model.tern
Size:               6144 kB
Rss:                6144 kB
FilePmdMapped:      4096 kB
VmFlags: rd sh mr mw me ms hg
";
        assert_eq!(pmd_mapped_bytes(smaps, 0x7f0000400000), Some(4096 * 1024));
        assert_eq!(pmd_mapped_bytes(smaps, 0x7f0000000000), Some(2048 * 1024));
        assert_eq!(pmd_mapped_bytes(smaps, 0x7f0000200000), None);
        assert_eq!(pmd_mapped_bytes("", 0x7f0000400000), None);
        assert_eq!(
            pmd_mapped_bytes(
                "7f0000400000-7f0000a00000 r--s\nFilePmdMapped: x kB\n",
                0x7f0000400000
            ),
            None
        );
    }
}
