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
