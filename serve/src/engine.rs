//! The engine: one thread that owns the model, the thread pool and a fixed number of slots,
//! and advances every active sequence together, one batched decode step at a time.
//!
//! Requests arrive on a channel; a waiting request takes the first free slot between two
//! steps, and a finished or abandoned one leaves it. A prompt is prefilled alone, in
//! chunks of [`PREFILL_CHUNK`] tokens: while other sequences are decoding, one chunk runs
//! between two of their steps, so a long prompt delays their next token by one chunk, not
//! by the whole prompt; with nobody decoding it runs at once. Then it joins the batch. Tokens go back on each request's own unbounded channel, which
//! holds at most `max_tokens` events, so a slow reader never blocks the step; a request
//! whose receiver was dropped (the client went away) is dropped before the next step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_infer::batch::Batch;
use tern_infer::model::{Logits, Model, State, PREFILL_CHUNK};
use tern_infer::pool::Pool;
use tern_infer::reference::NoProbe;
use tern_infer::sampling::{Sampler, SamplingParams};
use tern_infer::InferError;
use tokio::sync::mpsc::UnboundedSender;

/// Why a sequence ended (OpenAI's `finish_reason`, plus where it came from).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token.
    Stop,
    /// `max_tokens`, the context or the request's time limit.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What the engine sends back for one request.
#[derive(Debug)]
pub enum Event {
    /// The prompt is in the cache; generation starts.
    Started,
    Token(u32),
    Done(Finish),
    Error(String),
}

/// One generation to run.
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    /// Tokens that end the sequence (not sent on).
    pub stop_tokens: Vec<u32>,
    pub deadline: Instant,
    pub events: UnboundedSender<Event>,
}

/// Counters the HTTP side reads for `/health`.
#[derive(Default)]
pub struct Stats {
    pub active: AtomicUsize,
    pub waiting: AtomicUsize,
    /// Set on shutdown: waiting requests are refused, active ones run to their end.
    pub draining: AtomicBool,
}

struct Active {
    job: Job,
    sampler: Sampler,
    history: Vec<u32>,
    generated: usize,
    /// The token to feed at the next step.
    next: u32,
    /// Prompt tokens already in the cache: the sequence decodes once all are.
    prefilled: usize,
}

impl Active {
    fn prefilling(&self) -> bool {
        self.prefilled < self.job.prompt.len()
    }
}

/// Runs until `jobs` is closed and every sequence has ended.
pub fn run(
    model: &Model,
    pool: &Pool,
    mut states: Vec<State>,
    mut batch: Batch,
    jobs: Receiver<Job>,
    stats: Arc<Stats>,
) {
    let mut slots: Vec<Option<Active>> = states.iter().map(|_| None).collect();
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut open = true;
    let vocab = model.config.vocab_size as usize;
    loop {
        let idle = slots.iter().all(Option::is_none) && waiting.is_empty();
        if idle && !open {
            return;
        }
        if idle {
            // Nothing to do: wait for work (waking now and then to notice a drain).
            match jobs.recv_timeout(Duration::from_millis(200)) {
                Ok(job) => waiting.push_back(job),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => open = false,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(job) => waiting.push_back(job),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if stats.draining.load(Ordering::Relaxed) {
            for job in waiting.drain(..) {
                let _ = job
                    .events
                    .send(Event::Error("the server is shutting down".into()));
            }
        }
        waiting.retain(|j| !j.events.is_closed());

        // Admit waiting requests into free slots; their prompts are prefilled below.
        for (slot, state) in slots.iter_mut().zip(states.iter_mut()) {
            if slot.is_some() {
                continue;
            }
            let Some(job) = waiting.pop_front() else {
                break;
            };
            if job.prompt.is_empty() {
                let _ = job.events.send(Event::Error("the prompt is empty".into()));
                continue;
            }
            state.reset();
            let _ = job.events.send(Event::Started);
            *slot = Some(Active {
                sampler: Sampler::new(job.params),
                history: job.prompt.clone(),
                generated: 0,
                next: 0,
                prefilled: 0,
                job,
            });
        }

        // Prefill: everything at once while nobody decodes, else one chunk between steps.
        let decoding = slots.iter().flatten().any(|a| !a.prefilling());
        let mut budget = if decoding { PREFILL_CHUNK } else { usize::MAX };
        for (slot, state) in slots.iter_mut().zip(states.iter_mut()) {
            let Some(a) = slot.as_mut().filter(|a| a.prefilling()) else {
                continue;
            };
            if budget == 0 {
                break;
            }
            if a.job.events.is_closed() {
                *slot = None;
                continue;
            }
            let end = a.job.prompt.len().min(a.prefilled.saturating_add(budget));
            let chunk = &a.job.prompt[a.prefilled..end];
            budget -= chunk.len();
            if let Err(e) = model.forward(pool, state, chunk, Logits::Last, &mut NoProbe) {
                let _ = a.job.events.send(Event::Error(e.to_string()));
                *slot = None;
                continue;
            }
            a.prefilled = end;
            if !a.prefilling() && !advance(a, state, vocab) {
                *slot = None;
            }
        }

        // One decode step over every active sequence.
        let mut seqs: Vec<&mut State> = Vec::new();
        let mut tokens = Vec::new();
        let mut members = Vec::new();
        for (i, (slot, state)) in slots.iter_mut().zip(states.iter_mut()).enumerate() {
            if let Some(a) = slot.as_ref().filter(|a| !a.prefilling()) {
                if a.job.events.is_closed() {
                    *slot = None; // the client went away: free the slot now
                    continue;
                }
                tokens.push(a.next);
                seqs.push(state);
                members.push(i);
            }
        }
        stats
            .active
            .store(slots.iter().flatten().count(), Ordering::Relaxed);
        stats.waiting.store(waiting.len(), Ordering::Relaxed);
        if members.is_empty() {
            continue;
        }
        if let Err(e) = batch.decode_step(model, pool, &mut seqs, &tokens) {
            fail(&mut slots, &members, &e);
            continue;
        }
        drop(seqs);
        for &i in &members {
            let a = slots[i].as_mut().expect("a member is active");
            if !advance(a, &mut states[i], vocab) {
                slots[i] = None;
            }
        }
    }
}

/// Samples the next token of `a` from its state's logits and sends it on. Returns whether
/// the sequence goes on (false: it ended and its `Done` was sent).
fn advance(a: &mut Active, state: &mut State, vocab: usize) -> bool {
    let next = a.sampler.sample(&mut state.logits[..vocab], &a.history);
    let end = if a.job.stop_tokens.contains(&next) {
        Some(Finish::Stop)
    } else {
        a.history.push(next);
        a.generated += 1;
        a.next = next;
        if a.job.events.send(Event::Token(next)).is_err() {
            return false;
        }
        if a.generated >= a.job.max_tokens
            || state.pos >= state.ctx
            || Instant::now() >= a.job.deadline
        {
            Some(Finish::Length)
        } else {
            None
        }
    };
    match end {
        Some(f) => {
            let _ = a.job.events.send(Event::Done(f));
            false
        }
        None => true,
    }
}

fn fail(slots: &mut [Option<Active>], members: &[usize], e: &InferError) {
    for &i in members {
        if let Some(a) = slots[i].take() {
            let _ = a.job.events.send(Event::Error(e.to_string()));
        }
    }
}
