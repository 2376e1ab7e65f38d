//! GGUF → `.tern`: the config from the architecture's keys, the tensors by their GGUF names,
//! ternary data decoded to trits and one per-tensor scale, other tensors as floats, the
//! tokenizer rebuilt as a `tokenizer.json`.

use std::path::Path;

use tern_format::{
    expected_tensors, Activation, Architecture, Layout, Metadata, ModelConfig, Provenance,
    RopeStyle, ScaleConvention, SourceFile, TensorRole, TensorSpec, Writer,
};

use super::reader::{GgufFile, TensorInfo, Value};
use super::types::{self, GgmlType, I2sLayout};
use crate::error::{ConvertError, Result};
use crate::{Report, TernaryFormat};

/// Options of [`import`].
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Layout of the ternary weights in the `.tern` file.
    pub ternary: TernaryFormat,
    /// Block layout of I2_S tensors (nothing in the file says which build wrote them).
    pub i2s_layout: I2sLayout,
    /// The FFN activation, instead of the one the architecture's engine graph runs.
    pub activation: Option<Activation>,
    /// Turn warnings (assumed defaults, assumed pre-tokenizer) into errors.
    pub strict: bool,
    pub force: bool,
}

/// The GGUF architectures tern imports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// bitnet.cpp's BitNet 2B-4T graph: relu², sub-norms, NeoX RoPE.
    Bitnet25,
    /// The renamed `bitnet-25` of Microsoft's re-uploaded 2B-4T GGUF.
    BitnetB158,
    /// llama.cpp's `bitnet` graph (1bitLLM): sub-norms, NeoX RoPE, SiLU-gated FFN.
    Bitnet,
    /// `llama`: no sub-norms, SiLU, Q/K rows permuted for interleaved RoPE.
    Llama,
}

impl Arch {
    pub fn parse(s: &str) -> Option<Arch> {
        Some(match s {
            "bitnet-25" => Arch::Bitnet25,
            "bitnet-b1.58" => Arch::BitnetB158,
            "bitnet" => Arch::Bitnet,
            "llama" => Arch::Llama,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Bitnet25 => "bitnet-25",
            Arch::BitnetB158 => "bitnet-b1.58",
            Arch::Bitnet => "bitnet",
            Arch::Llama => "llama",
        }
    }

    /// The activation the engine's graph for this architecture runs.
    pub fn activation(self) -> Activation {
        match self {
            Arch::Bitnet25 | Arch::BitnetB158 => Activation::Relu2,
            Arch::Bitnet | Arch::Llama => Activation::Silu,
        }
    }
}

/// The GGUF name of a `.tern` (Hugging Face) tensor name.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let part = match part {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "self_attn.attn_sub_norm.weight" => "attn_sub_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        "mlp.ffn_sub_norm.weight" => "ffn_sub_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}.weight"))
}

/// Which rows of a llama.cpp-permuted Q or K weight hold Hugging Face row `r`: llama.cpp's
/// converter reorders each head's rows from rotate-half pairs (j, j + d/2) to adjacent
/// pairs (2j, 2j + 1).
pub fn permuted_row(r: usize, head_dim: usize) -> usize {
    let (head, within) = (r / head_dim, r % head_dim);
    let half = head_dim / 2;
    let (i, j) = (within / half, within % half);
    head * head_dim + 2 * j + i
}

/// An opened GGUF model: file, architecture, config and warnings.
pub struct GgufModel {
    pub file: GgufFile,
    pub arch: Arch,
    pub config: ModelConfig,
    pub warnings: Vec<String>,
}

