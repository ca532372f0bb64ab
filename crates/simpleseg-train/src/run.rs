//! What SFT and RL runs share: the output folder layout, checkpoints that resume exactly,
//! the JSON lines log, the loss curve, and evaluation of the current weights.
//!
//! ```text
//! OUT/                      a complete Hugging Face model folder (the latest weights)
//! OUT/training/state.json   step, settings and data the run was started with
//! OUT/training/resume-NNNNNN.{model,optimizer}.safetensors   what that step resumes from
//! OUT/training/log.jsonl    one line per logged step
//! OUT/training/loss.png     the loss curve
//! OUT/training/checkpoints/step-NNNNNN/model.safetensors
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, D};
use indicatif::{ProgressBar, ProgressStyle};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::Value;
use simpleseg_core::limits::{read_text_file_bounded, Limit};
use simpleseg_core::templates::DEFAULT_PROMPT;
use simpleseg_core::{CoordMode, ParseMode};
use simpleseg_data::items::refer_items;
use simpleseg_data::ReferDataset;
use simpleseg_engine::{load, HfFolder, LoadOptions};
use simpleseg_eval::backends::LocalBackend;
use simpleseg_eval::metrics::BoxSource;
use simpleseg_eval::runner::{self, EvalConfig, Report, Task};

use crate::error::{io, Error, Result};
use crate::folder::write_weights;
use crate::optim::{lr_at, AdamW};
use crate::params::{load_safetensors, save_safetensors, Trainable};
use crate::plot::plot_curve;

/// Paths of a run's output folder.
#[derive(Clone, Debug)]
pub struct RunDir {
    pub out: PathBuf,
}

impl RunDir {
    pub fn new(out: &Path) -> Self {
        RunDir {
            out: out.to_path_buf(),
        }
    }
    pub fn training(&self) -> PathBuf {
        self.out.join("training")
    }
    pub fn state(&self) -> PathBuf {
        self.training().join("state.json")
    }
    pub fn log(&self) -> PathBuf {
        self.training().join("log.jsonl")
    }
    pub fn plot(&self) -> PathBuf {
        self.training().join("loss.png")
    }
    /// True when a resumable run is there.
    pub fn has_state(&self) -> bool {
        self.state().is_file()
    }
}

/// Progress a checkpoint records.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State<C> {
    /// Optimizer steps done.
    pub step: usize,
    /// The settings the run started with; a resumed run keeps them.
    pub settings: C,
}

/// Opens a run in `run`: a new one, refused where a run is already (unless `resume`), or the
/// one there to resume, refused where there is none. Returns the settings to run with (a
/// resumed run keeps those it started with) and the step to start from.
pub fn open_run<S: DeserializeOwned>(
    run: &RunDir,
    settings: S,
    resume: bool,
) -> Result<(S, usize)> {
    let out = run.out.display();
    match (resume, run.has_state()) {
        (true, true) => {
            let state: State<S> = read_state(run)?;
            Ok((state.settings, state.step))
        }
        (true, false) => Err(Error::Invalid(format!("{out} holds no run to resume"))),
        (false, true) => Err(Error::Invalid(format!(
            "{out} already holds a run; pass --resume to continue it or choose another --out"
        ))),
        (false, false) => Ok((settings, 0)),
    }
}

/// When a run steps, logs, saves and evaluates.
#[derive(Clone, Debug)]
pub struct Cadence<'a> {
    pub steps: usize,
    /// Peak learning rate, warmup steps and the floor of the cosine decay (a ratio of the peak).
    pub lr: f64,
    pub warmup: usize,
    pub min_lr_ratio: f64,
    pub log_every: usize,
    pub save_every: usize,
    pub eval: Option<&'a EvalSpec>,
    pub eval_every: usize,
}

/// A training stage (SFT, RL): what it does at each step. The loop around it, the same for
/// every stage, is [`run_stage`].
pub trait Stage {
    /// Its name on the progress bar.
    const NAME: &'static str;
    /// The curve its plot shows: the log key, and the plot's title.
    const CURVE: (&'static str, &'static str);
    /// The gradients of step `step` (`None`: nothing to learn at this step).
    fn gradients(&mut self, step: usize) -> Result<Option<GradStore>>;
    /// After the optimizer step: the gradients' norm (0 without gradients).
    fn stepped(&mut self, grad_norm: f64);
    /// What the progress bar says after a step at learning rate `lr`.
    fn message(&self, lr: f64) -> String;
    /// The log line of the steps since the last line, the stage's sums then reset.
    fn log_line(&mut self, done: usize, lr: f64, seconds: f64) -> Value;
}

