//! The HTTP side: OpenAI's request and response shapes, server-sent events, error objects.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use tern_infer::chat::{ChatTemplate, Message};
use tern_infer::sampling::SamplingParams;
use tern_infer::tokenizer::Tokenizer;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::engine::{Event, Finish, Job, Stats};
use crate::Config;

/// What every handler shares.
#[derive(Clone)]
pub struct App {
    pub model: String,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Arc<ChatTemplate>,
    pub jobs: Sender<Job>,
    /// Tokens that end a completion (end of sequence) and a chat reply (also end of turn).
    pub eos_tokens: Vec<u32>,
    pub turn_end: Vec<u32>,
    /// `parallel + queue` permits: one per request running or waiting.
    pub admission: Arc<Semaphore>,
    pub stats: Arc<Stats>,
    pub ctx: usize,
    /// Rows of the embedding: token ids must be below.
    pub vocab: usize,
    pub config: Config,
}

pub fn router(app: App) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "no such endpoint")
        })
        .with_state(app)
}

/// An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            code: None,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": null,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

async fn health(State(app): State<App>) -> Response {
    let s = &app.stats;
    axum::Json(json!({
        "status": if s.draining.load(Ordering::Relaxed) { "shutting_down" } else { "ok" },
        "model": app.model,
        "slots": app.config.parallel,
        "active": s.active.load(Ordering::Relaxed),
        "waiting": s.waiting.load(Ordering::Relaxed),
        "ctx": app.ctx,
    }))
    .into_response()
}

async fn models(State(app): State<App>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{"id": app.model, "object": "model", "created": 0, "owned_by": "tern"}],
    }))
    .into_response()
}

/// `stop`: one string or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A message's `content`: a string, or a list of parts of which the text ones count.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields both endpoints share. Fields this server does not use are ignored, as
/// OpenAI's clients send many; a field of the wrong type is a 400.
#[derive(Deserialize)]
struct Common {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<u64>,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    common: Common,
}

/// A completion's `prompt`: text, or token ids.
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(flatten)]
    common: Common,
}

/// Reads the body (at most `max_body_bytes`) and parses it as `T`.
async fn read_json<T: serde::de::DeserializeOwned>(app: &App, req: Request) -> Result<T, ApiError> {
    let limit = app.config.max_body_bytes;
    let bytes: Bytes = axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the request body is larger than {limit} bytes, or was cut short"),
            )
        })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        let what = if e.is_data() {
            "a field is missing or has the wrong type"
        } else {
            "the body is not valid JSON"
        };
        ApiError::invalid(format!("{what}: {e}"))
    })
}

/// Which OpenAI object a response is.
#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Completion,
}

async fn chat_completions(State(app): State<App>, req: Request) -> Result<Response, ApiError> {
    let permit = admit(&app)?;
    let body: ChatRequest = read_json(&app, req).await?;
    if body.messages.is_empty() {
        return Err(ApiError::invalid("`messages` is empty"));
    }
    let mut messages = Vec::with_capacity(body.messages.len());
    for m in body.messages {
        let text = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::invalid(format!(
                                "message content of type {kind:?} is not supported (text only)"
                            )))
                        }
                    }
                }
                text
            }
        };
        messages.push(Message::new(m.role, text));
    }
    let prompt = app
        .template
        .render(&messages, true)
        .map_err(|e| ApiError::invalid(format!("rendering the chat template: {e}")))?;
    let ids = app
        .tokenizer
        .encode(&prompt, true)
        .map_err(|e| ApiError::invalid(format!("tokenizing the prompt: {e}")))?;
    start(app, permit, Kind::Chat, ids, body.common).await
}

async fn completions(State(app): State<App>, req: Request) -> Result<Response, ApiError> {
    let permit = admit(&app)?;
    let body: CompletionRequest = read_json(&app, req).await?;
    let ids = match body.prompt {
        Prompt::Text(text) => app
            .tokenizer
            .encode(&text, true)
            .map_err(|e| ApiError::invalid(format!("tokenizing the prompt: {e}")))?,
        Prompt::Tokens(ids) => {
            let vocab = app.vocab;
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(ApiError::invalid(format!(
                    "token id {bad} is outside the vocabulary of {vocab}"
                )));
            }
            ids
        }
    };
    start(app, permit, Kind::Completion, ids, body.common).await
}

/// A place among the running and waiting requests, or 429 at once.
fn admit(app: &App) -> Result<OwnedSemaphorePermit, ApiError> {
    if app.stats.draining.load(Ordering::Relaxed) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the server is shutting down",
        ));
    }
    app.admission.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "all {} slots are busy and {} requests are waiting; retry later",
                app.config.parallel, app.config.queue
            ),
        )
        .code("rate_limit_exceeded")
    })
}

