//! q4k x q8k dot products with AVX-512 (BW and VNNI), for decoding against q4k weights on
//! CPUs that have them (AMD Zen 4, Intel Ice Lake and later).
//!
//! The input's q8k blocks are rearranged once per call ([`PreparedQ8K`]) so that each 512-bit
//! load of a weight block's packed 4-bit values meets, in one register, the 64 q8 values its
//! low nibbles multiply (and in another those of its high nibbles); a block is then two loads,
//! four `vpmaddubsw` and four `vpdpwssd` (which also apply the sub-block scales), and several
//! weight rows can share each input block's loads ([`dot`] takes `R` rows). Measured with
//! `examples/bench_qmatvec` on 2 Zen 4 cores: rows of 3584 inputs read at memory speed with
//! this kernel and with candle's AVX2 one alike (~25 GB/s); the 7B size's down projection
//! (18944 inputs), four rows at a time, ~19-23 GB/s against candle's ~14-17.
//!
//! Integer sums are exact, so a dot product equals candle's (ggml's) up to the order in which
//! the per-block f32 terms are added.

use std::arch::x86_64::*;

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ8K, GgmlType};

/// Values per k-quant block.
const QK_K: usize = 256;

/// How many blocks ahead of the one being multiplied a row is prefetched when `rows` rows go
/// side by side: ~2 KB ahead for a row alone, ~1 KB each for four. On 2 Xeon cores the 7B's
/// short gate/up rows, one at a time, read 15.4-19.2 GB/s at 8 blocks ahead and 16.8-21.9 at
/// 16 in five alternated runs (a noisy machine: one pair read 24.8 and 25.0); its long down
/// rows, four at a time, 22 at 8 and 21 at 16.
const fn prefetch_blocks(rows: usize) -> usize {
    if rows == 1 {
        16
    } else {
        8
    }
}

/// A q4k block as ggml lays it out (`BlockQ4K` is `repr(C)` with these fields, private).
#[repr(C)]
pub struct Q4KBlock {
    /// Scale and minimum of the block (f16 bits).
    pub(crate) d: u16,
    pub(crate) dmin: u16,
    /// Eight 6-bit sub-block scales and eight 6-bit minimums, packed.
    pub(crate) scales: [u8; 12],
    /// Values `64j + i` (low nibble) and `64j + 32 + i` (high nibble) in byte `32j + i`.
    pub(crate) qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<Q4KBlock>() == std::mem::size_of::<BlockQ4K>());

/// A q8k block as ggml lays it out (`BlockQ8K` is `repr(C)` with these fields, private).
#[repr(C)]
pub(crate) struct Q8KBlock {
    pub(crate) d: f32,
    pub(crate) qs: [i8; QK_K],
    bsums: [i16; QK_K / 16],
}
const _: () = assert!(std::mem::size_of::<Q8KBlock>() == std::mem::size_of::<BlockQ8K>());

/// Whether this CPU runs [`dot`] (AVX-512 F, BW and VNNI).
pub fn available() -> bool {
    crate::cpu::avx512_vnni()
}

// SAFETY: `repr(C)` integers only (sizes asserted above): every bit pattern is a block, and
// there is no padding.
unsafe impl crate::blocks::PlainBlock for Q4KBlock {}
// SAFETY: as above.
unsafe impl crate::blocks::PlainBlock for Q8KBlock {}

/// A row of input quantized to q8k (exactly as candle's `BlockQ8K::from_float` does), with
/// each block's values reordered for [`dot`] and its 16-value sums paired into sub-block sums.
pub struct PreparedQ8K {
    /// Per block, four 64-byte groups: for `c` in 0..2, the values that the low nibbles of
    /// packed bytes `64c..64c + 64` multiply (`128c..+32` and `128c + 64..+32`), then those
    /// of the high nibbles (`128c + 32..+32` and `128c + 96..+32`).
    qs: Vec<[u8; QK_K]>,
    /// Per block, the sum of each 32-value sub-block.
    sums: Vec<[i16; 8]>,
    /// Per block, the scale.
    d: Vec<f32>,
}

