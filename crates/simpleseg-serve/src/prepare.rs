//! From an admitted request to the model's queue, for both model routes: every cost a request
//! can ask for is checked against a bound before it is paid.
//!
//! 1. Pixel limits against the server's cap (the model processor's `max_pixels` unless set).
//! 2. The prompt's length against the context: a prompt longer than the context times the
//!    longest token is refused before it is tokenized.
//! 3. The constraint, compiled off the model thread, one build at a time, from a cache that
//!    keeps failures too.
//! 4. The image: its cost from its header reserved, then decoded; the prompt prepared
//!    (tokenized, image resized and patched), its input's size reserved in turn.
//! 5. `prompt + max_tokens` against the context, as vLLM checks it.
//!
//! Steps 3 and 4 run on blocking threads: a request being prepared never holds up the model.

use std::sync::Arc;

use axum::http::StatusCode;
use simpleseg_core::segment::Target;
use simpleseg_engine::runtime::constraint::{Constraint, Grammar};
use simpleseg_engine::runtime::segment::{SegmentJob, SegmentOptions};
use simpleseg_engine::{GenerationConfig, PixelLimits, PromptOptions};

use crate::guard::Admitted;
use crate::stream::{submit, Submitted};
use crate::{media, ApiError, AppState, Loaded};

/// What a request asks about its image.
pub enum Ask {
    /// A chat turn's text, asked as written, after a system message if any.
    Chat {
        text: String,
        system: Option<String>,
    },
    /// A segmentation, through the engine's pipeline ([`SegmentJob`]); its pixel limits are
    /// the job's.
    Segment(Target, SegmentOptions),
}

/// What a model request asks for, once its fields are read.
pub struct Job {
    /// The image's URL (`data:` or `file://`).
    pub image: String,
    pub ask: Ask,
    pub pixels: PixelLimits,
    /// One per answer wanted.
    pub configs: Vec<GenerationConfig>,
    /// Whether the request gave `max_tokens` (otherwise answers stop at the context's end).
    pub max_tokens_given: bool,
    pub constraint: Option<Constraint>,
}

/// A request in the model's queue.
pub struct Queued {
    pub submitted: Submitted,
    /// For a segmentation, the job that reads its answer.
    pub segment: Option<SegmentJob>,
}

fn internal(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
}

/// Engine errors: bad input is 400, the rest 500.
pub fn engine_error(e: simpleseg_engine::Error) -> ApiError {
    match e {
        simpleseg_engine::Error::Input(m) => ApiError::bad_request(m),
        e @ (simpleseg_engine::Error::Template(_) | simpleseg_engine::Error::Tokenizer(_)) => {
            ApiError::bad_request(e.to_string())
        }
        simpleseg_engine::Error::Core(c) => c.into(),
        other => internal(other.to_string()),
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| internal(format!("preparing the request failed: {e}")))?
}

/// Takes `job` through the checks above and queues it.
pub async fn queue(
    state: &AppState,
    admitted: Option<Admitted>,
    job: Job,
) -> Result<Queued, ApiError> {
    let loaded = state.model()?;
    let mut admission = admitted
        .and_then(|a| a.take())
        .ok_or_else(|| internal("the request was not admitted"))?;
    let pixels = checked_pixels(state, loaded, job.pixels)?;
    let longest_prompt = prompt_bound(loaded);
    let ask = match job.ask {
        Ask::Chat { text, system } => {
            check_prompt_length(loaded, text.len() + system.as_ref().map_or(0, String::len))?;
            Ask::Chat { text, system }
        }
        Ask::Segment(target, options) => Ask::Segment(
            target,
            SegmentOptions {
                prompt: PromptOptions {
                    pixels,
                    ..options.prompt
                },
                max_question_bytes: options.max_question_bytes.min(longest_prompt),
                ..options
            },
        ),
    };
    let grammar = match &job.constraint {
        Some(c) => Some(grammar(state, c).await?),
        None => None,
    };
    let model = loaded.model.clone();
    let budgets = state.budgets.clone();
    let allowed = state.options.allowed_media_path.clone();
    let url = job.image;
    let (prompt, segment, input_permit) = blocking(move || {
        let (bytes, source) = media::image_bytes(&url, allowed.as_deref())?;
        let (image, decoded) = media::decode(&bytes, &source, &budgets)?;
        drop(bytes);
        let (prompt, segment) = match &ask {
            Ask::Chat { text, system } => (
                model
                    .prepare_with(
                        &image,
                        text,
                        &PromptOptions {
                            pixels,
                            system: system.clone(),
                        },
                    )
                    .map_err(engine_error)?,
                None,
            ),
            Ask::Segment(target, options) => {
                let mut job = SegmentJob::new(model.as_ref(), &image, target, options)
                    .map_err(engine_error)?;
                (job.take_prompt(), Some(job))
            }
        };
        drop(image);
        let input_bytes: usize = prompt
            .images
            .iter()
            .map(|i| i.pixel_values.len() * 4)
            .sum::<usize>()
            + prompt.input_ids.len() * 4;
        let permit = budgets.reserve(input_bytes as u64, "the model's input for this image")?;
        drop(decoded);
        Ok((prompt, segment, permit))
    })
    .await?;
    admission.hold(input_permit);
    let mut configs = job.configs;
    fit_context(
        &mut configs,
        prompt.input_ids.len(),
        loaded.model.max_positions(),
        job.max_tokens_given,
    )?;
    let submitted = submit(state, prompt, configs, grammar, admission)?;
    Ok(Queued { submitted, segment })
}

