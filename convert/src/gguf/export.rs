//! `.tern` → GGUF, writing what the engines' own converters write: bitnet.cpp's I2_S files
//! (arch `bitnet-25`, its key set, F16 `token_embd`, F32 norms) and mainline llama.cpp's
//! TQ1_0/TQ2_0 files (arch `bitnet` or `llama`, its key set). One tensor at a time, float
//! tensors in row chunks, to a temporary file renamed into place at the end.

use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use serde::Serialize;
use tern_format::{
    expected_tensors, Activation, Architecture, ChunkWriter, Layout, TensorRole, TernFile,
};

use super::import::{gguf_name, permuted_row};
use super::reader::{encode_str, Value, DEFAULT_ALIGNMENT, MAGIC};
use super::tokenizer::{from_tokenizer_json, token_type::CONTROL};
use super::types::{encode_i2s, encode_tq1, encode_tq2, GgmlType, I2sLayout};
use crate::error::{ConvertError, Result};

/// The ternary type of an exported file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ExportType {
    /// bitnet.cpp's I2_S (type 36 in its fork).
    #[serde(rename = "i2_s")]
    I2s,
    /// llama.cpp's TQ2_0 (type 35).
    #[serde(rename = "tq2_0")]
    Tq2_0,
    /// llama.cpp's TQ1_0 (type 34).
    #[serde(rename = "tq1_0")]
    Tq1_0,
}

impl ExportType {
    pub fn parse(s: &str) -> Option<ExportType> {
        match s.to_ascii_lowercase().as_str() {
            "i2_s" | "i2s" => Some(ExportType::I2s),
            "tq2_0" | "tq2" => Some(ExportType::Tq2_0),
            "tq1_0" | "tq1" => Some(ExportType::Tq1_0),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        self.ggml().name()
    }

    fn ggml(self) -> GgmlType {
        match self {
            ExportType::I2s => GgmlType::I2_S,
            ExportType::Tq2_0 => GgmlType::TQ2_0,
            ExportType::Tq1_0 => GgmlType::TQ1_0,
        }
    }

    /// `general.file_type`: the fork's `LLAMA_FTYPE_MOSTLY_I2_S` = 40; mainline's
    /// `MOSTLY_TQ1_0` = 36, `MOSTLY_TQ2_0` = 37.
    fn file_type(self) -> u32 {
        match self {
            ExportType::I2s => 40,
            ExportType::Tq1_0 => 36,
            ExportType::Tq2_0 => 37,
        }
    }
}

/// Options of [`export`].
#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub ty: ExportType,
    /// Block layout of I2_S (x86 unless the file is for an ARM build of bitnet.cpp).
    pub i2s_layout: I2sLayout,
    /// Keep the embeddings and head in the `.tern` file's float type (F32/F16/BF16)
    /// instead of F16, which is what the engines' converters write (lossy for bf16 values
    /// below fp16's normal range).
    pub exact_embeddings: bool,
    pub force: bool,
}

/// What an export did.
#[derive(Clone, Debug, Serialize)]
pub struct ExportReport {
    pub output: PathBuf,
    pub architecture: String,
    pub ty: ExportType,
    pub tensors: usize,
    pub output_bytes: u64,
    pub seconds: f64,
    pub warnings: Vec<String>,
}

/// The GGUF architecture a model is exported as, for the engine that reads `ty`.
fn arch_name(
    c: &tern_format::ModelConfig,
    ty: ExportType,
    warnings: &mut Vec<String>,
) -> &'static str {
    match (c.architecture, c.activation, ty) {
        (Architecture::Llama, ..) => "llama",
        (Architecture::Bitnet, Activation::Relu2, ExportType::I2s) => "bitnet-25",
        (Architecture::Bitnet, Activation::Relu2, _) => {
            warnings.push(
                "relu² model written as llama.cpp's \"bitnet\" architecture (what its converter \
                 writes): llama.cpp's bitnet graph runs SiLU, so its outputs will not be this \
                 model's; bitnet.cpp (--type i2_s) runs it correctly"
                    .into(),
            );
            "bitnet"
        }
        (Architecture::Bitnet, Activation::Silu, _) => "bitnet",
    }
}

