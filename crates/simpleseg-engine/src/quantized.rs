//! Quantized weight matrices on the CPU, read in place: ggml blocks (q4k, q4_0, q8_0) in a
//! memory-mapped GGUF file or in memory after quantizing at load, multiplied with candle's
//! block dot products (its AVX2 kernels) without the copy and repacking candle's `QMatMul`
//! makes, so that a quantized model's resident memory is its quantized bytes.
//!
//! - Few rows (decoding): each output is one `vec_dot` of the row's blocks with the input
//!   quantized to the type's dot-product blocks (q8k or q8_0), four outputs at a time so that
//!   four weight rows stream side by side; the result for a row never depends on the others.
//!   On CPUs with AVX-512 BW and VNNI, q4k rows use [`q4k_avx512`]'s kernel instead.
//! - Many rows (a prefill): a band of weight rows is dequantized and multiplied as a BF16 or
//!   f32 weight would be (see [`crate::nn`]).

use std::sync::Arc;

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_0, BlockQ8_0, GgmlType};
use candle_core::quantized::GgmlDType;
use candle_core::Result;
use memmap2::Mmap;

#[cfg(target_arch = "x86_64")]
mod q4k_avx512;

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

    /// The blocks as `T` (whose type the matrix has).
    fn typed<T: GgmlType>(&self) -> &[T] {
        let bytes = self.bytes();
        // SAFETY: the blocks are plain data (integers and f16 scales) laid out as ggml writes
        // them, `bytes` holds whole blocks of T (checked at construction), and its start is
        // 8-byte aligned, enough for every block type.
        unsafe {
            std::slice::from_raw_parts(
                bytes.as_ptr() as *const T,
                bytes.len() / std::mem::size_of::<T>(),
            )
        }
    }

    /// Row `r` dequantized into `out` (`cols` values).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        fn run<T: GgmlType>(m: &QuantizedMatrix, r: usize, out: &mut [f32]) {
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

    /// `x W^T` for `rows` rows of `x` (`rows x cols`, f32), `rows x self.rows` f32: the
    /// few-rows path (see the module documentation).
    pub fn rows_matmul(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        if x.len() != rows * self.cols {
            candle_core::bail!("{} inputs for {rows} rows of {}", x.len(), self.cols);
        }
        #[cfg(target_arch = "x86_64")]
        if self.ggml == GgmlDType::Q4K && q4k_avx512::available() {
            return Ok(self.rows_matmul_q4k_avx512(x, rows));
        }
        Ok(match self.ggml {
            GgmlDType::Q4K => self.rows_matmul_typed::<BlockQ4K>(x, rows),
            GgmlDType::Q4_0 => self.rows_matmul_typed::<BlockQ4_0>(x, rows),
            _ => self.rows_matmul_typed::<BlockQ8_0>(x, rows),
        })
    }

    fn rows_matmul_typed<T: GgmlType + Sync>(&self, x: &[f32], rows: usize) -> Vec<f32>
    where
        T::VecDotType: Sync + Send,
    {
        let k = self.cols;
        let per_row = k / T::BLCK_SIZE;
        let dot_per_row = k / T::VecDotType::BLCK_SIZE;
        let mut xq = vec![T::VecDotType::zeros(); rows * dot_per_row];
        for (q, xr) in xq.chunks_mut(dot_per_row.max(1)).zip(x.chunks(k.max(1))) {
            T::VecDotType::from_float(xr, q);
        }
        let w = self.typed::<T>();
        let row = |f: usize| &w[f * per_row..(f + 1) * per_row];
        let input = |r: usize| &xq[r * dot_per_row..(r + 1) * dot_per_row];
        self.by_feature_groups(
            rows,
            4,
            16,
            |f, r| {
                let (a, b, c, d) =
                    T::vec_dot_4(k, row(f), row(f + 1), row(f + 2), row(f + 3), input(r));
                [a, b, c, d]
            },
            |f, r| T::vec_dot(k, row(f), input(r)),
        )
    }

    /// [`Self::rows_matmul`] for q4k weights with [`q4k_avx512`]'s kernel.
    #[cfg(target_arch = "x86_64")]
    fn rows_matmul_q4k_avx512(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let inputs: Vec<_> = x
            .chunks(self.cols.max(1))
            .map(q4k_avx512::PreparedQ8K::new)
            .collect();
        let w = q4k_avx512::blocks(self.bytes());
        let per_row = self.cols / BlockQ4K::BLCK_SIZE;
        let row = |f: usize| &w[f * per_row..(f + 1) * per_row];
        // Long rows go four at a time, each input block loaded once for the four (one at a
        // time, a 7B-size down projection read ~15 GB/s on 2 cores, four ~20); short rows one
        // at a time, a single stream through memory (four streams of a few KB each ran at half
        // speed: the prefetcher has no time to follow them).
        let together = if per_row >= 32 { 4 } else { 1 };
        // SAFETY (both kernels): the CPU has the kernel's features (checked by the caller),
        // and each input has `per_row` blocks.
        self.by_feature_groups(
            rows,
            together,
            32 / together,
            |f, r| unsafe {
                q4k_avx512::dot([row(f), row(f + 1), row(f + 2), row(f + 3)], &inputs[r])
            },
            |f, r| unsafe { q4k_avx512::dot([row(f)], &inputs[r])[0] },
        )
    }

    /// The few-rows product, features in parallel `together` (1 or 4) at a time: `four(f, r)`
    /// gives features `f..f + 4` for input row `r` when four are taken together and remain,
    /// `one(f, r)` feature `f` otherwise. Returns `rows x self.rows`, row-major.
    fn by_feature_groups(
        &self,
        rows: usize,
        together: usize,
        min_items: usize,
        four: impl Fn(usize, usize) -> [f32; 4] + Sync,
        one: impl Fn(usize, usize) -> f32 + Sync,
    ) -> Vec<f32> {
        use rayon::prelude::*;

        let n = self.rows;
        let mut by_feature = vec![0f32; n * rows];
        by_feature
            .par_chunks_mut(together * rows.max(1))
            .enumerate()
            .with_min_len(min_items)
            .for_each(|(item, out)| {
                let f = item * together;
                for r in 0..rows {
                    if together == 4 && f + 4 <= n {
                        for (i, v) in four(f, r).into_iter().enumerate() {
                            out[i * rows + r] = v;
                        }
                    } else {
                        for i in 0..(n - f).min(together) {
                            out[i * rows + r] = one(f + i, r);
                        }
                    }
                }
            });
        transpose(&by_feature, n, rows)
    }
}

