//! Text generation: prefill the prompt, then decode one token at a time until a stop
//! token, the token budget, or the context's end.

use std::time::Instant;

use serde::Serialize;
use tern_format::TernFile;

use crate::model::{Logits, Model, State};
use crate::pool::Pool;
use crate::reference::NoProbe;
use crate::sampling::Sampler;
use crate::tokenizer::{Tokenizer, TokenizerOptions};
use crate::InferError;

/// The tokenizer embedded in a `.tern` file, with the file's BOS/EOS settings.
pub fn tokenizer_from_file(file: &TernFile) -> Result<Tokenizer, InferError> {
    let c = &file.metadata().config;
    let json = file.tokenizer_json();
    if json.is_empty() {
        return Err(InferError::NoTokenizer {
            path: file.path().to_path_buf(),
        });
    }
    Ok(Tokenizer::from_bytes(
        json,
        TokenizerOptions {
            bos_token_id: c.bos_token_id,
            add_bos: c.add_bos_token && c.bos_token_id.is_some(),
            eos_token_ids: c.eos_token_ids.clone(),
        },
    )?)
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A stop (end-of-sequence or end-of-turn) token was sampled.
    Eos,
    /// The requested number of tokens was produced.
    Length,
    /// The context is full.
    Context,
    /// The caller's callback asked to stop.
    Callback,
}

/// Tokens and timings of one generation.
#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub prompt_seconds: f64,
    pub decode_seconds: f64,
    pub stop: StopReason,
}

impl Generation {
    pub fn prompt_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_seconds.max(1e-9)
    }

    /// Decode speed: every token after the first comes from one decode step.
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_seconds.max(1e-9)
    }
}

/// Feeds `prompt` (appended to whatever `state` already holds) and samples up to
/// `max_new` tokens. `on_token(id)` sees each token as it is produced and returns whether
/// to go on. Stop tokens end generation and are not passed on.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    model: &Model,
    pool: &Pool,
    state: &mut State,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    stop_tokens: &[u32],
    mut on_token: impl FnMut(u32) -> Result<bool, InferError>,
) -> Result<Generation, InferError> {
    if prompt.is_empty() {
        return Err(InferError::EmptyPrompt);
    }
    if state.pos + prompt.len() > state.ctx {
        return Err(InferError::ContextFull {
            ctx: state.ctx,
            needed: state.pos + prompt.len(),
        });
    }
    let vocab = model.config.vocab_size as usize;
    let mut history: Vec<u32> = prompt.to_vec();
    let start = Instant::now();
    model.forward(pool, state, prompt, Logits::Last, &mut NoProbe)?;
    let prompt_seconds = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut tokens = Vec::new();
    let stop = loop {
        if tokens.len() == max_new {
            break StopReason::Length;
        }
        let next = sampler.sample(&mut state.logits[..vocab], &history);
        if stop_tokens.contains(&next) {
            break StopReason::Eos;
        }
        tokens.push(next);
        history.push(next);
        if !on_token(next)? {
            break StopReason::Callback;
        }
        if tokens.len() == max_new {
            break StopReason::Length;
        }
        if state.pos >= state.ctx {
            break StopReason::Context;
        }
        model.forward(pool, state, &[next], Logits::Last, &mut NoProbe)?;
    };
    Ok(Generation {
        tokens,
        prompt_tokens: prompt.len(),
        prompt_seconds,
        decode_seconds: start.elapsed().as_secs_f64(),
        stop,
    })
}

/// [`generate`] with the tokenizer's stop tokens, passing the generated text to `on_text`
/// piece by piece as it is produced (never half a character; what is left at the end,
/// flushed last), which is what streaming output wants.
#[allow(clippy::too_many_arguments)]
pub fn generate_text(
    model: &Model,
    pool: &Pool,
    state: &mut State,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    mut on_text: impl FnMut(&str) -> Result<(), InferError>,
) -> Result<Generation, InferError> {
    let mut stream = tokenizer.stream(true);
    let generation = generate(
        model,
        pool,
        state,
        prompt,
        max_new,
        sampler,
        tokenizer.eos_token_ids(),
        |id| {
            if let Some(text) = stream.push(id)? {
                on_text(&text)?;
            }
            Ok(true)
        },
    )?;
    if let Some(rest) = stream.finish()? {
        on_text(&rest)?;
    }
    Ok(generation)
}
