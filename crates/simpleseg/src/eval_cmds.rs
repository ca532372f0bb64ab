//! `eval`: scores a model on a referring dataset split (or the paper's eight splits).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use simpleseg_core::io::Outputs;
use simpleseg_core::templates::DEFAULT_PROMPT;
use simpleseg_core::{CoordMode, ParseMode};
use simpleseg_data::items::refer_items;
use simpleseg_data::ReferDataset;
use simpleseg_engine::HfFolder;
use simpleseg_eval::backends::{Backend, FileBackend, LocalBackend, OpenAiBackend};
use simpleseg_eval::metrics::BoxSource;
use simpleseg_eval::runner::{self, default_out, markdown, EvalConfig, Report, Task, PAPER_SPLITS};

use crate::options::{at_least_one, CoordsArg, GenerationArgs, ModeArg, ModelArgs};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BackendArg {
    /// A model folder run in this process (--model).
    Local,
    /// An OpenAI-compatible server (--base-url, --model NAME): e.g. vLLM or SGLang.
    Openai,
    /// Answers already produced, from --predictions F.jsonl.
    File,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TaskArg {
    /// Referring expression segmentation: cIoU leads.
    Res,
    /// Referring expression comprehension: Acc@0.5 leads.
    Rec,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BoxFromArg {
    /// The extent of the predicted mask.
    Mask,
    /// The first box in the answer.
    Answer,
}

/// Score a model on a referring dataset split: cIoU, gIoU and Acc@0.5, one sample per
/// expression. Predictions stream to OUT/predictions.jsonl; rerunning with the same --out
/// resumes. Writes OUT/report.json and OUT/report.md.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Root of the refer-format datasets.
    #[arg(long, value_name = "DIR")]
    refer_root: PathBuf,
    /// Dataset name under --refer-root.
    #[arg(long, default_value = "refcoco")]
    dataset: String,
    /// Split to score (val, test, testA, testB, ...).
    #[arg(long, default_value = "val")]
    split: String,
    /// Run the eight splits of the paper's table (refCOCO, refCOCO+, refCOCOg).
    #[arg(long)]
    all: bool,
    /// Which refs(SPLIT_BY).p to read (unc, umd, google, berkeley); default: the dataset's
    /// usual one (refcocog: umd, others: unc).
    #[arg(long)]
    split_by: Option<String>,
    /// Folder holding the images (default: the dataset's usual folder under --refer-root).
    #[arg(long, value_name = "DIR")]
    image_root: Option<PathBuf>,
    /// What is scored: the mask (res) or the box (rec).
    #[arg(long, value_enum, default_value = "res")]
    task: TaskArg,
    /// Where answers come from.
    #[arg(long, value_enum, default_value = "local")]
    backend: BackendArg,
    /// The model (local backend), or the served model's name as --model (openai backend).
    #[command(flatten)]
    model: ModelArgs,
    /// API root of the server, e.g. http://localhost:8000/v1 (openai backend).
    #[arg(long, value_name = "URL")]
    base_url: Option<String>,
    /// Environment variable holding the API key, if the server wants one.
    #[arg(long, value_name = "VAR", default_value = "OPENAI_API_KEY")]
    api_key_env: String,
    /// Seconds before a request to the server is abandoned.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_s: u64,
    /// Retries after a failed request (with backoff).
    #[arg(long, default_value_t = 3)]
    retries: usize,
    /// Answers to re-score: {"ref_id", "sent_id", "answer"} per line (file backend).
    #[arg(long, value_name = "F.jsonl")]
    predictions: Option<PathBuf>,
    /// Parse mode for the answers: `official` matches published numbers.
    #[arg(long, value_enum, default_value = "official")]
    mode: ModeArg,
    /// Coordinate convention of the answers.
    #[arg(long, value_enum, default_value = "normalized")]
    coords: CoordsArg,
    /// Where Acc@0.5's predicted box comes from (default: the predicted mask's extent;
    /// `answer` also asks for a box with "Output the bounding box of {query} in the image.").
    #[arg(long, value_enum)]
    box_from: Option<BoxFromArg>,
    /// The prompt; {query} (or {sent}) is replaced by the expression.
    #[arg(long)]
    prompt_template: Option<String>,
    /// Sample answers instead of greedy decoding, seeded from --seed (default 0) and the
    /// sentence id.
    #[arg(long)]
    sample: bool,
    /// Questions answered at once.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    concurrency: usize,
    /// Only the first N samples.
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    limit: Option<usize>,
    /// Output folder (default runs/<dataset>-<split>; with --all, the parent of those).
    #[arg(long, value_name = "RUN_DIR")]
    out: Option<PathBuf>,
    #[command(flatten)]
    generation: GenerationArgs,
}

fn backend(args: &EvalArgs) -> Result<Box<dyn Backend>> {
    Ok(match args.backend {
        BackendArg::Local => {
            let model_args = &args.model;
            let files = HfFolder::open(model_args.dir()?)?.fingerprint()?;
            let model = model_args.load()?;
            let config = args.generation.apply(model.generation_config())?;
            let grammar = args
                .generation
                .constrain
                .as_ref()
                .map(|c| crate::model_cmds::grammar(c, model.as_ref(), &config))
                .transpose()?;
            let name = model_args.model_name();
            Box::new(
                LocalBackend::new(model, config, name, files)
                    .quantized(model_args.quantize.map(|q| q.format().name()))
                    .constrained(grammar),
            )
        }
        BackendArg::Openai => {
            let Some(url) = &args.base_url else {
                bail!("--backend openai needs --base-url")
            };
            let Some(model) = args.model.model.as_deref() else {
                bail!("--backend openai needs --model NAME (the served model)")
            };
            let model = model.to_string_lossy();
            let max_tokens = args.generation.max_new_tokens.unwrap_or(512);
            Box::new(OpenAiBackend::new(
                url,
                &model,
                std::env::var(&args.api_key_env).ok(),
                max_tokens,
                args.generation.temperature.unwrap_or(1.0),
                Duration::from_secs(args.timeout_s),
                args.retries,
            ))
        }
        BackendArg::File => {
            let Some(path) = &args.predictions else {
                bail!("--backend file needs --predictions F.jsonl")
            };
            Box::new(FileBackend::open(path)?)
        }
    })
}

fn one_split(
    args: &EvalArgs,
    backend: &dyn Backend,
    dataset: &str,
    split: &str,
    out: &Path,
) -> Result<Report> {
    let ds = ReferDataset::load(
        &args.refer_root,
        dataset,
        args.split_by.as_deref(),
        args.image_root.as_deref(),
    )
    .with_context(|| format!("loading {dataset}"))?;
    let items = refer_items(&ds, split)?;
    let data = ds.identity()?;
    if items.is_empty() {
        bail!("{dataset} has no refs in split {split:?}");
    }
    let box_source = match args.box_from {
        Some(BoxFromArg::Answer) => BoxSource::Answer,
        Some(BoxFromArg::Mask) | None => BoxSource::Mask,
    };
    let prompt_template = args.prompt_template.clone().unwrap_or_else(|| {
        if box_source == BoxSource::Answer {
            "Output the bounding box of {query} in the image.".into()
        } else {
            DEFAULT_PROMPT.into()
        }
    });
    let config = EvalConfig {
        dataset: dataset.into(),
        split: split.into(),
        task: match args.task {
            TaskArg::Res => Task::Res,
            TaskArg::Rec => Task::Rec,
        },
        mode: ParseMode::from(args.mode),
        coords: CoordMode::from(args.coords),
        box_source,
        prompt_template: prompt_template.replace("{sent}", "{query}"),
        sample: args.sample,
        seed: args.generation.seed.unwrap_or(0),
        limit: args.limit,
        data,
    };
    let report = runner::run(&items, backend, &config, args.concurrency, out, true)?;
    eprintln!(
        "{dataset} {split}: cIoU {:.1}, gIoU {:.1}, Acc@0.5 {:.1} over {} samples ({} unparseable) -> {}",
        100.0 * report.ciou,
        100.0 * report.giou,
        100.0 * report.acc50,
        report.n,
        report.parse_failures,
        out.display()
    );
    Ok(report)
}

pub fn eval(args: EvalArgs) -> Result<()> {
    let g = &args.generation;
    if !args.sample && (g.temperature.is_some() || g.top_p.is_some() || g.top_k.is_some()) {
        bail!("--temperature, --top-p and --top-k apply to sampled answers: add --sample (eval is greedy without it)");
    }
    if g.constrain.is_some() && !matches!(args.backend, BackendArg::Local) {
        bail!("--constrain applies to the local backend (the model runs here)");
    }
    simpleseg_data::check_name("--dataset", &args.dataset)?;
    simpleseg_data::check_name("--split", &args.split)?;
    let backend = backend(&args)?;
    if args.all {
        let root = args.out.clone().unwrap_or_else(|| PathBuf::from("runs"));
        let mut reports = Vec::new();
        for (dataset, split) in PAPER_SPLITS {
            let out = root.join(format!("{dataset}-{split}"));
            reports.push(one_split(&args, backend.as_ref(), dataset, split, &out)?);
        }
        let table = markdown(&reports);
        let mut outputs = Outputs::default();
        outputs.add(&root.join("summary.md"), |w| {
            w.write_all(table.as_bytes()).map_err(|e| e.to_string())
        })?;
        outputs.add(&root.join("summary.json"), |w| {
            serde_json::to_writer_pretty(&mut *w, &runner::summary_json(&reports))
                .map_err(|e| e.to_string())?;
            writeln!(w).map_err(|e| e.to_string())
        })?;
        outputs.commit()?;
        println!("{table}");
    } else {
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| default_out(&args.dataset, &args.split));
        let report = one_split(&args, backend.as_ref(), &args.dataset, &args.split, &out)?;
        print!("{}", markdown(&[report]));
    }
    Ok(())
}
