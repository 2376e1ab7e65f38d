//! Which checkpoint family a folder holds, its normalized config, and where each `.tern`
//! tensor comes from (docs/checkpoints.md §2, §4).

use serde_json::Value;
use tern_format::{
    expected_tensors, Activation, Architecture, ModelConfig, RopeStyle, ScaleConvention, TensorRole,
};

use crate::error::{ConvertError, Result};
use crate::source::{describe_dtypes, get_f64, get_ids, get_u64, Checkpoint};

/// The checkpoint families tern converts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// BitNetForCausalLM, autobitlinear offline: U8 packed, weight_scale = mean|W| (multiply).
    /// microsoft/bitnet-b1.58-2B-4T.
    BitnetPacked,
    /// BitNetForCausalLM, autobitlinear online: bf16 masters. bitnet-b1.58-2B-4T-bf16.
    BitnetMasters,
    /// LlamaForCausalLM with the bitlinear class: U8 packed, weight_scale = 1/mean|W|
    /// (divide). HF1BitLLM Llama3-8B-1.58, Falcon3-*-1.58bit, Falcon-E.
    LlamaBitlinear,
    /// 1bitLLM bitnet_b1_58: fp16 masters, SiLU, sub-norms inner_attn_ln / ffn_layernorm.
    OneBitLlm,
}

impl Family {
    pub const ALL: [Family; 4] = [
        Family::BitnetPacked,
        Family::BitnetMasters,
        Family::LlamaBitlinear,
        Family::OneBitLlm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Family::BitnetPacked => "bitnet-packed",
            Family::BitnetMasters => "bitnet-masters",
            Family::LlamaBitlinear => "llama-bitlinear",
            Family::OneBitLlm => "1bitllm",
        }
    }

    pub fn parse(s: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.name() == s)
    }

    pub fn scale_convention(self) -> ScaleConvention {
        match self {
            Family::BitnetPacked => ScaleConvention::Multiply,
            Family::LlamaBitlinear => ScaleConvention::Divide,
            Family::BitnetMasters | Family::OneBitLlm => ScaleConvention::Masters,
        }
    }

    fn architecture(self) -> Architecture {
        match self {
            Family::LlamaBitlinear => Architecture::Llama,
            _ => Architecture::Bitnet,
        }
    }

    /// Whether ternary weights are stored packed (else float masters).
    pub fn packed(self) -> bool {
        matches!(self, Family::BitnetPacked | Family::LlamaBitlinear)
    }
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Detects the family from config.json and the stored dtypes.
pub fn detect(ck: &Checkpoint) -> Result<Family> {
    let c = &ck.config;
    let archs: Vec<&str> = c
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let model_type = str_field(c, "model_type").unwrap_or("");
    let quant = c.get("quantization_config").filter(|q| !q.is_null());
    let quant_method = quant.and_then(|q| str_field(q, "quant_method"));
    let linear_class = quant.and_then(|q| str_field(q, "linear_class"));
    let mode = quant.and_then(|q| str_field(q, "quantization_mode"));
    let q_dtype = ck
        .get("model.layers.0.self_attn.q_proj.weight")
        .map(|t| format!("{:?}", t.dtype));
    let packed = q_dtype.as_deref() == Some("U8");

    let found = || {
        format!(
            "architectures {archs:?}, model_type {model_type:?}, quantization_config {}, \
             layer-0 q_proj dtype {}, tensors: {}",
            quant.map_or("absent".to_string(), |q| q.to_string()),
            q_dtype.as_deref().unwrap_or("absent"),
            describe_dtypes(&ck.tensors)
        )
    };
    let family = if archs.contains(&"BitNetForCausalLM") || model_type == "bitnet" {
        match (quant_method, linear_class, mode, packed) {
            (Some("bitnet"), Some("autobitlinear"), Some("offline") | None, true) => {
                Some(Family::BitnetPacked)
            }
            (Some("bitnet"), Some("autobitlinear"), Some("online"), false) => {
                Some(Family::BitnetMasters)
            }
            _ => None,
        }
    } else if archs.contains(&"BitnetForCausalLM") {
        (!packed && quant.is_none()).then_some(Family::OneBitLlm)
    } else if archs.contains(&"LlamaForCausalLM") || model_type == "llama" {
        match (quant_method, linear_class, packed) {
            (Some("bitnet"), None | Some("bitlinear"), true) => Some(Family::LlamaBitlinear),
            _ => None,
        }
    } else {
        None
    };
    family.ok_or_else(|| {
        ConvertError::Unsupported(format!(
            "{}: not a BitNet b1.58 checkpoint tern recognizes. Found: {}. Supported: \
             BitNetForCausalLM with autobitlinear offline (packed U8) or online (bf16 masters); \
             LlamaForCausalLM with quant_method bitnet (packed U8, bitlinear scales); \
             1bitLLM BitnetForCausalLM (fp16 masters). Use --family to override.",
            ck.dir.display(),
            found()
        ))
    })
}

