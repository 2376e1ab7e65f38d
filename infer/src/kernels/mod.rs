//! Compute kernels: TQ2 ternary GEMV/GEMM over int8 activations, per-token activation
//! quantization, and dense (f32/f16/bf16) GEMV, with runtime ISA dispatch.
//!
//! [`scalar`] holds the reference kernels: they are the executable specification, and every
//! SIMD kernel must give **bit-identical** integer results (and a quantization that is
//! identical bit for bit). The dense float kernels accumulate in f32 and may differ from the
//! scalar ones by reassociation only.
//!
//! The kernel set is chosen once per process by [`Kernels::best`] (environment variable
//! `TERN_KERNEL=scalar|avx2|avx512|neon|auto` forces one), or explicitly with
//! [`Kernels::select`] / [`Kernels::for_isa`]. A [`Kernels`] value can only be built for an
//! ISA the running CPU supports, which is what makes calling its SIMD function pointers sound.
//!
//! TQ2 layout (`docs/format.md` §6.1): a row of `cols` trits is `nb = ceil(cols/128)` blocks
//! of 32 bytes; byte `j` of block `b` holds the codes `t + 1` of columns `128b + j + 32i` in
//! bits `[2i+1 : 2i]`, `i = 0..4`; padding columns hold code 1 (trit 0).
//!
//! TQ1 layout (§6.3): `ceil(cols/160)` blocks of 32 bytes; byte `j` holds columns
//! `160b + j + 32i`, `i = 0..5`, as base-3 digits `d_i = t + 1`, extracted with
//! `d_i = ((byte · 3^i) mod 256) · 3 >> 8`. TQ1 has scalar, AVX2 and NEON GEMV and GEMM
//! kernels (AVX-512 uses the AVX2 ones).
//!
//! [`attention`]: scores, softmax and the weighted sum of values for the query heads that
//! share a KV head, one body compiled for the baseline and with AVX2 (bit-identical).
//!
//! Q8_ROW (§6.4): per row `[f32 scale][cols × i8][pad to 4]`; `q8_gemv` widens the int8
//! to f32 and accumulates in f32 like the dense kernels (tested with a tolerance).

use std::fmt;
use std::sync::OnceLock;

use tern_format::{tq1, tq2};

/// `f::<N>(args)` for a run-time count `k` (rows of a GEMV group, tokens of a GEMM tile):
/// the kernels take that count as a const generic so their loops unroll. Counts not listed
/// go to the last arm, the largest.
#[allow(unused_macros)] // targets with no SIMD kernels
macro_rules! const_count {
    ($k:expr, $f:ident $args:tt, $($n:literal)|+ => $max:tt) => {
        match $k {
            $($n => $f::<$n> $args,)+
            _ => $f::<$max> $args,
        }
    };
}

pub mod attention;
pub mod exact;
pub mod scalar;

pub use attention::AttendShape;

/// The shape of a ternary GEMM (prefill): `rows` weight rows of `blocks` blocks each, times
/// `tokens` int8 activation rows, row `t` starting at `t · q_stride` of the activation
/// buffer. `q_stride` is at least `blocks ·` the layout's block columns; the kernels read
/// only those first `blocks ·` block columns of each row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    /// Blocks per weight row (and per activation row).
    pub blocks: usize,
    /// Weight rows (outputs per token).
    pub rows: usize,
    /// Activation rows (tokens).
    pub tokens: usize,
    /// Distance between the starts of two activation rows, in int8 values.
    pub q_stride: usize,
}

#[cfg(target_arch = "x86_64")]
mod x86_64 {
    pub mod avx2;
    pub mod avx512;
}

#[cfg(target_arch = "aarch64")]
mod aarch64 {
    pub mod neon;
}

#[cfg(test)]
mod tests;

/// Result of quantizing one activation row (see [`Kernels::quantize_row`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantRow {
    /// `s = 127 / max(max|x|, 1e-5)`: the int8 values are `x · s` rounded; divide by it to
    /// get back to the activation scale.
    pub scale: f32,
    /// `Σ q_k` over the whole (padded) int8 row, as needed by the TQ2 kernels.
    pub sum: i32,
}

