//! End-to-end tests: the `tern` binary and the library crates on the fixture checkpoints.

mod common;
mod convert;
mod inference;
mod inspect;
mod verify;
