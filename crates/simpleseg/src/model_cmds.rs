//! `chat` and `segment`: running a vision-language model on an image.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::json;
use simpleseg_core::images::open_image;
use simpleseg_core::segment::Target;
use simpleseg_core::templates::DEFAULT_PROMPT;
use simpleseg_core::{CoordMode, ParseMode};
use simpleseg_engine::runtime::constraint::{Constraint, Grammar, GrammarCache, PatternLimits};
use simpleseg_engine::runtime::segment::{segment as run_pipeline, SegmentOptions};
use simpleseg_engine::{
    generate_batch, generate_constrained, BatchRequest, GenerationConfig, GenerationOutput,
    LoadOptions, VisionLanguageModel,
};

use crate::protocol_cmds::{write_outputs, CoordsArg, MaskOutputs, ModeArg};

/// Parses a count that must be at least 1 (a clap value parser).
pub fn at_least_one(text: &str) -> std::result::Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Parses a number from 0 to 1 (a clap value parser).
pub fn fraction(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        Ok(_) => Err("must be a number from 0 to 1".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Compute precision.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DtypeArg {
    /// f32 when the weights fit in 8 GiB as f32, else bf16.
    Auto,
    F32,
    Bf16,
    F16,
}

/// Where and how to load a model.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json, ...). Without
    /// it, the built-in simpleseg-tiny model (trained on synthetic scenes only) is used.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Device to run on: cpu, cuda or metal (the last two need a build with that feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
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
        self.model
            .as_ref()
            .map_or_else(|| crate::embedded::NAME.into(), |p| p.display().to_string())
    }

    /// The model folder: `--model`, or the embedded model's cached copy.
    pub fn dir(&self) -> Result<PathBuf> {
        match &self.model {
            Some(dir) => Ok(dir.clone()),
            None => crate::embedded::folder(),
        }
    }

    /// Loads the model named by `--model`.
    pub fn load(&self) -> Result<Box<dyn VisionLanguageModel>> {
        let dir = self.dir()?;
        let options = LoadOptions {
            device: simpleseg_engine::device(&self.device)?,
            dtype: match self.dtype {
                DtypeArg::Auto => None,
                DtypeArg::F32 => Some(candle_core::DType::F32),
                DtypeArg::Bf16 => Some(candle_core::DType::BF16),
                DtypeArg::F16 => Some(candle_core::DType::F16),
            },
            quantize: self.quantize.map(QuantizeArg::format),
        };
        simpleseg_engine::load(&dir, &options)
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
    /// Sample with this temperature.
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
    /// Seed of the sampler.
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Only allow answers of this form (constrained decoding): `polygon` (the point protocol,
    /// so every answer parses: one or more polygons of at least 3 points, numbers in [0, 1]
    /// with at most 3 decimals) or `box` ([x1, y1, x2, y2]).
    #[arg(long, value_name = "FORM", value_parser = constraint_preset())]
    pub constrain: Option<Constraint>,
}

/// The presets `--constrain` takes (a regular expression comes only from server requests).
fn constraint_preset() -> impl clap::builder::TypedValueParser<Value = Constraint> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["polygon", "box"])
        .try_map(|s| s.parse::<Constraint>())
}

/// The compiled grammar of `constraint` over `model`'s vocabulary.
pub fn grammar(
    constraint: &Constraint,
    model: &dyn VisionLanguageModel,
    config: &GenerationConfig,
) -> Result<Arc<Grammar>> {
    let cache = GrammarCache::new(PatternLimits::default());
    Ok(cache.get(model.tokenizer(), &config.eos_token_ids, constraint)?)
}

impl GenerationArgs {
    /// The model's defaults with these options applied.
    pub fn apply(&self, defaults: &GenerationConfig) -> Result<GenerationConfig> {
        let mut c = defaults.clone();
        if let Some(n) = self.max_new_tokens {
            c.max_new_tokens = n;
        }
        if self.greedy {
            c.do_sample = false;
        }
        if self.temperature.is_some()
            || self.top_p.is_some()
            || self.top_k.is_some()
            || self.seed.is_some()
        {
            c.do_sample = true;
        }
        if let Some(t) = self.temperature {
            c.temperature = t;
        }
        if let Some(p) = self.top_p {
            c.top_p = p;
        }
        if let Some(k) = self.top_k {
            c.top_k = k;
        }
        if let Some(r) = self.repetition_penalty {
            c.repetition_penalty = r;
        }
        if let Some(s) = self.seed {
            c.seed = s;
        }
        c.validate().map_err(anyhow::Error::msg)?;
        Ok(c)
    }
}

