//! tern-convert: Hugging Face BitNet b1.58 checkpoints to `.tern` files.
//!
//! The conversion streams: tensors are read one at a time with positioned reads (large
//! float tensors in chunks), transformed, and handed to the `.tern` writer, which writes
//! to a temporary file and renames it only when everything succeeded.
#![forbid(unsafe_code)]

pub mod compare;
pub mod declared;
mod error;
pub mod gguf;
pub mod hub;
pub mod source;
pub mod synth;
pub mod ternary;

use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use safetensors::Dtype;
use sha2::{Digest, Sha256};
use tern_format::{Layout, Metadata, Provenance, SourceFile, TensorRole, TensorSpec, Writer};

pub use declared::{Declared, Overrides};
pub use error::{ConvertError, Result};
pub use source::Checkpoint;

/// The converter's name and version, recorded in every file's provenance.
pub const CONVERTER: &str = concat!("tern-convert ", env!("CARGO_PKG_VERSION"));

/// How ternary weights are stored (`tern convert --layout`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TernaryFormat {
    /// TQ2, 2 bits per weight (docs/format.md §6.1): the fastest kernels.
    #[default]
    Tq2,
    /// TQ1, 1.6 bits per weight (§6.3): 20% fewer weight bytes to stream per token.
    Tq1,
}

impl TernaryFormat {
    pub fn layout(self) -> Layout {
        match self {
            TernaryFormat::Tq2 => Layout::Tq2,
            TernaryFormat::Tq1 => Layout::Tq1,
        }
    }
}

/// How the embeddings and output head are stored (`tern convert --head`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HeadFormat {
    /// The source's float values, bit for bit (F32, F16 or BF16).
    #[default]
    Exact,
    /// Q8_ROW (§6.4): int8 with one f32 scale per row, about half of bf16; lossy.
    Q8,
}

/// Options of [`convert`].
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Layout of the ternary weights.
    pub ternary: TernaryFormat,
    /// Layout of the embeddings and head.
    pub head: HeadFormat,
    /// Overrides of single axes of what the checkpoint declares.
    pub overrides: Overrides,
    /// Turn warnings (all −1 packed tensors, all-zero float tensors, assumed config
    /// defaults) into errors.
    pub strict: bool,
    /// Overwrite an existing output file.
    pub force: bool,
}

/// What a conversion did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub source: PathBuf,
    pub output: PathBuf,
    /// The model class and BitLinear class, e.g. "BitNetForCausalLM, autobitlinear offline".
    pub family: String,
    /// How each axis was decided and from what.
    pub decisions: Vec<tern_format::Decision>,
    pub tensors: usize,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub seconds: f64,
    pub warnings: Vec<String>,
}

/// A conversion plan: the opened source, what it declares and where each output tensor
/// comes from.
pub struct Prepared {
    pub checkpoint: Checkpoint,
    pub declared: Declared,
    pub metadata: Metadata,
    pub plan: Vec<declared::Planned>,
    pub warnings: Vec<String>,
}

/// Opens a checkpoint folder, decides every axis of what it declares (applying
/// `overrides`), normalizes its config and maps every output tensor to its source. Reads
/// no tensor data.
pub fn prepare(source: &Path, overrides: &Overrides) -> Result<Prepared> {
    let checkpoint = Checkpoint::open(source)?;
    let mut declared = Declared::read(&checkpoint, overrides)?;
    let plan = declared.plan(&checkpoint)?;
    declared.decisions.push(tern_format::Decision::new(
        "weight storage",
        &declared::storage_summary(&plan),
        "each linear's dtype and shape",
    ));
    let mut warnings = declared.warnings.clone();
    if checkpoint.tokenizer_json.is_none() {
        warnings.push(format!(
            "{}: no tokenizer.json: the file will not be able to tokenize text",
            source.display()
        ));
    }
    let metadata = Metadata {
        config: declared.config.clone(),
        chat_template: declared::chat_template(&checkpoint),
        provenance: Provenance {
            source_family: declared.describe(),
            scale_convention: declared.convention,
            source_files: Vec::new(),
            converter: CONVERTER.to_string(),
            decisions: declared.decisions.clone(),
        },
    };
    Ok(Prepared {
        checkpoint,
        declared,
        metadata,
        plan,
        warnings,
    })
}

