//! Kernel tests: every kernel variant the CPU can run against the scalar reference
//! (bit-identical for the integer kernels and the quantization), and the scalar reference
//! against naive formulas and the worked example of format.md §6.1.

use super::*;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use tern_format::tq2::pack_row as tq2_pack_row;

fn tq2_row_bytes_usize(cols: usize) -> usize {
    tern_format::tq2::row_bytes(cols as u64) as usize
}

/// Unpacks a TQ2 row, reporting the first code 3 anywhere in it (padding included).
fn tq2_unpack_row(bytes: &[u8], cols: usize, out: &mut [i8]) -> Result<(), usize> {
    if let Some(c) = tern_format::tq2::find_invalid(bytes, cols) {
        return Err(c);
    }
    tern_format::tq2::unpack_row(bytes, &mut out[..cols])
}

/// Seeded test inputs.
struct Rng(SmallRng);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(SmallRng::seed_from_u64(seed))
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
    fn i8(&mut self) -> i8 {
        (self.next_u64() >> 56) as u8 as i8
    }
    fn trit(&mut self) -> i8 {
        (self.next_u64() % 3) as i8 - 1
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Every kernel variant this CPU can run, scalar included; prints the skipped ISAs.
fn variants() -> Vec<Kernels> {
    let mut v = Vec::new();
    for isa in Isa::ALL {
        let k = Kernels::variants_of(isa);
        if k.is_empty() {
            println!("note: skipping ISA {isa}: not available on this CPU/target");
        }
        v.extend(k);
    }
    let names: Vec<_> = v.iter().map(|k| k.variant()).collect();
    println!("testing kernel variants: {names:?}");
    v
}

fn scalar_kernels() -> Kernels {
    Kernels::for_isa(Isa::Scalar).unwrap()
}

// ---- TQ2 packing ---------------------------------------------------------------------------

#[test]
fn tq2_worked_example_from_format_md() {
    let cols = 130;
    let trits: Vec<i8> = (0..cols).map(|c| (c % 3) as i8 - 1).collect();
    assert_eq!(tq2_row_bytes_usize(cols), 64);
    let mut bytes = vec![0u8; 64];
    tq2_pack_row(&trits, &mut bytes);
    assert_eq!(bytes[0], 0x18);
    assert_eq!(bytes[1], 0x61);
    assert_eq!(bytes[32], 0x56);
    assert_eq!(bytes[33], 0x54);
    assert!(bytes[34..].iter().all(|&b| b == 0x55));
    let mut back = vec![9i8; cols];
    tq2_unpack_row(&bytes, cols, &mut back).unwrap();
    assert_eq!(back, trits);
    // the formula of §6.1, for every column
    for (c, &t) in trits.iter().enumerate() {
        let code = (bytes[(c / 128) * 32 + (c % 32)] >> (2 * ((c % 128) / 32))) & 3;
        assert_eq!(code as i8 - 1, t, "column {c}");
    }
}

#[test]
fn tq2_row_bytes_values() {
    assert_eq!(tq2_row_bytes_usize(0), 0);
    assert_eq!(tq2_row_bytes_usize(1), 32);
    assert_eq!(tq2_row_bytes_usize(128), 32);
    assert_eq!(tq2_row_bytes_usize(129), 64);
    assert_eq!(tq2_row_bytes_usize(2560), 640);
    assert_eq!(tq2_row_bytes_usize(6912), 54 * 32);
}

#[test]
fn tq2_pack_unpack_roundtrip_and_code3() {
    let mut rng = Rng::new(1);
    for _ in 0..200 {
        let cols = rng.range(1, 700);
        let trits: Vec<i8> = (0..cols).map(|_| rng.trit()).collect();
        let mut bytes = vec![0u8; tq2_row_bytes_usize(cols)];
        tq2_pack_row(&trits, &mut bytes);
        let mut back = vec![0i8; cols];
        tq2_unpack_row(&bytes, cols, &mut back).unwrap();
        assert_eq!(back, trits);
        // padding holds code 1
        for c in cols..bytes.len() / 32 * 128 {
            let code = (bytes[(c / 128) * 32 + (c % 32)] >> (2 * ((c % 128) / 32))) & 3;
            assert_eq!(code, 1, "padding column {c}");
        }
        // code 3 anywhere (padding included) is reported at its column
        let bad = rng.range(0, bytes.len() / 32 * 128 - 1);
        let mut corrupt = bytes.clone();
        corrupt[(bad / 128) * 32 + bad % 32] |= 3 << (2 * ((bad % 128) / 32));
        assert_eq!(tq2_unpack_row(&corrupt, cols, &mut back), Err(bad));
    }
}

#[test]
#[should_panic(expected = "not a trit")]
fn tq2_pack_rejects_non_trits() {
    let mut out = [0u8; 32];
    tq2_pack_row(&[0, 2], &mut out);
}

// ---- quantization --------------------------------------------------------------------------

fn check_quant_all(ks: &[Kernels], x: &[f32], qlen: usize, what: &str) {
    let mut want = vec![55i8; qlen];
    let wr = scalar::quantize_row(x, &mut want);
    assert_eq!(
        wr.sum,
        want.iter().map(|&v| v as i32).sum::<i32>(),
        "{what}: sum"
    );
    for k in ks {
        let mut got = vec![-7i8; qlen];
        let gr = k.quantize_row(x, &mut got);
        assert_eq!(
            gr.scale.to_bits(),
            wr.scale.to_bits(),
            "{} {what}: scale",
            k.variant()
        );
        assert_eq!(gr.sum, wr.sum, "{} {what}: sum", k.variant());
        if got != want {
            let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
            panic!(
                "{} {what}: q[{i}] = {} want {} (x = {:?}, s = {})",
                k.variant(),
                got[i],
                want[i],
                x.get(i),
                wr.scale
            );
        }
    }
}

#[test]
fn quantize_reference_hand_examples() {
    let mut q = [0i8; 128];
    // m = 1, s = 127: -0.5·127 = -63.5 -> -64 (ties to even), 0.25·127 = 31.75 -> 32
    let r = scalar::quantize_row(&[1.0, -0.5, 0.25], &mut q);
    assert_eq!(r.scale, 127.0);
    assert_eq!(&q[..4], &[127, -64, 32, 0]);
    assert_eq!(r.sum, 127 - 64 + 32);
    // m = 127, s = 1: exact ties round half to even
    let x = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -126.5];
    let r = scalar::quantize_row(&x, &mut q);
    assert_eq!(r.scale, 1.0);
    assert_eq!(&q[..10], &[127, 0, 2, 2, 0, -2, -2, 4, 126, -126]);
    // all zero: m = 1e-5
    let r = scalar::quantize_row(&[0.0; 5], &mut q);
    assert_eq!(r.scale, 127.0f32 / 1e-5f32);
    assert_eq!(r.sum, 0);
    assert!(q.iter().all(|&v| v == 0));
}

