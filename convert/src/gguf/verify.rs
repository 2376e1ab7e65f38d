//! Any GGUF against the Hugging Face checkpoint it claims to come from (`tern verify
//! OUT.gguf --source DIR`): every trit exactly; every scale (one per tensor for I2_S, one
//! per 256-element block for TQ1_0/TQ2_0) within the precision the formats store it in;
//! every float tensor exactly as the source rounds to the GGUF's type, or, for quantized
//! types (Q8_0, Q6_K), its error reported.

use std::path::Path;

use half::{bf16, f16};
use serde::Serialize;

use super::import::{gguf_name, GgufModel};
use super::types::{GgmlType, I2sLayout};
use crate::compare::{Mismatch, QuantizedTensor, WeightComparison};
use crate::declared::{Origin, WeightRule};
use crate::error::Result;
use crate::ternary::to_f32;
use crate::{prepare, Overrides};

/// Largest relative difference accepted between a GGUF scale and the source's: one bf16
/// ulp (2^-7 relative at worst), the precision of the checkpoints' own `weight_scale`. The
/// engines store the f32 magnitude (I2_S) or its fp16 rounding (TQ1_0/TQ2_0) of the same
/// mean; an inverted scale (1/s) or a wrong convention is off by orders of magnitude.
pub const SCALE_TOLERANCE: f32 = 1.0 / 128.0;

/// The outcome of [`compare_with_source`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct GgufComparison {
    #[serde(flatten)]
    pub weights: WeightComparison,
    /// Findings that explain mismatches (e.g. I2_S written by a build of the other layout).
    pub notes: Vec<String>,
}

