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
//! Every architecture implements [`VisionLanguageModel`]; [`generate`] drives any of them.

// Every unwrap or expect outside tests is a decision: a panic reachable from input is a bug.
#![warn(clippy::unwrap_used, clippy::expect_used)]

pub mod chat;
pub mod constraint;
pub mod error;
pub mod generation;
pub mod gguf;
pub mod hf;
pub mod kv_cache;
pub mod models;
pub mod nn;
pub mod pillow;
pub mod processor;
pub mod quantize;
pub mod quantized;
pub mod scheduler;
pub mod session;
pub mod tiktoken;
pub mod weights;

/// The Qwen2-VL image processor, the first family's (kept at this path for existing users).
pub use models::qwen2_5_vl::processor as image_processor;

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde::Serialize;

pub use chat::{ChatTemplate, TextTokenizer};
pub use error::{Error, Result};
pub use generation::{GenerationConfig, Sampler};
pub use hf::HfFolder;

/// A prompt ready for a model: token ids with image placeholders, and the processed images.
#[derive(Clone, Debug)]
pub struct Prompt {
    pub input_ids: Vec<u32>,
    pub images: Vec<image_processor::ProcessedImage>,
}

/// Per-request bounds on the image's resized pixel count (`None`: the processor's own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PixelLimits {
    pub min_pixels: Option<usize>,
    pub max_pixels: Option<usize>,
}

/// Decoding state of sequences decoded together (see [`session`]): the caches and positions
/// of one or more prompts, each with one or more rows.
pub trait Session {
    /// Logits of the last position of each row: `(rows, vocab)`.
    fn logits(&self) -> &Tensor;
    /// Appends one token to each row and computes the next logits.
    fn feed(&mut self, tokens: &[u32]) -> Result<()>;
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

/// What every model architecture provides.
pub trait VisionLanguageModel: Send + Sync {
    /// The architecture name (`model_type`).
    fn architecture(&self) -> &str;
    /// The tokenizer.
    fn tokenizer(&self) -> &TextTokenizer;
    /// Chat template applied, image processed, placeholders expanded.
    fn prepare(&self, image: &RgbImage, prompt: &str) -> Result<Prompt>;
    /// [`prepare`](Self::prepare) with the image resized within other pixel limits (as
    /// vLLM's `mm_processor_kwargs` `min_pixels` / `max_pixels`); families whose processor has
    /// no such limits refuse them.
    fn prepare_with(&self, image: &RgbImage, prompt: &str, pixels: PixelLimits) -> Result<Prompt> {
        if pixels != PixelLimits::default() {
            return Err(Error::Input(format!(
                "min_pixels / max_pixels do not apply to {} models",
                self.architecture()
            )));
        }
        self.prepare(image, prompt)
    }
    /// Runs the prompt (vision tower and prefill) and opens a session holding `copies` rows
    /// of it.
    fn start(&self, prompt: &Prompt, copies: usize) -> Result<Box<dyn Session + '_>>;
    /// Decoding defaults from `generation_config.json`, with the stop tokens filled in.
    fn generation_config(&self) -> &GenerationConfig;
    /// The most positions a sequence may take, prompt and answer together
    /// (`max_position_embeddings`): answers stop there.
    fn max_positions(&self) -> usize;
    /// The processor's own `(min_pixels, max_pixels)` for resized images, for families whose
    /// processor has such limits (see [`prepare_with`](Self::prepare_with)).
    fn pixel_range(&self) -> Option<(usize, usize)> {
        None
    }
    /// The dtype the model computes in.
    fn dtype(&self) -> DType;
}

/// Where and how to run a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype; `None` picks one ([`auto_dtype`]).
    pub dtype: Option<DType>,
    /// Quantize the language model's linear layers at load (a folder written by
    /// `simpleseg quantize` is quantized already).
    pub quantize: Option<weights::Quantization>,
}

