//! The reference forward: the executable specification of the model, and the truth that
//! `tern verify` measures the fast path against.
//!
//! Read it in one sitting: [`forward`] embeds, runs [`layer`] after layer, the final norm
//! and the head. Every sum is exact or in f64: a BitLinear's `Σ (q/s)·t` over int8 codes `q`
//! and trits `t` is the integer `Σ q·t` (taken exactly in i32) divided once by `s`; norms,
//! RoPE, attention and the head accumulate in f64; activation quantization rounds half to
//! even (checkpoints.md §5.2, §9). Hidden states are rounded to f32 between layers, as
//! transformers keeps them, so one layer of the fast path can be given exactly the input the
//! reference gave its own. It shares no arithmetic with the fast path (kernels, batching,
//! threads). It runs layer by layer over whole sequences, so each weight matrix is unpacked
//! once per call however many tokens are checked.

use std::sync::Mutex;

use tern_format::{Activation, RopeStyle};

use crate::kernels::exact;
use crate::model::{DenseLinear, DenseMatrix, Linear, Model, Ternary};
use crate::pool::Pool;
use crate::InferError;
/// Where a BitLinear input is quantized to int8 inside a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Site {
    /// Input of q/k/v.
    Attention,
    /// Input of o_proj.
    AttentionOutput,
    /// Input of gate/up.
    Mlp,
    /// Input of down_proj.
    MlpOutput,
}

impl Site {
    pub const ALL: [Site; 4] = [
        Site::Attention,
        Site::AttentionOutput,
        Site::Mlp,
        Site::MlpOutput,
    ];

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Observes intermediate values of a forward pass, for verification.
pub trait Probe {
    /// Hidden states `[n, hidden]` entering layer `layer` (`layer == layers`: after the final
    /// norm), as in transformers' `output_hidden_states`.
    fn hidden(&mut self, _layer: usize, _h: &[f32]) {}
    /// The int8 activations of `n` tokens at a quantization site, each row `padded` long.
    fn activations(&mut self, _layer: usize, _site: Site, _q: &[i8], _padded: usize) {}
}

/// A probe that records nothing.
pub struct NoProbe;
impl Probe for NoProbe {}

/// Per-token int8 quantization, transformers' `ActQuant`: `s = 127 / max|x|` (the maximum
/// clamped to 1e-5), codes `round_half_even(x · s)` clamped to [-128, 127]. Returns `s`.
pub fn quantize(x: &[f64], codes: &mut [i8]) -> f64 {
    let max = x.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-5);
    let s = 127.0 / max;
    for (c, v) in codes.iter_mut().zip(x) {
        *c = (v * s).round_ties_even().clamp(-128.0, 127.0) as i8;
    }
    s
}

fn rms_norm(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps).sqrt();
    x.iter()
        .zip(w)
        .map(|(v, &w)| f64::from(w) * v * inv)
        .collect()
}

/// Runs `f(row, out_row)` for every row of `out` (`[rows, width]`) over the pool.
fn par_rows(pool: &Pool, out: &mut [f64], width: usize, f: impl Fn(usize, &mut [f64]) + Sync) {
    let parts = 8 * pool.threads();
    pool.run_chunks(out, width, parts, |_, r, part| {
        for (i, row) in part.chunks_exact_mut(width).enumerate() {
            f(r.start / width + i, row);
        }
    });
}

/// `y[t, r] = (Σ_c q[t, c] · trit[r, c]) / s[t] · scale + bias[r]` for `n` tokens: the
/// integer sum is exact, then one division in f64. Returns `[n, rows]`.
fn bitlinear(pool: &Pool, w: &Ternary, q: &[i8], s: &[f64]) -> Result<Vec<f64>, InferError> {
    let (n, row_bytes) = (s.len(), w.row_bytes());
    // Codes and trits widened to i16 once: the i16 × i16 → i32 sums vectorize well
    // (pmaddwd; see kernels::exact, where most of the reference's time goes).
    let q: Vec<i16> = q.iter().map(|&v| i16::from(v)).collect();
    let mut by_row = vec![0.0f64; w.rows * n];
    let bad = Mutex::new(None);
    par_rows(pool, &mut by_row, n, |r, out| {
        let mut trits = vec![0i8; w.cols];
        let bytes = &w.data[r * row_bytes..(r + 1) * row_bytes];
        if let Err(e) = w.layout.unpack_ternary_row(bytes, &mut trits) {
            *bad.lock().expect("no poisoned lock") = Some(format!("{} row {r}: {e}", w.name));
            return;
        }
        let bias = w.bias.as_ref().map_or(0.0, |b| f64::from(b[r]));
        let trits: Vec<i16> = trits.iter().map(|&t| i16::from(t)).collect();
        for (t, o) in out.iter_mut().enumerate() {
            let qt = &q[t * w.cols..(t + 1) * w.cols];
            let dot = exact::dot_i16(qt, &trits);
            *o = f64::from(dot) / s[t] * f64::from(w.scale) + bias;
        }
    });
    if let Some(e) = bad.into_inner().expect("no poisoned lock") {
        return Err(InferError::Input(e));
    }
    Ok((0..n * w.rows)
        .map(|i| by_row[(i % w.rows) * n + i / w.rows])
        .collect())
}

