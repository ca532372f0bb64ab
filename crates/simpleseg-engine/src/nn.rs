//! Building blocks shared by the models.
//!
//! Every op here has two implementations chosen by [`Mode`]: candle's fused kernels for
//! inference, and compositions of differentiable primitives for training (candle's fused
//! `rms_norm`, `softmax_last_dim` and rotary kernels have no backward pass, so gradients
//! through them would silently vanish). Both compute the same function; tests check that.

use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Result, Tensor, D};

use crate::weights::{MappedMatrix, Weights};

/// Whether a forward pass must carry gradients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Fused kernels where candle has them.
    #[default]
    Infer,
    /// Only differentiable primitives.
    Train,
}

/// How a linear layer keeps its weight `(out_dim, in_dim)`.
#[derive(Clone, Debug)]
pub enum Weight {
    /// A candle tensor (training's variables, small models, GPUs).
    Dense(Tensor),
    /// BF16/F16 values read in place from the memory-mapped checkpoint.
    Mapped(MappedMatrix),
    /// Quantized (q8_0, q4k), multiplied by candle's quantized kernels.
    Quantized(Arc<QMatMul>),
}

impl Weight {
    /// `(out_dim, in_dim)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Weight::Dense(t) => t.dims2(),
            Weight::Mapped(m) => Ok((m.rows, m.cols)),
            Weight::Quantized(q) => match q.as_ref() {
                QMatMul::QTensor(t) => t.shape().dims2(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims2(),
            },
        }
    }

    /// The weight as a candle tensor of `dtype` (a copy unless dense already).
    pub fn to_tensor(&self, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => t.to_dtype(dtype),
            Weight::Mapped(m) => m.to_tensor(dtype, device),
            Weight::Quantized(q) => match q.as_ref() {
                QMatMul::QTensor(t) => t.dequantize(device)?.to_dtype(dtype),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.to_dtype(dtype),
            },
        }
    }
}

/// A linear layer `y = x W^T + b`, mirroring `nn.Linear`'s `weight` and `bias` tensors.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// A layer over a candle weight tensor.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight: Weight::Dense(weight),
            bias,
        }
    }

    /// Loads `weight` (and `bias` if `bias`) under `w`.
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        w.linear(in_dim, out_dim, bias)
    }

    /// `x W^T` for a rank-2 `x`.
    fn matmul_rows(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => match few_rows_matmul(x, w)? {
                Some(y) => Ok(y),
                None => x.matmul(&w.t()?),
            },
            Weight::Mapped(m) => {
                let slice = match m.dtype {
                    DType::F16 => Rows::F16(m.f16()),
                    DType::F32 => Rows::F32(m.f32()),
                    _ => Rows::Bf16(m.bf16()),
                };
                if x.dim(0)? <= FEW_ROWS && !x.track_op() {
                    rows_matmul(x, slice, m.rows, m.cols)
                } else {
                    widened_matmul(x, m)
                }
            }
            Weight::Quantized(q) => {
                let dtype = x.dtype();
                q.forward(&x.to_dtype(DType::F32)?.contiguous()?)?
                    .to_dtype(dtype)
            }
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match x.rank() {
            2 => self.matmul_rows(x)?,
            _ => {
                // Fold leading dimensions into rows: one large matmul.
                let dims = x.dims().to_vec();
                let rows: usize = dims[..dims.len() - 1].iter().product();
                let y = self.matmul_rows(&x.reshape((rows, dims[dims.len() - 1]))?)?;
                let mut out_dims = dims;
                if let Some(last) = out_dims.last_mut() {
                    *last = self.weight.dims()?.0;
                }
                y.reshape(out_dims)?
            }
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }
}

/// An embedding table whose rows are gathered on demand, read in place when mapped.
#[derive(Clone, Debug)]
pub struct Embedding {
    table: Weight,
    dtype: DType,
}

impl Embedding {
    /// A table `(vocab, hidden)`; looked-up rows come out in `dtype`.
    pub fn new(table: Weight, dtype: DType) -> Self {
        Embedding { table, dtype }
    }

