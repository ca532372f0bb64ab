//! Moonshot's tiktoken tokenizer (Kimi-VL, Moonlight): `tiktoken.model` holds the byte-level
//! BPE ranks (`base64 bytes` and a rank per line), and `num_reserved_special_tokens` + 2 ids
//! after them are special tokens named by `tokenizer_config.json`'s `added_tokens_decoder`
//! (unnamed ones are `<|reserved_token_{id}|>`). Text is split with Kimi's own regex, special
//! tokens in the text are recognized, long runs of spaces or non-spaces are cut where the
//! Python wrapper cuts them, and no BOS is added.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use base64::Engine as _;
use rustc_hash::FxHashMap;
use serde::Deserialize;
use simpleseg_core::limits::{read_text_file_bounded, Limit};
use tiktoken_rs::CoreBPE;

use crate::error::{Error, Result};
use crate::io::hf::HfFolder;

/// Kimi's pre-tokenization regex (`TikTokenTokenizer.pat_str`).
pub const KIMI_PATTERN: &str = concat!(
    r"[\p{Han}]+",
    "|",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"\p{N}{1,3}",
    "|",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    "|",
    r"\s*[\r\n]+",
    "|",
    r"\s+(?!\S)",
    "|",
    r"\s+",
);

/// Special token ids after the base vocabulary (`num_reserved_special_tokens` + 2).
const SPECIAL_IDS: u32 = 256 + 2;
/// The wrapper encodes at most this many characters at a time...
const MAX_ENCODE_CHARS: usize = 400_000;
/// ...and cuts runs of spaces or non-spaces longer than this.
const MAX_RUN_CHARS: usize = 25_000;

/// A tiktoken tokenizer with Kimi's settings.
#[derive(Clone)]
pub struct TiktokenTokenizer {
    bpe: CoreBPE,
    /// Number of base (BPE) tokens; ids from here on are special.
    base: u32,
    specials: HashMap<String, u32>,
    names: HashMap<u32, String>,
}

#[derive(Deserialize)]
struct AddedToken {
    content: String,
}

#[derive(Deserialize, Default)]
struct TokenizerConfig {
    #[serde(default)]
    added_tokens_decoder: HashMap<String, AddedToken>,
}

impl TiktokenTokenizer {
    /// Reads `tiktoken.model` and `tokenizer_config.json` of a folder.
    pub fn load(folder: &HfFolder) -> Result<Self> {
        let model = folder.path("tiktoken.model");
        let config: TokenizerConfig = match folder.optional_json("tokenizer_config.json")? {
            Some(file) => file.parse("")?,
            None => TokenizerConfig::default(),
        };
        let mut names = HashMap::new();
        for (id, token) in config.added_tokens_decoder {
            let id: u32 = id.parse().map_err(|_| Error::BadFile {
                path: folder.path("tokenizer_config.json"),
                message: format!("`added_tokens_decoder` key {id:?} is not a token id"),
            })?;
            names.insert(id, token.content);
        }
        Self::from_parts(&model, &names)
    }

