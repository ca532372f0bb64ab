//! Self-attention over BF16 queries, keys and values within segments of a sequence (the
//! images of a vision tower, or its windows), on CPUs with AVX512-BF16, as one parallel pass
//! over (segment, head, block of 48 queries): no per-head copies of the inputs, no score
//! matrix larger than one block's, and the queries', keys' and values' heads read in place
//! from the fused `qkv` projection.
//!
//! For each block it computes what transformers' eager attention computes for a BF16 model:
//! scores `k q^T` in f32 (the [`crate::bf16_gemm`] micro-kernel, one key row of the block's
//! 48 queries per step), scaled, softmax in f32 over each query's keys ([`crate::math`]'s
//! `exp`, the exponentials multiplied by their sum's inverse), the weights rounded to BF16 and multiplied by the values in f32 (`v^T p^T`, the
//! same micro-kernel), the result rounded to BF16. The scores are laid out key by key, 48
//! queries side by side, so the softmax runs down columns in three registers and its rounded
//! weights land, pair by pair, in the layout the second product reads: no transposition.
//!
//! Where the CPU has AMX tiles the same computation runs on them (`amx_attention`: blocks of
//! 32 queries, the products as 16 x 16 tiles, the softmax along rows, its exponentials
//! rounded before their normalization, which scales the output, as PyTorch's CPU flash
//! attention does): the MoonViT case of `bench_kernels` (1656 positions, 16 heads of 72) in
//! 25 ms instead of 79 ms on two Xeon cores.

use std::ops::Range;

use rayon::prelude::*;

use crate::bf16_gemm::{KC, MR, NR};

/// Queries per block: one panel of the micro-kernel.
const QB: usize = NR;

/// The heads of one projection, BF16 bits: value `j` of head `h` at position `t` is
/// `values[offset + t * stride + h * head_stride + j]` (for a fused `qkv` output `(n, 3,
/// heads, head_dim)`: `stride = 3 * heads * head_dim`, `head_stride = head_dim` and `offset`
/// 0, 1 or 2 times `heads * head_dim`; for heads laid out one after another, `(heads, n,
/// head_dim)`: `stride = head_dim` and `head_stride = n * head_dim`).
#[derive(Clone, Copy, Debug)]
pub struct Heads<'a> {
    /// The projection's values.
    pub values: &'a [u16],
    /// Where position 0's head 0 starts.
    pub offset: usize,
    /// Values from one position to the next.
    pub stride: usize,
    /// Values from one head to the next.
    pub head_stride: usize,
}

impl Heads<'_> {
    /// Where head `h`'s values at position `t` start.
    pub(crate) fn at(&self, t: usize, h: usize) -> usize {
        self.offset + t * self.stride + h * self.head_stride
    }

    /// Whether the values hold `heads` heads of `head_dim` values at positions `0..n`.
    fn holds(&self, n: usize, heads: usize, head_dim: usize) -> bool {
        n == 0 || heads == 0 || self.at(n - 1, heads - 1) + head_dim <= self.values.len()
    }
}

/// Whether this CPU runs [`attention`]: AVX-512 F and BF16.
pub fn available() -> bool {
    crate::cpu::avx512_bf16()
}

/// Attention of every position to the positions of its segment (no mask within a segment):
/// `softmax(scale q k^T) v` per head, as described in the module docs. `segments` must tile
/// `0..n` in order (`n` the last one's end); returns the `(n, heads * head_dim)` output as
/// BF16 bits, row-major. `None` when the CPU lacks AVX512-BF16 ([`available`]), `head_dim` is
/// odd or zero, the segments do not tile `0..n`, or a view is too short for `n` positions.
pub fn attention(
    q: Heads,
    k: Heads,
    v: Heads,
    segments: &[Range<usize>],
    heads: usize,
    head_dim: usize,
    scale: f32,
) -> Option<Vec<u16>> {
    #[cfg(target_arch = "x86_64")]
    let tiles = crate::amx_attention::available();
    #[cfg(not(target_arch = "x86_64"))]
    let tiles = false;
    attention_on(tiles, q, k, v, segments, heads, head_dim, scale)
}

