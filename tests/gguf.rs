//! GGUF in and out against files the real engines made (fixtures/gguf, from one small
//! 2B-4T-shaped checkpoint: bitnet.cpp's I2_S, llama.cpp's TQ2_0 and TQ1_0).

use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use tern_convert::gguf::{GgmlType, GgufFile};
use tern_format::TernFile;
use tern_infer::kernels::Kernels;
use tern_infer::model::{Logits, Model, State};
use tern_infer::pool::Pool;
use tern_infer::reference::NoProbe;

use crate::common::*;

const VECTORS: [&str; 4] = [
    "bitnet-i2_s",
    "mainline-tq2_0-f16emb",
    "mainline-tq2_0",
    "mainline-tq1_0-f16emb",
];

fn gguf_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("fixtures/gguf/{name}.gguf"))
}

fn checkpoint() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/gguf/packed")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn engines() -> Json {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/gguf/engines_greedy.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn every_vector_imports_and_verifies_exactly() {
    let dir = tempfile::tempdir().unwrap();
    for name in VECTORS {
        let gguf = gguf_fixture(name);
        let out = dir.path().join(format!("{name}.tern"));
        tern_ok(&["convert", s(&gguf), "-o", s(&out), "--quiet"]);
        tern_ok(&["inspect", s(&out), "--check"]);
        // --verify needs the checkpoint a GGUF does not name: refused, not skipped.
        let other = dir.path().join(format!("{name}.v.tern"));
        let err = tern_fails(&["convert", s(&gguf), "-o", s(&other), "--verify"], 2);
        assert!(err.contains("--verify") && !other.exists(), "{err}");
        let report = tern_ok(&["verify", s(&gguf), "--source", s(&checkpoint())]);
        assert!(report.starts_with("FAITHFUL"), "{name}: {report}");
        assert!(
            report.contains("1572864 trits, 14 scales")
                && report.contains("mismatches: 0 trits, 0 scales, 0 floats"),
            "{name}: {report}"
        );
    }
}

/// The imported .tern against the checkpoint's own conversion: the same trits, scales
/// within the GGUF's precision, the same config apart from what GGUF cannot say.
#[test]
fn imported_trits_equal_the_checkpoint_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let direct = dir.path().join("direct.tern");
    tern_ok(&["convert", s(&checkpoint()), "-o", s(&direct), "--quiet"]);
    let direct = TernFile::open(&direct).unwrap();
    for name in VECTORS {
        let out = dir.path().join(format!("{name}.tern"));
        let gguf = gguf_fixture(name);
        tern_ok(&[
            "convert",
            s(&gguf),
            "-o",
            s(&out),
            "--quiet",
            "--activation",
            "relu2",
        ]);
        let file = TernFile::open(&out).unwrap();
        let (a, b) = (&direct.metadata().config, &file.metadata().config);
        assert_eq!(a, b, "{name}: config");
        for t in direct.tensors() {
            let u = file.tensor(&t.name).unwrap();
            if t.layout.unwrap().is_ternary() {
                assert_eq!(direct.data(t), file.data(u), "{name}: {}", t.name);
                let rel = (t.scale - u.scale).abs() / t.scale;
                assert!(
                    rel < 1.0 / 128.0,
                    "{name} {}: {} vs {}",
                    t.name,
                    t.scale,
                    u.scale
                );
            }
        }
    }
}

/// tern on bitnet.cpp's own I2_S file gives bitnet.cpp's greedy tokens and, at every
/// recorded step, its top-1 (logits within int8 activation-rounding noise).
#[test]
fn imported_i2s_agrees_with_bitnet_cpp_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("i2s.tern");
    tern_ok(&[
        "convert",
        s(&gguf_fixture("bitnet-i2_s")),
        "-o",
        s(&out),
        "--quiet",
    ]);
    let file = TernFile::open(&out).unwrap();
    let model = Model::load(&file).unwrap();
    let vocab = model.config.vocab_size as usize;
    let pool = Pool::new(1);
    let kernels = Kernels::select(None).unwrap();
    let engines = engines();
    for p in engines["bitnet-i2_s"]["prompts"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(p["prompt_ids"].clone()).unwrap();
        let greedy: Vec<u32> = serde_json::from_value(p["greedy_ids"].clone()).unwrap();
        let top5: Vec<Vec<(u32, f32)>> =
            serde_json::from_value(p["top5_per_step"].clone()).unwrap();
        let mut state = State::new(&model, kernels, &pool, 256).unwrap();
        model
            .forward(&pool, &mut state, &ids, Logits::Last, &mut NoProbe)
            .unwrap();
        for (step, (&tok, top)) in greedy.iter().zip(&top5).enumerate() {
            let logits = &state.logits[..vocab];
            let ours = tern_infer::sampling::argmax(logits) as u32;
            assert_eq!(ours, top[0].0, "step {step} of {:?}", p["text"]);
            assert_eq!(ours, tok);
            for &(id, logit) in top {
                let d = (logits[id as usize] - logit).abs();
                assert!(
                    d < 0.5,
                    "step {step}, token {id}: {} vs {logit}",
                    logits[id as usize]
                );
            }
            model
                .forward(&pool, &mut state, &[tok], Logits::Last, &mut NoProbe)
                .unwrap();
        }
    }
}

