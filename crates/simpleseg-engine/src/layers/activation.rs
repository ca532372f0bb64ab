//! Activations: SiLU and tanh-GELU through the vectorized kernels of
//! [`simpleseg_kernels::math`] on the CPU, candle's ops elsewhere and wherever gradients flow
//! (a tensor that tracks its op is part of a training graph; the kernels have no backward pass).

use candle_core::{DType, Result, Tensor};
use simpleseg_kernels::math;

/// Values per parallel task.
const CHUNK: usize = 1 << 14;

/// `f` applied to every value of an f32 or BF16 tensor on the CPU, computed in f32, in
/// parallel; `None` where it does not apply.
fn map_in_f32(x: &Tensor, f: fn(&mut [f32])) -> Result<Option<Tensor>> {
    use rayon::prelude::*;

    let dtype = x.dtype();
    if !x.device().is_cpu() || x.track_op() || !matches!(dtype, DType::F32 | DType::BF16) {
        return Ok(None);
    }
    let mut values: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    values.par_chunks_mut(CHUNK).for_each(f);
    Tensor::from_vec(values, x.shape(), x.device())?
        .to_dtype(dtype)
        .map(Some)
}

/// SiLU, `x / (1 + e^-x)` (candle's `silu`).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    match map_in_f32(x, math::silu)? {
        Some(y) => Ok(y),
        None => x.silu(),
    }
}

/// GELU with the tanh approximation (candle's `gelu`, PyTorch's `approximate="tanh"`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    match map_in_f32(x, math::gelu_tanh)? {
        Some(y) => Ok(y),
        None => x.gelu(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The kernels give candle's values (within f32 roundings: candle's tanh-GELU loses more
    /// to cancellation than the kernel), in f32 and BF16; a tensor in a training graph keeps
    /// candle's op and its gradient.
    #[test]
    fn activations_match_candles_ops() {
        let values = simpleseg_kernels::testing::Values(2).take(6 * 1000);
        let x = Tensor::from_vec(values, (6, 1000), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let x = x.to_dtype(dtype).unwrap();
            for (ours, theirs, tolerance) in [
                (silu(&x).unwrap(), x.silu().unwrap(), 1e-5),
                (gelu_tanh(&x).unwrap(), x.gelu().unwrap(), 1e-5),
            ] {
                assert_eq!(ours.dtype(), dtype);
                assert_eq!(ours.dims(), x.dims());
                // BF16: a rounding of the result (candle's own arithmetic may round more).
                let tolerance = if dtype == DType::BF16 {
                    1.6e-2
                } else {
                    tolerance
                };
                let f32s = |t: &Tensor| -> Vec<f32> {
                    t.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                };
                for (a, b) in f32s(&ours).iter().zip(f32s(&theirs)) {
                    assert!(
                        (a - b).abs() <= tolerance * (1.0 + b.abs()),
                        "{dtype:?}: {a} vs candle's {b}"
                    );
                }
            }
        }
        let var = Var::from_tensor(&x).unwrap();
        let y = silu(var.as_tensor()).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(var.as_tensor()).is_some(),
            "no gradient through silu"
        );
    }
}
