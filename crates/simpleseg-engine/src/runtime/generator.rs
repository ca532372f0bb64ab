//! The one decoding loop: a [`Generator`] holds rows of any number of prompts in one session
//! and steps them together, each row's next token chosen by its [`Decoding`]. Batched
//! generation ([`generate_batch`]), the server's continuous batching
//! ([`crate::runtime::scheduler`]) and training's rollouts all drive it; they differ only in
//! when they add prompts and what they do with each token ([`Listener`]).

use std::sync::Arc;
use std::time::Instant;

use candle_core::DType;

use crate::error::{Error, Result};
use crate::layers::FEW_ROWS;
use crate::runtime::constraint::Grammar;
use crate::runtime::decoding::Decoding;
use crate::runtime::model::{
    GenerationOutput, Prompt, Session, Sessions, StopReason, Timings, VisionLanguageModel,
};
use crate::runtime::sampling::GenerationConfig;
use crate::text::TextTokenizer;

/// What a decoding loop does with its rows' tokens.
pub trait Listener<T> {
    /// Whether row `tag` stops before its next token (a client gone, a stop string seen).
    fn cancelled(&mut self, _tag: &T) -> bool {
        false
    }
    /// Row `tag` chose `token` (recorded in its answer); `false` stops the row there.
    fn token(&mut self, _tag: &mut T, _token: u32) -> Result<bool> {
        Ok(true)
    }
}

/// A listener that only collects answers.
impl<T> Listener<T> for () {}

/// A row that stopped: its tag and answer.
#[derive(Debug)]
pub struct Finished<T> {
    pub tag: T,
    /// The answer's tokens (stop token excluded).
    pub tokens: Vec<u32>,
    pub stop_reason: StopReason,
    /// The stop token that ended it, when one did.
    pub stop_token: Option<u32>,
    pub prompt_tokens: usize,
    pub timings: Timings,
}

impl<T> Finished<T> {
    /// The answer as text and figures.
    pub fn output(self, tokenizer: &TextTokenizer) -> Result<(T, GenerationOutput)> {
        let output = GenerationOutput {
            text: tokenizer.decode(&self.tokens)?,
            token_ids: self.tokens,
            prompt_tokens: self.prompt_tokens,
            stop_reason: self.stop_reason,
            timings: self.timings,
        };
        Ok((self.tag, output))
    }
}

/// A row in the session.
struct Row<T> {
    tag: T,
    decoding: Decoding,
    prompt_tokens: usize,
    prefill_ms: f64,
    decode_start: Instant,
}

/// Rows of several prompts decoded together (see the module documentation).
pub struct Generator<'m, T> {
    model: &'m dyn Sessions,
    session: Option<Box<dyn Session + 'm>>,
    /// In session order: a row decoding, or `None` for one that finished and stays, padded
    /// (see [`Generator::keep_finished`]).
    slots: Vec<Option<Row<T>>>,
    /// The token fed to finished rows kept in the session.
    padding: Option<u32>,
    /// Whether a lone row takes its forced tokens in runs (see [`Generator::step`]).
    forced_runs: bool,
}

impl<'m, T> Generator<'m, T> {
    /// An empty generator over `model`'s sessions.
    pub fn new(model: &'m dyn Sessions) -> Self {
        Generator {
            model,
            session: None,
            slots: Vec::new(),
            padding: None,
            forced_runs: true,
        }
    }

    /// Feeds every token in its own step, forced or not (the reference that runs of forced
    /// tokens are tested against).
    pub fn step_by_step(mut self) -> Self {
        self.forced_runs = false;
        self
    }

    /// Keeps finished rows in the session, fed `pad`, until every row has finished. Inference
    /// gets the same numbers for a row whatever the batch (its products are one dot product
    /// per output); training's tracked weights go through candle's matmul, whose rounding may
    /// depend on the number of rows, so its rollouts keep the batch whole as they always have.
    pub fn keep_finished(mut self, pad: u32) -> Self {
        self.padding = Some(pad);
        self
    }

