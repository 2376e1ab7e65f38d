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
    pub activation: Activation,
    pub attn_sub_norm: bool,
    pub ffn_sub_norm: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub add_bos_token: bool,
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

/// Where a `.tern` file came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub source_family: String,
    pub scale_convention: ScaleConvention,
    pub source_files: Vec<SourceFile>,
    pub converter: String,
}

/// The metadata section (UTF-8 JSON). Unknown keys are ignored when reading.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub config: ModelConfig,
    pub chat_template: Option<String>,
    pub provenance: Provenance,
}

impl ModelConfig {
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
        for &id in self.bos_token_id.iter().chain(&self.eos_token_ids) {
            if u64::from(id) >= self.vocab_size {
                return Err(format!(
                    "token id {id} is outside the vocabulary of {}",
                    self.vocab_size
                ));
            }
        }
        Ok(())
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

/// What kind of data a tensor of the model holds, which decides its allowed layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorRole {
    /// Embedding table or output head: a float layout, or Q8_ROW.
    Embedding,
    /// RMSNorm weight: a float layout.
    Norm,
    /// A BitLinear weight: a ternary layout.
    Ternary,
}

impl TensorRole {
    pub fn allows(self, layout: Layout) -> bool {
        match self {
            TensorRole::Embedding => layout.is_float() || layout == Layout::Q8Row,
            TensorRole::Norm => layout.is_float(),
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
        out.push((
            format!("{p}.self_attn.q_proj.weight"),
            vec![c.attn_dim(), h],
            Ternary,
        ));
        out.push((
            format!("{p}.self_attn.k_proj.weight"),
            vec![c.kv_dim(), h],
            Ternary,
        ));
        out.push((
            format!("{p}.self_attn.v_proj.weight"),
            vec![c.kv_dim(), h],
            Ternary,
        ));
        if c.attn_sub_norm {
            out.push((
                format!("{p}.self_attn.attn_sub_norm.weight"),
                vec![c.attn_dim()],
                Norm,
            ));
        }
        out.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, c.attn_dim()],
            Ternary,
        ));
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Norm,
        ));
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h], Ternary));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h], Ternary));
        if c.ffn_sub_norm {
            out.push((format!("{p}.mlp.ffn_sub_norm.weight"), vec![i], Norm));
        }
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i], Ternary));
    }
    out.push(("model.norm.weight".to_string(), vec![h], Norm));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h], Embedding));
    }
    out
}
