//! `tern serve` over loopback, and batched decode against decoding alone.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tern_format::TernFile;
use tern_infer::batch::Batch;
use tern_infer::kernels::Kernels;
use tern_infer::model::{Logits, Model, State};
use tern_infer::pool::Pool;
use tern_infer::reference::NoProbe;
use tern_infer::sampling::argmax;

use crate::common::*;

/// Greedy decoding of `n` tokens after `prompt`, one sequence alone: each token with the
/// bits of the logits it was chosen from.
fn alone(model: &Model, pool: &Pool, prompt: &[u32], n: usize) -> Vec<(u32, Vec<u32>)> {
    let vocab = model.config.vocab_size as usize;
    let mut state = State::new(model, *Kernels::best(), pool, 128).unwrap();
    model
        .forward(pool, &mut state, prompt, Logits::Last, &mut NoProbe)
        .unwrap();
    let mut got = vec![];
    for _ in 0..n {
        let next = argmax(&state.logits[..vocab]) as u32;
        got.push((next, bits(&state.logits[..vocab])));
        model
            .forward(pool, &mut state, &[next], Logits::Last, &mut NoProbe)
            .unwrap();
    }
    got
}

fn bits(logits: &[f32]) -> Vec<u32> {
    logits.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn batched_decode_is_bit_identical_to_decoding_alone() {
    let dir = tempfile::tempdir().unwrap();
    batched_equals_alone(&default_model(dir.path()));
    // Dense linears (modules_to_not_convert) and an untied bf16 head.
    batched_equals_alone(&convert("llama-dense-linears", dir.path()));
}

fn batched_equals_alone(path: &Path) {
    let file = TernFile::open(path).unwrap();
    let model = Model::load(&file).unwrap();
    let vocab = model.config.vocab_size as usize;
    let tokenizer = tern_infer::generate::tokenizer_from_file(&file).unwrap();
    let prompts = [
        "The cat",
        "Once upon a time there was a little girl who",
        "What is the matter",
        "In the morning the sun",
        "He said",
    ];
    let steps = 12;
    for threads in [1, 2] {
        let pool = Pool::new(threads);
        let ids: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| tokenizer.encode(p, true).unwrap())
            .collect();
        let want: Vec<Vec<(u32, Vec<u32>)>> =
            ids.iter().map(|p| alone(&model, &pool, p, steps)).collect();
        // Sequence i joins at step i (continuous batching), so the batch grows, then
        // shrinks as the first ones finish.
        let mut states: Vec<State> = ids
            .iter()
            .map(|_| State::new(&model, *Kernels::best(), &pool, 128).unwrap())
            .collect();
        let mut got: Vec<Vec<(u32, Vec<u32>)>> = vec![vec![]; ids.len()];
        let mut batch = Batch::new(&model, *Kernels::best(), &pool, 128).unwrap();
        for step in 0..steps + ids.len() {
            if step < ids.len() {
                model
                    .forward(
                        &pool,
                        &mut states[step],
                        &ids[step],
                        Logits::Last,
                        &mut NoProbe,
                    )
                    .unwrap();
            }
            let mut members = vec![];
            for (i, st) in states.iter().enumerate() {
                if i <= step && got[i].len() < steps {
                    let next = argmax(&st.logits[..vocab]) as u32;
                    members.push((i, next));
                }
            }
            for &(i, next) in &members {
                got[i].push((next, bits(&states[i].logits[..vocab])));
            }
            let tokens: Vec<u32> = members.iter().map(|m| m.1).collect();
            let mut seqs: Vec<&mut State> = states
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| members.iter().any(|m| m.0 == *i))
                .map(|(_, s)| s)
                .collect();
            batch
                .decode_step(&model, &pool, &mut seqs, &tokens)
                .unwrap();
        }
        for (i, (got, want)) in got.iter().zip(&want).enumerate() {
            let step = got.iter().zip(want).position(|(g, w)| g != w);
            assert!(
                got.len() == want.len() && step.is_none(),
                "{threads} threads, sequence {i}: batched decode differs from alone at step \
                 {step:?} (tokens {:?} vs {:?})",
                got.iter().map(|g| g.0).collect::<Vec<_>>(),
                want.iter().map(|w| w.0).collect::<Vec<_>>()
            );
        }
    }
}

