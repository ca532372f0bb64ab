//! Reinforcement learning with an IoU reward.
//!
//! Each step takes a few prompts, samples a group of G answers for each from the current model
//! (one prefill, then the group decoded together through the engine's KV-cached session), and
//! rewards every answer with the IoU between the union mask of its polygons (robust parsing)
//! and the ground truth: 0 for an answer without a usable polygon, optionally minus a weighted
//! squared distance between the predicted and true mask centroids. Advantages are the rewards
//! normalized within their group. The policy gradient is GSPO's (a clipped sequence-level
//! importance ratio, the geometric mean of the token ratios) or GRPO's (clipped token-level
//! ratios), with an optional KL penalty to the starting model (the k3 estimator).

use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, D};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use simpleseg_core::images::open_image;
use simpleseg_core::limits::{read_text_file_bounded, Limit};
pub use simpleseg_core::reward::{centroid, reward, Reward, RewardOptions};
use simpleseg_core::segment::Target;
use simpleseg_core::RleMask;
use simpleseg_engine::io::hf::HfFolder;
use simpleseg_engine::layers::Mode;
use simpleseg_engine::models::training::{Forward, TrainBatch};
use simpleseg_engine::registry;
use simpleseg_engine::runtime::generator::Generator;
use simpleseg_engine::runtime::model::Sessions;
use simpleseg_engine::runtime::segment::{SegmentJob, SegmentOptions};
use simpleseg_engine::{GenerationConfig, Prompt};

use crate::error::{Error, Result};
use crate::optim::{AdamW, AdamWConfig};
use crate::params::Trainable;
use crate::run::{
    add_gradients, log_softmax, open_run, restore, run_shards, run_stage, shard_pools, Cadence,
    EvalSpec, RunDir, Stage,
};

/// The policy-gradient objective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Group Sequence Policy Optimization: sequence-level ratio, clipped.
    Gspo,
    /// Group Relative Policy Optimization: token-level ratios, clipped.
    Grpo,
}

/// Settings of an RL run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RlSettings {
    pub data: PathBuf,
    pub refer_root: Option<PathBuf>,
    pub init: PathBuf,
    pub algorithm: Algorithm,
    pub steps: usize,
    /// Prompts per step.
    pub prompts_per_step: usize,
    /// Answers sampled per prompt.
    pub group_size: usize,
    pub warmup: usize,
    pub min_lr_ratio: f64,
    pub optimizer: AdamWConfig,
    /// Clip range of the importance ratio (GSPO uses a small one, GRPO about 0.2).
    pub clip_eps: f64,
    /// Weight of the KL penalty to the starting model (0 disables it).
    pub kl_coef: f64,
    /// Weight of the centroid-distance term (0 disables it).
    pub centroid_weight: f64,
    /// Added to the reward of an answer with a usable polygon (0 disables it).
    #[serde(default)]
    pub format_weight: f64,
    /// Points allowed before `point_penalty` is subtracted per extra point.
    #[serde(default)]
    pub max_points: Option<usize>,
    #[serde(default)]
    pub point_penalty: f64,
    pub temperature: f64,
    pub max_new_tokens: usize,
    pub seed: u64,
    pub save_every: usize,
    pub log_every: usize,
    pub eval: Option<EvalSpec>,
    pub eval_every: usize,
    /// Each step's prompts are split into this many shards, run at once on one thread each;
    /// as for SFT, a resumed run keeps the count it started with.
    #[serde(default = "crate::run::one_shard")]
    pub shards: usize,
}

/// One RL prompt: a line of `data rl` output.
#[derive(Clone, Debug)]
pub struct RlExample {
    pub image: PathBuf,
    pub prompt: String,
    pub gt: RleMask,
}