impl PreparedQ8K {
    /// `x` (a multiple of 256 values) quantized to q8k and reordered.
    pub fn new(x: &[f32]) -> Self {
        let blocks = x.len() / QK_K;
        let mut q8 = vec![BlockQ8K::zeros(); blocks];
        BlockQ8K::from_float(x, &mut q8);
        let mut prepared = PreparedQ8K {
            qs: Vec::with_capacity(blocks),
            sums: Vec::with_capacity(blocks),
            d: Vec::with_capacity(blocks),
        };
        for block in &q8 {
            // SAFETY: `BlockQ8K` is `repr(C)` with exactly `Q8KBlock`'s fields (sizes asserted
            // above); the values are plain integers and floats.
            let block = unsafe { &*(block as *const BlockQ8K as *const Q8KBlock) };
            let mut qs = [0u8; QK_K];
            for c in 0..2 {
                for (group, start) in [0, 64, 32, 96].into_iter().enumerate() {
                    let from = 128 * c + start;
                    let to = 128 * c + 32 * group;
                    for i in 0..32 {
                        qs[to + i] = block.qs[from + i] as u8;
                    }
                }
            }
            let mut sums = [0i16; 8];
            for (s, pair) in sums.iter_mut().zip(block.bsums.chunks_exact(2)) {
                *s = pair[0] + pair[1];
            }
            prepared.qs.push(qs);
            prepared.sums.push(sums);
            prepared.d.push(block.d);
        }
        prepared
    }

    /// Blocks per row.
    pub fn blocks(&self) -> usize {
        self.d.len()
    }
}

/// The eight 6-bit scales and eight 6-bit minimums of a q4k block (ggml's `get_scale_min_k4`,
/// done on four lanes of bytes at once as ggml's SIMD kernels do).
#[inline(always)]
pub(crate) fn scales_and_mins(packed: &[u8; 12]) -> (u64, u64) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let word =
        |i: usize| u32::from_le_bytes([packed[i], packed[i + 1], packed[i + 2], packed[i + 3]]);
    let (a, b, c) = (word(0), word(4), word(8));
    let scales_low = a & LOW6;
    let scales_high = (c & LOW4) | (((a >> 6) & LOW2) << 4);
    let mins_low = b & LOW6;
    let mins_high = ((c >> 4) & LOW4) | (((b >> 6) & LOW2) << 4);
    (
        u64::from(scales_low) | (u64::from(scales_high) << 32),
        u64::from(mins_low) | (u64::from(mins_high) << 32),
    )
}

/// The dot products of `R` rows of q4k blocks with a prepared input row: each block of the
/// input is loaded once for all `R` rows. `None` when this CPU lacks the instructions
/// ([`available`]) or a row does not hold `x.blocks()` blocks.
#[inline]
pub fn dot<const R: usize>(w: [&[Q4KBlock]; R], x: &PreparedQ8K) -> Option<[f32; R]> {
    if !available() || w.iter().any(|row| row.len() != x.blocks()) {
        return None;
    }
    // SAFETY: the CPU has the features and every row the input's block count, checked above.
    Some(unsafe { dot_unchecked(w, x) })
}

