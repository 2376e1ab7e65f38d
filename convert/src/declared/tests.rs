//! Each axis decided on its own, from small checkpoints written here: the class, the scale
//! convention, the storage per tensor, sub-norms, activation, biases, RoPE, typed fields and
//! contradicting overrides.

use std::path::Path;

use safetensors::Dtype;
use serde_json::{json, Value};
use tern_format::{Activation, RopeScaling, ScaleConvention};

use super::*;
use crate::ConvertError;

const H: u64 = 8;
const I: u64 = 12;
const V: u64 = 16;

/// A one-layer checkpoint: `linear` gives each BitLinear's (dtype, shape) by its output
/// and input sizes; `extra` adds tensors.
fn write_checkpoint(
    dir: &Path,
    config: &Value,
    linear: impl Fn(u64, u64) -> (Dtype, Vec<u64>),
    sub_norms: &[(&str, u64)],
    extra: &[(&str, Dtype, Vec<u64>)],
) {
    let mut tensors: Vec<(String, Dtype, Vec<u64>)> = vec![
        ("model.embed_tokens.weight".into(), Dtype::BF16, vec![V, H]),
        ("model.norm.weight".into(), Dtype::BF16, vec![H]),
        (
            "model.layers.0.input_layernorm.weight".into(),
            Dtype::BF16,
            vec![H],
        ),
        (
            "model.layers.0.post_attention_layernorm.weight".into(),
            Dtype::BF16,
            vec![H],
        ),
    ];
    for (name, out, inp) in [
        ("self_attn.q_proj", H, H),
        ("self_attn.k_proj", H, H),
        ("self_attn.v_proj", H, H),
        ("self_attn.o_proj", H, H),
        ("mlp.gate_proj", I, H),
        ("mlp.up_proj", I, H),
        ("mlp.down_proj", H, I),
    ] {
        let (dtype, shape) = linear(out, inp);
        tensors.push((format!("model.layers.0.{name}.weight"), dtype, shape));
        if dtype == Dtype::U8 {
            tensors.push((
                format!("model.layers.0.{name}.weight_scale"),
                Dtype::BF16,
                vec![1],
            ));
        }
    }
    for (n, len) in sub_norms {
        tensors.push((
            format!("model.layers.0.{n}.weight"),
            Dtype::BF16,
            vec![*len],
        ));
    }
    for (n, d, s) in extra {
        tensors.push((n.to_string(), *d, s.clone()));
    }
    let data: Vec<(String, Vec<u8>, Dtype, Vec<usize>)> = tensors
        .into_iter()
        .map(|(n, d, s)| {
            let len = s.iter().product::<u64>() as usize * d.size();
            // 0x55 bytes: valid packed codes (trit 0) and small non-zero floats.
            (
                n,
                vec![0x3c; len],
                d,
                s.iter().map(|&x| x as usize).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, b, d, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, &None, &dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

fn base_config(class: &str) -> Value {
    let mut c = json!({
        "architectures": [class],
        "hidden_size": H, "intermediate_size": I, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": V,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2,
    });
    if class == "BitNetForCausalLM" {
        c["model_type"] = json!("bitnet");
    }
    c
}

fn packed(out: u64, inp: u64) -> (Dtype, Vec<u64>) {
    (Dtype::U8, vec![out / 4, inp])
}

fn float(out: u64, inp: u64) -> (Dtype, Vec<u64>) {
    (Dtype::BF16, vec![out, inp])
}

const BITNET_SUB_NORMS: [(&str, u64); 2] =
    [("self_attn.attn_sub_norm", H), ("mlp.ffn_sub_norm", I)];

fn read(
    config: &Value,
    linear: fn(u64, u64) -> (Dtype, Vec<u64>),
    sub: &[(&str, u64)],
    o: &Overrides,
) -> Result<Declared> {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), config, linear, sub, &[]);
    let ck = Checkpoint::open(dir.path())?;
    let d = Declared::read(&ck, o)?;
    d.plan(&ck)?;
    Ok(d)
}

fn quant(linear_class: Option<&str>, mode: Option<&str>) -> Value {
    let mut q = json!({"quant_method": "bitnet"});
    if let Some(l) = linear_class {
        q["linear_class"] = json!(l);
    }
    if let Some(m) = mode {
        q["quantization_mode"] = json!(m);
    }
    q
}

fn with(mut c: Value, key: &str, v: Value) -> Value {
    c[key] = v;
    c
}

#[test]
fn the_scale_convention_comes_from_linear_class_whatever_the_architecture() {
    let none = Overrides::default();
    for (class, sub) in [
        ("BitNetForCausalLM", &BITNET_SUB_NORMS[..]),
        ("LlamaForCausalLM", &[][..]),
    ] {
        for (lc, mode, storage, want) in [
            (
                Some("autobitlinear"),
                Some("offline"),
                packed as fn(u64, u64) -> _,
                ScaleConvention::Multiply,
            ),
            (
                Some("autobitlinear"),
                Some("online"),
                float,
                ScaleConvention::Masters,
            ),
            (
                Some("bitlinear"),
                Some("offline"),
                packed,
                ScaleConvention::Divide,
            ),
            (None, None, packed, ScaleConvention::Divide),
        ] {
            let c = with(base_config(class), "quantization_config", quant(lc, mode));
            let d = read(&c, storage, sub, &none).unwrap_or_else(|e| panic!("{class} {lc:?}: {e}"));
            assert_eq!(d.convention, want, "{class} {lc:?} {mode:?}");
        }
    }
}

#[test]
fn offline_autobitlinear_float_weights_are_ternary_floats() {
    let c = with(
        base_config("LlamaForCausalLM"),
        "quantization_config",
        quant(Some("autobitlinear"), None),
    );
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &c, float, &[], &[]);
    let ck = Checkpoint::open(dir.path()).unwrap();
    let d = Declared::read(&ck, &Overrides::default()).unwrap();
    let plan = d.plan(&ck).unwrap();
    let q = plan
        .iter()
        .find(|p| p.name.ends_with("q_proj.weight"))
        .unwrap();
    assert!(matches!(
        &q.origin,
        Origin::Ternary {
            rule: WeightRule::TernaryFloat { scale_tensor: None },
            ..
        }
    ));
}

#[test]
fn float_weights_under_the_legacy_bitlinear_class_are_refused() {
    let c = with(
        base_config("LlamaForCausalLM"),
        "quantization_config",
        quant(None, None),
    );
    let err = read(&c, float, &[], &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("legacy BitLinear") && err.contains("q_proj"),
        "{err}"
    );
}

#[test]
fn packed_weights_declared_online_are_refused() {
    let c = with(
        base_config("LlamaForCausalLM"),
        "quantization_config",
        quant(Some("autobitlinear"), Some("online")),
    );
    let err = read(&c, packed, &[], &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("online"), "{err}");
}

#[test]
fn no_quantization_config_is_a_float_model_unless_1bitllm() {
    let err = read(
        &base_config("LlamaForCausalLM"),
        packed,
        &[],
        &Overrides::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("quantization_config") && err.contains("float model"),
        "{err}"
    );
    // An override where nothing is declared contradicts nothing.
    let o = Overrides {
        scale_convention: Some(ScaleConvention::Divide),
        ..Default::default()
    };
    assert_eq!(
        read(&base_config("LlamaForCausalLM"), packed, &[], &o)
            .unwrap()
            .convention,
        ScaleConvention::Divide
    );
    let onebit = [("self_attn.inner_attn_ln", H), ("mlp.ffn_layernorm", I)];
    let d = read(
        &base_config("BitnetForCausalLM"),
        float,
        &onebit,
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(
        (d.convention, d.sub_norms),
        (ScaleConvention::Masters, SubNorms::OneBitLlm)
    );
    assert_eq!(
        d.source_name("model.layers.0.mlp.ffn_sub_norm.weight"),
        "model.layers.0.mlp.ffn_layernorm.weight"
    );
}

#[test]
fn overrides_that_contradict_a_declaration_need_an_explicit_allowance() {
    let c = with(
        base_config("BitNetForCausalLM"),
        "quantization_config",
        quant(Some("bitlinear"), None),
    );
    let o = Overrides {
        scale_convention: Some(ScaleConvention::Multiply),
        ..Default::default()
    };
    match read(&c, packed, &BITNET_SUB_NORMS, &o) {
        Err(ConvertError::Contradiction { field, .. }) => {
            assert_eq!(field, "quantization_config.linear_class")
        }
        other => panic!("{other:?}"),
    }
    let allowed = Overrides {
        allow_contradiction: true,
        ..o
    };
    let d = read(&c, packed, &BITNET_SUB_NORMS, &allowed).unwrap();
    assert_eq!(d.convention, ScaleConvention::Multiply);
    assert!(d.decisions.iter().any(|x| x.from == "override"));

    let c = with(
        base_config("LlamaForCausalLM"),
        "quantization_config",
        quant(None, None),
    );
    let c = with(c, "hidden_act", json!("silu"));
    let o = Overrides {
        activation: Some(Activation::Relu2),
        ..Default::default()
    };
    match read(&c, packed, &[], &o) {
        Err(ConvertError::Contradiction { field, .. }) => assert_eq!(field, "hidden_act"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn sub_norms_must_match_the_class() {
    let c = with(
        base_config("BitNetForCausalLM"),
        "quantization_config",
        quant(Some("autobitlinear"), None),
    );
    let err = read(&c, packed, &[], &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sub-norms") && err.contains("BitNetForCausalLM"),
        "{err}"
    );
    let c = with(
        base_config("LlamaForCausalLM"),
        "quantization_config",
        quant(None, None),
    );
    let err = read(&c, packed, &BITNET_SUB_NORMS, &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no sub-norms"), "{err}");
}

#[test]
fn bitnet_heads_must_add_up_to_hidden_size() {
    // transformers builds such a BitNet (its sub-norm has hidden_size weights) but its
    // forward fails. (A Llama has no sub-norm: its head_dim may differ, fixtures hold one.)
    let bitnet = with(
        base_config("BitNetForCausalLM"),
        "quantization_config",
        quant(Some("autobitlinear"), None),
    );
    let odd = with(bitnet.clone(), "head_dim", json!(24));
    let err = read(&odd, packed, &BITNET_SUB_NORMS, &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("head_dim") && err.contains("hidden_size") && err.contains("sub-norm"),
        "{err}"
    );
    let even = with(bitnet, "head_dim", json!(H / 2));
    let d = read(&even, packed, &BITNET_SUB_NORMS, &Overrides::default()).unwrap();
    assert_eq!(d.config.head_dim, H / 2);
}

#[test]
fn activation_and_biases_come_from_the_config() {
    let llama = with(
        base_config("LlamaForCausalLM"),
        "quantization_config",
        quant(None, None),
    );
    let d = read(&llama, packed, &[], &Overrides::default()).unwrap();
    assert_eq!(d.config.activation, Activation::Silu);
    let err = read(
        &with(llama.clone(), "hidden_act", json!("gelu")),
        packed,
        &[],
        &Overrides::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("hidden_act") && err.contains("gelu"), "{err}");
    let bitnet = with(
        base_config("BitNetForCausalLM"),
        "quantization_config",
        quant(Some("autobitlinear"), None),
    );
    assert_eq!(
        read(&bitnet, packed, &BITNET_SUB_NORMS, &Overrides::default())
            .unwrap()
            .config
            .activation,
        Activation::Relu2
    );

    // Declared biases must be stored; stored biases must be declared.
    let biased = with(llama.clone(), "attention_bias", json!(true));
    let err = read(&biased, packed, &[], &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing tensors") && err.contains("q_proj.bias"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let bias = [("model.layers.0.self_attn.q_proj.bias", Dtype::BF16, vec![H])];
    write_checkpoint(dir.path(), &llama, packed, &[], &bias);
    let ck = Checkpoint::open(dir.path()).unwrap();
    let err = Declared::read(&ck, &Overrides::default())
        .unwrap()
        .plan(&ck)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unexpected tensors") && err.contains("attention_bias"),
        "{err}"
    );
}

#[test]
fn rope_scaling_as_transformers_reads_it() {
    let llama = with(
        base_config("LlamaForCausalLM"),
        "quantization_config",
        quant(None, None),
    );
    let rope = |c: &Value| {
        read(c, packed, &[], &Overrides::default())
            .map(|d| (d.config.rope_theta, d.config.rope_scaling))
    };
    // Hub style.
    let c = with(
        llama.clone(),
        "rope_scaling",
        json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    );
    assert_eq!(
        rope(&c).unwrap(),
        (
            10000.0,
            Some(RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            })
        )
    );
    // transformers-5 style, theta inside; the older "type" key.
    let c = with(
        llama.clone(),
        "rope_parameters",
        json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}),
    );
    assert_eq!(
        rope(&c).unwrap(),
        (5e5, Some(RopeScaling::Linear { factor: 2.0 }))
    );
    let c = with(
        llama.clone(),
        "rope_scaling",
        json!({"type": "linear", "factor": 4.0}),
    );
    assert_eq!(
        rope(&c).unwrap().1,
        Some(RopeScaling::Linear { factor: 4.0 })
    );
    let c = with(
        llama.clone(),
        "rope_parameters",
        json!({"rope_type": "default", "rope_theta": 1e6}),
    );
    assert_eq!(rope(&c).unwrap(), (1e6, None));
    // Refused, naming the field.
    for (key, v, field) in [
        (
            "rope_scaling",
            json!({"rope_type": "yarn", "factor": 4.0}),
            "rope_scaling.rope_type",
        ),
        (
            "rope_scaling",
            json!({"rope_type": "linear"}),
            "rope_scaling.factor",
        ),
        (
            "rope_parameters",
            json!({"rope_type": "default", "partial_rotary_factor": 0.5}),
            "rope_parameters.partial_rotary_factor",
        ),
        ("rope_theta", json!("big"), "rope_theta"),
    ] {
        let err = rope(&with(llama.clone(), key, v)).unwrap_err().to_string();
        assert!(err.contains(field), "{key}: {err}");
    }
}

#[test]
fn fields_of_the_wrong_type_and_bad_token_ids_are_errors() {
    let llama = with(
        base_config("LlamaForCausalLM"),
        "quantization_config",
        quant(None, None),
    );
    let check = |key: &str, v: Value, want: &str| {
        let err = read(
            &with(llama.clone(), key, v),
            packed,
            &[],
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(key) && err.contains(want), "{key}: {err}");
    };
    check(
        "bos_token_id",
        json!(1099511627776u64),
        "outside the vocabulary",
    );
    check(
        "bos_token_id",
        json!(4294969328u64),
        "outside the vocabulary",
    );
    check("bos_token_id", json!(-1), "token id");
    check("eos_token_id", json!([2, 16]), "outside the vocabulary");
    check("hidden_size", json!("8"), "integer");
    check("rms_norm_eps", json!("tiny"), "number");
    check("attention_bias", json!("yes"), "true or false");
    // null is absent.
    let d = read(
        &with(llama.clone(), "bos_token_id", Value::Null),
        packed,
        &[],
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(
        (d.config.bos_token_id, d.config.add_bos_token),
        (None, false)
    );
}

#[test]
fn modules_to_not_convert_matches_as_transformers_does() {
    // Expected sets computed with transformers 5.24's own should_convert_module over the 84
    // linears of a 12-layer model (layer 1 must not match layer 11).
    let modules = ModelConfig {
        num_hidden_layers: 12,
        ..ModelConfig::bitnet_b158()
    }
    .linear_modules();
    let config = json!({});
    let c = Fields {
        json: &config,
        file: "config.json",
    };
    let dense = |patterns: &[&str]| {
        let p: Vec<String> = patterns.iter().map(|s| s.to_string()).collect();
        dense_linears(&c, &p, &modules)
    };
    let names = |v: Vec<String>| v.join(" ");
    let cases: [(&[&str], usize, &str); 8] = [
        (
            &["lm_head", "model.layers.0.mlp.down_proj"],
            1,
            "model.layers.0.mlp.down_proj",
        ),
        (
            &["lm_head", "model.layers.1"],
            7,
            "model.layers.1.self_attn.q_proj",
        ),
        (
            &["lm_head", "down_proj"],
            12,
            "model.layers.11.mlp.down_proj",
        ),
        (&["lm_head", "mlp.gate"], 0, ""),
        (
            &["lm_head", "model.layers.*.self_attn.o_proj"],
            12,
            "model.layers.7.self_attn.o_proj",
        ),
        (
            &["lm_head", "model.layers.1.mlp"],
            3,
            "model.layers.1.mlp.up_proj",
        ),
        (&[".*"], 84, "model.layers.3.self_attn.k_proj"),
        (&["lm_head"], 0, ""),
    ];
    for (patterns, n, one) in cases {
        let d = dense(patterns).unwrap();
        assert_eq!(d.len(), n, "{patterns:?}: {d:?}");
        assert!(d.iter().any(|m| m == one) || n == 0, "{patterns:?}");
        assert!(
            !names(d).contains("model.layers.11.") || n >= 12,
            "{patterns:?} matched layer 11"
        );
    }
    // A list without the head: transformers would quantize lm_head. "lm_head.weight" does
    // not match the module "lm_head" there either.
    for patterns in [
        &["model.layers.0.mlp.down_proj"][..],
        &["lm_head.weight"],
        &["lm_"],
    ] {
        let e = dense(patterns).unwrap_err().to_string();
        assert!(
            e.contains("modules_to_not_convert") && e.contains("lm_head"),
            "{patterns:?}: {e}"
        );
    }
    let e = dense(&["lm_head", "["]).unwrap_err().to_string();
    assert!(
        e.contains("modules_to_not_convert") && e.contains("\"[\""),
        "{e}"
    );
}

#[test]
fn linears_not_converted_are_planned_dense() {
    // Float masters (online): the listed linear is planned as a dense float tensor.
    let mut q = quant(Some("autobitlinear"), Some("online"));
    q["modules_to_not_convert"] = json!(["lm_head", "model.layers.0.mlp.down_proj"]);
    let c = with(base_config("LlamaForCausalLM"), "quantization_config", q);
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &c, float, &[], &[]);
    let ck = Checkpoint::open(dir.path()).unwrap();
    let d = Declared::read(&ck, &Overrides::default()).unwrap();
    assert_eq!(d.config.dense_linears, ["model.layers.0.mlp.down_proj"]);
    assert!(d.decisions.iter().any(
        |x| x.axis == "dense linears" && x.from == "quantization_config.modules_to_not_convert"
    ));
    let plan = d.plan(&ck).unwrap();
    let down = plan
        .iter()
        .find(|p| p.name == "model.layers.0.mlp.down_proj.weight")
        .unwrap();
    assert_eq!(down.role, TensorRole::DenseLinear);
    assert!(matches!(down.origin, Origin::Float { .. }));
    assert_eq!(
        plan.iter()
            .filter(|p| p.role == TensorRole::Ternary)
            .count(),
        6
    );
    assert!(storage_summary(&plan).contains("1 dense"));
}

#[test]
fn a_float_llama_with_ternary_values_is_refused_saying_why() {
    // TriLM-like: no quantization_config, F16 values in {-s, 0, +s} with two scales.
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(
        dir.path(),
        &base_config("LlamaForCausalLM"),
        |o, i| (Dtype::F16, vec![o, i]),
        &[],
        &[],
    );
    let st = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    // Rewrite q_proj's data: half +0.5, half -0.25 (f16).
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let off = header["model.layers.0.self_attn.q_proj.weight"]["data_offsets"][0]
        .as_u64()
        .unwrap() as usize;
    for k in 0..64 {
        let v = if k % 2 == 0 {
            half::f16::from_f32(0.5)
        } else {
            half::f16::from_f32(-0.25)
        };
        let at = 8 + header_len + off + 2 * k;
        bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    std::fs::write(&st, bytes).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let err = Declared::read(&ck, &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("2 distinct scale") && err.contains("TriLM"),
        "{err}"
    );
}
