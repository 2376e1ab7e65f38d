//! Chat: render a Hugging Face chat template, and hold a [`Conversation`] whose turns reuse
//! the KV cache of the text they share.
//!
//! A model's `tokenizer_config.json` carries a Jinja template under
//! `chat_template`. transformers renders it with Jinja2 in a sandboxed
//! environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
//! extension, a `raise_exception(msg)` function and a `tojson` filter that
//! does not HTML-escape; it passes `messages`, `add_generation_prompt`,
//! `tools`/`documents` (both `None` here) and the special tokens
//! (`bos_token`, `eos_token`, ...). [`ChatTemplate`] does the same with
//! minijinja, plus `minijinja_contrib`'s Python string/dict methods
//! (`.strip()`, `.startswith()`, `.items()`, ...) that templates call.
//!
//! A model without a template gets [`FALLBACK_TEMPLATE`], the plain format
//! of BitNet b1.58 2B4T:
//!
//! ```text
//! System: {system}{eos}User: {message}{eos}Assistant: {reply}{eos}User: ...
//! ```
//!
//! i.e. each turn is `Role: content` (role capitalized, content trimmed)
//! closed by the EOS token string, and the generation prompt is
//! `Assistant: `. With `eos = "<|eot_id|>"` this is exactly BitNet 2B4T's
//! own template.

use minijinja::value::Kwargs;
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use tern_format::TernFile;

use crate::generate::{generate_text, Generation};
use crate::model::{Model, State};
use crate::pool::Pool;
use crate::sampling::Sampler;
use crate::tokenizer::Tokenizer;
use crate::InferError;

/// Errors from loading or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template does not parse.
    #[error("invalid chat template: {0}")]
    InvalidTemplate(#[source] JinjaError),
    /// Rendering failed; `raise_exception` in the template lands here with
    /// its message.
    #[error("chat template failed to render: {0}")]
    Render(#[source] JinjaError),
    /// `tokenizer_config.json` could not be read.
    #[error("invalid tokenizer_config.json: {0}")]
    InvalidConfig(String),
}

/// Result alias for this module.
pub type Result<T, E = ChatError> = std::result::Result<T, E>;

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl Message {
    /// A turn with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` turn.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` turn.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` turn.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// The template used when a model ships none: BitNet b1.58 2B4T's format with
/// the end-of-turn marker taken from `eos_token` (see the module docs).
pub const FALLBACK_TEMPLATE: &str = "{% for message in messages %}\
{{ message['role'] | capitalize + ': ' + message['content'] | trim + eos_token }}\
{% endfor %}\
{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template plus the special-token strings it may use.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compile `template` (the `chat_template` string of
    /// `tokenizer_config.json`). `bos_token`/`eos_token` are the token
    /// strings (e.g. `"<|begin_of_text|>"`) exposed to the template.
    pub fn new(
        template: &str,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, template.to_owned())
            .map_err(ChatError::InvalidTemplate)?;
        Ok(Self {
            env,
            source: template.to_owned(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The [`FALLBACK_TEMPLATE`] for a model without a chat template.
    pub fn fallback(bos_token: impl Into<String>, eos_token: impl Into<String>) -> Self {
        Self::new(FALLBACK_TEMPLATE, bos_token, eos_token)
            .expect("the fallback chat template compiles")
    }

    /// Read `chat_template`, `bos_token` and `eos_token` from the text of a
    /// `tokenizer_config.json`. The template may be a string or a list of
    /// `{name, template}` (the one named `default` is used); special tokens
    /// may be strings or `{"content": ...}` objects. Without a template the
    /// [`FALLBACK_TEMPLATE`] is used.
    pub fn from_tokenizer_config(json: &str) -> Result<Self> {
        let cfg: serde_json::Value =
            serde_json::from_str(json).map_err(|e| ChatError::InvalidConfig(e.to_string()))?;
        let token = |key: &str| -> String {
            match cfg.get(key) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Object(o)) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or_default()
                    .to_owned(),
                _ => String::new(),
            }
        };
        let (bos, eos) = (token("bos_token"), token("eos_token"));
        let template = match cfg.get("chat_template") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => {
                let named = |name: &str| {
                    list.iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
                        .and_then(|t| t.get("template"))
                        .and_then(|t| t.as_str())
                };
                Some(
                    named("default")
                        .ok_or_else(|| {
                            ChatError::InvalidConfig(
                                "chat_template list has no template named \"default\"".into(),
                            )
                        })?
                        .to_owned(),
                )
            }
            Some(other) => {
                return Err(ChatError::InvalidConfig(format!(
                    "chat_template must be a string or a list, not {other}"
                )))
            }
        };
        match template {
            Some(t) => Self::new(&t, bos, eos),
            None => Ok(Self::fallback(bos, eos)),
        }
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The BOS token string given to the template.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The EOS token string given to the template.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Render the conversation; with `add_generation_prompt` the text ends
    /// with the cue for the assistant's reply.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(ChatError::Render)?;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            tools => (),
            documents => (),
        };
        tmpl.render(ctx).map_err(ChatError::Render)
    }
}

