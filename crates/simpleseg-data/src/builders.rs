//! Training data builders.
//!
//! - SFT, as the released data script writes it: every expression of every object, in
//!   `passes` passes (2 in the script), each time with a random question and answer template;
//!   `{"conversations": [{"from": "user", "value": "<img>PATH</img>QUESTION"},
//!   {"from": "assistant", "value": "ANSWER"}]}`; the answer's polygon list is the mask's
//!   target string (external contours, `approxPolyDP`, normalized, rounded), byte-identical to
//!   the script's. One deliberate difference: the script formats the whole sentence record (a
//!   dict) into the question, evidently a bug; here the sentence text goes in.
//! - RL: one JSON line per expression with the image, its size, the prompt and the
//!   ground-truth mask as RLE.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde_json::json;
use simpleseg_core::pyrepr::polygons_repr;
use simpleseg_core::target::{mask_polygons, normalize_polygons, round3};
use simpleseg_core::templates::{self, fill_prompt};

use crate::error::Result;
use crate::formats::SftFormat;
use crate::items::Item;
use crate::pyjson::{to_json_line, write_python_json};

/// The kinds of training pairs of the paper's (text, point, box, mask) tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Expression -> polygons (the released script's only task).
    TextToMask,
    /// A point inside the object -> polygons.
    PointToMask,
    /// The object's box -> polygons.
    BoxToMask,
    /// Expression -> box.
    TextToBox,
    /// Expression -> a point on the object: a short answer that depends only on where the
    /// object is, which helps a small model learn to locate before it learns outlines.
    TextToPoint,
    /// A point on the object -> its expression (region captioning). The answer's words must
    /// come from what the image shows there, which ties the vocabulary of colours and shapes
    /// to image features: a model trained only on the other tasks can learn to place answers
    /// by position words and salience without ever reading a colour word.
    PointToText,
}

impl std::str::FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "text-mask" => Ok(Task::TextToMask),
            "point-mask" => Ok(Task::PointToMask),
            "box-mask" => Ok(Task::BoxToMask),
            "text-box" => Ok(Task::TextToBox),
            "text-point" => Ok(Task::TextToPoint),
            "point-text" => Ok(Task::PointToText),
            other => Err(format!(
                "unknown task '{other}' (expected text-mask, point-mask, box-mask, text-box, text-point or point-text)"
            )),
        }
    }
}

/// SFT builder settings.
#[derive(Clone, Debug)]
pub struct SftOptions {
    pub seed: u64,
    pub passes: usize,
    pub epsilon_ratio: f64,
    pub tasks: Vec<Task>,
    /// How each record is written.
    pub format: SftFormat,
}

impl Default for SftOptions {
    fn default() -> Self {
        SftOptions {
            seed: 0,
            passes: 2,
            epsilon_ratio: simpleseg_core::target::DEFAULT_EPSILON_RATIO,
            tasks: vec![Task::TextToMask],
            format: SftFormat::Simpleseg,
        }
    }
}

/// What a builder did, for the user.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BuildStats {
    pub objects: usize,
    pub records: usize,
    pub seconds: f64,
    pub objects_per_second: f64,
}

/// What the SFT builder needs of one object: its polygons' target string, a point inside it
/// and its normalized box.
struct Prepared {
    target: String,
    point: Option<[f64; 2]>,
    bbox: [f64; 4],
}

