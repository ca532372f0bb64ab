//! q8_0 x q8_0 dot products with AVX-512 VNNI or AVX2, for decoding against q8_0 weights on
//! CPUs that have either (candle's own q8_0 product is scalar unless the whole build targets
//! AVX, and read ~8.5 GB/s: q8_0 weights decoded slower than BF16 ones with twice the bytes).
//!
//! As in ggml, each product of 32 values is an exact integer: the weight's magnitudes
//! (unsigned) times the input with the weight's sign. AVX-512 takes two blocks per `vpdpbusd`;
//! AVX2 one block per `vpmaddubsw` + `vpmaddwd`. Each lane is then scaled by its block's two
//! scales in f32, so a dot product equals candle's (ggml's) up to the order in which f32 terms
//! are added.
//!
//! The input must be quantized by candle's `BlockQ8_0::from_float` (or hold values in
//! `-127..=127` as that does): `-128` has no positive counterpart to take a weight's sign.
//! Weights may hold any `i8`.

use std::arch::x86_64::*;

use candle_core::quantized::k_quants::BlockQ8_0;

/// Values per q8_0 block.
const QK: usize = 32;

/// A q8_0 block as ggml lays it out (`BlockQ8_0` is `repr(C)` with these fields, private).
#[repr(C)]
pub struct Q8_0Block {
    /// Scale (f16 bits).
    pub(crate) d: u16,
    /// The values.
    pub(crate) qs: [i8; QK],
}
const _: () = assert!(std::mem::size_of::<Q8_0Block>() == std::mem::size_of::<BlockQ8_0>());

// SAFETY: `repr(C)` integers only (sizes asserted above): every bit pattern is a block, and
// there is no padding.
unsafe impl crate::blocks::PlainBlock for Q8_0Block {}

/// The instructions a dot product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// AVX-512 F, BW, VL and VNNI, and F16C: two blocks per `vpdpbusd`.
    Avx512Vnni,
    /// AVX2, FMA and F16C: one block per `vpmaddubsw`.
    Avx2,
}

impl Path {
    /// The fastest path this CPU has, if any.
    pub fn best() -> Option<Path> {
        if crate::cpu::avx512_vnni() {
            Some(Path::Avx512Vnni)
        } else if crate::cpu::avx2_fma() && std::arch::is_x86_feature_detected!("f16c") {
            Some(Path::Avx2)
        } else {
            None
        }
    }

    /// Whether this CPU runs this path.
    pub fn available(self) -> bool {
        match self {
            Path::Avx512Vnni => crate::cpu::avx512_vnni(),
            Path::Avx2 => crate::cpu::avx2_fma() && std::arch::is_x86_feature_detected!("f16c"),
        }
    }
}

/// Whether this CPU runs [`dot`].
pub fn available() -> bool {
    Path::best().is_some()
}

/// The dot product of a row of q8_0 weight blocks with an input row of as many q8_0 blocks,
/// on this CPU's best path. `None` when this CPU has none ([`available`]) or the lengths
/// differ.
#[inline]
pub fn dot(w: &[Q8_0Block], x: &[Q8_0Block]) -> Option<f32> {
    dot_on(Path::best()?, w, x)
}

/// [`dot`] of several rows with one input, each input block loaded once for all of them
/// (long rows: the input no longer stays in the first-level cache beside one row's stream).
/// Each result is bit for bit [`dot`]'s. `None` when this CPU lacks AVX-512 VNNI (take the
/// rows one at a time there) or a row's length differs from the input's.
pub fn dot_rows<const R: usize>(w: [&[Q8_0Block]; R], x: &[Q8_0Block]) -> Option<[f32; R]> {
    if !Path::Avx512Vnni.available() || w.iter().any(|row| row.len() != x.len()) {
        return None;
    }
    // SAFETY: the CPU has the features and every row the input's length, checked above.
    Some(unsafe { dot_rows_avx512(w, x) })
}

/// [`dot`] on a given path; `None` when this CPU lacks it or the lengths differ.
pub fn dot_on(path: Path, w: &[Q8_0Block], x: &[Q8_0Block]) -> Option<f32> {
    if !path.available() || w.len() != x.len() {
        return None;
    }
    // SAFETY: the CPU has the path's features and the rows are as long, checked above.
    Some(unsafe {
        match path {
            Path::Avx512Vnni => dot_rows_avx512([w], x)[0],
            Path::Avx2 => dot_avx2(w, x),
        }
    })
}

