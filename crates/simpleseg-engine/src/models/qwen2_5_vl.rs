//! Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) on candle, following transformers.
//!
//! - Vision tower: a Conv3d patch embedding (run as one matmul), 2D rotary embeddings, blocks
//!   of RMSNorm + attention + SwiGLU where most blocks attend within windows of
//!   `window_size` pixels (tokens reordered window by window) and `fullatt_block_indexes`
//!   attend over the whole image, then a patch merger (RMSNorm, 2x2 concat, MLP) and the
//!   inverse reordering.
//! - Language model: Qwen2 decoder layers with grouped-query attention and M-RoPE, whose
//!   rotary frequencies are split in `mrope_section` parts driven by the temporal, height and
//!   width position of each token (`get_rope_index`).
//!
//! Structs mirror the checkpoint's tensor names. Both layouts transformers has written are
//! read: `model.layers.*` + `visual.*` (4.x) and `model.language_model.*` + `model.visual.*`
//! (5.x), with a flat or nested (`text_config`) `config.json`.

use candle_core::{DType, Device, Module, Result as CResult, Tensor};
use candle_nn::VarBuilder;

use crate::chat::{ChatTemplate, TextTokenizer};
use crate::error::{Error, Result};
use crate::generation::GenerationConfig;
use crate::hf::{HfFolder, JsonFile};
use crate::image_processor::{preprocess, ImageProcessorConfig};
use crate::nn::{apply_rotary, attention, causal_mask, repeat_kv, Linear, Mode, RmsNorm};
use crate::{LoadOptions, Prompt, Session, VisionLanguageModel};

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

/// The language model's configuration (flat keys, or `text_config`).
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

/// `config.json` of a `qwen2_5_vl` model.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub tie_word_embeddings: bool,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    /// `eos_token_id` of the config (one or several).
    pub eos_token_ids: Vec<u32>,
}

