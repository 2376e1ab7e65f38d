//! `tern verify` passes faithful conversions and fails damaged ones, pointing at the fault.

use crate::common::*;

fn verify(path: &std::path::Path, name: &str, extra: &[&str]) -> (i32, serde_json::Value) {
    let src = fixture(name);
    let reference = src.join("reference.safetensors");
    let mut args = vec![
        "verify",
        path.to_str().unwrap(),
        "--source",
        src.to_str().unwrap(),
        "--reference",
        reference.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = tern(&args);
    let doc = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), doc)
}

fn failures(doc: &serde_json::Value) -> String {
    doc["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_fixture_conversion_is_faithful() {
    let dir = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let path = convert(name, dir.path());
        let (code, doc) = verify(&path, name, &[]);
        assert_eq!(code, 0, "{name}: {}", failures(&doc));
        assert_eq!(doc["faithful"], true);
        assert_eq!(doc["source"]["trit_mismatches"], 0);
        let k = &doc["kernel_parity"];
        // End to end, flips cascade: information only.
        assert!(k["positions"].as_u64().unwrap() > 0, "{name}: {k}");
        // Given the same input, a layer without a rounding flip agrees to float rounding,
        // and so does the head.
        for l in k["layers"].as_array().unwrap() {
            if l["flips"] == 0 || l["flips"].is_null() {
                assert!(l["error"].as_f64().unwrap() < 1e-5, "{name}: {l}");
            }
        }
    }
    // The human report says it in its first line.
    let path = dir.path().join("llama-bitlinear.tern");
    let text = tern_ok(&["verify", path.to_str().unwrap(), "--no-parity"]);
    assert!(text.starts_with("FAITHFUL"), "{text}");
}

fn ternary_index(t: &[Rewritten], name: &str) -> usize {
    t.iter().position(|x| x.spec.name == name).unwrap()
}

#[test]
fn one_flipped_trit_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = convert("bitnet-2b4t-h64", dir.path());
    rewrite(&path, |_, t| {
        let i = ternary_index(t, "model.layers.1.mlp.down_proj.weight");
        // Row 3, column 5 (block 0, byte 5, bits 1:0): flip the trit's code between 0 and 2.
        let at = 3 * tern_format::tq2::row_bytes(344) as usize + 5;
        let code = t[i].data[at] & 3;
        t[i].data[at] = (t[i].data[at] & !3) | if code == 2 { 0 } else { 2 };
    });
    let (code, doc) = verify(&path, "bitnet-2b4t-h64", &["--no-parity"]);
    assert_eq!(code, 1);
    assert_eq!(doc["source"]["trit_mismatches"], 1);
    let m = &doc["source"]["first_mismatches"][0];
    assert_eq!(m["tensor"], "model.layers.1.mlp.down_proj.weight");
    assert_eq!(m["index"], serde_json::json!([3, 5]));
}

#[test]
fn a_scale_with_the_wrong_convention_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = convert("llama-bitlinear", dir.path());
    // As if the converter multiplied by a 1/mean|W| weight_scale instead of dividing.
    rewrite(&path, |_, t| {
        for x in t.iter_mut().filter(|x| x.spec.layout.is_ternary()) {
            x.scale = 1.0 / x.scale;
        }
    });
    let (code, doc) = verify(&path, "llama-bitlinear", &[]);
    assert_eq!(code, 1);
    let f = failures(&doc);
    assert!(
        f.contains("scales") && f.contains("weights differ from the source"),
        "{f}"
    );
    assert!(
        f.contains("against transformers"),
        "the logits must show it too: {f}"
    );
    assert_eq!(doc["source"]["scale_mismatches"], 14);
}

