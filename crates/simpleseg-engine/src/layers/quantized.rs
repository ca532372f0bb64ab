//! Few-rows products against quantized matrices (decoding): each output is one `vec_dot` of the
//! row's blocks with the input quantized to the type's dot-product blocks (q8k or q8_0), four
//! outputs at a time so that four weight rows stream side by side; the result for a row never
//! depends on the others. On CPUs with AVX-512 BW and VNNI, q4k and q4_0 rows use
//! [`simpleseg_kernels::q4k`]'s and [`simpleseg_kernels::q4_0`]'s kernels instead, and q8_0
//! rows [`simpleseg_kernels::q8_0`]'s on CPUs with AVX-512 VNNI or AVX2. Several products can
//! run as one parallel pass ([`rows_matmul_batch`]).
//!
//! Many rows (a prefill) run [`simpleseg_kernels::int8_gemm`]'s integer GEMM on CPUs with
//! AVX-512 VNNI ([`QuantizedMatrix::integer_matmul`]: the activations quantized as ggml
//! quantizes them for the type's dot products); elsewhere a band of weight rows is dequantized
//! and multiplied as a BF16 or f32 weight would be (see [`crate::layers::linear`]).

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_0, BlockQ8K, BlockQ8_0, GgmlType};
use candle_core::quantized::GgmlDType;
use candle_core::Result;
use simpleseg_kernels::blocks::PlainBlock;
#[cfg(target_arch = "x86_64")]
use simpleseg_kernels::{q4_0 as q4_0_avx512, q4k as q4k_avx512, q8_0 as q8_0_simd};

use crate::io::quantized::QuantizedMatrix;

impl QuantizedMatrix {
    /// `x W^T` for `rows` rows of `x` (`rows x cols`, f32), `rows x self.rows` f32: the
    /// few-rows path (see the module documentation).
    pub fn rows_matmul(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut out = rows_matmul_batch(&[RowsProduct {
            matrix: self,
            x,
            rows,
        }])?;
        Ok(out.pop().unwrap_or_default())
    }
}

/// Whether many-rows products run [`QuantizedMatrix::integer_matmul`] on this CPU.
pub fn integer_prefill() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        simpleseg_kernels::int8_gemm::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl QuantizedMatrix {
    /// `x W^T` for `rows` rows of `x` (`rows x cols`, f32) by integer dot products, as ggml
    /// computes a prefill: each row quantized to q8_0 (q8_0 and q4_0 weights) or q8K (q4k),
    /// each output equal to ggml's dot product of the quantized row with the weight row up to
    /// the order of f32 additions. `None` where the CPU lacks AVX-512 VNNI.
    pub fn integer_matmul(&self, x: &[f32], rows: usize) -> Option<Vec<f32>> {
        #[cfg(target_arch = "x86_64")]
        {
            use simpleseg_kernels::int8_gemm::{self, UnsignedBlock, Weights};

            fn run<B: PlainBlock + Sync>(
                m: &QuantizedMatrix,
                x: &[f32],
                rows: usize,
                weights: Weights,
                convert: fn(&[B], &mut [UnsignedBlock]),
            ) -> Option<Vec<f32>> {
                let blocks = m.typed::<B>();
                let per_row = blocks.len() / m.rows.max(1);
                let row = |j: usize, out: &mut [UnsignedBlock]| {
                    convert(&blocks[j * per_row..(j + 1) * per_row], out)
                };
                int8_gemm::gemm(x, rows, m.rows, m.cols, weights, row)
            }
            match self.ggml {
                GgmlDType::Q4K => run(self, x, rows, Weights::Q4K, int8_gemm::q4k_row),
                GgmlDType::Q4_0 => run(self, x, rows, Weights::Q4_0, int8_gemm::q4_0_row),
                GgmlDType::Q8_0 => run(self, x, rows, Weights::Q8_0, int8_gemm::q8_0_row),
                _ => None,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (x, rows);
            None
        }
    }
}

/// One few-rows product of a batch: `rows` rows of `x` (`rows x matrix.cols`, f32) times the
/// matrix's transpose.
#[derive(Clone, Copy)]
pub struct RowsProduct<'a> {
    pub matrix: &'a QuantizedMatrix,
    pub x: &'a [f32],
    pub rows: usize,
}

