//! What a checkpoint declares, decided one axis at a time (docs/architecture.md, "Checkpoint
//! axes"): the block architecture from config.json and the tensor names, the scale
//! convention from `quantization_config`, and the weight storage per tensor from its dtype
//! and shape. Every decision is recorded with the field it came from; an override that
//! contradicts a declaration is refused unless contradictions are allowed explicitly.
//!
//! The rules are those of transformers 5.24 (docs/checkpoints.md): whatever its Llama and
//! BitNet model classes load, tern reproduces or refuses with the field named.

use serde::Serialize;
use serde_json::Value;
use tern_format::{
    expected_tensors, Activation, Architecture, Decision, ModelConfig, RopeScaling, RopeStyle,
    ScaleConvention, TensorRole,
};

use crate::error::{ConvertError, Result};
use crate::source::{Checkpoint, SourceTensor};

/// The model class, from `architectures` (or `model_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ModelClass {
    /// transformers' `BitNetForCausalLM`: sub-norms in every layer, relu² by default.
    BitNet,
    /// transformers' `LlamaForCausalLM` with ternary linears: no sub-norms, SiLU by default.
    Llama,
    /// 1bitLLM's custom-code `BitnetForCausalLM`: float masters quantized at run time,
    /// sub-norms named `inner_attn_ln` / `ffn_layernorm`.
    OneBitLlm,
}

impl ModelClass {
    pub fn name(self) -> &'static str {
        match self {
            ModelClass::BitNet => "BitNetForCausalLM",
            ModelClass::Llama => "LlamaForCausalLM",
            ModelClass::OneBitLlm => "BitnetForCausalLM (1bitLLM)",
        }
    }
}

/// Which BitLinear class transformers builds from `quantization_config.linear_class`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum LinearClass {
    /// `autobitlinear`: `weight_scale = mean|W|`, multiplied after the matmul (offline), or
    /// float masters ternarized at run time (online).
    AutoBitLinear { online: bool },
    /// `bitlinear` or no `linear_class`: packed U8 and `weight_scale = 1/mean|W|`, divided.
    BitLinear,
    /// 1bitLLM's own BitLinear: float masters ternarized at run time (as autobitlinear online).
    OneBitLlm,
}

impl LinearClass {
    /// How a stored `weight_scale` relates to the true weight (Masters: none is stored).
    pub fn convention(self) -> ScaleConvention {
        match self {
            LinearClass::AutoBitLinear { online: false } => ScaleConvention::Multiply,
            LinearClass::BitLinear => ScaleConvention::Divide,
            LinearClass::AutoBitLinear { online: true } | LinearClass::OneBitLlm => {
                ScaleConvention::Masters
            }
        }
    }
}

/// Where the sub-norms are (or that there are none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubNorms {
    /// `self_attn.attn_sub_norm`, `mlp.ffn_sub_norm` (BitNetForCausalLM).
    BitNet,
    /// `self_attn.inner_attn_ln`, `mlp.ffn_layernorm` (1bitLLM).
    OneBitLlm,
    None,
}

/// How the true weight of one ternary linear comes from what is stored.
#[derive(Clone, Debug, PartialEq)]
pub enum WeightRule {
    /// U8 `[out/4, in]` codes (transformers' `pack_weights`) and a one-element `weight_scale`.
    Packed {
        scale_tensor: String,
        convention: ScaleConvention,
    },
    /// Float masters, ternarized with absmean (transformers' `WeightQuant`).
    Masters,
    /// Float values already in {−s, 0, +s}, times `weight_scale` if stored (autobitlinear
    /// offline with full-shape float weights): stored exactly with scale `s · weight_scale`.
    TernaryFloat { scale_tensor: Option<String> },
}

/// User overrides of single axes. An override that contradicts what the checkpoint
/// declares is an error unless `allow_contradiction` is set.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `Multiply` or `Divide`: how a stored `weight_scale` is read.
    pub scale_convention: Option<ScaleConvention>,
    pub activation: Option<Activation>,
    pub allow_contradiction: bool,
}

/// Everything decided about a checkpoint before any tensor data is read.
#[derive(Clone, Debug)]
pub struct Declared {
    pub class: ModelClass,
    /// None: no `quantization_config` (1bitLLM) — decided by the class.
    pub linear_class: LinearClass,
    pub sub_norms: SubNorms,
    /// `quantization_config.modules_to_not_convert` as written (None: absent, and
    /// transformers then keeps only the head float). The block linears it matches are the
    /// config's `dense_linears`.
    pub not_converted: Option<Vec<String>>,
    /// The scale convention used for packed tensors (declared, or an override).
    pub convention: ScaleConvention,
    pub config: ModelConfig,
    pub decisions: Vec<Decision>,
    pub warnings: Vec<String>,
}

