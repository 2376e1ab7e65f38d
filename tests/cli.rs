//! End-to-end tests: the `tern` binary and the library crates on the fixture checkpoints.

mod bench;
mod common;
mod compact;
mod convert;
mod default_model;
mod gguf;
mod hostile;
mod inference;
mod inspect;
mod serve;
mod verify;
