//! `simpleseg serve`: an OpenAI-compatible HTTP server for SimpleSeg models that also returns
//! masks.
//!
//! Routes: `POST /v1/chat/completions` (OpenAI chat API, images as `data:` URLs, streaming as
//! server-sent events), `POST /v1/segment` (answer, polygons, RLE mask; `?format=png` for the
//! mask PNG; `"stream": true` for points as they are generated), `GET /v1/models`,
//! `GET /health`, `GET /metrics` (Prometheus text) and `GET /` (a web page that draws the
//! outline as it streams).
//!
//! Requests go to one model thread ([`simpleseg_engine::scheduler`]) that decodes concurrent
//! requests together. Bad input is answered 4xx with an OpenAI-style error body; a full queue
//! 429; a request over its time 504.

mod chat;
mod media;
mod metrics;
mod segment;
mod stream;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use simpleseg_engine::scheduler::{Scheduler, SchedulerOptions};
use simpleseg_engine::{GenerationConfig, VisionLanguageModel};

pub use metrics::Metrics;

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Name of the model in `/v1/models` and responses (`default` is accepted too).
    pub served_model_name: String,
    /// Required `Authorization: Bearer` key, if any.
    pub api_key: Option<String>,
    /// Folder under which `file://` image URLs may be read (none: `file://` is refused).
    pub allowed_media_path: Option<PathBuf>,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Longest a request may take, queueing included.
    pub request_timeout: Duration,
    pub scheduler: SchedulerOptions,
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
        }
    }
}

/// The loaded model as handlers see it.
pub(crate) struct Loaded {
    pub scheduler: Scheduler,
    pub defaults: GenerationConfig,
    pub architecture: String,
}

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub(crate) options: Arc<ServeOptions>,
    pub(crate) loaded: Arc<OnceLock<Loaded>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) started: Instant,
}

impl AppState {
    /// A state whose model is not loaded yet (`/health` answers 503 until [`AppState::load`]).
    pub fn new(options: ServeOptions) -> Self {
        AppState {
            options: Arc::new(options),
            loaded: Arc::new(OnceLock::new()),
            metrics: Arc::new(Metrics::default()),
            started: Instant::now(),
        }
    }

    /// Puts a loaded model to work.
    pub fn load(&self, model: Box<dyn VisionLanguageModel>) {
        let defaults = model.generation_config().clone();
        let architecture = model.architecture().to_string();
        let scheduler = Scheduler::start(model, self.options.scheduler);
        let _ = self.loaded.set(Loaded {
            scheduler,
            defaults,
            architecture,
        });
    }

    pub(crate) fn model(&self) -> Result<&Loaded, ApiError> {
        self.loaded.get().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the model is still loading; retry when /health answers 200",
            )
        })
    }
}

/// An error answered as OpenAI does: `{"error": {"message", "type", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
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
        (self.status, Json(body)).into_response()
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
    let limit = state.options.max_body_bytes;
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics::render))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/segment", post(segment::segment))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Authentication (every route but `/health` and the page itself) and request counting.
async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let route = metrics::route_label(&path);
    let open = path == "/health" || path == "/";
    if let (Some(key), false) = (&state.options.api_key, open) {
        if !authorized(request.headers(), key) {
            state.metrics.count(route, 401);
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key: send Authorization: Bearer <key>",
            )
            .into_response();
        }
    }
    let start = Instant::now();
    let response = next.run(request).await;
    state.metrics.count(route, response.status().as_u16());
    state.metrics.latency(route, start.elapsed());
    response
}

fn authorized(headers: &HeaderMap, key: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let given = value.strip_prefix("Bearer ").unwrap_or("");
    // Constant time in the key's length, so timing does not tell how much of a guess matched.
    given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn page() -> Html<&'static str> {
    Html(include_str!("../static/index.html"))
}

async fn health(State(state): State<AppState>) -> Response {
    match state.loaded.get() {
        Some(_) => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
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
/// serves until `shutdown` resolves, finishing the requests in flight. Returns the bound
/// address through `bound` as soon as it is known (port 0 picks a free one).
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
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    bound(listener.local_addr()?);
    let state = AppState::new(options);
    let loading = state.clone();
    let loader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let model = load()?;
        loading.load(model);
        Ok(())
    });
    let app = router(state);
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
    tokio::spawn(async move {
        match loader.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = failed_tx.send(e);
            }
            Err(e) => {
                let _ = failed_tx.send(anyhow::anyhow!("loading the model panicked: {e}"));
            }
        }
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Option<anyhow::Error>>();
    let stop_tx = Arc::new(std::sync::Mutex::new(Some(stop_tx)));
    let on_failure = stop_tx.clone();
    tokio::spawn(async move {
        if let Ok(e) = failed_rx.await {
            if let Some(tx) = on_failure.lock().ok().and_then(|mut t| t.take()) {
                let _ = tx.send(Some(e));
            }
        }
    });
    tokio::spawn(async move {
        shutdown.await;
        if let Some(tx) = stop_tx.lock().ok().and_then(|mut t| t.take()) {
            let _ = tx.send(None);
        }
    });
    let (result_tx, result_rx) = tokio::sync::oneshot::channel::<Option<anyhow::Error>>();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let reason = stop_rx.await.ok().flatten();
            let _ = result_tx.send(reason);
        })
        .await?;
    match result_rx.await.ok().flatten() {
        Some(e) => Err(e.context("loading the model")),
        None => Ok(()),
    }
}