impl GgufModel {
    pub fn open(path: &Path, activation: Option<Activation>) -> Result<GgufModel> {
        let file = GgufFile::open(path)?;
        let arch_name = file
            .header
            .get("general.architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| file.error("general.architecture is missing"))?;
        let arch = Arch::parse(arch_name).ok_or_else(|| {
            file.error(format!(
                "architecture {arch_name:?} is not a ternary model tern imports \
                 (bitnet-25, bitnet-b1.58, bitnet, llama)"
            ))
        })?;
        let mut warnings = Vec::new();
        let config =
            model_config(&file, arch, activation, &mut warnings).map_err(|p| file.error(p))?;
        Ok(GgufModel {
            file,
            arch,
            config,
            warnings,
        })
    }

    /// The GGUF tensor for a `.tern` tensor name.
    pub fn tensor(&self, hf: &str) -> Result<&TensorInfo> {
        gguf_name(hf)
            .and_then(|g| self.file.header.tensor(&g))
            .ok_or_else(|| {
                self.file.error(format!(
                    "tensor {} (for {hf}) is missing",
                    gguf_name(hf).unwrap_or_default()
                ))
            })
    }

    /// Decodes a ternary weight (`shape` = Hugging Face `[out, in]`) into trits in Hugging
    /// Face row order and its per-tensor scale.
    pub fn ternary(&self, hf: &str, shape: &[u64], i2s: I2sLayout) -> Result<(Vec<i8>, f32)> {
        let (trits, scales) = self.ternary_blocks(hf, shape, i2s)?;
        let t = self.tensor(hf)?;
        let scale = tensor_scale(&trits, &scales).map_err(|p| self.file.tensor_error(t, p))?;
        Ok((trits, scale))
    }

    /// As [`GgufModel::ternary`], with the scales as stored (one, or one per 256-element
    /// block, row-major after the rows are put back in Hugging Face order).
    pub fn ternary_blocks(
        &self,
        hf: &str,
        shape: &[u64],
        i2s: I2sLayout,
    ) -> Result<(Vec<i8>, Vec<f32>)> {
        let t = self.tensor(hf)?;
        let err = |p: String| self.file.tensor_error(t, p);
        let (rows, cols) = (shape[0] as usize, shape[1] as usize);
        if t.ne != [cols as u64, rows as u64] {
            return Err(err(format!(
                "ne {:?}, the config requires [{cols}, {rows}]",
                t.ne
            )));
        }
        let data = self.file.read(t)?;
        let n = rows * cols;
        let (trits, scales) = match t.ggml_type {
            GgmlType::I2_S => {
                let d = types::decode_i2s(&data, n, i2s).map_err(err)?;
                (d.trits, d.scales)
            }
            GgmlType::TQ2_0 => {
                let d = types::decode_tq2(&data).map_err(err)?;
                (d.trits, d.scales)
            }
            GgmlType::TQ1_0 => {
                let d = types::decode_tq1(&data);
                (d.trits, d.scales)
            }
            ty @ (GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) => {
                let v = types::dequantize(ty, &data).expect("float type");
                let (trits, s) = ternary_from_floats(&v).map_err(err)?;
                (trits, vec![s])
            }
            other => {
                return Err(err(format!(
                    "type {other} for a ternary weight: tern imports I2_S, TQ1_0, TQ2_0 \
                     and ternary-valued F32/F16/BF16"
                )))
            }
        };
        let qk = self.arch == Arch::Llama
            && (hf.ends_with("q_proj.weight") || hf.ends_with("k_proj.weight"));
        if !qk {
            return Ok((trits, scales));
        }
        // Undo llama.cpp's Q/K permutation, rows and their block scales alike.
        let hd = self.config.head_dim as usize;
        let per_row = scales.len() / rows.max(1);
        let mut out = vec![0i8; n];
        let mut out_scales = if per_row > 0 {
            vec![0f32; scales.len()]
        } else {
            scales.clone()
        };
        for r in 0..rows {
            let g = permuted_row(r, hd);
            out[r * cols..(r + 1) * cols].copy_from_slice(&trits[g * cols..(g + 1) * cols]);
            if per_row > 0 {
                out_scales[r * per_row..(r + 1) * per_row]
                    .copy_from_slice(&scales[g * per_row..(g + 1) * per_row]);
            }
        }
        Ok((out, out_scales))
    }
}

/// The per-tensor scale of block-scaled trits: blocks whose trits are all zero say nothing;
/// every other block must carry the same positive, finite scale, since a `.tern` tensor has
/// one scale and anything else would change the weights.
pub fn tensor_scale(trits: &[i8], scales: &[f32]) -> Result<f32, String> {
    let per = trits.len() / scales.len().max(1);
    let mut found: Option<(usize, f32)> = None;
    for (b, &s) in scales.iter().enumerate() {
        if scales.len() > 1 && trits[b * per..(b + 1) * per].iter().all(|&t| t == 0) {
            continue;
        }
        if !(s.is_finite() && s > 0.0) {
            return Err(format!("block {b} has scale {s}, not positive and finite"));
        }
        match found {
            None => found = Some((b, s)),
            Some((b0, s0)) if s0 != s => {
                return Err(format!(
                    "block scales differ (block {b0}: {s0:e}, block {b}: {s:e}); a .tern \
                     tensor has one scale, so tern refuses rather than change weights"
                ))
            }
            _ => {}
        }
    }
    Ok(found.map_or(1.0, |(_, s)| s))
}

/// Trits and scale of float values that are all 0 or ±s for one s > 0.
fn ternary_from_floats(v: &[f32]) -> Result<(Vec<i8>, f32), String> {
    let s = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    if !s.is_finite() {
        return Err("holds a NaN or infinite value".into());
    }
    let trits = v
        .iter()
        .enumerate()
        .map(|(i, &x)| match x {
            _ if x == 0.0 => Ok(0),
            _ if x == s => Ok(1),
            _ if x == -s => Ok(-1),
            _ => Err(format!(
                "element {i} is {x:e}, not 0 or ±{s:e}: the values are not ternary"
            )),
        })
        .collect::<Result<Vec<i8>, String>>()?;
    Ok((trits, if s > 0.0 { s } else { 1.0 }))
}

fn arch_key<'a>(file: &'a GgufFile, arch: Arch, key: &str) -> Option<&'a Value> {
    file.header.get(&format!("{}.{key}", arch.name()))
}

