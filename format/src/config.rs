use serde::{Deserialize, Serialize};

use crate::Layout;

/// The model family's architecture, as far as the forward pass cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// BitNetForCausalLM (microsoft/bitnet-b1.58-2B-4T) and 1bitLLM's BitnetForCausalLM.
    Bitnet,
    /// LlamaForCausalLM with ternary linears (HF1BitLLM, Falcon3-1.58bit, Falcon-E).
    Llama,
}

/// The gated MLP's activation: `act(gate) * up`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// relu(x)², BitNet 2B-4T.
    Relu2,
    /// x·sigmoid(x), Llama-style and 1bitLLM.
    Silu,
}

/// Which elements RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeStyle {
    /// Pairs (j, j + head_dim/2): Hugging Face's rotate_half (NeoX).
    RotateHalf,
    /// Pairs (2j, 2j + 1): Meta's original layout.
    Interleaved,
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Architecture::Bitnet => "BitNet",
            Architecture::Llama => "Llama",
        })
    }
}

impl std::fmt::Display for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Activation::Relu2 => "squared ReLU",
            Activation::Silu => "SiLU",
        })
    }
}

impl std::fmt::Display for RopeStyle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RopeStyle::RotateHalf => "rotate-half pairs",
            RopeStyle::Interleaved => "interleaved pairs",
        })
    }
}

/// RoPE frequency scaling, as transformers' `rope_type` computes it (docs/format.md §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// `inv_freq / factor` (transformers' "linear").
    Linear { factor: f64 },
    /// Llama 3.1's wavelength-dependent scaling (transformers' "llama3").
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: u64,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The normalized model configuration (docs/format.md §4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: u64,
    pub num_hidden_layers: u64,
    pub num_attention_heads: u64,
    pub num_key_value_heads: u64,
    pub head_dim: u64,
    pub intermediate_size: u64,
    pub vocab_size: u64,
    pub max_position_embeddings: u64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_style: RopeStyle,
    /// RoPE scaling; absent for plain RoPE. Format 1.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    pub activation: Activation,
    /// q/k/v/o projections have biases (`attention_bias`). Format 1.2.
    #[serde(default, skip_serializing_if = "is_false")]
    pub attention_bias: bool,
    /// gate/up/down projections have biases (`mlp_bias`). Format 1.2.
    #[serde(default, skip_serializing_if = "is_false")]
    pub mlp_bias: bool,
    pub attn_sub_norm: bool,
    pub ffn_sub_norm: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub add_bos_token: bool,
    /// Linears kept dense: float weights, activations not quantized, `y = W·x + bias`, as
    /// transformers leaves the modules its `modules_to_not_convert` names. Module names
    /// (`model.layers.0.mlp.down_proj`), in the order of [`expected_tensors`]. Format 1.3.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dense_linears: Vec<String>,
}

/// How the source checkpoint stored its per-tensor scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleConvention {
    /// `weight_scale = mean|W|`, true weight = scale × trit (autobitlinear, offline).
    Multiply,
    /// `weight_scale = 1/mean|W|`, true weight = trit / scale (bitlinear).
    Divide,
    /// Float masters ternarized by the converter.
    Masters,
}

impl std::fmt::Display for ScaleConvention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ScaleConvention::Multiply => "weight = scale × trit",
            ScaleConvention::Divide => "weight = trit / scale",
            ScaleConvention::Masters => "ternarized from float masters",
        })
    }
}

/// One file the conversion read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceFile {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// One decision the converter made about the source, and what it was based on (a
/// config.json field, a tensor's dtype, a default, or a user override).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub axis: String,
    pub value: String,
    pub from: String,
}

impl Decision {
    pub fn new(axis: &str, value: &str, from: &str) -> Decision {
        Decision {
            axis: axis.to_string(),
            value: value.to_string(),
            from: from.to_string(),
        }
    }
}

/// Where a `.tern` file came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub source_family: String,
    pub scale_convention: ScaleConvention,
    pub source_files: Vec<SourceFile>,
    pub converter: String,
    /// How each axis of the source was decided (model class, scale convention, activation,
    /// RoPE, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<Decision>,
}

/// The metadata section (UTF-8 JSON). Unknown keys are ignored when reading.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub config: ModelConfig,
    pub chat_template: Option<String>,
    pub provenance: Provenance,
}

