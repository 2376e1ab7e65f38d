use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::ValueEnum;
use indicatif::BinaryBytes;
use tern_convert::{hub, ConvertError, Family, Options};

use super::args::{HeadArg, LayoutArg};

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
    /// Checkpoint family, instead of detecting it
    #[arg(long, ignore_case = true)]
    family: Option<FamilyArg>,
    /// Ternary layout
    #[arg(long, ignore_case = true, default_value = "tq2")]
    layout: LayoutArg,
    /// Embeddings and head (`tern verify --reference` shows what q8 costs)
    #[arg(long, ignore_case = true, default_value = "exact")]
    head: HeadArg,
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
}

pub fn run(args: Args) -> Result<ExitCode> {
    let source = hub::resolve(&args.source, args.revision.as_deref())?;
    let options = Options {
        ternary: args.layout.into(),
        head: args.head.into(),
        family: args.family.map(Family::from),
        strict: args.strict,
        force: args.force,
    };
    let bar = super::byte_bar(args.quiet || args.json, "converting");
    let report = tern_convert::convert(&source, &args.output, &options, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .map_err(|e| match e {
        ConvertError::OutputExists(_) => anyhow::anyhow!("{e} (pass --force to overwrite)"),
        ConvertError::Strict(_) => anyhow::anyhow!("{e}\n(--strict is on)"),
        e => e.into(),
    })?;
    bar.finish_and_clear();
    if args.json {
        writeln!(
            std::io::stdout(),
            "{}",
            serde_json::to_string_pretty(&report)?
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if !args.quiet {
        let gbs = report.input_bytes as f64 / report.seconds.max(1e-9) / 1e9;
        writeln!(
            std::io::stdout(),
            "{} ({}) -> {}: {} tensors, {} in {:.2} s ({gbs:.2} GB/s)",
            source.display(),
            report.family,
            report.output.display(),
            report.tensors,
            BinaryBytes(report.output_bytes),
            report.seconds,
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `--family`: a checkpoint family of tern-convert.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FamilyArg {
    /// BitNet b1.58 2B-4T: packed trits, weight_scale multiplies
    #[value(name = "bitnet-packed")]
    BitnetPacked,
    /// BitNet b1.58 2B-4T-bf16: float masters
    #[value(name = "bitnet-masters")]
    BitnetMasters,
    /// Llama with bitlinear (HF1BitLLM, Falcon3-1.58bit): packed trits, weight_scale divides
    #[value(name = "llama-bitlinear")]
    LlamaBitlinear,
    /// 1bitLLM bitnet_b1_58: fp16 masters
    #[value(name = "1bitllm")]
    OneBitLlm,
}

impl From<FamilyArg> for Family {
    fn from(f: FamilyArg) -> Family {
        match f {
            FamilyArg::BitnetPacked => Family::BitnetPacked,
            FamilyArg::BitnetMasters => Family::BitnetMasters,
            FamilyArg::LlamaBitlinear => Family::LlamaBitlinear,
            FamilyArg::OneBitLlm => Family::OneBitLlm,
        }
    }
}
