//! A Hugging Face model folder as transformers writes it: `config.json`, safetensors weights
//! (one file, or shards listed in `model.safetensors.index.json`), `tokenizer.json`, the chat
//! template, `preprocessor_config.json` and `generation_config.json`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::Deserialize;
use serde_json::Value;

use simpleseg_core::limits::{read_text_file_bounded, Limit};

use crate::error::{Error, Result};

/// A model folder on disk.
#[derive(Clone, Debug)]
pub struct HfFolder {
    dir: PathBuf,
}

impl HfFolder {
    /// Opens a folder; errors if it is not a directory with a `config.json`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir,
                hint: "expected a Hugging Face model folder".into(),
            });
        }
        let folder = HfFolder { dir };
        if !folder.path("config.json").is_file() {
            return Err(Error::MissingFile {
                path: folder.path("config.json"),
                hint: "every model folder has a config.json".into(),
            });
        }
        Ok(folder)
    }

    /// The folder itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A file in the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Reads a JSON file of the folder.
    pub fn json(&self, name: &str) -> Result<JsonFile> {
        JsonFile::read(&self.path(name))
    }

    /// Reads a JSON file if it exists.
    pub fn optional_json(&self, name: &str) -> Result<Option<JsonFile>> {
        let path = self.path(name);
        if path.is_file() {
            JsonFile::read(&path).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The safetensors files holding the weights: the shards named by
    /// `model.safetensors.index.json`, or `model.safetensors`, or every `*.safetensors` file.
    pub fn safetensors_files(&self) -> Result<Vec<PathBuf>> {
        if let Some(index) = self.optional_json("model.safetensors.index.json")? {
            let map = index
                .root
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| index.error("missing the \"weight_map\" object"))?;
            let shards: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
            // Shards are files of this folder: a path elsewhere would read (and fingerprint)
            // weights from outside it.
            if let Some(outside) = shards.iter().find(|s| {
                let p = std::path::Path::new(s);
                p.components().count() != 1
                    || !matches!(p.components().next(), Some(std::path::Component::Normal(_)))
            }) {
                return Err(index.error(format!(
                    "shard {outside:?} is not a file name in the model folder (paths and \"..\" are refused)"
                )));
            }
            let files: Vec<PathBuf> = shards.into_iter().map(|s| self.path(s)).collect();
            if let Some(missing) = files.iter().find(|f| !f.is_file()) {
                return Err(Error::MissingFile {
                    path: missing.clone(),
                    hint: "listed in model.safetensors.index.json".into(),
                });
            }
            return Ok(files);
        }
        let single = self.path("model.safetensors");
        if single.is_file() {
            return Ok(vec![single]);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map_err(|source| Error::Io {
                path: self.dir.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::MissingFile {
                path: single,
                hint: "no *.safetensors weights in the folder (PyTorch .bin weights are not read; convert them with transformers' save_pretrained)".into(),
            });
        }
        Ok(files)
    }

    /// Names of all tensors in the weights.
    pub fn tensor_names(&self) -> Result<BTreeSet<String>> {
        let mut names = BTreeSet::new();
        for file in self.safetensors_files()? {
            names.extend(safetensors_header_names(&file)?);
        }
        Ok(names)
    }

    /// The identity of every file of the folder ([`simpleseg_core::io::fingerprint`]), by
    /// name: what tells one model from another when a run is resumed.
    pub fn fingerprint(&self) -> Result<Value> {
        let io = |source| Error::Io {
            path: self.dir.clone(),
            source,
        };
        let mut files = serde_json::Map::new();
        let mut entries: Vec<_> = std::fs::read_dir(&self.dir)
            .map_err(io)?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if let Some(name) = name {
                files.insert(name, simpleseg_core::io::fingerprint(&path)?);
            }
        }
        Ok(Value::Object(files))
    }

    /// Memory-maps the weights; tensors are converted to `dtype` as they are read.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let files = self.safetensors_files()?;
        // SAFETY: the files are only read; modifying them while mapped is the user's mistake
        // and at worst yields wrong weights, as with any memory-mapped loader.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }?;
        Ok(vb)
    }
}

/// Reads the tensor names from a safetensors header without mapping the data.
fn safetensors_header_names(path: &Path) -> Result<Vec<String>> {
    use std::io::Read;
    let bad = |message: String| Error::BadFile {
        path: path.to_path_buf(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad(format!(
            "safetensors header of {len} bytes is not plausible"
        )));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| bad(format!("truncated safetensors header ({e})")))?;
    let value: Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("bad safetensors header: {e}")))?;
    Ok(value
        .as_object()
        .map(|m| m.keys().filter(|k| *k != "__metadata__").cloned().collect())
        .unwrap_or_default())
}

/// One token id or a list of them, as `eos_token_id` may be written.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(id) => vec![id],
            OneOrMany::Many(ids) => ids,
        }
    }
}

/// A parsed JSON file that remembers its path, for error messages that name file and key.
#[derive(Clone, Debug)]
pub struct JsonFile {
    pub path: PathBuf,
    pub root: Value,
}

