//! The model: weights borrowed from the memory-mapped `.tern` file, and the fast forward pass.
//!
//! To learn the network, read `reference.rs`: the whole forward in one sitting, one token at
//! a time. This file is the same network batched, threaded and on the SIMD kernels:
//! `Model::forward` embeds a batch, then per layer `attention_block` and `mlp_block`, then
//! the final norm and the head. Numerics: activations are f32; each BitLinear quantizes its
//! input per token to int8 (absmax, round half to even), takes exact integer dot products
//! with the ternary weights, then applies `weight_scale / activation_scale`. q/k/v share one
//! quantization, as do gate/up. `forward_layer` and `head_logits` run one piece alone, for
//! layer-local verification.

use std::sync::Mutex;

use tern_format::{Activation, Layout, ModelConfig, RopeStyle, TensorInfo, TernFile};

use crate::kernels::{AttendShape, GemmShape, Kernels, QuantRow};
use crate::pool::{split_range, Pool};
use crate::reference::{Probe, Site};
use crate::InferError;

/// A ternary matrix `[rows, cols]` in the TQ2 or TQ1 layout, borrowed from the file.
pub struct Ternary<'a> {
    pub name: String,
    pub layout: Layout,
    pub data: &'a [u8],
    pub rows: usize,
    pub cols: usize,
    /// Blocks per row (128 columns for TQ2, 160 for TQ1; 32 bytes each).
    pub blocks: usize,
    /// True weight = scale × trit.
    pub scale: f32,
    /// Added to each output row (`attention_bias` / `mlp_bias`), f32.
    pub bias: Option<Vec<f32>>,
}

impl Ternary<'_> {
    /// Columns per block of the layout.
    pub fn block_cols(&self) -> usize {
        match self.layout {
            Layout::Tq1 => tern_format::tq1::BLOCK_COLS,
            _ => tern_format::tq2::BLOCK_COLS,
        }
    }

    /// Length of the (zero-padded) int8 activation row the kernels read.
    pub fn act_len(&self) -> usize {
        self.blocks * self.block_cols()
    }

    /// Row stride of the quantized activations this matrix reads: `act_len` rounded up to
    /// the quantizer's multiple of 128 (TQ2: equal; TQ1 reads the first `act_len`).
    pub fn act_stride(&self) -> usize {
        self.act_len().div_ceil(128) * 128
    }

    /// Bytes of one packed row.
    pub fn row_bytes(&self) -> usize {
        self.blocks * 32
    }
}

/// Dense rows (embeddings, head) in their stored precision, borrowed from the file.
pub enum Dense<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    Bf16(&'a [u16]),
    /// Q8_ROW records: `[f32 scale][cols × i8][pad to 4]` per row (docs/format.md §6.4).
    Q8(&'a [u8]),
}

pub struct DenseMatrix<'a> {
    pub data: Dense<'a>,
    pub rows: usize,
    pub cols: usize,
}

impl DenseMatrix<'_> {
    /// Row `r` widened to f32.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let range = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            Dense::F32(w) => out.copy_from_slice(&w[range]),
            Dense::F16(w) => {
                for (o, &b) in out.iter_mut().zip(&w[range]) {
                    *o = half::f16::from_bits(b).to_f32();
                }
            }
            Dense::Bf16(w) => {
                for (o, &b) in out.iter_mut().zip(&w[range]) {
                    *o = half::bf16::from_bits(b).to_f32();
                }
            }
            Dense::Q8(w) => {
                let stride = crate::kernels::q8_stride(self.cols);
                tern_format::q8row::dequantize_row(&w[r * stride..(r + 1) * stride], out);
            }
        }
    }

    /// Bytes of one stored row.
    pub fn row_bytes(&self) -> usize {
        match self.data {
            Dense::F32(_) => 4 * self.cols,
            Dense::F16(_) | Dense::Bf16(_) => 2 * self.cols,
            Dense::Q8(_) => crate::kernels::q8_stride(self.cols),
        }
    }

    /// `out[r] = row r · x` for the rows `rows`.
    pub(crate) fn gemv(
        &self,
        k: &Kernels,
        rows: std::ops::Range<usize>,
        x: &[f32],
        out: &mut [f32],
    ) {
        let range = rows.start * self.cols..rows.end * self.cols;
        match &self.data {
            Dense::F32(w) => k.f32_gemv(&w[range], self.cols, x, out),
            Dense::F16(w) => k.f16_gemv(&w[range], self.cols, x, out),
            Dense::Bf16(w) => k.bf16_gemv(&w[range], self.cols, x, out),
            Dense::Q8(w) => {
                let stride = crate::kernels::q8_stride(self.cols);
                k.q8_gemv(
                    &w[rows.start * stride..rows.end * stride],
                    self.cols,
                    x,
                    out,
                )
            }
        }
    }

    /// [`Self::gemv`] for `n` activation rows at once (`x` holds `n · cols`): token `t`'s
    /// results go to `out[t · len..(t + 1) · len]`, `len = rows.len()`, bit for bit what
    /// `gemv` gives. bf16 rows are read once for all tokens (`Kernels::bf16_gemm`); other
    /// precisions run every token over groups of rows small enough to stay in L2.
    pub(crate) fn gemm(
        &self,
        k: &Kernels,
        rows: std::ops::Range<usize>,
        x: &[f32],
        n: usize,
        out: &mut [f32],
    ) {
        const GROUP: usize = 32;
        let (len, cols) = (rows.len(), self.cols);
        if let Dense::Bf16(w) = &self.data {
            return k.bf16_gemm(&w[rows.start * cols..rows.end * cols], cols, x, n, out);
        }
        for g in rows.clone().step_by(GROUP) {
            let group = g..(g + GROUP).min(rows.end);
            let at = group.start - rows.start;
            for t in 0..n {
                let out = &mut out[t * len + at..t * len + at + group.len()];
                self.gemv(k, group.clone(), &x[t * cols..(t + 1) * cols], out);
            }
        }
    }
}