/// The tokenizer rebuilt from GGUF metadata encodes like the checkpoint's tokenizer.json,
/// special tokens included, and like the engines did.
#[test]
fn gguf_tokenizer_encodes_like_the_hf_one() {
    let dir = tempfile::tempdir().unwrap();
    let hf_tern = dir.path().join("hf.tern");
    tern_ok(&["convert", s(&checkpoint()), "-o", s(&hf_tern), "--quiet"]);
    let hf = tern_infer::generate::tokenizer_from_file(&TernFile::open(&hf_tern).unwrap()).unwrap();
    let texts = [
        "The quick brown fox jumps over the lazy dog.",
        "In Python, a list is a",
        "<|begin_of_text|>User: hi<|eot_id|>Assistant:",
        "  leading spaces, tabs\tand\nnew lines\r\n 12345 digits",
        "naïve café — unicode ünïcödé 😀",
        "it's we'll THEY'RE",
    ];
    let engines = engines();
    for name in VECTORS {
        let out = dir.path().join(format!("{name}.tern"));
        tern_ok(&["convert", s(&gguf_fixture(name)), "-o", s(&out), "--quiet"]);
        let file = TernFile::open(&out).unwrap();
        let tok = tern_infer::generate::tokenizer_from_file(&file).unwrap();
        for t in texts {
            for special in [true, false] {
                assert_eq!(
                    tok.encode(t, special).unwrap(),
                    hf.encode(t, special).unwrap(),
                    "{name}: {t:?}"
                );
            }
        }
        for p in engines[name]["prompts"].as_array().unwrap() {
            let ids: Vec<u32> = serde_json::from_value(p["prompt_ids"].clone()).unwrap();
            assert_eq!(tok.encode(p["text"].as_str().unwrap(), true).unwrap(), ids);
        }
        let template = file.metadata().chat_template.as_deref().unwrap();
        assert!(template.contains("message['content']"), "{name}");
    }
}

/// Exported ternary data is byte-identical to the engines' own files (I2_S padding aside;
/// the scales are the checkpoint's bf16 weight_scale where the engines' route computed
/// mean|W| in f32 from the masters, so they agree to bf16 precision).
#[test]
fn exported_files_match_the_engines_files() {
    let dir = tempfile::tempdir().unwrap();
    let tern = dir.path().join("m.tern");
    tern_ok(&["convert", s(&checkpoint()), "-o", s(&tern), "--quiet"]);
    let file = TernFile::open(&tern).unwrap();
    for (ty, vector) in [
        ("i2_s", "bitnet-i2_s"),
        ("tq2_0", "mainline-tq2_0-f16emb"),
        ("tq1_0", "mainline-tq1_0-f16emb"),
    ] {
        let out = dir.path().join(format!("{ty}.gguf"));
        tern_ok(&["export", s(&tern), "-o", s(&out), "--type", ty, "--quiet"]);
        let ours = GgufFile::open(&out).unwrap();
        let theirs = GgufFile::open(&gguf_fixture(vector)).unwrap();
        let (h, v) = (&ours.header, &theirs.header);
        assert_eq!(h.alignment, v.alignment);
        let names = |h: &tern_convert::gguf::Header| {
            let mut n: Vec<_> = h
                .tensors
                .iter()
                .map(|t| (t.name.clone(), t.ne.clone(), t.ggml_type))
                .collect();
            n.sort_by(|a, b| a.0.cmp(&b.0));
            n
        };
        assert_eq!(names(h), names(v), "{ty}: tensors");
        for (k, val) in &v.metadata {
            let skip = [
                "general.name",
                "general.size_label",
                "tokenizer.chat_template",
            ];
            if skip.contains(&k.as_str())
                || k.contains("rope.scaling")
                || k == "tokenizer.ggml.add_sep_token"
            {
                continue;
            }
            assert!(
                h.get(k) == Some(val),
                "{ty}: {k} differs: {:.200}",
                format!("{:?}", h.get(k))
            );
        }
        for t in &v.tensors {
            let (a, b) = (
                ours.read(h.tensor(&t.name).unwrap()).unwrap(),
                theirs.read(t).unwrap(),
            );
            let n = t.elements() as usize;
            match t.ggml_type {
                GgmlType::I2_S => {
                    assert_eq!(a[..n / 4], b[..n / 4], "{ty}: {}", t.name);
                    let scale =
                        |d: &[u8]| f32::from_le_bytes(d[n / 4..n / 4 + 4].try_into().unwrap());
                    let want = file
                        .tensors()
                        .iter()
                        .find(|x| {
                            tern_convert::gguf::import::gguf_name(&x.name).as_deref()
                                == Some(&t.name)
                        })
                        .unwrap()
                        .scale;
                    assert_eq!(scale(&a), want);
                    assert!((scale(&a) - scale(&b)).abs() / scale(&b) < 1.0 / 128.0);
                    assert!(a[n / 4 + 4..].iter().all(|&x| x == 0));
                }
                GgmlType::TQ2_0 | GgmlType::TQ1_0 => {
                    let block = if t.ggml_type == GgmlType::TQ2_0 {
                        66
                    } else {
                        54
                    };
                    for (x, y) in a.chunks(block).zip(b.chunks(block)) {
                        assert_eq!(x[..block - 2], y[..block - 2], "{ty}: {}", t.name);
                    }
                }
                // Norms (bf16 → F32) and the F16 embedding convert exactly as the engines did.
                _ => assert_eq!(a, b, "{ty}: {}", t.name),
            }
        }
        // And the exported file verifies against the checkpoint.
        let report = tern_ok(&["verify", s(&out), "--source", s(&checkpoint())]);
        assert!(report.starts_with("FAITHFUL"), "{ty}: {report}");
    }
}

