//! Scaled dot-product attention, and its one-new-position form over a grouped-query cache read
//! in place (decoding).

use candle_core::{DType, Result, Tensor, D};
use simpleseg_kernels::dot::{bf16_to_f32, dot_bf16, dot_f32, f32_id};
use simpleseg_kernels::math;

use crate::layers::activation::map_chunks_in_f32;
use crate::layers::linear::{bf16_bits, bf16_tensor, with_bf16_bits};
use crate::layers::mode::Mode;
use crate::layers::rotary::Rotation;

/// Softmax over the last dimension, computed in f32: on the CPU outside a training graph by
/// [`simpleseg_kernels::math::softmax`] (vectorized `exp`, rows in parallel), else by candle's
/// fused op (inference) or differentiable primitives (training).
pub fn softmax_last_dim(x: &Tensor, mode: Mode) -> Result<Tensor> {
    if mode == Mode::Infer && x.rank() > 0 {
        let width = x.dim(D::Minus1)?.max(1);
        // Whole rows in tasks of about 16k values.
        let rows_per_task = (16384 / width).max(1);
        if let Some(y) =
            map_chunks_in_f32(x, rows_per_task * width, |rows| math::softmax(rows, width))?
        {
            return Ok(y);
        }
    }
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
        if let Some(o) = bf16_gemm_attention(q, k, v, mask, scale)? {
            return Ok(o);
        }
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

/// Score matrices smaller than this (a window of the Qwen2.5-VL ViT, a short prompt) go
/// through candle's batched products: per-head GEMM calls cost more than they save there.
const MIN_BF16_GEMM_SCORES: usize = 128 * 128;

/// [`attention`] over BF16 activations on a CPU with AVX512-BF16, one (sequence, head) at a
/// time through [`simpleseg_kernels::bf16_gemm`]: scores `q k^T` in f32 from the BF16 values,
/// scaled and masked, softmax in f32 ([`math::softmax`]), the weights rounded to BF16 and
/// multiplied by `v` (what transformers' eager attention computes for a BF16 model: its
/// softmax is in f32, cast back to the query's dtype before the product with `v`). One head's
/// scores at a time, never the whole `(batch, heads, q_len, k_len)` block. `None` where it
/// does not apply: another CPU, a mask that is not one `(q_len, k_len)` matrix, keys and
/// values not repeated to the queries' heads, or small score matrices.
fn bf16_gemm_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Option<Tensor>> {
    use rayon::prelude::*;
    use simpleseg_kernels::bf16_gemm;

    let (b, heads, lq, d) = q.dims4()?;
    let (_, _, lk, _) = k.dims4()?;
    if !bf16_gemm::available()
        || q.track_op()
        || k.dims4()? != (b, heads, lk, d)
        || v.dims4()? != (b, heads, lk, d)
        || lq * lk < MIN_BF16_GEMM_SCORES
        || [k.dtype(), v.dtype()] != [DType::BF16, DType::BF16]
    {
        return Ok(None);
    }
    let mask: Option<Vec<f32>> = match mask {
        None => None,
        Some(m) if m.elem_count() == lq * lk => {
            Some(m.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        }
        Some(_) => return Ok(None),
    };
    let (qs, ks, vs) = (bf16_bits(q)?, bf16_bits(k)?, bf16_bits(v)?);
    let scale = scale as f32;
    let mut out = vec![0f32; b * heads * lq * d];
    for (i, o) in out.chunks_mut(lq * d).enumerate() {
        let (qi, ki, vi) = (
            &qs[i * lq * d..(i + 1) * lq * d],
            &ks[i * lk * d..(i + 1) * lk * d],
            &vs[i * lk * d..(i + 1) * lk * d],
        );
        let Some(mut scores) = bf16_gemm::gemm_stored(qi, ki, lq, lk, d) else {
            return Ok(None);
        };
        scores.par_chunks_mut(lk).enumerate().for_each(|(r, row)| {
            for (c, x) in row.iter_mut().enumerate() {
                *x *= scale;
                if let Some(m) = &mask {
                    *x += m[r * lk + c];
                }
            }
            math::softmax(row, lk);
        });
        let weights: Vec<u16> = scores
            .par_iter()
            .map(|&x| half::bf16::from_f32(x).to_bits())
            .collect();
        // Row j of v^T: the j-th value of every position.
        let value = |j: usize, row: &mut [u16]| {
            for (t, x) in row.iter_mut().enumerate() {
                *x = vi[t * d + j];
            }
        };
        let Some(y) = bf16_gemm::gemm(&weights, value, lq, d, lk) else {
            return Ok(None);
        };
        o.copy_from_slice(&y);
    }
    Tensor::from_vec(out, (b, heads, lq, d), q.device())?
        .to_dtype(DType::BF16)
        .map(Some)
}

/// Causal self-attention of one prompt with nothing cached before it, through
/// [`simpleseg_kernels::attention::causal`]: queries `(1, heads, s, head_dim)` and keys and
/// values `(1, kv_heads, s, head_dim)` (grouped-query heads shared in place, not repeated),
/// BF16 and contiguous. What [`attention`] computes for BF16 under [`causal_mask`] (f32 scores
/// and softmax, the weights rounded to BF16), returned as `(1, s, heads * head_dim)` (the
/// heads side by side, as the output projection reads them). `None` where it does not apply:
/// a CPU without AMX tiles, training, other dtypes or shapes, tensors not contiguous.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mode: Mode,
) -> Result<Option<Tensor>> {
    use simpleseg_kernels::attention::{self as kernel, Heads};

    let (b, heads, s, d) = q.dims4()?;
    let (_, kv_heads, _, _) = k.dims4()?;
    if mode != Mode::Infer
        || b != 1
        || k.dims4()? != (1, kv_heads, s, d)
        || v.dims4()? != (1, kv_heads, s, d)
        || [q, k, v]
            .iter()
            .any(|t| t.dtype() != DType::BF16 || t.track_op())
    {
        return Ok(None);
    }
    /// Heads laid out one after another, `(heads, s, d)`.
    fn view(values: &[u16], s: usize, d: usize) -> Heads<'_> {
        Heads {
            values,
            offset: 0,
            stride: d,
            head_stride: s * d,
        }
    }
    let out = with_bf16_bits(q, |q| {
        with_bf16_bits(k, |k| {
            with_bf16_bits(v, |v| {
                let (q, k, v) = (view(q, s, d), view(k, s, d), view(v, s, d));
                kernel::causal(q, k, v, s, heads, kv_heads, d, scale as f32)
            })
        })
    });
    match out.flatten().flatten().flatten() {
        Some(out) => bf16_tensor(out, (1, s, heads * d), q.device()).map(Some),
        None => Ok(None),
    }
}

