//! BF16 GEMM on Intel AMX tiles (Xeon Sapphire Rapids and later: `amx_bf16` and `amx_tile`),
//! the path [`crate::bf16_gemm::gemm`] takes where the CPU has them.
//!
//! Each `tdpbf16ps` multiplies a 16 x 32 tile of BF16 activations by a 32 x 16 tile of BF16
//! weights into a 16 x 16 tile of f32 sums: 8192 products per instruction, 16 times a
//! `vdpbf16ps`. The kernel keeps a 32 x 32 block of sums in four tile registers, loading two
//! activation tiles and two weight tiles per 32 inputs. Weights are packed 32 output features
//! at a time (a panel), each 32 inputs x 16 features as one 1 KB tile in the layout the
//! instruction wants (pairs of consecutive inputs side by side); activations are read in place
//! from a copy padded to 32 rows and 32 inputs. Products are exact and sums are f32 (round to
//! nearest even, denormals flushed, as the instruction defines), so results differ from an f32
//! GEMM on the same BF16 values only in summation order and rounding, as oneDNN's do.
//!
//! Stable Rust has no AMX intrinsics: the tile instructions are inline assembly. Linux lends
//! tile registers to a process only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM,
//! XFEATURE_XTILEDATA)`), made once here. Before its first use the path multiplies a small
//! product of awkward sizes and compares it with an f64 reference: on a refusal or a mismatch
//! it prints a warning and [`available`] answers `false`, so callers take the AVX-512 path.
//! `SIMPLESEG_AMX=0` turns the path off (to compare both on one machine).

use std::arch::asm;
use std::sync::OnceLock;

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

/// The product of the self-check: sizes that leave partial tiles on every side.
fn self_check() -> Result<(), String> {
    check_kernel(block)
}

