//! Parity measurements for `tern verify`: the fast path against the plain f32 reference
//! forward, and against transformers' outputs stored in a reference file.
//!
//! Bit-exact logits are not expected: every BitLinear re-quantizes its input to int8, and
//! a last-ulp difference in a float sum can move one value across a rounding boundary (a
//! "flip"), which then cascades. So the measures are per-layer errors with flip counts,
//! top-1 agreement, KL divergence of the next-token distributions, and greedy agreement.

use serde::Serialize;

use crate::kernels::Kernels;
use crate::model::{Logits, Model, State};
use crate::pool::Pool;
use crate::reference::{forward_token, Probe, ReferenceState, Site};
use crate::sampling::argmax;
use crate::InferError;

/// Pass/fail limits, with documented defaults (docs/parity.md).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Thresholds {
    /// Fraction of positions whose argmax agrees.
    pub min_top1: f64,
    /// Mean KL(reference ‖ ours) of the next-token distributions, in nats.
    pub max_kl: f64,
    /// Mean fraction of greedy tokens that agree before the first divergence.
    pub min_greedy: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            min_top1: 0.9,
            max_kl: 0.01,
            min_greedy: 0.5,
        }
    }
}

/// Error of the hidden states entering one layer (`layer == layers`: after the final norm).
#[derive(Clone, Debug, Default, Serialize)]
pub struct LayerError {
    pub layer: usize,
    pub max_abs: f32,
    /// `max |Δ| / max |reference|`.
    pub max_rel: f32,
    /// int8 activations inside this layer that differ (None against transformers, whose
    /// activations are not stored).
    pub flips: Option<u64>,
    pub activations: u64,
}

/// How closely one forward implementation follows another.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Parity {
    pub against: String,
    pub prompts: usize,
    pub positions: usize,
    pub top1: f64,
    pub mean_kl: f64,
    pub max_logit_abs: f32,
    pub greedy_tokens: usize,
    pub greedy_agreement: f64,
    pub layers: Vec<LayerError>,
}

impl Parity {
    /// The thresholds this fails, as sentences.
    pub fn failures(&self, t: &Thresholds) -> Vec<String> {
        let mut f = Vec::new();
        if self.top1 < t.min_top1 {
            f.push(format!(
                "top-1 agreement with {} is {:.1}% (< {:.1}%)",
                self.against,
                100.0 * self.top1,
                100.0 * t.min_top1
            ));
        }
        if self.mean_kl > t.max_kl {
            f.push(format!(
                "mean KL against {} is {:.2e} nats (> {:.2e})",
                self.against, self.mean_kl, t.max_kl
            ));
        }
        if self.greedy_tokens > 0 && self.greedy_agreement < t.min_greedy {
            f.push(format!(
                "greedy continuations agree with {} for {:.1}% of tokens (< {:.1}%)",
                self.against,
                100.0 * self.greedy_agreement,
                100.0 * t.min_greedy
            ));
        }
        f
    }
}

/// Records hidden states and int8 activations of a forward pass, token-major.
#[derive(Default)]
struct Recorder {
    /// Per layer: concatenated hidden rows.
    hidden: Vec<Vec<f32>>,
    /// Per (layer, site): concatenated unpadded int8 rows.
    acts: Vec<[Vec<i8>; 4]>,
    widths: Vec<[usize; 4]>,
}

impl Recorder {
    fn for_model(model: &Model) -> Recorder {
        let c = &model.config;
        let w = [
            c.hidden_size,
            c.attn_dim(),
            c.hidden_size,
            c.intermediate_size,
        ]
        .map(|v| v as usize);
        let layers = model.layers.len();
        Recorder {
            hidden: vec![Vec::new(); layers + 1],
            acts: (0..layers).map(|_| Default::default()).collect(),
            widths: vec![w; layers],
        }
    }
}

impl Probe for Recorder {
    fn hidden(&mut self, layer: usize, h: &[f32]) {
        self.hidden[layer].extend_from_slice(h);
    }
    fn activations(&mut self, layer: usize, site: Site, q: &[i8], padded: usize) {
        let width = self.widths[layer][site.index()];
        for row in q.chunks_exact(padded) {
            self.acts[layer][site.index()].extend_from_slice(&row[..width]);
        }
    }
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    x.iter().map(|&v| v as f64 - lse).collect()
}

