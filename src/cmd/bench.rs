use std::process::ExitCode;

use anyhow::Result;
use serde::Serialize;
use serde_json::json;
use tern_infer::bench::{
    bytes_per_token, kernel_speeds, time_decode, time_prefill, KernelSpeed, ReadProbe,
};
use tern_infer::model::Model;
use tern_infer::pool::Pool;

use super::run::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    /// A .tern file
    model: std::path::PathBuf,
    /// Force a kernel: scalar, avx2, avx512, neon (default: best for this CPU)
    #[arg(long)]
    kernel: Option<String>,
    /// Prompt tokens for the prefill measurement
    #[arg(short = 'p', long, default_value_t = 128, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    prompt: usize,
    /// Tokens decoded per decode measurement
    #[arg(short = 'n', long, default_value_t = 128, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    decode: usize,
    /// Thread counts to measure, comma-separated (default: physical cores)
    #[arg(short = 't', long, value_delimiter = ',', value_parser = super::run::parse_threads)]
    threads: Vec<usize>,
    /// Context lengths at which decode is measured
    #[arg(long, value_delimiter = ',', default_values_t = [128usize, 1024, 4096],
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    contexts: Vec<usize>,
    /// Rounds of measurements (min/median/max are reported); each round measures the
    /// bandwidth, prefill and decode back to back, so the ratios compare neighbours in time
    #[arg(long, default_value_t = 5, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    repeat: usize,
    /// Also measure every kernel on every ISA this CPU has
    #[arg(long)]
    kernels: bool,
    /// Print one JSON document
    #[arg(long)]
    json: bool,
    /// No progress bar
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Serialize)]
struct Spread {
    min: f64,
    median: f64,
    max: f64,
}

fn spread(mut v: Vec<f64>) -> Spread {
    v.sort_by(f64::total_cmp);
    Spread {
        min: v[0],
        median: v[v.len() / 2],
        max: v[v.len() - 1],
    }
}

#[derive(Serialize)]
struct Decode {
    context: usize,
    tokens_per_second: Spread,
    bytes_per_token: u64,
    /// At the median tokens/s.
    gb_per_s: f64,
    /// Median over rounds of the decode's GB/s over the same round's read bandwidth.
    fraction_of_bandwidth_bound: f64,
}

#[derive(Serialize)]
struct Run {
    threads: usize,
    /// Median over rounds.
    read_bandwidth_gb_per_s: f64,
    prefill_tokens: usize,
    prefill_tokens_per_second: Spread,
    /// Median over rounds of prefill tokens/s over the same round's decode tokens/s at the
    /// first context.
    prefill_over_decode: f64,
    decode: Vec<Decode>,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let model_args = ModelArgs {
        model: args.model.clone(),
        threads: None,
        kernel: args.kernel.clone(),
        ctx: None,
    };
    let file = model_args.open()?;
    let model = Model::load(&file)?;
    let kernels = model_args.kernels()?;
    // Refuse what cannot fit before measuring anything (the measurements check again).
    let fits = |n: usize, what| tern_infer::limits::check_ctx(&model.config, n, 1, what);
    fits(args.prompt, "--prompt")?;
    fits(args.decode.saturating_add(1), "--decode + 1")?;
    let max_ctx = model.config.max_position_embeddings as usize;
    // A context too long for the model is measured at the longest that fits the decoded
    // tokens (2B-4T: 4096 positions, so "4096" runs at 4096 − n − 1), and says so.
    let limit = max_ctx.saturating_sub(args.decode.saturating_add(1));
    let mut contexts: Vec<usize> = Vec::new();
    for &c in &args.contexts {
        let fit = c.min(limit);
        if fit != c {
            eprintln!(
                "note: context {c} measured at {fit}: the model has {max_ctx} positions and \
                 {} tokens are decoded after the context",
                args.decode
            );
        }
        if !contexts.contains(&fit) {
            contexts.push(fit);
        }
    }
    anyhow::ensure!(
        !contexts.is_empty(),
        "--contexts: give at least one context length"
    );
    let threads = if args.threads.is_empty() {
        vec![model_args.pool().threads()]
    } else {
        args.threads.clone()
    };
    let repeat = args.repeat.max(1);
    let steps = threads.len() * repeat * (2 + contexts.len());
    let bar = super::count_bar(args.quiet || args.json, "benchmarking", steps as u64);
    let cpu = cpu_model();
    let probe = ReadProbe::new(1 << 30);
    let bytes: Vec<u64> = contexts
        .iter()
        .map(|&c| bytes_per_token(&model, c + args.decode / 2))
        .collect();
    let median = |v: Vec<f64>| spread(v).median;

