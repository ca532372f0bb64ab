//! What every request goes through before its handler: security headers on the answer, the
//! `Host` check (DNS rebinding), the API key, request counting, and for the model routes
//! admission ([`crate::admission`]) and reading the body within its size and time.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::admission::Admission;
use crate::metrics::route_label;
use crate::{ApiError, AppState};

/// The request's admission, handed from the guard to its handler (taken once).
#[derive(Clone)]
pub struct Admitted(Arc<Mutex<Option<Admission>>>);

impl Admitted {
    pub fn take(&self) -> Option<Admission> {
        self.0.lock().ok().and_then(|mut a| a.take())
    }
}

/// Routes answered without a key: the page and what it loads, and the health check.
fn open_route(path: &str) -> bool {
    matches!(path, "/" | "/app.js" | "/favicon.ico" | "/health")
}

/// Routes that run the model: admitted before their body is read.
fn model_route(path: &str) -> bool {
    matches!(path, "/v1/chat/completions" | "/v1/segment")
}

pub async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let route = route_label(&path);
    let start = Instant::now();
    let mut response = match check(&state, request, next, &path).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    state.metrics.count(route, response.status().as_u16());
    state.metrics.latency(route, start.elapsed());
    secure(response.headers_mut());
    response
}

async fn check(
    state: &AppState,
    mut request: Request,
    next: Next,
    path: &str,
) -> Result<Response, ApiError> {
    if let Some(hosts) = &state.local_hosts {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "Host {host:?} is not this server's: on loopback without an API key only localhost, 127.0.0.1 and [::1] are answered (start the server with --api-key to accept other names)"
                ),
            ));
        }
    }
    if let (Some(key), false) = (&state.options.api_key, open_route(path)) {
        if !authorized(request.headers(), key) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key: send Authorization: Bearer <key>",
            ));
        }
    }
    if model_route(path) && request.method() == Method::POST {
        state.model()?;
        let admission = state.budgets.admit()?;
        let limit = state.options.max_body_bytes;
        let (parts, body) = request.into_parts();
        let bytes = tokio::time::timeout(
            state.options.body_timeout,
            axum::body::to_bytes(body, limit),
        )
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    state.options.body_timeout.as_secs()
                ),
            )
        })?
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than {limit} bytes (--max-body-bytes), or was cut off"),
            )
        })?;
        request = Request::from_parts(parts, Body::from(bytes));
        request
            .extensions_mut()
            .insert(Admitted(Arc::new(Mutex::new(Some(admission)))));
    }
    Ok(next.run(request).await)
}

/// `Authorization: Bearer KEY`, the scheme in any case (RFC 7235).
fn authorized(headers: &HeaderMap, key: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mut parts = value.trim().splitn(2, ' ');
    let scheme = parts.next().unwrap_or("");
    let given = parts.next().unwrap_or("").trim();
    scheme.eq_ignore_ascii_case("bearer") && same_secret(given.as_bytes(), key.as_bytes())
}

/// Compares a guess with the key in time that depends on the guess's length only: every byte
/// of the guess is compared (with the key's byte at that position, cycling), and the lengths
/// once, so timing tells neither how much matched nor how long the key is.
fn same_secret(given: &[u8], key: &[u8]) -> bool {
    if key.is_empty() {
        return false;
    }
    let mut diff = u8::from(given.len() != key.len());
    for (i, &b) in given.iter().enumerate() {
        diff |= b ^ key[i % key.len()];
    }
    diff == 0
}

/// Headers that keep the page from being framed or its answers from being sniffed as
/// something else, and limit what the page may load to the server itself.
fn secure(headers: &mut HeaderMap) {
    const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        assert!(same_secret(b"secret", b"secret"));
        assert!(!same_secret(b"secreT", b"secret"));
        assert!(!same_secret(b"secret!", b"secret"));
        assert!(!same_secret(b"secre", b"secret"));
        assert!(!same_secret(b"", b"secret"));
        // A guess that repeats the key is still wrong.
        assert!(!same_secret(b"secretsecret", b"secret"));
        let mut headers = HeaderMap::new();
        for (value, ok) in [
            ("Bearer k1", true),
            ("bearer k1", true),
            ("BEARER  k1 ", true),
            ("Basic k1", false),
            ("Bearer", false),
            ("k1", false),
        ] {
            headers.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
            assert_eq!(authorized(&headers, "k1"), ok, "{value}");
        }
    }
}
