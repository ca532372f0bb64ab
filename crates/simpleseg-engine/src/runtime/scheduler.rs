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
use std::time::Duration;

use crate::error::Result;
use crate::runtime::constraint::Grammar;
use crate::runtime::generator::{Finished, Generator, Listener};
use crate::runtime::model::{GenerationOutput, Prompt, VisionLanguageModel};
use crate::runtime::sampling::GenerationConfig;
use crate::text::{IncrementalText, TextTokenizer};

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

/// Which request and answer a row decodes, and the text it has given out.
struct Tag {
    request: usize,
    answer: usize,
    text: IncrementalText,
}

/// A request being decoded.
struct Active {
    cancel: Arc<Vec<AtomicBool>>,
    events: EventSink,
    open_rows: usize,
}

/// The requests' listener: cancel flags in, token events out.
struct Requests<'a> {
    active: Vec<Option<Active>>,
    tokenizer: &'a TextTokenizer,
    stats: &'a SchedulerStats,
}

impl Listener<Tag> for Requests<'_> {
    fn cancelled(&mut self, tag: &Tag) -> bool {
        self.active[tag.request].as_ref().is_none_or(|a| {
            a.cancel
                .get(tag.answer)
                .is_none_or(|c| c.load(Ordering::Relaxed))
        })
    }

    fn token(&mut self, tag: &mut Tag, token: u32) -> Result<bool> {
        self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        // What this token adds to the text (nothing while a character is incomplete).
        let delta = tag.text.push(self.tokenizer, token)?.unwrap_or_default();
        Ok(match self.active[tag.request].as_mut() {
            Some(active) => (active.events)(Event::Token {
                answer: tag.answer,
                token,
                text: delta,
            }),
            None => true,
        })
    }
}

impl Requests<'_> {
    /// Hands a finished answer to its request.
    fn finish(&mut self, finished: Finished<Tag>) -> Result<()> {
        let (tag, output) = finished.output(self.tokenizer)?;
        self.stats.finished_answers.fetch_add(1, Ordering::Relaxed);
        let Some(active) = self.active[tag.request].as_mut() else {
            return Ok(());
        };
        (active.events)(Event::Finished {
            answer: tag.answer,
            output,
        });
        active.open_rows -= 1;
        if active.open_rows == 0 {
            self.active[tag.request] = None;
        }
        Ok(())
    }
}

fn run(
    model: &dyn VisionLanguageModel,
    incoming: Receiver<Request>,
    options: SchedulerOptions,
    stats: &SchedulerStats,
) {
    let mut generator: Generator<Tag> = Generator::new(model);
    let mut requests = Requests {
        active: Vec::new(),
        tokenizer: model.tokenizer(),
        stats,
    };
    let mut closed = false;
    loop {
        // Admit what has arrived: wait when idle, else only take what is there.
        while generator.live() < options.max_batch_rows.max(1) && !closed {
            let next = if generator.live() == 0 {
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
            let id = requests.active.len();
            let rows = request
                .configs
                .iter()
                .enumerate()
                .map(|(answer, config)| {
                    let tag = Tag {
                        request: id,
                        answer,
                        text: IncrementalText::default(),
                    };
                    (tag, config.clone())
                })
                .collect();
            match generator.add(&request.prompt, rows, request.grammar.clone()) {
                Ok(()) => {
                    let prompt_tokens = request.prompt.input_ids.len();
                    stats
                        .prompt_tokens
                        .fetch_add(prompt_tokens, Ordering::Relaxed);
                    let listening = (request.events)(Event::Started { prompt_tokens });
                    if !listening {
                        for c in request.cancel.iter() {
                            c.store(true, Ordering::Relaxed);
                        }
                    }
                    requests.active.push(Some(Active {
                        cancel: request.cancel,
                        events: request.events,
                        open_rows: request.configs.len(),
                    }));
                }
                Err(e) => {
                    (request.events)(Event::Failed(e.to_string()));
                    requests.active.push(None);
                }
            }
        }
        if generator.live() == 0 {
            requests.active.clear();
            if closed {
                return;
            }
            continue;
        }
        stats
            .running_rows
            .store(generator.live(), Ordering::Relaxed);
        let stepped = generator.step(&mut requests).and_then(|done| {
            // Counted before any answer goes out: a client holding its answer never sees its
            // row still running.
            stats
                .running_rows
                .store(generator.live(), Ordering::Relaxed);
            done.into_iter().try_for_each(|f| requests.finish(f))
        });
        if let Err(e) = stepped {
            // A failed step fails every running request; the generator starts afresh.
            generator = Generator::new(model);
            stats.running_rows.store(0, Ordering::Relaxed);
            for mut active in requests.active.iter_mut().filter_map(Option::take) {
                (active.events)(Event::Failed(e.to_string()));
            }
        }
    }
}
