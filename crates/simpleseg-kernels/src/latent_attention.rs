//! Multi-head latent attention (DeepSeek-V3's MLA, Kimi-VL's language model) in the absorbed
//! form, for decoding steps: every head attends over the one shared latent cache; the key half
//! of `kv_b_proj` is folded into each query and its value half applied to the attended latent.
//! The weights and the cache are read in place, as stored (BF16 or f32) and widened exactly;
//! every product sums in f32.
//!
//! For one query row of one head, with `W_k = kv_b[head][..nope]` and `W_v =
//! kv_b[head][nope..]` (rows of `latent` values):
//!
//! ```text
//! q_latent = q_nope W_k                                  (latent)
//! score[t] = (q_latent . c[t] + q_rope . k_rope[t]) scale + mask[t]
//! p        = softmax(score)
//! out      = W_v (sum_t p[t] c[t])                       (v_dim)
//! ```
//!
//! Compared with candle's batched products over f32 copies of `W_k` and `W_v` (8 MB a layer at
//! Kimi-VL's sizes, read at every step, and the whole cache widened to f32 first), this reads
//! the weights once a step in their stored width and the cache in place.

use rayon::prelude::*;

use crate::dot::{add_scaled_bf16, add_scaled_f32, dot_bf16, dot_f32};

/// Values read in place: f32, or BF16 widened exactly.
pub trait Stored: Copy + Send + Sync {
    /// `x . w` in f32 ([`dot_f32`], [`dot_bf16`]).
    fn dot(x: &[f32], w: &[Self]) -> f32;
    /// `y += a w` in f32 ([`add_scaled_f32`], [`add_scaled_bf16`]).
    fn add_scaled(y: &mut [f32], a: f32, w: &[Self]);
    /// The values as BF16 bits, where they are BF16 (what the AVX-512 kernels read).
    fn bf16_bits(values: &[Self]) -> Option<&[u16]>;
}

impl Stored for f32 {
    fn dot(x: &[f32], w: &[f32]) -> f32 {
        dot_f32(x, w)
    }
    fn add_scaled(y: &mut [f32], a: f32, w: &[f32]) {
        add_scaled_f32(y, a, w)
    }
    fn bf16_bits(_: &[f32]) -> Option<&[u16]> {
        None
    }
}

impl Stored for half::bf16 {
    fn dot(x: &[f32], w: &[half::bf16]) -> f32 {
        dot_bf16(x, w)
    }
    fn add_scaled(y: &mut [f32], a: f32, w: &[half::bf16]) {
        add_scaled_bf16(y, a, w)
    }
    fn bf16_bits(values: &[half::bf16]) -> Option<&[u16]> {
        use half::slice::HalfFloatSliceExt;
        Some(values.reinterpret_cast())
    }
}

/// A layer's attention sizes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sizes {
    /// Attention heads.
    pub heads: usize,
    /// Each head's query and key values without rotation (`qk_nope_head_dim`).
    pub nope: usize,
    /// Each head's rotated query and the shared rotated key (`qk_rope_head_dim`).
    pub rope: usize,
    /// Each head's values (`v_head_dim`).
    pub v_dim: usize,
    /// The compressed latent (`kv_lora_rank`).
    pub latent: usize,
    /// The factor of the scores (`(nope + rope)^-0.5`).
    pub scale: f32,
}

/// A group of query rows over their caches: `batch` sequences, each with `queries` rows per
/// head after `positions - queries` cached ones, every slice row-major.
#[derive(Clone, Copy, Debug)]
pub struct Queries<'a, C> {
    /// Sequences.
    pub batch: usize,
    /// Query rows per sequence.
    pub queries: usize,
    /// Cached positions per sequence, the queries' own included.
    pub positions: usize,
    /// The queries' unrotated parts `(batch, heads, queries, nope)`.
    pub q_nope: &'a [f32],
    /// The queries' rotated parts `(batch, heads, queries, rope)`.
    pub q_rope: &'a [f32],
    /// The latent cache `(batch, positions, latent)`.
    pub latent: &'a [C],
    /// The rotated keys `(batch, positions, rope)`.
    pub k_rope: &'a [C],
    /// An additive mask `(batch, queries, positions)`, or none.
    pub mask: Option<&'a [f32]>,
}

