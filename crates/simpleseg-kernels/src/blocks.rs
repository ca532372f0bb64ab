//! Quantized bytes read as the blocks a kernel takes.

/// A block type that is plain data: `repr(C)` integers and floats, with no padding and no
/// invalid bit pattern, so any byte range of its size holds one.
///
/// # Safety
/// Implement only for such types.
pub unsafe trait PlainBlock: Sized {}

// SAFETY: candle's block types are `repr(C)` plain data (integers and f16 scales) laid out as
// ggml writes them.
unsafe impl PlainBlock for candle_core::quantized::k_quants::BlockQ4K {}
// SAFETY: as above.
unsafe impl PlainBlock for candle_core::quantized::k_quants::BlockQ4_0 {}
// SAFETY: as above.
unsafe impl PlainBlock for candle_core::quantized::k_quants::BlockQ8_0 {}
// SAFETY: as above.
unsafe impl PlainBlock for candle_core::quantized::k_quants::BlockQ8K {}

/// `bytes` as blocks, or `None` when they are not aligned for `B` or not whole blocks.
pub fn view<B: PlainBlock>(bytes: &[u8]) -> Option<&[B]> {
    let size = std::mem::size_of::<B>();
    if size == 0
        || !bytes.len().is_multiple_of(size)
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<B>())
    {
        return None;
    }
    // SAFETY: aligned, whole blocks within `bytes` (checked above), and any bytes are a valid
    // `B` (`PlainBlock`); the slice borrows `bytes`.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / size) })
}

/// The bytes of blocks (for tests and writers).
pub fn bytes_of<B: PlainBlock>(blocks: &[B]) -> &[u8] {
    // SAFETY: plain data without padding (`PlainBlock`): every byte is initialized.
    unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast(), std::mem::size_of_val(blocks)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};

    #[test]
    fn views_need_whole_aligned_blocks() {
        let blocks = vec![BlockQ8_0::zeros(); 3];
        let bytes = bytes_of(&blocks);
        assert_eq!(view::<BlockQ8_0>(bytes).map(<[_]>::len), Some(3));
        assert!(view::<BlockQ8_0>(&bytes[..bytes.len() - 1]).is_none());
    }
}
