//! The evaluation runner against an independent numpy/pycocotools computation, with the local
//! backend on a tiny checkpoint, and with the OpenAI-compatible backend against a real HTTP
//! server on loopback that answers from the local engine.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{json, Value};
use simpleseg_core::templates::DEFAULT_PROMPT;
use simpleseg_core::{CoordMode, ParseMode};
use simpleseg_data::items::refer_items;
use simpleseg_data::{Item, ReferDataset};
use simpleseg_engine::{generate, load, LoadOptions};
use simpleseg_eval::backends::{FileBackend, LocalBackend, OpenAiBackend};
use simpleseg_eval::metrics::BoxSource;
use simpleseg_eval::runner::{load_predictions, run, EvalConfig, Task};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn voc_dataset() -> ReferDataset {
    ReferDataset::load(&root().join("refer"), "voc", None, None).unwrap()
}

fn voc_val() -> Vec<Item> {
    refer_items(&voc_dataset(), "val").unwrap()
}

fn config(limit: Option<usize>) -> EvalConfig {
    EvalConfig {
        dataset: "voc".into(),
        split: "val".into(),
        task: Task::Res,
        mode: ParseMode::Official,
        coords: CoordMode::Normalized,
        box_source: BoxSource::Mask,
        prompt_template: DEFAULT_PROMPT.into(),
        sample: false,
        seed: 0,
        limit,
        data: voc_dataset().identity().unwrap(),
    }
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("simpleseg-eval-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn metrics_match_the_independent_computation() {
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("refer/expected_metrics.json")).unwrap(),
    )
    .unwrap();
    let backend = FileBackend::open(&root().join("refer/answers.jsonl")).unwrap();
    let out = tempdir("file");
    let report = run(&voc_val(), &backend, &config(None), 2, &out, false).unwrap();
    assert_eq!(report.n as u64, expected["n"].as_u64().unwrap());
    assert_eq!(
        report.parse_failures as u64,
        expected["parse_failures"].as_u64().unwrap()
    );
    for (ours, key) in [
        (report.ciou, "ciou"),
        (report.giou, "giou"),
        (report.acc50, "acc50"),
    ] {
        assert!(
            (ours - expected[key].as_f64().unwrap()).abs() < 1e-12,
            "{key}: {ours} vs {}",
            expected[key]
        );
    }
    let mut preds = load_predictions(&out).unwrap();
    preds.sort_by_key(|p| (p.ref_id, p.sent_id));
    for (p, e) in preds.iter().zip(expected["per_sample"].as_array().unwrap()) {
        assert_eq!(p.intersection, e["intersection"].as_u64().unwrap());
        assert_eq!(p.union, e["union"].as_u64().unwrap());
        assert!((p.box_iou - e["box_iou"].as_f64().unwrap()).abs() < 1e-12);
    }
    for f in ["report.json", "report.md", "run.json", "predictions.jsonl"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    std::fs::remove_dir_all(&out).unwrap();
}

fn tiny_model() -> PathBuf {
    root().join("qwen/nested-window56-untied")
}

fn local_backend(max_new_tokens: usize) -> LocalBackend {
    let model = load(&tiny_model(), &LoadOptions::default()).unwrap();
    let mut config = model.generation_config().clone();
    config.max_new_tokens = max_new_tokens;
    let files = simpleseg_engine::HfFolder::open(tiny_model())
        .unwrap()
        .fingerprint()
        .unwrap();
    LocalBackend::new(model, config, "tiny", files)
}

/// A minimal OpenAI-compatible chat-completions server answering from the local engine.
fn serve(
    model_dir: &Path,
    max_new_tokens: usize,
) -> (
    String,
    std::thread::JoinHandle<()>,
    std::sync::Arc<tiny_http::Server>,
) {
    let server = std::sync::Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
    let addr = server.server_addr().to_ip().unwrap();
    let model = load(model_dir, &LoadOptions::default()).unwrap();
    let s = server.clone();
    let handle = std::thread::spawn(move || {
        for mut request in s.incoming_requests() {
            let mut body = String::new();
            request.as_reader().read_to_string(&mut body).unwrap();
            let v: Value = serde_json::from_str(&body).unwrap();
            let content = v["messages"][0]["content"].as_array().unwrap();
            let url = content
                .iter()
                .find_map(|c| c["image_url"]["url"].as_str())
                .unwrap();
            let text = content.iter().find_map(|c| c["text"].as_str()).unwrap();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(url.split_once("base64,").unwrap().1)
                .unwrap();
            let dir = std::env::temp_dir().join(format!("simpleseg-serve-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("img.jpg");
            std::fs::write(&path, bytes).unwrap();
            let image = simpleseg_core::images::open_image(&path).unwrap();
            let prompt = model.prepare(&image, text).unwrap();
            let mut config = model.generation_config().clone();
            config.max_new_tokens = v["max_tokens"]
                .as_u64()
                .map_or(max_new_tokens, |n| n as usize);
            config.do_sample = v["temperature"].as_f64().unwrap_or(0.0) > 0.0;
            let out = generate(model.as_ref(), &prompt, config, |_| {}).unwrap();
            let reply = json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": out.text}, "finish_reason": "stop"}]});
            let response = tiny_http::Response::from_string(reply.to_string()).with_header(
                "Content-Type: application/json"
                    .parse::<tiny_http::Header>()
                    .unwrap(),
            );
            request.respond(response).unwrap();
        }
    });
    (format!("http://{addr}/v1"), handle, server)
}

#[test]
fn local_and_remote_backends_give_the_same_answers() {
    let items = voc_val();
    let local_out = tempdir("local");
    let local = run(
        &items,
        &local_backend(12),
        &config(Some(4)),
        1,
        &local_out,
        false,
    )
    .unwrap();
    assert_eq!(local.n, 4);
    let (url, handle, server) = serve(&tiny_model(), 12);
    let remote_out = tempdir("remote");
    let backend = OpenAiBackend::new(
        &url,
        "tiny",
        None,
        12,
        1.0,
        std::time::Duration::from_secs(60),
        1,
    );
    let remote = run(&items, &backend, &config(Some(4)), 2, &remote_out, false).unwrap();
    server.unblock();
    handle.join().unwrap();
    let answers = |d: &Path| {
        let mut p = load_predictions(d).unwrap();
        p.sort_by_key(|p| (p.ref_id, p.sent_id));
        p.into_iter().map(|p| p.answer).collect::<Vec<_>>()
    };
    assert_eq!(answers(&local_out), answers(&remote_out));
    assert_eq!(local.giou, remote.giou);
    assert_eq!(remote.backend["backend"], "openai");
    for d in [local_out, remote_out] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn remote_errors_are_reported_not_retried_forever() {
    let backend = OpenAiBackend::new(
        "http://127.0.0.1:9/v1",
        "x",
        None,
        8,
        1.0,
        std::time::Duration::from_secs(2),
        1,
    );
    let out = tempdir("unreachable");
    let err = run(&voc_val(), &backend, &config(Some(1)), 1, &out, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("127.0.0.1:9"), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn a_resumed_run_with_other_settings_is_refused() {
    let backend = FileBackend::open(&root().join("refer/answers.jsonl")).unwrap();
    let out = tempdir("settings");
    run(&voc_val(), &backend, &config(Some(2)), 1, &out, false).unwrap();
    let mut other = config(Some(2));
    other.mode = ParseMode::Robust;
    let err = run(&voc_val(), &backend, &other, 1, &out, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("other settings"), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
}