#[test]
fn swapped_row_blocks_fail() {
    let dir = tempfile::tempdir().unwrap();
    let path = convert("bitnet-2b4t-h128", dir.path());
    // A converter that misread the packing: the first two row blocks of q_proj swapped.
    rewrite(&path, |_, t| {
        let i = ternary_index(t, "model.layers.0.self_attn.q_proj.weight");
        let rows = t[i].spec.shape[0] as usize;
        let rb = tern_format::tq2::row_bytes(t[i].spec.shape[1]) as usize;
        let block = rows / 4 * rb;
        let (a, b) = t[i].data.split_at_mut(block);
        a.swap_with_slice(&mut b[..block]);
    });
    let (code, doc) = verify(&path, "bitnet-2b4t-h128", &[]);
    assert_eq!(code, 1);
    let m = &doc["source"]["first_mismatches"][0];
    assert_eq!(m["tensor"], "model.layers.0.self_attn.q_proj.weight");
    assert!(
        failures(&doc).contains("against transformers"),
        "{}",
        failures(&doc)
    );
}

#[test]
fn a_wrong_head_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = convert("bitnet-2b4t-h64", dir.path());
    // The tied head replaced by another tensor: an lm_head holding the embedding rows
    // in reverse order.
    rewrite(&path, |meta, t| {
        meta.config.tie_word_embeddings = false;
        let e = &t[ternary_index(t, "model.embed_tokens.weight")];
        let row = e.spec.shape[1] as usize * 2;
        let data: Vec<u8> = e.data.chunks_exact(row).rev().flatten().copied().collect();
        let head = Rewritten {
            spec: tern_format::TensorSpec {
                name: "lm_head.weight".into(),
                ..e.spec.clone()
            },
            scale: 1.0,
            data,
        };
        t.push(head);
    });
    let (code, doc) = verify(&path, "bitnet-2b4t-h64", &[]);
    assert_eq!(code, 1);
    let f = failures(&doc);
    assert!(
        f.contains("tie_word_embeddings") && f.contains("lm_head.weight"),
        "{f}"
    );
    assert!(f.contains("top-1 agreement with transformers"), "{f}");
}

#[test]
fn interleaved_rope_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = convert("bitnet-2b4t-h64", dir.path());
    rewrite(&path, |meta, _| {
        meta.config.rope_style = tern_format::RopeStyle::Interleaved
    });
    // Weights are intact; only the reference logits (and the config check) can tell.
    let reference = fixture("bitnet-2b4t-h64").join("reference.safetensors");
    let out = tern(&[
        "verify",
        path.to_str().unwrap(),
        "--reference",
        reference.to_str().unwrap(),
        "--no-parity",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("NOT FAITHFUL") && text.contains("transformers"),
        "{text}"
    );
    let (code, doc) = verify(&path, "bitnet-2b4t-h64", &["--no-parity"]);
    assert_eq!(code, 1);
    assert!(failures(&doc).contains("rope_style"), "{}", failures(&doc));
}

