//! Vectorized `exp` and what is built on it: SiLU, tanh-GELU and softmax over f32 slices (the
//! vision towers' and prefill's activations and attention weights; libm's scalar `expf` per
//! element was a large share of a vision tower's time); and LayerNorm rows.
//!
//! `exp` is Cephes' single-precision algorithm: `x = n ln 2 + r` with `n` rounded to nearest,
//! `r` reduced in two steps, a degree-6 polynomial for `e^r` and an exact scaling by `2^n`;
//! within 2 ulp of the exact value over the normal range. Results below `2^-125` (inputs
//! under about -86.64) are 0, inputs above `ln(f32::MAX)` give infinity, NaN stays NaN.
//!
//! Every path (AVX-512, AVX2 with FMA, portable) performs the same IEEE operations in the same
//! order, fused multiply-adds included, so all give the same bits: a result does not depend
//! on the CPU. Softmax sums in 16 fixed lanes for the same reason.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` in two parts: the first exact in few bits, so `n * LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' `expf` polynomial, highest degree first.
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];
/// Below: 0 (so that `n - 1 >= -126` below and `2^(n-1)` is a normal number).
const LOW: f32 = -86.643_4;
/// Above: infinity.
const HIGH: f32 = 88.722_84;
/// `sqrt(2 / pi)`, tanh-GELU's constant.
const GELU_C: f32 = 0.797_884_6;
const GELU_A: f32 = 0.044_715;

/// `e^x` as every path computes it.
#[inline]
fn exp_one(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x < LOW {
        return 0.0;
    }
    if x > HIGH {
        return f32::INFINITY;
    }
    let n = (x * LOG2E).round_ties_even();
    let r = (-n).mul_add(LN2_HI, x);
    let r = (-n).mul_add(LN2_LO, r);
    let mut y = P[0];
    for p in &P[1..] {
        y = y.mul_add(r, *p);
    }
    let y = y.mul_add(r * r, r) + 1.0;
    // 2^(n - 1) then 2: n may be 128 (e^88.7), whose 2^n is not a finite f32.
    let scale = f32::from_bits(((n as i32 - 1 + 127) as u32) << 23);
    y * scale * 2.0
}

/// The element-wise functions.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Exp,
    /// `x / (1 + e^-x)`.
    Silu,
    /// `x / (1 + e^(-2u))` with `u = sqrt(2/pi) (x + 0.044715 x^3)`, which is
    /// `0.5 x (1 + tanh u)`.
    GeluTanh,
}

#[inline]
fn op_one(op: Op, x: f32) -> f32 {
    match op {
        Op::Exp => exp_one(x),
        Op::Silu => x / (1.0 + exp_one(-x)),
        Op::GeluTanh => {
            let u = GELU_C * x * GELU_A.mul_add(x * x, 1.0);
            x / (1.0 + exp_one(-2.0 * u))
        }
    }
}

/// The instructions the functions run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// AVX-512 F: 16 values at a time.
    Avx512,
    /// AVX2 and FMA: 8 values at a time.
    Avx2,
    /// Scalar code, the same operations.
    Portable,
}

impl Path {
    /// The widest path this CPU has.
    pub fn best() -> Path {
        if Path::Avx512.available() {
            Path::Avx512
        } else if Path::Avx2.available() {
            Path::Avx2
        } else {
            Path::Portable
        }
    }

    /// Whether this CPU runs this path.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            Path::Avx512 => false,
            Path::Avx2 => crate::cpu::avx2_fma(),
            Path::Portable => true,
        }
    }
}

/// `e^x` for every value, in place.
pub fn exp(xs: &mut [f32]) {
    map(Path::best(), Op::Exp, xs);
}

/// SiLU (`x / (1 + e^-x)`, as candle and PyTorch define it) for every value, in place.
pub fn silu(xs: &mut [f32]) {
    map(Path::best(), Op::Silu, xs);
}

/// GELU with the tanh approximation (PyTorch's `gelu(approximate="tanh")`, candle's `gelu`)
/// for every value, in place.
pub fn gelu_tanh(xs: &mut [f32]) {
    map(Path::best(), Op::GeluTanh, xs);
}

/// An activation a product can apply to its BF16 outputs as it stores them
/// ([`crate::bf16_gemm::gemm_rounded`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Activation {
    /// [`gelu_tanh`].
    GeluTanh,
}

/// `activation` of BF16 values (bits), in place: each value widened to f32, the f32 function
/// ([`gelu_tanh`]), the result rounded to BF16 as [`round_to_bf16`] rounds: bit for bit a BF16
/// tensor widened, mapped and rounded back. AVX-512 (F, BW, VL) where the CPU has it, whole
/// vectors as [`map`]'s vector path and the rest as its scalar tail.
pub fn activate_bf16(activation: Activation, bits: &mut [u16]) {
    let op = match activation {
        Activation::GeluTanh => Op::GeluTanh,
    };
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::avx512_bw_vl() {
        // SAFETY: AVX-512 F, BW and VL are present.
        done = unsafe { activate_bf16_avx512(op, bits) };
    }
    let mut wide = [0f32; 64];
    for chunk in bits[done..].chunks_mut(wide.len()) {
        let wide = &mut wide[..chunk.len()];
        for (w, b) in wide.iter_mut().zip(chunk.iter()) {
            *w = half::bf16::from_bits(*b).to_f32();
        }
        map(Path::best(), op, wide);
        round_to_bf16(wide, chunk);
    }
}

/// [`activate_bf16`]'s whole vectors; returns how many values it did.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn activate_bf16_avx512(op: Op, bits: &mut [u16]) -> usize {
    let whole = bits.len() / 16 * 16;
    for j in (0..whole).step_by(16) {
        // SAFETY: values j..j + 16 < whole.
        let x = unsafe { load_bf16(u16::MAX, bits.as_ptr().add(j)) };
        let y = op_avx512(op, x);
        // SAFETY: as the load.
        unsafe { _mm256_storeu_si256(bits.as_mut_ptr().add(j).cast(), bf16_bits(y)) };
    }
    whole
}

