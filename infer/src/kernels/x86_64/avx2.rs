//! AVX2 kernels (with FMA and F16C). Every `pub(crate)` function here is an `unsafe fn`
//! whose only safety requirement is that the CPU supports `avx2`, `fma` and `f16c`
//! (`Isa::Avx2.available()`); lengths are checked with asserts on entry.
//!
//! TQ2: a 32-byte block loads into one register; `(v >> 2i) & 3` yields the codes of 32
//! consecutive columns `32i..32i+32`, which `vpmaddubsw` multiplies with 32 consecutive int8
//! activations (|code·q| ≤ 256, pair sums ≤ 512: no saturation), summing pairs into i16;
//! the four i16 products of a block (|sum| ≤ 2048) are added, then `vpmaddwd` by 1 widens
//! to i32. `Σ t·q = Σ code·q − Σ q`.

use std::arch::x86_64::*;

use crate::kernels::{
    check_dense, check_dense_gemm, check_gemm, check_q8_gemv, check_quantize, check_tq1_gemv,
    check_tq2_gemv, gemm_tiles, gemv_groups, q8_stride, scalar, ternary_gemv_groups, GemmShape,
    QuantRow, TQ1, TQ2,
};
use tern_format::{tq1, tq2};

// ---- horizontal helpers ------------------------------------------------------------------

/// The four i32 lanes of `v`.
#[inline]
#[target_feature(enable = "avx2")]
fn lanes(v: __m128i) -> [i32; 4] {
    let mut a = [0i32; 4];
    // SAFETY: `a` has 4 i32.
    unsafe { _mm_storeu_si128(a.as_mut_ptr() as *mut __m128i, v) };
    a
}

/// Sums each of four i32x8 vectors: `[Σa, Σb, Σc, Σd]`.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum4_epi32(a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> __m128i {
    let ab = _mm256_hadd_epi32(a, b);
    let cd = _mm256_hadd_epi32(c, d);
    let abcd = _mm256_hadd_epi32(ab, cd);
    _mm_add_epi32(
        _mm256_castsi256_si128(abcd),
        _mm256_extracti128_si256::<1>(abcd),
    )
}

/// `[Σa, Σb, Σc, Σd]` of four f32x8 vectors.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum4_ps(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
    let ab = _mm256_hadd_ps(a, b);
    let cd = _mm256_hadd_ps(c, d);
    let abcd = _mm256_hadd_ps(ab, cd);
    _mm_add_ps(
        _mm256_castps256_ps128(abcd),
        _mm256_extractf128_ps::<1>(abcd),
    )
}

#[inline]
#[target_feature(enable = "avx2")]
fn hsum_epi32(a: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256::<1>(a));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

#[inline]
#[target_feature(enable = "avx2")]
fn hmax_ps(a: __m256) -> f32 {
    // No lane of `a` is NaN (see `quantize_row`), so max is exact and order-independent.
    let m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m));
    _mm_cvtss_f32(m)
}

// ---- quantization ------------------------------------------------------------------------

/// Quantizes 32 floats at `x` into 32 int8 at `q`; returns the i32 lane sums.
///
/// # Safety
/// `x` readable for 32 f32, `q` writable for 32 bytes; AVX2 available.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn quantize32(x: *const f32, q: *mut i8, s: __m256) -> __m256i {
    let lo = _mm256_set1_ps(-128.0);
    let hi = _mm256_set1_ps(127.0);
    let mut v = [_mm256_setzero_si256(); 4];
    for (k, vk) in v.iter_mut().enumerate() {
        // SAFETY: the caller guarantees 32 readable floats at `x`.
        let f = _mm256_mul_ps(unsafe { _mm256_loadu_ps(x.add(8 * k)) }, s);
        // NaN -> 0 (the scalar `NaN as i8` is 0).
        let f = _mm256_and_ps(f, _mm256_cmp_ps::<_CMP_ORD_Q>(f, f));
        let f = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(f);
        let f = _mm256_min_ps(_mm256_max_ps(f, lo), hi);
        *vk = _mm256_cvtps_epi32(f); // exact: f is an integer in [-128, 127]
    }
    let sum = _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
    let p01 = _mm256_packs_epi32(v[0], v[1]);
    let p23 = _mm256_packs_epi32(v[2], v[3]);
    let b = _mm256_packs_epi16(p01, p23);
    // dword order after the in-lane packs is 0,2,4,6 | 1,3,5,7 (in 4-byte groups).
    let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: the caller guarantees 32 writable bytes at `q`.
    unsafe { _mm256_storeu_si256(q as *mut __m256i, b) };
    sum
}

