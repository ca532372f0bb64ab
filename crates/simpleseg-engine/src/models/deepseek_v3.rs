//! DeepSeek-V3's language model (Kimi-VL's Moonlight), as transformers' `DeepseekV3` runs it.
//!
//! - Multi-head latent attention: queries from `q_proj` (or the `q_a`/`q_b` low-rank pair);
//!   keys and values from a compressed latent `c = kv_a_layernorm(kv_a_proj_with_mqa(x))`
//!   (`kv_a_layernorm` eps 1e-6, as the original code has it) and one rotary key `k_pe` shared by
//!   the heads. The cache keeps `c` and the rotated `k_pe` only. A decoding step attends on
//!   them directly: `kv_b_proj` is split into its key and value halves and folded into the query
//!   and the output ("absorbed"), so a step costs the latent's width per cached position, not
//!   every head's keys and values; on the CPU the weights and the cache are read in place
//!   ([`latent_attention`]). A prompt expands every head's keys and values from the
//!   latent instead, as the reference does, which costs less than half the absorbed form's
//!   multiply-adds at a prompt's length; the form with fewer is chosen per call. A BF16 prompt
//!   on AMX tiles expands them with a BF16 `kv_b_proj` product and attends through the fused
//!   causal kernel, as the reference's BF16 model computes it; elsewhere attention runs in f32.
//! - Rotary embeddings on interleaved pairs (`rope_interleave`), plain 1D positions, no scaling.
//! - MLPs: dense SwiGLU in the first `first_k_dense_replace` layers; then mixtures of experts:
//!   sigmoid scores, the top-k chosen by score + `e_score_correction_bias` (within the best
//!   `topk_group` of `n_group` groups), weighted by their unbiased scores renormalized and
//!   multiplied by `routed_scaling_factor`; only the chosen experts run; plus shared experts.

use candle_core::{DType, Device, Module, Result as CResult, Tensor, D};
use serde::Deserialize;

use crate::io::hf::OneOrMany;
use crate::io::weights::Weights;
use crate::layers::linear::{bf16_tensor, with_bf16_bits};
use crate::layers::{
    add, causal_attention_by_position, causal_mask, forward_batch, forward_each, gated,
    gated_batch, softmax_last_dim, Embedding, Linear, Mode, RmsNorm,
};
use crate::runtime::kv_cache::KvCache;
use crate::runtime::session::StepGroup;
use simpleseg_kernels::latent_attention;

/// The language model (`text_config`, `model_type: deepseek_v3`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// The dense layers' MLP width.
    pub intermediate_size: usize,
    /// One routed expert's MLP width.
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub n_shared_experts: usize,
    #[serde(default)]
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    #[serde(default = "one")]
    pub routed_scaling_factor: f64,
    #[serde(default = "one_usize")]
    pub n_group: usize,
    #[serde(default = "one_usize")]
    pub topk_group: usize,
    #[serde(default = "yes")]
    pub norm_topk_prob: bool,
    #[serde(default = "sigmoid")]
    pub scoring_func: String,
    #[serde(default = "noaux_tc")]
    pub topk_method: String,
    #[serde(default)]
    pub first_k_dense_replace: usize,
    #[serde(default = "one_usize")]
    pub moe_layer_freq: usize,
    pub kv_lora_rank: usize,
    pub q_lora_rank: Option<usize>,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub rms_norm_eps: f64,
    /// The longest sequence the model was trained on (DeepSeek-V3's default when absent).
    #[serde(default = "max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "rope_theta")]
    pub rope_theta: f64,
    /// DeepSeek lays the rotary dimensions out in interleaved pairs.
    #[serde(default = "yes")]
    pub rope_interleave: bool,
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "silu_name")]
    pub hidden_act: String,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub eos_token_id: Option<OneOrMany>,
}

fn one() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn sigmoid() -> String {
    "sigmoid".into()
}
fn noaux_tc() -> String {
    "noaux_tc".into()
}
fn silu_name() -> String {
    "silu".into()
}
fn max_position_embeddings() -> usize {
    4096
}

fn rope_theta() -> f64 {
    10000.0
}

impl TextConfig {
    /// Whether layer `i` routes its MLP through experts (DeepSeek's `moe_layer_freq` rule).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.n_routed_experts > 0
            && i >= self.first_k_dense_replace
            && i.is_multiple_of(self.moe_layer_freq.max(1))
    }

    /// Query/key head width: the part without position plus the rotary part.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
}

/// How queries are made.
#[derive(Clone, Debug)]
enum Query {
    Full(Linear),
    LowRank {
        q_a_proj: Linear,
        q_a_layernorm: RmsNorm,
        q_b_proj: Linear,
    },
}

#[derive(Clone, Debug)]
struct Attention {
    q: Query,
    kv_a_proj_with_mqa: Linear,
    kv_a_layernorm: RmsNorm,
    /// `kv_b_proj` as stored, for a prompt's keys and values on AMX tiles
    /// ([`Attention::attend_prompt`]).
    kv_b_proj: Linear,
    /// `kv_b_proj`'s weight per head `(heads, nope + v, latent)` in the model's dtype: the
    /// key half's rows, then the value half's (decoding steps read it in place).
    kv_b: Tensor,
    /// Its halves in f32 for the tensor products ([`Attention::halves_f32`]), made the first
    /// time a call needs them (a prompt expanded in f32, a device other than the CPU).
    halves: std::sync::OnceLock<(Tensor, Tensor)>,
    o_proj: Linear,
    heads: usize,
    nope: usize,
    rope: usize,
    v_dim: usize,
    latent: usize,
    scale: f64,
    interleave: bool,
}

#[derive(Clone, Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

#[derive(Clone, Debug)]
struct Moe {
    /// Router `(experts, hidden)`, kept in f32 as the reference keeps it.
    gate: Linear,
    e_score_correction_bias: Tensor,
    experts: Vec<Mlp>,
    shared_experts: Option<Mlp>,
    top_k: usize,
    n_group: usize,
    topk_group: usize,
    norm_topk_prob: bool,
    routed_scaling_factor: f64,
}

#[derive(Clone, Debug)]
enum Ffn {
    Dense(Mlp),
    Experts(Box<Moe>),
}

