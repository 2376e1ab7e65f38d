//! Kernel throughput: `cargo bench -p tern-infer --bench kernels` (optionally followed by
//! `-- quick` for fewer repetitions). Prints, for every ISA this CPU has: TQ2 and TQ1 GEMV
//! weight bandwidth (cache-hot: one matrix; cold: cycling through matrices larger than the
//! L3), single-threaded and on a `Pool` of `physical_cores()`, TQ2 and TQ1 GEMM (prefill)
//! throughput, quantization time and bf16 GEMV bandwidth.

use std::hint::black_box;
use std::time::Instant;

use tern_format::tq1::pack_row as tq1_pack_row;
use tern_format::tq2::pack_row as tq2_pack_row;
use tern_infer::kernels::{Isa, Kernels};
use tern_infer::pool::{physical_cores, Pool};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Median seconds per call of `f` over `reps` timed batches of `inner` calls.
fn time(reps: usize, inner: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..inner {
                f();
            }
            t.elapsed().as_secs_f64() / inner as f64
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The two ternary layouts: name, columns per block, bytes per block, row packer.
type Pack = fn(&[i8], &mut [u8]);
const LAYOUTS: [(&str, usize, usize, Pack); 2] = [
    ("TQ2", 128, 32, tq2_pack_row),
    ("TQ1", 160, 32, tq1_pack_row),
];

fn ternary_matrix(rng: &mut Rng, rows: usize, cols: usize, rb: usize, pack: Pack) -> Vec<u8> {
    let mut w = vec![0u8; rows * rb];
    let mut trits = vec![0i8; cols];
    for row in w.chunks_exact_mut(rb) {
        for t in trits.iter_mut() {
            *t = (rng.next() % 3) as i8 - 1;
        }
        pack(&trits, row);
    }
    w
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let reps = if quick { 5 } else { 15 };
    let threads = physical_cores();
    let pool = Pool::new(threads);
    println!(
        "ISAs available: {:?}; pool threads: {threads}",
        Isa::all_available()
    );
    let mut rng = Rng(0x1234_5678_9abc_def1);

    // (rows, cols): the BitNet-2B-4T FFN shapes (gate/up: 6912x2560, down: 2560x6912).
    let shapes = [(6912usize, 2560usize), (2560, 6912)];
    let cold_count = 24; // ≈ 106 MB of weights: larger than any L3 here
    for (&(rows, cols), &(layout, block_cols, block_bytes, pack)) in shapes
        .iter()
        .flat_map(|s| LAYOUTS.iter().map(move |l| (s, l)))
    {
        let nb = cols.div_ceil(block_cols);
        let rb = nb * block_bytes;
        let mats: Vec<Vec<u8>> = (0..cold_count)
            .map(|_| ternary_matrix(&mut rng, rows, cols, rb, pack))
            .collect();
        let x: Vec<f32> = (0..cols)
            .map(|_| (rng.next() % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let bytes = (rows * rb) as f64;
        println!(
            "\n{layout} {rows}x{cols} ({:.2} MB per matrix)",
            bytes / 1e6
        );
        for isa in Isa::all_available() {
            let k = Kernels::for_isa(isa).unwrap();
            let gemv = |w: &[u8], q: &[i8], q_sum: i32, out: &mut [i32]| match layout {
                "TQ2" => k.tq2_gemv(w, nb, q, q_sum, out),
                _ => k.tq1_gemv(w, nb, q, q_sum, out),
            };
            let mut q = vec![0i8; nb * block_cols];
            let qr = k.quantize_row(&x, &mut q);
            let t_q = time(reps, 200, || {
                black_box(k.quantize_row(black_box(&x), &mut q));
            });
            let mut out = vec![0i32; rows];
            let hot = time(reps, 20, || gemv(&mats[0], &q, qr.sum, &mut out));
            let mut i = 0;
            let cold = time(reps, cold_count, || {
                i = (i + 1) % cold_count;
                gemv(&mats[i], &q, qr.sum, &mut out)
            });
            let par = |w: &[u8], out: &mut [i32]| {
                pool.run_chunks(out, 4, threads, |_, r, o| {
                    gemv(&w[r.start * rb..r.end * rb], &q, qr.sum, o)
                })
            };
            let hot_mt = time(reps, 20, || par(&mats[0], &mut out));
            let mut i = 0;
            let cold_mt = time(reps, cold_count, || {
                i = (i + 1) % cold_count;
                par(&mats[i], &mut out)
            });
            // prefill: 64 tokens
            let n = 64;
            let qn: Vec<i8> = q.iter().cycle().take(n * q.len()).copied().collect();
            let sums = vec![qr.sum; n];
            let mut outn = vec![0i32; n * rows];
            let t_gemm = time(reps.min(7), 1, || {
                let w = &mats[0];
                match layout {
                    "TQ2" => k.tq2_gemm(w, nb, rows, &qn, &sums, n, &mut outn),
                    _ => k.tq1_gemm(w, nb, rows, &qn, q.len(), &sums, n, &mut outn),
                }
            });
            let t_loop = time(reps.min(7), 1, || {
                for t in 0..n {
                    gemv(
                        &mats[0],
                        &qn[t * q.len()..(t + 1) * q.len()],
                        sums[t],
                        &mut outn[t * rows..(t + 1) * rows],
                    )
                }
            });
            let gops = |t: f64| 2.0 * (rows * cols * n) as f64 / t / 1e9;
            println!(
                "  {:<12} gemv 1T: hot {:6.1} GB/s ({:7.1} us), cold {:6.1} GB/s | {threads}T: hot {:6.1} GB/s, cold {:6.1} GB/s | gemm n={n}: {:6.1} GOP/s (gemv loop {:6.1}) | quantize {:.2} us",
                k.variant(),
                bytes / hot / 1e9,
                hot * 1e6,
                bytes / cold / 1e9,
                bytes / hot_mt / 1e9,
                bytes / cold_mt / 1e9,
                gops(t_gemm),
                gops(t_loop),
                t_q * 1e6,
            );
        }
    }

    // bf16 head-like GEMV: 32000 x 2560 (164 MB)
    let (rows, cols) = (32000usize, 2560usize);
    let w: Vec<u16> = (0..rows * cols)
        .map(|_| half::bf16::from_f32((rng.next() % 2001) as f32 / 1e5 - 0.01).to_bits())
        .collect();
    let x: Vec<f32> = (0..cols).map(|i| (i % 7) as f32 * 0.1).collect();
    let mut out = vec![0f32; rows];
    println!(
        "\nbf16 {rows}x{cols} ({:.0} MB)",
        (w.len() * 2) as f64 / 1e6
    );
    for isa in Isa::all_available() {
        let k = Kernels::for_isa(isa).unwrap();
        let t1 = time(reps.min(7), 1, || k.bf16_gemv(&w, cols, &x, &mut out));
        let tn = time(reps.min(7), 1, || {
            pool.run_chunks(&mut out, 4, threads, |_, r, o| {
                k.bf16_gemv(&w[r.start * cols..r.end * cols], cols, &x, o)
            })
        });
        let b = (w.len() * 2) as f64;
        println!(
            "  {:<12} 1T {:6.1} GB/s | {threads}T {:6.1} GB/s",
            k.variant(),
            b / t1 / 1e9,
            b / tn / 1e9
        );
    }
}
