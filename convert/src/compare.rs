//! Exact comparison of a `.tern` file with the checkpoint it came from (`tern verify
//! --source`). The expected value of every tensor comes from the checkpoint's own
//! declarations (`quantization_config`, dtypes, shapes), decoded here with the plain
//! formulas of docs/checkpoints.md §3–§4 — not from the converter's plan or the file's own
//! provenance, so neither a converter bug nor a wrong override can hide behind itself.

use std::collections::BTreeSet;
use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;
use tern_format::{q8row, Layout, ScaleConvention, TernFile};

use crate::error::Result;
use crate::source::{Checkpoint, SourceTensor};
use crate::ternary::{implausible_scale, to_f32};
use crate::{Declared, Overrides};

/// Mismatches listed per tensor (counts are always complete); at most 20 in all.
const MISMATCHES_PER_TENSOR: usize = 5;

/// One difference between the file and the source.
#[derive(Clone, Debug, Serialize)]
pub struct Mismatch {
    pub tensor: String,
    /// `[row, column]` for trits, `[element]` for floats, `[]` for a scale.
    pub index: Vec<u64>,
    pub expected: String,
    pub found: String,
}

/// How far a Q8_ROW tensor is from the source floats it was quantized from.
#[derive(Clone, Debug, Default, Serialize)]
pub struct QuantizedTensor {
    pub tensor: String,
    pub values: u64,
    /// `max |source − scale·q|` over the tensor.
    pub max_abs_error: f32,
    /// `max |source|` over the tensor, for scale.
    pub max_abs_value: f32,
    /// Root mean square error.
    pub rms_error: f64,
}

/// The outcome of [`compare_with_source`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct WeightComparison {
    pub tensors: usize,
    pub trits_compared: u64,
    pub trit_mismatches: u64,
    pub scales_compared: u64,
    pub scale_mismatches: u64,
    pub float_values_compared: u64,
    pub float_mismatches: u64,
    /// Tensors stored lossily on purpose (Q8_ROW embeddings/head, `--head q8`): their
    /// error is reported here and is not a mismatch.
    pub quantized: Vec<QuantizedTensor>,
    /// Config fields whose value differs from what the source's config.json gives, and
    /// decisions of the conversion that contradict the checkpoint's declarations (each
    /// naming the field).
    pub config_mismatches: Vec<String>,
    /// The first mismatches: at most 5 per tensor and 20 in all.
    pub first_mismatches: Vec<Mismatch>,
    /// Things that are exact but look wrong (a scale implausible for a trained model).
    pub warnings: Vec<String>,
}

impl WeightComparison {
    pub fn exact(&self) -> bool {
        self.trit_mismatches == 0
            && self.scale_mismatches == 0
            && self.float_mismatches == 0
            && self.config_mismatches.is_empty()
    }

    fn record(&mut self, m: Mismatch) {
        if self.first_mismatches.len() < 20 {
            self.first_mismatches.push(m);
        }
    }

    /// Adds the counts and findings of `other` (a later tensor's) to these.
    fn absorb(&mut self, other: WeightComparison) {
        self.tensors += other.tensors;
        self.trits_compared += other.trits_compared;
        self.trit_mismatches += other.trit_mismatches;
        self.scales_compared += other.scales_compared;
        self.scale_mismatches += other.scale_mismatches;
        self.float_values_compared += other.float_values_compared;
        self.float_mismatches += other.float_mismatches;
        self.quantized.extend(other.quantized);
        self.config_mismatches.extend(other.config_mismatches);
        for m in other.first_mismatches {
            self.record(m);
        }
        self.warnings.extend(other.warnings);
    }
}

/// How the checkpoint itself says `weight_scale` relates to the weights, and the field that
/// says it; None when it says nothing.
fn declared_convention(config: &Value) -> Option<(ScaleConvention, String)> {
    let q = config.get("quantization_config").filter(|q| !q.is_null());
    let Some(q) = q else {
        let archs = config.get("architectures").and_then(Value::as_array);
        let one_bit = archs.is_some_and(|a| a.iter().any(|v| v == "BitnetForCausalLM"));
        return one_bit.then(|| {
            (
                ScaleConvention::Masters,
                "architectures BitnetForCausalLM (1bitLLM: float masters)".into(),
            )
        });
    };
    let linear = q.get("linear_class").and_then(Value::as_str);
    let mode = q.get("quantization_mode").and_then(Value::as_str);
    let convention = match (linear, mode) {
        (Some("autobitlinear"), Some("online")) => ScaleConvention::Masters,
        (Some("autobitlinear"), _) => ScaleConvention::Multiply,
        _ => ScaleConvention::Divide,
    };
    Some((
        convention,
        format!("quantization_config.linear_class {linear:?}, quantization_mode {mode:?}"),
    ))
}

