//! Few-rows products `x W^T` (decoding): one dot product per output, each weight row read once
//! and accumulated in f32, in parallel over the weight's rows.
//!
//! Decoding multiplies a few rows by every weight. candle's general BF16 matmul repacks the
//! whole weight on each call, which made a 7B-size token take ~15 s on 2 cores, where reading
//! the weights once allows about 1 s. And each output is one dot product computed the same way
//! whatever the number of rows, so a sequence decoded in a batch gets exactly the numbers it
//! gets alone.

use rayon::prelude::*;

use crate::dot::{dot_bf16, dot_bf16_rows, dot_bf16_rows_of, dot_f16, dot_f32};

/// Weight rows multiplied side by side by the BF16 row kernel.
const GROUP: usize = 8;

/// A weight's values as stored, row-major `(out_dim, in_dim)`.
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    /// BF16 values.
    Bf16(&'a [half::bf16]),
    /// F16 values.
    F16(&'a [half::f16]),
    /// F32 values.
    F32(&'a [f32]),
}

/// `x W^T` for `rows` rows of `x` (`rows x in_dim`, f32, row-major): `rows x out_dim` f32.
/// `None` when the operands' lengths do not match the sizes.
pub fn matmul(
    xs: &[f32],
    rows: usize,
    w: Weights,
    out_dim: usize,
    in_dim: usize,
) -> Option<Vec<f32>> {
    let stored = match w {
        Weights::Bf16(d) => d.len(),
        Weights::F16(d) => d.len(),
        Weights::F32(d) => d.len(),
    };
    if xs.len() != rows * in_dim || stored != out_dim * in_dim {
        return None;
    }
    // One chunk of `rows` outputs per weight row (output feature), in parallel.
    let mut by_feature = vec![0f32; out_dim * rows];
    macro_rules! run {
        ($w:expr, $dot:ident) => {
            by_feature
                .par_chunks_mut(rows.max(1))
                .zip($w.par_chunks(in_dim.max(1)))
                .with_min_len(64)
                .for_each(|(out, w_row)| {
                    for (r, o) in out.iter_mut().enumerate() {
                        *o = $dot(&xs[r * in_dim..(r + 1) * in_dim], w_row);
                    }
                })
        };
    }
    match w {
        Weights::Bf16(data) => {
            if crate::cpu::avx2_fma() && in_dim > 0 && rows > 0 {
                // Groups of weight rows; a feature's group never depends on `rows`.
                by_feature
                    .par_chunks_mut(GROUP * rows)
                    .zip(data.par_chunks(GROUP * in_dim))
                    .with_min_len(16)
                    .for_each(|(out, w_rows)| {
                        let group: Vec<&[half::bf16]> = w_rows.chunks(in_dim).collect();
                        let x_row = |r: usize| &xs[r * in_dim..(r + 1) * in_dim];
                        let Ok(g) = <[&[half::bf16]; GROUP]>::try_from(&group[..]) else {
                            // The weight's last, partial group.
                            for r in 0..rows {
                                for (k, w_row) in group.iter().enumerate() {
                                    out[k * rows + r] = dot_bf16(x_row(r), w_row);
                                }
                            }
                            return;
                        };
                        let mut store = |r: usize, sums: &[[f32; GROUP]]| {
                            for (s, together) in sums.iter().enumerate() {
                                for (k, v) in together.iter().enumerate() {
                                    out[k * rows + r + s] = *v;
                                }
                            }
                        };
                        // Rows in threes: each weight value widened once for three.
                        for r in (0..rows).step_by(3) {
                            match rows - r {
                                1 => store(r, &[dot_bf16_rows(x_row(r), g)]),
                                2 => store(r, &dot_bf16_rows_of([x_row(r), x_row(r + 1)], g)),
                                _ => {
                                    let three = [x_row(r), x_row(r + 1), x_row(r + 2)];
                                    store(r, &dot_bf16_rows_of(three, g))
                                }
                            }
                        }
                    });
            } else {
                run!(data, dot_bf16)
            }
        }
        Weights::F16(data) => run!(data, dot_f16),
        Weights::F32(data) => run!(data, dot_f32),
    }
    let mut y = vec![0f32; rows * out_dim];
    for (f, values) in by_feature.chunks(rows.max(1)).enumerate() {
        for (r, v) in values.iter().enumerate() {
            y[r * out_dim + f] = *v;
        }
    }
    Some(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Values;

    /// Each output equals the dot product the row kernels compute for it alone, and a row's
    /// outputs do not depend on the other rows.
    #[test]
    fn outputs_are_single_dot_products_of_the_row() {
        let (out_dim, in_dim) = (37, 300);
        let w: Vec<half::bf16> = Values(1)
            .take(out_dim * in_dim)
            .into_iter()
            .map(half::bf16::from_f32)
            .collect();
        let wf: Vec<f32> = Values(2).take(out_dim * in_dim);
        let xs = Values(3).take(5 * in_dim);
        let y = matmul(&xs, 5, Weights::Bf16(&w), out_dim, in_dim).unwrap();
        for r in 0..5 {
            let alone = matmul(
                &xs[r * in_dim..(r + 1) * in_dim],
                1,
                Weights::Bf16(&w),
                out_dim,
                in_dim,
            )
            .unwrap();
            assert_eq!(&y[r * out_dim..(r + 1) * out_dim], &alone[..]);
            for f in 0..out_dim {
                let exact: f64 = (0..in_dim)
                    .map(|k| f64::from(xs[r * in_dim + k]) * f64::from(w[f * in_dim + k].to_f32()))
                    .sum();
                assert!(
                    (f64::from(y[r * out_dim + f]) - exact).abs() < 1e-3,
                    "{r} {f}"
                );
            }
        }
        let y = matmul(&xs, 5, Weights::F32(&wf), out_dim, in_dim).unwrap();
        assert_eq!(
            y[out_dim + 3],
            dot_f32(&xs[in_dim..2 * in_dim], &wf[3 * in_dim..4 * in_dim])
        );
        assert!(matmul(&xs, 4, Weights::F32(&wf), out_dim, in_dim).is_none());
    }
}
