//! A broken model folder gives an error that names the file and key, never a panic.

use std::path::{Path, PathBuf};

use simpleseg_engine::{load, LoadOptions};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen/nested-window56-untied")
}

/// A copy of the fixture folder to break.
fn copy(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("simpleseg-broken-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

fn error_of(dir: &Path) -> String {
    match load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("{} should not load", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, value.to_string()).unwrap();
}

#[test]
fn missing_files_are_named() {
    for (file, needle) in [
        ("tokenizer.json", "tokenizer.json"),
        (
            "model-00002-of-00003.safetensors",
            "model-00002-of-00003.safetensors",
        ),
        ("chat_template.jinja", "chat template"),
        ("processor_config.json", "preprocessor_config.json"),
        ("config.json", "config.json"),
    ] {
        let dir = copy(&format!("missing-{file}"));
        std::fs::remove_file(dir.join(file)).unwrap();
        let err = error_of(&dir);
        assert!(err.contains(needle), "removing {file}: {err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A file of the folder, a name for the case, an edit of its JSON, and the text the error must
/// contain.
type Case = (
    &'static str,
    &'static str,
    Box<dyn Fn(&mut serde_json::Value)>,
    &'static str,
);

#[test]
fn bad_keys_are_named() {
    let cases: Vec<Case> = vec![
        (
            "config.json",
            "hidden",
            Box::new(|v| {
                v["text_config"]
                    .as_object_mut()
                    .unwrap()
                    .remove("hidden_size");
            }),
            "`text_config.hidden_size` or `hidden_size`",
        ),
        (
            "config.json",
            "mrope",
            Box::new(|v| {
                v["text_config"]["rope_parameters"]["mrope_section"] = serde_json::json!([1, 2, 3])
            }),
            "mrope_section",
        ),
        (
            "config.json",
            "type",
            Box::new(|v| v["model_type"] = serde_json::json!("llama")),
            "llama",
        ),
        (
            "config.json",
            "vocab",
            Box::new(|v| v["text_config"]["vocab_size"] = serde_json::json!("big")),
            "vocab_size",
        ),
        (
            "config.json",
            "layers",
            Box::new(|v| v["text_config"]["num_hidden_layers"] = serde_json::json!(5)),
            "weights do not fit config.json",
        ),
        (
            "processor_config.json",
            "patch",
            Box::new(|v| v["image_processor"]["patch_size"] = serde_json::json!(16)),
            "patch_size",
        ),
        (
            "generation_config.json",
            "penalty",
            Box::new(|v| v["repetition_penalty"] = serde_json::json!(0.0)),
            "repetition_penalty",
        ),
    ];
    for (file, tag, edit, needle) in cases {
        let dir = copy(&format!("bad-{tag}"));
        edit_json(&dir.join(file), edit);
        let err = error_of(&dir);
        assert!(err.contains(needle), "{file} {tag}: {err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn corrupt_files_are_reported() {
    let dir = copy("corrupt");
    std::fs::write(dir.join("config.json"), "{not json").unwrap();
    assert!(error_of(&dir).contains("not valid JSON"));
    std::fs::remove_dir_all(&dir).unwrap();
    let dir = copy("corrupt-weights");
    std::fs::write(dir.join("model-00001-of-00003.safetensors"), b"garbage").unwrap();
    let err = error_of(&dir);
    assert!(err.contains("model-00001-of-00003.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Shards are files of the model folder: an index naming a path elsewhere is refused before
/// anything outside is opened (or fingerprinted by eval).
#[test]
fn shards_outside_the_folder_are_refused() {
    for (case, shard) in [
        ("parent", "../model-00001-of-00003.safetensors"),
        ("absolute", "/etc/passwd"),
        ("nested", "sub/model.safetensors"),
    ] {
        let dir = copy(&format!("shard-{case}"));
        edit_json(&dir.join("model.safetensors.index.json"), |v| {
            let map = v["weight_map"].as_object_mut().unwrap();
            let first = map.keys().next().unwrap().clone();
            map[&first] = serde_json::json!(shard);
        });
        let err = error_of(&dir);
        assert!(
            err.contains("not a file name in the model folder"),
            "{case}: {err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
