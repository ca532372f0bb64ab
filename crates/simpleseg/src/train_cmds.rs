//! `train sft` and `train rl`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use simpleseg_train::optim::AdamWConfig;
use simpleseg_train::rl::{train_rl, Algorithm, RlSettings};
use simpleseg_train::run::EvalSpec;
use simpleseg_train::sft::{train_sft, SftSettings, Start};

use crate::options::{at_least_one, fraction};

/// RL objectives.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum AlgorithmArg {
    /// Group Sequence Policy Optimization: one clipped ratio per answer (its tokens' mean
    /// log-ratio).
    Gspo,
    /// Group Relative Policy Optimization: a clipped ratio per token.
    Grpo,
}

#[derive(Subcommand, Debug)]
pub enum TrainCommand {
    Sft(SftArgs),
    Rl(RlArgs),
}

/// Reinforcement learning from an SFT model with an IoU reward: G sampled answers per prompt,
/// group-normalized advantages, GSPO (default) or GRPO, optional KL to the starting model.
#[derive(Args, Debug)]
pub struct RlArgs {
    /// RL data (`simpleseg data rl` output).
    #[arg(long, value_name = "RL.jsonl")]
    data: PathBuf,
    /// Starting model folder (usually the SFT output).
    #[arg(long, value_name = "DIR", required_unless_present = "resume")]
    init: Option<PathBuf>,
    /// Output model folder.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Relative image paths resolve against this (default: the data file's folder).
    #[arg(long, value_name = "DIR")]
    refer_root: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// The policy-gradient objective.
    #[arg(long, value_enum, default_value = "gspo")]
    algorithm: AlgorithmArg,
    /// Optimizer steps to run (a resumed run continues to this count).
    #[arg(long, default_value_t = 300, value_parser = at_least_one)]
    steps: usize,
    /// Prompts per optimizer step.
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    prompts_per_step: usize,
    /// Answers sampled per prompt.
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    group_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-4, value_parser = positive)]
    lr: f64,
    /// Steps of linear warmup from 0 to --lr.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Final learning rate as a fraction of --lr (cosine decay; 1 keeps it constant).
    #[arg(long, default_value_t = 1.0, value_parser = fraction)]
    min_lr_ratio: f64,
    /// Gradients are scaled down to this global L2 norm when larger.
    #[arg(long, default_value_t = 1.0, value_parser = positive)]
    max_grad_norm: f64,
    /// Clip range of the importance ratio (default: 0.0004 for GSPO, 0.2 for GRPO).
    #[arg(long, value_parser = positive)]
    clip_eps: Option<f64>,
    /// Weight of the KL penalty to the starting model.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    kl_coef: f64,
    /// Weight of the squared centroid distance subtracted from the IoU reward.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    centroid_weight: f64,
    /// Added to the reward of an answer with a usable polygon (a format term).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    format_weight: f64,
    /// Points an answer may have before --point-penalty applies per extra point.
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    max_points: Option<usize>,
    /// Subtracted from the reward per point beyond --max-points.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative, requires = "max_points")]
    point_penalty: f64,
    /// Sampling temperature of the answers.
    #[arg(long, default_value_t = 1.0, value_parser = positive)]
    temperature: f64,
    /// Most tokens per sampled answer (a longer answer is cut and scored as it is).
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    max_new_tokens: usize,
    /// Seed of data order and sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Save the model folder and a resumable checkpoint every N steps and at the end (every
    /// tenth is also kept under OUT/training/checkpoints).
    #[arg(long, default_value_t = 10, value_parser = at_least_one)]
    save_every: usize,
    /// Log reward, IoU, parse failures, answer length, KL and gradient norm to
    /// OUT/training/log.jsonl every N steps.
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    log_every: usize,
    /// Threads: each step's prompts are split into this many shards run side by side, one
    /// thread each (default: RAYON_NUM_THREADS, else the number of cores). A resumed run keeps
    /// the count it started with.
    #[arg(long, value_parser = at_least_one)]
    threads: Option<usize>,
    #[command(flatten)]
    eval: EvalDuringArgs,
}

