//! Supervised fine-tuning: cross-entropy on answer tokens, AdamW with warmup and cosine decay,
//! gradient clipping, length-grouped batches, checkpoints that resume exactly.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use simpleseg_core::limits::{read_text_file_bounded, Limit};
use simpleseg_engine::text::{ChatTemplate, TextTokenizer};
use simpleseg_engine::io::hf::{HfFolder, JsonFile};
use simpleseg_engine::models::qwen2_5_vl::processor::ImageProcessorConfig;
use simpleseg_engine::models::qwen2_5_vl::{prompt_builder, Config, PromptBuilder};
use simpleseg_engine::layers::Mode;

use crate::data::{encode_all, epoch_batches, make_batch, read_sft, Batch, Encoded};
use crate::error::{io, Error, Result};
use crate::folder::{hf_tokenizer, write_metadata, QWEN_CHAT_TEMPLATE};
use crate::optim::{lr_at, AdamW, AdamWConfig};
use crate::params::Trainable;
use crate::plot::plot_curve;
use crate::run::{
    add_gradients, cross_entropy, evaluate, read_state, restore, run_shards, save_checkpoint,
    shard_pools, EvalSpec, Log, RunDir, State,
};
use crate::tokenizer::{train_tokenizer, SPECIAL_TOKENS};

/// Where the starting model comes from.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// A model configuration file: a Qwen2.5-VL `config.json` (vocabulary size and special
    /// token ids are filled in from the tokenizer), optionally with `"image_processor"`
    /// settings (`min_pixels`, `max_pixels`) and a `"chat_template_file"` (a Jinja file,
    /// relative to the configuration; default: the template Qwen2.5-VL-Instruct ships).
    Config {
        path: PathBuf,
        tokenizer: Option<PathBuf>,
        vocab_size: usize,
        init_std: f32,
        /// The vision tower's (default: `init_std`).
        #[serde(default)]
        vision_init_std: Option<f32>,
    },
    /// An existing model folder (the path a GPU user takes with a released checkpoint).
    Init { dir: PathBuf },
}

/// Settings of an SFT run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SftSettings {
    pub data: PathBuf,
    pub refer_root: Option<PathBuf>,
    pub start: Start,
    pub steps: usize,
    pub batch_size: usize,
    pub warmup: usize,
    pub min_lr_ratio: f64,
    pub optimizer: AdamWConfig,
    pub seed: u64,
    pub save_every: usize,
    pub log_every: usize,
    pub eval: Option<EvalSpec>,
    pub eval_every: usize,
    /// Each batch is split into this many shards, computed at once on one thread each; their
    /// losses and gradients add up to the batch's. The count changes the order of the sums,
    /// so a resumed run keeps the count it started with. Candle's own ops should run on one
    /// thread meanwhile (`RAYON_NUM_THREADS=1`): nested, they slowed the shards down.
    #[serde(default = "crate::run::one_shard")]
    pub shards: usize,
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize)]
pub struct SftSummary {
    pub steps: usize,
    pub examples: usize,
    pub final_loss: f64,
    pub seconds: f64,
}