/// Outputs gathered per feature (`n` chunks of `rows`) as `rows x n`, row-major.
fn transpose(by_feature: &[f32], n: usize, rows: usize) -> Vec<f32> {
    let mut y = vec![0f32; rows * n];
    for (f, values) in by_feature.chunks(rows.max(1)).enumerate() {
        for (r, v) in values.iter().enumerate() {
            y[r * n + f] = *v;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `rows_matmul` on q4k weights (this CPU's kernel: AVX-512 where it has it, with rows
    /// taken four at a time when they are long, and candle's otherwise) equals candle's q4k x
    /// q8k dot products, for every input row and weight row, including a last partial group.
    #[test]
    fn q4k_rows_matmul_equals_candles_dot_products() {
        use candle_core::quantized::k_quants::BlockQ8K;

        let mut state = 7u64;
        let mut random = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect()
        };
        // 512 inputs: rows one at a time; 8192: four at a time. 10 rows: a partial group.
        for (n, k) in [(10, 512), (10, 8192)] {
            let mut blocks = vec![BlockQ4K::zeros(); n * k / BlockQ4K::BLCK_SIZE];
            BlockQ4K::from_float(&random(n * k), &mut blocks);
            // SAFETY: `BlockQ4K` is `repr(C)` plain data (ggml's layout).
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    blocks.as_ptr().cast::<u8>(),
                    std::mem::size_of_val(&blocks[..]),
                )
            };
            let matrix = QuantizedMatrix::owned(bytes, n, k, GgmlDType::Q4K).unwrap();
            let rows = 3;
            let x = random(rows * k);
            let y = matrix.rows_matmul(&x, rows).unwrap();
            let per_row = k / BlockQ4K::BLCK_SIZE;
            for (r, xr) in x.chunks(k).enumerate() {
                let mut xq = vec![BlockQ8K::zeros(); per_row];
                BlockQ8K::from_float(xr, &mut xq);
                for f in 0..n {
                    let reference =
                        BlockQ4K::vec_dot_unopt(k, &blocks[f * per_row..(f + 1) * per_row], &xq);
                    let got = y[r * n + f];
                    assert!(
                        (got - reference).abs() <= 1e-4 * (1.0 + reference.abs()),
                        "{n}x{k}, input {r}, row {f}: {got} vs candle's {reference}"
                    );
                }
            }
        }
    }
}
