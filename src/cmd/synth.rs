use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Result};
use clap::ValueEnum;
use tern_convert::synth::{synth_hf, synth_tern_with, HfFlavour, Preset};
use tern_convert::ConvertError;

use super::args::{HeadArg, LayoutArg};

#[derive(clap::Args)]
pub struct Args {
    /// Shape
    #[arg(long, ignore_case = true, default_value = "tiny")]
    preset: PresetArg,
    /// Output: a .tern file, or with --hf a folder
    #[arg(short, long)]
    output: PathBuf,
    /// Write a Hugging Face checkpoint instead (packed or bf16), to benchmark `tern convert`
    #[arg(long, ignore_case = true)]
    hf: Option<HfArg>,
    /// Ternary layout of a .tern output
    #[arg(long, ignore_case = true, default_value = "tq2")]
    layout: LayoutArg,
    /// Embeddings and head of a .tern output
    #[arg(long, ignore_case = true, default_value = "exact")]
    head: HeadArg,
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
    let preset = Preset::from(args.preset);
    let bar = super::byte_bar(args.quiet, "synthesizing");
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let (out, seed, replace) = (&args.output, args.seed, args.force);
    match args.hf {
        None => {
            let formats = (args.layout.into(), args.head.into());
            synth_tern_with(preset, out, seed, formats, replace, &progress)
        }
        Some(flavour) => synth_hf(preset, flavour.into(), out, seed, replace, &progress),
    }
    .map_err(|e| match e {
        ConvertError::OutputExists(_) => anyhow!("{e} (pass --force to overwrite)"),
        e => e.into(),
    })?;
    bar.finish_and_clear();
    Ok(ExitCode::SUCCESS)
}

/// `--preset`: the shape of a real model.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PresetArg {
    /// A few MB, for quick runs
    #[value(name = "tiny")]
    Tiny,
    /// microsoft/bitnet-b1.58-2B-4T
    #[value(name = "2b4t")]
    Bitnet2b4t,
    /// HF1BitLLM/Llama3-8B-1.58-100B-tokens
    #[value(name = "llama3-8b-1.58")]
    Llama3_8b,
    /// tiiuae/Falcon3-1B-Instruct-1.58bit
    #[value(name = "falcon3-1b-1.58")]
    Falcon3_1b,
}

impl From<PresetArg> for Preset {
    fn from(p: PresetArg) -> Preset {
        match p {
            PresetArg::Tiny => Preset::Tiny,
            PresetArg::Bitnet2b4t => Preset::Bitnet2b4t,
            PresetArg::Llama3_8b => Preset::Llama3_8b,
            PresetArg::Falcon3_1b => Preset::Falcon3_1b,
        }
    }
}

/// `--hf`: the kind of Hugging Face checkpoint to write.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum HfArg {
    /// Packed trits and a bf16 weight_scale (bitnet-b1.58-2B-4T)
    #[value(name = "packed")]
    Packed,
    /// bf16 masters (bitnet-b1.58-2B-4T-bf16)
    #[value(name = "bf16")]
    Bf16,
}

impl From<HfArg> for HfFlavour {
    fn from(h: HfArg) -> HfFlavour {
        match h {
            HfArg::Packed => HfFlavour::Packed,
            HfArg::Bf16 => HfFlavour::Bf16,
        }
    }
}
