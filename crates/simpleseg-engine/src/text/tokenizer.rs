//! A model folder's tokenizer (Hugging Face `tokenizer.json` or Moonshot's tiktoken), and text
//! decoded as tokens come ([`IncrementalText`]).

use std::path::Path;

use simpleseg_core::limits::{read_file_bounded, Limit};

use crate::error::{Error, Result};
use crate::text::tiktoken::TiktokenTokenizer;

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
        if now.ends_with('\u{FFFD}')
            || now.len() <= before.len()
            || !now.is_char_boundary(before.len())
        {
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
                if text.ends_with('\u{FFFD}')
                    || text.len() <= emitted
                    || !text.is_char_boundary(emitted)
                {
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
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ids.push((seed >> 33) as u32 % tokenizer.vocab_size() as u32);
            }
            let mut stream = IncrementalText::default();
            let pieces: Vec<Option<String>> = ids
                .iter()
                .map(|&t| stream.push(tokenizer, t).unwrap())
                .collect();
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
        let qwen =
            TextTokenizer::from_file(&root.join("models/simpleseg-tiny/tokenizer.json")).unwrap();
        check(&qwen, &texts);
        let folder = crate::io::hf::HfFolder::open(root.join("fixtures/kimi/kimi-tiny")).unwrap();
        let kimi = TextTokenizer::tiktoken(TiktokenTokenizer::load(&folder).unwrap());
        check(&kimi, &texts);
    }
}
