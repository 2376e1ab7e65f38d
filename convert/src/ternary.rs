//! From the source's ternary encodings to TQ2 rows (docs/format.md §6.1), and the
//! normalized per-tensor scale (§6.2).

use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::Dtype;
use tern_format::tq2::{self, BLOCK_BYTES, BLOCK_COLS};
use tern_format::ScaleConvention;

/// Re-lays Hugging Face packed codes `P [out/4, in]` (row `i·R + r` in bits `2i` of packed
/// row `r`, checkpoints.md §3) as TQ2 rows. Both store `code = trit + 1`, so codes move
/// unchanged. Returns the TQ2 bytes, or the (row, column) of the first code 3.
pub fn packed_to_tq2(packed: &[u8], out_rows: usize, cols: usize) -> Result<Vec<u8>, (u64, u64)> {
    let r_rows = out_rows / 4;
    debug_assert_eq!(packed.len(), r_rows * cols);
    let row_bytes = tq2::row_bytes(cols as u64) as usize;
    let mut out = vec![0u8; out_rows * row_bytes];
    out.par_chunks_mut(row_bytes)
        .enumerate()
        .try_for_each(|(o, dst)| {
            let (i, r) = (o / r_rows, o % r_rows);
            let src = &packed[r * cols..(r + 1) * cols];
            let shift = 2 * i as u32;
            for (b, block) in dst.chunks_exact_mut(BLOCK_BYTES).enumerate() {
                let base = b * BLOCK_COLS;
                for (j, byte) in block.iter_mut().enumerate() {
                    let mut v = 0u8;
                    for k in 0..4 {
                        let c = base + j + 32 * k;
                        let code = if c < cols { (src[c] >> shift) & 3 } else { 1 };
                        v |= code << (2 * k);
                    }
                    *byte = v;
                }
            }
            match tq2::find_invalid(dst, cols) {
                Some(col) => Err((o as u64, col as u64)),
                None => Ok(()),
            }
        })?;
    Ok(out)
}

/// Converts float master bytes of `dtype` to f32, or says which element is not finite.
pub fn to_f32(bytes: &[u8], dtype: Dtype) -> Result<Vec<f32>, String> {
    let v: Vec<f32> = match dtype {
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        other => return Err(format!("dtype {other:?} is not a float type tern reads")),
    };
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(format!("element {i} is {} (NaN or infinite)", v[i]));
    }
    Ok(v)
}

/// transformers' `WeightQuant` (checkpoints.md §4.3): `sw = 1 / max(mean|w|, 1e-5)` in f32,
/// `t = clamp(round_half_even(w · sw), −1, 1)`. Returns TQ2 bytes and the scale `1 / sw`.
pub fn ternarize_masters(w: &[f32], rows: usize, cols: usize) -> (Vec<u8>, f32) {
    // The mean is accumulated in f64 and rounded once: the correctly rounded f32 mean.
    let sum: f64 = w
        .par_chunks(1 << 16)
        .map(|c| c.iter().map(|x| f64::from(x.abs())).sum::<f64>())
        .sum();
    let mean = (sum / w.len() as f64) as f32;
    let sw = 1.0f32 / mean.max(1e-5);
    let row_bytes = tq2::row_bytes(cols as u64) as usize;
    let mut out = vec![0u8; rows * row_bytes];
    out.par_chunks_mut(row_bytes)
        .zip(w.par_chunks(cols))
        .for_each_init(
            || vec![0i8; cols],
            |trits, (dst, src)| {
                for (t, &x) in trits.iter_mut().zip(src) {
                    *t = (x * sw).round_ties_even().clamp(-1.0, 1.0) as i8;
                }
                tq2::pack_row(trits, dst);
            },
        );
    (out, 1.0 / sw)
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
    if !(ws > 0.0) {
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

    /// The Hugging Face packing of checkpoints.md §3, written from its formula.
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
        // T[:,0] = [1,0,-1,1,0,-1,1,0], R = 2 → P[0,0] = 0b10_01_00_10.
        let col = [1i8, 0, -1, 1, 0, -1, 1, 0];
        assert_eq!(hf_pack(&col, 8, 1)[0], 0b10_01_00_10);
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
        // mean|w| = 1 → sw = 1: 0.5 → 0, 1.5 → 2 → clamp 1, -0.5 → -0, -1.5 → -1.
        let w = [0.5f32, 1.5, -0.5, -1.5, 0.25, -0.75, 1.25, -0.0];
        let mean: f32 = w.iter().map(|x| x.abs()).sum::<f32>() / 8.0;
        assert_eq!(mean, 0.78125);
        let (tq, scale) = ternarize_masters(&w, 1, 8);
        assert_eq!(scale, 1.0 / (1.0 / mean));
        let mut t = vec![0i8; 8];
        tq2::unpack_row(&tq, &mut t).unwrap();
        let sw = 1.0 / mean;
        let want: Vec<i8> = w
            .iter()
            .map(|x| (x * sw).round_ties_even().clamp(-1.0, 1.0) as i8)
            .collect();
        assert_eq!(t, want);
        assert_eq!(&t[..4], &[1, 1, -1, -1]); // 0.64 → 1, 1.92 → 1 (clamped)
    }

    #[test]
    fn zero_masters_give_zero_trits() {
        let (tq, scale) = ternarize_masters(&[0.0; 4], 1, 4);
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
