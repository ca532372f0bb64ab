//! The evaluation runner: one sample per expression, answers from a backend, scores streamed
//! to `predictions.jsonl` as they finish, and a report (`report.json`, `report.md`) computed
//! from that file. Rerunning with the same output folder resumes: a half-written last line is
//! dropped, finished samples are skipped, and the report is the same as an uninterrupted run's
//! (it is computed from the file, in sample-id order).

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, OnceLock};

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use simpleseg_core::io::Outputs;
use simpleseg_core::journal::{check_settings, read_journal};
use simpleseg_core::limits::{read_text_file_bounded, Limit};
use simpleseg_core::templates::fill_prompt;
use simpleseg_core::{CoordMode, ParseMode, RleMask};
use simpleseg_data::Item;

use crate::backends::{Backend, Question};
use crate::error::{Error, Result};
use crate::metrics::{aggregate, score_answer, BoxSource, Metrics, Score};

/// The task an evaluation reports on. Both compute every metric; the task picks which metric
/// leads the report (the prompt and box source are set separately).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Referring expression segmentation (cIoU).
    #[default]
    Res,
    /// Referring expression comprehension (Acc@0.5).
    Rec,
}

/// Settings that define a run; a resumed run must have the same.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    pub dataset: String,
    pub split: String,
    pub task: Task,
    pub mode: ParseMode,
    pub coords: CoordMode,
    pub box_source: BoxSource,
    /// The prompt with `{query}` for the expression.
    pub prompt_template: String,
    /// Sample answers (seeded from `seed` and the sentence id) instead of greedy decoding.
    pub sample: bool,
    pub seed: u64,
    pub limit: Option<usize>,
    /// What the samples come from, as far as it changes them: the dataset's folder and the
    /// identity of its files (see `ReferDataset::identity`).
    pub data: Value,
}

/// One line of `predictions.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub ref_id: u64,
    pub sent_id: u64,
    pub answer: String,
    pub iou: f64,
    pub intersection: u64,
    pub union: u64,
    pub box_iou: f64,
    pub pred_box: Option<[f64; 4]>,
    pub parse_failure: bool,
    pub polygons: usize,
    pub points: usize,
}

impl Prediction {
    fn from_score(ref_id: u64, sent_id: u64, answer: String, s: Score) -> Self {
        Prediction {
            ref_id,
            sent_id,
            answer,
            iou: s.iou,
            intersection: s.intersection,
            union: s.union,
            box_iou: s.box_iou,
            pred_box: s.pred_box,
            parse_failure: s.parse_failure,
            polygons: s.polygons,
            points: s.points,
        }
    }

    fn score(&self) -> Score {
        Score {
            intersection: self.intersection,
            union: self.union,
            iou: self.iou,
            pred_box: self.pred_box,
            box_iou: self.box_iou,
            parse_failure: self.parse_failure,
            polygons: self.polygons,
            points: self.points,
        }
    }
}

/// The report of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub dataset: String,
    pub split: String,
    pub task: Task,
    pub n: usize,
    /// Samples in the split (after `limit`); `n < samples` means the run is incomplete.
    pub samples: usize,
    pub ciou: f64,
    pub giou: f64,
    pub acc50: f64,
    pub parse_failures: usize,
    pub mean_points_per_polygon: f64,
    pub prompt_template: String,
    pub mode: ParseMode,
    pub coords: CoordMode,
    pub box_source: BoxSource,
    pub sample: bool,
    pub seed: u64,
    pub backend: Value,
}

/// One question of the evaluation.
#[derive(Clone, Debug)]
pub struct Sample {
    pub ref_id: u64,
    pub sent_id: u64,
    pub query: String,
    /// Index of the object in the item list.
    pub item: usize,
}

