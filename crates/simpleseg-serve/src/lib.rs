//! `simpleseg serve`: an OpenAI-compatible HTTP server for SimpleSeg models that also returns
//! masks.
//!
//! Routes: `POST /v1/chat/completions` (OpenAI chat API, images as `data:` URLs, streaming as
//! server-sent events), `POST /v1/segment` (answer, polygons, RLE mask; `?format=png` for the
//! mask PNG; `"stream": true` for points as they are generated), `GET /v1/models`,
//! `GET /health`, `GET /metrics` (Prometheus text) and `GET /` (a web page that draws the
//! outline as it streams).
//!
//! Requests go to one model thread ([`simpleseg_engine::runtime::scheduler`]) that decodes concurrent
//! requests together; everything else a request needs (reading its body, decoding its image,
//! tokenizing its prompt, compiling its constraint) is done on other threads first, under
//! budgets ([`admission`]), so that no request can stall the others or exhaust memory. Bad
//! input is answered 4xx with an OpenAI-style error body; a full server 429 or 503 with
//! `Retry-After`; a request over its time 504.

#![warn(clippy::unwrap_used, clippy::expect_used)]

mod admission;
mod chat;
mod connections;
mod guard;
mod media;
mod metrics;
mod prepare;
pub mod schema;
mod segment;
mod stream;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use simpleseg_engine::runtime::constraint::{GrammarCache, PatternLimits};
use simpleseg_engine::runtime::scheduler::{Scheduler, SchedulerOptions};
use simpleseg_engine::{GenerationConfig, VisionLanguageModel};

pub use metrics::Metrics;

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Name of the model in `/v1/models` and responses (`default` is accepted too).
    pub served_model_name: String,
    /// Required `Authorization: Bearer` key, if any (an empty key is refused at start).
    pub api_key: Option<String>,
    /// Folder under which `file://` image URLs may be read (none: `file://` is refused).
    pub allowed_media_path: Option<PathBuf>,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Longest a request may take, queueing included.
    pub request_timeout: Duration,
    pub scheduler: SchedulerOptions,
    /// Connections open at once; beyond, a new connection is answered 503 and closed.
    pub max_connections: usize,
    /// Longest a client may take to send a request's headers; also how long a kept-alive
    /// connection may stay idle.
    pub header_timeout: Duration,
    /// Longest a client may take to send a request's body.
    pub body_timeout: Duration,
    /// How long shutdown waits for the requests in flight before closing their connections.
    pub shutdown_timeout: Duration,
    /// Bytes of images (decoded pixels and model inputs) that the requests not yet on the
    /// model may hold together.
    pub image_memory: u64,
    /// Largest `min_pixels` / `max_pixels` a request may ask for (`None`: the model
    /// processor's own `max_pixels`).
    pub max_request_pixels: Option<usize>,
    /// Bounds on regular expressions and JSON schemas in requests.
    pub pattern_limits: PatternLimits,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            served_model_name: "simpleseg".into(),
            api_key: None,
            allowed_media_path: None,
            max_body_bytes: 64 << 20,
            request_timeout: Duration::from_secs(600),
            scheduler: SchedulerOptions::default(),
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
            image_memory: 2 << 30,
            max_request_pixels: None,
            pattern_limits: PatternLimits::default(),
        }
    }
}

impl ServeOptions {
    /// Refuses settings that would leave the server open or unusable.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.api_key.as_deref() == Some("") {
            anyhow::bail!(
                "the API key is empty (--api-key or SIMPLESEG_API_KEY): give a key, or unset it for a server without one"
            );
        }
        if self.max_connections == 0 || self.image_memory == 0 {
            anyhow::bail!("--max-connections and --image-memory must be at least 1");
        }
        Ok(())
    }
}

/// The loaded model as handlers see it.
pub(crate) struct Loaded {
    pub scheduler: Scheduler,
    pub model: Arc<dyn VisionLanguageModel>,
    pub grammars: GrammarCache,
    pub defaults: GenerationConfig,
    pub architecture: String,
    /// The most bytes a token of the vocabulary stands for (computed on first use).
    pub longest_token: OnceLock<usize>,
}

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub(crate) options: Arc<ServeOptions>,
    pub(crate) loaded: Arc<OnceLock<Loaded>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) budgets: Arc<admission::Budgets>,
    pub(crate) started: Instant,
    /// Host names accepted when the server listens on loopback without a key (DNS
    /// rebinding); `None`: any.
    pub(crate) local_hosts: Option<Arc<Vec<String>>>,
}

impl AppState {
    /// A state whose model is not loaded yet (`/health` answers 503 until [`AppState::load`]).
    pub fn new(options: ServeOptions) -> Self {
        let budgets = Arc::new(admission::Budgets::new(&options));
        AppState {
            options: Arc::new(options),
            loaded: Arc::new(OnceLock::new()),
            metrics: Arc::new(Metrics::default()),
            budgets,
            started: Instant::now(),
            local_hosts: None,
        }
    }

    /// Accepts only `Host` headers naming this machine when listening on loopback without a
    /// key: a web page elsewhere cannot reach the server through a name that resolves to
    /// 127.0.0.1.
    fn guard_host(mut self, bound: SocketAddr) -> Self {
        if bound.ip().is_loopback() && self.options.api_key.is_none() {
            let port = bound.port();
            let hosts = ["localhost", "127.0.0.1", "[::1]"]
                .iter()
                .flat_map(|h| [h.to_string(), format!("{h}:{port}")])
                .collect();
            self.local_hosts = Some(Arc::new(hosts));
        }
        self
    }

