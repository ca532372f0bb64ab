//! `quantize` and `--quantize`: a quantized folder answers as quantizing at load does, for both
//! families, and the agreement check refuses a model below `--min-agreement`, leaving nothing.

mod common;
use common::{assert_success, fresh_dir, root};

use std::path::Path;
use std::process::Command;

fn simpleseg() -> Command {
    Command::new(env!("CARGO_BIN_EXE_simpleseg"))
}

/// Greedy token ids of `chat` on the demo image, with extra arguments.
fn greedy_ids(extra: &[&str]) -> serde_json::Value {
    let out = simpleseg()
        .arg("chat")
        .args(extra)
        .arg("--image")
        .arg(root().join("examples/synth/images/synth/demo_0000008.png"))
        .args([
            "--prompt",
            "Output the polygon coordinates of the red shape in the image.",
            "--greedy",
            "--max-new-tokens",
            "24",
            "--json",
        ])
        .output()
        .unwrap();
    assert_success(&out);
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    line["token_ids"].clone()
}

fn quantization_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("quantization.json")).unwrap()).unwrap()
}

#[test]
fn quantized_folders_answer_as_quantizing_at_load() {
    let dir = fresh_dir("quantize", "folders");
    let kimi = root().join("fixtures/kimi/kimi-tiny");
    // The built-in model (q4k: its wide layers get q4k, the rest q4_0) and a Kimi-VL checkpoint.
    for (name, model, format) in [("tiny", None, "q4k"), ("kimi", Some(&kimi), "q8_0")] {
        let out_dir = dir.join(name);
        let mut cmd = simpleseg();
        cmd.arg("quantize");
        if let Some(m) = model {
            cmd.arg("--model").arg(m);
        }
        let out = cmd
            .args(["--format", format, "--out"])
            .arg(&out_dir)
            .output()
            .unwrap();
        assert_success(&out);
        let record = quantization_json(&out_dir);
        assert_eq!(record["format"], format);
        assert!(record["check"].is_null());
        let types = &record["tensors_by_type"];
        assert!(types[format].as_u64().unwrap() > 0, "{name}: {types}");
        assert!(out_dir.join("model.gguf").is_file());
        assert!(out_dir.join("config.json").is_file());
        assert!(!std::fs::read_dir(&out_dir).unwrap().any(|e| e
            .unwrap()
            .path()
            .extension()
            .is_some_and(|x| x == "safetensors")));

        let mut at_load: Vec<&str> = vec!["--quantize", format];
        let model_arg;
        if let Some(m) = model {
            model_arg = m.to_str().unwrap().to_string();
            at_load.extend(["--model", &model_arg]);
        }
        let from_folder = greedy_ids(&["--model", out_dir.to_str().unwrap()]);
        assert_eq!(from_folder, greedy_ids(&at_load), "{name}");
        assert_eq!(from_folder.as_array().unwrap().len(), 24);
    }
    // A quantized folder is not quantized again.
    let out = simpleseg()
        .args(["quantize", "--format", "q8_0", "--model"])
        .arg(dir.join("tiny"))
        .arg("--out")
        .arg(dir.join("again"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("quantized already"));
    assert!(!dir.join("again").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_agreement_check_refuses_below_the_threshold_and_leaves_nothing() {
    let dir = fresh_dir("quantize", "gate");
    let out_dir = dir.join("q4k");
    let check = |extra: &[&str]| {
        simpleseg()
            .args(["quantize", "--format", "q4k", "--out"])
            .arg(&out_dir)
            .arg("--check-refer-root")
            .arg(root().join("examples/synth"))
            .args(["--check-dataset", "synth", "--check-split", "demo"])
            .args(["--check-limit", "2", "--min-agreement", "0.99"])
            .args(extra)
            .output()
            .unwrap()
    };
    // The first demo expression's q4k mask differs from the original's (IoU below 0.9).
    let out = check(&[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("below --min-agreement 0.99"), "{stderr}");
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let agreement = &printed["check"]["agreement"];
    assert_eq!(agreement["n"], 2);
    assert!(agreement["mean_mask_iou"].as_f64().unwrap() < 0.99);
    assert_eq!(printed["check"]["passed"], false);
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "nothing is left behind: {left:?}");

    let out = check(&["--force"]);
    assert_success(&out);
    let record = quantization_json(&out_dir);
    assert_eq!(record["check"]["passed"], false);
    assert_eq!(record["check"]["forced"], true);
    assert_eq!(record["check"]["agreement"], *agreement);
    std::fs::remove_dir_all(&dir).unwrap();
}