/// An instruction set a kernel table can be built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust, always available.
    Scalar,
    /// x86-64 AVX2 (with FMA and F16C, which every AVX2 CPU has).
    Avx2,
    /// x86-64 AVX-512 F+BW (uses AVX-512 VNNI `vpdpbusd` when the CPU has it).
    Avx512,
    /// AArch64 Advanced SIMD (uses `sdot` when the CPU has the dot-product extension).
    Neon,
}

impl Isa {
    /// Every ISA, best first (the order [`Kernels::select`] tries them in).
    pub const ALL: [Isa; 4] = [Isa::Avx512, Isa::Avx2, Isa::Neon, Isa::Scalar];

    /// Lower-case name, as accepted by [`Isa::parse`] and `TERN_KERNEL`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    /// Parses a name (case-insensitive, surrounding whitespace ignored).
    pub fn parse(s: &str) -> Option<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(Isa::Scalar),
            "avx2" => Some(Isa::Avx2),
            "avx512" | "avx-512" => Some(Isa::Avx512),
            "neon" => Some(Isa::Neon),
            _ => None,
        }
    }

    /// Whether the running CPU (and this build's target architecture) supports this ISA.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The available ISAs, best first (always ends with [`Isa::Scalar`]).
    pub fn all_available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.available()).collect()
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a kernel table could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// `TERN_KERNEL` named no known ISA.
    #[error("TERN_KERNEL={0:?} is not one of scalar, avx2, avx512, neon, auto")]
    UnknownIsa(String),
    /// The requested ISA is not supported by this CPU or build.
    #[error("kernel ISA {0} is not available on this CPU (available: {1})")]
    Unavailable(Isa, String),
}

// Kernel entry points. Each is `unsafe` only because it may require CPU features: a
// `Kernels` value holding it exists only once `Isa::available()` confirmed them. The length
// preconditions are checked (O(1) asserts) by the public methods *and* by the kernels.
type QuantFn = unsafe fn(&[f32], &mut [i8]) -> QuantRow;
type GemvFn = unsafe fn(&[u8], usize, &[i8], i32, &mut [i32]);
type GemmFn = unsafe fn(&[u8], GemmShape, &[i8], &[i32], &mut [i32]);
type Q8GemvFn = unsafe fn(&[u8], usize, &[f32], &mut [f32]);
type AttendFn = unsafe fn(AttendShape, &[f32], &[f32], &[f32], &mut [f32], &mut [f32]);
type DenseU16Fn = unsafe fn(&[u16], usize, &[f32], &mut [f32]);
type DenseF32Fn = unsafe fn(&[f32], usize, &[f32], &mut [f32]);
type DenseGemmU16Fn = unsafe fn(&[u16], usize, &[f32], usize, &mut [f32]);

/// The kernel table for one ISA. Cheap to copy; build it with [`Kernels::best`],
/// [`Kernels::select`] or [`Kernels::for_isa`].
#[derive(Clone, Copy)]
pub struct Kernels {
    /// The ISA these kernels use.
    pub isa: Isa,
    variant: &'static str,
    quantize: QuantFn,
    tq2_gemv: GemvFn,
    tq2_gemm: GemmFn,
    tq1_gemv: GemvFn,
    tq1_gemm: GemmFn,
    q8_gemv: Q8GemvFn,
    bf16_gemv: DenseU16Fn,
    /// `None`: [`Kernels::bf16_gemm`] runs `bf16_gemv` per token over small groups of rows.
    bf16_gemm: Option<DenseGemmU16Fn>,
    f16_gemv: DenseU16Fn,
    f32_gemv: DenseF32Fn,
    attend: AttendFn,
}

impl fmt::Debug for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kernels")
            .field("isa", &self.isa)
            .field("variant", &self.variant)
            .finish()
    }
}

