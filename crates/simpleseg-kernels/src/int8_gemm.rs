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
//! 64 products per instruction, twice a `vdpbf16ps`), eight per block and row and 16 features.
//! What follows in f32 is most of the rest of the work, so it is kept to three operations:
//! - q8_0 and q4_0 (an input scale per block, `o = c s` with `c` 128 or 8): the integer sum
//!   starts from `-c sum(q)`, then is converted and multiplied by `d s` into the row's sums;
//! - q4k (one input scale per 8 blocks): the converted sum times `s`, and `o` times `-sum(q)`,
//!   are added into a q4k block's sums, which are multiplied by `d` into the output once per
//!   8 blocks.
//!
//! Layout: the weight is packed [`NR`] output features at a time (a panel; each block's 4-value
//! groups of the features side by side, as the instruction wants them), and a micro-kernel
//! keeps [`MR`] rows x [`NR`] features of sums in registers while it walks the
//! panel a cache block ([`KB`] blocks) at a time. Products differ from ggml's dot products on
//! the same quantized values only in the order in which f32 terms are added.

use std::arch::x86_64::*;

use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};

use crate::blocks::{bytes_of, view};
use crate::output::store_rows;
use crate::q4_0::Q4_0Block;
use crate::q4k::Q4KBlock;
use crate::q8_0::Q8_0Block;

/// Values per block.
pub const QK: usize = 32;
/// Registers of 16 output features per panel.
const NC: usize = 2;
/// Output features per packed panel.
const NR: usize = 16 * NC;
/// Rows of `x` per micro-kernel call: 6 x 2 registers of integer sums, as many of f32 sums,
/// two of weights and one of input, 27 of the 32 registers, so nothing is spilled.
const MR: usize = 6;
/// Blocks per cache block of the panel (2048 inputs: 80 KB of packed weights, in L2). Fewer
/// trips through the output per row pass matter more than L1: 16 blocks (20 KB) ran 2-10%
/// slower on Zen 4 (`bench_kernels prefill` on the 7B's shapes).
const KB: usize = 64;
// q4k's kernel takes whole q4k blocks (8 of these blocks) from each cache block.
const _: () = assert!(KB.is_multiple_of(8));

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

/// The weight types the GEMM multiplies; each decides how the activations are quantized (as
/// ggml quantizes its dot products' input) and how offsets are applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weights {
    /// q8_0 blocks ([`q8_0_row`]): q8_0 activations, offset 128 scales.
    Q8_0,
    /// q4_0 blocks ([`q4_0_row`]): q8_0 activations, offset 8 scales.
    Q4_0,
    /// q4k blocks ([`q4k_row`]): q8K activations, offsets of their own.
    Q4K,
}

impl Weights {
    /// Input values per activation scale (32 for q8_0, 256 for q8K).
    pub fn input_block(self) -> usize {
        match self {
            Weights::Q8_0 | Weights::Q4_0 => QK,
            Weights::Q4K => 256,
        }
    }