/// [`causal_attention`] of one prompt of `s` positions whose queries, keys and values are BF16
/// bits laid out by position, `(s, heads, d)` each (the heads side by side, as projections
/// write them; no grouped heads): the `(s, heads, d)` output's bits. `None` where the kernel
/// does not run (a CPU without AMX tiles, `d` odd or zero, operands shorter than the sizes).
pub fn causal_attention_by_position(
    q: &[u16],
    k: &[u16],
    v: &[u16],
    s: usize,
    heads: usize,
    d: usize,
    scale: f64,
) -> Option<Vec<u16>> {
    use simpleseg_kernels::attention::{self as kernel, Heads};
    let view = |values| Heads {
        values,
        offset: 0,
        stride: heads * d,
        head_stride: d,
    };
    kernel::causal(view(q), view(k), view(v), s, heads, heads, d, scale as f32)
}

/// Self-attention of a vision tower within segments, fused: `qkv` `(n, 3 * heads * head_dim)`
/// is the fused projection's BF16 output (queries, keys, values, each `heads x head_dim`);
/// queries and keys are turned by `rotation` (in f32, rounded to BF16, as the towers' own
/// rotations round), then each position attends to the positions of its segment
/// `[cu_seqlens[i], cu_seqlens[i + 1])` through [`simpleseg_kernels::attention`]: what
/// [`attention`] computes for BF16 (f32 scores and softmax, weights rounded to BF16 before the
/// product with the values), without per-head copies or whole score matrices. Returns the
/// `(n, heads * head_dim)` BF16 output. `None` where it does not apply: not BF16 on the CPU,
/// training, or a CPU without AVX512-BF16. (On AMX CPUs too it beats [`attention`]'s per-head
/// tile GEMMs: the Qwen2.5-VL ViT on a 640x480 image 3.8 s instead of 4.5 s on 2 cores.)
pub fn segment_attention(
    qkv: &Tensor,
    heads: usize,
    head_dim: usize,
    rotation: &Rotation,
    cu_seqlens: &[usize],
    scale: f64,
    mode: Mode,
) -> Result<Option<Tensor>> {
    use candle_core::{CpuStorage, Storage};
    use half::slice::HalfFloatSliceExt;
    use rayon::prelude::*;
    use simpleseg_kernels::attention::{self as kernel, Heads};

    if mode != Mode::Infer
        || qkv.dtype() != DType::BF16
        || !qkv.device().is_cpu()
        || qkv.track_op()
        || !kernel::available()
    {
        return Ok(None);
    }
    let (n, columns) = qkv.dims2()?;
    let width = heads * head_dim;
    if columns != 3 * width || cu_seqlens.first() != Some(&0) || cu_seqlens.last() != Some(&n) {
        candle_core::bail!(
            "segment attention: qkv {n}x{columns} for {heads} heads of {head_dim}, segments {cu_seqlens:?}"
        );
    }
    let angles = rotation.angles(n, head_dim)?;
    let qkv = qkv.contiguous()?;
    let (storage, layout) = qkv.storage_and_layout();
    let (Storage::Cpu(CpuStorage::BF16(values)), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    else {
        return Ok(None);
    };
    // Queries and keys turned in one pass, positions in parallel; the values are read where
    // they lie.
    let values = &values[start..end];
    let mut turned = vec![0u16; n * 2 * width];
    turned
        .par_chunks_mut(2 * width)
        .zip(values.par_chunks(3 * width))
        .enumerate()
        .for_each(|(t, (out, row))| {
            for (out, x) in out
                .chunks_exact_mut(head_dim)
                .zip(row.chunks_exact(head_dim))
            {
                angles.turn(t, x, out);
            }
        });
    let turned_view = |part: usize| Heads {
        values: &turned,
        offset: part * width,
        stride: 2 * width,
        head_stride: head_dim,
    };
    let values_view = Heads {
        values: values.reinterpret_cast(),
        offset: 2 * width,
        stride: 3 * width,
        head_stride: head_dim,
    };
    let segments: Vec<_> = cu_seqlens.windows(2).map(|w| w[0]..w[1]).collect();
    let Some(out) = kernel::attention(
        turned_view(0),
        turned_view(1),
        values_view,
        &segments,
        heads,
        head_dim,
        scale as f32,
    ) else {
        return Ok(None);
    };
    bf16_tensor(out, (n, width), qkv.device()).map(Some)
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

/// Each (sequence, head) in parallel: scores against its key head, softmax
/// ([`math::softmax`]), then the weighted sum of the value rows.
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
        math::softmax(&mut p, t);
        for (weight, value) in p.iter().zip(values.chunks(d)) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::max_abs_diff;
    use candle_core::Device;

    /// The BF16 GEMM path (long sequences, with and without a causal mask) gives the f32
    /// attention of the same BF16 values within BF16 roundings.
    #[test]
    fn bf16_gemm_attention_equals_f32_attention() {
        if !simpleseg_kernels::bf16_gemm::available() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        let dev = Device::Cpu;
        let (b, heads, len, d) = (2, 3, 150, 72);
        let random = || {
            Tensor::randn(0f32, 1.0, (b, heads, len, d), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let (q, k, v) = (random(), random(), random());
        let mask = causal_mask(len, 0, DType::BF16, &dev).unwrap();
        let scale = (d as f64).powf(-0.5);
        for mask in [None, Some(&mask)] {
            let fast = bf16_gemm_attention(&q, &k, &v, mask, scale)
                .unwrap()
                .expect("applies");
            assert_eq!(
                (fast.dtype(), fast.dims()),
                (DType::BF16, &[b, heads, len, d][..])
            );
            let f32 = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
            let reference = attention(
                &f32(&q),
                &f32(&k),
                &f32(&v),
                mask.map(f32).as_ref(),
                scale,
                Mode::Infer,
            )
            .unwrap();
            let err = max_abs_diff(&f32(&fast), &reference).unwrap();
            assert!(err < 2e-2, "mask {}: {err}", mask.is_some());
        }
        // Short sequences and masks of another shape are left to candle's products.
        let short = q.narrow(2, 0, 100).unwrap();
        assert!(bf16_gemm_attention(&short, &short, &short, None, scale)
            .unwrap()
            .is_none());
    }

    /// The fused causal attention of a prompt equals candle's f32 attention of the same BF16
    /// values (keys and values repeated to the query heads, the causal mask added), within
    /// BF16 roundings, in the layout the output projection reads; a cache before the prompt,
    /// or a batch, is left to the other paths.
    #[test]
    fn causal_attention_equals_f32_attention() {
        let dev = Device::Cpu;
        let (heads, kv_heads, len, d) = (6, 2, 77, 64);
        let random = |heads: usize| {
            Tensor::randn(0f32, 1.0, (1, heads, len, d), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let (q, k, v) = (random(heads), random(kv_heads), random(kv_heads));
        let scale = (d as f64).powf(-0.5);
        let Some(fast) = causal_attention(&q, &k, &v, scale, Mode::Infer).unwrap() else {
            eprintln!("skipped: this CPU has no AMX (or the OS lends no tile data)");
            return;
        };
        assert_eq!(
            (fast.dtype(), fast.dims()),
            (DType::BF16, &[1, len, heads * d][..])
        );
        let f32 = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        let repeat = |x: &Tensor| repeat_kv(&f32(x), heads / kv_heads).unwrap();
        let mask = causal_mask(len, 0, DType::F32, &dev).unwrap();
        let reference = attention(
            &f32(&q),
            &repeat(&k),
            &repeat(&v),
            Some(&mask),
            scale,
            Mode::Infer,
        )
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((1, len, heads * d))
        .unwrap();
        let err = max_abs_diff(&f32(&fast), &reference).unwrap();
        assert!(err < 2e-2, "{err}");
        // Two sequences: not this path.
        let two = Tensor::cat(&[&q, &q], 0).unwrap();
        let two_kv = Tensor::cat(&[&k, &k], 0).unwrap();
        assert!(causal_attention(&two, &two_kv, &two_kv, scale, Mode::Infer)
            .unwrap()
            .is_none());
    }

    /// The fused vision attention equals each tower's unfused steps (queries and keys turned
    /// by candle's ops in f32 and rounded to BF16, then f32 attention within each segment)
    /// within BF16 roundings, for both rotations and segments that are not block multiples.
    #[test]
    fn segment_attention_equals_rotation_then_attention_per_segment() {
        if !simpleseg_kernels::attention::available() {
            eprintln!("skipped: this CPU lacks AVX512-BF16 (the unfused path runs)");
            return;
        }
        let dev = Device::Cpu;
        let (n, heads, d) = (90, 2, 8);
        let cu = [0, 37, 90];
        let scale = (d as f64).powf(-0.5);
        let qkv = Tensor::randn(0f32, 1.0, (n, 3 * heads * d), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let x = qkv
            .to_dtype(DType::F32)
            .unwrap()
            .reshape((n, 3, heads, d))
            .unwrap();
        let part = |i: usize| x.narrow(1, i, 1).unwrap().squeeze(1).unwrap(); // (n, heads, d)
        for pairs in [true, false] {
            let theta = Tensor::randn(0f32, 3.0, (n, if pairs { d / 2 } else { d }), &dev).unwrap();
            let (cos, sin) = (theta.cos().unwrap(), theta.sin().unwrap());
            let rotation = if pairs {
                Rotation::Pairs {
                    cos: &cos,
                    sin: &sin,
                }
            } else {
                Rotation::Halves {
                    cos: &cos,
                    sin: &sin,
                }
            };
            let fused = segment_attention(&qkv, heads, d, &rotation, &cu, scale, Mode::Infer)
                .unwrap()
                .expect("applies");
            assert_eq!(
                (fused.dtype(), fused.dims()),
                (DType::BF16, &[n, heads * d][..])
            );
            let turn = |t: Tensor| -> Tensor {
                let turned = if pairs {
                    let p = t.reshape((n, heads, d / 2, 2)).unwrap();
                    let re = p.narrow(3, 0, 1).unwrap().squeeze(3).unwrap();
                    let im = p.narrow(3, 1, 1).unwrap().squeeze(3).unwrap();
                    let (c, s) = (cos.unsqueeze(1).unwrap(), sin.unsqueeze(1).unwrap());
                    let mul = |a: &Tensor, b: &Tensor| a.broadcast_mul(b).unwrap();
                    let out_re = (mul(&re, &c) - mul(&im, &s)).unwrap();
                    let out_im = (mul(&re, &s) + mul(&im, &c)).unwrap();
                    Tensor::stack(&[out_re, out_im], 3)
                        .unwrap()
                        .reshape((n, heads, d))
                        .unwrap()
                } else {
                    let t = t.transpose(0, 1).unwrap().contiguous().unwrap();
                    crate::layers::apply_rotary(
                        &t,
                        &cos.unsqueeze(0).unwrap(),
                        &sin.unsqueeze(0).unwrap(),
                    )
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                };
                turned
                    .to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
            };
            let (q, k, v) = (turn(part(0)), turn(part(1)), part(2));
            let outputs: Vec<Tensor> = cu
                .windows(2)
                .map(|w| {
                    let segment = |t: &Tensor| {
                        t.narrow(0, w[0], w[1] - w[0])
                            .unwrap()
                            .transpose(0, 1)
                            .unwrap()
                            .contiguous()
                            .unwrap()
                            .unsqueeze(0)
                            .unwrap()
                    };
                    attention(
                        &segment(&q),
                        &segment(&k),
                        &segment(&v),
                        None,
                        scale,
                        Mode::Infer,
                    )
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .reshape((w[1] - w[0], heads * d))
                    .unwrap()
                })
                .collect();
            let reference = Tensor::cat(&outputs, 0).unwrap();
            let err = max_abs_diff(&fused.to_dtype(DType::F32).unwrap(), &reference).unwrap();
            assert!(err < 2e-2, "pairs {pairs}: {err}");
        }
    }

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
    fn causal_mask_shape() {
        let m = causal_mask(2, 3, DType::F32, &Device::Cpu).unwrap();
        let v: Vec<Vec<f32>> = m.to_vec2().unwrap();
        assert_eq!(v[0], vec![0.0, 0.0, 0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(v[1], vec![0.0; 5]);
    }
}