impl Kernels {
    /// The process-wide kernel table, chosen once: `TERN_KERNEL` if set (a bad or unavailable
    /// value prints a warning on stderr and falls back to detection), else the best available.
    pub fn best() -> &'static Kernels {
        static BEST: OnceLock<Kernels> = OnceLock::new();
        BEST.get_or_init(|| {
            Kernels::select(None).unwrap_or_else(|e| {
                eprintln!("warning: {e}; using auto-detected kernels");
                Kernels::detect()
            })
        })
    }

    /// `forced = Some(isa)`: exactly that ISA. `None`: the ISA named by the `TERN_KERNEL`
    /// environment variable if it is set, non-empty and not `auto`, else the best available.
    pub fn select(forced: Option<Isa>) -> Result<Kernels, KernelError> {
        if let Some(isa) = forced {
            return Kernels::for_isa(isa);
        }
        match std::env::var("TERN_KERNEL") {
            Ok(v) if !v.trim().is_empty() && !v.trim().eq_ignore_ascii_case("auto") => {
                let isa = Isa::parse(&v).ok_or(KernelError::UnknownIsa(v))?;
                Kernels::for_isa(isa)
            }
            _ => Ok(Kernels::detect()),
        }
    }

    /// The best ISA this CPU supports (ignores `TERN_KERNEL`).
    pub fn detect() -> Kernels {
        Isa::ALL
            .into_iter()
            .find_map(|isa| Kernels::for_isa(isa).ok())
            .expect("scalar kernels are always available")
    }

    /// The kernels of `isa`, or an error if the CPU lacks it. On AVX-512 the VNNI variant is
    /// used when the CPU has `avx512vnni`; on NEON the `sdot` variant when it has `dotprod`.
    pub fn for_isa(isa: Isa) -> Result<Kernels, KernelError> {
        if !isa.available() {
            let avail: Vec<&str> = Isa::all_available().iter().map(|i| i.name()).collect();
            return Err(KernelError::Unavailable(isa, avail.join(", ")));
        }
        Ok(Kernels::variants_of(isa)
            .into_iter()
            .next()
            .expect("an available ISA has at least one variant"))
    }

    /// Every variant of an available `isa` this CPU can run, preferred first (used by tests to
    /// cover e.g. AVX-512 with and without VNNI). Empty if `isa` is unavailable.
    pub(crate) fn variants_of(isa: Isa) -> Vec<Kernels> {
        let mut v = Vec::new();
        if !isa.available() {
            return v;
        }
        match isa {
            Isa::Scalar => v.push(Kernels {
                isa,
                variant: "scalar",
                quantize: scalar::quantize_row,
                tq2_gemv: scalar::tq2_gemv,
                tq2_gemm: scalar::tq2_gemm,
                tq1_gemv: scalar::tq1_gemv,
                tq1_gemm: scalar::tq1_gemm,
                q8_gemv: scalar::q8_gemv,
                bf16_gemv: scalar::bf16_gemv,
                bf16_gemm: Some(scalar::bf16_gemm),
                f16_gemv: scalar::f16_gemv,
                f32_gemv: scalar::f32_gemv,
                attend: attention::attend,
            }),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                use x86_64::avx2;
                v.push(Kernels {
                    isa,
                    variant: "avx2",
                    quantize: avx2::quantize_row,
                    tq2_gemv: avx2::tq2_gemv,
                    tq2_gemm: avx2::tq2_gemm,
                    tq1_gemv: avx2::tq1_gemv,
                    tq1_gemm: avx2::tq1_gemm,
                    q8_gemv: avx2::q8_gemv,
                    bf16_gemv: avx2::bf16_gemv,
                    bf16_gemm: Some(avx2::bf16_gemm),
                    f16_gemv: avx2::f16_gemv,
                    f32_gemv: avx2::f32_gemv,
                    attend: attention::attend_avx2,
                })
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                use x86_64::avx512::{plain, vnni};
                // TQ1 and Q8_ROW run the AVX2 kernels: AVX-512 availability implies AVX2's.
                use x86_64::avx2;
                let dense = |variant, tq2_gemv, tq2_gemm| Kernels {
                    isa,
                    variant,
                    quantize: plain::quantize_row,
                    tq2_gemv,
                    tq2_gemm,
                    tq1_gemv: avx2::tq1_gemv,
                    tq1_gemm: avx2::tq1_gemm,
                    q8_gemv: avx2::q8_gemv,
                    bf16_gemv: plain::bf16_gemv,
                    bf16_gemm: None,
                    f16_gemv: plain::f16_gemv,
                    f32_gemv: plain::f32_gemv,
                    attend: attention::attend_avx2,
                };
                if is_x86_feature_detected!("avx512vnni") {
                    v.push(dense(
                        "avx512+vnni",
                        vnni::tq2_gemv as GemvFn,
                        vnni::tq2_gemm as GemmFn,
                    ));
                }
                v.push(dense(
                    "avx512",
                    plain::tq2_gemv as GemvFn,
                    plain::tq2_gemm as GemmFn,
                ));
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => {
                use aarch64::neon;
                let mk = |variant, tq2_gemv, tq2_gemm, tq1_gemv, tq1_gemm| Kernels {
                    isa,
                    variant,
                    quantize: neon::quantize_row,
                    tq2_gemv,
                    tq2_gemm,
                    tq1_gemv,
                    tq1_gemm,
                    q8_gemv: neon::q8_gemv,
                    bf16_gemv: neon::bf16_gemv,
                    bf16_gemm: None,
                    f16_gemv: neon::f16_gemv,
                    f32_gemv: neon::f32_gemv,
                    attend: attention::attend,
                };
                if std::arch::is_aarch64_feature_detected!("dotprod") {
                    v.push(mk(
                        "neon+dotprod",
                        neon::tq2_gemv_dotprod as GemvFn,
                        neon::tq2_gemm_dotprod as GemmFn,
                        neon::tq1_gemv_dotprod as GemvFn,
                        neon::tq1_gemm_dotprod as GemmFn,
                    ));
                }
                v.push(mk(
                    "neon",
                    neon::tq2_gemv as GemvFn,
                    neon::tq2_gemm as GemmFn,
                    neon::tq1_gemv as GemvFn,
                    neon::tq1_gemm as GemmFn,
                ));
            }
            #[allow(unreachable_patterns)]
            _ => {}
        }
        v
    }

    /// Short description of the variant in use, e.g. `"avx512+vnni"`.
    pub fn variant(&self) -> &'static str {
        self.variant
    }

    /// Per-token absmax int8 quantization of one activation row, exactly transformers'
    /// `ActQuant` in f32: `m = max(max_k |x_k|, 1e-5)`, `s = 127 / m`,
    /// `q_k = clamp(round_half_even(x_k · s), -128, 127)`.
    ///
    /// `q.len()` must be a multiple of 128 and `>= x.len()`; `q[x.len()..]` is set to 0.
    /// NaN inputs are ignored by the max and quantize to 0 (identically on every ISA).
    pub fn quantize_row(&self, x: &[f32], q: &mut [i8]) -> QuantRow {
        check_quantize(x, q);
        // SAFETY: `self` exists only for an ISA whose CPU features were detected
        // (`for_isa`/`variants_of`), and the length preconditions were just checked.
        unsafe { (self.quantize)(x, q) }
    }

    /// Exact integer dot products of TQ2 rows with one quantized activation row:
    /// `out[r] = Σ_c t(r, c) · q[c]` for `r in 0..out.len()`. `w` holds `out.len()` rows of
    /// `nb · 32` bytes, `q.len() == nb · 128`, and `q_sum` must be `Σ q`.
    pub fn tq2_gemv(&self, w: &[u8], nb: usize, q: &[i8], q_sum: i32, out: &mut [i32]) {
        check_tq2_gemv(w, nb, q, out);
        debug_assert_eq!(
            q_sum,
            q.iter().map(|&v| v as i32).sum::<i32>(),
            "q_sum != Σ q"
        );
        // SAFETY: CPU features detected at construction; lengths checked above.
        unsafe { (self.tq2_gemv)(w, nb, q, q_sum, out) }
    }

    /// [`Kernels::tq2_gemv`] for `sh.tokens` activation rows (prefill): row `t` of `q` starts
    /// at `t · sh.q_stride` and holds `sh.blocks · 128` int8, `q_sums[t]` is their sum; `w`
    /// holds `sh.rows` TQ2 rows; `out` is `tokens` rows of `rows` i32: `out[t · rows + r]`.
    /// Each unpacked weight block is reused for a tile of tokens.
    pub fn tq2_gemm(&self, w: &[u8], sh: GemmShape, q: &[i8], q_sums: &[i32], out: &mut [i32]) {
        check_gemm(TQ2, w, sh, q, q_sums, out);
        debug_assert_sums(TQ2, sh, q, q_sums);
        // SAFETY: CPU features detected at construction; lengths checked above.
        unsafe { (self.tq2_gemm)(w, sh, q, q_sums, out) }
    }

    /// Exact integer dot products of TQ1 rows with one quantized activation row:
    /// `out[r] = Σ_c t(r, c) · q[c]`. `w` holds `out.len()` rows of `nb · 32` bytes,
    /// `q.len() == nb · 160` (zero beyond the real columns) and `q_sum == Σ q`. Bytes that
    /// are no valid encoding give the same (meaningless) result on every ISA.
    pub fn tq1_gemv(&self, w: &[u8], nb: usize, q: &[i8], q_sum: i32, out: &mut [i32]) {
        check_tq1_gemv(w, nb, q, out);
        debug_assert_eq!(
            q_sum,
            q.iter().map(|&v| v as i32).sum::<i32>(),
            "q_sum != Σ q"
        );
        // SAFETY: CPU features detected at construction; lengths checked above.
        unsafe { (self.tq1_gemv)(w, nb, q, q_sum, out) }
    }

    /// [`Kernels::tq1_gemv`] for `sh.tokens` activation rows (prefill), laid out as for
    /// [`Kernels::tq2_gemm`] with `sh.blocks · 160` int8 per row. Each unpacked weight block
    /// is reused for a tile of tokens: TQ1's base-3 decoding costs more than the dot product.
    pub fn tq1_gemm(&self, w: &[u8], sh: GemmShape, q: &[i8], q_sums: &[i32], out: &mut [i32]) {
        check_gemm(TQ1, w, sh, q, q_sums, out);
        debug_assert_sums(TQ1, sh, q, q_sums);
        // SAFETY: CPU features detected at construction; lengths checked above.
        unsafe { (self.tq1_gemm)(w, sh, q, q_sums, out) }
    }

    /// Q8_ROW rows times an f32 vector: `out[r] = scale_r · Σ_c q[r, c] · x[c]`, f32
    /// accumulation. `w` holds `out.len()` records of `4 + ceil(cols/4)·4` bytes.
    pub fn q8_gemv(&self, w: &[u8], cols: usize, x: &[f32], out: &mut [f32]) {
        check_q8_gemv(w, cols, x, out);
        // SAFETY: CPU features detected at construction; lengths checked above.
        unsafe { (self.q8_gemv)(w, cols, x, out) }
    }

    /// Attention of `sh.heads` query heads that share one KV head: for each head `i`
    /// (query `q[i·d..(i+1)·d]`), softmax over the `sh.len` positions of
    /// `scale · q_i · k_p` (key `p` at `keys[p·stride..p·stride + d]`), then
    /// `out[i·d..(i+1)·d] = Σ_p weight_p · v_p` (values laid out like the keys). `scores`
    /// is scratch of at least `heads · len`. Bit-identical on every ISA.
    pub fn attend(
        &self,
        sh: AttendShape,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        check_attend(sh, q, keys, values, scores, out);
        // SAFETY: CPU features detected at construction; lengths checked above.
        unsafe { (self.attend)(sh, q, keys, values, scores, out) }
    }

    /// Dense bf16 rows (raw `u16` bits) times an f32 vector, f32 accumulation:
    /// `out[r] = Σ_c w[r·cols + c] · x[c]`; `w.len() == out.len() · cols`, `x.len() == cols`.
    pub fn bf16_gemv(&self, w: &[u16], cols: usize, x: &[f32], out: &mut [f32]) {
        check_dense(w.len(), cols, x, out);
        // SAFETY: CPU features detected at construction; lengths checked above.
        unsafe { (self.bf16_gemv)(w, cols, x, out) }
    }

    /// [`Kernels::bf16_gemv`] for `tokens` activation rows at once (the batched head):
    /// `out[t · rows + r] = Σ_c w[r·cols + c] · x[t·cols + c]`, where `w.len() == rows · cols`,
    /// `x.len() == tokens · cols`, `out.len() == tokens · rows`. Each token's results are bit
    /// for bit those of `bf16_gemv` on its row alone; a row's weights are read once for all.
    pub fn bf16_gemm(&self, w: &[u16], cols: usize, x: &[f32], tokens: usize, out: &mut [f32]) {
        check_dense_gemm(w.len(), cols, x, tokens, out);
        if let Some(gemm) = self.bf16_gemm {
            // SAFETY: CPU features detected at construction; lengths checked above.
            return unsafe { gemm(w, cols, x, tokens, out) };
        }
        if tokens == 0 {
            return;
        }
        // Every token over a group of rows small enough to stay in L2, then the next group.
        const GROUP: usize = 32;
        let rows = out.len() / tokens;
        for g in (0..rows).step_by(GROUP) {
            let group = g..(g + GROUP).min(rows);
            for t in 0..tokens {
                self.bf16_gemv(
                    &w[group.start * cols..group.end * cols],
                    cols,
                    &x[t * cols..(t + 1) * cols],
                    &mut out[t * rows + group.start..t * rows + group.end],
                );
            }
        }
    }

    /// As [`Kernels::bf16_gemv`] for IEEE f16 rows (raw `u16` bits).
    pub fn f16_gemv(&self, w: &[u16], cols: usize, x: &[f32], out: &mut [f32]) {
        check_dense(w.len(), cols, x, out);
        // SAFETY: CPU features detected at construction; lengths checked above.
        unsafe { (self.f16_gemv)(w, cols, x, out) }
    }

    /// As [`Kernels::bf16_gemv`] for f32 rows.
    pub fn f32_gemv(&self, w: &[f32], cols: usize, x: &[f32], out: &mut [f32]) {
        check_dense(w.len(), cols, x, out);
        // SAFETY: CPU features detected at construction; lengths checked above.
        unsafe { (self.f32_gemv)(w, cols, x, out) }
    }
}

