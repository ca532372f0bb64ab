//! BF16 GEMM on Intel AMX tiles (Xeon Sapphire Rapids and later: `amx_bf16` and `amx_tile`),
//! the path [`crate::bf16_gemm::gemm`] takes where the CPU has them.
//!
//! Each `tdpbf16ps` multiplies a 16 x 32 tile of BF16 activations by a 32 x 16 tile of BF16
//! weights into a 16 x 16 tile of f32 sums: 8192 products per instruction, 16 times a
//! `vdpbf16ps`. The kernel keeps a 32 x 32 block of sums in four tile registers, loading two
//! activation tiles and two weight tiles per 32 inputs. Activations are copied once into tile
//! order (each 16 rows x 32 inputs one contiguous kilobyte); weights are packed by each task,
//! a group of 128 output features at a time, each 32 inputs x 16 features as one 1 KB tile in
//! the layout the instruction wants (pairs of consecutive inputs side by side, a 16 x 16
//! transpose of 32-bit pairs, read where a BF16 weight lies). The sums of a band of rows
//! stay in a scratch block across cache blocks of 4096 inputs. A task configures the tile
//! registers once for all its products (`TileSession`). Products are exact and sums
//! are f32 (round to nearest even, denormals flushed, as the instruction defines), so results
//! differ from an f32 GEMM on the same BF16 values only in summation order and rounding, as
//! oneDNN's do. Measured on 2 Xeon cores (`bench_engine.py --gemm`): the 7B's prefill shapes
//! at 1.5-2.1 TFLOP/s, 0.78-1.07x torch's oneDNN matmul (0.89-1.07x on one core). Where the
//! output is BF16, the sums (plus a bias) are rounded as they are stored (`gemm_rounded`); a
//! gated MLP's two products run as one over both weights' rows, each task storing
//! `silu(gate) * up` for its outputs (`gemm_gated`: neither product is written out). A product
//! of at most 128 rows against a weight stored as BF16 (a mixture's expert in a prompt) swaps
//! the operands instead: the weight's rows are loaded as tiles where they lie, unpacked, and
//! only the few rows of activations are packed (`gemm_few_rows`).
//!
//! Stable Rust has no AMX intrinsics: the tile instructions are inline assembly. Linux lends
//! tile registers to a process only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM,
//! XFEATURE_XTILEDATA)`), made once here. Before its first use the path multiplies a small
//! product of awkward sizes and compares it with an f64 reference: on a refusal or a mismatch
//! it prints a warning and [`available`] answers `false`, so callers take the AVX-512 path.
//! `SIMPLESEG_AMX=0` turns the path off (to compare both on one machine).

use std::arch::asm;
use std::sync::OnceLock;

use crate::bf16_gemm::GatedWeight;
use crate::math::Activation;

/// Output features per packed panel (two tiles of 16).
const NR: usize = 32;
/// Rows per kernel call (two tiles of 16).
const MR: usize = 32;
/// Inputs per tile step.
const KT: usize = 32;

/// Whether [`gemm`] runs here: the CPU has AMX-BF16 and AMX-TILE, the OS granted tile data to
/// this process, `SIMPLESEG_AMX` is not `0`, and the kernel passed its self-check (decided
/// once, at the first call).
pub fn available() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        if !hardware() || std::env::var("SIMPLESEG_AMX").is_ok_and(|v| v == "0") {
            return false;
        }
        if !request_tile_data() {
            eprintln!(
                "warning: this CPU has AMX but the OS refused this process its tile registers; \
                 prefill runs on AVX-512 instead"
            );
            return false;
        }
        match self_check() {
            Ok(()) => true,
            Err(e) => {
                eprintln!(
                    "warning: the AMX kernel failed its self-check ({e}); prefill runs on \
                     AVX-512 instead"
                );
                false
            }
        }
    })
}

/// AMX-BF16 and AMX-TILE in CPUID (leaf 7, EDX bits 22 and 24).
fn hardware() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    if __cpuid(0).eax < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    edx & (1 << 22) != 0 && edx & (1 << 24) != 0
}

/// Asks Linux for the tile data state (`ARCH_REQ_XCOMP_PERM`) and checks that it was granted
/// (`ARCH_GET_XCOMP_PERM`).
#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const SYS_ARCH_PRCTL: usize = 158;
    const ARCH_GET_XCOMP_PERM: usize = 0x1022;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let request: isize;
    // SAFETY: the arch_prctl system call with two integer arguments; it touches no memory of
    // ours. The kernel clobbers rcx and r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL as isize => request,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    if request != 0 {
        return false;
    }
    let mut granted: u64 = 0;
    let answer: isize;
    // SAFETY: arch_prctl writes one u64 through the pointer, which points at `granted`.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL as isize => answer,
            in("rdi") ARCH_GET_XCOMP_PERM,
            in("rsi") &mut granted as *mut u64,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    answer == 0 && granted & (1 << XFEATURE_XTILEDATA) != 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// The products of the self-check: sizes that leave partial tiles on every side (the packed
/// path), and few rows against whole tiles (the weight read as tiles where it lies,
/// [`gemm_few_rows`]).
fn self_check() -> Result<(), String> {
    check_kernel(TILES, 37, 45, (KC_STEPS + 3) * KT - 9)?;
    check_kernel(TILES, 44, 48, 2 * KT)
}

/// [`self_check`] with a given block kernel and sizes.
fn check_kernel(kernel: Kernel, m: usize, n: usize, k: usize) -> Result<(), String> {
    let value =
        |i: usize, s: f32| half::bf16::from_f32(((i * 7919 % 1000) as f32 / 500.0 - 1.0) * s);
    let x: Vec<half::bf16> = (0..m * k).map(|i| value(i, 1.0)).collect();
    let w: Vec<half::bf16> = (0..n * k).map(|i| value(i + 13, 0.5)).collect();
    let bits: Vec<u16> = x.iter().map(|v| v.to_bits()).collect();
    let row = |j: usize, out: &mut [u16]| {
        for (o, v) in out.iter_mut().zip(&w[j * k..(j + 1) * k]) {
            *o = v.to_bits();
        }
    };
    let stored: Vec<u16> = w.iter().map(|v| v.to_bits()).collect();
    let want: Vec<f64> = (0..m * n)
        .map(|at| {
            let (r, f) = (at / n, at % n);
            (0..k)
                .map(|i| f64::from(x[r * k + i].to_f32()) * f64::from(w[f * k + i].to_f32()))
                .sum()
        })
        .collect();
    // The weight asked for a row at a time, and read where it lies.
    for source in [None, Some(&stored[..])] {
        let y = gemm_on(
            &bits,
            &row,
            Stored::one(source),
            m,
            n,
            k,
            false,
            kernel,
            Output::F32,
        )
        .into_f32();
        for (at, (&got, &want)) in y.iter().zip(&want).enumerate() {
            let got = f64::from(got);
            if got.is_nan() || (got - want).abs() > 1e-3 * (1.0 + want.abs()) {
                let (r, f, place) = (at / n, at % n, source.is_some());
                return Err(format!(
                    "({r}, {f}): {got} instead of {want} (in place: {place})"
                ));
            }
        }
    }
    Ok(())
}

/// The tile configuration `ldtilecfg` reads: palette 1, eight tiles of 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// `x` (`m x k`, BF16 bits) times `w^T`, `row(j, out)` writing row `j` of `w` (`k` values):
/// `m x n` f32, as [`crate::bf16_gemm::gemm`]. Call only where [`available`] (or from its
/// self-check, after the OS granted tile data).
pub(crate) fn gemm<R>(x: &[u16], row: &R, m: usize, n: usize, k: usize) -> Vec<f32>
where
    R: Fn(usize, &mut [u16]) + Sync,
{
    gemm_on(x, row, Stored::Nowhere, m, n, k, true, TILES, Output::F32).into_f32()
}

/// [`gemm`] against a weight stored as BF16 (`n x k` bits, row-major), packed straight from
/// where it lies (no copy of its rows first).
pub(crate) fn gemm_stored(x: &[u16], w: &[u16], m: usize, n: usize, k: usize) -> Vec<f32> {
    let row = |j: usize, out: &mut [u16]| out.copy_from_slice(&w[j * k..(j + 1) * k]);
    gemm_on(x, &row, Stored::One(w), m, n, k, true, TILES, Output::F32).into_f32()
}

/// [`gemm`] (or, with a `stored` weight, [`gemm_stored`]) rounded to BF16 as it is stored:
/// each sum plus `bias[j]` (when given, `n` values) rounded to the nearest BF16 (ties to
/// even, as `half::bf16::from_f32`), bits equal to rounding [`gemm`]'s f32 output with the
/// bias added, without the f32 output (a pass over it and its memory).
pub(crate) fn gemm_rounded<R>(
    x: &[u16],
    row: &R,
    stored: Option<&[u16]>,
    (m, n, k): (usize, usize, usize),
    bias: Option<&[f32]>,
    activation: Option<Activation>,
) -> Vec<u16>
where
    R: Fn(usize, &mut [u16]) + Sync,
{
    let stored = Stored::one(stored);
    let output = Output::Bf16 { bias, activation };
    match gemm_on(x, row, stored, m, n, k, true, TILES, output) {
        Product::Bf16(y) => y,
        Product::F32(_) => unreachable!("a BF16 output was asked for"),
    }
}

