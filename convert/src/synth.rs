//! Random models of real shapes, for benchmarks: written directly as `.tern`, or as a
//! Hugging Face checkpoint (packed or bf16 masters) to benchmark the converter. Not for
//! quality: the weights are noise.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use half::bf16;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use serde_json::json;
use tern_format::{
    expected_tensors, Activation, Architecture, Layout, Metadata, ModelConfig, Provenance,
    ScaleConvention, TensorRole, TensorSpec, Writer,
};

use crate::error::{io, ConvertError, Result};

/// Model shapes people run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// A few MB, for quick runs.
    Tiny,
    /// microsoft/bitnet-b1.58-2B-4T.
    Bitnet2b4t,
    /// HF1BitLLM/Llama3-8B-1.58-100B-tokens.
    Llama3_8b,
    /// tiiuae/Falcon3-1B-Instruct-1.58bit.
    Falcon3_1b,
}

impl Preset {
    pub const ALL: [Preset; 4] = [
        Preset::Tiny,
        Preset::Bitnet2b4t,
        Preset::Llama3_8b,
        Preset::Falcon3_1b,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Bitnet2b4t => "2b4t",
            Preset::Llama3_8b => "llama3-8b-1.58",
            Preset::Falcon3_1b => "falcon3-1b-1.58",
        }
    }

    pub fn parse(s: &str) -> Option<Preset> {
        Preset::ALL.into_iter().find(|p| p.name() == s)
    }

    pub fn config(self) -> ModelConfig {
        let bitnet = |hidden, layers, heads, kv, inter, vocab: u64| ModelConfig {
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: hidden / heads,
            intermediate_size: inter,
            vocab_size: vocab,
            bos_token_id: Some((vocab - 2) as u32),
            eos_token_ids: vec![(vocab - 1) as u32],
            add_bos_token: true,
            ..ModelConfig::bitnet_b158()
        };
        let llama = |hidden, layers, heads, kv, head_dim, inter, vocab, theta| ModelConfig {
            architecture: Architecture::Llama,
            head_dim,
            rope_theta: theta,
            rms_norm_eps: 1e-6,
            activation: Activation::Silu,
            attn_sub_norm: false,
            ffn_sub_norm: false,
            tie_word_embeddings: false,
            ..bitnet(hidden, layers, heads, kv, inter, vocab)
        };
        match self {
            Preset::Tiny => bitnet(256, 4, 4, 2, 688, 4096),
            Preset::Bitnet2b4t => bitnet(2560, 30, 20, 5, 6912, 128256),
            Preset::Llama3_8b => llama(4096, 32, 32, 8, 128, 14336, 128256, 500000.0),
            Preset::Falcon3_1b => llama(2048, 18, 8, 4, 256, 8192, 131072, 1000042.0),
        }
    }
}

/// Seeded noise.
struct Noise(SmallRng);

impl Noise {
    fn new(seed: u64) -> Self {
        Noise(SmallRng::seed_from_u64(seed))
    }
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Roughly N(0, 1): a sum of four uniforms.
    fn normal(&mut self) -> f32 {
        let v = self.next();
        let u = |k: u32| ((v >> (16 * k)) & 0xFFFF) as f32 / 65535.0;
        (u(0) + u(1) + u(2) + u(3) - 2.0) * 1.732
    }
    /// A trit with P(0) = 1/3.
    fn trit(&mut self) -> i8 {
        (self.next() % 3) as i8 - 1
    }
}

fn metadata(preset: Preset, config: ModelConfig) -> Metadata {
    Metadata {
        config,
        chat_template: None,
        provenance: Provenance {
            source_family: format!("synthetic-{}", preset.name()),
            scale_convention: ScaleConvention::Multiply,
            source_files: vec![],
            converter: crate::CONVERTER.to_string(),
            decisions: vec![],
        },
    }
}

/// A byte-level tokenizer.json covering `vocab` ids (256 byte tokens, filler tokens, then
/// BOS and EOS as the last two ids, like Llama 3), so a synthetic model runs end to end.
fn tokenizer_json(vocab: u64) -> Vec<u8> {
    let mut v = serde_json::Map::new();
    let bytes_to_unicode = |b: u32| -> char {
        // GPT-2's byte-to-unicode map.
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        if printable {
            char::from_u32(b).unwrap_or('?')
        } else {
            let shift = (0..b)
                .filter(|&x| {
                    !((33..=126).contains(&x)
                        || (161..=172).contains(&x)
                        || (174..=255).contains(&x))
                })
                .count();
            char::from_u32(256 + shift as u32).unwrap_or('?')
        }
    };
    for b in 0..256u32 {
        v.insert(bytes_to_unicode(b).to_string(), json!(b));
    }
    let mut id = 256u64;
    while id < vocab - 2 {
        v.insert(format!("<|filler_{id}|>"), json!(id));
        id += 1;
    }
    let special = |id: u64, s: &str| json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(vocab - 2, "<|begin_of_text|>"), special(vocab - 1, "<|end_of_text|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": v, "merges": []}
    });
    serde_json::to_vec(&doc).expect("serializable")
}

