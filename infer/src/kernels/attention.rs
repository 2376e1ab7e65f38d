//! Attention of the query heads that share one KV head, over the cached positions: scores,
//! softmax, weighted sum of values, all in f32. One body, compiled twice: for the baseline
//! target (the scalar kernel) and with AVX2 enabled (wider vectors for the same code).
//! Rust never contracts `a * b + c` into an FMA, and every sum below has a fixed order (the
//! dot product keeps eight explicit partial sums), so both give bit-identical results.

/// Shapes of one call (see [`super::Kernels::attend`]).
#[derive(Clone, Copy, Debug)]
pub struct AttendShape {
    /// Query heads computed together (all share the KV head).
    pub heads: usize,
    /// Dimension of a head.
    pub head_dim: usize,
    /// Cached positions to attend to.
    pub len: usize,
    /// Distance between consecutive positions in `keys` and `values`, in f32.
    pub stride: usize,
    /// Factor applied to every score (`head_dim^-0.5`).
    pub scale: f32,
}

/// `Σ a·b` with eight interleaved partial sums (lane `k` takes elements `k, k+8, ...`),
/// added in order, then the tail.
#[inline(always)]
pub(crate) fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// [`dot8`] of `a` with four vectors at once: the same operations in the same order for
/// each, but four independent chains, so the adds don't wait on each other's latency.
#[inline(always)]
fn dot8_x4(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    let mut acc = [[0.0f32; 8]; 4];
    let chunks = a
        .chunks_exact(8)
        .zip(b[0].chunks_exact(8))
        .zip(b[1].chunks_exact(8))
        .zip(b[2].chunks_exact(8))
        .zip(b[3].chunks_exact(8));
    for ((((x, y0), y1), y2), y3) in chunks {
        for (j, y) in [y0, y1, y2, y3].into_iter().enumerate() {
            for k in 0..8 {
                acc[j][k] += x[k] * y[k];
            }
        }
    }
    // `from_fn` stays out of line in the AVX2 build (a call per four positions, ≈ 10 % of
    // this kernel), but a plain loop here let LLVM re-vectorize the loop above 4 wide
    // across the positions, measured 10–40 % slower.
    let n8 = a.len() / 8 * 8;
    std::array::from_fn(|j| {
        let tail: f32 = a[n8..].iter().zip(&b[j][n8..]).map(|(x, y)| x * y).sum();
        acc[j].iter().sum::<f32>() + tail
    })
}

/// Positions whose values are summed into the outputs per pass: a block of value rows
/// (64 × 4 heads' dims at most) stays in L1 while every head and column slice reads it.
const VALUE_BLOCK: usize = 64;

#[inline(always)]
fn attend_body(
    sh: AttendShape,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (m, d, len, stride) = (sh.heads, sh.head_dim, sh.len, sh.stride);
    let s = &mut scores[..m * len];
    // Each key row is read once for all m heads, four positions at a time.
    let key = |p: usize| &keys[p * stride..p * stride + d];
    let mut p = 0;
    while p + 4 <= len {
        let rows = [key(p), key(p + 1), key(p + 2), key(p + 3)];
        for i in 0..m {
            let dots = dot8_x4(&q[i * d..(i + 1) * d], rows);
            for (j, v) in dots.into_iter().enumerate() {
                s[i * len + p + j] = v * sh.scale;
            }
        }
        p += 4;
    }
    for p in p..len {
        for i in 0..m {
            s[i * len + p] = dot8(&q[i * d..(i + 1) * d], key(p)) * sh.scale;
        }
    }
    for si in s.chunks_exact_mut(len) {
        let max = si.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut sum = 0.0;
        for sp in si.iter_mut() {
            *sp = (*sp - max).exp();
            sum += *sp;
        }
        for sp in si.iter_mut() {
            *sp /= sum;
        }
    }
    // out_i[c] = Σ_p w_i[p] · v_p[c], each sum in position order; the running sums of 32
    // columns stay in registers across a block of positions.
    let o = &mut out[..m * d];
    o.fill(0.0);
    let d32 = d / 32 * 32;
    for p0 in (0..len).step_by(VALUE_BLOCK) {
        let p1 = (p0 + VALUE_BLOCK).min(len);
        for (i, oi) in o.chunks_exact_mut(d).enumerate() {
            let wi = &s[i * len + p0..i * len + p1];
            for c0 in (0..d32).step_by(32) {
                let mut acc = [0.0f32; 32];
                acc.copy_from_slice(&oi[c0..c0 + 32]);
                for (j, &w) in wi.iter().enumerate() {
                    let v = &values[(p0 + j) * stride + c0..][..32];
                    for k in 0..32 {
                        acc[k] += w * v[k];
                    }
                }
                oi[c0..c0 + 32].copy_from_slice(&acc);
            }
            for (c, ov) in oi.iter_mut().enumerate().skip(d32) {
                for (j, &w) in wi.iter().enumerate() {
                    *ov += w * values[(p0 + j) * stride + c];
                }
            }
        }
    }
}

/// Reference [`super::Kernels::attend`].
pub fn attend(
    sh: AttendShape,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
) {
    super::check_attend(sh, q, keys, values, scores, out);
    attend_body(sh, q, keys, values, scores, out);
}

/// [`attend`] compiled with AVX2 enabled.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn attend_avx2(
    sh: AttendShape,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
) {
    super::check_attend(sh, q, keys, values, scores, out);
    attend_body(sh, q, keys, values, scores, out);
}
