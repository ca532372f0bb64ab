//! `segment --batch`: many images at once, decoded together, into a folder that a rerun
//! resumes. Items come from a JSON lines file (`{"image", "query" | "point" | "box", "id"?,
//! "image_id"?, "category_id"?}`, image paths relative to the file) or a folder of images
//! (with `--query`, `--point` or `--box`). The folder gets `answers.jsonl` (one line per item,
//! in input order: the segmentation, or the item's `error`), `coco_results.json` (a COCO
//! results list), `masks/ID.png` and, with `--svg`, `svg/ID.svg`; `run.json` holds the
//! settings, and a rerun with others is refused.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use simpleseg_core::images::open_image;
use simpleseg_core::io::{encode_mask_png, write_atomic};
use simpleseg_core::journal::{check_settings, read_journal, Journal};
use simpleseg_core::limits::{read_text_file_bounded, Limit};
use simpleseg_core::segment::Target;
use simpleseg_engine::runtime::constraint::Grammar;
use simpleseg_engine::runtime::segment::{
    segment_batch, SegmentJob, SegmentOptions, SegmentResult,
};
use simpleseg_engine::{GenerationConfig, HfFolder, VisionLanguageModel};

/// How a batch runs.
pub struct BatchSettings<'a> {
    pub input: &'a Path,
    pub out: &'a Path,
    /// The target of items that name none (and of every image of a folder).
    pub default_target: Option<Target>,
    pub batch_size: usize,
    pub masks: bool,
    pub svg: bool,
    pub options: SegmentOptions,
    pub config: GenerationConfig,
    pub grammar: Option<Arc<Grammar>>,
    /// How the model is named and identified in `run.json`.
    pub model_name: String,
    pub model_dir: PathBuf,
}

/// One thing to segment, or why it cannot be.
struct Item {
    /// The item's `id` (given, else its line number or file name).
    id: Value,
    /// The image as the input names it.
    image_label: String,
    image: PathBuf,
    image_id: Value,
    category_id: Value,
    target: std::result::Result<Target, String>,
    /// Where its files go: the id, made a safe file name.
    file_stem: String,
}

const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"];

/// `id` as a file name: letters, digits, `.`, `_` and `-` kept, anything else `_`.
fn file_stem(id: &Value) -> String {
    let text = match id {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let stem: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match stem.trim_start_matches('.') {
        "" => "_".to_string(),
        s => s.to_string(),
    }
}

/// A line's target: exactly one of `query`, `point`, `box`, else the command line's.
fn line_target(record: &Value, default: Option<&Target>) -> std::result::Result<Target, String> {
    let numbers = |key: &str, n: usize| -> std::result::Result<Vec<f64>, String> {
        let values: Option<Vec<f64>> = record[key]
            .as_array()
            .filter(|a| a.len() == n)
            .and_then(|a| a.iter().map(Value::as_f64).collect());
        values.ok_or_else(|| format!("\"{key}\" must be a list of {n} numbers"))
    };
    let given: Vec<&str> = ["query", "point", "box"]
        .into_iter()
        .filter(|k| !record[*k].is_null())
        .collect();
    match given.as_slice() {
        [] => default.cloned().ok_or_else(|| {
            "the item has no \"query\", \"point\" or \"box\", and the command gives none"
                .to_string()
        }),
        ["query"] => record["query"]
            .as_str()
            .map(|q| Target::Query(q.to_string()))
            .ok_or_else(|| "\"query\" must be a string".to_string()),
        ["point"] => numbers("point", 2).map(|p| Target::Point([p[0], p[1]])),
        ["box"] => numbers("box", 4).map(|b| Target::Box([b[0], b[1], b[2], b[3]])),
        _ => Err(format!(
            "give one of \"query\", \"point\", \"box\", not {}",
            given.join(" and ")
        )),
    }
}

/// The items of a JSON lines file (paths relative to its folder) or of a folder of images.
fn read_items(input: &Path, default: Option<&Target>) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    if input.is_dir() {
        let Some(target) = default else {
            bail!("a folder of images needs --query, --point or --box: what to segment in each");
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(input)
            .with_context(|| format!("reading {}", input.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension().is_some_and(|e| {
                        IMAGE_EXTENSIONS
                            .contains(&e.to_string_lossy().to_ascii_lowercase().as_str())
                    })
            })
            .collect();
        files.sort();
        for (i, path) in files.into_iter().enumerate() {
            let name = path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            let id = json!(name);
            items.push(Item {
                file_stem: file_stem(&id),
                id,
                image_label: name,
                image: path,
                image_id: json!(i + 1),
                category_id: json!(1),
                target: Ok(target.clone()),
            });
        }
        if items.is_empty() {
            bail!(
                "{} holds no images ({})",
                input.display(),
                IMAGE_EXTENSIONS.join(", ")
            );
        }
        return Ok(items);
    }
    let text = read_text_file_bounded(input, Limit::DataBytes)
        .with_context(|| format!("reading {}", input.display()))?;
    let base = input.parent().unwrap_or(Path::new("."));
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let number = n + 1;
        let record: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        let id = match &record["id"] {
            id @ (Value::String(_) | Value::Number(_)) => id.clone(),
            _ => json!(number),
        };
        let image_label = record["image"].as_str().unwrap_or_default().to_string();
        let target = if !record.is_object() {
            Err(format!("line {number} is not a JSON object"))
        } else if image_label.is_empty() {
            Err(format!("line {number} has no \"image\" path"))
        } else {
            line_target(&record, default).map_err(|e| format!("line {number}: {e}"))
        };
        items.push(Item {
            file_stem: file_stem(&id),
            image: base.join(&image_label),
            image_label,
            image_id: match &record["image_id"] {
                Value::Number(n) => Value::Number(n.clone()),
                _ => json!(items.len() + 1),
            },
            category_id: match &record["category_id"] {
                Value::Number(n) => Value::Number(n.clone()),
                _ => json!(1),
            },
            id,
            target,
        });
    }
    if items.is_empty() {
        bail!("{} holds no items", input.display());
    }
    Ok(items)
}