impl ChatTemplate {
    /// The template a `.tern` file carries, or the [`FALLBACK_TEMPLATE`], with the file's BOS
    /// string and its end-of-turn string: `<|eot_id|>` where the vocabulary has it (Llama 3,
    /// BitNet 2B-4T), else the first EOS token.
    pub fn for_file(file: &TernFile, tokenizer: &Tokenizer) -> Result<Self> {
        let token = |id: Option<u32>| {
            id.and_then(|i| tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        let bos = token(file.metadata().config.bos_token_id);
        let end_of_turn = tokenizer
            .token_to_id("<|eot_id|>")
            .or(tokenizer.eos_token_ids().first().copied());
        let eos = token(end_of_turn);
        match &file.metadata().chat_template {
            Some(t) => Self::new(t, bos, eos),
            None => Ok(Self::fallback(bos, eos)),
        }
    }
}

/// A conversation with a model: the turns so far and the KV cache of their tokens. Each
/// turn renders the whole conversation with the chat template and feeds only the tokens
/// after the longest prefix the cache already holds.
pub struct Conversation<'t> {
    template: ChatTemplate,
    tokenizer: &'t Tokenizer,
    messages: Vec<Message>,
    state: State,
    /// The token ids whose keys and values are in `state`'s cache, in order.
    cached: Vec<u32>,
}

/// What one turn produced.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The reply as stored in the conversation (decoded, trimmed).
    pub text: String,
    pub generation: Generation,
    /// Tokens of the rendered conversation taken from the cache rather than computed.
    pub reused_tokens: usize,
}

impl<'t> Conversation<'t> {
    /// A conversation starting from an empty `state`, with an optional system message.
    pub fn new(
        template: ChatTemplate,
        tokenizer: &'t Tokenizer,
        mut state: State,
        system: Option<&str>,
    ) -> Self {
        state.pos = 0;
        Self {
            template,
            tokenizer,
            messages: system.into_iter().map(Message::system).collect(),
            state,
            cached: Vec::new(),
        }
    }

    /// Adds the user's message and generates the reply, passing its text to `on_text` piece
    /// by piece as it is produced (never half a character). On an error the user's message
    /// is withdrawn and the conversation can go on.
    pub fn say(
        &mut self,
        model: &Model,
        pool: &Pool,
        user: &str,
        max_tokens: usize,
        sampler: &mut Sampler,
        on_text: impl FnMut(&str) -> Result<(), InferError>,
    ) -> Result<Reply, InferError> {
        self.messages.push(Message::user(user));
        let reply = self.reply(model, pool, max_tokens, sampler, on_text);
        match reply {
            Ok(reply) => {
                self.messages.push(Message::assistant(reply.text.clone()));
                Ok(reply)
            }
            Err(e) => {
                self.messages.pop();
                Err(e)
            }
        }
    }