/// AVX2 [`crate::kernels::Kernels::quantize_row`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_row(x: &[f32], q: &mut [i8]) -> QuantRow {
    check_quantize(x, q);
    let n = x.len();
    let sign = _mm256_set1_ps(-0.0);
    let mut vmax = _mm256_setzero_ps();
    let chunks = x.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        // SAFETY: `c` has exactly 8 floats.
        let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
        // max(|v|, acc) returns acc when |v| is NaN: NaN is ignored like `f32::max`.
        vmax = _mm256_max_ps(_mm256_andnot_ps(sign, v), vmax);
    }
    let mut m = hmax_ps(vmax);
    for &v in rem {
        m = m.max(v.abs());
    }
    let m = m.max(1e-5);
    let s = 127.0f32 / m;
    let vs = _mm256_set1_ps(s);

    let mut vsum = _mm256_setzero_si256();
    let full = n / 32 * 32;
    let mut k = 0;
    while k < full {
        // SAFETY: k + 32 <= n <= q.len().
        vsum = _mm256_add_epi32(vsum, unsafe {
            quantize32(x.as_ptr().add(k), q.as_mut_ptr().add(k), vs)
        });
        k += 32;
    }
    if k < n {
        let mut buf = [0.0f32; 32];
        buf[..n - k].copy_from_slice(&x[k..]);
        // SAFETY: `buf` has 32 floats; q.len() is a multiple of 128 and >= n, hence >= k + 32
        // (k is a multiple of 32 below n). Zero padding quantizes to 0.
        vsum = _mm256_add_epi32(vsum, unsafe {
            quantize32(buf.as_ptr(), q.as_mut_ptr().add(k), vs)
        });
        k += 32;
    }
    q[k..].fill(0);
    QuantRow {
        scale: s,
        sum: hsum_epi32(vsum),
    }
}

// ---- TQ2 ---------------------------------------------------------------------------------

/// `acc16 + Σ code·q` of one block with 128 activations, in i16 lanes: each `vpmaddubsw`
/// lane is in [-512, 508], so a block adds [-2048, 2032] and [`FLUSH`] blocks stay within
/// [-32768, 32512].
#[inline]
#[target_feature(enable = "avx2")]
fn block_dot16(acc16: __m256i, codes: &[__m256i; 4], q: &[__m256i; 4]) -> __m256i {
    let p0 = _mm256_maddubs_epi16(codes[0], q[0]);
    let p1 = _mm256_maddubs_epi16(codes[1], q[1]);
    let p2 = _mm256_maddubs_epi16(codes[2], q[2]);
    let p3 = _mm256_maddubs_epi16(codes[3], q[3]);
    let p = _mm256_add_epi16(_mm256_add_epi16(p0, p1), _mm256_add_epi16(p2, p3));
    _mm256_add_epi16(acc16, p)
}

/// Blocks accumulated in i16 before widening to i32: the most [`block_dot16`] allows, so a
/// 2560-column row (20 blocks) widens twice instead of three times (measured: the GEMM of
/// 4 tokens in L2 at 12.2–12.4 cycles per block against 13.7–16.3 with 8).
const FLUSH: usize = 16;

/// `acc + acc16` widened to i32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn widen_add(acc: __m256i, acc16: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(acc16, _mm256_set1_epi16(1)))
}

/// Unpacks the 32-byte block at `w` into the codes of columns `32i..32i+32`, `i = 0..4`.
///
/// # Safety
/// `w` readable for 32 bytes; AVX2 available.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn unpack(w: *const u8) -> [__m256i; 4] {
    let mask = _mm256_set1_epi8(3);
    // SAFETY: the caller guarantees 32 readable bytes at `w`.
    let v = unsafe { _mm256_loadu_si256(w as *const __m256i) };
    [
        _mm256_and_si256(v, mask),
        _mm256_and_si256(_mm256_srli_epi16::<2>(v), mask),
        _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask),
        _mm256_and_si256(_mm256_srli_epi16::<6>(v), mask),
    ]
}

/// Loads the 128 activations of one block.
///
/// # Safety
/// `q` readable for 128 bytes; AVX2 available.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load_q(q: *const i8) -> [__m256i; 4] {
    // SAFETY: the caller guarantees 128 readable bytes at `q`.
    unsafe {
        [
            _mm256_loadu_si256(q as *const __m256i),
            _mm256_loadu_si256(q.add(32) as *const __m256i),
            _mm256_loadu_si256(q.add(64) as *const __m256i),
            _mm256_loadu_si256(q.add(96) as *const __m256i),
        ]
    }
}

/// `Σ code·q` of `R ≤ 4` consecutive rows (starting at `w`, `nb` blocks each) with one
/// activation row `q`; lanes `R..4` of the result are 0.
///
/// # Safety
/// `w` readable for `R · nb · 32` bytes, `q` for `nb · 128`; AVX2 available.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn gemv_rows<const R: usize>(w: *const u8, nb: usize, q: *const i8) -> __m128i {
    let rb = nb * tq2::BLOCK_BYTES;
    let mut acc = [_mm256_setzero_si256(); 4];
    // The next group of rows (the 4·rb bytes after this one) is prefetched while this one
    // is computed, 128 bytes per block: short rows are too short for the hardware
    // prefetcher to ramp up on its own. (Prefetches never fault; the address may lie past
    // the end of `w`, hence `wrapping_add`.)
    let pf = w.wrapping_add(4 * rb);
    let mut b0 = 0;
    while b0 < nb {
        let b1 = (b0 + FLUSH).min(nb);
        let mut acc16 = [_mm256_setzero_si256(); 4];
        for b in b0..b1 {
            _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(b * 128) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(b * 128 + 64) as *const i8);
            // SAFETY: b < nb, so the block's 128 activations are in bounds.
            let qv = unsafe { load_q(q.add(b * tq2::BLOCK_COLS)) };
            for (r, a) in acc16.iter_mut().enumerate().take(R) {
                // SAFETY: r < R and b < nb: the block lies inside the R rows at `w`.
                let codes = unsafe { unpack(w.add(r * rb + b * tq2::BLOCK_BYTES)) };
                *a = block_dot16(*a, &codes, &qv);
            }
        }
        for (a, a16) in acc.iter_mut().zip(acc16).take(R) {
            *a = widen_add(*a, a16);
        }
        b0 = b1;
    }
    hsum4_epi32(acc[0], acc[1], acc[2], acc[3])
}