    /// Prefills `prompt` and adds one row per `(tag, config)`, answers held to `grammar` when
    /// given; they decode with the others from the next step on. The rows' settings are checked
    /// first (a prompt that fills the context is refused before any work).
    pub fn add(
        &mut self,
        prompt: &Prompt,
        rows: Vec<(T, GenerationConfig)>,
        grammar: Option<Arc<Grammar>>,
    ) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let context = self.model.max_positions();
        let decodings = rows
            .iter()
            .map(|(_, config)| Decoding::new(config, &prompt.input_ids, context, grammar.clone()))
            .collect::<Result<Vec<_>>>()?;
        let start = Instant::now();
        match self.session.as_mut() {
            None => self.session = Some(self.model.start(prompt, rows.len())?),
            Some(s) => s.add(prompt, rows.len())?,
        }
        let prefill_ms = start.elapsed().as_secs_f64() * 1e3;
        let now = Instant::now();
        for ((tag, _), decoding) in rows.into_iter().zip(decodings) {
            self.slots.push(Some(Row {
                tag,
                decoding,
                prompt_tokens: prompt.input_ids.len(),
                prefill_ms,
                decode_start: now,
            }));
        }
        Ok(())
    }

    /// Rows still decoding.
    pub fn live(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// One step: every live row whose listener does not cancel it chooses a token; rows that
    /// stop leave the session (or stay, padded, with [`Generator::keep_finished`]) and come
    /// back here; the others are fed their tokens. A row with no room for a token stops at
    /// the start of its first step.
    ///
    /// Forced tokens: when a single row is decoding and its constraint then allows exactly one
    /// token at a time, those tokens are taken without logits (as choosing would take them,
    /// the sampler's draw included) and fed with the chosen token as one forward of up to
    /// [`FEW_ROWS`] tokens ([`Session::feed_run`]), which costs about one step since decoding
    /// reads the weights once for every row. The answer is the same as step by step.
    pub fn step(&mut self, listener: &mut impl Listener<T>) -> Result<Vec<Finished<T>>> {
        let Some(session) = self.session.as_mut() else {
            return Ok(Vec::new());
        };
        let logits = session.logits().to_dtype(DType::F32)?;
        let pad = self.padding;
        let mut tokens = Vec::with_capacity(self.slots.len());
        let mut stopped = false;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(row) = slot else {
                tokens.push(pad.unwrap_or_default());
                continue;
            };
            let d = &mut row.decoding;
            if d.stop_reason.is_none() && listener.cancelled(&row.tag) {
                d.stop_reason = Some(StopReason::Cancelled);
            }
            if d.stop_reason.is_none() {
                if let Some(token) = d.choose(logits.get(i)?.to_vec1()?) {
                    if !listener.token(&mut row.tag, token)? {
                        row.decoding.stop_reason = Some(StopReason::Cancelled);
                    } else if row.decoding.stop_reason.is_none() {
                        tokens.push(token);
                        continue;
                    }
                }
            }
            stopped = true;
            tokens.extend(pad);
        }
        let vocab = logits.dim(1)?;
        let run = match self.slots.as_mut_slice() {
            [Some(row)] if self.forced_runs && pad.is_none() && !stopped => {
                let run = forced_run(row, tokens[0], vocab, listener)?;
                stopped = row.decoding.stop_reason.is_some();
                run
            }
            _ => Vec::new(),
        };
        let mut finished = Vec::new();
        if stopped {
            let keep: Vec<bool> = self
                .slots
                .iter()
                .map(|s| match s {
                    Some(row) => row.decoding.stop_reason.is_none(),
                    None => pad.is_some(),
                })
                .collect();
            if pad.is_none() {
                session.retain(&keep)?;
            }
            for slot in std::mem::take(&mut self.slots) {
                match slot {
                    Some(row) if row.decoding.stop_reason.is_some() => {
                        finished.push(finish(row));
                        if pad.is_some() {
                            self.slots.push(None);
                        }
                    }
                    other => self.slots.push(other),
                }
            }
        }
        if self.live() == 0 {
            self.session = None;
            self.slots.clear();
        } else if let Some(session) = self.session.as_mut() {
            if run.len() > 1 {
                session.feed_run(&run)?;
            } else {
                session.feed(&tokens)?;
            }
        }
        Ok(finished)
    }

    /// Steps until every row has finished.
    pub fn run(&mut self, listener: &mut impl Listener<T>) -> Result<Vec<Finished<T>>> {
        let mut finished = Vec::new();
        while self.live() > 0 {
            finished.extend(self.step(listener)?);
        }
        Ok(finished)
    }
}

