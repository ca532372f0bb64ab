//! Vision-language models for SimpleSeg, on candle.
//!
//! Point [`load`] at a Hugging Face model folder (config, safetensors weights, tokenizer, chat
//! template, preprocessor and generation configs) and ask it about an image:
//!
//! ```no_run
//! # fn main() -> simpleseg_engine::Result<()> {
//! use simpleseg_engine::{load, generate, LoadOptions};
//! let model = load("path/to/SimpleSeg-Qwen2.5-VL".as_ref(), &LoadOptions::default())?;
//! let image = simpleseg_core::images::open_image("photo.jpg".as_ref())?;
//! let prompt = model.prepare(&image, "Output the polygon coordinates of the dog in the image.")?;
//! let out = generate(model.as_ref(), &prompt, model.generation_config().clone(), |_| {})?;
//! println!("{}", out.text);
//! # Ok(()) }
//! ```
//!
//! The crate is built in layers, each module using only those below it (see
//! `docs/architecture.md`), from the bottom up:
//!
//! - [`io`]: model folders, tensors read in place, loading options; [`text`] (tokenizers, chat
//!   templates) and [`image_processing`] (what family processors share, Pillow's resampling).
//! - [`layers`]: building blocks (linear layers over every weight format, embeddings, norms,
//!   rotary embeddings, attention), over the CPU kernels of `simpleseg-kernels`.
//! - [`runtime`]: sampling, constraints, the [`VisionLanguageModel`] interface, sessions and
//!   the decoding loops.
//! - [`models`]: language models and vision towers, and the families composed from them.
//! - [`registry`] (families by `model_type`) and [`quantize`] (quantized folders).

#![warn(clippy::unwrap_used, clippy::expect_used)]

pub mod error;
pub mod image_processing;
pub mod io;
pub mod layers;
pub mod models;
pub mod quantize;
pub mod registry;
pub mod runtime;
pub mod text;

pub use error::{Error, Result};
pub use io::hf::HfFolder;
pub use io::load::{auto_dtype, device, init_threads, LoadOptions};
pub use registry::load;
pub use runtime::generator::{generate, generate_batch, generate_constrained, BatchRequest};
pub use runtime::model::{
    GenerationOutput, PixelLimits, Prompt, PromptOptions, Session, StopReason, Timings,
    VisionLanguageModel,
};
pub use runtime::sampling::{GenerationConfig, Sampler, SamplingOverrides};
pub use text::{ChatTemplate, TextTokenizer};