#[test]
fn quantize_all_isas_match_scalar() {
    let ks = variants();
    let mut rng = Rng::new(2);
    // random shapes and magnitudes
    for case in 0..400 {
        let n = rng.range(0, 700);
        let qlen = n.div_ceil(128) * 128 + 128 * rng.range(0, 1);
        let mag = [1e-7f32, 1e-3, 1.0, 37.0, 1e4, 3e30][case % 6];
        let x: Vec<f32> = (0..n).map(|_| rng.unit() * mag).collect();
        check_quant_all(&ks, &x, qlen, &format!("random n={n} mag={mag}"));
    }
    // exact ties: with max |x| = 127, s = 1 and k + 0.5 is a tie
    for n in [1usize, 7, 16, 31, 32, 33, 100, 129, 300] {
        let mut x: Vec<f32> = (0..n)
            .map(|i| (i as f32 % 254.0 - 127.0) + 0.5 * (i % 2) as f32)
            .collect();
        x[0] = -127.0;
        check_quant_all(&ks, &x, n.div_ceil(128) * 128, &format!("ties n={n}"));
        // s = 127 / 63.5 = 2: x = k/4 gives x·s = k/2 (ties for odd k)
        let mut x: Vec<f32> = (0..n).map(|i| (i as f32 - 60.0) / 4.0).collect();
        x[n / 2] = 63.5;
        check_quant_all(&ks, &x, n.div_ceil(128) * 128, &format!("ties2 n={n}"));
    }
    // edge rows
    for n in [1usize, 5, 8, 17, 64, 128, 255, 2560] {
        let qlen = n.div_ceil(128) * 128;
        check_quant_all(&ks, &vec![0.0; n], qlen, "zeros");
        check_quant_all(&ks, &vec![-0.0; n], qlen, "negative zeros");
        check_quant_all(&ks, &vec![3.25; n], qlen, "constant");
        check_quant_all(&ks, &vec![-1e-6; n], qlen, "below 1e-5");
        check_quant_all(&ks, &vec![f32::MIN_POSITIVE / 4.0; n], qlen, "subnormal");
        let alt: Vec<f32> = (0..n)
            .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        check_quant_all(&ks, &alt, qlen, "alternating");
        // non-finite inputs: not meaningful, but identical on every ISA
        let mut odd: Vec<f32> = (0..n).map(|i| i as f32 - 3.0).collect();
        odd[n / 2] = f32::NAN;
        check_quant_all(&ks, &odd, qlen, "one NaN");
        odd[n - 1] = f32::INFINITY;
        check_quant_all(&ks, &odd, qlen, "NaN and inf");
        check_quant_all(&ks, &vec![f32::NAN; n], qlen, "all NaN");
        // a NaN in every lane position of the SIMD max reductions
        for p in (0..n).filter(|&p| n <= 64 || p < 64 || p + 64 >= n) {
            let mut v: Vec<f32> = (0..n).map(|i| (i % 13) as f32 - 6.0).collect();
            v[p] = f32::NAN;
            check_quant_all(&ks, &v, qlen, &format!("NaN at {p}"));
        }
    }
    check_quant_all(&ks, &[], 0, "empty");
    check_quant_all(&ks, &[], 128, "empty, padded");
}

// ---- TQ2 GEMV / GEMM ------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum TritFill {
    Random,
    AllNeg,
    AllZero,
    AllPos,
    Sparse,
}