impl Config {
    /// Reads either layout of `config.json`.
    pub fn from_json(file: &JsonFile) -> Result<Self> {
        if let Some(t) = file.str(&["model_type"]) {
            if t != "qwen2_5_vl" {
                return Err(file.error(format!(
                    "`model_type` is \"{t}\"; this loader reads \"qwen2_5_vl\""
                )));
            }
        }
        // Keys of the language model: nested under text_config, or flat.
        let text_keys = |k: &str| [format!("text_config.{k}"), k.to_string()];
        let get = |k: &str| -> Result<usize> {
            let keys = text_keys(k);
            file.usize(&[&keys[0], &keys[1]])
        };
        let hidden_act = file
            .str(&["text_config.hidden_act", "hidden_act"])
            .unwrap_or("silu");
        if hidden_act != "silu" {
            return Err(file.error(format!(
                "`hidden_act` \"{hidden_act}\" is not supported (only \"silu\")"
            )));
        }
        if file.bool_or(
            &["text_config.use_sliding_window", "use_sliding_window"],
            false,
        )? {
            return Err(file.error(
                "`use_sliding_window` is true; sliding-window attention is not implemented (transformers' default attention does not apply it either)",
            ));
        }
        let num_attention_heads = get("num_attention_heads")?;
        let hidden_size = get("hidden_size")?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(file.error(format!(
                "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"
            )));
        }
        let num_key_value_heads = {
            let keys = text_keys("num_key_value_heads");
            file.usize_or(&[&keys[0], &keys[1]], num_attention_heads)?
        };
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(file.error(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        let head_dim = hidden_size / num_attention_heads;
        let rope_theta = file.f64_or(
            &[
                "text_config.rope_parameters.rope_theta",
                "rope_parameters.rope_theta",
                "text_config.rope_theta",
                "rope_theta",
                "text_config.rope_scaling.rope_theta",
                "rope_scaling.rope_theta",
            ],
            1_000_000.0,
        )?;
        let mrope_keys = [
            "text_config.rope_parameters.mrope_section",
            "rope_parameters.mrope_section",
            "text_config.rope_scaling.mrope_section",
            "rope_scaling.mrope_section",
        ];
        let mrope_section = file
            .usize_list(&mrope_keys)?
            .unwrap_or_else(|| vec![16, 24, 24]);
        if mrope_section.len() != 3 || mrope_section.iter().sum::<usize>() * 2 != head_dim {
            return Err(file.error(format!(
                "`mrope_section` {mrope_section:?} must be 3 numbers summing to head_dim / 2 = {}",
                head_dim / 2
            )));
        }
        let text = TextConfig {
            vocab_size: get("vocab_size")?,
            hidden_size,
            intermediate_size: get("intermediate_size")?,
            num_hidden_layers: get("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            rms_norm_eps: file.f64_or(&["text_config.rms_norm_eps", "rms_norm_eps"], 1e-6)?,
            rope_theta,
            mrope_section,
            max_position_embeddings: file.usize_or(
                &[
                    "text_config.max_position_embeddings",
                    "max_position_embeddings",
                ],
                32768,
            )?,
        };
        let v = |k: &str| format!("vision_config.{k}");
        let vision_act = file.str(&["vision_config.hidden_act"]).unwrap_or("silu");
        if vision_act != "silu" {
            return Err(file.error(format!(
                "`vision_config.hidden_act` \"{vision_act}\" is not supported (only \"silu\")"
            )));
        }
        let vision = VisionConfig {
            depth: file.usize(&[&v("depth"), &v("num_hidden_layers")])?,
            hidden_size: file.usize(&[&v("hidden_size")])?,
            intermediate_size: file.usize(&[&v("intermediate_size")])?,
            num_heads: file.usize(&[&v("num_heads"), &v("num_attention_heads")])?,
            in_channels: file.usize_or(&[&v("in_channels"), &v("in_chans")], 3)?,
            out_hidden_size: file.usize_or(&[&v("out_hidden_size")], text.hidden_size)?,
            patch_size: file.usize_or(&[&v("patch_size"), &v("spatial_patch_size")], 14)?,
            spatial_merge_size: file.usize_or(&[&v("spatial_merge_size")], 2)?,
            temporal_patch_size: file.usize_or(&[&v("temporal_patch_size")], 2)?,
            window_size: file.usize_or(&[&v("window_size")], 112)?,
            fullatt_block_indexes: file
                .usize_list(&[&v("fullatt_block_indexes")])?
                .unwrap_or_else(|| vec![7, 15, 23, 31]),
            rope_theta: file.f64_or(
                &[&v("rope_parameters.rope_theta"), &v("rope_theta")],
                10000.0,
            )?,
        };
        if vision.out_hidden_size != text.hidden_size {
            return Err(file.error(format!(
                "`vision_config.out_hidden_size` {} differs from the language model's hidden_size {}",
                vision.out_hidden_size, text.hidden_size
            )));
        }
        if vision.num_heads == 0
            || vision.hidden_size % vision.num_heads != 0
            || (vision.hidden_size / vision.num_heads) % 4 != 0
        {
            return Err(file.error("vision hidden_size / num_heads must be a multiple of 4"));
        }
        let window_unit = vision.spatial_merge_size * vision.patch_size;
        if vision.window_size < window_unit {
            return Err(file.error(format!(
                "`vision_config.window_size` {} is smaller than patch_size x spatial_merge_size = {window_unit}",
                vision.window_size
            )));
        }
        let id = |keys: &[&str], default: usize| -> Result<u32> {
            Ok(file.usize_or(keys, default)? as u32)
        };
        let eos_token_ids = file
            .usize_list(&["eos_token_id", "text_config.eos_token_id"])?
            .unwrap_or_else(|| vec![151645])
            .into_iter()
            .map(|e| e as u32)
            .collect();
        Ok(Config {
            tie_word_embeddings: file.bool_or(
                &["tie_word_embeddings", "text_config.tie_word_embeddings"],
                false,
            )?,
            image_token_id: id(&["image_token_id", "text_config.image_token_id"], 151655)?,
            video_token_id: id(&["video_token_id", "text_config.video_token_id"], 151656)?,
            vision_start_token_id: id(
                &["vision_start_token_id", "text_config.vision_start_token_id"],
                151652,
            )?,
            vision_end_token_id: id(
                &["vision_end_token_id", "text_config.vision_end_token_id"],
                151653,
            )?,
            eos_token_ids,
            text,
            vision,
        })
    }

    /// Head dimension of the language model.
    pub fn head_dim(&self) -> usize {
        self.text.hidden_size / self.text.num_attention_heads
    }

    /// `config.json` as transformers 5 writes it (language model under `text_config`).
    pub fn to_json(&self) -> serde_json::Value {
        let t = &self.text;
        let v = &self.vision;
        let eos = match self.eos_token_ids.as_slice() {
            [one] => serde_json::json!(one),
            many => serde_json::json!(many),
        };
        serde_json::json!({
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "dtype": "float32",
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "eos_token_id": eos,
            "text_config": {
                "model_type": "qwen2_5_vl_text",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "hidden_act": "silu",
                "rms_norm_eps": t.rms_norm_eps,
                "max_position_embeddings": t.max_position_embeddings,
                "use_sliding_window": false,
                "eos_token_id": eos,
                "tie_word_embeddings": self.tie_word_embeddings,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": t.rope_theta,
                    "mrope_section": t.mrope_section,
                },
            },
            "vision_config": {
                "model_type": "qwen2_5_vl_vision",
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_channels": v.in_channels,
                "out_hidden_size": v.out_hidden_size,
                "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "temporal_patch_size": v.temporal_patch_size,
                "window_size": v.window_size,
                "fullatt_block_indexes": v.fullatt_block_indexes,
                "hidden_act": "silu",
                "tokens_per_second": 2,
            },
        })
    }
}

/// Where the checkpoint keeps its tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorLayout {
    /// `model.layers.*`, `model.embed_tokens`, `visual.*` (transformers 4.x).
    Flat,
    /// `model.language_model.*`, `model.visual.*` (transformers 5.x).
    Nested,
}