/// The dot-product kernel a matrix's few-rows products run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// [`q4k_avx512`]'s, against a q8k input reordered for it.
    #[cfg(target_arch = "x86_64")]
    Q4kAvx512,
    /// Candle's, against a q8k input.
    Q4K,
    /// [`q4_0_avx512`]'s, against a q8_0 input in pairs of blocks.
    #[cfg(target_arch = "x86_64")]
    Q4_0Avx512,
    /// Candle's, against a q8_0 input.
    Q4_0,
    /// [`q8_0_simd`]'s, against a q8_0 input.
    #[cfg(target_arch = "x86_64")]
    Q8_0Simd,
    /// Candle's, against a q8_0 input.
    Q8_0,
}

impl Kernel {
    /// The kernel for `matrix`: this CPU's own where `own` and it has one, else candle's.
    fn of(matrix: &QuantizedMatrix, own: bool) -> Kernel {
        #[cfg(target_arch = "x86_64")]
        let avx512 = own && q4k_avx512::available();
        match matrix.ggml {
            #[cfg(target_arch = "x86_64")]
            GgmlDType::Q4K if avx512 => Kernel::Q4kAvx512,
            GgmlDType::Q4K => Kernel::Q4K,
            #[cfg(target_arch = "x86_64")]
            GgmlDType::Q4_0 if avx512 => Kernel::Q4_0Avx512,
            GgmlDType::Q4_0 => Kernel::Q4_0,
            #[cfg(target_arch = "x86_64")]
            _ if own && q8_0_simd::available() => Kernel::Q8_0Simd,
            _ => Kernel::Q8_0,
        }
    }

    /// Whether two kernels take the same quantized input.
    fn same_input(self, other: Kernel) -> bool {
        let input = |k| match k {
            Kernel::Q4_0 | Kernel::Q8_0 => Kernel::Q8_0,
            #[cfg(target_arch = "x86_64")]
            Kernel::Q8_0Simd => Kernel::Q8_0,
            k => k,
        };
        input(self) == input(other)
    }
}

/// Input rows (`k` values each) quantized for a kernel's dot products.
enum Prepared {
    #[cfg(target_arch = "x86_64")]
    Q4kAvx512(Vec<q4k_avx512::PreparedQ8K>),
    #[cfg(target_arch = "x86_64")]
    Q4_0Avx512(Vec<q4_0_avx512::PreparedQ8_0>),
    Q8K(Vec<BlockQ8K>),
    Q8_0(Vec<BlockQ8_0>),
}

impl Prepared {
    fn new(kernel: Kernel, x: &[f32], k: usize) -> Prepared {
        fn blocks<T: GgmlType>(x: &[f32], k: usize) -> Vec<T> {
            let mut q = vec![T::zeros(); x.len() / T::BLCK_SIZE];
            for (q, xr) in q
                .chunks_mut((k / T::BLCK_SIZE).max(1))
                .zip(x.chunks(k.max(1)))
            {
                T::from_float(xr, q);
            }
            q
        }
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Q4kAvx512 => Prepared::Q4kAvx512(
                x.chunks(k.max(1))
                    .map(q4k_avx512::PreparedQ8K::new)
                    .collect(),
            ),
            Kernel::Q4K => Prepared::Q8K(blocks(x, k)),
            #[cfg(target_arch = "x86_64")]
            Kernel::Q4_0Avx512 => Prepared::Q4_0Avx512(
                x.chunks(k.max(1))
                    .map(q4_0_avx512::PreparedQ8_0::new)
                    .collect(),
            ),
            Kernel::Q4_0 | Kernel::Q8_0 => Prepared::Q8_0(blocks(x, k)),
            #[cfg(target_arch = "x86_64")]
            Kernel::Q8_0Simd => Prepared::Q8_0(blocks(x, k)),
        }
    }
}

/// A product of a batch with its quantized input, ready to be computed a band of features at
/// a time.
struct Job<'a> {
    matrix: &'a QuantizedMatrix,
    kernel: Kernel,
    rows: usize,
    /// Index into the batch's prepared inputs (products of one input share them).
    input: usize,
    /// Features taken together (1 or 4) and features per parallel task.
    together: usize,
    band: usize,
}

