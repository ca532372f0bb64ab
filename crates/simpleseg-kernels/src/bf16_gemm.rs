//! `x W^T` with BF16 inputs and f32 accumulation on CPUs with AVX512-BF16 (`vdpbf16ps`, e.g.
//! AMD Zen 4, Intel Cooper Lake and later), for prefills against BF16 weights read in place.
//!
//! Each instruction multiplies 16 pairs of BF16 values and adds the products to 16 f32 sums,
//! twice the work of an f32 FMA at half the bytes: on a 2-core Zen 4 this runs at about three
//! times candle's f32 GEMM. Products are exact (BF16 x BF16 fits an f32); each pair's two
//! products are summed into the accumulator as the instruction defines (round to nearest even,
//! denormals flushed), so results differ from an f32 GEMM on the same BF16 values only in
//! summation order and rounding, as torch's BF16 matmul on such CPUs does.
//!
//! Layout: the weight is packed 48 output features at a time (a panel), each step of the panel
//! holding, for two consecutive inputs, the 48 features' weights interleaved as the instruction
//! wants them (three 512-bit registers). A micro-kernel keeps 8 rows x 48 features of sums in 24
//! registers and walks the panel in blocks of [`KC`] inputs, so that the panel block stays in
//! cache while every row of `x` passes over it.

/// Output features per packed panel (three registers of 16).
pub(crate) const NR: usize = 48;
/// Rows of `x` per micro-kernel call (8 x 3 registers of sums).
pub(crate) const MR: usize = 8;
/// Inputs per cache block (an even number).
pub(crate) const KC: usize = 1024;

/// Whether this CPU runs [`gemm`]: AVX-512 F and BF16, or AMX ([`crate::amx::available`]).
pub fn available() -> bool {
    crate::cpu::avx512_bf16() || amx()
}