    /// A table held as a candle tensor.
    pub fn from_tensor(table: Tensor) -> Self {
        let dtype = table.dtype();
        Embedding::new(Weight::Dense(table), dtype)
    }

    /// The table as a linear layer (`hidden -> vocab`): a tied output head.
    pub fn as_linear(&self) -> Linear {
        Linear {
            weight: self.table.clone(),
            bias: None,
        }
    }

    /// Rows of `ids` (any shape): `(..., hidden)`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let flat = ids.flatten_all()?;
        let rows = match &self.table {
            Weight::Dense(t) => t.index_select(&flat, 0)?,
            Weight::Mapped(m) => {
                let ids: Vec<u32> = flat.to_vec1()?;
                let mut out = vec![0f32; ids.len() * m.cols];
                for (o, &id) in out.chunks_mut(m.cols).zip(&ids) {
                    let id = id as usize;
                    if id >= m.rows {
                        candle_core::bail!("token id {id} is outside the {}-row embedding", m.rows);
                    }
                    m.row_into(id, o);
                }
                Tensor::from_vec(out, (ids.len(), m.cols), flat.device())?
            }
            Weight::Quantized(q) => {
                let table = match q.as_ref() {
                    QMatMul::QTensor(t) => t.dequantize(flat.device())?,
                    QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.clone(),
                };
                table.index_select(&flat, 0)?
            }
        };
        let mut dims = ids.dims().to_vec();
        dims.push(rows.dim(1)?);
        rows.to_dtype(self.dtype)?.reshape(dims)
    }
}

/// Row counts up to which the row kernels replace candle's matmul.
const FEW_ROWS: usize = 8;