/// The source tensor holding a `.tern` tensor (1bitLLM names its sub-norms differently).
fn source_of<'a>(ck: &'a Checkpoint, name: &str) -> Option<&'a SourceTensor> {
    ck.get(name).or_else(|| {
        ck.get(
            &name
                .replace("self_attn.attn_sub_norm", "self_attn.inner_attn_ln")
                .replace("mlp.ffn_sub_norm", "mlp.ffn_layernorm"),
        )
    })
}

/// Re-reads the source checkpoint and compares every tensor of `file` exactly: every trit,
/// every scale bit (after normalization, docs/format.md §6.2), every float value, and the
/// config.
pub fn compare_with_source(file: &TernFile, source: &Path) -> Result<WeightComparison> {
    let ck = Checkpoint::open(source)?;
    let mut cmp = WeightComparison::default();
    compare_config(file, &ck, &mut cmp);
    let declared = declared_convention(&ck.config);
    let used = file.metadata().provenance.scale_convention;
    let convention = match &declared {
        Some((d, field)) => {
            if *d != used {
                cmp.config_mismatches.push(format!(
                    "scale convention: the checkpoint declares {d:?} ({field}), the file was \
                     converted with {used:?}"
                ));
            }
            *d
        }
        None => used,
    };
    // Tensors are independent: compare them in parallel (rayon's pool, one tensor per
    // worker at a time, so memory stays a few tensors), and merge in file order so the
    // report does not depend on scheduling.
    let tensors: Vec<_> = file.tensors().iter().collect();
    let per_tensor: Vec<Result<(WeightComparison, Vec<String>)>> = tensors
        .par_iter()
        .map(|t| compare_tensor(&ck, file, t, convention))
        .collect();
    let mut seen = BTreeSet::new();
    for r in per_tensor {
        let (c, names) = r?;
        cmp.absorb(c);
        seen.extend(names);
    }
    // Everything the source holds must be in the file.
    for name in ck.tensors.keys() {
        let accounted = seen.contains(name)
            || name.ends_with("rotary_emb.inv_freq")
            || name.ends_with(".weight_scale");
        if !accounted {
            cmp.float_mismatches += 1;
            cmp.record(Mismatch {
                tensor: name.clone(),
                index: vec![],
                expected: "present (the source has it)".into(),
                found: "absent".into(),
            });
        }
    }
    Ok(cmp)
}

/// One tensor of the file against its source; also returns the source tensors it used.
fn compare_tensor(
    ck: &Checkpoint,
    file: &TernFile,
    t: &tern_format::TensorInfo,
    convention: ScaleConvention,
) -> Result<(WeightComparison, Vec<String>)> {
    let mut cmp = WeightComparison {
        tensors: 1,
        ..Default::default()
    };
    let mut seen = Vec::new();
    let Some(src) = source_of(ck, &t.name) else {
        cmp.float_mismatches += 1;
        cmp.record(Mismatch {
            tensor: t.name.clone(),
            index: vec![],
            expected: "absent (the source has no such tensor)".into(),
            found: "present".into(),
        });
        return Ok((cmp, seen));
    };
    seen.push(src.name.clone());
    let data = ck.read(src)?;
    let module = t.name.trim_end_matches(".weight").trim_end_matches(".bias");
    let ws_name = format!("{module}.weight_scale");
    let ws = match ck.get(&ws_name) {
        Some(w) => {
            seen.push(w.name.clone());
            let v = to_f32(&ck.read(w)?, w.dtype).map_err(|e| ck.tensor_error(w, e))?;
            Some(v.first().copied().unwrap_or(f32::NAN))
        }
        None => None,
    };
    if t.layout.is_some_and(|l| l.is_ternary()) {
        compare_ternary(ck, file, t, src, &data, ws, convention, &mut cmp)?;
    } else if t.name.ends_with(".bias") {
        // transformers' offline AutoBitLinear scales the bias with the output.
        let factor = match convention {
            ScaleConvention::Multiply => ws.unwrap_or(1.0),
            _ => 1.0,
        };
        let want: Vec<u8> = to_f32(&data, src.dtype)
            .map_err(|e| ck.tensor_error(src, e))?
            .iter()
            .flat_map(|b| (b * factor).to_le_bytes())
            .collect();
        compare_float(file, t, &want, safetensors::Dtype::F32, &mut cmp);
    } else {
        compare_float(file, t, &data, src.dtype, &mut cmp);
    }
    // A few per tensor, so that the report names every damaged tensor (two swapped
    // projections: both), not twenty mismatches of the first.
    cmp.first_mismatches.truncate(MISMATCHES_PER_TENSOR);
    Ok((cmp, seen))
}