/// A linear kept dense (the config's `dense_linears`, transformers' `modules_to_not_convert`):
/// `y = W·x + bias` in f32 on the unquantized activations.
pub struct DenseLinear<'a> {
    pub name: String,
    pub matrix: DenseMatrix<'a>,
    pub bias: Option<Vec<f32>>,
}

/// One linear of a block: ternary (BitLinear), or kept dense.
pub enum Linear<'a> {
    Ternary(Ternary<'a>),
    Dense(DenseLinear<'a>),
}

impl Linear<'_> {
    /// Bytes of weights one token reads.
    pub fn weight_bytes(&self) -> usize {
        match self {
            Linear::Ternary(t) => t.data.len(),
            Linear::Dense(d) => d.matrix.rows * d.matrix.row_bytes(),
        }
    }
}

pub struct Layer<'a> {
    pub input_norm: Vec<f32>,
    pub q: Linear<'a>,
    pub k: Linear<'a>,
    pub v: Linear<'a>,
    pub attn_sub_norm: Option<Vec<f32>>,
    pub o: Linear<'a>,
    pub post_attn_norm: Vec<f32>,
    pub gate: Linear<'a>,
    pub up: Linear<'a>,
    pub ffn_sub_norm: Option<Vec<f32>>,
    pub down: Linear<'a>,
}

/// A model ready to run. Ternary and dense weights are views into the mapping; only the
/// norm weights (a few KB per layer) are widened to f32 at load.
pub struct Model<'a> {
    pub config: ModelConfig,
    pub embed: DenseMatrix<'a>,
    /// The output head: `embed` again when tied.
    pub head: DenseMatrix<'a>,
    pub layers: Vec<Layer<'a>>,
    pub final_norm: Vec<f32>,
    /// RoPE inverse frequencies, f32 as transformers computes them.
    pub inv_freq: Vec<f32>,
}

fn norm_vector(file: &TernFile, t: &TensorInfo) -> Result<Vec<f32>, InferError> {
    Ok(match t.layout {
        Some(Layout::F32) => file.view_f32(t)?.to_vec(),
        Some(Layout::F16) => file
            .view_u16(t)?
            .iter()
            .map(|&b| half::f16::from_bits(b).to_f32())
            .collect(),
        Some(Layout::Bf16) => file
            .view_u16(t)?
            .iter()
            .map(|&b| half::bf16::from_bits(b).to_f32())
            .collect(),
        other => {
            return Err(InferError::Unsupported(format!(
                "norm {} has layout {other:?}",
                t.name
            )))
        }
    })
}

fn dense<'a>(file: &'a TernFile, t: &TensorInfo) -> Result<DenseMatrix<'a>, InferError> {
    let data = match t.layout {
        Some(Layout::F32) => Dense::F32(file.view_f32(t)?),
        Some(Layout::F16) => Dense::F16(file.view_u16(t)?),
        Some(Layout::Bf16) => Dense::Bf16(file.view_u16(t)?),
        Some(Layout::Q8Row) => Dense::Q8(file.data(t)),
        other => {
            return Err(InferError::Unsupported(format!(
                "{} has layout {other:?}",
                t.name
            )))
        }
    };
    Ok(DenseMatrix {
        data,
        rows: t.shape[0] as usize,
        cols: t.shape[1] as usize,
    })
}

/// The matrix `{module}.weight` (ternary, or dense when the config keeps it so) and, when
/// the config says so, its `{module}.bias`.
fn linear<'a>(file: &'a TernFile, module: &str, bias: bool) -> Result<Linear<'a>, InferError> {
    let weight = file.require(&format!("{module}.weight"))?;
    let bias = match bias {
        true => Some(norm_vector(file, file.require(&format!("{module}.bias"))?)?),
        false => None,
    };
    Ok(if file.metadata().config.is_dense_linear(module) {
        Linear::Dense(DenseLinear {
            name: weight.name.clone(),
            matrix: dense(file, weight)?,
            bias,
        })
    } else {
        Linear::Ternary(Ternary {
            bias,
            ..ternary(file, weight)?
        })
    })
}

fn ternary<'a>(file: &'a TernFile, t: &TensorInfo) -> Result<Ternary<'a>, InferError> {
    let layout = match t.layout {
        Some(l @ (Layout::Tq2 | Layout::Tq1)) => l,
        other => {
            return Err(InferError::Unsupported(format!(
                "{} has layout {other:?}; this build runs TQ2 and TQ1",
                t.name
            )))
        }
    };
    let cols = t.shape[1] as usize;
    let blocks = match layout {
        Layout::Tq1 => tern_format::tq1::blocks(cols as u64),
        _ => tern_format::tq2::blocks(cols as u64),
    };
    Ok(Ternary {
        name: t.name.clone(),
        layout,
        data: file.data(t),
        rows: t.shape[0] as usize,
        cols,
        blocks: blocks as usize,
        scale: t.scale,
        bias: None,
    })
}

