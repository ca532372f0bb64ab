//! q4_0 x q8_0 dot products with AVX-512 (BW and VNNI), for decoding against q4_0 weights
//! (Kimi-VL's expert down projections, whose 1408-wide rows are not whole q4k blocks) on
//! CPUs that have them.
//!
//! Two blocks (64 values) go through one `vpdpbusd`: the weight's 4-bit values unsigned
//! against the input's q8 values, added to a per-call precomputed `-8 x` (the input's sums of
//! each four values), so that each lane holds the exact integer `sum (q4 - 8) q8` of four
//! values; a lane is then scaled by its block's two scales in f32. The integer sums are exact,
//! so a dot product equals candle's (ggml's) up to the order in which f32 terms are added.
//!
//! The input is laid out in the order the weights' nibbles unpack to (low nibbles of both
//! blocks, then high nibbles), so the weights need no reordering. With AVX-512 VBMI a pair
//! of blocks is one 64-byte load whose bytes one `vpermb` puts in place and one `vpermw`
//! gives the scales: one Xeon core multiplies rows held in its cache at 16.3 GB/s this way,
//! 9.0 through 128-bit loads and inserts (the path CPUs without VBMI take).

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
    /// The two blocks' q8 values in the order two weight blocks' nibbles unpack to: block 0's
    /// values 0..16, block 1's 0..16, block 0's 16..32, block 1's 16..32.
    qs: [i8; 2 * QK],
    /// `-8` times the sum of each four consecutive values of `qs`: the accumulator
    /// `vpdpbusd` starts from, which makes the unsigned 4-bit weights signed.
    offset: [i32; 2 * QK / 4],
    /// The scale of each lane's block (lanes 0..4 and 8..12 block 0, the others block 1).
    d: [f32; 2 * QK / 4],
}

/// Which block of a pair each 32-bit lane of [`Pair`]'s layout holds.
const LANE_BLOCK: [usize; 16] = [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1];

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
                    d: [0.0; 2 * QK / 4],
                };
                for (i, block) in two.iter().enumerate() {
                    // SAFETY: `BlockQ8_0` is `repr(C)` with exactly `Q8_0Block`'s fields
                    // (sizes asserted above); the values are plain integers.
                    let block = unsafe { &*(block as *const BlockQ8_0 as *const Q8_0Block) };
                    for half in 0..2 {
                        let at = half * QK + i * QK / 2;
                        pair.qs[at..at + QK / 2]
                            .copy_from_slice(&block.qs[half * QK / 2..(half + 1) * QK / 2]);
                    }
                    let d = half::f16::from_bits(block.d).to_f32();
                    for (lane, &b) in LANE_BLOCK.iter().enumerate() {
                        if b == i {
                            pair.d[lane] = d;
                        }
                    }
                }
                for (sum, four) in pair.offset.iter_mut().zip(pair.qs.chunks_exact(4)) {
                    *sum = -8 * four.iter().map(|&q| i32::from(q)).sum::<i32>();
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
    Some(unsafe {
        if crate::cpu::avx512_vbmi_vnni() {
            dot_vbmi(w, x)
        } else {
            dot_unchecked(w, x)
        }
    })
}

/// How far ahead of the blocks being multiplied a row is prefetched: rows are short, so this
/// reaches a few rows on (on 2 Xeon cores, Kimi-VL's expert shape from memory read 11 GB/s at
/// 512 bytes ahead, 15 at 1 KB, 19-20 at 2-4 KB).
const PREFETCH_BYTES: usize = 3072;

/// [`dot`] without its checks, on CPUs without VBMI.
///
/// # Safety
/// The CPU must have the features [`available`] checks, and the row must hold as many blocks
/// as the input row.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vl,f16c")]
unsafe fn dot_unchecked(w: &[Q4_0Block], x: &PreparedQ8_0) -> f32 {
    let nibble = _mm256_set1_epi8(0x0f);
    // SAFETY: 64 bytes of a constant array.
    let spread = unsafe { _mm512_loadu_si512(LANE_BLOCK.map(|b| b as i32).as_ptr().cast()) };
    let mut acc = _mm512_setzero_ps();
    for (p, pair) in x.pairs.iter().enumerate() {
        // SAFETY: a `Pair` is 64-byte aligned: `qs` (64 bytes) at 0, `offset` (16 i32) at
        // 64, `d` (16 f32) at 128.
        let (q8, offset, input_scales) = unsafe {
            (
                _mm512_load_si512(pair.qs.as_ptr().cast()),
                _mm512_load_si512(pair.offset.as_ptr().cast()),
                _mm512_load_ps(pair.d.as_ptr()),
            )
        };
        let second = 2 * p + 1 < x.blocks;
        // SAFETY: the row holds `x.blocks` blocks (the caller's contract) and pair p covers
        // blocks 2p and, when `second`, 2p + 1; each block's `qs` is 16 bytes, read unaligned.
        let (packed, scales) = unsafe {
            let first = w.get_unchecked(2 * p);
            // The row PREFETCH_BYTES ahead (past its end: the next row's, where rows lie one
            // after another).
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
        // Low nibbles of both blocks, then high nibbles: the input's order.
        let low = _mm256_and_si256(packed, nibble);
        let high = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), nibble);
        let values = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high);
        let sums = _mm512_dpbusd_epi32(offset, values, q8);
        let weight_scales = _mm_cvtph_ps(_mm_cvtsi32_si128(scales as i32));
        let weight_scales = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(weight_scales));
        let scales = _mm512_mul_ps(weight_scales, input_scales);
        acc = _mm512_fmadd_ps(scales, _mm512_cvtepi32_ps(sums), acc);
    }
    _mm512_reduce_add_ps(acc)
}

