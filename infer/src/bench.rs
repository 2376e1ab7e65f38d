//! Measurements behind `tern bench`: the machine's read bandwidth, prefill and decode
//! speed, and per-kernel throughput. Timed runs only; nothing here asserts a speed.

use std::hint::black_box;
use std::time::Instant;

use serde::Serialize;

use crate::kernels::{GemmShape, Isa, Kernels};
use crate::model::{Logits, Model, State};
use crate::pool::{split_range, Pool};
use crate::reference::NoProbe;
use crate::InferError;

/// A buffer far larger than the caches, allocated and touched once, whose streaming read
/// measures the machine's read bandwidth. It asks for 2 MiB pages, as the model's mapping
/// does (`tern_format`'s reader): with 4 KiB pages the probe would measure page walks too,
/// and decode could read its weights "faster than the machine".
pub struct ReadProbe {
    buf: memmap2::MmapMut,
}

impl ReadProbe {
    pub fn new(bytes: usize) -> std::io::Result<ReadProbe> {
        let mut buf = memmap2::MmapMut::map_anon(bytes.max(64) / 64 * 64)?;
        #[cfg(target_os = "linux")]
        let _ = buf.advise(memmap2::Advice::HugePage);
        // Written, so it is really backed by memory.
        for (i, word) in buf.chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&(i as u64).to_le_bytes());
        }
        Ok(ReadProbe { buf })
    }

    /// Read bandwidth in GB/s: the pool's workers sum disjoint parts of the buffer, best of
    /// `repeats`.
    pub fn measure(&self, pool: &Pool, repeats: usize) -> f64 {
        let (buf, lines) = (&self.buf[..], self.buf.len() / 64);
        let mut best = 0.0f64;
        for _ in 0..repeats.max(1) {
            let sums: Vec<std::sync::atomic::AtomicU64> =
                (0..pool.threads()).map(|_| 0.into()).collect();
            let start = Instant::now();
            pool.run(|w, n| {
                let r = split_range(lines, 64, w, n);
                let part = &buf[r.start * 64..r.end * 64];
                // Eight independent lanes so the loop is bound by loads, not by one add chain.
                let mut acc = [0u64; 8];
                for line in part.chunks_exact(64) {
                    for (a, v) in acc.iter_mut().zip(line.chunks_exact(8)) {
                        *a = a.wrapping_add(u64::from_le_bytes(v.try_into().unwrap_or_default()));
                    }
                }
                sums[w].store(
                    acc.iter().fold(0, |s, v| s.wrapping_add(*v)),
                    std::sync::atomic::Ordering::Relaxed,
                );
            });
            let secs = start.elapsed().as_secs_f64();
            black_box(&sums);
            best = best.max(buf.len() as f64 / secs / 1e9);
        }
        best
    }
}

/// Deterministic token ids for timing runs.
fn tokens(n: usize, vocab: usize, seed: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104729) % vocab) as u32)
        .collect()
}

/// Seconds to prefill `n` tokens from position 0.
pub fn time_prefill(
    model: &Model,
    pool: &Pool,
    kernels: Kernels,
    n: usize,
) -> Result<f64, InferError> {
    crate::limits::check_ctx(&model.config, n, pool.threads(), "prompt length")?;
    let mut state = State::new(model, kernels, pool, n)?;
    let ids = tokens(n, model.config.vocab_size as usize, 1);
    let start = Instant::now();
    model.forward(pool, &mut state, &ids, Logits::Last, &mut NoProbe)?;
    Ok(start.elapsed().as_secs_f64())
}

/// Seconds per token to decode `n` tokens one at a time starting at position `context`.
/// The cache before `context` is not computed (its contents don't change the cost).
pub fn time_decode(
    model: &Model,
    pool: &Pool,
    kernels: Kernels,
    context: usize,
    n: usize,
) -> Result<f64, InferError> {
    let ctx = context
        .checked_add(n)
        .and_then(|c| c.checked_add(1))
        .unwrap_or(usize::MAX);
    crate::limits::check_ctx(
        &model.config,
        ctx,
        pool.threads(),
        "context + decoded tokens",
    )?;
    let mut state = State::new(model, kernels, pool, ctx)?;
    let ids = tokens(n + 1, model.config.vocab_size as usize, 2);
    state.pos = context;
    model.forward(pool, &mut state, &ids[..1], Logits::Last, &mut NoProbe)?; // warm up
    let start = Instant::now();
    for &t in &ids[1..] {
        model.forward(pool, &mut state, &[t], Logits::Last, &mut NoProbe)?;
    }
    Ok(start.elapsed().as_secs_f64() / n as f64)
}