/// Builds the normalized config, warning about defaults it had to assume.
pub fn normalize_config(
    ck: &Checkpoint,
    family: Family,
    warnings: &mut Vec<String>,
) -> Result<ModelConfig> {
    let c = &ck.config;
    let path = ck.dir.join("config.json");
    let missing = |key: &str| ConvertError::Source {
        path: path.clone(),
        problem: format!("required field {key:?} is missing or not a number"),
    };
    let req = |key: &str| get_u64(c, key).ok_or_else(|| missing(key));
    let hidden_size = req("hidden_size")?;
    let heads = req("num_attention_heads")?;
    let kv_heads = get_u64(c, "num_key_value_heads").unwrap_or(heads);
    let head_dim = match get_u64(c, "head_dim") {
        Some(d) => d,
        None if heads > 0 && hidden_size % heads == 0 => hidden_size / heads,
        None => return Err(missing("head_dim")),
    };
    let bitnet_defaults = family != Family::LlamaBitlinear;
    let max_pos = get_u64(c, "max_position_embeddings").unwrap_or_else(|| {
        warnings.push("config has no max_position_embeddings: assuming 2048".into());
        2048
    });
    let rms_norm_eps = get_f64(c, "rms_norm_eps")
        .or_else(|| get_f64(c, "rms_norm_epsilon"))
        .unwrap_or_else(|| {
            let eps = if bitnet_defaults { 1e-5 } else { 1e-6 };
            warnings.push(format!("config has no rms_norm_eps: assuming {eps}"));
            eps
        });
    let rope_params = c.get("rope_parameters").filter(|v| v.is_object());
    let rope_theta = get_f64(c, "rope_theta")
        .or_else(|| rope_params.and_then(|p| get_f64(p, "rope_theta")))
        .unwrap_or_else(|| {
            let theta = match family {
                Family::BitnetPacked | Family::BitnetMasters => 500000.0,
                _ => 10000.0,
            };
            warnings.push(format!("config has no rope_theta: assuming {theta}"));
            theta
        });
    for scaling in [c.get("rope_scaling"), rope_params] {
        if let Some(s) = scaling.filter(|s| !s.is_null()) {
            let kind = str_field(s, "rope_type").or_else(|| str_field(s, "type"));
            if !matches!(kind, None | Some("default")) {
                return Err(ConvertError::Unsupported(format!(
                    "{}: RoPE scaling {s} is not supported yet",
                    path.display()
                )));
            }
        }
    }
    let act = str_field(c, "hidden_act").unwrap_or(
        if family == Family::BitnetPacked || family == Family::BitnetMasters {
            "relu2"
        } else {
            "silu"
        },
    );
    let activation = match act {
        "relu2" => Activation::Relu2,
        "silu" | "swish" => Activation::Silu,
        other => {
            return Err(ConvertError::Unsupported(format!(
                "{}: hidden_act {other:?} is not supported (relu2 or silu)",
                path.display()
            )))
        }
    };
    if c.get("attention_bias").and_then(Value::as_bool) == Some(true)
        || c.get("mlp_bias").and_then(Value::as_bool) == Some(true)
    {
        return Err(ConvertError::Unsupported(format!(
            "{}: linear biases are not supported",
            path.display()
        )));
    }
    if let Some(q) = c.get("quantization_config") {
        if q.get("use_rms_norm").and_then(Value::as_bool) == Some(true) {
            return Err(ConvertError::Unsupported(format!(
                "{}: quantization_config.use_rms_norm (a norm inside every BitLinear) is not supported",
                path.display()
            )));
        }
    }
    // A stored lm_head wins over tie_word_embeddings, as in transformers 5.x.
    let tie_word_embeddings = ck.get("lm_head.weight").is_none();
    let configured_tie = c
        .get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(family == Family::OneBitLlm);
    if configured_tie && !tie_word_embeddings {
        warnings.push(
            "config says tie_word_embeddings but lm_head.weight is stored: using the stored head"
                .into(),
        );
    }
    if !configured_tie && tie_word_embeddings {
        return Err(ConvertError::Source {
            path: ck.dir.clone(),
            problem: "the head is untied (tie_word_embeddings false) but lm_head.weight is missing"
                .into(),
        });
    }
    let sub_norms = family != Family::LlamaBitlinear;

    let tok_cfg = ck.tokenizer_config.as_ref();
    let bos_token_id = get_ids(c, "bos_token_id").first().copied();
    let mut eos_token_ids = get_ids(c, "eos_token_id");
    if let Some(g) = &ck.generation_config {
        eos_token_ids.extend(get_ids(g, "eos_token_id"));
    }
    eos_token_ids.extend(end_of_turn_ids(ck));
    let vocab_size = req("vocab_size")?;
    eos_token_ids.retain(|&id| u64::from(id) < vocab_size);
    eos_token_ids.sort_unstable();
    eos_token_ids.dedup();
    let add_bos_token = tok_cfg
        .and_then(|t| t.get("add_bos_token"))
        .and_then(Value::as_bool)
        .unwrap_or(bos_token_id.is_some());

    let config = ModelConfig {
        architecture: family.architecture(),
        hidden_size,
        num_hidden_layers: req("num_hidden_layers")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        intermediate_size: req("intermediate_size")?,
        vocab_size,
        max_position_embeddings: max_pos,
        rms_norm_eps,
        rope_theta,
        rope_style: RopeStyle::RotateHalf,
        activation,
        attn_sub_norm: sub_norms,
        ffn_sub_norm: sub_norms,
        tie_word_embeddings,
        bos_token_id: bos_token_id.filter(|&id| u64::from(id) < vocab_size),
        eos_token_ids,
        add_bos_token,
    };
    config.validate().map_err(|problem| ConvertError::Source {
        path: path.clone(),
        problem,
    })?;
    Ok(config)
}

