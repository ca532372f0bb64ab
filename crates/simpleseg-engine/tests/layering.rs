//! The engine's modules import only modules below them (see `docs/architecture.md`): no
//! module imports one above it, so there is no cycle. Read from the sources: every `crate::`
//! path outside tests must name a module of a lower layer, or an earlier one of its own layer.

use std::path::{Path, PathBuf};

/// The layers from the bottom up; within a layer, its modules from the bottom up.
const LAYERS: &[(&str, &[&str])] = &[
    ("error", &[]),
    ("io", &["hf", "gguf", "quantized", "weights", "load"]),
    ("text", &["tiktoken", "tokenizer", "template"]),
    ("image_processing", &["pillow"]),
    (
        "layers",
        &[
            "mode",
            "quantized",
            "linear",
            "embedding",
            "activation",
            "norm",
            "rotary",
            "attention",
            "features",
        ],
    ),
    (
        "runtime",
        &[
            "sampling",
            "constraint",
            "model",
            "decoding",
            "kv_cache",
            "session",
            "generator",
            "segment",
            "scheduler",
        ],
    ),
    (
        "models",
        &[
            "qwen2",
            "deepseek_v3",
            "qwen2_5_vit",
            "moonvit",
            "family",
            "training",
            "qwen2_5_vl",
            "kimi_vl",
        ],
    ),
    ("registry", &[]),
    ("quantize", &[]),
];

/// `(layer, position within the layer)` of a module path such as `runtime::session`.
fn rank(path: &[&str]) -> Option<(usize, usize)> {
    let (layer, (_, inner)) = LAYERS
        .iter()
        .enumerate()
        .find(|(_, (name, _))| *name == path[0])?;
    // A module not named in its layer's list (the layer's own `mod.rs`) ranks above them all.
    let position = path
        .get(1)
        .and_then(|m| inner.iter().position(|n| n == m))
        .unwrap_or(inner.len());
    Some((layer, position))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_imports_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap().with_extension("");
        let mut module: Vec<String> = relative
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        if module.last().is_some_and(|m| m == "mod") {
            module.pop();
        }
        if module == ["lib"] {
            continue;
        }
        let own: Vec<&str> = module.iter().map(String::as_str).collect();
        let Some(own_rank) = rank(&own) else {
            wrong.push(format!("{}: not in the list of layers", file.display()));
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        // Code only: tests and comments (doc links) may name any module.
        let code: String = text
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        if code.contains("crate::{") {
            wrong.push(format!(
                "{}: name each module (`crate::{{...}}` hides which)",
                file.display()
            ));
        }
        for (i, _) in code.match_indices("crate::") {
            let path: Vec<&str> = code[i + "crate::".len()..]
                .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .next()
                .unwrap()
                .split("::")
                .filter(|s| !s.is_empty())
                .collect();
            if path.is_empty() {
                continue;
            }
            match rank(&path) {
                None => wrong.push(format!(
                    "{}: crate::{} is not a module of a layer",
                    file.display(),
                    path.join("::")
                )),
                Some(r) if r > own_rank && !(r.0 == own_rank.0 && own.len() == 1) => {
                    wrong.push(format!(
                        "{} imports crate::{}, which is above it",
                        file.display(),
                        path.join("::")
                    ))
                }
                Some(_) => {}
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