    /// `c` where every block's offset is `c` times its scale.
    fn offset_in_scales(self) -> Option<i32> {
        match self {
            Weights::Q8_0 => Some(128),
            Weights::Q4_0 => Some(8),
            Weights::Q4K => None,
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
/// (`n x k`, of type `weights`) in the GEMM's form into `out` (`k / 32` blocks): `m x n` f32.
/// The activations are quantized as ggml quantizes them for `weights`; rows of `w` are asked
/// for once each. `None` when the CPU lacks the instructions ([`available`]), `k` is not a
/// whole number of activation blocks or `x` holds fewer than `m x k` values.
pub fn gemm<R>(
    x: &[f32],
    m: usize,
    n: usize,
    k: usize,
    weights: Weights,
    row: R,
) -> Option<Vec<f32>>
where
    R: Fn(usize, &mut [UnsignedBlock]) + Sync,
{
    if !available() || !k.is_multiple_of(weights.input_block()) || x.len() < m * k {
        return None;
    }
    let input = QuantizedInput::new(&x[..m * k], k, weights)?;
    Some(gemm_x86(&input, &row, m, n, k, weights))
}

/// Activation rows quantized for the kernel.
struct QuantizedInput {
    /// The values, `k` per row.
    values: Vec<i8>,
    /// Per row and 32-value block: the scale `d`.
    scale: Vec<f32>,
    /// Per row and block: the sum of the values.
    sum: Vec<i32>,
}

impl QuantizedInput {
    /// `x` (rows of `k` values) quantized as ggml quantizes each row for a dot product with
    /// `weights` (candle's `from_float`), or `None` when `k` is not a whole number of blocks.
    fn new(x: &[f32], k: usize, weights: Weights) -> Option<Self> {
        use rayon::prelude::*;

        if k == 0 || !k.is_multiple_of(weights.input_block()) {
            return None;
        }
        let rows = x.len() / k;
        let blocks = k / QK;
        let mut input = QuantizedInput {
            values: vec![0; rows * k],
            scale: vec![0.0; rows * blocks],
            sum: vec![0; rows * blocks],
        };
        input
            .values
            .par_chunks_mut(k)
            .zip(input.scale.par_chunks_mut(blocks))
            .zip(input.sum.par_chunks_mut(blocks))
            .zip(x.par_chunks(k))
            .for_each(|(((values, scale), sum), x)| {
                quantize_row(x, weights, values, scale);
                for (s, q) in sum.iter_mut().zip(values.chunks(QK)) {
                    *s = q.iter().map(|&v| i32::from(v)).sum();
                }
            });
        Some(input)
    }
}

/// One row quantized with candle's (ggml's) own code: values and a scale per 32 values.
fn quantize_row(x: &[f32], weights: Weights, values: &mut [i8], scale: &mut [f32]) {
    match weights {
        Weights::Q8_0 | Weights::Q4_0 => {
            let mut blocks = vec![BlockQ8_0::zeros(); x.len() / QK];
            BlockQ8_0::from_float(x, &mut blocks);
            let blocks: &[Q8_0Block] = view(bytes_of(&blocks)).unwrap_or_default();
            for ((b, v), s) in blocks.iter().zip(values.chunks_mut(QK)).zip(scale) {
                v.copy_from_slice(&b.qs);
                *s = half::f16::from_bits(b.d).to_f32();
            }
        }
        Weights::Q4K => {
            for ((x, v), s) in x
                .chunks_exact(256)
                .zip(values.chunks_mut(256))
                .zip(scale.chunks_mut(256 / QK))
            {
                // SAFETY: the CPU has AVX-512 F (the kernels' `available`).
                let d = unsafe { quantize_q8k_block(x, v) };
                s.fill(d);
            }
        }
    }
}

/// One block of 256 values quantized as candle's `BlockQ8K::from_float` quantizes it (ggml's
/// `quantize_row_q8_K` with candle's rounding), the same values and scale bit for bit: the
/// first value of the largest magnitude sets the scale `-127 / max`, each value is rounded
/// half away from zero (candle's `f32::round`, a libm call per value there) and clamped to
/// the i8 range, NaN giving 0. Returns the scale `d = 1 / iscale` (0 for an all-zero block).
///
/// # Safety
/// The CPU has AVX-512 F.
#[target_feature(enable = "avx512f")]
unsafe fn quantize_q8k_block(x: &[f32], values: &mut [i8]) -> f32 {
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        values.fill(0);
        return 0.0;
    }
    let iscale = -127f32 / max;
    for (q, &v) in values.iter_mut().zip(x) {
        let v = iscale * v;
        let t = v.trunc();
        let rounded = if (v - t).abs() >= 0.5 {
            t + 1f32.copysign(v)
        } else {
            t
        };
        *q = rounded.clamp(-128.0, 127.0) as i8;
    }
    1.0 / iscale
}

/// One block of a panel: for each 4-value group `g`, the [`NR`] features' four values side by
/// side (`values[g * 4 * NR + 4 * j..]` for feature `j`), then the features' scales and offsets.
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

fn gemm_x86<R>(
    input: &QuantizedInput,
    row: &R,
    m: usize,
    n: usize,
    k: usize,
    weights: Weights,
) -> Vec<f32>
where
    R: Fn(usize, &mut [UnsignedBlock]) + Sync,
{
    use rayon::prelude::*;

    let blocks = k / QK;
    let mut y = crate::output::output_room::<f32>(m * n);
    let panels = n.div_ceil(NR);
    let y_ptr = crate::output::SharedOutput(y.as_mut_ptr());
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
                        sum: &input.sum[r0 * blocks..],
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
                    // panel's blocks, and adds to y[r, f0..f0+nf] for those rows only: no
                    // other task touches those columns. q4k's cache blocks hold whole q4k
                    // blocks (KB is a multiple of 8, as is every q4k row's block count).
                    unsafe {
                        match (weights.offset_in_scales(), MR.min(m - r0)) {
                            (Some(c), 6) => kernel_block_scales::<6>(&args, c),
                            (Some(c), 5) => kernel_block_scales::<5>(&args, c),
                            (Some(c), 4) => kernel_block_scales::<4>(&args, c),
                            (Some(c), 3) => kernel_block_scales::<3>(&args, c),
                            (Some(c), 2) => kernel_block_scales::<2>(&args, c),
                            (Some(c), _) => kernel_block_scales::<1>(&args, c),
                            (None, 6) => kernel_q8k::<6>(&args),
                            (None, 5) => kernel_q8k::<5>(&args),
                            (None, 4) => kernel_q8k::<4>(&args),
                            (None, 3) => kernel_q8k::<3>(&args),
                            (None, 2) => kernel_q8k::<2>(&args),
                            (None, _) => kernel_q8k::<1>(&args),
                        }
                    }
                }
            }
        },
    );
    // SAFETY: k > 0 (`QuantizedInput::new`), so every task's first cache block (b0 = 0) stored
    // rows 0..m of its panel's columns, and the panels cover columns 0..n.
    unsafe { crate::output::filled(y, m * n) }
}

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
/// `blocks` scales and sums), the first block `b0` of the panel's cache block `panel`, and `y`
/// at `y_offset` (row stride `ldy`, `nf` valid columns), which the kernel adds to when
/// `accumulate`, else stores into (a first write, which does not read the untouched pages).
struct KernelArgs<'a> {
    values: &'a [i8],
    k: usize,
    scale: &'a [f32],
    sum: &'a [i32],
    blocks: usize,
    b0: usize,
    panel: &'a [PanelBlock],
    y: *mut f32,
    y_offset: usize,
    ldy: usize,
    nf: usize,
    accumulate: bool,
}

