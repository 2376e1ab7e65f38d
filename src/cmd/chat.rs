use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Result;
use tern_infer::chat::{ChatTemplate, Message};
use tern_infer::generate::{generate, tokenizer_from_file};
use tern_infer::model::{Model, State};
use tern_infer::sampling::Sampler;

use super::run::{ModelArgs, SamplingArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// A system message to start the conversation with
    #[arg(long)]
    system: Option<String>,
    /// Tokens per reply at most
    #[arg(short = 'n', long, default_value_t = 256)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// A conversation: one user message per input line, the reply streamed after it. On a
/// terminal it prompts with `> `; through a pipe it reads lines until end of input.
pub fn run(args: Args) -> Result<ExitCode> {
    let file = args.model.open()?;
    let kernels = args.model.kernels()?;
    let pool = args.model.pool();
    let model = Model::load(&file)?;
    let tokenizer = tokenizer_from_file(&file)?;
    let token = |id: Option<u32>| {
        id.and_then(|i| tokenizer.id_to_token(i))
            .unwrap_or_default()
    };
    let bos = token(file.metadata().config.bos_token_id);
    let eot = tokenizer
        .token_to_id("<|eot_id|>")
        .or(tokenizer.eos_token_ids().first().copied());
    let eos = token(eot);
    let template = match &file.metadata().chat_template {
        Some(t) => ChatTemplate::new(t, bos, eos)?,
        None => ChatTemplate::fallback(bos, eos),
    };
    let mut sampler = Sampler::new(args.sampling.params()?);
    let mut state = State::new(&model, kernels, &pool, args.model.ctx(&file)?)?;

    let mut messages: Vec<Message> = args.system.iter().map(Message::system).collect();
    // Token ids whose keys and values are in the cache, to reuse the common prefix.
    let mut cached: Vec<u32> = Vec::new();
    let interactive = std::io::stdin().is_terminal();
    let mut stdout = std::io::stdout().lock();
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            write!(stdout, "> ")?;
            stdout.flush()?;
        }
        let Some(line) = lines.next().transpose()? else {
            break;
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        messages.push(Message::user(line));
        let ids = tokenizer.encode(&template.render(&messages, true)?, true)?;
        let common = cached.iter().zip(&ids).take_while(|(a, b)| a == b).count();
        // Keep at least one token to feed, so the logits are fresh.
        let keep = common.min(ids.len() - 1);
        state.pos = keep;
        cached.truncate(keep);
        let mut stream = tokenizer.stream(true);
        let gen = generate(
            &model,
            &pool,
            &mut state,
            &ids[keep..],
            args.max_tokens,
            &mut sampler,
            tokenizer.eos_token_ids(),
            |id| {
                if let Some(text) = stream.push(id)? {
                    write!(stdout, "{text}")
                        .and_then(|_| stdout.flush())
                        .map_err(|e| {
                            tern_infer::InferError::Input(format!("writing output: {e}"))
                        })?;
                }
                Ok(true)
            },
        )?;
        if let Some(rest) = stream.finish()? {
            write!(stdout, "{rest}")?;
        }
        writeln!(stdout)?;
        // The cache holds the prompt and every generated token that was fed back (all but
        // a last one sampled when the budget ran out).
        cached.extend_from_slice(&ids[keep..]);
        cached.extend_from_slice(&gen.tokens);
        cached.truncate(state.pos);
        let reply = tokenizer.decode(&gen.tokens, true)?;
        messages.push(Message::assistant(reply.trim()));
    }
    Ok(ExitCode::SUCCESS)
}
