//! From the source's ternary encodings to TQ2 rows (docs/format.md §6.1), and the
//! normalized per-tensor scale (§6.2).

use half::f16;
use rayon::prelude::*;
use safetensors::Dtype;
use tern_format::tq2::{self, BLOCK_BYTES, BLOCK_COLS};
use tern_format::ScaleConvention;

/// Re-lays Hugging Face packed codes `P [out/4, in]` (row `i·R + r` in bits `2i` of packed
/// row `r`, docs/checkpoints.md §3) as TQ2 rows. Both store `code = trit + 1`, so codes move
/// unchanged. Returns the TQ2 bytes, or the (row, column) of the first code 3.
pub fn packed_to_tq2(packed: &[u8], out_rows: usize, cols: usize) -> Result<Vec<u8>, (u64, u64)> {
    let r_rows = out_rows / 4;
    debug_assert_eq!(packed.len(), r_rows * cols);
    // A byte holds an invalid code iff one of its 2-bit fields is 0b11.
    if let Some(i) = packed.iter().position(|&b| b & (b >> 1) & 0x55 != 0) {
        let (r, c) = (i / cols, i % cols);
        let field = (0..4)
            .find(|k| (packed[i] >> (2 * k)) & 3 == 3)
            .unwrap_or(0);
        return Err(((field * r_rows + r) as u64, c as u64));
    }
    let row_bytes = tq2::row_bytes(cols as u64) as usize;
    let full_blocks = cols / BLOCK_COLS;
    let mut out = vec![0u8; out_rows * row_bytes];
    out.par_chunks_mut(row_bytes)
        .enumerate()
        .for_each(|(o, dst)| {
            let (i, r) = (o / r_rows, o % r_rows);
            let src = &packed[r * cols..(r + 1) * cols];
            let shift = 2 * i as u32;
            let code = |b: u8| (b >> shift) & 3;
            // Whole blocks: four 32-column strips interleave into 32 bytes (vectorizes).
            for (b, block) in dst
                .chunks_exact_mut(BLOCK_BYTES)
                .take(full_blocks)
                .enumerate()
            {
                let s = &src[b * BLOCK_COLS..(b + 1) * BLOCK_COLS];
                for (j, byte) in block.iter_mut().enumerate() {
                    *byte = code(s[j])
                        | code(s[j + 32]) << 2
                        | code(s[j + 64]) << 4
                        | code(s[j + 96]) << 6;
                }
            }
            // The ragged last block: padding columns hold code 1.
            if full_blocks * BLOCK_COLS < cols {
                let base = full_blocks * BLOCK_COLS;
                let block = &mut dst[full_blocks * BLOCK_BYTES..];
                for (j, byte) in block.iter_mut().enumerate() {
                    let mut v = 0u8;
                    for k in 0..4 {
                        let c = base + j + 32 * k;
                        v |= if c < cols { code(src[c]) } else { 1 } << (2 * k);
                    }
                    *byte = v;
                }
            }
        });
    Ok(out)
}

/// Re-lays TQ2 rows (`rows × cols`, valid codes) in another ternary layout; TQ2 itself is
/// returned unchanged. Trits are decoded and packed again, rows in parallel.
pub fn tq2_to(
    layout: tern_format::Layout,
    tq2_bytes: Vec<u8>,
    rows: usize,
    cols: usize,
) -> Vec<u8> {
    if layout == tern_format::Layout::Tq2 {
        return tq2_bytes;
    }
    let rb_in = tq2::row_bytes(cols as u64) as usize;
    let rb_out = layout
        .ternary_row_bytes(cols as u64)
        .expect("a ternary layout") as usize;
    let mut out = vec![0u8; rows * rb_out];
    out.par_chunks_mut(rb_out)
        .zip(tq2_bytes.par_chunks(rb_in))
        .for_each_init(
            || vec![0i8; cols],
            |trits, (dst, src)| {
                tq2::unpack_row(src, trits).expect("TQ2 rows were validated");
                layout.pack_ternary_row(trits, dst);
            },
        );
    out
}