#[derive(Clone, Debug)]
struct Layer {
    self_attn: Attention,
    mlp: Ffn,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

/// The language model (`language_model.model` and `language_model.lm_head`).
#[derive(Clone, Debug)]
pub struct DeepseekV3 {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    device: Device,
    inv_freq: Vec<f32>,
}

impl Mlp {
    fn load(vb: &Weights, hidden: usize, inner: usize) -> CResult<Self> {
        Ok(Mlp {
            gate_proj: Linear::load(&vb.pp("gate_proj"), hidden, inner, false)?,
            up_proj: Linear::load(&vb.pp("up_proj"), hidden, inner, false)?,
            down_proj: Linear::load(&vb.pp("down_proj"), inner, hidden, false)?,
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        self.down_proj
            .forward(&gated(&self.gate_proj, &self.up_proj, x)?)
    }
}

impl Moe {
    /// The experts each token goes to and their weights, `top_k` per token.
    fn route(&self, x: &Tensor) -> CResult<Vec<Vec<(usize, f32)>>> {
        let logits = self.gate.forward(&x.to_dtype(DType::F32)?)?;
        let scores: Vec<Vec<f32>> = candle_nn::ops::sigmoid(&logits)?.to_vec2()?;
        let bias: Vec<f32> = self.e_score_correction_bias.to_vec1()?;
        let experts = bias.len();
        let per_group = experts / self.n_group;
        Ok(scores
            .iter()
            .map(|s| {
                let choice: Vec<f32> = s.iter().zip(&bias).map(|(a, b)| a + b).collect();
                // Groups ranked by the sum of their two best choice scores.
                let mut allowed = vec![true; experts];
                if self.n_group > 1 {
                    let mut groups: Vec<(usize, f32)> = (0..self.n_group)
                        .map(|g| {
                            let mut top: Vec<f32> =
                                choice[g * per_group..(g + 1) * per_group].to_vec();
                            top.sort_by(|a, b| b.total_cmp(a));
                            (g, top.iter().take(2).sum())
                        })
                        .collect();
                    groups.sort_by(|a, b| b.1.total_cmp(&a.1));
                    allowed = vec![false; experts];
                    for &(g, _) in groups.iter().take(self.topk_group) {
                        allowed[g * per_group..(g + 1) * per_group].fill(true);
                    }
                }
                let mut order: Vec<usize> = (0..experts).filter(|&e| allowed[e]).collect();
                order.sort_by(|&a, &b| choice[b].total_cmp(&choice[a]).then(a.cmp(&b)));
                order.truncate(self.top_k);
                let mut weights: Vec<f32> = order.iter().map(|&e| s[e]).collect();
                if self.norm_topk_prob {
                    let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
                    weights.iter_mut().for_each(|w| *w /= sum);
                }
                let scale = self.routed_scaling_factor as f32;
                order
                    .into_iter()
                    .zip(weights)
                    .map(|(e, w)| (e, w * scale))
                    .collect()
            })
            .collect())
    }

    /// `x`: `(tokens, hidden)`.
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let routes = self.route(x)?;
        let device = x.device();
        let (tokens, hidden) = x.dims2()?;
        let mut chosen = Vec::new();
        for (e, expert) in self.experts.iter().enumerate() {
            let (rows, weights): (Vec<u32>, Vec<f32>) = routes
                .iter()
                .enumerate()
                .filter_map(|(t, r)| r.iter().find(|(x, _)| *x == e).map(|(_, w)| (t as u32, *w)))
                .unzip();
            if rows.is_empty() {
                continue;
            }
            let index = Tensor::new(rows.as_slice(), device)?;
            let input = x.index_select(&index, 0)?;
            let weights = Tensor::from_vec(weights, (rows.len(), 1), device)?;
            chosen.push((expert, index, weights, input));
        }
        // The chosen experts' (and the shared experts') gate and up projections in one batch,
        // then their down projections in another: decoding runs two parallel passes per layer
        // instead of three per expert.
        let shared = self.shared_experts.as_ref().map(|s| (s, x));
        let mlps: Vec<(&Mlp, &Tensor)> = chosen
            .iter()
            .map(|(expert, _, _, input)| (*expert, input))
            .chain(shared)
            .collect();
        let gate_up: Vec<(&Linear, &Linear, &Tensor)> = mlps
            .iter()
            .map(|&(mlp, input)| (&mlp.gate_proj, &mlp.up_proj, input))
            .collect();
        let inner = gated_batch(&gate_up)?;
        let down: Vec<(&Linear, &Tensor)> = mlps
            .iter()
            .zip(&inner)
            .map(|(&(mlp, _), h)| (&mlp.down_proj, h))
            .collect();
        let mut outputs = forward_batch(&down)?;
        let shared_out = match shared {
            Some(_) => outputs.pop(),
            None => None,
        };
        let routed: Vec<(&Tensor, &Tensor)> = chosen
            .iter()
            .map(|(_, index, weights, _)| (index, weights))
            .collect();
        let out = match combine_on_cpu(&routed, &outputs, tokens, hidden)? {
            Some(out) => out,
            None => combine(&routed, &outputs, tokens, hidden, device)?,
        };
        let out = out.to_dtype(x.dtype())?;
        match shared_out {
            Some(shared) => out + shared,
            None => Ok(out),
        }
    }
}

/// The chosen experts' outputs weighted and summed per token in f32, expert by expert in
/// order, as the reference's `index_add` sums them (each product rounded, then added: the same
/// bits), tokens in parallel and in place: the reference's form made a new `(tokens, hidden)`
/// tensor per expert. The outputs are read where they lie (BF16 widened as each is used,
/// exactly as a conversion to f32 would: converting them first took a 467-token prompt's
/// mixture 25-30 ms of its ~200, on one thread). `None` outside the CPU or inside a training
/// graph.
fn combine_on_cpu(
    chosen: &[(&Tensor, &Tensor)],
    outputs: &[Tensor],
    tokens: usize,
    hidden: usize,
) -> CResult<Option<Tensor>> {
    use candle_core::{CpuStorage, Storage};
    use rayon::prelude::*;

    /// An output's values as they are stored.
    #[derive(Clone, Copy)]
    enum Values<'a> {
        Bf16(&'a [half::bf16]),
        F32(&'a [f32]),
    }

    if outputs.iter().any(|y| !y.device().is_cpu() || y.track_op()) {
        return Ok(None);
    }
    // Per token, its (expert, row, weight) in expert order.
    let mut routes: Vec<Vec<(usize, usize, f32)>> = vec![Vec::new(); tokens];
    for (c, (index, weights)) in chosen.iter().enumerate() {
        let rows: Vec<u32> = index.to_vec1()?;
        let weights: Vec<f32> = weights.flatten_all()?.to_vec1()?;
        for (r, (&t, w)) in rows.iter().zip(weights).enumerate() {
            routes[t as usize].push((c, r, w));
        }
    }
    let outputs = outputs
        .iter()
        .map(|y| y.contiguous())
        .collect::<CResult<Vec<_>>>()?;
    let stored: Vec<_> = outputs.iter().map(|y| y.storage_and_layout()).collect();
    let values = stored
        .iter()
        .map(|(storage, layout)| {
            let (start, end) = layout.contiguous_offsets()?;
            match &**storage {
                Storage::Cpu(CpuStorage::BF16(v)) => Some(Values::Bf16(&v[start..end])),
                Storage::Cpu(CpuStorage::F32(v)) => Some(Values::F32(&v[start..end])),
                _ => None,
            }
        })
        .collect::<Option<Vec<_>>>();
    let Some(values) = values else {
        return Ok(None);
    };
    let mut out = vec![0f32; tokens * hidden];
    out.par_chunks_mut(hidden.max(1))
        .zip(&routes)
        .for_each(|(row, routes)| {
            for &(c, r, w) in routes {
                let at = r * hidden..(r + 1) * hidden;
                match values[c] {
                    Values::Bf16(y) => {
                        for (o, y) in row.iter_mut().zip(&y[at]) {
                            *o += y.to_f32() * w;
                        }
                    }
                    Values::F32(y) => {
                        for (o, y) in row.iter_mut().zip(&y[at]) {
                            *o += y * w;
                        }
                    }
                }
            }
        });
    drop(stored);
    Tensor::from_vec(out, (tokens, hidden), outputs[0].device()).map(Some)
}

/// The chosen experts' outputs (`(index, weights)` of each: the tokens it took, `(rows, 1)`
/// weights) weighted and summed per token in f32, expert by expert, as the reference sums
/// them (`index_add`).
fn combine(
    chosen: &[(&Tensor, &Tensor)],
    outputs: &[Tensor],
    tokens: usize,
    hidden: usize,
    device: &Device,
) -> CResult<Tensor> {
    let mut out = Tensor::zeros((tokens, hidden), DType::F32, device)?;
    for ((index, weights), y) in chosen.iter().zip(outputs) {
        out = out.index_add(index, &y.to_dtype(DType::F32)?.broadcast_mul(weights)?, 0)?;
    }
    Ok(out)
}

impl Ffn {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        match self {
            Ffn::Dense(mlp) => mlp.forward(x),
            Ffn::Experts(moe) => {
                let dims = x.dims().to_vec();
                let flat = x.reshape(((), dims[dims.len() - 1]))?;
                moe.forward(&flat)?.reshape(dims)
            }
        }
    }
}

/// Rotary embedding of `x` `(..., seq, rope)` at angles `cos`/`sin` `(seq, rope / 2)`: on
/// interleaved pairs `(x[2i], x[2i + 1])` when `interleave` (the result holds the first members
/// then the second, as transformers lays it out), else on halves.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, interleave: bool) -> CResult<Tensor> {
    let rope = x.dim(D::Minus1)?;
    let (a, b) = if interleave {
        let dims = x.dims().to_vec();
        let mut pair_dims = dims[..dims.len() - 1].to_vec();
        pair_dims.extend([rope / 2, 2]);
        let pairs = x.reshape(pair_dims)?;
        (
            pairs.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?,
            pairs.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?,
        )
    } else {
        (
            x.narrow(D::Minus1, 0, rope / 2)?,
            x.narrow(D::Minus1, rope / 2, rope / 2)?,
        )
    };
    let first = (a.broadcast_mul(cos)? - b.broadcast_mul(sin)?)?;
    let second = (b.broadcast_mul(cos)? + a.broadcast_mul(sin)?)?;
    Tensor::cat(&[first, second], D::Minus1)
}

impl Attention {
    fn load(vb: &Weights, c: &TextConfig) -> CResult<Self> {
        let (h, heads) = (c.hidden_size, c.num_attention_heads);
        let (nope, rope, v_dim, latent) = (
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
            c.kv_lora_rank,
        );
        let q_dim = heads * (nope + rope);
        let q = match c.q_lora_rank {
            None => Query::Full(Linear::load(&vb.pp("q_proj"), h, q_dim, false)?),
            Some(rank) => Query::LowRank {
                q_a_proj: Linear::load(&vb.pp("q_a_proj"), h, rank, c.attention_bias)?,
                q_a_layernorm: RmsNorm::load(&vb.pp("q_a_layernorm"), rank, 1e-6)?,
                q_b_proj: Linear::load(&vb.pp("q_b_proj"), rank, q_dim, false)?,
            },
        };
        let kv_b = vb
            .pp("kv_b_proj")
            .get((heads * (nope + v_dim), latent), "weight")?
            .reshape((heads, nope + v_dim, latent))?;
        Ok(Attention {
            q,
            kv_a_proj_with_mqa: Linear::load(
                &vb.pp("kv_a_proj_with_mqa"),
                h,
                latent + rope,
                c.attention_bias,
            )?,
            kv_a_layernorm: RmsNorm::load(&vb.pp("kv_a_layernorm"), latent, 1e-6)?,
            kv_b_proj: Linear::load(&vb.pp("kv_b_proj"), latent, heads * (nope + v_dim), false)?,
            kv_b: kv_b.contiguous()?,
            halves: std::sync::OnceLock::new(),
            o_proj: Linear::load(&vb.pp("o_proj"), heads * v_dim, h, c.attention_bias)?,
            heads,
            nope,
            rope,
            v_dim,
            latent,
            scale: ((nope + rope) as f64).powf(-0.5),
            interleave: c.rope_interleave,
        })
    }

