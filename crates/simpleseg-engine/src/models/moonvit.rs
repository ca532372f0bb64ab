//! MoonViT, Kimi-VL's vision tower.
//!
//! - Patch embedding: a Conv2d run as one matmul over `(3, patch, patch)` patches, plus a
//!   learned `(64, 64, hidden)` position table resized to each image's grid as torch's
//!   `F.interpolate(mode="bicubic", align_corners=False)` resizes it, tap by tap in its order
//!   (used as is when the grid is 64x64).
//! - Blocks: LayerNorm (eps 1e-5) -> fused `wqkv` -> 2D rotary on interleaved pairs (pair `2i`
//!   turns by the column times `theta^(-4i / head_dim)`, pair `2i + 1` by the row) -> attention
//!   within each image (fused, [`segment_attention`], for BF16 on CPUs with AVX512-BF16) ->
//!   `wo`; LayerNorm -> MLP with tanh-GELU (applied as `fc0`'s prefill stores its outputs,
//!   where it runs on AMX tiles). A final LayerNorm.
//! - 2x2 merge: each merged token is the 4 patches of a 2x2 block, row-major.

use candle_core::{DType, Device, Module, Result as CResult, Tensor, D};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::io::weights::Weights;
use crate::layers::{
    add, attention, linear_gelu_tanh, segment_attention, LayerNorm, Linear, Mode, Rotation,
};

/// MoonViT, the vision tower (`vision_config`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct VisionConfig {
    pub patch_size: usize,
    pub init_pos_emb_height: usize,
    pub init_pos_emb_width: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    #[serde(default = "merge_2x2")]
    pub merge_kernel_size: [usize; 2],
}

fn merge_2x2() -> [usize; 2] {
    [2, 2]
}

#[derive(Clone, Debug)]
struct Block {
    norm0: LayerNorm,
    norm1: LayerNorm,
    wqkv: Linear,
    wo: Linear,
    fc0: Linear,
    fc1: Linear,
}

/// The vision tower (`vision_tower`).
#[derive(Clone, Debug)]
pub struct MoonVit {
    /// The Conv2d over each patch as a linear layer: its weight flattened to `(hidden, 3 *
    /// patch * patch)`, its bias.
    patch_embed: Linear,
    /// The learned position table `(height, width, hidden)`.
    pos_emb: Tensor,
    blocks: Vec<Block>,
    final_layernorm: LayerNorm,
    config: VisionConfig,
}

impl MoonVit {
    pub(crate) fn load(vb: &Weights, c: &VisionConfig) -> CResult<Self> {
        let d = c.hidden_size;
        let patch_dim = 3 * c.patch_size * c.patch_size;
        let pe = vb.pp("patch_embed");
        let patch_weight = pe
            .pp("proj")
            .get((d, 3, c.patch_size, c.patch_size), "weight")?
            .reshape((d, patch_dim))?;
        let patch_embed = Linear::new(patch_weight, Some(pe.pp("proj").get(d, "bias")?));
        let pos_emb = pe
            .pp("pos_emb")
            .get((c.init_pos_emb_height, c.init_pos_emb_width, d), "weight")?;
        let enc = vb.pp("encoder");
        let blocks = (0..c.num_hidden_layers)
            .map(|i| {
                let b = enc.pp("blocks").pp(i);
                Ok(Block {
                    norm0: LayerNorm::load(&b.pp("norm0"), d, 1e-5)?,
                    norm1: LayerNorm::load(&b.pp("norm1"), d, 1e-5)?,
                    wqkv: Linear::load(&b.pp("wqkv"), d, 3 * d, true)?,
                    wo: Linear::load(&b.pp("wo"), d, d, true)?,
                    fc0: Linear::load(&b.pp("mlp").pp("fc0"), d, c.intermediate_size, true)?,
                    fc1: Linear::load(&b.pp("mlp").pp("fc1"), c.intermediate_size, d, true)?,
                })
            })
            .collect::<CResult<Vec<_>>>()?;
        Ok(MoonVit {
            patch_embed,
            pos_emb,
            blocks,
            final_layernorm: LayerNorm::load(&enc.pp("final_layernorm"), d, 1e-5)?,
            config: c.clone(),
        })
    }

    /// The position table resized to a `rows x cols` grid: `(rows * cols, hidden)`.
    fn positions(&self, rows: usize, cols: usize) -> Result<Tensor> {
        let c = &self.config;
        let table = self.pos_emb.to_dtype(DType::F32)?;
        let (ih, iw) = (c.init_pos_emb_height, c.init_pos_emb_width);
        if (rows, cols) == (ih, iw) {
            return Ok(table.reshape((rows * cols, c.hidden_size))?);
        }
        let table: Vec<f32> = table.flatten_all()?.to_vec1()?;
        let resized = resize_bicubic(
            &table,
            (ih, iw, c.hidden_size),
            &bicubic_taps(ih, rows),
            &bicubic_taps(iw, cols),
        );
        Ok(Tensor::from_vec(
            resized,
            (rows * cols, c.hidden_size),
            self.pos_emb.device(),
        )?)
    }

