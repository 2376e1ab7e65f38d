use crate::common::*;

#[test]
fn inspect_reports_the_model_and_checks_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = convert("bitnet-2b4t-h64", dir.path());
    let p = path.to_str().unwrap();
    let text = tern_ok(&["inspect", p, "--check", "--tensors"]);
    assert!(text.contains("3 layers, hidden 256"), "{text}");
    assert!(text.contains("all 35 checksums"), "{text}");
    // Words for people, not Rust's debug formatting.
    for debug in ["Some(", "Relu2", "RotateHalf", "Multiply", "true", "false"] {
        assert!(!text.contains(debug), "{debug} in {text}");
    }
    assert!(
        text.contains("squared ReLU") && text.contains("BOS 496"),
        "{text}"
    );
    tern_into_closed_pipe(&["inspect", p, "--tensors"]);
    tern_into_closed_pipe(&["inspect", p, "--json"]);
    assert!(
        text.contains("model.layers.2.mlp.down_proj.weight"),
        "{text}"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&tern_ok(&["inspect", p, "--json", "--check"])).unwrap();
    assert_eq!(doc["summary"]["tensors"], 35);
    assert_eq!(doc["check"]["ok"], true);
    assert_eq!(
        doc["metadata"]["provenance"]["source_family"],
        "BitNetForCausalLM, autobitlinear offline"
    );
    let bits = doc["summary"]["ternary"]["bits_per_value"]
        .as_f64()
        .unwrap();
    assert!((2.0..2.1).contains(&bits), "{bits}");

    // One flipped bit in a tensor: --check names it and exits 1.
    let mut bytes = std::fs::read(&path).unwrap();
    let q = doc["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "model.layers.1.self_attn.v_proj.weight")
        .unwrap();
    let at = q["offset"].as_u64().unwrap() as usize + 7;
    bytes[at] ^= 0x04;
    std::fs::write(&path, &bytes).unwrap();
    let out = tern(&["inspect", p, "--check"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("model.layers.1.self_attn.v_proj.weight") && text.contains("DAMAGED"),
        "{text}"
    );
}

#[test]
fn inspect_of_a_bad_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.tern");
    std::fs::write(&path, [b'x'; 100]).unwrap();
    let err = tern_fails(&["inspect", path.to_str().unwrap()], 2);
    assert!(
        err.contains("junk.tern") && err.contains("bad magic"),
        "{err}"
    );
}
