//! Parity measurements for `tern verify`: the fast path against the reference forward
//! (`reference.rs`), and against transformers' outputs stored in a reference file.
//!
//! Bit-exact logits are not expected: every BitLinear re-quantizes its input to int8, and
//! a last-ulp difference in a float sum can move one value across a rounding boundary (a
//! "flip"), which then cascades through depth. So the verdict is layer-local: each layer of
//! the fast path is given the hidden states the reference gave its own layer, and its output
//! is compared with the reference's (likewise the head). Noise and isolated flips move the
//! output by a small fraction of what the layer adds; a wrong layer moves it by the whole
//! amount. End-to-end figures (top-1, KL, greedy agreement) are reported too; against
//! transformers they are judged against transformers' own disagreement with itself.

use serde::Serialize;

use crate::kernels::Kernels;
use crate::model::{Logits, Model, State};
use crate::pool::Pool;
use crate::reference::{self, Probe, Site};
use crate::sampling::argmax;
use crate::InferError;

/// Pass/fail limits, with documented defaults (docs/parity.md).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Thresholds {
    /// Largest error of one layer's (or the head's) output given the reference's input, as
    /// a fraction of what the layer adds: ‖fast − reference‖₂ / ‖reference out − in‖₂.
    pub max_layer_error: f64,
    /// Largest fraction of the int8 activations quantized from a layer's normed input
    /// (q/k/v's, which nothing before them in the layer can move) that may differ from the
    /// reference's: rounding flips. Later sites are reported, not judged: one flip there
    /// follows from an earlier one.
    pub max_flip_rate: f64,
    /// Fraction of positions whose argmax agrees with transformers (scaled down to
    /// transformers' own agreement with itself when the file records it).
    pub min_top1: f64,
    /// Mean KL(transformers ‖ ours) in nats (raised to a multiple of transformers' own
    /// disagreement when the file records it).
    pub max_kl: f64,
    /// Fraction of transformers' greedy tokens that the fast path predicts, teacher-forced,
    /// before the first disagreement (scaled down like `min_top1`).
    pub min_greedy: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_layer_error: 0.1,
            max_flip_rate: 0.002,
            min_top1: 0.9,
            max_kl: 0.01,
            min_greedy: 0.5,
        }
    }
}

impl Thresholds {
    /// Refuses limits that cannot be compared with (NaN) or are out of range.
    pub fn validate(&self) -> Result<(), InferError> {
        let fractions = [
            ("minimum top-1", self.min_top1),
            ("minimum greedy agreement", self.min_greedy),
            ("maximum flip rate", self.max_flip_rate),
        ];
        for (what, v) in fractions {
            if !(0.0..=1.0).contains(&v) {
                return Err(InferError::Input(format!(
                    "the {what} is {v}: a fraction from 0 to 1"
                )));
            }
        }
        for (what, v) in [
            ("maximum KL", self.max_kl),
            ("maximum layer error", self.max_layer_error),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(InferError::Input(format!(
                    "the {what} is {v}: a finite number, 0 or more"
                )));
            }
        }
        Ok(())
    }
}

/// One layer of the fast path (or its head) against the reference, given the same input.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LayerError {
    /// The layer's index; `layers` stands for the head.
    pub layer: usize,
    /// ‖fast − reference‖₂ / ‖reference out − in‖₂ (the head: / ‖reference logits‖₂).
    pub error: f64,
    pub max_abs: f32,
    /// int8 activations inside the layer that differ from the reference's, and how many
    /// were compared (None against transformers, whose activations are not stored).
    pub flips: Option<u64>,
    pub activations: u64,
    /// The largest difference of one int8 code, in activation steps.
    pub max_step: u8,
    /// Flips at each quantization site: q/k/v input, o_proj input, gate/up input, down
    /// input (a flip early in a layer moves the values quantized after it).
    pub site_flips: [u64; 4],
    /// Codes at the first site (q/k/v's input).
    pub input_activations: u64,
    /// The largest difference of one code at the first site, in activation steps.
    pub input_max_step: u8,
}

