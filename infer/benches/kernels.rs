//! Kernel throughput, with divan: `cargo bench -p tern-infer --bench kernels` (a filter
//! such as `-- gemv_cold` picks benchmarks). For every ISA this CPU has, on the 2B-4T FFN
//! shapes (gate/up 6912×2560, down 2560×6912) in both ternary layouts:
//! - `gemv_hot`: one matrix, cache-hot; `gemv_cold`: cycling through 24 copies (≈ 100 MB,
//!   more than any L3 here), so weights stream from memory; `gemv_cold_pool`: the same on
//!   a `Pool` of `physical_cores()`. Throughput in bytes of weights.
//! - `gemm_64_tokens`: the prefill kernel on 64 tokens; throughput in multiply-adds.
//! - `quantize_row` (a 2560-wide activation row) and `bf16_gemv` (a 32000×2560 head).
//!
//! `tern bench --kernels` measures the same kernels from memory inside the CLI, for users;
//! this is the developers' view, with divan's statistics.

use divan::counter::{BytesCount, ItemsCount};
use divan::Bencher;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tern_infer::kernels::{GemmShape, Isa, Kernels};
use tern_infer::pool::{physical_cores, Pool};

fn main() {
    divan::main();
}

/// 2B-4T's FFN shapes.
const SHAPES: [(usize, usize); 2] = [(6912, 2560), (2560, 6912)];
/// Copies cycled through by the cold benchmarks.
const COLD_COPIES: usize = 24;
/// Tokens of the prefill benchmark.
const TOKENS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    Tq2,
    Tq1,
}

/// One kernel configuration: ISA, ternary layout, matrix shape.
#[derive(Clone, Copy)]
struct Case {
    isa: Isa,
    layout: Layout,
    rows: usize,
    cols: usize,
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let k = Kernels::for_isa(self.isa).expect("available");
        write!(
            f,
            "{} {:?} {}x{}",
            k.variant(),
            self.layout,
            self.rows,
            self.cols
        )
    }
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for isa in Isa::all_available() {
        for layout in [Layout::Tq2, Layout::Tq1] {
            for (rows, cols) in SHAPES {
                out.push(Case {
                    isa,
                    layout,
                    rows,
                    cols,
                });
            }
        }
    }
    out
}

/// An ISA, named as the kernels name themselves.
#[derive(Clone, Copy)]
struct IsaArg(Isa);

impl std::fmt::Display for IsaArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(Kernels::for_isa(self.0).expect("available").variant())
    }
}

fn isas() -> Vec<IsaArg> {
    Isa::all_available().into_iter().map(IsaArg).collect()
}

/// Packs one row of trits into a layout's bytes.
type PackRow = fn(&[i8], &mut [u8]);

/// `copies` equal random ternary matrices of `case`'s layout and shape (distinct memory, so
/// cycling through them streams from memory), and one quantized activation row.
struct Weights {
    k: Kernels,
    layout: Layout,
    rows: usize,
    /// Blocks per row.
    nb: usize,
    row_bytes: usize,
    mats: Vec<Vec<u8>>,
    q: Vec<i8>,
    q_sum: i32,
}

impl Weights {
    fn new(case: Case, copies: usize) -> Weights {
        let (block_cols, pack): (usize, PackRow) = match case.layout {
            Layout::Tq2 => (128, tern_format::tq2::pack_row),
            Layout::Tq1 => (tern_format::tq1::BLOCK_COLS, tern_format::tq1::pack_row),
        };
        let nb = case.cols.div_ceil(block_cols);
        let row_bytes = nb * 32;
        let mut rng = SmallRng::seed_from_u64(1);
        let mut m = vec![0u8; case.rows * row_bytes];
        let mut trits = vec![0i8; case.cols];
        for row in m.chunks_exact_mut(row_bytes) {
            for t in trits.iter_mut() {
                *t = rng.random_range(-1..=1);
            }
            pack(&trits, row);
        }
        let k = Kernels::for_isa(case.isa).expect("available");
        let x: Vec<f32> = (0..case.cols)
            .map(|_| rng.random_range(-1.0..=1.0))
            .collect();
        let mut q = vec![0i8; nb * block_cols];
        let q_sum = k.quantize_row(&x, &mut q).sum;
        Weights {
            k,
            layout: case.layout,
            rows: case.rows,
            nb,
            row_bytes,
            mats: vec![m; copies],
            q,
            q_sum,
        }
    }

