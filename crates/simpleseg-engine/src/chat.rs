//! The tokenizer and chat template of a model folder.

use std::path::Path;

use serde_json::{json, Value};

use simpleseg_core::limits::{read_file_bounded, read_text_file_bounded, Limit};

use crate::error::{Error, Result};
use crate::hf::HfFolder;
use crate::tiktoken::TiktokenTokenizer;

/// A model's tokenizer: `tokenizer.json` read with the tokenizers crate, or Moonshot's
/// `tiktoken.model` ([`TiktokenTokenizer`]).
#[derive(Clone)]
pub struct TextTokenizer {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Hf(Box<tokenizers::Tokenizer>),
    Tiktoken(Box<TiktokenTokenizer>),
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                hint: "the fast tokenizer file; save it with the tokenizer's save_pretrained"
                    .into(),
            });
        }
        let bytes = read_file_bounded(path, Limit::DataBytes)?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| Error::BadFile {
            path: path.to_path_buf(),
            message: format!("cannot load the tokenizer: {e}"),
        })?;
        Ok(TextTokenizer::new(inner))
    }

    /// Wraps a tokenizer built in memory.
    pub fn new(inner: tokenizers::Tokenizer) -> Self {
        TextTokenizer {
            backend: Backend::Hf(Box::new(inner)),
        }
    }

    /// Wraps a tiktoken tokenizer.
    pub fn tiktoken(inner: TiktokenTokenizer) -> Self {
        TextTokenizer {
            backend: Backend::Tiktoken(Box::new(inner)),
        }
    }

    /// The tokenizers-crate tokenizer, for a `tokenizer.json` model.
    pub fn hf(&self) -> Option<&tokenizers::Tokenizer> {
        match &self.backend {
            Backend::Hf(t) => Some(t),
            Backend::Tiktoken(_) => None,
        }
    }

    /// Token ids of `text`, with the tokenizer's special tokens as transformers adds them by
    /// default (`add_special_tokens=True`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::Hf(t) => t
                .encode(text, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::Tokenizer(e.to_string())),
            Backend::Tiktoken(t) => t.encode(text),
        }
    }

    /// Text of token ids without special tokens (`skip_special_tokens=True`).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.backend {
            Backend::Hf(t) => t
                .decode(ids, true)
                .map_err(|e| Error::Tokenizer(e.to_string())),
            Backend::Tiktoken(t) => t.decode(ids),
        }
    }

    /// The id of a token, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match &self.backend {
            Backend::Hf(t) => t.token_to_id(token),
            Backend::Tiktoken(t) => t.token_id(token),
        }
    }

    /// The token of an id, if the vocabulary has it.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.backend {
            Backend::Hf(t) => t.id_to_token(id),
            Backend::Tiktoken(t) => t.id_to_token(id),
        }
    }

    /// Size of the vocabulary including added tokens.
    pub fn vocab_size(&self) -> usize {
        match &self.backend {
            Backend::Hf(t) => t.get_vocab_size(true),
            Backend::Tiktoken(t) => t.vocab_size(),
        }
    }

    /// The most bytes one token stands for, an upper bound over the vocabulary: a text of
    /// more bytes than `n` times this takes more than `n` tokens. (One pass over the
    /// vocabulary.)
    pub fn longest_token_bytes(&self) -> usize {
        (0..self.vocab_size() as u32)
            .map(|id| {
                let text = self.decode(&[id]).map_or(0, |t| t.len());
                let name = self.id_to_token(id).map_or(0, |t| t.len());
                text.max(name)
            })
            .max()
            .unwrap_or(1)
            .max(1)
    }

    /// A decoder that turns tokens into text as they come (see [`StreamDecoder`]).
    pub fn stream(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            text: IncrementalText::default(),
        }
    }
}

/// The text of a growing sequence of tokens, piece by piece, in time linear in its length.
///
/// As vLLM and text-generation-inference do it: only a window of the newest tokens is
/// decoded at each step, from the start of the last piece given out (`prefix`), and the new
/// piece is what that window's text adds to the text of its first part. Starting the window
/// at a token that already produced text keeps tokenizers that treat the first token
/// specially (a leading space) exact. A piece is held back while it ends in an incomplete
/// character.
#[derive(Clone, Debug, Default)]
pub struct IncrementalText {
    ids: Vec<u32>,
    /// Start of the decoded window.
    prefix: usize,
    /// End of the tokens already turned into text.
    read: usize,
}

impl IncrementalText {
    /// Adds a token; returns the new text, if any is complete.
    pub fn push(&mut self, tokenizer: &TextTokenizer, token: u32) -> Result<Option<String>> {
        self.ids.push(token);
        let before = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let now = tokenizer.decode(&self.ids[self.prefix..])?;
        if now.ends_with('\u{FFFD}') || now.len() <= before.len() || !now.is_char_boundary(before.len()) {
            return Ok(None);
        }
        let piece = now[before.len()..].to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(Some(piece))
    }

    /// Every token pushed.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// [`IncrementalText`] bound to its tokenizer.
pub struct StreamDecoder<'a> {
    tokenizer: &'a TextTokenizer,
    text: IncrementalText,
}

impl StreamDecoder<'_> {
    /// Adds a token; returns the new text, if any is complete.
    pub fn step(&mut self, token: u32) -> Result<Option<String>> {
        self.text.push(self.tokenizer, token)
    }
}