    /// Queries `(b, heads, s, nope)` and `(b, heads, s, rope)`, the latent `(b, 1, s, latent)`
    /// and the rotary key `(b, 1, s, rope)`, before rotation.
    fn project(&self, x: &Tensor) -> CResult<(Tensor, Tensor, Tensor)> {
        let (b, s, _) = x.dims3()?;
        let first = match &self.q {
            Query::Full(p) => p,
            Query::LowRank { q_a_proj, .. } => q_a_proj,
        };
        let [q, kv] = forward_each([first, &self.kv_a_proj_with_mqa], x)?;
        let q = match &self.q {
            Query::Full(_) => q,
            Query::LowRank {
                q_a_layernorm,
                q_b_proj,
                ..
            } => q_b_proj.forward(&q_a_layernorm.forward(&q, Mode::Infer)?)?,
        };
        let q = q
            .reshape((b, s, self.heads, self.nope + self.rope))?
            .transpose(1, 2)?;
        let c = self
            .kv_a_layernorm
            .forward(&kv.narrow(D::Minus1, 0, self.latent)?, Mode::Infer)?;
        let k_pe = kv.narrow(D::Minus1, self.latent, self.rope)?;
        Ok((q, c.unsqueeze(1)?, k_pe.unsqueeze(1)?))
    }

