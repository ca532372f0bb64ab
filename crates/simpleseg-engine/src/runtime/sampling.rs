//! Decoding settings and the next-token choice, as transformers' `generate()` applies them:
//! repetition penalty over every previous token (prompt included), OpenAI's presence and
//! frequency penalties over the answer's tokens (as vLLM applies them), then, when sampling,
//! temperature, top-k and top-p, and a draw from the resulting distribution.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::io::hf::HfFolder;

/// The smallest sampling temperature (vLLM treats smaller ones as greedy).
pub const MIN_TEMPERATURE: f32 = 1e-5;

/// Decoding settings. Defaults are transformers' when `generation_config.json` says nothing,
/// except `max_new_tokens`, which follows the official SimpleSeg example (512).
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    pub do_sample: bool,
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub repetition_penalty: f64,
    /// OpenAI's: subtracted from the logit of every token the answer already has.
    pub presence_penalty: f64,
    /// OpenAI's: subtracted once per occurrence in the answer so far.
    pub frequency_penalty: f64,
    pub max_new_tokens: usize,
    /// Stop tokens; generation also stops on `<|im_end|>` when the tokenizer has it.
    pub eos_token_ids: Vec<u32>,
    pub seed: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            max_new_tokens: 512,
            eos_token_ids: Vec::new(),
            seed: 0,
        }
    }
}

impl GenerationConfig {
    /// Reads `generation_config.json` if the folder has one.
    pub fn load(folder: &HfFolder) -> Result<Self> {
        let mut config = GenerationConfig::default();
        let Some(file) = folder.optional_json("generation_config.json")? else {
            return Ok(config);
        };
        config.do_sample = file.bool_or(&["do_sample"], config.do_sample)?;
        config.temperature = file.f64_or(&["temperature"], config.temperature)?;
        config.top_k = file.usize_or(&["top_k"], config.top_k)?;
        config.top_p = file.f64_or(&["top_p"], config.top_p)?;
        config.repetition_penalty =
            file.f64_or(&["repetition_penalty"], config.repetition_penalty)?;
        config.max_new_tokens = file.usize_or(&["max_new_tokens"], config.max_new_tokens)?;
        if let Some(ids) = file.usize_list(&["eos_token_id"])? {
            config.eos_token_ids = ids.into_iter().map(|i| i as u32).collect();
        }
        config.validate().map_err(|m| file.error(m))?;
        Ok(config)
    }

