//! Continuous batching: requests that arrive at any time decode together.
//!
//! One thread owns the model. Between two decoding steps it takes the requests that have
//! arrived (up to a batch limit), prefills each and adds its rows to the running session
//! ([`Session::add`]); each step then picks one token per row and feeds them all at once; a row
//! leaves ([`Session::retain`]) when it stops, when it is cancelled or when its receiver is
//! gone. A row's numbers do not depend on the other rows (see [`crate::runtime::session`]), so every
//! answer is the one its request gets alone.
//!
//! Requests wait in a bounded queue: [`Scheduler::submit`] refuses one when the queue is full
//! (a server answers 429), and never blocks.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::DType;

use crate::runtime::constraint::Grammar;
use crate::runtime::decoding::Decoding;
use crate::runtime::model::{GenerationOutput, Prompt, Session, StopReason, Timings, VisionLanguageModel};
use crate::runtime::sampling::GenerationConfig;
use crate::text::IncrementalText;

pub use crate::runtime::constraint::Constraint;

/// One request: a prepared prompt (see [`VisionLanguageModel::prepare`]), one decoding config
/// per answer wanted, and the grammar answers must match. Everything that can be done without
/// the model (images, tokenizing, compiling constraints) is done before, on the caller's
/// threads: the model thread only prefills and decodes.
pub struct Request {
    pub prompt: Prompt,
    pub configs: Vec<GenerationConfig>,
    pub grammar: Option<Arc<Grammar>>,
    /// One flag per answer: set to stop decoding it (it leaves at the next step).
    pub cancel: Arc<Vec<AtomicBool>>,
    /// Where the request's events go, on the model thread; returning `false` (the listener is
    /// gone) cancels the request.
    pub events: EventSink,
}

/// Receives a request's events.
pub type EventSink = Box<dyn FnMut(Event) -> bool + Send>;

/// Cancel flags for `n` answers.
pub fn cancel_flags(n: usize) -> Arc<Vec<AtomicBool>> {
    Arc::new((0..n).map(|_| AtomicBool::new(false)).collect())
}

/// What a request hears back.
#[derive(Clone, Debug)]
pub enum Event {
    /// The prompt was prefilled: its token count.
    Started { prompt_tokens: usize },
    /// Answer `answer` chose `token`; `text` is the text it completes (may be empty while a
    /// character's bytes are incomplete).
    Token {
        answer: usize,
        token: u32,
        text: String,
    },
    /// Answer `answer` is complete.
    Finished {
        answer: usize,
        output: GenerationOutput,
    },
    /// The request failed; no other event follows.
    Failed(String),
}

/// Why a request was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full.
    Full,
    /// The model thread has stopped.
    Stopped,
}

/// Limits of the scheduler.
#[derive(Clone, Copy, Debug)]
pub struct SchedulerOptions {
    /// Rows decoded together at most.
    pub max_batch_rows: usize,
    /// Requests waiting at most.
    pub queue: usize,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions {
            max_batch_rows: 16,
            queue: 64,
        }
    }
}

/// Figures the scheduler keeps (for metrics).
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub queued: AtomicUsize,
    pub running_rows: AtomicUsize,
    pub prompt_tokens: AtomicUsize,
    pub generated_tokens: AtomicUsize,
    pub finished_answers: AtomicUsize,
}