/// Writes a random model of `preset`'s shape directly as `.tern` (TQ2 trits, bf16
/// embeddings and norms around 1). `progress(done, total)` counts bytes.
pub fn synth_tern(
    preset: Preset,
    path: &Path,
    seed: u64,
    progress: &dyn Fn(u64, u64),
) -> Result<()> {
    synth_tern_with(
        preset,
        path,
        seed,
        (crate::TernaryFormat::Tq2, crate::HeadFormat::Exact),
        false,
        progress,
    )
}

/// [`synth_tern`] with a choice of ternary layout and head format (the same noise: a TQ1
/// file holds the same trits as the TQ2 one of the same seed; a Q8 head is the bf16 noise
/// quantized per row). Unless `replace`, an existing `path` is left alone and the call
/// fails with [`ConvertError::OutputExists`] (checked atomically when the file is linked).
pub fn synth_tern_with(
    preset: Preset,
    path: &Path,
    seed: u64,
    (ternary, head): (crate::TernaryFormat, crate::HeadFormat),
    replace: bool,
    progress: &dyn Fn(u64, u64),
) -> Result<()> {
    let q8 = head == crate::HeadFormat::Q8;
    let config = preset.config();
    let tokenizer = tokenizer_json(config.vocab_size);
    let plan = expected_tensors(&config);
    let specs: Vec<TensorSpec> = plan
        .iter()
        .map(|(name, shape, role)| TensorSpec {
            name: name.clone(),
            layout: match role {
                TensorRole::Ternary => ternary.layout(),
                TensorRole::Embedding if q8 => Layout::Q8Row,
                _ => Layout::Bf16,
            },
            shape: shape.clone(),
        })
        .collect();
    let total: u64 = specs
        .iter()
        .map(|s| s.layout.byte_len(&s.shape).unwrap_or(0))
        .sum();
    let mut writer = Writer::create(path, &metadata(preset, config), &tokenizer, specs.clone())?
        .replace_existing(replace);
    let mut noise = Noise::new(seed);
    let mut done = 0;
    for (spec, (_, shape, role)) in specs.iter().zip(&plan) {
        match role {
            TensorRole::Ternary => {
                let (rows, cols) = (shape[0] as usize, shape[1] as usize);
                let rb = spec.layout.ternary_row_bytes(cols as u64).unwrap_or(0) as usize;
                let mut data = vec![0u8; rows * rb];
                let mut trits = vec![0i8; cols];
                for row in data.chunks_exact_mut(rb) {
                    trits.iter_mut().for_each(|t| *t = noise.trit());
                    spec.layout.pack_ternary_row(&trits, row);
                }
                let scale = 1.0 / (cols as f32).sqrt();
                writer.write_tensor(&spec.name, scale, &data)?;
                done += data.len() as u64;
            }
            TensorRole::Embedding if q8 => {
                // Row by row: the same bf16 noise as the exact file, quantized per row.
                let (rows, cols) = (shape[0] as usize, shape[1] as usize);
                let stride = tern_format::q8row::row_stride(cols as u64) as usize;
                writer.begin_tensor(&spec.name, 1.0)?;
                let mut w = vec![0.0f32; cols];
                let mut rec = vec![0u8; stride];
                let mut buf = Vec::with_capacity(1 << 20);
                for r in 0..rows {
                    for v in w.iter_mut() {
                        *v = bf16::from_f32(0.02 * noise.normal()).to_f32();
                    }
                    tern_format::q8row::quantize_row(&w, &mut rec);
                    buf.extend_from_slice(&rec);
                    if buf.len() >= 1 << 20 || r + 1 == rows {
                        writer.write_chunk(&buf)?;
                        buf.clear();
                    }
                }
                writer.end_tensor()?;
                done += (rows * stride) as u64;
            }
            TensorRole::Norm
            | TensorRole::Bias
            | TensorRole::Embedding
            | TensorRole::DenseLinear => {
                let n: u64 = shape.iter().product();
                let norm = *role == TensorRole::Norm;
                writer.begin_tensor(&spec.name, 1.0)?;
                let mut left = n;
                let mut buf = Vec::with_capacity(1 << 20);
                while left > 0 {
                    buf.clear();
                    for _ in 0..left.min(1 << 19) {
                        let v = if norm {
                            1.0 + 0.1 * noise.normal()
                        } else {
                            0.02 * noise.normal()
                        };
                        buf.extend_from_slice(&bf16::from_f32(v).to_le_bytes());
                    }
                    writer.write_chunk(&buf)?;
                    left -= (buf.len() / 2) as u64;
                    progress(done + (n - left) * 2, total);
                }
                writer.end_tensor()?;
                done += n * 2;
            }
        }
        progress(done, total);
    }
    writer.finish().map_err(|e| match e {
        tern_format::Error::Exists { path } => ConvertError::OutputExists(path),
        e => e.into(),
    })?;
    Ok(())
}

/// The on-disk flavour of a synthetic Hugging Face checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfFlavour {
    /// U8 packed + bf16 weight_scale (bitnet-b1.58-2B-4T, or bitlinear for Llama shapes).
    Packed,
    /// bf16 masters (bitnet-b1.58-2B-4T-bf16).
    Bf16,
}

