//! `chat` and `segment` on a tiny checkpoint, as scripts call them.

mod common;
use common::root;

use std::path::PathBuf;
use std::process::Command;

fn tempdir(name: &str) -> PathBuf {
    common::fresh_dir("cli-model", name)
}

#[test]
fn chat_json_gives_transformers_greedy_tokens() {
    let case = root().join("fixtures/qwen/flat-window112-tied");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/qwen/flat-window112-tied.expected.json"))
            .unwrap(),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_simpleseg"))
        .args(["chat", "--model"])
        .arg(&case)
        .arg("--image")
        .arg(case.join("image.png"))
        .args([
            "--prompt",
            meta["prompt"].as_str().unwrap(),
            "--greedy",
            "--max-new-tokens",
            "24",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["text"], meta["greedy_text"]);
    assert_eq!(line["token_ids"].as_array().unwrap().len(), 24);
    assert_eq!(line["prompt_tokens"], 85);
    assert!(line["timings"]["prefill_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn segment_writes_default_outputs_in_the_current_directory() {
    let dir = tempdir("segment");
    let out = Command::new(env!("CARGO_BIN_EXE_simpleseg"))
        .args(["segment", "--model"])
        .arg(root().join("fixtures/qwen/nested-window56-untied"))
        .arg("--image")
        .arg(root().join("examples/voc.jpg"))
        .args(["--query", "the man", "--max-new-tokens", "8", "--json"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["mode"], "robust");
    assert_eq!(
        report["prompt"],
        "Output the polygon coordinates of the man in the image."
    );
    assert_eq!(report["width"], 500);
    assert!(dir.join("voc.mask.png").exists() && dir.join("voc.overlay.png").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn model_errors_are_clear() {
    let dir = tempdir("errors");
    for (args, needle) in [
        (
            vec!["chat", "--model", ".", "--image", "x.png", "--prompt", "p"],
            "config.json",
        ),
        (
            vec![
                "chat", "--model", "nowhere", "--image", "x.png", "--prompt", "p",
            ],
            "nowhere",
        ),
        (
            vec![
                "chat", "--image", "x.png", "--prompt", "p", "--device", "tpu", "--model", ".",
            ],
            "unknown device",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_simpleseg"))
            .args(&args)
            .current_dir(&dir)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(needle),
            "{args:?}: {stderr}"
        );
    }
    // A missing image with a valid model.
    let out = Command::new(env!("CARGO_BIN_EXE_simpleseg"))
        .args(["chat", "--model"])
        .arg(root().join("fixtures/qwen/flat-window112-tied"))
        .args(["--image", "missing.png", "--prompt", "p"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.png"));
    std::fs::remove_dir_all(&dir).unwrap();
}
