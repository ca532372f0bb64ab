//! Element-wise ops: SiLU and tanh-GELU through the vectorized kernels of
//! [`simpleseg_kernels::math`], a gated MLP's activation (on AMX tiles fused with its two
//! products, [`gated_batch`]), and residual sums of BF16 tensors, on the CPU; candle's ops
//! elsewhere and wherever gradients flow (a tensor that tracks its op is part of a training
//! graph; the kernels have no backward pass).

use candle_core::{DType, Result, Tensor};
use simpleseg_kernels::math;

use crate::layers::linear::{each, forward_batch, Linear};

/// Values per parallel task.
const CHUNK: usize = 1 << 14;

/// `f` applied to each run of `chunk` values (the last may be shorter) of an f32 or BF16
/// tensor on the CPU, computed in f32, runs in parallel, into a new tensor of the same dtype
/// and shape (BF16 results rounded to nearest even, as candle's conversion does). Each run is
/// read from the tensor and written once, in its task: no single-threaded copy or conversion
/// pass. `None` where it does not apply (another device or dtype, a tensor in a training
/// graph).
pub(crate) fn map_chunks_in_f32(
    x: &Tensor,
    chunk: usize,
    f: impl Fn(&mut [f32]) + Sync,
) -> Result<Option<Tensor>> {
    use candle_core::{CpuStorage, Storage};
    use half::bf16;
    use rayon::prelude::*;

    if !x.device().is_cpu() || x.track_op() || !matches!(x.dtype(), DType::F32 | DType::BF16) {
        return Ok(None);
    }
    let chunk = chunk.max(1);
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    let y = match &*storage {
        Storage::Cpu(CpuStorage::F32(values)) => {
            let src = &values[start..end];
            let mut out = vec![0f32; src.len()];
            out.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(out, src)| {
                    out.copy_from_slice(src);
                    f(out);
                });
            Tensor::from_vec(out, x.shape(), x.device())?
        }
        Storage::Cpu(CpuStorage::BF16(values)) => {
            let src = &values[start..end];
            let mut out = vec![bf16::ZERO; src.len()];
            out.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(out, src)| {
                    let mut wide: Vec<f32> = src.iter().map(|v| v.to_f32()).collect();
                    f(&mut wide);
                    for (o, v) in out.iter_mut().zip(&wide) {
                        *o = bf16::from_f32(*v);
                    }
                });
            Tensor::from_vec(out, x.shape(), x.device())?
        }
        _ => return Ok(None),
    };
    Ok(Some(y))
}

/// SiLU, `x / (1 + e^-x)` (candle's `silu`).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    match map_chunks_in_f32(x, CHUNK, math::silu)? {
        Some(y) => Ok(y),
        None => x.silu(),
    }
}

/// GELU with the tanh approximation (candle's `gelu`, PyTorch's `approximate="tanh"`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    match map_chunks_in_f32(x, CHUNK, math::gelu_tanh)? {
        Some(y) => Ok(y),
        None => x.gelu(),
    }
}

/// `gelu_tanh(layer.forward(x))`, bit for bit: a prefill on AMX tiles applies the activation
/// as the GEMM stores its outputs (no pass over a vision tower's widest activations).
pub fn linear_gelu_tanh(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    match layer.forward_activated(x, simpleseg_kernels::math::Activation::GeluTanh)? {
        Some(y) => Ok(y),
        None => gelu_tanh(&candle_core::Module::forward(layer, x)?),
    }
}

/// `silu(gate) * up` (tensors of one shape), a gated MLP's activation: BF16 tensors on the CPU
/// outside training graphs in one parallel pass ([`simpleseg_kernels::math::silu_mul_bf16`],
/// bit for bit [`silu`] then candle's BF16 product); the two ops otherwise.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    match silu_mul_bf16(gate, up)? {
        Some(y) => Ok(y),
        None => silu(gate)? * up,
    }
}

/// The BF16 path of [`silu_mul`]; `None` where it does not apply.
fn silu_mul_bf16(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    use crate::layers::linear::{bf16_tensor, with_bf16_bits};
    use rayon::prelude::*;

    let applies = |t: &Tensor| t.dtype() == DType::BF16 && t.device().is_cpu() && !t.track_op();
    if !applies(gate) || !applies(up) || gate.dims() != up.dims() {
        return Ok(None);
    }
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let out = with_bf16_bits(&gate, |g| {
        with_bf16_bits(&up, |u| {
            // Not zeroed first: the kernel writes every value (a 7B prefill's MLPs spent 2%
            // of it zeroing these outputs).
            let mut out: Vec<u16> = Vec::with_capacity(g.len());
            out.spare_capacity_mut()[..g.len()]
                .par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                .try_for_each(|(out, (g, u))| math::silu_mul_bf16(g, u, out))
                .map(|()| {
                    // SAFETY: every chunk answered, so every value of the g.len() was written.
                    unsafe { out.set_len(g.len()) };
                    out
                })
        })
    });
    match out.flatten().flatten() {
        Some(out) => bf16_tensor(out, gate.shape(), gate.device()).map(Some),
        None => Ok(None),
    }
}

