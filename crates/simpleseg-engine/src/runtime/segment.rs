//! The segmentation pipeline: an image and a target (a referring expression, a point, a box or
//! a whole question) in; the model's answer, its polygons and its mask out, with one JSON
//! form. `segment`, `/v1/segment`, evaluation's local backend, the quantization agreement
//! check, training's rollouts and the Python `Model` all go through it.
//!
//! It has two halves around generation, so that a caller that generates its own way (the
//! server's scheduler, streaming) uses the same preparation and decoding: [`SegmentJob::new`]
//! asks (the question, the prompt prepared from the image) and [`SegmentJob::finish`] reads
//! the answer (parsed, rasterized exactly as pycocotools does). [`segment_batch`] runs both
//! with generation in between, several jobs decoded together.

use std::sync::Arc;

use image::RgbImage;
use serde_json::{json, Value};
use simpleseg_core::segment::{Segmentation, Target};
use simpleseg_core::{parse_answer, CoordMode, ParseMode, ParsedAnswer};

use crate::error::Result;
use crate::runtime::constraint::Grammar;
use crate::runtime::generator::{generate_batch, BatchRequest};
use crate::runtime::model::{
    GenerationOutput, Prompt, PromptOptions, PromptSource, StopReason, VisionLanguageModel,
};
use crate::runtime::sampling::GenerationConfig;

/// How a segmentation is asked and read.
#[derive(Clone, Debug)]
pub struct SegmentOptions {
    /// The question for a referring expression (`{query}` is replaced); the model card's
    /// question when `None`.
    pub prompt_template: Option<String>,
    /// How the answer is parsed.
    pub mode: ParseMode,
    /// What its numbers are measured in.
    pub coords: CoordMode,
    /// The system message and the image's resizing limits.
    pub prompt: PromptOptions,
    /// The longest question, checked before it is built (a template may repeat `{query}`).
    pub max_question_bytes: usize,
}

impl Default for SegmentOptions {
    /// The model card's question, robust parsing, normalized coordinates, questions of up to
    /// the text limit.
    fn default() -> Self {
        SegmentOptions {
            prompt_template: None,
            mode: ParseMode::Robust,
            coords: CoordMode::Normalized,
            prompt: PromptOptions::default(),
            max_question_bytes: usize::try_from(simpleseg_core::limits::Limit::TextBytes.value())
                .unwrap_or(usize::MAX),
        }
    }
}

/// A segmentation asked of a model, ready to be answered.
#[derive(Clone, Debug)]
pub struct SegmentJob {
    /// The question asked.
    pub question: String,
    /// The model's input: the question with the image.
    pub prompt: Prompt,
    /// The image's size, which the answer's polygons are drawn at.
    pub width: u32,
    pub height: u32,
    mode: ParseMode,
    coords: CoordMode,
}

impl SegmentJob {
    /// The question for `target` and the prompt `model` makes of it with `image`.
    pub fn new(
        model: &dyn PromptSource,
        image: &RgbImage,
        target: &Target,
        options: &SegmentOptions,
    ) -> Result<Self> {
        let question = target.prompt_within(
            options.prompt_template.as_deref(),
            options.max_question_bytes,
        )?;
        let prompt = model.prompt(image, &question, &options.prompt)?;
        Ok(SegmentJob {
            question,
            prompt,
            width: image.width(),
            height: image.height(),
            mode: options.mode,
            coords: options.coords,
        })
    }

    /// Takes the prompt out, for a caller that hands it to a generator of its own (the
    /// server's scheduler) and keeps the job to read the answer.
    pub fn take_prompt(&mut self) -> Prompt {
        std::mem::take(&mut self.prompt)
    }