/// Runs `stage` from `start_step` to the cadence's end: each step its gradients, the
/// optimizer at the scheduled learning rate, then logs, checkpoints (with the loss curve) and
/// evaluations when due. `settings` is what each checkpoint records. Returns the seconds the
/// steps took.
pub fn run_stage<St: Stage, S: Serialize + Clone>(
    run: &RunDir,
    stage: &mut St,
    settings: &S,
    cadence: &Cadence,
    model: &Trainable,
    optimizer: &mut AdamW,
    start_step: usize,
) -> Result<f64> {
    let mut log = Log::open(run, start_step)?;
    let bar = ProgressBar::new(cadence.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {} [{{bar:40}}] {{pos}}/{{len}} {{msg}} (eta {{eta}})",
            St::NAME
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_position(start_step as u64);
    let started = Instant::now();
    for step in start_step..cadence.steps {
        let grads = stage.gradients(step)?;
        let lr = lr_at(
            step,
            cadence.lr,
            cadence.warmup,
            cadence.steps,
            cadence.min_lr_ratio,
        );
        let grad_norm = match grads {
            None => 0.0,
            Some(grads) => optimizer.step(&grads, lr)?.grad_norm,
        };
        stage.stepped(grad_norm);
        let done = step + 1;
        let last = done == cadence.steps;
        bar.set_position(done as u64);
        bar.set_message(stage.message(lr));
        if done % cadence.log_every == 0 || last {
            log.write(&stage.log_line(done, lr, started.elapsed().as_secs_f64()))?;
        }
        if done % cadence.save_every == 0 || last {
            let state = State {
                step: done,
                settings: settings.clone(),
            };
            let keep = last || done % (cadence.save_every * 10) == 0;
            save_checkpoint(run, model, optimizer, &state, keep)?;
            plot_curve(&run.plot(), St::CURVE.1, &log.series(St::CURVE.0)?)?;
        }
        if let Some(spec) = cadence.eval {
            if cadence.eval_every > 0 && (done % cadence.eval_every == 0 || last) {
                bar.suspend(|| -> Result<()> {
                    let report = evaluate(run, spec, done)?;
                    log.write(&json!({"step": done, "eval_split": spec.split, "giou": report.giou, "ciou": report.ciou, "parse_failures": report.parse_failures, "n": report.n}))?;
                    eprintln!("step {done}: {} {} gIoU {:.3} cIoU {:.3} ({} of {} unparseable)", spec.dataset, spec.split, report.giou, report.ciou, report.parse_failures, report.n);
                    Ok(())
                })?;
            }
        }
    }
    bar.finish_and_clear();
    Ok(started.elapsed().as_secs_f64())
}

/// The weights and optimizer moments a checkpoint of `step` resumes from.
fn resume_files(run: &RunDir, step: usize) -> (PathBuf, PathBuf) {
    let t = run.training();
    (
        t.join(format!("resume-{step:06}.model.safetensors")),
        t.join(format!("resume-{step:06}.optimizer.safetensors")),
    )
}

/// Saves a checkpoint. The resume files of step N are written completely before `state.json`
/// names step N, and older ones are removed only after, so a run killed at any moment resumes
/// from a consistent checkpoint. Then the folder's `model.safetensors` is updated for users.
pub fn save_checkpoint<C: Serialize>(
    run: &RunDir,
    model: &Trainable,
    optimizer: &AdamW,
    state: &State<C>,
    keep: bool,
) -> Result<()> {
    std::fs::create_dir_all(run.training()).map_err(io(&run.training()))?;
    let (weights, moments) = resume_files(run, state.step);
    save_safetensors(&weights, &model.tensors())?;
    save_safetensors(&moments, &optimizer.state())?;
    let tmp = run.state().with_extension("json.tmp");
    #[expect(
        clippy::expect_used,
        reason = "the state is plain data, which always serializes"
    )]
    let text = serde_json::to_string_pretty(state).expect("JSON");
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, run.state()).map_err(io(&run.state()))?;
    for entry in std::fs::read_dir(run.training())
        .map_err(io(&run.training()))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("resume-") && !name.starts_with(&format!("resume-{:06}.", state.step)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    if keep {
        let dir = run
            .training()
            .join(format!("checkpoints/step-{:06}", state.step));
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        save_safetensors(&dir.join("model.safetensors"), &model.tensors())?;
    }
    write_weights(&run.out, model)
}

/// Reads a run's state.
pub fn read_state<C: for<'de> Deserialize<'de>>(run: &RunDir) -> Result<State<C>> {
    let path = run.state();
    let text = read_text_file_bounded(&path, Limit::DataBytes)?;
    serde_json::from_str(&text).map_err(|e| Error::BadFile {
        path,
        message: e.to_string(),
    })
}

/// Restores weights and optimizer moments of the checkpoint of `step`.
pub fn restore(
    run: &RunDir,
    model: &Trainable,
    optimizer: &mut AdamW,
    step: usize,
    device: &Device,
) -> Result<()> {
    let (weights, moments) = resume_files(run, step);
    model.set_all(&load_safetensors(&weights, device)?)?;
    optimizer.load_state(&load_safetensors(&moments, device)?, step)
}