/// One sample per expression, in item order, cut to `limit`.
pub fn samples(items: &[Item], limit: Option<usize>) -> Vec<Sample> {
    let all = items.iter().enumerate().flat_map(|(i, item)| {
        item.sentences.iter().map(move |s| Sample {
            ref_id: item.ref_id,
            sent_id: s.sent_id,
            query: s.sent.clone(),
            item: i,
        })
    });
    match limit {
        Some(n) => all.take(n).collect(),
        None => all.collect(),
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Metrics from predictions, in (ref_id, sent_id) order.
pub fn metrics_of(predictions: &[Prediction]) -> Metrics {
    let sorted: BTreeMap<(u64, u64), Score> = predictions
        .iter()
        .map(|p| ((p.ref_id, p.sent_id), p.score()))
        .collect();
    aggregate(sorted.values())
}

/// Runs (or resumes) an evaluation into `out_dir`.
pub fn run(
    items: &[Item],
    backend: &dyn Backend,
    config: &EvalConfig,
    concurrency: usize,
    out_dir: &Path,
    show_progress: bool,
) -> Result<Report> {
    if config.limit == Some(0) {
        return Err(Error::Invalid(
            "a limit of 0 samples leaves nothing to score".into(),
        ));
    }
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    // Everything that changes answers or scores; a resumed run must match it exactly.
    check_settings(
        out_dir,
        &json!({"config": config, "backend": backend.identity()}),
    )?;
    let pred_path = out_dir.join("predictions.jsonl");
    let all = samples(items, config.limit);
    // Only the current split's samples count, whatever else the file holds.
    let wanted: HashSet<(u64, u64)> = all.iter().map(|s| (s.ref_id, s.sent_id)).collect();
    let mut predictions: Vec<Prediction> = read_journal(&pred_path)?;
    predictions.retain(|p| wanted.contains(&(p.ref_id, p.sent_id)));
    let done: HashSet<(u64, u64)> = predictions.iter().map(|p| (p.ref_id, p.sent_id)).collect();
    let todo: Vec<&Sample> = all
        .iter()
        .filter(|s| !done.contains(&(s.ref_id, s.sent_id)))
        .collect();

    let bar = if show_progress {
        let bar = ProgressBar::new(all.len() as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(format!("{} {}", config.dataset, config.split));
        bar.set_position(done.len() as u64);
        bar
    } else {
        ProgressBar::hidden()
    };
    let masks: Vec<OnceLock<std::result::Result<RleMask, String>>> =
        items.iter().map(|_| OnceLock::new()).collect();
    let next = AtomicUsize::new(0);
    let (tx, rx) = mpsc::channel::<Result<Prediction>>();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&pred_path)
        .map_err(io(&pred_path))?;
    let mut first_error = None;
    std::thread::scope(|scope| {
        for _ in 0..concurrency.max(1) {
            let tx = tx.clone();
            let (todo, masks, next) = (&todo, &masks, &next);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(sample) = todo.get(i) else { break };
                let result = (|| -> Result<Prediction> {
                    let item = &items[sample.item];
                    let prompt = fill_prompt(&config.prompt_template, &sample.query);
                    let seed = config.sample.then(|| {
                        config
                            .seed
                            .wrapping_mul(1_000_003)
                            .wrapping_add(sample.sent_id)
                    });
                    let answer = backend.answer(&Question {
                        ref_id: sample.ref_id,
                        sent_id: sample.sent_id,
                        image: &item.image,
                        prompt: &prompt,
                        seed,
                    })?;
                    let gt = masks[sample.item]
                        .get_or_init(|| item.mask().map_err(|e| e.to_string()))
                        .as_ref()
                        .map_err(|e| {
                            Error::Invalid(format!("ground truth of ref {}: {e}", item.ref_id))
                        })?;
                    let score = score_answer(
                        &answer,
                        gt,
                        item.bbox,
                        config.mode,
                        config.coords,
                        config.box_source,
                    )?;
                    Ok(Prediction::from_score(
                        sample.ref_id,
                        sample.sent_id,
                        answer,
                        score,
                    ))
                })();
                let failed = result.is_err();
                if tx.send(result).is_err() || failed {
                    // Stop taking work after a failure; others finish what they hold.
                    next.store(todo.len(), Ordering::Relaxed);
                    break;
                }
            });
        }
        drop(tx);
        for result in rx {
            match result {
                Ok(p) => {
                    #[expect(clippy::expect_used, reason = "a prediction always serializes")]
                    let line = serde_json::to_string(&p).expect("JSON");
                    if let Err(e) = writeln!(file, "{line}").and_then(|_| file.flush()) {
                        first_error.get_or_insert(io(&pred_path)(e));
                    }
                    predictions.push(p);
                    bar.inc(1);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
    });
    bar.finish_and_clear();
    if let Some(e) = first_error {
        return Err(e);
    }
    let metrics = metrics_of(&predictions);
    let report = Report {
        dataset: config.dataset.clone(),
        split: config.split.clone(),
        task: config.task,
        n: metrics.n,
        samples: all.len(),
        ciou: metrics.ciou,
        giou: metrics.giou,
        acc50: metrics.acc50,
        parse_failures: metrics.parse_failures,
        mean_points_per_polygon: metrics.mean_points_per_polygon,
        prompt_template: config.prompt_template.clone(),
        mode: config.mode,
        coords: config.coords,
        box_source: config.box_source,
        sample: config.sample,
        seed: config.seed,
        backend: backend.describe(),
    };
    write_report(out_dir, &report)?;
    Ok(report)
}

/// Writes `report.json` and `report.md`, both or neither.
pub fn write_report(out_dir: &Path, report: &Report) -> Result<()> {
    let mut outputs = Outputs::default();
    outputs.add(&out_dir.join("report.json"), |w| {
        serde_json::to_writer_pretty(&mut *w, report).map_err(|e| e.to_string())?;
        writeln!(w).map_err(|e| e.to_string())
    })?;
    outputs.add(&out_dir.join("report.md"), |w| {
        w.write_all(markdown(std::slice::from_ref(report)).as_bytes())
            .map_err(|e| e.to_string())
    })?;
    outputs.commit()?;
    Ok(())
}

fn pct(x: f64) -> String {
    format!("{:.1}", 100.0 * x)
}

/// A markdown table laid out like the paper's: one column per split, cIoU and gIoU (RES) or
/// Acc@0.5 (REC) rows, and the settings that produced them.
pub fn markdown(reports: &[Report]) -> String {
    let mut s = String::new();
    let header: Vec<String> = reports
        .iter()
        .map(|r| format!("{} {}", r.dataset, r.split))
        .collect();
    s.push_str(&format!("| metric | {} |\n", header.join(" | ")));
    s.push_str(&format!("|---|{}\n", "---|".repeat(reports.len())));
    let row = |name: &str, f: &dyn Fn(&Report) -> String| {
        format!(
            "| {name} | {} |\n",
            reports.iter().map(f).collect::<Vec<_>>().join(" | ")
        )
    };
    s.push_str(&row("cIoU", &|r| pct(r.ciou)));
    s.push_str(&row("gIoU", &|r| pct(r.giou)));
    s.push_str(&row("Acc@0.5", &|r| pct(r.acc50)));
    s.push_str(&row("samples", &|r| {
        if r.n < r.samples {
            format!("{} of {}", r.n, r.samples)
        } else {
            r.n.to_string()
        }
    }));
    s.push_str(&row("parse failures", &|r| r.parse_failures.to_string()));
    if reports.len() > 1 {
        let avg =
            |f: &dyn Fn(&Report) -> f64| reports.iter().map(f).sum::<f64>() / reports.len() as f64;
        s.push_str(&format!(
            "\nAverage: cIoU {}, gIoU {}, Acc@0.5 {}\n",
            pct(avg(&|r| r.ciou)),
            pct(avg(&|r| r.giou)),
            pct(avg(&|r| r.acc50))
        ));
    }
    if let Some(r) = reports.first() {
        s.push_str(&format!(
            "\nPrompt: `{}`; parse mode: {}; coordinates: {}; box for Acc@0.5 from: {}; decoding: {}; backend: {}\n",
            r.prompt_template,
            r.mode,
            r.coords,
            match r.box_source {
                BoxSource::Mask => "the predicted mask",
                BoxSource::Answer => "the answer's box",
            },
            if r.sample { format!("sampled (seed {})", r.seed) } else { "greedy".into() },
            r.backend
        ));
    }
    s
}

/// The output folder of a dataset split by default: `runs/<dataset>-<split>`.
pub fn default_out(dataset: &str, split: &str) -> PathBuf {
    PathBuf::from("runs").join(format!("{dataset}-{split}"))
}

/// The eight splits of the paper's table.
pub const PAPER_SPLITS: [(&str, &str); 8] = [
    ("refcoco", "val"),
    ("refcoco", "testA"),
    ("refcoco", "testB"),
    ("refcoco+", "val"),
    ("refcoco+", "testA"),
    ("refcoco+", "testB"),
    ("refcocog", "val"),
    ("refcocog", "test"),
];

/// Parses `report.json`.
pub fn read_report(path: &Path) -> Result<Report> {
    let text = read_text_file_bounded(path, Limit::DataBytes)?;
    serde_json::from_str(&text).map_err(|e| Error::BadFile {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A JSON summary for several reports.
pub fn summary_json(reports: &[Report]) -> Value {
    json!({"splits": reports})
}

/// Reads back predictions (for tools and tests).
pub fn load_predictions(out_dir: &Path) -> Result<Vec<Prediction>> {
    let path = out_dir.join("predictions.jsonl");
    let file = std::fs::File::open(&path).map_err(io(&path))?;
    std::io::BufReader::new(file)
        .lines()
        .map(|l| {
            let l = l.map_err(io(&path))?;
            serde_json::from_str(&l).map_err(|e| Error::BadFile {
                path: path.clone(),
                message: e.to_string(),
            })
        })
        .collect()
}