/// Ids of end-of-turn special tokens the tokenizer defines (generation stops at them).
fn end_of_turn_ids(ck: &Checkpoint) -> Vec<u32> {
    const END_OF_TURN: [&str; 4] = [
        "<|eot_id|>",
        "<|im_end|>",
        "<|end_of_turn|>",
        "<|endoftext|>",
    ];
    let Some(json) = &ck.tokenizer_json else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_slice::<Value>(json) else {
        return Vec::new();
    };
    v.get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|t| {
            t.get("content")
                .and_then(Value::as_str)
                .is_some_and(|c| END_OF_TURN.contains(&c))
        })
        .filter_map(|t| t.get("id").and_then(Value::as_u64).map(|id| id as u32))
        .collect()
}

/// The chat template: `chat_template.jinja` (transformers 5.x saves it there), else
/// tokenizer_config.json's `chat_template` (a string, or a list of named templates).
pub fn chat_template(ck: &Checkpoint) -> Option<String> {
    if let Ok(t) = std::fs::read_to_string(ck.dir.join("chat_template.jinja")) {
        return Some(t);
    }
    let t = ck.tokenizer_config.as_ref()?.get("chat_template")?;
    match t {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|e| str_field(e, "name") == Some("default"))
            .or_else(|| list.first())
            .and_then(|e| str_field(e, "template"))
            .map(str::to_string),
        _ => None,
    }
}

/// Where a `.tern` tensor comes from.
#[derive(Clone, Debug)]
pub enum Origin {
    /// A float tensor copied in its stored precision.
    Float { src: String },
    /// Packed U8 codes plus a weight_scale tensor.
    Packed { src: String, scale: String },
    /// Float masters to ternarize.
    Masters { src: String },
}

impl Origin {
    pub fn src(&self) -> &str {
        match self {
            Origin::Float { src } | Origin::Packed { src, .. } | Origin::Masters { src } => src,
        }
    }
}

/// One tensor of the output with its origin.
#[derive(Clone, Debug)]
pub struct Planned {
    pub name: String,
    pub shape: Vec<u64>,
    pub role: TensorRole,
    pub origin: Origin,
}

/// Maps every tensor the config requires to its source, and checks that the source has
/// nothing unaccounted for.
pub fn plan(ck: &Checkpoint, family: Family, config: &ModelConfig) -> Result<Vec<Planned>> {
    let mut plan = Vec::new();
    let mut used = std::collections::HashSet::new();
    let mut missing = Vec::new();
    for (name, shape, role) in expected_tensors(config) {
        let src = source_name(family, &name);
        let origin = match role {
            TensorRole::Ternary if family.packed() => Origin::Packed {
                scale: src.replace(".weight", ".weight_scale"),
                src,
            },
            TensorRole::Ternary => Origin::Masters { src },
            _ => Origin::Float { src },
        };
        let mut needed = vec![origin.src().to_string()];
        if let Origin::Packed { scale, .. } = &origin {
            needed.push(scale.clone());
        }
        for n in needed {
            if ck.get(&n).is_none() {
                missing.push(n.clone());
            }
            used.insert(n);
        }
        plan.push(Planned {
            name,
            shape,
            role,
            origin,
        });
    }
    let unexpected: Vec<&String> = ck
        .tensors
        .keys()
        .filter(|n| !used.contains(*n) && !n.ends_with("rotary_emb.inv_freq"))
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        let list = |v: Vec<&String>| {
            let n = v.len();
            let mut s: Vec<String> = v.into_iter().take(12).cloned().collect();
            if n > 12 {
                s.push(format!("… and {} more", n - 12));
            }
            s.join(", ")
        };
        let mut problem = String::new();
        if !missing.is_empty() {
            problem += &format!("missing tensors: {}", list(missing.iter().collect()));
        }
        if !unexpected.is_empty() {
            if !problem.is_empty() {
                problem += "; ";
            }
            problem += &format!("unexpected tensors: {}", list(unexpected));
        }
        return Err(ConvertError::Source {
            path: ck.dir.clone(),
            problem: format!("{problem} (family {})", family.name()),
        });
    }
    Ok(plan)
}

/// The source checkpoint's name for a normalized tensor name.
pub fn source_name(family: Family, name: &str) -> String {
    if family == Family::OneBitLlm {
        return name
            .replace("self_attn.attn_sub_norm", "self_attn.inner_attn_ln")
            .replace("mlp.ffn_sub_norm", "mlp.ffn_layernorm");
    }
    name.to_string()
}