impl<'a> Model<'a> {
    /// Builds the model from views into the file (validated at open). Copies no weights.
    pub fn load(file: &'a TernFile) -> Result<Model<'a>, InferError> {
        let config = file.metadata().config.clone();
        let get = |name: &str| file.require(name).map_err(InferError::from);
        let embed = dense(file, get("model.embed_tokens.weight")?)?;
        let head = if config.tie_word_embeddings {
            dense(file, get("model.embed_tokens.weight")?)?
        } else {
            dense(file, get("lm_head.weight")?)?
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers as usize);
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let t = |s: &str| get(&format!("{p}.{s}.weight"));
            let (ab, mb) = (config.attention_bias, config.mlp_bias);
            let lin = |s: &str, bias: bool| linear(file, &format!("{p}.{s}"), bias);
            layers.push(Layer {
                input_norm: norm_vector(file, t("input_layernorm")?)?,
                q: lin("self_attn.q_proj", ab)?,
                k: lin("self_attn.k_proj", ab)?,
                v: lin("self_attn.v_proj", ab)?,
                attn_sub_norm: match config.attn_sub_norm {
                    true => Some(norm_vector(file, t("self_attn.attn_sub_norm")?)?),
                    false => None,
                },
                o: lin("self_attn.o_proj", ab)?,
                post_attn_norm: norm_vector(file, t("post_attention_layernorm")?)?,
                gate: lin("mlp.gate_proj", mb)?,
                up: lin("mlp.up_proj", mb)?,
                ffn_sub_norm: match config.ffn_sub_norm {
                    true => Some(norm_vector(file, t("mlp.ffn_sub_norm")?)?),
                    false => None,
                },
                down: lin("mlp.down_proj", mb)?,
            });
        }
        let final_norm = norm_vector(file, get("model.norm.weight")?)?;
        let inv_freq = config.rope_inv_freq();
        Ok(Model {
            config,
            embed,
            head,
            layers,
            final_norm,
            inv_freq,
        })
    }

    /// Bytes of weights read to decode one token (every linear, the head).
    pub fn weight_bytes_per_token(&self) -> u64 {
        let linears: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                    .iter()
                    .map(|w| w.weight_bytes())
                    .sum::<usize>()
            })
            .sum();
        (linears + self.head.rows * self.head.row_bytes()) as u64
    }
}

/// What one forward call should return besides updating the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Logits of the last token only (generation).
    Last,
    /// Logits of every token of the batch (verification).
    All,
}

/// Tokens per forward call in prefill; longer prompts are processed in chunks.
pub const PREFILL_CHUNK: usize = 64;

/// Keys and values of every layer, each `[layers, ctx, kv_dim]`.
pub(crate) struct KvCache {
    keys: Vec<f32>,
    values: Vec<f32>,
    ctx: usize,
    kv: usize,
}

impl KvCache {
    /// Layer `l`'s keys and values, `[ctx, kv_dim]` each.
    pub(crate) fn layer(&self, l: usize) -> (&[f32], &[f32]) {
        let r = l * self.ctx * self.kv..(l + 1) * self.ctx * self.kv;
        (&self.keys[r.clone()], &self.values[r])
    }

    pub(crate) fn store(&mut self, l: usize, pos: usize, k: &[f32], v: &[f32]) {
        let at = (l * self.ctx + pos) * self.kv;
        self.keys[at..at + self.kv].copy_from_slice(k);
        self.values[at..at + self.kv].copy_from_slice(v);
    }
}

/// Where the tokens of a batch keep their keys and values.
pub(crate) enum Caches<'a, 'b> {
    /// Consecutive tokens of one sequence: token `t` is at position `pos0 + t` of `cache`.
    One { cache: &'a mut KvCache, pos0: usize },
    /// Batched decode: token `t` is the next token of sequence `seqs[t]`.
    Each(&'a mut [&'b mut State]),
}

impl Caches<'_, '_> {
    /// Stores token `t`'s key and value of layer `l`.
    fn store(&mut self, l: usize, t: usize, k: &[f32], v: &[f32]) {
        match self {
            Caches::One { cache, pos0 } => cache.store(l, *pos0 + t, k, v),
            Caches::Each(seqs) => {
                let st = &mut *seqs[t];
                st.cache.store(l, st.pos, k, v);
            }
        }
    }

    /// Token `t`'s cached keys and values of layer `l`, and how many positions it sees.
    fn layer(&self, l: usize, t: usize) -> (&[f32], &[f32], usize) {
        let (cache, pos) = match self {
            Caches::One { cache, pos0 } => (&**cache, *pos0 + t),
            Caches::Each(seqs) => (&seqs[t].cache, seqs[t].pos),
        };
        let (keys, values) = cache.layer(l);
        (keys, values, pos + 1)
    }

    /// Tokens the attention heads are grouped for: all `n` of one sequence; one for batched
    /// decode, so that each sequence's heads are grouped (and computed) as when it is alone.
    fn grouping_tokens(&self, n: usize) -> usize {
        match self {
            Caches::One { .. } => n,
            Caches::Each(_) => 1,
        }
    }
}

/// The int8 activations of the last quantization, and the products of the matrix calls
/// that read them.
pub(crate) struct Quantized {
    pub(crate) kernels: Kernels,
    /// The int8 activations are `codes[codes_at..]`, 64-byte aligned (rows are multiples of
    /// 128): a 32-byte load of them never straddles two cache lines (measured: the TQ2 GEMM,
    /// which loads each activation block once per weight row, ran ~10 % slower without).
    codes: Vec<i8>,
    codes_at: usize,
    /// Row stride of `codes` as last quantized: the `act_stride` of the consuming matrices.
    pub(crate) stride: usize,
    pub(crate) rows: Vec<QuantRow>,
    pub(crate) sums: Vec<i32>,
    /// Products of the last matrix call, `[rows, n]` in pieces (see `bitlinear`).
    pub(crate) acc: Vec<i32>,
}