    let mut runs = Vec::new();
    for &t in &threads {
        let pool = Pool::new(t.max(1));
        // Rounds of (bandwidth, prefill, decode at each context), so that each decode is
        // compared with the bandwidth and prefill measured next to it in time.
        let (mut bandwidth, mut prefill) = (Vec::new(), Vec::new());
        let mut decode = vec![Vec::new(); contexts.len()];
        for _ in 0..repeat {
            bandwidth.push(probe.measure(&pool, 3));
            bar.inc(1);
            prefill.push(args.prompt as f64 / time_prefill(&model, &pool, kernels, args.prompt)?);
            bar.inc(1);
            for (tps, &ctx) in decode.iter_mut().zip(&contexts) {
                tps.push(1.0 / time_decode(&model, &pool, kernels, ctx, args.decode)?);
                bar.inc(1);
            }
        }
        let fraction = |tps: &[f64], bytes: u64| {
            median(
                tps.iter()
                    .zip(&bandwidth)
                    .map(|(t, bw)| t * bytes as f64 / 1e9 / bw)
                    .collect(),
            )
        };
        let ratio = median(prefill.iter().zip(&decode[0]).map(|(p, d)| p / d).collect());
        let decode = contexts
            .iter()
            .zip(&bytes)
            .zip(&decode)
            .map(|((&context, &bytes), tps)| {
                let s = spread(tps.clone());
                Decode {
                    context,
                    bytes_per_token: bytes,
                    gb_per_s: s.median * bytes as f64 / 1e9,
                    fraction_of_bandwidth_bound: fraction(tps, bytes),
                    tokens_per_second: s,
                }
            })
            .collect();
        runs.push(Run {
            threads: pool.threads(),
            read_bandwidth_gb_per_s: median(bandwidth),
            prefill_tokens: args.prompt,
            prefill_tokens_per_second: spread(prefill),
            prefill_over_decode: ratio,
            decode,
        });
    }
    let kernel_table: Vec<KernelSpeed> = if args.kernels {
        kernel_speeds(256 << 20)
    } else {
        Vec::new()
    };
    bar.finish_and_clear();

    if args.json {
        let doc = json!({
            "model": args.model,
            "cpu": cpu,
            "kernel": kernels.variant(),
            "weight_bytes_per_token": model.weight_bytes_per_token(),
            "runs": runs,
            "kernels": kernel_table,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} on {cpu}, {} kernels",
        args.model.display(),
        kernels.variant()
    );
    println!(
        "weights read per decoded token: {:.3} GB",
        model.weight_bytes_per_token() as f64 / 1e9
    );
    for r in &runs {
        let p = &r.prefill_tokens_per_second;
        println!(
            "\n{} threads: read bandwidth {:.2} GB/s",
            r.threads, r.read_bandwidth_gb_per_s
        );
        println!(
            "  prefill {} tokens: {:.1} tok/s (min {:.1}, max {:.1})",
            r.prefill_tokens, p.median, p.min, p.max
        );
        for d in &r.decode {
            let s = &d.tokens_per_second;
            println!(
                "  decode at context {:>5}: {:.2} tok/s (min {:.2}, max {:.2}), {:.3} GB/token, {:.2} GB/s = {:.0}% of the bandwidth bound",
                d.context, s.median, s.min, s.max, d.bytes_per_token as f64 / 1e9, d.gb_per_s, 100.0 * d.fraction_of_bandwidth_bound
            );
        }
        println!(
            "  prefill / decode: {:.1}x (median over rounds)",
            r.prefill_over_decode
        );
    }
    if !kernel_table.is_empty() {
        println!("\nkernels (1 thread, weights from memory):");
        for k in &kernel_table {
            let ops = k
                .gops
                .map_or(String::new(), |g| format!(", {g:.1} G multiply-adds/s"));
            println!(
                "  {:<14} {:<14} {:>12} {:>7.2} GB/s{ops}",
                k.kernel, k.isa, k.shape, k.gb_per_s
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The CPU model from /proc/cpuinfo, to record beside every figure.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}
