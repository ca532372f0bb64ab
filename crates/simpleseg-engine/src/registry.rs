//! The model families this engine runs, by `model_type`: how to load a folder, and which
//! tensors a folder's loading reads (for `quantize`). Adding a family is its folder under
//! `models/` and one line in [`FAMILIES`].

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::hf::HfFolder;
use crate::io::load::{init_threads, LoadOptions};
use crate::io::weights::Weights;
use crate::models::training::TrainingEntry;
use crate::models::{kimi_vl, qwen2_5_vl};
use crate::runtime::model::VisionLanguageModel;

/// A family as the registry knows it.
pub struct FamilyEntry {
    /// `config.json`'s `model_type`.
    pub model_type: &'static str,
    /// Loads a folder of this family for inference.
    pub load: fn(&HfFolder, &LoadOptions) -> Result<Box<dyn VisionLanguageModel>>,
    /// Loads the family's tensors from `weights` (a loading plan records what is asked for);
    /// returns the name of a separate output head (a tied head reads the embedding table).
    pub plan: fn(&HfFolder, &Weights) -> Result<&'static str>,
    /// How the family is trained, for families that can be.
    pub training: Option<TrainingEntry>,
}

/// Every family, by `model_type`.
pub const FAMILIES: &[FamilyEntry] = &[
    FamilyEntry {
        model_type: "qwen2_5_vl",
        load: |folder, options| Ok(Box::new(qwen2_5_vl::load(folder, options)?)),
        plan: qwen2_5_vl::plan,
        training: Some(qwen2_5_vl::training::ENTRY),
    },
    FamilyEntry {
        model_type: "kimi_vl",
        load: |folder, options| Ok(Box::new(kimi_vl::load(folder, options)?)),
        plan: kimi_vl::plan,
        training: None,
    },
];

/// The family of a folder, from its `config.json`'s `model_type`.
pub fn family(folder: &HfFolder) -> Result<&'static FamilyEntry> {
    let config = folder.json("config.json")?;
    match config.str(&["model_type"]) {
        Some(name) => FAMILIES
            .iter()
            .find(|f| f.model_type == name)
            .ok_or_else(|| {
                let known: Vec<&str> = FAMILIES.iter().map(|f| f.model_type).collect();
                Error::Unsupported(format!(
                    "{}: model_type \"{name}\" is not supported (supported: {})",
                    config.path.display(),
                    known.join(", ")
                ))
            }),
        None => Err(config.error("missing `model_type`")),
    }
}

/// How a folder's family is trained; an error names the families that can be.
pub fn training(folder: &HfFolder) -> Result<&'static TrainingEntry> {
    let family = family(folder)?;
    family.training.as_ref().ok_or_else(|| {
        let trainable: Vec<&str> = FAMILIES
            .iter()
            .filter(|f| f.training.is_some())
            .map(|f| f.model_type)
            .collect();
        Error::Unsupported(format!(
            "training {} models is not supported (trainable: {})",
            family.model_type,
            trainable.join(", ")
        ))
    })
}

/// The training entry points of a family by `model_type`.
pub fn training_of(model_type: &str) -> Option<&'static TrainingEntry> {
    FAMILIES
        .iter()
        .find(|f| f.model_type == model_type)
        .and_then(|f| f.training.as_ref())
}

/// Loads the model in a Hugging Face folder, choosing the implementation from `model_type`.
pub fn load(dir: &Path, options: &LoadOptions) -> Result<Box<dyn VisionLanguageModel>> {
    init_threads();
    let folder = HfFolder::open(dir)?;
    (family(&folder)?.load)(&folder, options)
}
