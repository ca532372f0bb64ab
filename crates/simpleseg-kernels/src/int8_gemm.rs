//! `x W^T` for prefills against quantized weights (q8_0, q4_0, q4k) by integer dot products
//! (AVX-512 VNNI `vpdpbusd`: AMD Zen 4, Intel Ice Lake and later), as ggml computes them:
//! the activations are quantized per row exactly as ggml quantizes a dot product's input
//! (q8_0 for q8_0 and q4_0 weights, q8K for q4k), and each 32-value block's product is an exact
//! integer, scaled in f32.
//!
//! Every weight type is first put in one form, [`UnsignedBlock`]: 32 unsigned 8-bit values
//! `u`, a scale `s` and an offset `o`, the weight being `s u - o` (q8_0: `u = q + 128`,
//! `o = 128 s`; q4_0: `u` the 4-bit value, `o = 8 s`; q4k: `s` and `o` the sub-block's scale
//! and minimum times the block's). A block's product with input values `q` (scale `d`) is then
//! `d s sum(u q) - o d sum(q)`: the integer sum runs on `vpdpbusd` (unsigned times signed bytes,
//! 64 products per instruction, twice a `vdpbf16ps`), the rest is two f32 multiply-adds.
//!
//! Layout, as [`crate::bf16_gemm`]'s: the weight is packed 48 output features at a time (a
//! panel; each block's 4-value groups of the 48 features side by side, as the instruction wants
//! them), and a micro-kernel keeps 4 rows x 48 features of sums in registers while it walks the
//! panel a cache block ([`KB`] blocks) at a time. Products differ from ggml's dot products on
//! the same quantized values only in the order in which f32 terms are added.

use candle_core::quantized::k_quants::{BlockQ8K, BlockQ8_0, GgmlType};

use crate::blocks::{bytes_of, view};
use crate::q4_0::Q4_0Block;
use crate::q4k::{Q4KBlock, Q8KBlock};
use crate::q8_0::Q8_0Block;

/// Values per block.
pub const QK: usize = 32;
/// Output features per packed panel (three registers of 16).
const NR: usize = 48;
/// Rows of `x` per micro-kernel call (4 x 3 registers of integer sums, as many of f32 sums).
const MR: usize = 4;
/// Blocks per cache block of the panel (512 inputs: 30 KB of packed weights, about L1).
const KB: usize = 16;

/// A block of 32 weights as the GEMM multiplies it: weight `i` is
/// `scale * values[i] - offset`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UnsignedBlock {
    /// The values, unsigned.
    pub values: [u8; QK],
    /// What a value is multiplied by.
    pub scale: f32,
    /// What is then subtracted.
    pub offset: f32,
}

/// How the activations are quantized: as ggml quantizes the input of the weight type's dot
/// product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activations {
    /// q8_0: 32 values per scale, the scale stored as f16 (q8_0 and q4_0 weights).
    Q8_0,
    /// q8K: 256 values per f32 scale (q4k weights).
    Q8K,
}

impl Activations {
    /// Values per scale.
    pub fn block_len(self) -> usize {
        match self {
            Activations::Q8_0 => QK,
            Activations::Q8K => 256,
        }
    }
}

/// Whether this CPU runs [`gemm`] (AVX-512 F, BW, VL and VNNI).
pub fn available() -> bool {
    crate::cpu::avx512_vnni()
}

/// A row of q8_0 blocks in the GEMM's form.
pub fn q8_0_row(row: &[Q8_0Block], out: &mut [UnsignedBlock]) {
    for (o, b) in out.iter_mut().zip(row) {
        let scale = half::f16::from_bits(b.d).to_f32();
        *o = UnsignedBlock {
            values: b.qs.map(|q| (q as u8) ^ 0x80),
            scale,
            offset: 128.0 * scale,
        };
    }
}

/// A row of q4_0 blocks in the GEMM's form.
pub fn q4_0_row(row: &[Q4_0Block], out: &mut [UnsignedBlock]) {
    for (o, b) in out.iter_mut().zip(row) {
        let scale = half::f16::from_bits(b.d).to_f32();
        let mut values = [0u8; QK];
        for (i, q) in b.qs.iter().enumerate() {
            values[i] = q & 0xf;
            values[i + QK / 2] = q >> 4;
        }
        *o = UnsignedBlock {
            values,
            scale,
            offset: 8.0 * scale,
        };
    }
}