/// Evaluation during training: greedy answers on a split, scored by the eval runner.
#[derive(Args, Debug)]
pub struct EvalDuringArgs {
    /// Refer root of the evaluation split (enables evaluation).
    #[arg(long, value_name = "DIR")]
    eval_refer_root: Option<PathBuf>,
    /// Dataset of the evaluation split (a folder under --eval-refer-root).
    #[arg(long, default_value = "synth")]
    eval_dataset: String,
    /// The evaluation split.
    #[arg(long, default_value = "val")]
    eval_split: String,
    /// Evaluate on the first N samples only.
    #[arg(long, value_parser = at_least_one)]
    eval_limit: Option<usize>,
    /// Evaluate every N steps (and at the end).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// Most tokens per evaluation answer.
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    eval_max_new_tokens: usize,
}

impl EvalDuringArgs {
    fn spec(&self) -> Option<EvalSpec> {
        self.eval_refer_root.as_ref().map(|root| EvalSpec {
            refer_root: root.clone(),
            dataset: self.eval_dataset.clone(),
            split: self.eval_split.clone(),
            limit: self.eval_limit,
            max_new_tokens: self.eval_max_new_tokens,
        })
    }
}

/// Supervised fine-tuning on `data sft` output: cross-entropy on answer tokens, AdamW, warmup
/// and cosine decay, gradient clipping, length-grouped batches, resumable checkpoints. Writes a
/// complete model folder to --out (training state under OUT/training).
#[derive(Args, Debug)]
pub struct SftArgs {
    /// SFT data (.json or .jsonl) as `simpleseg data sft` writes it.
    #[arg(long, value_name = "SFT.json[l]")]
    data: PathBuf,
    /// Model configuration for a fresh model (see configs/); a tokenizer is trained on the
    /// data unless --tokenizer is given.
    #[arg(long, value_name = "MODEL_CONFIG.json", conflicts_with = "init", required_unless_present_any = ["init", "resume"])]
    config: Option<PathBuf>,
    /// Start from an existing model folder instead.
    #[arg(long, value_name = "DIR")]
    init: Option<PathBuf>,
    /// An existing tokenizer.json for a fresh model.
    #[arg(long, value_name = "F")]
    tokenizer: Option<PathBuf>,
    /// Vocabulary size of a trained tokenizer.
    #[arg(long, default_value_t = 1024, value_parser = at_least_one)]
    vocab_size: usize,
    /// Output model folder.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Relative image paths resolve against this (default: the data file's folder).
    #[arg(long, value_name = "DIR")]
    refer_root: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Optimizer steps to run (a resumed run continues to this count).
    #[arg(long, default_value_t = 2000, value_parser = at_least_one)]
    steps: usize,
    /// Examples per optimizer step.
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    batch_size: usize,
    /// Peak learning rate (2e-3 and more did not learn the tiny configuration's text prior).
    #[arg(long, default_value_t = 1e-3, value_parser = positive)]
    lr: f64,
    /// Steps of linear warmup from 0 to --lr (then cosine decay to --min-lr-ratio).
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// Final learning rate as a fraction of --lr.
    #[arg(long, default_value_t = 0.05, value_parser = fraction)]
    min_lr_ratio: f64,
    /// AdamW weight decay (decoupled; norms and biases too).
    #[arg(long, default_value_t = 0.01, value_parser = non_negative)]
    weight_decay: f64,
    /// Gradients are scaled down to this global L2 norm when larger.
    #[arg(long, default_value_t = 1.0, value_parser = positive)]
    max_grad_norm: f64,
    /// Standard deviation of fresh weights. The tiny configuration learns to read positions
    /// from the image only from a larger-than-usual start: with 0.02 its attention stays
    /// uniform and a left/right question stays at chance.
    #[arg(long, default_value_t = 0.08, value_parser = non_negative_f32)]
    init_std: f32,
    /// Standard deviation of the fresh vision tower's weights (default: --init-std).
    #[arg(long, value_parser = non_negative_f32)]
    vision_init_std: Option<f32>,
    /// Seed of initialization, data order and anything else random.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Save the model folder and a resumable checkpoint every N steps and at the end (every
    /// tenth is also kept under OUT/training/checkpoints).
    #[arg(long, default_value_t = 100, value_parser = at_least_one)]
    save_every: usize,
    /// Log loss, learning rate and gradient norm to OUT/training/log.jsonl every N steps.
    #[arg(long, default_value_t = 10, value_parser = at_least_one)]
    log_every: usize,
    /// Threads: each batch is split into this many shards computed side by side, one thread
    /// each (default: RAYON_NUM_THREADS, else the number of cores); a batch of fewer examples
    /// uses fewer threads. A resumed run keeps the count it started with, so that it reaches
    /// the same weights.
    #[arg(long, value_parser = at_least_one)]
    threads: Option<usize>,
    #[command(flatten)]
    eval: EvalDuringArgs,
}

