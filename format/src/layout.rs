use crate::TensorProblem;

/// How a tensor's bytes encode its values (docs/format.md §6). Ids are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    F32,
    F16,
    Bf16,
    /// 2-bit ternary codes in 128-column blocks (docs/format.md §6.1).
    Tq2,
    /// Base-3 ternary, 5 trits per byte, 160-column blocks (docs/format.md §6.3).
    Tq1,
    /// int8 with one f32 scale per row, for embeddings and the head (docs/format.md §6.4).
    Q8Row,
}

impl Layout {
    pub const ALL: [Layout; 6] = [
        Layout::F32,
        Layout::F16,
        Layout::Bf16,
        Layout::Tq2,
        Layout::Tq1,
        Layout::Q8Row,
    ];

    pub fn id(self) -> u16 {
        match self {
            Layout::F32 => 0,
            Layout::F16 => 1,
            Layout::Bf16 => 2,
            Layout::Tq2 => 16,
            Layout::Tq1 => 17,
            Layout::Q8Row => 32,
        }
    }

    /// The minor format version that introduced this layout: a file holding it must say at
    /// least this minor (docs/format.md §2.1, §8).
    pub fn since_minor(self) -> u16 {
        match self {
            Layout::F32 | Layout::F16 | Layout::Bf16 | Layout::Tq2 => 0,
            Layout::Tq1 | Layout::Q8Row => 1,
        }
    }

    pub fn from_id(id: u16) -> Option<Layout> {
        Layout::ALL.into_iter().find(|l| l.id() == id)
    }

    pub fn name(self) -> &'static str {
        match self {
            Layout::F32 => "F32",
            Layout::F16 => "F16",
            Layout::Bf16 => "BF16",
            Layout::Tq2 => "TQ2",
            Layout::Tq1 => "TQ1",
            Layout::Q8Row => "Q8_ROW",
        }
    }

    pub fn is_ternary(self) -> bool {
        matches!(self, Layout::Tq2 | Layout::Tq1)
    }

    pub fn is_float(self) -> bool {
        matches!(self, Layout::F32 | Layout::F16 | Layout::Bf16)
    }

    /// Layouts whose directory scale must be exactly 1.0: floats, and Q8_ROW (whose scales
    /// are per row, in the data).
    pub fn unit_scale(self) -> bool {
        self.is_float() || self == Layout::Q8Row
    }

    /// Bytes of one packed row of `cols` trits, for the ternary layouts.
    pub fn ternary_row_bytes(self, cols: u64) -> Option<u64> {
        match self {
            Layout::Tq2 => Some(crate::tq2::row_bytes(cols)),
            Layout::Tq1 => Some(crate::tq1::row_bytes(cols)),
            _ => None,
        }
    }

    /// Decodes one packed row of a ternary layout into `out` (`out.len()` = cols); `Err`
    /// gives the first column holding an invalid code.
    ///
    /// # Panics
    /// If `self` is not a ternary layout.
    pub fn unpack_ternary_row(self, bytes: &[u8], out: &mut [i8]) -> Result<(), usize> {
        match self {
            Layout::Tq2 => crate::tq2::unpack_row(bytes, out),
            Layout::Tq1 => crate::tq1::unpack_row(bytes, out),
            other => panic!("{other} is not a ternary layout"),
        }
    }

    /// Packs one row of trits; `out.len()` must be `ternary_row_bytes(trits.len())`.
    ///
    /// # Panics
    /// If `self` is not a ternary layout, or on a length or trit error.
    pub fn pack_ternary_row(self, trits: &[i8], out: &mut [u8]) {
        match self {
            Layout::Tq2 => crate::tq2::pack_row(trits, out),
            Layout::Tq1 => crate::tq1::pack_row(trits, out),
            other => panic!("{other} is not a ternary layout"),
        }
    }

    /// Storage bits per value, for reports.
    pub fn bits_per_value(self) -> f64 {
        match self {
            Layout::F32 => 32.0,
            Layout::F16 | Layout::Bf16 => 16.0,
            Layout::Tq2 => 2.0,
            Layout::Tq1 => 1.6,
            Layout::Q8Row => 8.0,
        }
    }

    /// Exact byte length of a tensor of this layout and shape, with checked arithmetic.
    pub fn byte_len(self, shape: &[u64]) -> Result<u64, TensorProblem> {
        let elems = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or(TensorProblem::SizeOverflow)?;
        match self {
            Layout::F32 => elems.checked_mul(4).ok_or(TensorProblem::SizeOverflow),
            Layout::F16 | Layout::Bf16 => elems.checked_mul(2).ok_or(TensorProblem::SizeOverflow),
            Layout::Tq2 | Layout::Tq1 | Layout::Q8Row => {
                let [rows, cols] = shape else {
                    return Err(TensorProblem::NotAMatrix(shape.len()));
                };
                // cols ≤ 2^32 (validated dims), so the row sizes cannot overflow.
                let row = match self {
                    Layout::Tq2 => crate::tq2::row_bytes(*cols),
                    Layout::Tq1 => crate::tq1::row_bytes(*cols),
                    _ => crate::q8row::row_stride(*cols),
                };
                rows.checked_mul(row).ok_or(TensorProblem::SizeOverflow)
            }
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
