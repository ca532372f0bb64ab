//! Dot products in f32 of f32 activations with f32, BF16 or F16 weights, scaled rows added
//! to f32 sums (`y += a w`), and BF16 widening:
//! AVX2 and FMA where the CPU has them, portable loops otherwise. Each sums in a fixed order
//! that does not depend on anything but the operands' lengths.

/// How far ahead (in weights) the grouped BF16 kernel asks for each row's next cache lines.
#[cfg(target_arch = "x86_64")]
const PREFETCH: usize = 512;

/// BF16 values widened to f32 (exact: the 16 bits become the high half), with AVX2 where the
/// CPU has it.
pub fn widen_bf16(src: &[half::bf16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::avx2() {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { widen_bf16_avx2(src, dst) };
        }
    }
    widen_bf16_portable(src, dst)
}

/// [`widen_bf16_portable`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_bf16_avx2(src: &[half::bf16], dst: &mut [f32]) {
    widen_bf16_portable(src, dst)
}

#[inline(always)]
fn widen_bf16_portable(src: &[half::bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits(u32::from(s.to_bits()) << 16);
    }
}

/// `a + b` for BF16 values, each sum computed in f32 and rounded to nearest even: with
/// `vcvtneps2bf16` on CPUs with AVX512-BF16 (what candle's own BF16 add runs there, one
/// feature check per 8 values), with `half`'s rounding elsewhere (what candle runs there).
/// Takes as many values as the shortest of the three slices.
pub fn add_bf16(a: &[half::bf16], b: &[half::bf16], out: &mut [half::bf16]) {
    let n = a.len().min(b.len()).min(out.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::avx512_bf16() && std::arch::is_x86_feature_detected!("avx512vl") {
            done = n / 16 * 16;
            // SAFETY: the CPU has AVX-512 F, VL and BF16 (checked just above); the first
            // `done` values of each slice exist.
            unsafe { add_bf16_avx512(&a[..done], &b[..done], &mut out[..done]) };
        }
    }
    for ((o, x), y) in out[done..n].iter_mut().zip(&a[done..n]).zip(&b[done..n]) {
        *o = half::bf16::from_f32(x.to_f32() + y.to_f32());
    }
}

