//! A family loaded for inference, and the [`VisionLanguageModel`] implementation every family
//! shares: a family supplies its network (a [`Decoder`] with its context length) and how it
//! prepares prompts ([`PromptPreparer`]); [`Family`] puts them to work with the folder's
//! decoding defaults.

use candle_core::DType;
use image::RgbImage;

use crate::error::{Error, Result};
use crate::runtime::model::{
    PixelLimits, Prompt, PromptOptions, PromptSource, Session, Sessions, VisionLanguageModel,
};
use crate::runtime::sampling::GenerationConfig;
use crate::runtime::session::{BatchSession, Decoder};
use crate::text::TextTokenizer;

/// A family's network: prefill and decoding step ([`Decoder`]), and its context length.
pub trait Network: Decoder + Send + Sized {
    /// `max_position_embeddings`: answers stop there.
    fn max_positions(&self) -> usize;
}

/// How a family turns an image and a question into a [`Prompt`]: chat template, image
/// processing, placeholder expansion, tokens.
pub trait PromptPreparer: Send + Sync {
    /// The tokenizer.
    fn tokenizer(&self) -> &TextTokenizer;
    /// One user turn with the image and the question, the processor's own settings, the
    /// template's default system message.
    fn prepare(&self, image: &RgbImage, prompt: &str) -> Result<Prompt> {
        self.prepare_with(image, prompt, &PromptOptions::default())
    }
    /// One user turn with the image and the question, after `options`' system message, the
    /// image resized within its pixel limits (families whose processor has none are only
    /// asked with none: [`pixel_range`](Self::pixel_range)).
    fn prepare_with(
        &self,
        image: &RgbImage,
        prompt: &str,
        options: &PromptOptions,
    ) -> Result<Prompt>;
    /// The processor's own `(min_pixels, max_pixels)`, where it has such limits (without,
    /// requests that give some are refused).
    fn pixel_range(&self) -> Option<(usize, usize)> {
        None
    }
}

/// A family's network, prompt preparation and decoding defaults: a model ready to answer.
pub struct Family<N, P> {
    /// The `model_type` it reads.
    pub architecture: &'static str,
    pub model: N,
    pub prompts: P,
    pub generation: GenerationConfig,
    pub dtype: DType,
}

/// A bare network decodes too (training samples answers from the one it trains).
impl<N: Network> Sessions for N {
    fn start(&self, prompt: &Prompt, copies: usize) -> Result<Box<dyn Session + '_>> {
        Ok(Box::new(BatchSession::start(self, prompt, copies)?))
    }

    fn max_positions(&self) -> usize {
        Network::max_positions(self)
    }
}

impl<N: Network, P: PromptPreparer> Sessions for Family<N, P> {
    fn start(&self, prompt: &Prompt, copies: usize) -> Result<Box<dyn Session + '_>> {
        self.model.start(prompt, copies)
    }

    fn max_positions(&self) -> usize {
        Network::max_positions(&self.model)
    }
}

/// A family's prompt preparation makes prompts on its own (training has one beside the network).
impl<P: PromptPreparer> PromptSource for P {
    fn prompt(&self, image: &RgbImage, question: &str, options: &PromptOptions) -> Result<Prompt> {
        self.prepare_with(image, question, options)
    }
}

impl<N: Network, P: PromptPreparer> PromptSource for Family<N, P> {
    fn prompt(&self, image: &RgbImage, question: &str, options: &PromptOptions) -> Result<Prompt> {
        VisionLanguageModel::prepare_with(self, image, question, options)
    }
}

impl<N: Network, P: PromptPreparer> VisionLanguageModel for Family<N, P> {
    fn architecture(&self) -> &str {
        self.architecture
    }

    fn tokenizer(&self) -> &TextTokenizer {
        self.prompts.tokenizer()
    }

    fn prepare(&self, image: &RgbImage, prompt: &str) -> Result<Prompt> {
        self.prompts.prepare(image, prompt)
    }

    fn prepare_with(
        &self,
        image: &RgbImage,
        prompt: &str,
        options: &PromptOptions,
    ) -> Result<Prompt> {
        if self.prompts.pixel_range().is_none() && options.pixels != PixelLimits::default() {
            return Err(Error::Input(format!(
                "min_pixels / max_pixels do not apply to {} models",
                self.architecture
            )));
        }
        self.prompts.prepare_with(image, prompt, options)
    }

    fn generation_config(&self) -> &GenerationConfig {
        &self.generation
    }

    fn pixel_range(&self) -> Option<(usize, usize)> {
        self.prompts.pixel_range()
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}
