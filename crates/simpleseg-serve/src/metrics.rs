//! `GET /metrics`: Prometheus text exposition of requests by route and status, latencies, the
//! queue and the tokens processed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::AppState;

/// Latency histogram bounds, seconds.
const BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Counters kept by the server.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latencies: Mutex<BTreeMap<&'static str, Histogram>>,
    pub(crate) connections_open: AtomicUsize,
    pub(crate) connections_refused: AtomicUsize,
}

/// The route a path counts under (unknown paths share one label, so the label set is bounded).
pub fn route_label(path: &str) -> &'static str {
    match path {
        "/" => "/",
        "/health" => "/health",
        "/metrics" => "/metrics",
        "/v1/models" => "/v1/models",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/segment" => "/v1/segment",
        _ => "other",
    }
}

impl Metrics {
    pub fn count(&self, route: &'static str, status: u16) {
        if let Ok(mut r) = self.requests.lock() {
            *r.entry((route, status)).or_default() += 1;
        }
    }

    pub fn latency(&self, route: &'static str, elapsed: Duration) {
        let s = elapsed.as_secs_f64();
        if let Ok(mut l) = self.latencies.lock() {
            let h = l.entry(route).or_default();
            for (i, b) in BUCKETS.iter().enumerate() {
                if s <= *b {
                    h.counts[i] += 1;
                }
            }
            h.count += 1;
            h.sum += s;
        }
    }
}

pub async fn render(State(state): State<AppState>) -> impl IntoResponse {
    let mut out = String::new();
    out.push_str("# HELP simpleseg_requests_total Requests by route and status.\n");
    out.push_str("# TYPE simpleseg_requests_total counter\n");
    if let Ok(r) = state.metrics.requests.lock() {
        for ((route, status), n) in r.iter() {
            out.push_str(&format!(
                "simpleseg_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}\n"
            ));
        }
    }
    out.push_str("# HELP simpleseg_request_seconds Request latency.\n");
    out.push_str("# TYPE simpleseg_request_seconds histogram\n");
    if let Ok(l) = state.metrics.latencies.lock() {
        for (route, h) in l.iter() {
            for (b, c) in BUCKETS.iter().zip(h.counts) {
                out.push_str(&format!(
                    "simpleseg_request_seconds_bucket{{route=\"{route}\",le=\"{b}\"}} {c}\n"
                ));
            }
            out.push_str(&format!(
                "simpleseg_request_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}\n",
                h.count
            ));
            out.push_str(&format!(
                "simpleseg_request_seconds_sum{{route=\"{route}\"}} {}\nsimpleseg_request_seconds_count{{route=\"{route}\"}} {}\n",
                h.sum, h.count
            ));
        }
    }
    let server = [
        (
            "simpleseg_open_connections",
            "Client connections open.",
            "gauge",
            state.metrics.connections_open.load(Ordering::Relaxed),
        ),
        (
            "simpleseg_refused_connections_total",
            "Connections answered 503 at once: too many were open.",
            "counter",
            state.metrics.connections_refused.load(Ordering::Relaxed),
        ),
        (
            "simpleseg_admitted_requests",
            "Requests being prepared or waiting for the model.",
            "gauge",
            state.budgets.admitted(),
        ),
        (
            "simpleseg_image_memory_bytes",
            "Image memory held by requests not yet on the model.",
            "gauge",
            state.budgets.memory_in_use() as usize,
        ),
    ];
    for (name, help, kind, value) in server {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    if let Some(model) = state.loaded.get() {
        let s = model.scheduler.stats();
        let gauges = [
            (
                "simpleseg_queue_depth",
                "Requests waiting for the model.",
                "gauge",
                s.queued.load(Ordering::Relaxed),
            ),
            (
                "simpleseg_running_rows",
                "Answers being decoded together.",
                "gauge",
                s.running_rows.load(Ordering::Relaxed),
            ),
            (
                "simpleseg_prompt_tokens_total",
                "Prompt tokens prefilled.",
                "counter",
                s.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "simpleseg_generated_tokens_total",
                "Tokens generated.",
                "counter",
                s.generated_tokens.load(Ordering::Relaxed),
            ),
            (
                "simpleseg_answers_total",
                "Answers finished.",
                "counter",
                s.finished_answers.load(Ordering::Relaxed),
            ),
            (
                "simpleseg_constraint_builds_total",
                "Constraints compiled (successfully or not).",
                "counter",
                model.grammars.builds.load(Ordering::Relaxed),
            ),
            (
                "simpleseg_constraint_cache_hits_total",
                "Constraints answered from the cache (failures included).",
                "counter",
                model.grammars.hits.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, kind, value) in gauges {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