/// [`add_bf16`] on 16 values at a time.
///
/// # Safety
/// The CPU has AVX-512 F, VL and BF16; the three slices hold the same multiple of 16 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
unsafe fn add_bf16_avx512(a: &[half::bf16], b: &[half::bf16], out: &mut [half::bf16]) {
    use std::arch::x86_64::*;
    let widen = |p: *const half::bf16| {
        // SAFETY: 16 values (32 bytes) from p, within the slice (see below).
        let bits = unsafe { _mm256_loadu_si256(p.cast()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
    };
    for i in (0..out.len()).step_by(16) {
        // SAFETY: i + 16 <= len for each slice (a multiple of 16 values); a vector of 16 BF16
        // values has the bits of a 256-bit integer vector.
        unsafe {
            let sum = _mm512_add_ps(widen(a.as_ptr().add(i)), widen(b.as_ptr().add(i)));
            let rounded = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(sum));
            _mm256_storeu_si256(out.as_mut_ptr().add(i).cast(), rounded);
        }
    }
}

/// Dot product of f32 values with F16 values in f32: the weights are widened a chunk at a time
/// (half's converter uses F16C where the CPU has it) and multiplied by [`dot_f32`].
pub fn dot_f16(x: &[f32], w: &[half::f16]) -> f32 {
    use half::slice::HalfFloatSliceExt;
    let mut buffer = [0f32; 256];
    let mut sum = 0f32;
    for (xs, ws) in x.chunks(256).zip(w.chunks(256)) {
        let wide = &mut buffer[..ws.len()];
        ws.convert_to_f32_slice(wide);
        sum += dot_f32(xs, wide);
    }
    sum
}

/// A dot product of f32 values with weights widened to f32 by `$widen`, accumulated in f32 in
/// 32 running sums (four 8-lane vectors, so that consecutive additions do not wait on each
/// other), each step `$step(x, w, sum)`.
macro_rules! dot_kernel {
    ($name:ident, $weight:ty, $widen:expr, $step:expr) => {
        #[inline(always)]
        fn $name(x: &[f32], w: &[$weight]) -> f32 {
            const LANES: usize = 32;
            let mut acc = [0f32; LANES];
            let (xc, wc) = (x.chunks_exact(LANES), w.chunks_exact(LANES));
            let (x_rest, w_rest) = (xc.remainder(), wc.remainder());
            for (xs, ws) in xc.zip(wc) {
                for k in 0..LANES {
                    acc[k] = $step(xs[k], $widen(ws[k]), acc[k]);
                }
            }
            let mut rest = 0f32;
            for (a, b) in x_rest.iter().zip(w_rest) {
                rest = $step(*a, $widen(*b), rest);
            }
            acc.iter().sum::<f32>() + rest
        }
    };
}

/// BF16 -> f32 is exact: the 16 bits become the high half of the f32.
#[inline(always)]
pub fn bf16_to_f32(v: half::bf16) -> f32 {
    f32::from_bits(u32::from(v.to_bits()) << 16)
}

/// The identity, the widening of an f32 weight (for code generic over weight types).
#[inline(always)]
pub fn f32_id(v: f32) -> f32 {
    v
}

#[inline(always)]
fn mul_add_fused(a: f32, b: f32, c: f32) -> f32 {
    a.mul_add(b, c)
}

#[inline(always)]
fn mul_add_plain(a: f32, b: f32, c: f32) -> f32 {
    a * b + c
}

/// `y += a * w` value by value, each weight widened to f32 by `$widen` and each step
/// `$step(a, w, y)`: every output on its own, so the order is the same on every path.
macro_rules! add_scaled_kernel {
    ($name:ident, $weight:ty, $widen:expr, $step:expr) => {
        #[inline(always)]
        fn $name(y: &mut [f32], a: f32, w: &[$weight]) {
            for (y, w) in y.iter_mut().zip(w) {
                *y = $step(a, $widen(*w), *y);
            }
        }
    };
}

add_scaled_kernel!(add_scaled_f32_fused, f32, f32_id, mul_add_fused);
add_scaled_kernel!(add_scaled_f32_plain, f32, f32_id, mul_add_plain);
add_scaled_kernel!(
    add_scaled_bf16_fused,
    half::bf16,
    bf16_to_f32,
    mul_add_fused
);
add_scaled_kernel!(
    add_scaled_bf16_plain,
    half::bf16,
    bf16_to_f32,
    mul_add_plain
);

/// [`add_scaled_f32_fused`] compiled for AVX2 and FMA (the compiler vectorizes it).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn add_scaled_f32_avx2(y: &mut [f32], a: f32, w: &[f32]) {
    add_scaled_f32_fused(y, a, w)
}

/// [`add_scaled_bf16_fused`] compiled for AVX2 and FMA (the compiler vectorizes it).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn add_scaled_bf16_avx2(y: &mut [f32], a: f32, w: &[half::bf16]) {
    add_scaled_bf16_fused(y, a, w)
}

/// `y += a * w` in f32 (a row of weights scaled and accumulated, as a vector-matrix product
/// sums a matrix's rows): one fused multiply-add per value with AVX2 and FMA, a multiply and an
/// add otherwise. Over the shorter of the two slices.
pub fn add_scaled_f32(y: &mut [f32], a: f32, w: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { add_scaled_f32_avx2(y, a, w) };
        }
    }
    add_scaled_f32_plain(y, a, w)
}

/// [`add_scaled_f32`] with BF16 weights, widened exactly.
pub fn add_scaled_bf16(y: &mut [f32], a: f32, w: &[half::bf16]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { add_scaled_bf16_avx2(y, a, w) };
        }
    }
    add_scaled_bf16_plain(y, a, w)
}

dot_kernel!(dot_f32_fused, f32, f32_id, mul_add_fused);
dot_kernel!(dot_f32_plain, f32, f32_id, mul_add_plain);
dot_kernel!(dot_bf16_plain, half::bf16, bf16_to_f32, mul_add_plain);