/// Q8_ROW records (docs/format.md §6.4) of whole rows of float bytes of `dtype`, rows in
/// parallel. `Err(i)`: element `i` of the chunk is not finite.
pub fn quantize_rows_q8(bytes: &[u8], dtype: Dtype, cols: usize) -> Result<Vec<u8>, usize> {
    let row_in = cols * dtype.size();
    let rows = bytes.len() / row_in.max(1);
    let stride = tern_format::q8row::row_stride(cols as u64) as usize;
    let mut out = vec![0u8; rows * stride];
    let bad = out
        .par_chunks_mut(stride)
        .zip(bytes.par_chunks(row_in))
        .enumerate()
        .map_init(
            || vec![0.0f32; cols],
            |buf, (r, (dst, src))| {
                decode(src, dtype, buf);
                if let Some(c) = buf.iter().position(|x| !x.is_finite()) {
                    return Some(r * cols + c);
                }
                tern_format::q8row::quantize_row(buf, dst);
                None
            },
        )
        .flatten()
        .min();
    match bad {
        Some(i) => Err(i),
        None => Ok(out),
    }
}

/// Decodes little-endian float bytes of `dtype` into `out`.
fn decode(bytes: &[u8], dtype: Dtype, out: &mut [f32]) {
    match dtype {
        Dtype::BF16 => {
            // bf16 is the top half of an f32 (`half`'s conversion also sets the quiet bit of
            // NaNs, a branch that keeps this loop from vectorizing; a NaN stays a NaN here).
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
            }
        }
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        _ => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
}

fn check_float_dtype(dtype: Dtype) -> Result<usize, String> {
    match dtype {
        Dtype::BF16 | Dtype::F16 => Ok(2),
        Dtype::F32 => Ok(4),
        other => Err(format!("dtype {other:?} is not a float type tern reads")),
    }
}

/// Converts float bytes of `dtype` to f32, or says which element is not finite.
pub fn to_f32(bytes: &[u8], dtype: Dtype) -> Result<Vec<f32>, String> {
    let size = check_float_dtype(dtype)?;
    let mut v = vec![0.0f32; bytes.len() / size];
    decode(bytes, dtype, &mut v);
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(format!("element {i} is {} (NaN or infinite)", v[i]));
    }
    Ok(v)
}

/// What ternarizing a master tensor produced.
pub struct Ternarized {
    pub tq2: Vec<u8>,
    /// `1 / sw`: true weight = scale × trit.
    pub scale: f32,
    pub all_zero: bool,
}

/// transformers' `WeightQuant` (docs/checkpoints.md §4.3) on raw master bytes `[rows, cols]`:
/// `sw = 1 / max(mean|w|, 1e-5)` in f32, `t = clamp(round_half_even(w · sw), −1, 1)`.
/// Rows are decoded and ternarized in parallel, straight into TQ2 bytes.
pub fn ternarize_masters(
    bytes: &[u8],
    dtype: Dtype,
    rows: usize,
    cols: usize,
) -> Result<Ternarized, String> {
    let size = check_float_dtype(dtype)?;
    let row_in = cols * size;
    // Pass 1: Σ|w| (in f64, rounded once: the correctly rounded mean) and finiteness.
    let (sum, bad) = bytes
        .par_chunks(row_in)
        .enumerate()
        .map_init(
            || vec![0.0f32; cols],
            |buf, (r, row)| {
                decode(row, dtype, buf);
                // Eight running sums, so the additions pipeline and vectorize. The order of
                // f64 additions moves the sum by ~1e-16 relative (rayon's reduction order
                // already varies), far below the f32 rounding of the mean.
                let mut sums = [0.0f64; 8];
                let mut finite = true;
                let blocks = buf.chunks_exact(8);
                let tail = blocks.remainder();
                for block in blocks {
                    for (s, &x) in sums.iter_mut().zip(block) {
                        *s += f64::from(x.abs());
                        finite &= x.is_finite();
                    }
                }
                for (s, &x) in sums.iter_mut().zip(tail) {
                    *s += f64::from(x.abs());
                    finite &= x.is_finite();
                }
                let bad = (!finite)
                    .then(|| buf.iter().position(|x| !x.is_finite()))
                    .flatten()
                    .map(|c| r * cols + c);
                (sums.iter().sum::<f64>(), bad)
            },
        )
        .reduce(|| (0.0, None), |a, b| (a.0 + b.0, a.1.or(b.1)));
    if let Some(i) = bad {
        return Err(format!("element {i} is NaN or infinite"));
    }
    let mean = (sum / (rows * cols) as f64) as f32;
    let sw = 1.0f32 / mean.max(1e-5);
    // clamp(round_half_even(y), -1, 1) + 1 without a rounding call (x86-64's baseline has
    // no round instruction, so `round_ties_even` is a libm call): y = ±0.5 rounds to 0, and
    // anything beyond ±0.5 reaches ±1 after clamping.
    let code = |x: f32| {
        let y = x * sw;
        1 + u8::from(y > 0.5) - u8::from(y < -0.5)
    };
    // Pass 2: codes, four 32-column strips per 32-byte block.
    let row_bytes = tq2::row_bytes(cols as u64) as usize;
    let blocks = row_bytes / BLOCK_BYTES;
    let mut out = vec![0u8; rows * row_bytes];
    out.par_chunks_mut(row_bytes)
        .zip(bytes.par_chunks(row_in))
        .for_each_init(
            || vec![0.0f32; blocks * BLOCK_COLS],
            |buf, (dst, src)| {
                decode(src, dtype, &mut buf[..cols]);
                // Padding reads as 0.0, whose code is 1 (trit 0), as the format requires.
                buf[cols..].fill(0.0);
                for (block, w) in dst
                    .chunks_exact_mut(BLOCK_BYTES)
                    .zip(buf.chunks_exact(BLOCK_COLS))
                {
                    for (j, byte) in block.iter_mut().enumerate() {
                        *byte = code(w[j])
                            | code(w[j + 32]) << 2
                            | code(w[j + 64]) << 4
                            | code(w[j + 96]) << 6;
                    }
                }
            },
        );
    Ok(Ternarized {
        tq2: out,
        scale: 1.0 / sw,
        all_zero: sum == 0.0,
    })
}

