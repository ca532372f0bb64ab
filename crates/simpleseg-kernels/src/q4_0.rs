//! q4_0 x q8_0 dot products with AVX-512 (BW and VNNI), for decoding against q4_0 weights
//! (Kimi-VL's expert down projections, whose 1408-wide rows are not whole q4k blocks) on
//! CPUs that have them.
//!
//! Two blocks (64 values) go through one `vpdpbusd`: the weight's 4-bit values unsigned
//! against the input's q8 values, added to a per-call precomputed `-8 x` (the input's sums of
//! each four values), so that each lane holds the exact integer `sum (q4 - 8) q8` of four
//! values; a lane is then scaled by its block's two scales in f32. The integer sums are exact,
//! so a dot product equals candle's (ggml's) up to the order in which f32 terms are added.

use std::arch::x86_64::*;

use candle_core::quantized::k_quants::{BlockQ4_0, BlockQ8_0, GgmlType};

use crate::q8_0::Q8_0Block;

/// Values per q4_0 and q8_0 block.
const QK: usize = 32;

/// A q4_0 block as ggml lays it out (`BlockQ4_0` is `repr(C)` with these fields, private).
#[repr(C)]
pub struct Q4_0Block {
    /// Scale (f16 bits).
    pub(crate) d: u16,
    /// Value `i` (low nibble) and `16 + i` (high nibble) in byte `i`, offset by 8.
    pub(crate) qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<Q4_0Block>() == std::mem::size_of::<BlockQ4_0>());

// SAFETY: `repr(C)` integers only (sizes asserted above): every bit pattern is a block, and
// there is no padding.
unsafe impl crate::blocks::PlainBlock for Q4_0Block {}

/// Two consecutive input blocks, ready for one `vpdpbusd`.
#[repr(C, align(64))]
#[derive(Clone)]
struct Pair {
    /// The two blocks' q8 values.
    qs: [i8; 2 * QK],
    /// `-8` times the sum of each four consecutive values: the accumulator `vpdpbusd` starts
    /// from, which makes the unsigned 4-bit weights signed.
    offset: [i32; 2 * QK / 4],
    /// The two blocks' scales.
    d: [f32; 2],
}

/// A row of input quantized to q8_0 (exactly as candle's `BlockQ8_0::from_float` does), in
/// pairs of blocks (a last odd block is paired with zeros).
pub struct PreparedQ8_0 {
    pairs: Vec<Pair>,
    blocks: usize,
}

impl PreparedQ8_0 {
    /// `x` (a multiple of 32 values) quantized to q8_0 and paired.
    pub fn new(x: &[f32]) -> Self {
        let blocks = x.len() / QK;
        let mut q8 = vec![BlockQ8_0::zeros(); blocks];
        BlockQ8_0::from_float(x, &mut q8);
        let pairs = q8
            .chunks(2)
            .map(|two| {
                let mut pair = Pair {
                    qs: [0; 2 * QK],
                    offset: [0; 2 * QK / 4],
                    d: [0.0; 2],
                };
                for (i, block) in two.iter().enumerate() {
                    // SAFETY: `BlockQ8_0` is `repr(C)` with exactly `Q8_0Block`'s fields
                    // (sizes asserted above); the values are plain integers.
                    let block = unsafe { &*(block as *const BlockQ8_0 as *const Q8_0Block) };
                    pair.qs[i * QK..(i + 1) * QK].copy_from_slice(&block.qs);
                    for (g, four) in block.qs.chunks_exact(4).enumerate() {
                        pair.offset[i * QK / 4 + g] =
                            -8 * four.iter().map(|&q| i32::from(q)).sum::<i32>();
                    }
                    pair.d[i] = half::f16::from_bits(block.d).to_f32();
                }
                pair
            })
            .collect();
        PreparedQ8_0 { pairs, blocks }
    }
}

/// Whether this CPU runs [`dot`] (AVX-512 F, BW and VNNI).
pub fn available() -> bool {
    crate::cpu::avx512_vnni()
}

/// The dot product of a row of q4_0 blocks with a prepared input row. `None` when this CPU
/// lacks the instructions ([`available`]) or the row does not hold the input's block count.
///
/// One row at a time: rows are short (Kimi-VL's experts: 792 bytes), and consecutive rows are
/// one stream through memory, which the prefetcher follows; four rows side by side (four
/// short streams) read 8 GB/s on 2 Zen 4 cores, one at a time 21.
#[inline]
pub fn dot(w: &[Q4_0Block], x: &PreparedQ8_0) -> Option<f32> {
    if !available() || w.len() != x.blocks {
        return None;
    }
    // SAFETY: the CPU has the features and the row the input's block count, checked above.
    Some(unsafe { dot_unchecked(w, x) })
}