/// What an export reads: a `.tern` file, or a Hugging Face checkpoint read tensor by tensor
/// (one streaming step, no intermediate file).
pub enum ExportSource<'a> {
    Tern(&'a TernFile),
    Checkpoint(&'a crate::Prepared),
}

impl ExportSource<'_> {
    fn config(&self) -> &tern_format::ModelConfig {
        match self {
            ExportSource::Tern(f) => &f.metadata().config,
            ExportSource::Checkpoint(p) => &p.metadata.config,
        }
    }

    fn chat_template(&self) -> Option<&str> {
        match self {
            ExportSource::Tern(f) => f.metadata().chat_template.as_deref(),
            ExportSource::Checkpoint(p) => p.metadata.chat_template.as_deref(),
        }
    }

    fn tokenizer_json(&self) -> &[u8] {
        match self {
            ExportSource::Tern(f) => f.tokenizer_json(),
            ExportSource::Checkpoint(p) => {
                p.checkpoint.tokenizer_json.as_deref().unwrap_or_default()
            }
        }
    }

    fn path(&self) -> &Path {
        match self {
            ExportSource::Tern(f) => f.path(),
            ExportSource::Checkpoint(p) => &p.checkpoint.dir,
        }
    }

    fn error(&self, tensor: &str, problem: String) -> ConvertError {
        ConvertError::Tensor {
            path: self.path().to_path_buf(),
            tensor: tensor.to_string(),
            problem,
        }
    }

    /// The float layout a tensor is stored in.
    fn float_layout(&self, name: &str) -> Result<Layout> {
        let layout = match self {
            ExportSource::Tern(f) => f.tensor(name).and_then(|t| t.layout),
            ExportSource::Checkpoint(p) => p
                .plan
                .iter()
                .find(|x| x.name == name)
                .and_then(|x| p.checkpoint.get(x.origin.src()))
                .and_then(|t| match t.dtype {
                    safetensors::Dtype::F32 => Some(Layout::F32),
                    safetensors::Dtype::F16 => Some(Layout::F16),
                    safetensors::Dtype::BF16 => Some(Layout::Bf16),
                    _ => None,
                }),
        };
        layout.ok_or_else(|| self.error(name, "missing, or not a float tensor".into()))
    }

    /// A ternary weight as `.tern` TQ2 rows (docs/format.md §6.1; Hugging Face row order)
    /// and its scale.
    fn ternary(&self, name: &str, rows: usize, cols: usize) -> Result<(Vec<u8>, f32)> {
        let row_bytes = tern_format::tq2::row_bytes(cols as u64) as usize;
        match self {
            ExportSource::Tern(f) => {
                let t = f
                    .tensor(name)
                    .ok_or_else(|| self.error(name, "missing".into()))?;
                let layout = t
                    .layout
                    .filter(|l| l.is_ternary())
                    .ok_or_else(|| self.error(name, "not ternary".into()))?;
                let in_bytes = layout.ternary_row_bytes(cols as u64).expect("ternary") as usize;
                let mut tq2 = vec![0u8; rows * row_bytes];
                let mut trits = vec![0i8; cols];
                let rows_in = f.data(t).chunks_exact(in_bytes);
                for (r, (src, dst)) in rows_in.zip(tq2.chunks_exact_mut(row_bytes)).enumerate() {
                    let bad =
                        |c| self.error(name, format!("row {r}, column {c} holds an invalid code"));
                    if layout == Layout::Tq2 {
                        if let Some(c) = tern_format::tq2::find_invalid(src, cols) {
                            return Err(bad(c));
                        }
                        dst.copy_from_slice(src);
                    } else {
                        layout.unpack_ternary_row(src, &mut trits).map_err(bad)?;
                        tern_format::tq2::pack_row(&trits, dst);
                    }
                }
                Ok((tq2, t.scale))
            }
            ExportSource::Checkpoint(p) => {
                let ck = &p.checkpoint;
                let plan = p.plan.iter().find(|x| x.name == name).expect("planned");
                let crate::declared::Origin::Ternary { rule, .. } = &plan.origin else {
                    return Err(self.error(name, "not ternary".into()));
                };
                let src = ck.get(plan.origin.src()).expect("planned tensors exist");
                // Conversion reports the same warnings; the export only needs the weights.
                crate::decode_ternary(ck, rule, src, (rows, cols), &mut Vec::new())
            }
        }
    }

    /// Calls `f` with a float tensor's values, whole rows of `cols` at a time, a few MiB
    /// per call.
    fn float_rows(
        &self,
        name: &str,
        cols: usize,
        f: &mut dyn FnMut(&[f32]) -> Result<()>,
    ) -> Result<()> {
        const CHUNK: usize = 4 << 20;
        let layout = self.float_layout(name)?;
        let mut values = Vec::new();
        match self {
            ExportSource::Tern(file) => {
                let t = file.tensor(name).expect("float_layout found it");
                let row_in = match layout {
                    Layout::Q8Row => tern_format::q8row::row_stride(cols as u64) as usize,
                    Layout::F32 => cols * 4,
                    Layout::F16 | Layout::Bf16 => cols * 2,
                    other => return Err(self.error(name, format!("layout {other} is not a float"))),
                };
                let rows_per_chunk = (CHUNK / row_in.max(1)).max(1);
                for chunk in file.data(t).chunks(rows_per_chunk * row_in) {
                    values.clear();
                    for row in chunk.chunks_exact(row_in) {
                        let start = values.len();
                        values.resize(start + cols, 0.0);
                        let out = &mut values[start..];
                        match layout {
                            Layout::Q8Row => tern_format::q8row::dequantize_row(row, out),
                            _ => decode_floats(row, layout, out),
                        }
                    }
                    f(&values)?;
                }
            }
            ExportSource::Checkpoint(p) => {
                let ck = &p.checkpoint;
                let plan = p.plan.iter().find(|x| x.name == name).expect("planned");
                let src = ck.get(plan.origin.src()).expect("planned tensors exist");
                let size = src.dtype.size();
                let row_in = (cols * size) as u64;
                let chunk_len = (CHUNK as u64 / row_in.max(1)).max(1) * row_in;
                let mut bytes = Vec::new();
                let mut offset = 0;
                while offset < src.len {
                    let n = chunk_len.min(src.len - offset) as usize;
                    bytes.resize(n, 0);
                    ck.read_range(src, offset, &mut bytes)?;
                    values.resize(n / size, 0.0);
                    decode_floats(&bytes, layout, &mut values);
                    f(&values)?;
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }
}

fn decode_floats(bytes: &[u8], layout: Layout, out: &mut [f32]) {
    match layout {
        Layout::F32 => out
            .iter_mut()
            .zip(bytes.chunks_exact(4))
            .for_each(|(v, b)| *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        Layout::F16 => out
            .iter_mut()
            .zip(bytes.chunks_exact(2))
            .for_each(|(v, b)| *v = f16::from_le_bytes([b[0], b[1]]).to_f32()),
        // bf16 is the top half of an f32 (a plain shift vectorizes; `half`'s conversion
        // branches to quiet NaNs, and a NaN stays a NaN either way).
        _ => out
            .iter_mut()
            .zip(bytes.chunks_exact(2))
            .for_each(|(v, b)| {
                *v = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)
            }),
    }
}

struct Planned {
    name: String,
    gguf: String,
    ne: Vec<u64>,
    ty: GgmlType,
    role: TensorRole,
    offset: u64,
    byte_len: u64,
}

/// Writes the model `source` as the GGUF `output`.
pub fn export(
    source: &ExportSource,
    output: &Path,
    options: &ExportOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<ExportReport> {
    let start = std::time::Instant::now();
    if output.exists() && !options.force {
        return Err(ConvertError::OutputExists(output.to_path_buf()));
    }
    let c = source.config();
    let mut warnings = Vec::new();
    let arch = arch_name(c, options.ty, &mut warnings);
    let bitnet = arch != "llama";
    if bitnet != (c.attn_sub_norm && c.ffn_sub_norm) {
        return Err(ConvertError::Unsupported(format!(
            "{}: a model {} sub-norms has no GGUF architecture the engines run",
            source.path().display(),
            if bitnet { "without" } else { "with" }
        )));
    }
    if !c.dense_linears.is_empty() {
        return Err(ConvertError::Unsupported(format!(
            "{}: dense linears ({} kept float by modules_to_not_convert) are not exported to \
             GGUF (the engines' BitNet graphs treat every linear as ternary)",
            source.path().display(),
            c.dense_linears.join(", ")
        )));
    }
    if c.attention_bias || c.mlp_bias || c.rope_scaling.is_some() {
        return Err(ConvertError::Unsupported(format!(
            "{}: linear biases and RoPE scaling are not exported to GGUF (the engines' BitNet \
             graphs have neither)",
            source.path().display()
        )));
    }

    // Tensors: names, types, offsets.
    let mut plan = Vec::new();
    let mut offset = 0u64;
    for (name, shape, role) in expected_tensors(c) {
        let ty = match role {
            TensorRole::Ternary => options.ty.ggml(),
            TensorRole::Norm | TensorRole::Bias | TensorRole::DenseLinear => GgmlType::F32,
            TensorRole::Embedding => match source.float_layout(&name)? {
                Layout::Bf16 if options.exact_embeddings => GgmlType::BF16,
                Layout::F32 if options.exact_embeddings => GgmlType::F32,
                _ => GgmlType::F16,
            },
        };
        let ne: Vec<u64> = shape.iter().rev().copied().collect();
        let byte_len = ty
            .byte_len(&ne)
            .map_err(|p| source.error(&name, format!("cannot be {ty}: {p}")))?;
        if role == TensorRole::Ternary
            && options.ty == ExportType::I2s
            && !ne[0].is_multiple_of(128)
        {
            return Err(source.error(
                &name,
                format!(
                    "{} columns: bitnet.cpp's I2_S kernels need a multiple of 128",
                    ne[0]
                ),
            ));
        }
        plan.push(Planned {
            gguf: gguf_name(&name).expect("every expected tensor has a GGUF name"),
            name,
            ne,
            ty,
            role,
            offset,
            byte_len,
        });
        offset = (offset + byte_len).next_multiple_of(DEFAULT_ALIGNMENT);
    }

    // Header: metadata, then tensor infos.
    let kv = metadata(source, arch, options.ty)?;
    let mut header = Vec::new();
    header.extend_from_slice(&MAGIC);
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(plan.len() as u64).to_le_bytes());
    header.extend_from_slice(&(kv.len() as u64).to_le_bytes());
    for (k, v) in &kv {
        encode_str(k, &mut header);
        v.encode_typed(&mut header);
    }
    for p in &plan {
        encode_str(&p.gguf, &mut header);
        header.extend_from_slice(&(p.ne.len() as u32).to_le_bytes());
        for d in &p.ne {
            header.extend_from_slice(&d.to_le_bytes());
        }
        header.extend_from_slice(&p.ty.0.to_le_bytes());
        header.extend_from_slice(&p.offset.to_le_bytes());
    }
    header.resize(header.len().next_multiple_of(DEFAULT_ALIGNMENT as usize), 0);

    let tmp = temp_path(output);
    let io = |e| ConvertError::Io {
        path: tmp.clone(),
        source: e,
    };
    let mut out = TempFile { path: tmp.clone() };
    // Whole 2 MiB chunks, so the engines' mappings of the new file get 2 MiB pages.
    let mut file = ChunkWriter::new(File::create(&tmp).map_err(io)?);
    // Reading and converting overlap with writing: a writer thread takes the pieces in order
    // (two in flight, so memory stays a few tensors' worth).
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
    let produced = std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> std::io::Result<ChunkWriter<File>> {
            for piece in rx {
                file.write_all(&piece)?;
            }
            Ok(file)
        });
        let produced = write_tensors(source, &plan, arch, options, header, &tx, progress);
        drop(tx);
        let written = writer.join().expect("the writer thread does not panic");
        (produced, written)
    });
    let writer = match produced {
        (_, Err(e)) => return Err(io(e)),
        (Err(e), _) => return Err(e),
        (Ok(()), Ok(w)) => w,
    };
    let f = writer.into_inner().map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, output).map_err(crate::error::io(output))?;
    out.path = PathBuf::new();
    Ok(ExportReport {
        output: output.to_path_buf(),
        architecture: arch.to_string(),
        ty: options.ty,
        tensors: plan.len(),
        output_bytes: std::fs::metadata(output)
            .map_err(crate::error::io(output))?
            .len(),
        seconds: start.elapsed().as_secs_f64(),
        warnings,
    })
}

