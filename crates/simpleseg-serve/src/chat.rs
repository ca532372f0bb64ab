//! `POST /v1/chat/completions`: the OpenAI chat API for one user turn with one image.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use simpleseg_engine::runtime::scheduler::{Constraint, Event};
use simpleseg_engine::{GenerationConfig, PixelLimits, SamplingOverrides};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::guard::Admitted;
use crate::prepare::{queue, Ask, Job};
use crate::stream::{collect, finish_reason, StopFilter, MAX_STOPS, MAX_STOP_BYTES};
use crate::{check_model, ApiError, AppState};

/// The request fields this server reads (see [`check_fields`] for the others).
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<Value>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub n: Option<usize>,
    pub stop: Option<Value>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<Value>,
    pub repetition_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub min_pixels: Option<usize>,
    pub max_pixels: Option<usize>,
    pub mm_processor_kwargs: Option<Value>,
    /// `{"type": "regex", "regex": ...}` or a preset `{"type": "polygon" | "box"}`.
    pub response_format: Option<Value>,
    /// vLLM's `{"regex": ...}`.
    pub structured_outputs: Option<Value>,
    /// This server's own: `polygon` or `box`.
    pub constrain: Option<String>,
}

/// The fields of [`ChatRequest`].
const CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "n",
    "stop",
    "stream",
    "stream_options",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "min_pixels",
    "max_pixels",
    "mm_processor_kwargs",
    "response_format",
    "structured_outputs",
    "constrain",
];

/// OpenAI fields that never change the answer: accepted and not used.
pub const IGNORED_FIELDS: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
];

/// Refuses a request with a field that is neither read (`known`), nor without effect
/// ([`IGNORED_FIELDS`]), nor an OpenAI option at the value that asks for nothing (`logprobs`
/// false, no tools...): clients get an error naming it rather than an answer that silently
/// ignores what they asked for.
pub fn check_fields(body: &Value, known: &[&str]) -> Result<(), ApiError> {
    let Some(fields) = body.as_object() else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    for (name, value) in fields {
        if known.contains(&name.as_str()) || IGNORED_FIELDS.contains(&name.as_str()) {
            continue;
        }
        let neutral = match name.as_str() {
            "logprobs" => matches!(value, Value::Null | Value::Bool(false)),
            "top_logprobs" => value.is_null() || value.as_f64() == Some(0.0),
            "logit_bias" | "tools" | "functions" => {
                value.is_null()
                    || value.as_object().is_some_and(|o| o.is_empty())
                    || value.as_array().is_some_and(|a| a.is_empty())
            }
            "tool_choice" | "function_call" => value.is_null() || value.as_str() == Some("none"),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown field '{name}' (this route reads {})",
                    known.join(", ")
                )))
            }
        };
        if !neutral {
            return Err(ApiError::bad_request(format!(
                "'{name}' is not supported by this server (send it unset, or with its default value)"
            )));
        }
    }
    Ok(())
}

/// Decoding options shared by the chat and segment routes.
#[derive(Debug, Default, Deserialize, Clone)]
pub struct Sampling {
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub repetition_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
}

impl Sampling {
    /// The model's defaults with these options: a temperature above 0, top_p, top_k or a seed
    /// turn sampling on; temperature 0 is greedy. `max_tokens` defaults to the model's
    /// generation config (512 when it says nothing).
    pub fn config(&self, defaults: &GenerationConfig) -> Result<GenerationConfig, ApiError> {
        if self.max_tokens == Some(0) {
            return Err(ApiError::bad_request("max_tokens must be at least 1"));
        }
        SamplingOverrides {
            max_new_tokens: self.max_tokens,
            greedy: false,
            temperature: self.temperature,
            top_p: self.top_p,
            // vLLM's -1 (and 0) mean no top-k.
            top_k: self.top_k.map(|k| usize::try_from(k).unwrap_or(0)),
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
        }
        .apply(defaults)
        .map_err(ApiError::bad_request)
    }
}

/// What a chat request asks: the image, the text of the single user turn, and a system
/// message if one is given (the chat template adds its own default only when none is).
struct Turn {
    image: String,
    text: String,
    system: Option<String>,
}

/// A system message's text: a string, or text parts.
fn system_text(message: &Value) -> Result<String, ApiError> {
    match message.get("content") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(
                |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                    _ => Err(ApiError::bad_request(
                        "a system message holds text only (a string or text parts)",
                    )),
                },
            )
            .collect::<Result<Vec<&str>, ApiError>>()
            .map(|texts| texts.concat()),
        _ => Err(ApiError::bad_request("the system message needs content")),
    }
}

