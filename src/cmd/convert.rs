use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use indicatif::BinaryBytes;
use tern_convert::{hub, ConvertError, Options, Overrides};
use tern_format::{Activation, ScaleConvention};

use super::args::{HeadArg, LayoutArg};

/// How a stored `weight_scale` relates to the weights.
#[derive(Clone, Copy, clap::ValueEnum)]
enum WeightScale {
    /// true weight = trit × weight_scale (autobitlinear: weight_scale = mean|W|)
    #[value(name = "multiply")]
    Multiply,
    /// true weight = trit / weight_scale (bitlinear: weight_scale = 1/mean|W|)
    #[value(name = "divide")]
    Divide,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Act {
    #[value(name = "relu2")]
    Relu2,
    #[value(name = "silu")]
    Silu,
}

impl Act {
    fn activation(self) -> Activation {
        match self {
            Act::Relu2 => Activation::Relu2,
            Act::Silu => Activation::Silu,
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// Model folder (config.json + safetensors + tokenizer), a repo id in the local
    /// Hugging Face cache (e.g. microsoft/bitnet-b1.58-2B-4T), or a GGUF file
    source: String,
    /// Output .tern file
    #[arg(short, long)]
    output: PathBuf,
    /// Revision of a cached repo id (branch, tag or commit)
    #[arg(long)]
    revision: Option<String>,
    /// Read weight_scale with this convention instead of the one quantization_config
    /// declares (linear_class autobitlinear multiplies, bitlinear divides)
    #[arg(long, value_enum)]
    weight_scale: Option<WeightScale>,
    /// Use this MLP activation instead of what the source declares (config.json's
    /// hidden_act; for a GGUF, the activation its architecture's engine graph runs:
    /// llama.cpp's `bitnet` graph runs SiLU)
    #[arg(long, value_enum)]
    activation: Option<Act>,
    /// Allow --weight-scale / --activation to contradict what the checkpoint declares
    #[arg(long)]
    allow_contradiction: bool,
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
    /// GGUF input: block layout of its I2_S tensors, x86 or arm (which bitnet.cpp build
    /// wrote it; `tern verify FILE.gguf --source DIR` tells)
    #[arg(long, default_value = "x86")]
    i2s_layout: String,
    /// Then verify the file: exact weights against the source and the fast path against
    /// the reference forward, layer by layer (`tern verify --source`); exit 1 if it fails
    #[arg(long)]
    verify: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let overrides = Overrides {
        scale_convention: args.weight_scale.map(|w| match w {
            WeightScale::Multiply => ScaleConvention::Multiply,
            WeightScale::Divide => ScaleConvention::Divide,
        }),
        activation: args.activation.map(Act::activation),
        allow_contradiction: args.allow_contradiction,
    };
    let (ternary, head) = (args.layout.into(), args.head.into());
    let gguf_input = std::path::Path::new(&args.source);
    if gguf_input.is_file() && tern_convert::gguf::is_gguf(gguf_input) {
        return import_gguf(&args, ternary);
    }
    let source = hub::resolve(&args.source, args.revision.as_deref())?;
    let options = Options {
        ternary,
        head,
        overrides,
        strict: args.strict,
        force: args.force,
    };
    let bar = super::byte_bar(args.quiet || args.json, "converting");
    let report = tern_convert::convert(&source, &args.output, &options, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .map_err(|e| match e {
        ConvertError::Contradiction { .. } => {
            anyhow::anyhow!("{e} (pass --allow-contradiction to convert anyway)")
        }
        ConvertError::OutputExists(_) => anyhow::anyhow!("{e} (pass --force to overwrite)"),
        ConvertError::Strict(_) => anyhow::anyhow!("{e}\n(--strict is on)"),
        e => e.into(),
    })?;
    bar.finish_and_clear();
    let failures = match args.verify {
        true => Some(verify_output(&args, &source)?),
        false => None,
    };
    let faithful = failures.as_ref().is_none_or(|f| f.is_empty());
    if args.json {
        // One document for scripts: the report, and the verdict when one was asked for.
        let mut doc = serde_json::to_value(&report)?;
        if let Some(f) = &failures {
            doc["verify"] = serde_json::json!({ "faithful": faithful, "failures": f });
        }
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else if let Some(f) = failures.as_ref().filter(|f| !f.is_empty()) {
        eprintln!(
            "error: {} is NOT FAITHFUL to {}:",
            args.output.display(),
            source.display()
        );
        for f in f {
            eprintln!("  {f}");
        }
    } else {
        print_report(&args, &report);
        if args.verify && !args.quiet {
            println!(
                "verified: FAITHFUL (weights exact against the source, every layer within the \
                 limits against the reference forward)"
            );
        }
    }
    Ok(if faithful {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `tern convert MODEL.gguf -o M.tern`.
fn import_gguf(args: &Args, ternary: tern_convert::TernaryFormat) -> Result<ExitCode> {
    use tern_convert::gguf::{verify::parse_i2s_layout, ImportOptions};
    let Some(i2s_layout) = parse_i2s_layout(&args.i2s_layout) else {
        bail!("--i2s-layout {:?}: x86 or arm", args.i2s_layout);
    };
    if args.verify {
        bail!(
            "--verify checks a conversion against its Hugging Face checkpoint, which a GGUF \
             input does not name (`tern verify FILE.gguf --source DIR` checks a GGUF against one)"
        );
    }
    let activation = args.activation.map(Act::activation);
    let exact_head = matches!(head_format(args), tern_convert::HeadFormat::Exact);
    if !exact_head || args.weight_scale.is_some() || args.revision.is_some() {
        bail!(
            "--head, --weight-scale and --revision apply to Hugging Face checkpoints, not GGUF files"
        );
    }
    let options = ImportOptions {
        ternary,
        i2s_layout,
        activation,
        strict: args.strict,
        force: args.force,
    };
    let bar = super::byte_bar(args.quiet || args.json, "importing");
    let source = std::path::Path::new(&args.source);
    let report = tern_convert::gguf::import(source, &args.output, &options, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(args, &report);
    }
    Ok(ExitCode::SUCCESS)
}

/// The human-readable report (`--json` prints the report as a document instead).
fn print_report(args: &Args, report: &tern_convert::Report) {
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if !args.quiet {
        let gbs = report.input_bytes as f64 / report.seconds.max(1e-9) / 1e9;
        println!(
            "{} ({}) -> {}: {} tensors, {} in {:.2} s ({gbs:.2} GB/s)",
            report.source.display(),
            report.family,
            report.output.display(),
            report.tensors,
            BinaryBytes(report.output_bytes),
            report.seconds,
        );
    }
}

/// `tern verify --source` on the file just written; its failures.
fn verify_output(args: &Args, source: &std::path::Path) -> Result<Vec<String>> {
    let file = tern_format::TernFile::open(&args.output)?;
    let options = tern_verify::Options {
        source: Some(source.to_path_buf()),
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

fn head_format(args: &Args) -> tern_convert::HeadFormat {
    args.head.into()
}