/// Working memory of one batch of at most [`PREFILL_CHUNK`] tokens, apart from the cache.
pub(crate) struct Scratch {
    pub(crate) kernels: Kernels,
    /// The residual stream, `[batch, hidden]`.
    pub(crate) x: Vec<f32>,
    /// Normed input of a block, then the output of its last matrix.
    pub(crate) xn: Vec<f32>,
    pub(crate) q: Vec<f32>,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    pub(crate) att_out: Vec<f32>,
    pub(crate) gate: Vec<f32>,
    pub(crate) up: Vec<f32>,
    /// Rotary `(sin, cos)` of the batch's positions, `[batch, head_dim / 2]`.
    pub(crate) angles: Vec<(f32, f32)>,
    /// One row of attention scores per query head of a KV group, per worker of the pool.
    pub(crate) scores: Vec<Mutex<Vec<f32>>>,
    pub(crate) quant: Quantized,
}

/// The KV cache and every scratch buffer, allocated once for a context length and a pool:
/// `forward` allocates nothing, and refuses a pool of another size.
pub struct State {
    pub ctx: usize,
    pub pos: usize,
    /// Workers of the pool the per-worker buffers were sized for.
    threads: usize,
    pub(crate) cache: KvCache,
    pub(crate) scratch: Scratch,
    /// Logits, `[ctx, vocab]`: with [`Logits::Last`] only the first row is written.
    pub logits: Vec<f32>,
}

/// Every id of `tokens` is inside the model's vocabulary.
pub(crate) fn check_vocab(config: &ModelConfig, tokens: &[u32]) -> Result<(), InferError> {
    let vocab = config.vocab_size as usize;
    match tokens.iter().find(|&&t| t as usize >= vocab) {
        Some(&id) => Err(InferError::TokenOutOfVocab { id, vocab }),
        None => Ok(()),
    }
}

/// A zeroed buffer of `n` values; `None` (an overflowed size) is an error naming `what`.
fn zeroed<T: Clone + Default>(n: Option<usize>, what: &str) -> Result<Vec<T>, InferError> {
    let bytes = n.and_then(|n| n.checked_mul(std::mem::size_of::<T>()));
    match (n, bytes) {
        (Some(n), Some(b)) if b <= isize::MAX as usize => Ok(vec![T::default(); n]),
        _ => Err(InferError::Input(format!(
            "the {what} of this context length does not fit in memory"
        ))),
    }
}

impl State {
    /// Buffers for `ctx` positions run on `pool` (its worker count is remembered).
    /// Zeroed allocations are lazily backed: the cache and logits cost memory as they fill.
    pub fn new(
        model: &Model,
        kernels: Kernels,
        pool: &Pool,
        ctx: usize,
    ) -> Result<State, InferError> {
        let c = &model.config;
        // Every caller bounds its own option with a better name for it; this is the
        // backstop for contexts that come from data (verify's prompt files).
        crate::limits::check_ctx(c, ctx.max(1), pool.threads(), "a context of")?;
        let (h, kv, attn, inter, vocab) = (
            c.hidden_size as usize,
            c.kv_dim() as usize,
            c.attn_dim() as usize,
            c.intermediate_size as usize,
            c.vocab_size as usize,
        );
        let b = PREFILL_CHUNK;
        // Query heads per KV head: attention keeps one row of scores for each.
        let group = (c.num_attention_heads / c.num_key_value_heads.max(1)).max(1) as usize;
        let widest = h.max(attn).max(inter);
        // Room for a TQ2 (128-column) or TQ1 (160-column, then to 128) padded row.
        let padded = widest.div_ceil(160) * 160;
        let padded = padded.div_ceil(128) * 128;
        let rows = attn.max(kv).max(inter).max(h);
        let codes = vec![0i8; b * padded + 63];
        let codes_at = Some(codes.as_ptr().align_offset(64)).filter(|&a| a < 64);
        let codes_at = codes_at.unwrap_or(0);
        let cache_len = model
            .layers
            .len()
            .checked_mul(ctx)
            .and_then(|n| n.checked_mul(kv));
        let scores = (0..pool.threads())
            .map(|_| zeroed(group.checked_mul(ctx), "attention scores").map(Mutex::new))
            .collect::<Result<_, _>>()?;
        Ok(State {
            ctx,
            pos: 0,
            threads: pool.threads(),
            cache: KvCache {
                keys: zeroed(cache_len, "KV cache")?,
                values: zeroed(cache_len, "KV cache")?,
                ctx,
                kv,
            },
            scratch: Scratch {
                kernels,
                x: vec![0.0; b * h],
                xn: vec![0.0; b * widest],
                q: vec![0.0; b * attn],
                k: vec![0.0; b * kv],
                v: vec![0.0; b * kv],
                att_out: vec![0.0; b * attn],
                gate: vec![0.0; b * inter],
                up: vec![0.0; b * inter],
                angles: vec![(0.0, 0.0); b * model.inv_freq.len()],
                scores,
                quant: Quantized {
                    kernels,
                    codes_at,
                    codes,
                    stride: 0,
                    rows: vec![QuantRow { scale: 0.0, sum: 0 }; b],
                    sums: vec![0; b],
                    acc: vec![0; b * rows],
                },
            },
            logits: zeroed(ctx.checked_mul(vocab), "logits")?,
        })
    }

