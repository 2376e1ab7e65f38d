use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Layout, Metadata, ALIGNMENT, HEADER_LEN, MAGIC, MAJOR, MINOR};

/// A tensor the writer will be given, declared up front so the whole file layout (and so
/// the directory, which precedes the data) is known before any data is written.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub layout: Layout,
    pub shape: Vec<u64>,
}

struct Slot {
    spec: TensorSpec,
    offset: u64,
    byte_len: u64,
    scale: f32,
    checksum: u64,
}

/// Streams a `.tern` file: declare the tensors, write each one's bytes in order, then
/// [`Writer::finish`]. Data goes to a temporary file beside the target, which is synced
/// and renamed over the target only by `finish` (or, with
/// [`Writer::replace_existing`]`(false)`, linked to it only if the target does not exist);
/// dropping an unfinished writer deletes it, and the next writer to the same target
/// removes what a killed one left.
pub struct Writer {
    out: Option<ChunkWriter<File>>,
    tmp_path: PathBuf,
    path: PathBuf,
    prefix: Vec<u8>,
    dir_offset: u64,
    slots: Vec<Slot>,
    next: usize,
    pos: u64,
    /// Hash state and byte count of the tensor being written.
    open: Option<(xxhash_rust::xxh3::Xxh3, u64)>,
    meta_len: usize,
    rewrite_meta: bool,
    replace: bool,
    stale_removed: Vec<PathBuf>,
}

