//! Building blocks shared by the models.
//!
//! Every op here has two implementations chosen by [`Mode`]: candle's fused kernels for
//! inference, and compositions of differentiable primitives for training (candle's fused
//! `rms_norm`, `softmax_last_dim` and rotary kernels have no backward pass, so gradients
//! through them would silently vanish). Both compute the same function; tests check that.

use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Result, Tensor, D};

use simpleseg_kernels::dot::{bf16_to_f32, dot_bf16, dot_f32, f32_id};
use simpleseg_kernels::rows::Weights as Rows;

use crate::quantized::{QuantizedMatrix, RowsProduct};
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
    /// BF16/F16/F32 values read in place from the memory-mapped checkpoint.
    Mapped(MappedMatrix),
    /// Quantized blocks on the CPU (q4k, q4_0, q8_0), mapped or in memory.
    Quantized(QuantizedMatrix),
    /// Quantized on a GPU, multiplied by candle's kernels there.
    QuantizedDevice(Arc<QMatMul>),
}

impl Weight {
    /// `(out_dim, in_dim)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Weight::Dense(t) => t.dims2(),
            Weight::Mapped(m) => Ok((m.rows, m.cols)),
            Weight::Quantized(q) => Ok((q.rows, q.cols)),
            Weight::QuantizedDevice(q) => match q.as_ref() {
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
            Weight::Quantized(q) => {
                Tensor::from_vec(q.dequantize(), (q.rows, q.cols), device)?.to_dtype(dtype)
            }
            Weight::QuantizedDevice(q) => match q.as_ref() {
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
                    many_rows_matmul(x, m)
                }
            }
            Weight::Quantized(q) => {
                let rows = x.dim(0)?;
                if rows <= FEW_ROWS {
                    let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    Tensor::from_vec(q.rows_matmul(&xs, rows)?, (rows, q.rows), x.device())?
                        .to_dtype(x.dtype())
                } else {
                    many_rows_matmul(x, q)
                }
            }
            Weight::QuantizedDevice(q) => {
                let dtype = x.dtype();
                q.forward(&x.to_dtype(DType::F32)?.contiguous()?)?
                    .to_dtype(dtype)
            }
        }
    }
}

/// `layer.forward(x)` for each pair, with every few-rows product over quantized CPU weights
/// in one parallel pass (see [`crate::quantized::rows_matmul_batch`]): decoding's projections
/// of one input and a mixture's chosen experts. Each result equals the layer's own `forward`.
pub fn forward_batch(pairs: &[(&Linear, &Tensor)]) -> Result<Vec<Tensor>> {
    let mut batched = Vec::with_capacity(pairs.len());
    for &(layer, x) in pairs {
        let Weight::Quantized(q) = &layer.weight else {
            break;
        };
        let rows = x.elem_count() / q.cols.max(1);
        if x.rank() < 2 || rows > FEW_ROWS || x.dim(D::Minus1)? != q.cols {
            break;
        }
        let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        batched.push((q, xs, rows));
    }
    if batched.len() < pairs.len() {
        return pairs.iter().map(|(layer, x)| layer.forward(x)).collect();
    }
    let products: Vec<RowsProduct> = batched
        .iter()
        .map(|(matrix, x, rows)| RowsProduct {
            matrix,
            x,
            rows: *rows,
        })
        .collect();
    let outputs = crate::quantized::rows_matmul_batch(&products)?;
    pairs
        .iter()
        .zip(outputs)
        .zip(&batched)
        .map(|(((layer, x), y), (q, _, rows))| {
            let y = Tensor::from_vec(y, (*rows, q.rows), x.device())?.to_dtype(x.dtype())?;
            let mut dims = x.dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last = q.rows;
            }
            let y = y.reshape(dims)?;
            match &layer.bias {
                Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
                None => Ok(y),
            }
        })
        .collect()
}