/// Rows per cache block of the SIMD GEMMs: about 16 KiB of weights, which stay in L1/L2
/// while every token tile of the call passes over them (the activations stream from L2).
#[allow(dead_code)] // unused on targets with no SIMD kernels
pub(crate) fn gemm_chunk_rows(row_bytes: usize, rows: usize) -> usize {
    (16 * 1024 / row_bytes.max(1)).clamp(1, rows.max(1))
}

/// The loop every SIMD GEMV kernel shares (ternary and dense): rows in groups of four (one
/// activation load serves four rows), then the one to three left; `dot(r, k)` returns the
/// results of rows `r..r + k` in its first `k` entries, which go to `out[r..r + k]`.
#[allow(dead_code)] // unused on targets with no SIMD kernels
#[inline(always)]
pub(crate) fn gemv_groups<T: Copy>(out: &mut [T], mut dot: impl FnMut(usize, usize) -> [T; 4]) {
    // Whole groups first, with `k = 4` known here so that the kernels' dispatch on `k` and
    // the copy of the results compile to straight-line code (measured: a run-time `k` in
    // every group cost the bf16 head 7.6 % more instructions).
    let whole = out.len() / 4 * 4;
    let mut groups = out.chunks_exact_mut(4);
    for (i, group) in (&mut groups).enumerate() {
        group.copy_from_slice(&dot(4 * i, 4));
    }
    let rest = groups.into_remainder();
    if !rest.is_empty() {
        let k = rest.len();
        rest.copy_from_slice(&dot(whole, k)[..k]);
    }
}

