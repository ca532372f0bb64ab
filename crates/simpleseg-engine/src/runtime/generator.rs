//! Generation: answers decoded from prompts, several prompts and several answers each
//! together.

use std::time::Instant;

use candle_core::DType;

use crate::error::{Error, Result};
use crate::runtime::constraint;
use crate::runtime::decoding::Decoding;
use crate::runtime::model::{GenerationOutput, Prompt, Session, StopReason, Timings, VisionLanguageModel};
use crate::runtime::sampling::GenerationConfig;

/// One prompt of a batch and the answers wanted from it: one [`GenerationConfig`] per answer
/// (its own seed, say). The prompt is prefilled once and its answers share that prefill.
#[derive(Clone, Debug)]
pub struct BatchRequest<'a> {
    pub prompt: &'a Prompt,
    pub configs: Vec<GenerationConfig>,
    /// Answers must match this grammar ([`constraint`]).
    pub grammar: Option<std::sync::Arc<constraint::Grammar>>,
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
    grammar: Option<std::sync::Arc<constraint::Grammar>>,
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

/// A row of [`generate_batch`] while it is being decoded.
struct Row {
    /// Index of the answer in the output.
    answer: usize,
    decoding: Decoding,
    prefill_ms: f64,
    prompt_tokens: usize,
}

/// Generates every answer of every request together: each prompt is prefilled once, then all
/// rows decode side by side, a row leaving the batch when it stops (see [`session`]). Each
/// answer is exactly what [`generate`] gives for its prompt and config alone. Returns the
/// answers request by request, in the order of each request's configs; `on_token(answer,
/// token)` is called as tokens are chosen.
pub fn generate_batch(
    model: &dyn VisionLanguageModel,
    requests: &[BatchRequest],
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<GenerationOutput>> {
    let mut rows = Vec::new();
    let mut session: Option<Box<dyn Session + '_>> = None;
    for request in requests {
        let copies = request.configs.len();
        if copies == 0 {
            continue;
        }
        let start = Instant::now();
        match session.as_mut() {
            None => session = Some(model.start(request.prompt, copies)?),
            Some(s) => s.add(request.prompt, copies)?,
        }
        let prefill_ms = start.elapsed().as_secs_f64() * 1e3;
        for config in &request.configs {
            rows.push(Row {
                answer: rows.len(),
                decoding: Decoding::new(
                    config,
                    &request.prompt.input_ids,
                    model.max_positions(),
                    request.grammar.clone(),
                )?,
                prefill_ms,
                prompt_tokens: request.prompt.input_ids.len(),
            });
        }
    }
    let Some(mut session) = session else {
        return Ok(Vec::new());
    };
    let decode_start = Instant::now();
    // Rows still decoding, in session order; finished ones move to `done`.
    let mut active: Vec<Row> = Vec::new();
    let mut done: Vec<Row> = Vec::new();
    let mut keep = Vec::with_capacity(rows.len());
    for row in rows {
        keep.push(row.decoding.stop_reason.is_none());
        if row.decoding.stop_reason.is_none() {
            active.push(row);
        } else {
            done.push(row);
        }
    }
    session.retain(&keep)?;
    while !active.is_empty() {
        let logits = session.logits().to_dtype(DType::F32)?;
        let mut tokens = Vec::with_capacity(active.len());
        for (i, row) in active.iter_mut().enumerate() {
            if let Some(token) = row.decoding.choose(logits.get(i)?.to_vec1()?) {
                on_token(row.answer, token);
                if row.decoding.stop_reason.is_none() {
                    tokens.push(token);
                }
            }
        }
        let keep: Vec<bool> = active
            .iter()
            .map(|r| r.decoding.stop_reason.is_none())
            .collect();
        if keep.iter().any(|k| !k) {
            session.retain(&keep)?;
            let (still, finished): (Vec<Row>, Vec<Row>) = active
                .into_iter()
                .partition(|r| r.decoding.stop_reason.is_none());
            active = still;
            done.extend(finished);
        }
        if !active.is_empty() {
            session.feed(&tokens)?;
        }
    }
    let decode_ms = decode_start.elapsed().as_secs_f64() * 1e3;
    done.sort_by_key(|r| r.answer);
    done.into_iter()
        .map(|row| {
            Ok(GenerationOutput {
                text: model.tokenizer().decode(&row.decoding.generated)?,
                prompt_tokens: row.prompt_tokens,
                stop_reason: row.decoding.stop_reason.unwrap_or(StopReason::MaxTokens),
                timings: Timings {
                    prefill_ms: row.prefill_ms,
                    decode_ms,
                    decode_tokens_per_s: row.decoding.generated.len() as f64
                        / (decode_ms / 1e3).max(1e-9),
                },
                token_ids: row.decoding.generated,
            })
        })
        .collect()
}