/// Each of `layers` applied to `x`, as one [`forward_batch`].
pub fn forward_each<const N: usize>(layers: [&Linear; N], x: &Tensor) -> Result<[Tensor; N]> {
    let pairs = layers.map(|layer| (layer, x));
    forward_batch(&pairs)?
        .try_into()
        .map_err(|_| candle_core::Error::Msg("one output per layer".into()))
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
                let ids: Vec<u32> = flat.to_vec1()?;
                let mut out = vec![0f32; ids.len() * q.cols];
                for (o, &id) in out.chunks_mut(q.cols.max(1)).zip(&ids) {
                    if id as usize >= q.rows {
                        candle_core::bail!("token id {id} is outside the {}-row embedding", q.rows);
                    }
                    q.row_into(id as usize, o);
                }
                Tensor::from_vec(out, (ids.len(), q.cols), flat.device())?
            }
            Weight::QuantizedDevice(q) => {
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

/// `x W^T` by one dot product per output ([`simpleseg_kernels::rows`]), the result rounded to
/// `x`'s dtype as a BF16 matmul does.
fn rows_matmul(x: &Tensor, w: Rows, out_dim: usize, in_dim: usize) -> Result<Tensor> {
    let rows = x.dim(0)?;
    let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let y = simpleseg_kernels::rows::matmul(&xs, rows, w, out_dim, in_dim)
        .ok_or_else(|| candle_core::Error::Msg(format!("a {rows}-row product does not fit a {out_dim}x{in_dim} weight")))?;
    Tensor::from_vec(y, (rows, out_dim), x.device())?.to_dtype(x.dtype())
}

/// A weight matrix `(rows, cols)` that a prefill reads a row at a time.
pub trait RowSource: Sync {
    /// `(rows, cols)`.
    fn dims(&self) -> (usize, usize);
    /// Row `r` as f32 (exact: widened or dequantized).
    fn row_f32(&self, r: usize, out: &mut [f32]);
    /// Row `r` as BF16 bits (rounded to nearest even where the stored values are wider).
    fn row_bf16_bits(&self, r: usize, out: &mut [u16]) {
        let mut wide = vec![0f32; out.len()];
        self.row_f32(r, &mut wide);
        for (o, v) in out.iter_mut().zip(wide) {
            *o = half::bf16::from_f32(v).to_bits();
        }
    }
    /// The whole matrix as stored, when it is f32 (multiplied without a copy).
    fn f32_rows(&self) -> Option<&[f32]> {
        None
    }
}

impl RowSource for MappedMatrix {
    fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    fn row_f32(&self, r: usize, out: &mut [f32]) {
        self.row_into(r, out)
    }
    fn row_bf16_bits(&self, r: usize, out: &mut [u16]) {
        if self.dtype == DType::BF16 {
            let row = &self.bf16()[r * self.cols..(r + 1) * self.cols];
            for (o, v) in out.iter_mut().zip(row) {
                *o = v.to_bits();
            }
        } else {
            let mut wide = vec![0f32; out.len()];
            self.row_into(r, &mut wide);
            for (o, v) in out.iter_mut().zip(wide) {
                *o = half::bf16::from_f32(v).to_bits();
            }
        }
    }
    fn f32_rows(&self) -> Option<&[f32]> {
        (self.dtype == DType::F32).then(|| self.f32())
    }
}

impl RowSource for QuantizedMatrix {
    fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    fn row_f32(&self, r: usize, out: &mut [f32]) {
        self.row_into(r, out)
    }
}

/// `x W^T` for many rows (a prefill) against a weight read in place: with BF16 activations
/// and a CPU that has BF16 dot products, [`simpleseg_kernels::bf16_gemm`] on the weight's rows as BF16;
/// otherwise the f32 GEMM on the weight widened (or dequantized) a block of rows at a time,
/// which computes exactly on the stored values. Either way no copy of the whole weight exists.
fn many_rows_matmul(x: &Tensor, w: &dyn RowSource) -> Result<Tensor> {
    match bf16_matmul(x, w)? {
        Some(y) => Ok(y),
        None => widened_matmul(x, w),
    }
}

/// The BF16 path of [`many_rows_matmul`], rounded to BF16; `None` where it does not apply.
fn bf16_matmul(x: &Tensor, w: &dyn RowSource) -> Result<Option<Tensor>> {
    if x.dtype() != DType::BF16 || !simpleseg_kernels::bf16_gemm::available() {
        return Ok(None);
    }
    let rows = x.dim(0)?;
    let (out_dim, in_dim) = w.dims();
    let bits: Vec<u16> = x
        .flatten_all()?
        .to_vec1::<half::bf16>()?
        .into_iter()
        .map(|v| v.to_bits())
        .collect();
    let row = |j: usize, out: &mut [u16]| w.row_bf16_bits(j, out);
    let Some(y) = simpleseg_kernels::bf16_gemm::gemm(&bits, row, rows, out_dim, in_dim) else {
        return Ok(None);
    };
    // Rounded here in parallel: candle's f32 -> BF16 conversion goes element by element
    // through a closure and took a third as long as the product.
    let rounded: Vec<half::bf16> = {
        use rayon::prelude::*;
        y.par_iter().map(|&v| half::bf16::from_f32(v)).collect()
    };
    Ok(Some(Tensor::from_vec(
        rounded,
        (rows, out_dim),
        x.device(),
    )?))
}

/// The f32 path of [`many_rows_matmul`] ([`simpleseg_kernels::f32_gemm`]): exact on the
/// stored values; the result is rounded to `x`'s dtype.
fn widened_matmul(x: &Tensor, w: &dyn RowSource) -> Result<Tensor> {
    let rows = x.dim(0)?;
    let (out_dim, in_dim) = w.dims();
    let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let y = simpleseg_kernels::f32_gemm::matmul(&xs, rows, out_dim, in_dim, w.f32_rows(), |j, out| {
        w.row_f32(j, out)
    })
    .ok_or_else(|| candle_core::Error::Msg(format!("a {rows}-row product does not fit a {out_dim}x{in_dim} weight")))?;
    Tensor::from_vec(y, (rows, out_dim), x.device())?.to_dtype(x.dtype())
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
    // candle's BF16 matmul on the CPU runs several times slower than its f32 one: attention
    // over BF16 activations computes in f32 there (outside training, whose graph keeps dtypes).
    let dtype = q.dtype();
    if dtype == DType::BF16 && q.device().is_cpu() && mode == Mode::Infer {
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let mask = mask.map(f).transpose()?;
        return attention(&f(q)?, &f(k)?, &f(v)?, mask.as_ref(), scale, mode)?.to_dtype(dtype);
    }
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    softmax_last_dim(&scores, mode)?.matmul(v)
}

/// [`attention`] for one new position per sequence (a decoding step) over a grouped-query
/// cache read in place: `q` `(b, heads, 1, d)`, `k` and `v` `(b, kv_heads, t, d)` with `heads`
/// a multiple of `kv_heads`, every position visible. Computed in f32 as [`attention`] computes
/// BF16 on the CPU, but without repeating the cache's heads or converting it: each key and
/// value is widened as it is read, which took a 7B-size decoding step from copying ~200 MB of
/// cache to reading ~1 MB per layer. `None` where it does not apply (more positions, another
/// device, training, dtypes other than BF16 and F32).
pub fn single_query_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mode: Mode,
) -> Result<Option<Tensor>> {
    use candle_core::{CpuStorage, Storage};

    let (b, heads, s, d) = q.dims4()?;
    let (_, kv_heads, t, _) = k.dims4()?;
    if s != 1
        || mode != Mode::Infer
        || !q.device().is_cpu()
        || k.dims4()? != (b, kv_heads, t, d)
        || v.dims4()? != (b, kv_heads, t, d)
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
        || q.track_op()
    {
        return Ok(None);
    }
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let qs: Vec<f32> = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (k_storage, k_layout) = k.storage_and_layout();
    let (v_storage, v_layout) = v.storage_and_layout();
    let (Some((k0, k1)), Some((v0, v1))) =
        (k_layout.contiguous_offsets(), v_layout.contiguous_offsets())
    else {
        return Ok(None);
    };
    let shape = QueryShape {
        heads,
        kv_heads,
        t,
        d,
        scale: scale as f32,
    };
    let mut out = vec![0f32; b * heads * d];
    match (&*k_storage, &*v_storage) {
        (Storage::Cpu(CpuStorage::BF16(kd)), Storage::Cpu(CpuStorage::BF16(vd))) => {
            attend_one_query(
                &qs,
                &kd[k0..k1],
                &vd[v0..v1],
                &mut out,
                shape,
                dot_bf16,
                bf16_to_f32,
            )
        }
        (Storage::Cpu(CpuStorage::F32(kd)), Storage::Cpu(CpuStorage::F32(vd))) => attend_one_query(
            &qs,
            &kd[k0..k1],
            &vd[v0..v1],
            &mut out,
            shape,
            dot_f32,
            f32_id,
        ),
        _ => return Ok(None),
    }
    Tensor::from_vec(out, (b, heads, 1, d), q.device())?
        .to_dtype(q.dtype())
        .map(Some)
}