/// Softmax of each row of `width` values (the last row may not be whole: it is a row of its
/// own), in place: the row's maximum subtracted, exponentials divided by their sum. A row
/// whose values are all -inf gives NaN, as the definition does.
pub fn softmax(xs: &mut [f32], width: usize) {
    softmax_on(Path::best(), xs, width);
}

/// Lanes `0..count` of a 16-lane mask (all 16 from `count >= 16`).
pub(crate) fn lanes(count: usize) -> u16 {
    if count >= 16 {
        u16::MAX
    } else {
        (1u16 << count) - 1
    }
}

/// 16 BF16 values (bits) from `at`, the lanes outside `mask` zero (and not read), widened to
/// f32.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; the lanes in `mask` are readable.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn load_bf16(mask: u16, at: *const u16) -> __m512 {
    // SAFETY: the caller's.
    let bits = unsafe { _mm256_maskz_loadu_epi16(mask, at.cast()) };
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
}

/// Each lane rounded to BF16 ([`crate::attention`]'s rounding, `half::bf16::from_f32`'s), kept
/// as the f32 it is.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn round_bf16(v: __m512) -> __m512 {
    let high = _mm512_set1_epi32(0xffff_0000_u32 as i32);
    _mm512_castsi512_ps(_mm512_and_si512(
        crate::attention::bf16_in_high_half(v),
        high,
    ))
}

/// Each lane rounded to BF16, as 16 bits.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn bf16_bits(v: __m512) -> __m256i {
    _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(
        crate::attention::bf16_in_high_half(v),
    ))
}

/// The rotary embedding of one head's BF16 values (bits) as a BF16 model computes `x cos +
/// rotate_half(x) sin`, `rotate_half([x1, x2]) = [-x2, x1]`, each operation rounded to BF16
/// (to nearest even, as `half::bf16::from_f32`): `out[j] = bf16(bf16(x[j] cos[j]) +
/// bf16(r[j] sin[j]))`. `None` unless the four slices have one even length.
pub fn rotate_half_bf16(x: &[u16], cos: &[u16], sin: &[u16], out: &mut [u16]) -> Option<()> {
    let d = x.len();
    if !d.is_multiple_of(2) || [cos.len(), sin.len(), out.len()] != [d, d, d] {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::avx512_bw_vl() {
        // SAFETY: AVX-512 F, BW and VL are present; the lengths were checked.
        unsafe { rotate_half_bf16_avx512(x, cos, sin, out) };
        return Some(());
    }
    rotate_half_bf16_scalar(x, cos, sin, out);
    Some(())
}

/// [`rotate_half_bf16`] one value at a time, with `half`'s arithmetic.
fn rotate_half_bf16_scalar(x: &[u16], cos: &[u16], sin: &[u16], out: &mut [u16]) {
    use half::bf16;
    let half = x.len() / 2;
    let b = |v: u16| bf16::from_bits(v);
    for j in 0..x.len() {
        let rotated = if j < half {
            -b(x[j + half])
        } else {
            b(x[j - half])
        };
        out[j] = (b(x[j]) * b(cos[j]) + rotated * b(sin[j])).to_bits();
    }
}

/// [`rotate_half_bf16`] 16 values of each half at a time.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; the four slices have one even length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn rotate_half_bf16_avx512(x: &[u16], cos: &[u16], sin: &[u16], out: &mut [u16]) {
    let half = x.len() / 2;
    for j in (0..half).step_by(16) {
        let m = lanes(half - j);
        // SAFETY: lanes j..j + 16 of each half, masked to the half's end.
        let load = |s: &[u16], at: usize| unsafe { load_bf16(m, s.as_ptr().add(at)) };
        let (x1, x2) = (load(x, j), load(x, half + j));
        let (c1, c2, s1, s2) = (
            load(cos, j),
            load(cos, half + j),
            load(sin, j),
            load(sin, half + j),
        );
        let neg_x2 = _mm512_castsi512_ps(_mm512_xor_si512(
            _mm512_castps_si512(x2),
            _mm512_set1_epi32(i32::MIN),
        ));
        let product = |a, b| round_bf16(_mm512_mul_ps(a, b));
        let o1 = _mm512_add_ps(product(x1, c1), product(neg_x2, s1));
        let o2 = _mm512_add_ps(product(x2, c2), product(x1, s2));
        for (o, at) in [(o1, j), (o2, half + j)] {
            // SAFETY: as the loads.
            unsafe { _mm256_mask_storeu_epi16(out.as_mut_ptr().add(at).cast(), m, bf16_bits(o)) };
        }
    }
}

