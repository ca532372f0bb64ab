//! `data sft`, `data rl` and `eval --all` as scripts call them.

mod common;
use common::root;

use std::path::PathBuf;
use std::process::Command;

fn run(args: &[&str], dir: &std::path::Path) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_simpleseg"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn tempdir(name: &str) -> PathBuf {
    common::fresh_dir("cli-data", name)
}

#[test]
fn data_sft_writes_the_scripts_format() {
    let dir = tempdir("sft");
    let refer = root().join("fixtures/refer");
    let refer = refer.to_str().unwrap();
    run(
        &[
            "data",
            "sft",
            "--refer-root",
            refer,
            "--datasets",
            "refcoco,voc",
            "--out",
            "train.json",
            "--seed",
            "3",
        ],
        &dir,
    );
    let text = std::fs::read_to_string(dir.join("train.json")).unwrap();
    assert!(text.starts_with("[\n    {\n        \"conversations\": [\n            {\n                \"from\": \"user\","));
    let records: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    // refcoco train: 4 refs with 1, 2, 1, 2 sentences ... as the fixture has them; voc train: 10 refs, 11 sentences.
    assert_eq!(records.len() % 2, 0);
    assert!(records.iter().all(|r| r["conversations"][0]["value"]
        .as_str()
        .unwrap()
        .starts_with("<img>images/")));
    run(
        &[
            "data",
            "sft",
            "--refer-root",
            refer,
            "--datasets",
            "voc",
            "--out",
            "train.jsonl",
            "--tasks",
            "text-mask,point-mask,box-mask,text-box",
        ],
        &dir,
    );
    let lines = std::fs::read_to_string(dir.join("train.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2 * 11 * 4);
    assert!(lines.contains("Show me the contour of the object at point ["));
    assert!(lines.contains("Give the polygon vertices of the stuff within the box region ["));
    run(
        &[
            "data",
            "rl",
            "--refer-root",
            refer,
            "--datasets",
            "voc",
            "--split",
            "val",
            "--out",
            "rl.jsonl",
        ],
        &dir,
    );
    let rl: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("rl.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rl.len(), 9);
    for key in [
        "ref_id", "sent_id", "image", "width", "height", "prompt", "rle",
    ] {
        assert!(rl[0].get(key).is_some(), "{key}");
    }
    // Missing datasets are named.
    let out = Command::new(env!("CARGO_BIN_EXE_simpleseg"))
        .args([
            "data",
            "sft",
            "--refer-root",
            refer,
            "--datasets",
            "refclef",
            "--out",
            "x.json",
        ])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refs(unc).p"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn eval_all_runs_the_eight_splits() {
    let dir = tempdir("all");
    for (name, split) in [
        ("refcoco", "val"),
        ("refcoco", "testA"),
        ("refcoco", "testB"),
        ("refcoco+", "val"),
        ("refcoco+", "testA"),
        ("refcoco+", "testB"),
        ("refcocog", "val"),
        ("refcocog", "test"),
    ] {
        run(
            &[
                "data", "synth", "--name", name, "--split", split, "--seed", "9", "--count", "1",
                "--size", "56", "--out", "root",
            ],
            &dir,
        );
    }
    let model = root().join("fixtures/qwen/flat-window112-tied");
    run(
        &[
            "eval",
            "--all",
            "--refer-root",
            "root",
            "--model",
            model.to_str().unwrap(),
            "--max-new-tokens",
            "4",
            "--limit",
            "1",
            "--out",
            "runs",
        ],
        &dir,
    );
    let summary = std::fs::read_to_string(dir.join("runs/summary.md")).unwrap();
    assert!(
        summary.contains("| metric | refcoco val | refcoco testA | refcoco testB | refcoco+ val |")
    );
    for split in ["refcoco-val", "refcoco+-testB", "refcocog-test"] {
        assert!(
            dir.join("runs").join(split).join("report.json").is_file(),
            "{split}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