#[derive(Clone, Copy, Debug)]
enum ActFill {
    Random,
    All127,
    AllMin,
    Mixed,
    Zero,
}

/// `rows` random TQ2 rows of `cols` columns: (packed, trits).
fn make_weights(rng: &mut Rng, rows: usize, cols: usize, fill: TritFill) -> (Vec<u8>, Vec<i8>) {
    let trits: Vec<i8> = (0..rows * cols)
        .map(|_| match fill {
            TritFill::Random => rng.trit(),
            TritFill::AllNeg => -1,
            TritFill::AllZero => 0,
            TritFill::AllPos => 1,
            TritFill::Sparse => {
                if rng.range(0, 9) == 0 {
                    rng.trit()
                } else {
                    0
                }
            }
        })
        .collect();
    let rb = tq2_row_bytes_usize(cols);
    let mut w = vec![0u8; rows * rb];
    if cols > 0 {
        for (row, out) in trits.chunks_exact(cols).zip(w.chunks_exact_mut(rb)) {
            tq2_pack_row(row, out);
        }
    }
    // The naive references use the trits unpacked back from the packed bytes.
    let mut unpacked = vec![0i8; rows * cols];
    if cols > 0 {
        for (bytes, out) in w.chunks_exact(rb).zip(unpacked.chunks_exact_mut(cols)) {
            tq2_unpack_row(bytes, cols, out).expect("no code 3");
        }
    }
    assert_eq!(unpacked, trits);
    (w, unpacked)
}

/// One activation row of `cols` values padded with zeros to `nb · 128`.
fn make_acts(rng: &mut Rng, cols: usize, nb: usize, fill: ActFill) -> Vec<i8> {
    let mut q = vec![0i8; nb * 128];
    for (i, v) in q[..cols].iter_mut().enumerate() {
        *v = match fill {
            ActFill::Random => rng.i8(),
            ActFill::All127 => 127,
            ActFill::AllMin => -128,
            ActFill::Mixed => [127, -128, -127][rng.range(0, 2)],
            ActFill::Zero => 0,
        };
        let _ = i;
    }
    q
}

fn naive_dot(trits: &[i8], q: &[i8]) -> i64 {
    trits
        .iter()
        .zip(q)
        .map(|(&t, &a)| t as i64 * a as i64)
        .sum()
}

const TRIT_FILLS: [TritFill; 5] = [
    TritFill::Random,
    TritFill::AllNeg,
    TritFill::AllZero,
    TritFill::AllPos,
    TritFill::Sparse,
];
const ACT_FILLS: [ActFill; 5] = [
    ActFill::Random,
    ActFill::All127,
    ActFill::AllMin,
    ActFill::Mixed,
    ActFill::Zero,
];

#[test]
fn tq2_gemv_all_isas_match_scalar_and_naive() {
    let ks = variants();
    let mut rng = Rng::new(3);
    for case in 0..500 {
        let nb = if case < 60 {
            case + 1
        } else {
            rng.range(1, 60)
        };
        let cols = nb * 128
            - if rng.range(0, 2) == 0 {
                0
            } else {
                rng.range(0, 127)
            };
        let rows = rng.range(1, 37);
        let tf = TRIT_FILLS[case % 5];
        let af = ACT_FILLS[(case / 5) % 5];
        let (w, trits) = make_weights(&mut rng, rows, cols, tf);
        let q = make_acts(&mut rng, cols, nb, af);
        let q_sum: i32 = q.iter().map(|&v| v as i32).sum();
        let what = format!("nb={nb} cols={cols} rows={rows} {tf:?} {af:?}");

        let mut want = vec![0i32; rows];
        scalar_kernels().tq2_gemv(&w, nb, &q, q_sum, &mut want);
        for r in 0..rows {
            let naive = naive_dot(&trits[r * cols..(r + 1) * cols], &q[..cols]);
            assert_eq!(want[r] as i64, naive, "scalar vs naive, row {r}, {what}");
        }
        for k in &ks {
            let mut got = vec![i32::MIN; rows];
            k.tq2_gemv(&w, nb, &q, q_sum, &mut got);
            assert_eq!(got, want, "{} {what}", k.variant());
        }
    }
}