impl Job<'_> {
    /// Features `first..` (as many as `out` holds, `rows` outputs each, by feature).
    fn run(&self, input: &Prepared, first: usize, out: &mut [f32]) {
        let (rows, n) = (self.rows, self.matrix.rows);
        for (g, out) in out.chunks_mut(self.together * rows).enumerate() {
            let f = first + g * self.together;
            for r in 0..rows {
                if self.together == 4 && f + 4 <= n {
                    for (i, v) in self.four(input, f, r).into_iter().enumerate() {
                        out[i * rows + r] = v;
                    }
                } else {
                    for i in 0..(n - f).min(self.together) {
                        out[i * rows + r] = self.one(input, f + i, r);
                    }
                }
            }
        }
    }

    /// Weight rows `f..f + 4` times input row `r`.
    fn four(&self, input: &Prepared, f: usize, r: usize) -> [f32; 4] {
        let m = self.matrix;
        match input {
            #[cfg(target_arch = "x86_64")]
            Prepared::Q4kAvx512(x) => {
                let row = |f| self.row::<q4k_avx512::Q4KBlock>(f);
                // The kernel was chosen for this CPU and every row has the input's blocks, so
                // it always answers; NaN would show a broken invariant, not hide it.
                q4k_avx512::dot([row(f), row(f + 1), row(f + 2), row(f + 3)], &x[r])
                    .unwrap_or([f32::NAN; 4])
            }
            // (Taken one at a time; see `rows_matmul_batch`.)
            #[cfg(target_arch = "x86_64")]
            Prepared::Q4_0Avx512(_) => std::array::from_fn(|i| self.one(input, f + i, r)),
            #[cfg(target_arch = "x86_64")]
            Prepared::Q8_0(x) if self.kernel == Kernel::Q8_0Simd => {
                let (_, xr) = row_and_input::<BlockQ8_0>(m, x, f, r);
                let rows = [0, 1, 2, 3].map(|i| self.row::<q8_0_simd::Q8_0Block>(f + i));
                // AVX-512 takes the four together; elsewhere (AVX2) one at a time.
                simpleseg_kernels::blocks::view(simpleseg_kernels::blocks::bytes_of(xr))
                    .and_then(|xr| q8_0_simd::dot_rows(rows, xr))
                    .unwrap_or_else(|| std::array::from_fn(|i| self.one(input, f + i, r)))
            }
            Prepared::Q8K(x) => four_typed::<BlockQ4K>(m, x, f, r),
            Prepared::Q8_0(x) if m.ggml == GgmlDType::Q4_0 => four_typed::<BlockQ4_0>(m, x, f, r),
            Prepared::Q8_0(x) => four_typed::<BlockQ8_0>(m, x, f, r),
        }
    }

    /// Weight row `f` times input row `r`.
    fn one(&self, input: &Prepared, f: usize, r: usize) -> f32 {
        let m = self.matrix;
        match input {
            // As in `four`.
            #[cfg(target_arch = "x86_64")]
            Prepared::Q4kAvx512(x) => q4k_avx512::dot([self.row::<q4k_avx512::Q4KBlock>(f)], &x[r])
                .map_or(f32::NAN, |[v]| v),
            #[cfg(target_arch = "x86_64")]
            Prepared::Q4_0Avx512(x) => {
                q4_0_avx512::dot(self.row::<q4_0_avx512::Q4_0Block>(f), &x[r]).unwrap_or(f32::NAN)
            }
            #[cfg(target_arch = "x86_64")]
            Prepared::Q8_0(x) if self.kernel == Kernel::Q8_0Simd => {
                // The kernel was chosen for this CPU and the row has the input's blocks, so it
                // always answers (as in `four`).
                let (_, input) = row_and_input::<BlockQ8_0>(m, x, f, r);
                simpleseg_kernels::blocks::view(simpleseg_kernels::blocks::bytes_of(input))
                    .and_then(|input| q8_0_simd::dot(self.row(f), input))
                    .unwrap_or(f32::NAN)
            }
            Prepared::Q8K(x) => one_typed::<BlockQ4K>(m, x, f, r),
            Prepared::Q8_0(x) if m.ggml == GgmlDType::Q4_0 => one_typed::<BlockQ4_0>(m, x, f, r),
            Prepared::Q8_0(x) => one_typed::<BlockQ8_0>(m, x, f, r),
        }
    }

    /// Weight row `f` as the blocks `B` of the kernel chosen for the matrix's type.
    #[cfg(target_arch = "x86_64")]
    fn row<B: PlainBlock>(&self, f: usize) -> &[B] {
        let blocks = self.matrix.typed::<B>();
        let per_row = blocks.len() / self.matrix.rows.max(1);
        &blocks[f * per_row..(f + 1) * per_row]
    }
}

