//! Decoding several sequences together, whatever the family.
//!
//! A session holds groups of sequences ("cohorts") that share a length: the rows sampled from
//! one prompt, or one prompt each. The expensive part of a decoding step, reading the weights,
//! is done once for every row of every cohort; attention runs per cohort over that cohort's
//! own cache, so prompts of different lengths decode side by side and each row computes
//! exactly what it would alone. Families say how to prefill a prompt into a cohort and how to
//! advance all cohorts by one token ([`Decoder`]); the bookkeeping lives here once.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::runtime::kv_cache::KvCache;
use crate::runtime::model::{Prompt, Session};

/// Sequences of one prompt decoded in lockstep: `rows` rows sharing one cache layout.
#[derive(Clone, Debug)]
pub struct Cohort<E> {
    pub cache: KvCache,
    pub rows: usize,
    /// What else the family tracks per prompt (Qwen2.5-VL: its rotary position offset).
    pub extra: E,
}

/// Rows of a decoding step's input that attend over one cache: the next `rows` rows, at
/// sequence position `position` (counted as the family counts them). Groups run in order,
/// each appending its keys and values before the next attends, so one cache may serve several
/// groups: a sequence extended by several tokens in one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepGroup {
    /// Index of the group's cache.
    pub cache: usize,
    pub rows: usize,
    pub position: i64,
}

/// A family's prefill and decoding step.
pub trait Decoder: Sync {
    /// Per-prompt state besides the cache.
    type Extra: Clone + Send + Sync;
    /// Runs a prompt (vision tower and prefill) into a one-row cohort; returns it with the
    /// logits of the last position, `(1, vocab)`.
    fn prefill(&self, prompt: &Prompt) -> Result<(Cohort<Self::Extra>, Tensor)>;
    /// Appends one token to every row (`tokens`: `(rows,)`, cohort after cohort) and returns
    /// the next logits, `(rows, vocab)`.
    fn step(&self, tokens: &Tensor, cohorts: &mut [Cohort<Self::Extra>]) -> Result<Tensor>;
    /// Appends `tokens` `(n,)` in order to a one-row cohort and returns the logits after the
    /// last, `(1, vocab)`: exactly what stepping them one at a time gives (families run them as
    /// one forward where their products do not depend on the number of rows). This default
    /// steps them one at a time.
    fn extend(&self, tokens: &Tensor, cohort: &mut Cohort<Self::Extra>) -> Result<Tensor> {
        extend_by_steps(self, tokens, cohort)
    }
}

/// [`Decoder::extend`] a step at a time.
pub fn extend_by_steps<M: Decoder + ?Sized>(
    model: &M,
    tokens: &Tensor,
    cohort: &mut Cohort<M::Extra>,
) -> Result<Tensor> {
    let mut logits = None;
    for j in 0..tokens.dim(0)? {
        logits = Some(model.step(&tokens.narrow(0, j, 1)?, std::slice::from_mut(cohort))?);
    }
    logits.ok_or_else(|| Error::Input("no tokens to append".into()))
}

/// The groups of a step over `cohorts`, one per cohort at its cache's length plus `offset`.
pub fn cohort_groups<E>(cohorts: &[Cohort<E>], offset: impl Fn(&E) -> i64) -> Vec<StepGroup> {
    cohorts
        .iter()
        .enumerate()
        .map(|(i, c)| StepGroup {
            cache: i,
            rows: c.rows,
            position: c.cache.len() as i64 + offset(&c.extra),
        })
        .collect()
}

/// The groups of [`Decoder::extend`]: `n` tokens of one sequence whose next position is
/// `position`, one row each, over cache 0.
pub fn extension_groups(n: usize, position: i64) -> Vec<StepGroup> {
    (0..n)
        .map(|j| StepGroup {
            cache: 0,
            rows: 1,
            position: position + j as i64,
        })
        .collect()
}

/// The [`Session`] of any [`Decoder`].
pub struct BatchSession<'a, M: Decoder> {
    model: &'a M,
    cohorts: Vec<Cohort<M::Extra>>,
    /// `(rows, vocab)`; the last logits when every row is gone.
    logits: Tensor,
}

impl<'a, M: Decoder> BatchSession<'a, M> {
    /// A session holding `copies` rows of one prompt.
    pub fn start(model: &'a M, prompt: &Prompt, copies: usize) -> Result<Self> {
        let (cohort, logits) = prefill_copies(model, prompt, copies)?;
        Ok(BatchSession {
            model,
            cohorts: vec![cohort],
            logits,
        })
    }
}