/// [`dot`] without its checks.
///
/// # Safety
/// The CPU must have the features [`available`] checks, and each row must hold
/// `x.blocks()` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vl,f16c")]
unsafe fn dot_unchecked<const R: usize>(w: [&[Q4KBlock]; R], x: &PreparedQ8K) -> [f32; R] {
    let nibble = _mm512_set1_epi8(0x0f);
    // i16 lanes 0..16 take the scale of the register's first 32 values, lanes 16..32 that of
    // its last 32: sub-blocks (4c, 4c + 2) for low nibbles, (4c + 1, 4c + 3) for high ones.
    // (No closures here: they would not inherit this function's target features.)
    let half = _mm512_set1_epi16(2);
    let first = _mm512_mask_blend_epi16(0xffff_0000, _mm512_setzero_si512(), half);
    let scale_index = [
        first,
        _mm512_add_epi16(first, _mm512_set1_epi16(1)),
        _mm512_add_epi16(first, _mm512_set1_epi16(4)),
        _mm512_add_epi16(first, _mm512_set1_epi16(5)),
    ];
    let mut acc = [_mm512_setzero_ps(); R];
    let mut acc_min = [_mm_setzero_ps(); R];
    for b in 0..x.blocks() {
        // SAFETY: b < x.blocks(), the length of `qs`, `sums` and `d`; a block's `qs` is 256
        // bytes (four unaligned 64-byte loads) and its `sums` eight i16 (16 bytes).
        let (q8, sums, input_scale) = unsafe {
            let q8 = x.qs.get_unchecked(b).as_ptr();
            (
                [
                    _mm512_loadu_si512(q8.cast()),
                    _mm512_loadu_si512(q8.add(64).cast()),
                    _mm512_loadu_si512(q8.add(128).cast()),
                    _mm512_loadu_si512(q8.add(192).cast()),
                ],
                _mm_loadu_si128(x.sums.get_unchecked(b).as_ptr().cast()),
                _mm_set1_ps(*x.d.get_unchecked(b)),
            )
        };
        for r in 0..R {
            // SAFETY: every row holds x.blocks() blocks (the caller's contract).
            let block = unsafe { w[r].get_unchecked(b) };
            // The block `prefetch_blocks(R)` ahead (past the row's end: the next row's, where
            // rows lie one after another), its three cache lines.
            let ahead = (block as *const Q4KBlock).wrapping_add(prefetch_blocks(R)) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(143));
            let both = _mm_cvtph_ps(_mm_cvtsi32_si128(
                (u32::from(block.d) | (u32::from(block.dmin) << 16)) as i32,
            ));
            let scale = _mm_mul_ps(both, input_scale);
            let (scales, mins) = scales_and_mins(&block.scales);
            // Minimums times the sub-block sums of the input.
            let mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mins as i64));
            let min_products = _mm_cvtepi32_ps(_mm_madd_epi16(mins, sums));
            acc_min[r] = _mm_fmadd_ps(
                _mm_shuffle_ps::<0b01_01_01_01>(scale, scale),
                min_products,
                acc_min[r],
            );
            // Values times scales, exact in i32.
            let scales =
                _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(scales as i64)));
            let mut sum = _mm512_setzero_si512();
            for c in 0..2 {
                // SAFETY: bytes 64c..64c + 64 of the block's 128 packed bytes, unaligned.
                let packed = unsafe { _mm512_loadu_si512(block.qs.as_ptr().add(64 * c).cast()) };
                let low = _mm512_and_si512(packed, nibble);
                let high = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), nibble);
                let low = _mm512_maddubs_epi16(low, q8[2 * c]);
                let high = _mm512_maddubs_epi16(high, q8[2 * c + 1]);
                sum = _mm512_dpwssd_epi32(
                    sum,
                    low,
                    _mm512_permutexvar_epi16(scale_index[2 * c], scales),
                );
                sum = _mm512_dpwssd_epi32(
                    sum,
                    high,
                    _mm512_permutexvar_epi16(scale_index[2 * c + 1], scales),
                );
            }
            acc[r] = _mm512_fmadd_ps(
                _mm512_set1_ps(_mm_cvtss_f32(scale)),
                _mm512_cvtepi32_ps(sum),
                acc[r],
            );
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        let min_total = _mm_add_ps(acc_min[r], _mm_movehl_ps(acc_min[r], acc_min[r]));
        let min_total = _mm_add_ss(min_total, _mm_shuffle_ps::<1>(min_total, min_total));
        out[r] = _mm512_reduce_add_ps(acc[r]) - _mm_cvtss_f32(min_total);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_equals_candles_q4k_q8k_dot_product() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 BW/VNNI");
            return;
        }
        for (k, seed) in [(256, 1), (3584, 2), (18944, 3)] {
            let w = crate::testing::Values(seed).take(k);
            let x = crate::testing::Values(seed + 100).take(k);
            let mut q4 = vec![BlockQ4K::zeros(); k / QK_K];
            BlockQ4K::from_float(&w, &mut q4);
            let mut q8 = vec![BlockQ8K::zeros(); k / QK_K];
            BlockQ8K::from_float(&x, &mut q8);
            let reference = BlockQ4K::vec_dot_unopt(k, &q4, &q8);
            let bytes = crate::blocks::bytes_of(&q4);
            let row: &[Q4KBlock] = crate::blocks::view(bytes).unwrap();
            let [ours] = dot([row], &PreparedQ8K::new(&x)).unwrap();
            let scale: f32 = w.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
            assert!(
                (ours - reference).abs() <= 1e-5 * scale,
                "k={k}: {ours} vs candle's {reference}"
            );
        }
    }

    #[test]
    fn scales_and_mins_match_ggmls_unpacking() {
        let packed: [u8; 12] = std::array::from_fn(|i| (i as u8).wrapping_mul(77).wrapping_add(13));
        let (scales, mins) = scales_and_mins(&packed);
        for j in 0..8 {
            // ggml's get_scale_min_k4.
            let (sc, m) = if j < 4 {
                (packed[j] & 63, packed[j + 4] & 63)
            } else {
                (
                    (packed[j + 4] & 0xf) | ((packed[j - 4] >> 6) << 4),
                    (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
                )
            };
            assert_eq!((scales >> (8 * j)) as u8, sc, "scale {j}");
            assert_eq!((mins >> (8 * j)) as u8, m, "min {j}");
        }
    }
}
