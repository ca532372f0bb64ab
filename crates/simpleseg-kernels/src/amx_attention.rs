//! [`crate::attention`] on AMX tiles, where the CPU has them ([`crate::amx::available`]).
//!
//! One parallel pass over (segment, head, run of query blocks). Each task packs its
//! segment's keys and values for that head once, in the layouts the tile instruction reads
//! for its right operand (pairs of consecutive inputs side by side), then for each block of
//! 32 queries:
//! - the scores `q k^T`, 32 queries x every key, in 2 x 2 blocks of 16 x 16 f32 tiles (the
//!   head's values split into steps of 32, zero beyond the head),
//! - each query's softmax along its row of scores, in f32, as PyTorch's CPU flash attention
//!   computes it: the scaled scores, their maximum, the exponentials ([`crate::math`]'s
//!   `exp`) rounded to BF16 (zero beyond the segment's keys) and their sum (before the
//!   rounding),
//! - the weighted values `p v`, the weights' rows read in place as tiles (32 keys per step),
//!   in 2 x 2 blocks of tiles of 16 of the head's values, times the sum's inverse, rounded to
//!   BF16.
//!
//! The AVX512-BF16 kernel rounds the normalized weights instead (one pass over them more);
//! both round the output to BF16. The score matrix held at once is one block's: 32 rows of
//! the segment's length.

use std::ops::Range;

use rayon::prelude::*;

use crate::amx::{tiles_2x2, Sums, TileSession, Tiles2x2};
use crate::attention::{Heads, SharedBits};
use crate::math::{bf16_bits, lanes};

/// Queries per block: two rows of tiles.
const QB: usize = 32;
/// Values per tile row (BF16) and keys per weight tile.
const KT: usize = 32;

/// Whether this path runs here: AMX ([`crate::amx::available`]) and AVX-512 BW and VL (the
/// packing's masked loads; every AMX CPU has them).
pub(crate) fn available() -> bool {
    crate::amx::available() && crate::cpu::avx512_bw_vl()
}

/// The heads of an attention and how they see each other.
#[derive(Clone, Copy)]
pub(crate) struct Shape {
    /// Query heads.
    pub heads: usize,
    /// Query heads per key and value head (grouped-query attention; 1: one each).
    pub group: usize,
    /// Values per head (even).
    pub d: usize,
    /// Whether a position attends only to itself and the positions before it in its segment.
    pub causal: bool,
}

/// [`crate::attention::attention`] (or, `causal`, [`crate::attention::causal`]) on tiles, its
/// operands already checked (`n` positions, segments tiling `0..n`, views long enough for
/// the shape's heads, `d` even and non-zero).
///
/// Call only where [`available`] and [`crate::attention::available`] answered `true`.
pub(crate) fn attention(
    q: Heads,
    k: Heads,
    v: Heads,
    segments: &[Range<usize>],
    shape: Shape,
    scale: f32,
    n: usize,
) -> Vec<u16> {
    let Shape {
        heads, group, d, ..
    } = shape;
    let width = heads * d;
    // Tasks: (segment, head, query blocks); a head's blocks are split into runs when there
    // are too few (segment, head) pairs to keep every thread busy.
    let threads = rayon::current_num_threads();
    let runs = (4 * threads)
        .div_ceil((segments.len() * heads).max(1))
        .max(1);
    let tasks: Vec<(usize, usize, Range<usize>)> = segments
        .iter()
        .enumerate()
        .flat_map(|(si, s)| {
            let blocks = s.len().div_ceil(QB);
            let per = blocks.div_ceil(runs).max(1);
            (0..heads).flat_map(move |h| {
                (0..blocks)
                    .step_by(per)
                    .map(move |b0| (si, h, b0..(b0 + per).min(blocks)))
            })
        })
        .collect();
    // Not zeroed first: the tasks write every value (all rows, every head's columns).
    let mut out: Vec<u16> = Vec::with_capacity(n * width);
    let out_ptr = SharedBits(out.as_mut_ptr());
    tasks
        .into_par_iter()
        .for_each_init(Scratch::default, |scratch, (si, h, blocks)| {
            // SAFETY: tiles were granted (the caller's `amx::available`); the session ends
            // with the task, on this thread.
            let _session = unsafe { TileSession::begin() };
            let out_ptr = &out_ptr;
            let layout = Layout::new(segments[si].clone(), d, shape.causal);
            if scratch.packed != Some((si, h / group)) {
                // SAFETY: AVX-512 F, BW and VL (the caller's); the views hold every position.
                unsafe { scratch.pack(&layout, k, v, h / group) };
                scratch.packed = Some((si, h / group));
            }
            for b in blocks {
                let first = layout.keys.start + b * QB;
                let queries = QB.min(layout.keys.end - first);
                // SAFETY: tiles were granted (the caller's `amx::available`), the CPU has
                // AVX-512 F and BF16 (`attention::available`); the scratch was packed for this
                // layout; the task writes rows first..first + queries of head h's columns,
                // which no other task writes.
                unsafe {
                    scratch.block(
                        &layout,
                        q,
                        h,
                        first,
                        queries,
                        scale,
                        out_ptr.0.add(first * width + h * d),
                        width,
                    )
                };
            }
        });
    // SAFETY: the segments tile 0..n (the caller's check), each (segment, head) pair's tasks
    // cover all its query blocks, and each block wrote its queries' d values of its head: all
    // n * width values.
    unsafe { out.set_len(n * width) };
    out
}