/// Ask a model about an image and print its answer (streamed as it is generated).
#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The image.
    #[arg(long, value_name = "IMG")]
    image: PathBuf,
    /// The question.
    #[arg(long, value_name = "TEXT")]
    prompt: String,
    #[command(flatten)]
    generation: GenerationArgs,
    /// Sample N answers from one prefill (needs sampling); answer i uses seed --seed + i.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = at_least_one)]
    n: usize,
    /// Print one JSON line per answer: text, token_ids, prompt_tokens, stop_reason, seed,
    /// timings.
    #[arg(long)]
    json: bool,
}

/// Segment an object: ask the model for its outline, decode the answer into a mask, write it.
/// With no output flag, writes <image stem>.mask.png and <image stem>.overlay.png here.
#[derive(Args, Debug)]
pub struct SegmentArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The image.
    #[arg(long, value_name = "IMG")]
    image: PathBuf,
    /// What to segment, e.g. "the man in red".
    #[arg(long, value_name = "TEXT", required_unless_present_any = ["point", "r#box"], conflicts_with_all = ["point", "r#box"])]
    query: Option<String>,
    /// Or a point on the object, normalized: `--point 0.62,0.59`.
    #[arg(
        long,
        value_name = "X,Y",
        value_delimiter = ',',
        num_args = 2,
        conflicts_with = "r#box"
    )]
    point: Option<Vec<f64>>,
    /// Or a box around it, normalized: `--box 0.37,0.16,0.78,0.61`.
    #[arg(
        long = "box",
        value_name = "X1,Y1,X2,Y2",
        value_delimiter = ',',
        num_args = 4
    )]
    r#box: Option<Vec<f64>>,
    /// The prompt; {query} is replaced by the query.
    #[arg(long, default_value = DEFAULT_PROMPT)]
    prompt_template: String,
    /// Parse mode for the answer.
    #[arg(long, value_enum, default_value = "robust")]
    mode: ModeArg,
    /// Coordinate convention of the answer.
    #[arg(long, value_enum, default_value = "normalized")]
    coords: CoordsArg,
    #[command(flatten)]
    outputs: MaskOutputs,
    #[command(flatten)]
    generation: GenerationArgs,
    /// Print one JSON line: the answer, its polygons, the mask and timings.
    #[arg(long)]
    json: bool,
}

impl SegmentArgs {
    /// The object named by `--query`, `--point` or `--box`.
    fn target(&self) -> Result<Target> {
        Ok(match (&self.query, &self.point, &self.r#box) {
            (Some(q), _, _) => Target::Query(q.clone()),
            (_, Some(p), _) => Target::Point([p[0], p[1]]),
            (_, _, Some(b)) => Target::Box([b[0], b[1], b[2], b[3]]),
            _ => bail!("give --query, --point or --box"),
        })
    }
}

/// Runs generation, streaming text to stdout when `stream`.
fn run(
    model: &dyn VisionLanguageModel,
    image: &Path,
    prompt: &str,
    config: GenerationConfig,
    constrain: Option<&Constraint>,
    stream: bool,
) -> Result<GenerationOutput> {
    let rgb = open_image(image)?;
    let prepared = model.prepare(&rgb, prompt)?;
    let grammar = constrain.map(|c| grammar(c, model, &config)).transpose()?;
    let mut decoder = model.tokenizer().stream();
    let mut stdout = std::io::stdout().lock();
    let out = generate_constrained(model, &prepared, config, grammar, |token| {
        if stream {
            if let Ok(Some(chunk)) = decoder.step(token) {
                let _ = stdout.write_all(chunk.as_bytes());
                let _ = stdout.flush();
            }
        }
    })?;
    if stream {
        let _ = writeln!(stdout);
    }
    Ok(out)
}

