//! The TQ2 layout (docs/format.md §6.1): each row is cut into 128-column blocks of 32 bytes;
//! byte `j` of a block holds columns `j + 32i` (i = 0..4) in bits `2i+1:2i`, as the code
//! `trit + 1`. Padding columns hold code 1 (trit 0). Code 3 is invalid.

/// Columns per block.
pub const BLOCK_COLS: usize = 128;
/// Bytes per block.
pub const BLOCK_BYTES: usize = 32;

/// Number of 128-column blocks in a row of `cols` columns.
pub fn blocks(cols: u64) -> u64 {
    cols.div_ceil(BLOCK_COLS as u64)
}

/// Bytes of one packed row of `cols` columns.
pub fn row_bytes(cols: u64) -> u64 {
    blocks(cols) * BLOCK_BYTES as u64
}

/// Packs one row of trits (each −1, 0 or +1) into `out`, which must be
/// `row_bytes(trits.len())` long.
///
/// # Panics
/// If `out` has the wrong length or a value is outside {−1, 0, 1}: both are caller bugs.
pub fn pack_row(trits: &[i8], out: &mut [u8]) {
    assert_eq!(
        out.len() as u64,
        row_bytes(trits.len() as u64),
        "TQ2 row length"
    );
    out.fill(0x55); // four code-1 (zero) fields: the padding value
    for (c, &t) in trits.iter().enumerate() {
        assert!(
            (-1..=1).contains(&t),
            "value {t} at column {c} is not a trit"
        );
        let (byte, shift) = position(c);
        let code = (t + 1) as u8;
        out[byte] = (out[byte] & !(3 << shift)) | (code << shift);
    }
}

/// Decodes one packed row into `out` (`out.len()` = the row's column count). Returns the
/// first column holding the invalid code 3 as an error.
pub fn unpack_row(bytes: &[u8], out: &mut [i8]) -> Result<(), usize> {
    debug_assert_eq!(bytes.len() as u64, row_bytes(out.len() as u64));
    for (c, t) in out.iter_mut().enumerate() {
        let (byte, shift) = position(c);
        let code = (bytes[byte] >> shift) & 3;
        if code == 3 {
            return Err(c);
        }
        *t = code as i8 - 1;
    }
    Ok(())
}

/// Finds the first invalid code in a packed row of `cols` columns, padding included
/// (padding must be code 1). Returns the column index (≥ cols for padding).
pub fn find_invalid(bytes: &[u8], cols: usize) -> Option<usize> {
    // A byte holds an invalid code iff some 2-bit field is 0b11.
    let bad = bytes.iter().position(|&b| (b & (b >> 1) & 0x55) != 0);
    let padding_ok = || {
        let total = bytes.len() / BLOCK_BYTES * BLOCK_COLS;
        (cols..total).find(|&c| {
            let (byte, shift) = position(c);
            (bytes[byte] >> shift) & 3 != 1
        })
    };
    match bad {
        Some(i) => {
            let shift = (0..4).find(|s| (bytes[i] >> (2 * s)) & 3 == 3).unwrap_or(0);
            Some(i / BLOCK_BYTES * BLOCK_COLS + shift * 32 + i % BLOCK_BYTES)
        }
        None => padding_ok(),
    }
}

/// Byte index within a row and bit shift of column `c`.
#[inline]
pub fn position(c: usize) -> (usize, u32) {
    let block = c / BLOCK_COLS;
    let within = c % BLOCK_COLS;
    (
        block * BLOCK_BYTES + within % BLOCK_BYTES,
        2 * (within / BLOCK_BYTES) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worked_example_from_the_spec() {
        let trits: Vec<i8> = (0..130).map(|c| (c % 3) as i8 - 1).collect();
        let mut row = vec![0u8; row_bytes(130) as usize];
        pack_row(&trits, &mut row);
        assert_eq!(row.len(), 64);
        assert_eq!(row[0], 0x18);
        assert_eq!(row[1], 0x61);
        assert_eq!(row[32], 0x56);
        assert_eq!(row[33], 0x54);
        assert!(row[34..].iter().all(|&b| b == 0x55));
        let mut back = vec![0i8; 130];
        unpack_row(&row, &mut back).unwrap();
        assert_eq!(back, trits);
        assert_eq!(find_invalid(&row, 130), None);
    }

    #[test]
    fn code_three_is_found() {
        let mut row = vec![0x55u8; 64];
        row[33] = 0b0101_1101; // bits 3:2 of byte 1 of block 1: column 128 + 32 + 1
        let col = find_invalid(&row, 200).unwrap();
        assert_eq!(col, 161);
        let mut out = vec![0i8; 200];
        assert_eq!(unpack_row(&row, &mut out), Err(col));
    }

    #[test]
    fn bad_padding_is_found() {
        let mut row = vec![0x55u8; 32];
        row[31] = 0x15; // column 127 holds code 0, but only 100 columns exist
        assert_eq!(find_invalid(&row, 100), Some(127));
        assert_eq!(find_invalid(&row, 128), None);
    }
}