/// How far ahead of the blocks being multiplied a row is prefetched.
const PREFETCH_BYTES: usize = 512;

/// [`dot`] without its checks.
///
/// # Safety
/// The CPU must have the features [`available`] checks, and the row must hold as many blocks
/// as the input row.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vl,f16c")]
unsafe fn dot_unchecked(w: &[Q4_0Block], x: &PreparedQ8_0) -> f32 {
    let nibble = _mm256_set1_epi8(0x0f);
    // f32 lanes 0..8 take the first block's scale, 8..16 the second's.
    let spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    let mut acc = _mm512_setzero_ps();
    for (p, pair) in x.pairs.iter().enumerate() {
        // SAFETY: a `Pair` is 64-byte aligned and its `qs` (64 bytes) come first; `offset` is
        // 16 i32 at offset 64; `d` is two f32 (8 bytes).
        let (q8, offset, input_scales) = unsafe {
            (
                _mm512_load_si512(pair.qs.as_ptr().cast()),
                _mm512_load_si512(pair.offset.as_ptr().cast()),
                _mm_castpd_ps(_mm_load_sd(pair.d.as_ptr().cast())),
            )
        };
        let second = 2 * p + 1 < x.blocks;
        {
            // SAFETY: the row holds `x.blocks` blocks (the caller's contract) and pair p
            // covers blocks 2p and, when `second`, 2p + 1; each block's `qs` is 16 bytes,
            // read unaligned.
            let (packed, scales) = unsafe {
                let first = w.get_unchecked(2 * p);
                // The row PREFETCH_BYTES ahead (past its end: the next row's, where rows lie
                // one after another).
                _mm_prefetch::<_MM_HINT_T0>(
                    (first as *const Q4_0Block as *const i8).wrapping_add(PREFETCH_BYTES),
                );
                if second {
                    let next = w.get_unchecked(2 * p + 1);
                    (
                        _mm256_set_m128i(
                            _mm_loadu_si128(next.qs.as_ptr().cast()),
                            _mm_loadu_si128(first.qs.as_ptr().cast()),
                        ),
                        u32::from(first.d) | (u32::from(next.d) << 16),
                    )
                } else {
                    (
                        _mm256_zextsi128_si256(_mm_loadu_si128(first.qs.as_ptr().cast())),
                        u32::from(first.d),
                    )
                }
            };
            let low = _mm256_and_si256(packed, nibble);
            let high = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), nibble);
            // 128-bit lanes (low 0, low 1, high 0, high 1) reordered to the values' order:
            // block 0's values 0..16 and 16..32, then block 1's.
            let halves = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high);
            let values = _mm512_shuffle_i64x2::<0b11_01_10_00>(halves, halves);
            let sums = _mm512_dpbusd_epi32(offset, values, q8);
            let scales = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(scales as i32)), input_scales);
            let scales = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(scales));
            acc = _mm512_fmadd_ps(scales, _mm512_cvtepi32_ps(sums), acc);
        }
    }
    _mm512_reduce_add_ps(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_equals_candles_q4_0_q8_0_dot_product() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 BW/VNNI");
            return;
        }
        let mut values = crate::testing::Values(5);
        // Even and odd block counts (1408 is Kimi-VL's expert width: 44 blocks).
        for k in [32, 64, 96, 1408, 1440] {
            let w = values.take(4 * k);
            let x = values.take(k);
            let mut q4 = vec![BlockQ4_0::zeros(); 4 * k / QK];
            BlockQ4_0::from_float(&w, &mut q4);
            let mut q8 = vec![BlockQ8_0::zeros(); k / QK];
            BlockQ8_0::from_float(&x, &mut q8);
            let all: &[Q4_0Block] = crate::blocks::view(crate::blocks::bytes_of(&q4)).unwrap();
            let rows: Vec<&[Q4_0Block]> = all.chunks(k / QK).collect();
            let prepared = PreparedQ8_0::new(&x);
            let got: Vec<f32> = rows.iter().map(|r| dot(r, &prepared).unwrap()).collect();
            for (i, row) in q4.chunks(k / QK).enumerate() {
                let reference = BlockQ4_0::vec_dot_unopt(k, row, &q8);
                let scale: f32 = w[i * k..(i + 1) * k]
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| (a * b).abs())
                    .sum();
                assert!(
                    (got[i] - reference).abs() <= 1e-5 * scale,
                    "k={k}, row {i}: {} vs candle's {reference}",
                    got[i]
                );
            }
        }
    }
}