#[test]
fn a_damaged_file_fails_integrity() {
    let dir = tempfile::tempdir().unwrap();
    let path = convert("1bitllm", dir.path());
    let file = tern_format::TernFile::open(&path).unwrap();
    let t = file
        .tensor("model.layers.0.mlp.up_proj.weight")
        .unwrap()
        .clone();
    drop(file);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[t.offset as usize + 100] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    let out = tern(&["verify", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("model.layers.0.mlp.up_proj.weight is damaged"),
        "{text}"
    );
}

/// Records the hidden states entering each layer.
struct Hidden(Vec<Vec<f32>>);
impl tern_infer::reference::Probe for Hidden {
    fn hidden(&mut self, layer: usize, h: &[f32]) {
        if self.0.len() <= layer {
            self.0.resize(layer + 1, Vec::new());
        }
        self.0[layer].extend_from_slice(h); // token-major, over the prefill chunks
    }
}

#[test]
fn one_layer_alone_equals_that_layer_in_the_forward() {
    use tern_infer::kernels::Kernels;
    use tern_infer::model::{Logits, Model, State};
    use tern_infer::pool::Pool;
    use tern_infer::reference::NoProbe;
    let dir = tempfile::tempdir().unwrap();
    let path = convert("bitnet-2b4t-h64", dir.path());
    let file = tern_format::TernFile::open(&path).unwrap();
    let model = Model::load(&file).unwrap();
    let (pool, kernels) = (Pool::new(2), *Kernels::best());
    // More tokens than one prefill batch, so the layer runs in chunks too.
    let ids: Vec<u32> = (0..70).map(|i| i * 7 % 300).collect();
    let mut state = State::new(&model, kernels, &pool, 80).unwrap();
    let mut seen = Hidden(Vec::new());
    model
        .forward(&pool, &mut state, &ids, Logits::All, &mut seen)
        .unwrap();
    let layers = model.layers.len();
    let mut alone = State::new(&model, kernels, &pool, 80).unwrap();
    for l in 0..layers {
        let mut x = seen.0[l].clone();
        model
            .forward_layer(&pool, &mut alone, l, &mut x, &mut NoProbe)
            .unwrap();
        if l + 1 == layers {
            model.final_norm_rows(&mut x);
        }
        assert_eq!(x, seen.0[l + 1], "layer {l}");
    }
    let (h, vocab) = (
        model.config.hidden_size as usize,
        model.config.vocab_size as usize,
    );
    let mut logits = vec![0.0; vocab];
    let last = &seen.0[layers][(ids.len() - 1) * h..];
    model.head_logits(&pool, &alone, last, &mut logits).unwrap();
    let t = ids.len() - 1;
    assert_eq!(logits, state.logits[t * vocab..(t + 1) * vocab]);

    // A state is tied to its pool's size, and sizes that overflow are errors.
    let err = model
        .forward(&Pool::new(3), &mut state, &[1], Logits::Last, &mut NoProbe)
        .unwrap_err();
    assert!(err.to_string().contains("pool of 2 threads"), "{err}");
    let err = model
        .forward_layer(&pool, &mut alone, layers, &mut vec![0.0; h], &mut NoProbe)
        .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert!(State::new(&model, kernels, &pool, usize::MAX / 2).is_err());
}

/// A reference file for the h64 fixture (vocab 512? read from the model) with `edit`
/// applied to its tensors `(name, dtype, shape, bytes)`.
fn write_reference(
    dir: &std::path::Path,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> std::path::PathBuf {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let src = fixture("bitnet-2b4t-h64").join("reference.safetensors");
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let path = dir.join("reference.safetensors");
    safetensors::serialize_to_file(views, &None, &path).unwrap();
    path
}

#[test]
fn malformed_reference_files_are_refused_naming_the_tensor() {
    use safetensors::Dtype;
    let dir = tempfile::tempdir().unwrap();
    let model = convert("bitnet-2b4t-h64", dir.path());
    let retype = |name: &'static str, dtype: Dtype, width: usize| {
        move |t: &mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>| {
            let e = t.iter_mut().find(|e| e.0 == name).unwrap();
            let n = e.3.len() / e.1.size();
            (e.1, e.3) = (dtype, vec![0; n * width]);
        }
    };
    type Edit = Box<dyn FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(retype("prompt.0.logits", Dtype::F16, 2)),
            "prompt.0.logits is F16, expected F32",
        ),
        (
            Box::new(retype("prompt.0.logits", Dtype::F64, 8)),
            "prompt.0.logits is F64, expected F32",
        ),
        (
            Box::new(retype("prompt.1.hidden", Dtype::F64, 8)),
            "prompt.1.hidden is F64, expected F32",
        ),
        (
            Box::new(retype("prompt.0.ids", Dtype::I32, 4)),
            "prompt.0.ids is I32, expected I64",
        ),
        (
            Box::new(|t: &mut Vec<_>| {
                let e: &mut (String, Dtype, Vec<usize>, Vec<u8>) = t
                    .iter_mut()
                    .find(|e: &&mut (String, _, _, _)| e.0 == "prompt.0.ids")
                    .unwrap();
                (e.2, e.3) = (vec![0], Vec::new());
            }),
            "prompt.0.ids has shape [0]",
        ),
        (
            Box::new(|t: &mut Vec<_>| {
                let e: &mut (String, Dtype, Vec<usize>, Vec<u8>) = t
                    .iter_mut()
                    .find(|e: &&mut (String, _, _, _)| e.0 == "prompt.0.ids")
                    .unwrap();
                e.3[..8].copy_from_slice(&(-3i64).to_le_bytes());
            }),
            "prompt.0.ids holds -3",
        ),
        (
            Box::new(|t: &mut Vec<_>| {
                let e: &mut (String, Dtype, Vec<usize>, Vec<u8>) = t
                    .iter_mut()
                    .find(|e: &&mut (String, _, _, _)| e.0 == "prompt.0.logits")
                    .unwrap();
                let n = e.3.len();
                (e.2, e.3) = (vec![1, n / 4], e.3.clone());
            }),
            "prompt.0.logits has shape [1,",
        ),
        (
            Box::new(|t: &mut Vec<_>| {
                t.retain(|e: &(String, Dtype, Vec<usize>, Vec<u8>)| !e.0.starts_with("prompt.0."))
            }),
            "no prompt.0.ids",
        ),
    ];
    for (edit, want) in cases {
        let path = write_reference(dir.path(), edit);
        let err = tern_fails(
            &[
                "verify",
                model.to_str().unwrap(),
                "--no-parity",
                "--reference",
                path.to_str().unwrap(),
            ],
            2,
        );
        assert!(err.contains(want), "{want}: {err}");
    }
    // Bytes that are not safetensors at all.
    let path = dir.path().join("junk.safetensors");
    std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk").unwrap();
    let err = tern_fails(
        &[
            "verify",
            model.to_str().unwrap(),
            "--no-parity",
            "--reference",
            path.to_str().unwrap(),
        ],
        2,
    );
    assert!(err.contains("reference file"), "{err}");
}