/// A row of q4k blocks in the GEMM's form (eight blocks per q4k block).
pub fn q4k_row(row: &[Q4KBlock], out: &mut [UnsignedBlock]) {
    for (o, b) in out.chunks_exact_mut(8).zip(row) {
        let d = half::f16::from_bits(b.d).to_f32();
        let dmin = half::f16::from_bits(b.dmin).to_f32();
        let (scales, mins) = crate::q4k::scales_and_mins(&b.scales);
        for (j, o) in o.iter_mut().enumerate() {
            // Sub-block j: the low (even j) or high (odd j) nibbles of bytes 32 (j / 2)...
            let bytes = &b.qs[32 * (j / 2)..32 * (j / 2) + 32];
            let shift = 4 * (j % 2);
            *o = UnsignedBlock {
                values: std::array::from_fn(|i| (bytes[i] >> shift) & 0xf),
                scale: d * f32::from((scales >> (8 * j)) as u8),
                offset: dmin * f32::from((mins >> (8 * j)) as u8),
            };
        }
    }
}

/// `x` (`m x k` f32, row-major) times `w^T`, where `row(j, out)` writes row `j` of `w`
/// (`n x k`) in the GEMM's form into `out` (`k / 32` blocks): `m x n` f32. The activations are
/// quantized as `activations` says; rows of `w` are asked for once each. `None` when the CPU
/// lacks the instructions ([`available`]), `k` is not a whole number of activation blocks or
/// `x` holds fewer than `m x k` values.
pub fn gemm<R>(
    x: &[f32],
    m: usize,
    n: usize,
    k: usize,
    activations: Activations,
    row: R,
) -> Option<Vec<f32>>
where
    R: Fn(usize, &mut [UnsignedBlock]) + Sync,
{
    if !available() || !k.is_multiple_of(activations.block_len()) || x.len() < m * k {
        return None;
    }
    let input = QuantizedInput::new(&x[..m * k], k, activations)?;
    Some(gemm_x86(&input, &row, m, n, k))
}

/// Activation rows quantized for the kernel.
struct QuantizedInput {
    /// The values, `k` per row.
    values: Vec<i8>,
    /// Per row and 32-value block: the scale `d`.
    scale: Vec<f32>,
    /// Per row and block: `-d sum(q)`, what the block's offsets are multiplied by.
    negative_sum: Vec<f32>,
}

impl QuantizedInput {
    /// `x` (rows of `k` values) quantized as ggml quantizes each row for a dot product
    /// (candle's `from_float`), or `None` when `k` is not a whole number of blocks.
    fn new(x: &[f32], k: usize, activations: Activations) -> Option<Self> {
        use rayon::prelude::*;

        if k == 0 || !k.is_multiple_of(activations.block_len()) {
            return None;
        }
        let rows = x.len() / k;
        let blocks = k / QK;
        let mut input = QuantizedInput {
            values: vec![0; rows * k],
            scale: vec![0.0; rows * blocks],
            negative_sum: vec![0.0; rows * blocks],
        };
        input
            .values
            .par_chunks_mut(k)
            .zip(input.scale.par_chunks_mut(blocks))
            .zip(input.negative_sum.par_chunks_mut(blocks))
            .zip(x.par_chunks(k))
            .for_each(|(((values, scale), negative_sum), x)| {
                quantize_row(x, activations, values, scale);
                for ((s, ns), q) in scale.iter().zip(negative_sum).zip(values.chunks(QK)) {
                    *ns = -s * q.iter().map(|&v| f32::from(v)).sum::<f32>();
                }
            });
        Some(input)
    }
}

