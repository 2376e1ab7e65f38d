//! AArch64 NEON kernels. Every `pub(crate)` function is an `unsafe fn` whose only safety
//! requirement is the CPU feature it names (`neon`, part of the AArch64 baseline; the
//! `*_dotprod` ones also need `dotprod`). Lengths are asserted on entry.
//!
//! TQ2: a block is two 16-byte registers; bytes 0–15 hold columns 0–15, 32–47, 64–79,
//! 96–111 (`(v >> 2i) & 3`), bytes 16–31 columns 16–31, 48–63, … So "code register" `k`
//! (`k = 2i + half`) lines up with activations `16k..16k+16` of the block. The plain variant
//! multiplies with `smull`/`smlal` into i16 (8 products per lane per block, |sum| ≤ 2048)
//! and widens with `sadalp`; the dotprod variant uses `sdot` (inline assembly, because the
//! `vdotq_s32` intrinsic is not stable yet), only when `dotprod` is detected at run time.
//!
//! TQ1 uses the same two dot products on ten digit registers per block (see `unpack_tq1`).

use std::arch::aarch64::*;
use std::arch::asm;

use crate::kernels::{
    check_dense, check_gemm, check_q8_gemv, check_quantize, check_tq1_gemv, check_tq2_gemv,
    gemm_tiles, gemv_groups, q8_stride, scalar, ternary_gemv_groups, GemmShape, QuantRow, TQ1, TQ2,
};
use tern_format::{tq1, tq2};

// ---- quantization ------------------------------------------------------------------------

/// Quantizes 16 floats at `x` into 16 int8 at `q`; returns the i32 lane sums.
///
/// # Safety
/// `x` readable for 16 f32, `q` writable for 16 bytes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn quantize16(x: *const f32, q: *mut i8, s: float32x4_t) -> int32x4_t {
    let lo = vdupq_n_s32(-128);
    let hi = vdupq_n_s32(127);
    let mut v = [vdupq_n_s32(0); 4];
    for (k, vk) in v.iter_mut().enumerate() {
        // SAFETY: the caller guarantees 16 readable floats at `x`.
        let f = vmulq_f32(unsafe { vld1q_f32(x.add(4 * k)) }, s);
        // FCVTNS: round to nearest, ties to even; NaN -> 0 like the scalar `NaN as i8`.
        *vk = vminq_s32(vmaxq_s32(vcvtnq_s32_f32(f), lo), hi);
    }
    let sum = vaddq_s32(vaddq_s32(v[0], v[1]), vaddq_s32(v[2], v[3]));
    let h0 = vcombine_s16(vmovn_s32(v[0]), vmovn_s32(v[1]));
    let h1 = vcombine_s16(vmovn_s32(v[2]), vmovn_s32(v[3]));
    let b = vcombine_s8(vmovn_s16(h0), vmovn_s16(h1));
    // SAFETY: the caller guarantees 16 writable bytes at `q`.
    unsafe { vst1q_s8(q, b) };
    sum
}

/// NEON [`crate::kernels::Kernels::quantize_row`].
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn quantize_row(x: &[f32], q: &mut [i8]) -> QuantRow {
    check_quantize(x, q);
    let n = x.len();
    let zero = vdupq_n_f32(0.0);
    let mut vmax = zero;
    let chunks = x.chunks_exact(4);
    let rem = chunks.remainder();
    for c in chunks {
        // SAFETY: `c` has exactly 4 floats.
        let a = vabsq_f32(unsafe { vld1q_f32(c.as_ptr()) });
        // NaN -> 0, so NaN is ignored like `f32::max` does.
        let a = vbslq_f32(vceqq_f32(a, a), a, zero);
        vmax = vmaxq_f32(vmax, a);
    }
    let mut m = vmaxvq_f32(vmax);
    for &v in rem {
        m = m.max(v.abs());
    }
    let m = m.max(1e-5);
    let s = 127.0f32 / m;
    let vs = vdupq_n_f32(s);

    let mut vsum = vdupq_n_s32(0);
    let full = n / 16 * 16;
    let mut k = 0;
    while k < full {
        // SAFETY: k + 16 <= n <= q.len().
        vsum = vaddq_s32(vsum, unsafe {
            quantize16(x.as_ptr().add(k), q.as_mut_ptr().add(k), vs)
        });
        k += 16;
    }
    if k < n {
        let mut buf = [0.0f32; 16];
        buf[..n - k].copy_from_slice(&x[k..]);
        // SAFETY: `buf` has 16 floats; q.len() is a multiple of 128 and >= n, hence
        // >= k + 16 (k is a multiple of 16 below n). Zero padding quantizes to 0.
        vsum = vaddq_s32(vsum, unsafe {
            quantize16(buf.as_ptr(), q.as_mut_ptr().add(k), vs)
        });
        k += 16;
    }
    q[k..].fill(0);
    QuantRow {
        scale: s,
        sum: vaddvq_s32(vsum),
    }
}