/// A `tern serve` child on an ephemeral loopback port, killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["serve", model.to_str().unwrap(), "--port", "0", "-t", "2"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tern serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        Server { child, addr }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s
    }

    /// One request with `Connection: close`; returns the status and the (de-chunked) body.
    fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        let mut s = self.connect();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        (
            status,
            if chunked {
                dechunk(body)
            } else {
                body.to_string()
            },
        )
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.request("POST", path, body.to_string().as_bytes());
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Starts a streamed completion and returns its connection once the response has begun
    /// (the rest is left unread: the client is slow or goes away).
    fn open_stream(&self, body: &Value) -> TcpStream {
        let body = body.to_string();
        let mut s = self.connect();
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut head = [0u8; 64];
        let n = s.read(&mut head).unwrap();
        assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
        s
    }

    /// A streamed request: the `data:` payloads in order.
    fn events(&self, path: &str, body: &Value) -> Vec<String> {
        let (status, text) = self.request("POST", path, body.to_string().as_bytes());
        assert_eq!(status, 200, "{text}");
        text.split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let Some((size, rest)) = body.split_once("\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
}

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": "default",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 12,
        "temperature": 0,
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

#[test]
fn serves_chat_completions_models_and_health() {
    let dir = tempfile::tempdir().unwrap();
    let path = default_model(dir.path());
    let server = Server::start(&path, &["--parallel", "2"]);

    let (status, health) = server.request("GET", "/health", b"");
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&health).unwrap()["status"],
        "ok"
    );
    let (status, models) = server.request("GET", "/v1/models", b"");
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&models).unwrap()["data"][0]["id"],
        "default"
    );

    // Not streamed.
    let (status, doc) = server.post(
        "/v1/chat/completions",
        &chat("Hello, who are you?", json!({})),
    );
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["object"], "chat.completion");
    let text = doc["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(doc["choices"][0]["message"]["role"], "assistant");
    let usage = &doc["usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&completion), "{usage}");
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 5);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion
    );
    let finish = doc["choices"][0]["finish_reason"].as_str().unwrap();
    assert_eq!(finish == "length", completion == 12, "{doc}");

    // Streamed: the same text in chunks, a finish reason, usage, then [DONE].
    let events = server.events(
        "/v1/chat/completions",
        &chat(
            "Hello, who are you?",
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
    );
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&json!(finish)]);
    assert_eq!(chunks.last().unwrap()["usage"], *usage);

    // A stop string ends the text before it.
    if text.len() > 4 {
        let stop = &text[2..4];
        let (_, doc) = server.post(
            "/v1/chat/completions",
            &chat("Hello, who are you?", json!({"stop": [stop]})),
        );
        let cut = doc["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(cut, &text[..text.find(stop).unwrap()]);
        assert_eq!(doc["choices"][0]["finish_reason"], "stop");
    }
}

#[test]
fn greedy_completion_equals_tern_generate_and_concurrent_requests_match_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = default_model(dir.path());
    let prompts = [
        "What is the matter",
        "The little dog",
        "Once upon a time",
        "She",
    ];
    let generated: Vec<Value> = prompts
        .iter()
        .map(|p| {
            let out = tern_ok(&[
                "generate",
                path.to_str().unwrap(),
                "-p",
                p,
                "-n",
                "16",
                "-t",
                "2",
                "--json",
            ]);
            serde_json::from_str(&out).unwrap()
        })
        .collect();
    let server = Server::start(&path, &["--parallel", "4"]);
    let request = |p: &str| json!({"prompt": p, "max_tokens": 16, "temperature": 0.0, "seed": 1});
    // Alone, one after another.
    for (p, g) in prompts.iter().zip(&generated) {
        let (status, doc) = server.post("/v1/completions", &request(p));
        assert_eq!(status, 200, "{doc}");
        assert_eq!(doc["object"], "text_completion");
        assert_eq!(doc["choices"][0]["text"], g["text"], "{p:?}");
        assert_eq!(doc["usage"]["completion_tokens"], g["generated_tokens"]);
        assert_eq!(doc["usage"]["prompt_tokens"], g["prompt_tokens"]);
    }
    // All at once, twice over (8 requests on 4 slots: some wait in the queue).
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (server, p) = (&server, prompts[i % prompts.len()]);
                scope.spawn(move || (i, server.post("/v1/completions", &request(p))))
            })
            .collect();
        for h in handles {
            let (i, (status, doc)) = h.join().unwrap();
            assert_eq!(status, 200, "{doc}");
            assert_eq!(
                doc["choices"][0]["text"],
                generated[i % prompts.len()]["text"],
                "request {i} in a batch"
            );
        }
    });
}