    /// Forgets the conversation: the next token is at position 0.
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// The kernels this state runs.
    pub fn kernels(&self) -> Kernels {
        self.scratch.kernels
    }

    /// Refuses a pool other than the one the per-worker buffers were sized for, and a run
    /// of `n` tokens past the context.
    pub(crate) fn check(&self, pool: &Pool, n: usize) -> Result<(), InferError> {
        if pool.threads() != self.threads {
            return Err(InferError::Input(format!(
                "this state was made for a pool of {} threads, not {}",
                self.threads,
                pool.threads()
            )));
        }
        if self.pos + n > self.ctx {
            return Err(InferError::ContextFull {
                ctx: self.ctx,
                needed: self.pos + n,
            });
        }
        Ok(())
    }
}

/// RMSNorm as transformers computes it: `w · (x · rsqrt(mean(x²) + eps))`, in f32.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    for (v, w) in x.iter_mut().zip(weight) {
        *v = w * (*v * inv);
    }
}

/// Rotates one head in place by the angles of its position (`(sin, cos)` per frequency).
/// rotate_half (Hugging Face): element j pairs with j + d/2; interleaved (Meta): 2j with
/// 2j + 1.
pub(crate) fn rope(head: &mut [f32], angles: &[(f32, f32)], style: RopeStyle) {
    let half = head.len() / 2;
    for (i, &(sin, cos)) in angles.iter().enumerate() {
        let (ia, ib) = match style {
            RopeStyle::RotateHalf => (i, i + half),
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
        };
        let (a, b) = (head[ia], head[ib]);
        head[ia] = a * cos - b * sin;
        head[ib] = b * cos + a * sin;
    }
}

/// Runs `f(worker, rows, out)` on every worker, each given a disjoint range of rows (a
/// multiple of `align`) and that range's slice of `out` (`row_len` values per row).
pub(crate) fn par_rows<T: Send>(
    pool: &Pool,
    out: &mut [T],
    rows: usize,
    row_len: usize,
    align: usize,
    f: impl Fn(usize, std::ops::Range<usize>, &mut [T]) + Sync,
) {
    if rows <= align {
        f(0, 0..rows, &mut out[..rows * row_len]); // one piece: not worth waking the workers
        return;
    }
    // Several pieces per worker, claimed as workers become free (see `Pool::run_chunks`).
    let parts = if pool.threads() > 1 {
        4 * pool.threads()
    } else {
        1
    };
    pool.run_chunks(
        &mut out[..rows * row_len],
        align * row_len,
        parts,
        |w, r, part| {
            if !r.is_empty() {
                f(w, r.start / row_len..r.end / row_len, part);
            }
        },
    );
}

/// `out[t] = rms_norm(x[t])` for `n` rows of `width`, the rows split among the workers.
pub(crate) fn norm_rows(
    pool: &Pool,
    out: &mut [f32],
    x: &[f32],
    n: usize,
    width: usize,
    w: &[f32],
    eps: f32,
) {
    par_rows(pool, out, n, width, 1, |_, ts, out| {
        for (t, row) in ts.zip(out.chunks_exact_mut(width)) {
            row.copy_from_slice(&x[t * width..(t + 1) * width]);
            rms_norm(row, w, eps);
        }
    });
}

/// `x += y` over the first `len` values: the residual connection.
pub(crate) fn add_residual(x: &mut [f32], y: &[f32], len: usize) {
    for (xv, o) in x[..len].iter_mut().zip(&y[..len]) {
        *xv += o;
    }
}

impl Quantized {
    /// The int8 activations (see `codes`).
    fn codes(&self) -> &[i8] {
        &self.codes[self.codes_at..]
    }

    /// Quantizes `n` rows of `width` activations from `src`, rows padded with zeros to
    /// `padded` (the consumer's [`Ternary::act_stride`]).
    pub(crate) fn quantize(&mut self, src: &[f32], n: usize, width: usize, padded: usize) {
        self.stride = padded;
        for t in 0..n {
            let row = self.kernels.quantize_row(
                &src[t * width..(t + 1) * width],
                &mut self.codes[self.codes_at + t * padded..self.codes_at + (t + 1) * padded],
            );
            self.sums[t] = row.sum;
            self.rows[t] = row;
        }
    }

    /// Quantizes the `n` rows of `src` that the linears of `group` read (for the first
    /// ternary one's padding) and shows them to `probe`; a group of dense linears reads no
    /// int8 activations, and any earlier quantization is forgotten.
    pub(crate) fn prepare(
        &mut self,
        group: &[&Linear],
        src: &[f32],
        n: usize,
        width: usize,
        (probe, layer, site): (&mut dyn Probe, usize, Site),
    ) {
        let first = group.iter().find_map(|w| match w {
            Linear::Ternary(t) => Some(t),
            Linear::Dense(_) => None,
        });
        match first {
            Some(t) => {
                self.quantize(src, n, width, t.act_stride());
                probe.activations(layer, site, &self.codes()[..n * self.stride], self.stride);
            }
            None => self.stride = 0,
        }
    }