// ---- TQ2 ---------------------------------------------------------------------------------

/// The 8 code registers of the block at `w` (register `k` ↔ block columns `16k..16k+16`).
///
/// # Safety
/// `w` readable for 32 bytes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn unpack(w: *const u8) -> [int8x16_t; 8] {
    let mask = vdupq_n_u8(3);
    // SAFETY: the caller guarantees 32 readable bytes at `w`.
    let (l, h) = unsafe { (vld1q_u8(w), vld1q_u8(w.add(16))) };
    let c = |v: uint8x16_t| vreinterpretq_s8_u8(vandq_u8(v, mask));
    [
        c(l),
        c(h),
        c(vshrq_n_u8::<2>(l)),
        c(vshrq_n_u8::<2>(h)),
        c(vshrq_n_u8::<4>(l)),
        c(vshrq_n_u8::<4>(h)),
        c(vshrq_n_u8::<6>(l)),
        c(vshrq_n_u8::<6>(h)),
    ]
}

/// The `16 · N` activations of one block (N = 8 for TQ2, 10 for TQ1) as N registers.
///
/// # Safety
/// `q` readable for `16 · N` bytes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load_q<const N: usize>(q: *const i8) -> [int8x16_t; N] {
    let mut r = [vdupq_n_s8(0); N];
    for (k, v) in r.iter_mut().enumerate() {
        // SAFETY: the caller guarantees 16 · N readable bytes at `q`; k < N.
        *v = unsafe { vld1q_s8(q.add(16 * k)) };
    }
    r
}

/// `acc + Σ code·q` over one block of `N` (even, ≤ 10) registers with `smull`/`smlal` +
/// `sadalp`.
#[inline]
#[target_feature(enable = "neon")]
fn block_dot_plain<const N: usize>(
    acc: int32x4_t,
    c: &[int8x16_t; N],
    q: &[int8x16_t; N],
) -> int32x4_t {
    // Two i16 accumulators (even / odd registers), N products per lane each, every product
    // of a code or digit (0..=2) with an int8: |sum| <= 10 · 256.
    let mut p0 = vmull_s8(vget_low_s8(c[0]), vget_low_s8(q[0]));
    let mut p1 = vmull_s8(vget_low_s8(c[1]), vget_low_s8(q[1]));
    p0 = vmlal_high_s8(p0, c[0], q[0]);
    p1 = vmlal_high_s8(p1, c[1], q[1]);
    for k in (2..N).step_by(2) {
        p0 = vmlal_s8(p0, vget_low_s8(c[k]), vget_low_s8(q[k]));
        p1 = vmlal_s8(p1, vget_low_s8(c[k + 1]), vget_low_s8(q[k + 1]));
        p0 = vmlal_high_s8(p0, c[k], q[k]);
        p1 = vmlal_high_s8(p1, c[k + 1], q[k + 1]);
    }
    vpadalq_s16(vpadalq_s16(acc, p0), p1)
}

/// `acc + Σ a·b` (four i8 products per i32 lane), the `sdot` instruction.
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: `sdot` reads and writes only the named vector registers; this function can
    // only be called where `dotprod` is enabled (its target feature), so it is available.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// `acc + Σ code·q` over one block of `N` (even) registers with `sdot`.
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn block_dot_dotprod<const N: usize>(
    acc: int32x4_t,
    c: &[int8x16_t; N],
    q: &[int8x16_t; N],
) -> int32x4_t {
    let mut a0 = sdot(acc, c[0], q[0]);
    let mut a1 = sdot(vdupq_n_s32(0), c[1], q[1]);
    for k in (2..N).step_by(2) {
        a0 = sdot(a0, c[k], q[k]);
        a1 = sdot(a1, c[k + 1], q[k + 1]);
    }
    vaddq_s32(a0, a1)
}

