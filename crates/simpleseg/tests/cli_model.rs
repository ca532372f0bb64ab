//! `chat` and `segment` on a tiny checkpoint, as scripts call them.

mod common;
use common::{assert_success, root};

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
    assert_success(&out);
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
    assert_success(&out);
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
            "invalid value 'tpu' for '--device <DEVICE>'",
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

/// `chat --n 3` samples three answers from one prefill; each equals a one-answer run with its
/// seed, and `--json` prints one line per answer naming that seed.
#[test]
fn chat_n_answers_equal_single_runs_with_their_seeds() {
    let image = root().join("examples/synth/images/synth/demo_0000008.png");
    let chat = |extra: &[&str]| -> Vec<serde_json::Value> {
        let out = Command::new(env!("CARGO_BIN_EXE_simpleseg"))
            .arg("chat")
            .arg("--image")
            .arg(&image)
            .args([
                "--prompt",
                "Output the polygon coordinates of the red shape in the image.",
                "--temperature",
                "1.0",
                "--max-new-tokens",
                "30",
                "--json",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert_success(&out);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let together = chat(&["--n", "3", "--seed", "40"]);
    assert_eq!(together.len(), 3);
    for (i, line) in together.iter().enumerate() {
        let seed = 40 + i as u64;
        assert_eq!(line["seed"], seed);
        let single = chat(&["--seed", &seed.to_string()]);
        assert_eq!(single[0]["token_ids"], line["token_ids"], "seed {seed}");
    }
    // Greedy decoding cannot give several answers.
    let out = Command::new(env!("CARGO_BIN_EXE_simpleseg"))
        .arg("chat")
        .arg("--image")
        .arg(&image)
        .args(["--prompt", "x", "--greedy", "--n", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs sampling"));
}

/// The Kimi-VL family through the commands: `chat --greedy --json` gives the reference's
/// token ids (transformers' greedy `generate`), `segment` writes a mask.
#[test]
fn kimi_vl_checkpoints_run_through_chat_and_segment() {
    let model = root().join("fixtures/kimi/kimi-tiny");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/kimi/kimi-tiny.expected.json")).unwrap(),
    )
    .unwrap();
    let case = &meta["cases"][0];
    let mut want: Vec<u64> = serde_json::from_value(case["greedy_ids"].clone()).unwrap();
    let max_new = want.len();
    let out = Command::new(env!("CARGO_BIN_EXE_simpleseg"))
        .args(["chat", "--model"])
        .arg(&model)
        .arg("--image")
        .arg(model.join(case["image"].as_str().unwrap()))
        .args([
            "--prompt",
            case["prompt"].as_str().unwrap(),
            "--greedy",
            "--dtype",
            "f32",
            "--max-new-tokens",
            &max_new.to_string(),
            "--json",
        ])
        .output()
        .unwrap();
    assert_success(&out);
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    if line["stop_reason"] == "eos" {
        want.pop();
    }
    assert_eq!(line["token_ids"], serde_json::json!(want));
    assert_eq!(
        line["prompt_tokens"],
        case["input_ids"].as_array().unwrap().len()
    );

    let dir = tempdir("kimi-segment");
    let out = Command::new(env!("CARGO_BIN_EXE_simpleseg"))
        .args(["segment", "--model"])
        .arg(&model)
        .arg("--image")
        .arg(root().join("examples/synth/images/synth/demo_0000008.png"))
        .args([
            "--query",
            "the red shape",
            "--max-new-tokens",
            "16",
            "--rle-out",
            "m.json",
            "--json",
        ])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_success(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["width"], 112);
    let rle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("m.json")).unwrap()).unwrap();
    assert_eq!(rle["size"], serde_json::json!([112, 112]));
    // f16 overflows this family's activations: refused.
    let out = Command::new(env!("CARGO_BIN_EXE_simpleseg"))
        .args(["chat", "--model"])
        .arg(&model)
        .arg("--image")
        .arg(model.join(case["image"].as_str().unwrap()))
        .args(["--prompt", "x", "--dtype", "f16"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("f16"));
}
