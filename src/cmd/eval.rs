use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use tern_infer::eval::perplexity;
use tern_infer::generate::tokenizer_from_file;
use tern_infer::model::Model;

use super::args::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Text file whose perplexity to compute
    #[arg(long)]
    ppl: PathBuf,
    /// Positions per window, BOS included: the text is cut into windows of this size - 1
    #[arg(long, default_value_t = 256,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..))]
    window: usize,
    /// Print one JSON document
    #[arg(long)]
    json: bool,
    /// No progress bar
    #[arg(short, long)]
    quiet: bool,
}

/// Perplexity of the model over a text file.
pub fn run(args: Args) -> Result<ExitCode> {
    let file = args.model.open()?;
    let model = Model::load(&file)?;
    let kernels = args.model.kernels()?;
    let pool = args.model.pool();
    let tokenizer = tokenizer_from_file(&file)?;
    let text = tern_infer::limits::read_text_file(&args.ppl)?;
    let bar = super::count_bar(args.quiet || args.json, "evaluating", 0);
    let result = perplexity(
        &model,
        &pool,
        kernels,
        &tokenizer,
        &text,
        args.window,
        &|done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    if args.json {
        writeln!(
            std::io::stdout(),
            "{}",
            serde_json::to_string_pretty(&result)?
        )?;
    } else {
        writeln!(
            std::io::stdout(),
            "{}: perplexity {:.4} (mean NLL {:.5} nats) over {} tokens in {} windows of {}, {:.1} s ({:.0} tok/s)",
            args.ppl.display(),
            result.perplexity,
            result.mean_nll,
            result.tokens,
            result.windows,
            result.window,
            result.seconds,
            result.tokens as f64 / result.seconds.max(1e-9)
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