/// Every head's attention output `(batch, heads, queries, v_dim)` in f32, from `kv_b` as
/// stored `(heads, nope + v_dim, latent)`. `None` where a size is zero or a slice's length does
/// not match the sizes. Each stage runs in parallel (over heads, positions or latent values), and each
/// output is summed in an order that depends only on the sizes and the CPU's instructions.
pub fn absorbed<W: Stored, C: Stored>(
    sizes: &Sizes,
    kv_b: &[W],
    q: &Queries<'_, C>,
) -> Option<Vec<f32>> {
    absorbed_on(sizes, kv_b, q, crate::cpu::avx512_bw_vl())
}

/// [`absorbed`], on the AVX-512 kernels where `blocked` (the caller has checked the CPU) for
/// what is stored in BF16, on the portable loops otherwise.
fn absorbed_on<W: Stored, C: Stored>(
    sizes: &Sizes,
    kv_b: &[W],
    q: &Queries<'_, C>,
    blocked: bool,
) -> Option<Vec<f32>> {
    let Sizes {
        heads,
        nope,
        rope,
        v_dim,
        latent,
        scale,
    } = *sizes;
    let (b, s, t) = (q.batch, q.queries, q.positions);
    let fits = [heads, nope, rope, v_dim, latent].iter().all(|&n| n > 0)
        && kv_b.len() == heads * (nope + v_dim) * latent
        && q.q_nope.len() == b * heads * s * nope
        && q.q_rope.len() == b * heads * s * rope
        && q.latent.len() == b * t * latent
        && q.k_rope.len() == b * t * rope
        && q.mask.is_none_or(|m| m.len() == b * s * t)
        && s <= t;
    if !fits {
        return None;
    }
    // Every head's query rows of one sequence attend over the same cache: `rows` of them.
    let rows = heads * s;
    let mut out = vec![0f32; b * rows * v_dim];
    if out.is_empty() {
        return Some(out);
    }
    for (seq, out) in out.chunks_exact_mut(rows * v_dim).enumerate() {
        let c = &q.latent[seq * t * latent..][..t * latent];
        let k_rope = &q.k_rope[seq * t * rope..][..t * rope];
        let q_nope = &q.q_nope[seq * rows * nope..][..rows * nope];
        let q_latent = key_half(sizes, kv_b, q_nope, s, blocked);
        let q_rope = &q.q_rope[seq * rows * rope..][..rows * rope];
        let mut p = scores(&q_latent, q_rope, c, k_rope, rows, blocked);
        let mask = q.mask.map(|m| &m[seq * s * t..][..s * t]);
        p.par_chunks_mut(t).enumerate().for_each(|(row, p)| {
            let mask = mask.map(|m| &m[row % s * t..][..t]);
            for (i, p) in p.iter_mut().enumerate() {
                *p = *p * scale + mask.map_or(0.0, |m| m[i]);
            }
            crate::math::softmax(p, t);
        });
        let o_latent = weighted_sum(&p, c, rows, blocked);
        value_half(sizes, kv_b, &o_latent, s, out, blocked);
    }
    Some(out)
}

/// Weight rows read side by side by the AVX-512 kernels of `kv_b`'s halves: rows a quarter
/// of the half apart, so that the CPU streams four regions of memory at once (one stream at a
/// time left a core at ~4 GB/s).
#[cfg(target_arch = "x86_64")]
const STREAMS: usize = 4;

