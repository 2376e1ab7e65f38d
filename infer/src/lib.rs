//! tern-infer: run a memory-mapped `.tern` model on the CPU.

pub mod chat;
pub mod kernels;
pub mod pool;
pub mod sampling;
pub mod tokenizer;