/// [`attention`] on AMX tiles (`tiles`, which the caller checked are available) or on the
/// AVX512-BF16 micro-kernel.
#[expect(
    clippy::too_many_arguments,
    reason = "the public function's operands and the kernel's choice"
)]
fn attention_on(
    tiles: bool,
    q: Heads,
    k: Heads,
    v: Heads,
    segments: &[Range<usize>],
    heads: usize,
    head_dim: usize,
    scale: f32,
) -> Option<Vec<u16>> {
    let n = segments.last().map_or(0, |s| s.end);
    let tiled = segments
        .iter()
        .zip(std::iter::once(0).chain(segments.iter().map(|s| s.end)))
        .all(|(s, start)| s.start == start && s.end >= s.start);
    if !available()
        || heads == 0
        || head_dim == 0
        || !head_dim.is_multiple_of(2)
        || !tiled
        || ![q, k, v].iter().all(|x| x.holds(n, heads, head_dim))
    {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        Some(if tiles {
            let shape = crate::amx_attention::Shape {
                heads,
                group: 1,
                d: head_dim,
                causal: false,
            };
            crate::amx_attention::attention(q, k, v, segments, shape, scale, n)
        } else {
            attention_x86(q, k, v, segments, heads, head_dim, scale, n)
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (scale, tiles);
        None
    }
}

/// Causal self-attention of one sequence of `n` positions (a prompt's prefill): position `t`
/// attends to positions `0..=t`, query head `h` to key and value head `h / (heads /
/// kv_heads)` (grouped-query attention, no copies of the shared heads); otherwise what
/// [`attention`] computes, the masked weights exactly zero. Returns the `(n, heads *
/// head_dim)` output as BF16 bits, row-major. Runs on AMX tiles only: `None` on other CPUs
/// (callers keep their own path there), or when `head_dim` is odd or zero, `kv_heads` does
/// not divide `heads`, or a view is too short.
#[expect(
    clippy::too_many_arguments,
    reason = "three views and the sizes that read them"
)]
pub fn causal(
    q: Heads,
    k: Heads,
    v: Heads,
    n: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
) -> Option<Vec<u16>> {
    #[cfg(target_arch = "x86_64")]
    {
        let runs = available() && crate::amx_attention::available();
        let sizes = kv_heads > 0 && heads.is_multiple_of(kv_heads) && head_dim > 0;
        if !runs
            || !sizes
            || !head_dim.is_multiple_of(2)
            || !q.holds(n, heads, head_dim)
            || ![k, v].iter().all(|x| x.holds(n, kv_heads, head_dim))
        {
            return None;
        }
        let shape = crate::amx_attention::Shape {
            heads,
            group: heads / kv_heads,
            d: head_dim,
            causal: true,
        };
        Some(crate::amx_attention::attention(
            q,
            k,
            v,
            std::slice::from_ref(&(0..n)),
            shape,
            scale,
            n,
        ))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (q, k, v, n, heads, kv_heads, head_dim, scale);
        None
    }
}

/// One (segment, head)'s values transposed, `head_dim` rows of the segment's length rounded up
/// to even (zero beyond), the left operand of `v^T p^T`.
struct ValuesT {
    values: Vec<u16>,
    /// Row stride (even).
    len2: usize,
}

