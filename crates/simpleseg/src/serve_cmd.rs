//! `serve`: the HTTP server (see the `simpleseg-serve` crate).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use simpleseg_engine::runtime::constraint::PatternLimits;
use simpleseg_engine::runtime::scheduler::SchedulerOptions;
use simpleseg_serve::ServeOptions;

use crate::options::{at_least_one, ModelArgs};

/// Serve a model over HTTP: the OpenAI chat API (`/v1/chat/completions`), masks
/// (`/v1/segment`), `/v1/models`, `/health`, `/metrics`, and a web page at `/` that draws the
/// outline as it is generated. Concurrent requests decode together. Every request's cost
/// (body, image memory, pixels, prompt and answer length, constraints, connections) is checked
/// against a bound before it is paid. Stops on Ctrl-C or SIGTERM after finishing the requests
/// in flight (for at most --shutdown-timeout).
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0 exposes the server).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port (0 picks a free one, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health and the page (an empty
    /// key is refused). Without a key on loopback, only requests naming localhost,
    /// 127.0.0.1 or [::1] as their Host are answered (DNS rebinding).
    #[arg(
        long,
        env = "SIMPLESEG_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    api_key: Option<String>,
    /// Model name in /v1/models and responses (default: the model folder's name).
    #[arg(long, value_name = "NAME")]
    served_model_name: Option<String>,
    /// Allow `file://` image URLs under this folder (refused otherwise).
    #[arg(long, value_name = "DIR")]
    allowed_media_path: Option<PathBuf>,
    /// Largest request body in bytes (images travel base64 inside it).
    #[arg(long, default_value_t = 64 << 20, value_name = "BYTES")]
    max_body_bytes: usize,
    /// Seconds a request may take, waiting included, before it is answered 504.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..), value_name = "S")]
    request_timeout: u64,
    /// Answers decoded together at most.
    #[arg(long, default_value_t = 16, value_parser = at_least_one, value_name = "N")]
    max_batch: usize,
    /// Requests admitted at most: being read, prepared or waiting for the model; beyond,
    /// requests are answered 429 before their body is read.
    #[arg(long, default_value_t = 64, value_parser = at_least_one, value_name = "N")]
    queue: usize,
    /// Connections open at once; beyond, a new connection is answered 503 and closed.
    #[arg(long, default_value_t = 512, value_parser = at_least_one, value_name = "N")]
    max_connections: usize,
    /// Seconds a client may take to send a request's headers, and that a kept-alive
    /// connection may stay idle.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..), value_name = "S")]
    header_timeout: u64,
    /// Seconds a client may take to send a request's body (408 after).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..), value_name = "S")]
    body_timeout: u64,
    /// Seconds shutdown (Ctrl-C, SIGTERM) waits for the requests in flight before closing
    /// their connections.
    #[arg(long, default_value_t = 30, value_name = "S")]
    shutdown_timeout: u64,
    /// Bytes of images that requests not yet on the model may hold together (decoded
    /// pixels, then the model's input); an image that does not fit now is answered 503, one
    /// that never could, 413.
    #[arg(long, default_value_t = 2 << 30, value_parser = clap::value_parser!(u64).range(1..), value_name = "BYTES")]
    image_memory: u64,
    /// Largest min_pixels / max_pixels a request may ask for [default: the model
    /// processor's max_pixels]; lower than that, it also caps requests that ask for none.
    #[arg(long, value_parser = at_least_one, value_name = "N")]
    max_request_pixels: Option<usize>,
    /// Longest regular expression, JSON schema or schema translation a request may bring,
    /// in bytes.
    #[arg(long, default_value_t = 64 << 10, value_parser = at_least_one, value_name = "BYTES")]
    max_pattern_bytes: usize,
}

pub fn serve(args: ServeArgs) -> Result<()> {
    let name = args.served_model_name.clone().unwrap_or_else(|| {
        args.model
            .model
            .as_ref()
            .and_then(|p| p.file_name())
            .map_or_else(
                || {
                    simpleseg_builtin::NAME
                        .split(' ')
                        .next()
                        .unwrap_or("simpleseg-tiny")
                        .to_string()
                },
                |n| n.to_string_lossy().into_owned(),
            )
    });
    let options = ServeOptions {
        served_model_name: name.clone(),
        api_key: args.api_key.clone(),
        allowed_media_path: args.allowed_media_path.clone(),
        max_body_bytes: args.max_body_bytes,
        request_timeout: Duration::from_secs(args.request_timeout),
        scheduler: SchedulerOptions {
            max_batch_rows: args.max_batch,
            queue: args.queue,
        },
        max_connections: args.max_connections,
        header_timeout: Duration::from_secs(args.header_timeout),
        body_timeout: Duration::from_secs(args.body_timeout),
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
        image_memory: args.image_memory,
        max_request_pixels: args.max_request_pixels,
        pattern_limits: PatternLimits {
            max_pattern_bytes: args.max_pattern_bytes,
            ..PatternLimits::default()
        },
    };
    options.validate()?;
    let addr = SocketAddr::new(args.host, args.port);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the server runtime")?;
    let model = args.model;
    runtime.block_on(simpleseg_serve::serve(
        addr,
        options,
        move || model.load(),
        shutdown_signal(),
        move |bound| eprintln!("serving {name} on http://{bound} (loading the model...)"),
    ))
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("shutting down: finishing the requests in flight");
}
