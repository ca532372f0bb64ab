//! The built-in model: the README's main command segments a bundled example, and the shipped
//! folder gives transformers' greedy answers (fixtures/tiny-model, from
//! scripts/fixtures/gen_tiny_model_fixture.py).

mod common;
use common::root;

use std::path::{Path, PathBuf};
use std::process::Command;

use simpleseg_core::RleMask;
use simpleseg_data::items::refer_items;
use simpleseg_data::ReferDataset;

fn tempdir(name: &str) -> PathBuf {
    common::fresh_dir("embedded", name)
}

/// The command with the model cache inside `dir`, so tests never touch the user's cache.
fn simpleseg(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_simpleseg"));
    cmd.current_dir(dir)
        .env("SIMPLESEG_CACHE", dir.join("cache"));
    cmd
}

/// The ground truth of the bundled example whose expressions include `query`.
fn ground_truth(image_name: &str, query: &str) -> RleMask {
    let ds = ReferDataset::load(&root().join("examples/synth"), "synth", None, None).unwrap();
    let items = refer_items(&ds, "demo").unwrap();
    let item = items
        .iter()
        .find(|i| {
            i.image.file_name().and_then(|n| n.to_str()) == Some(image_name)
                && i.sentences.iter().any(|s| s.sent == query)
        })
        .unwrap_or_else(|| panic!("no demo object {query:?} in {image_name}"));
    item.mask().unwrap()
}

/// Top-2 score gaps below this are treated as ties that float rounding may break either way.
const NEAR_TIE: f64 = 1e-3;

fn readme_main_command() -> (String, String) {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.starts_with("cargo run --release -- segment "))
        .expect("README shows the main command");
    let arg = |flag: &str| {
        let rest = line.split(flag).nth(1).unwrap().trim_start();
        if let Some(quoted) = rest.strip_prefix('"') {
            quoted.split('"').next().unwrap().to_string()
        } else {
            rest.split_whitespace().next().unwrap().to_string()
        }
    };
    (arg("--image"), arg("--query"))
}

#[test]
fn readme_main_command_segments_the_bundled_example() {
    let (image, query) = readme_main_command();
    let dir = tempdir("readme");
    let out = simpleseg(&dir)
        .args(["segment", "--image"])
        .arg(root().join(&image))
        .args(["--query", &query])
        .output()
        .unwrap();
    common::assert_success(&out);
    let stem = Path::new(&image).file_stem().unwrap().to_str().unwrap();
    let mask = image::open(dir.join(format!("{stem}.mask.png")))
        .unwrap()
        .to_luma8();
    assert!(dir.join(format!("{stem}.overlay.png")).is_file());
    let bits: Vec<u8> = mask.pixels().map(|p| u8::from(p.0[0] > 127)).collect();
    let predicted = RleMask::from_row_major(&bits, mask.height(), mask.width()).unwrap();
    let name = Path::new(&image).file_name().unwrap().to_str().unwrap();
    let iou = predicted.iou(&ground_truth(name, &query)).unwrap();
    assert!(iou >= 0.5, "IoU {iou} with the shipped ground truth");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shipped_model_gives_transformers_greedy_answers() {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/tiny-model/answers.json")).unwrap(),
    )
    .unwrap();
    let template = fixture["prompt"].as_str().unwrap();
    let dir = tempdir("parity");
    let cases = fixture["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    let (mut compared, mut whole) = (0, 0);
    for case in cases {
        let prompt = template.replace("{query}", case["query"].as_str().unwrap());
        let out = simpleseg(&dir)
            .args(["chat", "--greedy", "--json", "--prompt", &prompt, "--image"])
            .arg(
                root()
                    .join("examples/synth")
                    .join(case["image"].as_str().unwrap()),
            )
            .output()
            .unwrap();
        common::assert_success(&out);
        let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            line["prompt_tokens"].as_u64(),
            Some(case["prompt_ids"].as_array().unwrap().len() as u64)
        );
        let ours = line["token_ids"].as_array().unwrap();
        let theirs = case["answer_ids"].as_array().unwrap();
        let margins = case["margins"].as_array().unwrap();
        // Up to the first near tie in transformers' scores, the answers must agree token for
        // token; past it, another float summation order may legitimately pick the other token.
        let decided = margins
            .iter()
            .position(|m| m.as_f64().unwrap() < NEAR_TIE)
            .unwrap_or(margins.len());
        let n = decided.min(theirs.len());
        assert_eq!(
            ours.get(..n),
            Some(&theirs[..n]),
            "{}: answer differs from transformers' before step {decided}",
            case["query"]
        );
        if decided == margins.len() {
            assert_eq!(ours, theirs);
            assert_eq!(line["text"], case["answer"]);
            assert_eq!(line["stop_reason"], case["stop_reason"]);
            whole += 1;
        }
        compared += n;
    }
    eprintln!(
        "{compared} tokens compared; {whole} of {} answers whole",
        cases.len()
    );
    assert!(
        whole * 2 >= cases.len(),
        "too few answers free of near ties"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn export_model_writes_the_embedded_folder() {
    let dir = tempdir("export");
    let out = simpleseg(&dir)
        .args(["export-model", "--out", "m"])
        .output()
        .unwrap();
    assert!(out.status.success());
    for name in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "README.md",
    ] {
        assert_eq!(
            std::fs::read(dir.join("m").join(name)).unwrap(),
            std::fs::read(root().join("models/simpleseg-tiny").join(name)).unwrap(),
            "{name}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
