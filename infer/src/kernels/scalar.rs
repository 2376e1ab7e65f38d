//! Reference kernels in portable Rust: the executable specification every SIMD kernel is
//! tested against, and the fallback on CPUs without a SIMD path.
//!
//! TQ2 dot products are computed as `Σ code·q − Σ q` with `code = t + 1`, exactly like the
//! SIMD kernels; for valid data (no code 3) that equals `Σ t·q`. Data holding code 3 (which
//! a reader rejects when verifying) gives the same result on every ISA, as if `t = 2`.

use super::{
    check_dense, check_dense_gemm, check_gemm, check_q8_gemv, check_quantize, check_tq1_gemv,
    check_tq2_gemv, q8_stride, GemmShape, QuantRow, TQ1, TQ2,
};
use tern_format::{tq1, tq2};

/// Reference [`super::Kernels::quantize_row`].
pub fn quantize_row(x: &[f32], q: &mut [i8]) -> QuantRow {
    check_quantize(x, q);
    // `f32::max` ignores NaN, as the SIMD kernels do.
    let m = x.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-5);
    let s = 127.0f32 / m;
    let mut sum = 0i32;
    for (qk, &xk) in q.iter_mut().zip(x) {
        // NaN stays NaN through round/clamp and `as i8` maps it to 0.
        let v = (xk * s).round_ties_even().clamp(-128.0, 127.0) as i8;
        *qk = v;
        sum += v as i32;
    }
    q[x.len()..].fill(0);
    QuantRow { scale: s, sum }
}

/// `Σ code·q` over one TQ2 row (`nb` blocks) and one activation row.
#[inline]
fn tq2_dot_codes(row: &[u8], q: &[i8]) -> i32 {
    let mut acc = 0i32;
    for (blk, qb) in row
        .chunks_exact(tq2::BLOCK_BYTES)
        .zip(q.chunks_exact(tq2::BLOCK_COLS))
    {
        for (j, &byte) in blk.iter().enumerate() {
            for i in 0..4 {
                let code = ((byte >> (2 * i)) & 3) as i32;
                acc += code * qb[j + 32 * i] as i32;
            }
        }
    }
    acc
}

/// Reference [`super::Kernels::tq2_gemv`].
pub fn tq2_gemv(w: &[u8], nb: usize, q: &[i8], q_sum: i32, out: &mut [i32]) {
    check_tq2_gemv(w, nb, q, out);
    if nb == 0 {
        out.fill(0);
        return;
    }
    for (o, row) in out.iter_mut().zip(w.chunks_exact(nb * tq2::BLOCK_BYTES)) {
        *o = tq2_dot_codes(row, q) - q_sum;
    }
}

/// Reference [`super::Kernels::tq2_gemm`]: one [`tq2_gemv`] per token.
pub fn tq2_gemm(w: &[u8], sh: GemmShape, q: &[i8], q_sums: &[i32], out: &mut [i32]) {
    check_gemm(TQ2, w, sh, q, q_sums, out);
    per_token(sh, q, q_sums, out, tq2::BLOCK_COLS, |qt, sum, out| {
        tq2_gemv(w, sh.blocks, qt, sum, out)
    });
}

/// A GEMM as one GEMV per token (`len = blocks ·` block columns values of each row).
fn per_token(
    sh: GemmShape,
    q: &[i8],
    q_sums: &[i32],
    out: &mut [i32],
    block_cols: usize,
    mut gemv: impl FnMut(&[i8], i32, &mut [i32]),
) {
    let len = sh.blocks * block_cols;
    for (t, out) in out
        .chunks_exact_mut(sh.rows.max(1))
        .take(sh.tokens)
        .enumerate()
    {
        gemv(&q[t * sh.q_stride..t * sh.q_stride + len], q_sums[t], out);
    }
}

/// `Σ digit·q` over one TQ1 row (`nb` blocks) and one activation row. Digit `i` of a byte
/// is `(m_i · 3) >> 8` with `m_0 = byte`, `m_{i+1} = 3·m_i mod 256` (format.md §6.3).
#[inline]
fn tq1_dot_digits(row: &[u8], q: &[i8]) -> i32 {
    let mut acc = 0i32;
    for (blk, qb) in row
        .chunks_exact(tq1::BLOCK_BYTES)
        .zip(q.chunks_exact(tq1::BLOCK_COLS))
    {
        for (j, &byte) in blk.iter().enumerate() {
            let mut m = byte;
            for i in 0..5 {
                let digit = ((m as u16 * 3) >> 8) as i32;
                acc += digit * qb[j + 32 * i] as i32;
                m = m.wrapping_mul(3);
            }
        }
    }
    acc
}