#[test]
fn tq2_gemv_extreme_sums_and_empty() {
    let ks = variants();
    let mut rng = Rng::new(4);
    // the largest |Σ| a row can give: all +1 (or -1) against all -128
    for nb in [1usize, 54, 60] {
        for tf in [TritFill::AllPos, TritFill::AllNeg] {
            let rows = 5;
            let (w, _) = make_weights(&mut rng, rows, nb * 128, tf);
            let q = vec![-128i8; nb * 128];
            let q_sum = -128 * (nb as i32) * 128;
            let expect = if matches!(tf, TritFill::AllPos) {
                q_sum
            } else {
                -q_sum
            };
            for k in &ks {
                let mut got = vec![0i32; rows];
                k.tq2_gemv(&w, nb, &q, q_sum, &mut got);
                assert!(
                    got.iter().all(|&v| v == expect),
                    "{} nb={nb} {tf:?}",
                    k.variant()
                );
                // The GEMM's i16 partial sums meet the same extremes, for every tile size.
                for tokens in [1usize, 4, 8] {
                    let qs = q.repeat(tokens);
                    let sh = GemmShape {
                        blocks: nb,
                        rows,
                        tokens,
                        q_stride: nb * 128,
                    };
                    let mut got = vec![0i32; rows * tokens];
                    k.tq2_gemm(&w, sh, &qs, &vec![q_sum; tokens], &mut got);
                    assert!(
                        got.iter().all(|&v| v == expect),
                        "gemm {} nb={nb} tokens={tokens} {tf:?}",
                        k.variant()
                    );
                }
            }
        }
    }
    // nb = 0 and zero rows
    for k in &ks {
        let mut out = vec![7i32; 3];
        k.tq2_gemv(&[], 0, &[], 0, &mut out);
        assert_eq!(out, [0, 0, 0], "{}", k.variant());
        k.tq2_gemv(&[], 3, &[0; 384], 0, &mut []);
        let mut out = vec![7i32; 6];
        let sh = GemmShape {
            blocks: 0,
            rows: 3,
            tokens: 2,
            q_stride: 0,
        };
        k.tq2_gemm(&[], sh, &[], &[0, 0], &mut out);
        assert_eq!(out, [0; 6], "{}", k.variant());
        let sh = GemmShape {
            blocks: 2,
            rows: 1,
            tokens: 0,
            q_stride: 256,
        };
        k.tq2_gemm(&[0x55; 64], sh, &[], &[], &mut []);
    }
}

#[test]
fn tq2_gemv_code3_is_consistent_across_isas() {
    // Invalid data is rejected by verification, but must not make ISAs disagree.
    let ks = variants();
    let mut rng = Rng::new(5);
    let nb = 7;
    let rows = 9;
    let w: Vec<u8> = (0..rows * nb * 32).map(|_| rng.next_u64() as u8).collect();
    let q = make_acts(&mut rng, nb * 128, nb, ActFill::Random);
    let q_sum: i32 = q.iter().map(|&v| v as i32).sum();
    let mut want = vec![0i32; rows];
    scalar_kernels().tq2_gemv(&w, nb, &q, q_sum, &mut want);
    for k in &ks {
        let mut got = vec![0i32; rows];
        k.tq2_gemv(&w, nb, &q, q_sum, &mut got);
        assert_eq!(got, want, "{}", k.variant());
    }
}

#[test]
fn tq2_gemm_all_isas_match_scalar_and_gemv() {
    let ks = variants();
    let mut rng = Rng::new(6);
    for case in 0..300 {
        let nb = rng.range(1, 60);
        let cols = nb * 128 - rng.range(0, 127);
        let rows = rng.range(1, 37);
        let n = if case < 9 { case + 1 } else { rng.range(1, 9) };
        let tf = TRIT_FILLS[case % 5];
        let (w, trits) = make_weights(&mut rng, rows, cols, tf);
        // Every third case leaves a gap between activation rows, which must not be read.
        let len = nb * 128;
        let stride = len + if case % 3 == 2 { 128 } else { 0 };
        let mut q = Vec::with_capacity(n * stride);
        for t in 0..n {
            let af = ACT_FILLS[(case / 5 + t) % 5];
            q.extend(make_acts(&mut rng, cols, nb, af));
            q.resize((t + 1) * stride, 99);
        }
        let q_sums: Vec<i32> = q
            .chunks_exact(stride)
            .map(|r| r[..len].iter().map(|&v| v as i32).sum())
            .collect();
        let what = format!("nb={nb} cols={cols} rows={rows} n={n} stride={stride} {tf:?}");
        let sh = GemmShape {
            blocks: nb,
            rows,
            tokens: n,
            q_stride: stride,
        };

        let mut want = vec![0i32; n * rows];
        scalar_kernels().tq2_gemm(&w, sh, &q, &q_sums, &mut want);
        for t in 0..n {
            let qt = &q[t * stride..t * stride + len];
            for r in 0..rows {
                let naive = naive_dot(&trits[r * cols..(r + 1) * cols], &qt[..cols]);
                assert_eq!(
                    want[t * rows + r] as i64,
                    naive,
                    "scalar vs naive t={t} r={r} {what}"
                );
            }
        }
        for k in &ks {
            let mut got = vec![i32::MIN; n * rows];
            k.tq2_gemm(&w, sh, &q, &q_sums, &mut got);
            assert_eq!(got, want, "{} gemm {what}", k.variant());
            // and GEMM == one GEMV per token
            for t in 0..n {
                let mut g = vec![0i32; rows];
                let qt = &q[t * stride..t * stride + len];
                k.tq2_gemv(&w, nb, qt, q_sums[t], &mut g);
                assert_eq!(
                    &g[..],
                    &want[t * rows..(t + 1) * rows],
                    "{} gemv t={t} {what}",
                    k.variant()
                );
            }
        }
    }
}

