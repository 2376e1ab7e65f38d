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

/// Errors of inference: always say what input was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InferError {
    #[error(transparent)]
    Format(#[from] tern_format::Error),
    #[error("{0} is not supported by this build")]
    Unsupported(String),
    #[error("{0}")]
    Input(String),
    #[error("the context is full: {needed} tokens needed, the context holds {ctx} (raise --ctx)")]
    ContextFull { ctx: usize, needed: usize },
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error(transparent)]
    Chat(#[from] chat::ChatError),
    #[error(transparent)]
    Kernel(#[from] kernels::KernelError),
}