/// The handle to the model thread.
pub struct Scheduler {
    queue: SyncSender<Request>,
    stats: Arc<SchedulerStats>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Scheduler {
    /// Starts the model thread on a loaded model (shared: callers prepare prompts with it).
    /// The thread ends when every [`Scheduler`] handle is dropped and the requests already
    /// queued are answered.
    pub fn start(model: Arc<dyn VisionLanguageModel>, options: SchedulerOptions) -> Self {
        let (queue, incoming) = mpsc::sync_channel(options.queue.max(1));
        let stats = Arc::new(SchedulerStats::default());
        let thread_stats = stats.clone();
        let handle = std::thread::Builder::new()
            .name("simpleseg-model".into())
            .spawn(move || run(model.as_ref(), incoming, options, &thread_stats))
            .ok();
        Scheduler {
            queue,
            stats,
            handle,
        }
    }

    /// Queues a request; never blocks.
    pub fn submit(&self, request: Request) -> Result<(), SubmitError> {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        match self.queue.try_send(request) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::Full,
                    TrySendError::Disconnected(_) => SubmitError::Stopped,
                })
            }
        }
    }

    /// The scheduler's counters.
    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }

    /// Stops taking requests and waits until the queued and running ones are answered.
    pub fn shutdown(mut self) {
        let handle = self.handle.take();
        drop(self);
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// One answer being decoded.
struct Row {
    request: usize,
    answer: usize,
    decoding: Decoding,
    text: IncrementalText,
    prefill_ms: f64,
    prompt_tokens: usize,
    decode_start: Instant,
}

/// A request being decoded.
struct Active {
    cancel: Arc<Vec<AtomicBool>>,
    events: EventSink,
    open_rows: usize,
}

fn run(
    model: &dyn VisionLanguageModel,
    incoming: Receiver<Request>,
    options: SchedulerOptions,
    stats: &SchedulerStats,
) {
    let mut session: Option<Box<dyn Session + '_>> = None;
    let mut rows: Vec<Row> = Vec::new();
    let mut requests: Vec<Option<Active>> = Vec::new();
    let mut closed = false;
    loop {
        // Admit what has arrived: wait when idle, else only take what is there.
        while rows.len() < options.max_batch_rows.max(1) && !closed {
            let next = if rows.is_empty() {
                incoming
                    .recv_timeout(Duration::from_millis(200))
                    .map_err(|e| e == RecvTimeoutError::Disconnected)
            } else {
                incoming
                    .try_recv()
                    .map_err(|e| e == mpsc::TryRecvError::Disconnected)
            };
            let mut request = match next {
                Ok(r) => r,
                Err(true) => {
                    closed = true;
                    break;
                }
                Err(false) => break,
            };
            stats.queued.fetch_sub(1, Ordering::Relaxed);
            if request.configs.is_empty()
                || request.cancel.iter().all(|c| c.load(Ordering::Relaxed))
            {
                continue;
            }
            let id = requests.len();
            match admit(model, &request, id, &mut session) {
                Ok(new_rows) => {
                    let prompt_tokens = new_rows.first().map_or(0, |r| r.prompt_tokens);
                    stats
                        .prompt_tokens
                        .fetch_add(prompt_tokens, Ordering::Relaxed);
                    let listening = (request.events)(Event::Started { prompt_tokens });
                    if !listening {
                        for c in request.cancel.iter() {
                            c.store(true, Ordering::Relaxed);
                        }
                    }
                    requests.push(Some(Active {
                        cancel: request.cancel,
                        events: request.events,
                        open_rows: new_rows.len(),
                    }));
                    rows.extend(new_rows);
                }
                Err(e) => {
                    (request.events)(Event::Failed(e.to_string()));
                    requests.push(None);
                }
            }
        }
        if rows.is_empty() {
            session = None;
            requests.clear();
            if closed {
                return;
            }
            continue;
        }
        stats.running_rows.store(rows.len(), Ordering::Relaxed);
        if let Err(e) = step(model, &mut session, &mut rows, &mut requests, stats) {
            // A failed step fails every running request; the session starts afresh.
            for mut active in requests.iter_mut().filter_map(Option::take) {
                (active.events)(Event::Failed(e.to_string()));
            }
            rows.clear();
            session = None;
        }
        stats.running_rows.store(rows.len(), Ordering::Relaxed);
    }
}

/// Prefills a request, adding its rows to the session.
fn admit<'m>(
    model: &'m dyn VisionLanguageModel,
    request: &Request,
    id: usize,
    session: &mut Option<Box<dyn Session + 'm>>,
) -> crate::error::Result<Vec<Row>> {
    let prompt = &request.prompt;
    // Checked before the prefill: the rows' decoding states refuse a prompt that fills the
    // context.
    let decodings = request
        .configs
        .iter()
        .map(|config| {
            Decoding::new(
                config,
                &prompt.input_ids,
                model.max_positions(),
                request.grammar.clone(),
            )
        })
        .collect::<crate::error::Result<Vec<_>>>()?;
    let start = Instant::now();
    let copies = request.configs.len();
    match session.as_mut() {
        None => *session = Some(model.start(prompt, copies)?),
        Some(s) => s.add(prompt, copies)?,
    }
    let prefill_ms = start.elapsed().as_secs_f64() * 1e3;
    Ok(decodings
        .into_iter()
        .enumerate()
        .map(|(answer, decoding)| Row {
            request: id,
            answer,
            decoding,
            text: IncrementalText::default(),
            prefill_ms,
            prompt_tokens: prompt.input_ids.len(),
            decode_start: Instant::now(),
        })
        .collect())
}