/// [`gemv_groups`] for the ternary kernels: `dot` returns `Σ code·q`, and `out[r]` gets that
/// minus `q_sum` (`Σ t·q = Σ code·q − Σ q`).
#[allow(dead_code)] // unused on targets with no SIMD kernels
#[inline(always)]
pub(crate) fn ternary_gemv_groups(
    out: &mut [i32],
    q_sum: i32,
    mut dot: impl FnMut(usize, usize) -> [i32; 4],
) {
    gemv_groups(out, |r, k| dot(r, k).map(|v| v - q_sum));
}

/// The loop every GEMM kernel shares: rows in chunks of [`gemm_chunk_rows`] and tokens in
/// tiles of at most `tile` (≤ 8); `dot(r, t0, tn)` returns `Σ code·q` of row `r` with tokens
/// `t0..t0 + tn` in its first `tn` lanes, and `out[t · rows + r]` gets that minus
/// `q_sums[t]` (`Σ t·q = Σ code·q − Σ q`).
#[allow(dead_code)] // unused on targets with no SIMD kernels
#[inline(always)]
pub(crate) fn gemm_tiles(
    row_bytes: usize,
    rows: usize,
    n: usize,
    tile: usize,
    q_sums: &[i32],
    out: &mut [i32],
    mut dot: impl FnMut(usize, usize, usize) -> [i32; 8],
) {
    let chunk = gemm_chunk_rows(row_bytes, rows);
    let mut r0 = 0;
    while r0 < rows {
        let r1 = (r0 + chunk).min(rows);
        let mut t0 = 0;
        while t0 < n {
            let tn = (n - t0).min(tile);
            for r in r0..r1 {
                let res = dot(r, t0, tn);
                for t in 0..tn {
                    out[(t0 + t) * rows + r] = res[t] - q_sums[t0 + t];
                }
            }
            t0 += tn;
        }
        r0 = r1;
    }
}