impl TensorLayout {
    /// Detects the layout from the tensor names.
    pub fn detect<'a>(names: impl IntoIterator<Item = &'a String>) -> Result<Self> {
        let mut flat = false;
        for n in names {
            if n.starts_with("model.language_model.") {
                return Ok(TensorLayout::Nested);
            }
            flat |= n.starts_with("model.layers.") || n.starts_with("model.embed_tokens.");
        }
        if flat {
            Ok(TensorLayout::Flat)
        } else {
            Err(Error::Unsupported(
                "no Qwen2.5-VL language model tensors found (expected `model.language_model.*` or `model.layers.*`)".into(),
            ))
        }
    }

    fn language_model<'a>(self, vb: &VarBuilder<'a>) -> VarBuilder<'a> {
        match self {
            TensorLayout::Flat => vb.pp("model"),
            TensorLayout::Nested => vb.pp("model").pp("language_model"),
        }
    }

    fn visual<'a>(self, vb: &VarBuilder<'a>) -> VarBuilder<'a> {
        match self {
            TensorLayout::Flat => vb.pp("visual"),
            TensorLayout::Nested => vb.pp("model").pp("visual"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Vision tower

#[derive(Clone, Debug)]
struct VisionMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl VisionMlp {
    fn load(vb: &VarBuilder, dim: usize, hidden: usize) -> CResult<Self> {
        Ok(VisionMlp {
            gate_proj: Linear::load(&vb.pp("gate_proj"), dim, hidden, true)?,
            up_proj: Linear::load(&vb.pp("up_proj"), dim, hidden, true)?,
            down_proj: Linear::load(&vb.pp("down_proj"), hidden, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let gate = self.gate_proj.forward(x)?.silu()?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
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
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((seq, 3, self.num_heads, self.head_dim))?
            .permute((1, 2, 0, 3))?; // (3, heads, seq, head_dim)
        let rope = |t: Tensor| -> CResult<Tensor> {
            let dtype = t.dtype();
            apply_rotary(&t.to_dtype(DType::F32)?, cos, sin)?.to_dtype(dtype)
        };
        let q = rope(qkv.get(0)?)?;
        let k = rope(qkv.get(1)?)?;
        let v = qkv.get(2)?;
        let scale = (self.head_dim as f64).powf(-0.5);
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
    fn load(vb: &VarBuilder, config: &VisionConfig) -> CResult<Self> {
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
            x = (x + block.attn.forward(&h, cu, &cos, &sin, mode)?)?;
            let h = block.norm2.forward(&x, mode)?;
            x = (&x + block.mlp.forward(&h)?)?;
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

// ---------------------------------------------------------------------------------------------
// Language model

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

/// Keys and values of the processed positions, per layer: `(batch, kv_heads, seq, head_dim)`.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cache repeated `n` times along the batch (a batch-1 prompt shared by `n` samples).
    pub fn repeat_batch(&self, n: usize) -> Result<KvCache> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|(k, v)| -> CResult<(Tensor, Tensor)> {
                        Ok((k.repeat((n, 1, 1, 1))?, v.repeat((n, 1, 1, 1))?))
                    })
                    .transpose()
            })
            .collect::<CResult<Vec<_>>>()?;
        Ok(KvCache { layers })
    }
}

impl TextAttention {
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        mode: Mode,
    ) -> CResult<Tensor> {
        let (b, s, _) = x.dims3()?;
        let q = self
            .q_proj
            .forward(x)?
            .reshape((b, s, self.num_heads, self.head_dim))?
            .transpose(1, 2)?;
        let k = self
            .k_proj
            .forward(x)?
            .reshape((b, s, self.num_kv_heads, self.head_dim))?
            .transpose(1, 2)?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, s, self.num_kv_heads, self.head_dim))?
            .transpose(1, 2)?;
        let q = apply_rotary(&q.contiguous()?, cos, sin)?;
        let k = apply_rotary(&k.contiguous()?, cos, sin)?;
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (
                        Tensor::cat(&[&pk, &k], 2)?,
                        Tensor::cat(&[&pv, &v.contiguous()?], 2)?,
                    ),
                    None => (k, v.contiguous()?),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        let n_rep = self.num_heads / self.num_kv_heads;
        let k = repeat_kv(&k, n_rep)?.contiguous()?;
        let v = repeat_kv(&v, n_rep)?.contiguous()?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let o = attention(&q, &k, &v, mask, scale, mode)?;
        let o = o
            .transpose(1, 2)?
            .reshape((b, s, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&o)
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
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Tensor,
    inv_freq: Vec<f32>,
    mrope_section: Vec<usize>,
    head_dim: usize,
}

impl TextModel {
    fn load(vb_lm: &VarBuilder, vb_root: &VarBuilder, config: &Config) -> CResult<Self> {
        let c = &config.text;
        let head_dim = config.head_dim();
        let embed_tokens = vb_lm
            .pp("embed_tokens")
            .get((c.vocab_size, c.hidden_size), "weight")?;
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
        let lm_head = if config.tie_word_embeddings && !vb_root.contains_tensor("lm_head.weight") {
            embed_tokens.clone()
        } else {
            vb_root
                .pp("lm_head")
                .get((c.vocab_size, c.hidden_size), "weight")?
        };
        let inv_freq = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / (c.rope_theta.powf(f64::from(i as f32 / head_dim as f32)) as f32))
            .collect();
        Ok(TextModel {
            embed_tokens,
            layers,
            norm,
            lm_head,
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

    /// Token embeddings `(batch, seq, hidden)`.
    pub fn embed(&self, input_ids: &Tensor) -> CResult<Tensor> {
        let (b, s) = input_ids.dims2()?;
        self.embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, s, ()))
    }

    /// Final hidden states `(batch, seq, hidden)` for embeddings at M-RoPE `positions`,
    /// appending to `cache` when given. Causal over the cache and the new positions.
    pub fn forward(
        &self,
        embeds: &Tensor,
        positions: &[Vec<MropePosition>],
        mut cache: Option<&mut KvCache>,
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
        if let Some(c) = cache.as_mut() {
            if c.layers.len() != self.layers.len() {
                c.layers = vec![None; self.layers.len()];
            }
        }
        let mut x = embeds.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x, mode)?;
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            let h = layer
                .self_attn
                .forward(&h, &cos, &sin, mask.as_ref(), slot, mode)?;
            x = (x + h)?;
            let h = layer.post_attention_layernorm.forward(&x, mode)?;
            let gate = layer.mlp.gate_proj.forward(&h)?.silu()?;
            let h = layer
                .mlp
                .down_proj
                .forward(&(gate * layer.mlp.up_proj.forward(&h)?)?)?;
            x = (x + h)?;
        }
        self.norm.forward(&x, mode)
    }

    /// Logits `(..., vocab)` from hidden states.
    pub fn logits(&self, hidden: &Tensor) -> CResult<Tensor> {
        Linear {
            weight: self.lm_head.clone(),
            bias: None,
        }
        .forward(hidden)
    }
}

