use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use serde_json::json;
use tern_infer::generate::{generate_text, tokenizer_from_file, Generation, StopReason};
use tern_infer::model::{Model, State};
use tern_infer::sampling::Sampler;
use tern_infer::InferError;

use super::args::{ModelArgs, SamplingArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt
    #[arg(short, long)]
    prompt: String,
    /// Tokens to generate at most
    #[arg(short = 'n', long, default_value_t = 64)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print one JSON document (tokens, text, timings) instead of streaming text
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    if args.prompt.is_empty() {
        anyhow::bail!("the prompt is empty: give some text with -p");
    }
    let file = args.model.open()?;
    let kernels = args.model.kernels()?;
    let pool = args.model.pool();
    let model = Model::load(&file)?;
    let tokenizer = tokenizer_from_file(&file)?;
    let mut sampler = Sampler::new(args.sampling.params()?);
    let mut state = State::new(&model, kernels, &pool, args.model.ctx(&file)?)?;
    let prompt = tokenizer.encode(&args.prompt, true)?;

    let mut stdout = std::io::stdout().lock();
    let streaming = !args.json;
    if streaming {
        write!(stdout, "{}", args.prompt)?;
        stdout.flush()?;
    }
    let gen = generate_text(
        &model,
        &pool,
        &mut state,
        &tokenizer,
        &prompt,
        args.max_tokens,
        &mut sampler,
        |text| {
            if streaming {
                write!(stdout, "{text}")
                    .and_then(|()| stdout.flush())
                    .map_err(InferError::Output)?;
            }
            Ok(())
        },
    )?;
    if args.json {
        let text = tokenizer.decode(&gen.tokens, true)?;
        let doc = json_report(
            &args.prompt,
            &prompt,
            &gen,
            &text,
            kernels.variant(),
            pool.threads(),
        );
        writeln!(stdout, "{}", serde_json::to_string_pretty(&doc)?)?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "{}",
            summary(&gen, state.ctx, kernels.variant(), pool.threads())
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The `--json` document: tokens, text, stop reason, timings.
fn json_report(
    prompt: &str,
    prompt_ids: &[u32],
    gen: &Generation,
    text: &str,
    kernel: &str,
    threads: usize,
) -> serde_json::Value {
    json!({
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "tokens": gen.tokens,
        "text": text,
        "stop": gen.stop,
        "prompt_tokens": gen.prompt_tokens,
        "generated_tokens": gen.tokens.len(),
        "prompt_seconds": gen.prompt_seconds,
        "decode_seconds": gen.decode_seconds,
        "prompt_tokens_per_second": gen.prompt_tokens_per_second(),
        "decode_tokens_per_second": gen.decode_tokens_per_second(),
        "kernel": kernel,
        "threads": threads,
    })
}

/// What a person sees on stderr after the text: why it stopped early, and the speeds.
fn summary(gen: &Generation, ctx: usize, kernel: &str, threads: usize) -> String {
    let stopped = if gen.stop == StopReason::Context {
        format!("stopped: the context of {ctx} tokens is full (raise --ctx)\n")
    } else {
        String::new()
    };
    format!(
        "{stopped}prompt: {} tokens, {:.1} tok/s; decode: {} tokens, {:.1} tok/s ({kernel}, {threads} threads)",
        gen.prompt_tokens,
        gen.prompt_tokens_per_second(),
        gen.tokens.len(),
        gen.decode_tokens_per_second(),
    )
}