// ---- precondition checks, shared by the public methods and every kernel ----------------

#[inline]
#[track_caller]
pub(crate) fn check_quantize(x: &[f32], q: &[i8]) {
    assert!(
        q.len().is_multiple_of(tq2::BLOCK_COLS) && q.len() >= x.len(),
        "quantize_row: q.len() = {} must be a multiple of 128 and >= x.len() = {}",
        q.len(),
        x.len()
    );
}

#[inline]
#[track_caller]
pub(crate) fn check_tq2_gemv(w: &[u8], nb: usize, q: &[i8], out: &[i32]) {
    assert_eq!(
        q.len(),
        nb * tq2::BLOCK_COLS,
        "tq2_gemv: q.len() != nb * 128"
    );
    assert_eq!(
        Some(w.len()),
        out.len().checked_mul(nb * tq2::BLOCK_BYTES),
        "tq2_gemv: w.len() != out.len() * nb * 32"
    );
}

#[inline]
#[track_caller]
pub(crate) fn check_tq1_gemv(w: &[u8], nb: usize, q: &[i8], out: &[i32]) {
    assert_eq!(
        q.len(),
        nb * tq1::BLOCK_COLS,
        "tq1_gemv: q.len() != nb * 160"
    );
    assert_eq!(
        Some(w.len()),
        out.len().checked_mul(nb * tq1::BLOCK_BYTES),
        "tq1_gemv: w.len() != out.len() * nb * 32"
    );
}