    /// Rotation, the cache, and attention over the latent for one group of rows:
    /// `(b, s, heads * v_dim)` before `o_proj`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        (q, c, k_pe): (Tensor, Tensor, Tensor),
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        slot: &mut Option<(Tensor, Tensor)>,
    ) -> CResult<Tensor> {
        let b = q.dim(0)?;
        let dtype = c.dtype();
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let q_pe = q.narrow(D::Minus1, self.nope, self.rope)?;
        let q_pe = rotate(&f32(&q_pe)?, cos, sin, self.interleave)?;
        let k_pe = rotate(&f32(&k_pe)?, cos, sin, self.interleave)?.to_dtype(dtype)?;
        // A prompt with nothing cached before it, under its causal mask.
        let prompt = slot.is_none() && mask.is_some() && b == 1;
        let (c_all, k_pe_all) = crate::runtime::kv_cache::append(slot, c.clone(), k_pe.clone())?;
        if prompt {
            if let Some(o) = self.attend_prompt(&q, &q_pe, &c, &k_pe)? {
                return Ok(o);
            }
        }
        let q_nope = f32(&q.narrow(D::Minus1, 0, self.nope)?)?;
        let (s, t) = (q_nope.dim(2)?, c_all.dim(2)?);
        let expand = self.expanding_is_cheaper(s, t);
        let in_place = match expand {
            true => None,
            false => self.attend_in_place(&q_nope, &q_pe, &c_all, &k_pe_all, mask)?,
        };
        let o = match in_place {
            Some(o) => o,
            None => {
                let (c_all, k_pe_all) = (f32(&c_all)?.squeeze(1)?, f32(&k_pe_all)?.squeeze(1)?);
                match expand {
                    true => self.attend_expanded(&q_nope, &q_pe, &c_all, &k_pe_all, mask)?,
                    false => self.attend_absorbed(&q_nope, &q_pe, &c_all, &k_pe_all, mask)?,
                }
            }
        };
        o.transpose(1, 2)?
            .reshape((b, s, self.heads * self.v_dim))?
            .to_dtype(dtype)
    }
}

impl Attention {
    /// Whether `s` queries over `t` cached positions cost fewer multiply-adds with every head's
    /// keys and values expanded from the latent cache (as transformers runs MLA) than in the
    /// absorbed form. A prompt's prefill is (about 2.3x fewer at Kimi-VL's sizes: the scores
    /// and the weighted sum run over 192 and 128 values per head instead of the latent's
    /// 576 and 512); a decoding step, which would expand the whole cache for one row, is not.
    /// A tie goes to the expanded form, the reference's own association of the products.
    fn expanding_is_cheaper(&self, s: usize, t: usize) -> bool {
        let (h, latent) = (self.heads, self.latent);
        let expand = t * latent * h * (self.nope + self.v_dim)
            + s * t * h * (self.nope + self.rope + self.v_dim);
        let absorbed =
            s * h * latent * (self.nope + self.v_dim) + s * t * h * (2 * latent + self.rope);
        expand <= absorbed
    }

    /// `kv_b_proj`'s halves per head in f32: keys `(heads, nope, latent)` and values
    /// transposed `(heads, latent, v)`, converted once and kept.
    fn halves_f32(&self) -> CResult<(Tensor, Tensor)> {
        if let Some(halves) = self.halves.get() {
            return Ok(halves.clone());
        }
        let kv_b = self.kv_b.to_dtype(DType::F32)?;
        let w_uk = kv_b.narrow(1, 0, self.nope)?.contiguous()?;
        let w_uv_t = kv_b
            .narrow(1, self.nope, self.v_dim)?
            .transpose(1, 2)?
            .contiguous()?;
        Ok(self.halves.get_or_init(|| (w_uk, w_uv_t)).clone())
    }

    /// [`Self::attend_absorbed`] on the CPU with `kv_b` and the cache read in place
    /// ([`latent_attention::absorbed`]): no f32 copies of the weights or the cache. `q_nope`
    /// and `q_pe` `(b, heads, s, ·)` in f32, the cache `(b, 1, t, ·)` as stored, in the
    /// weights' dtype. `None` where it does not apply (another device or dtype), for the
    /// tensor products to run instead.
    fn attend_in_place(
        &self,
        q_nope: &Tensor,
        q_pe: &Tensor,
        c_all: &Tensor,
        k_pe_all: &Tensor,
        mask: Option<&Tensor>,
    ) -> CResult<Option<Tensor>> {
        let (b, h, s, _) = q_nope.dims4()?;
        let t = c_all.dim(2)?;
        let dtype = self.kv_b.dtype();
        if !c_all.device().is_cpu()
            || ![DType::BF16, DType::F32].contains(&dtype)
            || [c_all, k_pe_all].iter().any(|x| x.dtype() != dtype)
        {
            return Ok(None);
        }
        let values = |x: &Tensor| -> CResult<Vec<f32>> { x.contiguous()?.flatten_all()?.to_vec1() };
        let (q_nope, q_rope) = (values(q_nope)?, values(q_pe)?);
        let mask = mask
            .map(|m| values(&m.broadcast_as((b, 1, s, t))?.to_dtype(DType::F32)?))
            .transpose()?;
        let (c_all, k_pe_all) = (c_all.contiguous()?, k_pe_all.contiguous()?);
        let sizes = latent_attention::Sizes {
            heads: h,
            nope: self.nope,
            rope: self.rope,
            v_dim: self.v_dim,
            latent: self.latent,
            scale: self.scale as f32,
        };
        let queries = (b, s, t, &q_nope[..], &q_rope[..], mask.as_deref());
        let out = match dtype {
            DType::BF16 => {
                absorbed_in_place::<half::bf16>(&sizes, &self.kv_b, &c_all, &k_pe_all, queries)?
            }
            _ => absorbed_in_place::<f32>(&sizes, &self.kv_b, &c_all, &k_pe_all, queries)?,
        };
        out.map(|o| Tensor::from_vec(o, (b, h, s, self.v_dim), c_all.device()))
            .transpose()
    }