impl LayerError {
    /// Flips among q/k/v's input codes, which see the same input in both.
    fn input_flip_rate(&self) -> f64 {
        self.site_flips[0] as f64 / self.input_activations.max(1) as f64
    }
}

/// How closely the fast path follows a reference.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Parity {
    pub against: String,
    pub prompts: usize,
    pub positions: usize,
    /// Layer-local errors: entry `l` is layer `l`, the last entry the head.
    pub layers: Vec<LayerError>,
    /// End to end, flips cascading: fraction of positions whose argmax agrees.
    pub top1: f64,
    pub mean_kl: f64,
    pub max_logit_abs: f32,
    pub greedy_tokens: usize,
    /// Fraction of the greedy tokens the fast path predicts before the first disagreement.
    pub greedy_agreement: f64,
    /// Transformers' own disagreement (KV-cached decode against the full forward), where
    /// the reference file records it: the floor the end-to-end thresholds scale with.
    pub noise: Option<Noise>,
    /// Whether the end-to-end figures are judged (against transformers) or information.
    pub judge_end_to_end: bool,
}

/// The end-to-end limits a [`Parity`] is judged by (see [`Parity::end_to_end_limits`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct EndToEndLimits {
    pub min_top1: f64,
    pub max_kl: f64,
    pub min_greedy: f64,
}

/// Transformers' disagreement with itself on the same positions.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Noise {
    pub top1: f64,
    pub mean_kl: f64,
}

impl Parity {
    /// The thresholds this fails, as sentences naming the layer or figure.
    pub fn failures(&self, t: &Thresholds) -> Vec<String> {
        let mut f = Vec::new();
        let head = self.layers.len().saturating_sub(1);
        for e in &self.layers {
            let what = match e.layer {
                l if l == head => "the head".to_string(),
                l => format!("layer {l}"),
            };
            if e.error > t.max_layer_error || e.error.is_nan() {
                f.push(format!(
                    "{what} differs from {} given the same input: error {:.2e} of what it adds (> {:.2e})",
                    self.against, e.error, t.max_layer_error
                ));
            }
            if e.input_flip_rate() > t.max_flip_rate || e.input_max_step > 1 {
                f.push(format!(
                    "{what}: {} of {} int8 activations of q/k/v's input differ from {} given the same input (largest by {} steps): more than rounding noise",
                    e.site_flips[0], e.input_activations, self.against, e.input_max_step
                ));
            }
        }
        if !self.judge_end_to_end {
            return f;
        }
        let EndToEndLimits {
            min_top1,
            max_kl,
            min_greedy,
        } = self.end_to_end_limits(t);
        if self.top1 < min_top1 {
            f.push(format!(
                "top-1 agreement with {} is {:.1}% (< {:.1}%)",
                self.against,
                100.0 * self.top1,
                100.0 * min_top1
            ));
        }
        if self.mean_kl > max_kl || self.mean_kl.is_nan() {
            f.push(format!(
                "mean KL against {} is {:.2e} nats (> {:.2e})",
                self.against, self.mean_kl, max_kl
            ));
        }
        if self.greedy_tokens > 0 && self.greedy_agreement < min_greedy {
            f.push(format!(
                "greedy continuations agree with {} for {:.1}% of tokens (< {:.1}%)",
                self.against,
                100.0 * self.greedy_agreement,
                100.0 * min_greedy
            ));
        }
        f
    }