/// Validates the options, hands the job to the engine, and answers (streaming or not).
async fn start(
    app: App,
    permit: OwnedSemaphorePermit,
    kind: Kind,
    prompt: Vec<u32>,
    c: Common,
) -> Result<Response, ApiError> {
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n = 1 is supported"));
    }
    if prompt.is_empty() {
        return Err(ApiError::invalid("the prompt is empty"));
    }
    if prompt.len() >= app.ctx {
        return Err(ApiError::invalid(format!(
            "the prompt is {} tokens; the context holds {} (the prompt and at least one \
             generated token)",
            prompt.len(),
            app.ctx
        ))
        .code("context_length_exceeded"));
    }
    let room = app.ctx - prompt.len();
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        Some(0) => return Err(ApiError::invalid("max_tokens must be at least 1")),
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => app.config.max_tokens,
    }
    .min(app.config.max_tokens)
    .min(room);
    let params = SamplingParams {
        // OpenAI's defaults: temperature 1, top_p 1.
        temperature: c.temperature.unwrap_or(1.0),
        top_p: c.top_p.unwrap_or(1.0),
        seed: c.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        }),
        ..SamplingParams::default()
    };
    params
        .validate()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let stops: Vec<String> = match c.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    }
    .into_iter()
    .filter(|s| !s.is_empty())
    .collect();
    if stops.len() > 4 || stops.iter().any(|s| s.len() > 256) {
        return Err(ApiError::invalid("`stop`: at most 4 strings of 256 bytes"));
    }
    let _ = c.model; // one model is served, whatever the name asked for

    let (tx, rx) = mpsc::unbounded_channel();
    let prompt_tokens = prompt.len();
    let job = Job {
        prompt,
        params,
        max_tokens,
        stop_tokens: match kind {
            Kind::Chat => app.turn_end.clone(),
            Kind::Completion => app.eos_tokens.clone(),
        },
        deadline: Instant::now() + app.config.request_timeout,
        events: tx,
    };
    app.jobs.send(job).map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the engine has stopped",
        )
    })?;
    let reply = Reply {
        id: format!(
            "{}-{:x}",
            match kind {
                Kind::Chat => "chatcmpl",
                Kind::Completion => "cmpl",
            },
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        model: app.model.clone(),
        kind,
        prompt_tokens,
    };
    let text = TextOut::new(app.tokenizer.clone(), stops);
    if c.stream.unwrap_or(false) {
        let usage = c.stream_options.is_some_and(|o| o.include_usage);
        Ok(stream(reply, text, rx, permit, usage))
    } else {
        whole(reply, text, rx, permit).await
    }
}

/// What every response of one request shares.
struct Reply {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_tokens: usize,
}

impl Reply {
    fn usage(&self, completion: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    /// One choice: a message (chat), a delta (chat chunk) or text (completion).
    fn choice(&self, chunk: bool, text: Option<&str>, finish: Option<Finish>) -> Value {
        let finish = finish.map(Finish::as_str);
        match (self.kind, chunk) {
            (Kind::Chat, false) => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text.unwrap_or("")},
                "logprobs": null,
                "finish_reason": finish,
            }),
            (Kind::Chat, true) => json!({
                "index": 0,
                "delta": match text { Some(t) => json!({"content": t}), None => json!({}) },
                "logprobs": null,
                "finish_reason": finish,
            }),
            (Kind::Completion, _) => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish,
            }),
        }
    }

    fn document(&self, chunk: bool, choices: Value, usage: Option<Value>) -> Value {
        let mut doc = json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            doc["usage"] = u;
        }
        doc
    }
}

/// Generated text as it can be shown: detokenized incrementally, cut at the first stop
/// string, and holding back a tail that might be the start of one.
struct TextOut {
    tokenizer: Arc<Tokenizer>,
    ids: Vec<u32>,
    /// `decode(ids)` as far as it is whole characters.
    text: String,
    shown: usize,
    stops: Vec<String>,
    stopped: bool,
}

impl TextOut {
    fn new(tokenizer: Arc<Tokenizer>, stops: Vec<String>) -> Self {
        TextOut {
            tokenizer,
            ids: Vec::new(),
            text: String::new(),
            shown: 0,
            stops,
            stopped: false,
        }
    }