/// The product of two blocks' scales.
#[inline]
#[target_feature(enable = "f16c")]
fn scale(w: &Q8_0Block, x: &Q8_0Block) -> f32 {
    let both = _mm_cvtph_ps(_mm_cvtsi32_si128(
        (u32::from(w.d) | (u32::from(x.d) << 16)) as i32,
    ));
    _mm_cvtss_f32(_mm_mul_ps(both, _mm_movehdup_ps(both)))
}

/// Two blocks' values as one 512-bit register (the second block's in the upper half).
#[inline]
#[target_feature(enable = "avx512f")]
fn two_blocks(first: &Q8_0Block, second: &Q8_0Block) -> __m512i {
    // SAFETY: each block's `qs` is 32 bytes, read unaligned.
    unsafe {
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_loadu_si256(first.qs.as_ptr().cast())),
            _mm256_loadu_si256(second.qs.as_ptr().cast()),
        )
    }
}

/// How far ahead of the blocks being multiplied a row is prefetched (the hardware prefetcher
/// alone left two Xeon cores at ~14 GB/s on rows of 3584 values; with this, 20-21).
const PREFETCH_BYTES: usize = 512;

/// [`dot`] of `R` rows with one input on AVX-512: each pair of input blocks is loaded once for
/// all rows. Each row's result is computed exactly as it is alone (the same operations in the
/// same order), so grouping rows changes no bit.
///
/// # Safety
/// The CPU must have [`Path::Avx512Vnni`]'s features, and every row the input's length.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vl,f16c")]
unsafe fn dot_rows_avx512<const R: usize>(w: [&[Q8_0Block]; R], x: &[Q8_0Block]) -> [f32; R] {
    // f32 lanes 0..8 take the first block's scale, 8..16 the second's.
    let spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); R];
    let pairs = x.len() / 2;
    for p in 0..pairs {
        // SAFETY: blocks 2p and 2p + 1 exist in the input and in every row (same length,
        // p < len / 2).
        let (x0, x1) = unsafe { (x.get_unchecked(2 * p), x.get_unchecked(2 * p + 1)) };
        let input = two_blocks(x0, x1);
        let input_scales = (u64::from(x0.d) << 32) | (u64::from(x1.d) << 48);
        for (row, acc) in w.iter().zip(acc.iter_mut()) {
            // SAFETY: as above.
            let (w0, w1) = unsafe { (row.get_unchecked(2 * p), row.get_unchecked(2 * p + 1)) };
            // The row PREFETCH_BYTES ahead (past its end: the next row's, where rows lie one
            // after another), both cache lines a pair of blocks may touch.
            let ahead = (w0 as *const Q8_0Block as *const i8).wrapping_add(PREFETCH_BYTES);
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            let weights = two_blocks(w0, w1);
            let magnitudes = _mm512_abs_epi8(weights);
            let signed = _mm512_mask_sub_epi8(input, _mm512_movepi8_mask(weights), zero, input);
            let sums = _mm512_dpbusd_epi32(zero, magnitudes, signed);
            let halves = u64::from(w0.d) | (u64::from(w1.d) << 16) | input_scales;
            // [w0, w1, x0, x1] -> [w0 x0, w1 x1, ..]
            let scales = _mm_cvtph_ps(_mm_cvtsi64_si128(halves as i64));
            let scales = _mm_mul_ps(scales, _mm_movehl_ps(scales, scales));
            let scales = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(scales));
            *acc = _mm512_fmadd_ps(scales, _mm512_cvtepi32_ps(sums), *acc);
        }
    }
    let mut totals = [0f32; R];
    for ((total, acc), row) in totals.iter_mut().zip(acc).zip(w) {
        *total = _mm512_reduce_add_ps(acc);
        if let (Some(w), Some(x)) = (row.get(2 * pairs), x.get(2 * pairs)) {
            let sum: i32 =
                w.qs.iter()
                    .zip(&x.qs)
                    .map(|(&a, &b)| i32::from(a) * i32::from(b))
                    .sum();
            *total += scale(w, x) * sum as f32;
        }
    }
    totals
}