/// HF → GGUF → .tern gives the .tern HF → .tern gives, apart from provenance and the norms'
/// float type (GGUF engines take F32 norms; the values are the same).
#[test]
fn round_trip_through_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let direct = dir.path().join("direct.tern");
    tern_ok(&["convert", s(&checkpoint()), "-o", s(&direct), "--quiet"]);
    let direct = TernFile::open(&direct).unwrap();
    for ty in ["i2_s", "tq2_0", "tq1_0"] {
        let gguf = dir.path().join(format!("{ty}.gguf"));
        // Straight from the checkpoint folder.
        tern_ok(&[
            "export",
            s(&checkpoint()),
            "-o",
            s(&gguf),
            "--type",
            ty,
            "--exact-embeddings",
            "--quiet",
        ]);
        let back = dir.path().join(format!("{ty}.tern"));
        tern_ok(&[
            "convert",
            s(&gguf),
            "-o",
            s(&back),
            "--quiet",
            "--activation",
            "relu2",
        ]);
        let back = TernFile::open(&back).unwrap();
        let (a, b) = (direct.metadata(), back.metadata());
        assert_eq!(a.config, b.config, "{ty}");
        assert_eq!(a.chat_template, b.chat_template, "{ty}");
        assert_eq!(direct.tensors().len(), back.tensors().len());
        for t in direct.tensors() {
            let u = back.tensor(&t.name).unwrap();
            assert_eq!(t.shape, u.shape);
            assert_eq!(t.scale.to_bits(), u.scale.to_bits(), "{ty}: {}", t.name);
            if t.layout == u.layout {
                assert_eq!(direct.data(t), back.data(u), "{ty}: {}", t.name);
            } else {
                assert_eq!(t.layout, Some(tern_format::Layout::Bf16), "{}", t.name);
                assert_eq!(u.layout, Some(tern_format::Layout::F32), "{}", t.name);
                let want: Vec<f32> = direct
                    .data(t)
                    .chunks(2)
                    .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
                    .collect();
                let got: Vec<f32> = back
                    .data(u)
                    .chunks(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                assert_eq!(want, got, "{ty}: {}", t.name);
            }
        }
    }
}