/// The whole model: vision tower, language model, head.
#[derive(Clone, Debug)]
pub struct Qwen2_5Vl {
    pub config: Config,
    pub visual: VisionTransformer,
    pub text: TextModel,
}

impl Qwen2_5Vl {
    /// Loads the weights under `vb` in the given tensor layout.
    pub fn load(vb: &VarBuilder, config: &Config, layout: TensorLayout) -> Result<Self> {
        let visual = VisionTransformer::load(&layout.visual(vb), &config.vision)?;
        let text = TextModel::load(&layout.language_model(vb), vb, config)?;
        Ok(Qwen2_5Vl {
            config: config.clone(),
            visual,
            text,
        })
    }

    /// Input embeddings for token ids `(batch, seq)` with each image placeholder replaced, in
    /// order, by the rows of `image_features` (`(placeholders, hidden)`).
    pub fn embed_with_images(
        &self,
        input_ids: &Tensor,
        image_features: Option<&Tensor>,
    ) -> Result<Tensor> {
        let embeds = self.text.embed(input_ids)?;
        let Some(features) = image_features else {
            return Ok(embeds);
        };
        let (b, s, d) = embeds.dims3()?;
        let ids: Vec<u32> = input_ids.flatten_all()?.to_vec1()?;
        let n_placeholders = ids
            .iter()
            .filter(|&&t| t == self.config.image_token_id)
            .count();
        if n_placeholders != features.dim(0)? {
            return Err(Error::Input(format!(
                "image features and image tokens do not match: {} features, {n_placeholders} tokens",
                features.dim(0)?
            )));
        }
        let mut next = b * s;
        let gather: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                if t == self.config.image_token_id {
                    next += 1;
                    (next - 1) as u32
                } else {
                    i as u32
                }
            })
            .collect();
        let table = Tensor::cat(
            &[
                &embeds.reshape((b * s, d))?,
                &features.to_dtype(embeds.dtype())?,
            ],
            0,
        )?;
        let gather = Tensor::new(gather.as_slice(), embeds.device())?;
        Ok(table.index_select(&gather, 0)?.reshape((b, s, d))?)
    }
}