/// AVX2 [`crate::kernels::Kernels::tq2_gemv`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tq2_gemv(w: &[u8], nb: usize, q: &[i8], q_sum: i32, out: &mut [i32]) {
    check_tq2_gemv(w, nb, q, out);
    let rb = nb * tq2::BLOCK_BYTES;
    let (wp, qp) = (w.as_ptr(), q.as_ptr());
    ternary_gemv_groups(out, q_sum, |r, k| {
        // SAFETY: rows r..r+k exist (w.len() == rows · rb checked), q has nb · 128 bytes.
        let v = unsafe {
            let wr = wp.add(r * rb);
            const_count!(k, gemv_rows(wr, nb, qp), 1 | 2 | 3 => 4)
        };
        lanes(v)
    });
}

/// `Σ code·q` of one row (`nb` blocks at `w`) with `T ≤ 8` activation rows starting at `q`
/// (stride `qs`): each block is unpacked once and used for all `T` tokens.
///
/// # Safety
/// `w` readable for `nb · 32` bytes, `q` for `(T − 1) · qs + nb · 128`; AVX2 available.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn gemm_tile<const T: usize>(w: *const u8, nb: usize, q: *const i8, qs: usize) -> [i32; 8] {
    let mut acc = [_mm256_setzero_si256(); 8];
    // The row four rows on is fetched while this one is computed: in batched decode each row
    // is read once, from memory, and a few tokens' work does not hide its latency (measured:
    // batch 4 of the 2B-4T shape on 2 threads ran ~15 % faster). Prefetches never fault; the
    // address may lie past the end of the weights.
    let pf = w.wrapping_add(4 * nb * tq2::BLOCK_BYTES);
    let mut b0 = 0;
    while b0 < nb {
        let b1 = (b0 + FLUSH).min(nb);
        let mut acc16 = [_mm256_setzero_si256(); 8];
        for b in b0..b1 {
            _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(b * tq2::BLOCK_BYTES) as *const i8);
            // SAFETY: b < nb: the block is inside the row.
            let codes = unsafe { unpack(w.add(b * tq2::BLOCK_BYTES)) };
            for (t, a) in acc16.iter_mut().enumerate().take(T) {
                // SAFETY: t < T and b < nb: inside activation row t.
                let qv = unsafe { load_q(q.add(t * qs + b * tq2::BLOCK_COLS)) };
                *a = block_dot16(*a, &codes, &qv);
            }
        }
        for (a, a16) in acc.iter_mut().zip(acc16).take(T) {
            *a = widen_add(*a, a16);
        }
        b0 = b1;
    }
    let mut res = [0i32; 8];
    let lo = hsum4_epi32(acc[0], acc[1], acc[2], acc[3]);
    // SAFETY: `res` has 8 i32.
    unsafe { _mm_storeu_si128(res.as_mut_ptr() as *mut __m128i, lo) };
    if T > 4 {
        let hi = hsum4_epi32(acc[4], acc[5], acc[6], acc[7]);
        // SAFETY: `res` has 8 i32, this writes 4..8.
        unsafe { _mm_storeu_si128(res.as_mut_ptr().add(4) as *mut __m128i, hi) };
    }
    res
}

/// Most tokens per GEMM tile (each unpacked weight block is reused this many times).
const GEMM_TOKENS: usize = 8;

/// Tokens per TQ2 GEMM tile for activation rows of `row_len` bytes: 8 while a tile's
/// activations stay within 24 KiB of the L1 (2B-4T: the 2560-column matrices), else 4
/// (measured: 8 tokens of 6912 columns run slower than 4).
fn tq2_gemm_tokens(row_len: usize) -> usize {
    if GEMM_TOKENS * row_len <= 24 << 10 {
        GEMM_TOKENS
    } else {
        4
    }
}

/// AVX2 [`crate::kernels::Kernels::tq2_gemm`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tq2_gemm(w: &[u8], sh: GemmShape, q: &[i8], q_sums: &[i32], out: &mut [i32]) {
    check_gemm(TQ2, w, sh, q, q_sums, out);
    let (nb, qs) = (sh.blocks, sh.q_stride);
    let rb = nb * tq2::BLOCK_BYTES;
    let tile = tq2_gemm_tokens(nb * tq2::BLOCK_COLS);
    gemm_tiles(rb, sh.rows, sh.tokens, tile, q_sums, out, |r, t0, tn| {
        // SAFETY: row r < rows and tokens t0..t0+tn < tokens exist (lengths checked above).
        unsafe {
            let (wr, qt) = (w.as_ptr().add(r * rb), q.as_ptr().add(t0 * qs));
            const_count!(tn, gemm_tile(wr, nb, qt, qs), 1 | 2 | 3 | 4 | 5 | 6 | 7 => GEMM_TOKENS)
        }
    });
}