/// One head of BF16 values (bits) turned as a vision tower turns it in f32, rounded once to
/// BF16 (to nearest even, as `half::bf16::from_f32`): `x cos + rotate_half(x) sin` with
/// `cos`/`sin` one angle per value (the Qwen2.5-VL ViT), or, `pairs`, the interleaved pairs
/// `(x[2i], x[2i + 1])` as complex numbers times `cos[i] + i sin[i]` (MoonViT). Each product
/// and sum is one f32 operation, in the order written, so the bits are the f32 ops'.
/// `None` unless `x` and `out` have one even length and the angles the one the layout needs.
pub fn turn_in_f32(
    x: &[u16],
    cos: &[f32],
    sin: &[f32],
    pairs: bool,
    out: &mut [u16],
) -> Option<()> {
    let d = x.len();
    let angles = if pairs { d / 2 } else { d };
    if !d.is_multiple_of(2) || out.len() != d || cos.len() != angles || sin.len() != angles {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::avx512_bw_vl() {
        // SAFETY: AVX-512 F, BW and VL are present; the lengths were checked.
        unsafe {
            if pairs {
                turn_pairs_avx512(x, cos, sin, out)
            } else {
                turn_halves_avx512(x, cos, sin, out)
            }
        };
        return Some(());
    }
    turn_in_f32_scalar(x, cos, sin, pairs, out);
    Some(())
}

/// [`turn_in_f32`] one value at a time.
fn turn_in_f32_scalar(x: &[u16], cos: &[f32], sin: &[f32], pairs: bool, out: &mut [u16]) {
    let f = |v: u16| half::bf16::from_bits(v).to_f32();
    let round = |v: f32| half::bf16::from_f32(v).to_bits();
    if pairs {
        for (i, (pair, o)) in x.chunks_exact(2).zip(out.chunks_exact_mut(2)).enumerate() {
            let (re, im) = (f(pair[0]), f(pair[1]));
            o[0] = round(re * cos[i] - im * sin[i]);
            o[1] = round(re * sin[i] + im * cos[i]);
        }
    } else {
        let half = x.len() / 2;
        for (j, o) in out.iter_mut().enumerate() {
            let turned = if j < half {
                -f(x[j + half])
            } else {
                f(x[j - half])
            };
            *o = round(f(x[j]) * cos[j] + turned * sin[j]);
        }
    }
}

/// [`turn_in_f32`]'s halves, 16 values of each half at a time (as [`rotate_half_bf16_avx512`]).
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; `x`, `cos`, `sin` and `out` have one even length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn turn_halves_avx512(x: &[u16], cos: &[f32], sin: &[f32], out: &mut [u16]) {
    let half = x.len() / 2;
    for j in (0..half).step_by(16) {
        let m = lanes(half - j);
        // SAFETY: lanes j..j + 16 of each half, masked to the half's end.
        let (x1, x2, c1, c2, s1, s2) = unsafe {
            let angle = |s: &[f32], at: usize| _mm512_maskz_loadu_ps(m, s.as_ptr().add(at));
            (
                load_bf16(m, x.as_ptr().add(j)),
                load_bf16(m, x.as_ptr().add(half + j)),
                angle(cos, j),
                angle(cos, half + j),
                angle(sin, j),
                angle(sin, half + j),
            )
        };
        // x1 c1 + (-x2) s1 is x1 c1 - x2 s1 exactly (negation is exact).
        let o1 = _mm512_sub_ps(_mm512_mul_ps(x1, c1), _mm512_mul_ps(x2, s1));
        let o2 = _mm512_add_ps(_mm512_mul_ps(x2, c2), _mm512_mul_ps(x1, s2));
        for (o, at) in [(o1, j), (o2, half + j)] {
            // SAFETY: as the loads.
            unsafe { _mm256_mask_storeu_epi16(out.as_mut_ptr().add(at).cast(), m, bf16_bits(o)) };
        }
    }
}

/// [`turn_in_f32`]'s pairs, 8 pairs at a time: lane `l` holds `p = x[l]`, its partner
/// `q = x[l ^ 1]` and pair `l / 2`'s angle, and computes `p cos - q sin` (even lanes: `re cos -
/// im sin`) or `p cos + q sin` (odd lanes: `im cos + re sin`, the same sum as `re sin + im
/// cos`: addition commutes exactly).
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; `x` and `out` have one even length, `cos` and `sin` half
/// of it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn turn_pairs_avx512(x: &[u16], cos: &[f32], sin: &[f32], out: &mut [u16]) {
    let spread = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    // The sign bit on even lanes: p cos + (-(q sin)) is p cos - q sin exactly.
    let even_sign = _mm512_maskz_mov_epi32(0x5555, _mm512_set1_epi32(i32::MIN));
    for j in (0..x.len()).step_by(16) {
        let m = lanes(x.len() - j);
        // The angles of the pairs in these lanes.
        let am = lanes((x.len() - j) / 2) as u8;
        // SAFETY: values j..j + 16 and angles j / 2..j / 2 + 8, masked to the ends.
        let (p, c, s) = unsafe {
            let angle = |a: &[f32]| {
                let eight = _mm256_maskz_loadu_ps(am, a.as_ptr().add(j / 2));
                _mm512_permutexvar_ps(spread, _mm512_castps256_ps512(eight))
            };
            (load_bf16(m, x.as_ptr().add(j)), angle(cos), angle(sin))
        };
        let q = _mm512_permute_ps::<0b10_11_00_01>(p);
        let qs = _mm512_castsi512_ps(_mm512_xor_si512(
            _mm512_castps_si512(_mm512_mul_ps(q, s)),
            even_sign,
        ));
        let o = _mm512_add_ps(_mm512_mul_ps(p, c), qs);
        // SAFETY: as the loads.
        unsafe { _mm256_mask_storeu_epi16(out.as_mut_ptr().add(j).cast(), m, bf16_bits(o)) };
    }
}

/// A gated MLP's activation on BF16 values (bits) as a BF16 model computes `silu(gate) * up`:
/// [`silu`]'s value rounded to BF16, times `up`, rounded to BF16 (to nearest even, as
/// `half::bf16::from_f32`), in one pass, every value of `out` written (it may start
/// uninitialized: a fresh output needs no zeroing pass). `None` where the CPU lacks AVX-512
/// F, BW and VL (callers keep the composed ops; nothing is written) or the three slices
/// differ in length.
pub fn silu_mul_bf16(
    gate: &[u16],
    up: &[u16],
    out: &mut [std::mem::MaybeUninit<u16>],
) -> Option<()> {
    if up.len() != gate.len() || out.len() != gate.len() || !crate::cpu::avx512_bw_vl() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: AVX-512 F, BW and VL are present; the lengths were checked.
        unsafe { silu_mul_bf16_avx512(gate, up, out) };
        Some(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// [`silu_mul_bf16`]: whole vectors as [`map`]'s AVX-512 SiLU computes them, the rest as its
/// scalar tail does.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; the slices have one length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn silu_mul_bf16_avx512(gate: &[u16], up: &[u16], out: &mut [std::mem::MaybeUninit<u16>]) {
    use half::bf16;
    let whole = gate.len() / 16 * 16;
    for j in (0..whole).step_by(16) {
        // SAFETY: values j..j + 16 < whole of each slice.
        let load = |s: &[u16]| unsafe { load_bf16(u16::MAX, s.as_ptr().add(j)) };
        let silu = op_avx512(Op::Silu, load(gate));
        let y = _mm512_mul_ps(round_bf16(silu), load(up));
        // SAFETY: as the loads (a store initializes the 16 values).
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().add(j).cast(), bf16_bits(y)) };
    }
    for j in whole..gate.len() {
        let silu = bf16::from_f32(op_one(Op::Silu, bf16::from_bits(gate[j]).to_f32()));
        out[j].write((silu * bf16::from_bits(up[j])).to_bits());
    }
}

