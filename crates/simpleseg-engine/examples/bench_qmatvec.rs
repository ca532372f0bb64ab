//! Decoding's matrix-vector products at the 7B size, one input row against a q4k weight:
//! simpleseg's kernel (what `QuantizedMatrix::rows_matmul` runs on this CPU) beside candle's
//! q4k x q8k dot product on the same blocks, and the memory bandwidth that bounds both.
//!
//!     RAYON_NUM_THREADS=2 cargo run --release -p simpleseg-engine --example bench_qmatvec
//!
//! Shapes are Qwen2.5-VL-7B's MLP (`3584 -> 18944` gate/up, `18944 -> 3584` down); random
//! weights, [`COPIES`] matrices of each shape multiplied in turn (as layers are) so that the
//! weights come from memory, not the cache. Prints one JSON line per shape with the median of
//! 20 runs of each.

use std::time::Instant;

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ8K, GgmlType};
use candle_core::quantized::GgmlDType;
use candle_core::Module;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use simpleseg_engine::nn::Linear;
use simpleseg_engine::quantized::QuantizedMatrix;

const RUNS: usize = 20;
/// Matrices per shape: 8 x 38 MB, well beyond the last-level cache.
const COPIES: usize = 8;

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn time(mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..RUNS)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// Seconds to read `bytes` once with every thread (summing u64 words).
fn read_bandwidth(bytes: &[u64]) -> f64 {
    time(|| {
        let sum: u64 = bytes
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, b| a.wrapping_add(*b)))
            .sum();
        std::hint::black_box(sum);
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let threads = rayon::current_num_threads();
    let big = vec![1u64; 512 << 20 >> 3];
    let bandwidth = (big.len() * 8) as f64 / read_bandwidth(&big) / 1e9;
    drop(big);
    for (out_dim, in_dim) in [(18944, 3584), (3584, 18944)] {
        let values: Vec<f32> = (0..out_dim * in_dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let mut blocks = vec![BlockQ4K::zeros(); out_dim * in_dim / BlockQ4K::BLCK_SIZE];
        BlockQ4K::from_float(&values, &mut blocks);
        drop(values);
        // SAFETY: `BlockQ4K` is `repr(C)` plain data (ggml's layout).
        let bytes = unsafe {
            std::slice::from_raw_parts(
                blocks.as_ptr().cast::<u8>(),
                std::mem::size_of_val(&blocks[..]),
            )
        };
        let matrices = (0..COPIES)
            .map(|_| QuantizedMatrix::owned(bytes, out_dim, in_dim, GgmlDType::Q4K))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let copies: Vec<Vec<BlockQ4K>> = (0..COPIES).map(|_| blocks.clone()).collect();
        let x: Vec<f32> = (0..in_dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();

        let ours = time(|| {
            for matrix in &matrices {
                std::hint::black_box(matrix.rows_matmul(&x, 1).expect("multiplies"));
            }
        }) / COPIES as f64;
        let per_row = in_dim / BlockQ4K::BLCK_SIZE;
        let candle = time(|| {
            for blocks in &copies {
                let mut xq = vec![BlockQ8K::zeros(); per_row];
                BlockQ8K::from_float(&x, &mut xq);
                let y: Vec<f32> = blocks
                    .par_chunks(per_row)
                    .with_min_len(32)
                    .map(|row| BlockQ4K::vec_dot(in_dim, row, &xq))
                    .collect();
                std::hint::black_box(y);
            }
        }) / COPIES as f64;
        // The same weights in BF16 (dequantized), through a linear layer's few-rows path.
        let dense = candle_core::Tensor::from_vec(
            matrices[0].dequantize(),
            (out_dim, in_dim),
            &candle_core::Device::Cpu,
        )?
        .to_dtype(candle_core::DType::BF16)?;
        let layers: Vec<Linear> = (0..COPIES)
            .map(|_| Ok(Linear::new(dense.copy()?, None)))
            .collect::<candle_core::Result<_>>()?;
        let x_bf16 = candle_core::Tensor::from_slice(&x, (1, in_dim), &candle_core::Device::Cpu)?
            .to_dtype(candle_core::DType::BF16)?;
        let bf16 = time(|| {
            for layer in &layers {
                std::hint::black_box(layer.forward(&x_bf16).expect("multiplies"));
            }
        }) / COPIES as f64;
        let a = matrices[0].rows_matmul(&x, 1)?;
        let mut xq = vec![BlockQ8K::zeros(); per_row];
        BlockQ8K::from_float(&x, &mut xq);
        let max_diff = blocks
            .chunks(per_row)
            .zip(&a)
            .map(|(row, v)| (BlockQ4K::vec_dot(in_dim, row, &xq) - v).abs())
            .fold(0f32, f32::max);
        let gb = bytes.len() as f64 / 1e9;
        println!(
            "{}",
            serde_json::json!({
                "shape": [out_dim, in_dim],
                "threads": threads,
                "weight_mb": bytes.len() as f64 / 1e6,
                "simpleseg_ms": ours * 1e3,
                "candle_ms": candle * 1e3,
                "speedup": candle / ours,
                "simpleseg_gb_per_s": gb / ours,
                "candle_gb_per_s": gb / candle,
                "read_bandwidth_gb_per_s": bandwidth,
                "max_abs_diff": max_diff,
                "bf16_ms": bf16 * 1e3,
                "bf16_gb_per_s": (out_dim * in_dim * 2) as f64 / 1e9 / bf16,
            })
        );
    }
    Ok(())
}
