//! RMSNorm and LayerNorm, computed in f32 as transformers computes them.

use candle_core::{DType, Result, Tensor, D};

use crate::io::weights::Weights;
use crate::layers::activation::map_chunks_in_f32;
use crate::layers::mode::Mode;

/// RMSNorm as transformers computes it: in f32, then scaled by the weight in the input's dtype.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: w.get(dim, "weight")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let normed = match mode {
            Mode::Infer => {
                let ones = Tensor::ones(self.weight.dim(0)?, DType::F32, x.device())?;
                candle_nn::ops::rms_norm(&x32.contiguous()?, &ones, self.eps as f32)?
            }
            Mode::Train => {
                let variance = x32.sqr()?.mean_keepdim(D::Minus1)?;
                x32.broadcast_div(&(variance + self.eps)?.sqrt()?)?
            }
        };
        normed.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

/// LayerNorm (`nn.LayerNorm` with weight and bias), computed in f32.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.get(dim, "weight")?,
            bias: w.get(dim, "bias")?,
            eps,
        })
    }

    /// On the CPU outside training graphs, rows in parallel through
    /// [`simpleseg_kernels::math::layer_norm`]; candle's ops otherwise.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let width = self.weight.elem_count();
        if !x.track_op() && x.dim(D::Minus1)? == width {
            let f32s = |t: &Tensor| -> Result<Vec<f32>> {
                t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
            };
            let (weight, bias) = (f32s(&self.weight)?, f32s(&self.bias)?);
            let eps = self.eps as f32;
            // Whole rows in tasks of about 16k values.
            let rows = (16384 / width.max(1)).max(1) * width;
            if let Some(y) = map_chunks_in_f32(x, rows, |xs| {
                simpleseg_kernels::math::layer_norm(xs, &weight, &bias, eps)
            })? {
                return Ok(y);
            }
        }
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight.to_dtype(DType::F32)?)?
            .broadcast_add(&self.bias.to_dtype(DType::F32)?)?
            .to_dtype(dtype)
    }
}
