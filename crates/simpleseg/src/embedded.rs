//! The default model, built into the binary.
//!
//! `models/simpleseg-tiny` (a Hugging Face folder of a few MB) is compiled in. Commands that
//! take `--model` use it when the flag is omitted: its files are written once to a cache
//! folder named after their content hash, then loaded like any other folder, so the binary
//! works from any directory and after `cargo install` with no download.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

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

/// How the embedded model is named in reports.
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

/// Writes the files into `dir` (which must not exist yet) through a temporary sibling, so a
/// reader never sees a half-written folder.
fn write_folder(dir: &Path) -> Result<()> {
    let parent = dir.parent().context("cache folder has no parent")?;
    std::fs::create_dir_all(parent)
        .with_context(|| format!("creating the cache folder {}", parent.display()))?;
    let staging = parent.join(format!(
        ".{}.{}",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("model"),
        std::process::id()
    ));
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    for (name, bytes) in FILES {
        let path = staging.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
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
            Err(e).with_context(|| format!("moving the model into {}", dir.display()))
        }
    }
}

/// The embedded model as a folder on disk, written on first use.
pub fn folder() -> Result<PathBuf> {
    let dir = cache_root().join(format!("simpleseg-tiny-{:016x}", content_hash()));
    if !is_complete(&dir) {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("removing the incomplete copy {}", dir.display()))?;
        }
        write_folder(&dir).context(
            "writing the embedded model to the cache (set SIMPLESEG_CACHE to a writable folder)",
        )?;
    }
    Ok(dir)
}

/// Writes the embedded model folder to `dir` (created if missing; existing files are replaced).
pub fn export(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
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
