//! Perplexity over a text (`tern eval --ppl`), computed exactly the way
//! fixtures/train_default.py computes transformers' reference figure: the text is tokenized
//! once without special tokens, cut into consecutive windows of `window - 1` tokens, and
//! each window runs as `[BOS] + window` from position 0; every text token is predicted
//! exactly once, by the position before it.

use serde::Serialize;

use crate::kernels::Kernels;
use crate::model::{Logits, Model, State};
use crate::pool::Pool;
use crate::reference::NoProbe;
use crate::tokenizer::Tokenizer;
use crate::InferError;

#[derive(Clone, Debug, Serialize)]
pub struct Perplexity {
    pub perplexity: f64,
    pub mean_nll: f64,
    pub tokens: usize,
    pub windows: usize,
    pub window: usize,
    pub seconds: f64,
}

/// `-log softmax(logits)[target]`, in f64.
fn nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = logits
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    lse - logits[target as usize] as f64
}

/// Perplexity of `text`; `progress(done, total)` counts windows.
pub fn perplexity(
    model: &Model,
    pool: &Pool,
    kernels: Kernels,
    tokenizer: &Tokenizer,
    text: &str,
    window: usize,
    progress: &dyn Fn(usize, usize),
) -> Result<Perplexity, InferError> {
    let start = std::time::Instant::now();
    let bos = model.config.bos_token_id.ok_or(InferError::NoBosToken)?;
    if window < 2 {
        return Err(InferError::WindowTooSmall { window });
    }
    crate::limits::check_ctx(&model.config, window, pool.threads(), "window")?;
    let ids = tokenizer.encode(text, false)?;
    if ids.is_empty() {
        return Err(InferError::EmptyText);
    }
    let vocab = model.config.vocab_size as usize;
    let chunks: Vec<&[u32]> = ids.chunks(window - 1).collect();
    let mut state = State::new(model, kernels, pool, window)?;
    let mut input = Vec::with_capacity(window);
    let mut total = 0.0f64;
    for (i, chunk) in chunks.iter().enumerate() {
        input.clear();
        input.push(bos);
        input.extend_from_slice(chunk);
        state.reset();
        model.forward(pool, &mut state, &input, Logits::All, &mut NoProbe)?;
        for (j, &target) in chunk.iter().enumerate() {
            total += nll(&state.logits[j * vocab..(j + 1) * vocab], target);
        }
        progress(i + 1, chunks.len());
    }
    let mean_nll = total / ids.len() as f64;
    Ok(Perplexity {
        perplexity: mean_nll.exp(),
        mean_nll,
        tokens: ids.len(),
        windows: chunks.len(),
        window,
        seconds: start.elapsed().as_secs_f64(),
    })
}