// ---- dense GEMV --------------------------------------------------------------------------

/// 8 bf16 (raw bits) at `p` to f32.
///
/// # Safety
/// `p` readable for 8 u16; AVX2 available.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load8_bf16(p: *const u16) -> __m256 {
    // SAFETY: the caller guarantees 8 readable u16 at `p`.
    let h = unsafe { _mm_loadu_si128(p as *const __m128i) };
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
}

/// 8 f16 (raw bits) at `p` to f32.
///
/// # Safety
/// `p` readable for 8 u16; AVX2 and F16C available.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load8_f16(p: *const u16) -> __m256 {
    // SAFETY: the caller guarantees 8 readable u16 at `p`.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p as *const __m128i) })
}

/// 8 f32 at `p`.
///
/// # Safety
/// `p` readable for 8 f32; AVX available.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load8_f32(p: *const f32) -> __m256 {
    // SAFETY: the caller guarantees 8 readable f32 at `p`.
    unsafe { _mm256_loadu_ps(p) }
}

macro_rules! dense_gemv {
    ($name:ident, $rows_fn:ident, $t:ty, $load8:ident, $conv:expr) => {
        /// `Σ w·x` of `R ≤ 4` consecutive rows at `w` (`cols` each); lanes `R..4` are 0.
        ///
        /// # Safety
        /// `w` readable for `R · cols` elements, `x` for `cols`; AVX2, FMA, F16C available.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $rows_fn<const R: usize>(w: *const $t, cols: usize, x: &[f32]) -> [f32; 4] {
            let xp = x.as_ptr();
            let mut a0 = [_mm256_setzero_ps(); 4];
            let mut a1 = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c + 16 <= cols {
                // SAFETY: c + 16 <= cols == x.len().
                let x0 = unsafe { _mm256_loadu_ps(xp.add(c)) };
                // SAFETY: as above.
                let x1 = unsafe { _mm256_loadu_ps(xp.add(c + 8)) };
                for r in 0..R {
                    // The same columns of the next group of rows, fetched ahead (see
                    // `gemv_rows`); prefetches never fault.
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((r + 4) * cols + c) as *const i8);
                    // SAFETY: r < R, c + 16 <= cols: inside row r.
                    let (w0, w1) = unsafe {
                        let p = w.add(r * cols + c);
                        ($load8(p), $load8(p.add(8)))
                    };
                    a0[r] = _mm256_fmadd_ps(w0, x0, a0[r]);
                    a1[r] = _mm256_fmadd_ps(w1, x1, a1[r]);
                }
                c += 16;
            }
            if c + 8 <= cols {
                // SAFETY: c + 8 <= cols == x.len().
                let x0 = unsafe { _mm256_loadu_ps(xp.add(c)) };
                for r in 0..R {
                    // SAFETY: r < R, c + 8 <= cols: inside row r.
                    let w0 = unsafe { $load8(w.add(r * cols + c)) };
                    a0[r] = _mm256_fmadd_ps(w0, x0, a0[r]);
                }
                c += 8;
            }
            let s = hsum4_ps(
                _mm256_add_ps(a0[0], a1[0]),
                _mm256_add_ps(a0[1], a1[1]),
                _mm256_add_ps(a0[2], a1[2]),
                _mm256_add_ps(a0[3], a1[3]),
            );
            let mut res = [0.0f32; 4];
            // SAFETY: `res` has 4 f32.
            unsafe { _mm_storeu_ps(res.as_mut_ptr(), s) };
            for (r, out) in res.iter_mut().enumerate().take(R) {
                let mut tail = 0.0f32;
                for k in c..cols {
                    // SAFETY: r < R, k < cols: inside row r.
                    let wv = unsafe { *w.add(r * cols + k) };
                    tail += $conv(wv) * x[k];
                }
                *out += tail;
            }
            res
        }

        /// AVX2 dense GEMV (see [`crate::kernels::Kernels`]).
        ///
        /// # Safety
        /// The CPU must support AVX2, FMA and F16C.
        #[target_feature(enable = "avx2,fma,f16c")]
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

// ---- bf16 GEMM (batched head) ------------------------------------------------------------
//
// For each token the operations are exactly `bf16_gemv`'s for one row: two accumulators over
// 16-column steps, one 8-column step, `hsum4_ps` of their sum, then the scalar tail added. A
// row's weights are widened once per step and feed every token of the tile, and the columns
// are walked in chunks whose activations stay in L1; the accumulators of a block of rows are
// parked between chunks (storing a vector is exact, so the order of operations is unchanged).

/// Tokens per tile: two accumulators per token in registers (12 ymm) beside two weight vectors.
const BF16_GEMM_TOKENS: usize = 6;
/// Rows whose accumulators are parked between column chunks.
const BF16_GEMM_ROWS: usize = 16;

