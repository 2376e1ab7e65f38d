//! Choosing the next token from logits.
//!
//! The processing follows transformers' logits processors, in the order
//! `generate()` applies them:
//!
//! 1. repetition penalty (CTRL): every distinct id in the history has its
//!    logit divided by the penalty if it is positive, multiplied if negative;
//! 2. temperature: logits divided by `temperature` (0 means greedy: argmax
//!    after the repetition penalty, first index on ties);
//! 3. top-k: logits below the k-th largest are removed (ties with the k-th
//!    are kept);
//! 4. top-p (nucleus): sorted ascending, tokens whose cumulative probability
//!    is `<= 1 - top_p` are removed, the most likely token always stays: the
//!    smallest set whose probability reaches `top_p`;
//! 5. min-p: tokens whose probability is below `min_p` times the top
//!    token's are removed;
//!
//! then a token is drawn from the softmax of what is left, with a seeded
//! `rand::rngs::SmallRng` (xoshiro256++ seeded through SplitMix64 on 64-bit
//! targets), so a seed gives the same tokens on every 64-bit machine with
//! this build's `rand`.
//!
//! NaN logits are treated as `-inf`; if every logit is `-inf` the sampler
//! returns id 0 rather than panicking.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Invalid sampling parameters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// Temperature must be finite and `>= 0`.
    #[error("temperature must be a finite number >= 0, got {0}")]
    Temperature(f32),
    /// top-p must be in `[0, 1]`.
    #[error("top_p must be in [0, 1], got {0}")]
    TopP(f32),
    /// min-p must be in `[0, 1]`.
    #[error("min_p must be in [0, 1], got {0}")]
    MinP(f32),
    /// The repetition penalty must be finite and `> 0`.
    #[error("repetition_penalty must be a finite number > 0, got {0}")]
    RepetitionPenalty(f32),
}

/// How to pick the next token. [`Default`] is greedy decoding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` turns it off.
    pub top_k: usize,
    /// Nucleus sampling threshold; `1.0` turns it off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the top probability; `0` is off.
    pub min_p: f32,
    /// CTRL repetition penalty over the history; `1.0` is off.
    pub repetition_penalty: f32,
    /// Seed of the sampler's random generator.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (the default).
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Whether these parameters pick the argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Check the ranges transformers accepts.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(SamplingError::TopP(self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(SamplingError::MinP(self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(SamplingError::RepetitionPenalty(self.repetition_penalty));
        }
        Ok(())
    }
}

/// Picks tokens according to [`SamplingParams`]; keeps its buffers between
/// calls so sampling does not allocate once warmed up.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SmallRng,
    /// `seen[id] == epoch` marks ids already penalized in this call.
    seen: Vec<u32>,
    epoch: u32,
    scratch: Vec<f32>,
    order: Vec<u32>,
}