/// The padded sizes of one segment's operands for one head of `d` values.
struct Layout {
    /// The segment's positions (its keys, and its queries).
    keys: Range<usize>,
    d: usize,
    /// Steps of [`KT`] values in a score (the head's values, zero-padded).
    steps: usize,
    /// Keys padded to a whole number of weight tiles ([`KT`]).
    len: usize,
    /// The head's values padded to a whole number of pairs of 16-value tiles.
    dv: usize,
    /// Whether a query sees only the keys up to its own position.
    causal: bool,
}

impl Layout {
    fn new(keys: Range<usize>, d: usize, causal: bool) -> Layout {
        Layout {
            len: keys.len().div_ceil(KT) * KT,
            keys,
            d,
            steps: d.div_ceil(KT),
            dv: d.div_ceil(32) * 32,
            causal,
        }
    }

    /// How many of the segment's keys the query at position `t` sees.
    fn seen(&self, t: usize) -> usize {
        if self.causal {
            t + 1 - self.keys.start
        } else {
            self.keys.len()
        }
    }
}

/// A task's buffers, grown as needed and reused.
#[derive(Default)]
struct Scratch {
    /// The keys as right operands of the scores: tile (block of 16 keys `b`, step `s`) at
    /// `(b * steps + s) * 256`, row `i` holding values `32 s + 2 i, + 1` of the 16 keys.
    keys: Vec<u32>,
    /// The values as right operands of `p v`: tile (16 values `t`, 32 keys `c`) at
    /// `(t * len / 32 + c) * 256`, row `i` holding keys `32 c + 2 i, + 1` of the 16 values.
    values: Vec<u32>,
    /// The block's queries as left operands: tile (16 queries `r`, step `s`) at
    /// `(r * steps + s) * 512`.
    queries: Vec<u16>,
    /// Scores, then exponentials: 32 rows of `len`.
    scores: Vec<f32>,
    /// The weights rounded to BF16: 32 rows of `len` (left operands of `p v` in place).
    weights: Vec<u16>,
    /// `p v`: 32 rows of `dv`.
    sums: Vec<f32>,
    /// The (segment, key and value head) whose keys and values are packed: the query heads
    /// of a group, taken one after another, pack them once.
    packed: Option<(usize, usize)>,
}

fn room<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    if v.len() < len {
        v.resize(len, T::default());
    }
    &mut v[..len]
}