/// `values` rounded to BF16 bits (to nearest even, NaN kept quiet: `half::bf16::from_f32`),
/// 16 at a time where the CPU has AVX-512 F.
pub fn round_to_bf16(values: &[f32], out: &mut [u16]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F is present; the whole vectors of the shorter slice.
        done = unsafe { round_to_bf16_avx512(values, out) };
    }
    for (o, v) in out[done..].iter_mut().zip(&values[done..]) {
        *o = half::bf16::from_f32(*v).to_bits();
    }
}

/// `values[j] + bias[j]` (f32, one addition; `values[j]` alone without a bias) rounded to BF16
/// bits as [`round_to_bf16`] rounds. Panics when the slices differ in length.
pub fn round_to_bf16_plus(values: &[f32], bias: Option<&[f32]>, out: &mut [u16]) {
    assert_eq!(values.len(), out.len(), "as many outputs as values");
    let Some(bias) = bias else {
        return round_to_bf16(values, out);
    };
    assert_eq!(values.len(), bias.len(), "a bias for each value");
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F is present; the whole vectors of the three slices (one length).
        done = unsafe { round_plus_avx512(values, bias, out) };
    }
    for ((o, v), b) in out[done..]
        .iter_mut()
        .zip(&values[done..])
        .zip(&bias[done..])
    {
        *o = half::bf16::from_f32(v + b).to_bits();
    }
}

/// [`round_to_bf16_plus`]'s whole vectors; returns how many values it rounded.
///
/// # Safety
/// The CPU has AVX-512 F; the three slices have one length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round_plus_avx512(values: &[f32], bias: &[f32], out: &mut [u16]) -> usize {
    let whole = values.len() / 16 * 16;
    for j in (0..whole).step_by(16) {
        // SAFETY: values j..j + 16 < whole of the three slices.
        unsafe {
            let x = _mm512_add_ps(
                _mm512_loadu_ps(values.as_ptr().add(j)),
                _mm512_loadu_ps(bias.as_ptr().add(j)),
            );
            _mm256_storeu_si256(out.as_mut_ptr().add(j).cast(), bf16_bits(x));
        }
    }
    whole
}

/// [`round_to_bf16`]'s whole vectors; returns how many values it rounded.
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round_to_bf16_avx512(values: &[f32], out: &mut [u16]) -> usize {
    let whole = values.len().min(out.len()) / 16 * 16;
    for j in (0..whole).step_by(16) {
        // SAFETY: values j..j + 16 < whole of both slices.
        unsafe {
            let x = _mm512_loadu_ps(values.as_ptr().add(j));
            _mm256_storeu_si256(out.as_mut_ptr().add(j).cast(), bf16_bits(x));
        }
    }
    whole
}

/// RMSNorm of BF16 rows (bits) as a BF16 model computes it in f32 (transformers'
/// `Qwen2RMSNorm`, candle's f32 `rms_norm`): per row of `weight.len()` values the sum of the
/// squares in f32, in order; `m = sqrt(sum / width + eps)`; each value `x / m` rounded to
/// BF16, times the weight, rounded to BF16 (to nearest even, as `half::bf16::from_f32`).
/// Eight rows' sums run side by side (independent additions, each in its row's order).
/// Every value of `out` is written (it may start uninitialized: a fresh output needs no
/// zeroing pass). `None` where the CPU lacks AVX-512 F, BW and VL (callers keep candle's ops;
/// nothing is written), the weight is empty, or the rows are not whole.
pub fn rms_norm_bf16(
    x: &[u16],
    weight: &[u16],
    eps: f32,
    out: &mut [std::mem::MaybeUninit<u16>],
) -> Option<()> {
    let width = weight.len();
    if width == 0
        || !x.len().is_multiple_of(width)
        || out.len() != x.len()
        || !crate::cpu::avx512_bw_vl()
    {
        return None;
    }
    let wide = |v: u16| half::bf16::from_bits(v).to_f32();
    for (rows, out) in x.chunks(8 * width).zip(out.chunks_mut(8 * width)) {
        let n = rows.len() / width;
        let mut sums = [0f32; 8];
        for j in 0..width {
            for (r, sum) in sums.iter_mut().enumerate().take(n) {
                let v = wide(rows[r * width + j]);
                *sum += v * v;
            }
        }
        for (r, sum) in sums.iter().enumerate().take(n) {
            let m = (sum / width as f32 + eps).sqrt();
            let at = r * width..(r + 1) * width;
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512 F, BW and VL are present; one row each, of the weight's width.
            unsafe {
                scale_row_bf16_avx512(&rows[at.clone()], m, weight, &mut out[at])
            };
        }
    }
    Some(())
}