/// [`crate::bf16_gemm::gemm_gated`] on tiles: one product over both weights' rows (in
/// [`gated_feature`]'s order), each task turning its outputs' gate and up sums into their
/// activations as it stores them ([`Output::Gated`]).
pub(crate) fn gemm_gated<G, U>(
    x: &[u16],
    gate: &GatedWeight<G>,
    up: &GatedWeight<U>,
    (m, n, k): (usize, usize, usize),
) -> Vec<u16>
where
    G: Fn(usize, &mut [u16]) + Sync,
    U: Fn(usize, &mut [u16]) + Sync,
{
    gemm_gated_on(x, gate, up, (m, n, k), true, TILES)
}

/// [`gemm_gated`] with a given kernel, its groups in parallel or not (see [`gemm_on`]).
fn gemm_gated_on<G, U>(
    x: &[u16],
    gate: &GatedWeight<G>,
    up: &GatedWeight<U>,
    (m, n, k): (usize, usize, usize),
    parallel: bool,
    kernel: Kernel,
) -> Vec<u16>
where
    G: Fn(usize, &mut [u16]) + Sync,
    U: Fn(usize, &mut [u16]) + Sync,
{
    let row = |f: usize, out: &mut [u16]| match gated_feature(f, n) {
        (false, j) => (gate.row)(j, out),
        (true, j) => (up.row)(j, out),
    };
    let stored = match (gate.stored, up.stored) {
        (Some(g), Some(u)) => Stored::Pair {
            gate: &g[..n * k],
            up: &u[..n * k],
            n,
        },
        _ => Stored::Nowhere,
    };
    let output = Output::Gated {
        gate_bias: gate.bias,
        up_bias: up.bias,
    };
    match gemm_on(x, &row, stored, m, 2 * n, k, parallel, kernel, output) {
        Product::Bf16(y) => y,
        Product::F32(_) => unreachable!("a BF16 output was asked for"),
    }
}

/// What a GEMM stores: f32 sums, or the sums (plus a bias) rounded to BF16, or a gated
/// product's activations.
#[derive(Clone, Copy)]
enum Output<'a> {
    F32,
    /// With an activation, applied to the rounded values ([`crate::math::activate_bf16`]).
    Bf16 {
        bias: Option<&'a [f32]>,
        activation: Option<Activation>,
    },
    /// For each output `j` of a product over a [`Stored::Pair`]'s features (`2 n`): the gate
    /// and up sums (each plus its bias) rounded to BF16, then `silu(gate) * up` as
    /// [`crate::math::silu_mul_bf16`] computes it: `n` values a row.
    Gated {
        gate_bias: Option<&'a [f32]>,
        up_bias: Option<&'a [f32]>,
    },
}

/// A GEMM's output, as [`Output`] asked.
enum Product {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl Product {
    fn into_f32(self) -> Vec<f32> {
        match self {
            Product::F32(y) => y,
            Product::Bf16(_) => unreachable!("an f32 output was asked for"),
        }
    }
}

/// The tile products a GEMM runs ([`tiles_2x2`] and [`tiles_1xn`], or the tests' emulation
/// of them), and whether
/// its tasks configure the tile registers around their products (the real instructions do;
/// the emulation needs nothing configured).
#[derive(Clone, Copy)]
struct Kernel {
    tiles: unsafe fn(&Tiles2x2, usize),
    row_tiles: unsafe fn(&Tiles1xN, usize),
    configures: bool,
}

/// The AMX kernel.
const TILES: Kernel = Kernel {
    tiles: tiles_2x2,
    row_tiles: tiles_1xn,
    configures: true,
};

/// Output features per parallel task (a group of panels): the activation block a kernel call
/// reads is reused across the group's panels while it sits in the core's first-level cache.
const GROUP: usize = 4 * NR;
/// Tile steps (of [`KT`] inputs) per cache block: the group's weights for a block (128 x 4096
/// values, 1 MB) stay in the core's second-level cache while the block's products run. Fewer,
/// longer blocks measured faster than blocks that fit the first level (the sums' reloads cost
/// more than they save); on 2 Xeon cores, blocks of 4096 inputs against 1024 took the 7B's
/// gate/up product 39 -> 33 ms, its down product 43 -> 41 (one block for all its 18944 inputs:
/// 63). A product's steps are split into blocks of equal size, at most this many (4304 inputs:
/// two of 68 and 67 steps, not 128 and 7).
const KC_STEPS: usize = 128;
/// Rows per row chunk: the chunk's sums for a group (256 KB) stay in the second-level cache
/// (its activations for a cache block, up to 4 MB, come from the last level).
const MC: usize = 16 * MR;

/// Whether the block of rows `rb..rb + 32` of a chunk of `rows` and panel `q` of a group of
/// `nf` features is whole (its sums can be stored straight into the output).
fn direct(rb: usize, rows: usize, q: usize, nf: usize) -> bool {
    rb + MR <= rows && (q + 1) * NR <= nf
}

/// [`gemm`], its groups in parallel or (the self-check, which may run inside a parallel task
/// waiting on it) one after the other.
///
/// Activations are copied once into tile order: for each 16 rows and each 32 inputs, one 1 KB
/// tile (rows of 64 bytes, consecutive), zero-padded to whole tiles, so that every tile load
/// reads one contiguous kilobyte. Each task packs its group of weight panels for all inputs,
/// then walks row chunks of [`MC`] and cache blocks of [`KC_STEPS`] steps, keeping its sums in
/// a scratch buffer from which the tiles are reloaded for the next cache block.
#[allow(clippy::too_many_arguments)]
fn gemm_on<R>(
    x: &[u16],
    row: &R,
    stored: Stored,
    m: usize,
    n: usize,
    k: usize,
    parallel: bool,
    kernel: Kernel,
    output: Output,
) -> Product
where
    R: Fn(usize, &mut [u16]) + Sync,
{
    use rayon::prelude::*;

    if few_rows(stored, m, n, k) {
        return gemm_few_rows(x, stored, m, n, k, parallel, kernel, output);
    }
    let (mp, steps) = (m.div_ceil(MR) * MR, k.div_ceil(KT));
    let tiled = tile_rows(x, m, k, mp, steps, parallel);
    let xs: &[u16] = tiled.view();
    // A gated product has one output for each two features.
    let mut room = Room::new(output, m, n);
    let (rounded, width) = (room.rounded, room.width);
    let (y_ptr, y16_ptr) = room.pointers();
    // Tasks: a group of features over a band of rows. The rows are one band unless there are
    // too few groups to keep every thread busy (a product with few outputs: attention's
    // values, a key-value projection), or the groups do not share out evenly over the threads
    // (MoonViT's 1152 outputs: 9 groups on 2 threads, one waiting on the last group; in two
    // bands, 1656 x 4304 x 1152 took 10-10.2 ms against 11.8-14.2, a ninth group split alone
    // 11.3-12.4, four bands 11-11.7); then they are split, each band packing its group anew.
    let groups = n.div_ceil(GROUP);
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let bands = (4 * threads)
        .div_ceil(groups.max(1))
        .max(if groups.is_multiple_of(threads) { 1 } else { 2 })
        .min(m.div_ceil(MR))
        .max(1);
    let block_steps = steps.div_ceil(steps.div_ceil(KC_STEPS));
    let band = m.div_ceil(bands).div_ceil(MR) * MR;
    let bands = m.div_ceil(band.max(1)).max(1);
    let run = |task: usize| {
        // SAFETY: the OS granted tile data (`available` or the self-check); the session ends
        // with the task, on this thread.
        let _session = kernel.configures.then(|| unsafe { TileSession::begin() });
        let mut buffers = TaskBuffers::take(steps);
        let TaskBuffers {
            panels,
            rows: scratch,
            sums,
        } = &mut buffers;
        let (g, rows_from) = (task / bands, task % bands * band);
        let rows_to = (rows_from + band).min(m);
        let f0 = g * GROUP;
        let nf = GROUP.min(n - f0);
        let count = nf.div_ceil(NR);
        let panels: &mut [u32] = panels.view_mut();
        let sums: &mut [f32] = sums.view_mut();
        for q in 0..count {
            let at = q * steps * 512;
            let features = NR.min(nf - q * NR);
            pack_panel(
                row,
                stored,
                f0 + q * NR,
                features,
                k,
                &mut panels[at..at + steps * 512],
                scratch,
            );
        }
        let (y_ptr, y16_ptr) = (&y_ptr, &y16_ptr);
        // The sums go straight into an f32 output where whole blocks allow.
        let direct = |rb, rows, q| !rounded && direct(rb, rows, q, nf);
        for r0 in (rows_from..rows_to).step_by(MC) {
            let rows = MC.min(rows_to - r0);
            for s0 in (0..steps).step_by(block_steps) {
                let ks = block_steps.min(steps - s0);
                let last = s0 + ks == steps;
                for rb in (0..rows).step_by(MR) {
                    // The two 16-row tiles of rows r0 + rb.., from step s0.
                    let a = ((r0 + rb) / 16 * steps + s0) * 512;
                    for q in 0..count {
                        let b = (q * steps + s0) * 512;
                        let c = rb * GROUP + q * NR;
                        // The last cache block stores a whole block of sums straight into the
                        // output (no copy through the scratch afterwards).
                        let out = if last && direct(rb, rows, q) {
                            Sums {
                                // SAFETY: rows r0 + rb.. + 32 <= m, columns f0 + 32 q.. + 32
                                // <= n (`direct`): within y.
                                at: unsafe { y_ptr.0.add((r0 + rb) * n + f0 + q * NR) },
                                stride: n * 4,
                            }
                        } else {
                            Sums {
                                at: sums[c..].as_mut_ptr(),
                                stride: GROUP * 4,
                            }
                        };
                        debug_assert!(a + 512 * (steps + ks) <= xs.len());
                        debug_assert!(b + 512 * ks <= panels.len());
                        debug_assert!(c + 31 * GROUP + NR <= sums.len());
                        // SAFETY: the task's tile session is open (or the kernel is the
                        // tests' emulation); the activation tiles (two streams `steps` tiles
                        // apart, `ks` tiles each), the panel's `ks` steps and the 32 x 32 sums
                        // at stride GROUP lie within xs, panels and sums (asserted above in
                        // debug builds: rows are padded to 32 and the scratch holds MC x GROUP
                        // sums).
                        unsafe {
                            block(
                                kernel,
                                xs[a..].as_ptr(),
                                panels[b..].as_ptr(),
                                ks,
                                sums[c..].as_mut_ptr(),
                                steps,
                                s0 > 0,
                                out,
                            )
                        };
                    }
                }
            }
            if let Output::Gated { gate_bias, up_bias } = output {
                // The group's outputs: f0 / 2.. (nf / 2 of them), gate sums then up sums.
                let (j0, outputs) = (f0 / 2, nf / 2);
                let biases = [gate_bias, up_bias].map(|b| b.map(|b| &b[j0..j0 + outputs]));
                for r in 0..rows {
                    let sums = &sums[r * GROUP..r * GROUP + nf];
                    // SAFETY: row r0 + r < m, outputs j0..j0 + outputs <= n / 2: within the
                    // output, and only this task writes these rows of this group's outputs.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut(
                            y16_ptr.0.add((r0 + r) * width + j0).cast(),
                            outputs,
                        )
                    };
                    gated_row(sums.split_at(outputs), biases, out);
                }
                continue;
            }
            let (bias, activation) = match output {
                Output::Bf16 { bias, activation } => (bias, activation),
                _ => (None, None),
            };
            // The sums not stored straight into the output: a partial last row block's, a
            // partial last panel's, and every sum of a rounded output.
            for r in 0..rows {
                let from = if direct(r / MR * MR, rows, 0) {
                    nf / NR * NR
                } else {
                    0
                };
                let sums = &sums[r * GROUP + from..r * GROUP + nf];
                let at = (r0 + r) * n + f0 + from;
                // SAFETY: row r0 + r < m, columns f0 + from..f0 + nf <= n: within the output,
                // and only this task writes these rows of this group's columns.
                unsafe {
                    if rounded {
                        let out = std::slice::from_raw_parts_mut(y16_ptr.0.add(at), nf - from);
                        let bias = bias.map(|b| &b[f0 + from..f0 + nf]);
                        crate::math::round_to_bf16_plus(sums, bias, out);
                        if let Some(activation) = activation {
                            crate::math::activate_bf16(activation, out);
                        }
                    } else {
                        std::ptr::copy_nonoverlapping(sums.as_ptr(), y_ptr.0.add(at), nf - from);
                    }
                }
            }
        }
        buffers.give_back();
    };
    if parallel {
        (0..groups * bands).into_par_iter().for_each(run);
    } else {
        (0..groups * bands).for_each(run);
    }
    // SAFETY: every task stored its group's nf columns (a gated product: nf / 2 outputs) of
    // its band's rows (whatever k) in the output asked for; the groups cover columns 0..n
    // (outputs 0..n / 2) and the bands rows 0..m.
    unsafe { room.filled() }
}