/// [`dot`] without its checks, with VBMI: each pair of blocks (36 bytes) one masked 64-byte
/// load (nothing past the row is read), its quantized bytes put in place by one `vpermb` (both
/// blocks' 16 bytes twice: the second copy shifted right by 4 gives the high nibbles) and its
/// two scales by one `vpermw`.
///
/// # Safety
/// The CPU must have the features [`crate::cpu::avx512_vbmi_vnni`] checks, and the row must
/// hold as many blocks as the input row.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vl,avx512vbmi,f16c")]
unsafe fn dot_vbmi(w: &[Q4_0Block], x: &PreparedQ8_0) -> f32 {
    const BLOCK: usize = std::mem::size_of::<Q4_0Block>();
    // Bytes 2..18 (block 0's values) and 20..36 (block 1's), twice.
    let bytes: [u8; 64] = std::array::from_fn(|i| (i % 32 / 16 * BLOCK + 2 + i % 16) as u8);
    // Word 0 (block 0's scale) or 9 (block 1's) for each lane.
    let words: [u16; 32] = std::array::from_fn(|i| (LANE_BLOCK[i % 16] * BLOCK / 2) as u16);
    // SAFETY: 64 bytes of local arrays.
    let (bytes, words) = unsafe {
        (
            _mm512_loadu_si512(bytes.as_ptr().cast()),
            _mm512_loadu_si512(words.as_ptr().cast()),
        )
    };
    // The second half's 16-bit words shifted right by 4: high nibbles to the low ones.
    let shifts = _mm512_setr_epi64(
        0,
        0,
        0,
        0,
        0x4_0004_0004_0004,
        0x4_0004_0004_0004,
        0x4_0004_0004_0004,
        0x4_0004_0004_0004,
    );
    let nibble = _mm512_set1_epi8(0x0f);
    let (two, one) = ((1u64 << (2 * BLOCK)) - 1, (1u64 << BLOCK) - 1);
    let base = w.as_ptr() as *const i8;
    let mut acc = _mm512_setzero_ps();
    for (p, pair) in x.pairs.iter().enumerate() {
        let at = base.wrapping_add(2 * p * BLOCK);
        let mask = if 2 * p + 1 < x.blocks { two } else { one };
        // SAFETY: as in `dot_unchecked`; the masked load reads only the pair's blocks (the
        // row's, by the caller's contract), faults on the other bytes suppressed.
        let (q8, offset, input_scales, raw) = unsafe {
            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH_BYTES));
            (
                _mm512_load_si512(pair.qs.as_ptr().cast()),
                _mm512_load_si512(pair.offset.as_ptr().cast()),
                _mm512_load_ps(pair.d.as_ptr()),
                _mm512_maskz_loadu_epi8(mask, at),
            )
        };
        let packed = _mm512_permutexvar_epi8(bytes, raw);
        let values = _mm512_and_si512(_mm512_srlv_epi16(packed, shifts), nibble);
        let sums = _mm512_dpbusd_epi32(offset, values, q8);
        let weight_scales =
            _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(words, raw)));
        let scales = _mm512_mul_ps(weight_scales, input_scales);
        acc = _mm512_fmadd_ps(scales, _mm512_cvtepi32_ps(sums), acc);
    }
    _mm512_reduce_add_ps(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_kernels_equal_candles_q4_0_q8_0_dot_product() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 BW/VNNI");
            return;
        }
        type Kernel = unsafe fn(&[Q4_0Block], &PreparedQ8_0) -> f32;
        let mut kernels: Vec<(&str, Kernel)> = vec![("without VBMI", dot_unchecked)];
        if crate::cpu::avx512_vbmi_vnni() {
            kernels.push(("VBMI", dot_vbmi));
        } else {
            eprintln!("VBMI kernel skipped: this CPU lacks AVX-512 VBMI");
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
            let prepared = PreparedQ8_0::new(&x);
            for (i, (row, ours)) in q4.chunks(k / QK).zip(all.chunks(k / QK)).enumerate() {
                let reference = BlockQ4_0::vec_dot_unopt(k, row, &q8);
                let scale: f32 = w[i * k..(i + 1) * k]
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| (a * b).abs())
                    .sum();
                for &(name, kernel) in &kernels {
                    // SAFETY: the CPU has the kernel's features (checked above) and the row
                    // the input's block count.
                    let got = unsafe { kernel(ours, &prepared) };
                    assert!(
                        (got - reference).abs() <= 1e-5 * scale,
                        "{name}, k={k}, row {i}: {got} vs candle's {reference}"
                    );
                }
            }
        }
    }
}