/// Sizes of a [`single_query_attention`].
#[derive(Clone, Copy)]
struct QueryShape {
    heads: usize,
    kv_heads: usize,
    t: usize,
    d: usize,
    scale: f32,
}

/// Each (sequence, head) in parallel: scores against its key head, softmax (max subtracted,
/// as candle's), then the weighted sum of the value rows.
fn attend_one_query<T: Copy + Sync>(
    q: &[f32],
    k: &[T],
    v: &[T],
    out: &mut [f32],
    shape: QueryShape,
    dot: impl Fn(&[f32], &[T]) -> f32 + Sync,
    widen: impl Fn(T) -> f32 + Sync,
) {
    use rayon::prelude::*;

    let QueryShape {
        heads,
        kv_heads,
        t,
        d,
        scale,
    } = shape;
    let group = heads / kv_heads;
    out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
        let (seq, head) = (row / heads, row % heads);
        let cache = (seq * kv_heads + head / group) * t * d;
        let (keys, values) = (&k[cache..cache + t * d], &v[cache..cache + t * d]);
        let query = &q[row * d..(row + 1) * d];
        let mut p: Vec<f32> = keys.chunks(d).map(|key| dot(query, key) * scale).collect();
        let max = p.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x));
        let mut total = 0f32;
        for x in p.iter_mut() {
            *x = (*x - max).exp();
            total += *x;
        }
        for (weight, value) in p.iter().zip(values.chunks(d)) {
            let weight = weight / total;
            for (o, x) in o.iter_mut().zip(value) {
                *o += weight * widen(*x);
            }
        }
    });
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
    fn single_query_attention_equals_attention_over_repeated_heads() {
        let dev = Device::Cpu;
        let (b, heads, kv_heads, t, d) = (2, 6, 2, 37, 16);
        for dtype in [DType::F32, DType::BF16] {
            let random = |shape: (usize, usize, usize, usize)| {
                Tensor::randn(0f32, 1.0, shape, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let q = random((b, heads, 1, d));
            let (k, v) = (random((b, kv_heads, t, d)), random((b, kv_heads, t, d)));
            let scale = (d as f64).powf(-0.5);
            let fast = single_query_attention(&q, &k, &v, scale, Mode::Infer)
                .unwrap()
                .expect("applies");
            assert_eq!((fast.dtype(), fast.dims()), (dtype, &[b, heads, 1, d][..]));
            let repeat = |x: &Tensor| {
                repeat_kv(x, heads / kv_heads)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let reference =
                attention(&q, &repeat(&k), &repeat(&v), None, scale, Mode::Infer).unwrap();
            let f32 = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
            // Both compute in f32; BF16 outputs may round the last bit differently.
            let tolerance = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            let err = max_abs_diff(&f32(&fast), &f32(&reference)).unwrap();
            assert!(err < tolerance, "{dtype:?}: {err}");
        }
        // Training and several query positions are left to `attention`.
        let q = Tensor::zeros((1, 2, 3, 4), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 1, 5, 4), DType::F32, &dev).unwrap();
        assert!(single_query_attention(&q, &k, &k, 1.0, Mode::Infer)
            .unwrap()
            .is_none());
        let q = q.narrow(2, 0, 1).unwrap();
        assert!(single_query_attention(&q, &k, &k, 1.0, Mode::Train)
            .unwrap()
            .is_none());
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
            let err = max_abs_diff(
                &fast.broadcast_div(&scale).unwrap(),
                &reference.broadcast_div(&scale).unwrap(),
            )
            .unwrap();
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
        assert!(max_abs_diff(&batch, &reference).unwrap() < 1e-4);
    }

    /// Quantized layers with and without bias, on rank-3 inputs of one and of two tensors:
    /// the batch gives each layer's own `forward`, bit for bit; with a dense layer among them
    /// (no batch), the same.
    #[test]
    fn forward_batch_equals_each_layers_forward() {
        use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
        use candle_core::quantized::GgmlDType;

        let dev = Device::Cpu;
        let quantized = |out: usize, bias: bool, seed: f64| {
            let w: Vec<f32> = (0..out * 64)
                .map(|i| ((i as f64 * seed).sin()) as f32)
                .collect();
            let mut blocks = vec![BlockQ8_0::zeros(); w.len() / 32];
            BlockQ8_0::from_float(&w, &mut blocks);
            let bytes = simpleseg_kernels::blocks::bytes_of(&blocks);
            Linear {
                weight: Weight::Quantized(
                    QuantizedMatrix::owned(bytes, out, 64, GgmlDType::Q8_0).unwrap(),
                ),
                bias: bias.then(|| Tensor::randn(0f32, 1.0, out, &dev).unwrap()),
            }
        };
        let (a, b, c) = (
            quantized(40, true, 0.3),
            quantized(24, false, 0.7),
            quantized(8, true, 1.1),
        );
        let dense = Linear::new(Tensor::randn(0f32, 1.0, (16, 64), &dev).unwrap(), None);
        let x = Tensor::randn(0f32, 1.0, (1, 3, 64), &dev).unwrap();
        let y = Tensor::randn(0f32, 1.0, (2, 1, 64), &dev).unwrap();
        let check = |pairs: &[(&Linear, &Tensor)]| {
            let got = forward_batch(pairs).unwrap();
            assert_eq!(got.len(), pairs.len());
            for (i, ((layer, x), got)) in pairs.iter().zip(&got).enumerate() {
                let want = layer.forward(x).unwrap();
                assert_eq!(got.dims(), want.dims(), "output {i}");
                let (g, w): (Vec<f32>, Vec<f32>) = (
                    got.flatten_all().unwrap().to_vec1().unwrap(),
                    want.flatten_all().unwrap().to_vec1().unwrap(),
                );
                assert_eq!(g, w, "output {i}");
            }
        };
        check(&[(&a, &x), (&b, &x), (&c, &y)]);
        check(&[(&a, &x), (&dense, &x), (&c, &y)]);
        let [p, q] = forward_each([&a, &b], &y).unwrap();
        assert_eq!(p.dims(), &[2, 1, 40]);
        assert_eq!(q.dims(), &[2, 1, 24]);
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
