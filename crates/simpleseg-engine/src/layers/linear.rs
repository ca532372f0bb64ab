//! Linear layers `y = x W^T + b` over every way a weight is kept ([`Weight`]): candle tensors,
//! BF16/F16/F32 values read in place from the mapped checkpoint, and quantized blocks. A few
//! rows (decoding) are multiplied one dot product per output ([`simpleseg_kernels::rows`], the
//! quantized driver); many rows (a prefill) by a GEMM over the weight as stored.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Module, Result, Tensor, D};
use simpleseg_kernels::math::Activation;
use simpleseg_kernels::rows::Weights as Rows;

use crate::io::quantized::QuantizedMatrix;
use crate::io::weights::{MappedMatrix, Weight, Weights};
use crate::layers::quantized::RowsProduct;

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

    /// Loads `weight` `(out_dim, in_dim)` (and, with `bias`, `bias` `(out_dim)`) under `w`.
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = w.matrix(in_dim, out_dim)?;
        let bias = if bias {
            Some(w.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// `x W^T` for a rank-2 `x`, before the bias (or, [`Product::Rounded`], with it).
    fn matmul_rows(&self, x: &Tensor) -> Result<Product> {
        if let Some(product) = self.rounded_matmul(x, None)? {
            return Ok(product);
        }
        let rows = x.dim(0)?;
        let sums = match &self.weight {
            Weight::Dense(w) => match few_rows_matmul(x, w)? {
                Some(y) => y,
                None => return Ok(Product::Tensor(x.matmul(&w.t()?)?)),
            },
            Weight::Mapped(m) => {
                let slice = match m.dtype {
                    DType::F16 => Rows::F16(m.f16()),
                    DType::F32 => Rows::F32(m.f32()),
                    _ => Rows::Bf16(m.bf16()),
                };
                if rows <= FEW_ROWS && !x.track_op() {
                    rows_matmul(x, slice, m.rows, m.cols)?
                } else {
                    many_rows_matmul(x, m)?
                }
            }
            Weight::Quantized(q) => {
                if rows <= FEW_ROWS {
                    q.rows_matmul(&values_f32(x)?, rows)?
                } else if crate::layers::quantized::integer_prefill()
                    // AMX tiles multiply BF16 several times faster than VNNI integers.
                    && !(x.dtype() == DType::BF16 && simpleseg_kernels::bf16_gemm::amx())
                {
                    match q.integer_matmul(&values_f32(x)?, rows) {
                        Some(y) => y,
                        None => many_rows_matmul(x, q)?,
                    }
                } else {
                    many_rows_matmul(x, q)?
                }
            }
            Weight::QuantizedDevice(q) => {
                let dtype = x.dtype();
                return Ok(Product::Tensor(
                    q.forward(&x.to_dtype(DType::F32)?.contiguous()?)?
                        .to_dtype(dtype)?,
                ));
            }
        };
        Ok(Product::Sums(sums, (rows, self.weight.dims()?.0)))
    }

    /// A prefill of BF16 rows on AMX tiles against a weight read in place (BF16, or quantized
    /// and widened a group of rows at a time): the sums plus the bias rounded to BF16 as the
    /// GEMM stores them, the bits [`Self::finish`] would give the f32 sums, without them;
    /// with an `activation`, applied as they are stored. `None` where this does not apply.
    fn rounded_matmul(
        &self,
        x: &Tensor,
        activation: Option<Activation>,
    ) -> Result<Option<Product>> {
        if let Weight::Dense(w) = &self.weight {
            return self.dense_rounded_matmul(x, w, activation);
        }
        let Some((w, bias)) = self.tiled_prefill(x)? else {
            return Ok(None);
        };
        let (rows, (out_dim, in_dim)) = (x.dim(0)?, w.dims());
        let row = |j: usize, out: &mut [u16]| w.row_bf16_bits(j, out);
        let x = x.contiguous()?;
        let product = |bits: &[u16]| {
            simpleseg_kernels::bf16_gemm::gemm_rounded(
                bits,
                row,
                w.bf16_rows(),
                (rows, out_dim, in_dim),
                bias.as_deref(),
                activation,
            )
        };
        let rounded = on_bf16_bits(&x, product)?;
        Ok(rounded.map(|bits| Product::Rounded(bits, (rows, out_dim))))
    }

    /// [`Self::rounded_matmul`] against a dense BF16 weight on the CPU (a convolution's
    /// kernel, a weight copied at load), read in place from the tensor; `None` where it does
    /// not apply (as [`Self::tiled_prefill`], or a weight in a training graph).
    fn dense_rounded_matmul(
        &self,
        x: &Tensor,
        w: &Tensor,
        activation: Option<Activation>,
    ) -> Result<Option<Product>> {
        let applies = |t: &Tensor| t.dtype() == DType::BF16 && t.device().is_cpu() && !t.track_op();
        if x.dim(0)? <= FEW_ROWS
            || !applies(x)
            || !applies(w)
            || w.rank() != 2
            || !simpleseg_kernels::bf16_gemm::amx()
        {
            return Ok(None);
        }
        let (rows, (out_dim, in_dim)) = (x.dim(0)?, w.dims2()?);
        if x.dim(1)? != in_dim {
            // The general path reports the mismatch.
            return Ok(None);
        }
        let bias = self.bias_f32()?;
        let (w, x) = (w.contiguous()?, x.contiguous()?);
        let rounded = with_bf16_bits(&w, |weight| {
            let row = |j: usize, out: &mut [u16]| {
                out.copy_from_slice(&weight[j * in_dim..(j + 1) * in_dim])
            };
            on_bf16_bits(&x, |bits| {
                simpleseg_kernels::bf16_gemm::gemm_rounded(
                    bits,
                    row,
                    Some(weight),
                    (rows, out_dim, in_dim),
                    bias.as_deref(),
                    activation,
                )
            })
        });
        Ok(rounded
            .transpose()?
            .flatten()
            .map(|bits| Product::Rounded(bits, (rows, out_dim))))
    }

    /// The bias in f32, where there is one.
    fn bias_f32(&self) -> Result<Option<Vec<f32>>> {
        self.bias
            .as_ref()
            .map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1())
            .transpose()
    }

    /// `x W^T + b` with `activation` applied as a prefill on AMX tiles stores its rounded
    /// outputs (BF16 bits, as [`simpleseg_kernels::math::activate_bf16`] computes them);
    /// `None` where that path does not apply (callers apply the activation to
    /// [`Module::forward`]'s output).
    pub(crate) fn forward_activated(
        &self,
        x: &Tensor,
        activation: Activation,
    ) -> Result<Option<Tensor>> {
        if x.rank() != 2 {
            return Ok(None);
        }
        match self.rounded_matmul(x, Some(activation))? {
            Some(Product::Rounded(bits, shape)) => bf16_tensor(bits, shape, x.device()).map(Some),
            _ => Ok(None),
        }
    }

    /// The weight and its bias (in f32) where a prefill of `x` (rank 2) runs on AMX tiles
    /// with BF16 outputs: more than [`FEW_ROWS`] BF16 rows of the weight's width on the CPU
    /// outside training graphs, the weight read in place or quantized; `None` elsewhere.
    pub(crate) fn tiled_prefill(&self, x: &Tensor) -> Result<Option<TiledWeight<'_>>> {
        if x.dim(0)? <= FEW_ROWS
            || x.dtype() != DType::BF16
            || !x.device().is_cpu()
            || x.track_op()
            || !simpleseg_kernels::bf16_gemm::amx()
        {
            return Ok(None);
        }
        let w: &dyn RowSource = match &self.weight {
            Weight::Mapped(m) => m,
            Weight::Quantized(q) => q,
            _ => return Ok(None),
        };
        if x.dim(1)? != w.dims().1 {
            // The general path reports the mismatch.
            return Ok(None);
        }
        Ok(Some((w, self.bias_f32()?)))
    }

    /// A product with the bias, in `like`'s dtype and device. The kernels' f32 sums get the
    /// bias before their one rounding, as torch's BF16 linear layers add it to their f32
    /// accumulators; candle's results get it added after.
    fn finish(&self, product: Product, like: &Tensor) -> Result<Tensor> {
        match product {
            Product::Sums(mut y, (rows, n)) => {
                if let Some(b) = &self.bias {
                    let b: Vec<f32> = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    if b.len() != n {
                        candle_core::bail!("a bias of {} for {n} outputs", b.len());
                    }
                    use rayon::prelude::*;
                    y.par_chunks_mut(n.max(1)).for_each(|row| {
                        for (v, b) in row.iter_mut().zip(&b) {
                            *v += b;
                        }
                    });
                }
                rounded_to(y, (rows, n), like)
            }
            Product::Rounded(bits, shape) => bf16_tensor(bits, shape, like.device()),
            Product::Tensor(y) => match &self.bias {
                Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
                None => Ok(y),
            },
        }
    }
}

