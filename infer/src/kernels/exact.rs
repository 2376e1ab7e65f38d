//! The two dot products of the reference forward ([`crate::reference`]), where it spends
//! nearly all its time: integer codes × trits, exact in i32, and f32 × f32 summed in f64.
//! Each is one plain body compiled twice, for the baseline and with AVX2 (chosen at run
//! time); the two compilations give identical results, because the integer sum is exact
//! and the f64 sum has a fixed order (IEEE arithmetic is not reassociated without
//! fast-math).

/// Lanes of independent partial sums: enough for the compiler to fill vector registers
/// and hide the latency of the adds.
const LANES: usize = 16;

/// `Σ a[i] · b[i]`, exact. The caller keeps the sum within i32: activation codes
/// (|a| ≤ 128) against trits (|b| ≤ 1) over fewer than 2^24 columns.
pub fn dot_i16(a: &[i16], b: &[i16]) -> i32 {
    assert_eq!(a.len(), b.len(), "dot_i16 of slices of different lengths");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected on this CPU just above.
        return unsafe { dot_i16_avx2(a, b) };
    }
    dot_i16_body(a, b)
}

/// `Σ a[i] · b[i]` in f64 (each product of two f32 is exact in f64; the sum is rounded in a
/// fixed order: 8 partial sums over the columns, then the tail).
pub fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "dot_f64 of slices of different lengths");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected on this CPU just above.
        return unsafe { dot_f64_avx2(a, b) };
    }
    dot_f64_body(a, b)
}

#[inline(always)]
fn dot_i16_body(a: &[i16], b: &[i16]) -> i32 {
    let mut acc = [0i32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: i32 = (ca.remainder().iter().zip(cb.remainder()))
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += i32::from(x[i]) * i32::from(y[i]);
        }
    }
    acc.iter().sum::<i32>() + tail
}

#[inline(always)]
fn dot_f64_body(a: &[f32], b: &[f32]) -> f64 {
    const N: usize = 8;
    let mut acc = [0.0f64; N];
    let (ca, cb) = (a.chunks_exact(N), b.chunks_exact(N));
    let tail: f64 = (ca.remainder().iter().zip(cb.remainder()))
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..N {
            acc[i] += f64::from(x[i]) * f64::from(y[i]);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// [`dot_i16`] compiled with AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_i16_avx2(a: &[i16], b: &[i16]) -> i32 {
    dot_i16_body(a, b)
}

/// [`dot_f64`] compiled with AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_f64_avx2(a: &[f32], b: &[f32]) -> f64 {
    dot_f64_body(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift64) for test inputs.
    fn values(n: usize, seed: u64) -> impl Iterator<Item = u64> {
        let mut s = seed.max(1);
        (0..n).map(move |_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        })
    }

    #[test]
    fn both_compilations_agree_with_the_plain_sums() {
        for (n, seed) in [
            (0, 1),
            (1, 2),
            (15, 3),
            (16, 4),
            (17, 5),
            (2560, 6),
            (6913, 7),
        ] {
            let codes: Vec<i16> = values(n, seed).map(|v| (v % 256) as i16 - 128).collect();
            let trits: Vec<i16> = values(n, seed + 99).map(|v| (v % 3) as i16 - 1).collect();
            let want: i64 = codes
                .iter()
                .zip(&trits)
                .map(|(&a, &b)| i64::from(a) * i64::from(b))
                .sum();
            assert_eq!(i64::from(dot_i16(&codes, &trits)), want, "n {n}");
            assert_eq!(i64::from(dot_i16_body(&codes, &trits)), want, "n {n}");
            // Extremes: every code -128 against every trit -1 (or 1).
            let low = vec![-128i16; n];
            let ones = vec![-1i16; n];
            assert_eq!(dot_i16(&low, &ones), 128 * n as i32);

            let x: Vec<f32> = values(n, seed + 7)
                .map(|v| (v % 2001) as f32 / 77.0 - 13.0)
                .collect();
            let y: Vec<f32> = values(n, seed + 8)
                .map(|v| (v % 1999) as f32 / 3.0 - 333.0)
                .collect();
            let fast = dot_f64(&x, &y);
            assert_eq!(fast.to_bits(), dot_f64_body(&x, &y).to_bits(), "n {n}");
            let plain: f64 = x
                .iter()
                .zip(&y)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            assert!(
                (fast - plain).abs() <= 1e-12 * plain.abs().max(1.0),
                "n {n}: {fast} vs {plain}"
            );
        }
    }
}