#[test]
fn nonsense_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = convert("bitnet-2b4t-h64", dir.path());
    let m = model.to_str().unwrap();
    for (flag, value) in [
        ("--min-top1", "nan"),
        ("--max-kl", "nan"),
        ("--max-layer-error", "-1"),
        ("--min-greedy", "2"),
    ] {
        let err = tern_fails(&["verify", m, &format!("{flag}={value}")], 2);
        assert!(err.contains("the m"), "{flag} {value}: {err}");
    }
    let empty = dir.path().join("prompts.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    let err = tern_fails(&["verify", m, "--prompts", empty.to_str().unwrap()], 2);
    assert!(err.contains("holds no prompt"), "{err}");
}

#[test]
fn convert_verify_checks_the_file_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.tern");
    let src = fixture("bitnet-2b4t-h128");
    let (src, out_s) = (src.to_str().unwrap(), out.to_str().unwrap());
    let convert = |extra: &[&str]| {
        let args = [&["convert", src, "-o", out_s, "--verify", "--force"], extra].concat();
        tern_ok(&args)
    };
    let said = convert(&[]);
    assert!(out.exists());
    assert!(said.contains("verified: FAITHFUL"), "{said}");
    // With --json the verdict is in the one document a script reads.
    let json = convert(&["--json"]);
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["verify"]["faithful"], true, "{json}");
    assert_eq!(doc["verify"]["failures"], serde_json::json!([]), "{json}");
    assert!(doc["tensors"].as_u64().unwrap() > 0, "{json}");
}

#[test]
fn damaged_layers_are_named() {
    let dir = tempfile::tempdir().unwrap();
    type Edit = fn(&mut tern_format::Metadata, &mut Vec<Rewritten>);
    let cases: [(&str, Edit, &str); 3] = [
        (
            "bitnet-2b4t-h64",
            |_, t| {
                // One sub-norm weight replaced by ones.
                let i = t
                    .iter()
                    .position(|x| x.spec.name == "model.layers.1.mlp.ffn_sub_norm.weight")
                    .unwrap();
                let one = match t[i].spec.layout {
                    tern_format::Layout::F32 => 1.0f32.to_le_bytes().to_vec(),
                    tern_format::Layout::Bf16 => 0x3f80u16.to_le_bytes().to_vec(),
                    _ => 0x3c00u16.to_le_bytes().to_vec(), // f16 1.0
                };
                let n = t[i].data.len() / one.len();
                t[i].data = one.repeat(n);
            },
            // Its weights are near 1: the exact comparison names it.
            "first in model.layers.1.mlp.ffn_sub_norm.weight",
        ),
        (
            "bitnet-2b4t-h64",
            |m, _| m.config.activation = tern_format::Activation::Silu, // relu² read as SiLU
            "layer 0 differs from transformers",
        ),
        (
            "1bitllm",
            |_, t| {
                // One layer's q and k projections swapped.
                let q = ternary_index(t, "model.layers.1.self_attn.q_proj.weight");
                let k = ternary_index(t, "model.layers.1.self_attn.k_proj.weight");
                let (qd, kd) = (t[q].data.clone(), t[k].data.clone());
                (t[q].data, t[k].data) = (kd, qd);
                (t[q].scale, t[k].scale) = (t[k].scale, t[q].scale);
            },
            "layer 1 differs from transformers",
        ),
    ];
    for (name, edit, want) in cases {
        let dir = tempfile::tempdir_in(dir.path()).unwrap();
        let path = convert(name, dir.path());
        rewrite(&path, edit);
        let (code, doc) = verify(&path, name, &["--no-parity"]);
        assert_eq!(code, 1, "{name}");
        let f = failures(&doc);
        assert!(f.contains(want), "{name}: {f}");
    }
}