/// One output tensor and where it comes from.
#[derive(Clone, Debug)]
pub struct Planned {
    pub name: String,
    pub shape: Vec<u64>,
    pub role: TensorRole,
    pub origin: Origin,
}

#[derive(Clone, Debug)]
pub enum Origin {
    /// A float tensor copied in its stored precision.
    Float { src: String },
    /// A ternary linear.
    Ternary { src: String, rule: WeightRule },
    /// A linear's bias, stored as f32 `bias × factor` where `factor` is the linear's
    /// `weight_scale` for autobitlinear offline (transformers scales the bias with the
    /// output: `F.linear(x, W, b) · weight_scale`), else 1.
    Bias {
        src: String,
        scale_tensor: Option<String>,
    },
}

impl Origin {
    pub fn src(&self) -> &str {
        match self {
            Origin::Float { src } | Origin::Ternary { src, .. } | Origin::Bias { src, .. } => src,
        }
    }

    /// Every source tensor this output reads.
    pub fn sources(&self) -> Vec<&str> {
        let mut v = vec![self.src()];
        match self {
            Origin::Ternary {
                rule:
                    WeightRule::Packed { scale_tensor, .. }
                    | WeightRule::TernaryFloat {
                        scale_tensor: Some(scale_tensor),
                    },
                ..
            }
            | Origin::Bias {
                scale_tensor: Some(scale_tensor),
                ..
            } => v.push(scale_tensor),
            _ => {}
        }
        v
    }
}

// ---- typed config fields: present-but-wrong-type is an error, null is absent -------------

/// Reads typed fields of one JSON file, naming the file and field in every error.
pub struct Fields<'a> {
    pub json: &'a Value,
    pub file: &'a str,
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    fn wrong(&self, key: &str, v: &Value, want: &str) -> ConvertError {
        ConvertError::Field {
            file: self.file.to_string(),
            field: key.to_string(),
            problem: format!("is {v}, expected {want}"),
        }
    }

    pub fn u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, v, "a non-negative integer")),
        }
    }

    pub fn f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| self.wrong(key, v, "a finite number")),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong(key, v, "true or false")),
        }
    }

    pub fn str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong(key, v, "a string")),
        }
    }

    /// A token id or a list of them, each below `vocab`.
    pub fn ids(&self, key: &str, vocab: u64) -> Result<Vec<u32>> {
        let values: Vec<&Value> = match self.get(key) {
            None => return Ok(Vec::new()),
            Some(Value::Array(a)) => a.iter().collect(),
            Some(v) => vec![v],
        };
        values
            .into_iter()
            .map(|v| match v.as_u64() {
                Some(id) if id < vocab => Ok(id as u32),
                Some(id) => Err(ConvertError::Field {
                    file: self.file.to_string(),
                    field: key.to_string(),
                    problem: format!("token id {id} is outside the vocabulary of {vocab}"),
                }),
                None => Err(self.wrong(key, v, "a token id (a non-negative integer)")),
            })
            .collect()
    }
}

// ---- the axes ------------------------------------------------------------------------------

