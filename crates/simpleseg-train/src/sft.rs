//! Supervised fine-tuning: cross-entropy on answer tokens, AdamW with warmup and cosine decay,
//! gradient clipping, length-grouped batches, checkpoints that resume exactly.

use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::Device;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use simpleseg_core::limits::{read_text_file_bounded, Limit};
use simpleseg_engine::io::hf::{HfFolder, JsonFile};
use simpleseg_engine::layers::Mode;
use simpleseg_engine::text::TextTokenizer;

use crate::data::{encode_all, epoch_batches, make_batch, read_sft, Batch, Encoded};
use crate::error::{io, Error, Result};
use crate::optim::{AdamW, AdamWConfig};
use crate::params::{family_of, Trainable};
use crate::run::{
    add_gradients, cross_entropy, open_run, restore, run_shards, run_stage, shard_pools, Cadence,
    EvalSpec, RunDir, Stage,
};
use crate::tokenizer::train_tokenizer;

/// Where the starting model comes from.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// A model configuration file: a `config.json` of a trainable family (vocabulary size and
    /// special token ids are filled in from the tokenizer), optionally with
    /// `"image_processor"` settings (`min_pixels`, `max_pixels`) and a `"chat_template_file"`
    /// (a Jinja file, relative to the configuration; default: the family's own template).
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
) -> Result<Trainable> {
    let model = match &settings.start {
        Start::Init { dir } => Trainable::from_folder(&HfFolder::open(dir)?, device)?,
        Start::Config {
            path,
            tokenizer,
            vocab_size,
            init_std,
            vision_init_std,
        } => {
            let file = JsonFile::read(path)?;
            let family = family_of(&file)?;
            let template = match file.root.get("chat_template_file") {
                None => family.chat_template.to_string(),
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
                    texts
                        .iter()
                        .map(String::as_str)
                        .chain(family.special_tokens.iter().copied())
                        .chain([template.as_str()]),
                    *vocab_size,
                    family.special_tokens,
                )?,
            };
            let model = Trainable::from_config(&file, tokenizer, template, device)?;
            model.init(
                settings.seed,
                *init_std,
                vision_init_std.unwrap_or(*init_std),
            )?;
            model
        }
    };
    model.model.write_metadata(out, 512)?;
    Ok(model)
}

/// The `tokenizer.json` tokenizer a new tokenizer is made from.
fn hf_tokenizer(tokenizer: &TextTokenizer) -> Result<&tokenizers::Tokenizer> {
    tokenizer.hf().ok_or_else(|| {
        Error::Invalid("training needs a model with a tokenizer.json tokenizer".into())
    })
}

/// Runs (or, with `resume`, continues) SFT into `out`.
pub fn train_sft(settings: SftSettings, out: &Path, resume: bool) -> Result<SftSummary> {
    let device = Device::Cpu;
    let run = RunDir::new(out);
    let (settings, start_step) = open_run(&run, settings, resume)?;
    let examples = read_sft(&settings.data, settings.refer_root.as_deref())?;
    if examples.is_empty() {
        return Err(Error::Invalid(format!(
            "{} holds no examples",
            settings.data.display()
        )));
    }
    let model = if start_step > 0 {
        // The resumed checkpoint's weights replace these below.
        Trainable::from_folder(&HfFolder::open(out)?, &device)?
    } else {
        let texts: Vec<String> = examples
            .iter()
            .flat_map(|e| [e.question.clone(), e.answer.clone()])
            .collect();
        start_model(&settings, &texts, out, &device)?
    };
    let encoded = encode_all(&examples, model.model.as_ref())?;
    let mut optimizer = AdamW::new(model.named_vars(), settings.optimizer.clone())?;
    if start_step > 0 {
        restore(&run, &model, &mut optimizer, start_step, &device)?;
    }
    let cadence = Cadence {
        steps: settings.steps,
        lr: settings.optimizer.lr,
        warmup: settings.warmup,
        min_lr_ratio: settings.min_lr_ratio,
        log_every: settings.log_every,
        save_every: settings.save_every,
        eval: settings.eval.as_ref(),
        eval_every: settings.eval_every,
    };
    let mut stage = Sft {
        lengths: encoded.iter().map(|e| e.ids.len()).collect(),
        batches_per_epoch: encoded.len().div_ceil(settings.batch_size),
        encoded: &encoded,
        model: &model,
        pools: shard_pools(settings.shards)?,
        settings: &settings,
        device: &device,
        epoch_cache: None,
        last_loss: f64::NAN,
        last_grad_norm: 0.0,
        loss_sum: 0.0,
        loss_n: 0,
        tokens: 0,
        step_tokens: 0,
    };
    let seconds = run_stage(
        &run,
        &mut stage,
        &settings,
        &cadence,
        &model,
        &mut optimizer,
        start_step,
    )?;
    if !run.out.join("training").is_dir() {
        std::fs::create_dir_all(run.training()).map_err(io(&run.training()))?;
    }
    Ok(SftSummary {
        steps: settings.steps,
        examples: encoded.len(),
        final_loss: stage.last_loss,
        seconds,
    })
}

