//! Kimi-VL's projector (`multi_modal_projector`): LayerNorm on each of MoonViT's merged
//! patches, the 2x2 of them concatenated, Linear, exact (erf) GELU, Linear.

use candle_core::{Module, Result as CResult, Tensor};

use crate::error::Result;
use crate::io::weights::Weights;
use crate::layers::{LayerNorm, Linear};
use crate::models::moonvit::VisionConfig;

/// The projector into the language model (`multi_modal_projector`).
#[derive(Clone, Debug)]
pub struct Projector {
    pre_norm: LayerNorm,
    linear_1: Linear,
    linear_2: Linear,
}

impl Projector {
    pub(crate) fn load(vb: &Weights, vision: &VisionConfig, text_hidden: usize) -> CResult<Self> {
        let d = vision.hidden_size;
        let merged = d * vision.merge_kernel_size[0] * vision.merge_kernel_size[1];
        Ok(Projector {
            pre_norm: LayerNorm::load(&vb.pp("pre_norm"), d, 1e-5)?,
            linear_1: Linear::load(&vb.pp("linear_1"), merged, merged, true)?,
            linear_2: Linear::load(&vb.pp("linear_2"), merged, text_hidden, true)?,
        })
    }

    /// Language-model features `(merged tokens, text hidden)` of merged patches
    /// `(merged tokens, kh * kw, hidden)`.
    pub fn forward(&self, merged: &Tensor) -> Result<Tensor> {
        let (n, k, d) = merged.dims3()?;
        let x = self.pre_norm.forward(merged)?.reshape((n, k * d))?;
        let x = self.linear_1.forward(&x)?.gelu_erf()?;
        Ok(self.linear_2.forward(&x)?)
    }
}