/// Reads `data rl` output; relative image paths resolve against `root` (default: the file's
/// folder).
pub fn read_rl(path: &Path, root: Option<&Path>) -> Result<Vec<RlExample>> {
    let text = read_text_file_bounded(path, Limit::DataBytes)?;
    let root = root.map_or_else(
        || path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        Path::to_path_buf,
    );
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            let bad = |m: String| Error::BadFile {
                path: path.to_path_buf(),
                message: format!("line {}: {m}", i + 1),
            };
            let v: Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
            let image = v["image"]
                .as_str()
                .ok_or_else(|| bad("missing \"image\"".into()))?;
            let image = Path::new(image);
            Ok(RlExample {
                image: if image.is_absolute() {
                    image.to_path_buf()
                } else {
                    root.join(image)
                },
                prompt: v["prompt"]
                    .as_str()
                    .ok_or_else(|| bad("missing \"prompt\"".into()))?
                    .to_string(),
                gt: RleMask::from_json_value(&v["rle"])
                    .map_err(|m| bad(format!("bad \"rle\": {m}")))?,
            })
        })
        .collect()
}

impl RlSettings {
    /// The reward's shaping.
    pub fn reward_options(&self) -> RewardOptions {
        RewardOptions {
            centroid_weight: self.centroid_weight,
            format_weight: self.format_weight,
            max_points: self.max_points,
            point_penalty: self.point_penalty,
            ..RewardOptions::default()
        }
    }
}

/// Group-normalized advantages: `(r - mean) / (std + 1e-4)`; all zero for a constant group.
pub fn advantages(rewards: &[f64]) -> Vec<f64> {
    let n = rewards.len() as f64;
    let mean = rewards.iter().sum::<f64>() / n;
    let std = (rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt();
    if std < 1e-8 {
        return vec![0.0; rewards.len()];
    }
    rewards.iter().map(|r| (r - mean) / (std + 1e-4)).collect()
}

/// Samples `g` answers to one prompt from `model`, decoded together (the engine's decoding
/// loop, the group kept whole until every answer ends); returns the token ids of each answer
/// (end token included when generated).
fn sample_group(
    model: &dyn Sessions,
    prompt: &Prompt,
    g: usize,
    config: &GenerationConfig,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    let rows = (0..g)
        .map(|i| {
            let config = GenerationConfig {
                seed: seed.wrapping_mul(31).wrapping_add(i as u64),
                ..config.clone()
            };
            (i, config)
        })
        .collect();
    let pad = config.eos_token_ids.first().copied().unwrap_or_default();
    let mut generator = Generator::new(model).keep_finished(pad);
    generator.add(prompt, rows, None)?;
    let mut finished = generator.run(&mut ())?;
    finished.sort_by_key(|f| f.tag);
    Ok(finished
        .into_iter()
        .map(|f| f.tokens.into_iter().chain(f.stop_token).collect())
        .collect())
}

/// Log-probabilities of each answer's tokens under `model`, teacher-forced: a `(g, max_len)`
/// tensor and the mask of real (non-padding) answer tokens.
fn answer_logprobs(
    model: &dyn Forward,
    prompt: &Prompt,
    answers: &[Vec<u32>],
    pad: u32,
    mode: Mode,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let g = answers.len();
    let p = prompt.input_ids.len();
    let max_len = answers.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let sequences: Vec<Vec<u32>> = answers
        .iter()
        .map(|a| prompt.input_ids.iter().chain(a).copied().collect())
        .collect();
    let mut mask = Vec::with_capacity(g * max_len);
    let mut targets = Vec::with_capacity(g * max_len);
    for a in answers {
        for k in 0..max_len {
            targets.push(a.get(k).copied().unwrap_or(pad));
            mask.push(if k < a.len() { 1f32 } else { 0.0 });
        }
    }
    // Every answer shows the prompt's one image: one vision pass, repeated.
    let batch = TrainBatch {
        ids: sequences.iter().map(Vec::as_slice).collect(),
        pad,
        min_len: p + max_len,
        images: &prompt.images,
        image_of: vec![0; g],
    };
    let hidden = model.hidden_states(&batch, mode)?;
    // Positions p-1 .. p+max_len-2 predict the answer tokens.
    let hidden = hidden.narrow(1, p - 1, max_len)?;
    let logits = model.logits(&hidden)?;
    let logp = log_softmax(&logits)?;
    let targets = Tensor::from_vec(targets, (g, max_len, 1), device)?;
    let picked = logp.gather(&targets, D::Minus1)?.squeeze(D::Minus1)?;
    Ok((picked, Tensor::from_vec(mask, (g, max_len), device)?))
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize)]
pub struct RlSummary {
    pub steps: usize,
    pub mean_reward_last: f64,
    pub seconds: f64,
}