/// Sends the header and then every tensor's bytes, in file order, to the writer.
fn write_tensors(
    source: &ExportSource,
    plan: &[Planned],
    arch: &str,
    options: &ExportOptions,
    header: Vec<u8>,
    tx: &std::sync::mpsc::SyncSender<Vec<u8>>,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<()> {
    let send = |bytes: Vec<u8>| tx.send(bytes).map_err(|_| ConvertError::WriterStopped);
    send(header)?;
    let total: u64 = plan.iter().map(|p| p.byte_len).sum();
    let mut pos = 0u64;
    for p in plan {
        send(vec![0u8; (p.offset - pos) as usize])?;
        let (rows, cols) = (p.ne.get(1).copied().unwrap_or(1) as usize, p.ne[0] as usize);
        let mut written = 0u64;
        if p.role == TensorRole::Ternary {
            let (mut tq2, scale) = source.ternary(&p.name, rows, cols)?;
            if arch == "llama"
                && (p.name.ends_with("q_proj.weight") || p.name.ends_with("k_proj.weight"))
            {
                // llama.cpp's converter permutes Q/K rows for its interleaved RoPE.
                let hf = tq2.clone();
                let (hd, rb) = (source.config().head_dim as usize, tq2.len() / rows.max(1));
                for r in 0..rows {
                    let g = permuted_row(r, hd);
                    tq2[g * rb..(g + 1) * rb].copy_from_slice(&hf[r * rb..(r + 1) * rb]);
                }
            }
            let bytes =
                ternary_bytes(&tq2, cols, scale, options).map_err(|e| source.error(&p.name, e))?;
            written = bytes.len() as u64;
            send(bytes)?;
        } else {
            source.float_rows(&p.name, cols, &mut |values| {
                let mut bytes = Vec::with_capacity(values.len() * 4);
                float_bytes(values, p.ty, &mut bytes).map_err(|(i, v)| {
                    let e = written / (p.byte_len / p.ne.iter().product::<u64>()) + i as u64;
                    source.error(
                        &p.name,
                        format!("value {v:e} (element {e}) overflows F16 (use --exact-embeddings)"),
                    )
                })?;
                written += bytes.len() as u64;
                send(bytes)
            })?;
        }
        if written != p.byte_len {
            return Err(source.error(
                &p.name,
                format!("{written} bytes written, {} expected", p.byte_len),
            ));
        }
        pos = p.offset + written;
        progress(pos, total);
    }
    Ok(())
}

/// The metadata pairs of the engine that reads `ty`, in its converter's order.
fn metadata(source: &ExportSource, arch: &str, ty: ExportType) -> Result<Vec<(String, Value)>> {
    let c = source.config();
    let vocab =
        from_tokenizer_json(source.tokenizer_json(), c.vocab_size as usize).map_err(|p| {
            ConvertError::Source {
                path: source.path().to_path_buf(),
                problem: p,
            }
        })?;
    let u32v = |v: u64| Value::U32(v as u32);
    let key = |k: &str| format!("{arch}.{k}");
    let mut kv: Vec<(String, Value)> =
        vec![("general.architecture".into(), Value::Str(arch.into()))];
    let name = source
        .path()
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy().into_owned());
    let bitnet_cpp = ty == ExportType::I2s;
    if !bitnet_cpp {
        kv.push(("general.type".into(), Value::Str("model".into())));
    }
    kv.push(("general.name".into(), Value::Str(name)));
    if bitnet_cpp || arch == "llama" {
        kv.push((key("vocab_size"), u32v(c.vocab_size)));
    }
    kv.push((key("context_length"), u32v(c.max_position_embeddings)));
    kv.push((key("embedding_length"), u32v(c.hidden_size)));
    kv.push((key("block_count"), u32v(c.num_hidden_layers)));
    kv.push((key("feed_forward_length"), u32v(c.intermediate_size)));
    if bitnet_cpp || arch == "llama" {
        kv.push((key("rope.dimension_count"), u32v(c.head_dim)));
    }
    kv.push((key("attention.head_count"), u32v(c.num_attention_heads)));
    kv.push((key("attention.head_count_kv"), u32v(c.num_key_value_heads)));
    if c.head_dim * c.num_attention_heads != c.hidden_size {
        kv.push((key("attention.key_length"), u32v(c.head_dim)));
        kv.push((key("attention.value_length"), u32v(c.head_dim)));
    }
    kv.push((
        key("attention.layer_norm_rms_epsilon"),
        Value::F32(c.rms_norm_eps as f32),
    ));
    kv.push((key("rope.freq_base"), Value::F32(c.rope_theta as f32)));
    kv.push(("general.file_type".into(), Value::U32(ty.file_type())));
    kv.push(("tokenizer.ggml.model".into(), Value::Str("gpt2".into())));
    if !bitnet_cpp {
        kv.push(("tokenizer.ggml.pre".into(), Value::Str(vocab.pre.into())));
    }
    let strings = |v: Vec<String>| {
        use super::reader::value_type::STRING;
        Value::Array(STRING, v.into_iter().map(Value::Str).collect())
    };
    kv.push(("tokenizer.ggml.tokens".into(), strings(vocab.tokens)));
    if bitnet_cpp {
        // bitnet.cpp's converter scores control tokens -1000, the others 0.
        use super::reader::value_type::F32;
        let score = |&t: &i32| Value::F32(if t == CONTROL { -1000.0 } else { 0.0 });
        kv.push((
            "tokenizer.ggml.scores".into(),
            Value::Array(F32, vocab.types.iter().map(score).collect()),
        ));
    }
    {
        use super::reader::value_type::I32;
        kv.push((
            "tokenizer.ggml.token_type".into(),
            Value::Array(I32, vocab.types.into_iter().map(Value::I32).collect()),
        ));
    }
    kv.push(("tokenizer.ggml.merges".into(), strings(vocab.merges)));
    if let Some(bos) = c.bos_token_id {
        kv.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)));
    }
    if let Some(&eos) = c.eos_token_ids.first() {
        kv.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)));
    }
    kv.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(c.add_bos_token),
    ));
    if !bitnet_cpp {
        kv.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)));
    }
    if let Some(t) = source.chat_template() {
        kv.push(("tokenizer.chat_template".into(), Value::Str(t.to_string())));
    }
    kv.push(("general.quantization_version".into(), Value::U32(2)));
    Ok(kv)
}