    /// Puts a loaded model to work.
    pub fn load(&self, model: Box<dyn VisionLanguageModel>) {
        let model: Arc<dyn VisionLanguageModel> = Arc::from(model);
        let defaults = model.generation_config().clone();
        let architecture = model.architecture().to_string();
        let scheduler = Scheduler::start(model.clone(), self.options.scheduler);
        let _ = self.loaded.set(Loaded {
            scheduler,
            model,
            grammars: GrammarCache::new(self.options.pattern_limits),
            defaults,
            architecture,
            longest_token: OnceLock::new(),
        });
    }

    pub(crate) fn model(&self) -> Result<&Loaded, ApiError> {
        self.loaded.get().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the model is still loading; retry when /health answers 200",
            )
            .retry_after(5)
        })
    }
}

/// An error answered as OpenAI does: `{"error": {"message", "type", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Seconds for a `Retry-After` header (429 and 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// Asks the client to come back after `seconds`.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        let body = json!({"error": {
            "message": self.message,
            "type": kind,
            "code": self.status.as_u16(),
        }});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

/// Input errors from the protocol crate: limits give 413, the rest 400.
impl From<simpleseg_core::Error> for ApiError {
    fn from(e: simpleseg_core::Error) -> Self {
        let status = match e {
            simpleseg_core::Error::LimitExceeded { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, e.to_string())
    }
}

/// The application's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/app.js", get(script))
        .route("/favicon.ico", get(favicon))
        .route("/health", get(health))
        .route("/metrics", get(metrics::render))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/segment", post(segment::segment))
        .fallback(not_found)
        // The guard reads bodies within --max-body-bytes and its time; handlers take them whole.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(state.clone(), guard::guard))
        .with_state(state)
}

async fn page() -> Html<&'static str> {
    Html(include_str!("../static/index.html"))
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../static/app.js"),
    )
        .into_response()
}

/// No icon: an empty answer rather than a 404 in every browser's console.
async fn favicon() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// `{"status": "ok" | "loading", "api_key_required": bool}`: open to all, so that the page
/// knows whether to ask for a key before calling the routes that need one.
async fn health(State(state): State<AppState>) -> Response {
    let key = state.options.api_key.is_some();
    match state.loaded.get() {
        Some(_) => (
            StatusCode::OK,
            Json(json!({"status": "ok", "api_key_required": key})),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading", "api_key_required": key})),
        )
            .into_response(),
    }
}

async fn models(State(state): State<AppState>) -> Json<serde_json::Value> {
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        - state.started.elapsed().as_secs();
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.options.served_model_name,
            "object": "model",
            "created": created,
            "owned_by": "simpleseg",
            "architecture": state.loaded.get().map(|l| l.architecture.clone()),
            "max_model_len": state.loaded.get().map(|l| l.model.max_positions()),
        }],
    }))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

/// Checks a request's `model` field against the served name.
pub(crate) fn check_model(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        None | Some("default") => Ok(()),
        Some(m) if m == state.options.served_model_name => Ok(()),
        Some(m) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "model '{m}' is not served here (this server serves '{}')",
                state.options.served_model_name
            ),
        )),
    }
}

/// Binds `addr`, answers `/health` with 503 while `load` runs on a blocking thread, then
/// serves until `shutdown` resolves, finishing the requests in flight (for at most
/// [`ServeOptions::shutdown_timeout`]). Returns the bound address through `bound` as soon as
/// it is known (port 0 picks a free one).
pub async fn serve<L, S>(
    addr: SocketAddr,
    options: ServeOptions,
    load: L,
    shutdown: S,
    bound: impl FnOnce(SocketAddr),
) -> anyhow::Result<()>
where
    L: FnOnce() -> anyhow::Result<Box<dyn VisionLanguageModel>> + Send + 'static,
    S: Future<Output = ()> + Send + 'static,
{
    options.validate()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    bound(local);
    let state = AppState::new(options).guard_host(local);
    let loading = state.clone();
    let loader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let model = load()?;
        loading.load(model);
        Ok(())
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Option<anyhow::Error>>();
    let stop_tx = Arc::new(std::sync::Mutex::new(Some(stop_tx)));
    let on_failure = stop_tx.clone();
    tokio::spawn(async move {
        let failure = match loader.await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(e) => anyhow::anyhow!("loading the model panicked: {e}"),
        };
        if let Some(tx) = on_failure.lock().ok().and_then(|mut t| t.take()) {
            let _ = tx.send(Some(failure));
        }
    });
    tokio::spawn(async move {
        shutdown.await;
        if let Some(tx) = stop_tx.lock().ok().and_then(|mut t| t.take()) {
            let _ = tx.send(None);
        }
    });
    let limits = connections::Limits::of(&state.options);
    let metrics = state.metrics.clone();
    let app = router(state);
    let reason = connections::serve(listener, app, limits, metrics, async move {
        stop_rx.await.ok().flatten()
    })
    .await;
    match reason {
        Some(e) => Err(e.context("loading the model")),
        None => Ok(()),
    }
}
