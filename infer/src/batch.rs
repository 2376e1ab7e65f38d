//! Batched decode: several independent sequences advance one token together.
//!
//! Decode is bound by reading the weights, so feeding the next token of every active
//! sequence through one matrix call per layer (the prefill GEMM kernels) costs little more
//! than feeding one. Each sequence keeps its own [`State`] (KV cache, position, logits):
//! prefill it alone with [`Model::forward`], then hand it to [`Batch::decode_step`] along
//! with the others. Sequences join and leave between steps (continuous batching). The
//! numerics are those of `Model::forward` on one token: the same per-token quantization,
//! exact integer products, the same attention and head, so a sequence's greedy output in a
//! batch is token-identical to its output alone.

use crate::kernels::AttendShape;
use crate::model::{
    add_residual, norm_rows, par_rows, rms_norm, rope, Model, Scratch, State, PREFILL_CHUNK,
};
use crate::pool::Pool;
use crate::reference::NoProbe;
use crate::InferError;

/// Working memory shared by the sequences of a decode step.
pub struct Batch {
    /// Scratch buffers (activations, attention scores) for up to [`Batch::max`] tokens.
    work: State,
    /// Head products, `[vocab, n]` in pieces (as `Quantized::acc`), then scattered.
    head: Vec<f32>,
}

impl Batch {
    /// Sequences one step can advance at most.
    pub const fn max() -> usize {
        PREFILL_CHUNK
    }

    /// Buffers for steps over sequences of up to `ctx` positions, run on `pool`.
    pub fn new(
        model: &Model,
        kernels: crate::kernels::Kernels,
        pool: &Pool,
        ctx: usize,
    ) -> Result<Batch, InferError> {
        let vocab = model.config.vocab_size as usize;
        Ok(Batch {
            // Its KV cache and logits are never touched: zeroed pages cost nothing.
            work: State::new(model, kernels, pool, ctx)?,
            head: vec![0.0; vocab * PREFILL_CHUNK],
        })
    }

    /// Feeds `tokens[i]` to `seqs[i]` at its position, appending to its KV cache and
    /// leaving its next-token logits in `seqs[i].logits[..vocab]`.
    pub fn decode_step(
        &mut self,
        model: &Model,
        pool: &Pool,
        seqs: &mut [&mut State],
        tokens: &[u32],
    ) -> Result<(), InferError> {
        let c = &model.config;
        let (n, h) = (seqs.len(), c.hidden_size as usize);
        if tokens.len() != n || n > PREFILL_CHUNK {
            return Err(InferError::Input(format!(
                "a decode step takes one token for each of at most {PREFILL_CHUNK} \
                 sequences, not {} tokens for {n}",
                tokens.len()
            )));
        }
        crate::model::check_vocab(c, tokens)?;
        self.work.check(pool, 0)?;
        for st in seqs.iter() {
            st.check(pool, 1)?;
            if st.ctx > self.work.ctx {
                return Err(InferError::Input(format!(
                    "a sequence of {} positions does not fit a batch made for {}",
                    st.ctx, self.work.ctx
                )));
            }
        }
        if n == 0 {
            return Ok(());
        }
        let s = &mut self.work.scratch;
        let half = model.inv_freq.len();
        for (t, (st, &tok)) in seqs.iter().zip(tokens).enumerate() {
            model
                .embed
                .row_f32(tok as usize, &mut s.x[t * h..(t + 1) * h]);
            let pos = st.pos as f32;
            for (a, f) in s.angles[t * half..(t + 1) * half]
                .iter_mut()
                .zip(&model.inv_freq)
            {
                *a = (pos * f).sin_cos();
            }
        }
        for (l, layer) in model.layers.iter().enumerate() {
            attention_block(model, pool, l, s, seqs, n);
            model.mlp_block(pool, l, layer, s, n, &mut NoProbe);
        }
        model.final_norm_rows(&mut s.x[..n * h]);
        self.head_rows(model, pool, seqs);
        for st in seqs.iter_mut() {
            st.pos += 1;
        }
        Ok(())
    }