fn class_of(c: &Fields) -> Result<(ModelClass, String)> {
    let archs: Vec<&str> = match c.get("architectures") {
        None => Vec::new(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        Some(v) => return Err(c.wrong("architectures", v, "a list of class names")),
    };
    for a in &archs {
        let class = match *a {
            "BitNetForCausalLM" => ModelClass::BitNet,
            "LlamaForCausalLM" => ModelClass::Llama,
            "BitnetForCausalLM" => ModelClass::OneBitLlm,
            _ => continue,
        };
        return Ok((class, format!("architectures {a:?}")));
    }
    match c.str("model_type")? {
        Some("bitnet") => Ok((ModelClass::BitNet, "model_type \"bitnet\"".into())),
        Some("llama") => Ok((ModelClass::Llama, "model_type \"llama\"".into())),
        other => Err(ConvertError::Field {
            file: c.file.to_string(),
            field: "architectures".into(),
            problem: format!(
                "is {archs:?} (model_type {other:?}): tern converts BitNetForCausalLM, \
                 LlamaForCausalLM with a bitnet quantization_config, and 1bitLLM's \
                 BitnetForCausalLM"
            ),
        }),
    }
}

fn linear_class_of(
    c: &Fields,
    class: ModelClass,
) -> Result<(Option<LinearClass>, Option<Vec<String>>, String)> {
    let Some(q) = c.get("quantization_config") else {
        return Ok(match class {
            ModelClass::OneBitLlm => (
                Some(LinearClass::OneBitLlm),
                None,
                "1bitLLM's BitnetForCausalLM quantizes its float weights at run time".into(),
            ),
            _ => (None, None, "no quantization_config".into()),
        });
    };
    let q = Fields {
        json: q,
        file: c.file,
    };
    let method = q.str("quant_method")?;
    if method != Some("bitnet") {
        return Err(ConvertError::Field {
            file: c.file.into(),
            field: "quantization_config.quant_method".into(),
            problem: format!("is {method:?}: tern converts BitNet b1.58 (\"bitnet\") checkpoints"),
        });
    }
    let mode = q.str("quantization_mode")?;
    let online = match mode {
        None | Some("offline") => false,
        Some("online") => true,
        Some(m) => {
            return Err(ConvertError::Field {
                file: c.file.into(),
                field: "quantization_config.quantization_mode".into(),
                problem: format!("is {m:?}, expected \"offline\" or \"online\""),
            })
        }
    };
    let linear = match q.str("linear_class")? {
        Some("autobitlinear") => LinearClass::AutoBitLinear { online },
        None | Some("bitlinear") => LinearClass::BitLinear,
        Some(other) => {
            return Err(ConvertError::Field {
                file: c.file.into(),
                field: "quantization_config.linear_class".into(),
                problem: format!("is {other:?}, expected \"autobitlinear\" or \"bitlinear\""),
            })
        }
    };
    if q.bool("use_rms_norm")? == Some(true) {
        return Err(ConvertError::Field {
            file: c.file.into(),
            field: "quantization_config.use_rms_norm".into(),
            problem: "is true (an RMSNorm inside every BitLinear): not supported".into(),
        });
    }
    let not_converted = match q.get("modules_to_not_convert") {
        None => None,
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    q.wrong(
                        "quantization_config.modules_to_not_convert",
                        v,
                        "module names",
                    )
                })
            })
            .collect::<Result<_>>()
            .map(Some)?,
        Some(v) => {
            return Err(q.wrong(
                "quantization_config.modules_to_not_convert",
                v,
                "a list of module names",
            ))
        }
    };
    let why = format!(
        "quantization_config.linear_class {:?}, quantization_mode {:?}",
        q.str("linear_class")?.unwrap_or("(absent: bitlinear)"),
        mode.unwrap_or("(absent: offline)")
    );
    Ok((Some(linear), not_converted, why))
}

fn sub_norms_of(ck: &Checkpoint) -> SubNorms {
    let has = |n: &str| ck.get(&format!("model.layers.0.{n}.weight")).is_some();
    if has("self_attn.attn_sub_norm") || has("mlp.ffn_sub_norm") {
        SubNorms::BitNet
    } else if has("self_attn.inner_attn_ln") || has("mlp.ffn_layernorm") {
        SubNorms::OneBitLlm
    } else {
        SubNorms::None
    }
}

