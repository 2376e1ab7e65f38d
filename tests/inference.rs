//! Parity of the inference engine with transformers' reference outputs, on every fixture.

use tern_format::TernFile;
use tern_infer::kernels::Kernels;
use tern_infer::model::{Logits, Model, State};
use tern_infer::pool::Pool;
use tern_infer::reference::{NoProbe, Probe};
use tern_infer::InferError;

use crate::common::*;

/// Agreement of one sequence of logits rows with the reference.
#[derive(Default, Debug)]
struct Agreement {
    rows: usize,
    top1: usize,
    max_abs: f32,
    /// Largest |Δ| relative to the reference logits' standard deviation.
    max_rel_std: f32,
}

impl Agreement {
    fn add(&mut self, ours: &[f32], reference: &[f32]) {
        let argmax = |v: &[f32]| {
            v.iter()
                .enumerate()
                .fold(0, |b, (i, &x)| if x > v[b] { i } else { b })
        };
        self.rows += 1;
        self.top1 += usize::from(argmax(ours) == argmax(reference));
        let mean = reference.iter().sum::<f32>() / reference.len() as f32;
        let std = (reference.iter().map(|x| (x - mean).powi(2)).sum::<f32>()
            / reference.len() as f32)
            .sqrt();
        let d = ours
            .iter()
            .zip(reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        self.max_abs = self.max_abs.max(d);
        self.max_rel_std = self.max_rel_std.max(d / std);
    }
}

/// Keeps the hidden states entering layer 0: the embeddings, which must be exact.
struct Embeddings(Vec<f32>);

impl Probe for Embeddings {
    fn hidden(&mut self, layer: usize, h: &[f32]) {
        if layer == 0 {
            self.0 = h.to_vec();
        }
    }
}

fn run_fixture(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = convert(name, dir.path());
    let file = TernFile::open(&path).unwrap();
    let model = Model::load(&file).unwrap();
    let vocab = model.config.vocab_size as usize;
    let hidden = model.config.hidden_size as usize;
    let reference = Reference::load(name);
    for isa in tern_infer::kernels::Isa::all_available() {
        let kernels = Kernels::for_isa(isa).unwrap();
        for threads in [1, 2] {
            let pool = Pool::new(threads);
            let (mut full, mut decode) = (Agreement::default(), Agreement::default());
            let mut greedy_same = 0;
            let mut greedy_total = 0;
            // Where our free-running greedy leaves the reference's: the reference's own margin
            // between its token and ours at that step.
            let mut divergences: Vec<(usize, usize, f32)> = Vec::new();
            for p in 0..reference.prompts() {
                let ids = reference.ids(&format!("prompt.{p}.ids"));
                let ref_logits = reference.get(&format!("prompt.{p}.logits"));
                let ref_hidden = reference.get(&format!("prompt.{p}.hidden"));
                let greedy = reference.ids(&format!("prompt.{p}.greedy"));
                let greedy_logits = reference.get(&format!("prompt.{p}.greedy_logits"));

                // One forward over the prompt: every position's logits, and hidden states.
                let mut state = State::new(&model, kernels, &pool, 128).unwrap();
                let mut embeddings = Embeddings(Vec::new());
                model
                    .forward(&pool, &mut state, &ids, Logits::All, &mut embeddings)
                    .unwrap();
                assert_eq!(
                    embeddings.0,
                    &ref_hidden.f32[..ids.len() * hidden],
                    "{name}: embeddings differ"
                );
                for t in 0..ids.len() {
                    full.add(
                        &state.logits[t * vocab..(t + 1) * vocab],
                        &ref_logits.f32[t * vocab..(t + 1) * vocab],
                    );
                }

                // Teacher-forced decode through the KV cache: prompt, then the reference's
                // greedy tokens one at a time.
                let mut state = State::new(&model, kernels, &pool, 128).unwrap();
                model
                    .forward(&pool, &mut state, &ids, Logits::Last, &mut NoProbe)
                    .unwrap();
                for (step, &tok) in greedy.iter().enumerate() {
                    decode.add(
                        &state.logits[..vocab],
                        &greedy_logits.f32[step * vocab..(step + 1) * vocab],
                    );
                    model
                        .forward(&pool, &mut state, &[tok], Logits::Last, &mut NoProbe)
                        .unwrap();
                }

                // Free-running greedy continuation.
                let mut state = State::new(&model, kernels, &pool, 128).unwrap();
                model
                    .forward(&pool, &mut state, &ids, Logits::Last, &mut NoProbe)
                    .unwrap();
                let mut ours = Vec::new();
                for _ in 0..greedy.len() {
                    let next = tern_infer::sampling::argmax(&state.logits[..vocab]) as u32;
                    ours.push(next);
                    model
                        .forward(&pool, &mut state, &[next], Logits::Last, &mut NoProbe)
                        .unwrap();
                }
                let same = ours.iter().zip(&greedy).take_while(|(a, b)| a == b).count();
                if same < greedy.len() {
                    let l = &greedy_logits.f32[same * vocab..(same + 1) * vocab];
                    let margin = l[greedy[same] as usize] - l[ours[same] as usize];
                    divergences.push((p, same, margin));
                }
                greedy_same += same;
                greedy_total += greedy.len();
            }
            eprintln!(
                "{name} [{} x{threads}]: prompt logits top-1 {}/{} max|Δ| {:.4} ({:.3} std); decode top-1 {}/{} max|Δ| {:.4}; greedy prefix {greedy_same}/{greedy_total}",
                kernels.variant(), full.top1, full.rows, full.max_abs, full.max_rel_std, decode.top1, decode.rows, decode.max_abs
            );
            // Rounding flips of the int8 activations move logits by a fraction of their spread
            // (docs/checkpoints.md §9.5); a wrong model moves them by several spreads.
            assert!(
                full.max_rel_std < 0.25,
                "{name}: prompt logits off: {full:?}"
            );
            assert!(
                decode.max_rel_std < 0.25,
                "{name}: decode logits off: {decode:?}"
            );
            assert!(
                full.top1 * 100 >= full.rows * 95,
                "{name}: prompt top-1 {full:?}"
            );
            assert!(
                decode.top1 * 100 >= decode.rows * 95,
                "{name}: decode top-1 {decode:?}"
            );
            // Free-running greedy may leave the reference only where the reference itself
            // nearly ties: its margin there is within our measured logit error, which is the
            // reference's own noise (fp32 op order; checkpoints.md §9.5).
            let noise = full.max_abs.max(decode.max_abs);
            for &(p, step, margin) in &divergences {
                assert!(
                    margin <= 2.0 * noise,
                    "{name}: prompt {p} greedy leaves the reference at step {step} where its margin \
                     is {margin} (> 2 × the logit error {noise}); {greedy_same}/{greedy_total} agree"
                );
            }
        }
    }
}

#[test]
fn bitnet_packed_h64_matches_transformers() {
    run_fixture("bitnet-2b4t-h64");
}

#[test]
fn bitnet_masters_h64_matches_transformers() {
    run_fixture("bitnet-2b4t-h64-bf16");
}

#[test]
fn bitnet_packed_h128_gqa_matches_transformers() {
    run_fixture("bitnet-2b4t-h128");
}

#[test]
fn llama_bitlinear_matches_transformers() {
    run_fixture("llama-bitlinear");
}

#[test]
fn onebitllm_matches_its_reference() {
    run_fixture("1bitllm");
}

#[test]
fn bitnet_block_with_bitlinear_scales_matches_transformers() {
    run_fixture("bitnet-bitlinear");
}

#[test]
fn bitnet_attention_bias_matches_transformers() {
    run_fixture("bitnet-bias");
}

#[test]
fn llama_autobitlinear_packed_and_masters_match_transformers() {
    run_fixture("llama-autobitlinear");
    run_fixture("llama-autobitlinear-masters");
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    run_fixture("llama-rope-llama3");
}

#[test]
fn already_ternary_f16_weights_match_transformers() {
    run_fixture("llama-ternary-f16");
}

#[test]
fn llama_biases_and_linear_rope_match_transformers() {
    run_fixture("llama-bias");
}

#[test]
fn linears_kept_dense_by_modules_to_not_convert_match_transformers() {
    run_fixture("llama-dense-linears");
}

#[test]
fn prefill_then_decode_equals_one_forward() {
    let dir = tempfile::tempdir().unwrap();
    let path = convert("bitnet-2b4t-h128", dir.path());
    let file = TernFile::open(&path).unwrap();
    let model = Model::load(&file).unwrap();
    let vocab = model.config.vocab_size as usize;
    let pool = Pool::new(2);
    let kernels = *Kernels::best();
    let ids = Reference::load("bitnet-2b4t-h128").ids("prompt.2.ids");
    let mut all = State::new(&model, kernels, &pool, 64).unwrap();
    model
        .forward(&pool, &mut all, &ids, Logits::All, &mut NoProbe)
        .unwrap();
    let mut step = State::new(&model, kernels, &pool, 64).unwrap();
    model
        .forward(&pool, &mut step, &ids[..20], Logits::Last, &mut NoProbe)
        .unwrap();
    for (i, &t) in ids[20..].iter().enumerate() {
        model
            .forward(&pool, &mut step, &[t], Logits::Last, &mut NoProbe)
            .unwrap();
        let row = &all.logits[(20 + i) * vocab..(21 + i) * vocab];
        let d = row
            .iter()
            .zip(&step.logits[..vocab])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        // Same arithmetic in the same order except the batch split: equal up to flips.
        assert!(d < 0.5, "position {}: max |Δ| {d}", 20 + i);
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = convert("bitnet-2b4t-h64", dir.path());
    let file = TernFile::open(&path).unwrap();
    let model = Model::load(&file).unwrap();
    let pool = Pool::new(1);
    let mut state = State::new(&model, *Kernels::best(), &pool, 8).unwrap();
    let err = model
        .forward(&pool, &mut state, &[1, 9999], Logits::Last, &mut NoProbe)
        .unwrap_err();
    assert!(
        matches!(
            err,
            InferError::TokenOutOfVocab { id: 9999, vocab } if vocab == model.config.vocab_size as usize
        ),
        "{err}"
    );
    let err = model
        .forward(&pool, &mut state, &[1; 9], Logits::Last, &mut NoProbe)
        .unwrap_err();
    assert!(err.to_string().contains("context is full"), "{err}");

    let p = path.to_str().unwrap();
    let err = tern_fails(&["generate", p, "-p", "", "-n", "4"], 2);
    assert!(err.contains("prompt is empty"), "{err}");
    let long = "word ".repeat(200);
    let err = tern_fails(&["generate", p, "-p", &long, "--ctx", "16"], 2);
    assert!(err.contains("context is full"), "{err}");
    let out = tern(&[
        "generate",
        p,
        "-p",
        "The lighthouse keeper",
        "-n",
        "8",
        "--ctx",
        "12",
    ]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("context of 12 tokens is full"), "{err}");
    let err = tern_fails(&["generate", p, "-p", "hi", "--kernel", "sse9"], 2);
    assert!(err.contains("invalid value 'sse9'"), "{err}");
}

#[test]
fn generate_streams_text_and_reports_speed() {
    let dir = tempfile::tempdir().unwrap();
    let path = convert("bitnet-2b4t-h64", dir.path());
    let p = path.to_str().unwrap();
    let out = tern(&["generate", p, "-p", "The lighthouse keeper", "-n", "8"]);
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_str(&tern_ok(&[
        "generate",
        p,
        "-p",
        "The lighthouse keeper",
        "-n",
        "8",
        "--json",
    ]))
    .unwrap();
    // The stream is the prompt then the text of the tokens the JSON lists.
    let text = doc["text"].as_str().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("The lighthouse keeper{text}\n")
    );
    let n = doc["tokens"].as_array().unwrap().len();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("decode: {n} tokens")), "{stderr}");
    tern_into_closed_pipe(&["generate", p, "-p", "The lighthouse keeper", "-n", "8"]);
    tern_into_closed_pipe(&["generate", p, "-p", "The lighthouse keeper", "--json"]);
    let reference = Reference::load("bitnet-2b4t-h64");
    let want: Vec<u64> = reference
        .ids("prompt.0.greedy")
        .iter()
        .map(|&t| u64::from(t))
        .collect();
    let got: Vec<u64> = doc["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_eq!(
        doc["prompt_ids"].as_array().unwrap().len(),
        reference.ids("prompt.0.ids").len()
    );
    // The fixture's EOS may come early; whatever came matches transformers' greedy tokens.
    assert!(
        !got.is_empty() && want.starts_with(&got),
        "{got:?} vs {want:?}"
    );
}

