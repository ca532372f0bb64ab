//! The built-in default model.
//!
//! `models/simpleseg-tiny` (a Hugging Face folder of a few MB) is compiled in. The command
//! line and the Python `Model` use it when no model is named: its files are written once to a
//! cache folder named after their content hash, then loaded like any other folder, so the
//! binary and the wheel work from any directory with no download.

#![warn(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use simpleseg_core::{Error, Result};

macro_rules! model_file {
    ($name:literal) => {
        (
            $name,
            include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../models/simpleseg-tiny/",
                $name
            ))
            .as_slice(),
        )
    };
}

/// The folder's files, by name.
pub const FILES: [(&str, &[u8]); 9] = [
    model_file!("README.md"),
    model_file!("chat_template.jinja"),
    model_file!("config.json"),
    model_file!("generation_config.json"),
    model_file!("model.safetensors"),
    model_file!("preprocessor_config.json"),
    model_file!("processor_config.json"),
    model_file!("tokenizer.json"),
    model_file!("tokenizer_config.json"),
];

/// How the built-in model is named in reports.
pub const NAME: &str = "simpleseg-tiny (embedded)";

/// FNV-1a over every file name and content: a stable name for this build's model.
fn content_hash() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in FILES {
        for &b in name.as_bytes().iter().chain([0u8].iter()).chain(bytes) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Where cached copies go: `$SIMPLESEG_CACHE`, else the platform cache folder, else the
/// system temporary folder.
fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("SIMPLESEG_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let platform = if cfg!(target_os = "macos") {
        home.map(|h| h.join("Library/Caches"))
    } else if cfg!(windows) {
        std::env::var_os("LOCALAPPDATA").map(PathBuf::from)
    } else {
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| home.map(|h| h.join(".cache")))
    };
    platform
        .unwrap_or_else(std::env::temp_dir)
        .join("simpleseg")
}

fn is_complete(dir: &Path) -> bool {
    FILES.iter().all(|(name, bytes)| {
        std::fs::metadata(dir.join(name)).is_ok_and(|m| m.len() == bytes.len() as u64)
    })
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes the files into `dir` (which must not exist yet) through a temporary sibling, so a
/// reader never sees a half-written folder.
fn write_folder(dir: &Path) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let staging = parent.join(format!(
        ".{}.{}",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("model"),
        std::process::id()
    ));
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    for (name, bytes) in FILES {
        let path = staging.join(name);
        std::fs::write(&path, bytes).map_err(io(&path))?;
    }
    match std::fs::rename(&staging, dir) {
        Ok(()) => Ok(()),
        // Another process finished first: keep its copy.
        Err(_) if is_complete(dir) => {
            let _ = std::fs::remove_dir_all(&staging);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(io(dir)(e))
        }
    }
}

/// The built-in model as a folder on disk, written on first use.
pub fn folder() -> Result<PathBuf> {
    let dir = cache_root().join(format!("simpleseg-tiny-{:016x}", content_hash()));
    if !is_complete(&dir) {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        write_folder(&dir).map_err(|e| {
            Error::Invalid(format!(
                "writing the built-in model to the cache failed ({e}); set SIMPLESEG_CACHE to a writable folder"
            ))
        })?;
    }
    Ok(dir)
}

/// Writes the built-in model folder to `dir` (created if missing; existing files are replaced).
pub fn export(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut outputs = simpleseg_core::io::Outputs::default();
    for (name, bytes) in FILES {
        outputs.add(&dir.join(name), |w| {
            std::io::Write::write_all(w, bytes).map_err(|e| e.to_string())
        })?;
    }
    outputs.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_complete_folder_once_and_reuses_it() {
        let tmp = std::env::temp_dir().join(format!("simpleseg-embedded-{}", std::process::id()));
        let dir = tmp.join("m");
        write_folder(&dir).unwrap();
        assert!(is_complete(&dir));
        // A second writer finding the folder in place keeps it.
        write_folder(&dir).unwrap();
        assert!(is_complete(&dir));
        let config = std::fs::read(dir.join("config.json")).unwrap();
        assert_eq!(config, FILES[2].1);
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
