//! `tern convert` on every fixture family: exact weights, determinism, sharding, errors.

use std::path::Path;

use tern_format::TernFile;

use crate::common::*;

#[test]
fn every_family_converts_and_matches_its_source_exactly() {
    let dir = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let path = convert(name, dir.path());
        let file = TernFile::open(&path).unwrap();
        assert!(file.verify_checksums(2).is_empty());
        file.verify_trits().unwrap();
        let cmp = tern_convert::compare::compare_with_source(&file, &fixture(name)).unwrap();
        assert!(cmp.exact(), "{name}: {cmp:?}");
        assert_eq!(cmp.tensors, file.tensors().len(), "{name}");
        assert!(cmp.trits_compared > 0 && cmp.float_values_compared > 0);
    }
}

#[test]
fn converting_twice_gives_identical_files() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for name in ["bitnet-2b4t-h64-bf16", "llama-bitlinear"] {
        let x = std::fs::read(convert(name, a.path())).unwrap();
        let y = std::fs::read(convert(name, b.path())).unwrap();
        assert!(x == y, "{name}: two conversions differ");
    }
}

#[test]
fn sharded_and_unsharded_give_the_same_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let one = TernFile::open(convert("bitnet-2b4t-h64", dir.path())).unwrap();
    let three = TernFile::open(convert("bitnet-2b4t-h64-sharded", dir.path())).unwrap();
    assert_eq!(one.metadata().config, three.metadata().config);
    assert_eq!(one.tensors().len(), three.tensors().len());
    for (a, b) in one.tensors().iter().zip(three.tensors()) {
        assert_eq!(
            (&a.name, &a.shape, a.layout, a.scale, a.checksum),
            (&b.name, &b.shape, b.layout, b.scale, b.checksum)
        );
        assert_eq!(one.data(a), three.data(b));
    }
    let files = |f: &TernFile| {
        f.metadata()
            .provenance
            .source_files
            .iter()
            .map(|s| s.name.clone())
            .collect::<Vec<_>>()
    };
    assert!(files(&three)
        .iter()
        .any(|n| n == "model-00002-of-00003.safetensors"));
    assert!(files(&one).iter().any(|n| n == "model.safetensors"));
}

#[test]
fn packed_and_masters_flavours_hold_the_same_trits() {
    let dir = tempfile::tempdir().unwrap();
    let packed = TernFile::open(convert("bitnet-2b4t-h64", dir.path())).unwrap();
    let masters = TernFile::open(convert("bitnet-2b4t-h64-bf16", dir.path())).unwrap();
    for (a, b) in packed.tensors().iter().zip(masters.tensors()) {
        if a.layout.is_some_and(|l| l.is_ternary()) {
            assert_eq!(packed.data(a), masters.data(b), "{}", a.name);
            // The packed scale is the bf16 rounding of the masters' f32 scale.
            assert!(
                (a.scale / b.scale - 1.0).abs() < 0.004,
                "{}: {} vs {}",
                a.name,
                a.scale,
                b.scale
            );
        }
    }
}

/// Copies a fixture folder so a test can damage it.
fn copy_fixture(name: &str, to: &Path) -> std::path::PathBuf {
    let dst = to.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

/// Rewrites the safetensors header of `file` with `edit`, keeping data offsets valid.
fn edit_header(file: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut text = serde_json::to_vec(&header).unwrap();
    while text.len() < n {
        text.push(b' ');
    }
    assert_eq!(text.len(), n, "edited header must not grow");
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(file, out).unwrap();
}

/// Byte offset (in the file) of a tensor's data.
fn data_offset(file: &Path, tensor: &str) -> usize {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    8 + n + header[tensor]["data_offsets"][0].as_u64().unwrap() as usize
}

fn convert_fails(src: &Path, dir: &Path, extra: &[&str]) -> String {
    let out = dir.join("out.tern");
    let mut args = vec![
        "convert",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-q",
    ];
    args.extend_from_slice(extra);
    let err = tern_fails(&args, 2);
    assert!(!out.exists(), "a failed conversion left {out:?}");
    assert_eq!(
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp"))
            .count(),
        0,
        "temporary file left behind"
    );
    err
}

#[test]
fn invalid_code_three_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = copy_fixture("bitnet-2b4t-h64", dir.path());
    let st = src.join("model.safetensors");
    let at = data_offset(&st, "model.layers.1.mlp.up_proj.weight") + 3;
    let mut bytes = std::fs::read(&st).unwrap();
    bytes[at] = 0xFF;
    std::fs::write(&st, bytes).unwrap();
    let err = convert_fails(&src, dir.path(), &[]);
    assert!(
        err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("code 3"),
        "{err}"
    );
}