fn rope_of(
    c: &Fields,
    class: ModelClass,
    max_pos: u64,
    decisions: &mut Vec<Decision>,
    warnings: &mut Vec<String>,
) -> Result<(f64, Option<RopeScaling>)> {
    // transformers 5: a Hub-style `rope_scaling` wins over `rope_parameters`; `rope_theta`
    // inside the dict wins over the top-level one.
    let (dict, dict_name) = match (c.get("rope_scaling"), c.get("rope_parameters")) {
        (Some(d), _) => (Some(d), "rope_scaling"),
        (None, Some(d)) => (Some(d), "rope_parameters"),
        (None, None) => (None, ""),
    };
    if let Some(d) = dict.filter(|d| !d.is_object()) {
        return Err(c.wrong(dict_name, d, "an object"));
    }
    let d = dict.map(|json| Fields { json, file: c.file });
    let field = |k: &str| format!("{dict_name}.{k}");
    let theta = match d
        .as_ref()
        .map(|d| d.f64("rope_theta"))
        .transpose()?
        .flatten()
    {
        Some(t) => t,
        None => match c.f64("rope_theta")? {
            Some(t) => t,
            None => {
                let t = if class == ModelClass::BitNet {
                    500000.0
                } else {
                    10000.0
                };
                warnings.push(format!(
                    "config has no rope_theta: assuming {t}, the {} default",
                    class.name()
                ));
                t
            }
        },
    };
    if let Some(d) = &d {
        if let Some(f) = d.f64("partial_rotary_factor")?.filter(|&f| f != 1.0) {
            return Err(ConvertError::Field {
                file: c.file.into(),
                field: field("partial_rotary_factor"),
                problem: format!("is {f}: partial RoPE is not supported"),
            });
        }
    }
    let kind = match &d {
        None => "default".to_string(),
        Some(d) => match d.str("rope_type")? {
            Some(t) => t.to_string(),
            None => d.str("type")?.unwrap_or("default").to_string(),
        },
    };
    let need = |k: &str| -> Result<f64> {
        let d = d.as_ref().expect("a scaled rope has a dict");
        d.f64(k)?.ok_or_else(|| ConvertError::Field {
            file: c.file.into(),
            field: field(k),
            problem: format!("is missing (rope_type {kind:?} needs it)"),
        })
    };
    let scaling = match kind.as_str() {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: need("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: d
                .as_ref()
                .map(|d| d.u64("original_max_position_embeddings"))
                .transpose()?
                .flatten()
                .unwrap_or(max_pos),
        }),
        other => {
            return Err(ConvertError::Field {
                file: c.file.into(),
                field: field("rope_type"),
                problem: format!(
                    "is {other:?}: tern supports RoPE without scaling, \"linear\" and \"llama3\""
                ),
            })
        }
    };
    if scaling.is_some() {
        decisions.push(Decision::new("rope", &kind, &field("rope_type")));
    }
    Ok((theta, scaling))
}

