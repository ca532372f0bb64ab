//! `chat` and `segment`: running a vision-language model on an image.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;
use simpleseg_core::images::open_image;
use simpleseg_core::segment::Target;
use simpleseg_core::templates::DEFAULT_PROMPT;
use simpleseg_core::{CoordMode, ParseMode};
use simpleseg_engine::runtime::constraint::{Constraint, Grammar, GrammarCache, PatternLimits};
use simpleseg_engine::runtime::segment::{segment as run_pipeline, SegmentOptions};
use simpleseg_engine::{
    generate_batch, generate_constrained, BatchRequest, GenerationConfig, GenerationOutput, Prompt,
    PromptOptions, VisionLanguageModel,
};

use crate::options::{
    at_least_one, numbers, CoordsArg, GenerationArgs, MaskOutputs, ModeArg, ModelArgs,
};
use crate::protocol_cmds::write_outputs;

/// The compiled grammar of `constraint` over `model`'s vocabulary.
pub fn grammar(
    constraint: &Constraint,
    model: &dyn VisionLanguageModel,
    config: &GenerationConfig,
) -> Result<Arc<Grammar>> {
    let cache = GrammarCache::new(PatternLimits::default());
    Ok(cache.get(model.tokenizer(), &config.eos_token_ids, constraint)?)
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
    /// A system message before the question (without one, the chat template's default).
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
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
/// With no output flag, writes <image stem>.mask.png and <image stem>.overlay.png here. With
/// --batch, segments every item of a JSON lines file or every image of a folder into --out
/// (answers.jsonl, coco_results.json, masks/), decoding --batch-size items together; a rerun
/// resumes.
#[derive(Args, Debug)]
pub struct SegmentArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The image.
    #[arg(
        long,
        value_name = "IMG",
        required_unless_present = "batch",
        conflicts_with = "batch"
    )]
    image: Option<PathBuf>,
    /// What to segment, e.g. "the man in red" (with --batch: for items that name nothing).
    #[arg(long, value_name = "TEXT", required_unless_present_any = ["point", "box", "batch"], conflicts_with_all = ["point", "box"])]
    query: Option<String>,
    /// Or a point on the object, normalized: `--point 0.62,0.59`.
    #[arg(long, value_name = "X,Y", value_parser = numbers::<2>, conflicts_with = "box")]
    point: Option<[f64; 2]>,
    /// Or a box around it, normalized: `--box 0.37,0.16,0.78,0.61`.
    #[arg(long = "box", value_name = "X1,Y1,X2,Y2", value_parser = numbers::<4>)]
    r#box: Option<[f64; 4]>,
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
    #[arg(long, conflicts_with = "batch")]
    json: bool,
    /// Segment many images: a JSON lines file of {"image", "query" | "point" | "box", "id"?,
    /// "image_id"?, "category_id"?} (image paths relative to the file), or a folder of images
    /// (each segmented for --query, --point or --box).
    #[arg(long, value_name = "FILE|DIR", requires = "out")]
    batch: Option<PathBuf>,
    /// The batch's output folder: answers.jsonl (one line per item, in input order: the
    /// segmentation or the item's error), coco_results.json (COCO results: image_id,
    /// category_id, segmentation as RLE, bbox, area, score, id), masks/ID.png, run.json. A
    /// rerun resumes where a killed run stopped, and refuses other settings.
    #[arg(long, value_name = "DIR", requires = "batch")]
    out: Option<PathBuf>,
    /// Items decoded together in a batch.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = at_least_one, requires = "batch")]
    batch_size: usize,
    /// Write no masks/ID.png files (the masks stay in answers.jsonl and coco_results.json).
    #[arg(long, requires = "batch")]
    no_masks: bool,
    /// Also write each outline as svg/ID.svg in the batch's folder.
    #[arg(long, requires = "batch")]
    svg: bool,
}

impl SegmentArgs {
    /// The object named by `--query`, `--point` or `--box`.
    fn target(&self) -> Result<Target> {
        Ok(match (&self.query, &self.point, &self.r#box) {
            (Some(q), _, _) => Target::Query(q.clone()),
            (_, Some(p), _) => Target::Point(*p),
            (_, _, Some(b)) => Target::Box(*b),
            _ => bail!("give --query, --point or --box"),
        })
    }

    /// The target the command line gives, if any (a batch's items may name their own).
    fn given_target(&self) -> Option<Target> {
        self.target().ok()
    }
}

/// The chat prompt: the question with the image, after `--system` when given.
fn chat_prompt(model: &dyn VisionLanguageModel, args: &ChatArgs) -> Result<Prompt> {
    let rgb = open_image(&args.image)?;
    let options = PromptOptions {
        system: args.system.clone(),
        ..PromptOptions::default()
    };
    Ok(model.prepare_with(&rgb, &args.prompt, &options)?)
}

/// Runs generation, streaming text to stdout when `stream`.
fn run(
    model: &dyn VisionLanguageModel,
    prepared: &Prompt,
    config: GenerationConfig,
    constrain: Option<&Constraint>,
    stream: bool,
) -> Result<GenerationOutput> {
    let grammar = constrain.map(|c| grammar(c, model, &config)).transpose()?;
    let mut decoder = model.tokenizer().stream();
    let mut stdout = std::io::stdout().lock();
    let out = generate_constrained(model, prepared, config, grammar, |token| {
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
        &chat_prompt(model.as_ref(), &args)?,
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
    let prompt = chat_prompt(model, args)?;
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
    let o = &args.outputs;
    if args.batch.is_some()
        && (o.rle_out.is_some()
            || o.mask_out.is_some()
            || o.overlay_out.is_some()
            || o.svg_out.is_some())
    {
        bail!("--batch writes its outputs into --out; --rle-out, --mask-out, --overlay-out and --svg-out are for one image");
    }
    let model = args.model.load()?;
    let config = args.generation.apply(model.generation_config())?;
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
    if let (Some(input), Some(out)) = (&args.batch, &args.out) {
        return crate::batch_cmd::run(
            model.as_ref(),
            &crate::batch_cmd::BatchSettings {
                input,
                out,
                default_target: args.given_target(),
                batch_size: args.batch_size,
                masks: !args.no_masks,
                svg: args.svg,
                options,
                config,
                grammar,
                model_name: args.model.model_name(),
                model_dir: args.model.dir()?,
            },
        );
    }
    let Some(image) = &args.image else {
        bail!("give --image, or --batch with --out");
    };
    let rgb = open_image(image)?;
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
    if outputs.rle_out.is_none()
        && outputs.mask_out.is_none()
        && outputs.overlay_out.is_none()
        && outputs.svg_out.is_none()
    {
        let stem = image
            .file_stem()
            .map_or_else(|| "image".into(), |s| s.to_string_lossy().into_owned());
        outputs.mask_out = Some(PathBuf::from(format!("{stem}.mask.png")));
        outputs.overlay_out = Some(PathBuf::from(format!("{stem}.overlay.png")));
    }
    let mask = &result.segmentation.mask;
    let written = write_outputs(&outputs, &result.segmentation, Some(&rgb))?;
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