/// Continues the 16-column steps `c0..c1` of one row at `w` (`cols` bf16) for `T` tokens
/// (token `t` at `x + t · xs`), from and back into `acc`.
///
/// # Safety
/// `c1 - c0` a multiple of 16, `c1 <= cols`; `w` readable for `cols` u16, `x + t · xs` for
/// `cols` f32 (`t < T`); AVX2, FMA available.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bf16_gemm_steps<const T: usize>(
    w: *const u16,
    (x, xs): (*const f32, usize),
    cols: usize,
    (c0, c1): (usize, usize),
    acc: &mut [[__m256; 2]; T],
) {
    let mut a = *acc;
    let mut c = c0;
    while c < c1 {
        // The same columns two rows on, fetched ahead; prefetches never fault.
        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(2 * cols + c) as *const i8);
        // SAFETY: c + 16 <= c1 <= cols: inside the row and every token's activations.
        unsafe {
            let (w0, w1) = (load8_bf16(w.add(c)), load8_bf16(w.add(c + 8)));
            for (t, at) in a.iter_mut().enumerate() {
                let xt = x.add(t * xs + c);
                at[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xt), at[0]);
                at[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xt.add(8)), at[1]);
            }
        }
        c += 16;
    }
    *acc = a;
}

/// Ends one row at `w` for `T` tokens after its 16-column steps (`acc`, up to column `c`):
/// the 8-column step, the horizontal sums and the scalar tail, as `bf16_rows`; token `t`'s
/// result goes to `out + t · stride`.
///
/// # Safety
/// `c = cols / 16 · 16`; `w` readable for `cols` u16, `x + t · xs` for `cols` f32 and `out`
/// writable at `t · stride` (`t < T`); AVX2, FMA available.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bf16_gemm_finish<const T: usize>(
    w: *const u16,
    (x, xs): (*const f32, usize),
    cols: usize,
    mut c: usize,
    mut a: [[__m256; 2]; T],
    out: *mut f32,
    stride: usize,
) {
    if c + 8 <= cols {
        // SAFETY: c + 8 <= cols: inside the row and every token's activations.
        unsafe {
            let w0 = load8_bf16(w.add(c));
            for (t, at) in a.iter_mut().enumerate() {
                at[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x.add(t * xs + c)), at[0]);
            }
        }
        c += 8;
    }
    let mut t0 = 0;
    while t0 < T {
        let sum = |t: usize| {
            a.get(t)
                .map_or(_mm256_setzero_ps(), |at| _mm256_add_ps(at[0], at[1]))
        };
        let s = hsum4_ps(sum(t0), sum(t0 + 1), sum(t0 + 2), sum(t0 + 3));
        let mut res = [0.0f32; 4];
        // SAFETY: `res` has 4 f32.
        unsafe { _mm_storeu_ps(res.as_mut_ptr(), s) };
        for (t, mut v) in (t0..T).zip(res) {
            let mut tail = 0.0f32;
            for k in c..cols {
                // SAFETY: k < cols: inside the row and token t's activations.
                tail += unsafe { scalar::bf16_to_f32(*w.add(k)) * *x.add(t * xs + k) };
            }
            v += tail;
            // SAFETY: t < T: the caller guarantees out + t · stride is writable.
            unsafe { *out.add(t * stride) = v };
        }
        t0 += 4;
    }
}

/// `out[t · rows + r]` for `T` tokens (activations at `x + t · xs`, `cols` each) and all
/// `rows` rows at `w`.
///
/// # Safety
/// `w` readable for `rows · cols` u16, `x + t · xs` for `cols` f32, `out` writable at
/// `t · rows + r` (`t < T`); AVX2, FMA available.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bf16_gemm_tile<const T: usize>(
    w: *const u16,
    cols: usize,
    rows: usize,
    x: (*const f32, usize),
    out: *mut f32,
) {
    let whole = cols / 16 * 16;
    // 16 KiB of activations per chunk: half of L1, beside the streaming weights.
    let chunk = (4096 / T / 16 * 16).max(16);
    let mut r0 = 0;
    while r0 < rows {
        let rn = (rows - r0).min(BF16_GEMM_ROWS);
        let mut acc = [[[_mm256_setzero_ps(); 2]; T]; BF16_GEMM_ROWS];
        let mut c0 = 0;
        while c0 < whole {
            let c1 = (c0 + chunk).min(whole);
            for (i, a) in acc.iter_mut().enumerate().take(rn) {
                // SAFETY: row r0 + i < rows; c0..c1 are whole 16-column steps of a row.
                unsafe { bf16_gemm_steps::<T>(w.add((r0 + i) * cols), x, cols, (c0, c1), a) };
            }
            c0 = c1;
        }
        for (i, &a) in acc.iter().enumerate().take(rn) {
            let r = r0 + i;
            // SAFETY: row r < rows; out + r + t · rows is inside `out` for t < T.
            unsafe { bf16_gemm_finish::<T>(w.add(r * cols), x, cols, whole, a, out.add(r), rows) };
        }
        r0 += rn;
    }
}