/// Rows up to which a product against a weight stored as BF16 reads the weight where it lies
/// as tiles ([`gemm_few_rows`]) instead of packing it: packing a weight tile costs about as
/// much as multiplying it by 64 rows, so the products of a mixture's experts in a prompt (tens
/// of rows each) were bound by it. Measured on one Xeon core (`bench_kernels prefill M K N`,
/// the weight in cache): 44 x 2048 x 1408 345 -> 483 GFLOP/s, 128 rows 602-653 -> 723-830
/// on the 2048, 1408 and 3584 inputs tried; at 256 rows the packed path won on 3584 and 1408
/// inputs (the packed activations no longer stay in the second-level cache).
const FEW_ROWS: usize = 128;

/// Whether [`gemm_on`] takes [`gemm_few_rows`]: at most [`FEW_ROWS`] rows, a weight stored
/// as BF16, whole tile steps of inputs, and features in whole tiles of 16 (a gated pair's
/// outputs too).
fn few_rows(stored: Stored, m: usize, n: usize, k: usize) -> bool {
    let whole = match stored {
        Stored::Nowhere => false,
        Stored::One(_) => n.is_multiple_of(16),
        Stored::Pair { n: outputs, .. } => outputs.is_multiple_of(16) && n == 2 * outputs,
    };
    whole && m <= FEW_ROWS && k > 0 && k.is_multiple_of(KT)
}

/// [`gemm_on`] for few rows ([`few_rows`]), the roles of the operands swapped: 16 rows of the
/// weight are one A tile, loaded where they lie (32 inputs of each row, a row's length
/// apart), and the activations, packed once into tile order as [`pack_panel`] packs a weight,
/// are the B tiles, 16 rows each, four at a time ([`tiles_1xn`]: each weight tile is loaded
/// once for 64 rows, from memory for the first 64, from cache after); each tile of sums is 16
/// features x 16 rows, turned back as it is stored. A task takes blocks of 16 outputs (a gated
/// pair's: their gate rows, then their up rows) over every input, its sums staying in the tile
/// registers. The products and their order are the packed path's, so the results are its
/// bits.
#[allow(clippy::too_many_arguments)]
fn gemm_few_rows(
    x: &[u16],
    stored: Stored,
    m: usize,
    n: usize,
    k: usize,
    parallel: bool,
    kernel: Kernel,
    output: Output,
) -> Product {
    use rayon::prelude::*;

    let steps = k / KT;
    let panels = m.div_ceil(NR);
    let mut packed = Lines::zeroed(panels * steps * 2048);
    {
        let packed: &mut [u32] = packed.view_mut();
        let mut scratch = vec![0u16; 16 * k];
        let row = |j: usize, out: &mut [u16]| out.copy_from_slice(&x[j * k..(j + 1) * k]);
        for (p, panel) in packed.chunks_exact_mut(steps * 512).enumerate() {
            let rows = NR.min(m - p * NR);
            pack_panel(
                &row,
                Stored::One(&x[..m * k]),
                p * NR,
                rows,
                k,
                panel,
                &mut scratch,
            );
        }
    }
    let xt: &[u32] = packed.view();
    // Row tile j: panel j / 2's tile j % 2, its steps 2 KB apart. Four from `first` (those
    // past the last, unused, point at the first).
    let count = m.div_ceil(16);
    let b = |first: usize| -> [*const u8; 4] {
        std::array::from_fn(|j| {
            let j = first + j;
            let at = if j < count {
                (j / 2 * steps * 2 + j % 2) * 256
            } else {
                0
            };
            xt[at..].as_ptr().cast()
        })
    };
    let mut room = Room::new(output, m, n);
    let (y_ptr, y16_ptr) = room.pointers();
    let (y_ptr, y16_ptr) = (&y_ptr, &y16_ptr);
    let width = room.width;
    // Blocks of 16 outputs: 16 features, or a gated pair's 16 gate and 16 up features.
    let (blocks, weights) = match stored {
        Stored::Pair { n: outputs, .. } => (outputs / 16, 2),
        _ => (n / 16, 1),
    };
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let per_task = blocks.div_ceil(4 * threads).max(1);
    let run = |task: usize| {
        // SAFETY: the OS granted tile data (`available` or the self-check); the session ends
        // with the task, on this thread.
        let _session = kernel.configures.then(|| unsafe { TileSession::begin() });
        // Each weight's sums: 16 features x FEW_ROWS rows, and the same turned by row.
        let mut sums = Lines::zeroed(2 * 16 * FEW_ROWS * 4);
        let sums: &mut [f32] = sums.view_mut();
        let mut by_row = [[0f32; 16 * FEW_ROWS]; 2];
        for block in task * per_task..((task + 1) * per_task).min(blocks) {
            for (w, (sums, by_row)) in sums
                .chunks_exact_mut(16 * FEW_ROWS)
                .zip(&mut by_row)
                .enumerate()
                .take(weights)
            {
                let (weight, r0) = match stored {
                    Stored::One(weight) => (weight, block * 16),
                    Stored::Pair { gate, up, .. } => ([gate, up][w], block * 16),
                    Stored::Nowhere => unreachable!("few_rows asks for a stored weight"),
                };
                debug_assert!((r0 + 16) * k <= weight.len());
                for first in (0..count).step_by(4) {
                    let tiles = Tiles1xN {
                        a: weight[r0 * k..].as_ptr().cast(),
                        a_stride: 2 * k,
                        a_step: 64,
                        b: b(first),
                        count: 4.min(count - first),
                        b_step: 2048,
                        out: sums[16 * first..].as_mut_ptr(),
                        out_stride: FEW_ROWS * 4,
                    };
                    // SAFETY: the task's tile session is open (or the kernel is the tests'
                    // emulation); the A tile's 16 rows hold `steps` tiles of 32 inputs within
                    // the weight (asserted above in debug builds: `few_rows` asks for whole
                    // tiles and whole steps), the row tiles `steps` tiles 2 KB apart within
                    // the packed activations, and the sums 16 rows of FEW_ROWS.
                    unsafe { (kernel.row_tiles)(&tiles, steps) };
                }
                transpose_sums(sums, count, by_row);
            }
            let j0 = block * 16;
            for row in 0..m {
                let sums = &by_row[0][row * 16..(row + 1) * 16];
                // SAFETY: row < m; this block's outputs are within the row and only this task
                // writes them.
                unsafe {
                    match output {
                        Output::F32 => std::ptr::copy_nonoverlapping(
                            sums.as_ptr(),
                            y_ptr.0.add(row * n + j0),
                            16,
                        ),
                        Output::Bf16 { bias, activation } => {
                            let out =
                                std::slice::from_raw_parts_mut(y16_ptr.0.add(row * n + j0), 16);
                            let bias = bias.map(|bias| &bias[j0..j0 + 16]);
                            crate::math::round_to_bf16_plus(sums, bias, out);
                            if let Some(activation) = activation {
                                crate::math::activate_bf16(activation, out);
                            }
                        }
                        Output::Gated { gate_bias, up_bias } => {
                            let at = y16_ptr.0.add(row * width + j0);
                            let out = std::slice::from_raw_parts_mut(at.cast(), 16);
                            let up = &by_row[1][row * 16..(row + 1) * 16];
                            let biases = [gate_bias, up_bias]
                                .map(|bias| bias.map(|bias| &bias[j0..j0 + 16]));
                            gated_row((sums, up), biases, out);
                        }
                    }
                }
            }
        }
    };
    let tasks = blocks.div_ceil(per_task);
    if parallel {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
    // SAFETY: the blocks cover outputs 0..n (a gated pair's 0..n / 2), each of rows 0..m
    // stored in the output asked for.
    unsafe { room.filled() }
}

/// `count` tiles of sums (16 features x 16 rows each, side by side: 16 rows of [`FEW_ROWS`]
/// values) turned by row: `by_row[16 r + f] = sums[FEW_ROWS f + r]` for rows `r < 16 count`.
fn transpose_sums(sums: &[f32], count: usize, by_row: &mut [f32; 16 * FEW_ROWS]) {
    for j in 0..count {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512 F is present; tile j's 16 rows of 16 values lie within `sums`
            // (16 rows of FEW_ROWS >= 16 count values), its 256 turned values within
            // `by_row`.
            unsafe {
                transpose_tile_avx512(sums[16 * j..].as_ptr(), by_row[256 * j..].as_mut_ptr())
            };
            continue;
        }
        for f in 0..16 {
            for r in 0..16 {
                by_row[(16 * j + r) * 16 + f] = sums[f * FEW_ROWS + 16 * j + r];
            }
        }
    }
}