// ---------------------------------------------------------------------------------------------
// Pipeline: folder loading, prompts and sessions

/// Builds model inputs: chat template, image processing, placeholder expansion, tokens.
#[derive(Clone)]
pub struct PromptBuilder {
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    pub image_config: ImageProcessorConfig,
    image_token: String,
    merge_size: usize,
}

impl PromptBuilder {
    /// Checks that the pieces fit the model configuration.
    pub fn new(
        tokenizer: TextTokenizer,
        template: ChatTemplate,
        image_config: ImageProcessorConfig,
        config: &Config,
    ) -> Result<Self> {
        if image_config.patch_size != config.vision.patch_size
            || image_config.merge_size != config.vision.spatial_merge_size
            || image_config.temporal_patch_size != config.vision.temporal_patch_size
        {
            return Err(Error::Input(format!(
                "the image processor's patch_size/merge_size/temporal_patch_size {}/{}/{} differ from config.json's vision_config {}/{}/{}",
                image_config.patch_size,
                image_config.merge_size,
                image_config.temporal_patch_size,
                config.vision.patch_size,
                config.vision.spatial_merge_size,
                config.vision.temporal_patch_size
            )));
        }
        let image_token = tokenizer
            .inner()
            .id_to_token(config.image_token_id)
            .ok_or_else(|| {
                Error::Input(format!(
                    "config.json's `image_token_id` {} is not in the tokenizer's vocabulary",
                    config.image_token_id
                ))
            })?;
        Ok(PromptBuilder {
            tokenizer,
            template,
            image_config,
            image_token,
            merge_size: config.vision.spatial_merge_size,
        })
    }