#[test]
fn quantize_then_gemv_pipeline() {
    // quantize a float row with each ISA, then GEMV: same integers everywhere
    let ks = variants();
    let mut rng = Rng::new(7);
    let (cols, rows) = (300usize, 11usize);
    let nb = cols.div_ceil(128);
    let (w, trits) = make_weights(&mut rng, rows, cols, TritFill::Random);
    let x: Vec<f32> = (0..cols).map(|_| rng.unit() * 3.0).collect();
    for k in &ks {
        let mut q = vec![1i8; nb * 128];
        let qr = k.quantize_row(&x, &mut q);
        let mut out = vec![0i32; rows];
        k.tq2_gemv(&w, nb, &q, qr.sum, &mut out);
        for r in 0..rows {
            assert_eq!(
                out[r] as i64,
                naive_dot(&trits[r * cols..(r + 1) * cols], &q)
            );
        }
    }
}

// ---- dense GEMV ------------------------------------------------------------------------------

/// Checks `got` against an f64 reference with tolerance `1e-5 · Σ|w·x|` per row.
fn check_dense_close(what: &str, got: &[f32], w: &[f32], cols: usize, x: &[f32]) {
    for (r, &g) in got.iter().enumerate() {
        let row = &w[r * cols..(r + 1) * cols];
        let exact: f64 = row.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum();
        let mag: f64 = row
            .iter()
            .zip(x)
            .map(|(&a, &b)| (a as f64 * b as f64).abs())
            .sum();
        let tol = 1e-5 * mag + 1e-30;
        assert!(
            (g as f64 - exact).abs() <= tol,
            "{what} row {r}: got {g}, exact {exact}, tol {tol}"
        );
    }
}

#[test]
fn dense_gemv_all_isas_close_to_exact() {
    let ks = variants();
    let mut rng = Rng::new(8);
    for case in 0..150 {
        let cols = if case < 40 { case } else { rng.range(0, 600) };
        let rows = rng.range(1, 13);
        let x: Vec<f32> = (0..cols).map(|_| rng.unit() * 2.0).collect();
        let wf: Vec<f32> = (0..rows * cols).map(|_| rng.unit() * 0.1).collect();
        // bf16 / f16 bit patterns and their exact f32 values
        let wb: Vec<u16> = wf
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let wh: Vec<u16> = wf
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                // sprinkle f16 subnormals in
                let v = if i % 17 == 0 { v * 1e-4 } else { v };
                half::f16::from_f32(v).to_bits()
            })
            .collect();
        let wb_f: Vec<f32> = wb.iter().map(|&b| scalar::bf16_to_f32(b)).collect();
        let wh_f: Vec<f32> = wh.iter().map(|&b| scalar::f16_to_f32(b)).collect();
        let what = format!("cols={cols} rows={rows}");
        for k in ks.iter().chain([&scalar_kernels()]) {
            let mut out = vec![f32::NAN; rows];
            k.f32_gemv(&wf, cols, &x, &mut out);
            check_dense_close(&format!("{} f32 {what}", k.variant()), &out, &wf, cols, &x);
            k.bf16_gemv(&wb, cols, &x, &mut out);
            check_dense_close(
                &format!("{} bf16 {what}", k.variant()),
                &out,
                &wb_f,
                cols,
                &x,
            );
            k.f16_gemv(&wh, cols, &x, &mut out);
            check_dense_close(
                &format!("{} f16 {what}", k.variant()),
                &out,
                &wh_f,
                cols,
                &x,
            );
        }
    }
}

#[test]
fn dense_gemv_special_values() {
    // exact small-integer sums are exact on every ISA; infinities propagate
    let ks = variants();
    let cols = 37;
    let x: Vec<f32> = (0..cols).map(|i| (i % 5) as f32 - 2.0).collect();
    let wf: Vec<f32> = (0..2 * cols).map(|i| (i % 3) as f32 - 1.0).collect();
    let wb: Vec<u16> = wf
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect();
    let wh: Vec<u16> = wf
        .iter()
        .map(|&v| half::f16::from_f32(v).to_bits())
        .collect();
    let exact: Vec<f32> = (0..2)
        .map(|r| (0..cols).map(|c| wf[r * cols + c] * x[c]).sum())
        .collect();
    for k in &ks {
        let mut out = vec![0.0; 2];
        k.f32_gemv(&wf, cols, &x, &mut out);
        assert_eq!(out, exact, "{} f32", k.variant());
        k.bf16_gemv(&wb, cols, &x, &mut out);
        assert_eq!(out, exact, "{} bf16", k.variant());
        k.f16_gemv(&wh, cols, &x, &mut out);
        assert_eq!(out, exact, "{} f16", k.variant());
        let mut wi = wh.clone();
        wi[3] = 0x7c00; // +inf; x[3] = 1
        k.f16_gemv(&wi, cols, &x, &mut out);
        assert_eq!(out[0], f32::INFINITY, "{} f16 inf", k.variant());
        let mut wb2 = wb.clone();
        wb2[cols + 3] = 0x7fc0; // NaN
        k.bf16_gemv(&wb2, cols, &x, &mut out);
        assert!(out[1].is_nan(), "{} bf16 NaN", k.variant());
    }
}

/// A bf16 value of random sign and mantissa with an exponent in `2^-lo..2^hi` around 1,
/// or zero of either sign one time in eight.
fn bf16_bits(rng: &mut Rng, lo: u32, hi: u32) -> u16 {
    let v = rng.next_u64();
    let sign = ((v & 1) as u16) << 15;
    if v % 8 == 1 {
        return sign;
    }
    let exp = 127 - lo + (v >> 8) as u32 % (lo + hi + 1);
    sign | (exp as u16) << 7 | ((v >> 32) as u16 & 0x7f)
}

