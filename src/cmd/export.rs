//! `tern export`: a `.tern` file (or a Hugging Face checkpoint) to a GGUF the engines run;
//! and `tern verify FILE.gguf --source DIR` (dispatched here by the verify command).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use tern_convert::gguf::{self, verify::parse_i2s_layout, ExportOptions, ExportSource, ExportType};
use tern_convert::hub;
use tern_format::TernFile;

#[derive(clap::Args)]
pub struct Args {
    /// A .tern file, or a Hugging Face checkpoint (folder or cached repo id), converted on
    /// the way in bounded memory
    source: String,
    /// Output .gguf file
    #[arg(short, long)]
    output: PathBuf,
    /// Ternary type: i2_s (bitnet.cpp), tq2_0 or tq1_0 (llama.cpp)
    #[arg(long = "type", default_value = "i2_s")]
    ty: String,
    /// I2_S block layout: x86 (bitnet.cpp's x86 builds) or arm (its ARM NEON builds)
    #[arg(long, default_value = "x86")]
    i2s_layout: String,
    /// Keep the embeddings in the file's float type instead of F16 (what the engines'
    /// converters write; lossy for bf16 values below fp16's normal range)
    #[arg(long)]
    exact_embeddings: bool,
    /// Overwrite the output file if it exists
    #[arg(long)]
    force: bool,
    /// No progress bar and no summary
    #[arg(short, long)]
    quiet: bool,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let ty = ExportType::parse(&args.ty)
        .with_context(|| format!("--type {:?}: i2_s, tq2_0 or tq1_0", args.ty))?;
    let Some(i2s_layout) = parse_i2s_layout(&args.i2s_layout) else {
        bail!("--i2s-layout {:?}: x86 or arm", args.i2s_layout);
    };
    let options = ExportOptions {
        ty,
        i2s_layout,
        exact_embeddings: args.exact_embeddings,
        force: args.force,
    };
    let bar = super::byte_bar(args.quiet || args.json, "exporting");
    let progress = |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let path = PathBuf::from(&args.source);
    let report = if path.is_file() {
        let file = TernFile::open(&path)?;
        gguf::export(
            &ExportSource::Tern(&file),
            &args.output,
            &options,
            &progress,
        )?
    } else {
        // A checkpoint, read tensor by tensor: one streaming step.
        let dir = hub::resolve(&args.source, None)?;
        let prepared = tern_convert::prepare(&dir, &tern_convert::Overrides::default())?;
        for w in &prepared.warnings {
            eprintln!("warning: {w}");
        }
        let source = ExportSource::Checkpoint(&prepared);
        gguf::export(&source, &args.output, &options, &progress)?
    };
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if !args.quiet {
        println!(
            "{} -> {} ({}, {}): {} tensors, {} in {:.2} s",
            args.source,
            report.output.display(),
            report.architecture,
            report.ty.name(),
            report.tensors,
            indicatif::BinaryBytes(report.output_bytes),
            report.seconds
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `tern verify FILE.gguf --source DIR`: every trit and scale of the GGUF against the
/// checkpoint. Exit 1 when they differ.
pub fn verify_gguf(
    path: &std::path::Path,
    source: Option<&str>,
    i2s_layout: &str,
    json: bool,
) -> Result<ExitCode> {
    let Some(source) = source else {
        bail!(
            "{}: a GGUF is verified against its source: pass --source DIR",
            path.display()
        );
    };
    let layout = parse_i2s_layout(i2s_layout)
        .with_context(|| format!("--i2s-layout {i2s_layout:?}: x86 or arm"))?;
    let dir = hub::resolve(source, None)?;
    let cmp = gguf::compare_with_source(path, &dir, layout)?;
    let c = &cmp.weights;
    let faithful = c.exact();
    if json {
        let doc = serde_json::json!({"file": path, "faithful": faithful, "source": cmp});
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        let verdict = if faithful { "FAITHFUL" } else { "NOT FAITHFUL" };
        println!("{verdict}: {} against {}", path.display(), dir.display());
        super::verify::print_source(c, "quantized in the GGUF");
        for n in &cmp.notes {
            println!("note: {n}");
        }
    }
    Ok(if faithful {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