/// Bytes a decode step reads at `context`: every weight once, plus the KV cache.
pub fn bytes_per_token(model: &Model, context: usize) -> u64 {
    let c = &model.config;
    let kv = (2 * 4 * c.num_hidden_layers)
        .saturating_mul(context as u64)
        .saturating_mul(c.kv_dim());
    model.weight_bytes_per_token().saturating_add(kv)
}

/// A context length asked for, and the one measured: the longest that leaves room for the
/// decoded tokens when the model has fewer positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct FittedContext {
    pub requested: usize,
    pub measured: usize,
}

/// Fits each requested context to a model of `positions` positions that decodes `decode`
/// tokens after it (2B-4T: 4096 positions, so 4096 runs at 4096 − n − 1), dropping
/// duplicates after fitting, in order.
pub fn fit_contexts(requested: &[usize], positions: usize, decode: usize) -> Vec<FittedContext> {
    let limit = positions.saturating_sub(decode.saturating_add(1));
    let mut out: Vec<FittedContext> = Vec::new();
    for &c in requested {
        let measured = c.min(limit);
        if !out.iter().any(|f| f.measured == measured) {
            out.push(FittedContext {
                requested: c,
                measured,
            });
        }
    }
    out
}

/// Smallest, median and largest of a set of measurements.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    /// `None` for no measurements. The median of an even count is the upper middle one.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Spread {
            min: *v.first()?,
            median: v[v.len() / 2],
            max: v[v.len() - 1],
        })
    }
}

/// The median of per-round values (0 for none).
fn median(values: &[f64]) -> f64 {
    Spread::of(values).map_or(0.0, |s| s.median)
}

/// What `tern bench` measures for one thread count.
#[derive(Clone, Debug)]
pub struct Plan {
    pub prompt: usize,
    pub decode: usize,
    /// Contexts already fitted to the model.
    pub contexts: Vec<usize>,
    pub rounds: usize,
}

/// Decode speed at one context.
#[derive(Clone, Debug, Serialize)]
pub struct Decode {
    pub context: usize,
    pub tokens_per_second: Spread,
    pub bytes_per_token: u64,
    /// At the median tokens/s.
    pub gb_per_s: f64,
    /// Median over rounds of the decode's GB/s over the same round's read bandwidth.
    pub fraction_of_bandwidth_bound: f64,
}

/// Every measurement at one thread count.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    pub threads: usize,
    /// Median over rounds.
    pub read_bandwidth_gb_per_s: f64,
    pub prefill_tokens: usize,
    pub prefill_tokens_per_second: Spread,
    /// Median over rounds of prefill tokens/s over the same round's decode tokens/s at the
    /// first context.
    pub prefill_over_decode: f64,
    pub decode: Vec<Decode>,
}

/// Per-round measurements at one thread count, before the statistics.
#[derive(Clone, Debug, Default)]
pub struct Rounds {
    /// GB/s of the read probe.
    pub bandwidth: Vec<f64>,
    /// Prefill tokens/s.
    pub prefill: Vec<f64>,
    /// Decode tokens/s, one list per context.
    pub decode: Vec<Vec<f64>>,
}