/// [`dot`] with AVX2.
///
/// # Safety
/// The CPU must have [`Path::Avx2`]'s features, and `w` and `x` the same length.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(w: &[Q8_0Block], x: &[Q8_0Block]) -> f32 {
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    for (w, x) in w.iter().zip(x) {
        // SAFETY: each block's `qs` is 32 bytes, read unaligned.
        let (weights, input) = unsafe {
            (
                _mm256_loadu_si256(w.qs.as_ptr().cast()),
                _mm256_loadu_si256(x.qs.as_ptr().cast()),
            )
        };
        let magnitudes = _mm256_sign_epi8(weights, weights);
        let signed = _mm256_sign_epi8(input, weights);
        // Pairs of products: at most 2 x 128 x 127, within i16.
        let pairs = _mm256_maddubs_epi16(magnitudes, signed);
        let sums = _mm256_madd_epi16(pairs, ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(scale(w, x)), _mm256_cvtepi32_ps(sums), acc);
    }
    let four = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::k_quants::GgmlType;

    fn blocks_of(values: &[f32]) -> Vec<BlockQ8_0> {
        let mut q = vec![BlockQ8_0::zeros(); values.len() / QK];
        BlockQ8_0::from_float(values, &mut q);
        q
    }

    fn view(blocks: &[BlockQ8_0]) -> &[Q8_0Block] {
        crate::blocks::view(crate::blocks::bytes_of(blocks)).unwrap()
    }

    /// Every path this CPU has equals candle's q8_0 x q8_0 dot product, on even and odd block
    /// counts, and on weights that hold -128 (which candle's quantizer never writes, but a
    /// file may).
    #[test]
    fn dot_equals_candles_q8_0_dot_product() {
        let paths: Vec<Path> = [Path::Avx512Vnni, Path::Avx2]
            .into_iter()
            .filter(|p| p.available())
            .collect();
        if paths.is_empty() {
            eprintln!("skipped: this CPU has neither AVX-512 VNNI nor AVX2");
            return;
        }
        let mut values = crate::testing::Values(9);
        for k in [32, 64, 96, 1408, 3584, 3616] {
            let w = values.take(3 * k);
            let x = values.take(k);
            let mut wq = blocks_of(&w);
            // Block 0 of row 2: the most negative weights a file can hold.
            {
                let mut bytes = crate::blocks::bytes_of(&wq[2 * k / QK..]).to_vec();
                for b in &mut bytes[2..2 + QK / 2] {
                    *b = 0x80;
                }
                let edited: &[BlockQ8_0] = crate::blocks::view(&bytes).unwrap();
                wq[2 * k / QK] = edited[0].clone();
            }
            let xq = blocks_of(&x);
            for path in &paths {
                for (i, row) in wq.chunks(k / QK).enumerate() {
                    let reference = BlockQ8_0::vec_dot_unopt(k, row, &xq);
                    let got = dot_on(*path, view(row), view(&xq)).unwrap();
                    let scale: f32 = view(row)
                        .iter()
                        .zip(view(&xq))
                        .map(|(a, b)| {
                            let d = half::f16::from_bits(a.d).to_f32()
                                * half::f16::from_bits(b.d).to_f32();
                            a.qs.iter()
                                .zip(&b.qs)
                                .map(|(&p, &q)| (d * f32::from(p) * f32::from(q)).abs())
                                .sum::<f32>()
                        })
                        .sum();
                    assert!(
                        (got - reference).abs() <= 1e-5 * scale,
                        "{path:?}, k={k}, row {i}: {got} vs candle's {reference}"
                    );
                }
            }
        }
        // Rows taken together give each row's own result, bit for bit.
        if Path::Avx512Vnni.available() {
            let k = 3616;
            let w = blocks_of(&values.take(4 * k));
            let x = blocks_of(&values.take(k));
            let rows: Vec<&[Q8_0Block]> = view(&w).chunks(k / QK).collect();
            let together = dot_rows([rows[0], rows[1], rows[2], rows[3]], view(&x)).unwrap();
            for (row, got) in rows.iter().zip(together) {
                assert_eq!(got.to_bits(), dot(row, view(&x)).unwrap().to_bits());
            }
            assert_eq!(dot_rows([rows[0], &rows[1][1..]], view(&x)), None);
        }
        // Rows of different lengths are refused.
        let a = blocks_of(&values.take(64));
        let b = blocks_of(&values.take(32));
        assert_eq!(dot(view(&a), view(&b)), None);
    }
}