/// The normalized config of a GGUF model (one function, so that new `ModelConfig` fields
/// are added in one place).
pub fn model_config(
    file: &GgufFile,
    arch: Arch,
    activation: Option<Activation>,
    warnings: &mut Vec<String>,
) -> Result<ModelConfig, String> {
    let h = &file.header;
    let u = |key: &str| arch_key(file, arch, key).and_then(Value::as_u64);
    let req = |key: &str| {
        u(key).ok_or(format!(
            "{}.{key} is missing or not an integer",
            arch.name()
        ))
    };
    let f = |key: &str| arch_key(file, arch, key).and_then(Value::as_f64);
    let hidden_size = req("embedding_length")?;
    let heads = req("attention.head_count")?;
    let kv_heads = u("attention.head_count_kv").unwrap_or(heads);
    let head_dim = match u("attention.key_length").or_else(|| u("rope.dimension_count")) {
        Some(d) => d,
        None if heads > 0 => hidden_size / heads,
        None => return Err("attention.head_count is 0".into()),
    };
    let tokens = h.get("tokenizer.ggml.tokens").and_then(Value::as_array);
    let embd = h
        .tensor("token_embd.weight")
        .ok_or("token_embd.weight is missing")?;
    let vocab_size = u("vocab_size")
        .or(embd.ne.get(1).copied())
        .or(tokens.map(|t| t.len() as u64))
        .ok_or("no vocabulary size")?;
    let max_position_embeddings = u("context_length").unwrap_or_else(|| {
        warnings.push("no context_length: assuming 2048".into());
        2048
    });
    let rms_norm_eps = f("attention.layer_norm_rms_epsilon").unwrap_or_else(|| {
        warnings.push("no attention.layer_norm_rms_epsilon: assuming 1e-5".into());
        1e-5
    });
    let rope_theta = f("rope.freq_base").unwrap_or_else(|| {
        warnings.push("no rope.freq_base: assuming 10000".into());
        10000.0
    });
    let scaling = arch_key(file, arch, "rope.scaling.type").and_then(Value::as_str);
    let factor = f("rope.scaling.factor").unwrap_or(1.0);
    let no_scaling =
        matches!(scaling, None | Some("none")) || (scaling == Some("linear") && factor == 1.0);
    if !no_scaling {
        return Err(format!(
            "RoPE scaling {scaling:?} with factor {factor} is not supported yet"
        ));
    }
    let activation = activation.unwrap_or_else(|| {
        if arch == Arch::Bitnet {
            warnings.push(
                "architecture \"bitnet\": importing with SiLU, as llama.cpp's bitnet graph runs \
                 it; a 2B-4T model converted by llama.cpp needs --activation relu2"
                    .into(),
            );
        }
        arch.activation()
    });
    let has = |name: &str| h.tensor(name).is_some();
    let token_id = |key: &str| {
        h.get(key)
            .and_then(Value::as_u64)
            .and_then(|id| u32::try_from(id).ok())
            .filter(|&id| u64::from(id) < vocab_size)
    };
    let bos_token_id = token_id("tokenizer.ggml.bos_token_id");
    let mut eos_token_ids: Vec<u32> = ["eos", "eot", "eom"]
        .iter()
        .filter_map(|k| token_id(&format!("tokenizer.ggml.{k}_token_id")))
        .collect();
    const END_OF_TURN: [&str; 4] = [
        "<|eot_id|>",
        "<|im_end|>",
        "<|end_of_turn|>",
        "<|endoftext|>",
    ];
    for (id, t) in tokens.into_iter().flatten().enumerate() {
        if t.as_str().is_some_and(|t| END_OF_TURN.contains(&t)) && (id as u64) < vocab_size {
            eos_token_ids.push(id as u32);
        }
    }
    eos_token_ids.sort_unstable();
    eos_token_ids.dedup();
    let config = ModelConfig {
        architecture: if arch == Arch::Llama {
            Architecture::Llama
        } else {
            Architecture::Bitnet
        },
        hidden_size,
        num_hidden_layers: req("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        intermediate_size: req("feed_forward_length")?,
        vocab_size,
        max_position_embeddings,
        rms_norm_eps,
        rope_theta,
        rope_style: RopeStyle::RotateHalf,
        rope_scaling: None,
        activation,
        attention_bias: false,
        mlp_bias: false,
        attn_sub_norm: has("blk.0.attn_sub_norm.weight"),
        ffn_sub_norm: has("blk.0.ffn_sub_norm.weight"),
        tie_word_embeddings: !has("output.weight"),
        bos_token_id,
        eos_token_ids,
        add_bos_token: h
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(bos_token_id.is_some()),
        dense_linears: Vec::new(),
    };
    config.validate()?;
    Ok(config)
}

/// Converts a GGUF file to a `.tern` file.
pub fn import(
    source: &Path,
    output: &Path,
    options: &ImportOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Report> {
    let start = std::time::Instant::now();
    if output.exists() && !options.force {
        return Err(ConvertError::OutputExists(output.to_path_buf()));
    }
    let model = GgufModel::open(source, options.activation)?;
    let mut warnings = model.warnings.clone();
    let h = &model.file.header;
    let tokenizer =
        super::tokenizer::to_tokenizer_json(h, model.config.add_bos_token, &mut warnings)
            .map_err(|p| model.file.error(p))?;
    if options.strict && !warnings.is_empty() {
        return Err(ConvertError::Strict(warnings));
    }
    let expected = expected_tensors(&model.config);
    let known: std::collections::HashSet<String> =
        expected.iter().filter_map(|(n, ..)| gguf_name(n)).collect();
    let unexpected: Vec<&str> = h
        .tensors
        .iter()
        .map(|t| t.name.as_str())
        .filter(|n| !known.contains(*n) && *n != "rope_freqs.weight")
        .collect();
    if !unexpected.is_empty() {
        return Err(model.file.error(format!(
            "tensors tern does not know how to place: {}",
            unexpected.join(", ")
        )));
    }
    let mut specs = Vec::with_capacity(expected.len());
    for (name, shape, role) in &expected {
        let t = model.tensor(name)?;
        let layout = match role {
            TensorRole::Ternary => options.ternary.layout(),
            _ => match t.ggml_type {
                GgmlType::F16 => Layout::F16,
                GgmlType::BF16 => Layout::Bf16,
                _ => Layout::F32,
            },
        };
        specs.push(TensorSpec {
            name: name.clone(),
            layout,
            shape: shape.clone(),
        });
    }
    let bytes = std::fs::metadata(source)
        .map_err(crate::error::io(source))?
        .len();
    let metadata = Metadata {
        config: model.config.clone(),
        chat_template: h
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_string),
        provenance: Provenance {
            source_family: format!("gguf-{}", model.arch.name()),
            scale_convention: ScaleConvention::Multiply,
            source_files: vec![SourceFile {
                name: crate::file_name(source),
                bytes,
                sha256: sha256_file(source)?,
            }],
            converter: crate::CONVERTER.to_string(),
            decisions: Vec::new(),
        },
    };
    let mut writer = Writer::create(output, &metadata, &tokenizer, specs.clone())?;
    let total: u64 = h.tensors.iter().map(|t| t.byte_len).sum();
    let mut done = 0;
    for (spec, (name, shape, role)) in specs.iter().zip(&expected) {
        let t = model.tensor(name)?;
        if *role == TensorRole::Ternary {
            let (trits, scale) = model.ternary(name, shape, options.i2s_layout)?;
            let cols = shape[1] as usize;
            let row_bytes = spec.layout.ternary_row_bytes(cols as u64).expect("ternary") as usize;
            let mut packed = vec![0u8; trits.len() / cols.max(1) * row_bytes];
            for (src, dst) in trits
                .chunks_exact(cols)
                .zip(packed.chunks_exact_mut(row_bytes))
            {
                spec.layout.pack_ternary_row(src, dst);
            }
            writer.write_tensor(name, scale, &packed)?;
        } else {
            // Whole rows, about 4 MiB at a time: F16/BF16 bytes copied as stored, other
            // types dequantized to F32.
            let ne: Vec<u64> = shape.iter().rev().copied().collect();
            if t.ne != ne {
                return Err(model
                    .file
                    .tensor_error(t, format!("ne {:?}, the config requires {ne:?}", t.ne)));
            }
            let row = t.byte_len / ne[1..].iter().product::<u64>().max(1);
            let chunk = ((4 << 20) / row.max(1)).max(1) * row;
            writer.begin_tensor(name, 1.0)?;
            let mut offset = 0;
            while offset < t.byte_len {
                let n = chunk.min(t.byte_len - offset);
                let bytes = model.file.read_range(t, offset, n)?;
                let values = types::dequantize(t.ggml_type, &bytes).ok_or_else(|| {
                    model.file.tensor_error(
                        t,
                        format!(
                            "type {}: tern reads F32, F16, BF16, Q8_0 and Q6_K here",
                            t.ggml_type
                        ),
                    )
                })?;
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    let e = offset / row * ne[0] + i as u64;
                    return Err(model
                        .file
                        .tensor_error(t, format!("element {e} is NaN or infinite")));
                }
                match spec.layout {
                    Layout::F16 | Layout::Bf16 => writer.write_chunk(&bytes)?,
                    _ => writer.write_chunk(
                        &values
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect::<Vec<u8>>(),
                    )?,
                }
                offset += n;
            }
            writer.end_tensor()?;
        }
        done += t.byte_len;
        progress(done, total);
    }
    writer.finish()?;
    let output_bytes = std::fs::metadata(output)
        .map_err(crate::error::io(output))?
        .len();
    Ok(Report {
        source: source.to_path_buf(),
        output: output.to_path_buf(),
        family: format!("GGUF ({})", model.arch.name()),
        decisions: Vec::new(),
        tensors: expected.len(),
        input_bytes: bytes,
        output_bytes,
        seconds: start.elapsed().as_secs_f64(),
        warnings,
    })
}

fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(crate::error::io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf).map_err(crate::error::io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ternary_valued_floats_import_and_others_are_refused() {
        let s = 0.015_9f32;
        let (t, scale) = ternary_from_floats(&[s, 0.0, -s, -0.0, s]).unwrap();
        assert_eq!((t, scale), (vec![1, 0, -1, 0, 1], s));
        let err = ternary_from_floats(&[s, 0.0, -s, s / 2.0]).unwrap_err();
        assert!(err.contains("element 3"), "{err}");
        assert!(ternary_from_floats(&[f32::NAN, 1.0]).is_err());
    }

    #[test]
    fn block_scales_must_agree_except_in_empty_blocks() {
        let mut trits = vec![1i8; 768];
        trits[256..512].fill(0);
        assert_eq!(tensor_scale(&trits, &[0.5, 0.0, 0.5]), Ok(0.5));
        let err = tensor_scale(&trits, &[0.5, 0.0, 0.25]).unwrap_err();
        assert!(err.contains("block 2"), "{err}");
        assert!(tensor_scale(&trits, &[-0.5, 0.0, -0.5]).is_err());
    }

    #[test]
    fn llama_permutation_is_llama_cpp_s() {
        // llama.cpp: w.reshape(heads, 2, d/2, ...).swapaxes(1, 2): GGUF row (h, j, i) holds
        // Hugging Face row (h, i, j).
        let (heads, d) = (3, 8);
        let mut seen = vec![false; heads * d];
        for h in 0..heads {
            for i in 0..2 {
                for j in 0..d / 2 {
                    let g = permuted_row(h * d + i * d / 2 + j, d);
                    assert_eq!(g, h * d + j * 2 + i);
                    seen[g] = true;
                }
            }
        }
        assert!(seen.iter().all(|&s| s));
    }
}