    /// Checks the values transformers would refuse, and those that would make the logits
    /// meaningless in the f32 precision they are computed in.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(format!(
                "repetition_penalty must be a number > 0, got {}",
                self.repetition_penalty
            ));
        }
        // Logits are divided by the temperature in f32: below this they overflow to
        // infinities (and the distribution to NaN) for ordinary logit values.
        if self.do_sample
            && (self.temperature.is_nan() || (self.temperature as f32) < MIN_TEMPERATURE)
        {
            return Err(format!(
                "temperature must be at least {MIN_TEMPERATURE:e} when sampling (0 means greedy), got {}",
                self.temperature
            ));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(format!("{name} must be in [-2, 2], got {value}"));
            }
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(format!("top_p must be in [0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

impl GenerationConfig {
    /// A model folder's decoding defaults: `generation_config.json`, stopping at the config's
    /// `eos_token_ids` when that file names none, and always at `<|im_end|>` (the end of a
    /// chat turn) when the tokenizer has it.
    pub fn for_model(
        folder: &HfFolder,
        config_eos: &[u32],
        tokenizer: &crate::text::TextTokenizer,
    ) -> Result<Self> {
        let mut generation = GenerationConfig::load(folder)?;
        if generation.eos_token_ids.is_empty() {
            generation.eos_token_ids = config_eos.to_vec();
        }
        if let Some(im_end) = tokenizer.token_id("<|im_end|>") {
            if !generation.eos_token_ids.contains(&im_end) {
                generation.eos_token_ids.push(im_end);
            }
        }
        Ok(generation)
    }
}

/// A caller's changes to a model's decoding defaults, as the command line, the server and the
/// Python `Model` take them: `greedy`, or a temperature of 0, decodes greedily; a temperature,
/// `top_p`, `top_k` or a seed otherwise turns sampling on.
#[derive(Clone, Debug, Default)]
pub struct SamplingOverrides {
    pub max_new_tokens: Option<usize>,
    pub greedy: bool,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<u64>,
}

impl SamplingOverrides {
    /// `defaults` with these changes, checked ([`GenerationConfig::validate`]).
    pub fn apply(
        &self,
        defaults: &GenerationConfig,
    ) -> std::result::Result<GenerationConfig, String> {
        let mut c = defaults.clone();
        if let Some(n) = self.max_new_tokens {
            if n == 0 {
                return Err("max_new_tokens must be at least 1".into());
            }
            c.max_new_tokens = n;
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
        if self.greedy || self.temperature == Some(0.0) {
            c.do_sample = false;
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
        if let Some(p) = self.presence_penalty {
            c.presence_penalty = p;
        }
        if let Some(f) = self.frequency_penalty {
            c.frequency_penalty = f;
        }
        if let Some(s) = self.seed {
            c.seed = s;
        }
        c.validate()?;
        Ok(c)
    }
}

/// Chooses next tokens.
pub struct Sampler {
    config: GenerationConfig,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `config.seed`.
    pub fn new(config: GenerationConfig) -> Result<Self> {
        config.validate().map_err(Error::Input)?;
        let rng = StdRng::seed_from_u64(config.seed);
        Ok(Sampler { config, rng })
    }

    /// The settings in use.
    pub fn config(&self) -> &GenerationConfig {
        &self.config
    }

    /// Takes a token that was the only one allowed, as [`Sampler::next_token`] would on
    /// logits where every other is `-inf`: a sampling sampler still makes its one draw (so
    /// later draws are the same), a greedy one nothing.
    pub fn take_only_allowed(&mut self) {
        if self.config.do_sample {
            let _: f64 = self.rng.random();
        }
    }

    /// Applies the logits processors to `logits` (one row of the vocabulary) given every
    /// previous token (the last `answer` of them the answer's own), and picks the next token:
    /// the arg-max when not sampling (the first on ties, as `torch.argmax`), a draw otherwise.
    pub fn next_token(&mut self, logits: &mut [f32], previous: &[u32], answer: usize) -> u32 {
        let c = &self.config;
        if c.repetition_penalty != 1.0 {
            let penalty = c.repetition_penalty as f32;
            let mut seen = vec![false; logits.len()];
            for &t in previous {
                let t = t as usize;
                if t < logits.len() && !seen[t] {
                    seen[t] = true;
                    let s = logits[t];
                    logits[t] = if s < 0.0 { s * penalty } else { s / penalty };
                }
            }
        }
        // OpenAI's definition, after the repetition penalty as vLLM orders them:
        // logit -= count * frequency_penalty + (count > 0) * presence_penalty.
        if c.presence_penalty != 0.0 || c.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &t in &previous[previous.len().saturating_sub(answer)..] {
                *counts.entry(t).or_default() += 1;
            }
            for (t, n) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= c.frequency_penalty as f32 * n as f32;
                    *l -= c.presence_penalty as f32;
                }
            }
        }
        if !c.do_sample {
            return argmax(logits);
        }
        if c.temperature != 1.0 {
            let t = c.temperature as f32;
            logits.iter_mut().for_each(|l| *l /= t);
        }
        if c.top_k != 0 && c.top_k < logits.len() {
            let mut sorted: Vec<f32> = logits.to_vec();
            sorted.select_nth_unstable_by(c.top_k - 1, |a, b| b.total_cmp(a));
            let kth = sorted[c.top_k - 1];
            logits
                .iter_mut()
                .filter(|l| **l < kth)
                .for_each(|l| *l = f32::NEG_INFINITY);
        }
        if c.top_p < 1.0 {
            top_p_filter(logits, c.top_p);
        }
        let probs = softmax(logits);
        let draw: f64 = self.rng.random();
        let mut acc = 0.0f64;
        for (i, p) in probs.iter().enumerate() {
            acc += f64::from(*p);
            if draw < acc {
                return i as u32;
            }
        }
        // Rounding left the draw beyond the last cumulative sum: take the last candidate.
        probs.iter().rposition(|&p| p > 0.0).unwrap_or(0) as u32
    }
}

/// Index of the largest value, the first one on ties; NaN never wins.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] || values[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// transformers' `TopPLogitsWarper`: sort ascending, drop the tokens whose cumulative
/// probability stays at or below `1 - top_p`, always keep the most likely one.
fn top_p_filter(logits: &mut [f32], top_p: f64) {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
    let sorted: Vec<f32> = order.iter().map(|&i| logits[i]).collect();
    let probs = softmax(&sorted);
    let mut cumulative = 0.0f32;
    let threshold = (1.0 - top_p) as f32;
    for (rank, &i) in order.iter().enumerate() {
        cumulative += probs[rank];
        if cumulative <= threshold && rank + 1 < order.len() {
            logits[i] = f32::NEG_INFINITY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(c: GenerationConfig) -> Sampler {
        Sampler::new(c).unwrap()
    }

    #[test]
    fn presence_and_frequency_penalties_count_the_answer_only() {
        let mut s = sampler(GenerationConfig {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..GenerationConfig::default()
        });
        // Token 2 is only in the prompt; the answer has token 0 twice and token 1 once:
        // logits become [1 - 0.5 - 0.5, 1 - 0.5 - 0.25, 1].
        let mut logits = [1.0, 1.0, 1.0];
        assert_eq!(s.next_token(&mut logits, &[2, 0, 0, 1], 3), 2);
        assert_eq!(logits, [0.0, 0.25, 1.0]);
        let bad = GenerationConfig {
            frequency_penalty: 2.5,
            ..GenerationConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("frequency_penalty"));
    }

    #[test]
    fn greedy_with_repetition_penalty() {
        let mut s = sampler(GenerationConfig {
            repetition_penalty: 2.0,
            ..GenerationConfig::default()
        });
        // Token 0 wins unless penalized: 3.0 / 2 = 1.5 < 2.0.
        assert_eq!(s.next_token(&mut [3.0, 2.0, -1.0], &[], 0), 0);
        assert_eq!(s.next_token(&mut [3.0, 2.0, -1.0], &[0, 0], 0), 1);
        // Negative logits are multiplied.
        let mut l = [-1.0, -3.0];
        s.next_token(&mut l, &[0], 0);
        assert_eq!(l[0], -2.0);
    }

    #[test]
    fn top_k_one_is_greedy_and_sampling_is_seeded() {
        let mut s = sampler(GenerationConfig {
            do_sample: true,
            top_k: 1,
            ..GenerationConfig::default()
        });
        for _ in 0..20 {
            assert_eq!(s.next_token(&mut [0.1, 5.0, 4.9], &[], 0), 1);
        }
        let draws = |seed| {
            let mut s = sampler(GenerationConfig {
                do_sample: true,
                seed,
                ..GenerationConfig::default()
            });
            (0..30)
                .map(|_| s.next_token(&mut [1.0, 1.0, 1.0, 1.0], &[], 0))
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let mut l = [0.0f32, 1.0, 5.0, 4.0];
        top_p_filter(&mut l, 0.5);
        assert_eq!(l[0], f32::NEG_INFINITY);
        assert_eq!(l[1], f32::NEG_INFINITY);
        assert!(l[2].is_finite());
        // A tiny top_p still keeps the best token.
        let mut l = [0.0f32, 1.0];
        top_p_filter(&mut l, 0.001);
        assert!(l[1].is_finite() && l[0] == f32::NEG_INFINITY);
    }
}