/// Float weights that are already ternary: every value is `0` or `±s` for one `s > 0`
/// (exactly, in the stored precision). Returns the TQ2 rows and `s`; or, when the tensor
/// holds more than one magnitude, a sentence saying how many (several scales per tensor,
/// e.g. SpectraSuite TriLM's per-slice scales, cannot be stored exactly with one scale).
pub fn ternary_floats(
    bytes: &[u8],
    dtype: Dtype,
    rows: usize,
    cols: usize,
) -> Result<(Vec<u8>, f32), String> {
    let w = to_f32(bytes, dtype)?;
    let mut magnitudes: Vec<f32> = Vec::new();
    for &x in &w {
        let m = x.abs();
        if m != 0.0 && !magnitudes.contains(&m) {
            magnitudes.push(m);
            if magnitudes.len() > 64 {
                break;
            }
        }
    }
    let s = match magnitudes[..] {
        [] => 1.0, // all zero: any scale is exact
        [s] => s,
        _ => {
            let n = if magnitudes.len() > 64 {
                "more than 64".to_string()
            } else {
                magnitudes.len().to_string()
            };
            return Err(format!(
                "the float weights are not ternary: {n} distinct magnitudes where a ternary \
                 tensor with one scale has 1{}",
                if magnitudes.len() <= 64 {
                    " (several scales per tensor, like TriLM's per-slice scales, cannot be \
                     stored exactly with the one scale per tensor of the .tern format)"
                } else {
                    ""
                }
            ));
        }
    };
    let row_bytes = tq2::row_bytes(cols as u64) as usize;
    let mut out = vec![0u8; rows * row_bytes];
    let mut trits = vec![0i8; cols];
    for (dst, row) in out.chunks_exact_mut(row_bytes).zip(w.chunks_exact(cols)) {
        for (t, &x) in trits.iter_mut().zip(row) {
            *t = if x > 0.0 {
                1
            } else if x < 0.0 {
                -1
            } else {
                0
            };
        }
        tq2::pack_row(&trits, dst);
    }
    Ok((out, s))
}

/// The value of a one-element tensor (`weight_scale`, shape `[1]` or `[]`), finite and
/// positive.
pub fn single_value(bytes: &[u8], dtype: Dtype) -> Result<f32, String> {
    let v = to_f32(bytes, dtype).map_err(|e| format!("weight_scale: {e}"))?;
    match v[..] {
        [ws] if ws > 0.0 => Ok(ws),
        [ws] => Err(format!("weight_scale is {ws}, must be positive")),
        _ => Err(format!("weight_scale has {} elements, expected 1", v.len())),
    }
}

