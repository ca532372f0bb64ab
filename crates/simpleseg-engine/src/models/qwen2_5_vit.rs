//! The Qwen2.5-VL vision tower: a Conv3d patch embedding (run as one matmul), 2D rotary
//! embeddings, blocks of RMSNorm + attention + SwiGLU where most blocks attend within windows
//! of `window_size` pixels (tokens reordered window by window) and `fullatt_block_indexes`
//! attend over the whole image, then a patch merger (RMSNorm, 2x2 concat, MLP) and the inverse
//! reordering.

use candle_core::{DType, Device, Module, Result as CResult, Tensor};

use crate::error::{Error, Result};
use crate::io::weights::Weights;
use crate::layers::{
    add, apply_rotary, attention, gated, segment_attention, Linear, Mode, RmsNorm, Rotation,
};

#[derive(Clone, Debug)]
struct VisionMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl VisionMlp {
    fn load(vb: &Weights, dim: usize, hidden: usize) -> CResult<Self> {
        Ok(VisionMlp {
            gate_proj: Linear::load(&vb.pp("gate_proj"), dim, hidden, true)?,
            up_proj: Linear::load(&vb.pp("up_proj"), dim, hidden, true)?,
            down_proj: Linear::load(&vb.pp("down_proj"), hidden, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        self.down_proj
            .forward(&gated(&self.gate_proj, &self.up_proj, x)?)
    }
}

#[derive(Clone, Debug)]
struct VisionAttention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl VisionAttention {
    /// `x`: `(seq, dim)`; attention within each `[cu[i], cu[i+1])` segment.
    fn forward(
        &self,
        x: &Tensor,
        cu_seqlens: &[usize],
        cos: &Tensor,
        sin: &Tensor,
        mode: Mode,
    ) -> CResult<Tensor> {
        let seq = x.dim(0)?;
        let qkv = self.qkv.forward(x)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let rotation = Rotation::Halves { cos, sin };
        if let Some(out) = segment_attention(
            &qkv,
            self.num_heads,
            self.head_dim,
            &rotation,
            cu_seqlens,
            scale,
            mode,
        )? {
            return self.proj.forward(&out);
        }
        let qkv = qkv
            .reshape((seq, 3, self.num_heads, self.head_dim))?
            .permute((1, 2, 0, 3))?; // (3, heads, seq, head_dim)
        let rope = |t: Tensor| -> CResult<Tensor> {
            let dtype = t.dtype();
            apply_rotary(&t.to_dtype(DType::F32)?, cos, sin)?.to_dtype(dtype)
        };
        let q = rope(qkv.get(0)?)?;
        let k = rope(qkv.get(1)?)?;
        let v = qkv.get(2)?;
        let mut outputs = Vec::with_capacity(cu_seqlens.len());
        for w in cu_seqlens.windows(2) {
            let (start, len) = (w[0], w[1] - w[0]);
            if len == 0 {
                continue;
            }
            let part = |t: &Tensor| t.narrow(1, start, len)?.contiguous()?.unsqueeze(0);
            let o = attention(&part(&q)?, &part(&k)?, &part(&v)?, None, scale, mode)?;
            outputs.push(o.squeeze(0)?);
        }
        let out = Tensor::cat(&outputs, 1)?; // (heads, seq, head_dim)
        let out = out
            .transpose(0, 1)?
            .reshape((seq, self.num_heads * self.head_dim))?;
        self.proj.forward(&out)
    }
}

#[derive(Clone, Debug)]
struct VisionBlock {
    norm1: RmsNorm,
    norm2: RmsNorm,
    attn: VisionAttention,
    mlp: VisionMlp,
}

#[derive(Clone, Debug)]
struct PatchMerger {
    ln_q: RmsNorm,
    mlp_0: Linear,
    mlp_2: Linear,
    merged_dim: usize,
}

impl PatchMerger {
    fn forward(&self, x: &Tensor, mode: Mode) -> CResult<Tensor> {
        let x = self.ln_q.forward(x, mode)?.reshape(((), self.merged_dim))?;
        let x = self.mlp_0.forward(&x)?.gelu_erf()?;
        self.mlp_2.forward(&x)
    }
}

/// The vision tower's configuration (`vision_config`).
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    pub out_hidden_size: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    pub window_size: usize,
    pub fullatt_block_indexes: Vec<usize>,
    pub rope_theta: f64,
}

/// The vision tower (`visual`).
#[derive(Clone, Debug)]
pub struct VisionTransformer {
    /// Conv3d weight flattened to `(hidden, in_channels * t * p * p)`.
    patch_embed: Tensor,
    blocks: Vec<VisionBlock>,
    merger: PatchMerger,
    config: VisionConfig,
}

/// Window reordering of the merged tokens and the window boundaries, as transformers'
/// `get_vision_window_index` computes them.
pub fn window_index(grids: &[[usize; 3]], config: &VisionConfig) -> (Vec<usize>, Vec<usize>) {
    let m = config.spatial_merge_size;
    let ws = config.window_size / m / config.patch_size;
    let unit = m * m;
    let mut index = Vec::new();
    let mut cu = vec![0usize];
    let mut offset = 0;
    for &[t, h, w] in grids {
        let (lh, lw) = (h / m, w / m);
        let (nwh, nww) = ((lh + ws - lh % ws) / ws, (lw + ws - lw % ws) / ws);
        for ti in 0..t {
            for wy in 0..nwh {
                for wx in 0..nww {
                    let mut count = 0;
                    for y in wy * ws..(wy + 1) * ws {
                        for x in wx * ws..(wx + 1) * ws {
                            if y < lh && x < lw {
                                index.push(offset + ti * lh * lw + y * lw + x);
                                count += 1;
                            }
                        }
                    }
                    #[expect(clippy::expect_used, reason = "cu starts with 0")]
                    let last = *cu.last().expect("starts with 0");
                    // torch.unique_consecutive drops the empty windows.
                    if count > 0 {
                        cu.push(last + count * unit);
                    }
                }
            }
        }
        offset += t * lh * lw;
    }
    (index, cu)
}

/// Rotary (h, w) positions of the patches, in merge-block order (`get_vision_position_ids`).
fn vision_positions(grids: &[[usize; 3]], m: usize) -> Vec<[usize; 2]> {
    let mut out = Vec::new();
    for &[t, h, w] in grids {
        for _ in 0..t {
            for bh in 0..h / m {
                for bw in 0..w / m {
                    for mh in 0..m {
                        for mw in 0..m {
                            out.push([bh * m + mh, bw * m + mw]);
                        }
                    }
                }
            }
        }
    }
    out
}

impl VisionTransformer {
    pub(crate) fn load(vb: &Weights, config: &VisionConfig) -> CResult<Self> {
        let c = config;
        let patch_dim = c.in_channels * c.temporal_patch_size * c.patch_size * c.patch_size;
        let patch_embed = vb
            .pp("patch_embed")
            .pp("proj")
            .get(
                (
                    c.hidden_size,
                    c.in_channels,
                    c.temporal_patch_size,
                    c.patch_size,
                    c.patch_size,
                ),
                "weight",
            )?
            .reshape((c.hidden_size, patch_dim))?;
        let head_dim = c.hidden_size / c.num_heads;
        let blocks = (0..c.depth)
            .map(|i| {
                let b = vb.pp("blocks").pp(i);
                Ok(VisionBlock {
                    norm1: RmsNorm::load(&b.pp("norm1"), c.hidden_size, 1e-6)?,
                    norm2: RmsNorm::load(&b.pp("norm2"), c.hidden_size, 1e-6)?,
                    attn: VisionAttention {
                        qkv: Linear::load(
                            &b.pp("attn").pp("qkv"),
                            c.hidden_size,
                            3 * c.hidden_size,
                            true,
                        )?,
                        proj: Linear::load(
                            &b.pp("attn").pp("proj"),
                            c.hidden_size,
                            c.hidden_size,
                            true,
                        )?,
                        num_heads: c.num_heads,
                        head_dim,
                    },
                    mlp: VisionMlp::load(&b.pp("mlp"), c.hidden_size, c.intermediate_size)?,
                })
            })
            .collect::<CResult<Vec<_>>>()?;
        let merged_dim = c.hidden_size * c.spatial_merge_size * c.spatial_merge_size;
        let mv = vb.pp("merger");
        let merger = PatchMerger {
            ln_q: RmsNorm::load(&mv.pp("ln_q"), c.hidden_size, 1e-6)?,
            mlp_0: Linear::load(&mv.pp("mlp").pp("0"), merged_dim, merged_dim, true)?,
            mlp_2: Linear::load(&mv.pp("mlp").pp("2"), merged_dim, c.out_hidden_size, true)?,
            merged_dim,
        };
        Ok(VisionTransformer {
            patch_embed,
            blocks,
            merger,
            config: config.clone(),
        })
    }

    /// Rotary cos/sin `(seq, head_dim)` for the patches, before window reordering.
    fn rotary(&self, grids: &[[usize; 3]], device: &Device) -> CResult<(Tensor, Tensor)> {
        let head_dim = self.config.hidden_size / self.config.num_heads;
        let spatial = head_dim / 2;
        let inv_freq: Vec<f32> = (0..spatial)
            .step_by(2)
            .map(|i| 1.0 / (self.config.rope_theta.powf(i as f64 / spatial as f64) as f32))
            .collect();
        let positions = vision_positions(grids, self.config.spatial_merge_size);
        let quarter = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * head_dim);
        let mut sin = Vec::with_capacity(positions.len() * head_dim);
        for [h, w] in positions {
            let angles: Vec<f32> = inv_freq
                .iter()
                .map(|f| h as f32 * f)
                .chain(inv_freq.iter().map(|f| w as f32 * f))
                .collect();
            debug_assert_eq!(angles.len(), 2 * quarter);
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        let n = cos.len() / head_dim;
        Ok((
            Tensor::from_vec(cos, (n, head_dim), device)?,
            Tensor::from_vec(sin, (n, head_dim), device)?,
        ))
    }

    /// Image features `(merged tokens, out_hidden_size)` from flattened patches
    /// `(patches, in_channels * t * p * p)`.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        grids: &[[usize; 3]],
        mode: Mode,
    ) -> Result<Tensor> {
        let expected: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        let (n, dim) = pixel_values.dims2()?;
        if n != expected || dim != self.patch_embed.dim(1)? {
            return Err(Error::Input(format!(
                "pixel values are {n}x{dim}, the grids need {expected}x{}",
                self.patch_embed.dim(1)?
            )));
        }
        let m = self.config.spatial_merge_size;
        if grids.iter().any(|g| g[1] % m != 0 || g[2] % m != 0) {
            return Err(Error::Input(format!(
                "image grids {grids:?} must be multiples of the merge size {m}"
            )));
        }
        let device = pixel_values.device();
        let unit = m * m;
        let x = pixel_values
            .to_dtype(self.patch_embed.dtype())?
            .matmul(&self.patch_embed.t()?)?;
        let (win_index, cu_window) = window_index(grids, &self.config);
        // Token order: merged blocks in window order, the `unit` patches of each block kept.
        let token_index: Vec<u32> = win_index
            .iter()
            .flat_map(|&b| (0..unit).map(move |j| (b * unit + j) as u32))
            .collect();
        let token_index = Tensor::new(token_index.as_slice(), device)?;
        let mut x = x.index_select(&token_index, 0)?;
        let (cos, sin) = self.rotary(grids, device)?;
        let cos = cos.index_select(&token_index, 0)?.unsqueeze(0)?; // (1, seq, head_dim)
        let sin = sin.index_select(&token_index, 0)?.unsqueeze(0)?;
        let mut cu_full = vec![0usize];
        for g in grids {
            for _ in 0..g[0] {
                #[expect(clippy::expect_used, reason = "cu_full starts with 0")]
                let last = *cu_full.last().expect("starts with 0");
                cu_full.push(last + g[1] * g[2]);
            }
        }
        for (i, block) in self.blocks.iter().enumerate() {
            let cu = if self.config.fullatt_block_indexes.contains(&i) {
                &cu_full
            } else {
                &cu_window
            };
            let h = block.norm1.forward(&x, mode)?;
            x = add(&x, &block.attn.forward(&h, cu, &cos, &sin, mode)?)?;
            let h = block.norm2.forward(&x, mode)?;
            x = add(&x, &block.mlp.forward(&h)?)?;
        }
        let merged = self.merger.forward(&x, mode)?;
        // Undo the window order (argsort of the window index).
        let mut reverse = vec![0u32; win_index.len()];
        for (pos, &b) in win_index.iter().enumerate() {
            reverse[b] = pos as u32;
        }
        let reverse = Tensor::new(reverse.as_slice(), device)?;
        Ok(merged.index_select(&reverse, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vision_config(window: usize) -> VisionConfig {
        VisionConfig {
            depth: 1,
            hidden_size: 16,
            intermediate_size: 8,
            num_heads: 2,
            in_channels: 3,
            out_hidden_size: 8,
            patch_size: 14,
            spatial_merge_size: 2,
            temporal_patch_size: 2,
            window_size: window,
            fullatt_block_indexes: vec![],
            rope_theta: 10000.0,
        }
    }

    #[test]
    fn window_index_matches_transformers() {
        // A 6x10 patch grid: 3x5 merged tokens, windows of 2x2 merged tokens (56 px).
        let (index, cu) = window_index(&[[1, 6, 10]], &vision_config(56));
        assert_eq!(
            index,
            vec![0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]
        );
        assert_eq!(cu, vec![0, 16, 32, 40, 48, 56, 60]);
        // Windows of 4x4 merged tokens: the whole 3x5 grid is two windows.
        let (index, cu) = window_index(&[[1, 6, 10]], &vision_config(112));
        assert_eq!(
            index,
            vec![0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 4, 9, 14]
        );
        assert_eq!(cu, vec![0, 48, 60]);
    }
}