/// A layer's weight and its bias in f32, as a prefill on AMX tiles reads them.
pub(crate) type TiledWeight<'a> = (&'a dyn RowSource, Option<Vec<f32>>);

/// A product before its bias: f32 sums from the CPU kernels (`rows x outputs`, row-major), or
/// candle's tensor; or, with its bias, BF16 bits rounded by the GEMM (`rows x outputs`).
enum Product {
    Sums(Vec<f32>, (usize, usize)),
    Rounded(Vec<u16>, (usize, usize)),
    Tensor(Tensor),
}

/// `layer.forward(x)` for each pair, with every few-rows product over quantized CPU weights
/// in one parallel pass (see [`crate::layers::quantized::rows_matmul_batch`]): decoding's projections
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
        batched.push((q, values_f32(x)?, rows));
    }
    if batched.len() < pairs.len() {
        let on_cpu = pairs.iter().all(|(_, x)| x.device().is_cpu());
        return each(pairs, on_cpu, |(layer, x)| layer.forward(x));
    }
    let products: Vec<RowsProduct> = batched
        .iter()
        .map(|(matrix, x, rows)| RowsProduct {
            matrix,
            x,
            rows: *rows,
        })
        .collect();
    let outputs = crate::layers::quantized::rows_matmul_batch(&products)?;
    pairs
        .iter()
        .zip(outputs)
        .zip(&batched)
        .map(|(((layer, x), y), (q, _, rows))| {
            let y = layer.finish(Product::Sums(y, (*rows, q.rows)), x)?;
            let mut dims = x.dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last = q.rows;
            }
            y.reshape(dims)
        })
        .collect()
}