    /// [`Self::attend`]'s attention in the absorbed form: `q_nope` `(b, heads, s, nope)` and
    /// `q_pe` (rotated) in f32, the latent cache `(b, t, latent)` and the rotary keys
    /// `(b, t, rope)` in f32; the output `(b, heads, s, v_dim)` in f32.
    fn attend_absorbed(
        &self,
        q_nope: &Tensor,
        q_pe: &Tensor,
        c_all: &Tensor,
        k_pe_all: &Tensor,
        mask: Option<&Tensor>,
    ) -> CResult<Tensor> {
        let (b, h, s, _) = q_nope.dims4()?;
        let t = c_all.dim(1)?;
        // Every head attends over the one shared latent cache. Batched products broadcast
        // over heads would copy the cache once per head at every step, so the products are
        // laid out per head (against kv_b's halves) or with heads folded into the rows
        // (against the cache).
        // (b, h, s, d) <-> (h, b * s, d)
        let per_head = |x: &Tensor| -> CResult<Tensor> {
            let d = x.dim(3)?;
            x.transpose(0, 1)?.contiguous()?.reshape((h, b * s, d))
        };
        let from_per_head = |x: Tensor| -> CResult<Tensor> {
            let d = x.dim(2)?;
            x.reshape((h, b, s, d))?.transpose(0, 1)
        };
        // (b, h, s, d) -> (b, h * s, d)
        let rows = |x: &Tensor| -> CResult<Tensor> {
            let d = x.dim(3)?;
            x.contiguous()?.reshape((b, h * s, d))
        };
        // Query folded through the key half of kv_b: (b, heads, s, latent).
        let (w_uk, w_uv_t) = self.halves_f32()?;
        let q_latent = from_per_head(per_head(q_nope)?.matmul(&w_uk)?)?;
        let scores = (rows(&q_latent)?.matmul(&c_all.t()?)?
            + rows(q_pe)?.matmul(&k_pe_all.t()?)?)?
        .reshape((b, h, s, t))?;
        let p = self.attention_weights(scores, mask)?;
        // Attention over the latent, then the value half of kv_b.
        let o_latent = p
            .reshape((b, h * s, t))?
            .matmul(c_all)?
            .reshape((b, h, s, self.latent))?;
        from_per_head(per_head(&o_latent)?.matmul(&w_uv_t)?)
    }

    /// A prompt's causal attention (nothing cached before it) as the reference computes it in
    /// BF16: the keys' and values' heads expanded from the latent by `kv_b_proj` (a BF16
    /// product, as the reference's), then fused causal attention on AMX tiles
    /// ([`causal_attention_by_position`]: f32 scores and softmax, the weights rounded to BF16)
    /// over query and key heads of `nope + rope` values (the rotary key shared by every head),
    /// the values zero-padded to that width. The operands are laid out in one parallel pass
    /// over positions (candle's concatenations and padding of the heads took 18 of a layer's
    /// 37 ms). Inputs as [`Self::attend`] has them: the query `(1, heads, s, nope + rope)`
    /// BF16 (its rotary part unused), `q_pe` `(1, heads, s, rope)` rotated in f32, the latent
    /// `(1, 1, s, latent)` and the rotated key `(1, 1, s, rope)` BF16. Returns `(1, s, heads *
    /// v_dim)`; `None` where it does not apply (not BF16, a CPU without AMX tiles, values
    /// wider than keys). On 2 Xeon cores a 467-token Kimi-VL prompt's layer took 50-95 ms in
    /// the f32 form.
    fn attend_prompt(
        &self,
        q: &Tensor,
        q_pe: &Tensor,
        c: &Tensor,
        k_pe: &Tensor,
    ) -> CResult<Option<Tensor>> {
        use rayon::prelude::*;

        let (h, nope, rope, vd) = (self.heads, self.nope, self.rope, self.v_dim);
        let d = nope + rope;
        let bf16 = DType::BF16;
        if [q, c, k_pe].iter().any(|t| t.dtype() != bf16) || vd > d || !c.device().is_cpu() {
            return Ok(None);
        }
        let s = c.dim(2)?;
        let kv = self.kv_b_proj.forward(&c.squeeze(1)?)?.contiguous()?;
        // The projection's output by position, `(s, heads, d)`: contiguous as written.
        let q = q.transpose(1, 2)?.contiguous()?;
        let k_pe = k_pe.contiguous()?;
        let q_pe: Vec<f32> = q_pe.flatten_all()?.to_vec1()?;
        let kw = nope + vd;
        let (mut qs, mut ks, mut vs) = (
            vec![0u16; s * h * d],
            vec![0u16; s * h * d],
            vec![0u16; s * h * d],
        );
        let laid_out = with_bf16_bits(&q, |q| {
            with_bf16_bits(&kv, |kv| {
                with_bf16_bits(&k_pe, |k_pe| {
                    qs.par_chunks_mut(h * d)
                        .zip(ks.par_chunks_mut(h * d))
                        .zip(vs.par_chunks_mut(h * d))
                        .enumerate()
                        .for_each(|(t, ((qo, ko), vo))| {
                            for head in 0..h {
                                let at = head * d;
                                let from = t * h * d + at;
                                qo[at..at + nope].copy_from_slice(&q[from..from + nope]);
                                let pe = &q_pe[(head * s + t) * rope..][..rope];
                                for (o, v) in qo[at + nope..at + d].iter_mut().zip(pe) {
                                    *o = half::bf16::from_f32(*v).to_bits();
                                }
                                let kv = &kv[(t * h + head) * kw..][..kw];
                                ko[at..at + nope].copy_from_slice(&kv[..nope]);
                                ko[at + nope..at + d].copy_from_slice(&k_pe[t * rope..][..rope]);
                                vo[at..at + vd].copy_from_slice(&kv[nope..]);
                            }
                        })
                })
            })
        });
        if laid_out.flatten().flatten().is_none() {
            return Ok(None);
        }
        let Some(o) = causal_attention_by_position(&qs, &ks, &vs, s, h, d, self.scale) else {
            return Ok(None);
        };
        let mut out = vec![0u16; s * h * vd];
        out.par_chunks_mut(h * vd)
            .zip(o.par_chunks(h * d))
            .for_each(|(out, o)| {
                for (out, o) in out.chunks_mut(vd).zip(o.chunks(d)) {
                    out.copy_from_slice(&o[..vd]);
                }
            });
        bf16_tensor(out, (1, s, h * vd), c.device()).map(Some)
    }