    /// Adds a token; returns the text that may be shown now.
    fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, true).unwrap_or_default();
        // Wait for the rest of a character split over tokens.
        if !text.ends_with('\u{FFFD}') {
            self.text = text;
        }
        self.release(false)
    }

    /// The rest, at the end of generation.
    fn finish(&mut self) -> String {
        if let Ok(text) = self.tokenizer.decode(&self.ids, true) {
            self.text = text;
        }
        self.release(true)
    }

    fn release(&mut self, all: bool) -> String {
        if self.stopped {
            return String::new();
        }
        let from = self.shown.min(self.text.len());
        if !self.text.is_char_boundary(from) {
            return String::new();
        }
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()))
            .min();
        let end = match found {
            Some(at) => {
                self.stopped = true;
                self.shown + at
            }
            None if all => self.text.len(),
            None => {
                let hold = self.stops.iter().map(|s| s.len() - 1).max().unwrap_or(0);
                let mut end = self.text.len().saturating_sub(hold).max(self.shown);
                while !self.text.is_char_boundary(end) {
                    end -= 1;
                }
                end
            }
        };
        if end <= self.shown || end > self.text.len() {
            return String::new();
        }
        let out = self.text[self.shown..end].to_string();
        self.shown = end;
        out
    }
}

/// Collects the whole generation into one response.
async fn whole(
    reply: Reply,
    mut text: TextOut,
    mut rx: mpsc::UnboundedReceiver<Event>,
    permit: OwnedSemaphorePermit,
) -> Result<Response, ApiError> {
    let mut content = String::new();
    let mut tokens = 0;
    let finish = loop {
        match rx.recv().await {
            Some(Event::Started) => {}
            Some(Event::Token(id)) => {
                tokens += 1;
                content.push_str(&text.push(id));
                if text.stopped {
                    break Finish::Stop;
                }
            }
            Some(Event::Done(f)) => {
                content.push_str(&text.finish());
                break if text.stopped { Finish::Stop } else { f };
            }
            Some(Event::Error(e)) => return Err(engine_error(e)),
            None => return Err(engine_error("the engine dropped the request".into())),
        }
    };
    drop(rx); // a stop string ended it: the engine frees the slot at its next step
    drop(permit);
    let choice = reply.choice(false, Some(&content), Some(finish));
    Ok(
        axum::Json(reply.document(false, json!([choice]), Some(reply.usage(tokens))))
            .into_response(),
    )
}

fn engine_error(message: String) -> ApiError {
    let status = if message.contains("shutting down") {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    ApiError::new(status, "server_error", message)
}

/// Streams the generation as server-sent events, OpenAI's chunks ending in
/// `data: [DONE]`. A task turns engine events into chunks on a bounded channel: a slow
/// reader only slows its own task; a reader that goes away drops the body, the task's
/// send fails, and dropping its receiver tells the engine to free the slot.
fn stream(
    reply: Reply,
    mut text: TextOut,
    mut rx: mpsc::UnboundedReceiver<Event>,
    permit: OwnedSemaphorePermit,
    include_usage: bool,
) -> Response {
    let (out, body) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let _permit = permit;
        let sse = |v: Value| Bytes::from(format!("data: {v}\n\n"));
        let mut tokens = 0;
        if let Kind::Chat = reply.kind {
            let first = json!({"index": 0, "delta": {"role": "assistant", "content": ""},
                               "logprobs": null, "finish_reason": null});
            if out
                .send(sse(reply.document(true, json!([first]), None)))
                .await
                .is_err()
            {
                return;
            }
        }
        let finish = loop {
            let (piece, finish) = match rx.recv().await {
                Some(Event::Started) => continue,
                Some(Event::Token(id)) => {
                    tokens += 1;
                    let piece = text.push(id);
                    (piece, text.stopped.then_some(Finish::Stop))
                }
                Some(Event::Done(f)) => {
                    let piece = text.finish();
                    (piece, Some(if text.stopped { Finish::Stop } else { f }))
                }
                Some(Event::Error(e)) => {
                    let _ = out.send(sse(engine_error(e).body())).await;
                    return;
                }
                None => return,
            };
            if !piece.is_empty() {
                let choice = reply.choice(true, Some(&piece), None);
                if out
                    .send(sse(reply.document(true, json!([choice]), None)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if let Some(f) = finish {
                break f;
            }
        };
        drop(rx);
        let choice = reply.choice(true, None, Some(finish));
        let _ = out
            .send(sse(reply.document(true, json!([choice]), None)))
            .await;
        if include_usage {
            let doc = reply.document(true, json!([]), Some(reply.usage(tokens)));
            let _ = out.send(sse(doc)).await;
        }
        let _ = out.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    let chunks = futures_util::stream::unfold(body, |mut body| async move {
        body.recv().await.map(|b| (Ok::<_, Infallible>(b), body))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(chunks))
        .expect("a valid response")
}
