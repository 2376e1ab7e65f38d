use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use serde_json::json;
use tern_convert::{compare::compare_with_source, hub, Family};
use tern_infer::generate::tokenizer_from_file;
use tern_infer::model::Model;
use tern_infer::verify::{kernel_parity, reference_parity, Parity, Thresholds};

use super::args::ModelArgs;

/// Prompts used for kernel parity when --prompts is not given.
const DEFAULT_PROMPTS: [&str; 3] = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):",
];

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
    /// Family of the source, instead of detecting it
    #[arg(long)]
    family: Option<String>,
    /// transformers reference outputs (safetensors; fixtures/README.md) to compare against
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Prompts for the kernel parity check, one per line
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Greedy tokens to compare after each prompt
    #[arg(long, default_value_t = 16)]
    greedy: usize,
    /// Skip the kernel-vs-reference forward (it runs the slow f32 reference)
    #[arg(long)]
    no_parity: bool,
    /// Minimum top-1 agreement (fraction of positions)
    #[arg(long, default_value_t = Thresholds::default().min_top1)]
    min_top1: f64,
    /// Maximum mean KL divergence of next-token distributions (nats)
    #[arg(long, default_value_t = Thresholds::default().max_kl)]
    max_kl: f64,
    /// Minimum greedy agreement (fraction of tokens before the first divergence)
    #[arg(long, default_value_t = Thresholds::default().min_greedy)]
    min_greedy: f64,
    /// Print one JSON document
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let thresholds = Thresholds {
        min_top1: args.min_top1,
        max_kl: args.max_kl,
        min_greedy: args.min_greedy,
    };
    let file = args.model.open()?;
    let mut failures: Vec<String> = Vec::new();

    // 1. Integrity.
    let damaged = file.verify_checksums(
        args.model
            .threads
            .unwrap_or_else(tern_infer::pool::physical_cores),
    );
    for d in &damaged {
        failures.push(format!("tensor {} is damaged (checksum mismatch)", d.name));
    }
    let trits = if damaged.is_empty() {
        file.verify_trits().err().map(|e| e.to_string())
    } else {
        None
    };
    failures.extend(trits.clone());

    // 2. Exact weights against the source.
    let source = match &args.source {
        None => None,
        Some(spec) => {
            let family = match &args.family {
                None => None,
                Some(n) => Some(Family::parse(n).with_context(|| format!("unknown family {n:?}"))?),
            };
            let dir = hub::resolve(spec, args.revision.as_deref())?;
            let cmp = compare_with_source(&file, &dir, family)?;
            if !cmp.exact() {
                let first = cmp.first_mismatches.first().map_or(String::new(), |m| {
                    format!(
                        ": first in {} at {:?} (expected {}, found {})",
                        m.tensor, m.index, m.expected, m.found
                    )
                });
                if cmp.trit_mismatches + cmp.scale_mismatches + cmp.float_mismatches > 0 {
                    failures.push(format!(
                        "weights differ from the source: {} trits, {} scales, {} float values{first}",
                        cmp.trit_mismatches, cmp.scale_mismatches, cmp.float_mismatches
                    ));
                }
                for c in &cmp.config_mismatches {
                    failures.push(format!("config differs from the source: {c}"));
                }
            }
            Some(cmp)
        }
    };

    // 3. and 4. Forward-pass parity (only on intact files: damage is reported above).
    let (mut kernel, mut reference): (Option<Parity>, Option<Parity>) = (None, None);
    if damaged.is_empty() && trits.is_none() {
        let model = Model::load(&file)?;
        let kernels = args.model.kernels()?;
        let pool = args.model.pool();
        if !args.no_parity {
            let tokenizer = tokenizer_from_file(&file)?;
            let texts: Vec<String> = match &args.prompts {
                Some(p) => std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_string)
                    .collect(),
                None => DEFAULT_PROMPTS.map(str::to_string).to_vec(),
            };
            let prompts = texts
                .iter()
                .map(|t| tokenizer.encode(t, true))
                .collect::<Result<Vec<_>, _>>()?;
            let p = kernel_parity(&model, &pool, kernels, &prompts, args.greedy)?;
            failures.extend(p.failures(&thresholds));
            kernel = Some(p);
        }
        if let Some(path) = &args.reference {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let p = reference_parity(&model, &pool, kernels, &bytes)
                .with_context(|| format!("comparing with {}", path.display()))?;
            failures.extend(p.failures(&thresholds));
            reference = Some(p);
        }
    }
    let faithful = failures.is_empty();

    if args.json {
        let doc = json!({
            "file": args.model.model,
            "faithful": faithful,
            "failures": failures,
            "thresholds": thresholds,
            "integrity": {
                "tensors": file.tensors().len(),
                "damaged": damaged.iter().map(|d| &d.name).collect::<Vec<_>>(),
                "invalid_trits": trits,
            },
            "source": source,
            "kernel_parity": kernel,
            "reference_parity": reference,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        match failures.first() {
            None => println!(
                "FAITHFUL: {} passes every check",
                args.model.model.display()
            ),
            Some(f) => println!("NOT FAITHFUL: {f}"),
        }
        for f in failures.iter().skip(1) {
            println!("  also: {f}");
        }
        println!(
            "\nintegrity: {} tensors, {} damaged",
            file.tensors().len(),
            damaged.len()
        );
        if let Some(c) = &source {
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
                    "  {} is Q8_ROW (--head q8), lossy by design: max |error| {:.3e} (max |value| {:.3e}), rms {:.3e}",
                    q.tensor, q.max_abs_error, q.max_abs_value, q.rms_error
                );
            }
        }
        let q8_head = file
            .tensors()
            .iter()
            .any(|t| t.layout == Some(tern_format::Layout::Q8Row));
        if q8_head {
            println!(
                "\ncompact head: the embeddings/head are Q8_ROW (int8 + one f32 scale per row), \
                 not the source's floats. Kernel parity compares two forwards that share that \
                 head, so it does not show the cost; the --reference figures (top-1, KL against \
                 transformers) do."
            );
        }
        for p in kernel.iter().chain(&reference) {
            print_parity(p);
        }
    }
    Ok(if faithful {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_parity(p: &Parity) {
    println!(
        "\nagainst {}: {} prompts, {} positions: top-1 {:.1}%, mean KL {:.2e} nats, max |Δlogit| {:.4}, greedy {:.1}% of {} tokens",
        p.against, p.prompts, p.positions, 100.0 * p.top1, p.mean_kl, p.max_logit_abs, 100.0 * p.greedy_agreement, p.greedy_tokens
    );
    println!(
        "  {:>6} {:>12} {:>12} {:>16}",
        "layer", "max |Δ|", "max rel", "int8 flips"
    );
    for l in &p.layers {
        let flips = l
            .flips
            .map_or("-".to_string(), |f| format!("{f}/{}", l.activations));
        println!(
            "  {:>6} {:>12.3e} {:>12.3e} {:>16}",
            l.layer, l.max_abs, l.max_rel, flips
        );
    }
}
