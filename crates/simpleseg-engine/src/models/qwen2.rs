//! Qwen2's language model as Qwen2-VL and Qwen2.5-VL run it: decoder layers with grouped-query
//! attention and M-RoPE, whose rotary frequencies are split in `mrope_section` parts driven by
//! the temporal, height and width position of each token (`get_rope_index`).

use candle_core::{DType, Device, Module, Result as CResult, Tensor};

use crate::error::{Error, Result};
use crate::io::weights::Weights;
use crate::layers::{
    add, apply_rotary, attention, causal_attention, causal_mask, forward_each, gated, repeat_kv,
    single_query_attention, Embedding, Linear, Mode, RmsNorm,
};
use crate::runtime::kv_cache::KvCache;
use crate::runtime::session::StepGroup;

#[derive(Clone, Debug)]
struct TextAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

#[derive(Clone, Debug)]
struct TextMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

#[derive(Clone, Debug)]
struct DecoderLayer {
    self_attn: TextAttention,
    mlp: TextMlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl TextAttention {
    /// Queries, keys and values `(batch, heads, seq, head_dim)` of `x` `(batch, seq, hidden)`.
    fn project(&self, x: &Tensor) -> CResult<(Tensor, Tensor, Tensor)> {
        let (b, s, _) = x.dims3()?;
        let [q, k, v] = forward_each([&self.q_proj, &self.k_proj, &self.v_proj], x)?;
        let split = |y: Tensor, heads: usize| -> CResult<Tensor> {
            y.reshape((b, s, heads, self.head_dim))?.transpose(1, 2)
        };
        Ok((
            split(q, self.num_heads)?,
            split(k, self.num_kv_heads)?,
            split(v, self.num_kv_heads)?,
        ))
    }

    /// Rotary embedding, the cache, and attention: `(batch, seq, heads * head_dim)`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        (q, k, v): (Tensor, Tensor, Tensor),
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        mode: Mode,
    ) -> CResult<Tensor> {
        let (b, _, s, _) = q.dims4()?;
        let q = apply_rotary(&q, cos, sin)?;
        let k = apply_rotary(&k, cos, sin)?;
        let (k, v) = match cache {
            Some(slot) => crate::runtime::kv_cache::append(slot, k, v)?,
            None => (k, v),
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        // A prompt with nothing before it: the fused causal kernel, where the CPU runs it.
        if mask.is_some() && k.dim(2)? == s {
            if let Some(o) = causal_attention(&q, &k, &v, scale, mode)? {
                return Ok(o);
            }
        }
        let single = match mask {
            None => single_query_attention(&q, &k, &v, scale, mode)?,
            Some(_) => None,
        };
        let o = match single {
            Some(o) => o,
            None => {
                let n_rep = self.num_heads / self.num_kv_heads;
                let k = repeat_kv(&k, n_rep)?.contiguous()?;
                let v = repeat_kv(&v, n_rep)?.contiguous()?;
                attention(&q, &k, &v, mask, scale, mode)?
            }
        };
        o.transpose(1, 2)?
            .reshape((b, s, self.num_heads * self.head_dim))
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        mode: Mode,
    ) -> CResult<Tensor> {
        let o = self.attend(self.project(x)?, cos, sin, mask, cache, mode)?;
        self.o_proj.forward(&o)
    }
}

impl TextMlp {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        self.down_proj
            .forward(&gated(&self.gate_proj, &self.up_proj, x)?)
    }
}

/// The language model's configuration (`config.json`'s flat keys, or its `text_config`).
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub mrope_section: Vec<usize>,
    pub max_position_embeddings: usize,
}

