//! From a handler to the model thread and back: a request is queued on the scheduler and its
//! events arrive on an async channel. Dropping the [`Submitted`] handle (the client went away)
//! cancels whatever it still decodes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use simpleseg_engine::runtime::constraint::Grammar;
use simpleseg_engine::runtime::scheduler::{cancel_flags, Event, Request, SubmitError};
use simpleseg_engine::{GenerationConfig, GenerationOutput, Prompt};
use tokio::sync::mpsc;

use crate::admission::Admission;
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

/// Queues a prepared request: 429 when the queue is full. The admission is held until the
/// model takes the request (or it fails), then its budgets are free for others.
pub fn submit(
    state: &AppState,
    prompt: Prompt,
    configs: Vec<GenerationConfig>,
    grammar: Option<Arc<Grammar>>,
    admission: Admission,
) -> Result<Submitted, ApiError> {
    let model = state.model()?;
    let (tx, rx) = mpsc::unbounded_channel();
    let cancel = cancel_flags(configs.len());
    let mut admission = Some(admission);
    let request = Request {
        prompt,
        configs,
        grammar,
        cancel: cancel.clone(),
        events: Box::new(move |event| {
            if matches!(event, Event::Started { .. } | Event::Failed(_)) {
                admission.take();
            }
            tx.send(event).is_ok()
        }),
    };
    match model.scheduler.submit(request) {
        Ok(()) => Ok(Submitted { events: rx, cancel }),
        Err(SubmitError::Full) => Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "the request queue is full; retry later",
        )
        .retry_after(1)),
        Err(SubmitError::Stopped) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model has stopped",
        )),
    }
}

/// At most this many stop strings, of at most [`MAX_STOP_BYTES`] each.
pub const MAX_STOPS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;

/// A stop string and where the text is in it: Knuth-Morris-Pratt matching, so that each
/// byte of the answer costs a step per stop string, whatever their lengths.
#[derive(Debug)]
struct Stop {
    bytes: Vec<u8>,
    /// `fail[i]`: the longest proper prefix of `bytes[..=i]` that is also its suffix.
    fail: Vec<usize>,
    /// Length of the longest suffix of the text so far that begins this stop string.
    matched: usize,
}

impl Stop {
    fn new(s: &str) -> Self {
        let bytes = s.as_bytes().to_vec();
        let mut fail = vec![0; bytes.len()];
        let mut k = 0;
        for i in 1..bytes.len() {
            while k > 0 && bytes[i] != bytes[k] {
                k = fail[k - 1];
            }
            if bytes[i] == bytes[k] {
                k += 1;
            }
            fail[i] = k;
        }
        Stop {
            bytes,
            fail,
            matched: 0,
        }
    }

    /// Feeds one byte; true when the stop string is complete.
    fn step(&mut self, b: u8) -> bool {
        while self.matched > 0 && self.bytes[self.matched] != b {
            self.matched = self.fail[self.matched - 1];
        }
        if self.bytes[self.matched] == b {
            self.matched += 1;
        }
        if self.matched == self.bytes.len() {
            self.matched = self.fail[self.matched - 1];
            return true;
        }
        false
    }
}

/// Stop strings over one answer's streamed text: the text that is certainly part of the
/// answer is released; a tail that could begin a stop string is held back until it is known.
/// Time is linear in the text (each byte is a step per stop string).
#[derive(Debug, Default)]
pub struct StopFilter {
    stops: Vec<Stop>,
    text: String,
    released: usize,
    pub stopped: bool,
}

impl StopFilter {
    pub fn new(stops: &[String]) -> Self {
        StopFilter {
            stops: stops
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| Stop::new(s))
                .collect(),
            ..StopFilter::default()
        }
    }

    /// Adds generated text; returns what may be shown now.
    pub fn push(&mut self, delta: &str) -> String {
        if self.stopped {
            return String::new();
        }
        let offset = self.text.len();
        self.text.push_str(delta);
        // The earliest start among the stop strings that complete in this piece.
        let mut found: Option<usize> = None;
        for (i, &b) in delta.as_bytes().iter().enumerate() {
            for stop in &mut self.stops {
                if stop.step(b) {
                    let start = offset + i + 1 - stop.bytes.len();
                    found = Some(found.map_or(start, |f| f.min(start)));
                }
            }
        }
        if let Some(at) = found {
            self.stopped = true;
            self.text.truncate(at);
            return self.release(at);
        }
        // A stop string starts with a whole character, so the held tail starts on one.
        let hold = self.stops.iter().map(|s| s.matched).max().unwrap_or(0);
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
    simpleseg_engine::runtime::segment::finish_reason(output.stop_reason)
}

/// Waits for every answer of a submitted request (stop strings applied).
pub async fn collect(
    mut submitted: Submitted,
    n: usize,
    stops: &[String],
) -> Result<(Vec<Answer>, usize), ApiError> {
    let mut filters: Vec<StopFilter> = (0..n).map(|_| StopFilter::new(stops)).collect();
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
        let mut f = StopFilter::new(&["]]".into()]);
        assert_eq!(f.push("[[0.1, 0.2]"), "[[0.1, 0.2");
        assert_eq!(f.push(", [0.3"), "], [0.3");
        assert_eq!(f.push("]]."), "");
        assert!(f.stopped);
        assert_eq!(f.text(), "[[0.1, 0.2], [0.3");
        let mut g = StopFilter::new(&["STOP".into()]);
        assert_eq!(g.push("abc ST"), "abc ");
        assert_eq!(g.push("ill"), "STill");
        assert_eq!(g.finish(), "");
        assert!(!g.stopped);
    }

    /// The plain rule (search the whole text after every piece, hold back the longest tail
    /// that begins a stop string) on random texts, pieces and stop strings with repeats.
    #[test]
    fn stop_strings_match_the_plain_rule() {
        let mut seed = 7u64;
        let mut next = |n: usize| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize % n
        };
        for _ in 0..2000 {
            let alphabet = ['a', 'b', 'é'];
            let word = |len: usize, next: &mut dyn FnMut(usize) -> usize| -> String {
                (0..len).map(|_| alphabet[next(3)]).collect()
            };
            let stops: Vec<String> = (0..1 + next(3))
                .map(|_| word(1 + next(4), &mut next))
                .collect();
            let pieces: Vec<String> = (0..1 + next(6)).map(|_| word(next(4), &mut next)).collect();
            let mut f = StopFilter::new(&stops);
            let mut shown = String::new();
            let mut text = String::new();
            let mut expected_stop = None;
            for piece in &pieces {
                shown.push_str(&f.push(piece));
                if expected_stop.is_none() {
                    text.push_str(piece);
                    expected_stop = stops.iter().filter_map(|s| text.find(s.as_str())).min();
                }
                if f.stopped {
                    break;
                }
                let t = text.as_str();
                let hold = stops
                    .iter()
                    .flat_map(|s| {
                        (1..s.len()).filter(move |&n| {
                            n <= t.len()
                                && t.is_char_boundary(t.len() - n)
                                && s.as_bytes().starts_with(&t.as_bytes()[t.len() - n..])
                        })
                    })
                    .max()
                    .unwrap_or(0);
                assert_eq!(shown, text[..text.len() - hold], "{stops:?} {pieces:?}");
            }
            shown.push_str(&f.finish());
            match expected_stop {
                Some(at) => {
                    assert!(f.stopped);
                    assert_eq!(shown, text[..at], "{stops:?} {pieces:?}");
                }
                None => assert_eq!(shown, text),
            }
        }
    }
}