/// `bf16(bf16(x / m) * weight)` for a row of BF16 bits.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; the three slices have one length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn scale_row_bf16_avx512(
    x: &[u16],
    m: f32,
    weight: &[u16],
    out: &mut [std::mem::MaybeUninit<u16>],
) {
    let m = _mm512_set1_ps(m);
    for j in (0..x.len()).step_by(16) {
        let mask = lanes(x.len() - j);
        // SAFETY: lanes j..j + 16 of each slice, masked to its end.
        let load = |s: &[u16]| unsafe { load_bf16(mask, s.as_ptr().add(j)) };
        let y = _mm512_mul_ps(round_bf16(_mm512_div_ps(load(x), m)), load(weight));
        // SAFETY: as the loads.
        unsafe { _mm256_mask_storeu_epi16(out.as_mut_ptr().add(j).cast(), mask, bf16_bits(y)) };
    }
}

/// LayerNorm of each row of `weight.len()` values, in place: `(x - mean) / sqrt(var + eps) *
/// weight + bias`, the mean and the (biased) variance in f32 summed in 16 fixed lanes (the same
/// bits on every CPU), the operations in the order of the composed definition (a division by
/// the root, not a multiplication by its inverse).
pub fn layer_norm(xs: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let width = weight.len().max(1);
    for row in xs.chunks_mut(width) {
        let n = row.len() as f32;
        let mean = lane_sum(row.iter().copied()) / n;
        let var = lane_sum(row.iter().map(|x| (x - mean) * (x - mean))) / n;
        let root = (var + eps).sqrt();
        for ((x, w), b) in row.iter_mut().zip(weight).zip(bias) {
            *x = (*x - mean) / root * w + b;
        }
    }
}

/// [`layer_norm`] of BF16 rows (bits) into `out`: each row widened to f32, normalized as
/// [`layer_norm`] computes it (the same sums in the same lanes, the same operations), rounded
/// to BF16 as [`round_to_bf16`] rounds: bit for bit the rows widened, normalized and rounded
/// back, in one pass. `None` where the CPU lacks AVX-512 F, BW and VL (callers widen and call
/// [`layer_norm`]; nothing is written), the weight is empty, the bias is not the weight's
/// length or the rows are not whole. Every value of `out` is written otherwise (it may start
/// uninitialized).
pub fn layer_norm_bf16(
    x: &[u16],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [std::mem::MaybeUninit<u16>],
) -> Option<()> {
    let width = weight.len();
    if width == 0
        || bias.len() != width
        || !x.len().is_multiple_of(width)
        || out.len() != x.len()
        || !crate::cpu::avx512_bw_vl()
    {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        for (row, out) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
            // SAFETY: AVX-512 F, BW and VL are present; a row, its output, the weight and the
            // bias have one length.
            unsafe { layer_norm_row_bf16_avx512(row, weight, bias, eps, out) };
        }
        Some(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// One row of [`layer_norm_bf16`].
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; the four slices have one length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn layer_norm_row_bf16_avx512(
    x: &[u16],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [std::mem::MaybeUninit<u16>],
) {
    let width = x.len();
    // SAFETY (each closure): lanes j..j + 16 of a slice of the row's length, masked to its end.
    let load = |j: usize, mask: u16| unsafe { load_bf16(mask, x.as_ptr().add(j)) };
    let load_f32 =
        |s: &[f32], j: usize, mask: u16| unsafe { _mm512_maskz_loadu_ps(mask, s.as_ptr().add(j)) };
    // The lanes' sums added in order, as `lane_sum` adds them.
    let total = |v: __m512| {
        let mut lanes = [0f32; 16];
        // SAFETY: 16 values.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), v) };
        lanes.iter().sum::<f32>()
    };
    let n = width as f32;
    let mut sum = _mm512_setzero_ps();
    for j in (0..width).step_by(16) {
        let mask = lanes(width - j);
        sum = _mm512_mask_add_ps(sum, mask, sum, load(j, mask));
    }
    let mean = total(sum) / n;
    let mean_v = _mm512_set1_ps(mean);
    let mut squares = _mm512_setzero_ps();
    for j in (0..width).step_by(16) {
        let mask = lanes(width - j);
        let d = _mm512_sub_ps(load(j, mask), mean_v);
        squares = _mm512_mask_add_ps(squares, mask, squares, _mm512_mul_ps(d, d));
    }
    let root = _mm512_set1_ps((total(squares) / n + eps).sqrt());
    for j in (0..width).step_by(16) {
        let mask = lanes(width - j);
        let normed = _mm512_div_ps(_mm512_sub_ps(load(j, mask), mean_v), root);
        let y = _mm512_add_ps(
            _mm512_mul_ps(normed, load_f32(weight, j, mask)),
            load_f32(bias, j, mask),
        );
        // SAFETY: as the loads.
        unsafe { _mm256_mask_storeu_epi16(out.as_mut_ptr().add(j).cast(), mask, bf16_bits(y)) };
    }
}

/// The sum of `values` in 16 lanes (each every 16th value), the lanes then added in order.
fn lane_sum(values: impl Iterator<Item = f32>) -> f32 {
    let mut lanes = [0f32; 16];
    for (i, x) in values.enumerate() {
        lanes[i % 16] += x;
    }
    lanes.iter().sum()
}

fn map(path: Path, op: Op, xs: &mut [f32]) {
    let done = match path {
        // SAFETY: the CPU has the path's features (`best` or a caller checked `available`).
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 if path.available() => unsafe { map_avx512(op, xs) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 if path.available() => unsafe { map_avx2(op, xs) },
        _ => 0,
    };
    for x in &mut xs[done..] {
        *x = op_one(op, *x);
    }
}

fn softmax_on(path: Path, xs: &mut [f32], width: usize) {
    for row in xs.chunks_mut(width.max(1)) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        for x in row.iter_mut() {
            *x -= max;
        }
        map(path, Op::Exp, row);
        // 16 lanes, each summing every 16th value, then added in order: the same on every path
        // (the compiler vectorizes this loop; no reassociation is allowed to it).
        let mut lanes = [0f32; 16];
        let mut chunks = row.chunks_exact(16);
        for chunk in &mut chunks {
            for (lane, x) in lanes.iter_mut().zip(chunk) {
                *lane += x;
            }
        }
        for (lane, x) in lanes.iter_mut().zip(chunks.remainder()) {
            *lane += x;
        }
        let sum: f32 = lanes.iter().sum();
        for x in row.iter_mut() {
            *x /= sum;
        }
    }
}

/// `e^x` of lanes already clamped to [LOW, HIGH] (or NaN), as [`exp_one`] computes it there:
/// the range reduction, the polynomial and the scaling that both exponentials share.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn exp_clamped_avx512(clamped: __m512) -> __m512 {
    let set1 = _mm512_set1_ps;
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(clamped, set1(LOG2E)),
    );
    let r = _mm512_fnmadd_ps(n, set1(LN2_HI), clamped);
    let r = _mm512_fnmadd_ps(n, set1(LN2_LO), r);
    let mut y = set1(P[0]);
    for p in &P[1..] {
        y = _mm512_fmadd_ps(y, r, set1(*p));
    }
    let y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r), set1(1.0));
    // y 2^n in one instruction: exact as [`exp_one`]'s two scalings are (the result is normal
    // from LOW up), and rounded to infinity past f32::MAX as their second one is.
    _mm512_scalef_ps(y, n)
}