/// [`dot_f32_fused`] compiled for AVX2 and FMA.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_avx2(x: &[f32], w: &[f32]) -> f32 {
    dot_f32_fused(x, w)
}

/// [`dot_bf16_fused`] written with AVX2 and FMA intrinsics: 32 weights per step (two 256-bit
/// loads), widened by zero-extension and a 16-bit shift, four independent accumulators. The
/// compiler's vectorization of the portable loop reached ~10 GB/s of weights per core; this
/// reaches the memory bandwidth.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_bf16_avx2(x: &[f32], w: &[half::bf16]) -> f32 {
    use std::arch::x86_64::*;

    let n = x.len().min(w.len());
    let full = n / 32 * 32;
    let (xp, wp) = (x.as_ptr(), w.as_ptr() as *const u16);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < full {
        // SAFETY: i + 32 <= n, so both 32-element reads are in bounds; unaligned loads.
        let (lo, hi) = unsafe {
            (
                _mm256_loadu_si256(wp.add(i) as *const __m256i),
                _mm256_loadu_si256(wp.add(i + 16) as *const __m256i),
            )
        };
        let halves = [
            _mm256_castsi256_si128(lo),
            _mm256_extracti128_si256::<1>(lo),
            _mm256_castsi256_si128(hi),
            _mm256_extracti128_si256::<1>(hi),
        ];
        for (k, half) in halves.into_iter().enumerate() {
            let wide = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(half)));
            // SAFETY: i + 8 * k + 8 <= n.
            let xs = unsafe { _mm256_loadu_ps(xp.add(i + 8 * k)) };
            acc[k] = _mm256_fmadd_ps(xs, wide, acc[k]);
        }
        i += 32;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
    let mut total: f32 = lanes.iter().sum();
    for j in full..n {
        total = x[j].mul_add(bf16_to_f32(w[j]), total);
    }
    total
}

/// Four dot products of `x` with four BF16 weight rows at once, with AVX2 and FMA: each step
/// loads 8 values of `x` once and 8 weights from each row, so four memory streams run side by
/// side (one row at a time left a core at ~8 GB/s, latency-bound). Summation per output: 8
/// lanes, then the lanes, then the tail, the same whatever the other rows are.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_bf16_avx2<const G: usize>(x: &[f32], w: [&[half::bf16]; G]) -> [f32; G] {
    use std::arch::x86_64::*;

    let n = w.iter().fold(x.len(), |n, row| n.min(row.len()));
    let full = n / 8 * 8;
    let xp = x.as_ptr();
    let wp = w.map(|row| row.as_ptr() as *const u16);
    let mut acc = [_mm256_setzero_ps(); G];
    let mut i = 0;
    while i < full {
        // SAFETY: i + 8 <= n for `x` and every row; unaligned loads.
        let xs = unsafe { _mm256_loadu_ps(xp.add(i)) };
        for k in 0..G {
            // SAFETY: a prefetch is a hint; the address may lie past the row's end.
            _mm_prefetch::<_MM_HINT_T0>(wp[k].wrapping_add(i + PREFETCH) as *const i8);
            // SAFETY: as above, 8 u16 from row k.
            let raw = unsafe { _mm_loadu_si128(wp[k].add(i) as *const __m128i) };
            let wide = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)));
            acc[k] = _mm256_fmadd_ps(xs, wide, acc[k]);
        }
        i += 8;
    }
    let mut out = [0f32; G];
    for k in 0..G {
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds 8 f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[k]) };
        let mut total: f32 = lanes.iter().sum();
        for j in full..n {
            total = x[j].mul_add(bf16_to_f32(w[k][j]), total);
        }
        out[k] = total;
    }
    out
}