/// One 16 x 16 tile of f32 values, rows [`FEW_ROWS`] apart, turned into 256 consecutive values
/// ([`transpose_pair_registers`]).
///
/// # Safety
/// The CPU has AVX-512 F; `src` holds 16 rows of 16 values [`FEW_ROWS`] apart, `dst` 256.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_tile_avx512(src: *const f32, dst: *mut f32) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's bounds.
    let r: [__m512i; 16] =
        std::array::from_fn(|i| unsafe { _mm512_loadu_si512(src.add(i * FEW_ROWS).cast()) });
    for (j, row) in transpose_pair_registers(r).iter().enumerate() {
        // SAFETY: the caller's bounds.
        unsafe { _mm512_storeu_si512(dst.add(j * 16).cast(), *row) };
    }
}

/// Room for a GEMM's output as [`Output`] asks: `m x n` f32 sums, or BF16 values (`width` a
/// row: `n`, or a gated product's `n / 2`), not zeroed ([`crate::output::output_room`]).
struct Room {
    y: Vec<f32>,
    y16: Vec<u16>,
    rounded: bool,
    width: usize,
    len: usize,
}

impl Room {
    fn new(output: Output, m: usize, n: usize) -> Room {
        let rounded = !matches!(output, Output::F32);
        let width = match output {
            Output::Gated { .. } => n / 2,
            _ => n,
        };
        let len = m * width;
        let (y, y16) = if rounded {
            (Vec::new(), crate::output::output_room::<u16>(len))
        } else {
            (crate::output::output_room::<f32>(len), Vec::new())
        };
        Room {
            y,
            y16,
            rounded,
            width,
            len,
        }
    }

    /// The output's pointers (the f32 sums', the BF16 values'), for tasks writing their parts.
    fn pointers(
        &mut self,
    ) -> (
        crate::output::SharedOutput<f32>,
        crate::output::SharedOutput<u16>,
    ) {
        (
            crate::output::SharedOutput(self.y.as_mut_ptr()),
            crate::output::SharedOutput(self.y16.as_mut_ptr()),
        )
    }

    /// The output, once written.
    ///
    /// # Safety
    /// Every value of the output asked for has been written.
    unsafe fn filled(self) -> Product {
        // SAFETY: the caller's.
        unsafe {
            if self.rounded {
                Product::Bf16(crate::output::filled(self.y16, self.len))
            } else {
                Product::F32(crate::output::filled(self.y, self.len))
            }
        }
    }
}

/// One row of a gated product's outputs ([`Output::Gated`]) from its gate and up sums: each
/// sum plus its bias rounded to BF16, then `silu(gate)` rounded, times `up`, rounded
/// ([`crate::math::silu_mul_bf16`], or the same operations one value at a time where the CPU
/// lacks AVX-512 BW and VL).
fn gated_row(
    (gate, up): (&[f32], &[f32]),
    [gate_bias, up_bias]: [Option<&[f32]>; 2],
    out: &mut [std::mem::MaybeUninit<u16>],
) {
    let mut bits = [[0u16; GROUP / 2]; 2];
    let [g, u] = &mut bits;
    let (g, u) = (&mut g[..out.len()], &mut u[..out.len()]);
    crate::math::round_to_bf16_plus(gate, gate_bias, g);
    crate::math::round_to_bf16_plus(up, up_bias, u);
    if crate::math::silu_mul_bf16(g, u, out).is_some() {
        return;
    }
    let widen = |b: u16| half::bf16::from_bits(b).to_f32();
    let mut silu: Vec<f32> = g.iter().map(|&b| widen(b)).collect();
    crate::math::silu(&mut silu);
    for ((o, s), &u) in out.iter_mut().zip(&silu).zip(u.iter()) {
        let s = half::bf16::from_f32(*s).to_f32();
        o.write(half::bf16::from_f32(s * widen(u)).to_bits());
    }
}

/// The activations in tile order: for each 16 rows and each 32 inputs, one 1 KB tile (rows
/// of 64 bytes, consecutive), zero beyond `m` rows and `k` inputs. Each row's 32 inputs of a
/// step are one line, so every line is written once (no zeroing pass first); rows of 16 in
/// parallel where `parallel` (the caller waits on this copy).
fn tile_rows(x: &[u16], m: usize, k: usize, mp: usize, steps: usize, parallel: bool) -> Lines {
    use rayon::prelude::*;
    let mut lines: Vec<Line> = Vec::with_capacity(mp * steps);
    // The `steps` tiles of rows 16 b..16 b + 16: lines (s, i) at 16 s + i.
    let fill = |(b, tiles): (usize, &mut [std::mem::MaybeUninit<Line>])| {
        for i in 0..16 {
            let r = b * 16 + i;
            for s in 0..steps {
                let mut line = Line([0; 64]);
                if r < m {
                    let values = &x[r * k + s * KT..r * k + k.min((s + 1) * KT)];
                    // SAFETY: the values' bytes (u16 has no padding), little-endian as the
                    // tile instructions read them (this path is x86-64's).
                    let bytes = unsafe {
                        std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), 2 * values.len())
                    };
                    line.0[..bytes.len()].copy_from_slice(bytes);
                }
                tiles[s * 16 + i].write(line);
            }
        }
    };
    // mp is a whole number of 16-row tiles (of MR rows).
    let room = &mut lines.spare_capacity_mut()[..mp * steps];
    if parallel {
        room.par_chunks_mut(16 * steps).enumerate().for_each(fill);
    } else {
        room.chunks_mut(16 * steps).enumerate().for_each(fill);
    }
    // SAFETY: each chunk b wrote its 16 * steps lines (every s < steps and i < 16), and the
    // chunks cover the mp * steps lines.
    unsafe { lines.set_len(mp * steps) };
    Lines(lines)
}

/// A GEMM task's buffers: the group's packed panels, 16 weight rows, and a row chunk's sums.
/// Each thread keeps its own between tasks and products (their size follows the inputs `k`
/// alone), so that a task neither allocates nor zeroes them: everything in them is written
/// before it is read.
struct TaskBuffers {
    panels: Lines,
    rows: Vec<u16>,
    sums: Lines,
}

thread_local! {
    /// This thread's [`TaskBuffers`], while no task of it holds them.
    static TASK_BUFFERS: std::cell::Cell<Option<TaskBuffers>> =
        const { std::cell::Cell::new(None) };
}

impl TaskBuffers {
    /// This thread's buffers (new ones if a task of this thread already holds them), with
    /// room for `steps` tile steps of inputs.
    fn take(steps: usize) -> TaskBuffers {
        let mut b = TASK_BUFFERS.take().unwrap_or_else(|| TaskBuffers {
            panels: Lines::zeroed(0),
            rows: Vec::new(),
            sums: Lines::zeroed(MC * GROUP * 4),
        });
        let panels = GROUP / NR * steps * 2 * 1024;
        if b.panels.bytes() < panels {
            b.panels = Lines::zeroed(panels);
        }
        if b.rows.len() < 16 * steps * KT {
            b.rows = vec![0; 16 * steps * KT];
        }
        b
    }

