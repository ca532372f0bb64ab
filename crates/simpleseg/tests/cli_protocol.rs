//! The `decode`, `target` and `iou` commands as users and scripts call them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn simpleseg(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_simpleseg"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("runs")
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("simpleseg-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn decode_writes_every_output_and_json() {
    let dir = tempdir("decode");
    let answer = root().join("examples/voc.answer.txt");
    let image = root().join("examples/voc.jpg");
    let out = simpleseg(
        &[
            "decode",
            "--response-file",
            answer.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
            "--rle-out",
            "m.json",
            "--mask-out",
            "m.png",
            "--overlay-out",
            "o.png",
            "--json",
        ],
        &dir,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["mode"], "official");
    assert_eq!(report["coords"], "normalized");
    assert_eq!(report["polygons"].as_array().unwrap().len(), 1);
    assert_eq!(report["width"], 500);
    for f in ["m.json", "m.png", "o.png"] {
        assert!(dir.join(f).exists(), "{f} written");
    }
    // The decoded answer was made from the person's mask: the IoU is high but not 1.
    let gt = root().join("examples/voc.person.rle.json");
    let out = simpleseg(
        &["iou", "--rle-a", "m.json", "--rle-b", gt.to_str().unwrap()],
        &dir,
    );
    assert!(out.status.success());
    let iou: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(iou > 0.95 && iou < 1.0, "iou {iou}");
    // The PNG mask decodes to the same target as the RLE.
    let a = simpleseg(&["target", "--mask", "m.png"], &dir);
    let b = simpleseg(&["target", "--rle", "m.json"], &dir);
    assert!(a.status.success() && b.status.success());
    assert_eq!(a.stdout, b.stdout);
    assert!(String::from_utf8_lossy(&a.stdout).starts_with("[[["));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn decode_reads_stdin_and_reports_warnings() {
    let dir = tempdir("stdin");
    let mut child = Command::new(env!("CARGO_BIN_EXE_simpleseg"))
        .args([
            "decode",
            "--response-file",
            "-",
            "--width",
            "10",
            "--height",
            "10",
            "--mode",
            "robust",
            "--json",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .current_dir(&dir)
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"[[[0.1, 0.1], [0.9, 0.1], [0.9, 0.9], [0.1")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["mode"], "robust");
    assert_eq!(report["warnings"][0]["kind"], "unterminated");
    assert!(report["area"].as_u64().unwrap() > 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_gives_a_clear_error_and_non_zero_exit() {
    let dir = tempdir("errors");
    std::fs::write(dir.join("a.txt"), "[[0.1, 0.1], [0.5, 0.5], [0.1, 0.5]]").unwrap();
    std::fs::write(dir.join("bad.json"), "{\"size\": [2, 2], \"counts\": 5}").unwrap();
    std::fs::write(
        dir.join("short.json"),
        "{\"size\": [4, 4], \"counts\": [3, 2]}",
    )
    .unwrap();
    for (args, needle) in [
        (
            vec![
                "decode",
                "--response-file",
                "missing.txt",
                "--width",
                "4",
                "--height",
                "4",
            ],
            "missing.txt",
        ),
        (
            vec!["decode", "--response-file", "a.txt"],
            "--width and --height, or --image",
        ),
        (
            vec![
                "decode",
                "--response-file",
                "a.txt",
                "--width",
                "4",
                "--height",
                "4",
                "--overlay-out",
                "o.png",
            ],
            "needs --image",
        ),
        (
            vec![
                "decode",
                "--response-file",
                "a.txt",
                "--width",
                "0",
                "--height",
                "4",
            ],
            "at least 1",
        ),
        (
            vec!["iou", "--rle-a", "bad.json", "--rle-b", "bad.json"],
            "counts",
        ),
        (vec!["target", "--rle", "short.json"], "runs cover 5 pixels"),
        (vec!["target", "--mask", "nothing.png"], "nothing.png"),
    ] {
        let out = simpleseg(&args, &dir);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
