//! Bounds on the sizes a user or a file can ask for: context length, thread count, and the
//! memory the KV cache and attention scratch will take. Each is checked with checked
//! arithmetic before anything is allocated, so a bad option is a clear error, never an
//! abort or a capacity-overflow panic (llama.cpp refuses a context above the model's
//! training length the same way).

use std::io::Read;
use std::path::Path;

use tern_format::ModelConfig;

use crate::InferError;

/// Most worker threads accepted, whatever the machine: beyond this the pool only costs
/// memory and wake-up latency.
pub const MAX_THREADS_CAP: usize = 1024;

/// Threads accepted on this machine: 4 × the CPUs available to the process, at most
/// [`MAX_THREADS_CAP`] (oversubscription beyond that only slows the kernels down).
pub fn max_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus.saturating_mul(4).min(MAX_THREADS_CAP)
}

/// Checks a thread count: at least 1, at most [`max_threads`].
pub fn check_threads(threads: usize) -> Result<usize, InferError> {
    let max = max_threads();
    if threads == 0 {
        return Err(InferError::Input("0 threads: at least 1 is needed".into()));
    }
    if threads > max {
        return Err(InferError::Input(format!(
            "{threads} threads is more than the {max} this machine allows (4 × its CPUs, at most {MAX_THREADS_CAP})"
        )));
    }
    Ok(threads)
}

/// Bytes the per-context buffers of a [`crate::model::State`] take for `ctx` positions and
/// `threads` workers: the key and value caches (`2 × layers × ctx × kv_dim` f32) and one
/// row of attention scores per query head of a KV group per worker (`group × ctx` f32).
/// `None` when the product overflows 64 bits.
pub fn state_bytes(config: &ModelConfig, ctx: u64, threads: u64) -> Option<u64> {
    let group = (config.num_attention_heads / config.num_key_value_heads.max(1)).max(1);
    let cache = 2u64
        .checked_mul(config.num_hidden_layers)?
        .checked_mul(ctx)?
        .checked_mul(config.kv_dim())?;
    let scores = threads.checked_mul(group)?.checked_mul(ctx)?;
    cache.checked_add(scores)?.checked_mul(4)
}

/// Physical memory of the machine (Linux `/proc/meminfo` MemTotal), if known.
pub fn physical_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Checks a context length (`what` names the option in the error, e.g. "--ctx") for a
/// model and a thread count: at least 1, at most the model's `max_position_embeddings`,
/// and its KV cache and scratch no larger than the machine's physical memory (or, where
/// that is unknown, than the address space allows).
pub fn check_ctx(
    config: &ModelConfig,
    ctx: usize,
    threads: usize,
    what: &str,
) -> Result<usize, InferError> {
    let max = config.max_position_embeddings;
    if ctx == 0 {
        return Err(InferError::Input(format!(
            "{what} 0: at least 1 position is needed"
        )));
    }
    if ctx as u64 > max {
        return Err(InferError::Input(format!(
            "{what} {ctx} is more than the model's {max} positions (max_position_embeddings)"
        )));
    }
    let bytes = state_bytes(config, ctx as u64, threads as u64).filter(|&b| b <= isize::MAX as u64);
    let Some(bytes) = bytes else {
        return Err(InferError::Input(format!(
            "{what} {ctx}: the KV cache size overflows this machine's address space"
        )));
    };
    if let Some(mem) = physical_memory().filter(|&m| bytes > m) {
        return Err(InferError::Input(format!(
            "{what} {ctx}: the KV cache needs {:.1} GiB, more than this machine's {:.1} GiB of memory",
            bytes as f64 / f64::from(1u32 << 30),
            mem as f64 / f64::from(1u32 << 30)
        )));
    }
    Ok(ctx)
}

/// Most bytes of text read for evaluation (`tern eval --ppl`): 1 GiB, twice
/// wikitext-103's training split.
pub const MAX_TEXT_BYTES: u64 = 1 << 30;

/// Reads a UTF-8 text file of at most [`MAX_TEXT_BYTES`], refusing what is not a regular
/// file (a FIFO would block, `/dev/zero` would never end).
pub fn read_text_file(path: &Path) -> Result<String, InferError> {
    let fail = |problem: String| InferError::Input(format!("{}: {problem}", path.display()));
    let kind = std::fs::metadata(path)
        .map_err(|e| fail(e.to_string()))?
        .file_type();
    if !kind.is_file() {
        return Err(fail(format!(
            "{}, not a regular file: refusing to read it",
            tern_format::file_kind(kind)
        )));
    }
    let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_TEXT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(e.to_string()))?;
    if bytes.len() as u64 > MAX_TEXT_BYTES {
        return Err(fail(format!(
            "larger than the {MAX_TEXT_BYTES}-byte limit on text"
        )));
    }
    String::from_utf8(bytes).map_err(|e| fail(format!("not UTF-8 text: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_pos: u64, layers: u64, kv_heads: u64, head_dim: u64) -> ModelConfig {
        ModelConfig {
            num_hidden_layers: layers,
            num_attention_heads: kv_heads * 2,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: max_pos,
            rope_theta: 10000.0,
            ..ModelConfig::bitnet_b158()
        }
    }

    #[test]
    fn zero_and_too_many_threads_are_refused() {
        assert!(check_threads(0).is_err());
        assert_eq!(check_threads(1).unwrap(), 1);
        assert!(check_threads(max_threads() + 1).is_err());
        assert!(check_threads(100_000).is_err());
        assert!(check_threads(usize::MAX).is_err());
    }

    #[test]
    fn ctx_is_bounded_by_the_model_and_the_machine() {
        let c = config(4096, 2, 2, 16);
        assert_eq!(check_ctx(&c, 4096, 4, "--ctx").unwrap(), 4096);
        for bad in [0, 4097, 1 << 40, usize::MAX] {
            let e = check_ctx(&c, bad, 4, "--ctx").unwrap_err().to_string();
            assert!(e.contains("--ctx"), "{e}");
        }
        // A file that claims 2^32 positions and huge layers: the size is refused, not allocated.
        let huge = config(1 << 32, 4096, 1 << 16, 1 << 16);
        assert_eq!(state_bytes(&huge, 1 << 32, 4), None);
        let e = check_ctx(&huge, 1 << 32, 4, "--ctx")
            .unwrap_err()
            .to_string();
        assert!(e.contains("overflows") || e.contains("memory"), "{e}");
    }

    #[test]
    fn state_bytes_counts_caches_and_scores() {
        let c = config(4096, 2, 2, 16); // kv_dim 32, group 2
        assert_eq!(
            state_bytes(&c, 100, 3),
            Some(4 * (2 * 2 * 100 * 32 + 3 * 2 * 100))
        );
    }
}
