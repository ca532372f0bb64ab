//! `POST /v1/segment`: an image and a query, point or box in; the answer, its polygons and the
//! mask out (JSON, or the mask PNG with `?format=png`, or server-sent events with
//! `"stream": true`: each polygon point as soon as it is complete, then the result).

use std::convert::Infallible;
use std::sync::LazyLock;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use regex::Regex;
use serde::Deserialize;
use serde_json::{json, Value};
use simpleseg_core::segment::Target;
use simpleseg_core::{CoordMode, ParseMode};
use simpleseg_engine::runtime::scheduler::Event;
use simpleseg_engine::runtime::segment::{SegmentJob, SegmentOptions};
use simpleseg_engine::PromptOptions;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::chat::{constraint_of, pixel_limits, read_body, timed_out, Sampling};
use crate::guard::Admitted;
use crate::prepare::{engine_error, queue, Ask, Job};
use crate::stream::collect;
use crate::{check_model, ApiError, AppState};

#[derive(Debug, Deserialize)]
pub struct SegmentRequest {
    pub model: Option<String>,
    /// The image as a data: URL (or file:// under --allowed-media-path).
    pub image: String,
    pub query: Option<String>,
    pub point: Option<[f64; 2]>,
    #[serde(rename = "box")]
    pub bbox: Option<[f64; 4]>,
    /// The prompt for a query (`{query}` is replaced).
    pub prompt_template: Option<String>,
    #[serde(default)]
    pub mode: Option<ParseMode>,
    #[serde(default)]
    pub coords: Option<CoordMode>,
    /// `polygon` (answers always parse), `box`, or `none` (the default, as `segment`).
    pub constrain: Option<String>,
    #[serde(flatten)]
    pub sampling: Sampling,
    pub min_pixels: Option<usize>,
    pub max_pixels: Option<usize>,
    #[serde(default)]
    pub stream: bool,
}

#[derive(Debug, Deserialize)]
pub struct Format {
    pub format: Option<String>,
}

fn target(req: &SegmentRequest) -> Result<Target, ApiError> {
    match (&req.query, req.point, req.bbox) {
        (Some(q), None, None) => Ok(Target::Query(q.clone())),
        (None, Some(p), None) => Ok(Target::Point(p)),
        (None, None, Some(b)) => Ok(Target::Box(b)),
        _ => Err(ApiError::bad_request(
            "give exactly one of query, point [x, y] or box [x1, y1, x2, y2] (normalized)",
        )),
    }
}

/// The fields of [`SegmentRequest`].
const SEGMENT_FIELDS: &[&str] = &[
    "model",
    "image",
    "query",
    "point",
    "box",
    "prompt_template",
    "mode",
    "coords",
    "constrain",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "min_pixels",
    "max_pixels",
    "stream",
];

pub async fn segment(
    State(state): State<AppState>,
    Query(format): Query<Format>,
    admitted: Option<Extension<Admitted>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: SegmentRequest = read_body(&body, SEGMENT_FIELDS)?;
    drop(body);
    check_model(&state, req.model.as_deref())?;
    let png = match format.format.as_deref() {
        None | Some("json") => false,
        Some("png") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "format {other:?} is not known (json or png)"
            )))
        }
    };
    let model = state.model()?;
    let target = target(&req)?;
    let config = req.sampling.config(&model.defaults)?;
    let constraint = match req.constrain.as_deref() {
        None | Some("none") => None,
        Some(c) => constraint_of(
            Some(c),
            None,
            None,
            state.options.pattern_limits.max_pattern_bytes,
        )?,
    };
    // A template may repeat {query}: the question's length is bounded before it is built
    // (by the request's own size here, by the context in [`crate::prepare`]).
    let options = SegmentOptions {
        prompt_template: req.prompt_template.clone(),
        mode: req.mode.unwrap_or(ParseMode::Robust),
        coords: req.coords.unwrap_or(CoordMode::Normalized),
        prompt: PromptOptions::default(),
        max_question_bytes: state.options.max_body_bytes,
    };
    let job = Job {
        image: req.image,
        ask: Ask::Segment(target, options),
        pixels: pixel_limits(req.min_pixels, req.max_pixels, None)?,
        configs: vec![config],
        max_tokens_given: req.sampling.max_tokens.is_some(),
        constraint,
    };
    let deadline = tokio::time::Instant::now() + state.options.request_timeout;
    let queued = tokio::time::timeout_at(deadline, queue(&state, admitted.map(|e| e.0), job))
        .await
        .map_err(|_| timed_out())??;
    let Some(reader) = queued.segment else {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no segmentation job",
        ));
    };
    if req.stream {
        return Ok(stream(queued.submitted, reader, deadline));
    }
    let (mut answers, _) = tokio::time::timeout_at(deadline, collect(queued.submitted, 1, &[]))
        .await
        .map_err(|_| timed_out())??;
    let Some(answer) = answers.pop() else {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no answer",
        ));
    };
    let result = reader.finish(answer.output).map_err(engine_error)?;
    if png {
        let mut bytes = std::io::Cursor::new(Vec::new());
        simpleseg_core::io::encode_mask_png(&result.segmentation.mask, &mut bytes)?;
        return Ok(([(header::CONTENT_TYPE, "image/png")], bytes.into_inner()).into_response());
    }
    Ok(Json(result.to_json()).into_response())
}