/// A weight's values as stored.
#[derive(Clone, Copy)]
enum Rows<'a> {
    Bf16(&'a [half::bf16]),
    F16(&'a [half::f16]),
    F32(&'a [f32]),
}

/// `x W^T` for at most [`FEW_ROWS`] rows of `x` against a contiguous BF16 or F32 weight on the
/// CPU, or `None` when that does not apply (other dtypes, devices, more rows, or a computation
/// that needs gradients: a result built outside candle's ops carries none).
fn few_rows_matmul(x: &Tensor, weight: &Tensor) -> Result<Option<Tensor>> {
    use candle_core::{CpuStorage, Storage};

    let rows = x.dim(0)?;
    let needs_grad = weight.track_op() || x.track_op();
    if !matches!(weight.dtype(), DType::BF16 | DType::F32)
        || !weight.device().is_cpu()
        || rows > FEW_ROWS
        || needs_grad
    {
        return Ok(None);
    }
    let (out_dim, in_dim) = weight.dims2()?;
    let (storage, layout) = weight.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    let y = match &*storage {
        Storage::Cpu(CpuStorage::BF16(data)) => {
            rows_matmul(x, Rows::Bf16(&data[start..end]), out_dim, in_dim)?
        }
        Storage::Cpu(CpuStorage::F32(data)) => {
            rows_matmul(x, Rows::F32(&data[start..end]), out_dim, in_dim)?
        }
        _ => return Ok(None),
    };
    Ok(Some(y))
}

/// `x W^T` by one dot product per output, each weight row read once (widened to f32) and
/// accumulated in f32, the result rounded to `x`'s dtype as a BF16 matmul does.
///
/// Decoding multiplies a few rows by every weight. candle's general BF16 matmul repacks the
/// whole weight on each call, which made a 7B-size token take ~15 s on 2 cores, where reading
/// the weights once allows about 1 s. And each output is one dot product computed the same way
/// whatever the number of rows, so a sequence decoded in a batch gets exactly the numbers it
/// gets alone.
fn rows_matmul(x: &Tensor, w: Rows, out_dim: usize, in_dim: usize) -> Result<Tensor> {
    use rayon::prelude::*;

    let rows = x.dim(0)?;
    let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    // One chunk of `rows` outputs per weight row (output feature), in parallel.
    let mut by_feature = vec![0f32; out_dim * rows];
    macro_rules! run {
        ($w:expr, $dot:ident) => {
            by_feature
                .par_chunks_mut(rows)
                .zip($w.par_chunks(in_dim))
                .with_min_len(64)
                .for_each(|(out, w_row)| {
                    for (r, o) in out.iter_mut().enumerate() {
                        *o = $dot(&xs[r * in_dim..(r + 1) * in_dim], w_row);
                    }
                })
        };
    }
    match w {
        Rows::Bf16(data) => run!(data, dot_bf16),
        Rows::F16(data) => run!(data, dot_f16),
        Rows::F32(data) => run!(data, dot_f32),
    }
    let mut y = vec![0f32; rows * out_dim];
    for (f, values) in by_feature.chunks(rows).enumerate() {
        for (r, v) in values.iter().enumerate() {
            y[r * out_dim + f] = *v;
        }
    }
    Tensor::from_vec(y, (rows, out_dim), x.device())?.to_dtype(x.dtype())
}

/// `x W^T` for many rows (a prefill) against a mapped weight at f32 speed: a BF16/F16 weight
/// is widened to f32 a block of output features at a time and each block multiplied with the
/// f32 GEMM, so no f32 copy of the whole weight ever exists. The result is rounded to `x`'s
/// dtype.
fn widened_matmul(x: &Tensor, m: &MappedMatrix) -> Result<Tensor> {
    use rayon::prelude::*;

    let rows = x.dim(0)?;
    let (out_dim, in_dim) = (m.rows, m.cols);
    let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut y = vec![0f32; rows * out_dim];
    // Blocks of about 4 MiB of widened weight; an f32 weight is used in one piece as stored.
    let block = if m.dtype == DType::F32 {
        out_dim.max(1)
    } else {
        ((4 << 20) / (4 * in_dim.max(1))).clamp(16, out_dim.max(16))
    };
    let mut buffer = vec![
        0f32;
        if m.dtype == DType::F32 {
            0
        } else {
            block * in_dim
        }
    ];
    let threads = rayon::current_num_threads();
    for b0 in (0..out_dim).step_by(block) {
        let n = block.min(out_dim - b0);
        let rhs = if m.dtype == DType::F32 {
            &m.f32()[b0 * in_dim..(b0 + n) * in_dim]
        } else {
            buffer[..n * in_dim]
                .par_chunks_mut(in_dim)
                .enumerate()
                .for_each(|(i, out)| m.row_into(b0 + i, out));
            &buffer[..n * in_dim]
        };
        // SAFETY: dst is `rows x out_dim` row-major and the written columns b0..b0 + n lie
        // within it; lhs is `rows x in_dim` row-major; rhs is the block read as `in_dim x n`
        // (element (k, j) at j * in_dim + k); all three outlive the call.
        unsafe {
            gemm::gemm(
                rows,
                n,
                in_dim,
                y.as_mut_ptr().add(b0),
                1,
                out_dim as isize,
                false,
                xs.as_ptr(),
                1,
                in_dim as isize,
                rhs.as_ptr(),
                in_dim as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                if threads > 1 {
                    gemm::Parallelism::Rayon(threads)
                } else {
                    gemm::Parallelism::None
                },
            );
        }
    }
    Tensor::from_vec(y, (rows, out_dim), x.device())?.to_dtype(x.dtype())
}

/// BF16 values widened to f32 (exact: the 16 bits become the high half), with AVX2 where the
/// CPU has it.
pub fn widen_bf16(src: &[half::bf16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { widen_bf16_avx2(src, dst) };
        }
    }
    widen_bf16_portable(src, dst)
}

/// [`widen_bf16_portable`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_bf16_avx2(src: &[half::bf16], dst: &mut [f32]) {
    widen_bf16_portable(src, dst)
}

#[inline(always)]
fn widen_bf16_portable(src: &[half::bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits(u32::from(s.to_bits()) << 16);
    }
}