    /// `out[t] = w · src[t]` for the `n` rows of `src` (`width` wide), after [`Self::prepare`].
    pub(crate) fn linear(
        &mut self,
        pool: &Pool,
        w: &Linear,
        n: usize,
        src: &[f32],
        width: usize,
        out: &mut [f32],
    ) {
        match w {
            Linear::Ternary(t) => self.bitlinear(pool, t, n, src, width, out),
            Linear::Dense(d) => {
                let (rows, kernels) = (d.matrix.rows, self.kernels);
                for t in 0..n {
                    let x = &src[t * width..(t + 1) * width];
                    let o = &mut out[t * rows..(t + 1) * rows];
                    par_rows(pool, o, rows, 1, 16, |_, r, o| {
                        d.matrix.gemv(&kernels, r, x, o)
                    });
                    if let Some(b) = &d.bias {
                        for (o, b) in o.iter_mut().zip(b) {
                            *o += b;
                        }
                    }
                }
            }
        }
    }

    /// `out[t, r] = scale · (Σ trit · q) / s_t` for the `n` rows of `src` (`width` wide)
    /// quantized last. If the last quantization was padded for another layout (a file that
    /// mixes TQ2 and TQ1 in one group), `src` is quantized again: same values, new padding.
    fn bitlinear(
        &mut self,
        pool: &Pool,
        w: &Ternary,
        n: usize,
        src: &[f32],
        width: usize,
        out: &mut [f32],
    ) {
        let padded = w.act_stride();
        if self.stride != padded {
            self.quantize(src, n, width, padded);
        }
        let kernels = self.kernels;
        let qact = &self.codes[self.codes_at..self.codes_at + n * padded];
        let qsums = &self.sums[..n];
        let row_bytes = w.row_bytes();
        // Rows are cut into pieces of whole 4-row groups, claimed by the workers as they
        // become free; piece `c` (rows `rc`) holds its products as `[n, rc.len()]` in
        // `acc[n · rc.start..n · rc.end]`, i.e. `acc` is `[rows, n]` in pieces.
        let parts = if pool.threads() > 1 {
            4 * pool.threads()
        } else {
            1
        };
        let piece_rows = |c: usize| {
            let r = split_range(n * w.rows, 4 * n, c, parts);
            r.start / n..r.end / n
        };
        pool.run_chunks(&mut self.acc[..n * w.rows], 4 * n, parts, |_, r, part| {
            let rw = &w.data[r.start / n * row_bytes..r.end / n * row_bytes];
            let q1 = &qact[..w.act_len()]; // one token: the GEMV reads exactly act_len
            let sh = GemmShape {
                blocks: w.blocks,
                rows: r.len() / n,
                tokens: n,
                q_stride: padded,
            };
            match (w.layout, n) {
                (Layout::Tq1, 1) => kernels.tq1_gemv(rw, w.blocks, q1, qsums[0], part),
                (Layout::Tq1, _) => kernels.tq1_gemm(rw, sh, qact, qsums, part),
                (_, 1) => kernels.tq2_gemv(rw, w.blocks, q1, qsums[0], part),
                _ => kernels.tq2_gemm(rw, sh, qact, qsums, part),
            }
        });
        // out[t, r] = acc / s_t · scale, gathering each token's row from the pieces.
        let (acc, qrows) = (&self.acc, &self.rows);
        let dequantize = |tokens: std::ops::Range<usize>, out: &mut [f32]| {
            for (t, o) in tokens.zip(out.chunks_exact_mut(w.rows)) {
                let s = qrows[t].scale;
                for c in 0..parts {
                    let rc = piece_rows(c);
                    let len = rc.len();
                    let a = &acc[n * rc.start + t * len..n * rc.start + (t + 1) * len];
                    match &w.bias {
                        None => {
                            for (o, &a) in o[rc].iter_mut().zip(a) {
                                *o = a as f32 / s * w.scale;
                            }
                        }
                        Some(b) => {
                            for ((o, &a), b) in o[rc.clone()].iter_mut().zip(a).zip(&b[rc]) {
                                *o = a as f32 / s * w.scale + b;
                            }
                        }
                    }
                }
            }
        };
        par_rows(pool, out, n, w.rows, 1, |_, t, out| dequantize(t, out));
    }
}

