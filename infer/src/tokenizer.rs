//! Text ⇄ token ids, on top of Hugging Face `tokenizers`.
//!
//! [`Tokenizer`] wraps a `tokenizers::Tokenizer` built from the raw bytes of a
//! `tokenizer.json`, plus the few facts that live outside that file (in
//! `tokenizer_config.json` / `generation_config.json`): the BOS id, whether
//! prompts start with BOS, and the set of ids that end generation.
//!
//! [`TextStream`] turns a stream of generated ids into printable text pieces
//! for streaming output (`tokenizers`' `DecodeStream`); it never emits half a
//! UTF-8 character.

/// Everything that can go wrong turning text into ids and back.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The bytes are not a `tokenizer.json` that `tokenizers` can load.
    #[error("invalid tokenizer.json: {0}")]
    InvalidTokenizerJson(#[source] tokenizers::Error),
    /// The `tokenizers` library panicked while loading the bytes (it does on some malformed
    /// decoders); the panic is caught and reported as a refusal.
    #[error("invalid tokenizer.json: the tokenizers library cannot load it (it panicked)")]
    TokenizerPanicked,
    /// A configured special id (BOS or an EOS) is not in the vocabulary.
    #[error("{what} token id {id} is not in the tokenizer's vocabulary (size {vocab_size})")]
    SpecialIdOutOfVocab {
        /// Which special token (`"bos"` or `"eos"`).
        what: &'static str,
        /// The offending id.
        id: u32,
        /// The tokenizer's vocabulary size, added tokens included.
        vocab_size: usize,
    },
    /// `add_bos` is set but no BOS id was given.
    #[error("add_bos is set but no bos_token_id was given")]
    MissingBos,
    /// Encoding failed inside `tokenizers`.
    #[error("failed to encode text: {0}")]
    Encode(#[source] tokenizers::Error),
    /// Decoding failed inside `tokenizers`.
    #[error("failed to decode token ids: {0}")]
    Decode(#[source] tokenizers::Error),
    /// An id handed to decode is not a token of this tokenizer.
    #[error("unknown token id {id} during decode (vocabulary size {vocab_size})")]
    UnknownTokenId {
        /// The offending id.
        id: u32,
        /// The tokenizer's vocabulary size, added tokens included.
        vocab_size: usize,
    },
}

/// Result alias for this module.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// The facts about special tokens that a `tokenizer.json` alone does not give.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizerOptions {
    /// Id of the beginning-of-sequence token, if the model has one.
    pub bos_token_id: Option<u32>,
    /// Whether an encoded prompt (with `add_special`) must start with BOS
    /// (`add_bos_token` in `tokenizer_config.json`). When false the
    /// post-processor's output is left as it is.
    pub add_bos: bool,
    /// Ids that end generation (`eos_token_id` of `generation_config.json`,
    /// which may be a list, e.g. Llama 3's `<|end_of_text|>` and `<|eot_id|>`).
    pub eos_token_ids: Vec<u32>,
}

/// A loaded tokenizer plus its BOS/EOS configuration.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    opts: TokenizerOptions,
    vocab_size: usize,
    /// Whether the `tokenizer.json` post-processor already prepends BOS when
    /// special tokens are added.
    post_processor_adds_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("opts", &self.opts)
            .field("post_processor_adds_bos", &self.post_processor_adds_bos)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Load from the raw bytes of a `tokenizer.json`.
    ///
    /// Checks that BOS and every EOS id are tokens of the vocabulary, and
    /// works out once whether the post-processor prepends BOS by itself.
    pub fn from_bytes(bytes: &[u8], opts: TokenizerOptions) -> Result<Self> {
        // tokenizers 0.22 panics on some malformed decoders (`expect("Helper")`, found by
        // fuzzing convert's config loading): bad bytes in a file must be an error.
        let inner = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes))
            .map_err(|_| TokenizerError::TokenizerPanicked)?
            .map_err(TokenizerError::InvalidTokenizerJson)?;
        let vocab_size = inner.get_vocab_size(true);
        let check = |what: &'static str, id: u32| {
            if inner.id_to_token(id).is_none() {
                Err(TokenizerError::SpecialIdOutOfVocab {
                    what,
                    id,
                    vocab_size,
                })
            } else {
                Ok(())
            }
        };
        if let Some(bos) = opts.bos_token_id {
            check("bos", bos)?;
        }
        for &eos in &opts.eos_token_ids {
            check("eos", eos)?;
        }
        if opts.add_bos && opts.bos_token_id.is_none() {
            return Err(TokenizerError::MissingBos);
        }
        let post_processor_adds_bos = match opts.bos_token_id {
            Some(bos) => {
                let enc = inner
                    .encode_fast("", true)
                    .map_err(TokenizerError::Encode)?;
                enc.get_ids().first() == Some(&bos)
            }
            None => false,
        };
        Ok(Self {
            inner,
            opts,
            vocab_size,
            post_processor_adds_bos,
        })
    }

    /// Encode `text`.
    ///
    /// With `add_special` the `tokenizer.json` post-processor runs (as with
    /// `add_special_tokens=True` in transformers) and, when `add_bos` is set,
    /// the result starts with exactly one BOS: it is prepended when the
    /// post-processor does not add it, and a doubled leading BOS (e.g. a
    /// chat template that writes `{{ bos_token }}` into the text on top of the
    /// post-processor's) is collapsed to one.
    ///
    /// Without `add_special` the text is tokenized as is (special tokens
    /// written in the text are still recognised): no BOS is added, and a
    /// BOS the text itself holds stays, doubled or not. A rendered chat
    /// template is encoded *with* `add_special` ([`crate::chat::Conversation`]),
    /// so that it starts with exactly one BOS whether the template writes
    /// `{{ bos_token }}` (Llama 3), relies on the tokenizer (BitNet 2B-4T's
    /// writes none), or both.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special)
            .map_err(TokenizerError::Encode)?;
        let mut ids = enc.get_ids().to_vec();
        if add_special && self.opts.add_bos {
            if let Some(bos) = self.opts.bos_token_id {
                if !self.post_processor_adds_bos && ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
                if ids.len() >= 2 && ids[0] == bos && ids[1] == bos {
                    ids.remove(0);
                }
            }
        }
        Ok(ids)
    }

    /// Decode ids to text. Every id must be a token of this tokenizer
    /// (a model may have more embedding rows than the tokenizer has tokens);
    /// an unknown id is an error rather than silently dropped.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.check_ids(ids)?;
        self.decode_checked(ids, skip_special_tokens)
    }

    /// Start a streaming decode; see [`TextStream`].
    pub fn stream(&self, skip_special_tokens: bool) -> TextStream<'_> {
        TextStream::new(self, skip_special_tokens)
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.opts.eos_token_ids.contains(&id)
    }

    /// The ids that end generation.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.opts.eos_token_ids
    }

    /// The BOS id, if any.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.opts.bos_token_id
    }

    /// The options this tokenizer was built with.
    pub fn options(&self) -> &TokenizerOptions {
        &self.opts
    }

    /// Whether the `tokenizer.json` post-processor prepends BOS by itself.
    pub fn post_processor_adds_bos(&self) -> bool {
        self.post_processor_adds_bos
    }

    /// Number of tokens, added (special) tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of a token given by its exact string (e.g. `"<|eot_id|>"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The string of a token id, if it exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Every id must be a token: a model may have more embedding rows than
    /// the tokenizer has tokens, and `tokenizers` would silently drop those.
    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            Some(&id) => Err(TokenizerError::UnknownTokenId {
                id,
                vocab_size: self.vocab_size,
            }),
            None => Ok(()),
        }
    }

    /// Decode ids already checked by [`Self::check_ids`].
    fn decode_checked(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(TokenizerError::Decode)
    }
}

