//! `tern`: convert, inspect, verify and run ternary (BitNet b1.58) language models.
#![forbid(unsafe_code)]

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Ternary (BitNet b1.58) language models on the CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a Hugging Face BitNet b1.58 checkpoint (folder or cached repo id) to .tern
    Convert(cmd::convert::Args),
    /// Write a .tern file (or a Hugging Face checkpoint) as a GGUF for bitnet.cpp (I2_S) or
    /// llama.cpp (TQ2_0, TQ1_0)
    Export(cmd::export::Args),
    /// Show what a .tern file holds; --check verifies every checksum
    Inspect(cmd::inspect::Args),
    /// Generate text from a prompt
    Generate(cmd::generate::Args),
    /// Prove a conversion faithful: checksums, exact weights (--source), kernel parity
    /// with the f32 reference forward, agreement with transformers (--reference)
    Verify(cmd::verify::Args),
    /// Perplexity of the model over a text file (--ppl FILE)
    Eval(cmd::eval::Args),
    /// Measure read bandwidth, prefill and decode speed (and kernels with --kernels)
    Bench(cmd::bench::Args),
    /// Write a random model of a real shape (for benchmarks), as .tern or as a HF checkpoint
    Synth(cmd::synth::Args),
    /// Hold a conversation using the model's chat template (interactive, or lines on stdin)
    Chat(cmd::chat::Args),
    /// Serve the model over HTTP with OpenAI's API (chat, completions, streaming)
    Serve(cmd::serve::Args),
}

/// Exit codes: 0 success, 1 a check failed (damaged file, verification mismatch), 2 error.
fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Convert(args) => cmd::convert::run(args),
        Command::Export(args) => cmd::export::run(args),
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Chat(args) => cmd::chat::run(args),
        Command::Verify(args) => cmd::verify::run(args),
        Command::Synth(args) => cmd::synth::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Serve(args) => cmd::serve::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
