//! convert's loading of config.json and tokenizer.json: the input is split at its first
//! 0xff byte into the two files, written into a checkpoint folder with an empty
//! safetensors file, and prepared (config normalization, the checkpoint axes, tokenizer
//! loading). Any result but a panic is fine.
//! Run: `cargo +nightly fuzz run convert_config corpus/convert_config`.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

fn folder() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tern-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A valid safetensors file without tensors: `8-byte length` + "{}".
        let mut st = 2u64.to_le_bytes().to_vec();
        st.extend_from_slice(b"{}");
        std::fs::write(dir.join("model.safetensors"), st).unwrap();
        dir
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = folder();
    let split = data.iter().position(|&b| b == 0xff).unwrap_or(data.len());
    let (config, tokenizer) = data.split_at(split);
    std::fs::write(dir.join("config.json"), config).unwrap();
    let tokenizer_path = dir.join("tokenizer.json");
    if tokenizer.is_empty() {
        let _ = std::fs::remove_file(&tokenizer_path);
    } else {
        std::fs::write(&tokenizer_path, &tokenizer[1..]).unwrap();
    }
    let _ = tern_convert::prepare(dir, &tern_convert::Overrides::default());
});
