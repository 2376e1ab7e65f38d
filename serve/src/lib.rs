//! tern-serve: an OpenAI-compatible HTTP server over tern-infer, with batched decode.
//!
//! - [`engine`]: one thread owning the model; the active sequences advance together, one
//!   batched decode step at a time (`tern_infer::batch`), joining and leaving between steps.
//! - [`api`]: the HTTP side (axum on tokio): `POST /v1/chat/completions`,
//!   `POST /v1/completions`, `GET /v1/models`, `GET /health`, OpenAI's JSON and
//!   server-sent-event formats and error objects.
//!
//! Admission: `parallel` sequences run at once and `queue` more may wait for a slot; a
//! request beyond that is refused at once with 429 (`Retry-After: 1`), so a burst never
//! piles up unbounded work. Every size is bounded: the request body (`max_body_bytes`),
//! the prompt (the context), `max_tokens` (clamped to `max_tokens` of the config and to the
//! room left in the context), and the time a request may run (`request_timeout`: then it
//! ends with `finish_reason: "length"`).

pub mod api;
pub mod engine;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tern_format::TernFile;
use tern_infer::batch::Batch;
use tern_infer::chat::ChatTemplate;
use tern_infer::generate::tokenizer_from_file;
use tern_infer::kernels::Kernels;
use tern_infer::model::{Model, State};
use tern_infer::pool::Pool;

/// How to serve.
#[derive(Clone, Debug)]
pub struct Config {
    pub host: String,
    /// 0 picks a free port (printed on start).
    pub port: u16,
    /// Sequences decoded together at most.
    pub parallel: usize,
    /// Requests that may wait for a slot; more are refused with 429.
    pub queue: usize,
    /// Context per sequence (default: the model's max positions).
    pub ctx: Option<usize>,
    pub threads: usize,
    pub kernels: Kernels,
    pub max_body_bytes: usize,
    /// Largest `max_tokens` honoured (also the default).
    pub max_tokens: usize,
    pub request_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Infer(#[from] tern_infer::InferError),
    #[error(transparent)]
    Format(#[from] tern_format::Error),
    #[error("{0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// Opens `path`, binds `config.host:config.port`, calls `on_listen` with the bound address,
/// and serves until SIGINT or SIGTERM. On a signal it stops accepting, refuses waiting
/// requests (503), lets the running ones finish (each is bounded by `max_tokens` and
/// `request_timeout`), and returns.
pub fn serve(
    path: &Path,
    config: Config,
    on_listen: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    if config.parallel == 0 || config.parallel > Batch::max() {
        return Err(ServeError::Config(format!(
            "--parallel {}: between 1 and {}",
            config.parallel,
            Batch::max()
        )));
    }
    if config.max_tokens == 0 {
        return Err(ServeError::Config("--max-tokens must be at least 1".into()));
    }
    let file = TernFile::open(path)?;
    let meta = file.metadata();
    let ctx = match config.ctx {
        // Bounded like every command's --ctx: the model's positions, the machine's memory.
        Some(ctx) => tern_infer::limits::check_ctx(&meta.config, ctx, config.threads, "--ctx")?,
        None => meta.config.max_position_embeddings as usize,
    };
    let tokenizer = tokenizer_from_file(&file)?;
    let token = |id: Option<u32>| {
        id.and_then(|i| tokenizer.id_to_token(i))
            .unwrap_or_default()
    };
    let bos = token(meta.config.bos_token_id);
    let eot = tokenizer
        .token_to_id("<|eot_id|>")
        .or(tokenizer.eos_token_ids().first().copied());
    let eos = token(eot);
    let template = match &meta.chat_template {
        Some(t) => ChatTemplate::new(t, bos, eos).map_err(tern_infer::InferError::from)?,
        None => ChatTemplate::fallback(bos, eos),
    };
    // Completions stop where `tern generate` does; chat also at the end of a turn.
    let eos_tokens = tokenizer.eos_token_ids().to_vec();
    let mut turn_end = eos_tokens.clone();
    turn_end.extend(eot.filter(|t| !eos_tokens.contains(t)));
    let model_name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tern".into());

    let stats = Arc::new(engine::Stats::default());
    let (jobs_tx, jobs_rx) = std::sync::mpsc::channel();
    let app = api::App {
        model: model_name,
        tokenizer: Arc::new(tokenizer),
        template: Arc::new(template),
        jobs: jobs_tx,
        admission: Arc::new(tokio::sync::Semaphore::new(config.parallel + config.queue)),
        stats: stats.clone(),
        eos_tokens,
        turn_end,
        ctx,
        vocab: meta.config.vocab_size as usize,
        config: config.clone(),
    };

    std::thread::scope(|scope| -> Result<(), ServeError> {
        let pool = Pool::new(config.threads.max(1));
        let model = Model::load(&file)?;
        let states = (0..config.parallel)
            .map(|_| State::new(&model, config.kernels, &pool, ctx))
            .collect::<Result<Vec<_>, _>>()?;
        let batch = Batch::new(&model, config.kernels, &pool, ctx)?;
        let engine_stats = stats.clone();
        let engine =
            scope.spawn(move || engine::run(&model, &pool, states, batch, jobs_rx, engine_stats));
        let served = run_http(app, &config, on_listen, stats);
        // The app (and its job sender) is gone: the engine ends once its sequences do.
        engine
            .join()
            .map_err(|_| ServeError::Config("the engine thread panicked".into()))?;
        served
    })
}

fn run_http(
    app: api::App,
    config: &Config,
    on_listen: impl FnOnce(SocketAddr),
    stats: Arc<engine::Stats>,
) -> Result<(), ServeError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| ServeError::Io { what, source }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io("starting the async runtime"))?;
    let addr = format!("{}:{}", config.host, config.port);
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(io(&format!("binding {addr}")))?;
        let signal = shutdown_signal().map_err(io("installing the signal handlers"))?;
        on_listen(
            listener
                .local_addr()
                .map_err(io("reading the bound address"))?,
        );
        axum::serve(listener, api::router(app))
            .with_graceful_shutdown(async move {
                signal.await;
                stats
                    .draining
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            })
            .await
            .map_err(io("serving"))
    })
}

/// Installs the SIGINT and (on Unix) SIGTERM handlers now, so that a signal arriving
/// as soon as the address is announced is not missed, and returns a future that
/// resolves on the first of them.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {},
                _ = terminate.recv() => {},
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
