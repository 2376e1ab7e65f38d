//! The TQ1 layout (docs/format.md §6.3): 5 trits per byte in base 3, 1.6 bits per weight.
//!
//! Each row is cut into 160-column blocks of 32 bytes; byte `j` of a block holds columns
//! `j + 32i` (i = 0..5) as the base-3 digit `d_i = t + 1`, digit 0 most significant:
//! `v = Σ d_i · 3^(4−i)` ∈ [0, 242]. The byte stores `ceil(v · 256 / 243)`, which turns
//! "digit i" into two u8 multiplies: `d_i = ((byte · 3^i) mod 256) · 3 >> 8`. Padding
//! columns hold trit 0 (digit 1). Only the 243 images of `v` are valid bytes.

/// Columns per block.
pub const BLOCK_COLS: usize = 160;
/// Bytes per block.
pub const BLOCK_BYTES: usize = 32;
/// Trits per byte.
pub const DIGITS: usize = 5;

/// Number of 160-column blocks in a row of `cols` columns.
pub fn blocks(cols: u64) -> u64 {
    cols.div_ceil(BLOCK_COLS as u64)
}

/// Bytes of one packed row of `cols` columns.
pub fn row_bytes(cols: u64) -> u64 {
    blocks(cols) * BLOCK_BYTES as u64
}

/// The stored byte of the base-3 number `v` (0..=242): `ceil(v · 256 / 243)`.
pub const fn encode(v: u8) -> u8 {
    ((v as u32 * 256).div_ceil(243)) as u8
}

/// Digit `i` (0..5, 0 = most significant) of a stored byte: `((b · 3^i) mod 256) · 3 >> 8`.
/// This is exactly what the SIMD kernels compute, for every byte value, valid or not.
#[inline]
pub const fn digit(byte: u8, i: u32) -> u8 {
    let m = byte.wrapping_mul(3u8.pow(i));
    ((m as u16 * 3) >> 8) as u8
}

/// `VALID[b]`: whether `b` is the encoding of some `v` in 0..=242 (13 byte values are not).
pub const VALID: [bool; 256] = {
    let mut t = [false; 256];
    let mut v = 0;
    while v < 243 {
        t[encode(v as u8) as usize] = true;
        v += 1;
    }
    t
};

/// The byte of a block that packs digits `d[0..5]` (each 0, 1 or 2).
pub fn pack_digits(d: [u8; 5]) -> u8 {
    encode(d.iter().fold(0u8, |v, &di| v * 3 + di))
}

/// Byte index within a row and digit index of column `c`.
#[inline]
pub fn position(c: usize) -> (usize, u32) {
    let block = c / BLOCK_COLS;
    let within = c % BLOCK_COLS;
    (
        block * BLOCK_BYTES + within % BLOCK_BYTES,
        (within / BLOCK_BYTES) as u32,
    )
}

/// Packs one row of trits (each −1, 0 or +1) into `out`, which must be
/// `row_bytes(trits.len())` long. Padding columns hold trit 0.
///
/// # Panics
/// If `out` has the wrong length or a value is outside {−1, 0, 1}: both are caller bugs.
pub fn pack_row(trits: &[i8], out: &mut [u8]) {
    assert_eq!(
        out.len() as u64,
        row_bytes(trits.len() as u64),
        "TQ1 row length"
    );
    let digit_of = |c: usize| match trits.get(c) {
        Some(&t) => {
            assert!((-1..=1).contains(&t), "trit out of range: {t}");
            (t + 1) as u8
        }
        None => 1, // padding: trit 0
    };
    for (b, block) in out.chunks_exact_mut(BLOCK_BYTES).enumerate() {
        for (j, byte) in block.iter_mut().enumerate() {
            let base = b * BLOCK_COLS + j;
            *byte = pack_digits(std::array::from_fn(|i| digit_of(base + 32 * i)));
        }
    }
}

/// Decodes one packed row into `out` (`out.len()` = the row's column count). Returns the
/// first column (in column order) whose byte is invalid as an error.
pub fn unpack_row(bytes: &[u8], out: &mut [i8]) -> Result<(), usize> {
    debug_assert_eq!(bytes.len() as u64, row_bytes(out.len() as u64));
    for (c, t) in out.iter_mut().enumerate() {
        let (byte, i) = position(c);
        let b = bytes[byte];
        if !VALID[b as usize] {
            return Err(c);
        }
        *t = digit(b, i) as i8 - 1;
    }
    Ok(())
}

