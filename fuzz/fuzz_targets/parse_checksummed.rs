//! Like `parse`, but the input's magic, major version and header checksum are made valid
//! before parsing, so the fuzzer spends its time in the metadata, tokenizer and directory
//! validation instead of stopping at the checksum.
//! Run: `cargo +nightly fuzz run parse_checksummed corpus/parse` (see docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut bytes = data.to_vec();
    if bytes.len() >= tern_format::HEADER_LEN {
        bytes[..8].copy_from_slice(&tern_format::MAGIC);
        bytes[8..10].copy_from_slice(&tern_format::MAJOR.to_le_bytes());
        let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        let (dir_off, dir_len) = (u64_at(&bytes, 48), u64_at(&bytes, 56));
        if let Some(end) = dir_off.checked_add(dir_len) {
            if end >= 8 && end <= bytes.len() as u64 {
                let body_end = (end - 8) as usize;
                let sum = tern_format::checksum(&bytes[..body_end]);
                bytes[body_end..body_end + 8].copy_from_slice(&sum.to_le_bytes());
            }
        }
    }
    let _ = tern_format::parse(&bytes);
});