/// AVX2 bf16 GEMM (see [`crate::kernels::Kernels::bf16_gemm`]): for each token, bit for bit
/// what [`bf16_gemv`] gives.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn bf16_gemm(w: &[u16], cols: usize, x: &[f32], tokens: usize, out: &mut [f32]) {
    check_dense_gemm(w.len(), cols, x, tokens, out);
    if tokens == 0 {
        return;
    }
    let rows = out.len() / tokens;
    // The activations, copied to rows 32-byte aligned: a load split across two cache lines
    // costs two (measured: 1.6x the time of the GEMM in L2 with 16-byte aligned rows).
    let xs = cols.div_ceil(8) * 8;
    let mut xa = vec![_mm256_setzero_ps(); tokens * xs / 8];
    let xp = xa.as_mut_ptr() as *mut f32;
    for t in 0..tokens {
        // SAFETY: row t of `x` has `cols` f32; `xa` holds `tokens · xs` f32, xs >= cols.
        unsafe { std::ptr::copy_nonoverlapping(x.as_ptr().add(t * cols), xp.add(t * xs), cols) };
    }
    // Tiles as even as possible: 8 tokens run as 4 + 4, not 6 + 2.
    let tiles = tokens.div_ceil(BF16_GEMM_TOKENS);
    let mut t0 = 0;
    for i in 0..tiles {
        let tn = (tokens - t0).div_ceil(tiles - i);
        // SAFETY: tokens t0..t0 + tn exist; lengths checked above.
        unsafe {
            let (xt, ot) = (
                (xp.add(t0 * xs) as *const f32, xs),
                out.as_mut_ptr().add(t0 * rows),
            );
            const_count!(tn, bf16_gemm_tile(w.as_ptr(), cols, rows, xt, ot), 1 | 2 | 3 | 4 | 5 => BF16_GEMM_TOKENS);
        }
        t0 += tn;
    }
}

// ---- TQ1 ---------------------------------------------------------------------------------
//
// A 32-byte block holds 160 columns: digit i of byte j is column j + 32i. With
// m_0 = byte and m_{i+1} = 3·m_i mod 256 (two byte adds), digit i = floor(3·m_i / 256),
// i.e. (m_i ≥ 86) + (m_i ≥ 171). AVX2 has only signed byte compares, so the kernel keeps
// s_i = m_i − 128 (= m_i XOR 0x80); that offset survives the multiply (3·128 ≡ 128 mod 256),
// so s_{i+1} = 3·s_i too, and the digit is (s_i > −43) + (s_i > 42). Each digit vector
// is 32 consecutive columns: `vpmaddubsw` with 32 activations as for TQ2 (|pair| ≤ 512,
// five per block: |block| ≤ 2560, so TQ1_FLUSH = 8 blocks stay below 32768 in i16).

/// Blocks a TQ1 kernel accumulates in i16 before widening to i32 (see above).
const TQ1_FLUSH: usize = 8;

// The decode is written in `asm!` because, given intrinsics, LLVM rewrites the chain of
// byte adds as byte multiplies by 9, 27 and 81 (which AVX2 lacks: five instructions each)
// and spills the activations it hoisted: 59 instructions per block row instead of 39,
// and this kernel is bound by instruction throughput (docs/performance.md).

/// The constants of the decode, kept in registers across blocks.
#[derive(Clone, Copy)]
struct Tq1Consts {
    bias: __m256i,
    lo: __m256i,
    hi: __m256i,
    zero: __m256i,
}

impl Tq1Consts {
    #[inline]
    #[target_feature(enable = "avx2")]
    fn new() -> Self {
        Self {
            bias: _mm256_set1_epi8(-128),
            lo: _mm256_set1_epi8(-43),
            hi: _mm256_set1_epi8(42),
            zero: _mm256_setzero_si256(),
        }
    }
}

/// One digit of `s` in `d`: `d = 0 − ((s > lo) + (s > hi))`, each compare being 0 or −1.
macro_rules! tq1_digit {
    ($d:literal) => {
        concat!(
            "vpcmpgtb ",
            $d,
            ", {s}, {lo}\n",
            "vpcmpgtb {t}, {s}, {hi}\n",
            "vpaddb ",
            $d,
            ", ",
            $d,
            ", {t}\n",
            "vpsubb ",
            $d,
            ", {zero}, ",
            $d,
            "\n"
        )
    };
}

/// `s ← 3·s` (bytes, wrapping): the next digit moves to the top.
macro_rules! tq1_times3 {
    () => {
        "vpaddb {t}, {s}, {s}\nvpaddb {s}, {t}, {s}\n"
    };
}