/// The integer sums of block `b` for `R` rows: per row, [`NC`] registers of 16 features, each
/// lane `init[r] + sum(u q)` over the block.
///
/// # Safety
/// As the kernels': the CPU has AVX-512 F, BW and VNNI; `R` input rows hold block `b`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn block_sums<const R: usize>(
    a: &KernelArgs,
    block: &PanelBlock,
    b: usize,
    init: [i32; R],
) -> [[__m512i; NC]; R] {
    let xp = a.values.as_ptr();
    let vp = block.values.as_ptr();
    // Plain loops, no closures: a closure's intrinsics may not be inlined into the kernel.
    let mut sums = [[_mm512_setzero_si512(); NC]; R];
    for (row, &init) in sums.iter_mut().zip(&init) {
        *row = [_mm512_set1_epi32(init); NC];
    }
    if R == MR {
        // SAFETY: as this function's; `sums` holds MR rows.
        unsafe { full_tile_sums(xp.add(b * QK), a.k, vp, sums.as_mut_ptr().cast()) };
        return sums;
    }
    for g in 0..QK / 4 {
        let mut w = [_mm512_setzero_si512(); NC];
        for (c, w) in w.iter_mut().enumerate() {
            // SAFETY: the block holds 8 groups of NC x 64 bytes (aligned: the block is).
            *w = unsafe { _mm512_load_si512(vp.add(g * 4 * NR + 64 * c).cast()) };
        }
        for (r, row) in sums.iter_mut().enumerate() {
            // SAFETY: row r < R holds block b's four values g from r * k + 32 b + 4 g.
            let four = unsafe {
                _mm512_set1_epi32((xp.add(r * a.k + b * QK + 4 * g) as *const i32).read_unaligned())
            };
            for c in 0..NC {
                row[c] = _mm512_dpbusd_epi32(row[c], w[c], four);
            }
        }
    }
    sums
}