/// `[Σa, Σb, Σc, Σd]`.
#[inline]
#[target_feature(enable = "neon")]
fn hsum4(a: int32x4_t, b: int32x4_t, c: int32x4_t, d: int32x4_t) -> int32x4_t {
    vpaddq_s32(vpaddq_s32(a, b), vpaddq_s32(c, d))
}

macro_rules! tq2_kernels {
    ($features:literal, $block_dot:ident, $gemv:ident, $gemm:ident, $rows:ident, $tile:ident) => {
        /// `Σ code·q` of `R ≤ 4` consecutive rows at `w` with one activation row; lanes
        /// `R..4` are 0.
        ///
        /// # Safety
        /// `w` readable for `R · nb · 32` bytes, `q` for `nb · 128`; features available.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $rows<const R: usize>(w: *const u8, nb: usize, q: *const i8) -> int32x4_t {
            let rb = nb * tq2::BLOCK_BYTES;
            let mut acc = [vdupq_n_s32(0); 4];
            for b in 0..nb {
                // SAFETY: b < nb: the block's activations are in bounds.
                let qv = unsafe { load_q::<8>(q.add(b * tq2::BLOCK_COLS)) };
                for (r, a) in acc.iter_mut().enumerate().take(R) {
                    // SAFETY: r < R, b < nb: the block lies inside the R rows at `w`.
                    let codes = unsafe { unpack(w.add(r * rb + b * tq2::BLOCK_BYTES)) };
                    *a = $block_dot(*a, &codes, &qv);
                }
            }
            hsum4(acc[0], acc[1], acc[2], acc[3])
        }

        /// NEON [`crate::kernels::Kernels::tq2_gemv`].
        ///
        /// # Safety
        /// The CPU must support the features of this function's `target_feature`.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $gemv(w: &[u8], nb: usize, q: &[i8], q_sum: i32, out: &mut [i32]) {
            check_tq2_gemv(w, nb, q, out);
            let rb = nb * tq2::BLOCK_BYTES;
            let (wp, qp) = (w.as_ptr(), q.as_ptr());
            ternary_gemv_groups(out, q_sum, |r, k| {
                // SAFETY: rows r..r+k exist (w.len() == rows · rb), q has nb · 128 bytes.
                let v = unsafe {
                    let wr = wp.add(r * rb);
                    const_count!(k, $rows(wr, nb, qp), 1 | 2 | 3 => 4)
                };
                let mut a = [0i32; 4];
                // SAFETY: `a` has 4 i32.
                unsafe { vst1q_s32(a.as_mut_ptr(), v) };
                a
            });
        }

        /// `Σ code·q` of one row (`nb` blocks at `w`) with `T ≤ 8` activation rows at `q`
        /// (stride `qs`), each unpacked block reused for all `T` tokens.
        ///
        /// # Safety
        /// `w` readable for `nb · 32` bytes, `q` for `(T − 1) · qs + nb · 128`; features
        /// available.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $tile<const T: usize>(
            w: *const u8,
            nb: usize,
            q: *const i8,
            qs: usize,
        ) -> [i32; 8] {
            let mut acc = [vdupq_n_s32(0); 8];
            for b in 0..nb {
                // SAFETY: b < nb: the block is inside the row.
                let codes = unsafe { unpack(w.add(b * tq2::BLOCK_BYTES)) };
                for (t, a) in acc.iter_mut().enumerate().take(T) {
                    // SAFETY: t < T, b < nb: inside activation row t.
                    let qv = unsafe { load_q::<8>(q.add(t * qs + b * tq2::BLOCK_COLS)) };
                    *a = $block_dot(*a, &codes, &qv);
                }
            }
            let mut res = [0i32; 8];
            // SAFETY: `res` has 8 i32.
            unsafe {
                vst1q_s32(res.as_mut_ptr(), hsum4(acc[0], acc[1], acc[2], acc[3]));
                vst1q_s32(
                    res.as_mut_ptr().add(4),
                    hsum4(acc[4], acc[5], acc[6], acc[7]),
                );
            }
            res
        }

        /// NEON [`crate::kernels::Kernels::tq2_gemm`].
        ///
        /// # Safety
        /// The CPU must support the features of this function's `target_feature`.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $gemm(
            w: &[u8],
            sh: GemmShape,
            q: &[i8],
            q_sums: &[i32],
            out: &mut [i32],
        ) {
            check_gemm(TQ2, w, sh, q, q_sums, out);
            let (nb, qs) = (sh.blocks, sh.q_stride);
            let rb = nb * tq2::BLOCK_BYTES;
            gemm_tiles(rb, sh.rows, sh.tokens, 4, q_sums, out, |r, t0, tn| {
                // SAFETY: row r < rows and tokens t0..t0+tn < tokens exist (lengths checked).
                unsafe {
                    let (wr, qt) = (w.as_ptr().add(r * rb), q.as_ptr().add(t0 * qs));
                    const_count!(tn, $tile(wr, nb, qt, qs), 1 | 2 | 3 => 4)
                }
            });
        }
    };
}