/// Finds the first column, in column order and padding included, that is stored in an
/// invalid byte, or (for a padding column ≥ `cols`) holds a trit other than 0.
pub fn find_invalid(bytes: &[u8], cols: usize) -> Option<usize> {
    let total = bytes.len() / BLOCK_BYTES * BLOCK_COLS;
    (0..total).find(|&c| {
        let (byte, i) = position(c);
        let b = bytes[byte];
        !VALID[b as usize] || (c >= cols && digit(b, i) != 1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_round_trips_through_the_digit_formula() {
        let mut seen = std::collections::HashSet::new();
        for v in 0..243u32 {
            let b = encode(v as u8);
            assert!(seen.insert(b), "two values share byte {b}");
            assert!(VALID[b as usize]);
            for i in 0..5 {
                let want = (v / 3u32.pow(4 - i)) % 3;
                assert_eq!(u32::from(digit(b, i)), want, "v {v}, digit {i}");
                // The formula of the spec, spelled out in u32 arithmetic.
                let spec = (((b as u32 * 3u32.pow(i)) & 0xFF) * 3) >> 8;
                assert_eq!(spec, want);
            }
        }
        assert_eq!(VALID.iter().filter(|&&v| v).count(), 243);
        assert_eq!((encode(0), encode(1), encode(242)), (0, 2, 255));
        // The 13 byte values that are no encoding (listed in docs/format.md §6.3).
        let invalid: Vec<u8> = (0..=255u8).filter(|&b| !VALID[b as usize]).collect();
        assert_eq!(
            invalid,
            [1, 20, 40, 60, 79, 99, 119, 138, 158, 178, 197, 217, 237]
        );
    }

    #[test]
    fn worked_example_from_the_spec() {
        let trits: Vec<i8> = (0..170).map(|c| (c % 3) as i8 - 1).collect();
        let mut row = vec![0u8; row_bytes(170) as usize];
        pack_row(&trits, &mut row);
        assert_eq!(row.len(), 64);
        // Byte 0: columns 0, 32, 64, 96, 128 → trits −1, +1, 0, −1, +1 → digits 0,2,1,0,2
        // → v = 0·81 + 2·27 + 1·9 + 0·3 + 2 = 65 → ceil(65·256/243) = 69 = 0x45.
        assert_eq!(row[0], 0x45);
        // Byte 1: columns 1, 33, 65, 97, 129 → digits 1,0,2,1,0 → v = 81+18+3 = 102
        // → ceil(102·256/243) = 108 = 0x6C.
        assert_eq!(row[1], 0x6C);
        // Block 1: columns 160..170 in digit 0 of bytes 0..10, everything else padding.
        // Byte 32: column 160 → trit (160 mod 3) − 1 = 0 → digits 1,1,1,1,1 → v = 121 → 0x80.
        assert_eq!(row[32], 0x80);
        // Byte 33: column 161 → trit +1 → digits 2,1,1,1,1 → v = 202 → ceil(202·256/243) = 213.
        assert_eq!(row[33], 0xD5);
        // Byte 34: column 162 → trit −1 → digits 0,1,1,1,1 → v = 40 → 43 = 0x2B.
        assert_eq!(row[34], 0x2B);
        assert!(row[42..].iter().all(|&b| b == 0x80));
        let mut back = vec![0i8; 170];
        unpack_row(&row, &mut back).unwrap();
        assert_eq!(back, trits);
        assert_eq!(find_invalid(&row, 170), None);
    }

    #[test]
    fn invalid_bytes_and_bad_padding_are_found() {
        let mut row = vec![0x80u8; 64];
        row[33] = 20; // not an encoding: holds columns 161, 193, 225, 257, 289
        assert_eq!(find_invalid(&row, 300), Some(161));
        let mut out = vec![0i8; 300];
        assert_eq!(unpack_row(&row, &mut out), Err(161));
        let mut row = vec![0x80u8; 32];
        row[31] = pack_digits([1, 1, 1, 1, 2]); // column 159 = +1, but only 100 columns
        assert_eq!(find_invalid(&row, 100), Some(159));
        assert_eq!(find_invalid(&row, 160), None);
    }

    #[test]
    fn random_rows_round_trip() {
        use rand::{rngs::SmallRng, Rng, SeedableRng};
        let mut rng = SmallRng::seed_from_u64(0);
        for cols in [1usize, 31, 32, 159, 160, 161, 320, 700, 2560] {
            let trits: Vec<i8> = (0..cols).map(|_| rng.random_range(-1..=1)).collect();
            let mut row = vec![0u8; row_bytes(cols as u64) as usize];
            pack_row(&trits, &mut row);
            let mut back = vec![0i8; cols];
            unpack_row(&row, &mut back).unwrap();
            assert_eq!(back, trits);
            assert_eq!(find_invalid(&row, cols), None);
        }
    }
}