    /// Keeps the buffers for this thread's next task.
    fn give_back(self) {
        TASK_BUFFERS.set(Some(self));
    }
}

/// Zeroed bytes on 64-byte boundaries, viewed as values of a plain numeric type.
struct Lines(Vec<Line>);

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// Types every bit pattern of which is a value (u16, u32, f32).
trait Plain: Copy {}
impl Plain for u16 {}
impl Plain for u32 {}
impl Plain for f32 {}

impl Lines {
    /// At least `bytes` zeroed bytes.
    fn zeroed(bytes: usize) -> Lines {
        Lines(vec![Line([0; 64]); bytes.div_ceil(64)])
    }

    fn bytes(&self) -> usize {
        self.0.len() * 64
    }

    /// The bytes as values of `T` (as many as fit).
    fn view<T: Plain>(&self) -> &[T] {
        let len = self.bytes() / std::mem::size_of::<T>();
        // SAFETY: the lines are initialized bytes, 64-byte aligned (more than `T` needs), any
        // bits are a `T` (`Plain`), and the slice borrows them.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), len) }
    }

    /// The bytes as values of `T` (as many as fit), to write.
    fn view_mut<T: Plain>(&mut self) -> &mut [T] {
        let len = self.bytes() / std::mem::size_of::<T>();
        // SAFETY: as in `view`; the slice borrows them mutably.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), len) }
    }
}

/// Where a GEMM's weight rows lie, for the ones packed where they lie (the others are asked
/// of its row function).
#[derive(Clone, Copy)]
enum Stored<'a> {
    /// Nowhere: every row is asked for.
    Nowhere,
    /// One `n x k` weight: feature `j` is its row `j`.
    One(&'a [u16]),
    /// A gated product's two `n x k` weights, their features in [`gated_feature`]'s order.
    Pair {
        gate: &'a [u16],
        up: &'a [u16],
        n: usize,
    },
}

impl<'a> Stored<'a> {
    fn one(w: Option<&'a [u16]>) -> Stored<'a> {
        w.map_or(Stored::Nowhere, Stored::One)
    }

    /// The weight holding features `f..f + 16` as 16 consecutive rows, and the row of `f`;
    /// `None` where they are not.
    fn rows(self, f: usize) -> Option<(&'a [u16], usize)> {
        match self {
            Stored::Nowhere => None,
            Stored::One(w) => Some((w, f)),
            Stored::Pair { gate, up, n } => {
                let ((up0, r0), (up15, r15)) = (gated_feature(f, n), gated_feature(f + 15, n));
                (up0 == up15 && r15 == r0 + 15).then_some((if up0 { up } else { gate }, r0))
            }
        }
    }
}

/// Feature `f` of a gated product of `n` outputs (`2 n` features): whether it is a row of the
/// up weight (else of the gate weight), and which. Each group of [`GROUP`] features holds the
/// gate rows of `GROUP / 2` outputs then the up rows of the same outputs (the last group, of
/// fewer outputs, as many of each), so that a task holds both sums of each of its outputs.
pub(crate) fn gated_feature(f: usize, n: usize) -> (bool, usize) {
    let half = GROUP / 2;
    let (g, i) = (f / GROUP, f % GROUP);
    let outputs = half.min(n - g * half);
    if i < outputs {
        (false, g * half + i)
    } else {
        (true, g * half + i - outputs)
    }
}

/// Packs features f0..f0+nf (zero beyond, and beyond each row's `k` inputs) as weight tiles:
/// for step `s` and tile `t`, 16 rows (input pairs `16 s + i`) of 16 features' pairs
/// (`t * 16 + j`), the pair's first value in the low half. Sixteen features that are
/// consecutive rows of a `stored` weight (`k` values per row) are transposed where they lie;
/// other rows are first asked of
/// `row` into `rows`, scratch for 16 rows of `panel.len() / 512` steps of inputs, each row's
/// tail beyond `k` zeroed here.
fn pack_panel<R>(
    row: &R,
    stored: Stored,
    f0: usize,
    nf: usize,
    k: usize,
    panel: &mut [u32],
    rows: &mut [u16],
) where
    R: Fn(usize, &mut [u16]),
{
    let steps = panel.len() / 512;
    let kp = steps * KT;
    for t in 0..NR / 16 {
        let first = t * 16;
        // The stored weight holding the 16 features as consecutive rows, and the first's row.
        let in_place = if first + 16 <= nf {
            stored.rows(f0 + first)
        } else {
            None
        };
        // Steps read in place: the whole ones of a stored weight's 16 rows.
        let whole = in_place.map_or(0, |_| k / KT);
        if let Some((w, r0)) = in_place {
            for s in 0..whole {
                let tile = &mut panel[(s * 2 + t) * 256..(s * 2 + t + 1) * 256];
                transpose_pairs(w, k, r0 * k + s * KT, tile);
            }
        }
        if whole == steps {
            continue;
        }
        for j in 0..16 {
            let line = &mut rows[j * kp..(j + 1) * kp];
            // Zero past the inputs (the scratch is reused across products).
            line[k..].fill(0);
            let f = f0 + first + j;
            match in_place {
                // Only the last, partial step is read through the scratch.
                Some((w, r0)) => {
                    let r = r0 + j;
                    line[whole * KT..k].copy_from_slice(&w[r * k + whole * KT..(r + 1) * k])
                }
                None if first + j < nf => row(f, &mut line[..k]),
                None => line[..k].fill(0),
            }
        }
        for s in whole..steps {
            let tile = &mut panel[(s * 2 + t) * 256..(s * 2 + t + 1) * 256];
            transpose_pairs(rows, kp, s * KT, tile);
        }
    }
}

/// `tile[i * 16 + j]` = the pair of values `from + 2 i, from + 2 i + 1` of row `j` of `rows`
/// (16 rows of `kp` values): a 16 x 16 transpose of 32-bit pairs.
fn transpose_pairs(rows: &[u16], kp: usize, from: usize, tile: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        assert!(rows.len() >= 15 * kp + from + KT && tile.len() >= 256);
        // SAFETY: AVX-512 F is present; the 16 rows' 32 values from `from` and the 256 words
        // of the tile are in bounds (asserted).
        unsafe { transpose_pairs_avx512(rows.as_ptr().add(from), kp, tile.as_mut_ptr()) };
        return;
    }
    transpose_pairs_scalar(rows, kp, from, tile);
}

/// [`transpose_pairs`] one word at a time.
fn transpose_pairs_scalar(rows: &[u16], kp: usize, from: usize, tile: &mut [u32]) {
    for (i, out) in tile[..256].chunks_mut(16).enumerate() {
        for (j, word) in out.iter_mut().enumerate() {
            let at = j * kp + from + 2 * i;
            *word = u32::from(rows[at]) | u32::from(rows[at + 1]) << 16;
        }
    }
}

/// [`transpose_pairs`] in 64 two-source permutes ([`transpose_pair_registers`]).
///
/// # Safety
/// The CPU has AVX-512 F; `src` starts 16 readable rows of 32 values, `stride` values apart;
/// `dst` has room for 256 words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_pairs_avx512(src: *const u16, stride: usize, dst: *mut u32) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's bounds.
    let r: [__m512i; 16] =
        std::array::from_fn(|j| unsafe { _mm512_loadu_si512(src.add(j * stride).cast()) });
    for (i, row) in transpose_pair_registers(r).iter().enumerate() {
        // SAFETY: row i of the 256 words.
        unsafe { _mm512_storeu_si512(dst.add(i * 16).cast(), *row) };
    }
}

/// The 16 x 16 transpose of 32-bit words held in 16 registers: the transpose swaps each bit
/// of the row index with the same bit of the column index, one bit per stage (the swaps
/// commute), 64 two-source permutes.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn transpose_pair_registers(
    mut r: [std::arch::x86_64::__m512i; 16],
) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    for d in [1usize, 2, 4, 8] {
        // Row j (bit d clear) keeps its columns with bit d clear and takes row j + d's
        // columns c - d; row j + d takes row j's columns c + d and keeps the rest. An index
        // of 16 or more picks from the second source.
        let pick = |upper: bool| {
            let index: [i32; 16] = std::array::from_fn(|c| {
                let c_bit = c & d != 0;
                (match (upper, c_bit) {
                    (false, false) => c,
                    (false, true) => c - d + 16,
                    (true, false) => c + d,
                    (true, true) => c + 16,
                }) as i32
            });
            // SAFETY: 64 bytes of a local array.
            unsafe { _mm512_loadu_si512(index.as_ptr().cast()) }
        };
        let (lower, upper) = (pick(false), pick(true));
        for j in (0..16).filter(|j| j & d == 0) {
            let (a, b) = (r[j], r[j + d]);
            r[j] = _mm512_permutex2var_epi32(a, lower, b);
            r[j + d] = _mm512_permutex2var_epi32(a, upper, b);
        }
    }
    r
}