/// The largest |Δ| between two rows of logits.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_conversation_reuses_its_cache_and_matches_a_fresh_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = convert("bitnet-2b4t-h64", dir.path());
    for isa in tern_infer::kernels::Isa::all_available() {
        conversation_matches_a_fresh_state(&path, Kernels::for_isa(isa).unwrap());
    }
}

fn conversation_matches_a_fresh_state(path: &std::path::Path, kernels: Kernels) {
    use tern_infer::chat::{ChatTemplate, Conversation};
    use tern_infer::generate::tokenizer_from_file;
    use tern_infer::sampling::{Sampler, SamplingParams};

    let file = TernFile::open(path).unwrap();
    let model = Model::load(&file).unwrap();
    let vocab = model.config.vocab_size as usize;
    let pool = Pool::new(2);
    let tokenizer = tokenizer_from_file(&file).unwrap();
    let template = ChatTemplate::for_file(&file, &tokenizer).unwrap();
    let state = State::new(&model, kernels, &pool, 256).unwrap();
    let mut chat = Conversation::new(template, &tokenizer, state, Some("Be brief."));
    let mut sampler = Sampler::new(SamplingParams::greedy());
    let mut say = |chat: &mut Conversation, text: &str| {
        let mut streamed = String::new();
        let reply = chat
            .say(&model, &pool, text, 6, &mut sampler, |piece| {
                streamed.push_str(piece);
                Ok(())
            })
            .unwrap();
        assert_eq!(streamed.trim(), reply.text);
        reply
    };
    let first = say(&mut chat, "hello there");
    assert_eq!(first.reused_tokens, 0);
    let second = say(&mut chat, "what is the sea?");
    assert_eq!(chat.messages().len(), 5);
    // The second turn's prompt starts with the first turn's: only the rest is computed.
    let p1 = first.generation.prompt_tokens;
    let keep = second.reused_tokens;
    assert!(keep >= p1, "reused {keep} of a first prompt of {p1}");
    let cached = chat.cached_tokens().to_vec();
    assert_eq!(cached.len(), chat.state().pos);
    let reused = &chat.state().logits[..vocab];

    // A fresh state fed the same tokens in the same pieces (first prompt, first reply token
    // by token, the rest of the second prompt, second reply token by token)...
    let mut same = State::new(&model, kernels, &pool, 256).unwrap();
    let second_prompt_end = keep + second.generation.prompt_tokens;
    let mut pieces: Vec<&[u32]> = vec![&cached[..p1]];
    pieces.extend(cached[p1..keep].chunks(1));
    pieces.push(&cached[keep..second_prompt_end]);
    pieces.extend(cached[second_prompt_end..].chunks(1));
    for piece in pieces {
        model
            .forward(&pool, &mut same, piece, Logits::Last, &mut NoProbe)
            .unwrap();
    }
    // ...and one fed the whole conversation at once. Both are bit-identical to the reused
    // state (measured, every kernel here): each token's quantization, integer products,
    // norms and attention over the cache do not depend on how tokens are grouped.
    let mut once = State::new(&model, kernels, &pool, 256).unwrap();
    model
        .forward(&pool, &mut once, &cached, Logits::Last, &mut NoProbe)
        .unwrap();
    for (how, fresh) in [("same pieces", &same), ("at once", &once)] {
        let d = max_abs_diff(reused, &fresh.logits[..vocab]);
        assert_eq!(d, 0.0, "{}: {how}: max |Δ| {d}", kernels.variant());
    }
}