/// Trits in the export type: I2_S with the f32 scale, TQ*_0 with its fp16 in every block.
///
/// `.tern` TQ2 (rows of 128-column blocks; byte j holds columns j + 32i in bits 2i+1..2i)
/// groups elements exactly as x86 I2_S and TQ2_0 do when rows are whole blocks: x86 I2_S is
/// TQ2 with the four 2-bit fields of every byte in reverse order, TQ2_0 is TQ2 with an fp16
/// `d` after every 64 bytes. Other cases go through trits.
fn ternary_bytes(
    tq2: &[u8],
    cols: usize,
    scale: f32,
    options: &ExportOptions,
) -> Result<Vec<u8>, String> {
    const REVERSED: [u8; 256] = {
        let mut t = [0u8; 256];
        let mut b = 0;
        while b < 256 {
            let v = b as u8;
            t[b] = (v >> 6) | ((v >> 2) & 0x0c) | ((v << 2) & 0x30) | (v << 6);
            b += 1;
        }
        t
    };
    let d = f16::from_f32(scale);
    if options.ty != ExportType::I2s && (!d.is_finite() || d.to_f32() <= 0.0) {
        return Err(format!("scale {scale:e} has no fp16 form"));
    }
    let whole_blocks = cols.is_multiple_of(tern_format::tq2::BLOCK_COLS);
    match options.ty {
        ExportType::I2s if whole_blocks && options.i2s_layout == I2sLayout::X86 => {
            let mut out: Vec<u8> = tq2.iter().map(|&b| REVERSED[b as usize]).collect();
            out.extend_from_slice(&scale.to_le_bytes());
            out.resize(out.len() + 28, 0);
            return Ok(out);
        }
        ExportType::Tq2_0 if whole_blocks => {
            let mut out = Vec::with_capacity(tq2.len() / 64 * 66);
            for qs in tq2.chunks_exact(64) {
                out.extend_from_slice(qs);
                out.extend_from_slice(&d.to_le_bytes());
            }
            return Ok(out);
        }
        _ => {}
    }
    let row_bytes = tern_format::tq2::row_bytes(cols as u64) as usize;
    let mut trits = vec![0i8; tq2.len() / row_bytes.max(1) * cols];
    for (src, dst) in tq2
        .chunks_exact(row_bytes)
        .zip(trits.chunks_exact_mut(cols))
    {
        tern_format::tq2::unpack_row(src, dst)
            .map_err(|c| format!("invalid code at column {c}"))?;
    }
    Ok(match options.ty {
        ExportType::I2s => encode_i2s(&trits, scale, options.i2s_layout),
        ExportType::Tq2_0 => encode_tq2(&trits, d),
        ExportType::Tq1_0 => encode_tq1(&trits, d),
    })
}

