//! tern-infer: run a memory-mapped `.tern` model on the CPU.
//!
//! - [`model`]: weights as views into the file, and the forward pass.
//! - [`kernels`]: ternary × int8 and dense kernels, scalar reference + SIMD, chosen at run time.
//! - [`pool`]: the persistent thread pool the matrix calls are split over.
//! - [`generate`]: prefill, decode loop, stop conditions, timings.
//! - [`tokenizer`], [`sampling`], [`chat`]: text in and out.

pub mod batch;
pub mod bench;
pub mod chat;
pub mod eval;
pub mod generate;
pub mod kernels;
pub mod limits;
pub mod model;
pub mod pool;
pub mod reference;
pub mod sampling;
pub mod tokenizer;
pub mod verify;

/// Errors of inference: always say what input was wrong. Libraries know no command line:
/// messages name the value, not the option that set it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InferError {
    #[error(transparent)]
    Format(#[from] tern_format::Error),
    #[error("{0} is not supported by this build")]
    Unsupported(String),
    /// A malformed input that has no variant of its own (a reference file of `verify`).
    #[error("{0}")]
    Input(String),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the text is empty")]
    EmptyText,
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfVocab { id: u32, vocab: usize },
    #[error("the model has no BOS token to start each window")]
    NoBosToken,
    #[error("window {window} is too small (at least 2 positions: BOS and one token)")]
    WindowTooSmall { window: usize },
    #[error("{}: the file holds no tokenizer (its source had no tokenizer.json)", path.display())]
    NoTokenizer { path: std::path::PathBuf },
    #[error("the context is full: {needed} tokens needed, the context holds {ctx}")]
    ContextFull { ctx: usize, needed: usize },
    /// Writing generated text failed (for instance a closed pipe: see `is_broken_pipe`).
    #[error("writing output")]
    Output(#[source] std::io::Error),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error(transparent)]
    Chat(#[from] chat::ChatError),
    #[error(transparent)]
    Kernel(#[from] kernels::KernelError),
}

impl InferError {
    /// Whether this is a write to a reader that went away, which a command treats as a
    /// normal end.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, InferError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}