/// Dot product of f32 values with F16 values in f32: the weights are widened a chunk at a time
/// (half's converter uses F16C where the CPU has it) and multiplied by [`dot_f32`].
fn dot_f16(x: &[f32], w: &[half::f16]) -> f32 {
    use half::slice::HalfFloatSliceExt;
    let mut buffer = [0f32; 256];
    let mut sum = 0f32;
    for (xs, ws) in x.chunks(256).zip(w.chunks(256)) {
        let wide = &mut buffer[..ws.len()];
        ws.convert_to_f32_slice(wide);
        sum += dot_f32(xs, wide);
    }
    sum
}

/// Dot product of f32 values in f32, with AVX2 where the CPU has it.
fn dot_f32(x: &[f32], w: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { dot_f32_avx2(x, w) };
        }
    }
    dot_f32_portable(x, w)
}

/// [`dot_f32_portable`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_f32_avx2(x: &[f32], w: &[f32]) -> f32 {
    dot_f32_portable(x, w)
}

/// Eight running sums so that the loop vectorizes.
#[inline(always)]
fn dot_f32_portable(x: &[f32], w: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (xc, wc) = (x.chunks_exact(8), w.chunks_exact(8));
    let (x_rest, w_rest) = (xc.remainder(), wc.remainder());
    for (xs, ws) in xc.zip(wc) {
        for k in 0..8 {
            acc[k] += xs[k] * ws[k];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (a, b) in x_rest.iter().zip(w_rest) {
        sum += a * b;
    }
    sum
}

/// Dot product of f32 values with BF16 values in f32, with AVX2 where the CPU has it (the
/// default x86-64 target only assumes SSE2, which halves the width of the loop).
fn dot_bf16(x: &[f32], w: &[half::bf16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { dot_bf16_avx2(x, w) };
        }
    }
    dot_bf16_portable(x, w)
}

/// [`dot_bf16_portable`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_bf16_avx2(x: &[f32], w: &[half::bf16]) -> f32 {
    dot_bf16_portable(x, w)
}

/// Eight running sums so that the loop vectorizes; BF16 -> f32 is exact: the 16 bits become the
/// high half of the f32.
#[inline(always)]
fn dot_bf16_portable(x: &[f32], w: &[half::bf16]) -> f32 {
    let mut acc = [0f32; 8];
    let (xc, wc) = (x.chunks_exact(8), w.chunks_exact(8));
    let (x_rest, w_rest) = (xc.remainder(), wc.remainder());
    for (xs, ws) in xc.zip(wc) {
        for k in 0..8 {
            acc[k] += xs[k] * f32::from_bits(u32::from(ws[k].to_bits()) << 16);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (a, b) in x_rest.iter().zip(w_rest) {
        sum += a * b.to_f32();
    }
    sum
}

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

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
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

/// Softmax over the last dimension, computed in f32.
pub fn softmax_last_dim(x: &Tensor, mode: Mode) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let y = match mode {
        Mode::Infer => candle_nn::ops::softmax_last_dim(&x.contiguous()?)?,
        Mode::Train => {
            let max = x.max_keepdim(D::Minus1)?.detach();
            let e = x.broadcast_sub(&max)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        }
    };
    y.to_dtype(dtype)
}

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

/// Scaled dot-product attention over `(batch, heads, seq, head_dim)` tensors with an optional
/// additive mask broadcast to `(batch, heads, q_len, k_len)`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    mode: Mode,
) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    softmax_last_dim(&scores, mode)?.matmul(v)
}

/// Repeats key/value heads for grouped-query attention: `(b, kv, s, d) -> (b, kv * n, s, d)`.
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, n_rep, s, d))?
        .reshape((b, kv * n_rep, s, d))
}