    fn bytes(&self) -> usize {
        self.rows * self.row_bytes
    }

    /// The GEMV of the rows in `w` (whole rows of one matrix).
    fn gemv(&self, w: &[u8], out: &mut [i32]) {
        match self.layout {
            Layout::Tq2 => self.k.tq2_gemv(w, self.nb, &self.q, self.q_sum, out),
            Layout::Tq1 => self.k.tq1_gemv(w, self.nb, &self.q, self.q_sum, out),
        }
    }
}

#[divan::bench(args = cases())]
fn gemv_hot(bencher: Bencher, case: Case) {
    let w = Weights::new(case, 1);
    let mut out = vec![0i32; case.rows];
    bencher
        .counter(BytesCount::new(w.bytes()))
        .bench_local(|| w.gemv(&w.mats[0], &mut out));
}

#[divan::bench(args = cases())]
fn gemv_cold(bencher: Bencher, case: Case) {
    let w = Weights::new(case, COLD_COPIES);
    let mut out = vec![0i32; case.rows];
    let mut i = 0;
    bencher.counter(BytesCount::new(w.bytes())).bench_local(|| {
        i = (i + 1) % COLD_COPIES;
        w.gemv(&w.mats[i], &mut out)
    });
}

#[divan::bench(args = cases())]
fn gemv_cold_pool(bencher: Bencher, case: Case) {
    let w = Weights::new(case, COLD_COPIES);
    let threads = physical_cores();
    let pool = Pool::new(threads);
    let mut out = vec![0i32; case.rows];
    let mut i = 0;
    bencher.counter(BytesCount::new(w.bytes())).bench_local(|| {
        i = (i + 1) % COLD_COPIES;
        let m = &w.mats[i];
        pool.run_chunks(&mut out, 4, threads, |_, r, o| {
            w.gemv(&m[r.start * w.row_bytes..r.end * w.row_bytes], o)
        })
    });
}

#[divan::bench(args = cases())]
fn gemm_64_tokens(bencher: Bencher, case: Case) {
    let w = Weights::new(case, 1);
    let stride = w.q.len();
    let qs: Vec<i8> = w.q.iter().cycle().take(TOKENS * stride).copied().collect();
    let sums = vec![w.q_sum; TOKENS];
    let mut out = vec![0i32; TOKENS * case.rows];
    let (k, m) = (w.k, &w.mats[0]);
    let sh = GemmShape {
        blocks: w.nb,
        rows: case.rows,
        tokens: TOKENS,
        q_stride: stride,
    };
    bencher
        .counter(ItemsCount::new(case.rows * case.cols * TOKENS))
        .bench_local(|| match case.layout {
            Layout::Tq2 => k.tq2_gemm(m, sh, &qs, &sums, &mut out),
            Layout::Tq1 => k.tq1_gemm(m, sh, &qs, &sums, &mut out),
        });
}

#[divan::bench(args = isas())]
fn quantize_row(bencher: Bencher, isa: IsaArg) {
    let k = Kernels::for_isa(isa.0).expect("available");
    let x: Vec<f32> = (0..2560)
        .map(|i| (i % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let mut q = vec![0i8; 2560];
    bencher
        .counter(ItemsCount::new(x.len()))
        .bench_local(|| k.quantize_row(divan::black_box(&x), &mut q));
}

#[divan::bench(args = isas())]
fn bf16_gemv(bencher: Bencher, isa: IsaArg) {
    let k = Kernels::for_isa(isa.0).expect("available");
    let (rows, cols) = (32000usize, 2560usize);
    let mut rng = SmallRng::seed_from_u64(2);
    let w: Vec<u16> = (0..rows * cols)
        .map(|_| half::bf16::from_f32(rng.random_range(-0.01..=0.01)).to_bits())
        .collect();
    let x: Vec<f32> = (0..cols).map(|i| (i % 7) as f32 * 0.1).collect();
    let mut out = vec![0f32; rows];
    bencher
        .counter(BytesCount::new(w.len() * 2))
        .bench_local(|| k.bf16_gemv(&w, cols, &x, &mut out));
}