/// `e^x` lane by lane, as [`exp_one`] computes it.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn exp_avx512(x: __m512) -> __m512 {
    let set1 = _mm512_set1_ps;
    let y = exp_clamped_avx512(_mm512_min_ps(set1(HIGH), _mm512_max_ps(set1(LOW), x)));
    // Below LOW: 0; above HIGH: infinity; NaN: itself.
    let y = _mm512_mask_blend_ps(
        _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, set1(LOW)),
        y,
        _mm512_setzero_ps(),
    );
    let y = _mm512_mask_blend_ps(
        _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, set1(HIGH)),
        y,
        set1(f32::INFINITY),
    );
    _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x), y, x)
}

/// [`exp_avx512`] of lanes that are at most 0, -infinity or NaN (a softmax's shifted scores),
/// with the same bits (NaN: a NaN), without the work that only larger inputs need.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn exp_nonpositive_avx512(x: __m512) -> __m512 {
    let set1 = _mm512_set1_ps;
    // NaN stays NaN through every step (`max` returns its second operand then).
    let y = exp_clamped_avx512(_mm512_max_ps(set1(LOW), x));
    _mm512_mask_blend_ps(
        _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, set1(LOW)),
        y,
        _mm512_setzero_ps(),
    )
}

/// `e^x` lane by lane, as [`exp_one`] computes it.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp_avx2(x: __m256) -> __m256 {
    let set1 = _mm256_set1_ps;
    let clamped = _mm256_min_ps(set1(HIGH), _mm256_max_ps(set1(LOW), x));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        clamped,
        set1(LOG2E),
    ));
    let r = _mm256_fnmadd_ps(n, set1(LN2_HI), clamped);
    let r = _mm256_fnmadd_ps(n, set1(LN2_LO), r);
    let mut y = set1(P[0]);
    for p in &P[1..] {
        y = _mm256_fmadd_ps(y, r, set1(*p));
    }
    let y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), set1(1.0));
    let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(126),
    ));
    let y = _mm256_mul_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(bits)), set1(2.0));
    let y = _mm256_blendv_ps(
        y,
        _mm256_setzero_ps(),
        _mm256_cmp_ps::<_CMP_LT_OQ>(x, set1(LOW)),
    );
    let y = _mm256_blendv_ps(
        y,
        set1(f32::INFINITY),
        _mm256_cmp_ps::<_CMP_GT_OQ>(x, set1(HIGH)),
    );
    _mm256_blendv_ps(y, x, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x))
}

/// [`map`] on AVX-512 for whole groups of 16; returns how many values it did.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn map_avx512(op: Op, xs: &mut [f32]) -> usize {
    let whole = xs.len() / 16 * 16;
    for chunk in xs[..whole].chunks_exact_mut(16) {
        // SAFETY: 16 values, read and written unaligned.
        let x = unsafe { _mm512_loadu_ps(chunk.as_ptr()) };
        let y = op_avx512(op, x);
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(chunk.as_mut_ptr(), y) };
    }
    whole
}

/// `op` of 16 lanes, as [`op_one`] computes each.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn op_avx512(op: Op, x: __m512) -> __m512 {
    let set1 = _mm512_set1_ps;
    match op {
        Op::Exp => exp_avx512(x),
        Op::Silu => _mm512_div_ps(
            x,
            _mm512_add_ps(set1(1.0), exp_avx512(_mm512_sub_ps(set1(0.0), x))),
        ),
        Op::GeluTanh => {
            let inner = _mm512_fmadd_ps(set1(GELU_A), _mm512_mul_ps(x, x), set1(1.0));
            let u = _mm512_mul_ps(_mm512_mul_ps(set1(GELU_C), x), inner);
            let e = exp_avx512(_mm512_mul_ps(set1(-2.0), u));
            _mm512_div_ps(x, _mm512_add_ps(set1(1.0), e))
        }
    }
}

/// [`map`] on AVX2 for whole groups of 8; returns how many values it did.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn map_avx2(op: Op, xs: &mut [f32]) -> usize {
    let set1 = _mm256_set1_ps;
    let whole = xs.len() / 8 * 8;
    for chunk in xs[..whole].chunks_exact_mut(8) {
        // SAFETY: 8 values, read and written unaligned.
        let x = unsafe { _mm256_loadu_ps(chunk.as_ptr()) };
        let y = match op {
            Op::Exp => exp_avx2(x),
            Op::Silu => _mm256_div_ps(
                x,
                _mm256_add_ps(set1(1.0), exp_avx2(_mm256_sub_ps(set1(0.0), x))),
            ),
            Op::GeluTanh => {
                let inner = _mm256_fmadd_ps(set1(GELU_A), _mm256_mul_ps(x, x), set1(1.0));
                let u = _mm256_mul_ps(_mm256_mul_ps(set1(GELU_C), x), inner);
                let e = exp_avx2(_mm256_mul_ps(set1(-2.0), u));
                _mm256_div_ps(x, _mm256_add_ps(set1(1.0), e))
            }
        };
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), y) };
    }
    whole
}