/// KL(p ‖ q) from logits.
fn kl(reference: &[f32], ours: &[f32]) -> f64 {
    let (lp, lq) = (log_softmax(reference), log_softmax(ours));
    lp.iter()
        .zip(&lq)
        .map(|(a, b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}

#[derive(Default)]
struct LogitStats {
    positions: usize,
    top1: usize,
    kl: f64,
    max_abs: f32,
}

impl LogitStats {
    fn add(&mut self, reference: &[f32], ours: &[f32]) {
        self.positions += 1;
        self.top1 += usize::from(argmax(reference) == argmax(ours));
        self.kl += kl(reference, ours);
        let d = reference
            .iter()
            .zip(ours)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        self.max_abs = self.max_abs.max(d);
    }
}

fn layer_errors(reference: &[Vec<f32>], ours: &[Vec<f32>], layers: &mut Vec<LayerError>) {
    if layers.is_empty() {
        *layers = (0..reference.len())
            .map(|layer| LayerError {
                layer,
                ..Default::default()
            })
            .collect();
    }
    for (e, (r, o)) in layers.iter_mut().zip(reference.iter().zip(ours)) {
        let scale = r
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()))
            .max(f32::MIN_POSITIVE);
        let d = r
            .iter()
            .zip(o)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        e.max_abs = e.max_abs.max(d);
        e.max_rel = e.max_rel.max(d / scale);
    }
}

/// Greedy continuation with the fast path (KV cache), `n` tokens, no stop tokens.
fn greedy_fast(
    model: &Model,
    pool: &Pool,
    kernels: Kernels,
    prompt: &[u32],
    n: usize,
) -> Result<Vec<u32>, InferError> {
    let vocab = model.config.vocab_size as usize;
    let mut state = State::new(model, kernels, pool, prompt.len() + n)?;
    model.forward(
        pool,
        &mut state,
        prompt,
        Logits::Last,
        &mut crate::reference::NoProbe,
    )?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let next = argmax(&state.logits[..vocab]) as u32;
        out.push(next);
        if i + 1 < n {
            model.forward(
                pool,
                &mut state,
                &[next],
                Logits::Last,
                &mut crate::reference::NoProbe,
            )?;
        }
    }
    Ok(out)
}

fn agreeing_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The fast path against the plain f32 reference forward on `prompts`, then `greedy`
/// tokens of free-running continuation from each.
pub fn kernel_parity(
    model: &Model,
    pool: &Pool,
    kernels: Kernels,
    prompts: &[Vec<u32>],
    greedy: usize,
) -> Result<Parity, InferError> {
    let vocab = model.config.vocab_size as usize;
    let mut logits = LogitStats::default();
    let mut layers = Vec::new();
    let mut flips = vec![0u64; model.layers.len() + 1];
    let mut counted = vec![0u64; model.layers.len() + 1];
    let (mut agree, mut total) = (0, 0);
    for prompt in prompts {
        let mut fast = Recorder::for_model(model);
        let mut state = State::new(model, kernels, pool, prompt.len() + greedy)?;
        model.forward(pool, &mut state, prompt, Logits::All, &mut fast)?;

        let mut slow = Recorder::for_model(model);
        let mut rstate = ReferenceState::new(model);
        for (t, &tok) in prompt.iter().enumerate() {
            let rl = forward_token(model, &mut rstate, tok, &mut slow);
            logits.add(&rl, &state.logits[t * vocab..(t + 1) * vocab]);
        }
        layer_errors(&slow.hidden, &fast.hidden, &mut layers);
        for l in 0..model.layers.len() {
            for s in 0..4 {
                let (a, b) = (&slow.acts[l][s], &fast.acts[l][s]);
                // Activations inside layer l move the hidden state entering layer l + 1.
                flips[l + 1] += a.iter().zip(b).filter(|(x, y)| x != y).count() as u64;
                counted[l + 1] += a.len() as u64;
            }
        }

        if greedy > 0 {
            let ours = greedy_fast(model, pool, kernels, prompt, greedy)?;
            let mut rstate = ReferenceState::new(model);
            let mut rl = Vec::new();
            for &tok in prompt {
                rl = forward_token(model, &mut rstate, tok, &mut crate::reference::NoProbe);
            }
            let mut theirs = Vec::with_capacity(greedy);
            for i in 0..greedy {
                let next = argmax(&rl) as u32;
                theirs.push(next);
                if i + 1 < greedy {
                    rl = forward_token(model, &mut rstate, next, &mut crate::reference::NoProbe);
                }
            }
            agree += agreeing_prefix(&ours, &theirs);
            total += greedy;
        }
    }
    for (e, (f, c)) in layers.iter_mut().zip(flips.iter().zip(&counted)) {
        e.flips = Some(*f);
        e.activations = *c;
    }
    Ok(Parity {
        against: "the f32 reference forward".into(),
        prompts: prompts.len(),
        positions: logits.positions,
        top1: logits.top1 as f64 / logits.positions.max(1) as f64,
        mean_kl: logits.kl / logits.positions.max(1) as f64,
        max_logit_abs: logits.max_abs,
        greedy_tokens: total,
        greedy_agreement: agree as f64 / total.max(1) as f64,
        layers,
    })
}

