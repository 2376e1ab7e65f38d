use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Result;
use tern_infer::chat::{ChatTemplate, Conversation};
use tern_infer::generate::tokenizer_from_file;
use tern_infer::model::{Model, State};
use tern_infer::sampling::Sampler;
use tern_infer::InferError;

use super::args::{ModelArgs, SamplingArgs};

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
    let template = ChatTemplate::for_file(&file, &tokenizer)?;
    let mut sampler = Sampler::new(args.sampling.params()?);
    let state = State::new(&model, kernels, &pool, args.model.ctx(&file)?)?;
    let mut chat = Conversation::new(template, &tokenizer, state, args.system.as_deref());

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
        chat.say(&model, &pool, line, args.max_tokens, &mut sampler, |text| {
            write!(stdout, "{text}")
                .and_then(|()| stdout.flush())
                .map_err(InferError::Output)
        })?;
        writeln!(stdout)?;
    }
    Ok(ExitCode::SUCCESS)
}