/// Whether [`gemm`] runs on AMX tiles here ([`crate::amx`]).
pub fn amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` (`m x k`, BF16 bits, row-major) times `w^T`, where `row(j, out)` writes row `j` of `w`
/// (`n x k`) as BF16 bits into `out` (`k` values): `m x n` f32. Rows are asked for once each,
/// so a weight stored otherwise (quantized) is converted a row at a time. Runs on AMX tiles
/// where the CPU has them ([`amx`]). Returns `None` when the CPU has neither AVX512-BF16 nor
/// AMX ([`available`]).
pub fn gemm<R>(x: &[u16], row: R, m: usize, n: usize, k: usize) -> Option<Vec<f32>>
where
    R: Fn(usize, &mut [u16]) + Sync,
{
    #[cfg(target_arch = "x86_64")]
    {
        if x.len() >= m * k {
            if amx() {
                return Some(crate::amx::gemm(x, &row, m, n, k));
            }
            if crate::cpu::avx512_bf16() {
                return Some(gemm_x86(x, &row, m, n, k));
            }
        }
    }
    let _ = (x, row, m, n, k);
    None
}

/// [`gemm`] against a weight stored as BF16 (`w`: `n x k` bits, row-major): on AMX its rows
/// are packed from where they lie, without a copy of each row first. Returns `None` where
/// [`gemm`] does, or when `w` is shorter than `n x k`.
pub fn gemm_stored(x: &[u16], w: &[u16], m: usize, n: usize, k: usize) -> Option<Vec<f32>> {
    if w.len() < n * k {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    if amx() && x.len() >= m * k {
        return Some(crate::amx::gemm_stored(x, &w[..n * k], m, n, k));
    }
    gemm(
        x,
        |j: usize, out: &mut [u16]| out.copy_from_slice(&w[j * k..(j + 1) * k]),
        m,
        n,
        k,
    )
}

/// [`gemm`] (against a weight asked for a row at a time, or `stored` as BF16 `n x k` bits and
/// read where it lies) with its sums rounded to BF16 as they are stored: output `(i, j)` is
/// `sum + bias[j]` (when a bias of `n` values is given) rounded to the nearest BF16, ties to
/// even: the bits of [`gemm`]'s f32 output plus the bias, rounded, without that output; with
/// an `activation`, those values then go through [`crate::math::activate_bf16`] as they are
/// stored (bit for bit the separate pass, without it). Only on AMX tiles ([`amx`]); `None`
/// elsewhere (callers round [`gemm`]'s output), or when the sizes do not match.
pub fn gemm_rounded<R>(
    x: &[u16],
    row: R,
    stored: Option<&[u16]>,
    (m, n, k): (usize, usize, usize),
    bias: Option<&[f32]>,
    activation: Option<crate::math::Activation>,
) -> Option<Vec<u16>>
where
    R: Fn(usize, &mut [u16]) + Sync,
{
    let fits = x.len() >= m * k
        && stored.is_none_or(|w| w.len() >= n * k)
        && bias.is_none_or(|b| b.len() == n);
    #[cfg(target_arch = "x86_64")]
    if amx() && fits {
        let stored = stored.map(|w| &w[..n * k]);
        return Some(crate::amx::gemm_rounded(
            x,
            &row,
            stored,
            (m, n, k),
            bias,
            activation,
        ));
    }
    let _ = (x, row, stored, m, n, k, bias, activation, fits);
    None
}

/// One weight of [`gemm_gated`] (`n x k`) and its bias.
pub struct GatedWeight<'a, R> {
    /// `row(j, out)` writes row `j` (`k` values) as BF16 bits.
    pub row: R,
    /// The weight as BF16 bits (`n x k`, row-major), read where it lies, where it is so.
    pub stored: Option<&'a [u16]>,
    /// `n` values added to the sums before their rounding, or none.
    pub bias: Option<&'a [f32]>,
}

/// A gated MLP's activation in one product: `silu(gate) * up`, where `gate` and `up` are
/// [`gemm_rounded`] of `x` against each weight (with its bias), and the activation is
/// [`crate::math::silu_mul_bf16`]'s of those BF16 values: `m x n` BF16 bits, bit for bit the
/// three steps, without their two outputs (written and read back) or the activation's pass.
/// Only on AMX tiles ([`amx`]); `None` elsewhere (callers compose the steps), or when the
/// sizes do not match.
pub fn gemm_gated<G, U>(
    x: &[u16],
    gate: GatedWeight<G>,
    up: GatedWeight<U>,
    (m, n, k): (usize, usize, usize),
) -> Option<Vec<u16>>
where
    G: Fn(usize, &mut [u16]) + Sync,
    U: Fn(usize, &mut [u16]) + Sync,
{
    let fits = |stored: Option<&[u16]>, bias: Option<&[f32]>| {
        stored.is_none_or(|s| s.len() >= n * k) && bias.is_none_or(|b| b.len() == n)
    };
    let fits = x.len() >= m * k && fits(gate.stored, gate.bias) && fits(up.stored, up.bias);
    #[cfg(target_arch = "x86_64")]
    if amx() && fits {
        return Some(crate::amx::gemm_gated(x, &gate, &up, (m, n, k)));
    }
    let _ = (x, gate, up, m, n, k, fits);
    None
}

#[cfg(target_arch = "x86_64")]
fn gemm_x86<R>(x: &[u16], row: &R, m: usize, n: usize, k: usize) -> Vec<f32>
where
    R: Fn(usize, &mut [u16]) + Sync,
{
    use rayon::prelude::*;

    if k == 0 {
        return vec![0f32; m * n];
    }
    // Inputs padded to an even count: pairs of x values are read as one u32. An even count is
    // read in place.
    let k2 = k.div_ceil(2) * 2;
    let padded;
    let xs = if k2 == k {
        &x[..m * k]
    } else {
        let mut xs = vec![0u16; m * k2];
        xs.par_chunks_mut(k2)
            .zip(x.par_chunks(k))
            .for_each(|(dst, src)| dst[..k].copy_from_slice(&src[..k]));
        padded = xs;
        &padded
    };
    let mut y = crate::output::output_room::<f32>(m * n);
    // Each task owns one panel's columns of y; rows are independent, so tasks write disjoint
    // parts. y is split by panel through raw parts because a panel's columns are strided.
    let panels = n.div_ceil(NR);
    // Cache blocks of equal size, at most KC (1152 inputs as two of 576, not 1024 and 128).
    let block = k2.div_ceil(k2.div_ceil(KC)).div_ceil(2) * 2;
    let y_ptr = crate::output::SharedOutput(y.as_mut_ptr());
    (0..panels).into_par_iter().for_each_init(
        || (vec![0u32; NR * k2 / 2], vec![0u16; k]),
        |(packed, scratch), p| {
            let f0 = p * NR;
            let nf = NR.min(n - f0);
            pack_panel(row, k2, f0, nf, packed, scratch);
            let y_ptr = &y_ptr;
            for kb in (0..k2).step_by(block) {
                let kc = block.min(k2 - kb);
                for r0 in (0..m).step_by(MR) {
                    let mr = MR.min(m - r0);
                    // SAFETY: the CPU has AVX512-BF16/F (checked by `gemm`); the kernel reads
                    // rows r0..r0+mr of xs over inputs kb..kb+kc and the panel's block, and
                    // writes y[r, f0..f0+nf] for those rows only: no other task touches those
                    // columns.
                    unsafe {
                        kernel_rows(
                            mr,
                            (
                                &xs[r0 * k2 + kb..],
                                k2,
                                &packed[kb / 2 * NR..],
                                kc,
                                y_ptr.0.add(r0 * n + f0),
                                n,
                                nf,
                                kb > 0,
                            ),
                        )
                    };
                }
            }
        },
    );
    // SAFETY: k > 0, so every task's first cache block (kb = 0) stored rows 0..m of its
    // panel's columns, and the panels cover columns 0..n.
    unsafe { crate::output::filled(y, m * n) }
}

/// Packs features f0..f0+nf (zero beyond) into `out`: for each input pair kp, the 48
/// features' pairs side by side (`out[kp * 48 + j]`, the pair's first value in the low half).
/// Rows are read one after the other (the weight streams from memory, and 48 interleaved
/// streams defeat the prefetcher); the scattered writes land in the panel, which stays in
/// cache.
fn pack_panel<R>(row: &R, k2: usize, f0: usize, nf: usize, out: &mut [u32], scratch: &mut [u16])
where
    R: Fn(usize, &mut [u16]),
{
    let pairs = k2 / 2;
    for j in 0..NR {
        if j >= nf {
            for kp in 0..pairs {
                out[kp * NR + j] = 0;
            }
            continue;
        }
        row(f0 + j, scratch);
        let mut chunks = scratch.chunks_exact(2);
        for (kp, pair) in chunks.by_ref().enumerate() {
            out[kp * NR + j] = u32::from(pair[0]) | u32::from(pair[1]) << 16;
        }
        if let [last] = chunks.remainder() {
            out[(pairs - 1) * NR + j] = u32::from(*last);
        }
    }
}

/// [`kernel`] for `rows` rows (1 to [`MR`]; more are taken as [`MR`]).
///
/// # Safety
/// As [`kernel`]'s, for `rows` rows.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn kernel_rows(rows: usize, args: KernelArgs) {
    // SAFETY: the caller's.
    unsafe {
        match rows {
            8.. => kernel::<8>(args),
            7 => kernel::<7>(args),
            6 => kernel::<6>(args),
            5 => kernel::<5>(args),
            4 => kernel::<4>(args),
            3 => kernel::<3>(args),
            2 => kernel::<2>(args),
            _ => kernel::<1>(args),
        }
    }
}

/// A micro-kernel's operands: `x` (row stride `k2`), the packed panel block, its input count
/// `kc`, then `y` (row stride `ldy`, `nf` valid columns) and whether to add to it.
pub(crate) type KernelArgs<'a> = (
    &'a [u16],
    usize,
    &'a [u32],
    usize,
    *mut f32,
    usize,
    usize,
    bool,
);

/// Sums for the `R` rows of `x` over `kc` inputs against a packed panel block, added to `y`
/// when `accumulate`, else stored.
///
/// # Safety
/// The CPU has AVX512F and AVX512-BF16; `x` holds R rows of at least kc values; `panel` at
/// least kc / 2 * 48 pairs; `y` is valid for R rows of nf values at stride ldy.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel<const R: usize>(args: KernelArgs) {
    use std::arch::x86_64::*;

    let (x, k2, panel, kc, y, ldy, nf, accumulate) = args;
    let mut acc = [[_mm512_setzero_ps(); 3]; R];
    let pp = panel.as_ptr();
    let xp = x.as_ptr() as *const u8;
    for kp in 0..kc / 2 {
        // SAFETY: kp * 48 + 48 <= kc / 2 * 48 <= panel.len(); unaligned 64-byte loads; a
        // 512-bit integer vector and a vector of 32 BF16 values have the same bits.
        let b: [__m512bh; 3] = [0, 1, 2].map(|c| unsafe {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                pp.add(kp * NR + c * 16) as *const __m512i
            ))
        });
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: row r < R holds kc values from offset r * k2; the pair at 2 * kp; the
            // transmute as above.
            let a = unsafe {
                let pair = (xp.add((r * k2 + 2 * kp) * 2) as *const i32).read_unaligned();
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair))
            };
            for c in 0..3 {
                row[c] = _mm512_dpbf16_ps(row[c], a, b[c]);
            }
        }
    }
    // SAFETY: rows r0.. of y hold nf columns from here (see above).
    unsafe { crate::output::store_rows::<R, 3>(&acc, y, ldy, nf, accumulate) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_an_f32_product_of_the_same_bf16_values() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        // Odd input count, features not a multiple of 48, rows not a multiple of 8, several
        // cache blocks.
        let (m, n, k) = (19, 101, 1201);
        let value =
            |i: usize, s: f32| half::bf16::from_f32(((i * 7919 % 1000) as f32 / 500.0 - 1.0) * s);
        let x: Vec<half::bf16> = (0..m * k).map(|i| value(i, 1.0)).collect();
        let w: Vec<half::bf16> = (0..n * k).map(|i| value(i + 13, 0.05)).collect();
        let bits: Vec<u16> = x.iter().map(|v| v.to_bits()).collect();
        let row = |j: usize, out: &mut [u16]| {
            for (o, v) in out.iter_mut().zip(&w[j * k..(j + 1) * k]) {
                *o = v.to_bits();
            }
        };
        let stored: Vec<u16> = w.iter().map(|v| v.to_bits()).collect();
        // The dispatching entries (AMX tiles where the CPU has them), and the AVX512-BF16
        // kernel itself wherever it runs, AMX or not.
        let mut results = vec![
            ("gemm", gemm(&bits, row, m, n, k).expect("available")),
            (
                "gemm_stored",
                gemm_stored(&bits, &stored, m, n, k).expect("available"),
            ),
        ];
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::avx512_bf16() {
            results.push(("avx512_bf16", gemm_x86(&bits, &row, m, n, k)));
        }
        for (path, got) in results {
            for r in 0..m {
                for f in 0..n {
                    let want: f64 = (0..k)
                        .map(|i| {
                            f64::from(x[r * k + i].to_f32()) * f64::from(w[f * k + i].to_f32())
                        })
                        .sum();
                    let g = f64::from(got[r * n + f]);
                    assert!(
                        (g - want).abs() < 1e-3 * (1.0 + want.abs()),
                        "{path} ({r}, {f}): {g} vs {want}"
                    );
                }
            }
        }
    }
}
