//! Cost of constrained decoding per token on a real-size vocabulary.
//!
//!     cargo run --release -p simpleseg-engine --example bench_constraint [tokenizer.json]
//!
//! With a tokenizer.json, its vocabulary (the stop token `<|im_end|>`). Without one the vocabulary is 151,643 tokens (Qwen2.5's size) made here: every
//! string of one to three characters over the answer's alphabet (digits, `.`, `,`, `[`, `]`,
//! space), the rest random words with and without a leading space. It times building the token
//! table and the polygon grammar, the first visit of each grammar state on a typical answer
//! (one pass over the vocabulary, then cached), and the steady per-token cost (masking the
//! logits and advancing) over the same answer decoded again. Prints one JSON line.

use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use simpleseg_engine::runtime::constraint::{Constrained, Grammar, TokenBytes};
use simpleseg_engine::TextTokenizer;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::Tokenizer;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const VOCAB: usize = 151_643;
const ANSWER: &str = "[[[0.339, 0.604], [0.294, 0.902], [0.554, 0.929], [0.652, 0.704], \
                      [0.491, 0.654], [0.402, 0.611], [0.371, 0.598]]]";

fn made_vocabulary() -> Result<TextTokenizer> {
    let alphabet: Vec<char> = "0123456789.,[] ".chars().collect();
    let mut words: Vec<String> = Vec::with_capacity(VOCAB);
    for a in &alphabet {
        words.push(a.to_string());
        for b in &alphabet {
            words.push(format!("{a}{b}"));
            for c in &alphabet {
                words.push(format!("{a}{b}{c}"));
            }
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut seen: std::collections::HashSet<String> = words.iter().cloned().collect();
    while words.len() < VOCAB {
        let len = rng.random_range(2..10);
        let mut w: String = (0..len)
            .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
            .collect();
        if rng.random_bool(0.5) {
            w.insert(0, ' ');
        }
        if seen.insert(w.clone()) {
            words.push(w);
        }
    }
    words.push("<|im_end|>".into());
    let vocab = words
        .into_iter()
        .enumerate()
        .map(|(i, w)| (w, i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab)
        .unk_token("<|im_end|>".into())
        .build()?;
    Ok(TextTokenizer::new(Tokenizer::new(model)))
}

/// The answer as tokens of the made vocabulary: greedy longest match (as a BPE would cut
/// digits and punctuation into short pieces).
fn answer_tokens(tokenizer: &TextTokenizer, answer: &str) -> Result<Vec<u32>> {
    let vocab = tokenizer
        .hf()
        .ok_or("a tokenizer.json tokenizer is needed")?
        .get_vocab(true);
    let mut ids = Vec::new();
    let mut rest = answer;
    while !rest.is_empty() {
        let (len, id) = (1..=rest.len().min(16))
            .rev()
            .filter(|&n| rest.is_char_boundary(n))
            .find_map(|n| vocab.get(&rest[..n]).map(|&id| (n, id)))
            .ok_or_else(|| format!("no token starts {rest:?}"))?;
        ids.push(id);
        rest = &rest[len..];
    }
    Ok(ids)
}

fn main() -> Result<()> {
    let (tokenizer, ids) = match std::env::args().nth(1) {
        Some(path) => {
            let tokenizer = TextTokenizer::from_file(path.as_ref())?;
            let ids = tokenizer
                .hf()
                .ok_or("a tokenizer.json tokenizer is needed")?
                .encode(ANSWER, false)?
                .get_ids()
                .to_vec();
            (tokenizer, ids)
        }
        None => {
            let tokenizer = made_vocabulary()?;
            let ids = answer_tokens(&tokenizer, ANSWER)?;
            (tokenizer, ids)
        }
    };
    let vocab = tokenizer.vocab_size();
    let stop = tokenizer
        .hf()
        .and_then(|t| t.token_to_id("<|im_end|>"))
        .unwrap_or(vocab as u32 - 1);
    let start = Instant::now();
    let tokens = Arc::new(TokenBytes::new(&tokenizer, &[stop])?);
    let token_table_ms = start.elapsed().as_secs_f64() * 1e3;
    let start = Instant::now();
    let grammar = Arc::new(Grammar::polygon(tokens)?);
    let grammar_ms = start.elapsed().as_secs_f64() * 1e3;
    let mut logits = vec![0f32; vocab];

    // One walk: every step's mask, first visit of its state included.
    let walk = |logits: &mut Vec<f32>| -> Result<f64> {
        let mut c = Constrained::new(grammar.clone())?;
        let start = Instant::now();
        for &id in ids.iter().chain(std::iter::once(&stop)) {
            logits.fill(0.0);
            if !c.mask(logits) || logits[id as usize] != 0.0 {
                return Err(format!("token {id} was masked").into());
            }
            c.advance(id);
        }
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    let cold_ms = walk(&mut logits)?;
    let runs = 20;
    let warm_ms = (0..runs).map(|_| walk(&mut logits)).sum::<Result<f64>>()? / runs as f64;
    let steps = ids.len() + 1;
    println!(
        "{}",
        serde_json::json!({
            "vocabulary": vocab,
            "answer_tokens": steps,
            "token_table_ms": token_table_ms,
            "grammar_ms": grammar_ms,
            "first_answer_ms_per_token": cold_ms / steps as f64,
            "steady_us_per_token": warm_ms * 1e3 / steps as f64,
        })
    );
    Ok(())
}