    /// Top-1, KL and greedy limits: the thresholds, widened to transformers' own noise
    /// when the file records it (4× its KL; its top-1 less 10 points, for top-1 and for
    /// greedy agreement alike: where transformers' argmax is not stable against itself,
    /// neither can another implementation's be).
    pub fn end_to_end_limits(&self, t: &Thresholds) -> EndToEndLimits {
        match self.noise {
            Some(n) => {
                let top1 = (n.top1 - 0.1).max(0.0);
                EndToEndLimits {
                    min_top1: t.min_top1.min(top1),
                    max_kl: t.max_kl.max(4.0 * n.mean_kl),
                    min_greedy: t.min_greedy.min(top1),
                }
            }
            None => EndToEndLimits {
                min_top1: t.min_top1,
                max_kl: t.max_kl,
                min_greedy: t.min_greedy,
            },
        }
    }
}

/// Records the int8 activations of one layer run by the fast path, unpadded, token-major.
struct Codes {
    widths: [usize; 4],
    codes: reference::LayerCodes,
}

impl Codes {
    fn new(model: &Model) -> Codes {
        let c = &model.config;
        let widths = [
            c.hidden_size,
            c.attn_dim(),
            c.hidden_size,
            c.intermediate_size,
        ]
        .map(|v| v as usize);
        Codes {
            widths,
            codes: Default::default(),
        }
    }
}