impl Declared {
    /// Reads config.json (and the tokenizer and generation configs) and the tensor names,
    /// and decides every axis, applying `overrides`.
    pub fn read(ck: &Checkpoint, overrides: &Overrides) -> Result<Declared> {
        let c = Fields {
            json: &ck.config,
            file: "config.json",
        };
        let mut decisions = Vec::new();
        let mut warnings = Vec::new();
        let (class, class_from) = class_of(&c)?;
        decisions.push(Decision::new("model class", class.name(), &class_from));

        // Scale convention.
        let (declared_linear, not_converted, linear_from) = linear_class_of(&c, class)?;
        let declared_convention = declared_linear.map(LinearClass::convention);
        let convention = match (overrides.scale_convention, declared_convention) {
            (Some(o), Some(d)) if o != d && !overrides.allow_contradiction => {
                return Err(ConvertError::Contradiction {
                    field: "quantization_config.linear_class".into(),
                    declared: format!("{linear_from}, i.e. weight_scale convention {d:?}"),
                    requested: format!("weight_scale convention {o:?}"),
                })
            }
            (Some(o), _) => {
                decisions.push(Decision::new(
                    "weight_scale convention",
                    &format!("{o:?}"),
                    "override",
                ));
                o
            }
            (None, Some(d)) => {
                decisions.push(Decision::new(
                    "weight_scale convention",
                    &format!("{d:?}"),
                    &linear_from,
                ));
                d
            }
            (None, None) => {
                return Err(ConvertError::Field {
                    file: c.file.into(),
                    field: "quantization_config".into(),
                    problem: format!(
                        "is absent: a {} without it is a float model to transformers (no \
                         activation quantization), not a BitNet b1.58 checkpoint{}",
                        class.name(),
                        ternary_float_hint(ck)
                    ),
                })
            }
        };
        let linear_class = match (declared_linear, convention) {
            (Some(l), _) if l.convention() == convention => l,
            // Undeclared or overridden: the class that reads weight_scale this way.
            (_, ScaleConvention::Multiply) => LinearClass::AutoBitLinear { online: false },
            (_, ScaleConvention::Divide) => LinearClass::BitLinear,
            (_, ScaleConvention::Masters) => LinearClass::AutoBitLinear { online: true },
        };

        // Block architecture.
        let sub_norms = sub_norms_of(ck);
        let want_sub_norms = match class {
            ModelClass::BitNet => SubNorms::BitNet,
            ModelClass::OneBitLlm => SubNorms::OneBitLlm,
            ModelClass::Llama => SubNorms::None,
        };
        if sub_norms != want_sub_norms {
            return Err(ConvertError::Source {
                path: ck.dir.clone(),
                problem: format!(
                    "{} ({class_from}) has {}, but the tensors have {}",
                    class.name(),
                    describe_sub_norms(want_sub_norms),
                    describe_sub_norms(sub_norms)
                ),
            });
        }
        let default_act = if class == ModelClass::BitNet {
            "relu2"
        } else {
            "silu"
        };
        let act_name = c.str("hidden_act")?;
        let declared_act = match act_name.unwrap_or(default_act) {
            "relu2" => Activation::Relu2,
            "silu" | "swish" => Activation::Silu,
            other => {
                return Err(ConvertError::Field {
                    file: c.file.into(),
                    field: "hidden_act".into(),
                    problem: format!("is {other:?}: tern supports \"relu2\" and \"silu\""),
                })
            }
        };
        let activation = match overrides.activation {
            Some(o)
                if act_name.is_some() && o != declared_act && !overrides.allow_contradiction =>
            {
                return Err(ConvertError::Contradiction {
                    field: "hidden_act".into(),
                    declared: format!("{declared_act:?}"),
                    requested: format!("{o:?}"),
                })
            }
            Some(o) => {
                decisions.push(Decision::new("activation", &format!("{o:?}"), "override"));
                o
            }
            None => {
                let from = match act_name {
                    Some(a) => format!("hidden_act {a:?}"),
                    None => format!("the {} default", class.name()),
                };
                decisions.push(Decision::new(
                    "activation",
                    &format!("{declared_act:?}"),
                    &from,
                ));
                declared_act
            }
        };
        let attention_bias = c.bool("attention_bias")?.unwrap_or(false);
        let mlp_bias = match class {
            ModelClass::Llama => c.bool("mlp_bias")?.unwrap_or(false),
            _ => false, // BitNet's MLP linears have no bias whatever the config says
        };

        let hidden_size = required(&c, "hidden_size")?;
        let heads = required(&c, "num_attention_heads")?;
        let kv_heads = c.u64("num_key_value_heads")?.unwrap_or(heads);
        let head_dim = match c.u64("head_dim")? {
            Some(d) => d,
            None if heads > 0 && hidden_size % heads == 0 => hidden_size / heads,
            None => {
                return Err(ConvertError::Field {
                    file: c.file.into(),
                    field: "head_dim".into(),
                    problem: format!(
                        "is missing and hidden_size {hidden_size} is not a multiple of \
                         num_attention_heads {heads}"
                    ),
                })
            }
        };
        // transformers builds BitNet's attention sub-norm over hidden_size and applies it to
        // the heads' output, so a model whose heads do not add up to hidden_size is built
        // but fails in its first forward: there is nothing faithful to convert.
        if sub_norms != SubNorms::None && head_dim.checked_mul(heads) != Some(hidden_size) {
            return Err(ConvertError::Field {
                file: c.file.into(),
                field: "head_dim".into(),
                problem: format!(
                    "{head_dim} × num_attention_heads {heads} ≠ hidden_size {hidden_size}: \
                     the attention sub-norm has hidden_size weights, and transformers' \
                     forward of such a model fails"
                ),
            });
        }
        let max_pos = match c.u64("max_position_embeddings")? {
            Some(m) => m,
            None => {
                warnings.push("config has no max_position_embeddings: assuming 2048".into());
                2048
            }
        };
        let rms_norm_eps = match c.f64("rms_norm_eps")? {
            Some(e) => e,
            None => {
                let eps = if class == ModelClass::Llama {
                    1e-6
                } else {
                    1e-5
                };
                warnings.push(format!("config has no rms_norm_eps: assuming {eps}"));
                eps
            }
        };
        let (rope_theta, rope_scaling) =
            rope_of(&c, class, max_pos, &mut decisions, &mut warnings)?;

        // A stored lm_head wins over tie_word_embeddings, as in transformers 5.x.
        let tie_word_embeddings = ck.get("lm_head.weight").is_none();
        let configured_tie = c
            .bool("tie_word_embeddings")?
            .unwrap_or(class == ModelClass::OneBitLlm);
        if configured_tie && !tie_word_embeddings {
            warnings.push(
                "config says tie_word_embeddings but lm_head.weight is stored: using the stored head"
                    .into(),
            );
        }
        if !configured_tie && tie_word_embeddings {
            return Err(ConvertError::Source {
                path: ck.dir.clone(),
                problem:
                    "the head is untied (tie_word_embeddings false) but lm_head.weight is missing"
                        .into(),
            });
        }

        let vocab_size = required(&c, "vocab_size")?;
        let bos = c.ids("bos_token_id", vocab_size)?;
        if bos.len() > 1 {
            return Err(ConvertError::Field {
                file: c.file.into(),
                field: "bos_token_id".into(),
                problem: format!("is a list {bos:?}, expected one token id"),
            });
        }
        let mut eos_token_ids = c.ids("eos_token_id", vocab_size)?;
        if let Some(g) = &ck.generation_config {
            let g = Fields {
                json: g,
                file: "generation_config.json",
            };
            eos_token_ids.extend(g.ids("eos_token_id", vocab_size)?);
        }
        eos_token_ids.extend(
            end_of_turn_ids(ck)
                .into_iter()
                .filter(|&id| u64::from(id) < vocab_size),
        );
        eos_token_ids.sort_unstable();
        eos_token_ids.dedup();
        let add_bos_token = match &ck.tokenizer_config {
            Some(t) => Fields {
                json: t,
                file: "tokenizer_config.json",
            }
            .bool("add_bos_token")?,
            None => None,
        }
        .unwrap_or(!bos.is_empty());

        let mut config = ModelConfig {
            architecture: match class {
                ModelClass::Llama => Architecture::Llama,
                _ => Architecture::Bitnet,
            },
            hidden_size,
            num_hidden_layers: required(&c, "num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            intermediate_size: required(&c, "intermediate_size")?,
            vocab_size,
            max_position_embeddings: max_pos,
            rms_norm_eps,
            rope_theta,
            rope_style: RopeStyle::RotateHalf,
            rope_scaling,
            activation,
            attention_bias,
            mlp_bias,
            attn_sub_norm: sub_norms != SubNorms::None,
            ffn_sub_norm: sub_norms != SubNorms::None,
            tie_word_embeddings,
            bos_token_id: bos.first().copied(),
            eos_token_ids,
            add_bos_token,
            dense_linears: Vec::new(),
        };
        if let Some(patterns) = &not_converted {
            config.dense_linears = dense_linears(&c, patterns, &config.linear_modules())?;
            if !config.dense_linears.is_empty() {
                let n = config.dense_linears.len();
                let mut names = config.dense_linears[..n.min(3)].join(", ");
                if n > 3 {
                    names.push_str(&format!(" and {} more", n - 3));
                }
                decisions.push(Decision::new(
                    "dense linears",
                    &format!("{n} kept float, activations not quantized: {names}"),
                    "quantization_config.modules_to_not_convert",
                ));
            }
        }
        config.validate().map_err(|problem| ConvertError::Source {
            path: ck.dir.join("config.json"),
            problem,
        })?;
        Ok(Declared {
            class,
            linear_class,
            sub_norms,
            not_converted,
            convention,
            config,
            decisions,
            warnings,
        })
    }

    /// The source checkpoint's name for a normalized tensor name.
    pub fn source_name(&self, name: &str) -> String {
        match self.sub_norms {
            SubNorms::OneBitLlm => name
                .replace("self_attn.attn_sub_norm", "self_attn.inner_attn_ln")
                .replace("mlp.ffn_sub_norm", "mlp.ffn_layernorm"),
            _ => name.to_string(),
        }
    }

    /// How one ternary linear's weight is stored, from its dtype and shape and the class.
    fn weight_rule(
        &self,
        ck: &Checkpoint,
        src: &SourceTensor,
        shape: &[u64],
    ) -> Result<WeightRule> {
        let module = src.name.trim_end_matches(".weight");
        let scale_name = format!("{module}.weight_scale");
        let has_scale = ck.get(&scale_name).is_some();
        let (out, cols) = (shape[0], shape[1]);
        match src.dtype {
            safetensors::Dtype::U8 => {
                if self.convention == ScaleConvention::Masters {
                    return Err(ck.tensor_error(
                        src,
                        "packed U8 weights, but the checkpoint declares float masters \
                         (quantization_mode online)",
                    ));
                }
                if out % 4 != 0 {
                    return Err(ck.tensor_error(
                        src,
                        format!(
                            "{out} output features is not a multiple of 4, which packed \
                             weights (transformers' pack_weights) need"
                        ),
                    ));
                }
                if src.shape != [out / 4, cols] {
                    return Err(ck.tensor_error(
                        src,
                        format!(
                            "U8 shape {:?}: packed weights of a [{out}, {cols}] linear are [{}, {cols}]",
                            src.shape,
                            out / 4
                        ),
                    ));
                }
                // A missing weight_scale is listed with the other missing tensors (plan).
                Ok(WeightRule::Packed {
                    scale_tensor: scale_name,
                    convention: self.convention,
                })
            }
            safetensors::Dtype::BF16 | safetensors::Dtype::F16 | safetensors::Dtype::F32 => {
                if src.shape != shape {
                    return Err(ck.tensor_error(
                        src,
                        format!("shape {:?}, the config requires {shape:?}", src.shape),
                    ));
                }
                match self.linear_class {
                    LinearClass::AutoBitLinear { online: true } | LinearClass::OneBitLlm => {
                        Ok(WeightRule::Masters)
                    }
                    LinearClass::AutoBitLinear { online: false } => Ok(WeightRule::TernaryFloat {
                        scale_tensor: has_scale.then_some(scale_name),
                    }),
                    LinearClass::BitLinear => Err(ck.tensor_error(
                        src,
                        format!(
                            "{:?} weights, but the legacy BitLinear class (quantization_config \
                             without linear_class, or bitlinear) holds packed U8 [out/4, in] \
                             weights: transformers cannot load this",
                            src.dtype
                        ),
                    )),
                }
            }
            other => Err(ck.tensor_error(
                src,
                format!("dtype {other:?}: expected U8 (packed) or BF16/F16/F32"),
            )),
        }
    }

    /// Maps every tensor the config requires to its source and checks that the source has
    /// nothing unaccounted for.
    pub fn plan(&self, ck: &Checkpoint) -> Result<Vec<Planned>> {
        let mut plan = Vec::new();
        let mut used = std::collections::HashSet::new();
        let mut missing = Vec::new();
        for (name, shape, role) in expected_tensors(&self.config) {
            let src = self.source_name(&name);
            let Some(s) = ck.get(&src) else {
                missing.push(src);
                continue;
            };
            let origin = match role {
                TensorRole::Ternary => Origin::Ternary {
                    rule: self.weight_rule(ck, s, &shape)?,
                    src,
                },
                TensorRole::Bias => {
                    let scale = name.replace(".bias", ".weight_scale");
                    let module = name.trim_end_matches(".bias");
                    let scaled = self.linear_class == LinearClass::AutoBitLinear { online: false }
                        && !self.config.is_dense_linear(module)
                        && ck.get(&scale).is_some();
                    Origin::Bias {
                        src,
                        scale_tensor: scaled.then_some(scale),
                    }
                }
                _ => Origin::Float { src },
            };
            for n in origin.sources() {
                if ck.get(n).is_none() {
                    missing.push(n.to_string());
                }
                used.insert(n.to_string());
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
            let mut problem = Vec::new();
            if !missing.is_empty() {
                problem.push(format!(
                    "missing tensors: {}",
                    list(missing.iter().collect())
                ));
            }
            if !unexpected.is_empty() {
                let biases = unexpected.iter().any(|n| n.ends_with(".bias"));
                problem.push(format!(
                    "unexpected tensors: {}{}",
                    list(unexpected),
                    if biases {
                        " (biases need attention_bias / mlp_bias true in config.json)"
                    } else {
                        ""
                    }
                ));
            }
            return Err(ConvertError::Source {
                path: ck.dir.clone(),
                problem: format!("{} ({})", problem.join("; "), self.describe()),
            });
        }
        Ok(plan)
    }

    /// A one-line description for reports and provenance.
    pub fn describe(&self) -> String {
        let linear = match self.linear_class {
            LinearClass::AutoBitLinear { online: false } => "autobitlinear offline",
            LinearClass::AutoBitLinear { online: true } => "autobitlinear online",
            LinearClass::BitLinear => "bitlinear",
            LinearClass::OneBitLlm => "1bitLLM BitLinear",
        };
        format!("{}, {linear}", self.class.name())
    }
}

/// The block linears (of `modules`) that transformers leaves as plain float `nn.Linear`s
/// given `modules_to_not_convert` = `patterns`, matched as its `should_convert_module` does
/// (transformers 5.x): a pattern matches a module name when it matches as a regular
/// expression from the start up to a module boundary ("model.layers.1" matches
/// "model.layers.1.mlp.up_proj", not "model.layers.11.mlp.up_proj"; "model.layers.*.mlp"
/// every MLP), or when the name ends with it ("down_proj"). A list that leaves the head out
/// is refused: transformers then quantizes `lm_head` too (it adds the head itself only when
/// the list is absent), which tern does not reproduce.
fn dense_linears(c: &Fields, patterns: &[String], modules: &[String]) -> Result<Vec<String>> {
    const FIELD: &str = "quantization_config.modules_to_not_convert";
    let field_error = |problem: String| ConvertError::Field {
        file: c.file.into(),
        field: FIELD.into(),
        problem,
    };
    let regexes = patterns
        .iter()
        .map(|p| {
            fancy_regex::Regex::new(&format!(r"^(?:{p})(?:(?<=\.)|(?=\.|$))"))
                .map(|re| (p, re))
                .map_err(|e| {
                    field_error(format!(
                        "holds {p:?}, which is not a regular expression tern can match as \
                         transformers does: {e}"
                    ))
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let matches = |module: &str| -> Result<bool> {
        for (p, re) in &regexes {
            let hit = module.ends_with(p.as_str())
                || re.is_match(module).map_err(|e| {
                    field_error(format!(
                        "pattern {p:?} could not be matched against {module:?}: {e}"
                    ))
                })?;
            if hit {
                return Ok(true);
            }
        }
        Ok(false)
    };
    if !matches("lm_head")? {
        return Err(field_error(format!(
            "is {patterns:?}, which does not name lm_head: transformers then quantizes the \
             output head as well (it keeps the head float by itself only when the list is \
             absent), and tern keeps the head dense"
        )));
    }
    let mut dense = Vec::new();
    for m in modules {
        if matches(m)? {
            dense.push(m.clone());
        }
    }
    Ok(dense)
}

/// For a float checkpoint without a quantization_config: whether layer 0's q_proj holds
/// ternary values with a few scales (SpectraSuite TriLM's `*_Unpacked` checkpoints store one
/// scale per model-parallel slice), said in words.
fn ternary_float_hint(ck: &Checkpoint) -> String {
    let Some(t) = ck.get("model.layers.0.self_attn.q_proj.weight") else {
        return String::new();
    };
    let Ok(values) = ck.read(t).map(|b| crate::ternary::to_f32(&b, t.dtype)) else {
        return String::new();
    };
    let Ok(values) = values else {
        return String::new();
    };
    let mut magnitudes: Vec<u32> = values
        .iter()
        .filter(|x| **x != 0.0)
        .map(|x| x.abs().to_bits())
        .collect();
    magnitudes.sort_unstable();
    magnitudes.dedup();
    match magnitudes.len() {
        0 | 65.. => String::new(),
        n => format!(
            ". Its float weights are ternary with {n} distinct scale(s) in {} (like \
             SpectraSuite TriLM, which keeps one scale per model-parallel slice and runs \
             without activation quantization): tern's BitLinear quantizes activations to int8 \
             and keeps one scale per tensor, so it cannot reproduce this model exactly",
            t.name
        ),
    }
}

/// How many linears are stored which way, e.g. "210 packed U8".
pub fn storage_summary(plan: &[Planned]) -> String {
    let (mut packed, mut masters, mut floats, mut dense) = (0, 0, 0, 0);
    for p in plan {
        if p.role == TensorRole::DenseLinear {
            dense += 1;
        }
        match &p.origin {
            Origin::Ternary {
                rule: WeightRule::Packed { .. },
                ..
            } => packed += 1,
            Origin::Ternary {
                rule: WeightRule::Masters,
                ..
            } => masters += 1,
            Origin::Ternary {
                rule: WeightRule::TernaryFloat { .. },
                ..
            } => floats += 1,
            _ => {}
        }
    }
    [
        (packed, "packed U8"),
        (masters, "float masters (absmean)"),
        (floats, "already-ternary floats"),
        (dense, "dense floats (modules_to_not_convert)"),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .collect::<Vec<_>>()
    .join(", ")
}

fn describe_sub_norms(s: SubNorms) -> &'static str {
    match s {
        SubNorms::BitNet => "sub-norms (self_attn.attn_sub_norm, mlp.ffn_sub_norm)",
        SubNorms::OneBitLlm => "sub-norms (self_attn.inner_attn_ln, mlp.ffn_layernorm)",
        SubNorms::None => "no sub-norms",
    }
}

fn required(c: &Fields, key: &str) -> Result<u64> {
    c.u64(key)?.ok_or_else(|| ConvertError::Field {
        file: c.file.into(),
        field: key.into(),
        problem: "is missing".into(),
    })
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
        .filter_map(|t| t.get("id").and_then(Value::as_u64))
        .filter_map(|id| u32::try_from(id).ok())
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
            .find(|e| e.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|e| e.get("template").and_then(Value::as_str))
            .map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
