//! Quantized rows widened to BF16 for the BF16 GEMM (a prefill against q8_0, q4k or q4_0
//! weights on AMX tiles): each value computed in f32 exactly as candle's (ggml's) `to_float` computes it,
//! then rounded to the nearest BF16 (ties to even) as `half::bf16::from_f32` rounds.
//!
//! The arithmetic is written once, plainly; on CPUs with AVX-512 it is compiled a second time
//! with those instructions enabled, where the compiler turns each block's loop into vector
//! code (the scalar row conversion through f32 cost a prefill seconds), and written a third time
//! with AVX512-BF16's conversion (every AMX CPU has it), twice as fast again.

use crate::q4_0::Q4_0Block;
use crate::q4k::{scales_and_mins, Q4KBlock};
use crate::q8_0::Q8_0Block;

/// Values per q8_0 (and q4_0) block.
const QK8_0: usize = 32;
/// Values per q4k block.
const QK_K: usize = 256;

/// The blocks' values as BF16 bits into `out` (`32` per block). Panics when `out` is shorter.
pub fn q8_0_to_bf16(blocks: &[Q8_0Block], out: &mut [u16]) {
    let paths = [q8_0_avx512_bf16, q8_0_avx512];
    widen_row(blocks, out, QK8_0, "q8_0", paths, q8_0_plain)
}

/// The blocks' values as BF16 bits into `out` (`256` per block). Panics when `out` is shorter.
pub fn q4k_to_bf16(blocks: &[Q4KBlock], out: &mut [u16]) {
    widen_row(
        blocks,
        out,
        QK_K,
        "q4k",
        [q4k_avx512_bf16, q4k_avx512],
        q4k_plain,
    )
}

/// The blocks' values as BF16 bits into `out` (`32` per block). Panics when `out` is shorter.
pub fn q4_0_to_bf16(blocks: &[Q4_0Block], out: &mut [u16]) {
    let paths = [q4_0_avx512_bf16, q4_0_avx512];
    widen_row(blocks, out, QK8_0, "q4_0", paths, q4_0_plain)
}

/// A row of blocks widened to BF16 bits on instructions the CPU may lack.
type Widening<B> = unsafe fn(&[B], &mut [u16]);

/// A row of `per_block`-value blocks of type `name` widened on the widest path this CPU has:
/// `with_bf16` (AVX-512 F, BW, VL and BF16), `avx512` (AVX-512 F, BW and VL) or `plain`.
fn widen_row<B>(
    blocks: &[B],
    out: &mut [u16],
    per_block: usize,
    name: &str,
    [with_bf16, avx512]: [Widening<B>; 2],
    plain: fn(&[B], &mut [u16]),
) {
    assert!(
        out.len() >= blocks.len() * per_block,
        "{name} row longer than its output"
    );
    if crate::cpu::avx512_bf16() && crate::cpu::avx512_bw_vl() {
        // SAFETY: AVX-512 F, BW, VL and BF16 are present (and F16C, with them).
        unsafe { with_bf16(blocks, out) };
    } else if crate::cpu::avx512_bw_vl() {
        // SAFETY: AVX-512 F, BW and VL are present (and F16C, with them).
        unsafe { avx512(blocks, out) };
    } else {
        plain(blocks, out);
    }
}

/// [`q4_0_to_bf16`] compiled for AVX-512.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn q4_0_avx512(blocks: &[Q4_0Block], out: &mut [u16]) {
    q4_0_plain(blocks, out)
}

/// [`q8_0_to_bf16`] compiled for AVX-512.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn q8_0_avx512(blocks: &[Q8_0Block], out: &mut [u16]) {
    q8_0_plain(blocks, out)
}

/// [`q4k_to_bf16`] compiled for AVX-512.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn q4k_avx512(blocks: &[Q4KBlock], out: &mut [u16]) {
    q4k_plain(blocks, out)
}

