//! tern-verify: is a `.tern` file faithful to the checkpoint it came from?
//!
//! The checks, in order, each on what the one before left intact:
//! 1. integrity: every tensor's checksum, every trit code;
//! 2. exact weights against the source checkpoint (`tern_convert::compare`);
//! 3. the fast path against the reference forward, layer by layer given the same input
//!    (`tern_infer::verify::kernel_parity`);
//! 4. the fast path against transformers' outputs stored in a reference file, layer by
//!    layer on its hidden states and end to end against its own noise.
//!
//! [`verify`] runs them and returns a [`Report`] holding the figures and the verdict; the
//! command line only prints it.

use std::path::PathBuf;

use serde::Serialize;
use tern_convert::compare::{compare_with_source, WeightComparison};
use tern_format::{Layout, TernFile};
use tern_infer::generate::tokenizer_from_file;
use tern_infer::kernels::Kernels;
use tern_infer::model::Model;
use tern_infer::pool::Pool;
use tern_infer::verify::{kernel_parity, read_reference, reference_parity, Parity, Thresholds};

/// Prompts of the parity check when none are given.
pub const DEFAULT_PROMPTS: [&str; 3] = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):",
];

/// Errors that stop verification before a verdict (a verdict of "not faithful" is not one).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    #[error(transparent)]
    Convert(#[from] tern_convert::ConvertError),
    #[error(transparent)]
    Infer(#[from] tern_infer::InferError),
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Input(String),
}

/// What to check.
pub struct Options {
    /// The source checkpoint folder (already resolved) to compare weights with exactly.
    pub source: Option<PathBuf>,
    /// A transformers reference file (docs/parity.md).
    pub reference: Option<PathBuf>,
    /// Run the fast path against the reference forward.
    pub parity: bool,
    /// Prompts of that check (None: [`DEFAULT_PROMPTS`]).
    pub prompts: Option<Vec<String>>,
    /// Greedy tokens after each prompt.
    pub greedy: usize,
    pub thresholds: Thresholds,
    pub threads: usize,
    pub kernels: Kernels,
}

/// Checksums and trit codes.
#[derive(Clone, Debug, Serialize)]
pub struct Integrity {
    pub tensors: usize,
    pub damaged: Vec<String>,
    pub invalid_trits: Option<String>,
    /// The first NaN or infinite value of a float tensor, if any.
    pub non_finite: Option<String>,
}

/// Everything measured, and the verdict.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub faithful: bool,
    /// Why not, one sentence each, the most basic first.
    pub failures: Vec<String>,
    pub thresholds: Thresholds,
    pub integrity: Integrity,
    pub source: Option<WeightComparison>,
    pub kernel_parity: Option<Parity>,
    pub reference_parity: Option<Parity>,
    /// The embeddings or head are Q8_ROW (lossy by design).
    pub compact_head: bool,
}

/// Which check is running, for a progress bar: `(stage, done, total)`.
pub type Progress<'p> = &'p dyn Fn(&str, u64, u64);

/// Runs the checks `options` asks for on `file`.
pub fn verify(
    file: &TernFile,
    options: &Options,
    progress: Progress,
) -> Result<Report, VerifyError> {
    options.thresholds.validate()?;
    let mut failures = Vec::new();
    progress("checksums", 0, 1);
    let damaged: Vec<String> = file
        .verify_checksums(options.threads)
        .into_iter()
        .map(|d| d.name)
        .collect();
    failures.extend(
        damaged
            .iter()
            .map(|d| format!("tensor {d} is damaged (checksum mismatch)")),
    );
    let invalid_trits = match damaged.is_empty() {
        true => file.verify_trits().err().map(|e| e.to_string()),
        false => None,
    };
    failures.extend(invalid_trits.clone());
    // NaN or Inf in a float tensor (an embedding, a norm, the head) is damage too, even with
    // valid checksums.
    let non_finite = match damaged.is_empty() {
        true => file.verify_floats().err().map(|e| e.to_string()),
        false => None,
    };
    failures.extend(non_finite.clone());
    let intact = failures.is_empty();

    let source = match &options.source {
        Some(dir) => {
            progress("weights", 0, 1);
            let cmp = compare_with_source(file, dir)?;
            failures.extend(weight_failures(&cmp));
            Some(cmp)
        }
        None => None,
    };

    // Forward-pass parity only on intact files: damage is reported above.
    let (mut kernel, mut reference) = (None, None);
    if intact && (options.parity || options.reference.is_some()) {
        let model = Model::load(file)?;
        let pool = Pool::new(options.threads);
        if options.parity {
            let prompts = tokenize(file, options.prompts.as_deref())?;
            let step = |done, total| progress("reference forward", done, total);
            let p = kernel_parity(
                &model,
                &pool,
                options.kernels,
                &prompts,
                options.greedy,
                &step,
            )?;
            failures.extend(p.failures(&options.thresholds));
            kernel = Some(p);
        }
        if let Some(path) = &options.reference {
            let bytes = std::fs::read(path).map_err(|source| VerifyError::Io {
                path: path.clone(),
                source,
            })?;
            let prompts = read_reference(&model, &bytes)
                .map_err(|e| VerifyError::Input(format!("{}: {e}", path.display())))?;
            let step = |done, total| progress("transformers", done, total);
            let p = reference_parity(&model, &pool, options.kernels, &prompts, &step)?;
            failures.extend(p.failures(&options.thresholds));
            reference = Some(p);
        }
    }
    Ok(Report {
        faithful: failures.is_empty(),
        failures,
        thresholds: options.thresholds,
        integrity: Integrity {
            tensors: file.tensors().len(),
            damaged,
            invalid_trits,
            non_finite,
        },
        source,
        kernel_parity: kernel,
        reference_parity: reference,
        compact_head: file
            .tensors()
            .iter()
            .any(|t| t.layout == Some(Layout::Q8Row)),
    })
}

/// The exact comparison's failures, as sentences.
fn weight_failures(cmp: &WeightComparison) -> Vec<String> {
    let mut f = Vec::new();
    if cmp.trit_mismatches + cmp.scale_mismatches + cmp.float_mismatches > 0 {
        let first = cmp.first_mismatches.first().map_or(String::new(), |m| {
            format!(
                ": first in {} at {:?} (expected {}, found {})",
                m.tensor, m.index, m.expected, m.found
            )
        });
        f.push(format!(
            "weights differ from the source: {} trits, {} scales, {} float values{first}",
            cmp.trit_mismatches, cmp.scale_mismatches, cmp.float_mismatches
        ));
    }
    f.extend(
        cmp.config_mismatches
            .iter()
            .map(|c| format!("config differs from the source: {c}")),
    );
    f
}

/// Token ids of the prompts with the file's tokenizer; no prompt, or an empty one, is refused.
fn tokenize(file: &TernFile, texts: Option<&[String]>) -> Result<Vec<Vec<u32>>, VerifyError> {
    let defaults = DEFAULT_PROMPTS.map(str::to_string);
    let texts = texts.unwrap_or(&defaults);
    if texts.is_empty() {
        return Err(VerifyError::Input("no prompts to compare on".into()));
    }
    let tokenizer = tokenizer_from_file(file)?;
    texts
        .iter()
        .map(|t| {
            let ids = tokenizer
                .encode(t, true)
                .map_err(tern_infer::InferError::from)?;
            match ids.is_empty() {
                true => Err(VerifyError::Input(format!(
                    "the prompt {t:?} has no tokens"
                ))),
                false => Ok(ids),
            }
        })
        .collect()
}