/// One row quantized with candle's (ggml's) own code: values and a scale per 32 values.
fn quantize_row(x: &[f32], activations: Activations, values: &mut [i8], scale: &mut [f32]) {
    match activations {
        Activations::Q8_0 => {
            let mut blocks = vec![BlockQ8_0::zeros(); x.len() / QK];
            BlockQ8_0::from_float(x, &mut blocks);
            let blocks: &[Q8_0Block] = view(bytes_of(&blocks)).unwrap_or_default();
            for ((b, v), s) in blocks.iter().zip(values.chunks_mut(QK)).zip(scale) {
                v.copy_from_slice(&b.qs);
                *s = half::f16::from_bits(b.d).to_f32();
            }
        }
        Activations::Q8K => {
            let mut blocks = vec![BlockQ8K::zeros(); x.len() / 256];
            BlockQ8K::from_float(x, &mut blocks);
            let blocks: &[Q8KBlock] = view(bytes_of(&blocks)).unwrap_or_default();
            for ((b, v), s) in blocks
                .iter()
                .zip(values.chunks_mut(256))
                .zip(scale.chunks_mut(256 / QK))
            {
                v.copy_from_slice(&b.qs);
                s.fill(b.d);
            }
        }
    }
}

/// One block of a panel: for each 4-value group `g`, the 48 features' four values side by side
/// (`values[g * 192 + 4 * j..]` for feature `j`), then the features' scales and offsets.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct PanelBlock {
    values: [u8; QK * NR],
    scale: [f32; NR],
    offset: [f32; NR],
}

const EMPTY_BLOCK: PanelBlock = PanelBlock {
    values: [0; QK * NR],
    scale: [0.0; NR],
    offset: [0.0; NR],
};

fn gemm_x86<R>(input: &QuantizedInput, row: &R, m: usize, n: usize, k: usize) -> Vec<f32>
where
    R: Fn(usize, &mut [UnsignedBlock]) + Sync,
{
    use rayon::prelude::*;

    let blocks = k / QK;
    let mut y = vec![0f32; m * n];
    let panels = n.div_ceil(NR);
    let y_ptr = SendPtr(y.as_mut_ptr());
    (0..panels).into_par_iter().for_each_init(
        || {
            (
                vec![EMPTY_BLOCK; blocks],
                vec![UnsignedBlock::default(); blocks],
            )
        },
        |(panel, scratch), p| {
            let f0 = p * NR;
            let nf = NR.min(n - f0);
            pack_panel(row, f0, nf, panel, scratch);
            let y_ptr = &y_ptr;
            for b0 in (0..blocks).step_by(KB) {
                let nb = KB.min(blocks - b0);
                for r0 in (0..m).step_by(MR) {
                    let args = KernelArgs {
                        values: &input.values[r0 * k..],
                        k,
                        scale: &input.scale[r0 * blocks..],
                        negative_sum: &input.negative_sum[r0 * blocks..],
                        blocks,
                        b0,
                        panel: &panel[b0..b0 + nb],
                        y: y_ptr.0,
                        y_offset: r0 * n + f0,
                        ldy: n,
                        nf,
                        accumulate: b0 > 0,
                    };
                    // SAFETY: the CPU has AVX-512 F, BW and VNNI (checked by `gemm`); the
                    // kernel reads rows r0..r0+mr of the input over blocks b0..b0+nb and the
                    // panel's blocks, and writes y[r, f0..f0+nf] for those rows only: no other
                    // task touches those columns.
                    unsafe {
                        match MR.min(m - r0) {
                            4 => kernel::<4>(&args),
                            3 => kernel::<3>(&args),
                            2 => kernel::<2>(&args),
                            _ => kernel::<1>(&args),
                        }
                    }
                }
            }
        },
    );
    y
}

/// A pointer moved into the parallel tasks (each writes its own columns).
struct SendPtr(*mut f32);
// SAFETY: see `gemm_x86`: tasks write disjoint parts of the buffer.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// Packs features f0..f0+nf (zero beyond) into `panel`. Rows are read one after the other (the
/// weight streams from memory); the scattered writes land in the panel, which stays in cache.
fn pack_panel<R>(
    row: &R,
    f0: usize,
    nf: usize,
    panel: &mut [PanelBlock],
    scratch: &mut [UnsignedBlock],
) where
    R: Fn(usize, &mut [UnsignedBlock]),
{
    for j in 0..NR {
        if j < nf {
            row(f0 + j, scratch);
        } else {
            scratch.fill(UnsignedBlock::default());
        }
        for (block, source) in panel.iter_mut().zip(scratch.iter()) {
            for (g, four) in source.values.chunks_exact(4).enumerate() {
                block.values[g * 4 * NR + 4 * j..g * 4 * NR + 4 * j + 4].copy_from_slice(four);
            }
            block.scale[j] = source.scale;
            block.offset[j] = source.offset;
        }
    }
}