/// `silu(gate(x)) * up(x)`, a gated MLP's activation ([`silu_mul`] of both layers' outputs),
/// for each `(gate, up, x)`. A prefill of BF16 rows on AMX tiles against weights read in
/// place or quantized runs as one product of both weights whose tasks store the activation
/// ([`simpleseg_kernels::bf16_gemm::gemm_gated`]), bit for bit the composed ops without
/// their two outputs; the others go through [`forward_batch`] (decoding's few rows in one
/// parallel pass) and [`silu_mul`]. On the CPU the triples run in parallel (a mixture's
/// experts), each result as it would be alone.
pub fn gated_batch(triples: &[(&Linear, &Linear, &Tensor)]) -> Result<Vec<Tensor>> {
    let on_cpu = triples.iter().all(|(_, _, x)| x.device().is_cpu());
    let fused = each(triples, on_cpu, |&(gate, up, x)| {
        gated_on_tiles(gate, up, x)
    })?;
    let rest: Vec<(&Linear, &Tensor)> = triples
        .iter()
        .zip(&fused)
        .filter(|(_, y)| y.is_none())
        .flat_map(|(&(gate, up, x), _)| [(gate, x), (up, x)])
        .collect();
    let mut products = forward_batch(&rest)?.into_iter();
    fused
        .into_iter()
        .map(|y| match y {
            Some(y) => Ok(y),
            None => match (products.next(), products.next()) {
                (Some(gate), Some(up)) => silu_mul(&gate, &up),
                _ => candle_core::bail!("two products for each gated activation"),
            },
        })
        .collect()
}

/// [`gated_batch`] of one layer pair.
pub fn gated(gate: &Linear, up: &Linear, x: &Tensor) -> Result<Tensor> {
    let mut y = gated_batch(&[(gate, up, x)])?;
    y.pop()
        .ok_or_else(|| candle_core::Error::Msg("one gated activation".into()))
}

/// The fused path of [`gated_batch`]; `None` where it does not apply (see
/// `Linear::tiled_prefill`; both weights of one shape).
fn gated_on_tiles(gate: &Linear, up: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
    use crate::layers::linear::{bf16_tensor, on_bf16_bits, RowSource};
    use simpleseg_kernels::bf16_gemm::{gemm_gated, GatedWeight};

    let dims = x.dims().to_vec();
    let Some(&in_dim) = dims.last() else {
        return Ok(None);
    };
    let x2 = x.reshape((x.elem_count() / in_dim.max(1), in_dim))?;
    let (Some((g, gate_bias)), Some((u, up_bias))) =
        (gate.tiled_prefill(&x2)?, up.tiled_prefill(&x2)?)
    else {
        return Ok(None);
    };
    if g.dims() != u.dims() {
        return Ok(None);
    }
    let (rows, (n, k)) = (x2.dim(0)?, g.dims());
    fn weight<'a>(
        w: &'a dyn RowSource,
        bias: Option<&'a [f32]>,
    ) -> GatedWeight<'a, impl Fn(usize, &mut [u16]) + Sync + 'a> {
        GatedWeight {
            row: move |j: usize, out: &mut [u16]| w.row_bf16_bits(j, out),
            stored: w.bf16_rows(),
            bias,
        }
    }
    let x2 = x2.contiguous()?;
    let product = |bits: &[u16]| {
        gemm_gated(
            bits,
            weight(g, gate_bias.as_deref()),
            weight(u, up_bias.as_deref()),
            (rows, n, k),
        )
    };
    let Some(bits) = on_bf16_bits(&x2, product)? else {
        return Ok(None);
    };
    let mut out_dims = dims;
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    bf16_tensor(bits, out_dims, x.device()).map(Some)
}

/// `x + y` (tensors of one shape): BF16 tensors on the CPU outside training graphs are added
/// in parallel by [`simpleseg_kernels::dot::add_bf16`], with the roundings of candle's BF16 add
/// (whose conversions make a feature check per 8 values, on one thread per chunk); candle's
/// add otherwise.
pub fn add(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    match add_bf16(x, y)? {
        Some(sum) => Ok(sum),
        None => x + y,
    }
}