/// Each query row through its head's key half: `(heads * s, latent)` from `q_nope`
/// `(heads * s, nope)`, heads in parallel.
fn key_half<W: Stored>(
    sizes: &Sizes,
    kv_b: &[W],
    q_nope: &[f32],
    s: usize,
    blocked: bool,
) -> Vec<f32> {
    let Sizes {
        nope,
        v_dim,
        latent,
        ..
    } = *sizes;
    let mut q_latent = vec![0f32; q_nope.len() / nope.max(1) * latent];
    let bits = W::bf16_bits(kv_b).filter(|_| blocked);
    q_latent
        .par_chunks_mut(s * latent)
        .zip(q_nope.par_chunks_exact(s * nope))
        .enumerate()
        .for_each(|(head, (q_latent, q_nope))| {
            let at = head * (nope + v_dim) * latent;
            let rows = q_latent
                .chunks_exact_mut(latent)
                .zip(q_nope.chunks_exact(nope));
            for (q_latent, q) in rows {
                match bits {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `blocked`: the CPU has AVX-512 F, BW and VL (the caller's
                    // check); the head's key half holds `nope` rows of `latent` values.
                    Some(bits) => unsafe {
                        scaled_rows_avx512(q, &bits[at..][..nope * latent], q_latent)
                    },
                    _ => {
                        let weights = kv_b[at..][..nope * latent].chunks_exact(latent);
                        for (a, w) in q.iter().zip(weights) {
                            W::add_scaled(q_latent, *a, w);
                        }
                    }
                }
            }
        });
    q_latent
}

/// Each head's output from its attended latent `(heads * s, latent)` through its value half,
/// into `out` `(heads * s, v_dim)`: one dot product per output, heads in parallel.
fn value_half<W: Stored>(
    sizes: &Sizes,
    kv_b: &[W],
    o_latent: &[f32],
    s: usize,
    out: &mut [f32],
    blocked: bool,
) {
    let Sizes {
        nope,
        v_dim,
        latent,
        ..
    } = *sizes;
    let bits = W::bf16_bits(kv_b).filter(|_| blocked);
    out.par_chunks_mut(s * v_dim)
        .zip(o_latent.par_chunks_exact(s * latent))
        .enumerate()
        .for_each(|(head, (out, o_latent))| {
            let at = (head * (nope + v_dim) + nope) * latent;
            for (o, out) in o_latent
                .chunks_exact(latent)
                .zip(out.chunks_exact_mut(v_dim))
            {
                match bits {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `blocked`: the CPU has AVX-512 F, BW and VL (the caller's
                    // check); the head's value half holds `v_dim` rows of `latent` values.
                    Some(bits) => unsafe { row_dots_avx512(o, &bits[at..][..v_dim * latent], out) },
                    _ => {
                        let weights = kv_b[at..][..v_dim * latent].chunks_exact(latent);
                        for (out, w) in out.iter_mut().zip(weights) {
                            *out = W::dot(o, w);
                        }
                    }
                }
            }
        });
}

/// Unscaled scores `(rows, t)`: `q_latent[r] . c[pos] + q_rope[r] . k_rope[pos]`. `blocked`
/// with a BF16 cache: positions in parallel on [`scores_avx512`]; else a row at a time.
fn scores<C: Stored>(
    q_latent: &[f32],
    q_rope: &[f32],
    c: &[C],
    k_rope: &[C],
    rows: usize,
    blocked: bool,
) -> Vec<f32> {
    let (latent, rope) = (q_latent.len() / rows, q_rope.len() / rows);
    let t = c.len() / latent.max(1);
    let mut p = vec![0f32; rows * t];
    #[cfg(not(target_arch = "x86_64"))]
    let _ = blocked;
    #[cfg(target_arch = "x86_64")]
    if let (Some(c), Some(k_rope), true) = (C::bf16_bits(c), C::bf16_bits(k_rope), blocked) {
        // The queries transposed, 16 rows to a block: `(blocks, latent + rope, 16)`.
        let width = latent + rope;
        let blocks = rows.div_ceil(16);
        let mut q_t = vec![0f32; blocks * width * 16];
        for row in 0..rows {
            let (block, lane) = (row / 16, row % 16);
            let values = q_latent[row * latent..][..latent]
                .iter()
                .chain(&q_rope[row * rope..][..rope]);
            for (i, v) in values.enumerate() {
                q_t[(block * width + i) * 16 + lane] = *v;
            }
        }
        let mut by_position = vec![0f32; t * blocks * 16];
        let chunk = t.div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
        by_position
            .par_chunks_mut(chunk * blocks * 16)
            .zip(c.par_chunks(chunk * latent))
            .zip(k_rope.par_chunks(chunk * rope))
            .for_each(|((out, c), k_rope)| {
                // SAFETY: `blocked`: the CPU has AVX-512 F, BW and VL (the caller's check);
                // `out` holds 16 scores per block for each of the chunk's positions, `c` and
                // `k_rope` their rows, `q_t` the blocks of transposed queries.
                unsafe { scores_avx512(&q_t, c, k_rope, latent, rope, out) };
            });
        for (pos, scores) in by_position.chunks_exact(blocks * 16).enumerate() {
            for (row, score) in scores[..rows].iter().enumerate() {
                p[row * t + pos] = *score;
            }
        }
        return p;
    }
    p.par_chunks_mut(t).enumerate().for_each(|(row, p)| {
        let (q, qr) = (
            &q_latent[row * latent..][..latent],
            &q_rope[row * rope..][..rope],
        );
        let cached = c.chunks_exact(latent).zip(k_rope.chunks_exact(rope));
        for (p, (c, k)) in p.iter_mut().zip(cached) {
            *p = C::dot(q, c) + C::dot(qr, k);
        }
    });
    p
}

/// The attended latent `(rows, latent)`: `sum_t p[r][t] c[t]` from the weights `p` `(rows,
/// t)`, each value summed over the positions in order with one fused multiply-add each (where
/// the CPU has FMA). `blocked` with a BF16 cache: 16 latent values of every row at a time on
/// [`weighted_sum_avx512`] (the same sums, bit for bit), in parallel over the latent values;
/// else rows in parallel.
fn weighted_sum<C: Stored>(p: &[f32], c: &[C], rows: usize, blocked: bool) -> Vec<f32> {
    let t = p.len() / rows.max(1);
    let latent = c.len() / t.max(1);
    let mut o = vec![0f32; rows * latent];
    #[cfg(not(target_arch = "x86_64"))]
    let _ = blocked;
    #[cfg(target_arch = "x86_64")]
    if let (Some(c), true) = (C::bf16_bits(c), blocked) {
        // The weights by position `(t, rows)`; the sums by strip of 16 latent values `(strips,
        // rows, 16)`.
        let mut p_t = vec![0f32; t * rows];
        for (row, p) in p.chunks_exact(t).enumerate() {
            for (pos, p) in p.iter().enumerate() {
                p_t[pos * rows + row] = *p;
            }
        }
        let strips = latent.div_ceil(16);
        let mut by_strip = vec![0f32; strips * rows * 16];
        by_strip
            .par_chunks_mut(rows * 16)
            .enumerate()
            .for_each(|(strip, sums)| {
                // SAFETY: `blocked`: the CPU has AVX-512 F, BW and VL (the caller's check);
                // `p_t` holds `t` rows of `rows` weights, `c` `t` rows of `latent` values,
                // `sums` 16 values per row.
                unsafe { weighted_sum_avx512(&p_t, c, latent, strip * 16, sums) };
            });
        for (row, o) in o.chunks_exact_mut(latent).enumerate() {
            for (j, o) in o.iter_mut().enumerate() {
                *o = by_strip[(j / 16 * rows + row) * 16 + j % 16];
            }
        }
        return o;
    }
    o.par_chunks_mut(latent)
        .zip(p.par_chunks(t))
        .for_each(|(o, p)| {
            for (p, c) in p.iter().zip(c.chunks_exact(latent)) {
                C::add_scaled(o, *p, c);
            }
        });
    o
}

/// `y += sum_n a[n] w[n]` over the BF16 rows `w` (of `y.len()` values), [`STREAMS`] rows a
/// quarter apart at a time (the rest one by one at the end), 16 values of `y` in a register
/// over each step's rows. The sum's order depends on the number of rows only.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; `w` holds `a.len()` rows of `y.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn scaled_rows_avx512(a: &[f32], w: &[u16], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let width = y.len();
    debug_assert!(w.len() == a.len() * width);
    let step = a.len() / STREAMS;
    let (yp, wp) = (y.as_mut_ptr(), w.as_ptr());
    // `y += a[r] w[r]` for each of `rows` in order, 16 values of `y` at a time.
    let add = |rows: &[usize]| {
        for j in (0..width).step_by(16) {
            let m = crate::math::lanes(width - j);
            // SAFETY: the lanes of `m` lie within `y` and within each row.
            unsafe {
                let mut sum = _mm512_maskz_loadu_ps(m, yp.add(j));
                for &r in rows {
                    let w = crate::math::load_bf16(m, wp.add(r * width + j));
                    sum = _mm512_fmadd_ps(_mm512_set1_ps(a[r]), w, sum);
                }
                _mm512_mask_storeu_ps(yp.add(j), m, sum);
            }
        }
    };
    for i in 0..step {
        let rows: [usize; STREAMS] = std::array::from_fn(|k| i + k * step);
        add(&rows);
    }
    for r in step * STREAMS..a.len() {
        add(&[r]);
    }
}

/// `out[v] = x . w[v]` for the BF16 rows `w` (of `x.len()` values), [`STREAMS`] rows a
/// quarter apart at a time (the rest one by one at the end): each in 16 lanes, then the lanes.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; `w` holds `out.len()` rows of `x.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn row_dots_avx512(x: &[f32], w: &[u16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let width = x.len();
    debug_assert!(w.len() == out.len() * width);
    let step = out.len() / STREAMS;
    let dots = |rows: &[usize], out: &mut [f32]| {
        let mut acc = [_mm512_setzero_ps(); STREAMS];
        for j in (0..width).step_by(16) {
            let m = crate::math::lanes(width - j);
            // SAFETY: the lanes of `m` lie within `x` and within each row.
            unsafe {
                let x = _mm512_maskz_loadu_ps(m, x.as_ptr().add(j));
                for (acc, r) in acc.iter_mut().zip(rows) {
                    let w = crate::math::load_bf16(m, w.as_ptr().add(r * width + j));
                    *acc = _mm512_fmadd_ps(x, w, *acc);
                }
            }
        }
        for (acc, r) in acc.iter().zip(rows) {
            out[*r] = _mm512_reduce_add_ps(*acc);
        }
    };
    for i in 0..step {
        let rows: [usize; STREAMS] = std::array::from_fn(|k| i + k * step);
        dots(&rows, out);
    }
    for r in step * STREAMS..out.len() {
        dots(&[r], out);
    }
}