/// What one prompt's part of an RL step reads.
struct PromptContext<'a> {
    model: &'a Trainable,
    reference: Option<&'a dyn Forward>,
    sampling: &'a GenerationConfig,
    settings: &'a RlSettings,
    pad: u32,
    device: &'a Device,
}

/// One prompt's answers: `(reward, iou, parsed, length)` each, and the KL to the reference.
struct PromptOutcome {
    answers: Vec<(f64, f64, bool, usize)>,
    kl: f64,
}

impl PromptContext<'_> {
    /// Samples a group of answers to `ex`, scores them, and returns the prompt's loss (`None`
    /// when every answer scored the same: no advantage, nothing to learn).
    fn run(&self, ex: &RlExample, seed: u64) -> Result<(PromptOutcome, Option<Tensor>)> {
        let (settings, device, pad) = (self.settings, self.device, self.pad);
        let model = self.model.model.as_ref();
        // The segmentation pipeline's question and prompt; the reward reads the answers.
        let job = SegmentJob::new(
            model.prompts(),
            &open_image(&ex.image)?,
            &Target::Question(ex.prompt.clone()),
            &SegmentOptions::default(),
        )?;
        let prompt = job.prompt;
        let answers = sample_group(
            model.sessions(),
            &prompt,
            settings.group_size,
            self.sampling,
            seed,
        )?;
        let mut outcome = PromptOutcome {
            answers: Vec::with_capacity(answers.len()),
            kl: 0.0,
        };
        let mut rewards = Vec::with_capacity(answers.len());
        for a in &answers {
            let text = model.tokenizer().decode(a)?;
            let Reward {
                reward: r,
                iou,
                parsed,
                ..
            } = reward(&text, &ex.gt, &settings.reward_options());
            rewards.push(r);
            outcome.answers.push((r, iou, parsed, a.len()));
        }
        let adv = advantages(&rewards);
        if adv.iter().all(|a| *a == 0.0) {
            return Ok((outcome, None));
        }
        let (logp, mask) =
            answer_logprobs(model.forward(), &prompt, &answers, pad, Mode::Train, device)?;
        let old = logp.detach();
        let lengths = mask.sum(1)?.clamp(1.0, f64::INFINITY)?;
        let adv_t = Tensor::from_vec(
            adv.iter().map(|&a| a as f32).collect::<Vec<_>>(),
            answers.len(),
            device,
        )?;
        let (lo, hi) = (1.0 - settings.clip_eps, 1.0 + settings.clip_eps);
        let objective = match settings.algorithm {
            Algorithm::Gspo => {
                let log_ratio = ((&logp - &old)? * &mask)?.sum(1)?.div(&lengths)?;
                let ratio = log_ratio.exp()?;
                let unclipped = (&ratio * &adv_t)?;
                let clipped = (ratio.clamp(lo, hi)? * &adv_t)?;
                unclipped.minimum(&clipped)?
            }
            Algorithm::Grpo => {
                let ratio = (&logp - &old)?.exp()?;
                let a = adv_t.unsqueeze(1)?.broadcast_as(ratio.shape())?;
                let unclipped = (&ratio * &a)?;
                let clipped = (ratio.clamp(lo, hi)? * &a)?;
                (unclipped.minimum(&clipped)? * &mask)?
                    .sum(1)?
                    .div(&lengths)?
            }
        };
        let mut loss = objective.mean_all()?.neg()?;
        if let Some(reference) = self.reference {
            let (ref_logp, _) =
                answer_logprobs(reference, &prompt, &answers, pad, Mode::Infer, device)?;
            let diff = (ref_logp.detach() - &logp)?;
            let k3 = ((diff.exp()? - &diff)? - 1.0)?;
            let kl = (k3 * &mask)?.sum(1)?.div(&lengths)?.mean_all()?;
            outcome.kl = f64::from(kl.to_scalar::<f32>()?);
            loss = (loss + (kl * settings.kl_coef)?)?;
        }
        Ok((outcome, Some(loss)))
    }
}