/// The five digit vectors (values 0..=2) of the block at `w`.
///
/// # Safety
/// `w` readable for 32 bytes; AVX2 available.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn unpack_tq1(w: *const u8, k: Tq1Consts) -> [__m256i; 5] {
    let (d0, d1, d2, d3, d4): (__m256i, __m256i, __m256i, __m256i, __m256i);
    // SAFETY: reads the 32 bytes at `w`, which the caller guarantees; registers only.
    unsafe {
        std::arch::asm!(
            "vpxor {s}, {bias}, ymmword ptr [{w}]",
            tq1_digit!("{d0}"),
            tq1_times3!(),
            tq1_digit!("{d1}"),
            tq1_times3!(),
            tq1_digit!("{d2}"),
            tq1_times3!(),
            tq1_digit!("{d3}"),
            tq1_times3!(),
            tq1_digit!("{d4}"),
            w = in(reg) w,
            bias = in(ymm_reg) k.bias,
            lo = in(ymm_reg) k.lo,
            hi = in(ymm_reg) k.hi,
            zero = in(ymm_reg) k.zero,
            s = out(ymm_reg) _,
            t = out(ymm_reg) _,
            d0 = out(ymm_reg) d0,
            d1 = out(ymm_reg) d1,
            d2 = out(ymm_reg) d2,
            d3 = out(ymm_reg) d3,
            d4 = out(ymm_reg) d4,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    [d0, d1, d2, d3, d4]
}

/// `acc16 + Σ digit·q` over the block at `w` and its 160 activations at `q`, in i16 lanes;
/// the activations are read as memory operands, so nothing is hoisted or spilled.
///
/// # Safety
/// `w` readable for 32 bytes, `q` for 160; AVX2 available.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn tq1_block_dot16(acc16: __m256i, w: *const u8, q: *const i8, k: Tq1Consts) -> __m256i {
    let mut acc = acc16;
    // SAFETY: reads the 32 bytes at `w` and 160 at `q`, which the caller guarantees.
    unsafe {
        std::arch::asm!(
            "vpxor {s}, {bias}, ymmword ptr [{w}]",
            tq1_digit!("{d}"),
            "vpmaddubsw {d}, {d}, ymmword ptr [{q}]",
            "vpaddw {acc}, {acc}, {d}",
            tq1_times3!(),
            tq1_digit!("{d}"),
            "vpmaddubsw {d}, {d}, ymmword ptr [{q} + 32]",
            "vpaddw {acc}, {acc}, {d}",
            tq1_times3!(),
            tq1_digit!("{d}"),
            "vpmaddubsw {d}, {d}, ymmword ptr [{q} + 64]",
            "vpaddw {acc}, {acc}, {d}",
            tq1_times3!(),
            tq1_digit!("{d}"),
            "vpmaddubsw {d}, {d}, ymmword ptr [{q} + 96]",
            "vpaddw {acc}, {acc}, {d}",
            tq1_times3!(),
            tq1_digit!("{d}"),
            "vpmaddubsw {d}, {d}, ymmword ptr [{q} + 128]",
            "vpaddw {acc}, {acc}, {d}",
            w = in(reg) w,
            q = in(reg) q,
            acc = inout(ymm_reg) acc,
            bias = in(ymm_reg) k.bias,
            lo = in(ymm_reg) k.lo,
            hi = in(ymm_reg) k.hi,
            zero = in(ymm_reg) k.zero,
            s = out(ymm_reg) _,
            t = out(ymm_reg) _,
            d = out(ymm_reg) _,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    acc
}

/// `Σ digit·q` of `R ≤ 4` consecutive TQ1 rows (at `w`, `nb` blocks each) with one
/// activation row `q`; lanes `R..4` are 0.
///
/// # Safety
/// `w` readable for `R · nb · 32` bytes, `q` for `nb · 160`; AVX2 available.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn tq1_rows<const R: usize>(w: *const u8, nb: usize, q: *const i8) -> __m128i {
    let rb = nb * tq1::BLOCK_BYTES;
    let k = Tq1Consts::new();
    let mut acc = [_mm256_setzero_si256(); 4];
    let pf = w.wrapping_add(4 * rb); // the next row group, as in `gemv_rows`
    let mut b0 = 0;
    while b0 < nb {
        let b1 = (b0 + TQ1_FLUSH).min(nb);
        let mut acc16 = [_mm256_setzero_si256(); 4];
        for b in b0..b1 {
            _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(b * 128) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(b * 128 + 64) as *const i8);
            let qb = q.wrapping_add(b * tq1::BLOCK_COLS);
            for (r, a) in acc16.iter_mut().enumerate().take(R) {
                // SAFETY: r < R and b < nb: the block lies inside the R rows at `w`, and
                // its 160 activations inside `q`.
                *a = unsafe { tq1_block_dot16(*a, w.add(r * rb + b * tq1::BLOCK_BYTES), qb, k) };
            }
        }
        for (a, a16) in acc.iter_mut().zip(acc16).take(R) {
            *a = widen_add(*a, a16);
        }
        b0 = b1;
    }
    hsum4_epi32(acc[0], acc[1], acc[2], acc[3])
}

/// AVX2 [`crate::kernels::Kernels::tq1_gemv`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tq1_gemv(w: &[u8], nb: usize, q: &[i8], q_sum: i32, out: &mut [i32]) {
    check_tq1_gemv(w, nb, q, out);
    let rb = nb * tq1::BLOCK_BYTES;
    let (wp, qp) = (w.as_ptr(), q.as_ptr());
    ternary_gemv_groups(out, q_sum, |r, k| {
        // SAFETY: rows r..r+k exist (w.len() == rows · rb checked), q has nb · 160 bytes.
        let v = unsafe {
            let wr = wp.add(r * rb);
            const_count!(k, tq1_rows(wr, nb, qp), 1 | 2 | 3 => 4)
        };
        lanes(v)
    });
}