tq2_kernels!(
    "neon",
    block_dot_plain,
    tq2_gemv,
    tq2_gemm,
    gemv_rows_plain,
    gemm_tile_plain
);
tq2_kernels!(
    "neon,dotprod",
    block_dot_dotprod,
    tq2_gemv_dotprod,
    tq2_gemm_dotprod,
    gemv_rows_dotprod,
    gemm_tile_dotprod
);

// ---- TQ1 ---------------------------------------------------------------------------------
//
// A block is two 16-byte registers; digit i of byte j is block column j + 32i, so the digit
// register k = 2i + half lines up with activations 16k..16k+16, as for TQ2. NEON has byte
// multiplies and unsigned compares: m = byte · 3^i (mod 256) is one `mul`, and
// digit = (3m) >> 8 = (m ≥ 86) + (m ≥ 171).

/// The 10 digit registers (values 0..=2) of the TQ1 block at `w` (register `k` ↔ block
/// columns `16k..16k+16`).
///
/// # Safety
/// `w` readable for 32 bytes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn unpack_tq1(w: *const u8) -> [int8x16_t; 10] {
    // SAFETY: the caller guarantees 32 readable bytes at `w`.
    let (l, h) = unsafe { (vld1q_u8(w), vld1q_u8(w.add(16))) };
    let (t1, t2) = (vdupq_n_u8(86), vdupq_n_u8(171));
    // Each compare is 0 or 0xFF: the sum of their top bits is the digit.
    let digit = |m: uint8x16_t| {
        let (c1, c2) = (vcgeq_u8(m, t1), vcgeq_u8(m, t2));
        vreinterpretq_s8_u8(vsraq_n_u8::<7>(vshrq_n_u8::<7>(c1), c2))
    };
    let mut d = [vdupq_n_s8(0); 10];
    let mut power = 1u8;
    for i in 0..5 {
        let f = vdupq_n_u8(power);
        d[2 * i] = digit(vmulq_u8(l, f));
        d[2 * i + 1] = digit(vmulq_u8(h, f));
        power = power.wrapping_mul(3);
    }
    d
}