/// The file's config against the source's config.json, read without overrides.
fn compare_config(file: &TernFile, ck: &Checkpoint, cmp: &mut WeightComparison) {
    let declared = match Declared::read(ck, &Overrides::default()) {
        Ok(d) => d,
        Err(e) => {
            cmp.config_mismatches.push(format!(
                "config: the checkpoint's own declarations cannot be read as a BitNet model: {e}"
            ));
            return;
        }
    };
    let field = |c: &tern_format::ModelConfig| serde_json::to_value(c).unwrap_or_default();
    let (want, got) = (field(&declared.config), field(&file.metadata().config));
    let (Some(want), Some(got)) = (want.as_object(), got.as_object()) else {
        return;
    };
    let keys: BTreeSet<&String> = want.keys().chain(got.keys()).collect();
    for key in keys {
        let (w, g) = (want.get(key), got.get(key));
        if w != g {
            let show = |v: Option<&Value>| v.map_or("absent".to_string(), Value::to_string);
            cmp.config_mismatches.push(format!(
                "{key}: source gives {}, file has {}",
                show(w),
                show(g)
            ));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn compare_ternary(
    ck: &Checkpoint,
    file: &TernFile,
    t: &tern_format::TensorInfo,
    src: &SourceTensor,
    data: &[u8],
    ws: Option<f32>,
    convention: ScaleConvention,
    cmp: &mut WeightComparison,
) -> Result<()> {
    if let Some(w) = implausible_scale(t.scale) {
        cmp.warnings.push(format!("{}: {w}", t.name));
    }
    if src.dtype == safetensors::Dtype::U8 {
        // transformers' unpack_weights: T[i·R + r, c] = ((P[r, c] >> 2i) & 3) − 1.
        let (r_rows, cols) = (src.shape[0] as usize, src.shape[1] as usize);
        let shape = [4 * r_rows as u64, cols as u64];
        let expected = |o: usize, c: usize| -> i8 {
            let (i, r) = (o / r_rows, o % r_rows);
            ((data[r * cols + c] >> (2 * i)) & 3) as i8 - 1
        };
        compare_trits(file, t, &shape, expected, cmp);
        let want = match (ws, convention) {
            (Some(ws), ScaleConvention::Divide) => 1.0 / ws,
            (Some(ws), _) => ws,
            (None, _) => f32::NAN, // packed weights without a scale: nothing can match
        };
        compare_scale(t, want, cmp);
        return Ok(());
    }
    let w = to_f32(data, src.dtype).map_err(|e| ck.tensor_error(src, e))?;
    let shape: Vec<u64> = src.shape.clone();
    let cols = shape.get(1).copied().unwrap_or(1) as usize;
    if convention == ScaleConvention::Masters {
        // WeightQuant: sw = 1 / max(mean|w|, 1e-5), t = clamp(round_half_even(w·sw), −1, 1).
        let mean = (w.iter().map(|x| f64::from(x.abs())).sum::<f64>() / w.len() as f64) as f32;
        let sw = 1.0 / mean.max(1e-5);
        let expected = |o: usize, c: usize| -> i8 {
            (w[o * cols + c] * sw).round_ties_even().clamp(-1.0, 1.0) as i8
        };
        compare_trits(file, t, &shape, expected, cmp);
        compare_scale(t, 1.0 / sw, cmp);
    } else {
        // Already ternary floats (offline autobitlinear): t = sign(w), scale = s · ws.
        let s = w.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let expected = |o: usize, c: usize| -> i8 {
            let x = w[o * cols + c];
            (x > 0.0) as i8 - (x < 0.0) as i8
        };
        compare_trits(file, t, &shape, expected, cmp);
        let s = if s == 0.0 { t.scale } else { s };
        compare_scale(t, s * ws.unwrap_or(1.0), cmp);
    }
    Ok(())
}

fn compare_trits(
    file: &TernFile,
    t: &tern_format::TensorInfo,
    shape: &[u64],
    expected: impl Fn(usize, usize) -> i8,
    cmp: &mut WeightComparison,
) {
    let (rows, cols) = (
        shape[0] as usize,
        shape.get(1).copied().unwrap_or(1) as usize,
    );
    let Some(layout) = t.layout.filter(|l| l.is_ternary() && t.shape == shape) else {
        cmp.trit_mismatches += (rows * cols) as u64;
        cmp.record(Mismatch {
            tensor: t.name.clone(),
            index: vec![],
            expected: format!("TQ2 or TQ1 {shape:?}"),
            found: format!("{:?} {:?}", t.layout, t.shape),
        });
        return;
    };
    let row_bytes = layout.ternary_row_bytes(cols as u64).expect("ternary") as usize;
    let mut row = vec![0i8; cols];
    for (o, bytes) in file.data(t).chunks_exact(row_bytes).enumerate() {
        if let Err(c) = layout.unpack_ternary_row(bytes, &mut row) {
            row[c] = 2; // an invalid code: never equal to a trit
        }
        for (c, &got) in row.iter().enumerate() {
            let want = expected(o, c);
            if got != want {
                cmp.trit_mismatches += 1;
                cmp.record(Mismatch {
                    tensor: t.name.clone(),
                    index: vec![o as u64, c as u64],
                    expected: want.to_string(),
                    found: if got == 2 {
                        "invalid code".into()
                    } else {
                        got.to_string()
                    },
                });
            }
        }
    }
    cmp.trits_compared += (rows * cols) as u64;
}

fn compare_scale(t: &tern_format::TensorInfo, want: f32, cmp: &mut WeightComparison) {
    cmp.scales_compared += 1;
    if t.scale.to_bits() != want.to_bits() {
        cmp.scale_mismatches += 1;
        cmp.record(Mismatch {
            tensor: t.name.clone(),
            index: vec![],
            expected: format!("scale {want:e}"),
            found: format!("scale {:e}", t.scale),
        });
    }
}

fn compare_float(
    file: &TernFile,
    t: &tern_format::TensorInfo,
    data: &[u8],
    dtype: safetensors::Dtype,
    cmp: &mut WeightComparison,
) {
    let elem = dtype.size();
    let stored = file.data(t);
    if t.layout == Some(Layout::Q8Row) && t.shape.len() == 2 {
        compare_quantized(t, stored, data, dtype, cmp);
        return;
    }
    let same_layout = matches!(
        (t.layout, dtype),
        (Some(Layout::F32), safetensors::Dtype::F32)
            | (Some(Layout::F16), safetensors::Dtype::F16)
            | (Some(Layout::Bf16), safetensors::Dtype::BF16)
    );
    let n = (data.len() / elem) as u64;
    cmp.float_values_compared += n;
    if !same_layout || stored.len() != data.len() {
        cmp.float_mismatches += n;
        cmp.record(Mismatch {
            tensor: t.name.clone(),
            index: vec![],
            expected: format!("{dtype:?} with {} bytes", data.len()),
            found: format!("{:?} with {} bytes", t.layout, stored.len()),
        });
        return;
    }
    for (i, (a, b)) in data
        .chunks_exact(elem)
        .zip(stored.chunks_exact(elem))
        .enumerate()
    {
        if a != b {
            cmp.float_mismatches += 1;
            cmp.record(Mismatch {
                tensor: t.name.clone(),
                index: vec![i as u64],
                expected: format!("{a:02x?}"),
                found: format!("{b:02x?}"),
            });
        }
    }
}

/// A Q8_ROW tensor against its source floats: the quantization error, not a mismatch. A
/// non-finite row scale (which `tern inspect --check` rejects) counts as mismatches.
fn compare_quantized(
    t: &tern_format::TensorInfo,
    stored: &[u8],
    data: &[u8],
    dtype: safetensors::Dtype,
    cmp: &mut WeightComparison,
) {
    let cols = t.shape[1] as usize;
    let stride = q8row::row_stride(cols as u64) as usize;
    let row_in = cols * dtype.size();
    let mut q = QuantizedTensor {
        tensor: t.name.clone(),
        ..Default::default()
    };
    let mut sq = 0.0f64;
    let mut got = vec![0.0f32; cols];
    for (rec, src) in stored.chunks_exact(stride).zip(data.chunks_exact(row_in)) {
        let Ok(want) = to_f32(src, dtype) else {
            continue; // the converter refuses non-finite sources
        };
        q8row::dequantize_row(rec, &mut got);
        for (w, g) in want.iter().zip(&got) {
            let e = (w - g).abs();
            if !e.is_finite() {
                cmp.float_mismatches += 1;
            }
            q.max_abs_error = q.max_abs_error.max(e);
            q.max_abs_value = q.max_abs_value.max(w.abs());
            sq += f64::from(e) * f64::from(e);
        }
        q.values += cols as u64;
    }
    q.rms_error = (sq / q.values.max(1) as f64).sqrt();
    cmp.float_values_compared += q.values;
    cmp.quantized.push(q);
}
