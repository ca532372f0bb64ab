//! Trainable weights: the engine's Qwen2.5-VL model built over candle `Var`s, so that the
//! same implementation runs inference and carries gradients.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use simpleseg_engine::io::hf::HfFolder;
use simpleseg_engine::models::qwen2_5_vl::{Config, Qwen2_5Vl, TensorLayout};

use crate::error::{io, Error, Result};

/// A model whose tensors are trainable variables, named as transformers 5 names them.
pub struct Trainable {
    pub varmap: VarMap,
    pub model: Qwen2_5Vl,
    pub config: Config,
    pub device: Device,
}

/// Is this parameter a normalization scale (initialized to one)?
fn is_norm_weight(name: &str) -> bool {
    name.ends_with(".weight") && (name.contains("norm") || name.contains("ln_q"))
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
    fn build(config: &Config, device: &Device) -> Result<(VarMap, Qwen2_5Vl)> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = Qwen2_5Vl::load(
            &simpleseg_engine::io::weights::Weights::from_var_builder(vb),
            config,
            TensorLayout::Nested,
        )?;
        Ok((varmap, model))
    }

    /// Variables sorted by name (a stable order for initialization, optimizers and saving).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        #[expect(clippy::expect_used, reason = "poisoned only after a panic elsewhere")]
        let data = self.varmap.data().lock().expect("var map lock");
        let sorted: BTreeMap<&String, &Var> = data.iter().collect();
        sorted
            .into_iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Fresh weights: norms 1, biases 0, every other tensor normal with standard deviation
    /// `std`, or `vision_std` in the vision tower (`model.visual.*`).
    pub fn init(
        config: &Config,
        seed: u64,
        std: f32,
        vision_std: f32,
        device: &Device,
    ) -> Result<Self> {
        let (varmap, model) = Self::build(config, device)?;
        let this = Trainable {
            varmap,
            model,
            config: config.clone(),
            device: device.clone(),
        };
        let mut rng = StdRng::seed_from_u64(seed);
        for (name, var) in this.named_vars() {
            let shape = var.shape().clone();
            let value = if is_norm_weight(&name) {
                Tensor::ones(&shape, DType::F32, device)?
            } else if name.ends_with(".bias") {
                Tensor::zeros(&shape, DType::F32, device)?
            } else {
                let std = if name.starts_with("model.visual.") {
                    vision_std
                } else {
                    std
                };
                Tensor::from_vec(normal(&mut rng, shape.elem_count(), std), &shape, device)?
            };
            var.set(&value)?;
        }
        Ok(this)
    }

    /// Weights from a model folder of either tensor layout.
    pub fn from_folder(folder: &HfFolder, config: &Config, device: &Device) -> Result<Self> {
        let (varmap, model) = Self::build(config, device)?;
        let this = Trainable {
            varmap,
            model,
            config: config.clone(),
            device: device.clone(),
        };
        let layout = TensorLayout::detect(&folder.tensor_names()?)?;
        let source = folder.var_builder(DType::F32, device)?;
        for (name, var) in this.named_vars() {
            let source_name = match layout {
                TensorLayout::Nested => name.clone(),
                TensorLayout::Flat => name
                    .replacen("model.language_model.", "model.", 1)
                    .replacen("model.visual.", "visual.", 1),
            };
            let value = source
                .get(var.shape(), &source_name)
                .map_err(|e| Error::BadFile {
                    path: folder.dir().to_path_buf(),
                    message: format!("cannot initialize {name} from {source_name}: {e}"),
                })?;
            var.set(&value)?;
        }
        Ok(this)
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
