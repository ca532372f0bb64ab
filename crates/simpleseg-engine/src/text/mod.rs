//! Text: tokenizers (Hugging Face's and Moonshot's tiktoken), text decoded as tokens come, and
//! chat templates.

pub mod template;
pub mod tiktoken;
pub mod tokenizer;

pub use template::ChatTemplate;
pub use tokenizer::{IncrementalText, StreamDecoder, TextTokenizer};
