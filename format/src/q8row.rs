//! The Q8_ROW layout (docs/format.md §6.4): an `[rows, cols]` float matrix (embeddings, the
//! output head) as int8 with one f32 scale per row. Each row is one record
//! `[f32 scale][cols × i8][zero padding to a multiple of 4 bytes]`, so a row is read (or
//! converted) in one sequential pass and every record starts 4-byte aligned.
//! Value = scale × int8.

/// Bytes of one row record: `4 + ceil(cols / 4) · 4`.
pub fn row_stride(cols: u64) -> u64 {
    4 + cols.div_ceil(4) * 4
}

/// The scale of a row record.
#[inline]
pub fn row_scale(record: &[u8]) -> f32 {
    f32::from_le_bytes([record[0], record[1], record[2], record[3]])
}

/// Symmetric absmax quantization of one row into its record (`out.len() ==
/// row_stride(w.len())`): `scale = max|w| / 127` in f32, `q = clamp(round_half_even(w /
/// scale), −127, 127)`; an all-zero row gets scale 0 and zeros. `w` must be finite.
pub fn quantize_row(w: &[f32], out: &mut [u8]) {
    assert_eq!(
        out.len() as u64,
        row_stride(w.len() as u64),
        "Q8_ROW record length"
    );
    let max = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = max / 127.0;
    out[..4].copy_from_slice(&scale.to_le_bytes());
    for (o, &v) in out[4..].iter_mut().zip(w) {
        let q = if scale > 0.0 {
            (v / scale).round_ties_even().clamp(-127.0, 127.0) as i8
        } else {
            0
        };
        *o = q as u8;
    }
    out[4 + w.len()..].fill(0);
}

/// Decodes one row record into `out` (`out.len()` = cols): `scale × q`.
pub fn dequantize_row(record: &[u8], out: &mut [f32]) {
    let scale = row_scale(record);
    for (o, &q) in out.iter_mut().zip(&record[4..]) {
        *o = scale * f32::from(q as i8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_layout_and_round_trip() {
        assert_eq!(row_stride(5), 12);
        assert_eq!(row_stride(8), 12);
        let w = [0.5f32, -1.27, 0.0, 0.01, 1.27];
        let mut rec = vec![0xAAu8; 12];
        quantize_row(&w, &mut rec);
        assert_eq!(row_scale(&rec), 1.27f32 / 127.0);
        assert_eq!(&rec[4..9], &[50u8, (-127i8) as u8, 0, 1, 127]);
        assert_eq!(&rec[9..], &[0, 0, 0]);
        let mut back = [0.0f32; 5];
        dequantize_row(&rec, &mut back);
        for (a, b) in w.iter().zip(back) {
            assert!((a - b).abs() <= 0.5 * row_scale(&rec) * 1.0001);
        }
        let mut zero = vec![0xAAu8; 8];
        quantize_row(&[0.0, -0.0], &mut zero);
        assert_eq!(zero, [0u8; 8]);
    }
}