/// `f` of each item, in order, or (`in_parallel`: tensors on the CPU) in parallel: a
/// mixture's experts in a prompt, each product parallel inside, left the threads idle between
/// products, about a sixth of a 467-token Kimi-VL mixture layer on 2 Xeon cores. Each result
/// is the same either way.
pub(crate) fn each<T: Sync, R: Send>(
    items: &[T],
    in_parallel: bool,
    f: impl Fn(&T) -> Result<R> + Sync + Send,
) -> Result<Vec<R>> {
    use rayon::prelude::*;
    if in_parallel {
        items.par_iter().map(f).collect()
    } else {
        items.iter().map(f).collect()
    }
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
        match x.rank() {
            2 => self.finish(self.matmul_rows(x)?, x),
            _ => {
                // Fold leading dimensions into rows: one large matmul.
                let dims = x.dims().to_vec();
                let rows: usize = dims[..dims.len() - 1].iter().product();
                let x2 = x.reshape((rows, dims[dims.len() - 1]))?;
                let y = self.finish(self.matmul_rows(&x2)?, &x2)?;
                let mut out_dims = dims;
                if let Some(last) = out_dims.last_mut() {
                    *last = self.weight.dims()?.0;
                }
                y.reshape(out_dims)
            }
        }
    }
}

/// Row counts up to which the row kernels replace candle's matmul (so each row's result is
/// what it would be alone).
pub const FEW_ROWS: usize = 8;

/// `x W^T` for at most [`FEW_ROWS`] rows of `x` against a contiguous BF16 or F32 weight on the
/// CPU, or `None` when that does not apply (other dtypes, devices, more rows, or a computation
/// that needs gradients: a result built outside candle's ops carries none).
fn few_rows_matmul(x: &Tensor, weight: &Tensor) -> Result<Option<Vec<f32>>> {
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

/// `x W^T` by one dot product per output ([`simpleseg_kernels::rows`]), in f32.
fn rows_matmul(x: &Tensor, w: Rows, out_dim: usize, in_dim: usize) -> Result<Vec<f32>> {
    let rows = x.dim(0)?;
    let xs = values_f32(x)?;
    simpleseg_kernels::rows::matmul(&xs, rows, w, out_dim, in_dim).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "a {rows}-row product does not fit a {out_dim}x{in_dim} weight"
        ))
    })
}

