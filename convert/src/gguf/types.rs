//! ggml tensor types: sizes of every type a GGUF header may name, and the codecs of the
//! ones tern reads (F32, F16, BF16, Q8_0, Q6_K; ternary I2_S, TQ1_0, TQ2_0) and writes
//! (I2_S, TQ1_0, TQ2_0, F16, F32). Bit layouts: docs/gguf.md.

use half::{bf16, f16};

/// A ggml tensor type. Ids are ggml's; 36 is I2_S in bitnet.cpp's fork (a retired id in
/// mainline llama.cpp).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GgmlType(pub u32);

/// (id, name, elements per block, bytes per block); I2_S is special-cased.
const TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (36, "I2_S", 1, 0),
    (39, "MXFP4", 32, 17),
];

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const Q6_K: GgmlType = GgmlType(14);
    pub const BF16: GgmlType = GgmlType(30);
    pub const TQ1_0: GgmlType = GgmlType(34);
    pub const TQ2_0: GgmlType = GgmlType(35);
    pub const I2_S: GgmlType = GgmlType(36);

    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().any(|t| t.0 == id).then_some(GgmlType(id))
    }

    fn entry(self) -> &'static (u32, &'static str, u64, u64) {
        TYPES
            .iter()
            .find(|t| t.0 == self.0)
            .expect("GgmlType values come from the table")
    }

    pub fn name(self) -> &'static str {
        self.entry().1
    }

    /// Elements per block.
    pub fn block_elems(self) -> u64 {
        self.entry().2
    }

    /// Whether tern can import tensors of this type.
    pub fn is_ternary(self) -> bool {
        matches!(self, GgmlType::I2_S | GgmlType::TQ1_0 | GgmlType::TQ2_0)
    }

    /// Byte length of a tensor of shape `ne`, with checked arithmetic; I2_S is `n/4` bytes
    /// of codes then 32 bytes holding the f32 scale and 28 bytes of padding.
    pub fn byte_len(self, ne: &[u64]) -> Result<u64, String> {
        let n = ne
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or("element count overflows")?;
        let &(_, _, block, bytes) = self.entry();
        if self == GgmlType::I2_S {
            if !n.is_multiple_of(4) {
                return Err(format!("{n} elements is not a multiple of 4"));
            }
            return Ok(n / 4 + 32);
        }
        if !ne[0].is_multiple_of(block) {
            return Err(format!(
                "ne[0] = {} is not a multiple of the block size {block}",
                ne[0]
            ));
        }
        (n / block)
            .checked_mul(bytes)
            .ok_or("byte size overflows".into())
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The two I2_S block layouts bitnet.cpp writes, depending on the machine it was built for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum I2sLayout {
    /// x86 (`QK_I2_S = 128`): byte `p` of a 32-byte block holds elements p, p+32, p+64,
    /// p+96 in bits 7..6, 5..4, 3..2, 1..0.
    #[default]
    X86,
    /// ARM NEON (`QK_I2_S = 64`): byte `p` of a 16-byte block holds elements p, p+16,
    /// p+32, p+48 in bits 7..6, 5..4, 3..2, 1..0.
    Arm,
}

impl I2sLayout {
    fn block(self) -> usize {
        match self {
            I2sLayout::X86 => 128,
            I2sLayout::Arm => 64,
        }
    }

    pub fn other(self) -> I2sLayout {
        match self {
            I2sLayout::X86 => I2sLayout::Arm,
            I2sLayout::Arm => I2sLayout::X86,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            I2sLayout::X86 => "x86",
            I2sLayout::Arm => "arm",
        }
    }
}

/// Byte index and bit shift of element `e` in I2_S data.
#[inline]
fn i2s_position(layout: I2sLayout, e: usize) -> (usize, u32) {
    let block = layout.block();
    let group = block / 4;
    let (b, j) = (e / block, e % block);
    (b * group + j % group, 6 - 2 * (j / group) as u32)
}

/// Ternary values decoded from a GGUF tensor: trits row-major (`ne[1]` rows of `ne[0]`),
/// and the scales the format stores (one for I2_S, one per 256-element block for TQ*).
pub struct Decoded {
    pub trits: Vec<i8>,
    pub scales: Vec<f32>,
}

/// Decodes I2_S data of `n` elements. Err: the first element holding code 3 (which the
/// quantizer never writes and the engine's kernels would read as +2).
pub fn decode_i2s(data: &[u8], n: usize, layout: I2sLayout) -> Result<Decoded, String> {
    if !n.is_multiple_of(layout.block()) {
        return Err(format!(
            "{n} elements is not a multiple of the {}-element I2_S block of the {} layout",
            layout.block(),
            layout.name()
        ));
    }
    let mut trits = vec![0i8; n];
    for (e, t) in trits.iter_mut().enumerate() {
        let (byte, shift) = i2s_position(layout, e);
        let code = (data[byte] >> shift) & 3;
        if code == 3 {
            return Err(format!("element {e} holds the invalid code 3"));
        }
        *t = code as i8 - 1;
    }
    let s = f32::from_le_bytes(data[n / 4..n / 4 + 4].try_into().expect("4 bytes"));
    Ok(Decoded {
        trits,
        scales: vec![s],
    })
}

/// Encodes trits (row-major, `n` a multiple of the block) as I2_S with its f32 scale and
/// 28 zero bytes of padding.
pub fn encode_i2s(trits: &[i8], scale: f32, layout: I2sLayout) -> Vec<u8> {
    let n = trits.len();
    let mut out = vec![0u8; n / 4 + 32];
    for (e, &t) in trits.iter().enumerate() {
        let (byte, shift) = i2s_position(layout, e);
        out[byte] |= ((t + 1) as u8) << shift;
    }
    out[n / 4..n / 4 + 4].copy_from_slice(&scale.to_le_bytes());
    out
}

const QK: usize = 256;
const TQ2_BYTES: usize = 66;
const TQ1_BYTES: usize = 54;

/// Decodes TQ2_0 blocks: `qs[64]` then fp16 `d`; byte `32h + m` holds elements
/// `128h + m + 32l` in bits `2l+1..2l`. Err: the first element holding code 3.
pub fn decode_tq2(data: &[u8]) -> Result<Decoded, String> {
    let blocks = data.len() / TQ2_BYTES;
    let mut trits = vec![0i8; blocks * QK];
    let mut scales = Vec::with_capacity(blocks);
    for (b, (block, out)) in data
        .chunks_exact(TQ2_BYTES)
        .zip(trits.chunks_exact_mut(QK))
        .enumerate()
    {
        for (e, t) in out.iter_mut().enumerate() {
            let (h, l, m) = (e / 128, (e % 128) / 32, e % 32);
            let code = (block[32 * h + m] >> (2 * l)) & 3;
            if code == 3 {
                return Err(format!("element {} holds the invalid code 3", b * QK + e));
            }
            *t = code as i8 - 1;
        }
        scales.push(f16::from_le_bytes([block[64], block[65]]).to_f32());
    }
    Ok(Decoded { trits, scales })
}

/// Encodes trits (a multiple of 256) as TQ2_0 with one fp16 `d` for every block.
pub fn encode_tq2(trits: &[i8], d: f16) -> Vec<u8> {
    let mut out = vec![0u8; trits.len() / QK * TQ2_BYTES];
    for (block, src) in out.chunks_exact_mut(TQ2_BYTES).zip(trits.chunks_exact(QK)) {
        for (e, &t) in src.iter().enumerate() {
            let (h, l, m) = (e / 128, (e % 128) / 32, e % 32);
            block[32 * h + m] |= ((t + 1) as u8) << (2 * l);
        }
        block[64..66].copy_from_slice(&d.to_le_bytes());
    }
    out
}

/// Where element `e` of a TQ1_0 block lives: (byte, base-3 digit, 0 = most significant).
/// `qs[m]` (m < 32): elements m + 32n, n < 5; `qs[32 + m]` (m < 16): 160 + m + 16n;
/// `qh[j]` (bytes 48..52): 240 + j + 4n, n < 4, the fifth digit 0.
#[inline]
fn tq1_position(e: usize) -> (usize, u32) {
    if e < 160 {
        (e % 32, (e / 32) as u32)
    } else if e < 240 {
        (32 + (e - 160) % 16, ((e - 160) / 16) as u32)
    } else {
        (48 + (e - 240) % 4, ((e - 240) / 4) as u32)
    }
}

/// Decodes TQ1_0 blocks (`qs[48]`, `qh[4]`, fp16 `d`) the way ggml does: digit `n` of a
/// byte `q` is `((q · 3^n) mod 256) · 3 >> 8`, so every byte decodes to trits.
pub fn decode_tq1(data: &[u8]) -> Decoded {
    let blocks = data.len() / TQ1_BYTES;
    let mut trits = vec![0i8; blocks * QK];
    let mut scales = Vec::with_capacity(blocks);
    for (block, out) in data.chunks_exact(TQ1_BYTES).zip(trits.chunks_exact_mut(QK)) {
        for (e, t) in out.iter_mut().enumerate() {
            let (byte, digit) = tq1_position(e);
            *t = tern_format::tq1::digit(block[byte], digit) as i8 - 1;
        }
        scales.push(f16::from_le_bytes([block[52], block[53]]).to_f32());
    }
    Decoded { trits, scales }
}

/// Encodes trits (a multiple of 256) as TQ1_0, as ggml's `quantize_row_tq1_0_ref` does.
pub fn encode_tq1(trits: &[i8], d: f16) -> Vec<u8> {
    let mut out = vec![0u8; trits.len() / QK * TQ1_BYTES];
    for (block, src) in out.chunks_exact_mut(TQ1_BYTES).zip(trits.chunks_exact(QK)) {
        let mut values = [0u8; 52];
        for (e, &t) in src.iter().enumerate() {
            let (byte, digit) = tq1_position(e);
            values[byte] += (t + 1) as u8 * 3u8.pow(4 - digit);
        }
        for (o, v) in block.iter_mut().zip(values) {
            *o = tern_format::tq1::encode(v);
        }
        block[52..54].copy_from_slice(&d.to_le_bytes());
    }
    out
}

/// Dequantizes a float or quantized tensor to f32 exactly as ggml's `dequantize_row_*`
/// computes it (F32, F16, BF16, Q8_0, Q6_K); None for other types.
pub fn dequantize(ty: GgmlType, data: &[u8]) -> Option<Vec<f32>> {
    Some(match ty {
        GgmlType::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgmlType::F16 => data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgmlType::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgmlType::Q8_0 => data
            .chunks_exact(34)
            .flat_map(|b| {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                b[2..].iter().map(move |&q| d * f32::from(q as i8))
            })
            .collect(),
        GgmlType::Q6_K => {
            let mut out = Vec::with_capacity(data.len() / 210 * QK);
            for b in data.chunks_exact(210) {
                let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
                let d = f16::from_le_bytes([b[208], b[209]]).to_f32();
                let mut y = [0f32; QK];
                for half in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
                    let y = &mut y[128 * half..];
                    for l in 0..32 {
                        let is = l / 16;
                        let q = |low: u8, shift: u32| {
                            f32::from((low | ((qh[l] >> shift) & 3) << 4) as i8 - 32)
                        };
                        let s = |k: usize| d * f32::from(sc[is + k] as i8);
                        y[l] = s(0) * q(ql[l] & 0xF, 0);
                        y[l + 32] = s(2) * q(ql[l + 32] & 0xF, 2);
                        y[l + 64] = s(4) * q(ql[l] >> 4, 4);
                        y[l + 96] = s(6) * q(ql[l + 32] >> 4, 6);
                    }
                }
                out.extend_from_slice(&y);
            }
            out
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trits(n: usize, seed: u32) -> Vec<i8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(1664525).wrapping_add(1013904223);
                ((x >> 24) % 3) as i8 - 1
            })
            .collect()
    }

    #[test]
    fn ternary_codecs_round_trip() {
        let t = trits(1024, 7);
        for layout in [I2sLayout::X86, I2sLayout::Arm] {
            let bytes = encode_i2s(&t, 0.25, layout);
            let d = decode_i2s(&bytes, t.len(), layout).unwrap();
            assert_eq!((d.trits, d.scales), (t.clone(), vec![0.25]));
        }
        let d = f16::from_f32(0.015_9);
        let tq2 = decode_tq2(&encode_tq2(&t, d)).unwrap();
        assert_eq!(tq2.trits, t);
        assert_eq!(tq2.scales, vec![d.to_f32(); 4]);
        let tq1 = decode_tq1(&encode_tq1(&t, d));
        assert_eq!(tq1.trits, t);
    }

    /// The worked examples of the vectors' README (first bytes of blk.0.attn_q).
    #[test]
    fn engine_bytes_decode_to_the_documented_trits() {
        let mut i2s = vec![0u8; 128 / 4 + 32];
        i2s[0] = 0x18;
        i2s[1] = 0x90;
        let d = decode_i2s(&i2s, 128, I2sLayout::X86).unwrap();
        assert_eq!(
            [d.trits[0], d.trits[32], d.trits[64], d.trits[96]],
            [-1, 0, 1, -1]
        );
        assert_eq!(
            [d.trits[1], d.trits[33], d.trits[65], d.trits[97]],
            [1, 0, -1, -1]
        );
        let mut tq2 = vec![0x55u8; 66];
        tq2[0] = 0x24;
        let d = decode_tq2(&tq2).unwrap();
        assert_eq!(
            [d.trits[0], d.trits[32], d.trits[64], d.trits[96]],
            [-1, 0, 1, -1]
        );
        let mut tq1 = vec![0u8; 54];
        tq1[0] = 0x31;
        let d = decode_tq1(&tq1);
        assert_eq!(&d.trits[..1], &[-1]);
        assert_eq!(
            [d.trits[32], d.trits[64], d.trits[96], d.trits[128]],
            [0, 1, -1, 0]
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(GgmlType::I2_S.byte_len(&[256, 256]), Ok(16416));
        assert_eq!(GgmlType::TQ2_0.byte_len(&[256, 128]), Ok(8448));
        assert_eq!(GgmlType::TQ1_0.byte_len(&[256, 768]), Ok(41472));
        assert_eq!(GgmlType::Q6_K.byte_len(&[256, 1024]), Ok(215040));
        assert!(GgmlType::TQ2_0.byte_len(&[100, 2]).is_err());
        assert!(GgmlType::F32.byte_len(&[u64::MAX, 2]).is_err());
    }
}