/// Writes a random checkpoint of `preset`'s shape as a Hugging Face folder in the exact
/// on-disk layout of its family (one model.safetensors), for converter benchmarks. Unless
/// `replace`, the folder must not exist yet ([`ConvertError::OutputExists`]).
pub fn synth_hf(
    preset: Preset,
    flavour: HfFlavour,
    dir: &Path,
    seed: u64,
    replace: bool,
    progress: &dyn Fn(u64, u64),
) -> Result<()> {
    let c = preset.config();
    if replace {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    } else {
        // create_dir fails if the folder exists, atomically: nothing in it is replaced.
        std::fs::create_dir(dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => ConvertError::OutputExists(dir.to_path_buf()),
            _ => io(dir)(e),
        })?;
    }
    let llama = c.architecture == Architecture::Llama;
    if llama && flavour == HfFlavour::Bf16 {
        return Err(ConvertError::Unsupported(
            "bf16 masters exist only for the BitNet shapes".into(),
        ));
    }
    let quant = match (llama, flavour) {
        (true, _) => json!({"quant_method": "bitnet", "modules_to_not_convert": ["lm_head"]}),
        (false, HfFlavour::Packed) => {
            json!({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"})
        }
        (false, HfFlavour::Bf16) => {
            json!({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"})
        }
    };
    let config = json!({
        "architectures": [if llama { "LlamaForCausalLM" } else { "BitNetForCausalLM" }],
        "model_type": if llama { "llama" } else { "bitnet" },
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "hidden_act": if llama { "silu" } else { "relu2" },
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_ids[0],
        "torch_dtype": "bfloat16", "quantization_config": quant,
    });
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(io(&p))
    };
    write(
        "config.json",
        &serde_json::to_vec_pretty(&config).expect("serializable"),
    )?;
    write("tokenizer.json", &tokenizer_json(c.vocab_size))?;

    // Tensors in the source's names, dtypes and shapes.
    let mut tensors: Vec<(String, &str, Vec<u64>, TensorRole)> = Vec::new();
    for (name, shape, role) in expected_tensors(&c) {
        if role == TensorRole::Ternary {
            match flavour {
                HfFlavour::Packed => {
                    tensors.push((
                        name.replace(".weight", ".weight_scale"),
                        "BF16",
                        vec![1],
                        TensorRole::Norm,
                    ));
                    tensors.push((name, "U8", vec![shape[0] / 4, shape[1]], role));
                }
                HfFlavour::Bf16 => tensors.push((name, "BF16", shape, role)),
            }
        } else {
            tensors.push((name, "BF16", shape, role));
        }
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let size = |dtype: &str, shape: &[u64]| {
        shape.iter().product::<u64>() * if dtype == "U8" { 1 } else { 2 }
    };
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, dtype, shape, _) in &tensors {
        let n = size(dtype, shape);
        header.insert(
            name.clone(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut header = serde_json::to_vec(&header).expect("serializable");
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let path = dir.join("model.safetensors");
    let file = File::create(&path).map_err(io(&path))?;
    let mut out = BufWriter::with_capacity(8 << 20, file);
    out.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io(&path))?;
    out.write_all(&header).map_err(io(&path))?;
    let mut noise = Noise::new(seed);
    let (mut done, total) = (0u64, offset);
    let mut buf = Vec::with_capacity(8 << 20);
    for (name, dtype, shape, role) in &tensors {
        let n = size(dtype, shape);
        let mut left = n;
        while left > 0 {
            buf.clear();
            let chunk = left.min(8 << 20);
            if *dtype == "U8" {
                // Four codes in 0..=2 per byte.
                for _ in 0..chunk {
                    let v = noise.next();
                    let code = |k: u32| (((v >> (8 * k)) & 0xFF) % 3) as u8;
                    buf.push(code(0) | code(1) << 2 | code(2) << 4 | code(3) << 6);
                }
            } else {
                let scale_tensor = name.ends_with("weight_scale");
                for _ in 0..chunk / 2 {
                    let v = match role {
                        _ if scale_tensor => 0.5 + 0.1 * noise.normal().abs(),
                        TensorRole::Norm => 1.0 + 0.1 * noise.normal(),
                        TensorRole::Embedding | TensorRole::Bias => 0.02 * noise.normal(),
                        TensorRole::Ternary | TensorRole::DenseLinear => noise.normal(),
                    };
                    buf.extend_from_slice(&bf16::from_f32(v).to_le_bytes());
                }
            }
            out.write_all(&buf).map_err(io(&path))?;
            left -= chunk;
            done += chunk;
            progress(done, total);
        }
    }
    out.flush().map_err(io(&path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Noise;

    #[test]
    fn every_seed_is_its_own_model() {
        let firsts: std::collections::BTreeSet<Vec<u64>> = (0..256u64)
            .chain([u64::MAX, u64::MAX - 1, 1 << 63])
            .map(|seed| {
                let mut n = Noise::new(seed);
                (0..4).map(|_| n.next()).collect()
            })
            .collect();
        assert_eq!(firsts.len(), 259);
    }
}