impl JsonFile {
    /// Reads and parses a JSON file.
    pub fn read(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                hint: "required by this model folder".into(),
            });
        }
        let text = read_text_file_bounded(path, Limit::DataBytes)?;
        let root = serde_json::from_str(&text).map_err(|e| Error::BadFile {
            path: path.to_path_buf(),
            message: format!("not valid JSON: {e}"),
        })?;
        Ok(JsonFile {
            path: path.to_path_buf(),
            root,
        })
    }

    /// The object at `key` (dotted, `""` for the whole file) read into a serde struct; a value
    /// of the wrong type is an error naming its key, as `text_config.vocab_size`.
    pub fn parse<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        let value = if key.is_empty() {
            Some(&self.root)
        } else {
            self.find(&[key])
        };
        self.parse_value(value.cloned().unwrap_or(Value::Null), key)
    }

    /// [`JsonFile::parse`] of a value taken from this file, `key` naming where it came from.
    pub fn parse_value<T: serde::de::DeserializeOwned>(
        &self,
        value: Value,
        key: &str,
    ) -> Result<T> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let inner = e.path().to_string();
            let path = match (key.is_empty(), inner.as_str()) {
                (_, ".") => key.to_string(),
                (true, p) => p.to_string(),
                (false, p) => format!("{key}.{p}"),
            };
            if path.is_empty() {
                self.error(e.into_inner().to_string())
            } else {
                self.error(format!("`{path}`: {}", e.into_inner()))
            }
        })
    }

    /// A configuration error about this file.
    pub fn error(&self, message: impl Into<String>) -> Error {
        Error::BadConfig {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    /// The value at the first of `keys` (dotted paths, e.g. `text_config.hidden_size`) that
    /// is present and not null.
    pub fn find(&self, keys: &[&str]) -> Option<&Value> {
        keys.iter().find_map(|key| {
            key.split('.')
                .try_fold(&self.root, |v, part| v.get(part))
                .filter(|v| !v.is_null())
        })
    }

    fn missing(&self, keys: &[&str], what: &str) -> Error {
        self.error(format!(
            "missing key {} ({what})",
            keys.iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(" or ")
        ))
    }

    /// A required non-negative integer.
    pub fn usize(&self, keys: &[&str]) -> Result<usize> {
        let v = self
            .find(keys)
            .ok_or_else(|| self.missing(keys, "a non-negative integer"))?;
        v.as_u64().map(|n| n as usize).ok_or_else(|| {
            self.error(format!(
                "`{}` must be a non-negative integer, got {v}",
                keys[0]
            ))
        })
    }

    /// An optional non-negative integer.
    pub fn usize_or(&self, keys: &[&str], default: usize) -> Result<usize> {
        if self.find(keys).is_none() {
            return Ok(default);
        }
        self.usize(keys)
    }

    /// A required number.
    pub fn f64(&self, keys: &[&str]) -> Result<f64> {
        let v = self
            .find(keys)
            .ok_or_else(|| self.missing(keys, "a number"))?;
        v.as_f64()
            .ok_or_else(|| self.error(format!("`{}` must be a number, got {v}", keys[0])))
    }

    /// An optional number.
    pub fn f64_or(&self, keys: &[&str], default: f64) -> Result<f64> {
        if self.find(keys).is_none() {
            return Ok(default);
        }
        self.f64(keys)
    }

    /// An optional boolean.
    pub fn bool_or(&self, keys: &[&str], default: bool) -> Result<bool> {
        match self.find(keys) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.error(format!("`{}` must be true or false, got {v}", keys[0]))),
        }
    }

    /// An optional string.
    pub fn str(&self, keys: &[&str]) -> Option<&str> {
        self.find(keys).and_then(Value::as_str)
    }

    /// A list of non-negative integers, or a single one as a list of one (as `eos_token_id`
    /// may be either).
    pub fn usize_list(&self, keys: &[&str]) -> Result<Option<Vec<usize>>> {
        let Some(v) = self.find(keys) else {
            return Ok(None);
        };
        let bad = || {
            self.error(format!(
                "`{}` must be an integer or a list of integers, got {v}",
                keys[0]
            ))
        };
        match v {
            Value::Array(items) => items
                .iter()
                .map(|i| i.as_u64().map(|n| n as usize).ok_or_else(bad))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            other => other
                .as_u64()
                .map(|n| Some(vec![n as usize]))
                .ok_or_else(bad),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keys_in_either_layout() {
        let file = JsonFile {
            path: "config.json".into(),
            root: serde_json::json!({"hidden_size": 8, "text_config": {"hidden_size": 16, "eos": [1, 2]}, "n": null}),
        };
        assert_eq!(
            file.usize(&["text_config.hidden_size", "hidden_size"])
                .unwrap(),
            16
        );
        assert_eq!(file.usize(&["vision.x", "hidden_size"]).unwrap(), 8);
        assert_eq!(file.usize_or(&["n"], 3).unwrap(), 3);
        assert_eq!(
            file.usize_list(&["text_config.eos"]).unwrap(),
            Some(vec![1, 2])
        );
        let err = file
            .usize(&["nope", "text_config.nope"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.json") && err.contains("`nope` or `text_config.nope`"),
            "{err}"
        );
    }
}