/// A complete point `[x, y]` of the answer text.
static POINT: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(r"\[\s*(-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)\s*,\s*(-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)\s*\]").ok()
});

/// The complete points of `text` with the polygon each belongs to (a new polygon starts
/// after a `]` that closes one).
#[cfg(test)]
fn points_so_far(text: &str) -> Vec<(usize, [f64; 2])> {
    let mut stream = PointStream::default();
    stream.push(text)
}

/// The complete points of a text with the polygon each belongs to (a new polygon starts after
/// a `]` that closes one), over a text that grows piece by piece, in time linear in its length: a
/// point can only begin at a `[` and holds no other, so the text before the last `[` that is
/// not part of a point is never read again.
#[derive(Debug, Default)]
pub struct PointStream {
    text: String,
    /// Where reading resumes.
    scanned: usize,
    polygon: usize,
    seen_point: bool,
    /// Whether a `]` was passed since the last point.
    closed: bool,
}

impl PointStream {
    /// Adds text; returns the points it completes.
    pub fn push(&mut self, delta: &str) -> Vec<(usize, [f64; 2])> {
        self.text.push_str(delta);
        let Some(re) = POINT.as_ref() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let base = self.scanned;
        let mut last_end = base;
        for c in re.captures_iter(&self.text[base..]) {
            let (Some(m), Some(x), Some(y)) = (c.get(0), c.get(1), c.get(2)) else {
                continue;
            };
            if self.seen_point
                && (self.closed || self.text[last_end..base + m.start()].contains(']'))
            {
                self.polygon += 1;
            }
            self.closed = false;
            self.seen_point = true;
            last_end = base + m.end();
            if let (Ok(x), Ok(y)) = (x.as_str().parse(), y.as_str().parse()) {
                out.push((self.polygon, [x, y]));
            }
        }
        let rest = &self.text[last_end..];
        let keep = rest.rfind('[').unwrap_or(rest.len());
        if rest[..keep].contains(']') {
            self.closed = true;
        }
        self.scanned = last_end + keep;
        out
    }
}

fn stream(
    mut submitted: crate::stream::Submitted,
    reader: SegmentJob,
    deadline: tokio::time::Instant,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<SseEvent, Infallible>>();
    tokio::spawn(async move {
        let send = |name: &str, data: Value| {
            tx.send(Ok(SseEvent::default().event(name).data(data.to_string())))
                .is_ok()
        };
        let mut points = PointStream::default();
        loop {
            let event = match tokio::time::timeout_at(deadline, submitted.events.recv()).await {
                Ok(Some(e)) => e,
                Ok(None) => {
                    send("error", json!({"message": "the model thread stopped"}));
                    return;
                }
                Err(_) => {
                    send(
                        "error",
                        json!({"message": "the request took too long", "code": 504}),
                    );
                    return;
                }
            };
            match event {
                Event::Started { .. } => {}
                Event::Token { text: delta, .. } => {
                    if !send("token", json!({"text": delta})) {
                        return;
                    }
                    for (polygon, point) in points.push(&delta) {
                        send("point", json!({"polygon": polygon, "point": point}));
                    }
                }
                Event::Finished { output, .. } => {
                    match reader.finish(output) {
                        Ok(result) => {
                            send("result", result.to_json());
                        }
                        Err(e) => {
                            send("error", json!({"message": e.to_string()}));
                        }
                    }
                    let _ = tx.send(Ok(SseEvent::default().data("[DONE]")));
                    return;
                }
                Event::Failed(message) => {
                    send("error", json!({"message": message, "code": 400}));
                    return;
                }
            }
        }
    });
    Sse::new(UnboundedReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_are_numbered_by_polygon() {
        let p = points_so_far("[[[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], [[0.7, 0.8], [0.9");
        assert_eq!(p.len(), 4);
        assert_eq!(p[2], (0, [0.5, 0.6]));
        assert_eq!(p[3], (1, [0.7, 0.8]));
    }

    #[test]
    fn points_stream_as_they_do_whole() {
        let answers = [
            "[[[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], [[0.7, 0.8], [0.9, 1.0], [0.25, 0.5]]].",
            "Sure: [[[ 0.1 ,0.2 ],[0.3,0.4]] junk ] [ [0.5,0.6] [[1e-1, 2E+0]]",
            "[[[0.1, [0.2, 0.3]]], ]] [0.4, 0.5]",
        ];
        for answer in answers {
            let whole = points_so_far(answer);
            for cut in 1..answer.len() {
                for step in [1, 3, 7] {
                    let mut stream = PointStream::default();
                    let mut got = stream.push(&answer[..cut]);
                    let mut at = cut;
                    while at < answer.len() {
                        let end = (at + step).min(answer.len());
                        got.extend(stream.push(&answer[at..end]));
                        at = end;
                    }
                    assert_eq!(got, whole, "{answer} cut at {cut} by {step}");
                }
            }
        }
    }
}