/// A ternary layout's block geometry, as the GEMM checks need it.
#[derive(Clone, Copy)]
pub(crate) struct Blocks {
    name: &'static str,
    bytes: usize,
    cols: usize,
}

pub(crate) const TQ2: Blocks = Blocks {
    name: "tq2_gemm",
    bytes: tq2::BLOCK_BYTES,
    cols: tq2::BLOCK_COLS,
};
pub(crate) const TQ1: Blocks = Blocks {
    name: "tq1_gemm",
    bytes: tq1::BLOCK_BYTES,
    cols: tq1::BLOCK_COLS,
};

#[inline]
#[track_caller]
pub(crate) fn check_gemm(
    l: Blocks,
    w: &[u8],
    sh: GemmShape,
    q: &[i8],
    q_sums: &[i32],
    out: &[i32],
) {
    let name = l.name;
    let row_len = sh.blocks.checked_mul(l.cols);
    assert_eq!(
        Some(w.len()),
        sh.blocks
            .checked_mul(l.bytes)
            .and_then(|rb| rb.checked_mul(sh.rows)),
        "{name}: w.len() != rows * blocks * {}",
        l.bytes
    );
    assert!(
        row_len.is_some_and(|len| sh.q_stride >= len),
        "{name}: q_stride < blocks * {}",
        l.cols
    );
    // The last row needs only its first blocks · cols values.
    let need = sh.tokens.checked_sub(1).map(|m| {
        m.checked_mul(sh.q_stride)
            .and_then(|v| v.checked_add(row_len?))
    });
    assert!(
        need.is_none_or(|need| need.is_some_and(|need| q.len() >= need)),
        "{name}: q.len() < (tokens - 1) * q_stride + blocks * {}",
        l.cols
    );
    assert_eq!(q_sums.len(), sh.tokens, "{name}: q_sums.len() != tokens");
    assert_eq!(
        Some(out.len()),
        sh.tokens.checked_mul(sh.rows),
        "{name}: out.len() != tokens * rows"
    );
}