#[test]
fn chat_answers_each_line_of_a_pipe() {
    use std::io::Write;
    use tern_infer::chat::{ChatTemplate, Conversation};
    use tern_infer::generate::tokenizer_from_file;
    use tern_infer::sampling::{Sampler, SamplingParams};

    let dir = tempfile::tempdir().unwrap();
    let path = convert("bitnet-2b4t-h64", dir.path());
    let lines = ["hello there", "what is the sea?"];
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["chat", path.to_str().unwrap(), "-n", "6", "-t", "2"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let input = format!("{}\n\n{}\n", lines[0], lines[1]);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());

    // The same conversation through the library: each reply streamed on its own line (the
    // empty input line is skipped).
    let file = TernFile::open(&path).unwrap();
    let model = Model::load(&file).unwrap();
    let pool = Pool::new(2);
    let tokenizer = tokenizer_from_file(&file).unwrap();
    let template = ChatTemplate::for_file(&file, &tokenizer).unwrap();
    let state = State::new(&model, *Kernels::best(), &pool, 4096).unwrap();
    let mut chat = Conversation::new(template, &tokenizer, state, None);
    let mut sampler = Sampler::new(SamplingParams::greedy());
    let mut want = String::new();
    for line in lines {
        let reply = chat
            .say(&model, &pool, line, 6, &mut sampler, |piece| {
                want.push_str(piece);
                Ok(())
            })
            .unwrap();
        assert!(!reply.generation.tokens.is_empty());
        want.push('\n');
    }
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
}

