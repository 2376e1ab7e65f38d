use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use serde_json::json;
use tern_convert::{compare::WeightComparison, hub};
use tern_infer::verify::{Parity, Thresholds};
use tern_verify::{verify, Options, Report};

use super::args::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The Hugging Face checkpoint (folder or cached repo id) it was converted from:
    /// compare every trit, scale and float exactly
    #[arg(long)]
    source: Option<String>,
    /// Revision of a cached repo id given to --source
    #[arg(long)]
    revision: Option<String>,
    /// transformers reference outputs (scripts/make_reference.py; docs/parity.md)
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Prompts for the parity check against the reference forward, one per line
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Greedy tokens of the fast path after each prompt, compared with the reference forward
    #[arg(long, default_value_t = 8)]
    greedy: usize,
    /// Skip the fast path against the reference forward
    #[arg(long)]
    no_parity: bool,
    /// Largest error of one layer given the reference's input (fraction of what it adds)
    #[arg(long, default_value_t = Thresholds::default().max_layer_error)]
    max_layer_error: f64,
    /// Largest fraction of one layer's int8 activations that may differ (rounding flips)
    #[arg(long, default_value_t = Thresholds::default().max_flip_rate)]
    max_flip_rate: f64,
    /// Minimum top-1 agreement with transformers (fraction of positions)
    #[arg(long, default_value_t = Thresholds::default().min_top1)]
    min_top1: f64,
    /// Maximum mean KL divergence from transformers (nats)
    #[arg(long, default_value_t = Thresholds::default().max_kl)]
    max_kl: f64,
    /// Minimum greedy agreement with transformers (fraction of tokens)
    #[arg(long, default_value_t = Thresholds::default().min_greedy)]
    min_greedy: f64,
    /// No progress bar
    #[arg(short, long)]
    quiet: bool,
    /// Print one JSON document
    #[arg(long)]
    json: bool,
    /// For a GGUF: its I2_S block layout, x86 or arm
    #[arg(long, default_value = "x86")]
    i2s_layout: String,
}

pub fn run(args: Args) -> Result<ExitCode> {
    if tern_convert::gguf::is_gguf(&args.model.model) {
        return super::export::verify_gguf(
            &args.model.model,
            args.source.as_deref(),
            &args.i2s_layout,
            args.json,
        );
    }
    let file = args.model.open()?;
    let prompts = match &args.prompts {
        None => None,
        Some(p) => Some(read_prompts(p)?),
    };
    let source = match &args.source {
        None => None,
        Some(spec) => Some(hub::resolve(spec, args.revision.as_deref())?),
    };
    let options = Options {
        source,
        reference: args.reference.clone(),
        parity: !args.no_parity,
        prompts,
        greedy: args.greedy,
        thresholds: Thresholds {
            max_layer_error: args.max_layer_error,
            max_flip_rate: args.max_flip_rate,
            min_top1: args.min_top1,
            max_kl: args.max_kl,
            min_greedy: args.min_greedy,
        },
        threads: args.model.pool().threads(),
        kernels: args.model.kernels()?,
    };
    let bar = super::count_bar(args.quiet || args.json, "verifying", 1);
    let report = verify(&file, &options, &|stage, done, total| {
        bar.set_message(stage.to_string());
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    if args.json {
        let mut doc = serde_json::to_value(&report)?;
        doc["file"] = json!(args.model.model);
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print_report(&args.model.model, &report);
    }
    Ok(match report.faithful {
        true => ExitCode::SUCCESS,
        false => ExitCode::from(1),
    })
}

/// The lines of a prompts file, blank ones skipped; a file with none is an error.
pub fn read_prompts(path: &std::path::Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    anyhow::ensure!(!lines.is_empty(), "{} holds no prompt", path.display());
    Ok(lines)
}

fn print_report(path: &std::path::Path, r: &Report) {
    match r.failures.first() {
        None => println!("FAITHFUL: {} passes every check", path.display()),
        Some(f) => println!("NOT FAITHFUL: {f}"),
    }
    for f in r.failures.iter().skip(1) {
        println!("  also: {f}");
    }
    println!(
        "\nintegrity: {} tensors, {} damaged",
        r.integrity.tensors,
        r.integrity.damaged.len()
    );
    if let Some(c) = &r.source {
        print_source(c, "Q8_ROW (--head q8)");
    }
    if r.compact_head {
        println!(
            "\ncompact head: the embeddings/head are Q8_ROW (int8 + one f32 scale per row), \
             not the source's floats. The reference forward shares that head, so parity with \
             it does not show the cost; the --reference figures (against transformers) do."
        );
    }
    for p in r.kernel_parity.iter().chain(&r.reference_parity) {
        print_parity(p, &r.thresholds);
    }
}

/// The comparison with the source checkpoint; `lossy` names how a lossy tensor is stored.
pub(crate) fn print_source(c: &WeightComparison, lossy: &str) {
    println!(
        "source: {} tensors; {} trits, {} scales, {} float values compared; mismatches: {} trits, {} scales, {} floats",
        c.tensors, c.trits_compared, c.scales_compared, c.float_values_compared,
        c.trit_mismatches, c.scale_mismatches, c.float_mismatches
    );
    for m in &c.first_mismatches {
        println!(
            "  {} {:?}: expected {}, found {}",
            m.tensor, m.index, m.expected, m.found
        );
    }
    for q in &c.quantized {
        println!(
            "  {} is {lossy}, lossy by design: max |error| {:.3e} (max |value| {:.3e}), rms {:.3e}",
            q.tensor, q.max_abs_error, q.max_abs_value, q.rms_error
        );
    }
    for c in &c.config_mismatches {
        println!("  {c}");
    }
    for w in &c.warnings {
        eprintln!("warning: {w}");
    }
}

fn print_parity(p: &Parity, t: &Thresholds) {
    let judged = match p.judge_end_to_end {
        true => {
            let l = p.end_to_end_limits(t);
            format!(
                "judged: top-1 ≥ {:.1}%, KL ≤ {:.2e}, greedy ≥ {:.1}%",
                100.0 * l.min_top1,
                l.max_kl,
                100.0 * l.min_greedy
            )
        }
        false => "information: flips cascade end to end".to_string(),
    };
    println!(
        "\nagainst {}: {} prompts, {} positions: top-1 {:.1}%, mean KL {:.2e} nats, max |Δlogit| {:.4}, greedy {:.1}% of {} tokens ({judged})",
        p.against, p.prompts, p.positions, 100.0 * p.top1, p.mean_kl, p.max_logit_abs, 100.0 * p.greedy_agreement, p.greedy_tokens
    );
    if let Some(n) = p.noise {
        println!(
            "  transformers against itself (KV-cached decode vs full forward): top-1 {:.1}%, mean KL {:.2e}",
            100.0 * n.top1,
            n.mean_kl
        );
    }
    if p.layers.is_empty() {
        return;
    }
    println!("  layer-local, given the same input:");
    println!(
        "  {:>6} {:>12} {:>12} {:>18} {:>6}",
        "layer", "error", "max |Δ|", "int8 flips", "steps"
    );
    for l in &p.layers {
        let name = match l.layer + 1 == p.layers.len() {
            true => "head".to_string(),
            false => l.layer.to_string(),
        };
        let flips = l
            .flips
            .map_or("-".to_string(), |f| format!("{f}/{}", l.activations));
        println!(
            "  {name:>6} {:>12.3e} {:>12.3e} {flips:>18} {:>6}",
            l.error, l.max_abs, l.max_step
        );
    }
}