#[test]
fn nan_scale_and_nan_floats_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = copy_fixture("bitnet-2b4t-h64", dir.path());
    let st = src.join("model.safetensors");
    let at = data_offset(&st, "model.layers.0.self_attn.k_proj.weight_scale");
    let mut bytes = std::fs::read(&st).unwrap();
    bytes[at..at + 2].copy_from_slice(&[0xC0, 0x7F]); // bf16 NaN
    std::fs::write(&st, &bytes).unwrap();
    let err = convert_fails(&src, dir.path(), &[]);
    assert!(
        err.contains("k_proj.weight_scale") && err.contains("NaN"),
        "{err}"
    );

    let src = copy_fixture("bitnet-2b4t-h64", &dir.path().join("b"));
    let st = src.join("model.safetensors");
    let at = data_offset(&st, "model.norm.weight") + 10;
    let mut bytes = std::fs::read(&st).unwrap();
    bytes[at..at + 2].copy_from_slice(&[0x80, 0x7F]); // bf16 +inf
    std::fs::write(&st, &bytes).unwrap();
    let err = convert_fails(&src, &dir.path().join("b"), &[]);
    assert!(
        err.contains("model.norm.weight") && err.contains("element 5"),
        "{err}"
    );
}

#[test]
fn wrong_shapes_missing_and_unexpected_tensors_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    let src = copy_fixture("bitnet-2b4t-h64", dir.path());
    let cfg_path = src.join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        cfg.replace("\"intermediate_size\": 344", "\"intermediate_size\": 348"),
    )
    .unwrap();
    let err = convert_fails(&src, dir.path(), &[]);
    assert!(
        err.contains("gate_proj.weight") && err.contains("[87, 256]"),
        "{err}"
    );
    std::fs::write(
        &cfg_path,
        cfg.replace("\"intermediate_size\": 344", "\"intermediate_size\": 346"),
    )
    .unwrap();
    let err = convert_fails(&src, dir.path(), &[]);
    assert!(err.contains("not a multiple of 4"), "{err}");

    std::fs::write(&cfg_path, &cfg).unwrap();
    let st = src.join("model.safetensors");
    edit_header(&st, |h| {
        let v = h
            .remove("model.layers.2.mlp.down_proj.weight_scale")
            .unwrap();
        h.insert("model.layers.2.mlp.down_proj.weight_scalE".into(), v);
    });
    let err = convert_fails(&src, dir.path(), &[]);
    assert!(
        err.contains("missing tensors: model.layers.2.mlp.down_proj.weight_scale"),
        "{err}"
    );
    assert!(
        err.contains("unexpected tensors: model.layers.2.mlp.down_proj.weight_scalE"),
        "{err}"
    );
}

#[test]
fn truncated_shard_and_missing_config_fields_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = copy_fixture("bitnet-2b4t-h64-sharded", dir.path());
    let shard = src.join("model-00002-of-00003.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 100]).unwrap();
    let err = convert_fails(&src, dir.path(), &[]);
    assert!(
        err.contains("model-00002-of-00003.safetensors") && err.contains("outside the shard"),
        "{err}"
    );

    let src = copy_fixture("bitnet-2b4t-h64", &dir.path().join("c"));
    let cfg_path = src.join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        cfg.replace("\"hidden_size\"", "\"hidden_sighs\""),
    )
    .unwrap();
    let err = convert_fails(&src, &dir.path().join("c"), &[]);
    assert!(
        err.contains("config.json") && err.contains("hidden_size is missing"),
        "{err}"
    );
}

#[test]
fn an_all_minus_one_tensor_warns_and_strict_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let src = copy_fixture("bitnet-2b4t-h64", dir.path());
    let st = src.join("model.safetensors");
    let start = data_offset(&st, "model.layers.0.mlp.up_proj.weight");
    let mut bytes = std::fs::read(&st).unwrap();
    bytes[start..start + 86 * 256].fill(0);
    std::fs::write(&st, &bytes).unwrap();
    let out = dir.path().join("ok.tern");
    let o = tern(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning") && err.contains("up_proj.weight") && err.contains("−1"),
        "{err}"
    );
    let err = convert_fails(&src, dir.path(), &["--strict"]);
    assert!(
        err.contains("--strict") && err.contains("up_proj.weight"),
        "{err}"
    );
}