#[cfg(target_arch = "x86_64")]
#[expect(
    clippy::too_many_arguments,
    reason = "the public function's operands, passed on"
)]
fn attention_x86(
    q: Heads,
    k: Heads,
    v: Heads,
    segments: &[Range<usize>],
    heads: usize,
    d: usize,
    scale: f32,
    n: usize,
) -> Vec<u16> {
    let width = heads * d;
    let pairs = |s: &Range<usize>| s.len().div_ceil(2);
    // The values of every (segment, head), transposed once for all its query blocks.
    let values_t: Vec<ValuesT> = (0..segments.len() * heads)
        .into_par_iter()
        .map(|i| {
            let (s, h) = (&segments[i / heads], i % heads);
            let len2 = 2 * pairs(s);
            let mut values = vec![0u16; d * len2];
            for (t, pos) in s.clone().enumerate() {
                let src = &v.values[v.at(pos, h)..][..d];
                for (j, &x) in src.iter().enumerate() {
                    values[j * len2 + t] = x;
                }
            }
            ValuesT { values, len2 }
        })
        .collect();
    // Tasks: (segment, head, first query of the block).
    let tasks: Vec<(usize, usize, usize)> = segments
        .iter()
        .enumerate()
        .flat_map(|(si, s)| {
            (0..heads).flat_map(move |h| (0..s.len()).step_by(QB).map(move |q0| (si, h, q0)))
        })
        .collect();
    let longest = segments.iter().map(Range::len).max().unwrap_or(0);
    let mut out = vec![0u16; n * width];
    let out_ptr = SharedBits(out.as_mut_ptr());
    tasks.into_par_iter().for_each_init(
        || Scratch {
            queries: vec![0u32; d / 2 * QB],
            scores: vec![0f32; longest.div_ceil(2) * 2 * QB],
            weights: vec![0u32; longest.div_ceil(2) * QB],
            sums: vec![0f32; d * QB],
        },
        |scratch, (si, h, q0)| {
            let out_ptr = &out_ptr;
            let s = &segments[si];
            let qn = QB.min(s.len() - q0);
            let vt = &values_t[si * heads + h];
            // SAFETY: the CPU has AVX512-BF16 and F (`attention` checked); the views hold every
            // position of the segments (checked); the task writes rows s.start + q0 .. + qn of
            // head h's columns only, which no other task writes.
            unsafe {
                block(
                    scratch,
                    BlockArgs {
                        q,
                        k,
                        vt,
                        first_query: s.start + q0,
                        queries: qn,
                        keys: s.clone(),
                        head: h,
                        d,
                        scale,
                        out: out_ptr.0.add((s.start + q0) * width + h * d),
                        out_stride: width,
                    },
                )
            };
        },
    );
    out
}

/// The output's pointer, moved into the tasks, each of which writes its own rows and columns.
pub(crate) struct SharedBits(pub(crate) *mut u16);
// SAFETY: every task writes a disjoint part (its block's rows, its head's columns).
unsafe impl Sync for SharedBits {}
unsafe impl Send for SharedBits {}

/// A task's buffers, reused from block to block.
struct Scratch {
    /// The block's queries packed as a panel: pair `p` of the 48 queries side by side.
    queries: Vec<u32>,
    /// Scores, then weights, key by key: `scores[key * 48 + query]`.
    scores: Vec<f32>,
    /// The weights rounded to BF16 and packed as a panel: pair of keys `p`, 48 queries.
    weights: Vec<u32>,
    /// `v^T p^T`: `sums[j * 48 + query]`.
    sums: Vec<f32>,
}

struct BlockArgs<'a> {
    q: Heads<'a>,
    k: Heads<'a>,
    vt: &'a ValuesT,
    first_query: usize,
    queries: usize,
    keys: Range<usize>,
    head: usize,
    d: usize,
    scale: f32,
    /// The block's first output value (row `first_query`, head `head`).
    out: *mut u16,
    out_stride: usize,
}

