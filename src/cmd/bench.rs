use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use serde_json::json;
use tern_infer::bench::{
    cpu_model, fit_contexts, kernel_speeds, measure, KernelSpeed, Plan, ReadProbe, Run,
};
use tern_infer::model::Model;
use tern_infer::pool::Pool;

use super::args::{KernelArg, ModelArgs};

#[derive(clap::Args)]
pub struct Args {
    /// A .tern file
    model: std::path::PathBuf,
    /// Force a kernel (default: best for this CPU, or $TERN_KERNEL)
    #[arg(long, ignore_case = true)]
    kernel: Option<KernelArg>,
    /// Prompt tokens for the prefill measurement
    #[arg(short = 'p', long, default_value_t = 128, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    prompt: usize,
    /// Tokens decoded per decode measurement
    #[arg(short = 'n', long, default_value_t = 128, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    decode: usize,
    /// Thread counts to measure, comma-separated (default: physical cores)
    #[arg(short = 't', long, value_delimiter = ',', value_parser = super::args::parse_threads)]
    threads: Vec<usize>,
    /// Context lengths at which decode is measured
    #[arg(long, value_delimiter = ',', default_values_t = [128usize, 1024, 4096],
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    contexts: Vec<usize>,
    /// Rounds of measurements (min/median/max are reported); each round measures the
    /// bandwidth, prefill and decode back to back, so the ratios compare neighbours in time
    #[arg(long, default_value_t = 5, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    repeat: usize,
    /// MiB the read-bandwidth probe streams: far larger than the caches, or the "bandwidth"
    /// is the cache's
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    probe_mib: u64,
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

pub fn run(args: Args) -> Result<ExitCode> {
    let model_args = ModelArgs {
        model: args.model.clone(),
        threads: None,
        kernel: args.kernel,
        ctx: None,
    };
    let file = model_args.open()?;
    let model = Model::load(&file)?;
    let kernels = model_args.kernels()?;
    // Refuse what cannot fit before measuring anything (the measurements check again).
    let fits = |n: usize, what| tern_infer::limits::check_ctx(&model.config, n, 1, what);
    fits(args.prompt, "--prompt")?;
    fits(args.decode.saturating_add(1), "--decode + 1")?;
    let plan = plan(&args, model.config.max_position_embeddings as usize)?;
    let threads = if args.threads.is_empty() {
        vec![model_args.pool().threads()]
    } else {
        args.threads.clone()
    };
    let steps = threads.len() * plan.rounds * (2 + plan.contexts.len());
    let bar = super::count_bar(args.quiet || args.json, "benchmarking", steps as u64);
    let probe = ReadProbe::new(usize::try_from(args.probe_mib << 20)?).map_err(|e| {
        anyhow::anyhow!(
            "cannot allocate the {} MiB read-bandwidth probe (--probe-mib): {e}",
            args.probe_mib
        )
    })?;
    let mut runs = Vec::new();
    for &t in &threads {
        runs.push(measure(
            &model,
            &Pool::new(t.max(1)),
            kernels,
            &probe,
            &plan,
            &|| bar.inc(1),
        )?);
    }
    let kernel_table = if args.kernels {
        kernel_speeds(256 << 20)
    } else {
        Vec::new()
    };
    bar.finish_and_clear();

    let mut out = std::io::stdout().lock();
    let (cpu, weights) = (cpu_model(), model.weight_bytes_per_token());
    // Asked after the runs, which touched every weight page.
    let huge = file.huge_page_fraction();
    if args.json {
        let doc = json!({
            "model": args.model, "cpu": cpu, "kernel": kernels.variant(),
            "weight_bytes_per_token": weights, "weights_in_huge_pages": huge,
            "runs": runs, "kernels": kernel_table,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
    } else {
        let machine = format!(
            "{} on {cpu}, {} kernels",
            args.model.display(),
            kernels.variant()
        );
        print(&mut out, &machine, weights, huge, &runs, &kernel_table)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The contexts fitted to a model of `positions` positions (saying which moved), and the
/// rest of the plan.
fn plan(args: &Args, positions: usize) -> Result<Plan> {
    let fitted = fit_contexts(&args.contexts, positions, args.decode);
    anyhow::ensure!(
        !fitted.is_empty(),
        "--contexts: give at least one context length"
    );
    for f in fitted.iter().filter(|f| f.measured != f.requested) {
        eprintln!(
            "note: context {} measured at {}: the model has {positions} positions and {} tokens are decoded after the context",
            f.requested, f.measured, args.decode
        );
    }
    Ok(Plan {
        prompt: args.prompt,
        decode: args.decode,
        contexts: fitted.iter().map(|f| f.measured).collect(),
        rounds: args.repeat.max(1),
    })
}

fn print(
    out: &mut impl Write,
    machine: &str,
    weights: u64,
    huge: Option<f64>,
    runs: &[Run],
    kernel_table: &[KernelSpeed],
) -> std::io::Result<()> {
    writeln!(out, "{machine}")?;
    writeln!(
        out,
        "weights read per decoded token: {:.3} GB",
        weights as f64 / 1e9
    )?;
    if let Some(f) = huge {
        write!(out, "file mapped in 2 MiB pages: {:.0}%", 100.0 * f)?;
        if f < 0.5 {
            // Measured on machine A: 4 KiB pages cost decode a quarter of its speed.
            write!(
                out,
                " (4 KiB pages slow decode; docs/performance.md, \"Huge pages\", says how to get 2 MiB ones)"
            )?;
        }
        writeln!(out)?;
    }
    for r in runs {
        let p = &r.prefill_tokens_per_second;
        writeln!(
            out,
            "\n{} threads: read bandwidth {:.2} GB/s",
            r.threads, r.read_bandwidth_gb_per_s
        )?;
        writeln!(
            out,
            "  prefill {} tokens: {:.1} tok/s (min {:.1}, max {:.1})",
            r.prefill_tokens, p.median, p.min, p.max
        )?;
        for d in &r.decode {
            let s = &d.tokens_per_second;
            writeln!(
                out,
                "  decode at context {:>5}: {:.2} tok/s (min {:.2}, max {:.2}), {:.3} GB/token, {:.2} GB/s = {:.0}% of the bandwidth bound",
                d.context, s.median, s.min, s.max, d.bytes_per_token as f64 / 1e9, d.gb_per_s, 100.0 * d.fraction_of_bandwidth_bound
            )?;
        }
        writeln!(
            out,
            "  prefill / decode: {:.1}x (median over rounds)",
            r.prefill_over_decode
        )?;
    }
    if !kernel_table.is_empty() {
        writeln!(out, "\nkernels (1 thread, weights from memory):")?;
    }
    for k in kernel_table {
        let ops = k
            .gops
            .map_or(String::new(), |g| format!(", {g:.1} G multiply-adds/s"));
        writeln!(
            out,
            "  {:<14} {:<14} {:>12} {:>7.2} GB/s{ops}",
            k.kernel, k.isa, k.shape, k.gb_per_s
        )?;
    }
    Ok(())
}
