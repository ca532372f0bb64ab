//! Option groups and values that several commands share: how a model is loaded
//! ([`ModelArgs`]), how it decodes ([`GenerationArgs`]), how answers are read ([`ModeArg`],
//! [`CoordsArg`]), where masks go ([`MaskOutputs`]), and value parsers.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use simpleseg_core::{CoordMode, ParseMode};
use simpleseg_engine::runtime::constraint::Constraint;
use simpleseg_engine::{GenerationConfig, LoadOptions, SamplingOverrides, VisionLanguageModel};

/// Where and how to load a model.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json, ...). Without
    /// it, the built-in simpleseg-tiny model (trained on synthetic scenes only) is used.
    /// (`eval --backend openai`: the served model's name.)
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Device to run on (cuda and metal need a build with that feature).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Compute precision.
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: DtypeArg,
    /// Quantize the language model's linear layers at load: q8_0 (8.5 bits per weight) or
    /// q4k (4.5 bits; q4_0 for rows that are not a multiple of 256). The vision tower keeps
    /// its weights. A folder written by `simpleseg quantize` is quantized already and needs
    /// no flag.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub quantize: Option<QuantizeArg>,
}

/// Where a model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// The CPU (every build).
    Cpu,
    /// The first CUDA GPU (a build with `--features cuda`).
    Cuda,
    /// The Metal GPU (a build with `--features metal`).
    Metal,
}

impl DeviceArg {
    /// The engine's name for the device.
    pub fn name(self) -> &'static str {
        match self {
            DeviceArg::Cpu => "cpu",
            DeviceArg::Cuda => "cuda",
            DeviceArg::Metal => "metal",
        }
    }
}

/// Compute precision.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DtypeArg {
    /// f32 when the weights fit in 8 GiB as f32, else bf16.
    Auto,
    /// 32-bit floats (exact against the references).
    F32,
    /// bfloat16 (half the memory; what the checkpoints store).
    Bf16,
    /// IEEE half precision.
    F16,
}

/// Quantized formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum QuantizeArg {
    /// 8-bit blocks of 32 (8.5 bits per weight).
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit k-quants in blocks of 256 (4.5 bits per weight; q4_0 where rows are shorter).
    #[value(name = "q4k")]
    Q4k,
}

impl QuantizeArg {
    /// The engine's format.
    pub fn format(self) -> simpleseg_engine::io::weights::Quantization {
        match self {
            QuantizeArg::Q8_0 => simpleseg_engine::io::weights::Quantization::Q8_0,
            QuantizeArg::Q4k => simpleseg_engine::io::weights::Quantization::Q4K,
        }
    }
}

impl ModelArgs {
    /// How the model is named in reports.
    pub fn model_name(&self) -> String {
        self.model.as_ref().map_or_else(
            || simpleseg_builtin::NAME.into(),
            |p| p.display().to_string(),
        )
    }

    /// The model folder: `--model`, or the embedded model's cached copy.
    pub fn dir(&self) -> Result<PathBuf> {
        match &self.model {
            Some(dir) => Ok(dir.clone()),
            None => Ok(simpleseg_builtin::folder()?),
        }
    }

    /// How `--device`, `--dtype` and `--quantize` say to load a model.
    pub fn load_options(&self) -> Result<LoadOptions> {
        Ok(LoadOptions {
            device: simpleseg_engine::device(self.device.name())?,
            dtype: match self.dtype {
                DtypeArg::Auto => None,
                DtypeArg::F32 => Some(candle_core::DType::F32),
                DtypeArg::Bf16 => Some(candle_core::DType::BF16),
                DtypeArg::F16 => Some(candle_core::DType::F16),
            },
            quantize: self.quantize.map(QuantizeArg::format),
        })
    }

    /// Loads the model named by `--model`.
    pub fn load(&self) -> Result<Box<dyn VisionLanguageModel>> {
        let dir = self.dir()?;
        simpleseg_engine::load(&dir, &self.load_options()?)
            .with_context(|| format!("loading the model in {}", dir.display()))
    }
}