/// A warning when a normalized scale (the magnitude of every non-zero weight) is outside
/// what trained BitNet checkpoints hold — the sign of a `weight_scale` read with the wrong
/// convention: `1/mean|W|` multiplied instead of divided gives magnitudes in the tens or
/// hundreds (real checkpoints: about 0.001 to 2; microsoft/bitnet-b1.58-2B-4T ≈ 1.5).
pub fn implausible_scale(scale: f32) -> Option<String> {
    (scale > 8.0).then(|| {
        format!(
            "every weight has magnitude {scale}: implausibly large for a trained model (is \
             weight_scale 1/mean|W|, read with the multiply convention?)"
        )
    })
}

/// Reads a one-element `weight_scale` (bf16, f16 or f32; shape `[1]` or `[]`) and returns
/// the normalized scale: true weight = scale × trit.
pub fn normalized_scale(
    bytes: &[u8],
    dtype: Dtype,
    convention: ScaleConvention,
) -> Result<f32, String> {
    let v = to_f32(bytes, dtype).map_err(|e| format!("weight_scale: {e}"))?;
    let [ws] = v[..] else {
        return Err(format!("weight_scale has {} elements, expected 1", v.len()));
    };
    if ws.is_nan() || ws <= 0.0 {
        return Err(format!("weight_scale is {ws}, must be positive"));
    }
    let scale = match convention {
        ScaleConvention::Multiply => ws,
        ScaleConvention::Divide => 1.0 / ws,
        ScaleConvention::Masters => return Err("masters have no weight_scale".into()),
    };
    if !(scale.is_finite() && scale > 0.0) {
        return Err(format!(
            "weight_scale {ws} gives the unusable scale {scale}"
        ));
    }
    Ok(scale)
}

/// What a scan of a float tensor found.
#[derive(Default)]
pub struct FloatScan {
    pub non_finite: Option<u64>,
    pub all_zero: bool,
}

