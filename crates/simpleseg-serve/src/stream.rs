//! From a handler to the model thread and back: a request is queued on the scheduler and its
//! events arrive on an async channel. Dropping the [`Submitted`] handle (the client went away)
//! cancels whatever it still decodes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use image::RgbImage;
use simpleseg_engine::scheduler::{cancel_flags, Constraint, Event, Request, SubmitError};
use simpleseg_engine::{GenerationConfig, GenerationOutput, PixelLimits, StopReason};
use tokio::sync::mpsc;

use crate::{ApiError, AppState};

/// A request on its way through the model.
pub struct Submitted {
    pub events: mpsc::UnboundedReceiver<Event>,
    cancel: Arc<Vec<AtomicBool>>,
}

impl Submitted {
    /// Stops decoding answer `i` (e.g. a stop string appeared).
    pub fn cancel(&self, i: usize) {
        if let Some(c) = self.cancel.get(i) {
            c.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for Submitted {
    fn drop(&mut self) {
        for c in self.cancel.iter() {
            c.store(true, Ordering::Relaxed);
        }
    }
}

/// What a generation request asks for.
pub struct Job {
    pub image: RgbImage,
    pub prompt: String,
    pub pixels: PixelLimits,
    pub configs: Vec<GenerationConfig>,
    pub constraint: Option<Constraint>,
}

/// Queues `job`: 429 when the queue is full.
pub fn submit(state: &AppState, job: Job) -> Result<Submitted, ApiError> {
    let model = state.model()?;
    let (tx, rx) = mpsc::unbounded_channel();
    let cancel = cancel_flags(job.configs.len());
    let request = Request {
        image: job.image,
        prompt: job.prompt,
        pixels: job.pixels,
        configs: job.configs,
        constraint: job.constraint,
        cancel: cancel.clone(),
        events: Box::new(move |event| tx.send(event).is_ok()),
    };
    match model.scheduler.submit(request) {
        Ok(()) => Ok(Submitted { events: rx, cancel }),
        Err(SubmitError::Full) => Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "the request queue is full; retry later",
        )),
        Err(SubmitError::Stopped) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model has stopped",
        )),
    }
}

/// Stop strings over one answer's streamed text: the text that is certainly part of the
/// answer is released; a tail that could begin a stop string is held back until it is known.
#[derive(Debug, Default)]
pub struct StopFilter {
    stops: Vec<String>,
    text: String,
    released: usize,
    pub stopped: bool,
}

impl StopFilter {
    pub fn new(stops: Vec<String>) -> Self {
        StopFilter {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..StopFilter::default()
        }
    }

    /// Adds generated text; returns what may be shown now.
    pub fn push(&mut self, delta: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.text.push_str(delta);
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min();
        if let Some(at) = found {
            self.stopped = true;
            self.text.truncate(at);
            return self.release(at);
        }
        // Hold back the longest tail that is a prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for n in (1..s.len()).rev() {
                if n <= self.text.len()
                    && self.text.is_char_boundary(self.text.len() - n)
                    && s.as_bytes()
                        .starts_with(&self.text.as_bytes()[self.text.len() - n..])
                {
                    hold = hold.max(n);
                    break;
                }
            }
        }
        self.release(self.text.len() - hold)
    }

    fn release(&mut self, upto: usize) -> String {
        let upto = upto.max(self.released);
        let out = self.text[self.released..upto].to_string();
        self.released = upto;
        out
    }

    /// The rest of the text at the end of the answer.
    pub fn finish(&mut self) -> String {
        let end = self.text.len();
        self.release(end)
    }

    /// The answer's text (cut at a stop string).
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// One finished answer.
pub struct Answer {
    pub text: String,
    pub output: GenerationOutput,
    /// `stop` (end of sequence or a stop string) or `length`.
    pub finish_reason: &'static str,
}

/// The OpenAI finish reason of an answer.
pub fn finish_reason(output: &GenerationOutput, stopped_by_string: bool) -> &'static str {
    if stopped_by_string {
        return "stop";
    }
    match output.stop_reason {
        StopReason::MaxTokens => "length",
        StopReason::Eos | StopReason::Cancelled => "stop",
    }
}

/// Waits for every answer of a submitted request (stop strings applied).
pub async fn collect(
    mut submitted: Submitted,
    n: usize,
    stops: &[String],
) -> Result<(Vec<Answer>, usize), ApiError> {
    let mut filters: Vec<StopFilter> = (0..n).map(|_| StopFilter::new(stops.to_vec())).collect();
    let mut answers: Vec<Option<Answer>> = (0..n).map(|_| None).collect();
    let mut prompt_tokens = 0;
    while answers.iter().any(Option::is_none) {
        let Some(event) = submitted.events.recv().await else {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the model thread stopped while answering",
            ));
        };
        match event {
            Event::Started { prompt_tokens: p } => prompt_tokens = p,
            Event::Token { answer, text, .. } => {
                if let Some(f) = filters.get_mut(answer) {
                    f.push(&text);
                    if f.stopped {
                        submitted.cancel(answer);
                    }
                }
            }
            Event::Finished { answer, output } => {
                if let (Some(f), Some(slot)) = (filters.get_mut(answer), answers.get_mut(answer)) {
                    f.finish();
                    *slot = Some(Answer {
                        text: f.text().to_string(),
                        finish_reason: finish_reason(&output, f.stopped),
                        output,
                    });
                }
            }
            Event::Failed(message) => return Err(ApiError::bad_request(message)),
        }
    }
    Ok((answers.into_iter().flatten().collect(), prompt_tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_cut_and_hold_back() {
        let mut f = StopFilter::new(vec!["]]".into()]);
        assert_eq!(f.push("[[0.1, 0.2]"), "[[0.1, 0.2");
        assert_eq!(f.push(", [0.3"), "], [0.3");
        assert_eq!(f.push("]]."), "");
        assert!(f.stopped);
        assert_eq!(f.text(), "[[0.1, 0.2], [0.3");
        let mut g = StopFilter::new(vec!["STOP".into()]);
        assert_eq!(g.push("abc ST"), "abc ");
        assert_eq!(g.push("ill"), "STill");
        assert_eq!(g.finish(), "");
        assert!(!g.stopped);
    }
}
