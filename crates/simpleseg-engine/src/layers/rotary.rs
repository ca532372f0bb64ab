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
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
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
        let at = t * self.per_position;
        let (cos, sin) = (
            &self.cos[at..at + self.per_position],
            &self.sin[at..at + self.per_position],
        );
        let round = |v: f32| half::bf16::from_f32(v).to_bits();
        if self.pairs {
            for (i, (pair, o)) in x.chunks_exact(2).zip(out.chunks_exact_mut(2)).enumerate() {
                let (re, im) = (pair[0].to_f32(), pair[1].to_f32());
                o[0] = round(re * cos[i] - im * sin[i]);
                o[1] = round(re * sin[i] + im * cos[i]);
            }
        } else {
            let half = x.len() / 2;
            for (j, o) in out.iter_mut().enumerate() {
                let turned = if j < half {
                    -x[j + half].to_f32()
                } else {
                    x[j - half].to_f32()
                };
                *o = round(x[j].to_f32() * cos[j] + turned * sin[j]);
            }
        }
    }
}