/// Reference outputs of transformers (fixtures/README.md): per prompt `prompt.{i}.ids`,
/// `.logits [T, vocab]`, `.hidden [L+1, T, hidden]`, `.greedy [N]`.
pub fn reference_parity(
    model: &Model,
    pool: &Pool,
    kernels: Kernels,
    reference: &[u8],
) -> Result<Parity, InferError> {
    let bad = |m: String| InferError::Input(format!("reference file: {m}"));
    let st = safetensors::SafeTensors::deserialize(reference).map_err(|e| bad(e.to_string()))?;
    let get = |name: &str| -> Result<(Vec<usize>, Vec<u8>, safetensors::Dtype), InferError> {
        let t = st
            .tensor(name)
            .map_err(|_| bad(format!("no tensor {name}")))?;
        Ok((t.shape().to_vec(), t.data().to_vec(), t.dtype()))
    };
    let f32s = |b: &[u8]| {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect::<Vec<f32>>()
    };
    let ids = |name: &str| -> Result<Vec<u32>, InferError> {
        let (_, b, dtype) = get(name)?;
        if dtype != safetensors::Dtype::I64 {
            return Err(bad(format!("{name} is {dtype:?}, expected I64")));
        }
        Ok(b.chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as u32)
            .collect())
    };
    let (vocab, hidden) = (
        model.config.vocab_size as usize,
        model.config.hidden_size as usize,
    );
    let layers_n = model.layers.len();
    let mut logits = LogitStats::default();
    let mut layers = Vec::new();
    let (mut agree, mut total, mut prompts) = (0, 0, 0);
    while st.tensor(&format!("prompt.{prompts}.ids")).is_ok() {
        let p = prompts;
        prompts += 1;
        let prompt = ids(&format!("prompt.{p}.ids"))?;
        let (shape, b, _) = get(&format!("prompt.{p}.logits"))?;
        if shape != [prompt.len(), vocab] {
            return Err(bad(format!(
                "prompt.{p}.logits has shape {shape:?}, expected [{}, {vocab}]",
                prompt.len()
            )));
        }
        let ref_logits = f32s(&b);
        let mut fast = Recorder::for_model(model);
        let mut state = State::new(model, kernels, pool, prompt.len() + 64)?;
        model.forward(pool, &mut state, &prompt, Logits::All, &mut fast)?;
        for t in 0..prompt.len() {
            logits.add(
                &ref_logits[t * vocab..(t + 1) * vocab],
                &state.logits[t * vocab..(t + 1) * vocab],
            );
        }
        if let Ok((shape, b, _)) = get(&format!("prompt.{p}.hidden")) {
            if shape != [layers_n + 1, prompt.len(), hidden] {
                return Err(bad(format!("prompt.{p}.hidden has shape {shape:?}")));
            }
            let all = f32s(&b);
            let per_layer: Vec<Vec<f32>> = all
                .chunks_exact(prompt.len() * hidden)
                .map(<[f32]>::to_vec)
                .collect();
            layer_errors(&per_layer, &fast.hidden, &mut layers);
        }
        if st.tensor(&format!("prompt.{p}.greedy")).is_ok() {
            let theirs = ids(&format!("prompt.{p}.greedy"))?;
            let ours = greedy_fast(model, pool, kernels, &prompt, theirs.len())?;
            agree += agreeing_prefix(&ours, &theirs);
            total += theirs.len();
        }
    }
    if prompts == 0 {
        return Err(bad(
            "no prompt.0.ids: not a tern reference file (fixtures/README.md)".into(),
        ));
    }
    Ok(Parity {
        against: "transformers".into(),
        prompts,
        positions: logits.positions,
        top1: logits.top1 as f64 / logits.positions.max(1) as f64,
        mean_kl: logits.kl / logits.positions.max(1) as f64,
        max_logit_abs: logits.max_abs,
        greedy_tokens: total,
        greedy_agreement: agree as f64 / total.max(1) as f64,
        layers,
    })
}