/// [`dot4_bf16_avx2`] for `R` rows of `x` at once: each step widens each weight row's 8 values
/// once for all the rows (a prompt's few rows for one expert of a mixture took 4 times the
/// weight's read time when each row widened them again). Each output is summed exactly as
/// [`dot4_bf16_avx2`] sums it alone (8 lanes, then the lanes, then the tail). AVX-512 VL gives
/// the 32 registers that `R x G` sums need.
///
/// # Safety
/// The CPU must have AVX2, FMA, AVX-512 F and VL.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
unsafe fn dot_rows_bf16_avx512vl<const G: usize, const R: usize>(
    x: [&[f32]; R],
    w: [&[half::bf16]; G],
) -> [[f32; G]; R] {
    use std::arch::x86_64::*;

    let n = w
        .iter()
        .map(|row| row.len())
        .chain(x.iter().map(|row| row.len()))
        .min()
        .unwrap_or(0);
    let full = n / 8 * 8;
    let xp = x.map(|row| row.as_ptr());
    let wp = w.map(|row| row.as_ptr() as *const u16);
    let mut acc = [[_mm256_setzero_ps(); G]; R];
    let mut i = 0;
    while i < full {
        // SAFETY: i + 8 <= n for every row of `x`; unaligned loads.
        let xs: [__m256; R] = std::array::from_fn(|r| unsafe { _mm256_loadu_ps(xp[r].add(i)) });
        for k in 0..G {
            // SAFETY: a prefetch is a hint; the address may lie past the row's end.
            _mm_prefetch::<_MM_HINT_T0>(wp[k].wrapping_add(i + PREFETCH) as *const i8);
            // SAFETY: i + 8 <= n: 8 u16 from row k.
            let raw = unsafe { _mm_loadu_si128(wp[k].add(i) as *const __m128i) };
            let wide = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)));
            for (sums, xs) in acc.iter_mut().zip(&xs) {
                sums[k] = _mm256_fmadd_ps(*xs, wide, sums[k]);
            }
        }
        i += 8;
    }
    let mut out = [[0f32; G]; R];
    for r in 0..R {
        for k in 0..G {
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` holds 8 f32.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][k]) };
            let mut total: f32 = lanes.iter().sum();
            for j in full..n {
                total = x[r][j].mul_add(bf16_to_f32(w[k][j]), total);
            }
            out[r][k] = total;
        }
    }
    out
}

/// [`dot_bf16_rows`] for `R` rows of `x` of one length: `out[r]` is bit for bit
/// `dot_bf16_rows(x[r], w)`, each weight value widened once for all rows where the CPU has
/// AVX-512 VL (else one call per row). Rows of different lengths are all cut to the shortest.
pub fn dot_bf16_rows_of<const G: usize, const R: usize>(
    x: [&[f32]; R],
    w: [&[half::bf16]; G],
) -> [[f32; G]; R] {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::avx2_fma() && crate::cpu::avx512_bw_vl() {
            // SAFETY: the CPU supports AVX2, FMA, AVX-512 F, BW and VL, checked just above.
            return unsafe { dot_rows_bf16_avx512vl(x, w) };
        }
    }
    x.map(|row| dot_bf16_rows(row, w))
}

/// Dot product of f32 values in f32, vectorized with AVX2 and FMA where the CPU has them (the
/// default x86-64 target assumes only SSE2). Over the shorter of the two slices.
pub fn dot_f32(x: &[f32], w: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { dot_f32_avx2(x, w) };
        }
    }
    dot_f32_plain(x, w)
}

/// Dot product of f32 values with BF16 values in f32, as [`dot_f32`].
pub fn dot_bf16(x: &[f32], w: &[half::bf16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { dot_bf16_avx2(x, w) };
        }
    }
    dot_bf16_plain(x, w)
}

/// The dot products of `x` with `G` BF16 weight rows: with AVX2 and FMA all `G` rows stream
/// side by side, each summed in 8 lanes, then the lanes, then the tail, whatever the other
/// rows are; without them, one [`dot_bf16`] each.
pub fn dot_bf16_rows<const G: usize>(x: &[f32], w: [&[half::bf16]; G]) -> [f32; G] {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { dot4_bf16_avx2(x, w) };
        }
    }
    w.map(|row| dot_bf16(x, row))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BF16 sums equal f32 sums rounded to nearest even (ties included), on every path and
    /// tail length.
    #[test]
    fn bf16_sums_round_to_nearest_even() {
        let values = crate::testing::Values(3).take(2 * 1000);
        let (a, b): (Vec<half::bf16>, Vec<half::bf16>) = values
            .chunks(2)
            .map(|p| {
                (
                    half::bf16::from_f32(p[0]),
                    half::bf16::from_f32(p[1] * 0.01),
                )
            })
            .unzip();
        for n in [0, 5, 16, 999, 1000] {
            let mut out = vec![half::bf16::ZERO; n];
            add_bf16(&a[..n], &b[..n], &mut out);
            for i in 0..n {
                let want = half::bf16::from_f32(a[i].to_f32() + b[i].to_f32());
                assert_eq!(out[i].to_bits(), want.to_bits(), "{n} values, value {i}");
            }
        }
    }
    use crate::testing::Values;

    fn exact(x: &[f32], w: impl Iterator<Item = f32>) -> f64 {
        x.iter()
            .zip(w)
            .map(|(a, b)| f64::from(*a) * f64::from(b))
            .sum()
    }

    /// Every path this CPU has (and the portable ones) against an f64 sum, on lengths that
    /// are and are not whole vectors.
    #[test]
    fn dots_equal_exact_sums_on_every_path() {
        for n in [0, 1, 7, 31, 32, 33, 300, 1027] {
            let x = Values(n as u64).take(n);
            let wf = Values(n as u64 + 1).take(n);
            let wb: Vec<half::bf16> = wf.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let wh: Vec<half::f16> = wf.iter().map(|&v| half::f16::from_f32(v)).collect();
            let tol = 1e-4 * (1.0 + n as f64);
            let e32 = exact(&x, wf.iter().copied());
            let eb = exact(&x, wb.iter().map(|v| v.to_f32()));
            let eh = exact(&x, wh.iter().map(|v| v.to_f32()));
            for (name, got, want) in [
                ("f32", dot_f32(&x, &wf), e32),
                ("f32 portable", dot_f32_plain(&x, &wf), e32),
                ("bf16", dot_bf16(&x, &wb), eb),
                ("bf16 portable", dot_bf16_plain(&x, &wb), eb),
                ("f16", dot_f16(&x, &wh), eh),
            ] {
                assert!(
                    (f64::from(got) - want).abs() < tol,
                    "{name} n={n}: {got} vs {want}"
                );
            }
            // `y + a w` on every path against the same sums in f64, per value.
            let y0 = Values(n as u64 + 2).take(n);
            let a = 0.37f32;
            let (mut yf, mut yb) = (y0.clone(), y0.clone());
            add_scaled_f32(&mut yf, a, &wf);
            add_scaled_bf16(&mut yb, a, &wb);
            let (mut pf, mut pb) = (y0.clone(), y0.clone());
            add_scaled_f32_plain(&mut pf, a, &wf);
            add_scaled_bf16_plain(&mut pb, a, &wb);
            for i in 0..n {
                let y = f64::from(y0[i]);
                let want_f = y + f64::from(a) * f64::from(wf[i]);
                let want_b = y + f64::from(a) * f64::from(wb[i].to_f32());
                for (name, got, want) in [
                    ("f32", yf[i], want_f),
                    ("f32 portable", pf[i], want_f),
                    ("bf16", yb[i], want_b),
                    ("bf16 portable", pb[i], want_b),
                ] {
                    let bound = 1e-6 * (1.0 + want.abs());
                    assert!((f64::from(got) - want).abs() <= bound, "{name} n={n} i={i}");
                }
            }
            let rows = dot_bf16_rows(&x, [&wb[..], &wb[..], &wb[..]]);
            for v in rows {
                assert!((f64::from(v) - eb).abs() < tol, "rows n={n}");
            }
            let mut wide = vec![0f32; n];
            widen_bf16(&wb, &mut wide);
            let mut portable = vec![0f32; n];
            widen_bf16_portable(&wb, &mut portable);
            assert!(wide.iter().zip(&wb).all(|(a, b)| *a == b.to_f32()));
            assert_eq!(wide, portable);
        }
    }
}