macro_rules! tq1_kernels {
    ($features:literal, $block_dot:ident, $gemv:ident, $gemm:ident, $rows:ident, $tile:ident) => {
        /// `Σ digit·q` of `R ≤ 4` consecutive TQ1 rows at `w` with one activation row;
        /// lanes `R..4` are 0.
        ///
        /// # Safety
        /// `w` readable for `R · nb · 32` bytes, `q` for `nb · 160`; features available.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $rows<const R: usize>(w: *const u8, nb: usize, q: *const i8) -> int32x4_t {
            let rb = nb * tq1::BLOCK_BYTES;
            let mut acc = [vdupq_n_s32(0); 4];
            for b in 0..nb {
                // SAFETY: b < nb: the block's activations are in bounds.
                let qv = unsafe { load_q::<10>(q.add(b * tq1::BLOCK_COLS)) };
                for (r, a) in acc.iter_mut().enumerate().take(R) {
                    // SAFETY: r < R, b < nb: the block lies inside the R rows at `w`.
                    let d = unsafe { unpack_tq1(w.add(r * rb + b * tq1::BLOCK_BYTES)) };
                    *a = $block_dot(*a, &d, &qv);
                }
            }
            hsum4(acc[0], acc[1], acc[2], acc[3])
        }

        /// NEON [`crate::kernels::Kernels::tq1_gemv`].
        ///
        /// # Safety
        /// The CPU must support the features of this function's `target_feature`.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $gemv(w: &[u8], nb: usize, q: &[i8], q_sum: i32, out: &mut [i32]) {
            check_tq1_gemv(w, nb, q, out);
            let rb = nb * tq1::BLOCK_BYTES;
            let (wp, qp) = (w.as_ptr(), q.as_ptr());
            ternary_gemv_groups(out, q_sum, |r, k| {
                // SAFETY: rows r..r+k exist (w.len() == rows · rb), q has nb · 160 bytes.
                let v = unsafe {
                    let wr = wp.add(r * rb);
                    const_count!(k, $rows(wr, nb, qp), 1 | 2 | 3 => 4)
                };
                let mut a = [0i32; 4];
                // SAFETY: `a` has 4 i32.
                unsafe { vst1q_s32(a.as_mut_ptr(), v) };
                a
            });
        }

        /// `Σ digit·q` of one TQ1 row with `T ≤ 4` activation rows at `q` (stride `qs`),
        /// each decoded block reused for all `T` tokens.
        ///
        /// # Safety
        /// `w` readable for `nb · 32` bytes, `q` for `(T − 1) · qs + nb · 160`.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $tile<const T: usize>(
            w: *const u8,
            nb: usize,
            q: *const i8,
            qs: usize,
        ) -> int32x4_t {
            let mut acc = [vdupq_n_s32(0); 4];
            for b in 0..nb {
                // SAFETY: b < nb: the block is inside the row.
                let d = unsafe { unpack_tq1(w.add(b * tq1::BLOCK_BYTES)) };
                for (t, a) in acc.iter_mut().enumerate().take(T) {
                    // SAFETY: t < T, b < nb: the block's activations of token t.
                    let qv = unsafe { load_q::<10>(q.add(t * qs + b * tq1::BLOCK_COLS)) };
                    *a = $block_dot(*a, &d, &qv);
                }
            }
            hsum4(acc[0], acc[1], acc[2], acc[3])
        }

        /// NEON [`crate::kernels::Kernels::tq1_gemm`].
        ///
        /// # Safety
        /// The CPU must support the features of this function's `target_feature`.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $gemm(
            w: &[u8],
            sh: GemmShape,
            q: &[i8],
            q_sums: &[i32],
            out: &mut [i32],
        ) {
            check_gemm(TQ1, w, sh, q, q_sums, out);
            let (nb, qs) = (sh.blocks, sh.q_stride);
            let rb = nb * tq1::BLOCK_BYTES;
            gemm_tiles(rb, sh.rows, sh.tokens, 4, q_sums, out, |r, t0, tn| {
                // SAFETY: row r < rows and tokens t0..t0+tn < tokens exist (lengths checked).
                let v = unsafe {
                    let (wr, qt) = (w.as_ptr().add(r * rb), q.as_ptr().add(t0 * qs));
                    const_count!(tn, $tile(wr, nb, qt, qs), 1 | 2 | 3 => 4)
                };
                let mut res = [0i32; 8];
                // SAFETY: `res` has room for 4 i32.
                unsafe { vst1q_s32(res.as_mut_ptr(), v) };
                res
            });
        }
    };
}

tq1_kernels!(
    "neon",
    block_dot_plain,
    tq1_gemv,
    tq1_gemm,
    tq1_rows_plain,
    tq1_tile_plain
);
tq1_kernels!(
    "neon,dotprod",
    block_dot_dotprod,
    tq1_gemv_dotprod,
    tq1_gemm_dotprod,
    tq1_rows_dotprod,
    tq1_tile_dotprod
);

// ---- Q8_ROW ------------------------------------------------------------------------------

