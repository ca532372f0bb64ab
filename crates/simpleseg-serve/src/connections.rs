//! Accepting connections under limits: how many may be open, how long a client may take to
//! send its headers (or stay idle between requests), how large its headers may be, and how
//! long shutdown waits for the requests in flight.
//!
//! hyper serves each connection (HTTP/1.1, with its header-read timer); a connection over the
//! cap is answered 503 at once and closed, so that a crowd of idle or slow clients cannot keep
//! new ones waiting or exhaust file descriptors.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::{Metrics, ServeOptions};

/// Largest request head (request line and headers) a connection may buffer.
pub const MAX_HEADER_BYTES: usize = 64 << 10;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub shutdown_timeout: Duration,
}

impl Limits {
    pub fn of(options: &ServeOptions) -> Self {
        Limits {
            max_connections: options.max_connections,
            header_timeout: options.header_timeout,
            shutdown_timeout: options.shutdown_timeout,
        }
    }
}

/// The answer to a connection over the cap.
fn busy() -> Vec<u8> {
    let body = r#"{"error": {"message": "too many open connections; retry later", "type": "server_error", "code": 503}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `app` on `listener` until `stop` resolves, then lets the requests in flight finish
/// for at most the shutdown timeout. Returns what `stop` resolved to.
pub async fn serve<T>(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = T>,
) -> T {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        // A client that closes its sending side after the request still gets the answer.
        .half_close(true);
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    let reason = loop {
        let accepted = tokio::select! {
            reason = &mut stop => break reason,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors, say: wait for connections to close.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut stream = stream;
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let _ = stream.write_all(&busy()).await;
                    let _ = stream.shutdown().await;
                })
                .await;
            });
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        let metrics = metrics.clone();
        metrics.connections_open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let _ = connection.await;
            metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    };
    drop(listener);
    if tokio::time::timeout(limits.shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!(
            "shutdown: requests still running after {} s are cut off",
            limits.shutdown_timeout.as_secs()
        );
    }
    reason
}