/// Adds the products of 32 rows of activations and one packed panel over `steps` tile steps to
/// a 32 x 32 block of f32 sums (or stores them, when not `accumulate`).
///
/// `a`: the first 16 rows' tiles in tile order (1 KB per step), the next 16 rows' tiles
/// `gap` tiles further; `b`: the panel's steps (2 KB each: two 1 KB tiles of 16 features);
/// `c`: the sums added to (when `accumulate`), rows [`GROUP`] values apart; `out`: where the
/// new sums are stored (`c` itself, or the output).
///
/// # Safety
/// A [`TileSession`] is open on this thread (or the kernel is the tests' emulation); `a` holds
/// `gap + steps` tiles, `b` `steps * 512` words, `c` 32 rows of 32 sums at stride [`GROUP`],
/// `out` 32 rows of 32 at its stride.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    kernel: Kernel,
    a: *const u16,
    b: *const u32,
    steps: usize,
    c: *mut f32,
    gap: usize,
    accumulate: bool,
    out: Sums,
) {
    let tiles = Tiles2x2 {
        // SAFETY (for the pointer arithmetic): the second row of tiles lies `gap` tiles on,
        // the panel's second tile 1 KB on, within the caller's ranges.
        a: [a.cast(), unsafe { a.add(gap * 512) }.cast()],
        a_stride: 64,
        a_step: 1024,
        b: [b.cast(), unsafe { b.add(256) }.cast()],
        b_step: 2048,
        from: accumulate.then_some(Sums {
            at: c,
            stride: GROUP * 4,
        }),
        out,
    };
    // SAFETY: the caller's ranges are the ones `tiles_2x2` needs.
    unsafe { (kernel.tiles)(&tiles, steps) };
}

/// The operands of [`tiles_2x2`]: two rows of A tiles and two columns of B tiles, each
/// advancing by a fixed number of bytes per step, and a 2 x 2 block of f32 sums.
pub(crate) struct Tiles2x2 {
    /// The first A tile of each row of tiles: 16 rows of 64 bytes.
    pub a: [*const u8; 2],
    /// Bytes from one row of an A tile to the next.
    pub a_stride: usize,
    /// Bytes from one step's A tile to the next one's.
    pub a_step: usize,
    /// The first B tile of each column of tiles: 16 rows of 64 bytes, consecutive (1 KB).
    pub b: [*const u8; 2],
    /// Bytes from one step's B tile to the next one's.
    pub b_step: usize,
    /// Sums the products are added to (else they start from zero).
    pub from: Option<Sums>,
    /// Where the sums are stored.
    pub out: Sums,
}

/// Where a 32 x 32 block of f32 sums lies: tile (i, j) at `16 i` rows and `16 j` values from
/// `at`, rows `stride` bytes apart.
#[derive(Clone, Copy)]
pub(crate) struct Sums {
    pub at: *mut f32,
    pub stride: usize,
}

/// The tile registers configured (`ldtilecfg`: eight tiles of 16 rows of 64 bytes) on this
/// thread, until the session is dropped (`tilerelease`). A task configures them once for all
/// its products: configuring and releasing them around each product cost the 7B's prefill
/// products 6-24% of their time on 2 Xeon cores. No tile state is left configured between
/// tasks, for other code on the thread (oneDNN, in a process that also runs torch).
pub(crate) struct TileSession(std::marker::PhantomData<*const ()>);

impl TileSession {
    /// Configures the tile registers.
    ///
    /// # Safety
    /// The OS granted this process tile data ([`available`] answered `true`, or the
    /// self-check runs after the request).
    pub(crate) unsafe fn begin() -> TileSession {
        // SAFETY: the configuration is 64 readable bytes; the caller's grant.
        unsafe {
            asm!(
                "ldtilecfg [{cfg}]",
                cfg = in(reg) &CONFIG as *const TileConfig,
                options(nostack, readonly, preserves_flags)
            )
        };
        TileSession(std::marker::PhantomData)
    }
}

impl Drop for TileSession {
    fn drop(&mut self) {
        // SAFETY: tiles were configured by `begin` on this thread (the session is not Send).
        unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
    }
}

/// `out[i][j] = from[i][j] + sum over steps of A[i](step) B[j](step)` for a 2 x 2 block of
/// 16 x 16 f32 tiles (`from` zero when absent): the tile product of the GEMM's [`block`] and
/// of attention, over operands laid out by the caller.
///
/// # Safety
/// A [`TileSession`] is open on this thread; every tile the steps read and both blocks of sums
/// lie in memory the caller owns (readable, and writable for `out`).
pub(crate) unsafe fn tiles_2x2(t: &Tiles2x2, steps: usize) {
    let corners = |s: Sums| {
        let (c, cs) = (s.at as *mut u8, s.stride);
        // SAFETY (for the pointer arithmetic): the four tiles of the caller's block.
        unsafe { [c, c.add(64), c.add(16 * cs), c.add(16 * cs + 64)] }
    };
    // SAFETY: the tiles are configured (the caller's session) and this thread's; every address
    // is within the caller's ranges.
    unsafe {
        match t.from {
            Some(from) => {
                let c = corners(from);
                asm!(
                    "tileloadd tmm0, [{c0} + {cs}*1]",
                    "tileloadd tmm1, [{c1} + {cs}*1]",
                    "tileloadd tmm2, [{c2} + {cs}*1]",
                    "tileloadd tmm3, [{c3} + {cs}*1]",
                    c0 = in(reg) c[0],
                    c1 = in(reg) c[1],
                    c2 = in(reg) c[2],
                    c3 = in(reg) c[3],
                    cs = in(reg) from.stride,
                    options(nostack, readonly, preserves_flags)
                );
            }
            None => asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem, preserves_flags)
            ),
        }
        for s in 0..steps {
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {s64}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {s64}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) t.a[0].add(s * t.a_step),
                a1 = in(reg) t.a[1].add(s * t.a_step),
                b0 = in(reg) t.b[0].add(s * t.b_step),
                b1 = in(reg) t.b[1].add(s * t.b_step),
                sa = in(reg) t.a_stride,
                s64 = in(reg) 64usize,
                options(nostack, readonly, preserves_flags)
            );
        }
        let c = corners(t.out);
        asm!(
            "tilestored [{c0} + {cs}*1], tmm0",
            "tilestored [{c1} + {cs}*1], tmm1",
            "tilestored [{c2} + {cs}*1], tmm2",
            "tilestored [{c3} + {cs}*1], tmm3",
            c0 = in(reg) c[0],
            c1 = in(reg) c[1],
            c2 = in(reg) c[2],
            c3 = in(reg) c[3],
            cs = in(reg) t.out.stride,
            options(nostack, preserves_flags)
        );
    }
}

/// The operands of [`tiles_1xn`]: one A tile and `count` B tiles per step, and a row of
/// `count` 16 x 16 tiles of f32 sums.
pub(crate) struct Tiles1xN {
    /// The A tile of the first step: 16 rows of 64 bytes, `a_stride` bytes apart.
    pub a: *const u8,
    pub a_stride: usize,
    /// Bytes from one step's A tile to the next one's.
    pub a_step: usize,
    /// The first step's B tiles (16 rows of 64 bytes, consecutive), the first `count` used.
    pub b: [*const u8; 4],
    /// How many B tiles (1 to 4).
    pub count: usize,
    /// Bytes from one step's B tile to the next one's.
    pub b_step: usize,
    /// Where the sums are stored: tile j at `16 j` values from here, rows `out_stride` bytes
    /// apart.
    pub out: *mut f32,
    pub out_stride: usize,
}

/// `out[j] = sum over steps of A(step) B[j](step)` for `count` (1 to 4) 16 x 16 f32 tiles:
/// each A tile is loaded once for all of them (four tiles of sums, one of A, and the B tiles
/// in the remaining three registers, the first reused for the fourth).
///
/// # Safety
/// A [`TileSession`] is open on this thread; every tile the steps read and the sums lie in
/// memory the caller owns (readable, and writable for `out`); `count` is 1 to 4.
pub(crate) unsafe fn tiles_1xn(t: &Tiles1xN, steps: usize) {
    // SAFETY: the tiles are configured (the caller's session) and this thread's; every
    // address is within the caller's ranges.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem, preserves_flags)
        );
        for s in 0..steps {
            asm!(
                "tileloadd tmm4, [{a} + {sa}*1]",
                a = in(reg) t.a.add(s * t.a_step),
                sa = in(reg) t.a_stride,
                options(nostack, readonly, preserves_flags)
            );
            for (j, b) in t.b.iter().enumerate().take(t.count) {
                row_tile_step(j, b.add(s * t.b_step));
            }
        }
        for j in 0..t.count {
            store_row_tile(j, (t.out as *mut u8).add(64 * j), t.out_stride);
        }
    }
}

/// One step of row tile `j` (0 to 3) of [`tiles_1xn`]: its B tile loaded (into tmm5, tmm6,
/// tmm7, then tmm5 again) and multiplied by the A tile in tmm4 into sums tile `j`.
///
/// # Safety
/// As [`tiles_1xn`]'s, with the step's A tile in tmm4; `b` starts 16 readable rows of 64 bytes.
#[inline(always)]
unsafe fn row_tile_step(j: usize, b: *const u8) {
    // SAFETY: the caller's.
    unsafe {
        match j {
            0 => asm!("tileloadd tmm5, [{b} + {s}*1]", "tdpbf16ps tmm0, tmm4, tmm5",
                b = in(reg) b, s = in(reg) 64usize, options(nostack, readonly, preserves_flags)),
            1 => asm!("tileloadd tmm6, [{b} + {s}*1]", "tdpbf16ps tmm1, tmm4, tmm6",
                b = in(reg) b, s = in(reg) 64usize, options(nostack, readonly, preserves_flags)),
            2 => asm!("tileloadd tmm7, [{b} + {s}*1]", "tdpbf16ps tmm2, tmm4, tmm7",
                b = in(reg) b, s = in(reg) 64usize, options(nostack, readonly, preserves_flags)),
            _ => asm!("tileloadd tmm5, [{b} + {s}*1]", "tdpbf16ps tmm3, tmm4, tmm5",
                b = in(reg) b, s = in(reg) 64usize, options(nostack, readonly, preserves_flags)),
        }
    }
}