/// Compares every tensor of the GGUF at `gguf` with the checkpoint folder `source`.
pub fn compare_with_source(gguf: &Path, source: &Path, i2s: I2sLayout) -> Result<GgufComparison> {
    // What the checkpoint itself declares: no overrides.
    let prepared = prepare(source, &Overrides::default())?;
    let ck = &prepared.checkpoint;
    let want = &prepared.metadata.config;
    let model = GgufModel::open(gguf, Some(want.activation))?;
    let got = &model.config;
    let mut out = GgufComparison::default();
    let mut notes = Vec::new();
    let cmp = &mut out.weights;
    let fields = [
        ("hidden_size", want.hidden_size, got.hidden_size),
        (
            "num_hidden_layers",
            want.num_hidden_layers,
            got.num_hidden_layers,
        ),
        (
            "num_attention_heads",
            want.num_attention_heads,
            got.num_attention_heads,
        ),
        (
            "num_key_value_heads",
            want.num_key_value_heads,
            got.num_key_value_heads,
        ),
        ("head_dim", want.head_dim, got.head_dim),
        (
            "intermediate_size",
            want.intermediate_size,
            got.intermediate_size,
        ),
        ("vocab_size", want.vocab_size, got.vocab_size),
    ];
    for (name, w, g) in fields {
        if w != g {
            cmp.config_mismatches
                .push(format!("{name}: source gives {w}, the GGUF has {g}"));
        }
    }
    for (name, w, g) in [
        ("rms_norm_eps", want.rms_norm_eps, got.rms_norm_eps),
        ("rope_theta", want.rope_theta, got.rope_theta),
    ] {
        if (w as f32) != (g as f32) {
            cmp.config_mismatches
                .push(format!("{name}: source gives {w}, the GGUF has {g}"));
        }
    }
    if !cmp.config_mismatches.is_empty() {
        return Ok(out); // tensors of other shapes cannot be compared
    }
    for p in &prepared.plan {
        let gname = gguf_name(&p.name).unwrap_or_default();
        let Some(t) = model.file.header.tensor(&gname) else {
            cmp.float_mismatches += 1;
            record(cmp, &gname, vec![], "present", "missing");
            continue;
        };
        cmp.tensors += 1;
        let src = ck.get(p.origin.src()).expect("planned tensors exist");
        let data = match p.origin {
            Origin::Float { .. } => Vec::new(), // compared in chunks below
            _ => ck.read(src)?,
        };
        let (rows, cols) = (p.shape[0] as usize, *p.shape.last().unwrap_or(&1) as usize);
        let (expected, scale): (Box<dyn Fn(usize) -> i8>, f32) = match &p.origin {
            Origin::Float { .. } => {
                if let Err(e) = compare_float_tensor(&model, t, ck, src, &p.shape, cmp) {
                    cmp.float_mismatches += p.shape.iter().product::<u64>();
                    record(
                        cmp,
                        &gname,
                        vec![],
                        "a readable float tensor",
                        &e.to_string(),
                    );
                }
                continue;
            }
            Origin::Bias { .. } => {
                cmp.float_mismatches += 1;
                record(
                    cmp,
                    &gname,
                    vec![],
                    "no bias (GGUF export has none)",
                    "a bias in the source",
                );
                continue;
            }
            Origin::Ternary {
                rule: WeightRule::TernaryFloat { scale_tensor },
                ..
            } => {
                let w = to_f32(&data, src.dtype).map_err(|e| ck.tensor_error(src, e))?;
                let ws = match scale_tensor {
                    Some(n) => {
                        let t = ck.get(n).expect("planned tensors exist");
                        let v = to_f32(&ck.read(t)?, t.dtype).map_err(|e| ck.tensor_error(t, e))?;
                        v.first().copied().unwrap_or(f32::NAN)
                    }
                    None => 1.0,
                };
                let s = w.iter().fold(0.0f32, |m, x| m.max(x.abs())) * ws;
                let f = move |e: usize| (w[e] > 0.0) as i8 - (w[e] < 0.0) as i8;
                (Box::new(f), s)
            }
            Origin::Ternary {
                rule:
                    WeightRule::Packed {
                        scale_tensor,
                        convention,
                    },
                ..
            } => {
                let per_block = rows / 4;
                let scale_src = ck.get(scale_tensor).expect("planned tensors exist");
                let ws = to_f32(&ck.read(scale_src)?, scale_src.dtype)
                    .map_err(|e| ck.tensor_error(scale_src, e))?;
                let ws = ws.first().copied().unwrap_or(f32::NAN);
                let s = match convention {
                    tern_format::ScaleConvention::Divide => 1.0 / ws,
                    _ => ws,
                };
                let data = data.clone();
                let f = move |e: usize| {
                    let (o, c) = (e / cols, e % cols);
                    let (i, r) = (o / per_block, o % per_block);
                    ((data[r * cols + c] >> (2 * i)) & 3) as i8 - 1
                };
                (Box::new(f), s)
            }
            Origin::Ternary {
                rule: WeightRule::Masters,
                ..
            } => {
                let w = to_f32(&data, src.dtype).map_err(|e| ck.tensor_error(src, e))?;
                let mean =
                    (w.iter().map(|x| f64::from(x.abs())).sum::<f64>() / w.len() as f64) as f32;
                let sw = 1.0 / mean.max(1e-5);
                let f = move |e: usize| (w[e] * sw).round_ties_even().clamp(-1.0, 1.0) as i8;
                (Box::new(f), 1.0 / sw)
            }
        };
        let n = rows * cols;
        cmp.trits_compared += n as u64;
        let (trits, scales) = match model.ternary_blocks(&p.name, &p.shape, i2s) {
            Ok(v) => v,
            Err(e) => {
                cmp.trit_mismatches += n as u64;
                record(cmp, &gname, vec![], "ternary data", &e.to_string());
                continue;
            }
        };
        let mut bad = 0u64;
        for (e, &got) in trits.iter().enumerate() {
            let want = expected(e);
            if got != want {
                bad += 1;
                let idx = vec![(e / cols) as u64, (e % cols) as u64];
                record(cmp, &gname, idx, &want.to_string(), &got.to_string());
            }
        }
        cmp.trit_mismatches += bad;
        if t.ggml_type == GgmlType::I2_S && bad * 4 > n as u64 {
            if let Ok((other, _)) = model.ternary_blocks(&p.name, &p.shape, i2s.other()) {
                if other.iter().enumerate().all(|(e, &t)| t == expected(e)) {
                    let note = format!(
                        "the I2_S tensors match the source when read in the {} layout: the \
                         file was written by a bitnet.cpp built for {} (import it with \
                         --i2s-layout {}); a {} build reads it wrongly",
                        i2s.other().name(),
                        i2s.other().name(),
                        i2s.other().name(),
                        i2s.name()
                    );
                    if !notes.contains(&note) {
                        notes.push(note);
                    }
                }
            }
        }
        cmp.scales_compared += 1;
        let per = n / scales.len().max(1);
        let wrong = scales.iter().enumerate().find(|&(b, &s)| {
            let empty = scales.len() > 1 && trits[b * per..(b + 1) * per].iter().all(|&t| t == 0);
            let close = (s - scale).abs() <= SCALE_TOLERANCE * scale.abs();
            !empty && !close
        });
        if let Some((b, &s)) = wrong {
            cmp.scale_mismatches += 1;
            let index = if scales.len() > 1 {
                vec![b as u64]
            } else {
                vec![]
            };
            record(
                cmp,
                &gname,
                index,
                &format!("scale {scale:e}"),
                &format!("scale {s:e}"),
            );
        }
    }
    for t in &model.file.header.tensors {
        let known = prepared
            .plan
            .iter()
            .any(|p| gguf_name(&p.name).as_deref() == Some(t.name.as_str()));
        if !known && t.name != "rope_freqs.weight" {
            cmp.float_mismatches += 1;
            record(
                cmp,
                &t.name,
                vec![],
                "absent (the source has no such tensor)",
                "present",
            );
        }
    }
    out.notes = notes;
    Ok(out)
}

