//! Batched decode: several independent sequences advance one token together.
//!
//! Decode is bound by reading the weights, so feeding the next token of every active
//! sequence through one matrix call per layer (the prefill GEMM kernels) costs little more
//! than feeding one. Each sequence keeps its own [`State`] (KV cache, position, logits):
//! prefill it alone with [`Model::forward`], then hand it to [`Batch::decode_step`] along
//! with the others. Sequences join and leave between steps (continuous batching). The
//! numerics are those of `Model::forward` on one token: the same per-token quantization,
//! exact integer products, the same attention and head (for each sequence, the head GEMM
//! does exactly the GEMV's f32 operations), so a sequence's logits in a batch are bit for
//! bit its logits alone.

use crate::model::{Caches, Model, State, PREFILL_CHUNK};
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
        // q, k, v, o and the MLP are one matrix call each over all the sequences; rotary
        // angles, the KV cache and attention are each sequence's own.
        for (l, layer) in model.layers.iter().enumerate() {
            model.attention_block(pool, l, s, &mut Caches::Each(seqs), n, &mut NoProbe);
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
            // One sequence streams its piece (the GEMV prefetches ahead); several read each
            // row of the head once for all of them.
            if n == 1 {
                model.head.gemv(&kernels, rows, &x[..h], out);
            } else {
                model.head.gemm(&kernels, rows, &x[..n * h], n, out);
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