/// [`block_sums`] for a full tile of 6 rows, in assembly: the compiler, given the intrinsics,
/// walks one row at a time through the block, which makes each of its two sums a chain of 8
/// dependent `vpdpbusd` and halves the rate; here the 8 groups are the outer loop, so 12
/// independent sums advance together.
///
/// # Safety
/// The CPU has AVX-512 F and VNNI; `x` is a block's first value in row 0 of 6 rows `k` apart,
/// each holding the block's 32 values; `values` is a [`PanelBlock`]'s values (64-byte aligned);
/// `sums` is 6 rows of 2 registers, which the block's sums are added to.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn full_tile_sums(x: *const i8, k: usize, values: *const u8, sums: *mut [__m512i; 2]) {
    const _: () = assert!(MR == 6 && NC == 2);
    // SAFETY: `sums` holds 6 rows (the caller's).
    let s = unsafe { &mut *sums.cast::<[[__m512i; 2]; 6]>() };
    // SAFETY: rows 0..6 of `x` (rows 3..6 from `x + 3k`) are read at 32 bytes from `x`, the
    // panel block's 8 groups of 128 bytes from `values`; only the named registers change.
    unsafe {
        std::arch::asm!(
            "2:",
            "vmovdqa64 {w0}, [{v}]",
            "vmovdqa64 {w1}, [{v} + 64]",
            "vpbroadcastd {b}, dword ptr [{x0}]",
            "vpdpbusd {s00}, {w0}, {b}",
            "vpdpbusd {s01}, {w1}, {b}",
            "vpbroadcastd {b}, dword ptr [{x0} + {k}]",
            "vpdpbusd {s10}, {w0}, {b}",
            "vpdpbusd {s11}, {w1}, {b}",
            "vpbroadcastd {b}, dword ptr [{x0} + 2*{k}]",
            "vpdpbusd {s20}, {w0}, {b}",
            "vpdpbusd {s21}, {w1}, {b}",
            "vpbroadcastd {b}, dword ptr [{x3}]",
            "vpdpbusd {s30}, {w0}, {b}",
            "vpdpbusd {s31}, {w1}, {b}",
            "vpbroadcastd {b}, dword ptr [{x3} + {k}]",
            "vpdpbusd {s40}, {w0}, {b}",
            "vpdpbusd {s41}, {w1}, {b}",
            "vpbroadcastd {b}, dword ptr [{x3} + 2*{k}]",
            "vpdpbusd {s50}, {w0}, {b}",
            "vpdpbusd {s51}, {w1}, {b}",
            "add {v}, 128",
            "add {x0}, 4",
            "add {x3}, 4",
            "dec {n}",
            "jnz 2b",
            v = inout(reg) values => _,
            x0 = inout(reg) x => _,
            x3 = inout(reg) x.add(3 * k) => _,
            k = in(reg) k,
            n = inout(reg) QK / 4 => _,
            w0 = out(zmm_reg) _,
            w1 = out(zmm_reg) _,
            b = out(zmm_reg) _,
            s00 = inout(zmm_reg) s[0][0],
            s01 = inout(zmm_reg) s[0][1],
            s10 = inout(zmm_reg) s[1][0],
            s11 = inout(zmm_reg) s[1][1],
            s20 = inout(zmm_reg) s[2][0],
            s21 = inout(zmm_reg) s[2][1],
            s30 = inout(zmm_reg) s[3][0],
            s31 = inout(zmm_reg) s[3][1],
            s40 = inout(zmm_reg) s[4][0],
            s41 = inout(zmm_reg) s[4][1],
            s50 = inout(zmm_reg) s[5][0],
            s51 = inout(zmm_reg) s[5][1],
            options(nostack, readonly),
        );
    }
}

/// Sums for the `R` rows over a panel's cache block, for weights whose offsets are `c` scales
/// (q8_0, q4_0) and activations with a scale per block: `d s (sum(u q) - c sum(q))`.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI; the input holds `R` rows from its start (values, scales
/// and sums at the strides in `a`) covering blocks `b0..b0 + panel.len()`; `y` is valid for
/// `R` rows of `nf` values at stride `ldy` from `y_offset`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kernel_block_scales<const R: usize>(a: &KernelArgs, c: i32) {
    let mut acc = [[_mm512_setzero_ps(); NC]; R];
    for (i, block) in a.panel.iter().enumerate() {
        let b = a.b0 + i;
        let mut init = [0; R];
        for (r, init) in init.iter_mut().enumerate() {
            *init = -c * a.sum[r * a.blocks + b];
        }
        // SAFETY: as this function's.
        let sums = unsafe { block_sums::<R>(a, block, b, init) };
        for (r, (acc, sums)) in acc.iter_mut().zip(&sums).enumerate() {
            let d = _mm512_set1_ps(a.scale[r * a.blocks + b]);
            for c in 0..NC {
                // Loaded again for each row, as memory operands: held across the rows they
                // would take registers the sums need.
                // SAFETY: NR aligned scales per block (a 64-byte field at a 64-byte offset).
                let scale = unsafe { _mm512_load_ps(block.scale.as_ptr().add(16 * c)) };
                let scaled = _mm512_mul_ps(scale, d);
                acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[c]), scaled, acc[c]);
            }
        }
    }
    // SAFETY: as this function's.
    unsafe { store_rows::<R, NC>(&acc, a.y.add(a.y_offset), a.ldy, a.nf, a.accumulate) };
}

