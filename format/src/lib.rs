//! tern-format: the `.tern` file format (see `docs/format.md`, which is normative).
//!
//! - [`Writer`] streams tensors one at a time into a temporary file and renames it into
//!   place only when everything was written and synced.
//! - [`TernFile`] memory-maps a file and validates its header, metadata and tensor
//!   directory before handing out zero-copy views of tensor bytes. [`parse`] does the same
//!   validation on any byte slice and never panics.
//! - [`tq2`] and [`tq1`] encode and decode the ternary layouts the kernels consume (2 and
//!   1.6 bits per weight); [`q8row`] the int8-per-row layout of a compact head.
//! - [`inspect::Report`] describes a file (and checks it) for `tern inspect`.
#![deny(unsafe_code)]

mod config;
mod error;
pub mod inspect;
mod layout;
pub mod q8row;
mod reader;
pub mod tq1;
pub mod tq2;
mod writer;

pub use config::{
    expected_tensors, Activation, Architecture, Decision, Metadata, ModelConfig, Provenance,
    RopeScaling, RopeStyle, ScaleConvention, SourceFile, TensorRole, LINEAR_MODULES,
};
pub use error::{Error, Problem, TensorProblem};
pub use layout::Layout;
pub use reader::{file_kind, parse, ChecksumMismatch, Parsed, TensorInfo, TernFile};
pub use writer::{ChunkWriter, TensorSpec, Writer};

/// The 8 magic bytes every `.tern` file starts with.
pub const MAGIC: [u8; 8] = *b"TERN\r\n\x1a\n";
/// Major version this crate reads and writes; files with another major are rejected.
pub const MAJOR: u16 = 1;
/// Newest minor version this crate knows (it writes the lowest minor a file's layouts and
/// config need);
/// files with a higher minor are accepted.
pub const MINOR: u16 = 3;
/// Alignment of tensor data written by this crate.
pub const ALIGNMENT: u32 = 64;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 64;

/// Limits a reader enforces before allocating anything.
pub mod limits {
    pub const MAX_META_LEN: u64 = 16 << 20;
    pub const MAX_TOKENIZER_LEN: u64 = 256 << 20;
    pub const MAX_TENSORS: u32 = 65536;
    pub const MAX_NAME_LEN: usize = 256;
    pub const MAX_NDIM: u8 = 4;
    pub const MAX_DIM: u64 = 1 << 32;
    pub const MIN_ALIGNMENT: u32 = 8;
    pub const MAX_ALIGNMENT: u32 = 65536;
}

/// XXH3-64 (seed 0), the checksum of every tensor and of the header prefix.
pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}