impl Probe for Codes {
    fn activations(&mut self, _layer: usize, site: Site, q: &[i8], padded: usize) {
        let width = self.widths[site.index()];
        for row in q.chunks_exact(padded) {
            self.codes[site.index()].extend_from_slice(&row[..width]);
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

    fn top1(&self) -> f64 {
        self.top1 as f64 / self.positions.max(1) as f64
    }

    fn mean_kl(&self) -> f64 {
        self.kl / self.positions.max(1) as f64
    }
}

/// Accumulates one layer's error over sequences: Σ‖fast − out‖², Σ‖out − in‖².
#[derive(Default)]
struct ErrorSum {
    diff: f64,
    base: f64,
    max_abs: f32,
}

impl ErrorSum {
    /// `base` is what the error is relative to (the layer's input, or zeros for the head).
    fn add(&mut self, fast: &[f32], out: &[f32], base: Option<&[f32]>) {
        for (i, (&a, &b)) in fast.iter().zip(out).enumerate() {
            let d = f64::from(a) - f64::from(b);
            let added = f64::from(b) - base.map_or(0.0, |x| f64::from(x[i]));
            self.diff += d * d;
            self.base += added * added;
            self.max_abs = self.max_abs.max(d.abs() as f32);
        }
    }

    fn finish(&self, layer: usize) -> LayerError {
        LayerError {
            layer,
            error: (self.diff / self.base.max(f64::MIN_POSITIVE)).sqrt(),
            max_abs: self.max_abs,
            ..Default::default()
        }
    }
}

/// Greedy continuation with the fast path (KV cache), `n` tokens, no stop tokens, and the
/// logits that chose each (`[n, vocab]`).
fn greedy_fast(
    model: &Model,
    pool: &Pool,
    kernels: Kernels,
    prompt: &[u32],
    n: usize,
) -> Result<(Vec<u32>, Vec<f32>), InferError> {
    let vocab = model.config.vocab_size as usize;
    let mut state = State::new(model, kernels, pool, prompt.len() + n)?;
    let (mut tokens, mut logits) = (Vec::with_capacity(n), Vec::with_capacity(n * vocab));
    let mut next = prompt;
    let mut token;
    for _ in 0..n {
        model.forward(
            pool,
            &mut state,
            next,
            Logits::Last,
            &mut reference::NoProbe,
        )?;
        logits.extend_from_slice(&state.logits[..vocab]);
        token = [argmax(&state.logits[..vocab]) as u32];
        tokens.push(token[0]);
        next = &token;
    }
    Ok((tokens, logits))
}

/// Logits `[tokens, vocab]` of every position of `seq` by the fast path, end to end.
fn fast_logits(
    model: &Model,
    pool: &Pool,
    kernels: Kernels,
    seq: &[u32],
) -> Result<Vec<f32>, InferError> {
    let vocab = model.config.vocab_size as usize;
    let mut state = State::new(model, kernels, pool, seq.len())?;
    model.forward(pool, &mut state, seq, Logits::All, &mut reference::NoProbe)?;
    state.logits.truncate(seq.len() * vocab);
    Ok(state.logits)
}

/// Tokens of `greedy` (predicted after `prompt_len − 1`) that `logits` predicts, teacher-
/// forced, before the first disagreement.
fn greedy_agreement(logits: &[f32], vocab: usize, prompt_len: usize, greedy: &[u32]) -> usize {
    greedy
        .iter()
        .enumerate()
        .take_while(|&(i, &tok)| {
            let t = prompt_len - 1 + i;
            argmax(&logits[t * vocab..(t + 1) * vocab]) as u32 == tok
        })
        .count()
}

/// Progress of a long check: `(done, total)` in steps (layers).
pub type Progress<'p> = &'p dyn Fn(u64, u64);

/// The fast path against the reference forward on `prompts`, each followed by the fast
/// path's own greedy continuation (`greedy` tokens, at least one). Layer by layer, each
/// fast layer gets the reference's input; the head gets the reference's final hidden state
/// of each prompt's last token. End to end, the logits that chose the continuation are
/// compared with the reference's at the same positions (both run the same sequence).
pub fn kernel_parity(
    model: &Model,
    pool: &Pool,
    kernels: Kernels,
    prompts: &[Vec<u32>],
    greedy: usize,
    progress: Progress,
) -> Result<Parity, InferError> {
    check_prompts(model, prompts)?;
    let (h, vocab, layers) = (
        model.config.hidden_size as usize,
        model.config.vocab_size as usize,
        model.layers.len(),
    );
    let greedy = greedy.max(1);
    let steps = layers as u64 + 2;
    // Each prompt and its continuation but the last token (whose successor is not compared).
    let (mut seqs, mut fast_logits) = (Vec::new(), Vec::new());
    for prompt in prompts {
        let (tokens, logits) = greedy_fast(model, pool, kernels, prompt, greedy)?;
        seqs.push([&prompt[..], &tokens[..greedy - 1]].concat());
        fast_logits.push((tokens, logits));
    }
    progress(1, steps);
    let max_len = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let mut state = State::new(model, kernels, pool, max_len)?;
    let mut x = reference::embed(model, &seqs);
    let mut table = Vec::with_capacity(layers + 1);
    for l in 0..layers {
        let (out, codes) = reference::layer(model, pool, l, &x)?;
        let mut sum = ErrorSum::default();
        let mut fast_codes = Codes::new(model);
        for (input, out) in x.iter().zip(&out) {
            let mut y = input.clone();
            model.forward_layer(pool, &mut state, l, &mut y, &mut fast_codes)?;
            sum.add(&y, out, Some(input));
        }
        let mut e = sum.finish(l);
        let (mut flips, mut total, mut step) = (0u64, 0u64, 0u8);
        for (site, (a, b)) in codes.iter().zip(&fast_codes.codes).enumerate() {
            for (&p, &q) in a.iter().zip(b) {
                let d = p.abs_diff(q);
                flips += u64::from(d != 0);
                e.site_flips[site] += u64::from(d != 0);
                if site == 0 {
                    e.input_max_step = e.input_max_step.max(d);
                }
                step = step.max(d);
            }
            total += a.len() as u64;
        }
        e.input_activations = codes[0].len() as u64;
        (e.flips, e.activations, e.max_step) = (Some(flips), total, step);
        table.push(e);
        x = out;
        progress(l as u64 + 2, steps);
    }
    let (mut head, mut stats) = (ErrorSum::default(), LogitStats::default());
    let (mut agree, mut total) = (0, 0);
    let mut fast_row = vec![0.0; vocab];
    for ((x, prompt), (tokens, fast)) in x.iter().zip(prompts).zip(&fast_logits) {
        // The positions whose logits chose the continuation: the prompt's last onwards.
        let normed = reference::final_norm(model, &x[(prompt.len() - 1) * h..]);
        let ref_logits = reference::head(model, pool, &normed);
        model.head_logits(pool, &state, &normed[..h], &mut fast_row)?;
        head.add(&fast_row, &ref_logits[..vocab], None);
        for (r, f) in ref_logits.chunks_exact(vocab).zip(fast.chunks_exact(vocab)) {
            stats.add(r, f);
        }
        agree += greedy_agreement(&ref_logits, vocab, 1, tokens);
        total += tokens.len();
    }
    table.push(head.finish(layers));
    progress(steps, steps);
    Ok(Parity {
        against: "the reference forward".into(),
        prompts: prompts.len(),
        positions: stats.positions,
        layers: table,
        top1: stats.top1(),
        mean_kl: stats.mean_kl(),
        max_logit_abs: stats.max_abs,
        greedy_tokens: total,
        greedy_agreement: agree as f64 / total.max(1) as f64,
        noise: None,
        judge_end_to_end: false,
    })
}

fn check_prompts(model: &Model, prompts: &[Vec<u32>]) -> Result<(), InferError> {
    if prompts.is_empty() {
        return Err(InferError::Input("no prompts to compare on".into()));
    }
    let vocab = model.config.vocab_size;
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(InferError::Input(format!("prompt {i} has no tokens")));
        }
        if let Some(bad) = p.iter().find(|&&t| u64::from(t) >= vocab) {
            return Err(InferError::Input(format!(
                "prompt {i} holds token id {bad}, outside the vocabulary of {vocab}"
            )));
        }
    }
    Ok(())
}