    /// Prompt text with the image placeholder expanded to one token per merged patch, as the
    /// processor does before tokenizing.
    pub fn expand_placeholders(&self, text: &str, grids: &[[usize; 3]]) -> Result<String> {
        let m2 = self.merge_size.pow(2);
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        let mut grids = grids.iter();
        while let Some(at) = rest.find(&self.image_token) {
            let g = grids.next().ok_or_else(|| {
                Error::Input(
                    "the chat template produced more image placeholders than images".into(),
                )
            })?;
            out.push_str(&rest[..at]);
            for _ in 0..g[0] * g[1] * g[2] / m2 {
                out.push_str(&self.image_token);
            }
            rest = &rest[at + self.image_token.len()..];
        }
        out.push_str(rest);
        if grids.next().is_some() {
            return Err(Error::Template(format!(
                "the chat template did not place the image token {}",
                self.image_token
            )));
        }
        Ok(out)
    }

    /// One user turn with the image and the prompt, ready for generation.
    pub fn prepare(&self, image: &image::RgbImage, prompt: &str) -> Result<Prompt> {
        let processed = preprocess(image, &self.image_config)?;
        let text = self.template.image_prompt(prompt)?;
        let text = self.expand_placeholders(&text, &[processed.grid_thw])?;
        Ok(Prompt {
            input_ids: self.tokenizer.encode(&text)?,
            images: vec![processed],
        })
    }
}

/// Pixel values of processed images as one `(patches, patch_dim)` tensor.
pub fn pixel_tensor(
    images: &[crate::image_processor::ProcessedImage],
    device: &Device,
) -> Result<Tensor> {
    let rows: usize = images
        .iter()
        .map(|i| i.grid_thw.iter().product::<usize>())
        .sum();
    let values: Vec<f32> = images
        .iter()
        .flat_map(|i| i.pixel_values.iter().copied())
        .collect();
    let dim = values.len() / rows.max(1);
    Ok(Tensor::from_vec(values, (rows, dim), device)?)
}

/// Runs a prompt through `model` (vision tower, prefill) and opens a decoding session on it.
pub fn start_session<'a>(
    model: &'a Qwen2_5Vl,
    prompt: &Prompt,
    device: &Device,
) -> Result<Box<dyn Session + 'a>> {
    let grids: Vec<[usize; 3]> = prompt.images.iter().map(|i| i.grid_thw).collect();
    let features = if prompt.images.is_empty() {
        None
    } else {
        Some(
            model
                .visual
                .forward(&pixel_tensor(&prompt.images, device)?, &grids, Mode::Infer)?,
        )
    };
    let ids = Tensor::new(prompt.input_ids.as_slice(), device)?.unsqueeze(0)?;
    let embeds = model.embed_with_images(&ids, features.as_ref())?;
    let (positions, delta) = rope_index(
        &prompt.input_ids,
        model.config.image_token_id,
        &grids,
        model.config.vision.spatial_merge_size,
    )?;
    let mut cache = KvCache::default();
    let hidden = model
        .text
        .forward(&embeds, &[positions], Some(&mut cache), Mode::Infer)?;
    let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?.squeeze(1)?;
    let logits = model.text.logits(&last)?;
    Ok(Box::new(QwenSession {
        model,
        cache,
        delta,
        logits,
    }))
}

/// A Qwen2.5-VL folder loaded for inference: model, prompt builder, decoding defaults.
pub struct Qwen2_5VlModel {
    pub model: Qwen2_5Vl,
    pub prompts: PromptBuilder,
    pub generation: GenerationConfig,
    device: Device,
    dtype: DType,
}

/// The compute dtype to use when none is asked for: f32 while the weights would take at most
/// 8 GiB in f32, bf16 beyond.
fn auto_dtype(folder: &HfFolder) -> Result<DType> {
    let bytes: u64 = folder
        .safetensors_files()?
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    // Stored weights are at least 2 bytes per value; assume the worst (bf16) for the estimate.
    Ok(if bytes * 2 <= 8 << 30 {
        DType::F32
    } else {
        DType::BF16
    })
}

/// Decoding defaults of a folder, with the config's and `<|im_end|>` stop tokens added.
pub fn generation_defaults(
    folder: &HfFolder,
    config: &Config,
    tokenizer: &TextTokenizer,
) -> Result<GenerationConfig> {
    let mut generation = GenerationConfig::load(folder)?;
    if generation.eos_token_ids.is_empty() {
        generation.eos_token_ids = config.eos_token_ids.clone();
    }
    if let Some(im_end) = tokenizer.token_id("<|im_end|>") {
        if !generation.eos_token_ids.contains(&im_end) {
            generation.eos_token_ids.push(im_end);
        }
    }
    Ok(generation)
}

