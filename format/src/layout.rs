use crate::TensorProblem;

/// How a tensor's bytes encode its values (docs/format.md §6). Ids are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    F32,
    F16,
    Bf16,
    /// 2-bit ternary codes in 128-column blocks (docs/format.md §6.1).
    Tq2,
}

impl Layout {
    pub const ALL: [Layout; 4] = [Layout::F32, Layout::F16, Layout::Bf16, Layout::Tq2];

    pub fn id(self) -> u16 {
        match self {
            Layout::F32 => 0,
            Layout::F16 => 1,
            Layout::Bf16 => 2,
            Layout::Tq2 => 16,
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
        }
    }

    pub fn is_ternary(self) -> bool {
        matches!(self, Layout::Tq2)
    }

    pub fn is_float(self) -> bool {
        matches!(self, Layout::F32 | Layout::F16 | Layout::Bf16)
    }

    /// Storage bits per value, for reports.
    pub fn bits_per_value(self) -> f64 {
        match self {
            Layout::F32 => 32.0,
            Layout::F16 | Layout::Bf16 => 16.0,
            Layout::Tq2 => 2.0,
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
            Layout::Tq2 => {
                let [rows, cols] = shape else {
                    return Err(TensorProblem::NotAMatrix(shape.len()));
                };
                rows.checked_mul(crate::tq2::row_bytes(*cols))
                    .ok_or(TensorProblem::SizeOverflow)
            }
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