/// Rewrites `bytes` at `at` (a file offset) in a copy of `src`.
fn patched(src: &Path, dst: &Path, at: u64, bytes: &[u8]) {
    let mut data = std::fs::read(src).unwrap();
    data[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    std::fs::write(dst, data).unwrap();
}

#[test]
fn a_flipped_trit_or_an_inverted_scale_fails_verify() {
    let dir = tempfile::tempdir().unwrap();
    let src = gguf_fixture("bitnet-i2_s");
    let g = GgufFile::open(&src).unwrap();
    let at = |name: &str| {
        let t = g.header.tensor(name).unwrap();
        (g.header.data_offset + t.offset, t)
    };
    // Flip the trit in bits 7..6 of byte 0 of blk.1.attn_v (-1 <-> +1, 0 -> -1).
    let (off, t) = at("blk.1.attn_v.weight");
    let byte = g.read(t).unwrap()[0];
    let code = byte >> 6;
    let flipped = (byte & 0x3f) | (if code == 0 { 2 } else { 0 }) << 6;
    let bad = dir.path().join("flipped.gguf");
    patched(&src, &bad, off, &[flipped]);
    let out = tern(&["verify", s(&bad), "--source", s(&checkpoint())]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("NOT FAITHFUL")
            && text.contains("1 trits")
            && text.contains("blk.1.attn_v.weight [0, 0]"),
        "{text}"
    );

    // Invert the scale of blk.0.ffn_up.
    let (off, t) = at("blk.0.ffn_up.weight");
    let n = t.elements() as usize;
    let data = g.read(t).unwrap();
    let s0 = f32::from_le_bytes(data[n / 4..n / 4 + 4].try_into().unwrap());
    let bad = dir.path().join("inverted.gguf");
    patched(&src, &bad, off + (n / 4) as u64, &(1.0 / s0).to_le_bytes());
    let out = tern(&["verify", s(&bad), "--source", s(&checkpoint())]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("1 scales") && text.contains("blk.0.ffn_up.weight"),
        "{text}"
    );

    // An inverted block scale in TQ2_0 too.
    let src = gguf_fixture("mainline-tq2_0-f16emb");
    let g = GgufFile::open(&src).unwrap();
    let t = g.header.tensor("blk.0.attn_k.weight").unwrap();
    let d = half::f16::from_le_bytes(g.read(t).unwrap()[64..66].try_into().unwrap());
    let bad = dir.path().join("inverted-tq2.gguf");
    patched(
        &src,
        &bad,
        g.header.data_offset + t.offset + 64,
        &half::f16::from_f32(1.0 / d.to_f32()).to_le_bytes(),
    );
    let out = tern(&["verify", s(&bad), "--source", s(&checkpoint())]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("blk.0.attn_k.weight [0]"), "{text}");
    // A changed norm weight (F32).
    let t = g.header.tensor("blk.1.ffn_sub_norm.weight").unwrap();
    let bad_norm = dir.path().join("norm.gguf");
    patched(
        &src,
        &bad_norm,
        g.header.data_offset + t.offset + 4 * 5,
        &1.5f32.to_le_bytes(),
    );
    let out = tern(&["verify", s(&bad_norm), "--source", s(&checkpoint())]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("1 floats") && text.contains("blk.1.ffn_sub_norm.weight [5]"),
        "{text}"
    );
    // Importing it is refused: its blocks disagree.
    let err = tern_fails(
        &["convert", s(&bad), "-o", s(&dir.path().join("x.tern"))],
        2,
    );
    assert!(
        err.contains("blk.0.attn_k.weight") && err.contains("block scales differ"),
        "{err}"
    );
}

/// I2_S written for ARM builds: verify in the default (x86) reading fails and says which
/// layout matches; reading it as ARM is exact.
#[test]
fn the_wrong_i2s_layout_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let arm = dir.path().join("arm.gguf");
    tern_ok(&[
        "export",
        s(&checkpoint()),
        "-o",
        s(&arm),
        "--i2s-layout",
        "arm",
        "--quiet",
    ]);
    let out = tern(&["verify", s(&arm), "--source", s(&checkpoint())]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("--i2s-layout arm"), "{text}");
    let text = tern_ok(&[
        "verify",
        s(&arm),
        "--source",
        s(&checkpoint()),
        "--i2s-layout",
        "arm",
    ]);
    assert!(text.starts_with("FAITHFUL"), "{text}");
    let back = dir.path().join("arm.tern");
    tern_ok(&[
        "convert",
        s(&arm),
        "-o",
        s(&back),
        "--i2s-layout",
        "arm",
        "--quiet",
    ]);
}

#[test]
fn malformed_ggufs_give_errors() {
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::read(gguf_fixture("mainline-tq1_0-f16emb")).unwrap();
    let out = dir.path().join("out.tern");
    for (i, len) in [0usize, 3, 20, 1000, 29000, 600_000]
        .into_iter()
        .enumerate()
    {
        let bad = dir.path().join(format!("t{i}.gguf"));
        std::fs::write(&bad, &src[..len]).unwrap();
        if len >= 4 {
            let err = tern_fails(&["convert", s(&bad), "-o", s(&out)], 2);
            assert!(err.contains(&format!("t{i}.gguf")), "{err}");
        }
    }
    assert!(!out.exists());
}

/// Shapes the engines' kernels cannot run are refused with the tensor named, and nothing
/// is written.
#[test]
fn export_refuses_shapes_the_engines_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    // The llama-bitlinear fixture: FFN 700, neither a multiple of 128 nor of 256.
    let src = fixture("llama-bitlinear");
    for ty in ["i2_s", "tq2_0", "tq1_0"] {
        let out = dir.path().join(format!("{ty}.gguf"));
        let err = tern_fails(&["export", s(&src), "-o", s(&out), "--type", ty], 2);
        assert!(
            err.contains("model.layers.0.mlp.down_proj.weight"),
            "{ty}: {err}"
        );
        assert!(!out.exists());
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