/// Stores sums tile `j` (0 to 3) of [`tiles_1xn`] at `at`, rows `stride` bytes apart.
///
/// # Safety
/// As [`tiles_1xn`]'s; `at` starts 16 writable rows of 64 bytes, `stride` apart.
#[inline(always)]
unsafe fn store_row_tile(j: usize, at: *mut u8, stride: usize) {
    // SAFETY: the caller's.
    unsafe {
        match j {
            0 => asm!("tilestored [{c} + {s}*1], tmm0", c = in(reg) at, s = in(reg) stride,
                options(nostack, preserves_flags)),
            1 => asm!("tilestored [{c} + {s}*1], tmm1", c = in(reg) at, s = in(reg) stride,
                options(nostack, preserves_flags)),
            2 => asm!("tilestored [{c} + {s}*1], tmm2", c = in(reg) at, s = in(reg) stride,
                options(nostack, preserves_flags)),
            _ => asm!("tilestored [{c} + {s}*1], tmm3", c = in(reg) at, s = in(reg) stride,
                options(nostack, preserves_flags)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The self-check's product against its f64 reference, here where the CPU has AMX.
    #[test]
    fn matches_an_f64_product_of_the_same_bf16_values() {
        if !hardware() || !request_tile_data() {
            eprintln!("skipped: this CPU has no AMX (or the OS lends no tile data)");
            return;
        }
        self_check().unwrap();
        check_kernel(TILES, MC + 9, GROUP + 13, (KC_STEPS + 1) * KT - 5).unwrap();
        assert!(available() || std::env::var("SIMPLESEG_AMX").is_ok_and(|v| v == "0"));
    }

    /// `tileloadd` of 16 rows of 64 bytes from `base`, rows `stride` bytes apart.
    unsafe fn load(base: *const u8, stride: usize) -> [[u8; 64]; 16] {
        std::array::from_fn(|r| unsafe { *(base.add(r * stride) as *const [u8; 64]) })
    }
    /// `tdpbf16ps c, a, b`.
    fn dp(c: &mut [[f32; 16]; 16], a: &[[u8; 64]; 16], b: &[[u8; 64]; 16]) {
        let bf = |t: &[u8; 64], i: usize| {
            half::bf16::from_bits(u16::from_le_bytes([t[2 * i], t[2 * i + 1]])).to_f32()
        };
        for (m, row) in c.iter_mut().enumerate() {
            for (n, sum) in row.iter_mut().enumerate() {
                for (k, b) in b.iter().enumerate() {
                    *sum +=
                        bf(&a[m], 2 * k) * bf(b, 2 * n) + bf(&a[m], 2 * k + 1) * bf(b, 2 * n + 1);
                }
            }
        }
    }
    /// The kernels to test here: the emulation, and the tiles where the CPU has them.
    fn kernels() -> Vec<Kernel> {
        let mut kernels = vec![EMULATED];
        if hardware() && request_tile_data() {
            kernels.push(TILES);
        }
        kernels
    }

    /// The emulated kernel: nothing to configure.
    const EMULATED: Kernel = Kernel {
        tiles: emulated,
        row_tiles: emulated_row,
        configures: false,
    };

    /// [`tiles_1xn`] with its loads and `tdpbf16ps` emulated at the same addresses.
    unsafe fn emulated_row(t: &Tiles1xN, steps: usize) {
        let mut sums = vec![[[0f32; 16]; 16]; t.count];
        for s in 0..steps {
            let a = unsafe { load(t.a.add(s * t.a_step), t.a_stride) };
            for (j, sum) in sums.iter_mut().enumerate() {
                dp(sum, &a, &unsafe { load(t.b[j].add(s * t.b_step), 64) });
            }
        }
        for (j, sum) in sums.iter().enumerate() {
            for (r, line) in sum.iter().enumerate() {
                for (c, v) in line.iter().enumerate() {
                    let at = (t.out as *mut u8).wrapping_add(r * t.out_stride + 64 * j + 4 * c);
                    unsafe { *(at as *mut [u8; 4]) = v.to_le_bytes() };
                }
            }
        }
    }

    /// [`tiles_2x2`] with its loads and `tdpbf16ps` emulated at the same addresses.
    unsafe fn emulated(t: &Tiles2x2, steps: usize) {
        let corners = |s: Sums| {
            let c = s.at as *mut u8;
            let cs = s.stride;
            [0, 64, 16 * cs, 16 * cs + 64].map(|at| unsafe { c.add(at) })
        };
        let mut sums = [[[0f32; 16]; 16]; 4];
        if let Some(from) = t.from {
            for (sum, at) in sums.iter_mut().zip(corners(from)) {
                let tile = unsafe { load(at, from.stride) };
                for (r, line) in tile.iter().enumerate() {
                    for (j, v) in line.chunks(4).enumerate() {
                        sum[r][j] = f32::from_le_bytes([v[0], v[1], v[2], v[3]]);
                    }
                }
            }
        }
        for s in 0..steps {
            let (a0, a1, b0, b1) = unsafe {
                (
                    load(t.a[0].add(s * t.a_step), t.a_stride),
                    load(t.a[1].add(s * t.a_step), t.a_stride),
                    load(t.b[0].add(s * t.b_step), 64),
                    load(t.b[1].add(s * t.b_step), 64),
                )
            };
            dp(&mut sums[0], &a0, &b0);
            dp(&mut sums[1], &a0, &b1);
            dp(&mut sums[2], &a1, &b0);
            dp(&mut sums[3], &a1, &b1);
        }
        for (sum, at) in sums.iter().zip(corners(t.out)) {
            for (r, line) in sum.iter().enumerate() {
                for (j, v) in line.iter().enumerate() {
                    let place = unsafe { at.add(r * t.out.stride + j * 4) };
                    unsafe { *(place as *mut [u8; 4]) = v.to_le_bytes() };
                }
            }
        }
    }

    /// Everything but the tile instructions (padding, packing, addressing, copying back) on
    /// every CPU: [`block`]'s loads and `tdpbf16ps` emulated as the instruction set manual
    /// defines them, at the same addresses.
    #[test]
    fn the_gemm_around_emulated_tiles_matches_the_reference() {
        // Every loop of the GEMM: two row chunks in one band, four groups and two cache
        // blocks, each with a partial last one; then one group over two bands of rows.
        check_kernel(EMULATED, MC + 9, 3 * GROUP + 13, (KC_STEPS + 1) * KT - 5).unwrap();
        check_kernel(EMULATED, 37, 45, 100).unwrap();
    }

    /// The rounded output (bias added, then each sum rounded to BF16 as it is stored) is bit
    /// for bit the f32 output plus the bias, rounded, and with an activation, those values
    /// widened, mapped by the f32 function ([`crate::math::gelu_tanh`]) and rounded again:
    /// through the emulated tiles on every CPU, on AMX where the CPU has it; with and without a
    /// bias, whole and partial blocks.
    #[test]
    fn rounded_output_equals_the_f32_output_plus_bias_rounded() {
        let (m, n, k) = (45, GROUP + 37, 100);
        let mut values = crate::testing::Values(11);
        let bf = |v: &f32| half::bf16::from_f32(*v).to_bits();
        let x: Vec<u16> = values.take(m * k).iter().map(bf).collect();
        let w: Vec<u16> = values.take(n * k).iter().map(bf).collect();
        let bias = values.take(n);
        let row = |j: usize, out: &mut [u16]| out.copy_from_slice(&w[j * k..(j + 1) * k]);
        for kernel in kernels() {
            for bias in [None, Some(&bias[..])] {
                for stored in [None, Some(&w[..])] {
                    let sums = gemm_on(
                        &x,
                        &row,
                        Stored::one(stored),
                        m,
                        n,
                        k,
                        false,
                        kernel,
                        Output::F32,
                    )
                    .into_f32();
                    let rounded: Vec<u16> = sums
                        .iter()
                        .enumerate()
                        .map(|(at, s)| {
                            let b = bias.map_or(0.0, |b| b[at % n]);
                            half::bf16::from_f32(if bias.is_some() { s + b } else { *s }).to_bits()
                        })
                        .collect();
                    let mut gelu: Vec<f32> = rounded
                        .iter()
                        .map(|&b| half::bf16::from_bits(b).to_f32())
                        .collect();
                    crate::math::gelu_tanh(&mut gelu);
                    let gelu: Vec<u16> = gelu.iter().map(bf).collect();
                    for (activation, want) in
                        [(None, &rounded), (Some(Activation::GeluTanh), &gelu)]
                    {
                        let Product::Bf16(got) = gemm_on(
                            &x,
                            &row,
                            Stored::one(stored),
                            m,
                            n,
                            k,
                            false,
                            kernel,
                            Output::Bf16 { bias, activation },
                        ) else {
                            panic!("a BF16 output");
                        };
                        assert_eq!(&got, want, "bias: {}, {activation:?}", bias.is_some());
                    }
                }
            }
        }
    }

    /// A gated product's activations are bit for bit the composed steps: each weight's
    /// rounded product (with its bias), SiLU of the gate in f32 rounded to BF16, times up,
    /// rounded. Through the emulated tiles on every CPU, on AMX where the CPU has it; outputs
    /// that fill whole groups and a last group of a whole or partial 16 (whose rows mix gate
    /// and up weights in a tile), with and without biases, rows asked for or read in place.
    #[test]
    fn gated_output_equals_the_rounded_products_composed() {
        let (m, k) = (45, 100);
        let mut values = crate::testing::Values(23);
        let bf = |v: &f32| half::bf16::from_f32(*v).to_bits();
        let widen = |b: u16| half::bf16::from_bits(b).to_f32();
        let x: Vec<u16> = values.take(m * k).iter().map(bf).collect();
        let kernels = kernels();
        for n in [GROUP + 32, GROUP + 21] {
            let gate: Vec<u16> = values.take(n * k).iter().map(bf).collect();
            let up: Vec<u16> = values.take(n * k).iter().map(bf).collect();
            let (gate_bias, up_bias) = (values.take(n), values.take(n));
            let rows = |w: &[u16]| {
                let w = w.to_vec();
                move |j: usize, out: &mut [u16]| out.copy_from_slice(&w[j * k..(j + 1) * k])
            };
            for &kernel in &kernels {
                for biased in [false, true] {
                    let bias = |b: &[f32]| biased.then(|| b.to_vec());
                    let (gb, ub) = (bias(&gate_bias), bias(&up_bias));
                    let rounded = |w: &[u16], b: Option<&[f32]>| {
                        let output = Output::Bf16 {
                            bias: b,
                            activation: None,
                        };
                        match gemm_on(
                            &x,
                            &rows(w),
                            Stored::Nowhere,
                            m,
                            n,
                            k,
                            false,
                            kernel,
                            output,
                        ) {
                            Product::Bf16(y) => y,
                            Product::F32(_) => unreachable!(),
                        }
                    };
                    let (g, u) = (rounded(&gate, gb.as_deref()), rounded(&up, ub.as_deref()));
                    let mut silu: Vec<f32> = g.iter().map(|&b| widen(b)).collect();
                    crate::math::silu(&mut silu);
                    let want: Vec<u16> = silu
                        .iter()
                        .zip(&u)
                        .map(|(s, &u)| bf(&(widen(bf(s)) * widen(u))))
                        .collect();
                    for in_place in [false, true] {
                        let weight = |w: &'static str| {
                            let (stored, bias) = match w {
                                "gate" => (&gate, gb.as_deref()),
                                _ => (&up, ub.as_deref()),
                            };
                            GatedWeight {
                                row: rows(stored),
                                stored: in_place.then_some(&stored[..]),
                                bias,
                            }
                        };
                        let (gw, uw) = (weight("gate"), weight("up"));
                        let got = gemm_gated_on(&x, &gw, &uw, (m, n, k), false, kernel);
                        assert_eq!(got, want, "n {n}, bias {biased}, in place {in_place}");
                    }
                }
            }
        }
    }

    /// A product of few rows against a stored weight (the weight's rows as A tiles read where
    /// they lie, [`gemm_few_rows`]) is bit for bit the packed path's (the weight's rows asked
    /// for and packed): f32 sums, rounded sums with and without a bias, a gated pair's
    /// activations with and without biases; row counts that fill one to eight row tiles, whole
    /// or not; through the emulated tiles on every CPU, on AMX where the CPU has it.
    #[test]
    fn few_rows_read_in_place_equal_the_packed_path() {
        let k = 3 * KT;
        let mut values = crate::testing::Values(31);
        let bf = |v: &f32| half::bf16::from_f32(*v).to_bits();
        let kernels = kernels();
        for (m, n) in [
            (1, 16),
            (17, 48),
            (44, 80),
            (64, 32),
            (65, 16),
            (FEW_ROWS, 48),
        ] {
            assert!(few_rows(Stored::One(&[]), m, n, k));
            let x: Vec<u16> = values.take(m * k).iter().map(bf).collect();
            let gate: Vec<u16> = values.take(n * k).iter().map(bf).collect();
            let up: Vec<u16> = values.take(n * k).iter().map(bf).collect();
            let (gate_bias, up_bias) = (values.take(n), values.take(n));
            let rows = |w: &[u16]| {
                let w = w.to_vec();
                move |j: usize, out: &mut [u16]| out.copy_from_slice(&w[j * k..(j + 1) * k])
            };
            for &kernel in &kernels {
                for output in [
                    Output::F32,
                    Output::Bf16 {
                        bias: None,
                        activation: None,
                    },
                    Output::Bf16 {
                        bias: Some(&gate_bias),
                        activation: None,
                    },
                    Output::Bf16 {
                        bias: Some(&gate_bias),
                        activation: Some(Activation::GeluTanh),
                    },
                ] {
                    let product = |stored| match gemm_on(
                        &x,
                        &rows(&gate),
                        stored,
                        m,
                        n,
                        k,
                        false,
                        kernel,
                        output,
                    ) {
                        Product::F32(y) => y.iter().map(|v| v.to_bits()).collect(),
                        Product::Bf16(y) => y.iter().map(|&v| u32::from(v)).collect(),
                    };
                    let want: Vec<u32> = product(Stored::Nowhere);
                    assert_eq!(product(Stored::One(&gate)), want, "m {m}, n {n}");
                }
                for biased in [false, true] {
                    let bias = |b: &[f32]| biased.then(|| b.to_vec());
                    let (gb, ub) = (bias(&gate_bias), bias(&up_bias));
                    let gated = |in_place: bool| {
                        let g = GatedWeight {
                            row: rows(&gate),
                            stored: in_place.then_some(&gate[..]),
                            bias: gb.as_deref(),
                        };
                        let u = GatedWeight {
                            row: rows(&up),
                            stored: in_place.then_some(&up[..]),
                            bias: ub.as_deref(),
                        };
                        gemm_gated_on(&x, &g, &u, (m, n, k), false, kernel)
                    };
                    assert_eq!(gated(true), gated(false), "m {m}, n {n}, bias {biased}");
                }
            }
        }
    }

    /// A thread's task buffers are reused: a product after a wider one whose weights were all
    /// NaN reads none of them (the weight rows' tails past the inputs are zeroed again).
    #[test]
    fn a_reused_scratch_keeps_nothing_of_the_product_before() {
        let nan = |_: usize, out: &mut [u16]| out.fill(0x7fc0);
        let x = vec![0x3f80u16; 16 * 96];
        // 32 features: both halves of the panel leave NaN rows in the scratch.
        let y = gemm_on(
            &x,
            &nan,
            Stored::Nowhere,
            16,
            32,
            96,
            false,
            EMULATED,
            Output::F32,
        )
        .into_f32();
        assert!(y.iter().all(|v| v.is_nan()));
        check_kernel(EMULATED, 16, 20, 40).unwrap();
    }

    /// Both transposes (AVX-512 where the CPU has it) put row j's pair i at word 16 i + j.
    #[test]
    fn transposes_put_pair_i_of_row_j_at_word_16i_plus_j() {
        let (kp, from) = (96, 32);
        let rows: Vec<u16> = (0..16 * kp).map(|v| (v * 7 + 3) as u16).collect();
        let want: Vec<u32> = (0..256)
            .map(|w| {
                let at = (w % 16) * kp + from + 2 * (w / 16);
                u32::from(rows[at]) | u32::from(rows[at + 1]) << 16
            })
            .collect();
        let mut tile = vec![0u32; 256];
        transpose_pairs_scalar(&rows, kp, from, &mut tile);
        assert_eq!(tile, want);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            tile.fill(0);
            // SAFETY: AVX-512 F; 16 rows of kp >= from + 32 values; 256 words.
            unsafe { transpose_pairs_avx512(rows[from..].as_ptr(), kp, tile.as_mut_ptr()) };
            assert_eq!(tile, want);
        } else {
            eprintln!("AVX-512 transpose skipped: this CPU lacks AVX-512 F");
        }
    }

    /// The packing puts each input pair where a weight tile row wants it, from rows asked for
    /// one at a time and from a weight read in place (whose first 16 features are transposed
    /// where they lie, the last partial step and the next 4 features through the scratch).
    #[test]
    fn packing_puts_pairs_in_tile_order() {
        let (k, nf): (usize, usize) = (70, 20);
        let value = |j: usize, i: usize| (j * 1000 + i) as u16;
        let row = |j: usize, out: &mut [u16]| {
            for (i, o) in out.iter_mut().enumerate() {
                *o = value(j, i);
            }
        };
        let stored: Vec<u16> = (0..nf * k).map(|v| value(v / k, v % k)).collect();
        let steps = k.div_ceil(KT);
        for source in [None, Some(&stored[..])] {
            let mut panel = vec![0u32; steps * 512];
            let mut scratch = vec![0u16; 16 * steps * KT];
            pack_panel(
                &row,
                Stored::one(source),
                0,
                nf,
                k,
                &mut panel,
                &mut scratch,
            );
            for f in 0..NR {
                for i in 0..steps * KT {
                    let (s, pair, t, j) = (i / 32, (i % 32) / 2, f / 16, f % 16);
                    let word = panel[((s * 2 + t) * 16 + pair) * 16 + j];
                    let got = if i % 2 == 0 {
                        word & 0xffff
                    } else {
                        word >> 16
                    };
                    let want = if f < nf && i < k {
                        u32::from(value(f, i))
                    } else {
                        0
                    };
                    assert_eq!(
                        got,
                        want,
                        "feature {f}, input {i}, in place: {}",
                        source.is_some()
                    );
                }
            }
        }
    }
}