fn progress(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} [{{bar:40}}] {{pos}}/{{len}} ({{per_sec}}, eta {{eta}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

/// The mask pixel nearest the mask's centroid, normalized and rounded like targets: a point
/// that lies on the object even when its centroid does not.
fn inner_point(dense: &[u8], w: usize, h: usize) -> Option<[f64; 2]> {
    let (mut sx, mut sy, mut n) = (0f64, 0f64, 0f64);
    for (i, &v) in dense.iter().enumerate() {
        if v != 0 {
            sx += (i % w) as f64;
            sy += (i / w) as f64;
            n += 1.0;
        }
    }
    if n == 0.0 {
        return None;
    }
    let (cx, cy) = (sx / n, sy / n);
    let (mut best, mut best_d) = ((0, 0), f64::INFINITY);
    for (i, &v) in dense.iter().enumerate() {
        if v != 0 {
            let (x, y) = (i % w, i / w);
            let d = (x as f64 - cx).powi(2) + (y as f64 - cy).powi(2);
            if d < best_d {
                best_d = d;
                best = (x, y);
            }
        }
    }
    // Pixel centres, normalized.
    Some([
        round3((best.0 as f64 + 0.5) / w as f64),
        round3((best.1 as f64 + 0.5) / h as f64),
    ])
}

fn prepare(item: &Item, epsilon_ratio: f64) -> Result<Prepared> {
    let mask = item.mask()?;
    let (w, h) = (item.width as usize, item.height as usize);
    let dense = mask.to_row_major()?;
    let polygons = mask_polygons(&dense, w, h, epsilon_ratio);
    let target = polygons_repr(&normalize_polygons(&polygons, w, h));
    let [x, y, bw, bh] = item.bbox;
    let (fw, fh) = (f64::from(item.width), f64::from(item.height));
    Ok(Prepared {
        target,
        point: inner_point(&dense, w, h),
        bbox: [
            round3(x / fw),
            round3(y / fh),
            round3((x + bw) / fw),
            round3((y + bh) / fh),
        ],
    })
}

/// Computes every object's target in parallel, with a progress bar.
fn prepare_all(items: &[&Item], epsilon_ratio: f64, what: &str) -> Result<Vec<Prepared>> {
    let bar = progress(items.len(), what);
    let prepared = items
        .par_iter()
        .map(|item| {
            let p = prepare(item, epsilon_ratio);
            bar.inc(1);
            p
        })
        .collect::<Result<Vec<_>>>();
    bar.finish_and_clear();
    prepared
}

/// Builds SFT records for `items` (already in the order to write them).
pub fn sft_records(
    items: &[&Item],
    options: &SftOptions,
) -> Result<(Vec<serde_json::Value>, BuildStats)> {
    let start = Instant::now();
    let prepared = prepare_all(items, options.epsilon_ratio, "targets")?;
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut records = Vec::new();
    for _ in 0..options.passes {
        for (item, p) in items.iter().zip(&prepared) {
            for sentence in &item.sentences {
                for task in &options.tasks {
                    let (question, answer) = match task {
                        Task::TextToMask => {
                            let q = templates::question(
                                rng.random_range(0..templates::QUESTION_TEMPLATES.len()),
                                &sentence.sent,
                            );
                            let a = templates::answer(
                                rng.random_range(0..templates::ANSWER_TEMPLATES.len()),
                                &p.target,
                            );
                            (q, a)
                        }
                        Task::PointToMask => {
                            let Some(point) = p.point else { continue };
                            (
                                templates::point_prompt(point),
                                templates::answer(
                                    rng.random_range(0..templates::ANSWER_TEMPLATES.len()),
                                    &p.target,
                                ),
                            )
                        }
                        Task::BoxToMask => (
                            templates::box_prompt(p.bbox),
                            templates::answer(
                                rng.random_range(0..templates::ANSWER_TEMPLATES.len()),
                                &p.target,
                            ),
                        ),
                        Task::TextToBox => (
                            format!("Output the bounding box of {} in the image.", sentence.sent),
                            templates::answer(
                                rng.random_range(0..templates::ANSWER_TEMPLATES.len()),
                                &templates::list_repr(&p.bbox),
                            ),
                        ),
                        Task::TextToPoint => {
                            let Some(point) = p.point else { continue };
                            (
                                format!("Point to {} in the image.", sentence.sent),
                                templates::answer(
                                    rng.random_range(0..templates::ANSWER_TEMPLATES.len()),
                                    &templates::list_repr(&point),
                                ),
                            )
                        }
                        Task::PointToText => {
                            let Some(point) = p.point else { continue };
                            (
                                format!(
                                    "What is the object at point {}? Answer with a short description.",
                                    templates::list_repr(&point)
                                ),
                                sentence.sent.clone(),
                            )
                        }
                    };
                    records.push(options.format.record(&item.image_rel, &question, &answer));
                }
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let stats = BuildStats {
        objects: items.len(),
        records: records.len(),
        seconds,
        objects_per_second: items.len() as f64 / seconds.max(1e-9),
    };
    Ok((records, stats))
}

/// Writes records as indented JSON (like the data script) or JSON lines, by extension;
/// atomically.
pub fn write_records(path: &Path, records: &[serde_json::Value]) -> Result<()> {
    let lines = path.extension().is_some_and(|e| e == "jsonl");
    simpleseg_core::io::write_atomic(path, |w| {
        if lines {
            for r in records {
                writeln!(w, "{}", to_json_line(r)).map_err(|e| e.to_string())?;
            }
            Ok(())
        } else {
            write_python_json(w, records).map_err(|e| e.to_string())
        }
    })?;
    Ok(())
}

/// One RL training line per expression:
/// `{"ref_id", "sent_id", "image", "width", "height", "prompt", "rle"}`.
pub fn rl_records(
    items: &[&Item],
    prompt_template: &str,
) -> Result<(Vec<serde_json::Value>, BuildStats)> {
    let start = Instant::now();
    let bar = progress(items.len(), "masks");
    let masks = items
        .par_iter()
        .map(|item| {
            let m = item.mask();
            bar.inc(1);
            m
        })
        .collect::<Result<Vec<_>>>()?;
    bar.finish_and_clear();
    let mut records = Vec::new();
    for (item, mask) in items.iter().zip(&masks) {
        for s in &item.sentences {
            records.push(json!({
                "ref_id": item.ref_id,
                "sent_id": s.sent_id,
                "image": item.image_rel,
                "width": item.width,
                "height": item.height,
                "prompt": fill_prompt(prompt_template, &s.sent),
                "rle": mask.to_json_value(),
            }));
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let stats = BuildStats {
        objects: items.len(),
        records: records.len(),
        seconds,
        objects_per_second: items.len() as f64 / seconds.max(1e-9),
    };
    Ok((records, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inner_point_lies_on_the_mask() {
        // A ring: the centroid is in the hole.
        let (w, h) = (9usize, 9usize);
        let mut dense = vec![0u8; w * h];
        for y in 0..h {
            for x in 0..w {
                let d = (x as i32 - 4).abs().max((y as i32 - 4).abs());
                if d >= 3 {
                    dense[y * w + x] = 1;
                }
            }
        }
        let [px, py] = inner_point(&dense, w, h).unwrap();
        let (x, y) = ((px * w as f64) as usize, (py * h as f64) as usize);
        assert_eq!(dense[y * w + x], 1);
    }
}