/// The request's turn: one user message (with one image), after at most one system message.
fn user_turn(messages: &[Value]) -> Result<Turn, ApiError> {
    let mut user = None;
    let mut system = None;
    for m in messages {
        match m.get("role").and_then(Value::as_str) {
            Some("user") if user.is_none() => user = Some(m),
            Some("user") | Some("assistant") => return Err(ApiError::bad_request(
                "one user message is supported (SimpleSeg answers one question about one image)",
            )),
            Some("system") | Some("developer") if user.is_some() => {
                return Err(ApiError::bad_request(
                    "a system message must come before the user message",
                ))
            }
            Some("system") | Some("developer") => {
                if system.replace(system_text(m)?).is_some() {
                    return Err(ApiError::bad_request("one system message is supported"));
                }
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown message role {other:?}"
                )))
            }
        }
    }
    let Some(user) = user else {
        return Err(ApiError::bad_request("messages needs a user message"));
    };
    let mut text = String::new();
    let mut image = None;
    match user.get("content") {
        Some(Value::String(s)) => text.push_str(s),
        Some(Value::Array(parts)) => {
            for part in parts {
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        text.push_str(part.get("text").and_then(Value::as_str).unwrap_or(""))
                    }
                    Some("image_url") => {
                        let url = part
                            .get("image_url")
                            .and_then(|u| u.get("url").or(Some(u)))
                            .and_then(Value::as_str)
                            .ok_or_else(|| ApiError::bad_request("image_url needs a url"))?;
                        if image.replace(url.to_string()).is_some() {
                            return Err(ApiError::bad_request(
                                "one image per request is supported",
                            ));
                        }
                    }
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "unsupported content part type {other:?} (text and image_url are)"
                        )))
                    }
                }
            }
        }
        _ => return Err(ApiError::bad_request("the user message needs content")),
    }
    let Some(image) = image else {
        return Err(ApiError::bad_request(
            "the user message needs an image (an image_url part with a data: URL)",
        ));
    };
    Ok(Turn {
        image,
        text,
        system,
    })
}

/// The constraint a request asks for, from any of the fields that can carry one: `constrain`
/// (`polygon`, `box`), OpenAI's `response_format` (`regex`, `json_schema`, `json_object`, and
/// the presets) or vLLM's `structured_outputs` (`regex`, `json`, `choice`, `json_object`).
/// JSON schemas become regular expressions (outlines-core's translation, bounded first:
/// [`crate::schema`]); Lark grammars are refused. Patterns longer than `max_bytes` are refused
/// here, before anything is built.
pub fn constraint_of(
    constrain: Option<&str>,
    response_format: Option<&Value>,
    structured: Option<&Value>,
    max_bytes: usize,
) -> Result<Option<Constraint>, ApiError> {
    let regex = |pattern: &str| {
        if pattern.len() > max_bytes {
            return Err(ApiError::bad_request(format!(
                "the regular expression has {} bytes; at most {max_bytes} are allowed",
                pattern.len()
            )));
        }
        Ok(Some(Constraint::Regex(pattern.to_string())))
    };
    let schema = |value: &Value| -> Result<Option<Constraint>, ApiError> {
        let size = serde_json::to_string(value).map_or(usize::MAX, |t| t.len());
        if size > max_bytes {
            return Err(ApiError::bad_request(format!(
                "the JSON schema has {size} bytes; at most {max_bytes} are allowed"
            )));
        }
        crate::schema::schema_regex(value, max_bytes)
            .map(|r| Some(Constraint::Regex(r)))
            .map_err(ApiError::bad_request)
    };
    if let Some(c) = constrain {
        return c.parse().map(Some).map_err(ApiError::bad_request);
    }
    if let Some(rf) = response_format {
        return match rf.get("type").and_then(Value::as_str) {
            Some("text") | None => Ok(None),
            Some("regex") => match rf.get("regex").and_then(Value::as_str) {
                Some(r) => regex(r),
                None => Err(ApiError::bad_request("response_format regex needs \"regex\"")),
            },
            Some("json_schema") => match rf.get("json_schema").and_then(|j| j.get("schema")) {
                Some(s) => schema(s),
                None => Err(ApiError::bad_request(
                    "response_format json_schema needs \"json_schema\": {\"schema\": ...}",
                )),
            },
            Some("json_object") => schema(&serde_json::json!({"type": "object"})),
            Some(preset @ ("polygon" | "box")) => preset.parse().map(Some).map_err(ApiError::bad_request),
            Some(other) => Err(ApiError::bad_request(format!(
                "response_format type {other:?} is not supported (text, regex, json_schema, json_object, polygon, box are)"
            ))),
        };
    }
    if let Some(so) = structured {
        if let Some(r) = so.get("regex").and_then(Value::as_str) {
            return regex(r);
        }
        if let Some(value) = so.get("json") {
            // vLLM takes the schema as an object or as its JSON text.
            return match value {
                Value::String(text) => {
                    if text.len() > max_bytes {
                        return Err(ApiError::bad_request(format!(
                            "the JSON schema has {} bytes; at most {max_bytes} are allowed",
                            text.len()
                        )));
                    }
                    let parsed: Value = serde_json::from_str(text).map_err(|e| {
                        ApiError::bad_request(format!("structured_outputs json: {e}"))
                    })?;
                    schema(&parsed)
                }
                v => schema(v),
            };
        }
        if let Some(choices) = so.get("choice").and_then(Value::as_array) {
            let choices = choices
                .iter()
                .map(|c| c.as_str().map(regex::escape))
                .collect::<Option<Vec<_>>>()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    ApiError::bad_request("structured_outputs choice is a list of strings")
                })?;
            return regex(&format!("(?:{})", choices.join("|")));
        }
        if so.get("json_object").and_then(Value::as_bool) == Some(true) {
            return schema(&serde_json::json!({"type": "object"}));
        }
        return Err(ApiError::bad_request(
            "structured_outputs supports regex, json, choice and json_object here (grammars are not supported)",
        ));
    }
    Ok(None)
}