/// The BF16 path of [`add`]; `None` where it does not apply.
fn add_bf16(x: &Tensor, y: &Tensor) -> Result<Option<Tensor>> {
    use candle_core::{CpuStorage, Storage};
    use rayon::prelude::*;

    let applies = |t: &Tensor| t.dtype() == DType::BF16 && t.device().is_cpu() && !t.track_op();
    if !applies(x) || !applies(y) || x.dims() != y.dims() {
        return Ok(None);
    }
    let (x, y) = (x.contiguous()?, y.contiguous()?);
    let (xs, xl) = x.storage_and_layout();
    let (ys, yl) = y.storage_and_layout();
    let (Some((x0, x1)), Some((y0, y1))) = (xl.contiguous_offsets(), yl.contiguous_offsets())
    else {
        return Ok(None);
    };
    let (Storage::Cpu(CpuStorage::BF16(a)), Storage::Cpu(CpuStorage::BF16(b))) = (&*xs, &*ys)
    else {
        return Ok(None);
    };
    let (a, b) = (&a[x0..x1], &b[y0..y1]);
    let mut out = vec![half::bf16::ZERO; a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(out, (a, b))| simpleseg_kernels::dot::add_bf16(a, b, out));
    Ok(Some(Tensor::from_vec(out, x.shape(), x.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::linear::bf16_bits;
    use candle_core::{Device, Var};

    /// The fused gated activation gives [`silu`] then candle's BF16 product, bit for bit
    /// (lengths that leave a scalar tail, a non-contiguous operand); f32 takes the two ops.
    #[test]
    fn silu_mul_equals_the_two_ops() {
        for len in [16, 1000, 3 * CHUNK + 5] {
            let values = simpleseg_kernels::testing::Values(len as u64).take(2 * len);
            let all = (Tensor::from_vec(values, (2, len), &Device::Cpu).unwrap() * 8.0)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let (gate, up) = (all.get(0).unwrap(), all.get(1).unwrap());
            let composed = (silu(&gate).unwrap() * &up).unwrap();
            match silu_mul_bf16(&gate, &up).unwrap() {
                Some(fused) => assert_eq!(
                    bf16_bits(&fused).unwrap(),
                    bf16_bits(&composed).unwrap(),
                    "{len} values"
                ),
                None => eprintln!("fused path skipped: this CPU lacks AVX-512 BW/VL"),
            }
            assert_eq!(
                bf16_bits(&silu_mul(&gate, &up).unwrap()).unwrap(),
                bf16_bits(&composed).unwrap()
            );
        }
        let strided = Tensor::from_vec(
            simpleseg_kernels::testing::Values(9).take(64),
            (8, 8),
            &Device::Cpu,
        )
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
        let (gate, up) = (strided.t().unwrap(), strided.clone());
        let composed = (silu(&gate).unwrap() * &up).unwrap();
        assert_eq!(
            bf16_bits(&silu_mul(&gate, &up).unwrap()).unwrap(),
            bf16_bits(&composed).unwrap()
        );
        let f = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        assert!(silu_mul_bf16(&f, &f).unwrap().is_none());
    }

    /// BF16 sums are candle's, bit for bit (a non-contiguous operand included); f32 sums are
    /// candle's own.
    #[test]
    fn sums_are_candles() {
        let values = simpleseg_kernels::testing::Values(4).take(2 * 3 * 1000);
        let all = Tensor::from_vec(values, (2, 3, 1000), &Device::Cpu).unwrap();
        let (x, y) = (all.get(0).unwrap(), all.get(1).unwrap());
        for dtype in [DType::BF16, DType::F32] {
            let (x, y) = (x.to_dtype(dtype).unwrap(), y.to_dtype(dtype).unwrap());
            let y_strided = y.t().unwrap().contiguous().unwrap().t().unwrap();
            for y in [&y, &y_strided] {
                let bits = |t: &Tensor| -> Vec<u32> {
                    t.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .into_iter()
                        .map(f32::to_bits)
                        .collect()
                };
                let ours = add(&x, y).unwrap();
                assert_eq!(ours.dtype(), dtype);
                assert_eq!(bits(&ours), bits(&(&x + y).unwrap()), "{dtype:?}");
            }
        }
    }

    /// The kernels give candle's values (within f32 roundings: candle's tanh-GELU loses more
    /// to cancellation than the kernel), in f32 and BF16; a tensor in a training graph keeps
    /// candle's op and its gradient.
    #[test]
    fn activations_match_candles_ops() {
        let values = simpleseg_kernels::testing::Values(2).take(6 * 1000);
        let x = Tensor::from_vec(values, (6, 1000), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let x = x.to_dtype(dtype).unwrap();
            for (ours, theirs, tolerance) in [
                (silu(&x).unwrap(), x.silu().unwrap(), 1e-5),
                (gelu_tanh(&x).unwrap(), x.gelu().unwrap(), 1e-5),
            ] {
                assert_eq!(ours.dtype(), dtype);
                assert_eq!(ours.dims(), x.dims());
                // BF16: a rounding of the result (candle's own arithmetic may round more).
                let tolerance = if dtype == DType::BF16 {
                    1.6e-2
                } else {
                    tolerance
                };
                let f32s = |t: &Tensor| -> Vec<f32> {
                    t.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                };
                for (a, b) in f32s(&ours).iter().zip(f32s(&theirs)) {
                    assert!(
                        (a - b).abs() <= tolerance * (1.0 + b.abs()),
                        "{dtype:?}: {a} vs candle's {b}"
                    );
                }
            }
        }
        let var = Var::from_tensor(&x).unwrap();
        let y = silu(var.as_tensor()).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(var.as_tensor()).is_some(),
            "no gradient through silu"
        );
    }
}
