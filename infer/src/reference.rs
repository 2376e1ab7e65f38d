//! The plain f32 reference forward: the executable specification of the model.
//!
//! One token at a time, scalar loops, weights dequantized row by row (`scale × trit`), every
//! operation in the order transformers runs it in float32 (checkpoints.md §5.2, §9). It
//! shares no arithmetic with the fast path (kernels, batching, threads), so comparing the
//! two (`tern verify`) tests the kernels and the model code at once. It is slow by design.

use tern_format::{Activation, RopeStyle};

use crate::model::{DenseMatrix, Model, Ternary};

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

/// Per-token int8 quantization, transformers' `ActQuant` in f32. Returns the codes and `s`.
pub fn quantize(x: &[f32]) -> (Vec<i8>, f32) {
    let max = x.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-5);
    let s = 127.0 / max;
    let q = x
        .iter()
        .map(|v| (v * s).round_ties_even().clamp(-128.0, 127.0) as i8)
        .collect();
    (q, s)
}

/// `y = (Σ_c (q_c / s) · t_rc) · scale`: AutoBitLinear's order of operations in f32.
fn bitlinear(w: &Ternary, q: &[i8], s: f32) -> Vec<f32> {
    let xq: Vec<f32> = q.iter().map(|&v| f32::from(v) / s).collect();
    let row_bytes = w.row_bytes();
    let mut trits = vec![0i8; w.cols];
    (0..w.rows)
        .map(|r| {
            w.layout
                .unpack_ternary_row(&w.data[r * row_bytes..(r + 1) * row_bytes], &mut trits)
                .expect("trits were validated");
            let dot: f32 = xq.iter().zip(&trits).map(|(x, &t)| x * f32::from(t)).sum();
            dot * w.scale + w.bias.as_ref().map_or(0.0, |b| b[r])
        })
        .collect()
}

fn dense_row(m: &DenseMatrix, r: usize) -> Vec<f32> {
    let mut row = vec![0.0; m.cols];
    m.row_f32(r, &mut row);
    row
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| w * (v * inv)).collect()
}

/// RoPE on one head at position `pos`.
pub fn rope(head: &mut [f32], pos: usize, inv_freq: &[f32], style: RopeStyle) {
    let half = head.len() / 2;
    for (i, &f) in inv_freq.iter().enumerate() {
        let (sin, cos) = (pos as f32 * f).sin_cos();
        let (a, b) = match style {
            RopeStyle::RotateHalf => (i, i + half),
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
        };
        let (x, y) = (head[a], head[b]);
        head[a] = x * cos - y * sin;
        head[b] = y * cos + x * sin;
    }
}

/// The reference model's KV cache: per layer, one `kv_dim` row per position.
pub struct ReferenceState {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    pub pos: usize,
}

impl ReferenceState {
    pub fn new(model: &Model) -> ReferenceState {
        let layers = model.layers.len();
        ReferenceState {
            keys: vec![Vec::new(); layers],
            values: vec![Vec::new(); layers],
            pos: 0,
        }
    }
}

/// Runs one token at position `state.pos` and returns its logits.
pub fn forward_token(
    model: &Model,
    state: &mut ReferenceState,
    token: u32,
    probe: &mut dyn Probe,
) -> Vec<f32> {
    let c = &model.config;
    let eps = c.rms_norm_eps as f32;
    let d = c.head_dim as usize;
    let (heads, kv_heads) = (
        c.num_attention_heads as usize,
        c.num_key_value_heads as usize,
    );
    let pos = state.pos;

    let mut x = dense_row(&model.embed, token as usize);
    for (l, layer) in model.layers.iter().enumerate() {
        probe.hidden(l, &x);
        // Attention: q, k, v from one quantization of the normed input.
        let (qa, s) = quantize(&rms_norm(&x, &layer.input_norm, eps));
        probe.activations(l, Site::Attention, &qa, qa.len());
        let mut q = bitlinear(&layer.q, &qa, s);
        let mut k = bitlinear(&layer.k, &qa, s);
        let v = bitlinear(&layer.v, &qa, s);
        for head in q.chunks_exact_mut(d).chain(k.chunks_exact_mut(d)) {
            rope(head, pos, &model.inv_freq, c.rope_style);
        }
        state.keys[l].extend_from_slice(&k);
        state.values[l].extend_from_slice(&v);
        let mut att = vec![0.0f32; heads * d];
        for h in 0..heads {
            let g = h / (heads / kv_heads);
            let qh = &q[h * d..(h + 1) * d];
            let scores: Vec<f32> = (0..=pos)
                .map(|p| {
                    let kp = &state.keys[l][p * kv_heads * d + g * d..][..d];
                    qh.iter().zip(kp).map(|(a, b)| a * b).sum::<f32>() * (d as f32).powf(-0.5)
                })
                .collect();
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let exps: Vec<f32> = scores.iter().map(|v| (v - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            for (p, e) in exps.iter().enumerate() {
                let vp = &state.values[l][p * kv_heads * d + g * d..][..d];
                for (o, vv) in att[h * d..(h + 1) * d].iter_mut().zip(vp) {
                    *o += e / sum * vv;
                }
            }
        }
        let att = match &layer.attn_sub_norm {
            Some(w) => rms_norm(&att, w, eps),
            None => att,
        };
        let (qo, s) = quantize(&att);
        probe.activations(l, Site::AttentionOutput, &qo, qo.len());
        for (xv, o) in x.iter_mut().zip(bitlinear(&layer.o, &qo, s)) {
            *xv += o;
        }

        // MLP: act(gate) * up, then down.
        let (qm, s) = quantize(&rms_norm(&x, &layer.post_attn_norm, eps));
        probe.activations(l, Site::Mlp, &qm, qm.len());
        let gate = bitlinear(&layer.gate, &qm, s);
        let up = bitlinear(&layer.up, &qm, s);
        let hidden: Vec<f32> = gate
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
        let hidden = match &layer.ffn_sub_norm {
            Some(w) => rms_norm(&hidden, w, eps),
            None => hidden,
        };
        let (qd, s) = quantize(&hidden);
        probe.activations(l, Site::MlpOutput, &qd, qd.len());
        for (xv, o) in x.iter_mut().zip(bitlinear(&layer.down, &qd, s)) {
            *xv += o;
        }
    }
    let x = rms_norm(&x, &model.final_norm, eps);
    probe.hidden(model.layers.len(), &x);
    state.pos += 1;
    (0..model.head.rows)
        .map(|r| {
            dense_row(&model.head, r)
                .iter()
                .zip(&x)
                .map(|(w, v)| w * v)
                .sum()
        })
        .collect()
}
