//! Output files that appear together or not at all.
//!
//! Each output is first written to a temporary file beside its target (so a reader never sees
//! half a file); [`Outputs::commit`] then renames them into place once all were written. If a
//! rename fails, the outputs already moved are put back as they were (the previous file, or
//! none), so a failed command changes nothing.
//!
//! A target that exists and is not a regular file (`/dev/null`, `/dev/stdout`, a named pipe) is
//! written in place when it is added: it cannot be replaced by a rename (as root, a rename over
//! `/dev/null` would turn the device into a plain file for every process on the machine), and
//! it has no previous content to restore.
//!
//! Temporary files never outlive the process that made them: a failed or abandoned write
//! removes its own, [`remove_temporaries_and_exit`] removes every one still open (the command
//! line calls it on Ctrl-C and SIGTERM), and the first write into a folder removes those that
//! killed processes of this tool left there (their names carry the process id).

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};

/// Writes `path` completely or not at all (see [`Outputs`]).
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::result::Result<(), String>,
) -> Result<()> {
    let mut outputs = Outputs::default();
    outputs.add(path, write)?;
    outputs.commit().map(|_| ())
}

/// Output files that appear together or not at all (see the module documentation).
#[derive(Debug, Default)]
pub struct Outputs {
    /// `(temporary, final)` paths.
    staged: Vec<(PathBuf, PathBuf)>,
}

/// What the process has on disk that is not an output yet. Its lock is held while a
/// temporary is created and through a whole commit, so that a signal handler taking it
/// ([`remove_temporaries_and_exit`]) finds every temporary registered and no commit half done.
#[derive(Default)]
struct Pending {
    /// Temporary files being written or waiting to be renamed.
    temporaries: HashSet<PathBuf>,
    /// Folders already cleared of temporaries left by killed processes.
    swept: HashSet<PathBuf>,
}

static PENDING: Mutex<Option<Pending>> = Mutex::new(None);

fn pending() -> MutexGuard<'static, Option<Pending>> {
    PENDING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn with_pending<T>(f: impl FnOnce(&mut Pending) -> T) -> T {
    f(pending().get_or_insert_with(Pending::default))
}

/// The marker in every temporary name, followed by the process id.
const TEMPORARY: &str = ".tmp";
const BACKUP: &str = ".bak";

fn unique_name(path: &Path, marker: &str) -> Result<PathBuf> {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let name = path.file_name().ok_or_else(|| Error::BadFile {
        path: path.into(),
        message: "is not a file name".into(),
    })?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp_name = format!(
        ".{}{marker}{}-{n}",
        name.to_string_lossy(),
        std::process::id()
    );
    // The temporary name keeps the extension, so that writers choosing a format by
    // extension still can.
    if let Some(ext) = path.extension() {
        tmp_name.push('.');
        tmp_name.push_str(&ext.to_string_lossy());
    }
    Ok(path.with_file_name(tmp_name))
}

/// The process id in a name this module made (`.NAME.tmpPID-N[.EXT]`), if it is one.
fn owner(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix('.')?;
    let after = [TEMPORARY, BACKUP]
        .iter()
        .find_map(|marker| rest.rfind(marker).map(|at| &rest[at + marker.len()..]))?;
    let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 || !after[digits..].starts_with('-') {
        return None;
    }
    after[..digits].parse().ok()
}