/// Runs (or, with `resume`, continues) RL into `out`.
pub fn train_rl(settings: RlSettings, out: &Path, resume: bool) -> Result<RlSummary> {
    let device = Device::Cpu;
    let run = RunDir::new(out);
    let (settings, start_step) = open_run(&run, settings, resume)?;
    if settings.group_size < 2 {
        return Err(Error::Invalid(
            "--group-size must be at least 2 (advantages compare answers within a group)".into(),
        ));
    }
    let examples = read_rl(&settings.data, settings.refer_root.as_deref())?;
    if examples.is_empty() {
        return Err(Error::Invalid(format!(
            "{} holds no examples",
            settings.data.display()
        )));
    }
    let init = HfFolder::open(&settings.init)?;
    let model = Trainable::from_folder(&init, &device)?;
    if start_step == 0 {
        model.model.write_metadata(out, 512)?;
    }
    let reference = if settings.kl_coef > 0.0 {
        Some((registry::training(&init)?.frozen)(&init, &device)?)
    } else {
        None
    };
    let mut optimizer = AdamW::new(model.named_vars(), settings.optimizer.clone())?;
    if start_step > 0 {
        restore(&run, &model, &mut optimizer, start_step, &device)?;
    }
    let sampling = GenerationConfig {
        do_sample: true,
        temperature: settings.temperature,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens: settings.max_new_tokens,
        eos_token_ids: vec![model.model.end_of_turn()],
        ..GenerationConfig::default()
    };
    let per_epoch = examples.len() / settings.prompts_per_step;
    if per_epoch == 0 {
        return Err(Error::Invalid(
            "fewer examples than --prompts-per-step".into(),
        ));
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
    let mut stage = Rl {
        examples: &examples,
        per_epoch,
        pools: shard_pools(settings.shards)?,
        context: PromptContext {
            model: &model,
            reference: reference.as_deref(),
            sampling: &sampling,
            settings: &settings,
            pad: model.model.padding(),
            device: &device,
        },
        order_cache: None,
        stats: Stats::default(),
        last_reward: f64::NAN,
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
    Ok(RlSummary {
        steps: settings.steps,
        mean_reward_last: stage.last_reward,
        seconds,
    })
}

/// RL as a stage of the run loop: each step samples groups of answers to some prompts and
/// scores them.
struct Rl<'a> {
    examples: &'a [RlExample],
    per_epoch: usize,
    pools: Vec<rayon::ThreadPool>,
    context: PromptContext<'a>,
    order_cache: Option<(usize, Vec<usize>)>,
    stats: Stats,
    last_reward: f64,
}

impl Stage for Rl<'_> {
    const NAME: &'static str = "rl";
    const CURVE: (&'static str, &'static str) =
        ("reward", "reward (mean IoU of the sampled answers)");

    fn gradients(&mut self, step: usize) -> Result<Option<GradStore>> {
        let settings = self.context.settings;
        let epoch = step / self.per_epoch;
        if self.order_cache.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut order: Vec<usize> = (0..self.examples.len()).collect();
            order.shuffle(&mut StdRng::seed_from_u64(
                settings.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ));
            self.order_cache = Some((epoch, order));
        }
        #[expect(clippy::expect_used, reason = "filled just above")]
        let order = &self.order_cache.as_ref().expect("set above").1;
        let at = (step % self.per_epoch) * settings.prompts_per_step;
        let picked: Vec<(usize, usize)> = order[at..at + settings.prompts_per_step]
            .iter()
            .copied()
            .enumerate()
            .collect();
        let chunks: Vec<&[(usize, usize)]> = picked
            .chunks(picked.len().div_ceil(self.pools.len()))
            .collect();
        let (context, examples) = (&self.context, self.examples);
        let shards = run_shards(&self.pools, &chunks, |chunk| {
            let mut outcomes = Vec::with_capacity(chunk.len());
            let mut losses = Vec::new();
            for &(k, idx) in chunk.iter() {
                let seed = settings
                    .seed
                    .wrapping_mul(1_000_003)
                    .wrapping_add((step * 1000 + k) as u64);
                let (outcome, loss) = context.run(&examples[idx], seed)?;
                outcomes.push(outcome);
                losses.extend(loss);
            }
            let grads = if losses.is_empty() {
                None
            } else {
                Some(Tensor::stack(&losses, 0)?.sum_all()?.backward()?)
            };
            Ok((outcomes, grads))
        })?;
        let mut step_rewards = Vec::new();
        let mut grads = None;
        for (outcomes, shard_grads) in shards {
            for outcome in outcomes {
                for &(r, iou, parsed, length) in &outcome.answers {
                    self.stats.add(r, iou, parsed, length);
                    step_rewards.push(r);
                }
                self.stats.kl += outcome.kl;
            }
            if let Some(g) = shard_grads {
                grads = Some(add_gradients(self.context.model, grads, g)?);
            }
        }
        self.last_reward = step_rewards.iter().sum::<f64>() / step_rewards.len().max(1) as f64;
        Ok(grads)
    }

    fn stepped(&mut self, grad_norm: f64) {
        self.stats.grad_norm += grad_norm;
        self.stats.steps += 1;
    }

    fn message(&self, _lr: f64) -> String {
        format!("reward {:.3}", self.last_reward)
    }

    fn log_line(&mut self, done: usize, lr: f64, seconds: f64) -> Value {
        std::mem::take(&mut self.stats).line(done, lr, seconds)
    }
}

