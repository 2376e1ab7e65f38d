//! Exact comparison of a `.tern` file with the checkpoint it came from (`tern verify
//! --source`). The source side is decoded here with the plain formulas of
//! docs/checkpoints.md §3–§4, independently of the converter's fast paths, so a converter bug
//! cannot hide behind itself.

use std::path::Path;

use serde::Serialize;
use tern_format::{q8row, Layout, TernFile};

use crate::error::Result;
use crate::family::{Origin, Planned};
use crate::ternary::to_f32;
use crate::{prepare, Family};

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
    /// Config fields whose value differs from what the source's config.json gives.
    pub config_mismatches: Vec<String>,
    /// The first mismatches (at most 20).
    pub first_mismatches: Vec<Mismatch>,
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
}

/// Re-reads the source checkpoint and compares every tensor of `file` exactly: every trit,
/// every scale bit (after normalization, docs/format.md §6.2), every float value.
pub fn compare_with_source(
    file: &TernFile,
    source: &Path,
    family: Option<Family>,
) -> Result<WeightComparison> {
    let prepared = prepare(source, family)?;
    let ck = &prepared.checkpoint;
    let mut cmp = WeightComparison::default();
    let field = |c: &tern_format::ModelConfig| serde_json::to_value(c).unwrap_or_default();
    let (want, got) = (
        field(&prepared.metadata.config),
        field(&file.metadata().config),
    );
    if let (Some(want), Some(got)) = (want.as_object(), got.as_object()) {
        for (key, w) in want {
            if got.get(key) != Some(w) {
                let g = got.get(key).map_or("absent".to_string(), |v| v.to_string());
                cmp.config_mismatches
                    .push(format!("{key}: source gives {w}, file has {g}"));
            }
        }
    }
    for p in &prepared.plan {
        let Some(t) = file.tensor(&p.name) else {
            cmp.record(Mismatch {
                tensor: p.name.clone(),
                index: vec![],
                expected: "present".into(),
                found: "missing".into(),
            });
            cmp.float_mismatches += 1;
            continue;
        };
        cmp.tensors += 1;
        if t.shape != p.shape {
            cmp.float_mismatches += 1;
            cmp.record(Mismatch {
                tensor: p.name.clone(),
                index: vec![],
                expected: format!("shape {:?}", p.shape),
                found: format!("shape {:?}", t.shape),
            });
            continue;
        }
        let src = ck.get(p.origin.src()).expect("planned tensors exist");
        let data = ck.read(src)?;
        match &p.origin {
            Origin::Float { .. } => compare_float(file, t, &data, src.dtype, &mut cmp),
            Origin::Packed { scale, .. } => {
                let (out, cols) = (p.shape[0] as usize, p.shape[1] as usize);
                let rows_per_block = out / 4;
                let expected = |o: usize, c: usize| -> i8 {
                    let (i, r) = (o / rows_per_block, o % rows_per_block);
                    ((data[r * cols + c] >> (2 * i)) & 3) as i8 - 1
                };
                compare_trits(file, t, p, expected, &mut cmp);
                let scale_src = ck.get(scale).expect("planned tensors exist");
                let ws = to_f32(&ck.read(scale_src)?, scale_src.dtype)
                    .map_err(|e| ck.tensor_error(scale_src, e))?;
                let ws = ws.first().copied().unwrap_or(f32::NAN);
                let want = match prepared.family.scale_convention() {
                    tern_format::ScaleConvention::Divide => 1.0 / ws,
                    _ => ws,
                };
                compare_scale(t, want, &mut cmp);
            }
            Origin::Masters { .. } => {
                let w = to_f32(&data, src.dtype).map_err(|e| ck.tensor_error(src, e))?;
                let mean =
                    (w.iter().map(|x| f64::from(x.abs())).sum::<f64>() / w.len() as f64) as f32;
                let sw = 1.0 / mean.max(1e-5);
                let cols = p.shape[1] as usize;
                let expected = |o: usize, c: usize| -> i8 {
                    (w[o * cols + c] * sw).round_ties_even().clamp(-1.0, 1.0) as i8
                };
                compare_trits(file, t, p, expected, &mut cmp);
                compare_scale(t, 1.0 / sw, &mut cmp);
            }
        }
    }
    for t in file.tensors() {
        if !prepared.plan.iter().any(|p| p.name == t.name) {
            cmp.float_mismatches += 1;
            cmp.record(Mismatch {
                tensor: t.name.clone(),
                index: vec![],
                expected: "absent (the source has no such tensor)".into(),
                found: "present".into(),
            });
        }
    }
    Ok(cmp)
}

fn compare_trits(
    file: &TernFile,
    t: &tern_format::TensorInfo,
    p: &Planned,
    expected: impl Fn(usize, usize) -> i8,
    cmp: &mut WeightComparison,
) {
    let (rows, cols) = (p.shape[0] as usize, p.shape[1] as usize);
    let Some(layout) = t.layout.filter(|l| l.is_ternary() && t.shape == p.shape) else {
        cmp.trit_mismatches += (rows * cols) as u64;
        cmp.record(Mismatch {
            tensor: p.name.clone(),
            index: vec![],
            expected: format!("TQ2 or TQ1 {:?}", p.shape),
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
                    tensor: p.name.clone(),
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