/// Parses a finite number above 0 (a clap value parser).
fn positive(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(_) => Err("must be a finite number above 0".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Parses a finite number of at least 0 (a clap value parser).
fn non_negative(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Ok(_) => Err("must be a finite number of at least 0".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// [`non_negative`] for f32 settings.
fn non_negative_f32(text: &str) -> std::result::Result<f32, String> {
    non_negative(text).map(|v| v as f32)
}

/// The thread count for `--threads`, after which candle's own ops are kept to one thread: the
/// shards are the parallelism, and nested parallel ops slowed them down.
fn take_threads(requested: Option<usize>) -> usize {
    let threads = requested
        .or_else(|| std::env::var("RAYON_NUM_THREADS").ok()?.parse().ok())
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1)
        .max(1);
    // Read by candle before each parallel op and by rayon when its pool starts; no other
    // thread exists yet.
    std::env::set_var("RAYON_NUM_THREADS", "1");
    threads
}

pub fn run(command: TrainCommand) -> Result<()> {
    match command {
        TrainCommand::Sft(a) => {
            let start = match (&a.init, &a.config) {
                (Some(dir), _) => Start::Init { dir: dir.clone() },
                (None, Some(path)) => Start::Config {
                    path: path.clone(),
                    tokenizer: a.tokenizer.clone(),
                    vocab_size: a.vocab_size,
                    init_std: a.init_std,
                    vision_init_std: a.vision_init_std,
                },
                // Resuming: the settings come from the run's state.
                (None, None) => Start::Init { dir: a.out.clone() },
            };
            let settings = SftSettings {
                data: a.data.clone(),
                refer_root: a.refer_root.clone(),
                start,
                steps: a.steps,
                batch_size: a.batch_size,
                warmup: a.warmup,
                min_lr_ratio: a.min_lr_ratio,
                optimizer: AdamWConfig {
                    lr: a.lr,
                    weight_decay: a.weight_decay,
                    max_grad_norm: a.max_grad_norm,
                    ..AdamWConfig::default()
                },
                seed: a.seed,
                save_every: a.save_every,
                log_every: a.log_every,
                eval: a.eval.spec(),
                eval_every: a.eval.eval_every,
                shards: take_threads(a.threads),
            };
            let summary = train_sft(settings, &a.out, a.resume)?;
            println!(
                "trained {} steps on {} examples in {:.0}s; final loss {:.4}; model in {}",
                summary.steps,
                summary.examples,
                summary.seconds,
                summary.final_loss,
                a.out.display()
            );
        }
        TrainCommand::Rl(a) => {
            let algorithm = match a.algorithm {
                AlgorithmArg::Gspo => Algorithm::Gspo,
                AlgorithmArg::Grpo => Algorithm::Grpo,
            };
            let settings = RlSettings {
                data: a.data.clone(),
                refer_root: a.refer_root.clone(),
                init: a.init.clone().unwrap_or_else(|| a.out.clone()),
                algorithm,
                steps: a.steps,
                prompts_per_step: a.prompts_per_step,
                group_size: a.group_size,
                warmup: a.warmup,
                min_lr_ratio: a.min_lr_ratio,
                optimizer: AdamWConfig {
                    lr: a.lr,
                    weight_decay: 0.0,
                    max_grad_norm: a.max_grad_norm,
                    ..AdamWConfig::default()
                },
                clip_eps: a.clip_eps.unwrap_or(match algorithm {
                    Algorithm::Gspo => 4e-4,
                    Algorithm::Grpo => 0.2,
                }),
                kl_coef: a.kl_coef,
                centroid_weight: a.centroid_weight,
                format_weight: a.format_weight,
                max_points: a.max_points,
                point_penalty: a.point_penalty,
                temperature: a.temperature,
                max_new_tokens: a.max_new_tokens,
                seed: a.seed,
                save_every: a.save_every,
                log_every: a.log_every,
                eval: a.eval.spec(),
                eval_every: a.eval.eval_every,
                shards: take_threads(a.threads),
            };
            let summary = train_rl(settings, &a.out, a.resume)?;
            println!(
                "trained {} RL steps in {:.0}s; mean reward of the last step {:.3}; model in {}",
                summary.steps,
                summary.seconds,
                summary.mean_reward_last,
                a.out.display()
            );
        }
    }
    Ok(())
}
