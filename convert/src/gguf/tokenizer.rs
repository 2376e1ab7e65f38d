//! The GGUF tokenizer (`tokenizer.ggml.*`, model `gpt2` = byte-level BPE) to a Hugging Face
//! `tokenizer.json` and back.

use serde_json::{json, Value as Json};

use super::reader::{Header, Value};

/// The pre-tokenizer regex of Llama 3 (llama.cpp's `llama-bpe`), which 2B-4T uses.
pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp token types.
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
}

/// Builds a `tokenizer.json` equivalent to the GGUF's tokenizer. `arch` decides what a
/// missing `tokenizer.ggml.pre` means; warnings go to `warnings`.
pub fn to_tokenizer_json(
    h: &Header,
    add_bos: bool,
    warnings: &mut Vec<String>,
) -> Result<Vec<u8>, String> {
    let model = h.get("tokenizer.ggml.model").and_then(Value::as_str);
    if model != Some("gpt2") {
        return Err(format!(
            "tokenizer.ggml.model is {model:?}; tern imports byte-level BPE (\"gpt2\") tokenizers"
        ));
    }
    let strings = |key: &str| -> Result<Vec<&str>, String> {
        h.get(key)
            .and_then(Value::as_array)
            .ok_or(format!("{key} is missing or not an array"))?
            .iter()
            .map(|v| v.as_str().ok_or(format!("{key} holds a non-string")))
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i32> = match h.get("tokenizer.ggml.token_type") {
        Some(Value::Array(_, v)) => v
            .iter()
            .map(|t| match t {
                Value::I32(t) => Ok(*t),
                _ => Err("tokenizer.ggml.token_type holds a non-i32".to_string()),
            })
            .collect::<Result<_, _>>()?,
        _ => vec![token_type::NORMAL; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(format!(
            "{} token types for {} tokens",
            types.len(),
            tokens.len()
        ));
    }
    let pre = h.get("tokenizer.ggml.pre").and_then(Value::as_str);
    let (pre_tokenizer, ignore_merges) = match pre {
        Some("llama-bpe" | "llama3" | "llama-v3") | None => {
            if pre.is_none() {
                warnings.push(
                    "the GGUF has no tokenizer.ggml.pre: assuming Llama 3's pre-tokenizer \
                     (llama-bpe), which BitNet 2B-4T uses"
                        .into(),
                );
            }
            (
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
                ]}),
                true,
            )
        }
        Some("gpt2" | "default") => (
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
            false,
        ),
        Some(other) => {
            return Err(format!(
                "tokenizer.ggml.pre {other:?}: tern knows llama-bpe and gpt2"
            ))
        }
    };
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, (&tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        if ty == token_type::CONTROL || ty == token_type::USER_DEFINED {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == token_type::CONTROL,
            }));
        } else if !vocab.contains_key(tok) {
            vocab.insert(tok.to_string(), json!(id));
        }
    }
    let bos = h
        .get("tokenizer.ggml.bos_token_id")
        .and_then(Value::as_u64)
        .and_then(|id| tokens.get(id as usize).map(|t| (id, *t)));
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
    let post_processor = match bos {
        Some((id, tok)) if add_bos => json!({"type": "Sequence", "processors": [
            byte_level,
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {tok: {"id": tok, "ids": [id], "tokens": [tok]}}}
        ]}),
        _ => byte_level,
    };
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges,
        },
    });
    serde_json::to_vec(&doc).map_err(|e| e.to_string())
}

/// A tokenizer in GGUF form.
pub struct GgufVocab {
    pub tokens: Vec<String>,
    pub types: Vec<i32>,
    pub merges: Vec<String>,
    /// `tokenizer.ggml.pre`: `llama-bpe` for Llama 3's regex, `gpt2` for GPT-2's.
    pub pre: &'static str,
}

/// Reads a byte-level BPE `tokenizer.json` into GGUF form, padded to `vocab_size` with
/// unused `[PAD{id}]` tokens as llama.cpp's converter does.
pub fn from_tokenizer_json(bytes: &[u8], vocab_size: usize) -> Result<GgufVocab, String> {
    let doc: Json = serde_json::from_slice(bytes).map_err(|e| format!("tokenizer.json: {e}"))?;
    let model = &doc["model"];
    if model["type"] != "BPE" {
        return Err(format!(
            "tokenizer.json model type {}: GGUF export handles BPE",
            model["type"]
        ));
    }
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![token_type::UNUSED; vocab_size];
    let mut put = |tok: &str, id: Option<u64>, ty: i32| -> Result<(), String> {
        let id = id.ok_or(format!("token {tok:?} has no integer id"))? as usize;
        let slot = tokens.get_mut(id).ok_or(format!(
            "token {tok:?} has id {id}, outside the model's vocabulary of {vocab_size}"
        ))?;
        *slot = Some(tok.to_string());
        types[id] = ty;
        Ok(())
    };
    for (tok, id) in model["vocab"]
        .as_object()
        .ok_or("tokenizer.json has no vocab")?
    {
        put(tok, id.as_u64(), token_type::NORMAL)?;
    }
    for a in doc["added_tokens"].as_array().into_iter().flatten() {
        let tok = a["content"].as_str().ok_or("added token without content")?;
        let special = a["special"].as_bool().unwrap_or(false);
        put(
            tok,
            a["id"].as_u64(),
            if special {
                token_type::CONTROL
            } else {
                token_type::USER_DEFINED
            },
        )?;
    }
    let tokens = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();
    let merges = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(p) if p.len() == 2 => Ok(format!(
                "{} {}",
                p[0].as_str().unwrap_or_default(),
                p[1].as_str().unwrap_or_default()
            )),
            other => Err(format!("tokenizer.json merge {other} is not a pair")),
        })
        .collect::<Result<_, _>>()?;
    let pre = if doc["pre_tokenizer"].to_string().contains(r"\\p{N}{1,3}") {
        "llama-bpe"
    } else {
        "gpt2"
    };
    Ok(GgufVocab {
        tokens,
        types,
        merges,
        pre,
    })
}