impl Writer {
    /// Creates the temporary file and writes header, metadata, tokenizer and a placeholder
    /// directory. Tensors must then be written in the order of `tensors`.
    pub fn create(
        path: &Path,
        metadata: &Metadata,
        tokenizer_json: &[u8],
        tensors: Vec<TensorSpec>,
    ) -> Result<Writer, Error> {
        let invalid = |problem: String| Error::Write {
            path: path.to_path_buf(),
            problem,
        };
        let meta = serde_json::to_vec_pretty(metadata).map_err(|e| invalid(e.to_string()))?;
        let mut seen = std::collections::HashSet::new();
        let mut dir_len = 8u64 + 8; // count + reserved, trailing checksum
        for t in &tensors {
            if !seen.insert(t.name.as_str()) {
                return Err(invalid(format!("tensor {:?} declared twice", t.name)));
            }
            if t.name.is_empty() || t.name.len() > crate::limits::MAX_NAME_LEN {
                return Err(invalid(format!("tensor name {:?} is too long", t.name)));
            }
            if t.shape.is_empty() || t.shape.len() > crate::limits::MAX_NDIM as usize {
                return Err(invalid(format!("tensor {:?}: bad rank", t.name)));
            }
            dir_len += 2 + t.name.len() as u64 + 2 + 1 + 8 * t.shape.len() as u64 + 8 + 8 + 4 + 8;
        }
        let meta_offset = HEADER_LEN as u64;
        let tok_offset = meta_offset + meta.len() as u64;
        let dir_offset = tok_offset + tokenizer_json.len() as u64;
        let mut pos = dir_offset + dir_len;
        let mut slots = Vec::with_capacity(tensors.len());
        for spec in tensors {
            let byte_len = spec
                .layout
                .byte_len(&spec.shape)
                .map_err(|p| invalid(format!("tensor {:?}: {p}", spec.name)))?;
            let offset = pos.next_multiple_of(u64::from(ALIGNMENT));
            pos = offset + byte_len;
            slots.push(Slot {
                spec,
                offset,
                byte_len,
                scale: 1.0,
                checksum: 0,
            });
        }

        let mut prefix = Vec::with_capacity(HEADER_LEN + meta.len() + tokenizer_json.len());
        prefix.extend_from_slice(&MAGIC);
        prefix.extend_from_slice(&MAJOR.to_le_bytes());
        // The lowest minor that holds every layout and config feature used: files without
        // them stay readable by readers that predate them.
        let minor = slots
            .iter()
            .map(|s| s.spec.layout.since_minor())
            .chain([metadata.config.since_minor()])
            .max()
            .unwrap_or(0);
        debug_assert!(minor <= MINOR);
        prefix.extend_from_slice(&minor.to_le_bytes());
        prefix.extend_from_slice(&ALIGNMENT.to_le_bytes());
        for v in [
            meta_offset,
            meta.len() as u64,
            tok_offset,
            tokenizer_json.len() as u64,
            dir_offset,
            dir_len,
        ] {
            prefix.extend_from_slice(&v.to_le_bytes());
        }
        prefix.extend_from_slice(&meta);
        prefix.extend_from_slice(tokenizer_json);

        let file_name = path
            .file_name()
            .ok_or_else(|| invalid("output path has no file name".into()))?;
        let stale_removed = remove_stale_temps(path);
        // `.NAME.PID.N.tmp`: the PID lets a later run tell a dead writer's leftover from a
        // live one's file, N keeps writers of one process apart.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(
            ".{}.{}.tmp",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp_path = path.with_file_name(tmp_name);
        let io = |source| Error::Io {
            path: tmp_path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .map_err(io)?;
        let mut writer = Writer {
            out: Some(ChunkWriter::new(file)),
            tmp_path: tmp_path.clone(),
            path: path.to_path_buf(),
            prefix,
            dir_offset,
            slots,
            next: 0,
            pos: 0,
            open: None,
            meta_len: meta.len(),
            rewrite_meta: false,
            replace: true,
            stale_removed,
        };
        let prefix = std::mem::take(&mut writer.prefix);
        writer.write_all(&prefix)?;
        writer.write_zeros(dir_len)?;
        writer.prefix = prefix;
        Ok(writer)
    }

    /// Whether [`Writer::finish`] may replace an existing file at the target (the default).
    /// With `false` the file is put in place only if the path is free, atomically: of two
    /// writers racing to one path exactly one succeeds and the other gets
    /// [`Error::Exists`].
    pub fn replace_existing(mut self, replace: bool) -> Writer {
        self.replace = replace;
        self
    }

    /// Temporary files of dead writers to the same target (a killed conversion's
    /// leftovers) that `create` removed.
    pub fn stale_removed(&self) -> &[PathBuf] {
        &self.stale_removed
    }

    /// The name of the tensor `write_tensor` expects next, if any.
    pub fn next_name(&self) -> Option<&str> {
        self.slots.get(self.next).map(|s| s.spec.name.as_str())
    }

    /// Writes the next tensor's bytes and its scale (true value = scale × stored value;
    /// exactly 1.0 for float layouts).
    pub fn write_tensor(&mut self, name: &str, scale: f32, data: &[u8]) -> Result<(), Error> {
        self.begin_tensor(name, scale)?;
        self.write_chunk(data)?;
        self.end_tensor()
    }

    /// Starts the next tensor; its bytes then follow in any number of
    /// [`Writer::write_chunk`] calls, closed by [`Writer::end_tensor`].
    pub fn begin_tensor(&mut self, name: &str, scale: f32) -> Result<(), Error> {
        if self.open.is_some() {
            return Err(self.fail(format!(
                "tensor {name:?} begun before the previous one ended"
            )));
        }
        let Some(slot) = self.slots.get(self.next) else {
            return Err(self.fail(format!("tensor {name:?} was not declared")));
        };
        if slot.spec.name != name {
            let expected = slot.spec.name.clone();
            return Err(self.fail(format!(
                "tensor {name:?} written where {expected:?} was declared"
            )));
        }
        let float = slot.spec.layout.unit_scale();
        if !(scale.is_finite() && scale > 0.0) || (float && scale != 1.0) {
            return Err(self.fail(format!("tensor {name:?}: invalid scale {scale}")));
        }
        let pad = slot.offset - self.pos;
        self.write_zeros(pad)?;
        self.slots[self.next].scale = scale;
        self.open = Some((xxhash_rust::xxh3::Xxh3::new(), 0));
        Ok(())
    }

    /// Appends bytes to the tensor begun last.
    pub fn write_chunk(&mut self, data: &[u8]) -> Result<(), Error> {
        let Some((hasher, written)) = self.open.as_mut() else {
            return Err(self.fail("data written outside a tensor".into()));
        };
        hasher.update(data);
        *written += data.len() as u64;
        let slot = &self.slots[self.next];
        if *written > slot.byte_len {
            let (name, expected) = (slot.spec.name.clone(), slot.byte_len);
            return Err(self.fail(format!(
                "tensor {name:?} got more than the {expected} bytes its layout and shape need"
            )));
        }
        self.write_all(data)
    }

    /// Closes the tensor begun last; its byte count must be exact.
    pub fn end_tensor(&mut self) -> Result<(), Error> {
        let Some((hasher, written)) = self.open.take() else {
            return Err(self.fail("end_tensor without begin_tensor".into()));
        };
        let slot = &mut self.slots[self.next];
        if written != slot.byte_len {
            let (name, expected) = (slot.spec.name.clone(), slot.byte_len);
            return Err(self.fail(format!(
                "tensor {name:?} has {written} bytes, its layout and shape need {expected}"
            )));
        }
        slot.checksum = hasher.digest();
        self.next += 1;
        Ok(())
    }

    /// Writes the directory and header checksum, syncs, and renames the file into place.
    pub fn finish(self) -> Result<(), Error> {
        self.finish_with(None)
    }

    /// As [`Writer::finish`], replacing the metadata given to `create` by `metadata`, whose
    /// JSON must have exactly the same length (e.g. hashes computed while the tensors were
    /// written, replacing same-length placeholders).
    pub fn finish_with(mut self, metadata: Option<&Metadata>) -> Result<(), Error> {
        if let Some(m) = metadata {
            let json = serde_json::to_vec_pretty(m).map_err(|e| self.fail(e.to_string()))?;
            if json.len() != self.meta_len {
                return Err(self.fail("replacement metadata changed length".into()));
            }
            self.prefix[HEADER_LEN..HEADER_LEN + json.len()].copy_from_slice(&json);
            self.rewrite_meta = true;
        }
        if self.open.is_some() {
            return Err(self.fail("a tensor was begun but not ended".into()));
        }
        if let Some(slot) = self.slots.get(self.next) {
            let name = slot.spec.name.clone();
            return Err(self.fail(format!("tensor {name:?} was never written")));
        }
        let mut dir = Vec::new();
        dir.extend_from_slice(&(self.slots.len() as u32).to_le_bytes());
        dir.extend_from_slice(&0u32.to_le_bytes());
        for s in &self.slots {
            dir.extend_from_slice(&(s.spec.name.len() as u16).to_le_bytes());
            dir.extend_from_slice(s.spec.name.as_bytes());
            dir.extend_from_slice(&s.spec.layout.id().to_le_bytes());
            dir.push(s.spec.shape.len() as u8);
            for d in &s.spec.shape {
                dir.extend_from_slice(&d.to_le_bytes());
            }
            dir.extend_from_slice(&s.offset.to_le_bytes());
            dir.extend_from_slice(&s.byte_len.to_le_bytes());
            dir.extend_from_slice(&s.scale.to_le_bytes());
            dir.extend_from_slice(&s.checksum.to_le_bytes());
        }
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(&self.prefix);
        hasher.update(&dir);
        dir.extend_from_slice(&hasher.digest().to_le_bytes());

        let tmp = self.tmp_path.clone();
        let io = |source| Error::Io {
            path: tmp.clone(),
            source,
        };
        let out = self.out.take().expect("writer used after finish");
        let mut file = out.into_inner().map_err(io)?;
        if self.rewrite_meta {
            let meta = &self.prefix[HEADER_LEN..HEADER_LEN + self.meta_len];
            file.seek(SeekFrom::Start(HEADER_LEN as u64)).map_err(io)?;
            file.write_all(meta).map_err(io)?;
        }
        file.seek(SeekFrom::Start(self.dir_offset)).map_err(io)?;
        file.write_all(&dir).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        if self.replace {
            fs::rename(&self.tmp_path, &self.path).map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })?;
        } else {
            // link(2) fails if the target exists, atomically, where rename would replace it.
            match fs::hard_link(&self.tmp_path, &self.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(Error::Exists {
                        path: self.path.clone(),
                    }); // dropping self removes the temporary file
                }
                // A file system without hard links (FAT, some FUSE mounts): fall back to a
                // rename after a check, atomic except against a writer racing in between.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Unsupported | std::io::ErrorKind::PermissionDenied
                    ) && !self.path.exists() =>
                {
                    fs::rename(&self.tmp_path, &self.path).map_err(|source| Error::Io {
                        path: self.path.clone(),
                        source,
                    })?;
                }
                Err(source) => {
                    return Err(Error::Io {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
            let _ = fs::remove_file(&self.tmp_path);
        }
        // Make the rename durable too.
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(d) = File::open(parent) {
                let _ = d.sync_all();
            }
        }
        self.tmp_path = PathBuf::new(); // nothing left to clean up
        Ok(())
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let out = self.out.as_mut().expect("writer used after finish");
        out.write_all(bytes).map_err(|source| Error::Io {
            path: self.tmp_path.clone(),
            source,
        })?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn write_zeros(&mut self, mut n: u64) -> Result<(), Error> {
        const ZEROS: [u8; 4096] = [0; 4096];
        while n > 0 {
            let k = n.min(ZEROS.len() as u64);
            self.write_all(&ZEROS[..k as usize])?;
            n -= k;
        }
        Ok(())
    }

    fn fail(&self, problem: String) -> Error {
        Error::Write {
            path: self.path.clone(),
            problem,
        }
    }
}

/// The size of a huge page on x86-64 and (with 4 KiB base pages) aarch64.
const HUGE_PAGE: usize = 2 << 20;

/// Hands a file its bytes in whole [`HUGE_PAGE`] chunks at aligned offsets (the last one
/// excepted). On Linux file systems with large folios (ext4 since 6.16, xfs) the page cache
/// then holds each chunk as one 2 MiB folio, which the reader's mapping maps with one
/// huge-page entry: smaller writes leave 4 KiB pages behind, and every decode step walks
/// the page tables for each of them (measured: decode 17–38 % faster on 2 MiB pages,
/// docs/performance.md). tern's GGUF export writes through it too.
pub struct ChunkWriter<W: Write> {
    file: W,
    buf: Vec<u8>,
}

impl<W: Write> ChunkWriter<W> {
    pub fn new(file: W) -> ChunkWriter<W> {
        ChunkWriter {
            file,
            buf: Vec::with_capacity(HUGE_PAGE),
        }
    }