/// [`q8_0_plain`] written with AVX-512 and its BF16 conversion: a block's 32 values widened
/// to f32, multiplied by the scale and rounded by `vcvtne2ps2bf16` (as [`q4k_avx512_bf16`]:
/// no value can be an f32 subnormal).
///
/// # Safety
/// The CPU has AVX-512 F, BW, VL and BF16; `out` holds 32 values per block.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
unsafe fn q8_0_avx512_bf16(blocks: &[Q8_0Block], out: &mut [u16]) {
    use std::arch::x86_64::*;
    for (block, out) in blocks.iter().zip(out.chunks_exact_mut(QK8_0)) {
        let d = _mm512_set1_ps(half::f16::from_bits(block.d).to_f32());
        // SAFETY: a block's 32 values.
        let values = unsafe { _mm256_loadu_si256(block.qs.as_ptr().cast()) };
        let value =
            |bytes: __m128i| _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), d);
        let first = value(_mm256_castsi256_si128(values));
        let second = value(_mm256_extracti128_si256::<1>(values));
        // SAFETY: 32 BF16 values have the bits of a 512-bit integer vector; the block's 32
        // outputs.
        unsafe {
            let bits: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(second, first));
            _mm512_storeu_si512(out.as_mut_ptr().cast(), bits);
        }
    }
}

/// [`q4_0_plain`] written with AVX-512 and its BF16 conversion: a block's 32 nibbles less 8,
/// widened to f32, multiplied by the scale and rounded by `vcvtne2ps2bf16` (as
/// [`q4k_avx512_bf16`]: no value can be an f32 subnormal).
///
/// # Safety
/// The CPU has AVX-512 F, BW, VL and BF16; `out` holds 32 values per block.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
unsafe fn q4_0_avx512_bf16(blocks: &[Q4_0Block], out: &mut [u16]) {
    use std::arch::x86_64::*;
    let (nibble, eight) = (_mm_set1_epi8(0x0f), _mm512_set1_epi32(8));
    for (block, out) in blocks.iter().zip(out.chunks_exact_mut(QK8_0)) {
        let d = _mm512_set1_ps(half::f16::from_bits(block.d).to_f32());
        // SAFETY: a block's 16 bytes.
        let packed = unsafe { _mm_loadu_si128(block.qs.as_ptr().cast()) };
        let value = |bytes: __m128i| {
            let centered = _mm512_sub_epi32(_mm512_cvtepu8_epi32(bytes), eight);
            _mm512_mul_ps(_mm512_cvtepi32_ps(centered), d)
        };
        // Byte i holds value i (low nibble) and value 16 + i (high nibble).
        let first = value(_mm_and_si128(packed, nibble));
        let second = value(_mm_and_si128(_mm_srli_epi16::<4>(packed), nibble));
        // SAFETY: as in `q8_0_avx512_bf16`.
        unsafe {
            let bits: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(second, first));
            _mm512_storeu_si512(out.as_mut_ptr().cast(), bits);
        }
    }
}

/// [`q4k_plain`] written with AVX-512 and its BF16 conversion: 32 values at a time, their
/// nibbles widened to f32, the same two operations (`d1 q - m1`, not fused), rounded by
/// `vcvtne2ps2bf16` (to nearest even, NaN made quiet, as `half` rounds; it would flush f32
/// subnormals, which these values cannot be: each term is zero or at least an f16
/// subnormal's size, and so is their difference). The compiler's vectorization of the plain
/// loop took ~0.55 cycles a value, 16% of a Kimi-VL q4k prompt's first token.
///
/// # Safety
/// The CPU has AVX-512 F, BW, VL and BF16; `out` holds 256 values per block.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
unsafe fn q4k_avx512_bf16(blocks: &[Q4KBlock], out: &mut [u16]) {
    use std::arch::x86_64::*;
    let nibble = _mm256_set1_epi8(0x0f);
    for (block, out) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = half::f16::from_bits(block.d).to_f32();
        let min = half::f16::from_bits(block.dmin).to_f32();
        let (scales, mins) = scales_and_mins(&block.scales);
        let byte = |packed: u64, i: usize| f32::from((packed >> (8 * i)) as u8);
        for j in 0..4 {
            // SAFETY: bytes 32 j..32 j + 32 lie within the block's 128.
            let packed = unsafe { _mm256_loadu_si256(block.qs.as_ptr().add(32 * j).cast()) };
            // Low nibbles: sub-block 2 j (values 64 j..); high nibbles: 2 j + 1 (64 j + 32..).
            let nibbles = [
                _mm256_and_si256(packed, nibble),
                _mm256_and_si256(_mm256_srli_epi16::<4>(packed), nibble),
            ];
            for (k, values) in nibbles.into_iter().enumerate() {
                let sub = 2 * j + k;
                let scale = _mm512_set1_ps(d * byte(scales, sub));
                let offset = _mm512_set1_ps(min * byte(mins, sub));
                let value = |bytes: __m128i| {
                    let v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
                    _mm512_sub_ps(_mm512_mul_ps(scale, v), offset)
                };
                let first = value(_mm256_castsi256_si128(values));
                let second = value(_mm256_extracti128_si256::<1>(values));
                // SAFETY: 32 BF16 values have the bits of a 512-bit integer vector; values
                // 64 j + 32 k..+ 32 lie within the block's 256 outputs.
                unsafe {
                    let bits: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(second, first));
                    _mm512_storeu_si512(out.as_mut_ptr().add(64 * j + 32 * k).cast(), bits);
                }
            }
        }
    }
}