/// Scores of every block of 16 query rows (`q_t`, transposed: `(blocks, latent + rope, 16)`)
/// against each cached position of `c` `(positions, latent)` and `k_rope` `(positions,
/// rope)`, into `out` `(positions, blocks * 16)`: 8 positions at a time, their values widened
/// to f32 a chunk at a time (a fixed stride, so that the 8 positions' addresses are constant
/// offsets), each value multiplied by the 16 rows' values in one instruction; each score
/// summed over the latent values, then the rotary ones, in order.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; the lengths are as described.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn scores_avx512(
    q_t: &[f32],
    c: &[u16],
    k_rope: &[u16],
    latent: usize,
    rope: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    const POSITIONS: usize = 8;
    const CHUNK: usize = 256;
    let width = latent + rope;
    let blocks = q_t.len() / (width * 16);
    let t = c.len() / latent;
    debug_assert!(out.len() == t * blocks * 16 && k_rope.len() == t * rope);
    let mut wide = [0f32; POSITIONS * CHUNK];
    let mut sums = vec![[_mm512_setzero_ps(); POSITIONS]; blocks];
    for first in (0..t).step_by(POSITIONS) {
        let n = POSITIONS.min(t - first);
        sums.fill([_mm512_setzero_ps(); POSITIONS]);
        for (values, count, offset) in [(c, latent, 0), (k_rope, rope, latent)] {
            for from in (0..count).step_by(CHUNK) {
                let len = CHUNK.min(count - from);
                for (k, wide) in wide.chunks_exact_mut(CHUNK).take(n).enumerate() {
                    let row = &values[(first + k) * count + from..][..len];
                    // SAFETY: this function's CPU features; the lengths match.
                    unsafe { widen_avx512(row, &mut wide[..len]) };
                }
                for (block, acc) in sums.iter_mut().enumerate() {
                    let q = q_t[(block * width + offset + from) * 16..].as_ptr();
                    let wide = wide.as_ptr();
                    for i in 0..len {
                        // SAFETY: value i of the chunk for the block's 16 rows, and for each
                        // of the 8 positions (rows of CHUNK values).
                        unsafe {
                            let q = _mm512_loadu_ps(q.add(i * 16));
                            for (k, acc) in acc.iter_mut().enumerate() {
                                let v = _mm512_set1_ps(*wide.add(k * CHUNK + i));
                                *acc = _mm512_fmadd_ps(q, v, *acc);
                            }
                        }
                    }
                }
            }
        }
        for (block, acc) in sums.iter().enumerate() {
            for (k, acc) in acc.iter().enumerate().take(n) {
                let at = ((first + k) * blocks + block) * 16;
                // SAFETY: 16 scores of position first + k, block `block`, within `out`.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(at), *acc) };
            }
        }
    }
}

