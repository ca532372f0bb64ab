//! `serve`: the HTTP server (see the `simpleseg-serve` crate).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use simpleseg_engine::scheduler::SchedulerOptions;
use simpleseg_serve::ServeOptions;

use crate::model_cmds::{at_least_one, ModelArgs};

/// Serve a model over HTTP: the OpenAI chat API (`/v1/chat/completions`), masks
/// (`/v1/segment`), `/v1/models`, `/health`, `/metrics`, and a web page at `/` that draws the
/// outline as it is generated. Concurrent requests decode together. Stops on Ctrl-C or
/// SIGTERM after finishing the requests in flight.
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
    /// Require `Authorization: Bearer KEY` on every route but /health and the page.
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
    /// Requests waiting at most; beyond, requests are answered 429.
    #[arg(long, default_value_t = 64, value_parser = at_least_one, value_name = "N")]
    queue: usize,
}

pub fn serve(args: ServeArgs) -> Result<()> {
    let name = args.served_model_name.clone().unwrap_or_else(|| {
        args.model
            .model
            .as_ref()
            .and_then(|p| p.file_name())
            .map_or_else(
                || {
                    crate::embedded::NAME
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
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        allowed_media_path: args.allowed_media_path.clone(),
        max_body_bytes: args.max_body_bytes,
        request_timeout: Duration::from_secs(args.request_timeout),
        scheduler: SchedulerOptions {
            max_batch_rows: args.max_batch,
            queue: args.queue,
        },
    };
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
