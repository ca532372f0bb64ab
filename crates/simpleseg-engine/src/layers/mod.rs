//! Building blocks shared by the models: linear layers over every weight format, embeddings,
//! norms, rotary embeddings, attention, and the placing of image features among text tokens.
//!
//! Every op here has two implementations chosen by [`Mode`]: candle's fused kernels for
//! inference, and compositions of differentiable primitives for training (candle's fused
//! `rms_norm`, `softmax_last_dim` and rotary kernels have no backward pass, so gradients
//! through them would silently vanish). Both compute the same function; tests check that.

pub mod activation;
pub mod attention;
pub mod embedding;
pub mod features;
pub mod linear;
pub mod mode;
pub mod norm;
pub mod quantized;
pub mod rotary;

use candle_core::{DType, Result, Tensor};

pub use activation::{add, gated, gated_batch, gelu_tanh, linear_gelu_tanh, silu, silu_mul};
pub use attention::{
    attention, causal_attention, causal_attention_by_position, causal_mask, repeat_kv,
    segment_attention, single_query_attention, softmax_last_dim,
};
pub use embedding::Embedding;
pub use features::merge_image_features;
pub use linear::{forward_batch, forward_each, Linear, FEW_ROWS};
pub use mode::Mode;
pub use norm::{LayerNorm, RmsNorm};
pub use rotary::{apply_rotary, rotate_half, Rotation};

pub use crate::io::weights::Weight;

/// The largest absolute difference between two tensors of one shape, compared in f32: what
/// the parity checks against reference outputs measure.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn train_and_infer_ops_agree() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (3, 5, 16), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 16, &dev).unwrap();
        let norm = RmsNorm {
            weight: w,
            eps: 1e-6,
        };
        assert!(
            max_abs_diff(
                &norm.forward(&x, Mode::Infer).unwrap(),
                &norm.forward(&x, Mode::Train).unwrap()
            )
            .unwrap()
                < 1e-5
        );
        assert!(
            max_abs_diff(
                &softmax_last_dim(&x, Mode::Infer).unwrap(),
                &softmax_last_dim(&x, Mode::Train).unwrap()
            )
            .unwrap()
                < 1e-6
        );
    }

    /// LayerNorm's row kernel gives candle's composed ops' values (the definition), in f32 and
    /// BF16, and keeps candle's ops for a tensor in a training graph.
    #[test]
    fn layer_norm_equals_its_definition() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 2.0, (7, 100), &dev).unwrap() + 3.0).unwrap();
        let norm = LayerNorm {
            weight: Tensor::randn(1f32, 0.1, 100, &dev).unwrap(),
            bias: Tensor::randn(0f32, 0.1, 100, &dev).unwrap(),
            eps: 1e-5,
        };
        let mean = x.mean_keepdim(1).unwrap();
        let centered = x.broadcast_sub(&mean).unwrap();
        let var = centered.sqr().unwrap().mean_keepdim(1).unwrap();
        let reference = centered
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&norm.weight)
            .unwrap()
            .broadcast_add(&norm.bias)
            .unwrap();
        assert!(max_abs_diff(&norm.forward(&x).unwrap(), &reference).unwrap() < 1e-5);
        let bf16 = norm.forward(&x.to_dtype(DType::BF16).unwrap()).unwrap();
        assert_eq!(bf16.dtype(), DType::BF16);
        // The input's BF16 rounding (x near 3, 2^-8 relative) scaled by 1 / std, plus the result's.
        assert!(max_abs_diff(&bf16, &reference).unwrap() < 4e-2);
        let var = candle_core::Var::from_tensor(&x).unwrap();
        let y = norm.forward(var.as_tensor()).unwrap();
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(var.as_tensor()).is_some(),
            "no gradient through LayerNorm"
        );
    }

    #[test]
    fn train_ops_carry_gradients() {
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 8), &dev).unwrap())
            .unwrap();
        let w = Tensor::ones(8, DType::F32, &dev).unwrap();
        let norm = RmsNorm {
            weight: w,
            eps: 1e-6,
        };
        let y = softmax_last_dim(
            &norm.forward(x.as_tensor(), Mode::Train).unwrap(),
            Mode::Train,
        )
        .unwrap();
        let loss = y.narrow(1, 0, 1).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .expect("gradient reaches the input");
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0);
    }
}