/// A weight matrix `(rows, cols)` that a prefill reads a row at a time.
pub trait RowSource: Sync {
    /// `(rows, cols)`.
    fn dims(&self) -> (usize, usize);
    /// Row `r` as f32 (exact: widened or dequantized).
    fn row_f32(&self, r: usize, out: &mut [f32]);
    /// Row `r` as BF16 bits (rounded to nearest even where the stored values are wider).
    fn row_bf16_bits(&self, r: usize, out: &mut [u16]) {
        rounded_row(self, r, out)
    }
    /// The whole matrix as stored, when it is f32 (multiplied without a copy).
    fn f32_rows(&self) -> Option<&[f32]> {
        None
    }
    /// The whole matrix as stored, when it is BF16: its bits, row-major (packed for the BF16
    /// GEMM from where they lie).
    fn bf16_rows(&self) -> Option<&[u16]> {
        None
    }
}

/// Row `r` of `w` as f32 ([`RowSource::row_f32`]), rounded to BF16 bits (nearest even).
fn rounded_row<W: RowSource + ?Sized>(w: &W, r: usize, out: &mut [u16]) {
    let mut wide = vec![0f32; out.len()];
    w.row_f32(r, &mut wide);
    for (o, v) in out.iter_mut().zip(wide) {
        *o = half::bf16::from_f32(v).to_bits();
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
            rounded_row(self, r, out)
        }
    }
    fn f32_rows(&self) -> Option<&[f32]> {
        (self.dtype == DType::F32).then(|| self.f32())
    }
    fn bf16_rows(&self) -> Option<&[u16]> {
        use half::slice::HalfFloatSliceExt;
        (self.dtype == DType::BF16).then(|| self.bf16().reinterpret_cast())
    }
}

impl RowSource for QuantizedMatrix {
    fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    fn row_f32(&self, r: usize, out: &mut [f32]) {
        self.row_into(r, out)
    }
    fn row_bf16_bits(&self, r: usize, out: &mut [u16]) {
        #[cfg(target_arch = "x86_64")]
        {
            use simpleseg_kernels::{dequantize, q4_0, q4k, q8_0};
            match self.ggml {
                GgmlDType::Q4_0 => {
                    return dequantize::q4_0_to_bf16(self.row_blocks::<q4_0::Q4_0Block>(r), out)
                }
                GgmlDType::Q8_0 => {
                    return dequantize::q8_0_to_bf16(self.row_blocks::<q8_0::Q8_0Block>(r), out)
                }
                GgmlDType::Q4K => {
                    return dequantize::q4k_to_bf16(self.row_blocks::<q4k::Q4KBlock>(r), out)
                }
                _ => {}
            }
        }
        rounded_row(self, r, out)
    }
}

/// `x W^T` for many rows (a prefill) against a weight read in place: with BF16 activations
/// and a CPU that has BF16 dot products, [`simpleseg_kernels::bf16_gemm`] on the weight's rows as BF16;
/// otherwise the f32 GEMM on the weight widened (or dequantized) a block of rows at a time,
/// which computes exactly on the stored values. Either way no copy of the whole weight exists.
fn many_rows_matmul(x: &Tensor, w: &dyn RowSource) -> Result<Vec<f32>> {
    match bf16_matmul(x, w)? {
        Some(y) => Ok(y),
        None => widened_matmul(x, w),
    }
}

/// A BF16 tensor's values as bits, in row-major order (what `bf16_gemm` takes).
pub(crate) fn bf16_bits(x: &Tensor) -> Result<Vec<u16>> {
    Ok(x.flatten_all()?
        .to_vec1::<half::bf16>()?
        .into_iter()
        .map(half::bf16::to_bits)
        .collect())
}

/// `f` of a contiguous BF16 tensor's values on the CPU as bits, read in place (no copy);
/// `None` for another dtype or device, or a layout that is not contiguous.
pub(crate) fn with_bf16_bits<R>(x: &Tensor, f: impl FnOnce(&[u16]) -> R) -> Option<R> {
    use candle_core::{CpuStorage, Storage};
    use half::slice::HalfFloatSliceExt;
    let (storage, layout) = x.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::BF16(values)), Some((start, end))) => {
            Some(f(values[start..end].reinterpret_cast()))
        }
        _ => None,
    }
}

/// BF16 values given as bits, as a tensor of `shape`.
pub(crate) fn bf16_tensor(
    bits: Vec<u16>,
    shape: impl Into<candle_core::Shape>,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let values: Vec<half::bf16> = bits.into_iter().map(half::bf16::from_bits).collect();
    Tensor::from_vec(values, shape, device)
}