/// Reference [`super::Kernels::tq1_gemv`]: `Σ digit·q − Σ q`.
pub fn tq1_gemv(w: &[u8], nb: usize, q: &[i8], q_sum: i32, out: &mut [i32]) {
    check_tq1_gemv(w, nb, q, out);
    if nb == 0 {
        out.fill(0);
        return;
    }
    for (o, row) in out.iter_mut().zip(w.chunks_exact(nb * tq1::BLOCK_BYTES)) {
        *o = tq1_dot_digits(row, q) - q_sum;
    }
}

/// Reference [`super::Kernels::tq1_gemm`]: one [`tq1_gemv`] per token.
pub fn tq1_gemm(w: &[u8], sh: GemmShape, q: &[i8], q_sums: &[i32], out: &mut [i32]) {
    check_gemm(TQ1, w, sh, q, q_sums, out);
    per_token(sh, q, q_sums, out, tq1::BLOCK_COLS, |qt, sum, out| {
        tq1_gemv(w, sh.blocks, qt, sum, out)
    });
}

/// Reference [`super::Kernels::q8_gemv`]: eight interleaved f32 partial sums of `q · x`
/// (like the dense kernels), times the row scale.
pub fn q8_gemv(w: &[u8], cols: usize, x: &[f32], out: &mut [f32]) {
    check_q8_gemv(w, cols, x, out);
    for (o, rec) in out.iter_mut().zip(w.chunks_exact(q8_stride(cols))) {
        let scale = f32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]);
        *o = scale * dense_dot(&rec[4..4 + cols], x, |b: u8| f32::from(b as i8));
    }
}

/// bf16 bits to f32 (exact).
#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// IEEE binary16 bits to f32 (exact).
#[inline]
pub fn f16_to_f32(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

/// Dot product of one dense row with `x`, eight interleaved f32 accumulators.
#[inline]
fn dense_dot<T: Copy>(row: &[T], x: &[f32], conv: impl Fn(T) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let rc = row.chunks_exact(8);
    let xc = x.chunks_exact(8);
    let (rt, xt) = (rc.remainder(), xc.remainder());
    for (r8, x8) in rc.zip(xc) {
        for k in 0..8 {
            acc[k] += conv(r8[k]) * x8[k];
        }
    }
    let mut tail = 0.0f32;
    for (&w, &xv) in rt.iter().zip(xt) {
        tail += conv(w) * xv;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

fn dense_gemv<T: Copy>(w: &[T], cols: usize, x: &[f32], out: &mut [f32], conv: impl Fn(T) -> f32) {
    check_dense(w.len(), cols, x, out);
    if cols == 0 {
        out.fill(0.0);
        return;
    }
    for (o, row) in out.iter_mut().zip(w.chunks_exact(cols)) {
        *o = dense_dot(row, x, &conv);
    }
}

/// Reference [`super::Kernels::bf16_gemv`].
pub fn bf16_gemv(w: &[u16], cols: usize, x: &[f32], out: &mut [f32]) {
    dense_gemv(w, cols, x, out, bf16_to_f32);
}

/// Reference [`super::Kernels::bf16_gemm`]: [`bf16_gemv`] token by token.
pub fn bf16_gemm(w: &[u16], cols: usize, x: &[f32], tokens: usize, out: &mut [f32]) {
    check_dense_gemm(w.len(), cols, x, tokens, out);
    if tokens == 0 {
        return;
    }
    let rows = out.len() / tokens;
    for t in 0..tokens {
        let ot = &mut out[t * rows..(t + 1) * rows];
        bf16_gemv(w, cols, &x[t * cols..(t + 1) * cols], ot);
    }
}

/// Reference [`super::Kernels::f16_gemv`].
pub fn f16_gemv(w: &[u16], cols: usize, x: &[f32], out: &mut [f32]) {
    dense_gemv(w, cols, x, out, f16_to_f32);
}

/// Reference [`super::Kernels::f32_gemv`].
pub fn f32_gemv(w: &[f32], cols: usize, x: &[f32], out: &mut [f32]) {
    dense_gemv(w, cols, x, out, |v| v);
}