/// `min_pixels` / `max_pixels`, top-level or in `mm_processor_kwargs` (which may hold
/// nothing else).
pub fn pixel_limits(
    min: Option<usize>,
    max: Option<usize>,
    kwargs: Option<&Value>,
) -> Result<PixelLimits, ApiError> {
    let mut from_kwargs = [None, None];
    if let Some(kwargs) = kwargs.filter(|k| !k.is_null()) {
        let Some(fields) = kwargs.as_object() else {
            return Err(ApiError::bad_request(
                "mm_processor_kwargs must be an object",
            ));
        };
        for (name, value) in fields {
            let slot = match name.as_str() {
                "min_pixels" => 0,
                "max_pixels" => 1,
                other => {
                    return Err(ApiError::bad_request(format!(
                        "mm_processor_kwargs '{other}' is not supported (min_pixels and max_pixels are)"
                    )))
                }
            };
            from_kwargs[slot] = Some(
                value
                    .as_u64()
                    .and_then(|v| usize::try_from(v).ok())
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "mm_processor_kwargs {name} must be a whole number"
                        ))
                    })?,
            );
        }
    }
    Ok(PixelLimits {
        min_pixels: min.or(from_kwargs[0]),
        max_pixels: max.or(from_kwargs[1]),
    })
}

/// The stop strings: at most [`MAX_STOPS`] of at most [`MAX_STOP_BYTES`] bytes.
fn stops(stop: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let list = match stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::bad_request("stop must be strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::bad_request(
                "stop must be a string or a list of strings",
            ))
        }
    };
    if list.len() > MAX_STOPS || list.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::bad_request(format!(
            "stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_BYTES} bytes each"
        )));
    }
    Ok(list)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads a JSON body: a 400 naming the problem, unknown fields refused ([`check_fields`]).
pub fn read_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    known: &[&str],
) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not JSON: {e}")))?;
    check_fields(&value, known)?;
    serde_json::from_value(value).map_err(|e| ApiError::bad_request(format!("{e}")))
}

/// A request's timeout as an answer.
pub fn timed_out() -> ApiError {
    ApiError::new(StatusCode::GATEWAY_TIMEOUT, "the request took too long")
}

