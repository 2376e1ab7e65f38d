use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use tern_convert::synth::{synth_hf, synth_tern_with, HfFlavour, Preset};

#[derive(clap::Args)]
pub struct Args {
    /// Shape: tiny, 2b4t (microsoft/bitnet-b1.58-2B-4T), llama3-8b-1.58, falcon3-1b-1.58
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Output: a .tern file, or with --hf a folder
    #[arg(short, long)]
    output: PathBuf,
    /// Write a Hugging Face checkpoint instead (packed or bf16), to benchmark `tern convert`
    #[arg(long)]
    hf: Option<String>,
    /// Ternary layout of a .tern output: tq2 or tq1
    #[arg(long, default_value = "tq2")]
    layout: String,
    /// Embeddings and head of a .tern output: exact (bf16) or q8
    #[arg(long, default_value = "exact")]
    head: String,
    /// Random seed
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Overwrite the output
    #[arg(long)]
    force: bool,
    /// No progress bar
    #[arg(short, long)]
    quiet: bool,
}

/// Writes a random model of a real shape (noise weights) for benchmarks.
pub fn run(args: Args) -> Result<ExitCode> {
    let preset = Preset::parse(&args.preset).with_context(|| {
        format!(
            "unknown preset {:?}; one of: {}",
            args.preset,
            Preset::ALL.map(|p| p.name()).join(", ")
        )
    })?;
    if args.output.exists() && !args.force {
        bail!(
            "{}: already exists (pass --force to overwrite)",
            args.output.display()
        );
    }
    let bar = super::byte_bar(args.quiet, "synthesizing");
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    match args.hf.as_deref() {
        None => {
            let (ternary, head) = super::compact_options(&args.layout, &args.head)?;
            synth_tern_with(preset, &args.output, args.seed, ternary, head, &progress)?
        }
        Some(kind) => {
            let flavour = match kind {
                "packed" => HfFlavour::Packed,
                "bf16" => HfFlavour::Bf16,
                other => bail!("--hf {other:?}: packed or bf16"),
            };
            synth_hf(preset, flavour, &args.output, args.seed, &progress)?
        }
    }
    bar.finish_and_clear();
    Ok(ExitCode::SUCCESS)
}