/// The chosen `token` followed by the tokens the row's constraint forces after it, taken as
/// steps would take them (the listener asked before each, told of each), up to [`FEW_ROWS`]
/// tokens; it stops early where the row stops.
fn forced_run<T>(
    row: &mut Row<T>,
    token: u32,
    vocab: usize,
    listener: &mut impl Listener<T>,
) -> Result<Vec<u32>> {
    let mut run = vec![token];
    while run.len() < FEW_ROWS {
        let Some(next) = row.decoding.forced(vocab) else {
            break;
        };
        if listener.cancelled(&row.tag) {
            row.decoding.stop_reason = Some(StopReason::Cancelled);
            break;
        }
        let Some(next) = row.decoding.take_forced(next) else {
            break;
        };
        if !listener.token(&mut row.tag, next)? {
            row.decoding.stop_reason = Some(StopReason::Cancelled);
        }
        if row.decoding.stop_reason.is_some() {
            break;
        }
        run.push(next);
    }
    Ok(run)
}

fn finish<T>(row: Row<T>) -> Finished<T> {
    let decode_ms = row.decode_start.elapsed().as_secs_f64() * 1e3;
    let d = row.decoding;
    Finished {
        tag: row.tag,
        timings: Timings {
            prefill_ms: row.prefill_ms,
            decode_ms,
            decode_tokens_per_s: d.generated.len() as f64 / (decode_ms / 1e3).max(1e-9),
        },
        stop_reason: d.stop_reason.unwrap_or(StopReason::MaxTokens),
        stop_token: d.stop_token,
        tokens: d.generated,
        prompt_tokens: row.prompt_tokens,
    }
}

/// One prompt of a batch and the answers wanted from it: one [`GenerationConfig`] per answer
/// (its own seed, say). The prompt is prefilled once and its answers share that prefill.
#[derive(Clone, Debug)]
pub struct BatchRequest<'a> {
    pub prompt: &'a Prompt,
    pub configs: Vec<GenerationConfig>,
    /// Answers must match this grammar ([`crate::runtime::constraint`]).
    pub grammar: Option<Arc<Grammar>>,
}

/// Generates one answer, calling `on_token` with each new token id as it is chosen.
pub fn generate(
    model: &dyn VisionLanguageModel,
    prompt: &Prompt,
    config: GenerationConfig,
    on_token: impl FnMut(u32),
) -> Result<GenerationOutput> {
    generate_constrained(model, prompt, config, None, on_token)
}

/// [`generate`] with the answer held to `grammar` when given.
pub fn generate_constrained(
    model: &dyn VisionLanguageModel,
    prompt: &Prompt,
    config: GenerationConfig,
    grammar: Option<Arc<Grammar>>,
    mut on_token: impl FnMut(u32),
) -> Result<GenerationOutput> {
    let request = BatchRequest {
        prompt,
        configs: vec![config],
        grammar,
    };
    let mut outputs = generate_batch(model, &[request], |_, token| on_token(token))?;
    outputs
        .pop()
        .ok_or_else(|| Error::Input("generation produced no answer".into()))
}

/// Calls a closure with each answer's tokens.
struct OnToken<F>(F);

impl<F: FnMut(usize, u32)> Listener<usize> for OnToken<F> {
    fn token(&mut self, answer: &mut usize, token: u32) -> Result<bool> {
        (self.0)(*answer, token);
        Ok(true)
    }
}

/// Generates every answer of every request together: each prompt is prefilled once, then all
/// rows decode side by side, a row leaving the batch when it stops. Each answer is exactly what
/// [`generate`] gives for its prompt and config alone. Returns the answers request by request,
/// in the order of each request's configs; `on_token(answer, token)` is called as tokens are
/// chosen.
pub fn generate_batch(
    model: &dyn VisionLanguageModel,
    requests: &[BatchRequest],
    on_token: impl FnMut(usize, u32),
) -> Result<Vec<GenerationOutput>> {
    let mut generator = Generator::new(model);
    let mut answers = 0;
    for request in requests {
        let rows = request
            .configs
            .iter()
            .map(|c| {
                answers += 1;
                (answers - 1, c.clone())
            })
            .collect();
        generator.add(request.prompt, rows, request.grammar.clone())?;
    }
    let mut finished = generator.run(&mut OnToken(on_token))?;
    finished.sort_by_key(|f| f.tag);
    finished
        .into_iter()
        .map(|f| Ok(f.output(model.tokenizer())?.1))
        .collect()
}