pub async fn completions(
    State(state): State<AppState>,
    admitted: Option<Extension<Admitted>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: ChatRequest = read_body(&body, CHAT_FIELDS)?;
    drop(body);
    check_model(&state, req.model.as_deref())?;
    let model = state.model()?;
    let turn = user_turn(&req.messages)?;
    let n = req.n.unwrap_or(1);
    if n == 0 || n > 16 {
        return Err(ApiError::bad_request("n must be from 1 to 16"));
    }
    let sampling = Sampling {
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        seed: req.seed,
        repetition_penalty: req.repetition_penalty,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
    };
    let config = sampling.config(&model.defaults)?;
    let configs: Vec<GenerationConfig> = (0..n as u64)
        .map(|i| GenerationConfig {
            seed: config.seed.wrapping_add(i),
            ..config.clone()
        })
        .collect();
    let constraint = constraint_of(
        req.constrain.as_deref(),
        req.response_format.as_ref(),
        req.structured_outputs.as_ref(),
        state.options.pattern_limits.max_pattern_bytes,
    )?;
    let stop_strings = stops(req.stop.as_ref())?;
    let job = Job {
        image: turn.image,
        ask: Ask::Chat {
            text: turn.text,
            system: turn.system,
        },
        pixels: pixel_limits(
            req.min_pixels,
            req.max_pixels,
            req.mm_processor_kwargs.as_ref(),
        )?,
        configs,
        max_tokens_given: sampling.max_tokens.is_some(),
        constraint,
    };
    let deadline = tokio::time::Instant::now() + state.options.request_timeout;
    let queued = tokio::time::timeout_at(deadline, queue(&state, admitted.map(|e| e.0), job))
        .await
        .map_err(|_| timed_out())??;
    let submitted = queued.submitted;
    let id = format!("chatcmpl-{:016x}", rand_id());
    let name = state.options.served_model_name.clone();
    let created = now();
    if req.stream {
        let include_usage = req
            .stream_options
            .as_ref()
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        return Ok(stream_response(
            submitted,
            n,
            stop_strings,
            include_usage,
            id,
            name,
            created,
            deadline,
        ));
    }
    let (answers, prompt_tokens) =
        tokio::time::timeout_at(deadline, collect(submitted, n, &stop_strings))
            .await
            .map_err(|_| timed_out())??;
    let completion_tokens: usize = answers.iter().map(|a| a.output.token_ids.len()).sum();
    let choices: Vec<Value> = answers
        .iter()
        .enumerate()
        .map(|(i, a)| {
            json!({
                "index": i,
                "message": {"role": "assistant", "content": a.text},
                "finish_reason": a.finish_reason,
                "logprobs": null,
            })
        })
        .collect();
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
    .into_response())
}

/// A random-looking id (time and a counter; ids need only be unique per server).
pub fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let c = COUNTER.fetch_add(1, Ordering::Relaxed);
    (t ^ c.wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(17)
}

#[allow(clippy::too_many_arguments)]
fn stream_response(
    mut submitted: crate::stream::Submitted,
    n: usize,
    stop_strings: Vec<String>,
    include_usage: bool,
    id: String,
    model: String,
    created: u64,
    deadline: tokio::time::Instant,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<SseEvent, Infallible>>();
    tokio::spawn(async move {
        let chunk = |choices: Value| -> SseEvent {
            SseEvent::default().data(
                json!({
                    "id": id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": choices,
                })
                .to_string(),
            )
        };
        let mut filters: Vec<StopFilter> = (0..n).map(|_| StopFilter::new(&stop_strings)).collect();
        let mut open = n;
        let mut prompt_tokens = 0;
        let mut completion_tokens = 0;
        for i in 0..n {
            let _ = tx.send(Ok(chunk(json!([{
                "index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": null
            }]))));
        }
        while open > 0 {
            let event = match tokio::time::timeout_at(deadline, submitted.events.recv()).await {
                Ok(Some(e)) => e,
                Ok(None) => break,
                Err(_) => {
                    let _ = tx.send(Ok(SseEvent::default().data(
                        json!({"error": {"message": "the request took too long", "code": 504}})
                            .to_string(),
                    )));
                    break;
                }
            };
            match event {
                Event::Started { prompt_tokens: p } => prompt_tokens = p,
                Event::Token { answer, text, .. } => {
                    completion_tokens += 1;
                    let Some(f) = filters.get_mut(answer) else {
                        continue;
                    };
                    let shown = f.push(&text);
                    if f.stopped {
                        submitted.cancel(answer);
                    }
                    if !shown.is_empty()
                        && tx
                            .send(Ok(chunk(json!([{
                                "index": answer, "delta": {"content": shown}, "finish_reason": null
                            }]))))
                            .is_err()
                    {
                        return;
                    }
                }
                Event::Finished { answer, output } => {
                    open -= 1;
                    let Some(f) = filters.get_mut(answer) else {
                        continue;
                    };
                    let rest = f.finish();
                    let reason = finish_reason(&output, f.stopped);
                    let _ = tx.send(Ok(chunk(json!([{
                        "index": answer, "delta": {"content": rest}, "finish_reason": reason
                    }]))));
                }
                Event::Failed(message) => {
                    let _ = tx.send(Ok(SseEvent::default()
                        .data(json!({"error": {"message": message, "code": 400}}).to_string())));
                    break;
                }
            }
        }
        if include_usage {
            let _ = tx.send(Ok(SseEvent::default().data(
                json!({
                    "id": id, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": [],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                })
                .to_string(),
            )));
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]")));
    });
    Sse::new(UnboundedReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}
