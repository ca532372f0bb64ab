//! A training run killed part-way and resumed reaches the same weights as an uninterrupted one.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_simpleseg"))
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("simpleseg-resume-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const TINY: &str = r#"{
  "model_type": "qwen2_5_vl",
  "tie_word_embeddings": true,
  "text_config": {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6, "max_position_embeddings": 1024,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
  "vision_config": {"depth": 2, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2, "out_hidden_size": 32,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [1]},
  "image_processor": {"min_pixels": 3136, "max_pixels": 3136}
}"#;

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn train_args(out: &str) -> Vec<String> {
    [
        "train",
        "sft",
        "--data",
        "sft.jsonl",
        "--refer-root",
        "root",
        "--config",
        "tiny.json",
        "--out",
        out,
        "--steps",
        "12",
        "--batch-size",
        "4",
        "--save-every",
        "1",
        "--log-every",
        "1",
        "--vocab-size",
        "300",
        "--warmup",
        "3",
        "--threads",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn weights(path: &Path) -> Vec<(String, Vec<f32>)> {
    let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = tensors
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn step_of(state: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(state).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["step"].as_u64()
}

/// A synthetic data set, SFT and RL data and the tiny config in a fresh folder.
fn setup(name: &str) -> PathBuf {
    let dir = tempdir(name);
    run_ok(bin().current_dir(&dir).args([
        "data", "synth", "--seed", "3", "--count", "8", "--size", "56", "--out", "root",
    ]));
    run_ok(bin().current_dir(&dir).args([
        "data",
        "sft",
        "--refer-root",
        "root",
        "--datasets",
        "synth",
        "--out",
        "sft.jsonl",
        "--epsilon-ratio",
        "0.05",
        "--passes",
        "1",
    ]));
    run_ok(bin().current_dir(&dir).args([
        "data",
        "rl",
        "--refer-root",
        "root",
        "--datasets",
        "synth",
        "--out",
        "rl.jsonl",
    ]));
    std::fs::write(dir.join("tiny.json"), TINY).unwrap();
    dir
}

/// Runs `args` into `a` uninterrupted and into `b` killed after step 3 and resumed; returns
/// the step it was killed at and the largest weight difference.
fn kill_and_resume(dir: &Path, args: impl Fn(&str) -> Vec<String>, steps: u64) -> (u64, f32) {
    run_ok(bin().current_dir(dir).args(args("a")));
    let mut child = bin()
        .current_dir(dir)
        .args(args("b"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let state = dir.join("b/training/state.json");
    let start = Instant::now();
    while step_of(&state).unwrap_or(0) < 3 && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = step_of(&state).expect("the run saved a checkpoint before it was killed");
    assert!(
        killed_at < steps,
        "the run finished before it could be killed (step {killed_at})"
    );
    let mut resume = args("b");
    resume.push("--resume".into());
    run_ok(bin().current_dir(dir).args(resume));
    let (a, b) = (
        weights(&dir.join("a/model.safetensors")),
        weights(&dir.join("b/model.safetensors")),
    );
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs());
        }
    }
    let log = std::fs::read_to_string(dir.join("b/training/log.jsonl")).unwrap();
    let logged: Vec<u64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .collect();
    assert_eq!(
        logged,
        (1..=steps).collect::<Vec<_>>(),
        "each step is logged once"
    );
    (killed_at, worst)
}

#[test]
fn killed_and_resumed_sft_matches_an_uninterrupted_run() {
    let dir = setup("sft");
    let (killed_at, worst) = kill_and_resume(&dir, train_args, 12);
    eprintln!("SFT killed at step {killed_at}; max weight difference after resuming: {worst:e}");
    assert!(worst <= 1e-6, "resumed run differs by {worst}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_batch_split_over_threads_trains_like_one_batch() {
    let dir = setup("shards");
    let args = |out: &str, threads: &str, steps: &str| {
        let mut a = train_args(out);
        let at = a.iter().position(|x| x == "--threads").unwrap();
        a[at + 1] = threads.into();
        let at = a.iter().position(|x| x == "12").unwrap();
        a[at] = steps.into();
        a
    };
    run_ok(bin().current_dir(&dir).args(args("one", "1", "4")));
    run_ok(bin().current_dir(&dir).args(args("three", "3", "4")));
    run_ok(bin().current_dir(&dir).args(args("first", "1", "1")));
    let (a, b) = (
        weights(&dir.join("one/model.safetensors")),
        weights(&dir.join("three/model.safetensors")),
    );
    let (mut worst, mut moved) = (0f32, 0f32);
    let start = weights(&dir.join("first/model.safetensors"));
    for (((_, va), (_, vb)), (_, v0)) in a.iter().zip(&b).zip(&start) {
        for ((x, y), z) in va.iter().zip(vb).zip(v0) {
            worst = worst.max((x - y).abs());
            moved = moved.max((x - z).abs());
        }
    }
    eprintln!("one batch vs shards: max weight difference {worst:e} (steps 2-4 moved weights by up to {moved:e})");
    assert!(moved > 1e-3, "the weights did not move: {moved}");
    assert!(worst <= 1e-5, "sharded training differs by {worst}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn killed_and_resumed_rl_matches_an_uninterrupted_run() {
    let dir = setup("rl");
    let mut sft = train_args("sft");
    let steps_at = sft.iter().position(|a| a == "12").unwrap();
    sft[steps_at] = "4".into();
    run_ok(bin().current_dir(&dir).args(sft));
    let rl = |out: &str| -> Vec<String> {
        [
            "train",
            "rl",
            "--data",
            "rl.jsonl",
            "--refer-root",
            "root",
            "--init",
            "sft",
            "--out",
            out,
            "--steps",
            "8",
            "--prompts-per-step",
            "2",
            "--group-size",
            "3",
            "--threads",
            "2",
            "--max-new-tokens",
            "12",
            "--save-every",
            "1",
            "--log-every",
            "1",
            "--lr",
            "1e-3",
            "--warmup",
            "1",
            "--algorithm",
            "grpo",
            "--kl-coef",
            "0.1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let (killed_at, worst) = kill_and_resume(&dir, rl, 8);
    eprintln!("RL killed at step {killed_at}; max weight difference after resuming: {worst:e}");
    assert!(worst <= 1e-6, "resumed run differs by {worst}");
    std::fs::remove_dir_all(&dir).unwrap();
}