/// Appends log lines; on resume, drops lines past the resumed step.
pub struct Log {
    file: std::fs::File,
    path: PathBuf,
}

impl Log {
    pub fn open(run: &RunDir, resumed_step: usize) -> Result<Self> {
        let path = run.log();
        std::fs::create_dir_all(run.training()).map_err(io(&run.training()))?;
        if path.is_file() {
            let text = read_text_file_bounded(&path, Limit::DataBytes)?;
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s as usize <= resumed_step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(&path, kept).map_err(io(&path))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        Ok(Log { file, path })
    }

    pub fn write(&mut self, line: &Value) -> Result<()> {
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(io(&self.path))
    }

    /// `(step, value)` of a key over the whole log.
    pub fn series(&self, key: &str) -> Result<Vec<(f64, f64)>> {
        let text = read_text_file_bounded(&self.path, Limit::DataBytes)?;
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| Some((v["step"].as_f64()?, v[key].as_f64()?)))
            .collect())
    }
}

/// Mean cross-entropy of `logits` `(n, vocab)` against `targets` `(n,)`, differentiable.
///
/// Not `candle_nn::loss::cross_entropy`: that one differentiates through the max it subtracts
/// and scales by a reciprocal, which moves gradient norms in the seventh digit (2.9177452 loss,
/// grad norm 6.5566089 vs 6.5566086 at step 1 of a tiny-model run) and so every later step.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = log_softmax(logits)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?;
    Ok(picked.neg()?.mean_all()?)
}

/// `log_softmax` over the last dimension from differentiable primitives.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Where and how to evaluate during training.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalSpec {
    pub refer_root: PathBuf,
    pub dataset: String,
    pub split: String,
    pub limit: Option<usize>,
    pub max_new_tokens: usize,
}

/// Scores the weights saved in `run.out` with the evaluation runner (greedy, robust parsing).
pub fn evaluate(run: &RunDir, spec: &EvalSpec, step: usize) -> Result<Report> {
    let ds = ReferDataset::load(&spec.refer_root, &spec.dataset, None, None)?;
    let items = refer_items(&ds, &spec.split)?;
    let model = load(&run.out, &LoadOptions::default())?;
    let mut config = model.generation_config().clone();
    config.max_new_tokens = spec.max_new_tokens;
    config.do_sample = false;
    let files = HfFolder::open(&run.out)?.fingerprint()?;
    let backend = LocalBackend::new(model, config, run.out.display().to_string(), files);
    let eval = EvalConfig {
        dataset: spec.dataset.clone(),
        split: spec.split.clone(),
        task: Task::Res,
        mode: ParseMode::Robust,
        coords: CoordMode::Normalized,
        box_source: BoxSource::Mask,
        prompt_template: DEFAULT_PROMPT.into(),
        sample: false,
        seed: 0,
        limit: spec.limit,
        data: ds.identity()?,
    };
    let out = run.training().join(format!(
        "eval-{}-{}-step-{step:06}",
        spec.dataset, spec.split
    ));
    Ok(runner::run(&items, &backend, &eval, 1, &out, true)?)
}

/// The shard count of a run saved before runs had one: one shard, as those runs computed.
pub(crate) fn one_shard() -> usize {
    1
}

/// One single-thread pool per shard of a step's work. A tiny model's ops are too small for
/// candle to spread one pass over several cores (with two threads an SFT step took as long as
/// with one), while shards side by side, each on one thread, ran it 1.9 times as fast.
pub fn shard_pools(shards: usize) -> Result<Vec<rayon::ThreadPool>> {
    (0..shards.max(1))
        .map(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Invalid(format!("cannot start the training threads: {e}")))
}

/// `work` on every shard at once, shard `i` on `pools[i]` (at most `pools.len()` shards);
/// the results in shard order.
pub fn run_shards<T: Sync, R: Send>(
    pools: &[rayon::ThreadPool],
    shards: &[T],
    work: impl Fn(&T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    assert!(shards.len() <= pools.len(), "more shards than threads");
    std::thread::scope(|scope| {
        let running: Vec<_> = shards
            .iter()
            .zip(pools)
            .map(|(shard, pool)| {
                let work = &work;
                scope.spawn(move || pool.install(|| work(shard)))
            })
            .collect();
        running
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// `acc + more`, variable by variable (`more` alone when `acc` is `None`).
pub fn add_gradients(
    model: &Trainable,
    acc: Option<GradStore>,
    more: GradStore,
) -> Result<GradStore> {
    let Some(mut acc) = acc else {
        return Ok(more);
    };
    for (_, var) in model.named_vars() {
        let Some(g) = more.get(var.as_tensor()) else {
            continue;
        };
        let sum = match acc.get(var.as_tensor()) {
            Some(a) => (a + g)?,
            None => g.clone(),
        };
        acc.insert(var.as_tensor(), sum);
    }
    Ok(acc)
}