#[inline(always)]
fn q8_0_plain(blocks: &[Q8_0Block], out: &mut [u16]) {
    for (block, out) in blocks.iter().zip(out.chunks_exact_mut(QK8_0)) {
        let d = half::f16::from_bits(block.d).to_f32();
        for (o, &q) in out.iter_mut().zip(&block.qs) {
            *o = bf16_bits(f32::from(q) * d);
        }
    }
}

#[inline(always)]
fn q4_0_plain(blocks: &[Q4_0Block], out: &mut [u16]) {
    for (block, out) in blocks.iter().zip(out.chunks_exact_mut(QK8_0)) {
        let d = half::f16::from_bits(block.d).to_f32();
        // Byte i holds value i (low nibble) and value 16 + i (high nibble), offset by 8.
        let (low, high) = out.split_at_mut(QK8_0 / 2);
        for ((l, h), &q) in low.iter_mut().zip(high.iter_mut()).zip(&block.qs) {
            *l = bf16_bits(f32::from(i16::from(q & 0xf) - 8) * d);
            *h = bf16_bits(f32::from(i16::from(q >> 4) - 8) * d);
        }
    }
}

#[inline(always)]
fn q4k_plain(blocks: &[Q4KBlock], out: &mut [u16]) {
    for (block, out) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = half::f16::from_bits(block.d).to_f32();
        let min = half::f16::from_bits(block.dmin).to_f32();
        let (scales, mins) = scales_and_mins(&block.scales);
        // Bytes 32 j.. hold values 64 j.. (low nibbles, sub-block 2 j) and 64 j + 32..
        // (high nibbles, sub-block 2 j + 1).
        for (j, (qs, out)) in block
            .qs
            .chunks_exact(32)
            .zip(out.chunks_exact_mut(64))
            .enumerate()
        {
            let byte = |packed: u64, i: usize| f32::from((packed >> (8 * i)) as u8);
            let (d1, m1) = (d * byte(scales, 2 * j), min * byte(mins, 2 * j));
            let (d2, m2) = (d * byte(scales, 2 * j + 1), min * byte(mins, 2 * j + 1));
            let (low, high) = out.split_at_mut(32);
            for ((l, h), &q) in low.iter_mut().zip(high.iter_mut()).zip(qs) {
                *l = bf16_bits(d1 * f32::from(q & 0xf) - m1);
                *h = bf16_bits(d2 * f32::from(q >> 4) - m2);
            }
        }
    }
}