/// Refuses ids that repeat, or that give two items the same file name: a resumed run tells
/// items apart by id.
fn check_ids(items: &[Item]) -> Result<()> {
    let mut ids = HashSet::new();
    let mut stems: HashMap<&str, &Value> = HashMap::new();
    for item in items {
        if !ids.insert(item.id.to_string()) {
            bail!("the id {} is given to more than one item", item.id);
        }
        if let Some(other) = stems.insert(&item.file_stem, &item.id) {
            bail!(
                "ids {other} and {} give the same file name {:?}; use ids of letters, digits, '.', '_' and '-'",
                item.id,
                item.file_stem
            );
        }
    }
    Ok(())
}

/// The `answers.jsonl` line of a segmented item (its files written first).
fn answer_line(item: &Item, result: &SegmentResult, settings: &BatchSettings) -> Result<Value> {
    let segmentation = &result.segmentation;
    let mut line = result.to_json();
    if let Some(object) = line.as_object_mut() {
        // The prompt's token ids are long and say nothing the answer does not.
        object.remove("token_ids");
    }
    line["id"] = item.id.clone();
    line["image"] = json!(item.image_label);
    line["image_id"] = item.image_id.clone();
    line["category_id"] = item.category_id.clone();
    if settings.masks {
        let relative = format!("masks/{}.png", item.file_stem);
        write_atomic(&settings.out.join(&relative), |w| {
            encode_mask_png(&segmentation.mask, w).map_err(|e| e.to_string())
        })?;
        line["mask"] = json!(relative);
    }
    if settings.svg {
        let relative = format!("svg/{}.svg", item.file_stem);
        write_atomic(&settings.out.join(&relative), |w| {
            w.write_all(segmentation.svg_document().as_bytes())
                .map_err(|e| e.to_string())
        })?;
        line["svg_file"] = json!(relative);
    }
    Ok(line)
}

fn error_line(item: &Item, error: &str) -> Value {
    json!({"id": item.id, "image": item.image_label, "image_id": item.image_id, "error": error})
}

/// Segments a chunk of items: those that cannot be asked get their error; the rest decode
/// together (one at a time when the batch as a whole fails, to find the item at fault).
fn segment_chunk(
    model: &dyn VisionLanguageModel,
    chunk: &[&Item],
    settings: &BatchSettings,
) -> Result<Vec<Value>> {
    let mut lines: Vec<Option<Value>> = vec![None; chunk.len()];
    let mut jobs = Vec::new();
    for (i, item) in chunk.iter().enumerate() {
        let asked = item.target.clone().and_then(|target| {
            let image = open_image(&item.image).map_err(|e| e.to_string())?;
            SegmentJob::new(model, &image, &target, &settings.options).map_err(|e| e.to_string())
        });
        match asked {
            Ok(job) => jobs.push((i, job)),
            Err(e) => lines[i] = Some(error_line(item, &e)),
        }
    }
    let run = |jobs: &[(usize, SegmentJob)]| -> simpleseg_engine::Result<Vec<SegmentResult>> {
        let only: Vec<SegmentJob> = jobs.iter().map(|(_, j)| j.clone()).collect();
        let configs = vec![settings.config.clone(); only.len()];
        segment_batch(model, &only, &configs, settings.grammar.clone(), |_, _| {})
    };
    match run(&jobs) {
        Ok(results) => {
            for ((i, _), result) in jobs.iter().zip(&results) {
                lines[*i] = Some(answer_line(chunk[*i], result, settings)?);
            }
        }
        Err(_) => {
            for job in &jobs {
                let i = job.0;
                lines[i] = Some(match run(std::slice::from_ref(job)) {
                    Ok(results) => match results.first() {
                        Some(result) => answer_line(chunk[i], result, settings)?,
                        None => error_line(chunk[i], "the model gave no answer"),
                    },
                    Err(e) => error_line(chunk[i], &e.to_string()),
                });
            }
        }
    }
    Ok(lines.into_iter().flatten().collect())
}