/// One prompt of a reference file, every tensor checked.
pub struct ReferencePrompt {
    pub ids: Vec<u32>,
    /// `[ids, vocab]`.
    pub logits: Vec<f32>,
    /// `[layers + 1, ids, hidden]` (the last entry after the final norm), if stored.
    pub hidden: Option<Vec<f32>>,
    /// Transformers' greedy continuation and the logits that chose each token
    /// (`[greedy, vocab]`), if stored.
    pub greedy: Option<(Vec<u32>, Option<Vec<f32>>)>,
    /// Transformers' KV-cached decode logits of the same positions, if stored: its noise.
    pub decode_logits: Option<Vec<f32>>,
}

/// Reads and validates a reference file (docs/parity.md): per prompt `prompt.{i}.ids` (I64
/// `[T]`), `.logits` (F32 `[T, vocab]`), optionally `.hidden` (F32 `[L+1, T, hidden]`),
/// `.greedy` (I64 `[N]`), `.greedy_logits` (F32 `[N, vocab]`), `.decode_logits` (F32
/// `[T, vocab]`). Every dtype, shape and id is checked; errors name the tensor.
pub fn read_reference(model: &Model, bytes: &[u8]) -> Result<Vec<ReferencePrompt>, InferError> {
    use safetensors::Dtype;
    let bad = |m: String| InferError::Input(format!("reference file: {m}"));
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let c = &model.config;
    let (vocab, hidden, layers) = (
        c.vocab_size as usize,
        c.hidden_size as usize,
        model.layers.len(),
    );
    let get = |name: &str, dtype: Dtype, shape: &[usize]| -> Result<Option<Vec<u8>>, InferError> {
        let Ok(t) = st.tensor(name) else {
            return Ok(None);
        };
        if t.dtype() != dtype {
            return Err(bad(format!(
                "{name} is {:?}, expected {dtype:?}",
                t.dtype()
            )));
        }
        if t.shape() != shape {
            return Err(bad(format!(
                "{name} has shape {:?}, expected {shape:?}",
                t.shape()
            )));
        }
        Ok(Some(t.data().to_vec())) // safetensors checked the length against the shape
    };
    let f32s = |b: Vec<u8>| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let ids = |name: &str, b: Vec<u8>| -> Result<Vec<u32>, InferError> {
        b.chunks_exact(8)
            .map(|c| {
                let v = i64::from_le_bytes(c.try_into().expect("8 bytes"));
                u32::try_from(v)
                    .ok()
                    .filter(|&v| (v as usize) < vocab)
                    .ok_or_else(|| bad(format!("{name} holds {v}, not a token id below {vocab}")))
            })
            .collect()
    };
    let mut prompts = Vec::new();
    for p in 0.. {
        let name = format!("prompt.{p}.ids");
        let Ok(t) = st.tensor(&name) else { break };
        let n = match t.shape() {
            [n] if *n > 0 => *n,
            s => {
                return Err(bad(format!(
                    "{name} has shape {s:?}, expected [T] with T > 0"
                )))
            }
        };
        let prompt_ids = ids(&name, get(&name, Dtype::I64, &[n])?.expect("present"))?;
        let tensor = |s: &str, shape: &[usize]| {
            get(&format!("prompt.{p}.{s}"), Dtype::F32, shape).map(|b| b.map(f32s))
        };
        let logits = tensor("logits", &[n, vocab])?
            .ok_or_else(|| bad(format!("prompt.{p}.logits is missing")))?;
        let hidden = tensor("hidden", &[layers + 1, n, hidden])?;
        let decode_logits = tensor("decode_logits", &[n, vocab])?;
        let gname = format!("prompt.{p}.greedy");
        let greedy = match st.tensor(&gname).map(|t| t.shape().to_vec()) {
            Err(_) => None,
            Ok(shape) => {
                let [g] = shape[..] else {
                    return Err(bad(format!("{gname} has shape {shape:?}, expected [N]")));
                };
                let tokens = ids(&gname, get(&gname, Dtype::I64, &[g])?.expect("present"))?;
                Some((tokens, tensor("greedy_logits", &[g, vocab])?))
            }
        };
        prompts.push(ReferencePrompt {
            ids: prompt_ids,
            logits,
            hidden,
            greedy,
            decode_logits,
        });
    }
    if prompts.is_empty() {
        return Err(bad(
            "no prompt.0.ids: not a tern reference file (docs/parity.md)".into(),
        ));
    }
    Ok(prompts)
}