/// `Σ digit·q` of one TQ1 row (`nb` blocks at `w`) with `T ≤ 8` activation rows starting
/// at `q` (stride `qs`): each block is decoded once and used for all `T` tokens.
///
/// # Safety
/// `w` readable for `nb · 32` bytes, `q` for `(T − 1) · qs + nb · 160`; AVX2 available.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn tq1_gemm_tile<const T: usize>(
    w: *const u8,
    nb: usize,
    q: *const i8,
    qs: usize,
) -> [i32; 8] {
    let k = Tq1Consts::new();
    let mut acc = [_mm256_setzero_si256(); 8];
    let mut b0 = 0;
    while b0 < nb {
        let b1 = (b0 + TQ1_FLUSH).min(nb);
        let mut acc16 = [_mm256_setzero_si256(); 8];
        for b in b0..b1 {
            // SAFETY: b < nb: the block is inside the row.
            let d = unsafe { unpack_tq1(w.add(b * tq1::BLOCK_BYTES), k) };
            for (t, a) in acc16.iter_mut().enumerate().take(T) {
                let qb = q.wrapping_add(t * qs + b * tq1::BLOCK_COLS);
                // SAFETY: t < T and b < nb: the block's 160 activations of token t.
                let qv = |i: usize| unsafe { _mm256_loadu_si256(qb.add(32 * i) as *const __m256i) };
                let p01 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(d[0], qv(0)),
                    _mm256_maddubs_epi16(d[1], qv(1)),
                );
                let p23 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(d[2], qv(2)),
                    _mm256_maddubs_epi16(d[3], qv(3)),
                );
                let p = _mm256_add_epi16(
                    _mm256_add_epi16(p01, p23),
                    _mm256_maddubs_epi16(d[4], qv(4)),
                );
                *a = _mm256_add_epi16(*a, p);
            }
        }
        for (a, a16) in acc.iter_mut().zip(acc16).take(T) {
            *a = widen_add(*a, a16);
        }
        b0 = b1;
    }
    let (lo, hi) = (
        lanes(hsum4_epi32(acc[0], acc[1], acc[2], acc[3])),
        lanes(hsum4_epi32(acc[4], acc[5], acc[6], acc[7])),
    );
    [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]]
}

/// AVX2 [`crate::kernels::Kernels::tq1_gemm`]: rows in cache-sized chunks, tokens in tiles
/// of eight (TQ1's decode costs more than TQ2's, so it is shared by more tokens).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tq1_gemm(w: &[u8], sh: GemmShape, q: &[i8], q_sums: &[i32], out: &mut [i32]) {
    check_gemm(TQ1, w, sh, q, q_sums, out);
    let (nb, qs) = (sh.blocks, sh.q_stride);
    let rb = nb * tq1::BLOCK_BYTES;
    gemm_tiles(rb, sh.rows, sh.tokens, 8, q_sums, out, |r, t0, tn| {
        // SAFETY: row r < rows and tokens t0..t0+tn < tokens exist (lengths checked above).
        unsafe {
            let (wr, qt) = (w.as_ptr().add(r * rb), q.as_ptr().add(t0 * qs));
            const_count!(tn, tq1_gemm_tile(wr, nb, qt, qs), 1 | 2 | 3 | 4 | 5 | 6 | 7 => 8)
        }
    });
}

// ---- Q8_ROW ------------------------------------------------------------------------------

/// Eight int8 at `p` widened to f32.
///
/// # Safety
/// `p` readable for 8 bytes; AVX2 available.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load8_i8(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 8 readable bytes at `p`.
    let b = unsafe { _mm_loadl_epi64(p as *const __m128i) };
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b))
}

/// AVX2 [`crate::kernels::Kernels::q8_gemv`]: per row, int8 widened to f32 and multiplied
/// into four f32x8 accumulators (32 columns per step), then times the row scale.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q8_gemv(w: &[u8], cols: usize, x: &[f32], out: &mut [f32]) {
    check_q8_gemv(w, cols, x, out);
    let stride = q8_stride(cols);
    let xp = x.as_ptr();
    for (o, rec) in out.iter_mut().zip(w.chunks_exact(stride)) {
        let scale = f32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]);
        let qp = rec[4..].as_ptr();
        let mut a = [_mm256_setzero_ps(); 4];
        let mut c = 0;
        while c + 32 <= cols {
            // The row four ahead, fetched while this one is computed (see `gemv_rows`).
            _mm_prefetch::<_MM_HINT_T0>(qp.wrapping_add(4 * stride + c) as *const i8);
            for (k, ak) in a.iter_mut().enumerate() {
                // SAFETY: c + 8k + 8 <= cols: inside the record's int8 values and `x`.
                *ak = unsafe {
                    _mm256_fmadd_ps(
                        load8_i8(qp.add(c + 8 * k)),
                        _mm256_loadu_ps(xp.add(c + 8 * k)),
                        *ak,
                    )
                };
            }
            c += 32;
        }
        while c + 8 <= cols {
            // SAFETY: c + 8 <= cols.
            a[0] =
                unsafe { _mm256_fmadd_ps(load8_i8(qp.add(c)), _mm256_loadu_ps(xp.add(c)), a[0]) };
            c += 8;
        }
        let s = hsum4_ps(a[0], a[1], a[2], a[3]);
        let sum = _mm_cvtss_f32(_mm_add_ss(
            s,
            _mm_add_ss(
                _mm_shuffle_ps::<0b01>(s, s),
                _mm_add_ss(_mm_shuffle_ps::<0b10>(s, s), _mm_shuffle_ps::<0b11>(s, s)),
            ),
        ));
        let tail: f32 = rec[4 + c..4 + cols]
            .iter()
            .zip(&x[c..])
            .map(|(&q, &xv)| f32::from(q as i8) * xv)
            .sum();
        *o = scale * (sum + tail);
    }
}