    fn reply(
        &mut self,
        model: &Model,
        pool: &Pool,
        max_tokens: usize,
        sampler: &mut Sampler,
        on_text: impl FnMut(&str) -> Result<(), InferError>,
    ) -> Result<Reply, InferError> {
        let prompt = self.template.render(&self.messages, true)?;
        // add_special: BOS exactly once, whether or not the template writes it.
        let ids = self.tokenizer.encode(&prompt, true)?;
        if ids.is_empty() {
            return Err(InferError::EmptyPrompt);
        }
        let common = self
            .cached
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count();
        // Feed at least one token, so that the logits belong to the last one.
        let keep = common.min(ids.len() - 1);
        self.state.pos = keep;
        self.cached.truncate(keep);
        let generation = generate_text(
            model,
            pool,
            &mut self.state,
            self.tokenizer,
            &ids[keep..],
            max_tokens,
            sampler,
            on_text,
        )?;
        // The cache holds the prompt and every generated token that was fed back: all but
        // the last one when the token budget ran out.
        self.cached.extend_from_slice(&ids[keep..]);
        self.cached.extend_from_slice(&generation.tokens);
        self.cached.truncate(self.state.pos);
        let text = self.tokenizer.decode(&generation.tokens, true)?;
        Ok(Reply {
            text: text.trim().to_owned(),
            generation,
            reused_tokens: keep,
        })
    }

    /// The turns so far.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// The token ids whose keys and values the cache holds.
    pub fn cached_tokens(&self) -> &[u32] {
        &self.cached
    }

    /// The model state: the cache, and the logits of the last token fed.
    pub fn state(&self) -> &State {
        &self.state
    }
}

/// transformers' `raise_exception(message)`.
fn raise_exception(message: String) -> std::result::Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False,
/// indent=indent, separators=separators, sort_keys=sort_keys)` (no HTML
/// escaping, `", "`/`": "` separators by default).
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<String, JinjaError> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    // ensure_ascii is accepted and ignored (transformers passes False).
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_owned()),
            None => Some(
                " ".repeat(
                    usize::try_from(v.clone())
                        .map_err(|_| JinjaError::new(ErrorKind::InvalidOperation, "bad indent"))?,
                ),
            ),
        },
    };
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => {
            return Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                "separators must be a pair",
            ))
        }
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let mut out = String::new();
    let fmt = JsonFmt {
        indent: indent.as_deref(),
        item_sep: &item_sep,
        key_sep: &key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    fmt.write(&mut out, value, 0)?;
    Ok(out)
}

struct JsonFmt<'a> {
    indent: Option<&'a str>,
    item_sep: &'a str,
    key_sep: &'a str,
    sort_keys: bool,
}

impl JsonFmt<'_> {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(ind) = self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn write(
        &self,
        out: &mut String,
        v: &Value,
        depth: usize,
    ) -> std::result::Result<(), JinjaError> {
        use minijinja::value::ValueKind;
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if let Ok(i) = i128::try_from(v.clone()) {
                    out.push_str(&i.to_string());
                } else {
                    let f = f64::try_from(v.clone())?;
                    out.push_str(&python_float(f));
                }
            }
            ValueKind::String => json_string(out, v.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.container(out, '[', ']', &items, depth, |out, item, d| {
                    self.write(out, item, d)
                })?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                self.container(out, '{', '}', &keys, depth, |out, key, d| {
                    match key.as_str() {
                        Some(s) => json_string(out, s),
                        None => json_string(out, &key.to_string()),
                    }
                    out.push_str(self.key_sep);
                    self.write(out, &v.get_item(key)?, d)
                })?;
            }
            _ => {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!("cannot serialize a {} to JSON", v.kind()),
                ))
            }
        }
        Ok(())
    }

    fn container(
        &self,
        out: &mut String,
        open: char,
        close: char,
        items: &[Value],
        depth: usize,
        mut each: impl FnMut(&mut String, &Value, usize) -> std::result::Result<(), JinjaError>,
    ) -> std::result::Result<(), JinjaError> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(self.item_sep);
            }
            self.newline(out, depth + 1);
            each(out, item, depth + 1)?;
        }
        self.newline(out, depth);
        out.push(close);
        Ok(())
    }
}