/// NEON [`crate::kernels::Kernels::q8_gemv`]: per row, int8 widened to f32 and multiplied
/// into four f32x4 accumulators (16 columns per step), then times the row scale.
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn q8_gemv(w: &[u8], cols: usize, x: &[f32], out: &mut [f32]) {
    check_q8_gemv(w, cols, x, out);
    let stride = q8_stride(cols);
    let xp = x.as_ptr();
    for (o, rec) in out.iter_mut().zip(w.chunks_exact(stride)) {
        let scale = f32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]);
        let qp = rec[4..].as_ptr() as *const i8;
        let mut a = [vdupq_n_f32(0.0); 4];
        let mut c = 0;
        while c + 16 <= cols {
            // SAFETY: c + 16 <= cols: inside the record's int8 values and `x`.
            let v = unsafe { vld1q_s8(qp.add(c)) };
            let (lo, hi) = (vmovl_s8(vget_low_s8(v)), vmovl_high_s8(v));
            let f = [
                vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))),
                vcvtq_f32_s32(vmovl_high_s16(lo)),
                vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))),
                vcvtq_f32_s32(vmovl_high_s16(hi)),
            ];
            for (k, ak) in a.iter_mut().enumerate() {
                // SAFETY: c + 4k + 4 <= cols == x.len().
                *ak = vfmaq_f32(*ak, f[k], unsafe { vld1q_f32(xp.add(c + 4 * k)) });
            }
            c += 16;
        }
        let sum = vaddvq_f32(vaddq_f32(vaddq_f32(a[0], a[1]), vaddq_f32(a[2], a[3])));
        let tail: f32 = rec[4 + c..4 + cols]
            .iter()
            .zip(&x[c..])
            .map(|(&q, &xv)| f32::from(q as i8) * xv)
            .sum();
        *o = scale * (sum + tail);
    }
}

// ---- dense GEMV --------------------------------------------------------------------------

/// IEEE binary16 bits (zero-extended to u32 lanes) to f32, exactly: the exponent and
/// mantissa are moved into f32 position and scaled by 2^112 (exact for normal and subnormal
/// values, since FPCR.FZ is off), infinities and NaNs are fixed up, then the sign is applied.
#[inline]
#[target_feature(enable = "neon")]
fn f16x4_to_f32(h: uint32x4_t) -> float32x4_t {
    let sign = vshlq_n_u32::<16>(vandq_u32(h, vdupq_n_u32(0x8000)));
    let em = vandq_u32(h, vdupq_n_u32(0x7fff));
    let shifted = vshlq_n_u32::<13>(em);
    let scaled = vmulq_f32(
        vreinterpretq_f32_u32(shifted),
        vdupq_n_f32(f32::from_bits(0x7780_0000)), // 2^112
    );
    let is_inf_nan = vcgeq_u32(em, vdupq_n_u32(0x7c00));
    let inf_nan = vorrq_u32(shifted, vdupq_n_u32(0x7f80_0000));
    let bits = vbslq_u32(is_inf_nan, inf_nan, vreinterpretq_u32_f32(scaled));
    vreinterpretq_f32_u32(vorrq_u32(bits, sign))
}

/// 8 bf16 (raw bits) at `p` to two f32x4.
///
/// # Safety
/// `p` readable for 8 u16.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load8_bf16(p: *const u16) -> (float32x4_t, float32x4_t) {
    // SAFETY: the caller guarantees 8 readable u16 at `p`.
    let h = unsafe { vld1q_u16(p) };
    (
        vreinterpretq_f32_u32(vshlq_n_u32::<16>(vmovl_u16(vget_low_u16(h)))),
        vreinterpretq_f32_u32(vshlq_n_u32::<16>(vmovl_high_u16(h))),
    )
}

/// 8 f16 (raw bits) at `p` to two f32x4.
///
/// # Safety
/// `p` readable for 8 u16.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load8_f16(p: *const u16) -> (float32x4_t, float32x4_t) {
    // SAFETY: the caller guarantees 8 readable u16 at `p`.
    let h = unsafe { vld1q_u16(p) };
    (
        f16x4_to_f32(vmovl_u16(vget_low_u16(h))),
        f16x4_to_f32(vmovl_high_u16(h)),
    )
}

