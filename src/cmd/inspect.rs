use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use indicatif::BinaryBytes;
use tern_format::inspect::Report;
use tern_format::TernFile;

#[derive(clap::Args)]
pub struct Args {
    /// A .tern file
    file: PathBuf,
    /// Verify every tensor's checksum and every ternary code
    #[arg(long)]
    check: bool,
    /// List every tensor
    #[arg(long)]
    tensors: bool,
    /// Print one JSON document
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let file = TernFile::open(&args.file)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let report = Report::new(&file, args.check, threads)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        print(&mut out, &file, &report, args.tensors)?;
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print(out: &mut impl Write, file: &TernFile, r: &Report, tensors: bool) -> Result<()> {
    let meta = file.metadata();
    let (c, p) = (&meta.config, &meta.provenance);
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let size = |n: u64| BinaryBytes(n).to_string();
    writeln!(
        out,
        "{}: .tern {}, {}",
        r.file.display(),
        r.version,
        size(r.bytes)
    )?;
    writeln!(
        out,
        "model: {}, {} layers, hidden {}, {} attention heads ({} key/value, {} wide), MLP {} wide, vocabulary {}",
        c.architecture, c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
        c.num_key_value_heads, c.head_dim, c.intermediate_size, c.vocab_size
    )?;
    writeln!(
        out,
        "       {} MLP activation, sub-norm before o_proj: {}, before down_proj: {}; RoPE on {}, theta {}; RMSNorm eps {:e}; {} head; context {} positions",
        c.activation, yes_no(c.attn_sub_norm), yes_no(c.ffn_sub_norm), c.rope_style, c.rope_theta,
        c.rms_norm_eps, if c.tie_word_embeddings { "tied" } else { "separate" }, c.max_position_embeddings
    )?;
    let ids = |ids: &[u32]| {
        ids.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    writeln!(
        out,
        "tokens: BOS {}, EOS {}, prompts start with BOS: {}; tokenizer {}; chat template: {}",
        c.bos_token_id.map_or("none".into(), |b| b.to_string()),
        if c.eos_token_ids.is_empty() {
            "none".into()
        } else {
            ids(&c.eos_token_ids)
        },
        yes_no(c.add_bos_token),
        size(r.tokenizer_bytes),
        yes_no(meta.chat_template.is_some())
    )?;
    writeln!(
        out,
        "source: {} ({}), {} files, converted by {}",
        p.source_family,
        p.scale_convention,
        p.source_files.len(),
        p.converter
    )?;
    print_tensors(out, r, tensors)?;
    print_check(out, r)
}

/// Sizes by kind of tensor and, with `all`, every tensor.
fn print_tensors(out: &mut impl Write, r: &Report, all: bool) -> Result<()> {
    let (s, size) = (&r.summary, |n: u64| BinaryBytes(n).to_string());
    writeln!(out, "tensors: {}", s.tensors)?;
    for (name, g) in [
        ("ternary", &s.ternary),
        ("dense", &s.dense_linears),
        ("embed/head", &s.embeddings_and_head),
        ("norms", &s.norms),
    ] {
        if name == "dense" && g.tensors == 0 {
            continue; // only files with linears kept dense (modules_to_not_convert)
        }
        writeln!(
            out,
            "  {name:<10} {:>4} tensors {:>12}  {} values, {:.3} bits/value",
            g.tensors,
            size(g.bytes),
            g.values,
            g.bits_per_value
        )?;
    }
    if all {
        writeln!(
            out,
            "\n{:<56} {:>6} {:>16} {:>12} {:>12}",
            "name", "layout", "shape", "bytes", "scale"
        )?;
        for t in &r.tensors {
            let shape = t
                .shape
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join("×");
            writeln!(
                out,
                "{:<56} {:>6} {:>16} {:>12} {:>12.6}",
                t.name, t.layout, shape, t.bytes, t.scale
            )?;
        }
    }
    Ok(())
}

/// The result of `--check`, if it ran.
fn print_check(out: &mut impl Write, r: &Report) -> Result<()> {
    let s = &r.summary;
    let Some(check) = &r.check else { return Ok(()) };
    if check.ok {
        writeln!(
            out,
            "check: all {} checksums, all ternary codes and all float values are valid (checksums at {:.1} GB/s)",
            s.tensors, check.checksum_gb_per_s
        )?;
    }
    for m in &check.damaged {
        writeln!(
            out,
            "check: tensor {:?} is DAMAGED (checksum {}, stored {})",
            m.name, m.computed, m.stored
        )?;
    }
    if let Some(e) = &check.invalid_trits {
        writeln!(out, "check: {e}")?;
    }
    Ok(())
}
