//! Where the GEMMs write: one output buffer shared by parallel tasks that each write their own
//! columns, and the masked store of a micro-kernel's rows of sums.

/// Room for a GEMM's `len` output values, not zeroed: `vec![0.0; len]` zeroes it on the calling
/// thread alone while the parallel workers wait, and every GEMM here stores each output value
/// before reading any. Write it through [`SharedOutput`], then take it with [`filled`].
pub(crate) fn output_room<T>(len: usize) -> Vec<T> {
    Vec::with_capacity(len)
}

/// The output whose room [`output_room`] gave, once written.
///
/// # Safety
/// Each of the first `len` values of `y`'s room has been written.
pub(crate) unsafe fn filled<T>(mut y: Vec<T>, len: usize) -> Vec<T> {
    debug_assert!(y.capacity() >= len);
    // SAFETY: the caller's: `len` values written, within the capacity.
    unsafe { y.set_len(len) };
    y
}

/// The output's pointer, moved into parallel tasks that write disjoint parts of it.
pub(crate) struct SharedOutput<T = f32>(pub(crate) *mut T);
// SAFETY: every user hands each task its own columns of the buffer (see the GEMMs).
unsafe impl<T> Sync for SharedOutput<T> {}
unsafe impl<T> Send for SharedOutput<T> {}

/// Writes `R` rows of `16 C` sums (`C` registers each) at `y`, rows `ldy` apart, masked to the
/// first `nf` columns: added to what is there when `accumulate`, else stored (a first write,
/// which reads nothing).
///
/// # Safety
/// The CPU has AVX-512 F; `y` is valid for `R` rows of `nf` values at stride `ldy`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn store_rows<const R: usize, const C: usize>(
    sums: &[[std::arch::x86_64::__m512; C]; R],
    y: *mut f32,
    ldy: usize,
    nf: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;

    for (r, row) in sums.iter().enumerate() {
        for (c, sums) in row.iter().enumerate() {
            let valid = nf.saturating_sub(c * 16).min(16);
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
                let dst = y.add(r * ldy + c * 16);
                let value = if accumulate {
                    _mm512_add_ps(*sums, _mm512_maskz_loadu_ps(mask, dst))
                } else {
                    *sums
                };
                _mm512_mask_storeu_ps(dst, mask, value);
            }
        }
    }
}