/// The tokenizer, template and processor settings of a folder.
pub fn prompt_builder(folder: &HfFolder, config: &Config) -> Result<PromptBuilder> {
    let tokenizer = TextTokenizer::from_file(&folder.path("tokenizer.json"))?;
    let template = ChatTemplate::load(folder)?;
    let image_config = ImageProcessorConfig::load(folder)?;
    PromptBuilder::new(tokenizer, template, image_config, config).map_err(|e| Error::BadConfig {
        path: folder.dir().to_path_buf(),
        message: e.to_string(),
    })
}

impl Qwen2_5VlModel {
    /// Loads every file of the folder; errors name the file and key at fault.
    pub fn load(folder: &HfFolder, options: &LoadOptions) -> Result<Self> {
        let config = Config::from_json(&folder.json("config.json")?)?;
        let names = folder.tensor_names()?;
        let layout = TensorLayout::detect(&names)?;
        let dtype = match options.dtype {
            Some(d) => d,
            None => auto_dtype(folder)?,
        };
        let vb = folder.var_builder(dtype, &options.device)?;
        let model = Qwen2_5Vl::load(&vb, &config, layout).map_err(|e| Error::BadFile {
            path: folder.dir().to_path_buf(),
            message: format!("weights do not fit config.json: {e}"),
        })?;
        let prompts = prompt_builder(folder, &config)?;
        let generation = generation_defaults(folder, &config, &prompts.tokenizer)?;
        Ok(Qwen2_5VlModel {
            model,
            prompts,
            generation,
            device: options.device.clone(),
            dtype,
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &Config {
        &self.model.config
    }
}

impl VisionLanguageModel for Qwen2_5VlModel {
    fn architecture(&self) -> &str {
        "qwen2_5_vl"
    }

    fn tokenizer(&self) -> &TextTokenizer {
        &self.prompts.tokenizer
    }

    fn prepare(&self, image: &image::RgbImage, prompt: &str) -> Result<Prompt> {
        self.prompts.prepare(image, prompt)
    }

    fn start(&self, prompt: &Prompt) -> Result<Box<dyn Session + '_>> {
        start_session(&self.model, prompt, &self.device)
    }

    fn generation_config(&self) -> &GenerationConfig {
        &self.generation
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}

/// A Qwen2.5-VL decoding session.
struct QwenSession<'a> {
    model: &'a Qwen2_5Vl,
    cache: KvCache,
    /// Added to the cache length to get the next text position (`rope_deltas`).
    delta: i64,
    logits: Tensor,
}

impl Session for QwenSession<'_> {
    fn logits(&self) -> &Tensor {
        &self.logits
    }

    fn feed(&mut self, tokens: &[u32]) -> Result<()> {
        let b = self.logits.dim(0)?;
        if tokens.len() != b {
            return Err(Error::Input(format!(
                "{} tokens for a batch of {b}",
                tokens.len()
            )));
        }
        let position = self.cache.len() as i64 + self.delta;
        let ids = Tensor::new(tokens, self.logits.device())?.unsqueeze(1)?;
        let embeds = self.model.text.embed(&ids)?;
        let positions = vec![vec![[position; 3]]; b];
        let hidden =
            self.model
                .text
                .forward(&embeds, &positions, Some(&mut self.cache), Mode::Infer)?;
        self.logits = self.model.text.logits(&hidden.squeeze(1)?)?;
        Ok(())
    }

    fn fork(&self, n: usize) -> Result<Box<dyn Session + '_>> {
        Ok(Box::new(QwenSession {
            model: self.model,
            cache: self.cache.repeat_batch(n)?,
            delta: self.delta,
            logits: self.logits.repeat((n, 1))?,
        }))
    }

    fn batch(&self) -> usize {
        self.logits.dim(0).unwrap_or(0)
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

    #[test]
    fn config_json_round_trips() {
        let folder = crate::hf::HfFolder::open(
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../fixtures/qwen/flat-window112-tied"),
        )
        .unwrap();
        let config = Config::from_json(&folder.json("config.json").unwrap()).unwrap();
        let again = Config::from_json(&JsonFile {
            path: "config.json".into(),
            root: config.to_json(),
        })
        .unwrap();
        assert_eq!(config, again);
    }

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
