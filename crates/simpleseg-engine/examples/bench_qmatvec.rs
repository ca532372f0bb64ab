//! Decoding's matrix-vector products, one input row against a quantized weight: simpleseg's
//! kernel (what `QuantizedMatrix::rows_matmul` runs on this CPU) beside candle's dot product
//! on the same blocks, and the memory bandwidth that bounds both.
//!
//!     RAYON_NUM_THREADS=2 cargo run --release -p simpleseg-engine --example bench_qmatvec
//!
//! Shapes are Qwen2.5-VL-7B's MLP in q4k and in q8_0 (`3584 -> 18944` gate/up, `18944 -> 3584`
//! down) and a Kimi-VL expert's gate or up projection in q4k (`2048 -> 1408`) and its down
//! projection in q4_0 (`1408 -> 2048`); random weights, enough
//! matrices of each shape multiplied in turn (as layers are) that the weights come from
//! memory, not the cache. Prints one JSON line per shape with the median of 20 runs of each.

use std::time::Instant;

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_0, BlockQ8_0, GgmlType};
use candle_core::Module;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use simpleseg_engine::io::quantized::QuantizedMatrix;
use simpleseg_engine::layers::Linear;

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
    let big = vec![1u64; 512 << 20 >> 3];
    let bandwidth = (big.len() * 8) as f64 / read_bandwidth(&big) / 1e9;
    drop(big);
    // Qwen2.5-VL-7B's MLP in q4k and q8_0; a Kimi-VL expert's gate/up in q4k and its down
    // projection in q4_0 (1408-wide rows are not whole q4k blocks), as many experts as make
    // ~80 MB.
    shape::<BlockQ4K>(&mut rng, 18944, 3584, COPIES, bandwidth)?;
    shape::<BlockQ4K>(&mut rng, 3584, 18944, COPIES, bandwidth)?;
    shape::<BlockQ4K>(&mut rng, 1408, 2048, 48, bandwidth)?;
    shape::<BlockQ4_0>(&mut rng, 2048, 1408, 48, bandwidth)?;
    shape::<BlockQ8_0>(&mut rng, 18944, 3584, COPIES, bandwidth)?;
    shape::<BlockQ8_0>(&mut rng, 3584, 18944, COPIES, bandwidth)?;
    Ok(())
}

/// Times `copies` random `out_dim x in_dim` matrices of `T` blocks; prints one JSON line.
fn shape<T: GgmlType + Clone + Send + Sync>(
    rng: &mut rand::rngs::StdRng,
    out_dim: usize,
    in_dim: usize,
    copies: usize,
    bandwidth: f64,
) -> Result<(), Box<dyn std::error::Error>>
where
    T::VecDotType: Send + Sync,
{
    let threads = rayon::current_num_threads();
    let values: Vec<f32> = (0..out_dim * in_dim)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let mut blocks = vec![T::zeros(); out_dim * in_dim / T::BLCK_SIZE];
    T::from_float(&values, &mut blocks);
    drop(values);
    // SAFETY: ggml block types are `repr(C)` plain data (ggml's layout).
    let bytes = unsafe {
        std::slice::from_raw_parts(
            blocks.as_ptr().cast::<u8>(),
            std::mem::size_of_val(&blocks[..]),
        )
    };
    let matrices = (0..copies)
        .map(|_| QuantizedMatrix::owned(bytes, out_dim, in_dim, T::DTYPE))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let copied: Vec<Vec<T>> = (0..copies).map(|_| blocks.clone()).collect();
    let x: Vec<f32> = (0..in_dim)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();

    let ours = time(|| {
        for matrix in &matrices {
            std::hint::black_box(matrix.rows_matmul(&x, 1).expect("multiplies"));
        }
    }) / copies as f64;
    let per_row = in_dim / T::BLCK_SIZE;
    let quantized_input = || {
        let mut xq = vec![T::VecDotType::zeros(); in_dim / T::VecDotType::BLCK_SIZE];
        T::VecDotType::from_float(&x, &mut xq);
        xq
    };
    let candle = time(|| {
        for blocks in &copied {
            let xq = quantized_input();
            let y: Vec<f32> = blocks
                .par_chunks(per_row)
                .with_min_len(32)
                .map(|row| T::vec_dot(in_dim, row, &xq))
                .collect();
            std::hint::black_box(y);
        }
    }) / copies as f64;
    // The same weights in BF16 (dequantized), through a linear layer's few-rows path.
    let dense = candle_core::Tensor::from_vec(
        matrices[0].dequantize(),
        (out_dim, in_dim),
        &candle_core::Device::Cpu,
    )?
    .to_dtype(candle_core::DType::BF16)?;
    let layers: Vec<Linear> = (0..copies)
        .map(|_| Ok(Linear::new(dense.copy()?, None)))
        .collect::<candle_core::Result<_>>()?;
    let x_bf16 = candle_core::Tensor::from_slice(&x, (1, in_dim), &candle_core::Device::Cpu)?
        .to_dtype(candle_core::DType::BF16)?;
    let bf16 = time(|| {
        for layer in &layers {
            std::hint::black_box(layer.forward(&x_bf16).expect("multiplies"));
        }
    }) / copies as f64;
    let a = matrices[0].rows_matmul(&x, 1)?;
    let xq = quantized_input();
    let max_diff = blocks
        .chunks(per_row)
        .zip(&a)
        .map(|(row, v)| (T::vec_dot(in_dim, row, &xq) - v).abs())
        .fold(0f32, f32::max);
    let gb = bytes.len() as f64 / 1e9;
    println!(
        "{}",
        serde_json::json!({
            "shape": [out_dim, in_dim],
            "type": format!("{:?}", T::DTYPE),
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
    Ok(())
}
