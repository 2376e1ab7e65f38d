use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use tern_convert::{hub, Family, Options};

#[derive(clap::Args)]
pub struct Args {
    /// Model folder (config.json + safetensors + tokenizer) or a repo id in the local
    /// Hugging Face cache, e.g. microsoft/bitnet-b1.58-2B-4T
    source: String,
    /// Output .tern file
    #[arg(short, long)]
    output: PathBuf,
    /// Revision of a cached repo id (branch, tag or commit)
    #[arg(long)]
    revision: Option<String>,
    /// Checkpoint family, instead of detecting it: bitnet-packed, bitnet-masters,
    /// llama-bitlinear, 1bitllm
    #[arg(long)]
    family: Option<String>,
    /// Ternary layout: tq2 (2 bits/weight, fastest kernels) or tq1 (1.6 bits/weight)
    #[arg(long, default_value = "tq2")]
    layout: String,
    /// Embeddings and head: exact (the source's floats) or q8 (int8 + f32 scale per row,
    /// lossy; `tern verify --reference` shows the cost)
    #[arg(long, default_value = "exact")]
    head: String,
    /// Treat warnings (all −1 or all-zero tensors, assumed config defaults) as errors
    #[arg(long)]
    strict: bool,
    /// Overwrite the output file if it exists
    #[arg(long)]
    force: bool,
    /// No progress bar and no summary
    #[arg(short, long)]
    quiet: bool,
    /// Print the conversion report as JSON
    #[arg(long)]
    json: bool,
    /// Then verify the file: exact weights against the source and the fast path against
    /// the reference forward, layer by layer (`tern verify --source`); exit 1 if it fails
    #[arg(long)]
    verify: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let family = match &args.family {
        None => None,
        Some(name) => match Family::parse(name) {
            Some(f) => Some(f),
            None => bail!(
                "unknown family {name:?}; one of: {}",
                Family::ALL.map(|f| f.name()).join(", ")
            ),
        },
    };
    let (ternary, head) = super::compact_options(&args.layout, &args.head)?;
    let source = hub::resolve(&args.source, args.revision.as_deref())?;
    let options = Options {
        ternary,
        head,
        family,
        strict: args.strict,
        force: args.force,
    };
    let bar = super::byte_bar(args.quiet || args.json, "converting");
    let report = tern_convert::convert(&source, &args.output, &options, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    if args.verify {
        let failures = verify_output(&args, &source, family)?;
        if !failures.is_empty() {
            eprintln!(
                "error: {} is NOT FAITHFUL to {}:",
                args.output.display(),
                source.display()
            );
            for f in &failures {
                eprintln!("  {f}");
            }
            return Ok(ExitCode::from(1));
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if !args.quiet {
        let gbs = report.input_bytes as f64 / report.seconds.max(1e-9) / 1e9;
        println!(
            "{} ({}) -> {}: {} tensors, {} in {:.2} s ({gbs:.2} GB/s)",
            source.display(),
            report.family,
            report.output.display(),
            report.tensors,
            super::human_bytes(report.output_bytes),
            report.seconds,
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `tern verify --source` on the file just written; its failures.
fn verify_output(
    args: &Args,
    source: &std::path::Path,
    family: Option<Family>,
) -> Result<Vec<String>> {
    let file = tern_format::TernFile::open(&args.output)?;
    let options = tern_verify::Options {
        source: Some(source.to_path_buf()),
        family,
        reference: None,
        parity: true,
        prompts: None,
        greedy: 4,
        thresholds: Default::default(),
        threads: tern_infer::pool::physical_cores(),
        kernels: tern_infer::kernels::Kernels::select(None)?,
    };
    let bar = super::count_bar(args.quiet || args.json, "verifying", 1);
    let report = tern_verify::verify(&file, &options, &|stage, done, total| {
        bar.set_message(stage.to_string());
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    Ok(report.failures)
}