/// `y[t, r] = Σ_c w[r, c] · x[t, c] + bias[r]` in f64 for a linear kept dense (its input is
/// not quantized). Returns `[n, rows]`.
fn dense(pool: &Pool, w: &DenseLinear, x: &[f64]) -> Vec<f64> {
    let m = &w.matrix;
    let n = x.len() / m.cols;
    let mut by_row = vec![0.0f64; m.rows * n];
    par_rows(pool, &mut by_row, n, |r, out| {
        let mut row = vec![0.0f32; m.cols];
        m.row_f32(r, &mut row);
        let bias = w.bias.as_ref().map_or(0.0, |b| f64::from(b[r]));
        for (o, xt) in out.iter_mut().zip(x.chunks_exact(m.cols)) {
            *o = row
                .iter()
                .zip(xt)
                .map(|(&a, b)| f64::from(a) * b)
                .sum::<f64>()
                + bias;
        }
    });
    (0..n * m.rows)
        .map(|i| by_row[(i % m.rows) * n + i / m.rows])
        .collect()
}

/// The int8 activations a group of linears reads from `x` (`[n, width]`): codes and scales,
/// none when every linear of the group is dense.
fn quantize_for(group: &[&Linear], x: &[f64], width: usize) -> (Vec<i8>, Vec<f64>) {
    match group.iter().any(|w| matches!(w, Linear::Ternary(_))) {
        true => quantize_rows(x, width),
        false => (Vec::new(), Vec::new()),
    }
}

/// One linear on `x` (`[n, width]`): ternary ones read `x`'s int8 activations `(q, s)`.
fn linear(
    pool: &Pool,
    w: &Linear,
    x: &[f64],
    (q, s): &(Vec<i8>, Vec<f64>),
) -> Result<Vec<f64>, InferError> {
    match w {
        Linear::Ternary(t) => bitlinear(pool, t, q, s),
        Linear::Dense(d) => Ok(dense(pool, d, x)),
    }
}

/// Quantizes each `width`-wide row of `x` (`[n, width]`): codes `[n, width]` and scales.
fn quantize_rows(x: &[f64], width: usize) -> (Vec<i8>, Vec<f64>) {
    let mut codes = vec![0i8; x.len()];
    let s = x
        .chunks_exact(width)
        .zip(codes.chunks_exact_mut(width))
        .map(|(x, c)| quantize(x, c))
        .collect();
    (codes, s)
}

/// RoPE on one head at position `pos`: the angle `pos · inv_freq` in f32 as transformers
/// computes it, its sine and cosine in f64.
fn rope(head: &mut [f64], pos: usize, inv_freq: &[f32], style: RopeStyle) {
    let half = head.len() / 2;
    for (i, &f) in inv_freq.iter().enumerate() {
        let (sin, cos) = f64::from(pos as f32 * f).sin_cos();
        let (a, b) = match style {
            RopeStyle::RotateHalf => (i, i + half),
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
        };
        let (x, y) = (head[a], head[b]);
        head[a] = x * cos - y * sin;
        head[b] = y * cos + x * sin;
    }
}

/// The int8 activations of one layer at its four quantization sites, `[tokens, width]`
/// each, the sequences one after another.
pub type LayerCodes = [Vec<i8>; 4];

/// The embeddings of each sequence, `[tokens, hidden]`.
pub fn embed(model: &Model, seqs: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let h = model.config.hidden_size as usize;
    seqs.iter()
        .map(|seq| {
            let mut x = vec![0.0; seq.len() * h];
            for (row, &tok) in x.chunks_exact_mut(h).zip(seq) {
                model.embed.row_f32(tok as usize, row);
            }
            x
        })
        .collect()
}

