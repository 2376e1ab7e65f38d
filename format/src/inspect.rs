//! What a `.tern` file holds, as one report: built here so that `tern inspect` only prints
//! it (as text or JSON) and tests read the numbers rather than parse stdout.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::{Error, Layout, TernFile};

/// The file as a whole: header, metadata, a summary by kind of tensor, every tensor, and
/// the result of the integrity check when one was asked for.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub file: PathBuf,
    pub bytes: u64,
    /// `major.minor`.
    pub version: String,
    pub alignment: u32,
    /// The metadata JSON as stored, unknown keys included.
    pub metadata: serde_json::Value,
    pub tokenizer_bytes: u64,
    pub summary: Summary,
    pub tensors: Vec<TensorEntry>,
    /// Present only when the check was run.
    pub check: Option<Check>,
}

/// Tensor counts and sizes by kind.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub tensors: usize,
    /// The BitLinear weights (TQ2, TQ1).
    pub ternary: Group,
    /// Linears kept dense (`dense_linears`: float weights).
    pub dense_linears: Group,
    /// Embedding table and output head (floats or Q8_ROW).
    pub embeddings_and_head: Group,
    /// RMSNorm weights.
    pub norms: Group,
}

/// Tensors of one kind.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Group {
    pub tensors: usize,
    pub bytes: u64,
    pub values: u64,
    /// Storage per value, scales and padding included.
    pub bits_per_value: f64,
}

impl Group {
    fn add(&mut self, bytes: u64, values: u64) {
        self.tensors += 1;
        self.bytes += bytes;
        self.values += values;
        self.bits_per_value = self.bytes as f64 * 8.0 / self.values.max(1) as f64;
    }
}

/// One tensor of the directory.
#[derive(Clone, Debug, Serialize)]
pub struct TensorEntry {
    pub name: String,
    /// The layout's name, or `id N` for a layout of a newer minor version.
    pub layout: String,
    pub shape: Vec<u64>,
    pub offset: u64,
    pub bytes: u64,
    pub scale: f32,
    /// XXH3-64 as 16 hex digits.
    pub checksum: String,
}

/// The result of verifying every checksum and every ternary code.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub ok: bool,
    pub checksum_seconds: f64,
    pub checksum_gb_per_s: f64,
    pub damaged: Vec<Damaged>,
    /// The first invalid code or row scale, checked only when every checksum matched.
    pub invalid_trits: Option<String>,
}

/// A tensor whose bytes do not match their checksum.
#[derive(Clone, Debug, Serialize)]
pub struct Damaged {
    pub name: String,
    pub stored: String,
    pub computed: String,
}

impl Report {
    /// Describes `file`; with `check`, verifies every checksum (on `threads` threads) and,
    /// when they all match, every ternary code.
    pub fn new(file: &TernFile, check: bool, threads: usize) -> Result<Report, Error> {
        let parsed = file.parsed();
        let metadata = serde_json::from_str(&parsed.metadata_json).map_err(|e| Error::Invalid {
            path: file.path().to_path_buf(),
            problem: crate::Problem::MetadataJson(e.to_string()),
        })?;
        let mut summary = Summary {
            tensors: file.tensors().len(),
            ternary: Group::default(),
            dense_linears: Group::default(),
            embeddings_and_head: Group::default(),
            norms: Group::default(),
        };
        let config = &file.metadata().config;
        for t in file.tensors() {
            let module = t.name.strip_suffix(".weight").unwrap_or_default();
            let group = match t.layout {
                Some(l) if l.is_ternary() => &mut summary.ternary,
                _ if config.is_dense_linear(module) => &mut summary.dense_linears,
                _ if t.shape.len() == 2 => &mut summary.embeddings_and_head,
                _ => &mut summary.norms,
            };
            group.add(t.byte_len, t.elements());
        }
        let tensors = file
            .tensors()
            .iter()
            .map(|t| TensorEntry {
                name: t.name.clone(),
                layout: t
                    .layout
                    .map_or(format!("id {}", t.layout_id), |l| Layout::name(l).into()),
                shape: t.shape.clone(),
                offset: t.offset,
                bytes: t.byte_len,
                scale: t.scale,
                checksum: format!("{:016x}", t.checksum),
            })
            .collect();
        Ok(Report {
            file: file.path().to_path_buf(),
            bytes: file.len(),
            version: format!("{}.{}", parsed.major, parsed.minor),
            alignment: parsed.alignment,
            metadata,
            tokenizer_bytes: file.tokenizer_json().len() as u64,
            summary,
            tensors,
            check: check.then(|| Check::run(file, threads)),
        })
    }

    /// Whether the file passed the check (true when none was run).
    pub fn ok(&self) -> bool {
        self.check.as_ref().is_none_or(|c| c.ok)
    }
}

impl Check {
    fn run(file: &TernFile, threads: usize) -> Check {
        let start = Instant::now();
        let damaged = file.verify_checksums(threads);
        let seconds = start.elapsed().as_secs_f64();
        // Decoding codes of a tensor whose bytes are damaged would only repeat the news.
        // Floats are data too: NaN or Inf in an embedding, norm or head is damage.
        let invalid_trits = if damaged.is_empty() {
            file.verify_trits()
                .and_then(|()| file.verify_floats())
                .err()
                .map(|e| e.to_string())
        } else {
            None
        };
        Check {
            ok: damaged.is_empty() && invalid_trits.is_none(),
            checksum_seconds: seconds,
            checksum_gb_per_s: file.len() as f64 / seconds.max(1e-9) / 1e9,
            damaged: damaged
                .into_iter()
                .map(|m| Damaged {
                    name: m.name,
                    stored: format!("{:016x}", m.stored),
                    computed: format!("{:016x}", m.computed),
                })
                .collect(),
            invalid_trits,
        }
    }
}
