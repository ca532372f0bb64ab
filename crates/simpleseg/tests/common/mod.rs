//! Helpers shared by the command-line tests (each test file includes what it uses).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Output;

/// The repository root (bundled examples, fixtures, README).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// An empty folder `simpleseg-{prefix}-{name}-{pid}` under the system temporary folder.
pub fn fresh_dir(prefix: &str, name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("simpleseg-{prefix}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Fails the test with the command's standard error unless it exited successfully.
pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