/// Debug builds: `q_sums[t]` is the sum of activation row `t` (what the kernels assume).
fn debug_assert_sums(l: Blocks, sh: GemmShape, q: &[i8], q_sums: &[i32]) {
    debug_assert!(
        (0..sh.tokens).all(|t| {
            let row = &q[t * sh.q_stride..t * sh.q_stride + sh.blocks * l.cols];
            row.iter().map(|&v| v as i32).sum::<i32>() == q_sums[t]
        }),
        "{}: q_sums[t] != Σ q[t]",
        l.name
    );
}

#[inline]
#[track_caller]
pub(crate) fn check_attend(
    sh: AttendShape,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    scores: &[f32],
    out: &[f32],
) {
    let qd = sh.heads.checked_mul(sh.head_dim);
    assert!(sh.len > 0, "attend: len == 0");
    assert!(sh.stride >= sh.head_dim, "attend: stride < head_dim");
    assert!(
        qd.is_some_and(|qd| q.len() >= qd && out.len() >= qd),
        "attend: q or out shorter than heads * head_dim"
    );
    let cache = (sh.len - 1)
        .checked_mul(sh.stride)
        .and_then(|v| v.checked_add(sh.head_dim));
    assert!(
        cache.is_some_and(|c| keys.len() >= c && values.len() >= c),
        "attend: keys or values shorter than (len - 1) * stride + head_dim"
    );
    assert!(
        sh.heads
            .checked_mul(sh.len)
            .is_some_and(|n| scores.len() >= n),
        "attend: scores shorter than heads * len"
    );
}

#[inline]
#[track_caller]
pub(crate) fn check_q8_gemv(w: &[u8], cols: usize, x: &[f32], out: &[f32]) {
    assert_eq!(x.len(), cols, "q8_gemv: x.len() != cols");
    assert_eq!(
        Some(w.len()),
        out.len().checked_mul(q8_stride(cols)),
        "q8_gemv: w.len() != out.len() * row stride"
    );
}

#[inline]
#[track_caller]
pub(crate) fn check_dense(w_len: usize, cols: usize, x: &[f32], out: &[f32]) {
    assert_eq!(x.len(), cols, "dense gemv: x.len() != cols");
    assert_eq!(
        Some(w_len),
        out.len().checked_mul(cols),
        "dense gemv: w.len() != out.len() * cols"
    );
}

#[inline]
#[track_caller]
pub(crate) fn check_dense_gemm(w_len: usize, cols: usize, x: &[f32], tokens: usize, out: &[f32]) {
    assert_eq!(
        Some(x.len()),
        tokens.checked_mul(cols),
        "dense gemm: x.len() != tokens * cols"
    );
    // No tokens: no rows to compute, whatever `w` holds.
    let Some(rows) = out.len().checked_div(tokens) else {
        assert!(out.is_empty(), "dense gemm: out.len() != 0 for 0 tokens");
        return;
    };
    assert_eq!(
        out.len(),
        rows * tokens,
        "dense gemm: out.len() is not a multiple of tokens"
    );
    assert_eq!(
        Some(w_len),
        rows.checked_mul(cols),
        "dense gemm: w.len() != rows * cols"
    );
}

/// Bytes of one Q8_ROW record of `cols` columns (`tern_format::q8row::row_stride`).
#[inline]
pub(crate) fn q8_stride(cols: usize) -> usize {
    tern_format::q8row::row_stride(cols as u64) as usize
}