fn record(cmp: &mut WeightComparison, tensor: &str, index: Vec<u64>, expected: &str, found: &str) {
    if cmp.first_mismatches.len() < 20 {
        cmp.first_mismatches.push(Mismatch {
            tensor: tensor.to_string(),
            index,
            expected: expected.to_string(),
            found: found.to_string(),
        });
    }
}

/// A float tensor, whole rows about 4 MiB at a time: exact after rounding the source to
/// the GGUF's float type; quantized types have their error reported instead.
fn compare_float_tensor(
    model: &GgufModel,
    t: &super::reader::TensorInfo,
    ck: &crate::Checkpoint,
    src: &crate::source::SourceTensor,
    shape: &[u64],
    cmp: &mut WeightComparison,
) -> Result<()> {
    let ne: Vec<u64> = shape.iter().rev().copied().collect();
    if t.ne != ne {
        return Err(model
            .file
            .tensor_error(t, format!("ne {:?}, the source's shape gives {ne:?}", t.ne)));
    }
    let round: Option<fn(f32) -> f32> = match t.ggml_type {
        GgmlType::F32 => Some(|x| x),
        GgmlType::F16 => Some(|x| f16::from_f32(x).to_f32()),
        GgmlType::BF16 => Some(|x| bf16::from_f32(x).to_f32()),
        _ => None,
    };
    let rows = ne[1..].iter().product::<u64>().max(1);
    let (row_gguf, row_src) = (t.byte_len / rows, src.len / rows);
    let rows_per_chunk = ((4u64 << 20) / row_src.max(1)).max(1);
    let mut q = QuantizedTensor {
        tensor: t.name.clone(),
        ..Default::default()
    };
    let mut sq = 0f64;
    let mut r0 = 0;
    while r0 < rows {
        let n = rows_per_chunk.min(rows - r0);
        let mut bytes = vec![0u8; (n * row_src) as usize];
        ck.read_range(src, r0 * row_src, &mut bytes)?;
        let want = to_f32(&bytes, src.dtype).map_err(|e| ck.tensor_error(src, e))?;
        let got_bytes = model.file.read_range(t, r0 * row_gguf, n * row_gguf)?;
        let got = super::types::dequantize(t.ggml_type, &got_bytes).ok_or_else(|| {
            model
                .file
                .tensor_error(t, format!("type {} is not one tern reads", t.ggml_type))
        })?;
        let base = r0 * ne[0];
        cmp.float_values_compared += want.len() as u64;
        for (i, (&w, &g)) in want.iter().zip(&got).enumerate() {
            match round {
                Some(round) if round(w).to_bits() != g.to_bits() => {
                    cmp.float_mismatches += 1;
                    let (r, g) = (format!("{:e}", round(w)), format!("{g:e}"));
                    record(cmp, &t.name, vec![base + i as u64], &r, &g);
                }
                Some(_) => {}
                None => {
                    let e = (w - g).abs();
                    q.max_abs_error = q.max_abs_error.max(e);
                    q.max_abs_value = q.max_abs_value.max(w.abs());
                    sq += f64::from(e) * f64::from(e);
                    q.values += 1;
                }
            }
        }
        r0 += n;
    }
    if round.is_none() {
        q.rms_error = (sq / q.values.max(1) as f64).sqrt();
        cmp.quantized.push(q);
    }
    Ok(())
}

/// The I2_S layout as an option value.
pub fn parse_i2s_layout(s: &str) -> Option<I2sLayout> {
    match s.to_ascii_lowercase().as_str() {
        "x86" => Some(I2sLayout::X86),
        "arm" => Some(I2sLayout::Arm),
        _ => None,
    }
}