    /// `logits = head · x` for every row of the step: each piece of the head is read once
    /// for all sequences (it stays in cache across them), the pieces spread over the pool.
    fn head_rows(&mut self, model: &Model, pool: &Pool, seqs: &mut [&mut State]) {
        let (n, h, vocab) = (
            seqs.len(),
            model.config.hidden_size as usize,
            model.head.rows,
        );
        let (x, kernels) = (&self.work.scratch.x, self.work.scratch.kernels);
        // Pieces of whole 16-row groups, as `Model::forward`'s head splits its rows.
        let parts = if pool.threads() > 1 {
            4 * pool.threads()
        } else {
            1
        };
        let piece = |c: usize| {
            let r = crate::pool::split_range(n * vocab, 16 * n, c, parts);
            r.start / n..r.end / n
        };
        pool.run_chunks(&mut self.head[..n * vocab], 16 * n, parts, |_, r, out| {
            let rows = r.start / n..r.end / n;
            let len = rows.len();
            for t in 0..n {
                let out = &mut out[t * len..(t + 1) * len];
                model
                    .head
                    .gemv(&kernels, rows.clone(), &x[t * h..(t + 1) * h], out);
            }
        });
        for (t, st) in seqs.iter_mut().enumerate() {
            for c in 0..parts {
                let rc = piece(c);
                let len = rc.len();
                let from = &self.head[n * rc.start + t * len..n * rc.start + (t + 1) * len];
                st.logits[rc].copy_from_slice(from);
            }
        }
    }
}

/// `Model::attention_block` for `n` tokens of `n` different sequences: q, k, v and o are
/// one matrix call each over all of them; rotary angles, the KV cache and attention are
/// each sequence's own.
fn attention_block(
    model: &Model,
    pool: &Pool,
    l: usize,
    s: &mut Scratch,
    seqs: &mut [&mut State],
    n: usize,
) {
    let c = &model.config;
    let layer = &model.layers[l];
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
    quant.quantize(xn, n, h, layer.q.act_stride());
    quant.bitlinear(pool, &layer.q, n, xn, h, q);
    quant.bitlinear(pool, &layer.k, n, xn, h, k);
    quant.bitlinear(pool, &layer.v, n, xn, h, v);
    for (t, st) in seqs.iter_mut().enumerate() {
        let at = &angles[t * half..(t + 1) * half];
        for head in q[t * attn..(t + 1) * attn].chunks_exact_mut(d) {
            rope(head, at, c.rope_style);
        }
        for head in k[t * kv..(t + 1) * kv].chunks_exact_mut(d) {
            rope(head, at, c.rope_style);
        }
        let pos = st.pos;
        st.cache
            .store(l, pos, &k[t * kv..(t + 1) * kv], &v[t * kv..(t + 1) * kv]);
    }
    attention(model, pool, l, s, seqs, n);
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
    quant.quantize(att_out, n, attn, layer.o.act_stride());
    quant.bitlinear(pool, &layer.o, n, att_out, attn, xn);
    add_residual(x, xn, n * h);
}

/// Each token's query heads against its own sequence's cache of layer `l`, into
/// `s.att_out`, heads grouped as `Model::forward` groups them for one token.
fn attention(model: &Model, pool: &Pool, l: usize, s: &mut Scratch, seqs: &[&mut State], n: usize) {
    let c = &model.config;
    let d = c.head_dim as usize;
    let (heads, kv) = (c.num_attention_heads as usize, c.kv_dim() as usize);
    let group = heads / c.num_key_value_heads as usize;
    let scale = (d as f32).powf(-0.5);
    let threads = pool.threads();
    // The grouping one token alone gets (see `Model::attention`), so results are identical.
    let m = (1..=group)
        .rev()
        .filter(|m| group.is_multiple_of(*m))
        .find(|m| {
            let units = heads / m;
            units.is_multiple_of(threads) || units >= 4 * threads
        })
        .unwrap_or(1);
    let caches: Vec<(&[f32], &[f32], usize)> = seqs
        .iter()
        .map(|st| {
            let (keys, values) = st.cache.layer(l);
            (keys, values, st.pos + 1)
        })
        .collect();
    let Scratch {
        q,
        att_out,
        scores,
        kernels,
        ..
    } = s;
    let (q, scores, kernels) = (&*q, &*scores, *kernels);
    par_rows(pool, att_out, n * heads, d, m, |worker, r, out| {
        let mut scores = scores[worker].lock().expect("no poisoned scores");
        for (u, first) in r.step_by(m).enumerate() {
            let (t, head0) = (first / heads, first % heads);
            let (keys, values, len) = caches[t];
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