/// Builds the starting model and writes the folder's metadata.
fn start_model(
    settings: &SftSettings,
    texts: &[String],
    out: &Path,
    device: &Device,
) -> Result<(Trainable, PromptBuilder)> {
    match &settings.start {
        Start::Init { dir } => {
            let folder = HfFolder::open(dir)?;
            let config = Config::from_json(&folder.json("config.json")?)?;
            let prompts = prompt_builder(&folder, &config)?;
            let model = Trainable::from_folder(&folder, &config, device)?;
            write_metadata(
                out,
                &config,
                hf_tokenizer(&prompts.tokenizer)?,
                prompts.template.source(),
                &prompts.image_config,
                512,
            )?;
            Ok((model, prompts))
        }
        Start::Config {
            path,
            tokenizer,
            vocab_size,
            init_std,
            vision_init_std,
        } => {
            let mut file = JsonFile::read(path)?;
            let template = match file.root.get("chat_template_file") {
                None => QWEN_CHAT_TEMPLATE.to_string(),
                Some(Value::String(name)) => {
                    let jinja = path.parent().unwrap_or(Path::new(".")).join(name);
                    read_text_file_bounded(&jinja, Limit::DataBytes).map_err(|e| {
                        file.error(format!(
                            "its \"chat_template_file\" {} cannot be read ({e}); \
                             the template belongs next to the configuration",
                            jinja.display()
                        ))
                    })?
                }
                Some(_) => {
                    return Err(file
                        .error("\"chat_template_file\" must be a file name")
                        .into())
                }
            };
            let tokenizer = match tokenizer {
                Some(p) => hf_tokenizer(&TextTokenizer::from_file(p)?)?.clone(),
                None => train_tokenizer(
                    texts.iter().map(String::as_str).chain([template.as_str()]),
                    *vocab_size,
                )?,
            };
            let id = |t: &str| {
                tokenizer.token_to_id(t).ok_or_else(|| {
                    Error::Invalid(format!("the tokenizer lacks the special token {t}"))
                })
            };
            let vocab = tokenizer.get_vocab_size(true);
            let root = &mut file.root;
            let text = if root.get("text_config").is_some() {
                &mut root["text_config"]
            } else {
                &mut *root
            };
            text["vocab_size"] = json!(vocab);
            text["eos_token_id"] = json!(id("<|im_end|>")?);
            root["image_token_id"] = json!(id("<|image_pad|>")?);
            root["video_token_id"] = json!(id("<|video_pad|>")?);
            root["vision_start_token_id"] = json!(id("<|vision_start|>")?);
            root["vision_end_token_id"] = json!(id("<|vision_end|>")?);
            root["eos_token_id"] = json!(id("<|im_end|>")?);
            let config = Config::from_json(&file)?;
            let image_config = match file.root.get("image_processor") {
                Some(v) => ImageProcessorConfig::from_json(&JsonFile {
                    path: path.clone(),
                    root: v.clone(),
                })?,
                None => ImageProcessorConfig::default(),
            };
            let prompts = PromptBuilder::new(
                TextTokenizer::new(tokenizer.clone()),
                ChatTemplate::from_source(template.clone()),
                image_config.clone(),
                &config,
            )?;
            let model = Trainable::init(
                &config,
                settings.seed,
                *init_std,
                vision_init_std.unwrap_or(*init_std),
                device,
            )?;
            write_metadata(out, &config, &tokenizer, &template, &image_config, 512)?;
            Ok((model, prompts))
        }
    }
}