/// The additive causal mask for `q_len` new positions after `past` cached ones:
/// `(q_len, past + q_len)`, 0 where attention is allowed and -inf elsewhere.
pub fn causal_mask(
    q_len: usize,
    past: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let total = past + q_len;
    let values: Vec<f32> = (0..q_len)
        .flat_map(|i| (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (q_len, total), device)?.to_dtype(dtype)
}

/// Embeddings `(batch, seq, hidden)` with the row of each `placeholder` token replaced, in
/// order, by the rows of `features` (`(placeholders, hidden)`): how a vision-language model
/// puts image features where the prompt holds the image's placeholder tokens.
pub fn merge_image_features(
    embeds: &Tensor,
    input_ids: &Tensor,
    placeholder: u32,
    features: &Tensor,
) -> crate::Result<Tensor> {
    let (b, s, d) = embeds.dims3()?;
    let ids: Vec<u32> = input_ids.flatten_all()?.to_vec1()?;
    let n_placeholders = ids.iter().filter(|&&t| t == placeholder).count();
    if n_placeholders != features.dim(0)? {
        return Err(crate::Error::Input(format!(
            "image features and image tokens do not match: {} features, {n_placeholders} tokens",
            features.dim(0)?
        )));
    }
    let mut next = b * s;
    let gather: Vec<u32> = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            if t == placeholder {
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn close(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn bf16_few_rows_path_equals_the_general_matmul() {
        let dev = Device::Cpu;
        // 37 inputs: not a multiple of the 8-wide inner loop.
        let weight = Tensor::randn(0f32, 1.0, (50, 37), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let linear = Linear::new(weight.clone(), None);
        for rows in [1, 3, FEW_ROWS] {
            let x = Tensor::randn(0f32, 1.0, (rows, 37), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let fast = few_rows_matmul(&x, &weight).unwrap().expect("applies");
            assert_eq!(fast.dtype(), DType::BF16);
            assert_eq!(fast.dims(), &[rows, 50]);
            let reference = x
                .to_dtype(DType::F32)
                .unwrap()
                .matmul(&weight.to_dtype(DType::F32).unwrap().t().unwrap())
                .unwrap();
            let fast = fast.to_dtype(DType::F32).unwrap();
            // Both accumulate in f32; only the final rounding to BF16 (8 bits) differs.
            let scale = reference.abs().unwrap().max_keepdim(1).unwrap();
            let err = close(
                &fast.broadcast_div(&scale).unwrap(),
                &reference.broadcast_div(&scale).unwrap(),
            );
            assert!(err < 1e-2, "rows {rows}: relative error {err}");
            // Through the module, rank 3, as decoding calls it.
            let y = linear.forward(&x.unsqueeze(0).unwrap()).unwrap();
            assert_eq!(y.dims(), &[1, rows, 50]);
        }
        let many = Tensor::zeros((FEW_ROWS + 1, 37), DType::BF16, &dev).unwrap();
        assert!(few_rows_matmul(&many, &weight).unwrap().is_none());
        let f16_weight = weight.to_dtype(DType::F16).unwrap();
        let one = Tensor::zeros((1, 37), DType::F16, &dev).unwrap();
        assert!(few_rows_matmul(&one, &f16_weight).unwrap().is_none());
    }

    #[test]
    fn few_rows_outputs_do_not_depend_on_the_batch() {
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (40, 29), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 29), &dev).unwrap();
        let batch = few_rows_matmul(&x, &weight).unwrap().expect("applies");
        for r in 0..5 {
            let alone = few_rows_matmul(&x.narrow(0, r, 1).unwrap(), &weight)
                .unwrap()
                .expect("applies");
            let (a, b): (Vec<f32>, Vec<f32>) = (
                batch.get(r).unwrap().to_vec1().unwrap(),
                alone.get(0).unwrap().to_vec1().unwrap(),
            );
            assert_eq!(a, b, "row {r}");
        }
        let reference = x.matmul(&weight.t().unwrap()).unwrap();
        assert!(close(&batch, &reference) < 1e-4);
    }

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
            close(
                &norm.forward(&x, Mode::Infer).unwrap(),
                &norm.forward(&x, Mode::Train).unwrap()
            ) < 1e-5
        );
        assert!(
            close(
                &softmax_last_dim(&x, Mode::Infer).unwrap(),
                &softmax_last_dim(&x, Mode::Train).unwrap()
            ) < 1e-6
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

    #[test]
    fn causal_mask_shape() {
        let m = causal_mask(2, 3, DType::F32, &Device::Cpu).unwrap();
        let v: Vec<Vec<f32>> = m.to_vec2().unwrap();
        assert_eq!(v[0], vec![0.0, 0.0, 0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(v[1], vec![0.0; 5]);
    }
}