#[test]
fn two_tensors_with_their_scales_swapped_fail_naming_both() {
    // Every tensor of the fixtures has its own scale (fixtures/README.md), so a swap between
    // two tensors is visible to the exact comparison and to the layer-local one.
    let dir = tempfile::tempdir().unwrap();
    let path = convert("bitnet-2b4t-h64", dir.path());
    let (q, k) = (
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    );
    rewrite(&path, |_, t| {
        let (i, j) = (ternary_index(t, q), ternary_index(t, k));
        assert_ne!(t[i].scale, t[j].scale);
        let s = t[i].scale;
        t[i].scale = t[j].scale;
        t[j].scale = s;
    });
    let (code, doc) = verify(&path, "bitnet-2b4t-h64", &[]);
    assert_eq!(code, 1);
    assert_eq!(doc["source"]["scale_mismatches"], 2, "{doc}");
    let named = doc["source"]["first_mismatches"].to_string();
    assert!(named.contains(q) && named.contains(k), "{named}");
    let f = failures(&doc);
    assert!(
        f.contains("layer 1"),
        "the layer-local check names the layer: {f}"
    );
}

/// The damage list on a real-depth model: each damaged copy of `TERN_DEEP_MODEL` (a .tern
/// converted from the checkpoint `TERN_DEEP_SOURCE`, e.g. a 30-layer 2B-4T-shape
/// `tern synth --hf bf16`) must fail `verify --source` with the fault named.
/// `TERN_DEEP_ARGS` adds verify options (e.g. `--no-parity`). docs/parity.md has the run.
///
///     TERN_DEEP_MODEL=m.tern TERN_DEEP_SOURCE=hf/ \
///         cargo test --release --test cli -- --ignored damage_at_depth --nocapture
#[test]
#[ignore = "needs TERN_DEEP_MODEL and TERN_DEEP_SOURCE: a multi-GB model (docs/parity.md)"]
fn damage_at_depth_is_named() {
    let (Some(model), Some(source)) = (
        std::env::var_os("TERN_DEEP_MODEL"),
        std::env::var_os("TERN_DEEP_SOURCE"),
    ) else {
        panic!("set TERN_DEEP_MODEL and TERN_DEEP_SOURCE");
    };
    let extra = std::env::var("TERN_DEEP_ARGS").unwrap_or_default();
    let file = tern_format::TernFile::open(std::path::Path::new(&model)).unwrap();
    let layers = file.metadata().config.num_hidden_layers;
    let tied = file.metadata().config.tie_word_embeddings;
    drop(file);
    let mid = layers / 2;
    let name = |part: &str| format!("model.layers.{mid}.{part}.weight");
    let (down, k, v, up) = (
        name("mlp.down_proj"),
        name("self_attn.k_proj"),
        name("self_attn.v_proj"),
        name("mlp.up_proj"),
    );
    let sub_norm = name("mlp.ffn_sub_norm");
    type Edit<'a> = Box<dyn Fn(&mut tern_format::Metadata, &mut Vec<Rewritten>) + 'a>;
    let cases: Vec<(&str, Edit, Vec<String>)> = vec![
        (
            "one flipped trit",
            Box::new(|_, t| {
                let i = ternary_index(t, &down);
                let code = t[i].data[5] & 3;
                t[i].data[5] = (t[i].data[5] & !3) | if code == 2 { 0 } else { 2 };
            }),
            vec![down.clone()],
        ),
        (
            "two tensors' scales swapped",
            Box::new(|_, t| {
                let (i, j) = (ternary_index(t, &k), ternary_index(t, &up));
                let s = t[i].scale;
                t[i].scale = t[j].scale;
                t[j].scale = s;
            }),
            vec![k.clone(), up.clone()],
        ),
        (
            "the inverse scale convention",
            Box::new(|_, t| {
                for x in t.iter_mut().filter(|x| x.spec.layout.is_ternary()) {
                    x.scale = 1.0 / x.scale;
                }
            }),
            vec!["scale".into()],
        ),
        (
            "the tied head replaced by another tensor",
            Box::new(|meta, t| {
                meta.config.tie_word_embeddings = false;
                let e = &t[ternary_index(t, "model.embed_tokens.weight")];
                let row = e.data.len() / e.spec.shape[0] as usize;
                let data = e.data.chunks_exact(row).rev().flatten().copied().collect();
                let spec = tern_format::TensorSpec {
                    name: "lm_head.weight".into(),
                    ..e.spec.clone()
                };
                t.push(Rewritten {
                    spec,
                    scale: 1.0,
                    data,
                });
            }),
            vec!["tie_word_embeddings".into(), "lm_head.weight".into()],
        ),
        (
            "RoPE interleaved",
            Box::new(|meta, _| meta.config.rope_style = tern_format::RopeStyle::Interleaved),
            vec!["rope_style".into()],
        ),
        (
            "one sub-norm weight replaced by ones",
            Box::new(|_, t| {
                let i = ternary_index(t, &sub_norm);
                let one = match t[i].spec.layout {
                    tern_format::Layout::F32 => 1.0f32.to_le_bytes().to_vec(),
                    tern_format::Layout::Bf16 => 0x3f80u16.to_le_bytes().to_vec(),
                    _ => 0x3c00u16.to_le_bytes().to_vec(),
                };
                let n = t[i].data.len() / one.len();
                t[i].data = one.repeat(n);
            }),
            vec![sub_norm.clone()],
        ),
        (
            "relu² replaced by SiLU",
            Box::new(|meta, _| meta.config.activation = tern_format::Activation::Silu),
            vec!["activation".into()],
        ),
        (
            // q and k differ in shape under grouped-query attention: k and v do not.
            "one layer's k and v projections swapped",
            Box::new(|_, t| {
                let (a, b) = (ternary_index(t, &k), ternary_index(t, &v));
                let (ad, bd) = (t[a].data.clone(), t[b].data.clone());
                (t[a].data, t[b].data) = (bd, ad);
                (t[a].scale, t[b].scale) = (t[b].scale, t[a].scale);
            }),
            vec![k.clone(), v.clone()],
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("damaged.tern");
    for (what, edit, named) in cases {
        if !tied && what.contains("tied head") {
            continue;
        }
        std::fs::copy(&model, &copy).unwrap();
        rewrite(&copy, edit);
        let mut args = vec![
            "verify",
            copy.to_str().unwrap(),
            "--source",
            source.to_str().unwrap(),
            "--json",
            "-q",
        ];
        args.extend(extra.split_whitespace());
        let start = std::time::Instant::now();
        let out = tern(&args);
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let report = format!("{} {}", doc["failures"], doc["source"]["first_mismatches"]);
        println!(
            "{what}: exit {:?} in {:.0?}; {}",
            out.status.code(),
            start.elapsed(),
            &report[..report.len().min(400)]
        );
        assert_eq!(out.status.code(), Some(1), "{what} passed verify");
        for n in &named {
            assert!(
                report.contains(n.as_str()),
                "{what}: {n} not named in {report}"
            );
        }
    }
}