/// Layer `l` on the hidden states entering it (per sequence `[tokens, hidden]`, tokens at
/// positions 0..): the states leaving it, and its int8 activations.
pub fn layer(
    model: &Model,
    pool: &Pool,
    l: usize,
    xs: &[Vec<f32>],
) -> Result<(Vec<Vec<f32>>, LayerCodes), InferError> {
    let c = &model.config;
    let w = &model.layers[l];
    let (h, d, eps) = (c.hidden_size as usize, c.head_dim as usize, c.rms_norm_eps);
    let (heads, kv_heads) = (
        c.num_attention_heads as usize,
        c.num_key_value_heads as usize,
    );
    let (attn, kv, inter) = (heads * d, kv_heads * d, c.intermediate_size as usize);
    let x: Vec<f64> = xs.iter().flatten().map(|&v| f64::from(v)).collect();
    let n = x.len() / h;
    let norm_rows = |x: &[f64], width: usize, w: &[f32]| -> Vec<f64> {
        x.chunks_exact(width)
            .flat_map(|r| rms_norm(r, w, eps))
            .collect()
    };

    // Attention: q, k, v from one quantization of the normed input.
    let normed = norm_rows(&x, h, &w.input_norm);
    let qa = quantize_for(&[&w.q, &w.k, &w.v], &normed, h);
    let mut q = linear(pool, &w.q, &normed, &qa)?;
    let mut k = linear(pool, &w.k, &normed, &qa)?;
    let v = linear(pool, &w.v, &normed, &qa)?;
    let mut att = vec![0.0f64; n * attn];
    let mut first = 0; // the sequence's first row
    for seq in xs {
        let len = seq.len() / h;
        for p in 0..len {
            let t = first + p;
            for head in q[t * attn..(t + 1) * attn].chunks_exact_mut(d) {
                rope(head, p, &model.inv_freq, c.rope_style);
            }
            for head in k[t * kv..(t + 1) * kv].chunks_exact_mut(d) {
                rope(head, p, &model.inv_freq, c.rope_style);
            }
        }
        // Causal softmax attention of each position over positions 0..=p of its sequence.
        for p in 0..len {
            let t = first + p;
            for hd in 0..heads {
                let g = hd / (heads / kv_heads);
                let qh = &q[t * attn + hd * d..][..d];
                let key = |j: usize| &k[(first + j) * kv + g * d..][..d];
                let scores: Vec<f64> = (0..=p)
                    .map(|j| {
                        qh.iter().zip(key(j)).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
                let exps: Vec<f64> = scores.iter().map(|v| (v - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                let out = &mut att[t * attn + hd * d..][..d];
                for (j, e) in exps.iter().enumerate() {
                    let value = &v[(first + j) * kv + g * d..][..d];
                    for (o, vv) in out.iter_mut().zip(value) {
                        *o += e / sum * vv;
                    }
                }
            }
        }
        first += len;
    }
    let att = match &w.attn_sub_norm {
        Some(sub) => norm_rows(&att, attn, sub),
        None => att,
    };
    let qo = quantize_for(&[&w.o], &att, attn);
    let o = linear(pool, &w.o, &att, &qo)?;
    let x: Vec<f64> = x.iter().zip(&o).map(|(x, o)| x + o).collect();

    // MLP: act(gate) · up, sub-norm, then down.
    let normed = norm_rows(&x, h, &w.post_attn_norm);
    let qm = quantize_for(&[&w.gate, &w.up], &normed, h);
    let gate = linear(pool, &w.gate, &normed, &qm)?;
    let up = linear(pool, &w.up, &normed, &qm)?;
    let hidden: Vec<f64> = gate
        .iter()
        .zip(&up)
        .map(|(&g, &u)| {
            let a = match c.activation {
                Activation::Relu2 => g.max(0.0) * g.max(0.0),
                Activation::Silu => g / (1.0 + (-g).exp()),
            };
            a * u
        })
        .collect();
    let hidden = match &w.ffn_sub_norm {
        Some(sub) => norm_rows(&hidden, inter, sub),
        None => hidden,
    };
    let qd = quantize_for(&[&w.down], &hidden, inter);
    let down = linear(pool, &w.down, &hidden, &qd)?;
    let out: Vec<f32> = x.iter().zip(&down).map(|(x, o)| (x + o) as f32).collect();

    let mut split = Vec::with_capacity(xs.len());
    let mut rest = &out[..];
    for seq in xs {
        let (a, b) = rest.split_at(seq.len());
        split.push(a.to_vec());
        rest = b;
    }
    Ok((split, [qa.0, qo.0, qm.0, qd.0]))
}

/// The final RMSNorm of each `[hidden]` row, in f64, rounded to f32.
pub fn final_norm(model: &Model, x: &[f32]) -> Vec<f32> {
    let h = model.config.hidden_size as usize;
    x.chunks_exact(h)
        .flat_map(|r| {
            let r: Vec<f64> = r.iter().map(|&v| f64::from(v)).collect();
            rms_norm(&r, &model.final_norm, model.config.rms_norm_eps)
        })
        .map(|v| v as f32)
        .collect()
}

/// The logits `[tokens, vocab]` of normed hidden rows `x` (`[tokens, hidden]`), in f64.
pub fn head(model: &Model, pool: &Pool, x: &[f32]) -> Vec<f32> {
    let m: &DenseMatrix = &model.head;
    let n = x.len() / m.cols;
    let mut by_row = vec![0.0f64; m.rows * n];
    par_rows(pool, &mut by_row, n, |r, out| {
        let mut w = vec![0.0f32; m.cols];
        m.row_f32(r, &mut w);
        for (o, xt) in out.iter_mut().zip(x.chunks_exact(m.cols)) {
            *o = exact::dot_f64(&w, xt);
        }
    });
    (0..n * m.rows)
        .map(|i| by_row[(i % m.rows) * n + i / m.rows] as f32)
        .collect()
}

/// The whole network on each sequence (tokens at positions 0..): logits `[tokens, vocab]`.
pub fn forward(model: &Model, pool: &Pool, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, InferError> {
    let mut x = embed(model, seqs);
    for l in 0..model.layers.len() {
        x = layer(model, pool, l, &x)?.0;
    }
    Ok(x.iter()
        .map(|x| head(model, pool, &final_norm(model, x)))
        .collect())
}
