//! GGUF in and out: import the ternary files bitnet.cpp (I2_S) and llama.cpp (TQ1_0,
//! TQ2_0) run, export files they load, and check any GGUF against the Hugging Face
//! checkpoint it claims to come from. docs/gguf.md describes what is read and written.
//!
//! The parser is our own (about 300 lines) rather than a crate: the GGUF crates on
//! crates.io reject or mis-size bitnet.cpp's type 36 (I2_S, whose size is not a whole
//! number of blocks), and tern needs every count bounded by the file's length before it
//! allocates, as its safetensors and `.tern` readers do.

pub mod export;
pub mod import;
pub mod reader;
pub mod tokenizer;
pub mod types;
pub mod verify;

pub use export::{export, ExportOptions, ExportSource, ExportType};
pub use import::{import, Arch, GgufModel, ImportOptions};
pub use reader::{GgufFile, Header, TensorInfo, Value};
pub use types::{GgmlType, I2sLayout};
pub use verify::compare_with_source;

/// Whether the file at `path` starts with the GGUF magic.
pub fn is_gguf(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    // Only regular files: opening a FIFO for reading would block until a writer comes.
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && magic == reader::MAGIC
}
