//! Rotary position embeddings: the rotation shared by the families (their angles are their
//! own).

use candle_core::{Result, Tensor, D};

/// `rotate_half`: `[x1, x2] -> [-x2, x1]` over the last dimension.
pub fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// `x * cos + rotate_half(x) * sin`, with `cos`/`sin` broadcast against `x`.
///
/// BF16 heads `(batch, heads, seq, head_dim)` (a view of the projection is fine) with angles
/// `(1 or batch, 1, seq, head_dim)`, outside training, take one parallel pass
/// ([`simpleseg_kernels::math::rotate_half_bf16`]) with the same roundings as the composed
/// candle ops (bit for bit, tested): for a prompt of the 7B size, 18 ms per layer was spent
/// in those ops' five passes and their copies.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if let Some(y) = rotary_bf16(x, cos, sin)? {
        return Ok(y);
    }
    x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
}

/// [`apply_rotary`]'s one-pass BF16 path; `None` where it does not apply.
fn rotary_bf16(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    use crate::layers::linear::{bf16_bits, bf16_tensor};
    use candle_core::{CpuStorage, DType, Storage};
    use half::slice::HalfFloatSliceExt;
    use rayon::prelude::*;

    let Ok((b, h, s, d)) = x.dims4() else {
        return Ok(None);
    };
    let angles_fit = |t: &Tensor| {
        t.dims4()
            .is_ok_and(|(tb, th, ts, td)| (tb == 1 || tb == b) && th == 1 && ts == s && td == d)
    };
    if [x, cos, sin]
        .iter()
        .any(|t| t.dtype() != DType::BF16 || !t.device().is_cpu() || t.track_op())
        || !angles_fit(cos)
        || !angles_fit(sin)
        || !d.is_multiple_of(2)
    {
        return Ok(None);
    }
    let (cos_bits, sin_bits) = (bf16_bits(cos)?, bf16_bits(sin)?);
    let angle_batches = cos.dim(0)?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(CpuStorage::BF16(values)) = &*storage else {
        return Ok(None);
    };
    let strides = layout.stride();
    if strides[3] != 1 {
        return Ok(None);
    }
    let values: &[u16] = values.reinterpret_cast();
    let start = layout.start_offset();
    let mut out = vec![0u16; b * h * s * d];
    let rotated = out
        .par_chunks_mut(d)
        .enumerate()
        .try_for_each(|(row, out)| {
            let (bi, hi, si) = (row / (h * s), row / s % h, row % s);
            let at = start + bi * strides[0] + hi * strides[1] + si * strides[2];
            let angle = ((bi % angle_batches) * s + si) * d;
            simpleseg_kernels::math::rotate_half_bf16(
                values.get(at..at + d)?,
                &cos_bits[angle..angle + d],
                &sin_bits[angle..angle + d],
                out,
            )
        });
    drop(storage);
    if rotated.is_none() {
        return Ok(None);
    }
    bf16_tensor(out, (b, h, s, d), x.device()).map(Some)
}

/// How a vision tower turns its queries and keys, for the fused attention
/// ([`crate::layers::attention::segment_attention`]): per position, angles as f32 tensors.
#[derive(Clone, Copy, Debug)]
pub enum Rotation<'a> {
    /// Interleaved pairs `(2i, 2i + 1)` turned as complex numbers (MoonViT): `cos`/`sin`
    /// `(positions, head_dim / 2)`.
    Pairs { cos: &'a Tensor, sin: &'a Tensor },
    /// `x cos + rotate_half(x) sin` ([`apply_rotary`], Qwen2.5-VL's ViT): `cos`/`sin`
    /// `(positions, head_dim)` (leading dimensions of 1 allowed).
    Halves { cos: &'a Tensor, sin: &'a Tensor },
}

/// A [`Rotation`]'s angles read out as f32 values, ready to turn heads position by position.
pub(crate) struct Angles {
    pairs: bool,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Angles per position.
    per_position: usize,
}

impl Rotation<'_> {
    /// The angles for `positions` positions of heads of `head_dim` values; an error when the
    /// tensors do not hold that many.
    pub(crate) fn angles(&self, positions: usize, head_dim: usize) -> Result<Angles> {
        let (pairs, cos, sin, per_position) = match *self {
            Rotation::Pairs { cos, sin } => (true, cos, sin, head_dim / 2),
            Rotation::Halves { cos, sin } => (false, cos, sin, head_dim),
        };
        if !head_dim.is_multiple_of(2) {
            candle_core::bail!("a rotary embedding of heads of {head_dim} values (odd)");
        }
        let read = |t: &Tensor| -> Result<Vec<f32>> {
            let values = t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            if values.len() != positions * per_position {
                candle_core::bail!(
                    "{} rotary angles for {positions} positions of {per_position}",
                    values.len()
                );
            }
            Ok(values)
        };
        Ok(Angles {
            pairs,
            cos: read(cos)?,
            sin: read(sin)?,
            per_position,
        })
    }
}

impl Angles {
    /// One head `x` at position `t` turned in f32 and rounded to BF16 (as bits): the
    /// operations, in order, of [`apply_rotary`] on f32 values (Halves) or of MoonViT's complex
    /// rotation (Pairs), each rounded to f32, so the bits are theirs.
    pub(crate) fn turn(&self, t: usize, x: &[half::bf16], out: &mut [u16]) {
        use half::slice::HalfFloatSliceExt;
        let at = t * self.per_position;
        let (cos, sin) = (
            &self.cos[at..at + self.per_position],
            &self.sin[at..at + self.per_position],
        );
        // The lengths are the layout's (checked when the angles were read).
        let turned =
            simpleseg_kernels::math::turn_in_f32(x.reinterpret_cast(), cos, sin, self.pairs, out);
        debug_assert!(turned.is_some());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::linear::bf16_bits;
    use candle_core::{DType, Device};

    /// The one-pass BF16 rotation gives candle's composed ops' bits: heads read through a
    /// transposed view of a projection's output (as the language models' prefill passes
    /// them), angles shared by the batch or one per sequence.
    #[test]
    fn bf16_rotation_equals_the_composed_ops() -> Result<()> {
        let device = Device::Cpu;
        let random = |shape: &[usize], scale: f64| -> Result<Tensor> {
            (Tensor::randn(0f32, 1f32, shape, &device)? * scale)?.to_dtype(DType::BF16)
        };
        for (b, angle_batches) in [(1, 1), (2, 1), (2, 2)] {
            let (h, s, d) = (4, 9, 34);
            let projected = random(&[b, s, h, d], 3.0)?;
            let x = projected.transpose(1, 2)?;
            let (cos, sin) = (
                random(&[angle_batches, 1, s, d], 1.0)?,
                random(&[angle_batches, 1, s, d], 1.0)?,
            );
            let fast = rotary_bf16(&x, &cos, &sin)?.expect("BF16 heads and angles");
            let composed = (x.broadcast_mul(&cos)? + rotate_half(&x)?.broadcast_mul(&sin)?)?;
            assert_eq!(
                bf16_bits(&fast)?,
                bf16_bits(&composed)?,
                "batch {b}, angles {angle_batches}"
            );
            assert_eq!(
                bf16_bits(&apply_rotary(&x, &cos, &sin)?)?,
                bf16_bits(&composed)?
            );
        }
        // F32 heads take the composed ops.
        let x = Tensor::zeros((1, 2, 3, 4), DType::F32, &device)?;
        let angles = Tensor::zeros((1, 1, 3, 4), DType::F32, &device)?;
        assert!(rotary_bf16(&x, &angles, &angles)?.is_none());
        Ok(())
    }
}