/// Looks for NaN/inf and for an all-zero tensor, on raw little-endian bytes.
pub fn scan_floats(bytes: &[u8], dtype: Dtype) -> FloatScan {
    let (size, exp_mask, abs_mask): (usize, u32, u32) = match dtype {
        Dtype::BF16 => (2, 0x7f80, 0x7fff),
        Dtype::F16 => (2, 0x7c00, 0x7fff),
        Dtype::F32 => (4, 0x7f80_0000, 0x7fff_ffff),
        _ => return FloatScan::default(),
    };
    let mut scan = FloatScan {
        non_finite: None,
        all_zero: true,
    };
    for (i, c) in bytes.chunks_exact(size).enumerate() {
        let bits = if size == 2 {
            u32::from(u16::from_le_bytes([c[0], c[1]]))
        } else {
            u32::from_le_bytes([c[0], c[1], c[2], c[3]])
        };
        if bits & exp_mask == exp_mask {
            scan.non_finite = Some(i as u64);
            break;
        }
        if bits & abs_mask != 0 {
            scan.all_zero = false;
        }
    }
    scan
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// The Hugging Face packing of docs/checkpoints.md §3, written from its formula.
    fn hf_pack(trits: &[i8], out: usize, cols: usize) -> Vec<u8> {
        let r = out / 4;
        let mut p = vec![0u8; r * cols];
        for i in 0..4 {
            for rr in 0..r {
                for c in 0..cols {
                    p[rr * cols + c] |= ((trits[(i * r + rr) * cols + c] + 1) as u8) << (2 * i);
                }
            }
        }
        p
    }

    #[test]
    fn packed_codes_move_to_the_right_rows_and_columns() {
        let (out, cols) = (12, 300);
        let trits: Vec<i8> = (0..out * cols)
            .map(|k| ((k * 7 + k / 5) % 3) as i8 - 1)
            .collect();
        let tq = packed_to_tq2(&hf_pack(&trits, out, cols), out, cols).unwrap();
        let rb = tq2::row_bytes(cols as u64) as usize;
        for o in 0..out {
            let mut row = vec![0i8; cols];
            tq2::unpack_row(&tq[o * rb..(o + 1) * rb], &mut row).unwrap();
            assert_eq!(row, &trits[o * cols..(o + 1) * cols], "row {o}");
        }
    }

    #[test]
    fn the_checkpoints_md_worked_example() {
        // T[:,0] = [1,0,-1,1,0,-1,1,0], R = 2: P[0,0] holds rows 0, 2, 4, 6 and P[1,0]
        // rows 1, 3, 5, 7, row 0 (4R + r) in bits 1:0.
        let col = [1i8, 0, -1, 1, 0, -1, 1, 0];
        assert_eq!(hf_pack(&col, 8, 1), [0b10_01_00_10, 0b01_00_10_01]);
        let tq = packed_to_tq2(&hf_pack(&col, 8, 1), 8, 1).unwrap();
        for (o, &t) in col.iter().enumerate() {
            assert_eq!(tq[o * 32] & 3, (t + 1) as u8);
        }
    }

    #[test]
    fn code_three_is_reported_with_its_position() {
        let mut p = vec![0x55u8; 2 * 10];
        p[10 + 7] = 0b0011_0101; // packed row 1, column 7, field 2 → output row 2·2 + 1
        assert_eq!(packed_to_tq2(&p, 8, 10), Err((5, 7)));
    }

    #[test]
    fn masters_round_half_to_even_like_transformers() {
        // mean|w| = (4 × 0.5 + 4 × 1.5) / 8 = 1, so sw = 1 and w · sw lands exactly on the
        // ties ±0.5 and ±1.5. Half to even: ±0.5 → 0 (half away from zero would give ±1),
        // ±1.5 → ±2 → clamped to ±1.
        let w = [0.5f32, -0.5, 1.5, -1.5, 0.5, -0.5, 1.5, -1.5];
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        let t8 = ternarize_masters(&bytes, Dtype::F32, 1, 8).unwrap();
        assert_eq!(t8.scale, 1.0);
        let mut t = vec![0i8; 8];
        tq2::unpack_row(&t8.tq2, &mut t).unwrap();
        assert_eq!(t, [0, 0, 1, -1, 0, 0, 1, -1]);
        // The same rule as torch.round: round_ties_even, then the clamp.
        let want: Vec<i8> = w
            .iter()
            .map(|x| x.round_ties_even().clamp(-1.0, 1.0) as i8)
            .collect();
        assert_eq!(t, want);
        // Just off the tie, either side: 0.5 + ulp rounds to 1, 0.5 − ulp to 0.
        let up = f32::from_bits(0.5f32.to_bits() + 1);
        let down = f32::from_bits(0.5f32.to_bits() - 1);
        let w = [up, -up, down, -down, 1.5, 1.5, 1.5, 1.5];
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        let t8 = ternarize_masters(&bytes, Dtype::F32, 1, 8).unwrap();
        // mean|w| = 1 + 2⁻²⁷ in f64, 1 once rounded to f32.
        assert_eq!(t8.scale, 1.0);
        tq2::unpack_row(&t8.tq2, &mut t).unwrap();
        assert_eq!(t, [1, -1, 0, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn zero_masters_give_zero_trits() {
        let t = ternarize_masters(&[0u8; 16], Dtype::F32, 1, 4).unwrap();
        assert!(t.all_zero);
        let (tq, scale) = (t.tq2, t.scale);
        assert_eq!(scale, 1e-5);
        let mut t = vec![9i8; 4];
        tq2::unpack_row(&tq, &mut t).unwrap();
        assert_eq!(t, [0; 4]);
    }

    #[test]
    fn scale_conventions() {
        let two = 2.0f32.to_le_bytes();
        assert_eq!(
            normalized_scale(&two, Dtype::F32, ScaleConvention::Multiply),
            Ok(2.0)
        );
        assert_eq!(
            normalized_scale(&two, Dtype::F32, ScaleConvention::Divide),
            Ok(0.5)
        );
        let bf = bf16::from_f32(1.5).to_le_bytes();
        assert_eq!(
            normalized_scale(&bf, Dtype::BF16, ScaleConvention::Multiply),
            Ok(1.5)
        );
        assert!(normalized_scale(
            &f32::NAN.to_le_bytes(),
            Dtype::F32,
            ScaleConvention::Multiply
        )
        .is_err());
        assert!(
            normalized_scale(&0f32.to_le_bytes(), Dtype::F32, ScaleConvention::Divide).is_err()
        );
        assert!(normalized_scale(&[0u8; 8], Dtype::F32, ScaleConvention::Divide).is_err());
    }
}