/// Picks a token for every row, lets finished rows go and feeds the others.
fn step(
    model: &dyn VisionLanguageModel,
    session: &mut Option<Box<dyn Session + '_>>,
    rows: &mut Vec<Row>,
    requests: &mut [Option<Active>],
    stats: &SchedulerStats,
) -> crate::error::Result<()> {
    let Some(s) = session.as_mut() else {
        return Ok(());
    };
    let logits = s.logits().to_dtype(DType::F32)?;
    let mut tokens = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter_mut().enumerate() {
        let cancelled = requests[row.request].as_ref().is_none_or(|a| {
            a.cancel
                .get(row.answer)
                .is_none_or(|c| c.load(Ordering::Relaxed))
        });
        if cancelled {
            row.decoding.stop_reason = Some(StopReason::Cancelled);
        }
        if row.decoding.stop_reason.is_some() {
            continue;
        }
        let Some(token) = row.decoding.choose(logits.get(i)?.to_vec1()?) else {
            continue;
        };
        stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        // What this token adds to the text (nothing while a character is incomplete).
        let delta = row
            .text
            .push(model.tokenizer(), token)?
            .unwrap_or_default();
        if let Some(active) = requests[row.request].as_mut() {
            let event = Event::Token {
                answer: row.answer,
                token,
                text: delta,
            };
            if !(active.events)(event) {
                row.decoding.stop_reason = Some(StopReason::Cancelled);
                continue;
            }
        }
        if row.decoding.stop_reason.is_none() {
            tokens.push(token);
        }
    }
    let keep: Vec<bool> = rows
        .iter()
        .map(|r| r.decoding.stop_reason.is_none())
        .collect();
    if keep.iter().any(|k| !k) {
        s.retain(&keep)?;
        let (still, finished): (Vec<Row>, Vec<Row>) = std::mem::take(rows)
            .into_iter()
            .partition(|r| r.decoding.stop_reason.is_none());
        *rows = still;
        for row in finished {
            finish(model, row, requests, stats)?;
        }
    }
    if !rows.is_empty() {
        s.feed(&tokens)?;
    } else {
        *session = None;
    }
    Ok(())
}

fn finish(
    model: &dyn VisionLanguageModel,
    row: Row,
    requests: &mut [Option<Active>],
    stats: &SchedulerStats,
) -> crate::error::Result<()> {
    let Some(active) = requests[row.request].as_mut() else {
        return Ok(());
    };
    let decode_ms = row.decode_start.elapsed().as_secs_f64() * 1e3;
    let output = GenerationOutput {
        text: model.tokenizer().decode(&row.decoding.generated)?,
        prompt_tokens: row.prompt_tokens,
        stop_reason: row.decoding.stop_reason.unwrap_or(StopReason::MaxTokens),
        timings: Timings {
            prefill_ms: row.prefill_ms,
            decode_ms,
            decode_tokens_per_s: row.decoding.generated.len() as f64 / (decode_ms / 1e3).max(1e-9),
        },
        token_ids: row.decoding.generated,
    };
    stats.finished_answers.fetch_add(1, Ordering::Relaxed);
    (active.events)(Event::Finished {
        answer: row.answer,
        output,
    });
    active.open_rows -= 1;
    if active.open_rows == 0 {
        requests[row.request] = None;
    }
    Ok(())
}
