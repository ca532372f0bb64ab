//! Quantized weight matrices as stored: ggml blocks (q4k, q4_0, q8_0) read in place from a
//! memory-mapped GGUF file, or held in memory after quantizing at load, so that a quantized
//! model's resident memory is its quantized bytes. Their products are in
//! [`crate::layers::quantized`].

use std::sync::Arc;

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_0, BlockQ8_0, GgmlType};
use candle_core::quantized::GgmlDType;
use candle_core::Result;
use memmap2::Mmap;

use simpleseg_kernels::blocks::{view, PlainBlock};

/// Where a matrix's blocks live.
#[derive(Clone)]
enum Blocks {
    /// A range of a memory-mapped file.
    Mapped { map: Arc<Mmap>, start: usize },
    /// Bytes in memory, in u64 words so that every block type is aligned.
    Owned(Arc<Vec<u64>>),
}

/// A `(rows, cols)` matrix of ggml blocks, each row `cols / block` blocks.
#[derive(Clone)]
pub struct QuantizedMatrix {
    blocks: Blocks,
    pub rows: usize,
    pub cols: usize,
    pub ggml: GgmlDType,
}

impl std::fmt::Debug for QuantizedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantizedMatrix({}x{} {:?})",
            self.rows, self.cols, self.ggml
        )
    }
}

/// Whether [`QuantizedMatrix`] multiplies blocks of type `t`.
pub fn supported(t: GgmlDType) -> bool {
    matches!(t, GgmlDType::Q4K | GgmlDType::Q4_0 | GgmlDType::Q8_0)
}

impl QuantizedMatrix {
    fn check(rows: usize, cols: usize, ggml: GgmlDType, bytes: usize) -> Result<()> {
        if !supported(ggml) {
            candle_core::bail!("{ggml:?} weights are not multiplied (q4k, q4_0 and q8_0 are)");
        }
        if !cols.is_multiple_of(ggml.block_size())
            || bytes != rows * cols / ggml.block_size() * ggml.type_size()
        {
            candle_core::bail!("{rows}x{cols} {ggml:?} weight has {bytes} bytes");
        }
        Ok(())
    }

    /// Blocks read in place from `map[start..]`; the start must suit the block type's
    /// alignment (GGUF aligns tensors to 32 bytes).
    pub fn mapped(
        map: Arc<Mmap>,
        start: usize,
        rows: usize,
        cols: usize,
        ggml: GgmlDType,
    ) -> Result<Self> {
        let bytes = rows * cols / ggml.block_size().max(1) * ggml.type_size();
        Self::check(rows, cols, ggml, bytes)?;
        if start + bytes > map.len() || !(map.as_ptr() as usize + start).is_multiple_of(8) {
            candle_core::bail!("quantized weight at byte {start} is out of range or misaligned");
        }
        Ok(QuantizedMatrix {
            blocks: Blocks::Mapped { map, start },
            rows,
            cols,
            ggml,
        })
    }

    /// Blocks held in memory (e.g. from quantizing at load).
    pub fn owned(bytes: &[u8], rows: usize, cols: usize, ggml: GgmlDType) -> Result<Self> {
        Self::check(rows, cols, ggml, bytes.len())?;
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Ok(QuantizedMatrix {
            blocks: Blocks::Owned(Arc::new(words)),
            rows,
            cols,
            ggml,
        })
    }

    fn bytes(&self) -> &[u8] {
        let len = self.rows * self.cols / self.ggml.block_size() * self.ggml.type_size();
        match &self.blocks {
            Blocks::Mapped { map, start } => &map[*start..*start + len],
            Blocks::Owned(words) => &bytemuck::cast_slice::<u64, u8>(words)[..len],
        }
    }

    /// The blocks as `B` (whose layout the matrix's blocks have). The bytes hold whole
    /// blocks (checked at construction) and start 8-byte aligned, so the view always exists.
    pub(crate) fn typed<B: PlainBlock>(&self) -> &[B] {
        view(self.bytes()).unwrap_or_default()
    }

    /// Row `r`'s blocks, viewed as `B` (which must be this matrix's block type).
    pub(crate) fn row_blocks<B: PlainBlock>(&self, r: usize) -> &[B] {
        let blocks = self.typed::<B>();
        let per_row = blocks.len() / self.rows.max(1);
        &blocks[r * per_row..(r + 1) * per_row]
    }

    /// Row `r` dequantized into `out` (`cols` values).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        fn run<T: GgmlType + PlainBlock>(m: &QuantizedMatrix, r: usize, out: &mut [f32]) {
            let per_row = m.cols / T::BLCK_SIZE;
            T::to_float(&m.typed::<T>()[r * per_row..(r + 1) * per_row], out);
        }
        match self.ggml {
            GgmlDType::Q4K => run::<BlockQ4K>(self, r, out),
            GgmlDType::Q4_0 => run::<BlockQ4_0>(self, r, out),
            _ => run::<BlockQ8_0>(self, r, out),
        }
    }

    /// The whole matrix dequantized, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_mut(self.cols.max(1)).enumerate() {
            self.row_into(r, row);
        }
        out
    }
}