/// SFT as a stage of the run loop: a batch's cross-entropy on answer tokens per step.
struct Sft<'a> {
    encoded: &'a [Encoded],
    lengths: Vec<usize>,
    batches_per_epoch: usize,
    model: &'a Trainable,
    pools: Vec<rayon::ThreadPool>,
    settings: &'a SftSettings,
    device: &'a Device,
    epoch_cache: Option<(u64, Vec<Vec<usize>>)>,
    last_loss: f64,
    last_grad_norm: f64,
    loss_sum: f64,
    loss_n: usize,
    tokens: usize,
    step_tokens: usize,
}

impl Stage for Sft<'_> {
    const NAME: &'static str = "sft";
    const CURVE: (&'static str, &'static str) = ("loss", "loss");

    fn gradients(&mut self, step: usize) -> Result<Option<GradStore>> {
        let settings = self.settings;
        let epoch = (step / self.batches_per_epoch) as u64;
        if self.epoch_cache.as_ref().map(|(e, _)| *e) != Some(epoch) {
            self.epoch_cache = Some((
                epoch,
                epoch_batches(&self.lengths, settings.batch_size, settings.seed, epoch),
            ));
        }
        #[expect(clippy::expect_used, reason = "filled just above")]
        let batch_ids =
            &self.epoch_cache.as_ref().expect("set above").1[step % self.batches_per_epoch];
        let members: Vec<&Encoded> = batch_ids.iter().map(|&i| &self.encoded[i]).collect();
        let network = self.model.model.as_ref();
        let pad = network.padding();
        let shards = members
            .chunks(members.len().div_ceil(self.pools.len()))
            .map(|part| make_batch(part, network, pad, self.device))
            .collect::<Result<Vec<_>>>()?;
        let answer_tokens: usize = shards.iter().map(|b| b.answer_tokens).sum();
        let mut loss_value = 0.0;
        let mut grads = None;
        for (loss, shard_grads) in run_shards(&self.pools, &shards, |shard| {
            shard_gradients(self.model, shard, answer_tokens)
        })? {
            loss_value += loss;
            grads = Some(add_gradients(self.model, grads, shard_grads)?);
        }
        self.last_loss = loss_value;
        self.loss_sum += loss_value;
        self.loss_n += 1;
        self.step_tokens = answer_tokens;
        Ok(grads)
    }

    fn stepped(&mut self, grad_norm: f64) {
        self.last_grad_norm = grad_norm;
        self.tokens += self.step_tokens;
    }

    fn message(&self, lr: f64) -> String {
        format!("loss {:.3} lr {lr:.2e}", self.last_loss)
    }

    fn log_line(&mut self, done: usize, lr: f64, seconds: f64) -> Value {
        let line = json!({
            "step": done,
            "epoch": done as f64 / self.batches_per_epoch as f64,
            "loss": self.loss_sum / self.loss_n as f64,
            "lr": lr,
            "grad_norm": self.last_grad_norm,
            "answer_tokens": self.tokens,
            "seconds": seconds,
        });
        (self.loss_sum, self.loss_n, self.tokens) = (0.0, 0, 0);
        line
    }
}

/// One shard's forward and backward pass: its summed answer-token cross-entropy divided by
/// the whole batch's `answer_tokens`, so the shards' losses and gradients add up to the
/// batch's mean.
fn shard_gradients(
    model: &Trainable,
    batch: &Batch,
    answer_tokens: usize,
) -> Result<(f64, GradStore)> {
    let network = model.model.forward();
    let hidden = network.hidden_states(&batch.inputs(), Mode::Train)?;
    let (b, t, d) = hidden.dims3()?;
    let selected = hidden.reshape((b * t, d))?.index_select(&batch.rows, 0)?;
    let logits = network.logits(&selected)?;
    let share = batch.answer_tokens as f64 / answer_tokens as f64;
    let loss = (cross_entropy(&logits, &batch.targets)? * share)?;
    let grads = loss.backward()?;
    Ok((f64::from(loss.to_scalar::<f32>()?), grads))
}
