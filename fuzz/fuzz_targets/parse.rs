//! The reader must reject any byte string without panicking.
//! Run: `cargo install cargo-fuzz && cargo +nightly fuzz run parse` (see docs/format.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tern_format::parse(data);
});