impl Sampler {
    /// A sampler whose generator is seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            rng: SmallRng::seed_from_u64(params.seed),
            seen: Vec::new(),
            epoch: 0,
            scratch: Vec::new(),
            order: Vec::new(),
        }
    }

    /// The parameters in use.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Restart the random generator from `seed`.
    pub fn reseed(&mut self, seed: u64) {
        self.params.seed = seed;
        self.rng = SmallRng::seed_from_u64(seed);
    }

    /// Pick the next token. `logits` (one per vocabulary entry) are
    /// modified in place by the processors; `history` is the ids so far
    /// (prompt and generated) for the repetition penalty; ids outside the
    /// logits are ignored.
    ///
    /// # Panics
    /// If `logits` is empty.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        assert!(!logits.is_empty(), "sample: empty logits");
        for l in logits.iter_mut() {
            if l.is_nan() {
                *l = f32::NEG_INFINITY;
            }
        }
        if self.params.repetition_penalty != 1.0 {
            self.repetition_penalty(logits, history);
        }
        let p = self.params;
        if p.temperature <= 0.0 || !p.temperature.is_finite() {
            return argmax(logits) as u32;
        }
        if max_logit(logits) == f32::NEG_INFINITY {
            return 0;
        }
        self.warp(logits);
        self.draw(logits)
    }

    /// Steps 2–5: temperature, top-k, top-p, min-p.
    fn warp(&mut self, logits: &mut [f32]) {
        let p = self.params;
        if p.temperature != 1.0 {
            for l in logits.iter_mut() {
                *l /= p.temperature;
            }
        }
        if p.top_k > 0 && p.top_k < logits.len() {
            self.top_k(logits, p.top_k);
        }
        if p.top_p < 1.0 {
            self.top_p(logits, p.top_p);
        }
        if p.min_p > 0.0 {
            min_p(logits, p.min_p);
        }
    }

    fn repetition_penalty(&mut self, logits: &mut [f32], history: &[u32]) {
        let penalty = self.params.repetition_penalty;
        if self.seen.len() != logits.len() {
            self.seen.clear();
            self.seen.resize(logits.len(), 0);
            self.epoch = 0;
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.seen.fill(0);
            self.epoch = 1;
        }
        for &id in history {
            let i = id as usize;
            if i < logits.len() && self.seen[i] != self.epoch {
                self.seen[i] = self.epoch;
                let l = &mut logits[i];
                *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
            }
        }
    }

    /// Remove every logit below the k-th largest (ties with it stay).
    fn top_k(&mut self, logits: &mut [f32], k: usize) {
        self.scratch.clear();
        self.scratch.extend_from_slice(logits);
        let (_, kth, _) = self
            .scratch
            .select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let kth = *kth;
        for l in logits.iter_mut() {
            if *l < kth {
                *l = f32::NEG_INFINITY;
            }
        }
    }

    /// Nucleus filtering as transformers' `TopPLogitsWarper`: with the
    /// tokens sorted by ascending probability, remove those whose cumulative
    /// probability is `<= 1 - top_p`, never the last (most likely) one.
    ///
    /// Only tokens with probability `>= (1 - top_p) / n` are sorted: all the
    /// `n` tokens below that come first in ascending order and add up to
    /// less than `1 - top_p`, so they are removed whatever their order.
    fn top_p(&mut self, logits: &mut [f32], top_p: f32) {
        let m = max_logit(logits);
        let n = logits.iter().filter(|&&l| l > f32::NEG_INFINITY).count();
        let sum: f64 = logits.iter().map(|&l| weight(l, m)).sum();
        let remove_mass = 1.0 - top_p as f64;
        let floor = remove_mass / n as f64;
        let mut cum = 0.0f64;
        self.order.clear();
        for (i, l) in logits.iter_mut().enumerate() {
            if *l == f32::NEG_INFINITY {
                continue;
            }
            let prob = weight(*l, m) / sum;
            if prob < floor {
                cum += prob;
                *l = f32::NEG_INFINITY;
            } else {
                self.order.push(i as u32);
            }
        }
        // Ascending by logit; among equal logits the higher id first, so the
        // lower id is the one that survives (as argmax would pick).
        self.order.sort_unstable_by(|&a, &b| {
            logits[a as usize]
                .total_cmp(&logits[b as usize])
                .then(b.cmp(&a))
        });
        let Some((_, rest)) = self.order.split_last() else {
            return;
        };
        for &i in rest {
            let l = &mut logits[i as usize];
            cum += weight(*l, m) / sum;
            if cum <= remove_mass {
                *l = f32::NEG_INFINITY;
            } else {
                break;
            }
        }
    }

    /// Draw from the softmax of the logits.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        let m = max_logit(logits);
        self.scratch.clear();
        let mut total = 0.0f64;
        for &l in logits {
            let w = weight(l, m) as f32;
            total += w as f64;
            self.scratch.push(w);
        }
        let r = self.rng.random::<f64>() * total;
        let mut acc = 0.0f64;
        let mut last = 0;
        for (i, &w) in self.scratch.iter().enumerate() {
            if w > 0.0 {
                acc += w as f64;
                last = i;
                if acc > r {
                    return i as u32;
                }
            }
        }
        last as u32
    }
}