impl Rounds {
    /// The statistics: each ratio is taken within a round (neighbours in time), then the
    /// median over rounds. `bytes[i]` is what a decode step reads at `plan.contexts[i]`.
    pub fn summarize(&self, threads: usize, plan: &Plan, bytes: &[u64]) -> Run {
        let fraction = |tps: &[f64], bytes: u64| {
            let per_round: Vec<f64> = tps
                .iter()
                .zip(&self.bandwidth)
                .map(|(t, bw)| t * bytes as f64 / 1e9 / bw)
                .collect();
            median(&per_round)
        };
        let first = self.decode.first().map_or(&[][..], Vec::as_slice);
        let ratios: Vec<f64> = self.prefill.iter().zip(first).map(|(p, d)| p / d).collect();
        let zero = Spread {
            min: 0.0,
            median: 0.0,
            max: 0.0,
        };
        let decode = plan
            .contexts
            .iter()
            .zip(bytes)
            .zip(&self.decode)
            .map(|((&context, &bytes), tps)| {
                let s = Spread::of(tps).unwrap_or(zero);
                Decode {
                    context,
                    bytes_per_token: bytes,
                    gb_per_s: s.median * bytes as f64 / 1e9,
                    fraction_of_bandwidth_bound: fraction(tps, bytes),
                    tokens_per_second: s,
                }
            })
            .collect();
        Run {
            threads,
            read_bandwidth_gb_per_s: median(&self.bandwidth),
            prefill_tokens: plan.prompt,
            prefill_tokens_per_second: Spread::of(&self.prefill).unwrap_or(zero),
            prefill_over_decode: median(&ratios),
            decode,
        }
    }
}

/// Measures `plan` on `pool`: rounds of (bandwidth, prefill, decode at each context), so
/// that each decode is compared with the bandwidth and prefill measured next to it in time.
/// `step()` is called after each measurement (`rounds × (2 + contexts)` in all).
pub fn measure(
    model: &Model,
    pool: &Pool,
    kernels: Kernels,
    probe: &ReadProbe,
    plan: &Plan,
    step: &dyn Fn(),
) -> Result<Run, InferError> {
    let mut rounds = Rounds {
        decode: vec![Vec::new(); plan.contexts.len()],
        ..Rounds::default()
    };
    for _ in 0..plan.rounds.max(1) {
        rounds.bandwidth.push(probe.measure(pool, 3));
        step();
        let seconds = time_prefill(model, pool, kernels, plan.prompt)?;
        rounds.prefill.push(plan.prompt as f64 / seconds);
        step();
        for (tps, &ctx) in rounds.decode.iter_mut().zip(&plan.contexts) {
            tps.push(1.0 / time_decode(model, pool, kernels, ctx, plan.decode)?);
            step();
        }
    }
    let bytes: Vec<u64> = plan
        .contexts
        .iter()
        .map(|&c| bytes_per_token(model, c + plan.decode / 2))
        .collect();
    Ok(rounds.summarize(pool.threads(), plan, &bytes))
}

/// The CPU model (from /proc/cpuinfo where there is one), to record beside every figure.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// One kernel's throughput on one ISA.
#[derive(Clone, Debug, Serialize)]
pub struct KernelSpeed {
    pub kernel: String,
    pub isa: String,
    pub shape: String,
    /// Weight bytes streamed per second (from memory, not cache).
    pub gb_per_s: f64,
    /// For the matrix-matrix kernel: int8×trit multiply-adds per second.
    pub gops: Option<f64>,
}

/// Seconds per call of `run(m)`, with `m` cycling `reps` times through `0..copies` (the
/// index of one of `copies` equal weight matrices, together larger than the caches, so that
/// each call streams its weights from memory).
fn time_streaming(copies: usize, reps: usize, mut run: impl FnMut(usize)) -> f64 {
    let start = Instant::now();
    for r in 0..reps * copies {
        run(r % copies);
    }
    start.elapsed().as_secs_f64() / (reps * copies) as f64
}

