//! The element-wise and attention ops of a vision-tower layer at real sizes, simpleseg's
//! (vectorized `exp`, `simpleseg_kernels::math`) beside candle's (libm's scalar `expf` and
//! `tanhf` per element), on the same f32 tensors:
//!
//!     RAYON_NUM_THREADS=2 cargo run --release -p simpleseg-engine --example bench_vision_ops
//!
//! Shapes: a 640x480 image is 1564 patches (46 x 34 after the processors' rounding to
//! multiples of 28) for both towers. MoonViT (Kimi-VL, 27 layers): tanh-GELU over
//! 1564 x 4304, attention of 16 heads of 72 over the whole image. Qwen2.5-VL's ViT (32
//! layers): SiLU over 1564 x 3420, attention of 16 heads of 80 in 64-patch windows (28 layers)
//! or over the whole image (4), in f32 and in BF16 (BF16 goes through the BF16 GEMM on CPUs
//! with AVX512-BF16). The 7B language model's prefill: SiLU over 466 x 18944 per
//! layer (28 layers). Prints one JSON line per op: median milliseconds of 9 runs for one layer,
//! and the largest difference from candle's result relative to its largest magnitude.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use simpleseg_engine::layers::{attention, gelu_tanh, silu, softmax_last_dim, Mode};

fn median_ms(mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..9)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn random(shape: &[usize], seed: u64) -> candle_core::Result<Tensor> {
    let n = shape.iter().product();
    let values = simpleseg_kernels::testing::Values(seed).take(n);
    Tensor::from_vec(values, shape, &Device::Cpu)
}

fn relative(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    let b = &b.to_dtype(DType::F32)?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(simpleseg_engine::layers::max_abs_diff(a, b)? / scale.max(f32::MIN_POSITIVE))
}

fn report(op: &str, shape: &[usize], layers: usize, ours: f64, candle: f64, difference: f32) {
    println!(
        "{}",
        serde_json::json!({
            "op": op,
            "shape": shape,
            "threads": rayon::current_num_threads(),
            "simpleseg_ms": ours,
            "candle_ms": candle,
            "speedup": candle / ours,
            "layers": layers,
            "saved_per_image_s": (candle - ours) * layers as f64 / 1e3,
            "relative_difference": difference,
        })
    );
}

fn elementwise(
    op: &str,
    shape: &[usize],
    layers: usize,
    ours: fn(&Tensor) -> candle_core::Result<Tensor>,
    candle: fn(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<()> {
    let x = random(shape, 1)?;
    let ours_ms = median_ms(|| {
        std::hint::black_box(ours(&x).expect("runs"));
    });
    let candle_ms = median_ms(|| {
        std::hint::black_box(candle(&x).expect("runs"));
    });
    let difference = relative(&ours(&x)?, &candle(&x)?)?;
    report(op, shape, layers, ours_ms, candle_ms, difference);
    Ok(())
}

/// Attention as the towers run it (`(1, heads, len, head_dim)` per image or window), against
/// candle's products and softmax on the same values (computed in f32, as candle's BF16
/// products are slower on the CPU).
fn attention_case(
    op: &str,
    dtype: DType,
    [heads, len, head_dim]: [usize; 3],
    groups: usize,
    layers: usize,
) -> candle_core::Result<()> {
    let shape = [groups, heads, len, head_dim];
    let [q, k, v] = [2, 3, 4].map(|seed| {
        random(&shape, seed)
            .and_then(|t| t.to_dtype(dtype))
            .expect("random values")
    });
    let scale = (head_dim as f64).powf(-0.5);
    let candle_attention = || -> candle_core::Result<Tensor> {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let scores = (f32(&q)?.matmul(&f32(&k)?.t()?)? * scale)?;
        candle_nn::ops::softmax_last_dim(&scores)?
            .matmul(&f32(&v)?)?
            .to_dtype(dtype)
    };
    let ours_ms = median_ms(|| {
        std::hint::black_box(attention(&q, &k, &v, None, scale, Mode::Infer).expect("runs"));
    });
    let candle_ms = median_ms(|| {
        std::hint::black_box(candle_attention().expect("runs"));
    });
    let difference = relative(
        &attention(&q, &k, &v, None, scale, Mode::Infer)?,
        &candle_attention()?,
    )?;
    report(op, &shape, layers, ours_ms, candle_ms, difference);
    Ok(())
}

fn main() -> candle_core::Result<()> {
    elementwise(
        "tanh-GELU (MoonViT MLP)",
        &[1564, 4304],
        27,
        gelu_tanh,
        |x| x.gelu(),
    )?;
    elementwise("SiLU (Qwen2.5-VL ViT MLP)", &[1564, 3420], 32, silu, |x| {
        x.silu()
    })?;
    elementwise(
        "SiLU (7B language model MLP, 466-token prefill)",
        &[466, 18944],
        28,
        silu,
        |x| x.silu(),
    )?;
    elementwise(
        "softmax (MoonViT scores)",
        &[16, 1564, 1564],
        27,
        |x| softmax_last_dim(x, Mode::Infer),
        candle_nn::ops::softmax_last_dim,
    )?;
    for dtype in [DType::F32, DType::BF16] {
        let name = |what: &str| format!("attention {dtype:?} ({what})");
        attention_case(&name("MoonViT, whole image"), dtype, [16, 1564, 72], 1, 27)?;
        attention_case(
            &name("Qwen2.5-VL ViT, 64-patch windows"),
            dtype,
            [16, 64, 80],
            24,
            28,
        )?;
        attention_case(
            &name("Qwen2.5-VL ViT, whole image"),
            dtype,
            [16, 1564, 80],
            1,
            4,
        )?;
    }
    Ok(())
}