/// Converts the checkpoint folder `source` to the `.tern` file `output`. `progress` is
/// called with (bytes of source tensors done, total).
pub fn convert(
    source: &Path,
    output: &Path,
    options: &Options,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Report> {
    let start = Instant::now();
    if output.exists() && !options.force {
        return Err(ConvertError::OutputExists(output.to_path_buf()));
    }
    let Prepared {
        checkpoint: ck,
        declared,
        mut metadata,
        plan,
        mut warnings,
    } = prepare(source, &options.overrides)?;

    let mut specs = Vec::with_capacity(plan.len());
    let mut total = 0u64;
    for p in &plan {
        let src = ck.get(p.origin.src()).expect("planned tensors exist");
        total += src.len;
        specs.push(TensorSpec {
            name: p.name.clone(),
            layout: output_layout(&ck, p, src, options)?,
            shape: p.shape.clone(),
        });
    }
    // The sha256 of the sources is computed while the tensors are converted: the metadata
    // is written with same-length placeholders and replaced at the end.
    metadata.provenance.source_files = ck
        .source_files()
        .iter()
        .map(|p| SourceFile {
            name: file_name(p),
            bytes: std::fs::metadata(p).map_or(0, |m| m.len()),
            sha256: "0".repeat(64),
        })
        .collect();
    refuse_input_as_output(&ck, output)?;
    let tokenizer = ck.tokenizer_json.as_deref().unwrap_or_default();
    let mut writer =
        Writer::create(output, &metadata, tokenizer, specs)?.replace_existing(options.force);
    for stale in writer.stale_removed() {
        warnings.push(format!(
            "removed {}, the temporary file of a conversion that did not finish",
            stale.display()
        ));
    }
    std::thread::scope(|scope| -> Result<()> {
        let hashes = scope.spawn(|| hash_files(&ck));
        convert_tensors(
            &ck,
            options,
            &plan,
            &mut writer,
            &mut warnings,
            total,
            progress,
        )?;
        metadata.provenance.source_files = hashes.join().expect("hashing does not panic")?;
        Ok(())
    })?;
    if options.strict && !warnings.is_empty() {
        return Err(ConvertError::Strict(warnings)); // dropping the writer removes its file
    }
    writer.finish_with(Some(&metadata)).map_err(|e| match e {
        tern_format::Error::Exists { path } => ConvertError::OutputExists(path),
        e => e.into(),
    })?;
    let output_bytes = std::fs::metadata(output).map_err(error::io(output))?.len();
    Ok(Report {
        source: source.to_path_buf(),
        output: output.to_path_buf(),
        family: declared.describe(),
        decisions: declared.decisions.clone(),
        tensors: plan.len(),
        input_bytes: total,
        output_bytes,
        seconds: start.elapsed().as_secs_f64(),
        warnings,
    })
}

/// Refuses an output path that is one of the checkpoint's own files (the same inode, also
/// through a symlink or another spelling of the path): `--force` must not replace a source.
fn refuse_input_as_output(ck: &Checkpoint, output: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(out) = std::fs::metadata(output) else {
        return Ok(()); // nothing there yet
    };
    for input in ck.source_files() {
        if let Ok(m) = std::fs::metadata(&input) {
            if (m.dev(), m.ino()) == (out.dev(), out.ino()) {
                return Err(ConvertError::Source {
                    path: output.to_path_buf(),
                    problem: format!(
                        "is the source file {}: refusing to write the output over an input",
                        input.display()
                    ),
                });
            }
        }
    }
    Ok(())
}

pub(crate) fn file_name(path: &Path) -> String {
    path.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

/// A piece of output on its way from the converting thread to the writing one.
enum Piece {
    Begin { name: String, scale: f32 },
    Data(Vec<u8>),
    End { source_bytes: u64 },
}

/// Converts and writes every planned tensor, in order. One thread reads and converts
/// (ternary transforms in parallel with rayon) while this one writes, so reading, the
/// transforms, checksumming and writing overlap; the channel bounds memory to a few
/// tensors.
fn convert_tensors(
    ck: &Checkpoint,
    options: &Options,
    plan: &[declared::Planned],
    writer: &mut Writer,
    warnings: &mut Vec<String>,
    total: u64,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<()> {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Piece>>(3);
        let producer = scope.spawn(move || {
            let mut warnings = Vec::new();
            for p in plan {
                let sent = produce(ck, options, p, &mut warnings, &tx);
                if let Err(e) = sent {
                    let _ = tx.send(Err(e));
                    break;
                }
            }
            warnings
        });
        let mut done = 0u64;
        progress(0, total);
        let written = rx.iter().try_for_each(|piece| -> Result<()> {
            match piece? {
                Piece::Begin { name, scale } => writer.begin_tensor(&name, scale)?,
                Piece::Data(bytes) => writer.write_chunk(&bytes)?,
                Piece::End { source_bytes } => {
                    writer.end_tensor()?;
                    done += source_bytes;
                    progress(done, total);
                }
            }
            Ok(())
        });
        drop(rx); // a writing error stops the producer at its next send
        warnings.extend(
            producer
                .join()
                .expect("the converting thread does not panic"),
        );
        written
    })
}

/// Reads and converts one tensor, sending its pieces. Sending fails only when the writer
/// has stopped, which then reports its own error.
fn produce(
    ck: &Checkpoint,
    options: &Options,
    p: &declared::Planned,
    warnings: &mut Vec<String>,
    tx: &std::sync::mpsc::SyncSender<Result<Piece>>,
) -> Result<()> {
    use declared::Origin;
    let send = |piece: Piece| tx.send(Ok(piece)).map_err(|_| ConvertError::WriterStopped);
    let src = ck.get(p.origin.src()).expect("planned tensors exist");
    let name = p.name.clone();
    let layout = options.ternary.layout();
    let (rows, cols) = (
        p.shape[0] as usize,
        p.shape.get(1).copied().unwrap_or(1) as usize,
    );
    // A one-element weight_scale, read as stored.
    let weight_scale = |scale_tensor: &str| -> Result<f32> {
        let t = ck.get(scale_tensor).expect("planned tensors exist");
        ternary::single_value(&ck.read(t)?, t.dtype).map_err(|e| ck.tensor_error(t, e))
    };
    match &p.origin {
        Origin::Float { .. }
            if p.role == TensorRole::Embedding && options.head == HeadFormat::Q8 =>
        {
            // Whole rows at a time (a row's scale needs all of it), about 16 MiB per read.
            let row_in = cols * src.dtype.size();
            let chunk_rows = ((16 << 20) / row_in.max(1)).max(1);
            send(Piece::Begin { name, scale: 1.0 })?;
            let mut r0 = 0;
            while r0 < rows {
                let n = chunk_rows.min(rows - r0);
                let mut bytes = vec![0u8; n * row_in];
                ck.read_range(src, (r0 * row_in) as u64, &mut bytes)?;
                let q = ternary::quantize_rows_q8(&bytes, src.dtype, cols).map_err(|i| {
                    ck.tensor_error(src, format!("element {} is NaN or infinite", r0 * cols + i))
                })?;
                send(Piece::Data(q))?;
                r0 += n;
            }
        }
        Origin::Float { .. } => {
            const CHUNK: u64 = 16 << 20;
            send(Piece::Begin { name, scale: 1.0 })?;
            let elem = src.dtype.size() as u64;
            let mut all_zero = true;
            let mut offset = 0;
            while offset < src.len {
                let n = CHUNK.min(src.len - offset) as usize;
                let mut chunk = vec![0u8; n];
                ck.read_range(src, offset, &mut chunk)?;
                let scan = ternary::scan_floats(&chunk, src.dtype);
                if let Some(i) = scan.non_finite {
                    return Err(ck.tensor_error(
                        src,
                        format!("element {} is NaN or infinite", offset / elem + i),
                    ));
                }
                all_zero &= scan.all_zero;
                send(Piece::Data(chunk))?;
                offset += n as u64;
            }
            if all_zero {
                warnings.push(format!("{}: tensor is all zero", src.name));
            }
        }
        Origin::Bias { scale_tensor, .. } => {
            let factor = scale_tensor.as_deref().map(weight_scale).transpose()?;
            let bias =
                ternary::to_f32(&ck.read(src)?, src.dtype).map_err(|e| ck.tensor_error(src, e))?;
            let bytes: Vec<u8> = bias
                .iter()
                .flat_map(|&b| (b * factor.unwrap_or(1.0)).to_le_bytes())
                .collect();
            send(Piece::Begin { name, scale: 1.0 })?;
            send(Piece::Data(bytes))?;
        }
        Origin::Ternary { rule, .. } => {
            let (tq, scale) = decode_ternary(ck, rule, src, (rows, cols), warnings)?;
            if let Some(w) = ternary::implausible_scale(scale) {
                warnings.push(format!("{}: {w}", src.name));
            }
            send(Piece::Begin { name, scale })?;
            send(Piece::Data(ternary::tq2_to(layout, tq, rows, cols)))?;
        }
    }
    send(Piece::End {
        source_bytes: src.len,
    })
}

/// A ternary source tensor `src` (`[rows, cols]`) decoded by its weight rule (packed
/// 2-bit codes with a separate scale, bf16/f32 masters, or floats already in {−s, 0, s}),
/// as TQ2 rows in Hugging Face row order and its scale (multiply convention). Suspicious but
/// legal values (an all-zero tensor) add to `warnings`. Shared by conversion and the GGUF
/// exporter.
pub(crate) fn decode_ternary(
    ck: &Checkpoint,
    rule: &declared::WeightRule,
    src: &source::SourceTensor,
    (rows, cols): (usize, usize),
    warnings: &mut Vec<String>,
) -> Result<(Vec<u8>, f32)> {
    use declared::WeightRule;
    // A one-element weight_scale, read as stored.
    let weight_scale = |scale_tensor: &str| -> Result<f32> {
        let t = ck.get(scale_tensor).expect("planned tensors exist");
        ternary::single_value(&ck.read(t)?, t.dtype).map_err(|e| ck.tensor_error(t, e))
    };
    match rule {
        WeightRule::Packed {
            scale_tensor,
            convention,
        } => {
            let scale_src = ck.get(scale_tensor).expect("planned tensors exist");
            let scale =
                ternary::normalized_scale(&ck.read(scale_src)?, scale_src.dtype, *convention)
                    .map_err(|e| ck.tensor_error(scale_src, e))?;
            let packed = ck.read(src)?;
            if packed.iter().all(|&b| b == 0) {
                warnings.push(format!(
                    "{}: packed tensor is all 0x00, i.e. every weight is −1 (a zeroed upload?)",
                    src.name
                ));
            }
            let tq = ternary::packed_to_tq2(&packed, rows, cols).map_err(|(r, c)| {
                ck.tensor_error(
                    src,
                    format!("invalid code 3 for output row {r}, column {c}"),
                )
            })?;
            Ok((tq, scale))
        }
        WeightRule::Masters => {
            let t = ternary::ternarize_masters(&ck.read(src)?, src.dtype, rows, cols)
                .map_err(|e| ck.tensor_error(src, e))?;
            if t.all_zero {
                warnings.push(format!("{}: master weights are all zero", src.name));
            }
            Ok((t.tq2, t.scale))
        }
        WeightRule::TernaryFloat { scale_tensor } => {
            let (tq, s) = ternary::ternary_floats(&ck.read(src)?, src.dtype, rows, cols)
                .map_err(|e| ck.tensor_error(src, e))?;
            let ws = scale_tensor.as_deref().map(weight_scale).transpose()?;
            let scale = s * ws.unwrap_or(1.0);
            if !(scale.is_finite() && scale > 0.0) {
                return Err(ck.tensor_error(src, format!("unusable scale {scale}")));
            }
            Ok((tq, scale))
        }
    }
}

/// The `.tern` layout of a planned tensor, after checking the source's dtype and shape
/// (ternary sources were checked when planned).
fn output_layout(
    ck: &Checkpoint,
    p: &declared::Planned,
    src: &source::SourceTensor,
    options: &Options,
) -> Result<Layout> {
    use declared::Origin;
    if !matches!(p.origin, Origin::Ternary { .. }) && src.shape != p.shape {
        return Err(ck.tensor_error(
            src,
            format!("shape {:?}, the config requires {:?}", src.shape, p.shape),
        ));
    }
    let float = matches!(src.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16);
    if !float && p.role == TensorRole::DenseLinear {
        return Err(ck.tensor_error(
            src,
            format!(
                "dtype {:?}: quantization_config.modules_to_not_convert keeps this linear \
                 float, so transformers loads it as a BF16, F16 or F32 weight",
                src.dtype
            ),
        ));
    }
    if !float && !matches!(p.origin, Origin::Ternary { .. }) {
        return Err(ck.tensor_error(
            src,
            format!("dtype {:?}, expected BF16, F16 or F32", src.dtype),
        ));
    }
    Ok(match &p.origin {
        Origin::Ternary { .. } => options.ternary.layout(),
        Origin::Bias { .. } => Layout::F32,
        Origin::Float { .. }
            if p.role == TensorRole::Embedding && options.head == HeadFormat::Q8 =>
        {
            Layout::Q8Row
        }
        Origin::Float { .. } => match src.dtype {
            Dtype::F32 => Layout::F32,
            Dtype::F16 => Layout::F16,
            _ => Layout::Bf16,
        },
    })
}

/// sha256 of every source file, in parallel.
fn hash_files(ck: &Checkpoint) -> Result<Vec<SourceFile>> {
    ck.source_files()
        .par_iter()
        .map(|path| {
            use std::io::Read;
            let mut f = std::fs::File::open(path).map_err(error::io(path))?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 4 << 20];
            let mut bytes = 0u64;
            loop {
                let n = f.read(&mut buf).map_err(error::io(path))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                bytes += n as u64;
            }
            Ok(SourceFile {
                name: file_name(path),
                bytes,
                sha256: format!("{:x}", hasher.finalize()),
            })
        })
        .collect()
}
