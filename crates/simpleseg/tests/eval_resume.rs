//! An evaluation killed halfway and restarted (even with a half-written last line) yields the
//! same report as an uninterrupted one.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn eval_args(out: &Path) -> Vec<String> {
    let r = root();
    vec![
        "eval".into(),
        "--refer-root".into(),
        r.join("fixtures/refer").display().to_string(),
        "--dataset".into(),
        "voc".into(),
        "--split".into(),
        "val".into(),
        "--model".into(),
        r.join("fixtures/qwen/nested-window56-untied")
            .display()
            .to_string(),
        "--max-new-tokens".into(),
        "48".into(),
        "--out".into(),
        out.display().to_string(),
    ]
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

#[test]
fn killed_and_restarted_eval_gives_the_same_report() {
    let dir = std::env::temp_dir().join(format!("simpleseg-eval-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (a, b) = (dir.join("a"), dir.join("b"));
    let out = Command::new(env!("CARGO_BIN_EXE_simpleseg"))
        .args(eval_args(&a))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_simpleseg"))
        .args(eval_args(&b))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let preds = b.join("predictions.jsonl");
    let start = Instant::now();
    while lines(&preds) < 3 && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done = lines(&preds);
    assert!(
        (1..9).contains(&done),
        "killed after {done} of 9 predictions"
    );
    // A line cut off mid-write.
    let mut text = std::fs::read_to_string(&preds).unwrap();
    text.push_str("{\"ref_id\": 17, \"sent_id\": 10");
    std::fs::write(&preds, text).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_simpleseg"))
        .args(eval_args(&b))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines(&preds), 9, "no sample lost or duplicated");
    let report = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("report.json")).unwrap()).unwrap()
    };
    let (ra, mut rb) = (report(&a), report(&b));
    rb["backend"] = ra["backend"].clone();
    assert_eq!(ra, rb);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `eval --backend file` on the voc fixture into `out`, from `root`'s copy of the dataset.
fn file_eval(refer_root: &Path, predictions: &Path, out: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_simpleseg"))
        .args([
            "eval",
            "--refer-root",
            refer_root.to_str().unwrap(),
            "--dataset",
            "voc",
            "--split",
            "val",
            "--backend",
            "file",
            "--predictions",
            predictions.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn a_rerun_with_other_data_or_answers_is_refused_and_foreign_lines_do_not_count() {
    let dir = std::env::temp_dir().join(format!("simpleseg-eval-mix-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let refer = root().join("fixtures/refer");
    let answers = refer.join("answers.jsonl");
    let out = dir.join("run");
    let first = file_eval(&refer, &answers, &out);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let n = report["n"].as_u64().unwrap();
    assert_eq!(n, report["samples"].as_u64().unwrap());

    // The same dataset with one annotation changed, under another root.
    let other = dir.join("other");
    copy_dir(&refer, &other);
    let instances = other.join("voc/instances.json");
    let text = std::fs::read_to_string(&instances).unwrap();
    std::fs::write(&instances, text.replacen("\"id\"", "\"id\" ", 1)).unwrap();
    let refused = file_eval(&other, &answers, &out);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("config.data.instances"), "{stderr}");
    assert!(stderr.contains("config.data.refer_root"), "{stderr}");

    // Other answers.
    let changed = dir.join("answers.jsonl");
    let text = std::fs::read_to_string(&answers).unwrap();
    std::fs::write(&changed, text.replacen("0.", "0.0", 1)).unwrap();
    let refused = file_eval(&refer, &changed, &out);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("backend.file"), "{stderr}");

    // Lines of samples outside the split are not counted.
    let preds = out.join("predictions.jsonl");
    let mut text = std::fs::read_to_string(&preds).unwrap();
    let line = text
        .lines()
        .next()
        .unwrap()
        .replacen("\"ref_id\":", "\"ref_id\":990", 1);
    text.push_str(&line);
    text.push('\n');
    std::fs::write(&preds, text).unwrap();
    let again = file_eval(&refer, &answers, &out);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let rerun: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(rerun["n"].as_u64().unwrap(), n);
    assert_eq!(rerun["ciou"], report["ciou"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