/// Weight row `f` and input row `r` of a matrix of `T` blocks and its quantized input.
fn row_and_input<'a, T: GgmlType + PlainBlock>(
    m: &'a QuantizedMatrix,
    xq: &'a [T::VecDotType],
    f: usize,
    r: usize,
) -> (&'a [T], &'a [T::VecDotType]) {
    let per_row = m.cols / T::BLCK_SIZE;
    let dot_per_row = m.cols / T::VecDotType::BLCK_SIZE;
    (
        &m.typed::<T>()[f * per_row..(f + 1) * per_row],
        &xq[r * dot_per_row..(r + 1) * dot_per_row],
    )
}

/// Candle's dot products of weight rows `f..f + 4` with input row `r`.
fn four_typed<T: GgmlType + PlainBlock>(
    m: &QuantizedMatrix,
    xq: &[T::VecDotType],
    f: usize,
    r: usize,
) -> [f32; 4] {
    let row = |f: usize| row_and_input::<T>(m, xq, f, r).0;
    let input = row_and_input::<T>(m, xq, f, r).1;
    let (a, b, c, d) = T::vec_dot_4(m.cols, row(f), row(f + 1), row(f + 2), row(f + 3), input);
    [a, b, c, d]
}

/// Candle's dot product of weight row `f` with input row `r`.
fn one_typed<T: GgmlType + PlainBlock>(
    m: &QuantizedMatrix,
    xq: &[T::VecDotType],
    f: usize,
    r: usize,
) -> f32 {
    let (row, input) = row_and_input::<T>(m, xq, f, r);
    T::vec_dot(m.cols, row, input)
}

/// Several few-rows products in one parallel pass (decoding's projections that share an
/// input, a mixture's chosen experts): each result is exactly what
/// [`QuantizedMatrix::rows_matmul`] gives for its product alone; the batch only saves the
/// synchronizations of separate passes and quantizes an input shared by products once.
/// Returns, per product, `rows x matrix.rows` f32, row-major.
///
/// - On CPUs with AVX-512 BW and VNNI, q4k weights use [`q4k_avx512`]'s kernel and q4_0
///   weights [`q4_0_avx512`]'s; q8_0 weights [`q8_0_simd`]'s there and on CPUs with AVX2
///   (four rows at a time on AVX-512: on two Xeon cores the 7B's gate/up rows of 3584 values
///   read 14 GB/s one at a time, 18 four at a time; one at a time on AVX2). Long q4k rows (the
///   7B size's down projection) go four at a time, each input block loaded once for the four
///   (one at a time they read ~15 GB/s on 2 cores, four ~20); short rows one at a time, a
///   single stream through memory (four streams of a few KB each ran at half speed or less:
///   the prefetcher has no time to follow them). The kernels prefetch each row ahead.
/// - Otherwise candle's dot products run four weight rows side by side.
pub fn rows_matmul_batch(products: &[RowsProduct]) -> Result<Vec<Vec<f32>>> {
    batch(products, true)
}