impl Model<'_> {
    /// Runs `tokens` (at positions `state.pos..`) through the network, appending to the KV
    /// cache. Logits land in `state.logits`. `probe` sees hidden states and int8 activations
    /// (for verification; pass `&mut NoProbe` otherwise).
    pub fn forward(
        &self,
        pool: &Pool,
        state: &mut State,
        tokens: &[u32],
        want: Logits,
        probe: &mut dyn Probe,
    ) -> Result<(), InferError> {
        check_vocab(&self.config, tokens)?;
        state.check(pool, tokens.len())?;
        let vocab = self.config.vocab_size as usize;
        for (i, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
            let last = (i + 1) * PREFILL_CHUNK >= tokens.len();
            let logits_at = match want {
                Logits::All => Some((0..chunk.len(), i * PREFILL_CHUNK)),
                Logits::Last if last => Some((chunk.len() - 1..chunk.len(), 0)),
                Logits::Last => None,
            };
            self.forward_batch(pool, state, chunk, probe);
            if let Some((rows, first)) = logits_at {
                let h = self.config.hidden_size as usize;
                for (i, t) in rows.enumerate() {
                    let x = &state.scratch.x[t * h..(t + 1) * h];
                    let out = &mut state.logits[(first + i) * vocab..(first + i + 1) * vocab];
                    self.head_row(pool, state.scratch.kernels, x, out);
                }
            }
        }
        Ok(())
    }

    /// One batch of at most [`PREFILL_CHUNK`] tokens through every layer and the final norm,
    /// leaving the normed hidden states in `scratch.x`.
    fn forward_batch(&self, pool: &Pool, st: &mut State, tokens: &[u32], probe: &mut dyn Probe) {
        let (n, h) = (tokens.len(), self.config.hidden_size as usize);
        let s = &mut st.scratch;
        for (t, &tok) in tokens.iter().enumerate() {
            self.embed
                .row_f32(tok as usize, &mut s.x[t * h..(t + 1) * h]);
        }
        s.set_angles(&self.inv_freq, st.pos, n);
        for (l, layer) in self.layers.iter().enumerate() {
            probe.hidden(l, &s.x[..n * h]);
            let mut caches = Caches::One {
                cache: &mut st.cache,
                pos0: st.pos,
            };
            self.attention_block(pool, l, s, &mut caches, n, probe);
            self.mlp_block(pool, l, layer, s, n, probe);
        }
        self.final_norm_rows(&mut s.x[..n * h]);
        probe.hidden(self.layers.len(), &s.x[..n * h]);
        st.pos += n;
    }

    /// `x += o_proj(attention(q, k, v))` with q, k, v from one quantization of the normed
    /// input; the new keys and values of layer `l` go to the token's cache (see [`Caches`]).
    pub(crate) fn attention_block(
        &self,
        pool: &Pool,
        l: usize,
        s: &mut Scratch,
        caches: &mut Caches,
        n: usize,
        probe: &mut dyn Probe,
    ) {
        let (c, layer) = (&self.config, &self.layers[l]);
        let (h, d, eps) = (
            c.hidden_size as usize,
            c.head_dim as usize,
            c.rms_norm_eps as f32,
        );
        let (attn, kv, half) = (c.attn_dim() as usize, c.kv_dim() as usize, d / 2);
        let Scratch {
            x,
            xn,
            q,
            k,
            v,
            angles,
            quant,
            ..
        } = s;
        norm_rows(pool, xn, x, n, h, &layer.input_norm, eps);
        let group = [&layer.q, &layer.k, &layer.v];
        quant.prepare(&group, xn, n, h, (probe, l, Site::Attention));
        quant.linear(pool, &layer.q, n, xn, h, q);
        quant.linear(pool, &layer.k, n, xn, h, k);
        quant.linear(pool, &layer.v, n, xn, h, v);
        for t in 0..n {
            let at = &angles[t * half..(t + 1) * half];
            for head in q[t * attn..(t + 1) * attn].chunks_exact_mut(d) {
                rope(head, at, c.rope_style);
            }
            for head in k[t * kv..(t + 1) * kv].chunks_exact_mut(d) {
                rope(head, at, c.rope_style);
            }
            caches.store(l, t, &k[t * kv..(t + 1) * kv], &v[t * kv..(t + 1) * kv]);
        }
        self.attention(pool, s, caches, l, n);
        let Scratch {
            x,
            xn,
            att_out,
            quant,
            ..
        } = s;
        if let Some(w) = &layer.attn_sub_norm {
            par_rows(pool, att_out, n, attn, 1, |_, _, rows| {
                for row in rows.chunks_exact_mut(attn) {
                    rms_norm(row, w, eps);
                }
            });
        }
        let site = (probe, l, Site::AttentionOutput);
        quant.prepare(&[&layer.o], att_out, n, attn, site);
        quant.linear(pool, &layer.o, n, att_out, attn, xn);
        add_residual(x, xn, n * h);
    }

    /// `x += down(sub_norm(act(gate) · up))` with gate and up from one quantization of the
    /// normed input.
    pub(crate) fn mlp_block(
        &self,
        pool: &Pool,
        l: usize,
        layer: &Layer,
        s: &mut Scratch,
        n: usize,
        probe: &mut dyn Probe,
    ) {
        let c = &self.config;
        let (h, inter, eps) = (
            c.hidden_size as usize,
            c.intermediate_size as usize,
            c.rms_norm_eps as f32,
        );
        let Scratch {
            x,
            xn,
            gate,
            up,
            quant,
            ..
        } = s;
        norm_rows(pool, xn, x, n, h, &layer.post_attn_norm, eps);
        let group = [&layer.gate, &layer.up];
        quant.prepare(&group, xn, n, h, (probe, l, Site::Mlp));
        quant.linear(pool, &layer.gate, n, xn, h, gate);
        quant.linear(pool, &layer.up, n, xn, h, up);
        par_rows(pool, gate, n, inter, 1, |_, ts, rows| {
            for (row, t) in rows.chunks_exact_mut(inter).zip(ts) {
                for (g, u) in row.iter_mut().zip(&up[t * inter..(t + 1) * inter]) {
                    let a = match c.activation {
                        Activation::Relu2 => {
                            let r = g.max(0.0);
                            r * r
                        }
                        Activation::Silu => *g / (1.0 + (-*g).exp()),
                    };
                    *g = a * u;
                }
                if let Some(w) = &layer.ffn_sub_norm {
                    rms_norm(row, w, eps);
                }
            }
        });
        quant.prepare(&[&layer.down], gate, n, inter, (probe, l, Site::MlpOutput));
        quant.linear(pool, &layer.down, n, gate, inter, xn);
        add_residual(x, xn, n * h);
    }

    /// The final RMSNorm on each row of `x` (`[n, hidden]`), in place.
    pub fn final_norm_rows(&self, x: &mut [f32]) {
        let h = self.config.hidden_size as usize;
        for row in x.chunks_exact_mut(h) {
            rms_norm(row, &self.final_norm, self.config.rms_norm_eps as f32);
        }
    }

    /// `out = head · x` for one normed hidden row, the vocabulary split among the workers.
    fn head_row(&self, pool: &Pool, kernels: Kernels, x: &[f32], out: &mut [f32]) {
        par_rows(pool, out, self.head.rows, 1, 16, |_, r, out| {
            self.head.gemv(&kernels, r, x, out);
        });
    }

    /// The logits of one hidden row after the final norm (`[hidden]` into `[vocab]`), as
    /// the fast path computes them: for layer-local verification of the head.
    pub fn head_logits(
        &self,
        pool: &Pool,
        state: &State,
        x: &[f32],
        out: &mut [f32],
    ) -> Result<(), InferError> {
        let (h, vocab) = (self.config.hidden_size as usize, self.head.rows);
        if x.len() != h || out.len() != vocab {
            return Err(InferError::Input(format!(
                "head_logits takes [{h}] into [{vocab}], not [{}] into [{}]",
                x.len(),
                out.len()
            )));
        }
        state.check(pool, 0)?;
        self.head_row(pool, state.scratch.kernels, x, out);
        Ok(())
    }

    /// Runs layer `layer` alone, as the fast path does, on `hidden` (`[n, hidden]`, the
    /// hidden states entering it for tokens at positions `state.pos..state.pos + n`),
    /// replacing them with the states leaving it. Writes only that layer's KV cache and
    /// does not move `state.pos`: layer-local verification feeds each layer the
    /// reference's input and compares the output, so a flip cannot cascade.
    pub fn forward_layer(
        &self,
        pool: &Pool,
        state: &mut State,
        layer: usize,
        hidden: &mut [f32],
        probe: &mut dyn Probe,
    ) -> Result<(), InferError> {
        let h = self.config.hidden_size as usize;
        let Some(weights) = self.layers.get(layer) else {
            return Err(InferError::Input(format!(
                "layer {layer} does not exist ({} layers)",
                self.layers.len()
            )));
        };
        if !hidden.len().is_multiple_of(h) {
            return Err(InferError::Input(format!(
                "{} hidden values are not whole rows of {h}",
                hidden.len()
            )));
        }
        state.check(pool, hidden.len() / h)?;
        for (i, chunk) in hidden.chunks_mut(PREFILL_CHUNK * h).enumerate() {
            let (n, pos0) = (chunk.len() / h, state.pos + i * PREFILL_CHUNK);
            let s = &mut state.scratch;
            s.x[..chunk.len()].copy_from_slice(chunk);
            s.set_angles(&self.inv_freq, pos0, n);
            let mut caches = Caches::One {
                cache: &mut state.cache,
                pos0,
            };
            self.attention_block(pool, layer, s, &mut caches, n, probe);
            self.mlp_block(pool, layer, weights, s, n, probe);
            chunk.copy_from_slice(&s.x[..chunk.len()]);
        }
        Ok(())
    }

    /// Causal self-attention of the `n` queries in `s.q` against their cached keys and
    /// values of layer `l`, into `s.att_out` (eager: softmax in f32, the 1/sqrt(d) scale
    /// applied after q·k). Heads are spread over the pool.
    fn attention(&self, pool: &Pool, s: &mut Scratch, caches: &Caches, l: usize, n: usize) {
        let c = &self.config;
        let d = c.head_dim as usize;
        let (heads, kv) = (c.num_attention_heads as usize, c.kv_dim() as usize);
        let group = heads / c.num_key_value_heads as usize;
        let scale = (d as f32).powf(-0.5);
        let Scratch {
            q,
            att_out,
            scores,
            kernels,
            ..
        } = s;
        let (q, scores, kernels) = (&*q, &*scores, *kernels);
        // Heads that share a KV head are computed together, so each cached key and value
        // row is read once for all of them; the group is halved (quartered, ...) only when
        // that is what keeps the workers evenly loaded (2B-4T decode on 2 threads: 5 groups
        // of 4 heads become 10 units of 2).
        let threads = pool.threads();
        let tokens = caches.grouping_tokens(n);
        let m = (1..=group)
            .rev()
            .filter(|m| group.is_multiple_of(*m))
            .find(|m| {
                let units = tokens * heads / m;
                units.is_multiple_of(threads) || units >= 4 * threads
            })
            .unwrap_or(1);
        par_rows(pool, att_out, n * heads, d, m, |worker, r, out| {
            // Each worker owns one scores buffer (group × ctx); the lock is uncontended.
            let mut scores = scores[worker].lock().expect("no poisoned scores");
            for (u, first) in r.step_by(m).enumerate() {
                let (t, head0) = (first / heads, first % heads);
                let (keys, values, len) = caches.layer(l, t);
                let g = head0 / group;
                let shape = AttendShape {
                    heads: m,
                    head_dim: d,
                    len,
                    stride: kv,
                    scale,
                };
                kernels.attend(
                    shape,
                    &q[t * heads * d + head0 * d..][..m * d],
                    &keys[g * d..],
                    &values[g * d..],
                    &mut scores,
                    &mut out[u * m * d..(u + 1) * m * d],
                );
            }
        });
    }
}

impl Scratch {
    /// Rotary angles of positions `pos0..pos0 + n`, shared by every head and layer.
    fn set_angles(&mut self, inv_freq: &[f32], pos0: usize, n: usize) {
        let half = inv_freq.len();
        for (t, row) in self.angles[..n * half].chunks_exact_mut(half).enumerate() {
            let pos = (pos0 + t) as f32;
            for (a, f) in row.iter_mut().zip(inv_freq) {
                *a = (pos * f).sin_cos();
            }
        }
    }
}