#[test]
fn long_prompts_prefilled_between_decode_steps_match_alone() {
    // Prompts of several prefill chunks join while another sequence decodes: the engine
    // prefills them a chunk at a time between that sequence's steps. Every answer must be
    // what the same request gets alone.
    let dir = tempfile::tempdir().unwrap();
    let path = default_model(dir.path());
    // A context (the model's 1024 positions) and budget long enough that the first stream
    // does not end during the test.
    let server = Server::start(
        &path,
        &["--parallel", "3", "--ctx", "1024", "--max-tokens", "50000"],
    );
    let long = |topic: &str| {
        format!("The little dog ran to the {topic} and saw a big red ball there. ").repeat(24)
    };
    let prompts = [long("park"), long("river")];
    let request = |p: &str, n: usize, stream: bool| json!({"prompt": p, "max_tokens": n, "temperature": 0.0, "stream": stream});
    let alone: Vec<Value> = prompts
        .iter()
        .map(|p| {
            let (status, doc) = server.post("/v1/completions", &request(p, 24, false));
            assert_eq!(status, 200, "{doc}");
            assert!(
                doc["usage"]["prompt_tokens"].as_u64().unwrap() > 128,
                "{doc}"
            );
            doc
        })
        .collect();
    // A stream that decodes for the whole test; the long prompts arrive once it has begun.
    let s = server.open_stream(&request("Once upon a time", 50_000, true));
    std::thread::scope(|scope| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| scope.spawn(|| server.post("/v1/completions", &request(p, 24, false))))
            .collect();
        for (h, want) in handles.into_iter().zip(&alone) {
            let (status, doc) = h.join().unwrap();
            assert_eq!(status, 200, "{doc}");
            assert_eq!(doc["choices"][0]["text"], want["choices"][0]["text"]);
        }
    });
    drop(s);
}

#[test]
fn malformed_requests_get_openai_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = default_model(dir.path());
    let server = Server::start(&path, &["--ctx", "64", "--max-body", "4096"]);
    let error = |status: u16, text: &str| {
        let doc: Value = serde_json::from_str(text).unwrap_or_else(|_| panic!("{text}"));
        assert!(doc["error"]["message"].as_str().is_some(), "{doc}");
        assert!(doc["error"]["type"].as_str().is_some(), "{doc}");
        (status, doc)
    };
    let (status, _) = {
        let (s, t) = server.request("POST", "/v1/chat/completions", b"{not json");
        error(s, &t)
    };
    assert_eq!(status, 400);
    let (s, t) = server.request(
        "POST",
        "/v1/chat/completions",
        json!({"messages": "hello"}).to_string().as_bytes(),
    );
    assert_eq!(error(s, &t).0, 400);
    let (s, t) = server.request(
        "POST",
        "/v1/completions",
        json!({"prompt": "hi", "max_tokens": "ten"})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(error(s, &t).0, 400);
    let (s, t) = server.request(
        "POST",
        "/v1/completions",
        json!({"prompt": "hi", "temperature": -1})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(error(s, &t).0, 400);
    // A prompt longer than the context.
    let long = "the cat sat on the mat ".repeat(30);
    let (s, t) = server.request(
        "POST",
        "/v1/completions",
        json!({"prompt": long}).to_string().as_bytes(),
    );
    let (s, doc) = error(s, &t);
    assert_eq!(s, 400);
    assert_eq!(doc["error"]["code"], "context_length_exceeded");
    // A body over the limit.
    let big = json!({"prompt": "x".repeat(10_000)}).to_string();
    let (s, t) = server.request("POST", "/v1/completions", big.as_bytes());
    assert_eq!(error(s, &t).0, 413);
    let (s, t) = server.request("GET", "/v1/nothing", b"");
    assert_eq!(error(s, &t).0, 404);
}

#[test]
fn a_dropped_stream_frees_its_slot_and_a_full_server_answers_429() {
    let dir = tempfile::tempdir().unwrap();
    let path = default_model(dir.path());
    // A context (the model's 1024 positions) and budget long enough that the first stream
    // does not end during the test.
    let server = Server::start(
        &path,
        &[
            "--parallel",
            "1",
            "--queue",
            "0",
            "--ctx",
            "1024",
            "--max-tokens",
            "50000",
        ],
    );
    // The one slot streams; a second request is refused at once.
    let s = server.open_stream(&json!({"prompt": "Once upon a time", "max_tokens": 100_000,
                                       "temperature": 0, "stream": true}));
    let (status, doc) = server.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(status, 429, "{doc}");
    assert_eq!(doc["error"]["code"], "rate_limit_exceeded");
    // The client goes away mid-stream: the slot is free again soon after.
    drop(s);
    let mut freed = false;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(50));
        let (status, _) = server.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
        if status == 200 {
            freed = true;
            break;
        }
    }
    assert!(freed, "the slot of a dropped stream was not freed");
}

#[cfg(unix)]
#[test]
fn sigterm_shuts_down_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = default_model(dir.path());
    let mut server = Server::start(&path, &[]);
    let (status, _) = server.request("GET", "/health", b"");
    assert_eq!(status, 200);
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // Generous: CI machines are loaded; a clean exit is what is tested, not its speed.
    let mut status = None;
    for _ in 0..600 {
        if let Some(s) = server.child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = status.expect("tern serve still running 30 s after SIGTERM");
    assert_eq!(
        status.code(),
        Some(0),
        "tern serve exits 0 on SIGTERM: {status:?}"
    );
}
