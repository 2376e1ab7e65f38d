use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use tern_infer::pool::physical_cores;

use super::args::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed on start)
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Sequences decoded together (each holds a KV cache of --ctx positions)
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Requests that may wait for a free slot; beyond that the server answers 429
    #[arg(long, default_value_t = 16)]
    queue: usize,
    /// Largest max_tokens honoured, and the default
    #[arg(long, default_value_t = 2048)]
    max_tokens: usize,
    /// Largest request body, in bytes
    #[arg(long, default_value_t = 1 << 20)]
    max_body: usize,
    /// Seconds a request may run; then it ends with finish_reason "length"
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

/// Serves until SIGINT or SIGTERM; prints the address once listening.
pub fn run(args: Args) -> Result<ExitCode> {
    let config = tern_serve::Config {
        host: args.host,
        port: args.port,
        parallel: args.parallel,
        queue: args.queue,
        ctx: args.model.ctx,
        threads: args.model.threads.unwrap_or_else(physical_cores).max(1),
        kernels: args.model.kernels()?,
        max_body_bytes: args.max_body,
        max_tokens: args.max_tokens,
        request_timeout: Duration::from_secs(args.timeout),
    };
    let parallel = config.parallel;
    tern_serve::serve(&args.model.model, config, |addr| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "listening on http://{addr} ({parallel} slots); Ctrl-C to stop"
        );
        let _ = out.flush();
    })?;
    Ok(ExitCode::SUCCESS)
}
