#![forbid(unsafe_code)]
//! tern-convert (in progress)