#[test]
fn refuses_to_overwrite_and_unknown_families() {
    let dir = tempfile::tempdir().unwrap();
    let path = convert("bitnet-2b4t-h64", dir.path());
    let p = path.to_str().unwrap();
    let src = fixture("bitnet-2b4t-h64");
    let err = tern_fails(&["convert", src.to_str().unwrap(), "-o", p], 2);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    tern_ok(&["convert", src.to_str().unwrap(), "-o", p, "--force", "-q"]);

    let src = copy_fixture("llama-bitlinear", dir.path());
    let cfg_path = src.join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        cfg.replace("LlamaForCausalLM", "MistralForCausalLM")
            .replace("\"llama\"", "\"mistral\""),
    )
    .unwrap();
    let err = convert_fails(&src, dir.path(), &[]);
    assert!(
        err.contains("MistralForCausalLM") && err.contains("architectures"),
        "{err}"
    );
}

#[test]
fn repo_ids_resolve_in_a_hub_cache() {
    let cache = tempfile::tempdir().unwrap();
    let model = cache.path().join("models--tern-test--tiny-bitnet");
    let hash = "abcdef0123456789abcdef0123456789abcdef01";
    let snap = model.join("snapshots").join(hash);
    std::fs::create_dir_all(model.join("refs")).unwrap();
    std::fs::write(model.join("refs/main"), hash).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for e in std::fs::read_dir(fixture("bitnet-2b4t-h64")).unwrap() {
        let e = e.unwrap();
        std::os::unix::fs::symlink(e.path(), snap.join(e.file_name())).unwrap();
    }
    let out = cache.path().join("m.tern");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "convert",
            "tern-test/tiny-bitnet",
            "-o",
            out.to_str().unwrap(),
            "-q",
        ])
        .env("HF_HUB_CACHE", cache.path())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(TernFile::open(&out).is_ok());
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "convert",
            "tern-test/absent",
            "-o",
            out.to_str().unwrap(),
            "--force",
        ])
        .env("HF_HUB_CACHE", cache.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("models--tern-test--absent") && err.contains("download"),
        "{err}"
    );
}

#[test]
fn an_override_that_contradicts_the_declared_scale_convention_is_refused_and_caught() {
    // bitnet-bitlinear: a BitNet block whose quantization_config says linear_class
    // bitlinear (weight_scale = 1/mean|W|, divide).
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("bitnet-bitlinear");
    let out = dir.path().join("m.tern");
    let (s, o) = (src.to_str().unwrap(), out.to_str().unwrap());
    let err = tern_fails(&["convert", s, "-o", o, "--weight-scale", "multiply"], 2);
    assert!(
        err.contains("quantization_config.linear_class") && err.contains("--allow-contradiction"),
        "{err}"
    );
    assert!(!out.exists());
    // Forced anyway: the report records the override, convert warns that the scales look
    // inverted, and verify --source fails on the contradiction and every scale.
    let args = [
        "convert",
        s,
        "-o",
        o,
        "--weight-scale",
        "multiply",
        "--allow-contradiction",
        "--json",
    ];
    let report: serde_json::Value = serde_json::from_str(&tern_ok(&args)).unwrap();
    assert!(
        report["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["from"] == "override"),
        "{report}"
    );
    assert!(
        report["warnings"].to_string().contains("implausibly large"),
        "{report}"
    );
    let out = tern(&["verify", o, "--source", s, "--no-parity", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["source"]["scale_mismatches"], 14, "{doc}");
    assert!(
        doc["source"]["config_mismatches"]
            .to_string()
            .contains("quantization_config.linear_class"),
        "{doc}"
    );
}

#[test]
fn synth_never_replaces_an_output_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.tern");
    let o = out.to_str().unwrap();
    std::fs::write(&out, b"keep me").unwrap();
    let err = tern_fails(&["synth", "-q", "-o", o], 2);
    assert!(err.contains("already exists (pass --force"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    tern_ok(&["synth", "-q", "-o", o, "--force"]);
    TernFile::open(&out).unwrap();

    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    let h = hf.to_str().unwrap();
    let err = tern_fails(&["synth", "-q", "--hf", "packed", "-o", h], 2);
    assert!(err.contains("already exists (pass --force"), "{err}");
    assert_eq!(std::fs::read_dir(&hf).unwrap().count(), 0);
}