/// A COCO results list from the answers: one entry per segmented item.
fn coco_results(answers: &[Value]) -> Value {
    Value::Array(
        answers
            .iter()
            .filter(|a| a.get("error").is_none())
            .map(|a| {
                json!({
                    "image_id": a["image_id"],
                    "category_id": a["category_id"],
                    "segmentation": a["rle"],
                    "bbox": a["bbox"],
                    "area": a["area"],
                    // The model gives no confidence: every mask counts alike.
                    "score": 1.0,
                    "id": a["id"],
                })
            })
            .collect(),
    )
}

/// Runs (or resumes) a batch.
pub fn run(model: &dyn VisionLanguageModel, settings: &BatchSettings) -> Result<()> {
    let items = read_items(settings.input, settings.default_target.as_ref())?;
    check_ids(&items)?;
    let out = settings.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for (wanted, dir) in [(settings.masks, "masks"), (settings.svg, "svg")] {
        if wanted {
            std::fs::create_dir_all(out.join(dir))
                .with_context(|| format!("creating {}", out.join(dir).display()))?;
        }
    }
    let c = &settings.config;
    let input = std::fs::canonicalize(settings.input).unwrap_or(settings.input.to_path_buf());
    check_settings(
        out,
        &json!({
            "input": input,
            "model": settings.model_name,
            "model_files": HfFolder::open(&settings.model_dir)?.fingerprint()?,
            "architecture": model.architecture(),
            "dtype": model.dtype().as_str(),
            "target": settings.default_target,
            "prompt_template": settings.options.prompt_template,
            "mode": settings.options.mode,
            "coords": settings.options.coords,
            "constrain": settings.grammar.as_ref().map(|g| g.name()),
            "masks": settings.masks,
            "svg": settings.svg,
            "sampling": {
                "do_sample": c.do_sample,
                "temperature": c.temperature,
                "top_p": c.top_p,
                "top_k": c.top_k,
                "repetition_penalty": c.repetition_penalty,
                "presence_penalty": c.presence_penalty,
                "frequency_penalty": c.frequency_penalty,
                "seed": c.seed,
                "max_new_tokens": c.max_new_tokens,
                "eos_token_ids": c.eos_token_ids,
            },
        }),
    )?;
    let journal_path = out.join("answers.jsonl");
    let mut answers: Vec<Value> = read_journal(&journal_path)?;
    let done: HashSet<String> = answers.iter().map(|a| a["id"].to_string()).collect();
    let todo: Vec<&Item> = items
        .iter()
        .filter(|i| !done.contains(&i.id.to_string()))
        .collect();
    let bar = ProgressBar::new(items.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} segmenting [{bar:40}] {pos}/{len} ({per_sec}, eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_position((items.len() - todo.len()) as u64);
    let mut journal = Journal::append_to(&journal_path)?;
    let start = Instant::now();
    let mut failed = answers.iter().filter(|a| a.get("error").is_some()).count();
    for chunk in todo.chunks(settings.batch_size) {
        let lines = segment_chunk(model, chunk, settings)?;
        failed += lines.iter().filter(|l| l.get("error").is_some()).count();
        journal.write(&lines)?;
        answers.extend(lines);
        bar.inc(chunk.len() as u64);
        if failed > 0 {
            bar.set_message(format!("{failed} failed"));
        }
    }
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    // Input order, whatever order earlier runs finished in.
    let order: HashMap<String, usize> = items
        .iter()
        .enumerate()
        .map(|(i, item)| (item.id.to_string(), i))
        .collect();
    answers.sort_by_key(|a| {
        order
            .get(&a["id"].to_string())
            .copied()
            .unwrap_or(usize::MAX)
    });
    let results = coco_results(&answers);
    write_atomic(&out.join("coco_results.json"), |w| {
        serde_json::to_writer(&mut *w, &results).map_err(|e| e.to_string())
    })?;
    for a in answers.iter().filter(|a| a.get("error").is_some()) {
        eprintln!(
            "skipped {}: {}",
            a["id"],
            a["error"].as_str().unwrap_or_default()
        );
    }
    println!(
        "{} items: {} segmented, {} skipped ({} this run in {seconds:.1}s, {:.2} items/s); wrote {}",
        items.len(),
        items.len() - failed,
        failed,
        todo.len(),
        todo.len() as f64 / seconds.max(1e-9),
        out.display()
    );
    Ok(())
}