/// One block of queries against its segment's keys.
///
/// # Safety
/// The CPU has AVX-512 F and BF16; the views hold the block's queries and the segment's keys;
/// `out` is valid for `queries` rows of `d` values at stride `out_stride`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn block(scratch: &mut Scratch, a: BlockArgs) {
    use crate::bf16_gemm::kernel_rows;
    use std::arch::x86_64::*;

    let d = a.d;
    let len = a.keys.len();
    let len2 = a.vt.len2;
    // The queries as a panel (zero beyond the block).
    scratch.queries.fill(0);
    for r in 0..a.queries {
        let row = &a.q.values[a.q.at(a.first_query + r, a.head)..][..d];
        for (p, pair) in row.chunks_exact(2).enumerate() {
            scratch.queries[p * QB + r] = u32::from(pair[0]) | u32::from(pair[1]) << 16;
        }
    }
    // Scores: key rows against the query panel, 8 keys per call.
    let keys = &a.k.values[a.k.at(a.keys.start, a.head)..];
    for k0 in (0..len).step_by(MR) {
        // SAFETY: rows k0..k0+8 (at most) of the segment's keys, d values each at stride
        // k.stride; the panel holds d / 2 pairs of 48; the scores hold rows k0.. of 48.
        unsafe {
            kernel_rows(
                len - k0,
                (
                    &keys[k0 * a.k.stride..],
                    a.k.stride,
                    &scratch.queries,
                    d,
                    scratch.scores.as_mut_ptr().add(k0 * QB),
                    QB,
                    QB,
                    false,
                ),
            )
        };
    }
    // Softmax down each query's column: scaled scores, their maximum, exponentials and their
    // sum (key by key), then the weights rounded to BF16 in pairs of keys.
    let scores = &mut scratch.scores[..len * QB];
    let scale = _mm512_set1_ps(a.scale);
    let mut max = [_mm512_set1_ps(f32::NEG_INFINITY); 3];
    for row in scores.chunks_exact_mut(QB) {
        for (c, m) in max.iter_mut().enumerate() {
            // SAFETY: 16 values at c * 16 of a 48-value row.
            unsafe {
                let p = row.as_mut_ptr().add(c * 16);
                let x = _mm512_mul_ps(_mm512_loadu_ps(p), scale);
                _mm512_storeu_ps(p, x);
                *m = _mm512_max_ps(*m, x);
            }
        }
    }
    let mut sum = [_mm512_setzero_ps(); 3];
    for row in scores.chunks_exact_mut(QB) {
        for c in 0..3 {
            // SAFETY: as above.
            unsafe {
                let p = row.as_mut_ptr().add(c * 16);
                // At most 0: the column's maximum is subtracted (a NaN score makes the
                // column's output NaN whatever its other exponentials are).
                let e =
                    crate::math::exp_nonpositive_avx512(_mm512_sub_ps(_mm512_loadu_ps(p), max[c]));
                _mm512_storeu_ps(p, e);
                sum[c] = _mm512_add_ps(sum[c], e);
            }
        }
    }
    // Weights: the exponentials times their sum's inverse (one division per query, not one
    // per weight; within an f32 rounding of the quotient).
    let inverse = sum.map(|s| _mm512_div_ps(_mm512_set1_ps(1.0), s));
    let weights = &mut scratch.weights[..len2 / 2 * QB];
    for (p, pair) in weights.chunks_exact_mut(QB).enumerate() {
        for (c, inverse) in inverse.iter().enumerate() {
            let weight = |key: usize| {
                if key < len {
                    // SAFETY: key < len rows of 48.
                    let e = unsafe { _mm512_loadu_ps(scores.as_ptr().add(key * QB + c * 16)) };
                    bf16_in_high_half(_mm512_mul_ps(e, *inverse))
                } else {
                    _mm512_setzero_si512()
                }
            };
            let (lo, hi) = (weight(2 * p), weight(2 * p + 1));
            let packed = _mm512_or_si512(
                _mm512_and_si512(hi, _mm512_set1_epi32(0xffff_0000_u32 as i32)),
                _mm512_srli_epi32::<16>(lo),
            );
            // SAFETY: 16 values at c * 16 of a 48-value row.
            unsafe { _mm512_storeu_si512(pair.as_mut_ptr().add(c * 16).cast(), packed) };
        }
    }
    // v^T p^T: d rows of transposed values against the weights' panel, in cache blocks of keys.
    for r0 in (0..d).step_by(MR) {
        for kb in (0..len2).step_by(KC) {
            // SAFETY: rows r0.. of the transposed values (len2 each), the panel's pairs from
            // kb / 2, the sums' rows r0.. of 48.
            unsafe {
                kernel_rows(
                    d - r0,
                    (
                        &a.vt.values[r0 * len2 + kb..],
                        len2,
                        &weights[kb / 2 * QB..],
                        KC.min(len2 - kb),
                        scratch.sums.as_mut_ptr().add(r0 * QB),
                        QB,
                        QB,
                        kb > 0,
                    ),
                )
            };
        }
    }
    for r in 0..a.queries {
        // SAFETY: row r < queries of the output, d values.
        let row = unsafe { std::slice::from_raw_parts_mut(a.out.add(r * a.out_stride), d) };
        for (j, o) in row.iter_mut().enumerate() {
            *o = half::bf16::from_f32(scratch.sums[j * QB + r]).to_bits();
        }
    }
}