    /// Softmax of scaled, masked scores `(b, heads, s, t)`.
    fn attention_weights(&self, scores: Tensor, mask: Option<&Tensor>) -> CResult<Tensor> {
        let scores = (scores * self.scale)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(&m.to_dtype(DType::F32)?)?,
            None => scores,
        };
        softmax_last_dim(&scores, Mode::Infer)
    }

    /// [`Self::attend`]'s attention with keys and values expanded per head: `q_nope`
    /// `(b, heads, s, nope)` and `q_pe` (rotated) in f32, the latent cache `(b, t, latent)` and
    /// the rotary keys `(b, t, rope)` in f32, as [`Self::attend_absorbed`]'s. The same products,
    /// associated the other way (`(q W_uk) c^T = q (c W_uk^T)^T`): equal up to f32 rounding.
    fn attend_expanded(
        &self,
        q_nope: &Tensor,
        q_pe: &Tensor,
        c_all: &Tensor,
        k_pe_all: &Tensor,
        mask: Option<&Tensor>,
    ) -> CResult<Tensor> {
        let (b, h, s, _) = q_nope.dims4()?;
        let t = c_all.dim(1)?;
        let c_rows = c_all.reshape((b * t, self.latent))?;
        // Every cached position's keys and values, per head: (b, heads, t, d).
        let per_head = |x: Tensor, d: usize| -> CResult<Tensor> {
            x.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()
        };
        let (w_uk, w_uv_t) = self.halves_f32()?;
        let w_uk = w_uk.reshape((h * self.nope, self.latent))?;
        let k_nope = per_head(c_rows.matmul(&w_uk.t()?)?, self.nope)?;
        let w_uv = w_uv_t
            .transpose(0, 1)?
            .contiguous()?
            .reshape((self.latent, h * self.v_dim))?;
        let v = per_head(c_rows.matmul(&w_uv)?, self.v_dim)?;
        let scores = (q_nope.contiguous()?.matmul(&k_nope.t()?)?
            + q_pe
                .contiguous()?
                .reshape((b, h * s, self.rope))?
                .matmul(&k_pe_all.t()?)?
                .reshape((b, h, s, t))?)?;
        self.attention_weights(scores, mask)?.matmul(&v)
    }
}

/// [`latent_attention::absorbed`] over `kv_b` and the cache `(b, 1, t, ·)` read in place as
/// `T`; the queries given as `(b, s, t, q_nope, q_rope, mask)`. `None` where a tensor is not
/// a contiguous CPU tensor of `T`.
#[allow(clippy::type_complexity)]
fn absorbed_in_place<T: latent_attention::Stored + candle_core::WithDType>(
    sizes: &latent_attention::Sizes,
    kv_b: &Tensor,
    latent: &Tensor,
    k_rope: &Tensor,
    (batch, queries, positions, q_nope, q_rope, mask): (
        usize,
        usize,
        usize,
        &[f32],
        &[f32],
        Option<&[f32]>,
    ),
) -> CResult<Option<Vec<f32>>> {
    let (w, w_layout) = kv_b.storage_and_layout();
    let (c, c_layout) = latent.storage_and_layout();
    let (k, k_layout) = k_rope.storage_and_layout();
    let (Some(w), Some(c), Some(k)) = (
        cpu_values::<T>(&w, w_layout),
        cpu_values::<T>(&c, c_layout),
        cpu_values::<T>(&k, k_layout),
    ) else {
        return Ok(None);
    };
    let queries = latent_attention::Queries {
        batch,
        queries,
        positions,
        q_nope,
        q_rope,
        latent: c,
        k_rope: k,
        mask,
    };
    Ok(latent_attention::absorbed(sizes, w, &queries))
}

/// A contiguous CPU tensor's values as `T`, read in place; `None` for another device, dtype
/// or layout.
fn cpu_values<'a, T: candle_core::WithDType>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> Option<&'a [T]> {
    match (storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(cpu), Some((start, end))) => {
            cpu.as_slice::<T>().ok().map(|v| &v[start..end])
        }
        _ => None,
    }
}

