//! What training needs of a family, so that the training crate names none: a network it can
//! differentiate through ([`Forward`]), the model being trained with its prompts, special
//! tokens and folder ([`TrainingModel`]), and how to make one ([`TrainingEntry`], registered
//! with the family in `crate::registry`).

use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use image::RgbImage;

use crate::error::Result;
use crate::image_processing::ProcessedImage;
use crate::io::hf::{HfFolder, JsonFile};
use crate::layers::Mode;
use crate::runtime::model::{PromptSource, Sessions};
use crate::text::TextTokenizer;

/// Sequences for a forward pass with gradients: token ids (unpadded; padded with `pad` to the
/// longest, or to `min_len` if longer), the images their placeholders stand for, and which
/// image each sequence shows.
#[derive(Clone, Debug)]
pub struct TrainBatch<'a> {
    pub ids: Vec<&'a [u32]>,
    pub pad: u32,
    pub min_len: usize,
    pub images: &'a [ProcessedImage],
    /// `image_of[i]`: the image of sequence `i`. When every sequence shows the same image its
    /// features are computed once and repeated (a group of answers to one prompt).
    pub image_of: Vec<usize>,
}

/// A network training differentiates through.
pub trait Forward: Send + Sync {
    /// The final hidden states `(sequences, longest, hidden)`, computed with only
    /// differentiable ops in [`Mode::Train`].
    fn hidden_states(&self, batch: &TrainBatch, mode: Mode) -> Result<Tensor>;
    /// The language model's head over hidden states (`(..., hidden)` to `(..., vocab)`).
    fn logits(&self, hidden: &Tensor) -> Result<Tensor>;
}

/// A training example's tokens: the prompt (question with the image), the answer and the
/// end-of-turn token, where the answer starts, and the image's patch grid.
#[derive(Clone, Debug)]
pub struct EncodedExample {
    pub ids: Vec<u32>,
    pub answer_start: usize,
    pub grid: [usize; 3],
}

/// A family's model as training holds it: its network over trainable variables, its prompts,
/// and what it writes into a model folder.
pub trait TrainingModel: Send + Sync {
    /// The trainable variables (named as the family's checkpoints name them).
    fn varmap(&self) -> &VarMap;
    /// The network, for forward passes with gradients.
    fn forward(&self) -> &dyn Forward;
    /// The network, for sampling answers.
    fn sessions(&self) -> &dyn Sessions;
    /// The family's prompt preparation.
    fn prompts(&self) -> &dyn PromptSource;
    fn tokenizer(&self) -> &TextTokenizer;
    /// The token that ends an answer (what the loss learns to write last).
    fn end_of_turn(&self) -> u32;
    /// The token batches are padded with.
    fn padding(&self) -> u32;
    /// The example's tokens for an image of `(width, height)` (read from its header: the
    /// image's grid follows from its size).
    fn encode(&self, question: &str, answer: &str, size: (u32, u32)) -> Result<EncodedExample>;
    /// The image as the network takes it.
    fn process(&self, image: &RgbImage) -> Result<ProcessedImage>;
    /// Writes every file of a model folder but the weights: configuration, tokenizer, chat
    /// template, processor and generation settings (`max_new_tokens` the default answer
    /// length).
    fn write_metadata(&self, dir: &Path, max_new_tokens: usize) -> Result<()>;
}

/// How a fresh variable starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// Ones (normalization scales).
    One,
    /// Zeros (biases).
    Zero,
    /// Normal; `vision` for the vision tower's, which may take its own deviation.
    Normal { vision: bool },
}

/// Makes a new model: configuration file, tokenizer, chat template, device.
pub type FromConfig =
    fn(&JsonFile, tokenizers::Tokenizer, String, &Device) -> Result<Box<dyn TrainingModel>>;

/// A family's training entry points.
pub struct TrainingEntry {
    /// The special tokens a tokenizer trained for the family must have, in the id order it
    /// gives them.
    pub special_tokens: &'static [&'static str],
    /// The chat template a new model gets unless told otherwise.
    pub chat_template: &'static str,
    /// A folder's model, its weights as trainable variables.
    pub from_folder: fn(&HfFolder, &Device) -> Result<Box<dyn TrainingModel>>,
    /// A new model from a configuration file (its vocabulary and special token ids filled in
    /// from `tokenizer`), with the chat template given and the image processor settings of the
    /// configuration's `"image_processor"` object, if any. The variables are to be set with
    /// [`TrainingEntry::init`].
    pub from_config: FromConfig,
    /// A folder's network, frozen (a reference for a KL penalty).
    pub frozen: fn(&HfFolder, &Device) -> Result<Box<dyn Forward>>,
    /// How a variable of this name starts.
    pub init: fn(&str) -> Init,
}