impl Scratch {
    /// Packs head `h`'s keys and values of the layout's segment (zero beyond its keys and
    /// beyond the head's values), with masked AVX-512 loads: nothing past a head is read.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VL; the views hold the segment's positions.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn pack(&mut self, l: &Layout, k: Heads, v: Heads, h: usize) {
        use std::arch::x86_64::*;
        let n = l.keys.len();
        let keys = room(&mut self.keys, l.len / 16 * l.steps * 256);
        for b in 0..l.len / 16 {
            for s in 0..l.steps {
                let from = s * KT;
                let pairs = lanes(KT.min(l.d - from) / 2);
                let rows: [__m512i; 16] = std::array::from_fn(|i| {
                    let t = b * 16 + i;
                    if t < n {
                        // SAFETY: the pairs of values from..from + 32 within the head (masked).
                        unsafe {
                            _mm512_maskz_loadu_epi32(
                                pairs,
                                head(&k, l, h, t)[from..].as_ptr().cast(),
                            )
                        }
                    } else {
                        _mm512_setzero_si512()
                    }
                });
                let tile = crate::amx::transpose_pair_registers(rows);
                let at = (b * l.steps + s) * 256;
                for (i, row) in tile.iter().enumerate() {
                    // SAFETY: row i of the tile, within the room sized above.
                    unsafe { _mm512_storeu_si512(keys[at + i * 16..].as_mut_ptr().cast(), *row) };
                }
            }
        }
        let chunks = l.len / KT;
        let values = room(&mut self.values, l.dv / 16 * chunks * 256);
        for c in 0..chunks {
            for i in 0..16 {
                for t in 0..l.dv / 16 {
                    let m = lanes(l.d.saturating_sub(t * 16));
                    let widened = |key: usize| {
                        if key < n && m != 0 {
                            // SAFETY: values t * 16.. of the head (masked to it).
                            unsafe {
                                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
                                    m,
                                    head(&v, l, h, key)[t * 16..].as_ptr().cast(),
                                ))
                            }
                        } else {
                            _mm512_setzero_si512()
                        }
                    };
                    let key = c * KT + 2 * i;
                    let word =
                        _mm512_or_si512(widened(key), _mm512_slli_epi32::<16>(widened(key + 1)));
                    let at = (t * chunks + c) * 256 + i * 16;
                    // SAFETY: row i of tile (t, c), within the room sized above.
                    unsafe { _mm512_storeu_si512(values[at..].as_mut_ptr().cast(), word) };
                }
            }
        }
    }

    /// One block of `queries` queries from position `first` against the packed keys and
    /// values; writes their outputs (rows `out_stride` apart).
    ///
    /// # Safety
    /// Tile data was granted and the CPU has AVX-512 F, BW, VL and BF16; [`Scratch::pack`] ran for
    /// this layout and head; `out` is valid for `queries` rows of `d` values.
    #[allow(clippy::too_many_arguments)]
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn block(
        &mut self,
        l: &Layout,
        q: Heads,
        h: usize,
        first: usize,
        queries: usize,
        scale: f32,
        out: *mut u16,
        out_stride: usize,
    ) {
        let steps = l.steps;
        let qs = room(&mut self.queries, 2 * steps * 512);
        for r in 0..QB {
            for s in 0..steps {
                let from = s * KT;
                let at = ((r / 16) * steps + s) * 512 + r % 16 * KT;
                // SAFETY: the CPU has AVX-512 BW (the caller's); values from..from + 32 of the
                // query's head (masked to it); 32 values at `at` within the room.
                unsafe {
                    use std::arch::x86_64::*;
                    let row = if r < queries {
                        let values = &q.values[q.at(first + r, h)..][..l.d];
                        let m = if l.d - from >= KT {
                            u32::MAX
                        } else {
                            (1u32 << (l.d - from)) - 1
                        };
                        _mm512_maskz_loadu_epi16(m, values[from..].as_ptr().cast())
                    } else {
                        _mm512_setzero_si512()
                    };
                    _mm512_storeu_si512(qs[at..].as_mut_ptr().cast(), row);
                }
            }
        }
        let len = l.len;
        // Keys the block's last query sees, in whole tiles: the rest of the row is unused.
        let seen = l.seen(first + queries - 1).div_ceil(KT) * KT;
        let scores = room(&mut self.scores, QB * len);
        for c in 0..seen / KT {
            let b = |i: usize| self.keys[(2 * c + i) * steps * 256..].as_ptr().cast();
            // SAFETY: two rows of `steps` query tiles (1 KB apart), two blocks of 16 keys'
            // `steps` tiles, the 32 x 32 sums at columns 32 c of 32 rows of `len`: all within
            // the buffers sized above and by `pack`.
            unsafe {
                tiles_2x2(
                    &Tiles2x2 {
                        a: [qs.as_ptr().cast(), qs[steps * 512..].as_ptr().cast()],
                        a_stride: 64,
                        a_step: 1024,
                        b: [b(0), b(1)],
                        b_step: 1024,
                        from: None,
                        out: Sums {
                            at: scores[c * KT..].as_mut_ptr(),
                            stride: len * 4,
                        },
                    },
                    steps,
                )
            };
        }
        let weights = room(&mut self.weights, QB * len);
        // Each query's 1 / (sum of its exponentials), applied to its output.
        let mut inverses = [0f32; QB];
        for (r, (scores, weights)) in scores
            .chunks_exact(len)
            .zip(weights.chunks_exact_mut(len))
            .enumerate()
        {
            let (scores, weights) = (&scores[..seen], &mut weights[..seen]);
            if r < queries {
                // SAFETY: AVX-512 F (the caller's); rows of `seen`, a multiple of 16, at
                // least the keys this query sees.
                inverses[r] = unsafe { exponentials(scores, l.seen(first + r), scale, weights) };
            } else {
                weights.fill(0);
            }
        }
        let dv = l.dv;
        let sums = room(&mut self.sums, QB * dv);
        // The values' tiles are laid out for every key; the product reads the seen ones.
        let chunks = len / KT;
        for t in 0..dv / 32 {
            let b = |i: usize| self.values[(2 * t + i) * chunks * 256..].as_ptr().cast();
            // SAFETY: two rows of 16 weight rows (`len` values each, 32 keys per step), two
            // columns of 16 values' `chunks` tiles, the 32 x 32 sums at columns 32 t of rows
            // of `dv`: within the buffers.
            unsafe {
                tiles_2x2(
                    &Tiles2x2 {
                        a: [weights.as_ptr().cast(), weights[16 * len..].as_ptr().cast()],
                        a_stride: len * 2,
                        a_step: 64,
                        b: [b(0), b(1)],
                        b_step: 1024,
                        from: None,
                        out: Sums {
                            at: sums[t * 32..].as_mut_ptr(),
                            stride: dv * 4,
                        },
                    },
                    seen / KT,
                )
            };
        }
        for (r, inverse) in inverses.iter().enumerate().take(queries) {
            // SAFETY: AVX-512 F, BW and VL (the caller's); `out` holds `queries` rows of `d`
            // values (the caller's), this task's alone; a row of sums holds `dv >= d`.
            unsafe { scaled_row(&sums[r * dv..][..l.d], *inverse, out.add(r * out_stride)) };
        }
    }
}

