#![forbid(unsafe_code)]
//! tern-format (in progress)
