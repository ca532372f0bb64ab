//! Trainable weights: a family's model built by the engine over candle `Var`s
//! ([`simpleseg_engine::models::training`]), so that the same implementation runs inference
//! and carries gradients.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use simpleseg_engine::io::hf::{HfFolder, JsonFile};
use simpleseg_engine::models::training::{Init, TrainingEntry, TrainingModel};
use simpleseg_engine::registry;

use crate::error::{io, Error, Result};

/// A model whose tensors are trainable variables, with its family's training entry points.
pub struct Trainable {
    pub model: Box<dyn TrainingModel>,
    pub entry: &'static TrainingEntry,
    pub device: Device,
}

/// Standard normal samples from a seeded generator (Box-Muller), so that initialization does
/// not depend on candle's global random state.
fn normal(rng: &mut StdRng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random_range(f64::EPSILON..1.0);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32 * std
        })
        .collect()
}

impl Trainable {
    /// A model folder's model and weights (its family from `config.json`).
    pub fn from_folder(folder: &HfFolder, device: &Device) -> Result<Self> {
        let entry = registry::training(folder)?;
        Ok(Trainable {
            model: (entry.from_folder)(folder, device)?,
            entry,
            device: device.clone(),
        })
    }

    /// A new model from a configuration file (its family from its `model_type`), its
    /// variables initialized by [`Trainable::init`].
    pub fn from_config(
        file: &JsonFile,
        tokenizer: tokenizers::Tokenizer,
        template: String,
        device: &Device,
    ) -> Result<Self> {
        let entry = family_of(file)?;
        Ok(Trainable {
            model: (entry.from_config)(file, tokenizer, template, device)?,
            entry,
            device: device.clone(),
        })
    }

    /// Variables sorted by name (a stable order for initialization, optimizers and saving).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        #[expect(clippy::expect_used, reason = "poisoned only after a panic elsewhere")]
        let data = self.model.varmap().data().lock().expect("var map lock");
        let sorted: BTreeMap<&String, &Var> = data.iter().collect();
        sorted
            .into_iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Fresh weights as the family says ([`Init`]): ones, zeros, or normal with standard
    /// deviation `std` (`vision_std` in the vision tower), drawn in name order from `seed`.
    pub fn init(&self, seed: u64, std: f32, vision_std: f32) -> Result<()> {
        let device = &self.device;
        let mut rng = StdRng::seed_from_u64(seed);
        for (name, var) in self.named_vars() {
            let shape = var.shape().clone();
            let value = match (self.entry.init)(&name) {
                Init::One => Tensor::ones(&shape, DType::F32, device)?,
                Init::Zero => Tensor::zeros(&shape, DType::F32, device)?,
                Init::Normal { vision } => {
                    let std = if vision { vision_std } else { std };
                    Tensor::from_vec(normal(&mut rng, shape.elem_count(), std), &shape, device)?
                }
            };
            var.set(&value)?;
        }
        Ok(())
    }

    /// Current values of all variables.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.named_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect()
    }

    /// Replaces all variables with `values` (name -> tensor).
    pub fn set_all(&self, values: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.named_vars() {
            let value = values
                .get(&name)
                .ok_or_else(|| Error::Invalid(format!("saved weights lack {name}")))?;
            var.set(&value.to_dtype(DType::F32)?.to_device(&self.device)?)?;
        }
        Ok(())
    }
}

/// The training entry points of a configuration file's family.
pub(crate) fn family_of(file: &JsonFile) -> Result<&'static TrainingEntry> {
    let model_type = file
        .str(&["model_type"])
        .ok_or_else(|| file.error("missing `model_type`"))?;
    registry::training_of(model_type).ok_or_else(|| {
        Error::Invalid(format!(
            "{}: training {model_type} models is not supported",
            file.path.display()
        ))
    })
}

/// Writes tensors as safetensors with the `{"format": "pt"}` metadata transformers expects.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors_write(path, views, metadata)
}

fn safetensors_write(
    path: &Path,
    views: Vec<(&str, &Tensor)>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, Some(metadata), &tmp).map_err(|e| Error::BadFile {
        path: tmp.clone(),
        message: e.to_string(),
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Reads a safetensors file into a name -> tensor map.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).map_err(|e| Error::BadFile {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}
