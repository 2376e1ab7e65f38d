use std::path::PathBuf;

/// An error reading or writing a `.tern` file: always names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The cause is the error's `source()`, not part of its message, so that a chain
    /// printed with `{:#}` names it once.
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: Problem },
    #[error("{}: {problem}", path.display())]
    Write { path: PathBuf, problem: String },
    /// The output exists and the writer was told not to replace it.
    #[error("{}: already exists", path.display())]
    Exists { path: PathBuf },
}

impl Error {
    /// The validation problem, if this is one.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            Error::Invalid { problem, .. } => Some(problem),
            _ => None,
        }
    }
}

/// What is wrong with a file's bytes (docs/format.md §7).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    #[error("truncated: the {what} needs bytes up to {needed}, the file has {available}")]
    Truncated {
        what: &'static str,
        needed: u64,
        available: u64,
    },
    #[error("{0}, not a regular file: refusing to read it")]
    NotRegularFile(&'static str),
    #[error("not a .tern file (bad magic bytes)")]
    BadMagic,
    #[error(
        "unsupported format version {major}.{minor}: this build reads major version {supported}"
    )]
    UnsupportedMajor {
        major: u16,
        minor: u16,
        supported: u16,
    },
    #[error("alignment {0} is not a power of two between 8 and 65536")]
    BadAlignment(u32),
    #[error("{section} section at offset {offset} (expected {expected}): sections must follow each other")]
    SectionOffset {
        section: &'static str,
        offset: u64,
        expected: u64,
    },
    #[error("{section} section is {len} bytes, more than the limit of {max}")]
    SectionTooLarge {
        section: &'static str,
        len: u64,
        max: u64,
    },
    #[error("header checksum mismatch (stored {stored:016x}, computed {computed:016x}): header, metadata, tokenizer or directory is damaged")]
    HeaderChecksum { stored: u64, computed: u64 },
    #[error("metadata is not valid UTF-8: {0}")]
    MetadataUtf8(String),
    #[error("metadata is not valid JSON for a .tern file: {0}")]
    MetadataJson(String),
    #[error("model config is invalid: {0}")]
    Config(String),
    #[error("tensor directory: {0}")]
    Directory(String),
    #[error("tensor name {0:?} appears twice")]
    DuplicateTensor(String),
    #[error("tensor {name:?}: {problem}")]
    Tensor {
        name: String,
        problem: TensorProblem,
    },
    #[error("tensors {first:?} and {second:?} overlap in the file")]
    Overlap { first: String, second: String },
    #[error("tensor {0:?} is required by the model config but missing")]
    MissingTensor(String),
    #[error("tensor {0:?} is not part of a model with this config")]
    UnexpectedTensor(String),
}

/// What is wrong with one tensor.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TensorProblem {
    #[error("name is empty, longer than 256 bytes or not UTF-8")]
    BadName,
    #[error("unknown layout id {0}")]
    UnknownLayout(u16),
    #[error("layout {layout} needs format version 1.{since}, but the file says 1.{minor}")]
    LayoutNewerThanFile {
        layout: &'static str,
        since: u16,
        minor: u16,
    },
    #[error("{0} dimensions (1 to 4 allowed)")]
    BadNdim(u8),
    #[error("dimension {index} is {value} (1 to 2^32 allowed)")]
    BadDim { index: usize, value: u64 },
    #[error("size of the shape overflows 64 bits")]
    SizeOverflow,
    #[error("ternary layout needs a matrix, got {0} dimensions")]
    NotAMatrix(usize),
    #[error("byte length {got} does not match its layout and shape ({expected} bytes)")]
    ByteLength { expected: u64, got: u64 },
    #[error("offset {offset} is not a multiple of the alignment {alignment}")]
    Misaligned { offset: u64, alignment: u32 },
    #[error(
        "data [{offset}, {offset}+{len}) lies outside the data area of a {file_len}-byte file"
    )]
    OutOfBounds {
        offset: u64,
        len: u64,
        file_len: u64,
    },
    #[error("scale {0} is not finite and positive")]
    BadScale(f32),
    #[error("float tensor has scale {0}, must be exactly 1")]
    FloatScale(f32),
    #[error("shape {got:?}, the model config requires {expected:?}")]
    Shape { expected: Vec<u64>, got: Vec<u64> },
    #[error("layout {0} is not allowed for this tensor")]
    LayoutNotAllowed(crate::Layout),
    #[error(
        "checksum mismatch (stored {stored:016x}, computed {computed:016x}): the data is damaged"
    )]
    Checksum { stored: u64, computed: u64 },
    #[error("invalid ternary code at row {row}, column {col} (TQ2 code 3, a TQ1 byte that encodes no 5 trits, or a non-zero padding trit)")]
    InvalidTrit { row: u64, col: u64 },
    #[error("element {element} is NaN or infinite (for Q8_ROW: the scale of row {element})")]
    NonFinite { element: u64 },
    #[error("Q8_ROW row {row} has a scale that is not finite and non-negative")]
    BadRowScale { row: u64 },
    #[error("data is not aligned for {0}-byte elements")]
    ViewAlignment(usize),
    #[error("layout {found} cannot be viewed as {wanted}")]
    WrongLayout { found: String, wanted: &'static str },
}