/// Running sums between log lines.
#[derive(Default)]
struct Stats {
    answers: usize,
    reward: f64,
    iou: f64,
    failures: usize,
    length: usize,
    kl: f64,
    grad_norm: f64,
    steps: usize,
}

impl Stats {
    fn add(&mut self, reward: f64, iou: f64, parsed: bool, length: usize) {
        self.answers += 1;
        self.reward += reward;
        self.iou += iou;
        self.failures += usize::from(!parsed);
        self.length += length;
    }

    fn line(&self, step: usize, lr: f64, seconds: f64) -> Value {
        let n = self.answers.max(1) as f64;
        let s = self.steps.max(1) as f64;
        json!({
            "step": step,
            "reward": self.reward / n,
            "iou": self.iou / n,
            "parse_failure_rate": self.failures as f64 / n,
            "answer_tokens": self.length as f64 / n,
            "kl": self.kl / s,
            "grad_norm": self.grad_norm / s,
            "lr": lr,
            "seconds": seconds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewards_and_advantages() {
        let gt = RleMask::from_row_major(&[1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 4, 4)
            .unwrap();
        let options = RewardOptions::default();
        let r = reward(
            "[[[0.0, 0.0], [0.5, 0.0], [0.5, 0.5], [0.0, 0.5]]]",
            &gt,
            &options,
        );
        assert!(r.parsed && r.iou > 0.0 && r.reward == r.iou);
        let none = reward("nothing", &gt, &options);
        assert_eq!((none.reward, none.iou, none.parsed), (0.0, 0.0, false));
        // Truncated answers still score in robust mode.
        assert!(reward("[[[0.0, 0.0], [0.5, 0.0], [0.5, 0.5], [0.0", &gt, &options).parsed);
        let a = advantages(&[1.0, 0.0, 0.5, 0.5]);
        assert!(a[0] > 0.0 && a[1] < 0.0 && a[2].abs() < 1e-12);
        assert_eq!(advantages(&[0.3, 0.3]), vec![0.0, 0.0]);
        assert_eq!(centroid(&gt), Some((0.25, 0.25)));
    }
}