/// Whether process `pid` is running. Where that cannot be told, it is assumed to be.
fn running(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// Removes, once per folder and process, the temporary files of processes that are gone.
fn sweep(folder: &Path) {
    let key = folder.to_path_buf();
    if !with_pending(|p| p.swept.insert(key)) || !cfg!(target_os = "linux") {
        return;
    }
    let Ok(entries) = std::fs::read_dir(if folder.as_os_str().is_empty() {
        Path::new(".")
    } else {
        folder
    }) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(owner) else {
            continue;
        };
        if pid != std::process::id() && !running(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

impl Outputs {
    /// Writes one output to a temporary file beside `path` (or into `path` itself when it is
    /// a device or a pipe: see the module documentation).
    pub fn add(
        &mut self,
        path: &Path,
        write: impl FnOnce(&mut BufWriter<File>) -> std::result::Result<(), String>,
    ) -> Result<()> {
        let cannot_write = |message: String| Error::BadFile {
            path: path.into(),
            message: format!("cannot write: {message}"),
        };
        if std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|source| Error::Io {
                    path: path.into(),
                    source,
                })?;
            let mut w = BufWriter::new(file);
            return write(&mut w)
                .and_then(|()| w.flush().map_err(|e| e.to_string()))
                .map_err(cannot_write);
        }
        let tmp = unique_name(path, TEMPORARY)?;
        sweep(path.parent().unwrap_or(Path::new("")));
        let file = with_pending(|p| {
            // Registered before it exists, and created under the lock: an interrupt removes it
            // whenever it comes.
            p.temporaries.insert(tmp.clone());
            File::create(&tmp)
        });
        // Staged before writing, so that a failure removes it.
        self.staged.push((tmp.clone(), path.to_path_buf()));
        let file = file.map_err(|source| Error::Io {
            path: path.into(),
            source,
        })?;
        let mut w = BufWriter::new(file);
        write(&mut w)
            .and_then(|()| w.flush().map_err(|e| e.to_string()))
            .map_err(cannot_write)
    }

    /// Moves every output into place; returns their paths. On failure every output is as it
    /// was before (see the module documentation). An interrupt waits until it is done.
    pub fn commit(mut self) -> Result<Vec<PathBuf>> {
        let staged = std::mem::take(&mut self.staged);
        let mut guard = pending();
        let pending = guard.get_or_insert_with(Pending::default);
        // Outputs moved so far, with the copy of the file each replaced.
        let mut placed: Vec<(PathBuf, Option<PathBuf>)> = Vec::with_capacity(staged.len());
        let mut failure = None;
        let mut rest = staged.into_iter();
        for (tmp, path) in rest.by_ref() {
            let moved = keep_previous(&path).and_then(|backup| {
                std::fs::rename(&tmp, &path)
                    .map(|()| backup.clone())
                    .map_err(|source| {
                        if let Some(b) = &backup {
                            let _ = std::fs::remove_file(b);
                        }
                        Error::Io {
                            path: path.clone(),
                            source,
                        }
                    })
            });
            pending.temporaries.remove(&tmp);
            match moved {
                Ok(backup) => placed.push((path, backup)),
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failure {
            for (tmp, _) in rest {
                let _ = std::fs::remove_file(&tmp);
                pending.temporaries.remove(&tmp);
            }
            for (path, backup) in placed.into_iter().rev() {
                match backup {
                    Some(b) => {
                        let _ = std::fs::rename(&b, &path);
                    }
                    None => {
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
            return Err(e);
        }
        Ok(placed
            .into_iter()
            .map(|(path, backup)| {
                if let Some(b) = backup {
                    let _ = std::fs::remove_file(b);
                }
                path
            })
            .collect())
    }
}

/// A copy of the file at `path` (a second link to it where the file system allows, else a
/// copy), so a commit can be undone; `None` when there is no file.
fn keep_previous(path: &Path) -> Result<Option<PathBuf>> {
    if !path.is_file() {
        return Ok(None);
    }
    let backup = unique_name(path, BACKUP)?;
    std::fs::hard_link(path, &backup)
        .or_else(|_| std::fs::copy(path, &backup).map(|_| ()))
        .map_err(|source| {
            let _ = std::fs::remove_file(&backup);
            Error::Io {
                path: path.into(),
                source,
            }
        })?;
    Ok(Some(backup))
}

impl Drop for Outputs {
    fn drop(&mut self) {
        with_pending(|p| {
            for (tmp, _) in &self.staged {
                let _ = std::fs::remove_file(tmp);
                p.temporaries.remove(tmp);
            }
        });
    }
}

/// Removes every temporary file this process has open, then calls `exit` with the lock still
/// held, so that no new temporary can appear and no commit can start before the process
/// ends. For a signal handler.
pub fn remove_temporaries_and_exit(code: i32) -> ! {
    let mut guard = pending();
    if let Some(p) = guard.as_mut() {
        for tmp in p.temporaries.drain() {
            let _ = std::fs::remove_file(tmp);
        }
    }
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A named pipe as a target is written through, and stays a pipe (a rename over it would
    /// have replaced it with a plain file: over `/dev/null`, for the whole machine).
    #[cfg(unix)]
    #[test]
    fn pipes_and_devices_are_written_in_place() {
        use std::io::Read;
        use std::os::unix::fs::FileTypeExt;

        let dir = folder("fifo");
        let fifo = dir.join("answer.json");
        match std::process::Command::new("mkfifo").arg(&fifo).status() {
            Ok(status) if status.success() => {}
            _ => {
                eprintln!("skipped: no mkfifo here");
                return;
            }
        }
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || {
                let mut text = String::new();
                File::open(&fifo)
                    .unwrap()
                    .read_to_string(&mut text)
                    .unwrap();
                text
            })
        };
        write_atomic(&fifo, write("through the pipe")).unwrap();
        // (Checked before joining: had the pipe been replaced, its reader would wait forever.)
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        assert_eq!(reader.join().unwrap(), "through the pipe");
        // Nothing was staged beside it.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn folder(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("simpleseg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write(
        text: &'static str,
    ) -> impl FnOnce(&mut BufWriter<File>) -> std::result::Result<(), String> {
        move |w| w.write_all(text.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn outputs_appear_together_or_not_at_all() {
        let dir = folder("outputs");
        let mut outputs = Outputs::default();
        outputs.add(&dir.join("a.txt"), write("a")).unwrap();
        let failed = outputs.add(&dir.join("b.txt"), |_| Err("no".into()));
        assert!(failed.unwrap_err().to_string().contains("b.txt"));
        drop(outputs);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "nothing left");
        let mut outputs = Outputs::default();
        for name in ["a.txt", "b.txt"] {
            outputs
                .add(&dir.join(name), |w| {
                    w.write_all(name.as_bytes()).map_err(|e| e.to_string())
                })
                .unwrap();
        }
        assert_eq!(outputs.commit().unwrap().len(), 2);
        assert_eq!(std::fs::read(dir.join("b.txt")).unwrap(), b"b.txt");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_rename_puts_back_what_was_replaced() {
        let dir = folder("undo");
        std::fs::write(dir.join("a.txt"), "old a").unwrap();
        // The last output's target is a folder: its rename fails after a.txt and c.txt
        // (new) were moved into place.
        std::fs::create_dir(dir.join("z.txt")).unwrap();
        std::fs::write(dir.join("z.txt/inside"), "x").unwrap();
        let mut outputs = Outputs::default();
        outputs.add(&dir.join("a.txt"), write("new a")).unwrap();
        outputs.add(&dir.join("c.txt"), write("new c")).unwrap();
        outputs.add(&dir.join("z.txt"), write("new z")).unwrap();
        assert!(outputs.commit().is_err());
        assert_eq!(std::fs::read_to_string(dir.join("a.txt")).unwrap(), "old a");
        assert!(!dir.join("c.txt").exists(), "a new output is removed again");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["a.txt", "z.txt"], "no temporary or copy left");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn temporaries_of_dead_processes_are_swept_and_signals_clean_up() {
        let dir = folder("sweep");
        // pid 0 is never a user process; a live pid's files (ours) stay.
        let dead = dir.join(".m.png.tmp4000000000-3.png");
        let foreign = dir.join(".m.png.tmp0-1.png");
        let unrelated = dir.join(".notes.tmpx-1");
        for p in [&dead, &foreign, &unrelated] {
            std::fs::write(p, "x").unwrap();
        }
        write_atomic(&dir.join("m.png"), write("mask")).unwrap();
        assert!(
            !dead.exists() && !foreign.exists(),
            "left by processes that are gone"
        );
        assert!(unrelated.exists(), "not a name this module makes");
        assert_eq!(owner(".m.png.tmp123-4.png"), Some(123));
        assert_eq!(owner(".m.png.bak77-0"), Some(77));
        assert_eq!(owner(".m.png.tmp-4"), None);
        // While an output is being written its temporary is known, for a signal handler to
        // remove ([`remove_temporaries_and_exit`]; the command line's interrupt test runs it).
        let mut outputs = Outputs::default();
        outputs.add(&dir.join("n.txt"), write("n")).unwrap();
        let tmp = outputs.staged[0].0.clone();
        assert!(tmp.exists());
        assert!(with_pending(|p| p.temporaries.contains(&tmp)));
        drop(outputs);
        assert!(!tmp.exists());
        assert!(!with_pending(|p| p.temporaries.contains(&tmp)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