    /// The tokenizer of a `tiktoken.model` file with special tokens named by `names`.
    pub fn from_parts(model: &Path, names: &HashMap<u32, String>) -> Result<Self> {
        if !model.is_file() {
            return Err(Error::MissingFile {
                path: model.to_path_buf(),
                hint: "the tiktoken BPE ranks of this tokenizer".into(),
            });
        }
        let bad = |message: String| Error::BadFile {
            path: model.to_path_buf(),
            message,
        };
        let text = read_text_file_bounded(model, Limit::DataBytes)?;
        let mut encoder: FxHashMap<Vec<u8>, u32> = FxHashMap::default();
        let mut seen = HashSet::new();
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
            let (token, rank) = line
                .split_once(' ')
                .ok_or_else(|| bad(format!("line {}: expected `base64 rank`", n + 1)))?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(token)
                .map_err(|e| bad(format!("line {}: {e}", n + 1)))?;
            let rank: u32 = rank
                .trim()
                .parse()
                .map_err(|_| bad(format!("line {}: rank {rank:?} is not a number", n + 1)))?;
            if !seen.insert(rank) || encoder.insert(bytes, rank).is_some() {
                return Err(bad(format!(
                    "line {}: a token or rank appears twice",
                    n + 1
                )));
            }
        }
        let base = encoder.len() as u32;
        if let Some(r) = seen.iter().find(|&&r| r >= base) {
            return Err(bad(format!(
                "rank {r} is beyond the {base} tokens: ranks must run from 0"
            )));
        }
        let specials: HashMap<String, u32> = (base..base + SPECIAL_IDS)
            .map(|id| {
                let name = names
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| format!("<|reserved_token_{id}|>"));
                (name, id)
            })
            .collect();
        if specials.len() != SPECIAL_IDS as usize {
            return Err(bad("two special tokens share a name".into()));
        }
        let special_encoder: FxHashMap<String, u32> =
            specials.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let bpe = CoreBPE::new(encoder, special_encoder, KIMI_PATTERN)
            .map_err(|e| bad(format!("cannot build the tokenizer: {e}")))?;
        let names = specials.iter().map(|(k, v)| (*v, k.clone())).collect();
        Ok(TiktokenTokenizer {
            bpe,
            base,
            specials,
            names,
        })
    }

    /// Token ids of `text`, special tokens in it recognized, as the Python wrapper's `encode`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let allowed: HashSet<&str> = self.specials.keys().map(String::as_str).collect();
        let mut ids = Vec::new();
        for piece in pieces(text) {
            let (encoded, _) = self
                .bpe
                .encode(piece, &allowed)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            ids.extend(encoded);
        }
        Ok(ids)
    }

    /// Text of token ids without special tokens (`skip_special_tokens=True`); bytes that are
    /// not UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let ordinary: Vec<u32> = ids.iter().copied().filter(|&i| i < self.base).collect();
        let bytes = self
            .bpe
            .decode_bytes(&ordinary)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The id of a token: a special token by name, or a base token by its text.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        if let Some(&id) = self.specials.get(token) {
            return Some(id);
        }
        let ids = self.bpe.encode_ordinary(token);
        (ids.len() == 1).then(|| ids[0])
    }

    /// The text of a token: a special token's name, or a base token's bytes as UTF-8.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        if let Some(name) = self.names.get(&id) {
            return Some(name.clone());
        }
        let bytes = self.bpe.decode_bytes(&[id]).ok()?;
        String::from_utf8(bytes).ok()
    }

    /// Base and special tokens.
    pub fn vocab_size(&self) -> usize {
        (self.base + SPECIAL_IDS) as usize
    }
}

/// Python's `str.isspace`: Rust's white space plus the separators U+001C..U+001F.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The text cut as the wrapper cuts it: chunks of at most [`MAX_ENCODE_CHARS`] characters,
/// each cut further wherever a run of spaces or of non-spaces would exceed [`MAX_RUN_CHARS`].
fn pieces(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    for chunk in chars.chunks(MAX_ENCODE_CHARS) {
        let chunk_start = chunk[0].0;
        let chunk_end = chunk_start + chunk.iter().map(|(_, c)| c.len_utf8()).sum::<usize>();
        let mut slice_start = chunk_start;
        let mut run = 0usize;
        let mut run_is_space = py_isspace(chunk[0].1);
        for &(at, c) in chunk {
            let space = py_isspace(c);
            if space != run_is_space {
                run = 1;
                run_is_space = space;
            } else {
                run += 1;
                if run > MAX_RUN_CHARS {
                    out.push(&text[slice_start..at]);
                    slice_start = at;
                    run = 1;
                }
            }
        }
        out.push(&text[slice_start..chunk_end]);
    }
    if out.is_empty() {
        out.push(text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_runs_are_cut_where_the_wrapper_cuts_them() {
        let text = format!("{}  b", "a".repeat(MAX_RUN_CHARS + 3));
        let cut = pieces(&text);
        assert_eq!(cut.len(), 2);
        assert_eq!(cut[0].len(), MAX_RUN_CHARS);
        assert_eq!(cut.concat(), text);
        assert_eq!(pieces(""), vec![""]);
        assert!(py_isspace('\u{1c}') && py_isspace('\u{3000}') && !py_isspace('\u{200b}'));
    }
}