    /// Reads the model's answer: parsed, and its polygons rasterized on the image.
    pub fn finish(&self, output: GenerationOutput) -> Result<SegmentResult> {
        let parsed = parse_answer(&output.text, self.mode);
        let segmentation =
            Segmentation::from_parsed(&parsed, self.width, self.height, self.coords)?;
        Ok(SegmentResult {
            question: self.question.clone(),
            output,
            parsed,
            segmentation,
        })
    }
}

/// An answered segmentation.
#[derive(Clone, Debug)]
pub struct SegmentResult {
    /// The question asked.
    pub question: String,
    /// The answer, its tokens and timings.
    pub output: GenerationOutput,
    /// Everything the parser found in it (polygons, boxes, points, warnings).
    pub parsed: ParsedAnswer,
    /// The polygons in both coordinates and their mask.
    pub segmentation: Segmentation,
}

impl SegmentResult {
    /// The one JSON form, the same from every front end: `answer`, `prompt` (the question),
    /// `polygons` (normalized) and `polygons_pixels`, `rle` (`{size, counts}`), `bbox`,
    /// `area`, `width`, `height`, `mode`, `coords`, `warnings` (`{kind, message, ...}`), the
    /// parser's other findings (`boxes`, `points`, `boxed`, `blocks`), `token_ids`,
    /// `stop_reason`, OpenAI's `finish_reason`, `usage` and `timings`.
    pub fn to_json(&self) -> Value {
        let mut out = self.segmentation.to_json();
        let parsed = self.parsed.to_json_value();
        for key in ["warnings", "boxes", "points", "boxed", "blocks"] {
            out[key] = parsed[key].clone();
        }
        let o = &self.output;
        let completion = o.token_ids.len();
        out["answer"] = json!(o.text);
        out["prompt"] = json!(self.question);
        out["token_ids"] = json!(o.token_ids);
        out["stop_reason"] = json!(o.stop_reason);
        out["finish_reason"] = json!(finish_reason(o.stop_reason));
        out["usage"] = json!({
            "prompt_tokens": o.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": o.prompt_tokens + completion,
        });
        out["timings"] = json!(o.timings);
        out
    }
}

/// OpenAI's name for why an answer ended: `stop` (an end token, or stopped by the caller),
/// `length` (the token limit), `error` (its constraint allowed nothing more).
pub fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::MaxTokens => "length",
        StopReason::Eos | StopReason::Cancelled => "stop",
        StopReason::NoAllowedToken => "error",
    }
}

/// Answers several jobs together (one prefill each, rows decoded side by side), each with its
/// own config; `on_token(job, token)` is called as tokens are chosen.
pub fn segment_batch(
    model: &dyn VisionLanguageModel,
    jobs: &[SegmentJob],
    configs: &[GenerationConfig],
    grammar: Option<Arc<Grammar>>,
    on_token: impl FnMut(usize, u32),
) -> Result<Vec<SegmentResult>> {
    let requests: Vec<BatchRequest> = jobs
        .iter()
        .zip(configs)
        .map(|(job, config)| BatchRequest {
            prompt: &job.prompt,
            configs: vec![config.clone()],
            grammar: grammar.clone(),
        })
        .collect();
    let outputs = generate_batch(model, &requests, on_token)?;
    jobs.iter()
        .zip(outputs)
        .map(|(job, output)| job.finish(output))
        .collect()
}

/// The whole pipeline for one image.
pub fn segment(
    model: &dyn VisionLanguageModel,
    image: &RgbImage,
    target: &Target,
    config: &GenerationConfig,
    grammar: Option<Arc<Grammar>>,
    options: &SegmentOptions,
    on_token: impl FnMut(u32),
) -> Result<SegmentResult> {
    let job = SegmentJob::new(model, image, target, options)?;
    let mut on_token = on_token;
    let mut results = segment_batch(
        model,
        std::slice::from_ref(&job),
        std::slice::from_ref(config),
        grammar,
        |_, t| on_token(t),
    )?;
    results
        .pop()
        .ok_or_else(|| crate::error::Error::Input("generation produced no answer".into()))
}