/// The fast path against transformers' outputs (see [`read_reference`]): layer-local on
/// its hidden states, end to end on its logits of the prompt and of its greedy tokens
/// (teacher-forced), judged against its own noise where the file records it.
pub fn reference_parity(
    model: &Model,
    pool: &Pool,
    kernels: Kernels,
    reference: &[ReferencePrompt],
    progress: Progress,
) -> Result<Parity, InferError> {
    let (h, vocab, layers) = (
        model.config.hidden_size as usize,
        model.config.vocab_size as usize,
        model.layers.len(),
    );
    let mut stats = LogitStats::default();
    let mut noise = LogitStats::default();
    let mut sums: Vec<ErrorSum> = (0..=layers).map(|_| ErrorSum::default()).collect();
    let (mut agree, mut total, mut have_hidden) = (0, 0, false);
    let mut fast_row = vec![0.0; vocab];
    for (i, p) in reference.iter().enumerate() {
        let n = p.ids.len();
        // The prompt then transformers' greedy tokens but the last, in one forward.
        let mut seq = p.ids.clone();
        let mut ref_logits = p.logits.clone();
        if let Some((g, gl)) = &p.greedy {
            if let (Some(gl), Some((_, rest))) = (gl, g.split_last()) {
                seq.extend_from_slice(rest);
                ref_logits.extend_from_slice(&gl[vocab.min(gl.len())..]);
            }
        }
        let fast = fast_logits(model, pool, kernels, &seq)?;
        for (r, f) in ref_logits.chunks_exact(vocab).zip(fast.chunks_exact(vocab)) {
            stats.add(r, f);
        }
        if let Some((g, _)) = p.greedy.as_ref().filter(|(g, _)| !g.is_empty()) {
            agree += if seq.len() == n + g.len() - 1 {
                greedy_agreement(&fast, vocab, n, g)
            } else {
                // No greedy logits stored: the fast path's own free-running continuation.
                let (ours, _) = greedy_fast(model, pool, kernels, &p.ids, g.len())?;
                ours.iter().zip(g).take_while(|(a, b)| a == b).count()
            };
            total += g.len();
        }
        if let Some(d) = &p.decode_logits {
            for (a, b) in p.logits.chunks_exact(vocab).zip(d.chunks_exact(vocab)) {
                noise.add(a, b);
            }
        }
        if let Some(hs) = &p.hidden {
            have_hidden = true;
            let mut state = State::new(model, kernels, pool, n)?;
            let at = |l: usize| &hs[l * n * h..(l + 1) * n * h];
            for (l, sum) in sums.iter_mut().enumerate().take(layers) {
                let mut y = at(l).to_vec();
                model.forward_layer(pool, &mut state, l, &mut y, &mut reference::NoProbe)?;
                if l + 1 == layers {
                    // transformers' last hidden state is after the final norm.
                    model.final_norm_rows(&mut y);
                    sum.add(&y, at(l + 1), None);
                } else {
                    sum.add(&y, at(l + 1), Some(at(l)));
                }
            }
            for (xr, rr) in at(layers).chunks_exact(h).zip(p.logits.chunks_exact(vocab)) {
                model.head_logits(pool, &state, xr, &mut fast_row)?;
                sums[layers].add(&fast_row, rr, None);
            }
        }
        progress(i as u64 + 1, reference.len() as u64);
    }
    Ok(Parity {
        against: "transformers".into(),
        prompts: reference.len(),
        positions: stats.positions,
        layers: match have_hidden {
            true => sums.iter().enumerate().map(|(l, s)| s.finish(l)).collect(),
            false => Vec::new(),
        },
        top1: stats.top1(),
        mean_kl: stats.mean_kl(),
        max_logit_abs: stats.max_abs,
        greedy_tokens: total,
        greedy_agreement: agree as f64 / total.max(1) as f64,
        noise: (noise.positions > 0).then(|| Noise {
            top1: noise.top1(),
            mean_kl: noise.mean_kl(),
        }),
        judge_end_to_end: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parity(noise: Option<Noise>) -> Parity {
        Parity {
            against: "transformers".into(),
            prompts: 1,
            positions: 8,
            layers: vec![],
            top1: 0.0,
            mean_kl: 0.5,
            max_logit_abs: 1.0,
            greedy_tokens: 8,
            greedy_agreement: 0.0,
            noise,
            judge_end_to_end: true,
        }
    }

    #[test]
    fn end_to_end_limits_follow_transformers_own_noise() {
        let t = Thresholds::default();
        // No noise recorded: the thresholds as given, and this parity fails all three.
        let quiet = parity(None);
        assert_eq!(quiet.end_to_end_limits(&t).min_greedy, 0.5);
        assert_eq!(quiet.failures(&t).len(), 3);
        // A stable reference (top-1 100 % against itself) leaves them as they are.
        let stable = parity(Some(Noise {
            top1: 1.0,
            mean_kl: 1e-4,
        }));
        let l = stable.end_to_end_limits(&t);
        assert_eq!((l.min_top1, l.max_kl, l.min_greedy), (0.9, 0.01, 0.5));
        // A chaotic one (a deep random model: transformers' own argmax flips everywhere)
        // cannot ask another implementation for a stable argmax, but KL still bounds it.
        let chaotic = parity(Some(Noise {
            top1: 0.0,
            mean_kl: 0.39,
        }));
        let l = chaotic.end_to_end_limits(&t);
        assert_eq!((l.min_top1, l.min_greedy), (0.0, 0.0));
        assert!((l.max_kl - 1.56).abs() < 1e-9);
        assert!(chaotic.failures(&t).is_empty());
        let far = Parity {
            mean_kl: 2.0,
            ..chaotic
        };
        assert_eq!(far.failures(&t).len(), 1, "{:?}", far.failures(&t));
    }
}