/// `half::bf16::from_f32(v).to_bits()` without branches on the value's class (so that loops
/// of it vectorize): NaNs stay NaNs (quiet, sign and high payload kept), the rest round to
/// nearest, ties to even.
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
    let nan = (x >> 16) | 0x40;
    (if x & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::{bytes_of, view, PlainBlock};
    use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_0, BlockQ8_0, GgmlType};

    /// Weights spanning several magnitudes.
    fn weights(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let t = (i * 7919 % 2003) as f32 / 1001.0 - 1.0;
                t * 10f32.powi((i / 97 % 7) as i32 - 3)
            })
            .collect()
    }

    /// `blocks` blocks of [`weights`] quantized by candle, then for each `(block, byte, bits)`
    /// of `scales` an f16 scale written over that block's bytes (infinite, NaN, subnormal).
    fn quantized<T: GgmlType + PlainBlock>(
        blocks: usize,
        scales: &[(usize, usize, u16)],
    ) -> Vec<T> {
        let mut quantized = vec![T::zeros(); blocks];
        T::from_float(&weights(blocks * T::BLCK_SIZE), &mut quantized);
        let size = std::mem::size_of::<T>();
        // SAFETY: plain data (`PlainBlock`): every byte is initialized and any bytes are a
        // block; the slice borrows `quantized` mutably.
        let bytes: &mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(quantized.as_mut_ptr().cast(), blocks * size) };
        for &(block, byte, bits) in scales {
            let at = block * size + byte;
            bytes[at..at + 2].copy_from_slice(&bits.to_le_bytes());
        }
        quantized
    }

    /// A row of blocks to BF16 bits.
    type Conversion<B> = fn(&[B], &mut [u16]);

    /// The plain and the dispatched conversion of `blocks`, read in our layout `B`, against
    /// candle's own dequantization of them rounded by `half`; and the AVX-512 ones the CPU
    /// has (`[without, with]` its BF16 conversion).
    fn assert_equals_candle<T: GgmlType + PlainBlock, B: PlainBlock>(
        blocks: &[T],
        [plain, dispatched]: [Conversion<B>; 2],
        [avx512, avx512_bf16]: [Widening<B>; 2],
    ) {
        let mut wide = vec![0f32; blocks.len() * T::BLCK_SIZE];
        T::to_float(blocks, &mut wide);
        let want: Vec<u16> = wide
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let ours = view::<B>(bytes_of(blocks)).expect("the same layout as candle's block");
        for (path, convert) in [
            ("plain", plain),
            ("dispatched (AVX-512 where present)", dispatched),
        ] {
            let mut got = vec![0u16; want.len()];
            convert(ours, &mut got);
            assert_eq!(got, want, "{path}");
        }
        for (path, has, convert) in [
            ("AVX-512", crate::cpu::avx512_bw_vl(), avx512),
            (
                "AVX-512 BF16",
                crate::cpu::avx512_bw_vl() && crate::cpu::avx512_bf16(),
                avx512_bf16,
            ),
        ] {
            if !has {
                eprintln!("not tested: the {path} path (this CPU lacks it)");
                continue;
            }
            let mut got = vec![0u16; want.len()];
            // SAFETY: the CPU has the path's features, checked just above; `got` holds the
            // blocks' values.
            unsafe { convert(ours, &mut got) };
            assert_eq!(got, want, "{path}");
        }
    }

    /// Infinite, NaN, subnormal and negative infinite f16 scales written over the scale `d`
    /// (a q8_0 or q4_0 block's first two bytes) of four blocks.
    const SCALES_IN_FIRST_BYTES: [(usize, usize, u16); 4] = [
        (3, 0, 0x7c00),
        (13, 0, 0x7e01),
        (23, 0, 0x0001),
        (33, 0, 0xfc00),
    ];

    #[test]
    fn q8_0_equals_candles_dequantization_rounded() {
        let blocks = quantized::<BlockQ8_0>(64, &SCALES_IN_FIRST_BYTES);
        assert_equals_candle(
            &blocks,
            [q8_0_plain, q8_0_to_bf16],
            [q8_0_avx512, q8_0_avx512_bf16],
        );
    }

    #[test]
    fn q4_0_equals_candles_dequantization_rounded() {
        let blocks = quantized::<BlockQ4_0>(64, &SCALES_IN_FIRST_BYTES);
        assert_equals_candle(
            &blocks,
            [q4_0_plain, q4_0_to_bf16],
            [q4_0_avx512, q4_0_avx512_bf16],
        );
    }

    #[test]
    fn q4k_equals_candles_dequantization_rounded() {
        // `d` is a block's first two bytes, `dmin` the next two.
        let scales = [(2, 0, 0x7c00), (7, 0, 0x7e01), (12, 0, 0x0001)];
        let mins = [(4, 2, 0x7c00), (9, 2, 0x7e01), (14, 2, 0x0001)];
        let blocks = quantized::<BlockQ4K>(24, &[scales, mins].concat());
        assert_equals_candle(
            &blocks,
            [q4k_plain, q4k_to_bf16],
            [q4k_avx512, q4k_avx512_bf16],
        );
    }

    #[test]
    fn bf16_rounding_equals_half() {
        let specials = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xff80_0001),
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            1.0 + f32::EPSILON * 64.0,
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x7f7f_ffff),
        ];
        let sweep = (0..1 << 20).map(|i: u32| f32::from_bits(i.wrapping_mul(4099)));
        for v in specials.into_iter().chain(sweep) {
            assert_eq!(
                bf16_bits(v),
                half::bf16::from_f32(v).to_bits(),
                "{:#x}",
                v.to_bits()
            );
        }
    }
}
