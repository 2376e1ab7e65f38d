//! convert's safetensors header reader on whole files: it must never panic, and it must
//! accept exactly the files the safetensors crate's own `read_metadata` accepts.
//! Run: `cargo +nightly fuzz run safetensors_header corpus/safetensors_header`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("model.safetensors");
    let ours = tern_convert::source::read_header_bytes(path, data);
    // The crate adds the last tensor's end to the header length unchecked: with an end
    // near 2^64 its debug build panics. Ours refuses such a tensor as lying outside.
    if ours
        .as_ref()
        .is_err_and(|e| e.to_string().contains("lies outside"))
    {
        return;
    }
    let theirs = safetensors::SafeTensors::read_metadata(data);
    assert_eq!(
        ours.is_ok(),
        theirs.is_ok(),
        "tern-convert: {:?}, safetensors: {:?}",
        ours.as_ref().err().map(ToString::to_string),
        theirs.as_ref().err()
    );
});