/// BF16 values widened to f32, 16 at a time.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; `out` is as long as `bits`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn widen_avx512(bits: &[u16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    debug_assert_eq!(bits.len(), out.len());
    for j in (0..bits.len()).step_by(16) {
        let m = crate::math::lanes(bits.len() - j);
        // SAFETY: the lanes of `m` lie within both slices.
        unsafe {
            let values = crate::math::load_bf16(m, bits.as_ptr().add(j));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(j), m, values);
        }
    }
}

/// The sums of 16 latent values from `from` of every row, over every position: `sums[r][i] =
/// sum_pos p_t[pos][r] c[pos][from + i]`, one fused multiply-add per position in order, blocks
/// of 16 rows in registers (each position's 16 values widened once), the last rows one by one.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; `p_t` holds `t` rows of `rows` weights, `c` `t` rows of
/// `width` values, `sums` `rows` rows of 16; `from < width`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn weighted_sum_avx512(p_t: &[f32], c: &[u16], width: usize, from: usize, sums: &mut [f32]) {
    let rows = sums.len() / 16;
    let mut row = 0;
    while row + 16 <= rows {
        // SAFETY: the caller's; rows row..row + 16.
        unsafe { weighted_sum_rows_avx512::<16>(p_t, rows, row, c, width, from, sums) };
        row += 16;
    }
    while row < rows {
        // SAFETY: the caller's; row `row`.
        unsafe { weighted_sum_rows_avx512::<1>(p_t, rows, row, c, width, from, sums) };
        row += 1;
    }
}