/// Runs (or, with `resume`, continues) SFT into `out`.
pub fn train_sft(settings: SftSettings, out: &Path, resume: bool) -> Result<SftSummary> {
    let device = Device::Cpu;
    let run = RunDir::new(out);
    let (settings, start_step) = if resume && run.has_state() {
        let state: State<SftSettings> = read_state(&run)?;
        (state.settings, state.step)
    } else if resume {
        return Err(Error::Invalid(format!(
            "{} holds no run to resume",
            out.display()
        )));
    } else {
        if run.has_state() {
            return Err(Error::Invalid(format!(
                "{} already holds a run; pass --resume to continue it or choose another --out",
                out.display()
            )));
        }
        (settings, 0)
    };
    let examples = read_sft(&settings.data, settings.refer_root.as_deref())?;
    if examples.is_empty() {
        return Err(Error::Invalid(format!(
            "{} holds no examples",
            settings.data.display()
        )));
    }
    let (model, prompts) = if start_step > 0 {
        let folder = HfFolder::open(out)?;
        let config = Config::from_json(&folder.json("config.json")?)?;
        let prompts = prompt_builder(&folder, &config)?;
        (
            Trainable::init(&config, settings.seed, 0.02, 0.02, &device)?,
            prompts,
        )
    } else {
        let texts: Vec<String> = examples
            .iter()
            .flat_map(|e| [e.question.clone(), e.answer.clone()])
            .chain(SPECIAL_TOKENS.iter().map(|s| s.to_string()))
            .collect();
        start_model(&settings, &texts, out, &device)?
    };
    let config = model.config.clone();
    let im_end = prompts
        .tokenizer
        .token_id("<|im_end|>")
        .ok_or_else(|| Error::Invalid("the tokenizer lacks <|im_end|>".into()))?;
    let pad = prompts
        .tokenizer
        .token_id("<|endoftext|>")
        .unwrap_or(im_end);
    let encoded = encode_all(&examples, &prompts, im_end)?;
    let lengths: Vec<usize> = encoded.iter().map(|e| e.ids.len()).collect();
    let mut optimizer = AdamW::new(model.named_vars(), settings.optimizer.clone())?;
    if start_step > 0 {
        restore(&run, &model, &mut optimizer, start_step, &device)?;
    }
    let mut log = Log::open(&run, start_step)?;
    let shard_pools = shard_pools(settings.shards)?;
    let batches_per_epoch = encoded.len().div_ceil(settings.batch_size);
    let bar = ProgressBar::new(settings.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} sft [{bar:40}] {pos}/{len} {msg} (eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_position(start_step as u64);
    let started = Instant::now();
    let mut last_loss = f64::NAN;
    let (mut loss_sum, mut loss_n, mut tokens) = (0f64, 0usize, 0usize);
    let mut epoch_cache: Option<(u64, Vec<Vec<usize>>)> = None;
    for step in start_step..settings.steps {
        let epoch = (step / batches_per_epoch) as u64;
        if epoch_cache.as_ref().map(|(e, _)| *e) != Some(epoch) {
            epoch_cache = Some((
                epoch,
                epoch_batches(&lengths, settings.batch_size, settings.seed, epoch),
            ));
        }
        #[expect(clippy::expect_used, reason = "filled just above")]
        let batch_ids = &epoch_cache.as_ref().expect("set above").1[step % batches_per_epoch];
        let members: Vec<&Encoded> = batch_ids.iter().map(|&i| &encoded[i]).collect();
        let shards = members
            .chunks(members.len().div_ceil(shard_pools.len()))
            .map(|part| {
                make_batch(
                    part,
                    &prompts,
                    config.image_token_id,
                    config.vision.spatial_merge_size,
                    pad,
                    &device,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let answer_tokens: usize = shards.iter().map(|b| b.answer_tokens).sum();
        let mut loss_value = 0.0;
        let mut grads = None;
        for (loss, shard_grads) in run_shards(&shard_pools, &shards, |shard| {
            shard_gradients(&model, shard, answer_tokens)
        })? {
            loss_value += loss;
            grads = Some(add_gradients(&model, grads, shard_grads)?);
        }
        #[expect(
            clippy::expect_used,
            reason = "batches are never empty (batch_size >= 1)"
        )]
        let grads = grads.expect("a batch has at least one example");
        let lr = lr_at(
            step,
            settings.optimizer.lr,
            settings.warmup,
            settings.steps,
            settings.min_lr_ratio,
        );
        let info = optimizer.step(&grads, lr)?;
        last_loss = loss_value;
        loss_sum += loss_value;
        loss_n += 1;
        tokens += answer_tokens;
        let done = step + 1;
        bar.set_position(done as u64);
        bar.set_message(format!("loss {loss_value:.3} lr {lr:.2e}"));
        if done % settings.log_every == 0 || done == settings.steps {
            log.write(&json!({
                "step": done,
                "epoch": done as f64 / batches_per_epoch as f64,
                "loss": loss_sum / loss_n as f64,
                "lr": lr,
                "grad_norm": info.grad_norm,
                "answer_tokens": tokens,
                "seconds": started.elapsed().as_secs_f64(),
            }))?;
            (loss_sum, loss_n, tokens) = (0.0, 0, 0);
        }
        if done % settings.save_every == 0 || done == settings.steps {
            let state = State {
                step: done,
                settings: settings.clone(),
            };
            save_checkpoint(
                &run,
                &model,
                &optimizer,
                &state,
                done == settings.steps || done % (settings.save_every * 10) == 0,
            )?;
            plot_curve(&run.plot(), "loss", &log.series("loss")?)?;
        }
        if let Some(spec) = &settings.eval {
            if settings.eval_every > 0
                && (done % settings.eval_every == 0 || done == settings.steps)
            {
                bar.suspend(|| -> Result<()> {
                    let report = evaluate(&run, spec, done)?;
                    log.write(&json!({"step": done, "eval_split": spec.split, "giou": report.giou, "ciou": report.ciou, "parse_failures": report.parse_failures, "n": report.n}))?;
                    eprintln!("step {done}: {} {} gIoU {:.3} cIoU {:.3} ({} of {} unparseable)", spec.dataset, spec.split, report.giou, report.ciou, report.parse_failures, report.n);
                    Ok(())
                })?;
            }
        }
    }
    bar.finish_and_clear();
    if !run.out.join("training").is_dir() {
        std::fs::create_dir_all(run.training()).map_err(io(&run.training()))?;
    }
    Ok(SftSummary {
        steps: settings.steps,
        examples: encoded.len(),
        final_loss: last_loss,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// One shard's forward and backward pass: its summed answer-token cross-entropy divided by
/// the whole batch's `answer_tokens`, so the shards' losses and gradients add up to the
/// batch's mean.
fn shard_gradients(
    model: &Trainable,
    batch: &Batch,
    answer_tokens: usize,
) -> Result<(f64, GradStore)> {
    let features = model
        .model
        .visual
        .forward(&batch.pixels, &batch.grids, Mode::Train)?;
    let embeds = model.model.embed_with_images(&batch.ids, Some(&features))?;
    let hidden = model
        .model
        .text
        .forward(&embeds, &batch.positions, None, Mode::Train)?;
    let (b, t, d) = hidden.dims3()?;
    let selected = hidden.reshape((b * t, d))?.index_select(&batch.rows, 0)?;
    let logits = model.model.text.logits(&selected)?;
    let share = batch.answer_tokens as f64 / answer_tokens as f64;
    let loss = (cross_entropy(&logits, &batch.targets)? * share)?;
    let grads = loss.backward()?;
    Ok((f64::from(loss.to_scalar::<f32>()?), grads))
}