#[test]
fn streamed_text_equals_the_decoded_text_on_the_fixture_tokenizers() {
    use tern_infer::tokenizer::{Tokenizer, TokenizerOptions};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    // Accents, a dash, an emoji and CJK: characters of 2, 3 and 4 bytes, which byte-level
    // BPE vocabularies this small split over several tokens.
    let text = "The naïve café — said 😀 to 日本語, then «bonjour» again.";
    for json in [
        root.join("models/bitnet-2b4t-h64/tokenizer.json"),
        root.join("default/bitnet-tiny/tokenizer.json"),
    ] {
        let bytes = std::fs::read(&json).unwrap();
        let tok = Tokenizer::from_bytes(&bytes, TokenizerOptions::default()).unwrap();
        let ids = tok.encode(text, false).unwrap();
        let mut stream = tok.stream(true);
        let (mut pieces, mut held) = (Vec::new(), 0);
        for &id in &ids {
            match stream.push(id).unwrap() {
                Some(piece) => {
                    assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
                    pieces.push(piece);
                }
                None => held += 1,
            }
        }
        pieces.extend(stream.finish().unwrap());
        assert!(
            held > 0,
            "{}: no character split over tokens",
            json.display()
        );
        assert_eq!(pieces.concat(), tok.decode(&ids, true).unwrap());
        assert_eq!(pieces.concat(), text, "{}", json.display());
    }
}