/// The bf16 GEMM of every variant is, for each token, bit for bit its own `bf16_gemv`:
/// column counts around the 16- and 8-column steps and the column chunks, row counts around
/// the row blocks, 1 to 13 tokens (several token tiles), values over wide exponent ranges.
#[test]
fn bf16_gemm_is_gemv_per_token() {
    let mut rng = Rng::new(0xbf16);
    let cols_list = [
        0, 1, 5, 7, 8, 9, 15, 16, 17, 23, 24, 31, 40, 100, 680, 1030, 2083,
    ];
    let mut cases = 0;
    for k in variants() {
        for &cols in &cols_list {
            let rows = rng.range(1, 40);
            let tokens_list: &[usize] = if cols > 200 {
                &[1, 4, 7]
            } else {
                &[1, 2, 3, 4, 5, 6, 7, 8, 13]
            };
            // Narrow exponents for most shapes, wide (2^-60..2^60) for some: sums that lose
            // bits to rounding show any change in the order of operations.
            let (lo, hi) = if cols % 2 == 0 { (4, 4) } else { (60, 60) };
            let w: Vec<u16> = (0..rows * cols)
                .map(|_| bf16_bits(&mut rng, lo, hi))
                .collect();
            for &tokens in tokens_list {
                let x: Vec<f32> = (0..tokens * cols)
                    .map(|_| scalar::bf16_to_f32(bf16_bits(&mut rng, lo, hi)) * 1.37)
                    .collect();
                let mut got = vec![f32::NAN; tokens * rows];
                k.bf16_gemm(&w, cols, &x, tokens, &mut got);
                for t in 0..tokens {
                    let mut want = vec![f32::NAN; rows];
                    k.bf16_gemv(&w, cols, &x[t * cols..(t + 1) * cols], &mut want);
                    for r in 0..rows {
                        let g = got[t * rows + r];
                        assert_eq!(
                            g.to_bits(),
                            want[r].to_bits(),
                            "{} cols={cols} rows={rows} tokens={tokens}: token {t} row {r}: \
                             gemm {g}, gemv {}",
                            k.variant(),
                            want[r]
                        );
                    }
                }
                cases += 1;
            }
        }
    }
    assert!(cases > 0);
}

/// Rows that are long enough to span several column chunks and row blocks of the SIMD GEMM,
/// with all-zero rows and tokens (signed zeros must come out as `bf16_gemv` gives them).
#[test]
fn bf16_gemm_zeros_and_blocks() {
    let mut rng = Rng::new(7);
    let (rows, cols) = (35, 4096 + 16 + 8 + 3);
    let mut w: Vec<u16> = (0..rows * cols)
        .map(|_| bf16_bits(&mut rng, 8, 8))
        .collect();
    w[..cols].fill(0x8000); // row 0: -0.0
    w[5 * cols..6 * cols].fill(0); // row 5: +0.0
    for k in variants() {
        for tokens in [2, 6] {
            let mut x: Vec<f32> = (0..tokens * cols)
                .map(|_| scalar::bf16_to_f32(bf16_bits(&mut rng, 8, 8)))
                .collect();
            x[cols..2 * cols].fill(0.0); // token 1: zeros
            let mut got = vec![f32::NAN; tokens * rows];
            k.bf16_gemm(&w, cols, &x, tokens, &mut got);
            for t in 0..tokens {
                let mut want = vec![f32::NAN; rows];
                k.bf16_gemv(&w, cols, &x[t * cols..(t + 1) * cols], &mut want);
                let got: Vec<u32> = got[t * rows..(t + 1) * rows]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "{} tokens={tokens} token {t}", k.variant());
            }
        }
    }
}

#[test]
#[should_panic(expected = "dense gemm")]
fn bf16_gemm_rejects_short_output() {
    let k = scalar_kernels();
    let mut out = vec![0.0; 5];
    k.bf16_gemm(&[0; 6], 2, &[0.0; 4], 2, &mut out);
}

// ---- dispatch ----------------------------------------------------------------------------------

#[test]
fn isa_names_parse_and_select() {
    for isa in Isa::ALL {
        assert_eq!(Isa::parse(isa.name()), Some(isa));
        assert_eq!(Isa::parse(&isa.name().to_uppercase()), Some(isa));
    }
    assert_eq!(Isa::parse("sse"), None);
    assert!(Isa::Scalar.available());
    let avail = Isa::all_available();
    assert_eq!(avail.last(), Some(&Isa::Scalar));
    println!("available ISAs: {avail:?}");
    for isa in Isa::ALL {
        match Kernels::select(Some(isa)) {
            Ok(k) => {
                assert!(isa.available());
                assert_eq!(k.isa, isa);
            }
            Err(e) => {
                assert!(!isa.available());
                assert!(matches!(e, KernelError::Unavailable(i, _) if i == isa));
                println!("select({isa}) -> {e}");
            }
        }
    }
    assert_eq!(Kernels::detect().isa, avail[0]);
    let best = Kernels::best();
    println!("best kernels: {best:?}");
}