impl LoadOptions {
    /// The folder's weights as a model reads them under these options.
    pub fn weights(&self, folder: &HfFolder, dtype: DType) -> Result<weights::Weights> {
        let files = weights::folder_files(folder)?;
        Ok(weights::Weights::from_files(files, dtype, &self.device).quantized(self.quantize))
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            dtype: None,
            quantize: None,
        }
    }
}

/// Picks a device by name: `cpu`, `cuda` (with the `cuda` feature) or `metal` (with the
/// `metal` feature).
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).map_err(|e| {
            Error::Unsupported(format!(
                "cannot open the CUDA device ({e}); build with `--features cuda`"
            ))
        }),
        "metal" => Device::new_metal(0).map_err(|e| {
            Error::Unsupported(format!(
                "cannot open the Metal device ({e}); build with `--features metal`"
            ))
        }),
        other => Err(Error::Input(format!(
            "unknown device '{other}' (expected cpu, cuda or metal)"
        ))),
    }
}

/// Fixes the CPU thread count once. Without `RAYON_NUM_THREADS`, candle re-derives the core
/// count from `/proc` on every matrix product, which costs more than a small model's whole
/// decode step; setting the variable (to the available parallelism, unless the user set it)
/// makes that a lookup. Called by [`load`] before any computation starts.
pub fn init_threads() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    });
}

/// The compute dtype to use when none is asked for: f32 while the weights would take at most
/// 8 GiB in f32, bf16 beyond (real sizes, as transformers users run them). On the CPU, linear
/// layers read their weights in place (BF16, F16, F32 or quantized) whatever this is: f32
/// activations multiply them exactly (widened or dequantized), bf16 ones with the CPU's BF16
/// dot-product instructions where it has them.
pub fn auto_dtype(folder: &HfFolder) -> Result<DType> {
    let elements: u64 = weights::folder_files(folder)?
        .shapes()
        .map(|(_, shape)| shape.iter().product::<usize>() as u64)
        .sum();
    Ok(if elements * 4 <= 8 << 30 {
        DType::F32
    } else {
        DType::BF16
    })
}

/// Loads the model in a Hugging Face folder, choosing the implementation from `model_type`.
pub fn load(dir: &Path, options: &LoadOptions) -> Result<Box<dyn VisionLanguageModel>> {
    init_threads();
    let folder = HfFolder::open(dir)?;
    let config = folder.json("config.json")?;
    match config.str(&["model_type"]) {
        Some("qwen2_5_vl") => Ok(Box::new(models::qwen2_5_vl::Qwen2_5VlModel::load(
            &folder, options,
        )?)),
        Some("kimi_vl") => Ok(Box::new(models::kimi_vl::KimiVlModel::load(
            &folder, options,
        )?)),
        Some(other) => Err(Error::Unsupported(format!(
            "{}: model_type \"{other}\" is not supported (supported: qwen2_5_vl, kimi_vl)",
            config.path.display()
        ))),
        None => Err(config.error("missing `model_type`")),
    }
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

/// One prompt of a batch and the answers wanted from it: one [`GenerationConfig`] per answer
/// (its own seed, say). The prompt is prefilled once and its answers share that prefill.
#[derive(Clone, Debug)]
pub struct BatchRequest<'a> {
    pub prompt: &'a Prompt,
    pub configs: Vec<GenerationConfig>,
    /// Answers must match this grammar ([`constraint`]).
    pub grammar: Option<std::sync::Arc<constraint::Grammar>>,
}

/// Generates one answer, calling `on_token` with each new token id as it is chosen.
pub fn generate(
    model: &dyn VisionLanguageModel,
    prompt: &Prompt,
    config: GenerationConfig,
    on_token: impl FnMut(u32),
) -> Result<GenerationOutput> {
    generate_constrained(model, prompt, config, None, on_token)
}

/// [`generate`] with the answer held to `grammar` when given.
pub fn generate_constrained(
    model: &dyn VisionLanguageModel,
    prompt: &Prompt,
    config: GenerationConfig,
    grammar: Option<std::sync::Arc<constraint::Grammar>>,
    mut on_token: impl FnMut(u32),
) -> Result<GenerationOutput> {
    let request = BatchRequest {
        prompt,
        configs: vec![config],
        grammar,
    };
    let mut outputs = generate_batch(model, &[request], |_, token| on_token(token))?;
    outputs
        .pop()
        .ok_or_else(|| Error::Input("generation produced no answer".into()))
}

