//! How a model is loaded: where it runs, in which dtype, quantized or not, and with how many
//! threads.

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::io::hf::HfFolder;
use crate::io::weights::{self, Quantization};

/// Where and how to run a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype; `None` picks one ([`auto_dtype`]).
    pub dtype: Option<DType>,
    /// Quantize the language model's linear layers at load (a folder written by
    /// `simpleseg quantize` is quantized already).
    pub quantize: Option<Quantization>,
}

impl LoadOptions {
    /// The folder's weights as a model reads them under these options.
    pub fn weights(&self, folder: &HfFolder, dtype: DType) -> Result<weights::Weights> {
        let files = weights::folder_files(folder)?;
        Ok(weights::Weights::from_files(files, dtype, &self.device).quantized(self.quantize))
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            dtype: None,
            quantize: None,
        }
    }
}

/// Picks a device by name: `cpu`, `cuda` (with the `cuda` feature) or `metal` (with the
/// `metal` feature).
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).map_err(|e| {
            Error::Unsupported(format!(
                "cannot open the CUDA device ({e}); build with `--features cuda`"
            ))
        }),
        "metal" => Device::new_metal(0).map_err(|e| {
            Error::Unsupported(format!(
                "cannot open the Metal device ({e}); build with `--features metal`"
            ))
        }),
        other => Err(Error::Input(format!(
            "unknown device '{other}' (expected cpu, cuda or metal)"
        ))),
    }
}

/// Fixes the CPU thread count once. Without `RAYON_NUM_THREADS`, candle re-derives the core
/// count from `/proc` on every matrix product, which costs more than a small model's whole
/// decode step; setting the variable (to the available parallelism, unless the user set it)
/// makes that a lookup. Called by [`load`] before any computation starts.
pub fn init_threads() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    });
}

/// The compute dtype to use when none is asked for: f32 while the weights would take at most
/// 8 GiB in f32, bf16 beyond (real sizes, as transformers users run them). On the CPU, linear
/// layers read their weights in place (BF16, F16, F32 or quantized) whatever this is: f32
/// activations multiply them exactly (widened or dequantized), bf16 ones with the CPU's BF16
/// dot-product instructions where it has them.
pub fn auto_dtype(folder: &HfFolder) -> Result<DType> {
    let elements: u64 = weights::folder_files(folder)?
        .shapes()
        .map(|(_, shape)| shape.iter().product::<usize>() as u64)
        .sum();
    Ok(if elements * 4 <= 8 << 30 {
        DType::F32
    } else {
        DType::BF16
    })
}
