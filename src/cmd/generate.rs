use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use serde_json::json;
use tern_infer::generate::{generate, tokenizer_from_file};
use tern_infer::model::{Model, State};
use tern_infer::sampling::Sampler;

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
    let mut state = State::new(&model, kernels, &pool, args.model.ctx(&file));
    let prompt = tokenizer.encode(&args.prompt, true)?;

    let mut stream = tokenizer.stream(true);
    let mut stdout = std::io::stdout().lock();
    let streaming = !args.json;
    if streaming {
        write!(stdout, "{}", args.prompt)?;
        stdout.flush()?;
    }
    let gen = generate(
        &model,
        &pool,
        &mut state,
        &prompt,
        args.max_tokens,
        &mut sampler,
        tokenizer.eos_token_ids(),
        |id| {
            if streaming {
                if let Some(text) = stream.push(id)? {
                    write!(stdout, "{text}")
                        .and_then(|()| stdout.flush())
                        .map_err(tern_infer::InferError::Output)?;
                }
            }
            Ok(true)
        },
    )?;
    let text = tokenizer.decode(&gen.tokens, true)?;
    if args.json {
        let doc = json!({
            "prompt": args.prompt,
            "prompt_ids": prompt,
            "tokens": gen.tokens,
            "text": text,
            "stop": gen.stop,
            "prompt_tokens": gen.prompt_tokens,
            "generated_tokens": gen.tokens.len(),
            "prompt_seconds": gen.prompt_seconds,
            "decode_seconds": gen.decode_seconds,
            "prompt_tokens_per_second": gen.prompt_tokens_per_second(),
            "decode_tokens_per_second": gen.decode_tokens_per_second(),
            "kernel": kernels.variant(),
            "threads": pool.threads(),
        });
        writeln!(stdout, "{}", serde_json::to_string_pretty(&doc)?)?;
    } else {
        if let Some(rest) = stream.finish()? {
            write!(stdout, "{rest}")?;
        }
        writeln!(stdout)?;
        if gen.stop == tern_infer::generate::StopReason::Context {
            eprintln!(
                "stopped: the context of {} tokens is full (raise --ctx)",
                state.ctx
            );
        }
        eprintln!(
            "prompt: {} tokens, {:.1} tok/s; decode: {} tokens, {:.1} tok/s ({}, {} threads)",
            gen.prompt_tokens,
            gen.prompt_tokens_per_second(),
            gen.tokens.len(),
            gen.decode_tokens_per_second(),
            kernels.variant(),
            pool.threads()
        );
    }
    Ok(ExitCode::SUCCESS)
}