/// The request's pixel limits within the server's cap; without any, the cap applies when it
/// is below the model's own maximum.
fn checked_pixels(
    state: &AppState,
    loaded: &Loaded,
    asked: PixelLimits,
) -> Result<PixelLimits, ApiError> {
    let Some((_, model_max)) = loaded.model.pixel_range() else {
        // The family has no such limits: the engine refuses any that are given.
        return Ok(asked);
    };
    let cap = state.options.max_request_pixels.unwrap_or(model_max);
    for (name, value) in [
        ("min_pixels", asked.min_pixels),
        ("max_pixels", asked.max_pixels),
    ] {
        if let Some(v) = value {
            if v > cap {
                return Err(ApiError::bad_request(format!(
                    "{name} {v} is above this server's limit of {cap} pixels{}",
                    if state.options.max_request_pixels.is_some() {
                        " (--max-request-pixels)"
                    } else {
                        " (the model processor's max_pixels; raise it with --max-request-pixels)"
                    }
                )));
            }
        }
    }
    Ok(PixelLimits {
        min_pixels: asked.min_pixels,
        max_pixels: asked.max_pixels.or((cap < model_max).then_some(cap)),
    })
}

/// The most bytes one token of the model's vocabulary stands for (computed once).
fn longest_token(loaded: &Loaded) -> usize {
    *loaded
        .longest_token
        .get_or_init(|| loaded.model.tokenizer().longest_token_bytes())
}

/// The most bytes a prompt that fits the context can have: the context's tokens times the
/// longest token.
fn prompt_bound(loaded: &Loaded) -> usize {
    loaded
        .model
        .max_positions()
        .saturating_mul(longest_token(loaded))
}

/// A prompt of more bytes than [`prompt_bound`] cannot fit: refused before tokenizing it.
fn check_prompt_length(loaded: &Loaded, prompt_bytes: usize) -> Result<(), ApiError> {
    let context = loaded.model.max_positions();
    let max = prompt_bound(loaded);
    if prompt_bytes > max {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {context} tokens. However, the prompt has {prompt_bytes} bytes, more than that many tokens can hold ({max}). Please reduce the length of the messages."
        )));
    }
    Ok(())
}

/// vLLM's rule: `prompt + max_tokens` within the context, else 400; without `max_tokens`,
/// answers may run to the end of the context.
pub fn fit_context(
    configs: &mut [GenerationConfig],
    prompt_tokens: usize,
    context: usize,
    max_tokens_given: bool,
) -> Result<(), ApiError> {
    if prompt_tokens >= context {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {context} tokens. However, your request has {prompt_tokens} input tokens. Please reduce the length of the input messages."
        )));
    }
    for config in configs.iter_mut() {
        let total = prompt_tokens + config.max_new_tokens;
        if total > context {
            if max_tokens_given {
                return Err(ApiError::bad_request(format!(
                    "This model's maximum context length is {context} tokens. However, you requested {total} tokens ({prompt_tokens} in the messages, {} in the completion). Please reduce the length of the messages or completion.",
                    config.max_new_tokens
                )));
            }
            config.max_new_tokens = context - prompt_tokens;
        }
    }
    Ok(())
}

/// The compiled constraint: from the model's cache, or built on a blocking thread (one
/// build at a time).
async fn grammar(state: &AppState, constraint: &Constraint) -> Result<Arc<Grammar>, ApiError> {
    let _turn = state
        .budgets
        .builds
        .acquire()
        .await
        .map_err(|_| internal("the constraint builder is closed"))?;
    let st = state.clone();
    let constraint = constraint.clone();
    blocking(move || {
        let loaded = st.model()?;
        loaded
            .grammars
            .get(
                loaded.model.tokenizer(),
                &loaded.defaults.eos_token_ids,
                &constraint,
            )
            .map_err(engine_error)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_is_checked_as_vllm_does() {
        let config = GenerationConfig {
            max_new_tokens: 100,
            ..GenerationConfig::default()
        };
        let mut configs = vec![config.clone()];
        let err = fit_context(&mut configs, 2000, 2048, true).unwrap_err();
        assert!(
            err.message.contains(
                "you requested 2100 tokens (2000 in the messages, 100 in the completion)"
            ),
            "{}",
            err.message
        );
        fit_context(&mut configs, 2000, 2048, false).unwrap();
        assert_eq!(
            configs[0].max_new_tokens, 48,
            "the default stops at the context"
        );
        let err = fit_context(&mut [config], 2048, 2048, false).unwrap_err();
        assert!(
            err.message.contains("has 2048 input tokens"),
            "{}",
            err.message
        );
    }
}
