//! The shipped default model (fixtures/default): trained weights, real text. Its
//! perplexity and greedy continuations must match transformers' (fixtures/default/reference.json).

use tern_format::TernFile;
use tern_infer::kernels::Kernels;
use tern_infer::model::{Logits, Model, State};
use tern_infer::pool::Pool;
use tern_infer::reference::NoProbe;

use crate::common::*;

fn reference() -> serde_json::Value {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/default/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn perplexity_matches_transformers_within_half_a_percent() {
    let dir = tempfile::tempdir().unwrap();
    let path = default_model(dir.path());
    let heldout =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/default/heldout.txt");
    let out = tern_ok(&[
        "eval",
        path.to_str().unwrap(),
        "--ppl",
        heldout.to_str().unwrap(),
        "--json",
    ]);
    let ours: serde_json::Value = serde_json::from_str(&out).unwrap();
    let theirs = &reference()["ppl"];
    assert_eq!(ours["tokens"], theirs["tokens"], "same tokenization");
    let (a, b) = (
        ours["perplexity"].as_f64().unwrap(),
        theirs["value"].as_f64().unwrap(),
    );
    eprintln!(
        "perplexity: tern {a:.4}, transformers {b:.4} ({:+.4}%)",
        100.0 * (a / b - 1.0)
    );
    assert!((a / b - 1.0).abs() < 0.005, "tern {a} vs transformers {b}");
}

#[test]
fn greedy_continuations_are_identical() {
    let dir = tempfile::tempdir().unwrap();
    let path = default_model(dir.path());
    let file = TernFile::open(&path).unwrap();
    let model = Model::load(&file).unwrap();
    let vocab = model.config.vocab_size as usize;
    let pool = Pool::new(2);
    let kernels = *Kernels::best();
    let tokenizer = tern_infer::generate::tokenizer_from_file(&file).unwrap();
    for case in reference()["greedy"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tokenizer.encode(prompt, true).unwrap(),
            ids,
            "{prompt:?} tokenizes like transformers"
        );
        let want: Vec<u32> = case["continuation"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let mut state = State::new(&model, kernels, &pool, 64).unwrap();
        model
            .forward(&pool, &mut state, &ids, Logits::Last, &mut NoProbe)
            .unwrap();
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let next = tern_infer::sampling::argmax(&state.logits[..vocab]) as u32;
            got.push(next);
            model
                .forward(&pool, &mut state, &[next], Logits::Last, &mut NoProbe)
                .unwrap();
        }
        assert_eq!(
            got,
            want,
            "{prompt:?}: {:?} vs {:?}",
            tokenizer.decode(&got, false),
            case["text"]
        );
    }
}

#[test]
fn the_readme_command_generates_readable_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = default_model(dir.path());
    let out = tern_ok(&[
        "generate",
        path.to_str().unwrap(),
        "-p",
        "What is the matter",
        "-n",
        "16",
    ]);
    let want = reference()["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["prompt"] == "What is the matter")
        .unwrap()["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        out.starts_with(&format!("What is the matter{want}")),
        "{out:?}"
    );
}

#[test]
fn logits_of_long_inputs_cover_every_position() {
    // More positions than one prefill batch: every row of Logits::All must be filled.
    let dir = tempfile::tempdir().unwrap();
    let path = default_model(dir.path());
    let file = TernFile::open(&path).unwrap();
    let model = Model::load(&file).unwrap();
    let vocab = model.config.vocab_size as usize;
    let pool = Pool::new(2);
    let kernels = *Kernels::best();
    let ids: Vec<u32> = (0..150).map(|i| (i * 37 % 2000) as u32).collect();
    let mut all = State::new(&model, kernels, &pool, 160).unwrap();
    model
        .forward(&pool, &mut all, &ids, Logits::All, &mut NoProbe)
        .unwrap();
    let mut one = State::new(&model, kernels, &pool, 160).unwrap();
    for (t, &id) in ids.iter().enumerate() {
        model
            .forward(&pool, &mut one, &[id], Logits::Last, &mut NoProbe)
            .unwrap();
        let a = &all.logits[t * vocab..(t + 1) * vocab];
        let d = a
            .iter()
            .zip(&one.logits[..vocab])
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(d < 0.5, "position {t}: max |Δ| {d}");
        assert_eq!(
            tern_infer::sampling::argmax(a),
            tern_infer::sampling::argmax(&one.logits[..vocab]),
            "position {t}"
        );
    }
}