/// [`self_check`] with a given block kernel.
fn check_kernel(kernel: Block) -> Result<(), String> {
    let (m, n, k) = (37, 45, 100);
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
    let y = gemm_on(&bits, &row, m, n, k, false, kernel);
    for r in 0..m {
        for f in 0..n {
            let want: f64 = (0..k)
                .map(|i| f64::from(x[r * k + i].to_f32()) * f64::from(w[f * k + i].to_f32()))
                .sum();
            let got = f64::from(y[r * n + f]);
            if (got - want).abs() > 1e-3 * (1.0 + want.abs()) {
                return Err(format!("({r}, {f}): {got} instead of {want}"));
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
    gemm_on(x, row, m, n, k, true, block)
}

/// A kernel computing one 32 x 32 block of sums ([`block`], or the tests' emulation of it).
type Block = unsafe fn(&[u16], usize, &[u32], usize, &mut [f32; MR * NR]);

/// [`gemm`], its panels in parallel or (the self-check, which may run inside a parallel task
/// waiting on it) one after the other.
fn gemm_on<R>(
    x: &[u16],
    row: &R,
    m: usize,
    n: usize,
    k: usize,
    parallel: bool,
    kernel: Block,
) -> Vec<f32>
where
    R: Fn(usize, &mut [u16]) + Sync,
{
    use rayon::prelude::*;

    // Activations padded with zeros to whole tiles: rows to 32, inputs to 32. Tile rows start
    // on cache lines (every buffer a tile reads or writes is 64-byte aligned).
    let (mp, kp) = (m.div_ceil(MR) * MR, k.div_ceil(KT) * KT);
    let mut padded = Lines::zeroed(mp * kp * 2);
    let xs: &mut [u16] = padded.view();
    for (dst, src) in xs.chunks_mut(kp).zip(x.chunks(k.max(1)).take(m)) {
        dst[..k].copy_from_slice(&src[..k]);
    }
    let xs: &[u16] = xs;
    let mut y = crate::output::output_room(m * n);
    let y_ptr = crate::output::SharedOutput(y.as_mut_ptr());
    let steps = kp / KT;
    let buffers = || {
        (
            Lines::zeroed(steps * 2 * 1024),
            vec![0u16; k],
            Lines::zeroed(MR * NR * 4),
        )
    };
    let run = |(panel, scratch, sums): &mut (Lines, Vec<u16>, Lines), p: usize| {
        let f0 = p * NR;
        let nf = NR.min(n - f0);
        let panel: &mut [u32] = panel.view();
        let sums: &mut [f32; MR * NR] = match sums.view::<f32>().try_into() {
            Ok(sums) => sums,
            Err(_) => unreachable!("MR x NR sums"),
        };
        pack_panel(row, f0, nf, panel, scratch);
        let y_ptr = &y_ptr;
        for r0 in (0..m).step_by(MR) {
            // SAFETY: the OS granted tile data (`available` or the self-check); the block
            // reads 32 padded rows of xs from r0 over kp inputs and the panel's
            // steps x 2 KB, and writes the 32 x 32 sums.
            unsafe { kernel(&xs[r0 * kp..], kp, panel, steps, sums) };
            for r in 0..MR.min(m - r0) {
                // SAFETY: row r0 + r < m, columns f0..f0 + nf < n: within y, and only this
                // task writes this panel's columns.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        sums[r * NR..].as_ptr(),
                        y_ptr.0.add((r0 + r) * n + f0),
                        nf,
                    );
                }
            }
        }
    };
    let panels = n.div_ceil(NR);
    if parallel {
        (0..panels).into_par_iter().for_each_init(buffers, run);
    } else {
        let mut own = buffers();
        (0..panels).for_each(|p| run(&mut own, p));
    }
    // SAFETY: every panel copied its nf columns of rows 0..m (whatever k), and the panels
    // cover columns 0..n.
    unsafe { crate::output::filled(y, m * n) }
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

    /// The bytes as values of `T` (as many as fit).
    fn view<T: Plain>(&mut self) -> &mut [T] {
        let len = self.0.len() * 64 / std::mem::size_of::<T>();
        // SAFETY: the lines are initialized bytes, 64-byte aligned (more than `T` needs), any
        // bits are a `T` (`Plain`), and the slice borrows them mutably.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), len) }
    }
}

/// Packs features f0..f0+nf (zero beyond, and beyond the row's `scratch.len()` inputs) as
/// weight tiles: for step `s`
/// and tile `t`, 16 rows (input pairs `16 s + i`) of 16 features' pairs (`t * 16 + j`), the
/// pair's first value in the low half.
fn pack_panel<R>(row: &R, f0: usize, nf: usize, panel: &mut [u32], scratch: &mut [u16])
where
    R: Fn(usize, &mut [u16]),
{
    panel.fill(0);
    for f in 0..nf {
        row(f0 + f, scratch);
        let (t, j) = (f / 16, f % 16);
        for (pair, values) in scratch.chunks(2).enumerate() {
            let (s, i) = (pair / 16, pair % 16);
            let high = values.get(1).map_or(0, |&v| u32::from(v));
            panel[((s * 2 + t) * 16 + i) * 16 + j] = u32::from(values[0]) | high << 16;
        }
    }
}

/// The 32 x 32 sums of 32 rows of `x` (row stride `kp` values, `steps * 32` inputs) and a
/// packed panel, into `sums` (row-major, 32 per row).
///
/// # Safety
/// The OS granted this process tile data; `x` holds 32 rows of `kp` values; `panel` holds
/// `steps * 512` words.
unsafe fn block(x: &[u16], kp: usize, panel: &[u32], steps: usize, sums: &mut [f32; MR * NR]) {
    let x_stride = kp * 2;
    let x0 = x.as_ptr();
    // SAFETY: 16 rows below x0 (x holds 32 rows).
    let x1 = unsafe { x0.add(16 * kp) };
    let b = panel.as_ptr();
    // SAFETY: the configuration is 64 readable bytes; tile registers are this thread's (the
    // permission was granted) and no other code uses them.
    unsafe {
        asm!(
            "ldtilecfg [{cfg}]",
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            cfg = in(reg) &CONFIG as *const TileConfig,
            options(nostack, readonly, preserves_flags)
        );
    }
    for s in 0..steps {
        // SAFETY: activation tiles: 16 rows of 64 bytes from input 32 s of rows 0..16 and
        // 16..32 (stride x_stride bytes), within x; weight tiles: the step's two 1 KB tiles
        // (stride 64 bytes), within the panel.
        unsafe {
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) x0.add(s * KT),
                a1 = in(reg) x1.add(s * KT),
                sa = in(reg) x_stride,
                b0 = in(reg) b.add(s * 512),
                b1 = in(reg) b.add(s * 512 + 256),
                sb = in(reg) 64usize,
                options(nostack, readonly, preserves_flags)
            );
        }
    }
    let c = sums.as_mut_ptr();
    // SAFETY: the four 16 x 16 f32 tiles land in `sums` (32 rows of 128 bytes): at row 0 and
    // 16, column 0 and 16.
    unsafe {
        asm!(
            "tilestored [{c0} + {sc}*1], tmm0",
            "tilestored [{c1} + {sc}*1], tmm1",
            "tilestored [{c2} + {sc}*1], tmm2",
            "tilestored [{c3} + {sc}*1], tmm3",
            "tilerelease",
            c0 = in(reg) c,
            c1 = in(reg) c.add(16),
            c2 = in(reg) c.add(16 * NR),
            c3 = in(reg) c.add(16 * NR + 16),
            sc = in(reg) NR * 4,
            options(nostack, preserves_flags)
        );
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
        assert!(available() || std::env::var("SIMPLESEG_AMX").is_ok_and(|v| v == "0"));
    }

    /// Everything but the tile instructions (padding, packing, addressing, copying back) on
    /// every CPU: [`block`]'s loads and `tdpbf16ps` emulated as the instruction set manual
    /// defines them, at the same addresses.
    #[test]
    fn the_gemm_around_emulated_tiles_matches_the_reference() {
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
                        *sum += bf(&a[m], 2 * k) * bf(b, 2 * n)
                            + bf(&a[m], 2 * k + 1) * bf(b, 2 * n + 1);
                    }
                }
            }
        }
        unsafe fn emulated(
            x: &[u16],
            kp: usize,
            panel: &[u32],
            steps: usize,
            sums: &mut [f32; MR * NR],
        ) {
            let mut c = [[[0f32; 16]; 16]; 4];
            let (x0, b) = (x.as_ptr() as *const u8, panel.as_ptr() as *const u8);
            for s in 0..steps {
                let (a0, a1, b0, b1) = unsafe {
                    (
                        load(x0.add(2 * s * KT), 2 * kp),
                        load(x0.add(2 * (16 * kp + s * KT)), 2 * kp),
                        load(b.add(4 * s * 512), 64),
                        load(b.add(4 * (s * 512 + 256)), 64),
                    )
                };
                dp(&mut c[0], &a0, &b0);
                dp(&mut c[1], &a0, &b1);
                dp(&mut c[2], &a1, &b0);
                dp(&mut c[3], &a1, &b1);
            }
            for (t, tile) in c.iter().enumerate() {
                for (r, row) in tile.iter().enumerate() {
                    let at = (16 * (t / 2) + r) * NR + 16 * (t % 2);
                    sums[at..at + 16].copy_from_slice(row);
                }
            }
        }
        check_kernel(emulated).unwrap();
    }

    /// The packing puts each input pair where a weight tile row wants it.
    #[test]
    fn packing_puts_pairs_in_tile_order() {
        let (k, nf): (usize, usize) = (70, 20);
        let row = |j: usize, out: &mut [u16]| {
            for (i, o) in out.iter_mut().enumerate() {
                *o = (j * 1000 + i) as u16;
            }
        };
        let steps = k.div_ceil(KT);
        let mut panel = vec![0u32; steps * 512];
        pack_panel(&row, 0, nf, &mut panel, &mut vec![0u16; k]);
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
                    (f * 1000 + i) as u32
                } else {
                    0
                };
                assert_eq!(got, want, "feature {f}, input {i}");
            }
        }
    }
}
