//! `segment --batch`: the answers of a batch equal `segment` on each image alone; a batch
//! killed partway (and left with a half-written line) and rerun holds every item exactly once
//! with the same answers as an uninterrupted run; a rerun with other settings is refused; bad
//! items are reported and skipped; a folder of images works with --query.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_success, fresh_dir};
use serde_json::{json, Value};

fn simpleseg(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_simpleseg"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// `answers.jsonl` by id.
fn answers(out: &Path) -> BTreeMap<String, Value> {
    std::fs::read_to_string(out.join("answers.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["id"].to_string(), v)
        })
        .collect()
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

#[test]
fn batches_resume_after_a_kill_and_equal_single_segments() {
    let dir = fresh_dir("batch", "resume");
    assert_success(&simpleseg(
        &dir,
        &[
            "data", "synth", "--seed", "4", "--count", "24", "--out", "root",
        ],
    ));
    let mut images: Vec<String> = std::fs::read_dir(dir.join("root/images/synth"))
        .unwrap()
        .map(|e| {
            format!(
                "root/images/synth/{}",
                e.unwrap().file_name().to_string_lossy()
            )
        })
        .collect();
    images.sort();
    let mut items: Vec<Value> = images
        .iter()
        .enumerate()
        .map(|(i, image)| match i % 3 {
            0 => json!({"image": image, "query": "the red shape", "id": format!("q{i}")}),
            1 => json!({"image": image, "point": [0.5, 0.5], "id": format!("p{i}"), "image_id": 100 + i}),
            _ => json!({"image": image, "box": [0.1, 0.1, 0.9, 0.9]}),
        })
        .collect();
    items.push(json!({"image": "root/missing.png", "query": "x", "id": "missing"}));
    let text: String = items.iter().map(|i| format!("{i}\n")).collect();
    std::fs::write(dir.join("items.jsonl"), text).unwrap();
    let batch = |out: &str, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "segment",
            "--batch",
            "items.jsonl",
            "--out",
            out,
            "--max-new-tokens",
            "40",
            "--batch-size",
            "3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };

    // An uninterrupted run.
    let whole = simpleseg(
        &dir,
        &batch("whole", &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_success(&whole);
    let reference = answers(&dir.join("whole"));
    assert_eq!(reference.len(), items.len());
    assert!(reference["\"missing\""]["error"]
        .as_str()
        .unwrap()
        .contains("missing.png"));
    let stdout = String::from_utf8_lossy(&whole.stdout);
    assert!(
        stdout.contains("25 items: 24 segmented, 1 skipped"),
        "{stdout}"
    );

    // Each answer equals `segment` on its image alone.
    for (i, item) in items.iter().take(6).enumerate() {
        let id = match &item["id"] {
            Value::Null => (i + 1).to_string(),
            id => id.to_string(),
        };
        let mut args = vec![
            "segment".to_string(),
            "--image".into(),
            item["image"].as_str().unwrap().into(),
            "--max-new-tokens".into(),
            "40".into(),
            "--json".into(),
            "--rle-out".into(),
            format!("single-{i}.json"),
        ];
        match (&item["query"], &item["point"], &item["box"]) {
            (Value::String(q), _, _) => args.extend(["--query".into(), q.clone()]),
            (_, Value::Array(p), _) => {
                args.extend(["--point".into(), format!("{},{}", p[0], p[1])])
            }
            (_, _, Value::Array(b)) => args.extend([
                "--box".into(),
                b.iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ]),
            _ => unreachable!(),
        }
        let out = simpleseg(&dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_success(&out);
        let single: Value = serde_json::from_slice(&out.stdout).unwrap();
        let batched = &reference[&id];
        for key in ["answer", "rle", "polygons", "bbox", "area", "svg"] {
            assert_eq!(batched[key], single[key], "{id} {key}");
        }
    }
    // The COCO results: every segmented item once, with its image_id and RLE.
    let coco: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(dir.join("whole/coco_results.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(coco.len(), 24);
    assert_eq!(coco[1]["image_id"], 101);
    assert_eq!(coco[1]["segmentation"], reference["\"p1\""]["rle"]);
    assert!(coco[1]["segmentation"]["counts"].is_string());
    assert!(dir.join("whole/masks/q0.png").is_file());

    // Killed after a few items, with a half-written line appended, then rerun.
    let args = batch("killed", &[]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_simpleseg"))
        .args(&args)
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let journal = dir.join("killed/answers.jsonl");
    let start = Instant::now();
    while lines(&journal) < 6 && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = lines(&journal);
    assert!(
        before >= 6 && before < items.len(),
        "killed after {before} items"
    );
    let mut half = std::fs::OpenOptions::new()
        .append(true)
        .open(&journal)
        .unwrap();
    std::io::Write::write_all(&mut half, b"{\"id\": \"q9\", \"answ").unwrap();
    drop(half);
    let resumed = simpleseg(&dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_success(&resumed);
    let text = std::fs::read_to_string(&journal).unwrap();
    assert_eq!(text.lines().count(), items.len(), "each item exactly once");
    let killed = answers(&dir.join("killed"));
    assert_eq!(killed.len(), items.len());
    for (id, answer) in &reference {
        for key in ["answer", "rle", "error", "image_id"] {
            assert_eq!(killed[id][key], answer[key], "{id} {key}");
        }
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("killed/coco_results.json")).unwrap(),
        std::fs::read_to_string(dir.join("whole/coco_results.json")).unwrap()
    );
    // Other settings in the same folder are refused, naming the difference.
    let other = batch("killed", &["--repetition-penalty", "1.1"]);
    let out = simpleseg(&dir, &other.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sampling.repetition_penalty was 1.0 and is now 1.1"),
        "{stderr}"
    );

    // A folder of images, one query for all, with SVG outlines.
    let folder = simpleseg(
        &dir,
        &[
            "segment",
            "--batch",
            "root/images/synth",
            "--out",
            "folder",
            "--query",
            "the red shape",
            "--max-new-tokens",
            "40",
            "--svg",
            "--no-masks",
        ],
    );
    assert_success(&folder);
    let by_folder = answers(&dir.join("folder"));
    assert_eq!(by_folder.len(), images.len());
    let first = &by_folder["\"train_0000001.png\""];
    assert_eq!(first["answer"], reference["\"q0\""]["answer"]);
    assert!(dir.join("folder/svg/train_0000001.png.svg").is_file());
    assert!(!dir.join("folder/masks").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
