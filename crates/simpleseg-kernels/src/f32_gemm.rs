//! Many-rows products `x W^T` (prefill) in f32 against a weight that is not stored as f32
//! (BF16, F16, quantized): the weight is widened a block of output features at a time (about
//! 4 MiB) and each block multiplied with the `gemm` crate's f32 GEMM, so the product is exact
//! on the stored values and no f32 copy of the whole weight ever exists. An f32 weight is
//! multiplied in one piece as stored.

use rayon::prelude::*;

/// `xs` (`rows x in_dim`, row-major) times the transpose of an `out_dim x in_dim` weight:
/// `rows x out_dim` f32. `row(j, out)` writes row `j` of the weight as f32 into `out`
/// (`in_dim` values); `stored` is the whole weight when it is f32 already. `None` when the
/// lengths do not match the sizes.
pub fn matmul<R>(
    xs: &[f32],
    rows: usize,
    out_dim: usize,
    in_dim: usize,
    stored: Option<&[f32]>,
    row: R,
) -> Option<Vec<f32>>
where
    R: Fn(usize, &mut [f32]) + Sync,
{
    if xs.len() != rows * in_dim || stored.is_some_and(|w| w.len() != out_dim * in_dim) {
        return None;
    }
    let mut y = vec![0f32; rows * out_dim];
    let block = if stored.is_some() {
        out_dim.max(1)
    } else {
        ((4 << 20) / (4 * in_dim.max(1))).clamp(16, out_dim.max(16))
    };
    let mut buffer = vec![0f32; if stored.is_some() { 0 } else { block * in_dim }];
    let threads = rayon::current_num_threads();
    for b0 in (0..out_dim).step_by(block) {
        let n = block.min(out_dim - b0);
        let rhs = match stored {
            Some(all) => &all[b0 * in_dim..(b0 + n) * in_dim],
            None => {
                buffer[..n * in_dim]
                    .par_chunks_mut(in_dim.max(1))
                    .enumerate()
                    .for_each(|(i, out)| row(b0 + i, out));
                &buffer[..n * in_dim]
            }
        };
        // SAFETY: dst is `rows x out_dim` row-major and the written columns b0..b0 + n lie
        // within it; lhs is `rows x in_dim` row-major; rhs is the block read as `in_dim x n`
        // (element (k, j) at j * in_dim + k); the lengths were checked above, and all three
        // outlive the call.
        unsafe {
            gemm::gemm(
                rows,
                n,
                in_dim,
                y.as_mut_ptr().add(b0),
                1,
                out_dim as isize,
                false,
                xs.as_ptr(),
                1,
                in_dim as isize,
                rhs.as_ptr(),
                in_dim as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                if threads > 1 {
                    gemm::Parallelism::Rayon(threads)
                } else {
                    gemm::Parallelism::None
                },
            );
        }
    }
    Some(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Values;

    #[test]
    fn widened_blocks_equal_an_exact_product() {
        // More output features than one block holds, so several blocks run.
        let (rows, out_dim, in_dim) = (9, 1500, 1000);
        let w = Values(4).take(out_dim * in_dim);
        let xs = Values(5).take(rows * in_dim);
        let widened = matmul(&xs, rows, out_dim, in_dim, None, |j, out| {
            out.copy_from_slice(&w[j * in_dim..(j + 1) * in_dim])
        })
        .unwrap();
        let stored = matmul(&xs, rows, out_dim, in_dim, Some(&w), |_, _| {}).unwrap();
        for r in 0..rows {
            for f in (0..out_dim).step_by(97) {
                let exact: f64 = (0..in_dim)
                    .map(|k| f64::from(xs[r * in_dim + k]) * f64::from(w[f * in_dim + k]))
                    .sum();
                for y in [&widened, &stored] {
                    assert!(
                        (f64::from(y[r * out_dim + f]) - exact).abs() < 1e-2,
                        "{r} {f}"
                    );
                }
            }
        }
        assert!(matmul(&xs, rows + 1, out_dim, in_dim, Some(&w), |_, _| {}).is_none());
    }
}