/// Sums for the `R` rows over a panel's cache block, for q4k weights and q8K activations (one
/// scale per 8 blocks, `b0` and the block count multiples of 8): per q4k block,
/// `d sum_blocks(s sum(u q) - o sum(q))`.
///
/// # Safety
/// As [`kernel_block_scales`]'s.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kernel_q8k<const R: usize>(a: &KernelArgs) {
    for (first, eight) in a.panel.chunks(8).enumerate() {
        let mut acc = [[_mm512_setzero_ps(); NC]; R];
        for (i, block) in eight.iter().enumerate() {
            let b = a.b0 + 8 * first + i;
            // SAFETY: as this function's.
            let sums = unsafe { block_sums::<R>(a, block, b, [0; R]) };
            for (r, (acc, sums)) in acc.iter_mut().zip(&sums).enumerate() {
                let negative_sum = _mm512_set1_ps(-(a.sum[r * a.blocks + b] as f32));
                for c in 0..NC {
                    // SAFETY: NR aligned scales and offsets per block (64-byte fields at
                    // 64-byte offsets).
                    let (scale, offset) = unsafe {
                        (
                            _mm512_load_ps(block.scale.as_ptr().add(16 * c)),
                            _mm512_load_ps(block.offset.as_ptr().add(16 * c)),
                        )
                    };
                    acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[c]), scale, acc[c]);
                    acc[c] = _mm512_fmadd_ps(offset, negative_sum, acc[c]);
                }
            }
        }
        let b = a.b0 + 8 * first;
        for (r, acc) in acc.iter_mut().enumerate() {
            let d = _mm512_set1_ps(a.scale[r * a.blocks + b]);
            for sums in acc.iter_mut() {
                *sums = _mm512_mul_ps(*sums, d);
            }
        }
        // SAFETY: as this function's.
        unsafe {
            store_rows::<R, NC>(
                &acc,
                a.y.add(a.y_offset),
                a.ldy,
                a.nf,
                a.accumulate || first > 0,
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::q4k::Q8KBlock;
    use crate::testing::Values;
    use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_0, BlockQ8K};

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
        weights: Weights,
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
        let y = gemm(&x, m, n, k, weights, row).expect("available");
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

    // Awkward sizes: rows not a multiple of MR, features not a multiple of NR, several cache
    // blocks with a partial last one.

    #[test]
    fn q8_0_equals_ggmls_dot_products() {
        equals_ggmls_dot_products::<candle_core::quantized::k_quants::BlockQ8_0, Q8_0Block>(
            7,
            101,
            32 * 70,
            Weights::Q8_0,
            q8_0_row,
        );
    }

    #[test]
    fn q4_0_equals_ggmls_dot_products() {
        equals_ggmls_dot_products::<BlockQ4_0, Q4_0Block>(6, 50, 32 * 37, Weights::Q4_0, q4_0_row);
    }

    #[test]
    fn q4k_equals_ggmls_dot_products() {
        equals_ggmls_dot_products::<BlockQ4K, Q4KBlock>(9, 97, 256 * 9, Weights::Q4K, q4k_row);
    }

    /// Each form's blocks, dequantized (`scale * value - offset`), are candle's dequantized
    /// weights.
    /// The q8K quantizer gives candle's blocks bit for bit: random blocks at several scales,
    /// and blocks of ties (values landing on k + 0.5), a largest magnitude met first with the
    /// opposite sign later, zeros, a NaN and an infinity.
    #[test]
    fn q8k_quantization_is_candles() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI");
            return;
        }
        let mut blocks: Vec<Vec<f32>> = [1e-3f32, 1.0, 37.0, 1e4]
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Values(40 + i as u64)
                    .take(256)
                    .iter()
                    .map(|v| v * s)
                    .collect()
            })
            .collect();
        // max -127: iscale 1, so these are exact ties.
        let mut ties: Vec<f32> = (0..256).map(|i| (i % 50) as f32 - 24.5).collect();
        ties[3] = -127.0;
        ties[9] = 127.0;
        blocks.push(ties);
        blocks.push(vec![0.0; 256]);
        let mut special = Values(50).take(256);
        special[5] = f32::NAN;
        blocks.push(special.clone());
        special[7] = f32::INFINITY;
        blocks.push(special);
        for x in &blocks {
            let mut want = [BlockQ8K::zeros()];
            BlockQ8K::from_float(x, &mut want);
            let want: &[Q8KBlock] = view(bytes_of(&want)).unwrap_or_default();
            let mut got = vec![0i8; 256];
            // SAFETY: the CPU has AVX-512 F (VNNI implies it).
            let d = unsafe { quantize_q8k_block(x, &mut got) };
            assert_eq!(got.as_slice(), &want[0].qs[..]);
            assert_eq!(d.to_bits(), want[0].d.to_bits());
        }
    }

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
        assert!(gemm(&x, 2, 3, 100, Weights::Q8_0, row).is_none());
        assert!(gemm(&x, 3, 3, 96, Weights::Q4K, row).is_none());
    }
}