/// [`weighted_sum_avx512`] for rows `row..row + R`.
///
/// # Safety
/// As [`weighted_sum_avx512`]'s, and `row + R <= rows`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn weighted_sum_rows_avx512<const R: usize>(
    p_t: &[f32],
    rows: usize,
    row: usize,
    c: &[u16],
    width: usize,
    from: usize,
    sums: &mut [f32],
) {
    use std::arch::x86_64::*;
    let t = p_t.len() / rows;
    let m = crate::math::lanes(width - from);
    let mut acc = [_mm512_setzero_ps(); R];
    for pos in 0..t {
        // SAFETY: the lanes of `m` lie within position `pos`'s row; its weights for rows
        // row..row + R lie within `p_t`.
        unsafe {
            let values = crate::math::load_bf16(m, c.as_ptr().add(pos * width + from));
            let weights = p_t.as_ptr().add(pos * rows + row);
            for (k, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*weights.add(k)), values, *acc);
            }
        }
    }
    for (k, acc) in acc.iter().enumerate() {
        // SAFETY: row row + k's 16 sums lie within `sums`.
        unsafe { _mm512_storeu_ps(sums.as_mut_ptr().add((row + k) * 16), *acc) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Values;

    /// The attention of one query row of one head, as the definition reads, in f64 over the
    /// widened values.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        sizes: &Sizes,
        kv_b: &[f32],
        q_nope: &[f32],
        q_rope: &[f32],
        c: &[f32],
        k_rope: &[f32],
        mask: Option<&[f32]>,
        head: usize,
    ) -> Vec<f64> {
        let Sizes {
            nope,
            rope,
            v_dim,
            latent,
            ..
        } = *sizes;
        let t = c.len() / latent;
        let w = |row: usize, l: usize| f64::from(kv_b[(head * (nope + v_dim) + row) * latent + l]);
        let q_latent: Vec<f64> = (0..latent)
            .map(|l| (0..nope).map(|n| f64::from(q_nope[n]) * w(n, l)).sum())
            .collect();
        let scores: Vec<f64> = (0..t)
            .map(|pos| {
                let nope_part: f64 = (0..latent)
                    .map(|l| q_latent[l] * f64::from(c[pos * latent + l]))
                    .sum();
                let rope_part: f64 = (0..rope)
                    .map(|r| f64::from(q_rope[r]) * f64::from(k_rope[pos * rope + r]))
                    .sum();
                (nope_part + rope_part) * f64::from(sizes.scale)
                    + mask.map_or(0.0, |m| f64::from(m[pos]))
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        let o_latent: Vec<f64> = (0..latent)
            .map(|l| {
                (0..t)
                    .map(|pos| e[pos] / sum * f64::from(c[pos * latent + l]))
                    .sum()
            })
            .collect();
        (0..v_dim)
            .map(|v| (0..latent).map(|l| o_latent[l] * w(nope + v, l)).sum())
            .collect()
    }

    fn bf16(values: &[f32]) -> Vec<half::bf16> {
        values.iter().map(|&v| half::bf16::from_f32(v)).collect()
    }

    fn widened(values: &[half::bf16]) -> Vec<f32> {
        values.iter().map(|v| v.to_f32()).collect()
    }

    /// Every sequence, head and query row against the f64 definition, with f32 and BF16
    /// weights and caches, with and without a mask (a causal one, a masked position included),
    /// at sizes that are not whole vectors: a key half of rows that are not a whole number of
    /// the streams (10), and a latent wider than the score kernel's chunk (300, as Kimi-VL's
    /// 512 is).
    #[test]
    fn absorbed_attention_equals_the_definition() {
        let small = Sizes {
            heads: 3,
            nope: 8,
            rope: 4,
            v_dim: 6,
            latent: 37,
            scale: 12f32.powf(-0.5),
        };
        let wide = Sizes {
            heads: 2,
            nope: 10,
            rope: 5,
            v_dim: 7,
            latent: 300,
            scale: 15f32.powf(-0.5),
        };
        // Query rows per sequence (heads x s): 2 to 18, through the blocked score kernel's
        // blocks of 16 rows (the last one partial) and the attended latent's blocks of 16 and
        // single rows.
        let cases = [(1, 1, 1), (1, 1, 9), (2, 1, 9), (2, 5, 9), (1, 6, 11)];
        for (sizes, (b, s, t)) in [small, wide]
            .into_iter()
            .flat_map(|sizes| cases.map(|case| (sizes, case)))
        {
            let Sizes {
                heads: h,
                nope,
                rope,
                v_dim,
                latent: l,
                ..
            } = sizes;
            let mut values = Values((b * 100 + s * 10 + t + l) as u64);
            let mut take = |n: usize, factor: f32| -> Vec<f32> {
                values.take(n).iter().map(|v| v * factor).collect()
            };
            let kv_b = take(h * (nope + v_dim) * l, 0.1);
            let q_nope = take(b * h * s * nope, 0.2);
            let q_rope = take(b * h * s * rope, 0.2);
            let latent = take(b * t * l, 0.2);
            let k_rope = take(b * t * rope, 0.2);
            // Causal over the last `s` positions, one more position masked out in the first
            // sequence.
            let mask: Vec<f32> = (0..b * s * t)
                .map(|i| {
                    let (seq, row, pos) = (i / (s * t), i / t % s, i % t);
                    let hidden = pos > t - s + row || (seq == 0 && pos == 0 && t > 1);
                    if hidden {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            let (kv_b16, latent16, k_rope16) = (bf16(&kv_b), bf16(&latent), bf16(&k_rope));
            for mask in [None, Some(&mask[..])] {
                let q32 = Queries {
                    batch: b,
                    queries: s,
                    positions: t,
                    q_nope: &q_nope,
                    q_rope: &q_rope,
                    latent: &latent[..],
                    k_rope: &k_rope[..],
                    mask,
                };
                let q16 = Queries {
                    batch: b,
                    queries: s,
                    positions: t,
                    q_nope: &q_nope,
                    q_rope: &q_rope,
                    latent: &latent16[..],
                    k_rope: &k_rope16[..],
                    mask,
                };
                // Each case with the values it read, widened.
                let (wide32, wide16) = (
                    [kv_b.clone(), latent.clone(), k_rope.clone()],
                    [widened(&kv_b16), widened(&latent16), widened(&k_rope16)],
                );
                let mut cases = vec![
                    ("f32", absorbed_on(&sizes, &kv_b, &q32, false), wide32),
                    (
                        "bf16",
                        absorbed_on(&sizes, &kv_b16, &q16, false),
                        wide16.clone(),
                    ),
                ];
                if crate::cpu::avx512_bw_vl() {
                    let blocked = absorbed_on(&sizes, &kv_b16, &q16, true);
                    cases.push(("bf16 blocked", blocked, wide16));
                } else {
                    eprintln!("the blocked AVX-512 path is not tested: this CPU lacks AVX-512");
                }
                for (name, got, [weights, c, k]) in cases {
                    let got = got.expect("sizes match");
                    for seq in 0..b {
                        for head in 0..h {
                            for row in 0..s {
                                let query = (seq * h + head) * s + row;
                                let want = reference(
                                    &sizes,
                                    &weights,
                                    &q_nope[query * nope..][..nope],
                                    &q_rope[query * rope..][..rope],
                                    &c[seq * t * l..][..t * l],
                                    &k[seq * t * rope..][..t * rope],
                                    mask.map(|m| &m[(seq * s + row) * t..][..t]),
                                    head,
                                );
                                for (v, want) in want.iter().enumerate() {
                                    let got = f64::from(got[query * v_dim + v]);
                                    assert!(
                                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                        "{name} {sizes:?} b={b} s={s} t={t} mask={} seq {seq} \
                                         head {head} row {row} value {v}: {got} vs {want}",
                                        mask.is_some()
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The blocked attended latent is bit for bit the portable loop's (with FMA): a block of
    /// 16 rows and single rows, a width that is not whole vectors.
    #[test]
    fn blocked_weighted_sums_equal_the_row_loop() {
        if !(crate::cpu::avx512_bw_vl() && crate::cpu::avx2_fma()) {
            eprintln!("skipped: this CPU lacks AVX-512 (the blocked kernel) or FMA");
            return;
        }
        let (rows, t, width) = (19, 13, 37);
        let p = Values(5).take(rows * t);
        let c = bf16(&Values(6).take(t * width));
        let blocked = weighted_sum(&p, &c, rows, true);
        let loop_ = weighted_sum(&p, &c, rows, false);
        assert_eq!(blocked.len(), rows * width);
        assert!(blocked
            .iter()
            .zip(&loop_)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    /// Slices of the wrong length are refused, not read past.
    #[test]
    fn mismatched_sizes_are_refused() {
        let sizes = Sizes {
            heads: 2,
            nope: 2,
            rope: 2,
            v_dim: 2,
            latent: 4,
            scale: 0.5,
        };
        let kv_b = vec![0f32; 2 * 4 * 4];
        let ok = Queries {
            batch: 1,
            queries: 1,
            positions: 3,
            q_nope: &[0.0; 4],
            q_rope: &[0.0; 4],
            latent: &[0f32; 12][..],
            k_rope: &[0f32; 6][..],
            mask: None,
        };
        assert_eq!(absorbed(&sizes, &kv_b, &ok).map(|o| o.len()), Some(4));
        let short_cache = Queries {
            latent: &[0f32; 11][..],
            ..ok
        };
        assert!(absorbed(&sizes, &kv_b, &short_cache).is_none());
        assert!(absorbed(&sizes, &kv_b[1..], &ok).is_none());
        let short_mask = Queries {
            mask: Some(&[0.0; 2]),
            ..ok
        };
        assert!(absorbed(&sizes, &kv_b, &short_mask).is_none());
        let no_rope = Sizes { rope: 0, ..sizes };
        let without_rope = Queries {
            q_rope: &[],
            k_rope: &[][..],
            ..ok
        };
        assert!(absorbed(&no_rope, &kv_b, &without_rope).is_none());
    }
}
