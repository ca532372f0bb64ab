//! What every model family provides ([`VisionLanguageModel`]) and what a generation gives back.
//! This module knows no family: families implement the trait (see `crate::models`) and
//! register in `crate::registry`.

use candle_core::{DType, Tensor};
use image::RgbImage;
use serde::Serialize;

use crate::error::Result;
use crate::image_processing::ProcessedImage;
use crate::runtime::sampling::GenerationConfig;
use crate::text::TextTokenizer;

/// A prompt ready for a model: token ids with image placeholders, and the processed images.
#[derive(Clone, Debug, Default)]
pub struct Prompt {
    pub input_ids: Vec<u32>,
    pub images: Vec<ProcessedImage>,
}

/// Per-request bounds on the image's resized pixel count (`None`: the processor's own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PixelLimits {
    pub min_pixels: Option<usize>,
    pub max_pixels: Option<usize>,
}

/// How a prompt is prepared beyond its image and question.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PromptOptions {
    /// Resizing limits for the image (families whose processor has them).
    pub pixels: PixelLimits,
    /// A system message before the user turn (the chat template's own default when `None`).
    pub system: Option<String>,
}

/// Decoding state of sequences decoded together (see [`crate::runtime::session`]): the caches and positions
/// of one or more prompts, each with one or more rows.
pub trait Session {
    /// Logits of the last position of each row: `(rows, vocab)`.
    fn logits(&self) -> &Tensor;
    /// Appends one token to each row and computes the next logits.
    fn feed(&mut self, tokens: &[u32]) -> Result<()>;
    /// Appends several tokens, in order, to a session of one row and computes the logits
    /// after the last: the same logits as feeding them one at a time, at about the cost of one
    /// step where the family runs them as one forward. An error for other batch sizes.
    fn feed_run(&mut self, tokens: &[u32]) -> Result<()>;
    /// A session with every row repeated `n` times in place (a one-row session becomes `n`
    /// rows sharing its prompt).
    fn fork(&self, n: usize) -> Result<Box<dyn Session + '_>>;
    /// Number of rows.
    fn batch(&self) -> usize;
    /// Prefills another prompt and appends `copies` rows of it, decoded with the others from
    /// the next step on.
    fn add(&mut self, prompt: &Prompt, copies: usize) -> Result<()>;
    /// Keeps the rows flagged `true`, in order; the others are dropped with their caches.
    fn retain(&mut self, keep: &[bool]) -> Result<()>;
}

/// What the decoding loops need of a model: sessions over prompts, and the context's length.
/// Every [`VisionLanguageModel`] is one; so is a family's bare network (training samples from
/// its own).
pub trait Sessions: Sync {
    /// Runs the prompt (vision tower and prefill) and opens a session holding `copies` rows
    /// of it.
    fn start(&self, prompt: &Prompt, copies: usize) -> Result<Box<dyn Session + '_>>;
    /// The most positions a sequence may take, prompt and answer together
    /// (`max_position_embeddings`): answers stop there.
    fn max_positions(&self) -> usize;
}

/// What makes a model's prompts from an image and a question: every
/// [`VisionLanguageModel`], and a family's prompt preparation alone (training has one beside
/// the network it trains).
pub trait PromptSource: Sync {
    /// Chat template applied (with `options`' system message), image processed within its
    /// pixel limits, placeholders expanded.
    fn prompt(&self, image: &RgbImage, question: &str, options: &PromptOptions) -> Result<Prompt>;
}

/// What every model architecture provides.
pub trait VisionLanguageModel: Sessions + PromptSource + Send + Sync {
    /// The architecture name (`model_type`).
    fn architecture(&self) -> &str;
    /// The tokenizer.
    fn tokenizer(&self) -> &TextTokenizer;
    /// Chat template applied, image processed, placeholders expanded.
    fn prepare(&self, image: &RgbImage, prompt: &str) -> Result<Prompt>;
    /// [`prepare`](Self::prepare) with a system message and the image resized within other
    /// pixel limits (as vLLM's `mm_processor_kwargs` `min_pixels` / `max_pixels`); families
    /// whose processor has no such limits refuse them.
    fn prepare_with(
        &self,
        image: &RgbImage,
        prompt: &str,
        options: &PromptOptions,
    ) -> Result<Prompt>;
    /// Decoding defaults from `generation_config.json`, with the stop tokens filled in.
    fn generation_config(&self) -> &GenerationConfig;
    /// The processor's own `(min_pixels, max_pixels)` for resized images, for families whose
    /// processor has such limits (see [`prepare_with`](Self::prepare_with)).
    fn pixel_range(&self) -> Option<(usize, usize)> {
        None
    }
    /// The dtype the model computes in.
    fn dtype(&self) -> DType;
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// An end-of-sequence token (not included in the output).
    Eos,
    /// `max_new_tokens` reached.
    MaxTokens,
    /// Stopped by the caller (a stop string seen, a client gone).
    Cancelled,
    /// The answer's constraint allows no token from here on (nothing the tokenizer can
    /// write continues it): the answer is incomplete.
    NoAllowedToken,
}

/// Wall-clock timings of one generation.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    /// Vision tower and prompt prefill, to the first logits.
    pub prefill_ms: f64,
    /// Choosing the tokens and every decode step.
    pub decode_ms: f64,
    /// Generated tokens per second of `decode_ms`.
    pub decode_tokens_per_s: f64,
}

/// The result of [`generate`].
#[derive(Clone, Debug, Serialize)]
pub struct GenerationOutput {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub stop_reason: StopReason,
    pub timings: Timings,
}
