//! Runs that resume after an interruption: a folder's `run.json` records the settings that
//! define its results ([`check_settings`] refuses to continue under other ones), and a JSON
//! lines journal holds one finished record per line, appended as records finish
//! ([`Journal`]); a half-written last line, left by a kill, is cut away when the journal is
//! read back ([`read_journal`]). `eval` and `segment --batch` keep their results this way.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::limits::{read_text_file_bounded, Limit};

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Records `settings` as `dir/run.json` for a new run; for a folder that has one, refuses
/// unless it holds the same settings, naming each difference.
pub fn check_settings(dir: &Path, settings: &Value) -> Result<()> {
    let path = dir.join("run.json");
    if !path.is_file() {
        return write_atomic(&path, |w| {
            serde_json::to_writer_pretty(&mut *w, settings).map_err(|e| e.to_string())?;
            writeln!(w).map_err(|e| e.to_string())
        });
    }
    let text = read_text_file_bounded(&path, Limit::DataBytes)?;
    let previous: Value = serde_json::from_str(&text).map_err(|e| Error::BadFile {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let mut changes = Vec::new();
    differences(&previous, settings, "", &mut changes);
    if changes.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{} holds a run with other settings: {}; use another --out or remove it",
            dir.display(),
            changes.join("; ")
        )))
    }
}

/// The places where two records differ, as `path was ... and is now ...` lines.
fn differences(before: &Value, now: &Value, path: &str, out: &mut Vec<String>) {
    let show = |v: Option<&Value>| match v {
        None => "(not recorded)".to_string(),
        Some(v) => {
            let text = v.to_string();
            if text.chars().count() > 80 {
                format!("{}...", text.chars().take(77).collect::<String>())
            } else {
                text
            }
        }
    };
    match (before, now) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let sub = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => differences(x, y, &sub, out),
                    (x, y) => out.push(format!("{sub} was {} and is now {}", show(x), show(y))),
                }
            }
        }
        _ if before != now => out.push(format!(
            "{path} was {} and is now {}",
            show(Some(before)),
            show(Some(now))
        )),
        _ => {}
    }
}

/// The finished records of a journal (none when it does not exist), cutting away a
/// half-written last line; any other unreadable line is an error naming it.
pub fn read_journal<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let text = read_text_file_bounded(path, Limit::DataBytes)?;
    let mut out = Vec::new();
    let mut good_bytes = 0usize;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    for (n, line) in lines.iter().enumerate() {
        let complete = line.ends_with('\n');
        match serde_json::from_str::<T>(line.trim_end()) {
            Ok(record) if complete => {
                out.push(record);
                good_bytes += line.len();
            }
            // Only the last line can lack its newline: it is the half-written one.
            _ if n + 1 == lines.len() => break,
            Err(e) => {
                return Err(Error::BadFile {
                    path: path.to_path_buf(),
                    message: format!("line {}: {e}", n + 1),
                })
            }
            Ok(_) => break,
        }
    }
    if good_bytes < text.len() {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io(path))?;
        file.set_len(good_bytes as u64).map_err(io(path))?;
    }
    Ok(out)
}

/// A journal open for appending finished records.
pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Opens (or creates) the journal at `path` for appending.
    pub fn append_to(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io(path))?;
        Ok(Journal {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one record per line and flushes them to the file.
    pub fn write(&mut self, records: &[Value]) -> Result<()> {
        let mut text = String::new();
        for record in records {
            text.push_str(&record.to_string());
            text.push('\n');
        }
        self.file
            .write_all(text.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(io(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_kept_and_differences_named() {
        let dir = std::env::temp_dir().join(format!("simpleseg-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let settings = serde_json::json!({"model": "a", "sampling": {"seed": 1}});
        check_settings(&dir, &settings).unwrap();
        check_settings(&dir, &settings).unwrap();
        let other = serde_json::json!({"model": "a", "sampling": {"seed": 2}, "limit": 3});
        let message = check_settings(&dir, &other).unwrap_err().to_string();
        assert!(
            message.contains("sampling.seed was 1 and is now 2"),
            "{message}"
        );
        assert!(
            message.contains("limit was (not recorded) and is now 3"),
            "{message}"
        );
        // A half-written last line is cut away; the journal continues after it.
        let path = dir.join("answers.jsonl");
        std::fs::write(&path, "{\"id\": 1}\n{\"id\": 2}\n{\"id\"").unwrap();
        let records: Vec<Value> = read_journal(&path).unwrap();
        assert_eq!(records.len(), 2);
        let mut journal = Journal::append_to(&path).unwrap();
        journal.write(&[serde_json::json!({"id": 3})]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"id\": 1}\n{\"id\": 2}\n{\"id\":3}\n"
        );
        std::fs::write(&path, "{\"id\": 1}\nnot json\n{\"id\": 2}\n").unwrap();
        let error = read_journal::<Value>(&path).unwrap_err().to_string();
        assert!(error.contains("line 2"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
