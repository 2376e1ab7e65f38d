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
    // Each key row is read once for all m heads.
    for p in 0..len {
        let kp = &keys[p * stride..p * stride + d];
        for i in 0..m {
            s[i * len + p] = dot8(&q[i * d..(i + 1) * d], kp) * sh.scale;
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
    let o = &mut out[..m * d];
    o.fill(0.0);
    for p in 0..len {
        let vp = &values[p * stride..p * stride + d];
        for (i, oi) in o.chunks_exact_mut(d).enumerate() {
            let w = s[i * len + p];
            for (ov, vv) in oi.iter_mut().zip(vp) {
                *ov += w * vv;
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
