//! A model folder's weights (its other files are the family's to write:
//! [`simpleseg_engine::models::training::TrainingModel::write_metadata`]).

use std::path::Path;

use crate::error::Result;
use crate::params::{save_safetensors, Trainable};

/// Writes the weights as `model.safetensors`.
pub fn write_weights(dir: &Path, model: &Trainable) -> Result<()> {
    save_safetensors(&dir.join("model.safetensors"), &model.tensors())
}