/// transformers' `MinPLogitsWarper`: remove tokens with probability below
/// `min_p * max_prob`, i.e. `exp(l - max) < min_p`; the top token stays.
fn min_p(logits: &mut [f32], min_p: f32) {
    let top = argmax(logits);
    let m = logits[top];
    for (i, l) in logits.iter_mut().enumerate() {
        if i != top && weight(*l, m) < min_p as f64 {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// `exp(l - m)` for the running max `m`; 1 for the max itself, so an
/// infinite maximum (a huge logit over a tiny temperature) gives 1, not NaN.
fn weight(l: f32, m: f32) -> f64 {
    if l == m {
        1.0
    } else {
        ((l - m) as f64).exp()
    }
}

fn max_logit(logits: &[f32]) -> f32 {
    logits.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// Index of the largest logit, the first one on ties; 0 if all are `-inf`
/// or NaN.
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    let mut best_val = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_val {
            best = i;
            best_val = l;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: 42,
            ..SamplingParams::default()
        }
    }

    /// Logits whose softmax is exactly `probs`.
    fn logits_of(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    /// Deterministic pseudo-random logits for property-style tests.
    fn random_logits(seed: u64, n: usize) -> Vec<f32> {
        let mut rng = SmallRng::seed_from_u64(seed);
        (0..n)
            .map(|_| (rng.random::<f64>() * 20.0 - 10.0) as f32)
            .collect()
    }

    fn kept(logits: &[f32]) -> Vec<usize> {
        (0..logits.len())
            .filter(|&i| logits[i] > f32::NEG_INFINITY)
            .collect()
    }

    #[test]
    fn default_is_greedy_and_valid() {
        let p = SamplingParams::default();
        assert!(p.is_greedy());
        assert_eq!(p, SamplingParams::greedy());
        assert_eq!(p.validate(), Ok(()));
        let bad = |f: fn(&mut SamplingParams)| {
            let mut p = SamplingParams::default();
            f(&mut p);
            p.validate().unwrap_err()
        };
        assert_eq!(
            bad(|p| p.temperature = -1.0),
            SamplingError::Temperature(-1.0)
        );
        assert!(matches!(
            bad(|p| p.temperature = f32::NAN),
            SamplingError::Temperature(_)
        ));
        assert_eq!(bad(|p| p.top_p = 1.5), SamplingError::TopP(1.5));
        assert_eq!(bad(|p| p.min_p = -0.1), SamplingError::MinP(-0.1));
        assert_eq!(
            bad(|p| p.repetition_penalty = 0.0),
            SamplingError::RepetitionPenalty(0.0)
        );
    }

    #[test]
    fn greedy_picks_first_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 2.9], &[]), 1);
        assert_eq!(s.sample(&mut [1.0, 5.0, 5.0, 5.0], &[]), 1);
        assert_eq!(s.sample(&mut [f32::NEG_INFINITY, -1e30, f32::NAN], &[]), 1);
        // Greedy ignores the warpers.
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            top_p: 0.1,
            min_p: 0.9,
            ..SamplingParams::default()
        });
        assert_eq!(s.sample(&mut [0.0, 1.0, 0.5], &[]), 1);
    }

    #[test]
    fn greedy_applies_repetition_penalty() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::default()
        });
        // 3.0 / 2 = 1.5 < 2.0.
        assert_eq!(s.sample(&mut [3.0, 2.0], &[0]), 1);
        assert_eq!(s.sample(&mut [3.0, 2.0], &[]), 0);
    }

    #[test]
    fn repetition_penalty_math() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::default()
        });
        let mut l = [2.0, -2.0, 0.5, 1.0, 0.0];
        // Repeated ids are penalized once; out-of-range ids are ignored.
        s.repetition_penalty(&mut l, &[0, 1, 1, 4, 1, 99]);
        assert_eq!(l, [1.0, -4.0, 0.5, 1.0, 0.0]);
        // Next call starts fresh (epoch bump), even on the same ids.
        let mut l = [2.0, -2.0, 0.5, 1.0, 0.0];
        s.repetition_penalty(&mut l, &[0, 0]);
        assert_eq!(l, [1.0, -2.0, 0.5, 1.0, 0.0]);
        // Penalty < 1 rewards instead.
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 0.5,
            ..SamplingParams::default()
        });
        let mut l = [2.0, -2.0];
        s.repetition_penalty(&mut l, &[0, 1]);
        assert_eq!(l, [4.0, -1.0]);
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let logits = random_logits(7, 1000);
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 50,
            top_p: 0.95,
            min_p: 0.01,
            repetition_penalty: 1.1,
            seed: 1234,
        };
        let run = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            let mut hist = vec![1u32, 2, 3];
            for _ in 0..64 {
                let id = s.sample(&mut logits.clone(), &hist);
                hist.push(id);
            }
            hist
        };
        assert_eq!(run(p), run(p));
        assert_ne!(run(p), run(SamplingParams { seed: 1235, ..p }));
        // reseed restarts the stream.
        let mut s = Sampler::new(p);
        let a: Vec<u32> = (0..16)
            .map(|_| s.sample(&mut logits.clone(), &[]))
            .collect();
        s.reseed(1234);
        let b: Vec<u32> = (0..16)
            .map(|_| s.sample(&mut logits.clone(), &[]))
            .collect();
        assert_eq!(a, b);
    }

    #[test]
    fn top_k_one_equals_greedy() {
        for seed in 0..50 {
            let logits = random_logits(seed, 300);
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.5,
                top_k: 1,
                seed,
                ..SamplingParams::default()
            });
            assert_eq!(s.sample(&mut logits.clone(), &[]), argmax(&logits) as u32);
        }
    }

    #[test]
    fn top_k_keeps_ties_with_kth() {
        let mut s = Sampler::new(params(1.0));
        let mut l = [1.0, 2.0, 2.0, 0.0, 3.0];
        s.top_k(&mut l, 2);
        assert_eq!(kept(&l), vec![1, 2, 4]);
        let mut l = [1.0, 2.0, 2.0, 0.0, 3.0];
        s.top_k(&mut l, 4);
        assert_eq!(kept(&l), vec![0, 1, 2, 4]);
    }

    #[test]
    fn tiny_top_p_equals_greedy() {
        for seed in 0..50 {
            let logits = random_logits(seed + 100, 300);
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                top_p: 1e-6,
                seed,
                ..SamplingParams::default()
            });
            assert_eq!(s.sample(&mut logits.clone(), &[]), argmax(&logits) as u32);
        }
        // top_p = 0 too, and ties keep the lower id.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.0,
            ..SamplingParams::default()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 2.0, 2.0, 1.0], &[]), 1);
        }
    }

    #[test]
    fn top_p_keeps_smallest_nucleus() {
        let probs = [0.15, 0.5, 0.05, 0.3];
        let check = |top_p: f32, want: Vec<usize>| {
            let mut s = Sampler::new(params(1.0));
            let mut l = logits_of(&probs);
            s.top_p(&mut l, top_p);
            assert_eq!(kept(&l), want, "top_p={top_p}");
        };
        check(0.4, vec![1]);
        check(0.79, vec![1, 3]);
        check(0.81, vec![0, 1, 3]);
        check(0.96, vec![0, 1, 2, 3]);
        check(1.0, vec![0, 1, 2, 3]);
    }

    #[test]
    fn top_p_prefilter_matches_full_sort() {
        // Compare against a direct transcription of TopPLogitsWarper.
        for seed in 0..30 {
            let logits = random_logits(seed + 500, 2000);
            for top_p in [0.1f32, 0.5, 0.9, 0.99] {
                let mut fast = logits.clone();
                Sampler::new(params(1.0)).top_p(&mut fast, top_p);

                let m = max_logit(&logits);
                let sum: f64 = logits.iter().map(|&l| ((l - m) as f64).exp()).sum();
                let mut idx: Vec<usize> = (0..logits.len()).collect();
                idx.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)));
                let mut slow = logits.clone();
                let mut cum = 0.0f64;
                for &i in &idx[..idx.len() - 1] {
                    cum += ((logits[i] - m) as f64).exp() / sum;
                    if cum <= 1.0 - top_p as f64 {
                        slow[i] = f32::NEG_INFINITY;
                    }
                }
                assert_eq!(kept(&fast), kept(&slow), "seed {seed} top_p {top_p}");
            }
        }
    }

    #[test]
    fn min_p_filtering() {
        let probs = [0.5, 0.3, 0.15, 0.05];
        let mut l = logits_of(&probs);
        // Threshold 0.2 * 0.5 = 0.1: drops only the 0.05 token.
        min_p(&mut l, 0.2);
        assert_eq!(kept(&l), vec![0, 1, 2]);
        let mut l = logits_of(&probs);
        min_p(&mut l, 0.7);
        assert_eq!(kept(&l), vec![0]);
        let mut l = logits_of(&probs);
        min_p(&mut l, 1.0);
        assert_eq!(kept(&l), vec![0]);
        // Sampling never returns a filtered token.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            min_p: 0.2,
            seed: 3,
            ..SamplingParams::default()
        });
        for _ in 0..2000 {
            assert_ne!(s.sample(&mut logits_of(&probs), &[]), 3);
        }
    }

    #[test]
    fn samples_follow_the_softmax() {
        let probs = [0.6, 0.3, 0.1];
        let mut s = Sampler::new(params(1.0));
        let mut counts = [0usize; 3];
        let n = 30_000;
        for _ in 0..n {
            counts[s.sample(&mut logits_of(&probs), &[]) as usize] += 1;
        }
        for (c, p) in counts.iter().zip(probs) {
            let f = *c as f32 / n as f32;
            assert!((f - p).abs() < 0.015, "{counts:?}");
        }
        // Temperature 2 flattens: p ∝ sqrt(probs).
        let mut s = Sampler::new(params(2.0));
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[s.sample(&mut logits_of(&probs), &[]) as usize] += 1;
        }
        let z: f32 = probs.iter().map(|p| p.sqrt()).sum();
        for (c, p) in counts.iter().zip(probs) {
            let f = *c as f32 / n as f32;
            assert!((f - p.sqrt() / z).abs() < 0.015, "{counts:?}");
        }
    }

    #[test]
    fn no_nan_with_infinite_logits() {
        let ninf = f32::NEG_INFINITY;
        let full = SamplingParams {
            temperature: 0.7,
            top_k: 3,
            top_p: 0.9,
            min_p: 0.05,
            repetition_penalty: 1.3,
            seed: 5,
        };
        let mut s = Sampler::new(full);
        for _ in 0..200 {
            let id = s.sample(&mut [ninf, 1.0, ninf, f32::NAN, 0.5, ninf], &[0, 1, 3]);
            assert!(id == 1 || id == 4, "{id}");
        }
        // All masked: no panic, no NaN, id 0.
        assert_eq!(s.sample(&mut [ninf; 4], &[0]), 0);
        assert_eq!(s.sample(&mut [f32::NAN; 4], &[]), 0);
        let mut s = Sampler::new(params(1.0));
        assert_eq!(s.sample(&mut [ninf, ninf, 0.0], &[]), 2);
        // A single finite logit among many.
        let mut l = vec![ninf; 1000];
        l[777] = -50.0;
        for p in [
            full,
            params(1.0),
            SamplingParams {
                top_p: 0.5,
                ..params(1.0)
            },
        ] {
            assert_eq!(Sampler::new(p).sample(&mut l.clone(), &[777]), 777);
        }
        // Huge logits do not overflow.
        assert_eq!(
            Sampler::new(params(0.01)).sample(&mut [3e38, -3e38], &[]),
            0
        );
    }

    #[test]
    fn buffers_are_reused() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 10,
            top_p: 0.9,
            repetition_penalty: 1.2,
            ..SamplingParams::default()
        });
        let logits = random_logits(1, 4096);
        s.sample(&mut logits.clone(), &[1, 2]);
        let caps = (s.scratch.capacity(), s.order.capacity(), s.seen.capacity());
        let ptrs = (s.scratch.as_ptr(), s.order.as_ptr(), s.seen.as_ptr());
        for _ in 0..10 {
            s.sample(&mut logits.clone(), &[1, 2, 3]);
        }
        assert_eq!(
            caps,
            (s.scratch.capacity(), s.order.capacity(), s.seen.capacity())
        );
        assert_eq!(
            ptrs,
            (s.scratch.as_ptr(), s.order.as_ptr(), s.seen.as_ptr())
        );
    }
}