/// Decoding options; defaults come from the model's generation_config.json.
#[derive(Args, Debug)]
pub struct GenerationArgs {
    /// Most tokens to generate.
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub max_new_tokens: Option<usize>,
    /// Always take the most likely token (keeps the repetition penalty).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k", "seed"])]
    pub greedy: bool,
    /// Sample with this temperature (0: greedy).
    #[arg(long, value_name = "T")]
    pub temperature: Option<f64>,
    /// Sample from the smallest set of tokens whose probability reaches P.
    #[arg(long, value_name = "P")]
    pub top_p: Option<f64>,
    /// Sample from the K most likely tokens (0 disables).
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Penalty on tokens already present (1.0 disables).
    #[arg(long, value_name = "R")]
    pub repetition_penalty: Option<f64>,
    /// OpenAI's presence penalty: subtracted from the logit of each token the answer already
    /// has (-2 to 2; 0 disables).
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub presence_penalty: Option<f64>,
    /// OpenAI's frequency penalty: subtracted once per occurrence in the answer so far (-2 to
    /// 2; 0 disables).
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    pub frequency_penalty: Option<f64>,
    /// Seed of the sampler.
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Only allow answers of this form (constrained decoding): `polygon` (the point protocol,
    /// so every answer parses: one or more polygons of at least 3 points, numbers in [0, 1]
    /// with at most 3 decimals) or `box` ([x1, y1, x2, y2]); bare, or in the answer forms the
    /// released data trains (`{a}.`, `Sure, you can find it at {a}.`, `It is found at {a}.`,
    /// `It is at {a}.`).
    #[arg(long, value_name = "FORM", value_parser = constraint_preset())]
    pub constrain: Option<Constraint>,
}

/// The presets `--constrain` takes (a regular expression comes only from server requests).
fn constraint_preset() -> impl clap::builder::TypedValueParser<Value = Constraint> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["polygon", "box"])
        .try_map(|s| s.parse::<Constraint>())
}

impl GenerationArgs {
    /// The model's defaults with these options applied.
    pub fn apply(&self, defaults: &GenerationConfig) -> Result<GenerationConfig> {
        SamplingOverrides {
            max_new_tokens: self.max_new_tokens,
            greedy: self.greedy,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
        }
        .apply(defaults)
        .map_err(anyhow::Error::msg)
    }
}

/// How answers are parsed (see `simpleseg decode --help`).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ModeArg {
    /// Exactly the official decoder's grammar; where it would crash, skip with a warning.
    Official,
    /// Also signed numbers, exponents and an unterminated (truncated) last polygon.
    Robust,
}

impl From<ModeArg> for ParseMode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Official => ParseMode::Official,
            ModeArg::Robust => ParseMode::Robust,
        }
    }
}

/// What the numbers in answers are measured in.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CoordsArg {
    /// Fractions of image width and height (SimpleSeg's convention).
    Normalized,
    /// Pixels of the original image.
    Pixels,
}

impl From<CoordsArg> for CoordMode {
    fn from(c: CoordsArg) -> Self {
        match c {
            CoordsArg::Normalized => CoordMode::Normalized,
            CoordsArg::Pixels => CoordMode::Pixels,
        }
    }
}

/// Where decoded masks go; shared by `decode` and `segment`.
#[derive(Args, Debug, Default)]
pub struct MaskOutputs {
    /// Write the mask as RLE JSON: {"size": [H, W], "counts": "..."}.
    #[arg(long, value_name = "R.json")]
    pub rle_out: Option<PathBuf>,
    /// Write the mask as an 8-bit grey PNG (0 background, 255 foreground).
    #[arg(long, value_name = "M.png")]
    pub mask_out: Option<PathBuf>,
    /// Write the image with the mask drawn over it (needs --image).
    #[arg(long, value_name = "O.png")]
    pub overlay_out: Option<PathBuf>,
    /// Write the outline as an SVG document of the image's size (one path per polygon, in
    /// pixels), for vector editors.
    #[arg(long, value_name = "O.svg")]
    pub svg_out: Option<PathBuf>,
}

/// Parses a count that must be at least 1 (a clap value parser).
pub fn at_least_one(text: &str) -> std::result::Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Parses `N` comma-separated finite numbers, `0.62,0.59` (a clap value parser).
pub fn numbers<const N: usize>(text: &str) -> std::result::Result<[f64; N], String> {
    let values: Vec<f64> = text
        .split(',')
        .map(|v| v.trim().parse::<f64>().map_err(|e| format!("{v:?}: {e}")))
        .collect::<std::result::Result<_, _>>()?;
    if values.iter().any(|v| !v.is_finite()) {
        return Err("the numbers must be finite".into());
    }
    <[f64; N]>::try_from(values.as_slice()).map_err(|_| {
        format!(
            "expected {N} numbers separated by commas, got {}",
            values.len()
        )
    })
}

/// Parses a number from 0 to 1 (a clap value parser).
pub fn fraction(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        Ok(_) => Err("must be a number from 0 to 1".into()),
        Err(e) => Err(e.to_string()),
    }
}