/// Appends `values` as `ty` (F32, F16 or BF16); Err: (index, value) of one F16 cannot hold.
fn float_bytes(values: &[f32], ty: GgmlType, out: &mut Vec<u8>) -> Result<(), (usize, f32)> {
    if ty == GgmlType::F16 {
        // The whole slice at once (F16C where the CPU has it, detected at run time).
        use half::slice::HalfFloatSliceExt;
        let mut halves = vec![f16::ZERO; values.len()];
        halves.convert_from_f32_slice(values);
        let mut pairs = halves.iter().zip(values);
        if let Some(i) = pairs.position(|(h, v)| h.is_infinite() && v.is_finite()) {
            return Err((i, values[i]));
        }
        out.reserve(halves.len() * 2);
        for h in halves {
            out.extend_from_slice(&h.to_le_bytes());
        }
        return Ok(());
    }
    for (i, &v) in values.iter().enumerate() {
        match ty {
            GgmlType::F32 => out.extend_from_slice(&v.to_le_bytes()),
            GgmlType::BF16 => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
            _ => {
                let h = f16::from_f32(v);
                if h.is_infinite() && v.is_finite() {
                    return Err((i, v));
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
    }
    Ok(())
}

/// Removes the temporary output unless the export completed (then `path` is emptied).
struct TempFile {
    path: PathBuf,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn temp_path(output: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(output.file_name().unwrap_or_default());
    name.push(format!(".{}.tmp", std::process::id()));
    output.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_is_little_endian_and_refuses_overflow() {
        let mut out = Vec::new();
        let values = [1.0, -2.5, 65504.0, f32::INFINITY, 1e-8];
        float_bytes(&values, GgmlType::F16, &mut out).unwrap();
        let expect: Vec<u8> = values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        assert_eq!(out, expect);
        assert_eq!(&out[..2], &[0x00, 0x3c]);
        // A finite value F16 cannot hold is named by its index, not written as infinity.
        let mut out = Vec::new();
        assert_eq!(
            float_bytes(&[1.0, 0.5, 70000.0], GgmlType::F16, &mut out),
            Err((2, 70000.0))
        );
    }

    #[test]
    fn bf16_decodes_exactly() {
        let values = [1.0f32, -3.140625, 0.0, -0.0, f32::INFINITY, 1e-40];
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect();
        let mut out = vec![0.0; values.len()];
        decode_floats(&bytes, Layout::Bf16, &mut out);
        for (v, o) in values.iter().zip(&out) {
            assert_eq!(bf16::from_f32(*v).to_f32().to_bits(), o.to_bits());
        }
        let mut nan = [0.0];
        decode_floats(&bf16::NAN.to_le_bytes(), Layout::Bf16, &mut nan);
        assert!(nan[0].is_nan());
    }
}