#[cfg(test)]
mod rotary_tests {
    use super::*;

    /// The vectorized rounding equals `half`'s on random values, ties, subnormals, infinities
    /// and NaN, over lengths that leave a tail.
    #[test]
    fn rounding_equals_halfs() {
        let mut values = crate::testing::Values(21).take(1003);
        values.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7fa0_0000),
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            1.0e-40,
            f32::MAX,
        ]);
        let mut got = vec![0u16; values.len()];
        round_to_bf16(&values, &mut got);
        for (v, g) in values.iter().zip(&got) {
            assert_eq!(*g, half::bf16::from_f32(*v).to_bits(), "{v:e}");
        }
    }

    /// The AVX-512 rotation equals the one computed with `half`'s arithmetic (each operation
    /// rounded to BF16) bit for bit: random values, halves that are not whole vectors, and
    /// zeros, infinities, NaN, subnormals and values whose products round at ties.
    #[test]
    fn rotation_equals_halfs_arithmetic() {
        let specials = [
            0x0000, 0x8000, 0x7f80, 0xff80, 0x7fc0, 0x0001, 0x8040, 0x3f81, 0x3f80, 0x4049, 0x7f7f,
        ];
        for d in [2, 10, 32, 34, 128] {
            for seed in 0..4u64 {
                let values = |salt: u64| -> Vec<u16> {
                    crate::testing::Values(seed * 10 + salt)
                        .take(d)
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            if seed == 3 {
                                specials[(i + salt as usize) % specials.len()]
                            } else {
                                half::bf16::from_f32(4.0 * v).to_bits()
                            }
                        })
                        .collect()
                };
                let (x, cos, sin) = (values(1), values(2), values(3));
                let mut want = vec![0u16; d];
                rotate_half_bf16_scalar(&x, &cos, &sin, &mut want);
                let mut got = vec![0u16; d];
                rotate_half_bf16(&x, &cos, &sin, &mut got).expect("even lengths");
                for j in 0..d {
                    let (g, w) = (
                        half::bf16::from_bits(got[j]),
                        half::bf16::from_bits(want[j]),
                    );
                    assert!(
                        got[j] == want[j] || (g.is_nan() && w.is_nan()),
                        "d {d}, seed {seed}, value {j}: {g} instead of {w}"
                    );
                }
            }
        }
        assert!(rotate_half_bf16(&[0; 3], &[0; 3], &[0; 3], &mut [0; 3]).is_none());
        assert!(rotate_half_bf16(&[0; 4], &[0; 2], &[0; 4], &mut [0; 4]).is_none());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 turns bit for bit the scalar f32 operations (themselves checked against
    /// candle's ops in the engine), on heads of 10, 34, 72 (MoonViT), 80 (the Qwen2.5-VL ViT)
    /// and 128 values with zeros of both signs among them.
    #[test]
    fn vector_turns_equal_the_scalar_f32_operations() {
        if !crate::cpu::avx512_bw_vl() {
            eprintln!("skipped: this CPU lacks AVX-512 BW/VL (the scalar turn runs)");
            return;
        }
        let mut values = crate::testing::Values(9);
        for d in [10, 34, 72, 80, 128] {
            for pairs in [false, true] {
                let angles = if pairs { d / 2 } else { d };
                let mut x: Vec<u16> = values
                    .take(d)
                    .iter()
                    .map(|v| half::bf16::from_f32(*v).to_bits())
                    .collect();
                x[1] = 0x8000;
                x[d - 2] = 0;
                let theta = values.take(angles);
                let mut cos: Vec<f32> = theta.iter().map(|t| t.cos()).collect();
                let sin: Vec<f32> = theta.iter().map(|t| t.sin()).collect();
                cos[0] = 0.0;
                let (mut want, mut got) = (vec![0u16; d], vec![0u16; d]);
                turn_in_f32_scalar(&x, &cos, &sin, pairs, &mut want);
                turn_in_f32(&x, &cos, &sin, pairs, &mut got).unwrap();
                assert_eq!(got, want, "d={d}, pairs={pairs}");
            }
        }
        assert!(turn_in_f32(&[0; 4], &[0.0; 4], &[0.0; 4], true, &mut [0; 4]).is_none());
    }

    fn paths() -> Vec<Path> {
        [Path::Avx512, Path::Avx2, Path::Portable]
            .into_iter()
            .filter(|p| p.available())
            .collect()
    }

    /// Inputs across the range, the edges and the special values.
    fn inputs() -> Vec<f32> {
        let mut xs = crate::testing::Values(3).take(5000);
        xs.extend(
            crate::testing::Values(4)
                .take(3000)
                .iter()
                .map(|x| x * 20.0),
        );
        xs.extend([
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            LOW,
            LOW - 0.01,
            HIGH,
            HIGH + 0.001,
            88.0,
            88.7,
            -86.6,
            -87.0,
            -100.0,
            100.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ]);
        xs
    }

    fn ulps(a: f32, b: f32) -> u32 {
        let key = |x: f32| {
            let bits = x.to_bits() as i32;
            if bits < 0 {
                i32::MIN - bits
            } else {
                bits
            }
        };
        key(a).abs_diff(key(b))
    }

    /// Every path gives the same bits for every function, on odd lengths (vector groups and a
    /// scalar tail).
    #[test]
    fn every_path_gives_the_same_bits() {
        let xs = inputs();
        for op in [Op::Exp, Op::Silu, Op::GeluTanh] {
            let mut portable = xs.clone();
            map(Path::Portable, op, &mut portable);
            for path in paths() {
                let mut got = xs.clone();
                map(path, op, &mut got);
                for (i, (a, b)) in got.iter().zip(&portable).enumerate() {
                    assert!(
                        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                        "{op:?} on {path:?}, x = {}: {a} vs portable {b}",
                        xs[i]
                    );
                }
            }
        }
        let mut rows = xs[..4003].to_vec();
        softmax_on(Path::Portable, &mut rows, 77);
        for path in paths() {
            let mut got = xs[..4003].to_vec();
            softmax_on(path, &mut got, 77);
            assert!(got
                .iter()
                .zip(&rows)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    /// The softmax's exponential gives `exp_avx512`'s bits on every input at most 0 (random,
    /// spread to -200, every f32 between LOW - 0.01 and LOW + 0.01, zeros of both signs,
    /// -infinity) and a NaN on NaN.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn nonpositive_exp_equals_exp() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU lacks AVX-512 F");
            return;
        }
        let mut xs: Vec<f32> = inputs()
            .into_iter()
            .filter(|x| *x <= 0.0 || x.is_nan())
            .chain(
                crate::testing::Values(8)
                    .take(4000)
                    .iter()
                    .map(|x| -10.0 * x.abs() * x.abs()),
            )
            .collect();
        let (from, to) = ((LOW + 0.01).to_bits(), (LOW - 0.01).to_bits());
        xs.extend((from..=to).map(f32::from_bits));
        xs.extend([f32::NEG_INFINITY, -0.0, 0.0, -f32::MIN_POSITIVE, f32::NAN]);
        assert!(xs.len() > 10_000);
        for chunk in xs.chunks(16) {
            let mut lanes = [f32::NEG_INFINITY; 16];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let (mut want, mut got) = ([0f32; 16], [0f32; 16]);
            // SAFETY: AVX-512 F is present; 16 values each.
            unsafe {
                let x = _mm512_loadu_ps(lanes.as_ptr());
                _mm512_storeu_ps(want.as_mut_ptr(), exp_avx512(x));
                _mm512_storeu_ps(got.as_mut_ptr(), exp_nonpositive_avx512(x));
            }
            for ((x, w), g) in lanes.iter().zip(want).zip(got) {
                assert!(
                    w.to_bits() == g.to_bits() || (x.is_nan() && g.is_nan()),
                    "x = {x:e}: {g:e} instead of {w:e}"
                );
            }
        }
    }

    /// exp within 2 ulp of the exact (f64) value over the normal range; 0 below, infinity
    /// above, NaN kept.
    #[test]
    fn exp_is_within_two_ulp() {
        let mut xs = inputs();
        let original = xs.clone();
        exp(&mut xs);
        for (x, got) in original.iter().zip(&xs) {
            let exact = (*x as f64).exp();
            if x.is_nan() {
                assert!(got.is_nan());
            } else if *x < LOW {
                assert_eq!(*got, 0.0, "x = {x}");
            } else if *x > HIGH {
                assert_eq!(*got, f32::INFINITY, "x = {x}");
            } else {
                assert!(ulps(*got, exact as f32) <= 2, "x = {x}: {got} vs {exact}");
            }
        }
    }

    /// SiLU and tanh-GELU against their definitions in f64, within a few f32
    /// roundings times the functions' condition.
    #[test]
    fn silu_and_gelu_match_their_definitions() {
        let xs: Vec<f32> = inputs().into_iter().filter(|x| x.is_finite()).collect();
        let mut s = xs.clone();
        silu(&mut s);
        let mut g = xs.clone();
        gelu_tanh(&mut g);
        for ((x, s), g) in xs.iter().zip(&s).zip(&g) {
            let x64 = *x as f64;
            let silu = x64 / (1.0 + (-x64).exp());
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64.powi(3));
            // 0.5 x (1 + tanh u), written without its cancellation for u << 0 (there
            // 1 + tanh u is 0 even in f64), and checked against the tanh form where that is
            // well conditioned.
            let gelu = x64 / (1.0 + (-2.0 * u).exp());
            if u > -2.0 {
                assert!((gelu - 0.5 * x64 * (1.0 + u.tanh())).abs() <= 1e-12 * (1.0 + x64.abs()));
            }
            // A few roundings, times the functions' condition: an error of one rounding in
            // the exponent's argument `a` moves e^a by `|a|` roundings.
            let tolerance =
                |v: f64, a: f64| 4.0 * f32::EPSILON as f64 * (1.0 + a.abs()) * v.abs() + 1e-35;
            assert!(
                (*s as f64 - silu).abs() <= tolerance(silu, x64),
                "silu({x}) = {s}, exact {silu}"
            );
            assert!(
                (*g as f64 - gelu).abs() <= tolerance(gelu, 2.0 * u),
                "gelu({x}) = {g}, exact {gelu}"
            );
        }
    }

    /// Softmax rows sum to 1 and match the f64 definition; -inf (masked) entries get exactly 0.
    #[test]
    fn softmax_matches_its_definition() {
        let mut xs = crate::testing::Values(5).take(10 * 300);
        for row in 0..10 {
            xs[row * 300 + row] = f32::NEG_INFINITY;
        }
        let original = xs.clone();
        softmax(&mut xs, 300);
        for (row, (got, x)) in xs.chunks(300).zip(original.chunks(300)).enumerate() {
            let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let total: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
            for (g, v) in got.iter().zip(x) {
                let exact = (*v as f64 - max).exp() / total;
                assert!(
                    (*g as f64 - exact).abs() <= 1e-6 * exact + 1e-12,
                    "{g} vs {exact}"
                );
            }
            assert_eq!(got[row], 0.0);
        }
    }
}