    pub fn write_all(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let k = (HUGE_PAGE - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..k]);
            bytes = &bytes[k..];
            if self.buf.len() == HUGE_PAGE {
                self.file.write_all(&self.buf)?;
                self.buf.clear();
            }
        }
        Ok(())
    }

    /// Writes what is buffered and returns the file.
    pub fn into_inner(mut self) -> std::io::Result<W> {
        self.file.write_all(&self.buf)?;
        Ok(self.file)
    }
}

/// How long a temporary file must have gone unmodified before it can be judged stale.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes `.NAME.PID[.N].tmp` files beside `path` whose writing process is gone (killed
/// before it could clean up) and that were not modified for [`STALE_AFTER`]. A PID is
/// judged alive when `/proc/PID` exists; where `/proc` is not mounted nothing is removed.
/// Returns the files removed.
fn remove_stale_temps(path: &Path) -> Vec<PathBuf> {
    let proc_fs = Path::new("/proc/self").exists();
    let (Some(name), Some(dir)) = (path.file_name().and_then(|n| n.to_str()), path.parent()) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{name}.");
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|rest| rest.strip_suffix(".tmp"))
            .and_then(|rest| rest.split('.').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        // A writer in another PID namespace (a container sharing the folder) looks dead
        // from here, but keeps its file's mtime fresh: leave recently written files alone.
        let idle = entry
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= STALE_AFTER);
        if proc_fs && !alive && idle {
            let stale = entry.path();
            if fs::remove_file(&stale).is_ok() {
                removed.push(stale);
            }
        }
    }
    removed
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.tmp_path.as_os_str().is_empty() {
            self.out = None;
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the length of every `write` call it is given.
    #[derive(Default)]
    struct Calls {
        bytes: Vec<u8>,
        lens: Vec<usize>,
    }

    impl Write for Calls {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.bytes.extend_from_slice(b);
            self.lens.push(b.len());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn chunk_writer_hands_on_whole_aligned_huge_pages() {
        // Pieces of awkward sizes, one larger than a chunk: the file must still receive
        // whole 2 MiB writes (so each starts at a multiple of 2 MiB) and then the rest.
        let pieces = [7usize, 4096, 3 * HUGE_PAGE + 5, 1, HUGE_PAGE - 13, 100];
        let mut w = ChunkWriter::new(Calls::default());
        let mut expect = Vec::new();
        for (i, &n) in pieces.iter().enumerate() {
            let piece: Vec<u8> = (0..n).map(|k| (k * 31 + i) as u8).collect();
            w.write_all(&piece).unwrap();
            expect.extend_from_slice(&piece);
        }
        let calls = w.into_inner().unwrap();
        assert_eq!(calls.bytes, expect);
        let (last, whole) = calls.lens.split_last().unwrap();
        assert!(whole.iter().all(|&n| n == HUGE_PAGE), "{:?}", calls.lens);
        assert_eq!(*last, expect.len() % HUGE_PAGE);
    }
}