/// [`rows_matmul_batch`], with candle's kernels only unless `own_kernels`.
fn batch(products: &[RowsProduct], own_kernels: bool) -> Result<Vec<Vec<f32>>> {
    use rayon::prelude::*;

    // Products of one input (same rows, same width, same kernel input) share its quantization.
    let mut inputs: Vec<(Prepared, (usize, usize, usize), Kernel)> = Vec::new();
    let mut jobs = Vec::with_capacity(products.len());
    for p in products {
        let m = p.matrix;
        if p.x.len() != p.rows * m.cols {
            candle_core::bail!("{} inputs for {} rows of {}", p.x.len(), p.rows, m.cols);
        }
        let kernel = Kernel::of(m, own_kernels);
        let key = (p.x.as_ptr() as usize, p.x.len(), m.cols);
        let input = match inputs
            .iter()
            .position(|(_, k, kind)| *k == key && kind.same_input(kernel))
        {
            Some(i) => i,
            None => {
                inputs.push((Prepared::new(kernel, p.x, m.cols), key, kernel));
                inputs.len() - 1
            }
        };
        let (together, band) = match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Q4kAvx512 if m.cols / BlockQ4K::BLCK_SIZE >= 32 => (4, 32),
            #[cfg(target_arch = "x86_64")]
            Kernel::Q4kAvx512 => (1, 32),
            #[cfg(target_arch = "x86_64")]
            Kernel::Q8_0Simd => (4, 32),
            #[cfg(target_arch = "x86_64")]
            Kernel::Q4_0Avx512 => (1, 32),
            _ => (4, 64),
        };
        jobs.push(Job {
            matrix: m,
            kernel,
            rows: p.rows,
            input,
            together,
            band,
        });
    }
    let mut by_feature: Vec<Vec<f32>> = jobs
        .iter()
        .map(|j| vec![0f32; j.matrix.rows * j.rows])
        .collect();
    let mut tasks = Vec::new();
    for (j, (job, out)) in jobs.iter().zip(by_feature.iter_mut()).enumerate() {
        for (t, band) in out.chunks_mut((job.band * job.rows).max(1)).enumerate() {
            tasks.push((j, t * job.band, band));
        }
    }
    tasks.into_par_iter().for_each(|(j, first, out)| {
        let job = &jobs[j];
        job.run(&inputs[job.input].0, first, out);
    });
    Ok(by_feature
        .iter()
        .zip(&jobs)
        .map(|(f, j)| transpose(f, j.matrix.rows, j.rows))
        .collect())
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

    /// A batch of products (q4k and q8_0 short and long rows, q4_0; some sharing an input,
    /// some with a partial last group) gives candle's dot products for each, and bit for
    /// bit what each product gives alone; with this CPU's kernels and with candle's.
    #[test]
    fn batch_equals_each_products_own_result() {
        let mut values = simpleseg_kernels::testing::Values(11);
        let mut random = |n: usize| values.take(n);
        let mut matrix = |n: usize, k: usize, ggml: GgmlDType| {
            let values = random(n * k);
            let bytes: Vec<u8> = match ggml {
                GgmlDType::Q4K => quantize_bytes::<BlockQ4K>(&values),
                GgmlDType::Q4_0 => quantize_bytes::<BlockQ4_0>(&values),
                _ => quantize_bytes::<BlockQ8_0>(&values),
            };
            QuantizedMatrix::owned(&bytes, n, k, ggml).unwrap()
        };
        let short = matrix(70, 512, GgmlDType::Q4K);
        let long = matrix(9, 8192, GgmlDType::Q4K);
        let q4_0 = matrix(33, 512, GgmlDType::Q4_0);
        let q8_0 = matrix(20, 512, GgmlDType::Q8_0);
        let long_q8_0 = matrix(9, 8192, GgmlDType::Q8_0);
        let x512 = random(2 * 512);
        let other512 = random(2 * 512);
        let x8192 = random(2 * 8192);
        let products = [
            RowsProduct {
                matrix: &short,
                x: &x512,
                rows: 2,
            },
            RowsProduct {
                matrix: &q4_0,
                x: &x512,
                rows: 2,
            },
            RowsProduct {
                matrix: &long,
                x: &x8192,
                rows: 2,
            },
            RowsProduct {
                matrix: &short,
                x: &other512,
                rows: 2,
            },
            RowsProduct {
                matrix: &q8_0,
                x: &x512,
                rows: 2,
            },
            RowsProduct {
                matrix: &q8_0,
                x: &x512[..512],
                rows: 1,
            },
            RowsProduct {
                matrix: &long_q8_0,
                x: &x8192,
                rows: 2,
            },
        ];
        // This CPU's kernels, then candle's (what CPUs without AVX-512 VNNI run).
        for own in [true, false] {
            let outputs = batch(&products, own).unwrap();
            for (i, (p, got)) in products.iter().zip(&outputs).enumerate() {
                let reference = match p.matrix.ggml {
                    GgmlDType::Q4K => candle_dots::<BlockQ4K>(p),
                    GgmlDType::Q4_0 => candle_dots::<BlockQ4_0>(p),
                    _ => candle_dots::<BlockQ8_0>(p),
                };
                assert_eq!(got.len(), reference.len(), "product {i}");
                for (j, (a, b)) in got.iter().zip(&reference).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "product {i}, output {j}: {a} vs candle's {b}"
                    );
                }
                // And exactly what the product gives alone.
                let alone = batch(&products[i..i + 1], own).unwrap().remove(0);
                assert!(
                    got.iter()
                        .zip(&alone)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "product {i} differs from the product alone"
                );
            }
        }
        // A wrong input length is an error, not a panic.
        let wrong = [RowsProduct {
            matrix: &short,
            x: &x512[..100],
            rows: 1,
        }];
        assert!(rows_matmul_batch(&wrong).is_err());
    }

    /// A prefill's integer GEMM gives, for every row, what decoding's dot products give for
    /// that row alone (both quantize the row as ggml does), for each weight type.
    #[test]
    fn integer_prefill_equals_each_rows_decoding_product() {
        if !integer_prefill() {
            eprintln!("skipped: this CPU has no integer prefill (AVX-512 VNNI)");
            return;
        }
        let mut values = simpleseg_kernels::testing::Values(21);
        for (ggml, n, k) in [
            (GgmlDType::Q4K, 53, 512),
            (GgmlDType::Q4_0, 50, 1408),
            (GgmlDType::Q8_0, 49, 8192),
        ] {
            let w = values.take(n * k);
            let bytes = match ggml {
                GgmlDType::Q4K => quantize_bytes::<BlockQ4K>(&w),
                GgmlDType::Q4_0 => quantize_bytes::<BlockQ4_0>(&w),
                _ => quantize_bytes::<BlockQ8_0>(&w),
            };
            let matrix = QuantizedMatrix::owned(&bytes, n, k, ggml).unwrap();
            let rows = 11;
            let x = values.take(rows * k);
            let y = matrix.integer_matmul(&x, rows).expect("available");
            for (r, xr) in x.chunks(k).enumerate() {
                let alone = matrix.rows_matmul(xr, 1).unwrap();
                for (f, want) in alone.iter().enumerate() {
                    let got = y[r * n + f];
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{ggml:?} {n}x{k}: row {r}, feature {f}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Candle's reference dot products (ggml's unoptimized ones) for a product, `rows x n`.
    fn candle_dots<T: GgmlType + PlainBlock>(p: &RowsProduct) -> Vec<f32> {
        let (n, k) = (p.matrix.rows, p.matrix.cols);
        let w = p.matrix.typed::<T>();
        let per_row = k / T::BLCK_SIZE;
        let mut out = Vec::new();
        for xr in p.x.chunks(k) {
            let mut xq = vec![T::VecDotType::zeros(); k / T::VecDotType::BLCK_SIZE];
            T::VecDotType::from_float(xr, &mut xq);
            for f in 0..n {
                out.push(T::vec_dot_unopt(k, &w[f * per_row..(f + 1) * per_row], &xq));
            }
        }
        out
    }

    fn quantize_bytes<T: GgmlType + PlainBlock>(values: &[f32]) -> Vec<u8> {
        let mut blocks = vec![T::zeros(); values.len() / T::BLCK_SIZE];
        T::from_float(values, &mut blocks);
        simpleseg_kernels::blocks::bytes_of(&blocks).to_vec()
    }

    /// `rows_matmul` on q4k weights (this CPU's kernel: AVX-512 where it has it, with rows
    /// taken four at a time when they are long, and candle's otherwise) equals candle's q4k x
    /// q8k dot products, for every input row and weight row, including a last partial group.
    #[test]
    fn q4k_rows_matmul_equals_candles_dot_products() {
        use candle_core::quantized::k_quants::BlockQ8K;

        let mut values = simpleseg_kernels::testing::Values(7);
        let mut random = |n: usize| values.take(n);
        // 512 inputs: rows one at a time; 8192: four at a time. 10 rows: a partial group.
        for (n, k) in [(10, 512), (10, 8192)] {
            let mut blocks = vec![BlockQ4K::zeros(); n * k / BlockQ4K::BLCK_SIZE];
            BlockQ4K::from_float(&random(n * k), &mut blocks);
            let bytes = simpleseg_kernels::blocks::bytes_of(&blocks);
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