/// Python's `repr(float)` for the common cases (`1.0`, `0.5`, `1e-07`).
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let s = format!("{f:?}");
    // Rust's Debug gives `1e-7`; Python writes `1e-07`.
    match s.split_once('e') {
        Some((m, e)) => {
            let (sign, digits) = match e.strip_prefix('-') {
                Some(d) => ("-", d),
                None => ("+", e),
            };
            format!("{m}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

/// A JSON string literal without escaping non-ASCII (`ensure_ascii=False`).
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BitNet b1.58 2B4T's `chat_template`, verbatim.
    const BITNET: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}";

    /// Meta Llama 3 Instruct's `chat_template`, verbatim.
    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    /// A Llama-3.1-style template exercising what HF templates use: system
    /// message split-off, `raise_exception`, `.strip()`, `.startswith()`,
    /// loop controls, `{%-`/`{{-` whitespace control with trim/lstrip blocks.
    /// Expected outputs below were produced by Jinja2 3.1 configured as
    /// transformers configures it.
    const LLAMA3_STYLE: &str = r#"{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'].strip() %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = 'You are a helpful assistant.' %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' + system_message + '<|eot_id|>' }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['content'].startswith('#skip') %}{% continue %}{% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {{- message['content'].strip() + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"#;

    fn conv() -> Vec<Message> {
        vec![
            Message::system("  Be terse.  "),
            Message::user("hi"),
            Message::assistant(" hello! "),
            Message::user("2+2?"),
        ]
    }

    #[test]
    fn bitnet_template_exact() {
        let t = ChatTemplate::new(BITNET, "<|begin_of_text|>", "<|end_of_text|>").unwrap();
        assert_eq!(
            t.render(&[Message::user("hi")], true).unwrap(),
            "User: hi<|eot_id|>Assistant: "
        );
        assert_eq!(
            t.render(&[Message::user("hi")], false).unwrap(),
            "User: hi<|eot_id|>"
        );
        assert_eq!(
            t.render(&conv(), true).unwrap(),
            "System: Be terse.<|eot_id|>User: hi<|eot_id|>Assistant: hello!<|eot_id|>\
             User: 2+2?<|eot_id|>Assistant: "
        );
        // capitalize lowercases the rest, as Jinja2's does.
        assert_eq!(
            t.render(&[Message::new("USER", "x")], false).unwrap(),
            "User: x<|eot_id|>"
        );
        assert_eq!(t.render(&[], true).unwrap(), "Assistant: ");
    }

    #[test]
    fn llama3_template_exact() {
        let t = ChatTemplate::new(LLAMA3, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        assert_eq!(
            t.render(&conv(), true).unwrap(),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe terse.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nhello!<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn llama3_style_template_features() {
        let t = ChatTemplate::new(LLAMA3_STYLE, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let out = t.render(&conv(), true).unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe terse.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nhello!<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        // No system message: the default one, no generation prompt.
        let out = t.render(&[Message::user("yo")], false).unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
             You are a helpful assistant.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nyo<|eot_id|>"
        );
        // {% continue %} (loop_controls).
        let out = t
            .render(
                &[Message::user("#skip me"), Message::assistant("ok")],
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
             You are a helpful assistant.<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nok<|eot_id|>"
        );
    }

    #[test]
    fn raise_exception_is_a_render_error() {
        let t = ChatTemplate::new(LLAMA3_STYLE, "<s>", "</s>").unwrap();
        let err = t
            .render(&[Message::user("a"), Message::user("b")], true)
            .unwrap_err();
        assert!(matches!(err, ChatError::Render(_)));
        assert!(
            err.to_string()
                .contains("Conversation roles must alternate"),
            "{err}"
        );
    }

    #[test]
    fn invalid_template_is_reported() {
        let err = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err();
        assert!(matches!(err, ChatError::InvalidTemplate(_)));
        assert!(
            err.to_string().starts_with("invalid chat template"),
            "{err}"
        );
    }

    #[test]
    fn fallback_format() {
        let t = ChatTemplate::fallback("<|begin_of_text|>", "<|eot_id|>");
        let bitnet = ChatTemplate::new(BITNET, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        for gen in [true, false] {
            assert_eq!(
                t.render(&conv(), gen).unwrap(),
                bitnet.render(&conv(), gen).unwrap()
            );
        }
        assert_eq!(
            t.render(&[Message::user("hi")], true).unwrap(),
            "User: hi<|eot_id|>Assistant: "
        );
        let t = ChatTemplate::fallback("<s>", "</s>");
        assert_eq!(
            t.render(&[Message::user("hi")], true).unwrap(),
            "User: hi</s>Assistant: "
        );
    }

    #[test]
    fn from_tokenizer_config_variants() {
        let cfg = serde_json::json!({
            "bos_token": "<|begin_of_text|>",
            "eos_token": {"content": "<|eot_id|>", "lstrip": false},
            "chat_template": BITNET,
        });
        let t = ChatTemplate::from_tokenizer_config(&cfg.to_string()).unwrap();
        assert_eq!(t.bos_token(), "<|begin_of_text|>");
        assert_eq!(t.eos_token(), "<|eot_id|>");
        assert_eq!(t.source(), BITNET);
        let cfg = serde_json::json!({
            "eos_token": "</s>",
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": "{{ eos_token }}{{ messages | length }}"},
            ],
        });
        let t = ChatTemplate::from_tokenizer_config(&cfg.to_string()).unwrap();
        assert_eq!(t.render(&conv(), false).unwrap(), "</s>4");
        let t = ChatTemplate::from_tokenizer_config(r#"{"eos_token": "</s>"}"#).unwrap();
        assert_eq!(t.source(), FALLBACK_TEMPLATE);
        assert!(matches!(
            ChatTemplate::from_tokenizer_config("nope"),
            Err(ChatError::InvalidConfig(_))
        ));
        assert!(matches!(
            ChatTemplate::from_tokenizer_config(r#"{"chat_template": 3}"#),
            Err(ChatError::InvalidConfig(_))
        ));
    }

    #[test]
    fn python_compat_bits() {
        let render = |src: &str| {
            ChatTemplate::new(src, "<s>", "</s>")
                .unwrap()
                .render(&conv(), false)
                .unwrap()
        };
        assert_eq!(
            render("{{ messages[0].content.strip().upper() }}|{{ messages[1]['content'].startswith('h') }}"),
            "BE TERSE.|True"
        );
        // Keys in insertion order, Python's separators, no HTML escaping.
        assert_eq!(
            render("{{ messages[1] | tojson }}"),
            r#"{"role": "user", "content": "hi"}"#
        );
        assert_eq!(
            render("{{ messages[1] | tojson(sort_keys=true, separators=[',', ':']) }}"),
            r#"{"content":"hi","role":"user"}"#
        );
        assert_eq!(
            render(r#"{{ {"a": [1, 2.5, none, true], "b": "é\"<>\n"} | tojson }}"#),
            r#"{"a": [1, 2.5, null, true], "b": "é\"<>\n"}"#
        );
        assert_eq!(
            render(r#"{{ {"a": [1, 2]} | tojson(indent=2) }}"#),
            "{\n  \"a\": [\n    1,\n    2\n  ]\n}"
        );
        assert_eq!(render("{{ [] | tojson }}|{{ {} | tojson }}"), "[]|{}");
        assert_eq!(
            render("{% for m in messages %}{% if loop.index0 == 2 %}{% break %}{% endif %}{{ m.role }},{% endfor %}"),
            "system,user,"
        );
        assert_eq!(
            render("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"),
            "4"
        );
        assert_eq!(
            render("{{ tools is none }}{{ documents is none }}{{ bos_token }}"),
            "TrueTrue<s>"
        );
        assert_eq!(python_float(1e-7), "1e-07");
        assert_eq!(python_float(2.5), "2.5");
        assert_eq!(python_float(1.0), "1.0");
    }
}