/// A row of [`generate_batch`] while it is being decoded.
struct Row {
    /// Index of the answer in the output.
    answer: usize,
    decoding: generation::Decoding,
    prefill_ms: f64,
    prompt_tokens: usize,
}

/// Generates every answer of every request together: each prompt is prefilled once, then all
/// rows decode side by side, a row leaving the batch when it stops (see [`session`]). Each
/// answer is exactly what [`generate`] gives for its prompt and config alone. Returns the
/// answers request by request, in the order of each request's configs; `on_token(answer,
/// token)` is called as tokens are chosen.
pub fn generate_batch(
    model: &dyn VisionLanguageModel,
    requests: &[BatchRequest],
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<GenerationOutput>> {
    let mut rows = Vec::new();
    let mut session: Option<Box<dyn Session + '_>> = None;
    for request in requests {
        let copies = request.configs.len();
        if copies == 0 {
            continue;
        }
        let start = Instant::now();
        match session.as_mut() {
            None => session = Some(model.start(request.prompt, copies)?),
            Some(s) => s.add(request.prompt, copies)?,
        }
        let prefill_ms = start.elapsed().as_secs_f64() * 1e3;
        for config in &request.configs {
            rows.push(Row {
                answer: rows.len(),
                decoding: generation::Decoding::new(
                    config,
                    &request.prompt.input_ids,
                    model.max_positions(),
                    request.grammar.clone(),
                )?,
                prefill_ms,
                prompt_tokens: request.prompt.input_ids.len(),
            });
        }
    }
    let Some(mut session) = session else {
        return Ok(Vec::new());
    };
    let decode_start = Instant::now();
    // Rows still decoding, in session order; finished ones move to `done`.
    let mut active: Vec<Row> = Vec::new();
    let mut done: Vec<Row> = Vec::new();
    let mut keep = Vec::with_capacity(rows.len());
    for row in rows {
        keep.push(row.decoding.stop_reason.is_none());
        if row.decoding.stop_reason.is_none() {
            active.push(row);
        } else {
            done.push(row);
        }
    }
    session.retain(&keep)?;
    while !active.is_empty() {
        let logits = session.logits().to_dtype(DType::F32)?;
        let mut tokens = Vec::with_capacity(active.len());
        for (i, row) in active.iter_mut().enumerate() {
            if let Some(token) = row.decoding.choose(logits.get(i)?.to_vec1()?) {
                on_token(row.answer, token);
                if row.decoding.stop_reason.is_none() {
                    tokens.push(token);
                }
            }
        }
        let keep: Vec<bool> = active
            .iter()
            .map(|r| r.decoding.stop_reason.is_none())
            .collect();
        if keep.iter().any(|k| !k) {
            session.retain(&keep)?;
            let (still, finished): (Vec<Row>, Vec<Row>) = active
                .into_iter()
                .partition(|r| r.decoding.stop_reason.is_none());
            active = still;
            done.extend(finished);
        }
        if !active.is_empty() {
            session.feed(&tokens)?;
        }
    }
    let decode_ms = decode_start.elapsed().as_secs_f64() * 1e3;
    done.sort_by_key(|r| r.answer);
    done.into_iter()
        .map(|row| {
            Ok(GenerationOutput {
                text: model.tokenizer().decode(&row.decoding.generated)?,
                prompt_tokens: row.prompt_tokens,
                stop_reason: row.decoding.stop_reason.unwrap_or(StopReason::MaxTokens),
                timings: Timings {
                    prefill_ms: row.prefill_ms,
                    decode_ms,
                    decode_tokens_per_s: row.decoding.generated.len() as f64
                        / (decode_ms / 1e3).max(1e-9),
                },
                token_ids: row.decoding.generated,
            })
        })
        .collect()
}