/// Incremental decoder for streaming generation: `tokenizers`' [`DecodeStream`], which
/// decodes each new id together with the ones before it (so decoders that depend on
/// context, SentencePiece's leading-space strip, give the same text as decoding
/// everything at once) and emits text only once it does not end in U+FFFD, so a byte-level
/// token that carries half of a UTF-8 character is held back until the rest arrives.
///
/// Concatenating every returned piece plus [`TextStream::finish`] equals
/// `decode(all_ids)` for the usual decoders.
///
/// [`DecodeStream`]: tokenizers::DecodeStream
pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    inner: tokenizers::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
    skip_special_tokens: bool,
    /// Ids pushed since the last piece: what `finish` still owes.
    pending: Vec<u32>,
}

impl std::fmt::Debug for TextStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextStream")
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl<'a> TextStream<'a> {
    fn new(tok: &'a Tokenizer, skip_special_tokens: bool) -> Self {
        Self {
            tok,
            inner: tok.inner.decode_stream(skip_special_tokens),
            skip_special_tokens,
            pending: Vec::new(),
        }
    }

    /// Add one generated id; return the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.tok.check_ids(&[id])?;
        let piece = self.inner.step(id).map_err(TokenizerError::Decode)?;
        match piece {
            Some(_) => self.pending.clear(),
            None => self.pending.push(id),
        }
        Ok(piece)
    }

    /// Flush whatever is pending at the end of generation, even if it ends in
    /// an incomplete character (which then shows as U+FFFD).
    pub fn finish(&mut self) -> Result<Option<String>> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let text = self
            .tok
            .decode_checked(&self.pending, self.skip_special_tokens)?;
        self.pending.clear();
        Ok(if text.is_empty() { None } else { Some(text) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const BOS: &str = "<|begin_of_text|>";
    const EOS: &str = "<|end_of_text|>";
    const EOT: &str = "<|eot_id|>";

    /// GPT-2's byte → printable char table.
    fn bytes_to_unicode() -> Vec<char> {
        let mut table = vec!['\0'; 256];
        let mut n = 0u32;
        for b in 0..=255u32 {
            let printable = (0x21..=0x7e).contains(&b)
                || (0xa1..=0xac).contains(&b)
                || (0xae..=0xff).contains(&b);
            table[b as usize] = if printable {
                char::from_u32(b).unwrap()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            };
        }
        table
    }

    /// A small byte-level BPE tokenizer (Llama-3 style) with 256 byte
    /// tokens, a few merges and three special tokens after them.
    fn byte_level_json(bos_post_processor: bool) -> Vec<u8> {
        let table = bytes_to_unicode();
        let mut vocab = serde_json::Map::new();
        for (i, c) in table.iter().enumerate() {
            vocab.insert(c.to_string(), json!(i));
        }
        let merges = [("h", "i"), ("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e")];
        let mut next = 256;
        for (a, b) in merges {
            vocab.insert(format!("{a}{b}"), json!(next));
            next += 1;
        }
        let specials = [BOS, EOS, EOT];
        let added: Vec<Value> = specials
            .iter()
            .enumerate()
            .map(|(i, s)| {
                json!({"id": next + i, "content": s, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let bos_id = next;
        let post = if bos_post_processor {
            json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": BOS, "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": BOS, "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {BOS: {"id": BOS, "ids": [bos_id], "tokens": [BOS]}}
            })
        } else {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false,
                   "use_regex": true})
        };
        let merges: Vec<Value> = merges
            .iter()
            .map(|(a, b)| json!(format!("{a} {b}")))
            .collect();
        serde_json::to_vec(&json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false,
                              "trim_offsets": true, "use_regex": true},
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                        "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        }))
        .unwrap()
    }

    fn opts(tok_json: &[u8], add_bos: bool) -> TokenizerOptions {
        let raw = tokenizers::Tokenizer::from_bytes(tok_json).unwrap();
        TokenizerOptions {
            bos_token_id: raw.token_to_id(BOS),
            add_bos,
            eos_token_ids: vec![raw.token_to_id(EOS).unwrap(), raw.token_to_id(EOT).unwrap()],
        }
    }

    fn load(bos_post_processor: bool, add_bos: bool) -> Tokenizer {
        let j = byte_level_json(bos_post_processor);
        Tokenizer::from_bytes(&j, opts(&j, add_bos)).unwrap()
    }

    /// A SentencePiece-style (Llama 2) tokenizer: Metaspace, byte fallback,
    /// and a decoder that strips the leading space.
    fn sentencepiece_json() -> Vec<u8> {
        let mut vocab = serde_json::Map::new();
        for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
            vocab.insert(t.to_string(), json!(i));
        }
        let mut next = 3;
        for b in 0..=255u32 {
            vocab.insert(format!("<0x{b:02X}>"), json!(next));
            next += 1;
        }
        let merges = [
            ("▁", "H"),
            ("▁H", "e"),
            ("l", "l"),
            ("▁He", "ll"),
            ("▁Hell", "o"),
            ("▁", "w"),
            ("o", "r"),
            ("▁w", "or"),
            ("l", "d"),
            ("▁wor", "ld"),
        ];
        for t in ["▁", "H", "e", "l", "o", "w", "r", "d", "!"] {
            vocab.insert(t.to_string(), json!(next));
            next += 1;
        }
        for (a, b) in merges {
            vocab.insert(format!("{a}{b}"), json!(next));
            next += 1;
        }
        let merges: Vec<Value> = merges
            .iter()
            .map(|(a, b)| json!(format!("{a} {b}")))
            .collect();
        let added: Vec<Value> = ["<unk>", "<s>", "</s>"]
            .iter()
            .enumerate()
            .map(|(i, s)| {
                json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        serde_json::to_vec(&json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        }))
        .unwrap()
    }

    #[test]
    fn a_tokenizer_json_that_makes_the_library_panic_is_an_error() {
        let bytes = include_bytes!("../../fixtures/hostile/tokenizer-decoder-panic.json");
        let err = Tokenizer::from_bytes(bytes, TokenizerOptions::default()).unwrap_err();
        assert!(matches!(err, TokenizerError::TokenizerPanicked), "{err}");
    }

    #[test]
    fn invalid_json_is_a_named_error() {
        let err = Tokenizer::from_bytes(b"{not json", TokenizerOptions::default()).unwrap_err();
        assert!(matches!(err, TokenizerError::InvalidTokenizerJson(_)));
        assert!(
            err.to_string().starts_with("invalid tokenizer.json"),
            "{err}"
        );
    }

    #[test]
    fn special_ids_must_exist() {
        let j = byte_level_json(true);
        let mut o = opts(&j, true);
        o.eos_token_ids.push(999_999);
        let err = Tokenizer::from_bytes(&j, o).unwrap_err();
        assert!(
            matches!(
                err,
                TokenizerError::SpecialIdOutOfVocab {
                    what: "eos",
                    id: 999_999,
                    ..
                }
            ),
            "{err}"
        );
        let mut o = opts(&j, true);
        o.bos_token_id = None;
        assert!(matches!(
            Tokenizer::from_bytes(&j, o).unwrap_err(),
            TokenizerError::MissingBos
        ));
    }

    #[test]
    fn vocab_and_lookup() {
        let t = load(true, true);
        assert_eq!(t.vocab_size(), 256 + 4 + 3);
        assert_eq!(t.token_to_id(BOS), Some(260));
        assert_eq!(t.token_to_id(EOT), Some(262));
        assert_eq!(t.token_to_id("nope"), None);
        assert!(t.is_eos(261) && t.is_eos(262) && !t.is_eos(260) && !t.is_eos(0));
        assert_eq!(t.id_to_token(256).as_deref(), Some("hi"));
    }

    #[test]
    fn bos_exactly_once_when_post_processor_adds_it() {
        let t = load(true, true);
        assert!(t.post_processor_adds_bos());
        let ids = t.encode("hi the", true).unwrap();
        assert_eq!(ids, vec![260, 256, 259]);
        // Already in the text (chat template wrote bos_token): still once.
        let ids = t.encode(&format!("{BOS}hi"), true).unwrap();
        assert_eq!(ids, vec![260, 256]);
        // Without special tokens: no BOS added, literal special recognised.
        assert_eq!(t.encode("hi", false).unwrap(), vec![256]);
        assert_eq!(
            t.encode(&format!("{BOS}hi"), false).unwrap(),
            vec![260, 256]
        );
    }

    #[test]
    fn bos_added_when_post_processor_does_not() {
        let t = load(false, true);
        assert!(!t.post_processor_adds_bos());
        assert_eq!(t.encode("hi", true).unwrap(), vec![260, 256]);
        assert_eq!(t.encode("", true).unwrap(), vec![260]);
        assert_eq!(t.encode(&format!("{BOS}hi"), true).unwrap(), vec![260, 256]);
        assert_eq!(t.encode("hi", false).unwrap(), vec![256]);
        // add_bos off: leave the post-processor's output as is.
        let t = load(false, false);
        assert_eq!(t.encode("hi", true).unwrap(), vec![256]);
        let t = load(true, false);
        assert_eq!(t.encode("hi", true).unwrap(), vec![260, 256]);
    }

    #[test]
    fn decode_roundtrip_and_unknown_id() {
        let t = load(true, true);
        let text = "hi the café 😀 ünïcödé";
        let ids = t.encode(text, false).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), text);
        let with_bos = t.encode(text, true).unwrap();
        assert_eq!(t.decode(&with_bos, true).unwrap(), text);
        assert_eq!(t.decode(&with_bos, false).unwrap(), format!("{BOS}{text}"));
        let err = t.decode(&[256, 263], false).unwrap_err();
        assert!(
            matches!(
                err,
                TokenizerError::UnknownTokenId {
                    id: 263,
                    vocab_size: 263
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("unknown token id 263"));
        assert!(t.decode(&[u32::MAX], false).is_err());
        let mut s = t.stream(false);
        assert!(s.push(70_000).is_err());
    }

    #[test]
    fn stream_holds_back_partial_utf8() {
        let t = load(true, true);
        let text = "hi é😀!";
        let ids = t.encode(text, false).unwrap();
        // 'é' is 2 byte tokens and '😀' is 4: the stream must not emit FFFD.
        let mut s = t.stream(false);
        let mut pieces = Vec::new();
        for &id in &ids {
            if let Some(p) = s.push(id).unwrap() {
                assert!(!p.contains('\u{FFFD}'), "{p:?}");
                pieces.push(p);
            }
        }
        if let Some(p) = s.finish().unwrap() {
            pieces.push(p);
        }
        assert_eq!(pieces.concat(), text);
        assert!(pieces.contains(&"é".to_string()), "{pieces:?}");
        assert!(pieces.contains(&"😀".to_string()), "{pieces:?}");
        // Exactly: the two bytes of é give nothing then "é".
        let e = t.encode("é", false).unwrap();
        assert_eq!(e.len(), 2);
        let mut s = t.stream(false);
        assert_eq!(s.push(e[0]).unwrap(), None);
        assert_eq!(s.push(e[1]).unwrap().as_deref(), Some("é"));
        assert_eq!(s.finish().unwrap(), None);
    }

    #[test]
    fn stream_finish_flushes_incomplete_char() {
        let t = load(true, true);
        let e = t.encode("😀", false).unwrap();
        let mut s = t.stream(false);
        assert_eq!(s.push(e[0]).unwrap(), None);
        assert_eq!(s.finish().unwrap().as_deref(), Some("\u{FFFD}"));
    }

    #[test]
    fn stream_special_tokens() {
        let t = load(true, true);
        let mut s = t.stream(true);
        assert_eq!(s.push(260).unwrap(), None);
        assert_eq!(s.push(256).unwrap().as_deref(), Some("hi"));
        let mut s = t.stream(false);
        assert_eq!(s.push(260).unwrap().as_deref(), Some(BOS));
        assert_eq!(s.push(256).unwrap().as_deref(), Some("hi"));
    }

    #[test]
    fn stream_keeps_sentencepiece_spaces() {
        let j = sentencepiece_json();
        let o = TokenizerOptions {
            bos_token_id: Some(1),
            add_bos: true,
            eos_token_ids: vec![2],
        };
        let t = Tokenizer::from_bytes(&j, o).unwrap();
        assert!(!t.post_processor_adds_bos());
        let ids = t.encode("Hello world é!", true).unwrap();
        assert_eq!(ids[0], 1);
        assert_eq!(t.decode(&ids, true).unwrap(), "Hello world é!");
        let mut s = t.stream(true);
        let mut pieces = Vec::new();
        for &id in &ids {
            if let Some(p) = s.push(id).unwrap() {
                pieces.push(p);
            }
        }
        assert_eq!(pieces, ["Hello", " world", " ", "é", "!"]);
    }
}
