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
        if mode == Mode::Infer {
            if let Some(y) = self.forward_bf16(x)? {
                return Ok(y);
            }
        }
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

/// A BF16 norm kernel run over `rows` in tasks of `per_task` values: its output, or `None`
/// where a task's kernel answered `None`. The output is not zeroed first: a kernel that
/// answers writes every value of its chunk (the norm kernels' contract).
fn normalized_rows(
    rows: &[u16],
    per_task: usize,
    kernel: impl Fn(&[u16], &mut [std::mem::MaybeUninit<u16>]) -> Option<()> + Sync,
) -> Option<Vec<u16>> {
    use rayon::prelude::*;
    let mut out: Vec<u16> = Vec::with_capacity(rows.len());
    out.spare_capacity_mut()[..rows.len()]
        .par_chunks_mut(per_task)
        .zip(rows.par_chunks(per_task))
        .try_for_each(|(out, rows)| kernel(rows, out))?;
    // SAFETY: every chunk's kernel answered, so each of the rows.len() values was written.
    unsafe { out.set_len(rows.len()) };
    Some(out)
}

impl RmsNorm {
    /// [`RmsNorm::forward`] of BF16 rows (and a BF16 weight) on the CPU outside training
    /// graphs: rows in parallel through [`simpleseg_kernels::math::rms_norm_bf16`], one pass,
    /// bit for bit the composed ops (the conversions, candle's f32 `rms_norm`, the product);
    /// `None` where it does not apply.
    fn forward_bf16(&self, x: &Tensor) -> Result<Option<Tensor>> {
        use crate::layers::linear::{bf16_bits, bf16_tensor, with_bf16_bits};

        let width = self.weight.elem_count();
        let applies = |t: &Tensor| t.dtype() == DType::BF16 && t.device().is_cpu() && !t.track_op();
        if !applies(x) || !applies(&self.weight) || x.dim(D::Minus1)? != width || width == 0 {
            return Ok(None);
        }
        let weight = bf16_bits(&self.weight)?;
        let x = x.contiguous()?;
        // Groups of 8 rows per call (their sums run side by side), 4 groups per task.
        let per_task = 32 * width;
        let eps = self.eps as f32;
        let out = with_bf16_bits(&x, |rows| {
            normalized_rows(rows, per_task, |rows, out| {
                simpleseg_kernels::math::rms_norm_bf16(rows, &weight, eps, out)
            })
        });
        match out.flatten() {
            Some(out) => bf16_tensor(out, x.shape(), x.device()).map(Some),
            None => Ok(None),
        }
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
    /// [`simpleseg_kernels::math::layer_norm`] (BF16 rows in one pass through
    /// [`simpleseg_kernels::math::layer_norm_bf16`], the same bits); candle's ops otherwise.
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
            if let Some(y) = layer_norm_bf16(x, &weight, &bias, eps, rows)? {
                return Ok(y);
            }
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

/// LayerNorm of BF16 rows on the CPU in one parallel pass
/// ([`simpleseg_kernels::math::layer_norm_bf16`]); `None` where it does not apply (another
/// dtype or device, a CPU without AVX-512 BW and VL). `per_task`: values per parallel task,
/// whole rows.
fn layer_norm_bf16(
    x: &Tensor,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    per_task: usize,
) -> Result<Option<Tensor>> {
    use crate::layers::linear::{bf16_tensor, with_bf16_bits};

    if x.dtype() != DType::BF16 || !x.device().is_cpu() || weight.is_empty() {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let out = with_bf16_bits(&x, |rows| {
        normalized_rows(rows, per_task, |rows, out| {
            simpleseg_kernels::math::layer_norm_bf16(rows, weight, bias, eps, out)
        })
    });
    match out.flatten() {
        Some(out) => bf16_tensor(out, x.shape(), x.device()).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::linear::bf16_bits;
    use candle_core::Device;

    /// The one-pass BF16 RMSNorm gives the composed ops' bits (the f32 conversion, candle's
    /// `rms_norm`, the rounding and the weight's product): row counts that leave a partial
    /// group of 8 and a partial task, widths that leave a partial vector.
    #[test]
    fn bf16_rms_norm_equals_the_composed_ops() {
        let device = Device::Cpu;
        for (rows, width) in [(1, 16), (45, 100), (70, 1280)] {
            let random = |shape: (usize, usize), scale: f64| {
                (Tensor::randn(0f32, 1f32, shape, &device).unwrap() * scale)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap()
            };
            let x = random((rows, width), 5.0);
            let norm = RmsNorm {
                weight: random((1, width), 1.0).squeeze(0).unwrap(),
                eps: 1e-6,
            };
            let Some(fast) = norm.forward_bf16(&x).unwrap() else {
                eprintln!("skipped: this CPU lacks AVX-512 BW/VL");
                return;
            };
            let ones = Tensor::ones(width, DType::F32, &device).unwrap();
            let composed = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32).unwrap(), &ones, 1e-6)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
                .broadcast_mul(&norm.weight)
                .unwrap();
            assert_eq!(
                bf16_bits(&fast).unwrap(),
                bf16_bits(&composed).unwrap(),
                "{rows} x {width}"
            );
            assert_eq!(
                bf16_bits(&norm.forward(&x, Mode::Infer).unwrap()).unwrap(),
                bf16_bits(&composed).unwrap()
            );
        }
    }

    /// The one-pass BF16 LayerNorm gives the bits of the rows widened to f32, normalized by
    /// the f32 kernel and rounded back (the path it replaces, which the towers' parity tests
    /// check against transformers): widths with and without a partial vector, values far from
    /// zero (a large mean), a partial last task.
    #[test]
    fn bf16_layer_norm_equals_the_f32_kernel_rounded() {
        let device = Device::Cpu;
        for (rows, width) in [(1, 16), (45, 100), (70, 1152)] {
            let random = |shape: (usize, usize), scale: f64, shift: f64| {
                ((Tensor::randn(0f32, 1f32, shape, &device).unwrap() * scale).unwrap() + shift)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap()
            };
            let x = random((rows, width), 5.0, 3.0);
            let norm = LayerNorm {
                weight: random((1, width), 1.0, 0.0).squeeze(0).unwrap(),
                bias: random((1, width), 1.0, 0.0).squeeze(0).unwrap(),
                eps: 1e-5,
            };
            let f32s = |t: &Tensor| -> Vec<f32> {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let (weight, bias) = (f32s(&norm.weight), f32s(&norm.bias));
            let Some(fast) = layer_norm_bf16(&x, &weight, &bias, 1e-5, 16 * width).unwrap() else {
                eprintln!("skipped: this CPU lacks AVX-512 BW/VL");
                return;
            };
            let mut wide = f32s(&x);
            simpleseg_kernels::math::layer_norm(&mut wide, &weight, &bias, 1e-5);
            let want: Vec<u16> = wide
                .iter()
                .map(|v| half::bf16::from_f32(*v).to_bits())
                .collect();
            assert_eq!(bf16_bits(&fast).unwrap(), want, "{rows} x {width}");
            assert_eq!(bf16_bits(&norm.forward(&x).unwrap()).unwrap(), want);
        }
    }
}