/// A micro-kernel's operands: the input from its first row (row strides `k` values and
/// `blocks` scales), the first block `b0` of the panel's cache block `panel`, and `y` at
/// `y_offset` (row stride `ldy`, `nf` valid columns), added to when `accumulate`, else stored.
struct KernelArgs<'a> {
    values: &'a [i8],
    k: usize,
    scale: &'a [f32],
    negative_sum: &'a [f32],
    blocks: usize,
    b0: usize,
    panel: &'a [PanelBlock],
    y: *mut f32,
    y_offset: usize,
    ldy: usize,
    nf: usize,
    accumulate: bool,
}

/// Sums for the `R` rows over a panel's cache block.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI; the input holds `R` rows from its start (values,
/// scales and sums at the strides in `a`) covering blocks `b0..b0 + panel.len()`; `y` is valid
/// for `R` rows of `nf` values at stride `ldy` from `y_offset`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kernel<const R: usize>(a: &KernelArgs) {
    use std::arch::x86_64::*;

    let mut acc = [[_mm512_setzero_ps(); 3]; R];
    let xp = a.values.as_ptr();
    for (i, block) in a.panel.iter().enumerate() {
        let b = a.b0 + i;
        let vp = block.values.as_ptr();
        let mut sums = [[_mm512_setzero_si512(); 3]; R];
        for g in 0..QK / 4 {
            // SAFETY: the block holds 8 groups of 3 x 64 bytes (aligned: the block is).
            let w: [__m512i; 3] =
                [0, 1, 2].map(|c| unsafe { _mm512_load_si512(vp.add(g * 4 * NR + 64 * c).cast()) });
            for (r, row) in sums.iter_mut().enumerate() {
                // SAFETY: row r < R holds block b's four values g from r * k + 32 b + 4 g.
                let four = unsafe {
                    _mm512_set1_epi32(
                        (xp.add(r * a.k + b * QK + 4 * g) as *const i32).read_unaligned(),
                    )
                };
                for c in 0..3 {
                    row[c] = _mm512_dpbusd_epi32(row[c], w[c], four);
                }
            }
        }
        // SAFETY: 48 scales and offsets per block, aligned (64-byte fields at 64-byte offsets).
        let (scale, offset): ([__m512; 3], [__m512; 3]) = unsafe {
            (
                [0, 1, 2].map(|c| _mm512_load_ps(block.scale.as_ptr().add(16 * c))),
                [0, 1, 2].map(|c| _mm512_load_ps(block.offset.as_ptr().add(16 * c))),
            )
        };
        for (r, (acc, sums)) in acc.iter_mut().zip(&sums).enumerate() {
            let d = _mm512_set1_ps(a.scale[r * a.blocks + b]);
            let negative_sum = _mm512_set1_ps(a.negative_sum[r * a.blocks + b]);
            for c in 0..3 {
                let scaled = _mm512_mul_ps(scale[c], d);
                acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[c]), scaled, acc[c]);
                acc[c] = _mm512_fmadd_ps(offset[c], negative_sum, acc[c]);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (c, sums) in row.iter().enumerate() {
            let valid = a.nf.saturating_sub(c * 16).min(16);
            if valid == 0 {
                break;
            }
            let mask: __mmask16 = if valid == 16 {
                0xffff
            } else {
                (1u16 << valid) - 1
            };
            // SAFETY: columns c * 16 .. c * 16 + valid of row r are within y (see above).
            unsafe {
                let dst = a.y.add(a.y_offset + r * a.ldy + c * 16);
                let value = if a.accumulate {
                    _mm512_add_ps(*sums, _mm512_maskz_loadu_ps(mask, dst))
                } else {
                    *sums
                };
                _mm512_mask_storeu_ps(dst, mask, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_0};

    /// Quantizes `n x k` values as `T` and returns the blocks.
    fn quantized<T: GgmlType>(values: &[f32]) -> Vec<T> {
        let mut blocks = vec![T::zeros(); values.len() / T::BLCK_SIZE];
        T::from_float(values, &mut blocks);
        blocks
    }

    /// The GEMM of `m` rows against an `n x k` matrix of `T` blocks equals ggml's dot products
    /// (candle's reference `vec_dot_unopt` on the input quantized by candle) for every output.
    fn equals_ggmls_dot_products<T, B>(
        m: usize,
        n: usize,
        k: usize,
        activations: Activations,
        convert: fn(&[B], &mut [UnsignedBlock]),
    ) where
        T: GgmlType + crate::blocks::PlainBlock,
        B: crate::blocks::PlainBlock + Sync,
    {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI");
            return;
        }
        let mut values = crate::testing::Values(5);
        let x = values.take(m * k);
        let w = quantized::<T>(&values.take(n * k));
        let per_row = k / T::BLCK_SIZE;
        let typed: &[B] = view(bytes_of(&w)).expect("same layout");
        let row = |j: usize, out: &mut [UnsignedBlock]| {
            convert(&typed[j * per_row..(j + 1) * per_row], out)
        };
        let y = gemm(&x, m, n, k, activations, row).expect("available");
        for r in 0..m {
            let xq = quantized::<T::VecDotType>(&x[r * k..(r + 1) * k]);
            for f in 0..n {
                let want = T::vec_dot_unopt(k, &w[f * per_row..(f + 1) * per_row], &xq);
                let got = y[r * n + f];
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{m}x{k} by {n}: ({r}, {f}) {got} vs ggml's {want}"
                );
            }
        }
    }

    // Awkward sizes: rows not a multiple of 4, features not a multiple of 48, several cache
    // blocks with a partial last one.

    #[test]
    fn q8_0_equals_ggmls_dot_products() {
        equals_ggmls_dot_products::<candle_core::quantized::k_quants::BlockQ8_0, Q8_0Block>(
            7,
            101,
            32 * 70,
            Activations::Q8_0,
            q8_0_row,
        );
    }

    #[test]
    fn q4_0_equals_ggmls_dot_products() {
        equals_ggmls_dot_products::<BlockQ4_0, Q4_0Block>(
            6,
            50,
            32 * 37,
            Activations::Q8_0,
            q4_0_row,
        );
    }

    #[test]
    fn q4k_equals_ggmls_dot_products() {
        equals_ggmls_dot_products::<BlockQ4K, Q4KBlock>(9, 97, 256 * 9, Activations::Q8K, q4k_row);
    }

    /// Each form's blocks, dequantized (`scale * value - offset`), are candle's dequantized
    /// weights.
    #[test]
    fn forms_dequantize_as_candle_does() {
        fn check<T: GgmlType + crate::blocks::PlainBlock, B: crate::blocks::PlainBlock>(
            k: usize,
            convert: fn(&[B], &mut [UnsignedBlock]),
        ) {
            let w = quantized::<T>(&crate::testing::Values(9).take(k));
            let mut want = vec![0f32; k];
            T::to_float(&w, &mut want);
            let mut form = vec![UnsignedBlock::default(); k / QK];
            convert(view(bytes_of(&w)).expect("same layout"), &mut form);
            let got = form
                .iter()
                .flat_map(|b| b.values.map(|v| b.scale * f32::from(v) - b.offset));
            for (i, (g, w)) in got.zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{i}: {g} vs {w}");
            }
        }
        check::<candle_core::quantized::k_quants::BlockQ8_0, Q8_0Block>(256, q8_0_row);
        check::<BlockQ4_0, Q4_0Block>(256, q4_0_row);
        check::<BlockQ4K, Q4KBlock>(512, q4k_row);
    }

    #[test]
    fn refuses_sizes_it_cannot_take() {
        let x = vec![0.5f32; 2 * 100];
        let row = |_: usize, _: &mut [UnsignedBlock]| {};
        assert!(gemm(&x, 2, 3, 100, Activations::Q8_0, row).is_none());
        assert!(gemm(&x, 3, 3, 96, Activations::Q8K, row).is_none());
    }
}