    /// Rotary cos/sin `(patches, head_dim / 2)` for the grids, one angle per complex pair.
    fn rotary(&self, grids: &[[usize; 3]], device: &Device) -> Result<(Tensor, Tensor)> {
        let head_dim = self.config.hidden_size / self.config.num_attention_heads;
        let quarter = head_dim / 4;
        let freqs: Vec<f32> = (0..quarter)
            .map(|i| 1.0 / 10000f32.powf((4 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for &[t, rows, cols] in grids {
            for _ in 0..t {
                for y in 0..rows {
                    for x in 0..cols {
                        for f in &freqs {
                            for angle in [x as f32 * f, y as f32 * f] {
                                cos.push(angle.cos());
                                sin.push(angle.sin());
                            }
                        }
                    }
                }
            }
        }
        let n = cos.len() / (2 * quarter).max(1);
        Ok((
            Tensor::from_vec(cos, (n, 2 * quarter), device)?,
            Tensor::from_vec(sin, (n, 2 * quarter), device)?,
        ))
    }

    /// Patch features `(patches, hidden)` of the images (patches `(patches, 3 * p * p)`,
    /// image after image), before merging.
    pub fn forward(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<Tensor> {
        let c = &self.config;
        let expected: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        let (n, dim) = pixel_values.dims2()?;
        let (_, patch_dim) = self.patch_embed.weight.dims()?;
        if n != expected || dim != patch_dim {
            return Err(Error::Input(format!(
                "pixel values are {n}x{dim}, the grids need {expected}x{patch_dim}"
            )));
        }
        // The model's dtype (the tables are loaded in it).
        let dtype = self.pos_emb.dtype();
        let device = pixel_values.device();
        let x = self.patch_embed.forward(&pixel_values.to_dtype(dtype)?)?;
        let positions = grids
            .iter()
            .map(|g| {
                let p = self.positions(g[1], g[2])?;
                Ok(if g[0] == 1 { p } else { p.repeat((g[0], 1))? })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut x = (x + Tensor::cat(&positions, 0)?.to_dtype(dtype)?)?;
        let (cos, sin) = self.rotary(grids, device)?;
        let heads = c.num_attention_heads;
        let head_dim = c.hidden_size / heads;
        let mut cu_seqlens = vec![0];
        for g in grids {
            cu_seqlens.push(cu_seqlens[cu_seqlens.len() - 1] + g[0] * g[1] * g[2]);
        }
        let scale = (head_dim as f64).powf(-0.5);
        let rotation = Rotation::Pairs {
            cos: &cos,
            sin: &sin,
        };
        for block in &self.blocks {
            let h = block.norm0.forward(&x)?;
            let qkv = block.wqkv.forward(&h)?;
            let attended = match segment_attention(
                &qkv,
                heads,
                head_dim,
                &rotation,
                &cu_seqlens,
                scale,
                Mode::Infer,
            )? {
                Some(o) => o,
                None => unfused_attention(&qkv, heads, &cos, &sin, &cu_seqlens, scale)?,
            };
            x = add(&x, &block.wo.forward(&attended)?)?;
            let h = block.norm1.forward(&x)?;
            x = add(&x, &block.fc1.forward(&linear_gelu_tanh(&block.fc0, &h)?)?)?;
        }
        Ok(self.final_layernorm.forward(&x)?)
    }

    /// Each image's patches regrouped by the merge kernel: `(merged tokens, kh * kw, hidden)`,
    /// the patches of a block in row-major order.
    pub fn merge(&self, features: &Tensor, grids: &[[usize; 3]]) -> Result<Tensor> {
        let [kh, kw] = self.config.merge_kernel_size;
        let d = self.config.hidden_size;
        let mut out = Vec::with_capacity(grids.len());
        let mut start = 0;
        for &[t, h, w] in grids {
            if h % kh != 0 || w % kw != 0 {
                return Err(Error::Input(format!(
                    "a {w}x{h} patch grid is not a multiple of the {kw}x{kh} merge kernel"
                )));
            }
            for _ in 0..t {
                let seq = features.narrow(0, start, h * w)?;
                out.push(
                    seq.reshape((h / kh, kh, w / kw, kw, d))?
                        .permute((0, 2, 1, 3, 4))?
                        .reshape((h / kh * (w / kw), kh * kw, d))?,
                );
                start += h * w;
            }
        }
        Ok(Tensor::cat(&out, 0)?)
    }
}

/// What [`segment_attention`] computes, step by step with candle's ops (f32 models, training
/// graphs, other devices, CPUs without AVX512-BF16): `qkv` `(n, 3 * hidden)`, queries and keys
/// turned by [`rotate_pairs`], attention within each image.
fn unfused_attention(
    qkv: &Tensor,
    heads: usize,
    cos: &Tensor,
    sin: &Tensor,
    cu_seqlens: &[usize],
    scale: f64,
) -> CResult<Tensor> {
    let (n, width) = qkv.dims2()?;
    let hidden = width / 3;
    let qkv = qkv.reshape((n, 3, heads, hidden / heads))?;
    let q = rotate_pairs(&qkv.narrow(1, 0, 1)?.squeeze(1)?, cos, sin)?;
    let k = rotate_pairs(&qkv.narrow(1, 1, 1)?.squeeze(1)?, cos, sin)?;
    let v = qkv.narrow(1, 2, 1)?.squeeze(1)?;
    let mut outputs = Vec::with_capacity(cu_seqlens.len());
    for w in cu_seqlens.windows(2) {
        let (start, len) = (w[0], w[1] - w[0]);
        // (1, heads, len, head_dim) within one image.
        let part = |t: &Tensor| -> CResult<Tensor> {
            t.narrow(0, start, len)?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0)
        };
        let o = attention(&part(&q)?, &part(&k)?, &part(&v)?, None, scale, Mode::Infer)?;
        outputs.push(o.squeeze(0)?.transpose(0, 1)?.reshape((len, hidden))?);
    }
    Tensor::cat(&outputs, 0)
}

/// Rotates interleaved pairs `(2p, 2p + 1)` of the last dimension of `x` `(n, heads, dim)` by
/// the angles of `cos`/`sin` `(n, dim / 2)`, in f32, as complex multiplication does.
fn rotate_pairs(x: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    let dtype = x.dtype();
    let (n, heads, dim) = x.dims3()?;
    let pairs = x.to_dtype(DType::F32)?.reshape((n, heads, dim / 2, 2))?;
    let re = pairs.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
    let im = pairs.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
    let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
    let out_re = (re.broadcast_mul(&cos)? - im.broadcast_mul(&sin)?)?;
    let out_im = (re.broadcast_mul(&sin)? + im.broadcast_mul(&cos)?)?;
    Tensor::stack(&[out_re, out_im], D::Minus1)?
        .reshape((n, heads, dim))?
        .to_dtype(dtype)
}

/// For each output index of a resize from `input` to `output` samples: the four source indices
/// (clamped to the edges) and their cubic weights, as torch's bicubic upsampling computes them
/// with `align_corners=False` (source `= scale * (dst + 0.5) - 0.5`, A = -0.75), in f32.
fn bicubic_taps(input: usize, output: usize) -> Vec<([usize; 4], [f32; 4])> {
    const A: f32 = -0.75;
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|dst| {
            let real = scale * (dst as f32 + 0.5) - 0.5;
            let base = real.floor();
            let t = real - base;
            let cubic1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
            let cubic2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
            let weights = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
            let at = |k: i64| (base as i64 + k).clamp(0, input as i64 - 1) as usize;
            ([at(-1), at(0), at(1), at(2)], weights)
        })
        .collect()
}

/// A `(height, width, d)` table resized to `(rows, cols, d)` (`taps_y` for each output row,
/// `taps_x` for each output column), summed as torch's bicubic kernel sums in f32: for each
/// output, the four source rows each interpolated along the columns (`x0 w0 + x1 w1 + x2 w2 +
/// x3 w3`, left to right, a clamped index weighted on its own), then those four along the rows
/// in the same way. The column sums of a source row do not depend on the output row, so they
/// are computed once per source row and output column.
fn resize_bicubic(
    table: &[f32],
    (height, width, d): (usize, usize, usize),
    taps_y: &[([usize; 4], [f32; 4])],
    taps_x: &[([usize; 4], [f32; 4])],
) -> Vec<f32> {
    use rayon::prelude::*;

    let cols = taps_x.len();
    let mut along_x = vec![0f32; height * cols * d];
    along_x
        .par_chunks_mut(cols * d)
        .enumerate()
        .for_each(|(y, row)| {
            for (out, (idx, weights)) in row.chunks_exact_mut(d).zip(taps_x) {
                let source = |k: usize| &table[(y * width + idx[k]) * d..][..d];
                interpolate(out, weights, source);
            }
        });
    let mut resized = vec![0f32; taps_y.len() * cols * d];
    resized
        .par_chunks_mut(cols * d)
        .zip(taps_y)
        .for_each(|(row, (idx, weights))| {
            for (c, out) in row.chunks_exact_mut(d).enumerate() {
                let source = |k: usize| &along_x[(idx[k] * cols + c) * d..][..d];
                interpolate(out, weights, source);
            }
        });
    resized
}

/// One output of [`resize_bicubic`]: the taps' values (`sources(k)`, `out.len()` each)
/// weighted and summed in order.
fn interpolate<'a>(out: &mut [f32], weights: &[f32; 4], sources: impl Fn(usize) -> &'a [f32]) {
    for (o, x) in out.iter_mut().zip(sources(0)) {
        *o = x * weights[0];
    }
    for (k, w) in weights.iter().enumerate().skip(1) {
        for (o, x) in out.iter_mut().zip(sources(k)) {
            *o += x * w;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_taps_are_identity_at_equal_size_and_sum_to_one() {
        for (idx, w) in bicubic_taps(8, 8) {
            assert_eq!(w[1], 1.0);
            assert_eq!(w[0] + w[2] + w[3], 0.0);
            assert!(idx[1] < 8);
        }
        for (_, w) in bicubic_taps(64, 23) {
            let s: f32 = w.iter().sum();
            assert!((s - 1.0).abs() < 1e-6);
        }
    }
}