impl TextConfig {
    /// Width of an attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// Multimodal rotary position of each token: `[temporal, height, width]`.
pub type MropePosition = [i64; 3];

/// transformers' `get_rope_index` for one sequence: text tokens advance all three positions
/// together; the tokens of an image (a run of `image_token_id`) take `start + (t, h, w)` over
/// the merged grid, and the text after it continues from `start + max(h, w)`. Returns the
/// positions and the delta that continues them during decoding (`max + 1 - len`).
pub fn rope_index(
    input_ids: &[u32],
    image_token_id: u32,
    grids: &[[usize; 3]],
    spatial_merge_size: usize,
) -> Result<(Vec<MropePosition>, i64)> {
    let mut positions = Vec::with_capacity(input_ids.len());
    let mut grids = grids.iter();
    let mut current: i64 = 0;
    let mut i = 0;
    while i < input_ids.len() {
        if input_ids[i] != image_token_id {
            positions.push([current; 3]);
            current += 1;
            i += 1;
            continue;
        }
        let run = input_ids[i..]
            .iter()
            .take_while(|&&t| t == image_token_id)
            .count();
        let &[t, h, w] = grids.next().ok_or_else(|| {
            Error::Input("the prompt has more image placeholders than images".into())
        })?;
        let (lh, lw) = (h / spatial_merge_size, w / spatial_merge_size);
        if run != t * lh * lw {
            return Err(Error::Input(format!(
                "an image needs {} placeholder tokens, the prompt has {run}",
                t * lh * lw
            )));
        }
        for ti in 0..t {
            for y in 0..lh {
                for x in 0..lw {
                    positions.push([current + ti as i64, current + y as i64, current + x as i64]);
                }
            }
        }
        current += lh.max(lw) as i64;
        i += run;
    }
    if grids.next().is_some() {
        return Err(Error::Input(
            "more images than image placeholders in the prompt".into(),
        ));
    }
    let max = positions
        .iter()
        .flat_map(|p| p.iter().copied())
        .max()
        .unwrap_or(-1);
    Ok((positions, max + 1 - input_ids.len() as i64))
}

/// The language model (`model.language_model` / `model`) and its head.
#[derive(Clone, Debug)]
pub struct TextModel {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    device: Device,
    inv_freq: Vec<f32>,
    mrope_section: Vec<usize>,
    head_dim: usize,
}

impl TextModel {
    /// Loads the language model under `vb_lm` and its head under `vb_root` (linear layers
    /// quantized as `vb_lm` says; the embedding table never is, only its rows are read).
    pub(crate) fn load(
        vb_lm: &Weights,
        vb_root: &Weights,
        c: &TextConfig,
        tie_word_embeddings: bool,
    ) -> CResult<Self> {
        let head_dim = c.head_dim();
        let embed_tokens = Embedding::load(vb_lm, c.vocab_size, c.hidden_size, "embed_tokens")?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = vb_lm.pp("layers").pp(i);
                let a = l.pp("self_attn");
                let m = l.pp("mlp");
                let kv = c.num_key_value_heads * head_dim;
                Ok(DecoderLayer {
                    self_attn: TextAttention {
                        q_proj: Linear::load(&a.pp("q_proj"), c.hidden_size, c.hidden_size, true)?,
                        k_proj: Linear::load(&a.pp("k_proj"), c.hidden_size, kv, true)?,
                        v_proj: Linear::load(&a.pp("v_proj"), c.hidden_size, kv, true)?,
                        o_proj: Linear::load(&a.pp("o_proj"), c.hidden_size, c.hidden_size, false)?,
                        num_heads: c.num_attention_heads,
                        num_kv_heads: c.num_key_value_heads,
                        head_dim,
                    },
                    mlp: TextMlp {
                        gate_proj: Linear::load(
                            &m.pp("gate_proj"),
                            c.hidden_size,
                            c.intermediate_size,
                            false,
                        )?,
                        up_proj: Linear::load(
                            &m.pp("up_proj"),
                            c.hidden_size,
                            c.intermediate_size,
                            false,
                        )?,
                        down_proj: Linear::load(
                            &m.pp("down_proj"),
                            c.intermediate_size,
                            c.hidden_size,
                            false,
                        )?,
                    },
                    input_layernorm: RmsNorm::load(
                        &l.pp("input_layernorm"),
                        c.hidden_size,
                        c.rms_norm_eps,
                    )?,
                    post_attention_layernorm: RmsNorm::load(
                        &l.pp("post_attention_layernorm"),
                        c.hidden_size,
                        c.rms_norm_eps,
                    )?,
                })
            })
            .collect::<CResult<Vec<_>>>()?;
        let norm = RmsNorm::load(&vb_lm.pp("norm"), c.hidden_size, c.rms_norm_eps)?;
        // A tied head reads the embedding table as a linear layer (quantized when asked, a copy
        // then, since lookups read the table's rows unquantized).
        let head = if tie_word_embeddings && !vb_root.contains("lm_head.weight") {
            vb_lm.pp("embed_tokens")
        } else {
            vb_root.pp("lm_head")
        };
        let lm_head = Linear::load(&head, c.hidden_size, c.vocab_size, false)?;
        let inv_freq = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / (c.rope_theta.powf(f64::from(i as f32 / head_dim as f32)) as f32))
            .collect();
        Ok(TextModel {
            embed_tokens,
            layers,
            norm,
            lm_head,
            device: vb_lm.device().clone(),
            inv_freq,
            mrope_section: c.mrope_section.clone(),
            head_dim,
        })
    }

    /// cos/sin `(batch, 1, seq, head_dim)` for M-RoPE positions `[batch][seq]`.
    fn rotary(
        &self,
        positions: &[Vec<MropePosition>],
        dtype: DType,
        device: &Device,
    ) -> CResult<(Tensor, Tensor)> {
        let half = self.head_dim / 2;
        // Which position component drives each frequency.
        let component: Vec<usize> = self
            .mrope_section
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| std::iter::repeat_n(i % 3, n))
            .collect();
        let (b, s) = (positions.len(), positions.first().map_or(0, Vec::len));
        let mut cos = Vec::with_capacity(b * s * self.head_dim);
        let mut sin = Vec::with_capacity(b * s * self.head_dim);
        for seq in positions {
            for pos in seq {
                let angles: Vec<f32> = (0..half)
                    .map(|j| pos[component[j]] as f32 * self.inv_freq[j])
                    .collect();
                for _ in 0..2 {
                    cos.extend(angles.iter().map(|a| a.cos()));
                    sin.extend(angles.iter().map(|a| a.sin()));
                }
            }
        }
        let shape = (b, 1, s, self.head_dim);
        Ok((
            Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        ))
    }

    /// The device the weights are on.
    pub fn device(&self) -> candle_core::Device {
        self.device.clone()
    }

    /// Token embeddings `(batch, seq, hidden)`.
    pub fn embed(&self, input_ids: &Tensor) -> CResult<Tensor> {
        input_ids.dims2()?;
        self.embed_tokens.forward(input_ids)
    }

    /// Final hidden states `(batch, seq, hidden)` for embeddings at M-RoPE `positions`,
    /// appending to `cache` when given. Causal over the cache and the new positions.
    pub fn forward(
        &self,
        embeds: &Tensor,
        positions: &[Vec<MropePosition>],
        cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> CResult<Tensor> {
        let (_, s, _) = embeds.dims3()?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        let (cos, sin) = self.rotary(positions, embeds.dtype(), embeds.device())?;
        let mask = if s > 1 {
            Some(causal_mask(s, past, embeds.dtype(), embeds.device())?)
        } else {
            None
        };
        let mut slots = cache.map(|c| c.slots(self.layers.len()));
        let mut x = embeds.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x, mode)?;
            let slot = slots.as_mut().map(|s| &mut s[i]);
            let h = layer
                .self_attn
                .forward(&h, &cos, &sin, mask.as_ref(), slot, mode)?;
            x = add(&x, &h)?;
            let h = layer.post_attention_layernorm.forward(&x, mode)?;
            x = add(&x, &layer.mlp.forward(&h)?)?;
        }
        self.norm.forward(&x, mode)
    }

    /// One decoding step for rows in groups ([`StepGroup`]): `embeds` `(rows, 1, hidden)`,
    /// group after group, each group's rows at its text position over its cache. The
    /// projections run once over every row; attention group by group, in order. Returns the
    /// final hidden states `(rows, 1, hidden)`.
    pub fn step(
        &self,
        embeds: &Tensor,
        caches: &mut [&mut KvCache],
        groups: &[StepGroup],
    ) -> CResult<Tensor> {
        let mode = Mode::Infer;
        let rotary = groups
            .iter()
            .map(|g| {
                let p = g.position;
                self.rotary(&[vec![[p; 3]]], embeds.dtype(), embeds.device())
            })
            .collect::<CResult<Vec<_>>>()?;
        let mut slots: Vec<&mut [Option<(Tensor, Tensor)>]> = caches
            .iter_mut()
            .map(|c| c.slots(self.layers.len()))
            .collect();
        let mut x = embeds.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x, mode)?;
            let (q, k, v) = layer.self_attn.project(&h)?;
            let mut start = 0;
            let mut outputs = Vec::with_capacity(groups.len());
            for (g, group) in groups.iter().enumerate() {
                let part = |t: &Tensor| t.narrow(0, start, group.rows);
                let (cos, sin) = &rotary[g];
                outputs.push(layer.self_attn.attend(
                    (part(&q)?, part(&k)?, part(&v)?),
                    cos,
                    sin,
                    None,
                    Some(&mut slots[group.cache][i]),
                    mode,
                )?);
                start += group.rows;
            }
            let o = Tensor::cat(&outputs, 0)?;
            x = add(&x, &layer.self_attn.o_proj.forward(&o)?)?;
            let h = layer.post_attention_layernorm.forward(&x, mode)?;
            x = add(&x, &layer.mlp.forward(&h)?)?;
        }
        self.norm.forward(&x, mode)
    }

    /// Logits `(..., vocab)` from hidden states.
    pub fn logits(&self, hidden: &Tensor) -> CResult<Tensor> {
        self.lm_head.forward(hidden)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_index_of_text_image_text() {
        // 2 text tokens, an image of 2x3 merged tokens (grid 4x6), 2 text tokens.
        let ids = [5, 6, 9, 9, 9, 9, 9, 9, 7, 8];
        let (pos, delta) = rope_index(&ids, 9, &[[1, 4, 6]], 2).unwrap();
        assert_eq!(pos[0], [0, 0, 0]);
        assert_eq!(pos[2], [2, 2, 2]);
        assert_eq!(pos[7], [2, 3, 4]);
        assert_eq!(pos[8], [5, 5, 5]);
        assert_eq!(pos[9], [6, 6, 6]);
        assert_eq!(delta, 7 - 10);
        assert!(rope_index(&ids, 9, &[], 2).is_err());
        assert!(rope_index(&ids, 9, &[[1, 4, 4]], 2).is_err());
    }
}