/// Single-thread throughput of each kernel on each ISA this CPU has, on 2B-4T shapes, with
/// weights cycled through a set larger than the caches: the ternary GEMVs in both layouts
/// (TQ2, TQ1), the TQ2 GEMM of prefill, and the head GEMVs (bf16, Q8_ROW).
pub fn kernel_speeds(budget_bytes: usize) -> Vec<KernelSpeed> {
    let mut out = Vec::new();
    let speed = |kernel: &str, k: &Kernels, rows: usize, cols: usize, bytes: usize, secs: f64| {
        KernelSpeed {
            kernel: kernel.into(),
            isa: k.variant().into(),
            shape: format!("{rows}x{cols}"),
            gb_per_s: bytes as f64 / secs / 1e9,
            gops: None,
        }
    };
    for isa in Isa::all_available() {
        let k = Kernels::for_isa(isa).expect("available");
        let reps = if isa == Isa::Scalar { 1 } else { 3 };
        for (rows, cols) in [(6912usize, 2560usize), (2560, 6912)] {
            // TQ2 (2 bits): codes 0..=2 in every 2-bit field.
            let nb = cols.div_ceil(128);
            let mat = rows * nb * 32;
            let copies = (budget_bytes / mat).max(2);
            let weights: Vec<u8> = (0..mat * copies)
                .map(|i| [0x55u8, 0x96, 0x19, 0x64][i % 4])
                .collect();
            let q: Vec<i8> = (0..nb * 128).map(|i| (i % 255) as i8).collect();
            let qsum = q.iter().map(|&v| i32::from(v)).sum();
            let mut acc = vec![0i32; rows];
            let secs = time_streaming(copies, reps, |m| {
                k.tq2_gemv(&weights[m * mat..(m + 1) * mat], nb, &q, qsum, &mut acc);
                black_box(&acc);
            });
            out.push(speed("tq2_gemv", &k, rows, cols, mat, secs));

            // Prefill: 64 tokens against one matrix at a time.
            let n = 64;
            let qs: Vec<i8> = (0..n * nb * 128).map(|i| (i % 251) as i8).collect();
            let sums: Vec<i32> = qs
                .chunks_exact(nb * 128)
                .map(|r| r.iter().map(|&v| i32::from(v)).sum())
                .collect();
            let mut outm = vec![0i32; n * rows];
            let sh = GemmShape {
                blocks: nb,
                rows,
                tokens: n,
                q_stride: nb * 128,
            };
            let secs = time_streaming(if isa == Isa::Scalar { 1 } else { copies.min(8) }, 1, |m| {
                let w = &weights[m * mat..(m + 1) * mat];
                k.tq2_gemm(w, sh, &qs, &sums, &mut outm);
                black_box(&outm);
            });
            let mut gemm = speed("tq2_gemm x64", &k, rows, cols, mat, secs);
            gemm.gops = Some((rows * cols * n) as f64 / secs / 1e9);
            out.push(gemm);

            // TQ1 (1.6 bits): every byte a valid 5-trit encoding.
            let nb1 = cols.div_ceil(tern_format::tq1::BLOCK_COLS);
            let mat1 = rows * nb1 * tern_format::tq1::BLOCK_BYTES;
            let copies1 = (budget_bytes / mat1).max(2);
            let weights1: Vec<u8> = (0..mat1 * copies1)
                .map(|i| tern_format::tq1::pack_digits([0, 1, 2, (i % 3) as u8, 1]))
                .collect();
            let q1: Vec<i8> = (0..nb1 * tern_format::tq1::BLOCK_COLS)
                .map(|i| (i % 255) as i8)
                .collect();
            let qsum1 = q1.iter().map(|&v| i32::from(v)).sum();
            let secs = time_streaming(copies1, reps, |m| {
                k.tq1_gemv(
                    &weights1[m * mat1..(m + 1) * mat1],
                    nb1,
                    &q1,
                    qsum1,
                    &mut acc,
                );
                black_box(&acc);
            });
            out.push(speed("tq1_gemv", &k, rows, cols, mat1, secs));

            // TQ1 prefill: 64 tokens, rows of the quantizer's stride (a multiple of 128).
            let stride = (nb1 * tern_format::tq1::BLOCK_COLS).div_ceil(128) * 128;
            let qs1: Vec<i8> = (0..n * stride)
                .map(|i| {
                    if i % stride < q1.len() {
                        (i % 251) as i8
                    } else {
                        0
                    }
                })
                .collect();
            let sums1: Vec<i32> = qs1
                .chunks_exact(stride)
                .map(|r| r.iter().map(|&v| i32::from(v)).sum())
                .collect();
            let mats1 = if isa == Isa::Scalar {
                1
            } else {
                copies1.min(8)
            };
            let sh1 = GemmShape {
                blocks: nb1,
                rows,
                tokens: n,
                q_stride: stride,
            };
            let secs = time_streaming(mats1, 1, |m| {
                let w = &weights1[m * mat1..(m + 1) * mat1];
                k.tq1_gemm(w, sh1, &qs1, &sums1, &mut outm);
                black_box(&outm);
            });
            let mut gemm1 = speed("tq1_gemm x64", &k, rows, cols, mat1, secs);
            gemm1.gops = Some((rows * cols * n) as f64 / secs / 1e9);
            out.push(gemm1);
        }

        // The heads of 2B-4T: 128256 x 2560, bf16 (exact) and Q8_ROW (compact).
        let (rows, cols) = (128256usize, 2560usize);
        let x: Vec<f32> = (0..cols).map(|i| i as f32 * 1e-3).collect();
        let mut y = vec![0.0f32; rows];
        let w: Vec<u16> = (0..rows * cols)
            .map(|i| (0x3c00 + (i % 512)) as u16)
            .collect();
        let secs = time_streaming(1, if isa == Isa::Scalar { 1 } else { 2 }, |_| {
            k.bf16_gemv(&w, cols, &x, &mut y);
            black_box(&y);
        });
        out.push(speed("bf16_gemv", &k, rows, cols, w.len() * 2, secs));
        drop(w);
        let stride = crate::kernels::q8_stride(cols);
        let w8: Vec<u8> = (0..rows * stride)
            .map(|i| if i % stride < 4 { 0 } else { (i % 251) as u8 })
            .collect();
        let secs = time_streaming(1, if isa == Isa::Scalar { 1 } else { 2 }, |_| {
            k.q8_gemv(&w8, cols, &x, &mut y);
            black_box(&y);
        });
        out.push(speed("q8_gemv", &k, rows, cols, w8.len(), secs));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_fit_the_model_and_keep_their_order() {
        // 4096 positions, 2 decoded tokens: the longest context that fits is 4093.
        let fitted = fit_contexts(&[8, 100_000, 4093, 4096, 8], 4096, 2);
        let pairs: Vec<(usize, usize)> = fitted.iter().map(|f| (f.requested, f.measured)).collect();
        assert_eq!(pairs, [(8, 8), (100_000, 4093)]);
        // A model too short for the decoded tokens measures at context 0.
        assert_eq!(fit_contexts(&[128], 4, 8)[0].measured, 0);
        assert_eq!(fit_contexts(&[usize::MAX], 4096, usize::MAX)[0].measured, 0);
        assert!(fit_contexts(&[], 4096, 2).is_empty());
    }

    #[test]
    fn statistics_are_medians_of_per_round_ratios() {
        assert_eq!(Spread::of(&[]), None);
        let s = Spread::of(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 3.0, 10.0));
        let plan = Plan {
            prompt: 5,
            decode: 2,
            contexts: vec![8, 64],
            rounds: 3,
        };
        let rounds = Rounds {
            bandwidth: vec![10.0, 20.0, 40.0],
            prefill: vec![100.0, 300.0, 200.0],
            decode: vec![vec![10.0, 10.0, 50.0], vec![1.0, 2.0, 3.0]],
        };
        let run = rounds.summarize(4, &plan, &[1_000_000_000, 2_000_000_000]);
        assert_eq!(run.threads, 4);
        assert_eq!(run.read_bandwidth_gb_per_s, 20.0);
        assert_eq!(run.prefill_tokens_per_second.median, 200.0);
        // Per round 100/10, 300/10, 200/50: the median is 10, not 200/10.
        assert_eq!(run.prefill_over_decode, 10.0);
        let d = &run.decode[0];
        assert_eq!(
            (d.context, d.tokens_per_second.median, d.gb_per_s),
            (8, 10.0, 10.0)
        );
        // Per round 10/10, 10/20, 50/40 of the bound.
        assert_eq!(d.fraction_of_bandwidth_bound, 1.0);
        assert_eq!(run.decode[1].gb_per_s, 4.0);
    }
}