impl ModelConfig {
    /// The BitNet b1.58 architecture (squared-ReLU MLP, attention and MLP sub-norms,
    /// rotate-half RoPE with θ = 500000, no biases, tied embeddings, RMSNorm ε = 1e-5) at a
    /// tiny size: hidden 64, one layer, two query heads sharing one KV head of 32, MLP
    /// 128, vocabulary 256, 4096 positions, no special tokens. Set the fields a test or a
    /// synthetic model needs with struct update syntax: `ModelConfig { hidden_size: 2560,
    /// ..ModelConfig::bitnet_b158() }`.
    pub fn bitnet_b158() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Bitnet,
            hidden_size: 64,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 32,
            intermediate_size: 128,
            vocab_size: 256,
            max_position_embeddings: 4096,
            rms_norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_style: RopeStyle::RotateHalf,
            rope_scaling: None,
            activation: Activation::Relu2,
            attention_bias: false,
            mlp_bias: false,
            attn_sub_norm: true,
            ffn_sub_norm: true,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            add_bos_token: false,
            dense_linears: Vec::new(),
        }
    }

    /// Checks the constraints of docs/format.md §4.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 || v > crate::limits::MAX_DIM {
                return Err(format!("{name} is {v}, must be between 1 and 2^32"));
            }
        }
        if self.num_hidden_layers > 4096 {
            return Err(format!("{} layers is absurd", self.num_hidden_layers));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} is odd", self.head_dim));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(format!(
                "rms_norm_eps {} is not positive",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!("rope_theta {} is not positive", self.rope_theta));
        }
        match self.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => positive_finite("rope_scaling.factor", factor)?,
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                positive_finite("rope_scaling.factor", factor)?;
                positive_finite("rope_scaling.low_freq_factor", low_freq_factor)?;
                positive_finite("rope_scaling.high_freq_factor", high_freq_factor)?;
                if high_freq_factor <= low_freq_factor {
                    return Err(format!(
                        "rope_scaling.high_freq_factor {high_freq_factor} is not above low_freq_factor {low_freq_factor}"
                    ));
                }
                if original_max_position_embeddings == 0
                    || original_max_position_embeddings > crate::limits::MAX_DIM
                {
                    return Err(format!(
                        "rope_scaling.original_max_position_embeddings is {original_max_position_embeddings}, must be between 1 and 2^32"
                    ));
                }
            }
        }
        for &id in self.bos_token_id.iter().chain(&self.eos_token_ids) {
            if u64::from(id) >= self.vocab_size {
                return Err(format!(
                    "token id {id} is outside the vocabulary of {}",
                    self.vocab_size
                ));
            }
        }
        if !self.dense_linears.is_empty() {
            let modules = self.linear_modules();
            let mut at = 0; // names must be linears of this config, each once, in file order
            for m in &self.dense_linears {
                match modules[at..].iter().position(|x| x == m) {
                    Some(k) => at += k + 1,
                    None => {
                        return Err(format!(
                            "dense_linears names {m:?}, which is not a linear of this model \
                             (or is listed twice or out of order)"
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// The lowest format minor version that can hold this config (docs/format.md §8): 3 for
    /// dense linears, 2 for RoPE scaling or linear biases, else 0.
    pub fn since_minor(&self) -> u16 {
        if !self.dense_linears.is_empty() {
            3
        } else if self.rope_scaling.is_some() || self.attention_bias || self.mlp_bias {
            2
        } else {
            0
        }
    }

    /// The module names of every linear in the blocks (`model.layers.{l}.self_attn.q_proj`,
    /// …), in file order.
    pub fn linear_modules(&self) -> Vec<String> {
        (0..self.num_hidden_layers)
            .flat_map(|l| LINEAR_MODULES.map(|m| format!("model.layers.{l}.{m}")))
            .collect()
    }

    /// Whether the linear `module` (`model.layers.0.mlp.down_proj`) is kept dense.
    pub fn is_dense_linear(&self, module: &str) -> bool {
        self.dense_linears.iter().any(|m| m == module)
    }

    /// RoPE inverse frequencies, `head_dim / 2` of them, computed in f32 in the order
    /// transformers computes them (`modeling_rope_utils.py`): `1 / theta^(2i/d)`, then the
    /// scaling of `rope_type`.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim as usize;
        let theta = self.rope_theta as f32;
        let base = (0..d / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32));
        match self.rope_scaling {
            None => base.collect(),
            Some(RopeScaling::Linear { factor }) => base.map(|f| f / factor as f32).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                // transformers: wavelen = 2π / f; wavelengths above old/low are divided by
                // factor, those between old/high and old/low interpolate smoothly.
                let (factor, low) = (factor as f32, low_freq_factor as f32);
                let old = original_max_position_embeddings as f32;
                let low_wavelen =
                    (original_max_position_embeddings as f64 / low_freq_factor) as f32;
                let high_wavelen =
                    (original_max_position_embeddings as f64 / high_freq_factor) as f32;
                let span = (high_freq_factor - low_freq_factor) as f32;
                base.map(|f| {
                    let wavelen = std::f64::consts::TAU as f32 / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    if medium {
                        let smooth = (old / wavelen - low) / span;
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
            }
        }
    }

    /// Width of the attention output (input of o_proj).
    pub fn attn_dim(&self) -> u64 {
        self.num_attention_heads * self.head_dim
    }

    /// Width of k and v.
    pub fn kv_dim(&self) -> u64 {
        self.num_key_value_heads * self.head_dim
    }
}

fn positive_finite(name: &str, v: f64) -> Result<(), String> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(format!("{name} {v} is not positive"))
    }
}

/// The linears of one block, in file order (docs/format.md §5.1).
pub const LINEAR_MODULES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// What kind of data a tensor of the model holds, which decides its allowed layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorRole {
    /// Embedding table or output head: a float layout, or Q8_ROW.
    Embedding,
    /// RMSNorm weight: a float layout.
    Norm,
    /// A BitLinear weight: a ternary layout.
    Ternary,
    /// A linear kept dense (`dense_linears`): a float layout.
    DenseLinear,
    /// A BitLinear bias (`attention_bias`, `mlp_bias`): a float layout.
    Bias,
}

impl TensorRole {
    pub fn allows(self, layout: Layout) -> bool {
        match self {
            TensorRole::Embedding => layout.is_float() || layout == Layout::Q8Row,
            TensorRole::Norm | TensorRole::Bias | TensorRole::DenseLinear => layout.is_float(),
            TensorRole::Ternary => layout.is_ternary(),
        }
    }
}

/// Every tensor a model with this config has, with its shape and role, in the canonical
/// order a writer uses (docs/format.md §5.1).
pub fn expected_tensors(c: &ModelConfig) -> Vec<(String, Vec<u64>, TensorRole)> {
    use TensorRole::*;
    let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![v, h],
        Embedding,
    )];
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h], Norm));
        let linear = |out: &mut Vec<(String, Vec<u64>, TensorRole)>,
                      name: &str,
                      rows: u64,
                      cols: u64,
                      bias: bool| {
            let role = match c.is_dense_linear(&format!("{p}.{name}")) {
                true => DenseLinear,
                false => Ternary,
            };
            out.push((format!("{p}.{name}.weight"), vec![rows, cols], role));
            if bias {
                out.push((format!("{p}.{name}.bias"), vec![rows], Bias));
            }
        };
        let (ab, mb) = (c.attention_bias, c.mlp_bias);
        linear(&mut out, "self_attn.q_proj", c.attn_dim(), h, ab);
        linear(&mut out, "self_attn.k_proj", c.kv_dim(), h, ab);
        linear(&mut out, "self_attn.v_proj", c.kv_dim(), h, ab);
        if c.attn_sub_norm {
            out.push((
                format!("{p}.self_attn.attn_sub_norm.weight"),
                vec![c.attn_dim()],
                Norm,
            ));
        }
        linear(&mut out, "self_attn.o_proj", h, c.attn_dim(), ab);
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Norm,
        ));
        linear(&mut out, "mlp.gate_proj", i, h, mb);
        linear(&mut out, "mlp.up_proj", i, h, mb);
        if c.ffn_sub_norm {
            out.push((format!("{p}.mlp.ffn_sub_norm.weight"), vec![i], Norm));
        }
        linear(&mut out, "mlp.down_proj", h, i, mb);
    }
    out.push(("model.norm.weight".to_string(), vec![h], Norm));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h], Embedding));
    }
    out
}