impl DeepseekV3 {
    /// Loads `model.*` under `vb_model` and the head from `vb_head` (`lm_head`).
    pub(crate) fn load(vb_model: &Weights, vb_head: &Weights, c: &TextConfig) -> CResult<Self> {
        let embed_tokens = Embedding::load(vb_model, c.vocab_size, c.hidden_size, "embed_tokens")?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = vb_model.pp("layers").pp(i);
                let m = l.pp("mlp");
                let mlp = if c.is_moe_layer(i) {
                    let experts = (0..c.n_routed_experts)
                        .map(|e| {
                            Mlp::load(
                                &m.pp("experts").pp(e),
                                c.hidden_size,
                                c.moe_intermediate_size,
                            )
                        })
                        .collect::<CResult<Vec<_>>>()?;
                    let shared_experts = (c.n_shared_experts > 0)
                        .then(|| {
                            Mlp::load(
                                &m.pp("shared_experts"),
                                c.hidden_size,
                                c.moe_intermediate_size * c.n_shared_experts,
                            )
                        })
                        .transpose()?;
                    // The router stays unquantized and computes in f32, as transformers' does.
                    let router = m.pp("gate").with_dtype(DType::F32).quantized(None);
                    Ffn::Experts(Box::new(Moe {
                        gate: Linear::load(&router, c.hidden_size, c.n_routed_experts, false)?,
                        e_score_correction_bias: router
                            .get(c.n_routed_experts, "e_score_correction_bias")?,
                        experts,
                        shared_experts,
                        top_k: c.num_experts_per_tok,
                        n_group: c.n_group,
                        topk_group: c.topk_group,
                        norm_topk_prob: c.norm_topk_prob,
                        routed_scaling_factor: c.routed_scaling_factor,
                    }))
                } else {
                    Ffn::Dense(Mlp::load(&m, c.hidden_size, c.intermediate_size)?)
                };
                Ok(Layer {
                    self_attn: Attention::load(&l.pp("self_attn"), c)?,
                    mlp,
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
        let head = if c.tie_word_embeddings && !vb_head.contains("lm_head.weight") {
            vb_model.pp("embed_tokens")
        } else {
            vb_head.pp("lm_head")
        };
        let lm_head = Linear::load(&head, c.hidden_size, c.vocab_size, false)?;
        let rope = c.qk_rope_head_dim;
        let inv_freq = (0..rope)
            .step_by(2)
            .map(|i| 1.0 / (c.rope_theta.powf(i as f64 / rope as f64) as f32))
            .collect();
        Ok(DeepseekV3 {
            embed_tokens,
            norm: RmsNorm::load(&vb_model.pp("norm"), c.hidden_size, c.rms_norm_eps)?,
            layers,
            lm_head,
            device: vb_model.device().clone(),
            inv_freq,
        })
    }

    /// The device the weights are on.
    pub fn device(&self) -> Device {
        self.device.clone()
    }

    /// Token embeddings `(batch, seq, hidden)`.
    pub fn embed(&self, input_ids: &Tensor) -> CResult<Tensor> {
        input_ids.dims2()?;
        self.embed_tokens.forward(input_ids)
    }

    /// Rotary angles `(seq, rope / 2)` of positions `start..start + seq`, in f32.
    fn rotary(&self, start: usize, seq: usize, device: &Device) -> CResult<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        for p in start..start + seq {
            for f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (seq, half), device)?,
            Tensor::from_vec(sin, (seq, half), device)?,
        ))
    }

    /// Final hidden states `(1, seq, hidden)` of a prompt's embeddings, filling `cache`.
    pub fn prefill(&self, embeds: &Tensor, cache: &mut KvCache) -> CResult<Tensor> {
        let (_, s, _) = embeds.dims3()?;
        let past = cache.len();
        let device = embeds.device();
        let (cos, sin) = self.rotary(past, s, device)?;
        let mask = (s > 1)
            .then(|| causal_mask(s, past, DType::F32, device))
            .transpose()?;
        let slots = cache.slots(self.layers.len());
        let mut x = embeds.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x, Mode::Infer)?;
            let parts = layer.self_attn.project(&h)?;
            let o = layer
                .self_attn
                .attend(parts, &cos, &sin, mask.as_ref(), &mut slots[i])?;
            x = add(&x, &layer.self_attn.o_proj.forward(&o)?)?;
            let h = layer.post_attention_layernorm.forward(&x, Mode::Infer)?;
            x = add(&x, &layer.mlp.forward(&h)?)?;
        }
        self.norm.forward(&x, Mode::Infer)
    }

    /// One decoding step for rows in groups ([`StepGroup`]): `embeds` `(rows, 1, hidden)`,
    /// group after group, each group's rows at its position over its cache. The projections
    /// and experts run once over every row; attention group by group, in order.
    pub fn step(
        &self,
        embeds: &Tensor,
        caches: &mut [&mut KvCache],
        groups: &[StepGroup],
    ) -> CResult<Tensor> {
        let device = embeds.device();
        let rotary = groups
            .iter()
            .map(|g| self.rotary(g.position.max(0) as usize, 1, device))
            .collect::<CResult<Vec<_>>>()?;
        let mut slots: Vec<&mut [Option<(Tensor, Tensor)>]> = caches
            .iter_mut()
            .map(|c| c.slots(self.layers.len()))
            .collect();
        let mut x = embeds.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x, Mode::Infer)?;
            let (q, c, k_pe) = layer.self_attn.project(&h)?;
            let mut start = 0;
            let mut outputs = Vec::with_capacity(groups.len());
            for (g, group) in groups.iter().enumerate() {
                let part = |t: &Tensor| t.narrow(0, start, group.rows);
                let (cos, sin) = &rotary[g];
                outputs.push(layer.self_attn.attend(
                    (part(&q)?, part(&c)?, part(&k_pe)?),
                    cos,
                    sin,
                    None,
                    &mut slots[group.cache][i],
                )?);
                start += group.rows;
            }
            let o = Tensor::cat(&outputs, 0)?;
            x = add(&x, &layer.self_attn.o_proj.forward(&o)?)?;
            let h = layer.post_attention_layernorm.forward(&x, Mode::Infer)?;
            x = add(&x, &layer.mlp.forward(&h)?)?;
        }
        self.norm.forward(&x, Mode::Infer)
    }

    /// Logits `(..., vocab)` from hidden states.
    pub fn logits(&self, hidden: &Tensor) -> CResult<Tensor> {
        self.lm_head.forward(hidden)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::max_abs_diff;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let n = shape.iter().product::<usize>();
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let values: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// An attention layer with random weights; value heads narrower than key heads, so that a
    /// transposed or misassigned head fails on shapes or values.
    fn attention() -> Attention {
        attention_in(DType::F32)
    }

    /// [`attention`]'s layer with its weights in `dtype`.
    fn attention_in(dtype: DType) -> Attention {
        let config: TextConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 16, "hidden_size": 24, "intermediate_size": 8,
            "moe_intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 3,
            "num_experts_per_tok": 1, "kv_lora_rank": 20, "q_lora_rank": null,
            "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6,
            "rms_norm_eps": 1e-6, "rope_scaling": null, "eos_token_id": null
        }))
        .unwrap();
        let tensors = [
            ("q_proj.weight", vec![3 * 12, 24]),
            ("kv_a_proj_with_mqa.weight", vec![20 + 4, 24]),
            ("kv_a_layernorm.weight", vec![20]),
            ("kv_b_proj.weight", vec![3 * (8 + 6), 20]),
            ("o_proj.weight", vec![24, 3 * 6]),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| (name.to_string(), random(&shape, i as u64 + 1)))
        .collect();
        let vb = candle_nn::VarBuilder::from_tensors(tensors, dtype, &Device::Cpu);
        Attention::load(&Weights::from_var_builder(vb), &config).unwrap()
    }

    /// The mixture's sum of its experts' outputs in place equals the reference's expert by
    /// expert `index_add`, bit for bit, for BF16 and f32 outputs.
    #[test]
    fn combined_outputs_equal_the_reference_sum() {
        let dev = Device::Cpu;
        let (tokens, hidden) = (7, 20);
        // Three experts: the tokens each took, and their weights.
        let taken: [&[u32]; 3] = [&[0, 2, 3, 6], &[1, 2, 5], &[0, 1, 3, 4, 5, 6]];
        let chosen: Vec<(Tensor, Tensor)> = taken
            .iter()
            .map(|rows| {
                let weights = Tensor::rand(0f32, 1.0, (rows.len(), 1), &dev).unwrap();
                (Tensor::new(*rows, &dev).unwrap(), weights)
            })
            .collect();
        let routed: Vec<(&Tensor, &Tensor)> = chosen.iter().map(|(i, w)| (i, w)).collect();
        for dtype in [DType::BF16, DType::F32] {
            let outputs: Vec<Tensor> = taken
                .iter()
                .map(|rows| {
                    Tensor::randn(0f32, 1.0, (rows.len(), hidden), &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                })
                .collect();
            let got = combine_on_cpu(&routed, &outputs, tokens, hidden)
                .unwrap()
                .expect("on the CPU");
            let want = combine(&routed, &outputs, tokens, hidden, &dev).unwrap();
            let values = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
            assert_eq!(values(&got), values(&want), "{dtype:?}");
        }
    }

    /// A BF16 prompt's fused attention on AMX tiles (keys and values expanded by a BF16
    /// product, BF16 weights) agrees with the f32 expanded form within BF16's rounding.
    #[test]
    fn a_prompts_fused_attention_agrees_with_the_f32_form() {
        if !simpleseg_kernels::bf16_gemm::amx() {
            eprintln!(
                "skipped: the fused prompt attention runs on AMX tiles, which this CPU lacks"
            );
            return;
        }
        let a = attention_in(DType::BF16);
        let s = 37;
        let bf16 = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
        // The query as the projection gives it, `(1, heads, s, nope + rope)` over positions
        // (its rotary part is replaced by the rotated one), and the rotated `q_pe` in f32.
        let q = bf16(random(&[1, s, 3, 12], 21)).transpose(1, 2).unwrap();
        let q_nope = q.narrow(3, 0, 8).unwrap();
        let q_pe = random(&[1, 3, s, 4], 22);
        let c = bf16(random(&[1, 1, s, 20], 23));
        let k_pe = bf16(random(&[1, 1, s, 4], 24));
        let fused = a
            .attend_prompt(&q, &q_pe, &c, &k_pe)
            .unwrap()
            .expect("runs on AMX");
        assert_eq!(fused.dims(), &[1, s, 3 * 6]);
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let mask = causal_mask(s, 0, DType::F32, &Device::Cpu).unwrap();
        // The f32 expanded form on the given rotated rotary parts, laid out as `attend`'s.
        let expanded = |q_pe: &Tensor, k_pe: &Tensor| {
            a.attend_expanded(
                &f32(&q_nope),
                q_pe,
                &f32(&c.squeeze(1).unwrap()),
                &f32(&k_pe.squeeze(1).unwrap()),
                Some(&mask),
            )
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((1, s, 3 * 6))
            .unwrap()
        };
        let want = expanded(&q_pe, &k_pe);
        let largest: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        let difference = max_abs_diff(&fused, &want).unwrap();
        assert!(largest > 0.1, "{largest}");
        assert!(difference <= 1e-2 * largest, "{difference} of {largest}");
        // Through `attend`, as a prefill calls it: the rotations (the query's rotary part as
        // the projection gives it), the cache filled, the same output.
        let angles: Vec<f32> = (0..s * 2)
            .map(|i| (i / 2) as f32 * [1.0, 0.1][i % 2])
            .collect();
        let table = |f: fn(f32) -> f32| {
            let values = angles.iter().map(|&a| f(a)).collect::<Vec<_>>();
            Tensor::from_vec(values, (s, 2), &Device::Cpu).unwrap()
        };
        let (cos, sin) = (table(f32::cos), table(f32::sin));
        let mut slot = None;
        let through = a
            .attend(
                (q.clone(), c.clone(), k_pe.clone()),
                &cos,
                &sin,
                Some(&mask),
                &mut slot,
            )
            .unwrap();
        assert!(
            slot.is_some(),
            "the prompt's latent and rotary key are cached"
        );
        let q_pe = rotate(&f32(&q.narrow(3, 8, 4).unwrap()), &cos, &sin, a.interleave).unwrap();
        let k_pe = rotate(&f32(&k_pe), &cos, &sin, a.interleave)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let difference = max_abs_diff(&through, &expanded(&q_pe, &k_pe)).unwrap();
        assert!(
            difference <= 1e-2 * largest,
            "through attend: {difference} of {largest}"
        );
    }

    #[test]
    fn expanded_and_absorbed_attention_agree() {
        let a = attention();
        // Two rows, five queries after four cached positions, causal mask.
        let (b, s, t) = (2, 5, 9);
        let q_nope = random(&[b, 3, s, 8], 11);
        let q_pe = random(&[b, 3, s, 4], 12);
        let c_all = random(&[b, t, 20], 13);
        let k_pe_all = random(&[b, t, 4], 14);
        let mask = causal_mask(s, t - s, DType::F32, &Device::Cpu).unwrap();
        for mask in [None, Some(&mask)] {
            let absorbed = a
                .attend_absorbed(&q_nope, &q_pe, &c_all, &k_pe_all, mask)
                .unwrap();
            let expanded = a
                .attend_expanded(&q_nope, &q_pe, &c_all, &k_pe_all, mask)
                .unwrap();
            assert_eq!(absorbed.dims(), &[b, 3, s, 6]);
            assert_eq!(expanded.dims(), absorbed.dims());
            let largest = absorbed.abs().unwrap().max_all().unwrap();
            let difference = (expanded - &absorbed)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            let (largest, difference) = (
                largest.to_scalar::<f32>().unwrap(),
                difference.to_scalar::<f32>().unwrap(),
            );
            assert!(largest > 0.1, "{largest}");
            assert!(difference <= 1e-5 * largest, "{difference} of {largest}");
        }
    }

    /// Steps read in place (weights and cache as stored) agree with the absorbed form's
    /// tensor products in f32, for f32 and BF16 layers, one row and several, with a mask.
    #[test]
    fn in_place_steps_equal_the_absorbed_products() {
        let (b, t) = (2, 9);
        for dtype in [DType::F32, DType::BF16] {
            let a = attention_in(dtype);
            for s in [1, 5] {
                let q_nope = random(&[b, 3, s, 8], 31);
                let q_pe = random(&[b, 3, s, 4], 32);
                // The cache as stored, and exactly widened for the f32 products.
                let c_all = random(&[b, 1, t, 20], 33).to_dtype(dtype).unwrap();
                let k_pe_all = random(&[b, 1, t, 4], 34).to_dtype(dtype).unwrap();
                let wide = |x: &Tensor| x.to_dtype(DType::F32).unwrap().squeeze(1).unwrap();
                let mask = causal_mask(s, t - s, DType::F32, &Device::Cpu).unwrap();
                for mask in [None, Some(&mask)] {
                    let in_place = a
                        .attend_in_place(&q_nope, &q_pe, &c_all, &k_pe_all, mask)
                        .unwrap()
                        .expect("a CPU layer in f32 or BF16");
                    let products = a
                        .attend_absorbed(&q_nope, &q_pe, &wide(&c_all), &wide(&k_pe_all), mask)
                        .unwrap();
                    assert_eq!(in_place.dims(), &[b, 3, s, 6]);
                    let largest: f32 = products
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar()
                        .unwrap();
                    let difference = max_abs_diff(&in_place, &products).unwrap();
                    assert!(largest > 0.1, "{largest}");
                    assert!(
                        difference <= 1e-5 * largest,
                        "{dtype:?} s={s} mask={}: {difference} of {largest}",
                        mask.is_some()
                    );
                }
            }
        }
    }

    #[test]
    fn prompts_expand_and_steps_stay_absorbed() {
        // Kimi-VL's sizes.
        let mut a = attention();
        (a.heads, a.latent, a.nope, a.rope, a.v_dim) = (16, 512, 128, 64, 128);
        assert!(a.expanding_is_cheaper(467, 467));
        // A chunk of a prompt after a cached part: expanding the whole cache pays off for a
        // long enough chunk only.
        assert!(a.expanding_is_cheaper(200, 500));
        assert!(!a.expanding_is_cheaper(64, 500));
        assert!(!a.expanding_is_cheaper(1, 467));
        assert!(!a.expanding_is_cheaper(4, 2000));
    }
}