/// 8 f32 at `p` as two f32x4.
///
/// # Safety
/// `p` readable for 8 f32.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load8_f32(p: *const f32) -> (float32x4_t, float32x4_t) {
    // SAFETY: the caller guarantees 8 readable f32 at `p`.
    unsafe { (vld1q_f32(p), vld1q_f32(p.add(4))) }
}

macro_rules! dense_gemv {
    ($name:ident, $rows_fn:ident, $t:ty, $load8:ident, $conv:expr) => {
        /// `Σ w·x` of `R ≤ 4` consecutive rows at `w` (`cols` each); entries `R..4` are 0.
        ///
        /// # Safety
        /// `w` readable for `R · cols` elements, `x` for `cols`.
        #[inline]
        #[target_feature(enable = "neon")]
        unsafe fn $rows_fn<const R: usize>(w: *const $t, cols: usize, x: &[f32]) -> [f32; 4] {
            let xp = x.as_ptr();
            let mut a0 = [vdupq_n_f32(0.0); 4];
            let mut a1 = [vdupq_n_f32(0.0); 4];
            let mut c = 0;
            while c + 8 <= cols {
                // SAFETY: c + 8 <= cols == x.len().
                let (x0, x1) = unsafe { (vld1q_f32(xp.add(c)), vld1q_f32(xp.add(c + 4))) };
                for r in 0..R {
                    // SAFETY: r < R, c + 8 <= cols: inside row r.
                    let (w0, w1) = unsafe { $load8(w.add(r * cols + c)) };
                    a0[r] = vfmaq_f32(a0[r], w0, x0);
                    a1[r] = vfmaq_f32(a1[r], w1, x1);
                }
                c += 8;
            }
            let mut res = [0.0f32; 4];
            for (r, out) in res.iter_mut().enumerate().take(R) {
                let mut tail = 0.0f32;
                for k in c..cols {
                    // SAFETY: r < R, k < cols: inside row r.
                    let wv = unsafe { *w.add(r * cols + k) };
                    tail += $conv(wv) * x[k];
                }
                *out = vaddvq_f32(vaddq_f32(a0[r], a1[r])) + tail;
            }
            res
        }

        /// NEON dense GEMV (see [`crate::kernels::Kernels`]).
        ///
        /// # Safety
        /// The CPU must support NEON.
        #[target_feature(enable = "neon")]
        pub(crate) unsafe fn $name(w: &[$t], cols: usize, x: &[f32], out: &mut [f32]) {
            check_dense(w.len(), cols, x, out);
            let wp = w.as_ptr();
            // Inlined, so that the rows kernels inline here (a closure has no target features).
            gemv_groups(
                out,
                #[inline(always)]
                |r, k| {
                    // SAFETY: rows r..r+k exist (w.len() == rows · cols checked).
                    unsafe { const_count!(k, $rows_fn(wp.add(r * cols), cols, x), 1 | 2 | 3 => 4) }
                },
            );
        }
    };
}

dense_gemv!(bf16_gemv, bf16_rows, u16, load8_bf16, scalar::bf16_to_f32);
dense_gemv!(f16_gemv, f16_rows, u16, load8_f16, scalar::f16_to_f32);
dense_gemv!(f32_gemv, f32_rows, f32, load8_f32, |v: f32| v);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_matches_half_for_every_bit_pattern() {
        for base in (0..=u16::MAX as u32).step_by(4) {
            let hs = [base, base + 1, base + 2, base + 3];
            // SAFETY: NEON is part of the AArch64 baseline; `hs` and `got` hold 4 u32/f32.
            let got = unsafe {
                let v = f16x4_to_f32(vld1q_u32(hs.as_ptr()));
                let mut got = [0.0f32; 4];
                vst1q_f32(got.as_mut_ptr(), v);
                got
            };
            for (h, g) in hs.iter().zip(got) {
                let want = scalar::f16_to_f32(*h as u16);
                assert!(
                    want.to_bits() == g.to_bits() || (want.is_nan() && g.is_nan()),
                    "f16 {h:#06x}: got {g:e} ({:#010x}), want {want:e}",
                    g.to_bits()
                );
            }
        }
    }
}