// ---- TQ1 -----------------------------------------------------------------------------------

/// TQ1 rows of random (or all ±1) trits, and the trits.
fn make_tq1(rng: &mut Rng, rows: usize, cols: usize, fill: i8) -> (Vec<u8>, Vec<i8>) {
    let rb = tern_format::tq1::row_bytes(cols as u64) as usize;
    let trits: Vec<i8> = (0..rows * cols)
        .map(|_| if fill == 0 { rng.trit() } else { fill })
        .collect();
    let mut w = vec![0u8; rows * rb];
    for (r, dst) in w.chunks_exact_mut(rb).enumerate() {
        tern_format::tq1::pack_row(&trits[r * cols..(r + 1) * cols], dst);
    }
    (w, trits)
}

#[test]
fn tq1_gemv_all_isas_match_scalar_and_naive() {
    let ks = variants();
    let mut rng = Rng::new(17);
    let shapes = [
        (1, 1),
        (3, 31),
        (4, 160),
        (5, 161),
        (7, 320),
        (9, 1000),
        (13, 2560),
        (6, 6912),
    ];
    for (rows, cols) in shapes {
        let nb = tern_format::tq1::blocks(cols as u64) as usize;
        // Random trits and activations, then the extremes: all +1 / all −1 weights with
        // all −128 / all 127 activations (the largest i16 partial sums).
        let cases: [(i8, Option<i8>); 5] = [
            (0, None),
            (1, Some(-128)),
            (-1, Some(-128)),
            (1, Some(127)),
            (-1, Some(127)),
        ];
        for (fill, act) in cases {
            let (w, trits) = make_tq1(&mut rng, rows, cols, fill);
            let mut q = vec![0i8; nb * tq1::BLOCK_COLS];
            for v in &mut q[..cols] {
                *v = act.unwrap_or_else(|| rng.i8());
            }
            let q_sum: i32 = q.iter().map(|&v| v as i32).sum();
            let want: Vec<i32> = (0..rows)
                .map(|r| naive_dot(&trits[r * cols..(r + 1) * cols], &q[..cols]) as i32)
                .collect();
            for k in &ks {
                let mut out = vec![0i32; rows];
                k.tq1_gemv(&w, nb, &q, q_sum, &mut out);
                assert_eq!(
                    out,
                    want,
                    "{} rows {rows} cols {cols} fill {fill}",
                    k.variant()
                );
            }
        }
    }
}

#[test]
fn tq1_gemm_all_isas_match_scalar_and_naive() {
    let ks = variants();
    let mut rng = Rng::new(71);
    for case in 0..120 {
        let nb = rng.range(1, 45);
        let cols = nb * tq1::BLOCK_COLS - rng.range(0, tq1::BLOCK_COLS - 1);
        let rows = rng.range(1, 23);
        let n = if case < 9 { case + 1 } else { rng.range(1, 11) };
        // The model's stride: nb · 160 rounded up to the quantizer's 128, sometimes more.
        let stride = (nb * tq1::BLOCK_COLS).div_ceil(128) * 128 + 128 * rng.range(0, 2);
        let fill = [0i8, 0, 1, -1][case % 4];
        let (w, trits) = make_tq1(&mut rng, rows, cols, fill);
        let mut q = vec![0i8; n * stride];
        for t in 0..n {
            let act = match (case / 4 + t) % 4 {
                0 | 1 => None,
                2 => Some(-128),
                _ => Some(127),
            };
            for v in &mut q[t * stride..t * stride + cols] {
                *v = act.unwrap_or_else(|| rng.i8());
            }
            // Bytes beyond nb · 160 are not read: make them loud.
            for v in &mut q[t * stride + nb * tq1::BLOCK_COLS..(t + 1) * stride] {
                *v = 99;
            }
        }
        let q_sums: Vec<i32> = (0..n)
            .map(|t| {
                q[t * stride..t * stride + cols]
                    .iter()
                    .map(|&v| v as i32)
                    .sum()
            })
            .collect();
        let what = format!("nb={nb} cols={cols} rows={rows} n={n} stride={stride} fill={fill}");
        let sh = GemmShape {
            blocks: nb,
            rows,
            tokens: n,
            q_stride: stride,
        };
        let mut want = vec![0i32; n * rows];
        scalar_kernels().tq1_gemm(&w, sh, &q, &q_sums, &mut want);
        for t in 0..n {
            for r in 0..rows {
                let qt = &q[t * stride..t * stride + cols];
                let naive = naive_dot(&trits[r * cols..(r + 1) * cols], qt);
                assert_eq!(
                    want[t * rows + r] as i64,
                    naive,
                    "scalar t={t} r={r} {what}"
                );
            }
        }
        for k in &ks {
            let mut got = vec![i32::MIN; n * rows];
            k.tq1_gemm(&w, sh, &q, &q_sums, &mut got);
            assert_eq!(got, want, "{} {what}", k.variant());
        }
    }
}