pub fn chat(args: ChatArgs) -> Result<()> {
    let model = args.model.load()?;
    let config = args.generation.apply(model.generation_config())?;
    if args.n > 1 {
        return chat_samples(model.as_ref(), &args, config);
    }
    let out = run(
        model.as_ref(),
        &args.image,
        &args.prompt,
        config.clone(),
        args.generation.constrain.as_ref(),
        !args.json,
    )?;
    if args.json {
        println!(
            "{}",
            answer_line(&out, config.do_sample.then_some(config.seed))
        );
    }
    Ok(())
}

/// One `chat --json` line.
fn answer_line(out: &GenerationOutput, seed: Option<u64>) -> serde_json::Value {
    json!({
        "text": out.text,
        "token_ids": out.token_ids,
        "prompt_tokens": out.prompt_tokens,
        "stop_reason": out.stop_reason,
        "seed": seed,
        "timings": out.timings,
    })
}

/// `chat --n N`: N sampled answers from one prefill, decoded together.
fn chat_samples(
    model: &dyn VisionLanguageModel,
    args: &ChatArgs,
    config: GenerationConfig,
) -> Result<()> {
    if !config.do_sample {
        bail!(
            "--n {} needs sampling: greedy decoding gives one answer n times (add --temperature, --top-p, --top-k or --seed)",
            args.n
        );
    }
    let rgb = open_image(&args.image)?;
    let prompt = model.prepare(&rgb, &args.prompt)?;
    let configs: Vec<GenerationConfig> = (0..args.n as u64)
        .map(|i| GenerationConfig {
            seed: config.seed.wrapping_add(i),
            ..config.clone()
        })
        .collect();
    let seeds: Vec<u64> = configs.iter().map(|c| c.seed).collect();
    let grammar = args
        .generation
        .constrain
        .as_ref()
        .map(|c| grammar(c, model, &config))
        .transpose()?;
    let outputs = generate_batch(
        model,
        &[BatchRequest {
            prompt: &prompt,
            configs,
            grammar,
        }],
        |_, _| {},
    )?;
    for (out, seed) in outputs.iter().zip(seeds) {
        if args.json {
            println!("{}", answer_line(out, Some(seed)));
        } else {
            println!("--- seed {seed} ---\n{}", out.text);
        }
    }
    Ok(())
}

pub fn segment(args: SegmentArgs) -> Result<()> {
    let model = args.model.load()?;
    let config = args.generation.apply(model.generation_config())?;
    let rgb = open_image(&args.image)?;
    let options = SegmentOptions {
        prompt_template: Some(args.prompt_template.clone()),
        mode: ParseMode::from(args.mode),
        coords: CoordMode::from(args.coords),
        ..SegmentOptions::default()
    };
    let grammar = args
        .generation
        .constrain
        .as_ref()
        .map(|c| grammar(c, model.as_ref(), &config))
        .transpose()?;
    let result = run_pipeline(
        model.as_ref(),
        &rgb,
        &args.target()?,
        &config,
        grammar,
        &options,
        |_| {},
    )?;
    let mut outputs = args.outputs;
    if outputs.rle_out.is_none() && outputs.mask_out.is_none() && outputs.overlay_out.is_none() {
        let stem = args
            .image
            .file_stem()
            .map_or_else(|| "image".into(), |s| s.to_string_lossy().into_owned());
        outputs.mask_out = Some(PathBuf::from(format!("{stem}.mask.png")));
        outputs.overlay_out = Some(PathBuf::from(format!("{stem}.overlay.png")));
    }
    let mask = &result.segmentation.mask;
    let written = write_outputs(&outputs, mask, Some(&rgb))?;
    if args.json {
        let mut report = result.to_json();
        report["written"] = json!(written);
        println!("{report}");
    } else {
        println!("{}", result.output.text);
        for w in &result.parsed.warnings {
            eprintln!("warning: {}", w.message);
        }
        let polygons = result.parsed.polygons.len();
        println!(
            "{polygons} polygon{}, {} foreground pixels",
            if polygons == 1 { "" } else { "s" },
            mask.area()
        );
        for path in written {
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