/// Each lane rounded to BF16 (to nearest, ties to even; NaN kept quiet), as
/// `half::bf16::from_f32` rounds, in the high 16 bits of its lane.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn bf16_in_high_half(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let bits = _mm512_castps_si512(x);
    let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    let quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x0040_0000));
    _mm512_mask_blend_epi32(_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x), rounded, quiet)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Values;
    use half::bf16;

    /// Every (position, head) against a reference in f64 from the same BF16 values: the
    /// scores and their softmax exact, then the weights rounded to BF16 as the kernel rounds
    /// them. Segments of awkward lengths (1, odd, several blocks of queries, more than a
    /// cache block of keys), heads of 10 values and of 72 and 80 (MoonViT's and the
    /// Qwen2.5-VL ViT's: steps of 32 with a partial last one), inputs read in place from a
    /// fused qkv layout; the AVX512-BF16 kernel and, where the CPU has them, AMX tiles.
    #[test]
    fn matches_a_reference_within_each_segment() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        #[cfg(target_arch = "x86_64")]
        let tiles = crate::amx_attention::available();
        #[cfg(not(target_arch = "x86_64"))]
        let tiles = false;
        if !tiles {
            eprintln!("AMX kernel skipped: this CPU has no AMX (or the OS lends no tile data)");
        }
        for kernel in [false, true].into_iter().filter(|&t| !t || tiles) {
            for (heads, d, lens) in [
                (3, 10, &[1, 37, 100, 1100][..]),
                (2, 72, &[33, 300][..]),
                (1, 80, &[17, 64, 129][..]),
            ] {
                let worst = worst_difference(kernel, heads, d, lens);
                assert!(
                    worst <= 1.0,
                    "tiles {kernel}, head size {d}: a difference {worst} times what the \
                     roundings allow"
                );
                eprintln!(
                    "tiles {kernel}, head size {d}: largest difference {worst:.3} of the bound"
                );
            }
        }
    }

    /// The reference's weights for one query's (scaled) scores: the softmax in f64, rounded
    /// to BF16 as the kernel rounds it: each weight (the AVX512-BF16 kernel), or, `tiles`,
    /// each exponential before the division by their sum (PyTorch's CPU flash attention's
    /// order, which the AMX kernel follows).
    fn reference_weights(scores: &[f64], tiles: bool) -> Vec<f64> {
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
        let total: f64 = e.iter().sum();
        let rounded = |x: f64| f64::from(bf16::from_f64(x).to_f32());
        e.iter()
            .map(|&x| {
                if tiles {
                    rounded(x) / total
                } else {
                    rounded(x / total)
                }
            })
            .collect()
    }

    /// How far an output `got` lies from the reference `sum w v` (one value of each key), as a
    /// share of what the roundings allow: the output's (half a BF16 step, 2^-9 relative) and
    /// each weight's rounding going the other way (a step, 2^-8 relative) where f32 and f64
    /// land on either side of a tie.
    fn share_of_bound(got: f64, w: &[f64], values: impl Iterator<Item = f64>) -> f64 {
        let (want, spread) = w
            .iter()
            .zip(values)
            .fold((0.0, 0.0), |(sum, spread), (w, v)| {
                (sum + w * v, spread + (w * v).abs())
            });
        let bound = f64::abs(want) / 512.0 + spread / 256.0 + 1e-6;
        (got - want).abs() / bound
    }

    /// The largest difference of the kernel's output from the reference (see above), as a
    /// share of what the roundings allow.
    fn worst_difference(tiles: bool, heads: usize, d: usize, lens: &[usize]) -> f64 {
        let n: usize = lens.iter().sum();
        let width = heads * d;
        let qkv: Vec<u16> = Values(7)
            .take(n * 3 * width)
            .into_iter()
            .map(|x| bf16::from_f32(2.0 * x).to_bits())
            .collect();
        let mut segments = Vec::new();
        let mut start = 0;
        for &len in lens {
            segments.push(start..start + len);
            start += len;
        }
        let view = |part: usize| Heads {
            values: &qkv,
            offset: part * width,
            stride: 3 * width,
            head_stride: d,
        };
        let scale = 0.4;
        let got = attention_on(tiles, view(0), view(1), view(2), &segments, heads, d, scale)
            .expect("available");
        let at = |part: usize, t: usize, h: usize, j: usize| {
            f64::from(bf16::from_bits(qkv[t * 3 * width + part * width + h * d + j]).to_f32())
        };
        let mut worst = 0f64;
        for s in &segments {
            for h in 0..heads {
                for t in s.clone() {
                    let scores: Vec<f64> = s
                        .clone()
                        .map(|u| (0..d).map(|j| at(0, t, h, j) * at(1, u, h, j)).sum::<f64>())
                        .map(|x| x * f64::from(scale))
                        .collect();
                    let w = reference_weights(&scores, tiles);
                    for j in 0..d {
                        let g = f64::from(bf16::from_bits(got[t * width + h * d + j]).to_f32());
                        let values = s.clone().map(|u| at(2, u, h, j));
                        worst = worst.max(share_of_bound(g, &w, values));
                    }
                }
            }
        }
        worst
    }

    /// [`causal`] against a reference in f64 (as above, each position over the positions up
    /// to it): grouped-query heads laid out one after another (a prompt's `(heads, n,
    /// head_dim)` queries, keys and values), lengths of one block, a partial block and
    /// several, heads of 128 values (Qwen2's) and of 10.
    #[test]
    fn causal_matches_a_reference() {
        #[cfg(target_arch = "x86_64")]
        let tiles = available() && crate::amx_attention::available();
        #[cfg(not(target_arch = "x86_64"))]
        let tiles = false;
        if !tiles {
            eprintln!("skipped: this CPU has no AMX (or the OS lends no tile data)");
            return;
        }
        for (n, heads, kv_heads, d) in [(32, 2, 1, 10), (77, 4, 2, 128), (200, 3, 3, 128)] {
            let values = |seed: u64, heads: usize| -> Vec<u16> {
                Values(seed)
                    .take(heads * n * d)
                    .into_iter()
                    .map(|x| bf16::from_f32(2.0 * x).to_bits())
                    .collect()
            };
            let (qs, ks, vs) = (
                values(11, heads),
                values(12, kv_heads),
                values(13, kv_heads),
            );
            let view = |values| Heads {
                values,
                offset: 0,
                stride: d,
                head_stride: n * d,
            };
            let scale = 0.3;
            let got = causal(
                view(&qs),
                view(&ks),
                view(&vs),
                n,
                heads,
                kv_heads,
                d,
                scale,
            )
            .expect("AMX present");
            let at = |x: &[u16], h: usize, t: usize, j: usize| {
                f64::from(bf16::from_bits(x[h * n * d + t * d + j]).to_f32())
            };
            let mut worst = 0f64;
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                for t in 0..n {
                    let scores: Vec<f64> = (0..=t)
                        .map(|u| {
                            (0..d)
                                .map(|j| at(&qs, h, t, j) * at(&ks, g, u, j))
                                .sum::<f64>()
                        })
                        .map(|x| x * f64::from(scale))
                        .collect();
                    let w = reference_weights(&scores, true);
                    for j in 0..d {
                        let o = f64::from(bf16::from_bits(got[t * heads * d + h * d + j]).to_f32());
                        let values = (0..=t).map(|u| at(&vs, g, u, j));
                        worst = worst.max(share_of_bound(o, &w, values));
                    }
                }
            }
            assert!(
                worst <= 1.0,
                "n {n}, head size {d}: a difference {worst} times the bound"
            );
            eprintln!("n {n}, head size {d}: largest difference {worst:.3} of the bound");
        }
        // A view too short for its heads, and heads not a multiple of the key heads.
        let short = vec![0u16; 10];
        let view = Heads {
            values: &short,
            offset: 0,
            stride: 2,
            head_stride: 8,
        };
        assert!(causal(view, view, view, 4, 2, 2, 2, 1.0).is_none());
        let fits = vec![0u16; 64];
        let view = Heads {
            values: &fits,
            ..view
        };
        assert!(causal(view, view, view, 4, 3, 2, 2, 1.0).is_none());
        assert!(causal(view, view, view, 4, 2, 2, 2, 1.0).is_some());
    }

    #[test]
    fn refuses_segments_that_do_not_tile_the_sequence() {
        let values = vec![0u16; 3 * 4 * 2];
        let view = |offset| Heads {
            values: &values,
            offset,
            stride: 6,
            head_stride: 2,
        };
        let (q, k, v) = (view(0), view(2), view(4));
        assert!(attention(q, k, v, &[1..2, 2..4], 1, 2, 1.0).is_none());
        assert!(attention(q, k, v, &[0..2, 3..4], 1, 2, 1.0).is_none());
        // Odd head size, and more positions than the values hold.
        assert!(attention(q, k, v, &[0..2, 2..4], 1, 1, 1.0).is_none());
        assert!(attention(q, k, v, &[0..2, 2..5], 1, 2, 1.0).is_none());
        // The same operands, tiled and in bounds, are taken.
        assert_eq!(
            attention(q, k, v, &[0..2, 2..4], 1, 2, 1.0).is_some(),
            available()
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn rounds_to_bf16_as_half_does() {
        if !crate::cpu::avx512_bf16() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let cases = [
            0.0f32,
            -0.0,
            1.0,
            1.0 + f32::EPSILON * 64.0,
            3.0e-39,
            f32::MAX,
            f32::INFINITY,
            f32::NAN,
            -f32::NAN,
            1.003_906_2,
            1.011_718_8,
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x7fa0_0000),
        ];
        for chunk in cases.chunks(16).chain(Values(3).take(64).chunks(16)) {
            let mut lanes = [0f32; 16];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let mut out = [0u32; 16];
            // SAFETY: the CPU has AVX-512 F; 16 values each way.
            unsafe {
                use std::arch::x86_64::*;
                let x = _mm512_loadu_ps(lanes.as_ptr());
                _mm512_storeu_si512(out.as_mut_ptr().cast(), bf16_in_high_half(x));
            }
            for (x, o) in lanes.iter().zip(out) {
                assert_eq!((o >> 16) as u16, bf16::from_f32(*x).to_bits(), "{x:e}");
            }
        }
    }
}