fn prefill_copies<M: Decoder>(
    model: &M,
    prompt: &Prompt,
    copies: usize,
) -> Result<(Cohort<M::Extra>, Tensor)> {
    if copies == 0 {
        return Err(Error::Input("a prompt needs at least one row".into()));
    }
    let (mut cohort, logits) = model.prefill(prompt)?;
    if copies == 1 {
        return Ok((cohort, logits));
    }
    cohort.cache = cohort.cache.repeat_batch(copies)?;
    cohort.rows = copies;
    Ok((cohort, logits.repeat((copies, 1))?))
}

impl<M: Decoder> Session for BatchSession<'_, M> {
    fn logits(&self) -> &Tensor {
        &self.logits
    }

    fn feed(&mut self, tokens: &[u32]) -> Result<()> {
        let rows = self.batch();
        if tokens.len() != rows {
            return Err(Error::Input(format!(
                "{} tokens for a batch of {rows}",
                tokens.len()
            )));
        }
        let ids = Tensor::new(tokens, self.logits.device())?;
        self.logits = self.model.step(&ids, &mut self.cohorts)?;
        Ok(())
    }

    fn feed_run(&mut self, tokens: &[u32]) -> Result<()> {
        if self.batch() != 1 || self.cohorts.len() != 1 || tokens.is_empty() {
            return Err(Error::Input(format!(
                "a run of {} tokens needs a session of one row (this one has {})",
                tokens.len(),
                self.batch()
            )));
        }
        let ids = Tensor::new(tokens, self.logits.device())?;
        self.logits = self.model.extend(&ids, &mut self.cohorts[0])?;
        Ok(())
    }

    fn fork(&self, n: usize) -> Result<Box<dyn Session + '_>> {
        if n == 0 {
            return Err(Error::Input("a fork needs at least one row".into()));
        }
        let cohorts = self
            .cohorts
            .iter()
            .map(|c| {
                Ok(Cohort {
                    cache: c.cache.repeat_batch(n)?,
                    rows: c.rows * n,
                    extra: c.extra.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Each row repeated n times in place, cohort by cohort.
        let rows = self.batch() as u32;
        let order: Vec<u32> = self
            .cohorts
            .iter()
            .scan(0u32, |start, c| {
                let s = *start;
                *start += c.rows as u32;
                Some((s, c.rows as u32))
            })
            .flat_map(|(s, r)| (0..n).flat_map(move |_| s..s + r))
            .collect();
        debug_assert!(order.iter().all(|&i| i < rows));
        let order = Tensor::new(order.as_slice(), self.logits.device())?;
        Ok(Box::new(BatchSession {
            model: self.model,
            cohorts,
            logits: self.logits.index_select(&order, 0)?,
        }))
    }

    fn batch(&self) -> usize {
        self.cohorts.iter().map(|c| c.rows).sum()
    }

    fn add(&mut self, prompt: &Prompt, copies: usize) -> Result<()> {
        let (cohort, logits) = prefill_copies(self.model, prompt, copies)?;
        self.logits = if self.cohorts.is_empty() {
            logits
        } else {
            Tensor::cat(&[&self.logits, &logits.to_dtype(self.logits.dtype())?], 0)?
        };
        self.cohorts.push(cohort);
        Ok(())
    }

    fn retain(&mut self, keep: &[bool]) -> Result<()> {
        if keep.len() != self.batch() {
            return Err(Error::Input(format!(
                "{} flags for a batch of {}",
                keep.len(),
                self.batch()
            )));
        }
        if keep.iter().all(|&k| k) {
            return Ok(());
        }
        let device = self.logits.device().clone();
        let mut start = 0;
        let mut cohorts = Vec::with_capacity(self.cohorts.len());
        for mut c in std::mem::take(&mut self.cohorts) {
            let flags = &keep[start..start + c.rows];
            start += c.rows;
            let kept: Vec<u32> = (0..c.rows as u32).filter(|&i| flags[i as usize]).collect();
            if kept.is_empty() {
                continue;
            }
            if kept.len() < c.rows {
                c.cache = c
                    .cache
                    .select_rows(&Tensor::new(kept.as_slice(), &device)?)?;
                c.rows = kept.len();
            }
            cohorts.push(c);
        }
        self.cohorts = cohorts;
        let rows: Vec<u32> = (0..keep.len() as u32)
            .filter(|&i| keep[i as usize])
            .collect();
        if !rows.is_empty() {
            self.logits = self
                .logits
                .index_select(&Tensor::new(rows.as_slice(), &device)?, 0)?;
        }
        Ok(())
    }
}

/// The last position of `(batch, seq, ...)` hidden states: `(batch, ...)`.
pub fn last_position(hidden: &Tensor) -> Result<Tensor> {
    let seq = hidden.dim(1)?;
    Ok(hidden.narrow(1, seq - 1, 1)?.squeeze(1)?)
}