/// `x`'s values as f32, row-major; BF16 widened in parallel (candle's conversion runs on one
/// thread, and a prefill converts every layer's inputs).
fn values_f32(x: &Tensor) -> Result<Vec<f32>> {
    use rayon::prelude::*;
    if x.dtype() != DType::BF16 {
        return x.to_dtype(DType::F32)?.flatten_all()?.to_vec1();
    }
    let values = x.flatten_all()?.to_vec1::<half::bf16>()?;
    Ok(values.par_iter().map(|v| v.to_f32()).collect())
}

/// `y` as a tensor of `shape` in `like`'s dtype and device; rounded to BF16 in parallel, 16
/// values at a time (candle's f32 -> BF16 conversion goes element by element through a
/// closure and took a third as long as a prefill's product).
fn rounded_to(y: Vec<f32>, shape: (usize, usize), like: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    if like.dtype() != DType::BF16 {
        return Tensor::from_vec(y, shape, like.device())?.to_dtype(like.dtype());
    }
    use half::slice::HalfFloatSliceExt;
    let mut rounded = vec![half::bf16::ZERO; y.len()];
    rounded
        .reinterpret_cast_mut()
        .par_chunks_mut(1 << 14)
        .zip(y.par_chunks(1 << 14))
        .for_each(|(out, y)| simpleseg_kernels::math::round_to_bf16(y, out));
    Tensor::from_vec(rounded, shape, like.device())
}

/// The BF16 path of [`many_rows_matmul`]; `None` where it does not apply.
fn bf16_matmul(x: &Tensor, w: &dyn RowSource) -> Result<Option<Vec<f32>>> {
    if x.dtype() != DType::BF16 || !simpleseg_kernels::bf16_gemm::available() {
        return Ok(None);
    }

    let rows = x.dim(0)?;
    let (out_dim, in_dim) = w.dims();
    let row = |j: usize, out: &mut [u16]| w.row_bf16_bits(j, out);
    // A contiguous tensor's values are read in place (a copy of every layer's input, on one
    // thread, cost more than the copy saves).
    let x = x.contiguous()?;
    let product = |bits: &[u16]| match w.bf16_rows() {
        Some(stored) => {
            simpleseg_kernels::bf16_gemm::gemm_stored(bits, stored, rows, out_dim, in_dim)
        }
        None => simpleseg_kernels::bf16_gemm::gemm(bits, row, rows, out_dim, in_dim),
    };
    on_bf16_bits(&x, product)
}

/// `f` of a BF16 tensor's values as bits: read in place when contiguous on the CPU
/// ([`with_bf16_bits`]), else copied out first.
pub(crate) fn on_bf16_bits<R>(x: &Tensor, f: impl Fn(&[u16]) -> R) -> Result<R> {
    match with_bf16_bits(x, &f) {
        Some(y) => Ok(y),
        None => Ok(f(&bf16_bits(x)?)),
    }
}

/// The f32 path of [`many_rows_matmul`] ([`simpleseg_kernels::f32_gemm`]): exact on the
/// stored values.
fn widened_matmul(x: &Tensor, w: &dyn RowSource) -> Result<Vec<f32>> {
    let rows = x.dim(0)?;
    let (out_dim, in_dim) = w.dims();
    let xs = values_f32(x)?;
    simpleseg_kernels::f32_gemm::matmul(&xs, rows, out_dim, in_dim, w.f32_rows(), |j, out| {
        w.row_f32(j, out)
    })
    .ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "a {rows}-row product does not fit a {out_dim}x{in_dim} weight"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::max_abs_diff;
    use candle_core::Device;

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
            let fast = Tensor::from_vec(fast, (rows, 50), &dev).unwrap();
            let reference = x
                .to_dtype(DType::F32)
                .unwrap()
                .matmul(&weight.to_dtype(DType::F32).unwrap().t().unwrap())
                .unwrap();
            // Both sum the same products in f32; only the order differs.
            let scale = reference.abs().unwrap().max_keepdim(1).unwrap();
            let err = max_abs_diff(
                &fast.broadcast_div(&scale).unwrap(),
                &reference.broadcast_div(&scale).unwrap(),
            )
            .unwrap();
            assert!(err < 1e-5, "rows {rows}: relative error {err}");
            // Through the module, rank 3, as decoding calls it: rounded to BF16.
            let y = linear.forward(&x.unsqueeze(0).unwrap()).unwrap();
            assert_eq!(y.dims(), &[1, rows, 50]);
            assert_eq!(y.dtype(), DType::BF16);
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
            assert_eq!(batch[r * 40..(r + 1) * 40], alone[..], "row {r}");
        }
        let batch = Tensor::from_vec(batch, (5, 40), &dev).unwrap();
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
}