/// `d` sums times `inverse`, rounded to BF16 at `out`.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; `out` is valid for `sums.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn scaled_row(sums: &[f32], inverse: f32, out: *mut u16) {
    use std::arch::x86_64::*;
    let inverse = _mm512_set1_ps(inverse);
    for j in (0..sums.len()).step_by(16) {
        let m = lanes(sums.len() - j);
        // SAFETY: lanes j.. of the sums and of the output, masked to their length.
        unsafe {
            let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sums.as_ptr().add(j)), inverse);
            _mm256_mask_storeu_epi16(out.add(j).cast(), m, bf16_bits(v));
        }
    }
}

/// Head `h`'s values at the segment's position `t`.
fn head<'a>(view: &Heads<'a>, l: &Layout, h: usize, t: usize) -> &'a [u16] {
    &view.values[view.at(l.keys.start + t, h)..][..l.d]
}

/// The softmax of `scale` times the first `n` scores before its normalization, as
/// PyTorch's CPU flash attention computes it: the scaled scores, their maximum, each
/// exponential ([`crate::math`]'s `exp`) rounded to BF16 into `weights` (zero for the rest
/// of the row), and returned, the inverse of the exponentials' sum (in f32, before their
/// rounding), by which the weighted values are multiplied.
///
/// The exponentials are 0, at least `2^-125` or NaN (see [`crate::math`]), so AVX512-BF16's
/// conversion rounds them as `half` does (it would flush subnormals, which they cannot be).
///
/// # Safety
/// The CPU has AVX-512 F and AVX512-BF16; both rows hold a multiple of 16 values, at least `n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn exponentials(scores: &[f32], n: usize, scale: f32, weights: &mut [u16]) -> f32 {
    use std::arch::x86_64::*;
    debug_assert!(scores.len() == weights.len() && scores.len() >= n);
    let p = scores.as_ptr();
    let used = n.div_ceil(16);
    let scale = _mm512_set1_ps(scale);
    let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
    // The scaled scores are computed twice (for their maximum, then for the exponentials)
    // rather than stored in between: a multiplication costs less than a pass of stores.
    for i in 0..used {
        let m = lanes(n - i * 16);
        // SAFETY: vector i < used of the row (the caller's length).
        unsafe {
            let x = _mm512_mul_ps(_mm512_loadu_ps(p.add(i * 16)), scale);
            max = _mm512_mask_max_ps(max, m, max, x);
        }
    }
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
    let mut sum = _mm512_setzero_ps();
    let w = weights.as_mut_ptr();
    for i in 0..scores.len() / 16 {
        let bits = if i < used {
            let m = lanes(n - i * 16);
            // SAFETY: as above.
            let x = unsafe { _mm512_mul_ps(_mm512_loadu_ps(p.add(i * 16)), scale) };
            // At most 0, the row's maximum subtracted (a NaN among the scores makes the row's
            // output NaN whatever its other exponentials are).
            let e = crate::math::exp_nonpositive_avx512(_mm512_sub_ps(x, max));
            let e = _mm512_maskz_mov_ps(m, e);
            sum = _mm512_add_ps(sum, e);
            // SAFETY: a vector of 16 BF16 values is 32 bytes, as __m256i.
            unsafe { std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(e)) }
        } else {
            _mm256_setzero_si256()
        };
        // SAFETY: 16 weights at i * 16 < the row's length.
        unsafe { _mm256_storeu_si256(w.add(i * 16).cast(), bits) };
    }
    1.0 / _mm512_reduce_add_ps(sum)
}
