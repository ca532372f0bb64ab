//! A small byte-level BPE tokenizer trained on the training text, with the model family's
//! special tokens, saved as a standard `tokenizer.json`.
//!
//! The pre-tokenizer writes a number as its leading digit with the decimal point and the first
//! decimal (`0.7`), then one token per further digit (`8`, `6`): a coordinate is a coarse token
//! followed by refinements, so a model learns where an object is before it learns the last
//! pixel (whole-number tokens would make `0.786` and `0.787` unrelated classes). Words keep
//! their leading space and punctuation runs are grouped, so `[[[0.786, 0.643], ...]]` takes
//! about ten tokens per point.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

/// Pre-tokenizer split: a digit with its decimal point and first decimal, single digits,
/// words with a leading space, punctuation runs with a trailing space (`", "`, `"], "`),
/// newlines, other whitespace.
const SPLIT: &str = r"[0-9]\.[0-9]|[0-9]| ?[A-Za-z]+|[^\sA-Za-z0-9]+ ?|\s*[\r\n]+|\s+";

/// Trains a tokenizer of at most `vocab_size` tokens on `texts`; `special` take the first
/// ids, in order.
pub fn train_tokenizer<'a>(
    texts: impl Iterator<Item = &'a str> + Send,
    vocab_size: usize,
    special: &[&str],
) -> Result<Tokenizer> {
    let err = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
    let split = Split::new(
        SplitPattern::Regex(SPLIT.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(err)?;
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_normalizer(Some(NFC));
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, false).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = special.iter().map(|t| AddedToken::from(*t, true)).collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(specials.clone())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build()
        .into();
    tokenizer.train(&mut trainer, texts).map_err(err)?;
    tokenizer.add_special_tokens(&specials);
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinates_become_few_tokens() {
        // A family's chat tokens, as an example.
        const SPECIAL: [&str; 3] = ["<|pad|>", "<|turn|>", "<|end|>"];
        let mut corpus = Vec::new();
        for i in 0..300 {
            corpus.push(format!(
                "<|turn|>user\nIt is at [[[0.{:03}, 0.{:03}], [0.5, 0.25]]]. Output the polygon coordinates of the red star.",
                (i * 7) % 1000,
                (i * 13) % 1000
            ));
        }
        let tok = train_tokenizer(corpus.iter().map(String::as_str), 400, &SPECIAL).unwrap();
        for (i, t) in SPECIAL.iter().enumerate() {
            assert_eq!(tok.token_to_id(t), Some(i as u32), "{t}");
        }
        let enc = tok
            .encode("<|turn|>user\n[[[0.5, 0.25]]]<|end|>", false)
            .unwrap();
        assert!(enc.get_ids().len() <= 12, "{:?}", enc.get_tokens());
        let coordinate = tok.encode("[0.786, 0.5]", false).unwrap();
        assert_eq!(
            coordinate.get_tokens(),
            ["[", "0.7", "8", "6", ",Ġ", "0.5", "]"],
            "a coordinate is a coarse token and one token per further digit"
        );
        assert_eq!(
            tok.decode(enc.get_ids(), false).unwrap(),
            "<|turn|>user\n[[[0.5, 0.25]]]<|end|>"
        );
    }
}