/// A chat template in transformers' Jinja dialect.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    /// Where the template came from, for error messages.
    origin: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

/// The most work a chat template may do for one rendering (minijinja's fuel units).
pub const TEMPLATE_FUEL: u64 = 10_000_000;

impl ChatTemplate {
    /// The template a processor uses: `chat_template.jinja`, else `chat_template.json`, else
    /// the `chat_template` of `tokenizer_config.json` (a string, or a list of named templates
    /// whose "default" is taken).
    pub fn load(folder: &HfFolder) -> Result<Self> {
        let tokenizer_config = folder.optional_json("tokenizer_config.json")?;
        let (bos_token, eos_token) = tokenizer_config.as_ref().map_or((None, None), |t| {
            (
                token_string(t.root.get("bos_token")),
                token_string(t.root.get("eos_token")),
            )
        });
        let jinja = folder.path("chat_template.jinja");
        let (source, origin) = if jinja.is_file() {
            let text = read_text_file_bounded(&jinja, Limit::DataBytes)?;
            (text, jinja.display().to_string())
        } else if let Some(file) = folder.optional_json("chat_template.json")? {
            let text = file
                .str(&["chat_template"])
                .ok_or_else(|| file.error("missing the \"chat_template\" string"))?
                .to_string();
            (text, file.path.display().to_string())
        } else if let Some(file) = tokenizer_config
            .as_ref()
            .filter(|t| t.root.get("chat_template").is_some())
        {
            let text = match &file.root["chat_template"] {
                Value::String(s) => s.clone(),
                Value::Array(list) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .ok_or_else(|| {
                        file.error("`chat_template` list has no template named \"default\"")
                    })?
                    .to_string(),
                _ => {
                    return Err(
                        file.error("`chat_template` must be a string or a list of named templates")
                    )
                }
            };
            (text, file.path.display().to_string())
        } else {
            return Err(Error::MissingFile {
                path: jinja,
                hint: "no chat template: expected chat_template.jinja, chat_template.json or a \"chat_template\" in tokenizer_config.json".into(),
            });
        };
        Ok(ChatTemplate {
            source,
            origin,
            bos_token,
            eos_token,
        })
    }

    /// A template from its source text.
    pub fn from_source(source: impl Into<String>) -> Self {
        ChatTemplate {
            source: source.into(),
            origin: "template".into(),
            bos_token: None,
            eos_token: None,
        }
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (transformers' message dicts); a template that runs out of
    /// [`TEMPLATE_FUEL`] is an error.
    pub fn render(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Templates come with downloaded model folders: a bounded amount of work, so that a
        // hostile one cannot loop for ever (real chat templates use a few thousand units).
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_template("chat", &self.source)
            .map_err(|e| Error::Template(format!("{}: {e}", self.origin)))?;
        let template = env
            .get_template("chat")
            .map_err(|e| Error::Template(format!("{}: {e}", self.origin)))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| Error::Template(format!("{}: {e}", self.origin)))
    }

    /// One user turn holding an image followed by a text prompt, as the official example builds
    /// it.
    pub fn image_prompt(&self, prompt: &str) -> Result<String> {
        let messages = json!([{
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": prompt}],
        }]);
        self.render(&messages, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule the incremental decoder replaces: decode everything at each step and give out
    /// what is new, holding back a text ending in an incomplete character.
    fn whole(tokenizer: &TextTokenizer, ids: &[u32]) -> Vec<Option<String>> {
        let mut emitted = 0;
        (1..=ids.len())
            .map(|n| {
                let text = tokenizer.decode(&ids[..n]).unwrap();
                if text.ends_with('\u{FFFD}') || text.len() <= emitted || !text.is_char_boundary(emitted) {
                    return None;
                }
                let piece = text[emitted..].to_string();
                emitted = text.len();
                Some(piece)
            })
            .collect()
    }

    fn check(tokenizer: &TextTokenizer, texts: &[&str]) {
        let mut seed = 11u64;
        for text in texts {
            let mut ids = tokenizer.encode(text).unwrap();
            // And random tokens: pieces of characters, special tokens.
            for _ in 0..40 {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ids.push((seed >> 33) as u32 % tokenizer.vocab_size() as u32);
            }
            let mut stream = IncrementalText::default();
            let pieces: Vec<Option<String>> =
                ids.iter().map(|&t| stream.push(tokenizer, t).unwrap()).collect();
            assert_eq!(pieces, whole(tokenizer, &ids), "{text}");
        }
    }

    #[test]
    fn incremental_text_equals_decoding_everything() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let texts = [
            "[[[0.625, 0.208], [0.5, 0.21], [0.44, 0.98]]].",
            "Sure, you can find it at [[[0.1, 0.2], [0.3, 0.4]]]. 你好 🙂 é",
            "  leading spaces\n\tand tabs",
        ];
        let qwen = TextTokenizer::from_file(&root.join("models/simpleseg-tiny/tokenizer.json")).unwrap();
        check(&qwen, &texts);
        let folder = crate::hf::HfFolder::open(&root.join("fixtures/kimi/kimi-tiny")).unwrap();
        let kimi = TextTokenizer::tiktoken(crate::tiktoken::TiktokenTokenizer::load(&folder).unwrap());
        check(&kimi, &texts);
    }
}