#[test]
fn tq1_gemv_every_byte_value_is_consistent_across_isas() {
    // All 256 byte values (the 13 invalid ones included) decode identically everywhere.
    let ks = variants();
    let mut rng = Rng::new(5);
    let nb = 8;
    let rows = 9;
    let w: Vec<u8> = (0..rows * nb * tq1::BLOCK_BYTES)
        .map(|i| (i * 7 % 256) as u8)
        .collect();
    let q: Vec<i8> = (0..nb * tq1::BLOCK_COLS).map(|_| rng.i8()).collect();
    let q_sum: i32 = q.iter().map(|&v| v as i32).sum();
    let mut want = vec![0i32; rows];
    scalar_kernels().tq1_gemv(&w, nb, &q, q_sum, &mut want);
    // The scalar kernel is the digit formula of the spec, column by column.
    for (r, &got) in want.iter().enumerate() {
        let mut acc = 0i32;
        for (c, &qc) in q.iter().enumerate() {
            let (byte, i) = tern_format::tq1::position(c);
            let d = tern_format::tq1::digit(w[r * nb * 32 + byte], i) as i32;
            acc += (d - 1) * qc as i32;
        }
        assert_eq!(got, acc);
    }
    for k in &ks {
        let mut out = vec![0i32; rows];
        k.tq1_gemv(&w, nb, &q, q_sum, &mut out);
        assert_eq!(out, want, "{}", k.variant());
    }
}

// ---- Q8_ROW --------------------------------------------------------------------------------

#[test]
fn q8_gemv_all_isas_close_to_exact() {
    let ks = variants();
    let mut rng = Rng::new(32);
    for (rows, cols) in [(1, 1), (3, 7), (5, 8), (4, 33), (9, 100), (17, 2560)] {
        let stride = q8_stride(cols);
        let wf: Vec<f32> = (0..rows * cols).map(|_| rng.unit()).collect();
        let x: Vec<f32> = (0..cols).map(|_| 4.0 * rng.unit()).collect();
        let mut w = vec![0xAAu8; rows * stride];
        for (r, rec) in w.chunks_exact_mut(stride).enumerate() {
            tern_format::q8row::quantize_row(&wf[r * cols..(r + 1) * cols], rec);
        }
        for k in &ks {
            let mut out = vec![0.0f32; rows];
            k.q8_gemv(&w, cols, &x, &mut out);
            for (r, &got) in out.iter().enumerate() {
                let rec = &w[r * stride..(r + 1) * stride];
                let mut deq = vec![0.0f32; cols];
                tern_format::q8row::dequantize_row(rec, &mut deq);
                let exact: f64 = deq.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
                let mag: f64 = deq
                    .iter()
                    .zip(&x)
                    .map(|(&a, &b)| (a * b).abs() as f64)
                    .sum();
                assert!(
                    (got as f64 - exact).abs() <= 1e-5 * mag + 1e-30,
                    "{} rows {rows} cols {cols} row {r}: {got} vs {exact}",
                    k.variant()
                );
            }
        }
    }
}

// ---- attention -----------------------------------------------------------------------------

#[test]
fn attend_all_isas_identical_and_close_to_f64() {
    let ks = variants();
    let mut rng = Rng::new(41);
    for case in 0..60 {
        let heads = [1, 2, 4, 3, 8][case % 5];
        let d = [64, 128, 80, 256, 8, 3][case % 6];
        let len = if case < 4 {
            case + 1
        } else {
            rng.range(1, 300)
        };
        let stride = d * rng.range(1, 5);
        let scale = (d as f32).powf(-0.5);
        let big = if case % 7 == 0 { 30.0 } else { 1.0 }; // peaked softmax
        let q: Vec<f32> = (0..heads * d).map(|_| rng.unit() * big).collect();
        let keys: Vec<f32> = (0..len * stride).map(|_| rng.unit()).collect();
        let values: Vec<f32> = (0..len * stride).map(|_| rng.unit()).collect();
        let sh = AttendShape {
            heads,
            head_dim: d,
            len,
            stride,
            scale,
        };
        let what = format!("heads={heads} d={d} len={len} stride={stride}");
        let mut want = vec![0.0f32; heads * d];
        let mut scores = vec![0.0f32; heads * len];
        scalar_kernels().attend(sh, &q, &keys, &values, &mut scores, &mut want);
        for i in 0..heads {
            let s: Vec<f64> = (0..len)
                .map(|p| {
                    let k = &keys[p * stride..p * stride + d];
                    let qi = &q[i * d..(i + 1) * d];
                    qi.iter()
                        .zip(k)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for c in 0..d {
                let exact: f64 = (0..len)
                    .map(|p| e[p] / sum * values[p * stride + c] as f64)
                    .sum();
                let got = want[i * d + c] as f64;
                assert!(
                    (got - exact).abs() < 1e-4,
                    "{what} head {i} col {c}: {got} vs {exact}"
                );
            }
        }
        for k in &ks {
            let mut got = vec![f32::NAN; heads * d];
            k.attend(sh, &q, &keys, &values, &mut scores, &mut got);
            let (g, w): (Vec<u32>, Vec<u32>) = (
                got.iter().map(|v| v.to_bits()).collect(),
                want.iter().map(|v| v.to_bits()).collect(),
            );
            assert_eq!(g, w, "{} {what}", k.variant());
        }
    }
}
