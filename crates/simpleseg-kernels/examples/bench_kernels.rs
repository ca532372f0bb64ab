//! Microbenchmarks of every kernel path this CPU has, each beside candle's equivalent on the
//! same operands:
//!
//!     RAYON_NUM_THREADS=2 cargo run --release -p simpleseg-kernels --example bench_kernels
//!     RAYON_NUM_THREADS=2 cargo run --release -p simpleseg-kernels --example bench_kernels -- prefill M K N
//!     RAYON_NUM_THREADS=2 cargo run --release -p simpleseg-kernels --example bench_kernels -- experts M K N
//!     RAYON_NUM_THREADS=2 cargo run --release -p simpleseg-kernels --example bench_kernels -- attention N HEADS D SEGMENT
//!
//! - a mixture layer's expert products in a prompt (`experts M K N`: 64 experts, each `M` rows
//!   through its gated `k -> n` product and its `n -> k` down product, BF16 weights read in
//!   place; Kimi-VL's 16B size: `experts 44 2048 1408`);
//! - prefill products (`m x k` activations against an `n x k` BF16 weight): `bf16_gemm`
//!   (AVX512-BF16), `f32_gemm` (the weight widened a block at a time), candle's f32 matmul on
//!   the widened weight; `int8_gemm` (AVX-512 VNNI) on the weight quantized to q8_0 and q4k;
//! - a decode product (one row against a BF16 weight larger than the cache): `rows`, candle's
//!   BF16 matmul (whose input and output are rounded to BF16: its difference from ours);
//! - vision-tower attention (`attention`, BF16 heads read in place from a fused qkv layout)
//!   within segments at MoonViT's and Qwen2.5-VL's ViT's shapes for a 640x480 image, beside
//!   candle's f32 products and softmax per segment on the same values (`attention N HEADS D
//!   SEGMENT`: that case only; MoonViT's: `attention 1656 16 72 1656`);
//! - the integer dot products of decoding, one thread: `q4k`, `q4_0` and `q8_0` (each of its
//!   paths this CPU has) against candle's `vec_dot` on the same blocks (the input quantized
//!   once, as decoding does).
//!
//! Prints one JSON line per case: the median of several runs, GFLOP/s or GB/s of weights read,
//! and the largest difference from candle's result relative to the result's scale.

use std::time::Instant;

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_0, BlockQ8K, BlockQ8_0, GgmlType};
use candle_core::{DType, Device, Tensor};
use simpleseg_kernels::testing::Values;
use simpleseg_kernels::{attention, bf16_gemm, blocks, cpu, f32_gemm, q4_0, q4k, q8_0, rows};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn median_seconds(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Largest difference between `a` and `b`, relative to `b`'s largest magnitude.
fn relative_difference(a: &[f32], b: &[f32]) -> f32 {
    let scale = b
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> Result<()> {
    // SAFETY: sets a process-wide allocator option before any other thread exists (as the
    // simpleseg binary does).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // `bench_kernels prefill M K N`: that one prefill product only (bench_engine.py's GEMM
    // row, beside torch's matmul on the same shape).
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [case, m, k, n] = &args[..] {
        match case.as_str() {
            "prefill" => return prefill(m.parse()?, k.parse()?, n.parse()?),
            "experts" => return experts(m.parse()?, k.parse()?, n.parse()?),
            _ => {}
        }
    }
    if let [case, n, heads, d, segment] = &args[..] {
        if case == "attention" {
            return vision_attention(n.parse()?, heads.parse()?, d.parse()?, segment.parse()?);
        }
    }
    if !args.is_empty() {
        return Err(
            "usage: bench_kernels [prefill M K N | experts M K N | attention N HEADS D SEGMENT]"
                .into(),
        );
    }
    println!(
        "{{\"cpu\": {{\"avx2_fma\": {}, \"avx512_bf16\": {}, \"avx512_vnni\": {}, \"amx\": {}}}, \"threads\": {}}}",
        cpu::avx2_fma(),
        cpu::avx512_bf16(),
        cpu::avx512_vnni(),
        bf16_gemm::amx(),
        rayon::current_num_threads()
    );
    for (m, k, n) in [(256, 2048, 2048), (1024, 1280, 3420)] {
        prefill(m, k, n)?;
    }
    // MoonViT (one image of 1656 patches), Qwen2.5-VL's ViT in 64-patch windows and whole.
    for (n, heads, d, segment) in [
        (1656, 16, 72, 1656),
        (1564, 16, 80, 64),
        (1564, 16, 80, 1564),
    ] {
        vision_attention(n, heads, d, segment)?;
    }
    decode(3584, 18944)?;
    q4k_dot(18944, 3584)?;
    q4_0_dot(16384, 1408)?;
    q8_0_dot(18944, 3584)?;
    Ok(())
}

/// A mixture layer's 64 experts in a prompt, `m` rows each: the gated product (`k -> n`, gate
/// and up weights) and the down product (`n -> k`), BF16 weights read where they lie (each
/// expert's own, as a prompt's layer reads them: from memory, not cache).
fn experts(m: usize, k: usize, n: usize) -> Result<()> {
    const EXPERTS: usize = 64;
    if !bf16_gemm::amx() {
        println!(
            "{{\"case\": \"experts\", \"skipped\": \"the gated product runs on AMX tiles only\"}}"
        );
        return Ok(());
    }
    let mut values = Values(5);
    let bf = |v: &f32| half::bf16::from_f32(*v / 64.0).to_bits();
    let gate: Vec<u16> = values.take(EXPERTS * n * k).iter().map(bf).collect();
    let up: Vec<u16> = values.take(EXPERTS * n * k).iter().map(bf).collect();
    let down: Vec<u16> = values.take(EXPERTS * k * n).iter().map(bf).collect();
    let x: Vec<u16> = values.take(m * k).iter().map(bf).collect();
    let unused = |_: usize, _: &mut [u16]| unreachable!("the weights are read in place");
    let layer = || -> Option<()> {
        for e in 0..EXPERTS {
            let weight = |stored| bf16_gemm::GatedWeight {
                row: unused,
                stored: Some(stored),
                bias: None,
            };
            let expert = e * n * k..(e + 1) * n * k;
            let (g, u) = (weight(&gate[expert.clone()]), weight(&up[expert]));
            let h = bf16_gemm::gemm_gated(&x, g, u, (m, n, k))?;
            let w = &down[e * k * n..(e + 1) * k * n];
            std::hint::black_box(bf16_gemm::gemm_rounded(
                &h,
                unused,
                Some(w),
                (m, k, n),
                None,
                None,
            )?);
        }
        Some(())
    };
    layer().ok_or("the expert products' sizes")?;
    let seconds = median_seconds(5, || {
        std::hint::black_box(layer());
    });
    let flops = (EXPERTS * 3 * 2 * m * k * n) as f64;
    let bytes = (EXPERTS * 3 * k * n * 2) as f64;
    println!(
        "{{\"case\": \"experts\", \"experts\": {EXPERTS}, \"m\": {m}, \"k\": {k}, \"n\": {n}, \"ms\": {:.2}, \"gflops\": {:.1}, \"weight_gb_per_s\": {:.1}}}",
        seconds * 1e3,
        flops / seconds / 1e9,
        bytes / seconds / 1e9
    );
    Ok(())
}

/// Self-attention of `heads` heads of `d` values within segments of `segment` positions (the
/// last one shorter) over `n` positions, on BF16 values in a fused qkv layout: the fused kernel
/// beside candle's f32 products and softmax, segment by segment, on the same values.
fn vision_attention(n: usize, heads: usize, d: usize, segment: usize) -> Result<()> {
    use half::bf16;

    if !attention::available() {
        println!("{{\"case\": \"attention\", \"skipped\": \"this CPU lacks AVX512-BF16\"}}");
        return Ok(());
    }
    let width = heads * d;
    let qkv: Vec<u16> = Values(5)
        .take(n * 3 * width)
        .iter()
        .map(|x| bf16::from_f32(*x).to_bits())
        .collect();
    let segments: Vec<std::ops::Range<usize>> = (0..n)
        .step_by(segment)
        .map(|s| s..(s + segment).min(n))
        .collect();
    let view = |part: usize| attention::Heads {
        values: &qkv,
        offset: part * width,
        stride: 3 * width,
        head_stride: d,
    };
    let scale = (d as f32).powf(-0.5);
    let run = || attention::attention(view(0), view(1), view(2), &segments, heads, d, scale);
    let seconds = median_seconds(5, || {
        std::hint::black_box(run());
    });
    let ours: Vec<f32> = run()
        .ok_or("attention")?
        .iter()
        .map(|b| bf16::from_bits(*b).to_f32())
        .collect();
    let values: Vec<f32> = qkv.iter().map(|b| bf16::from_bits(*b).to_f32()).collect();
    let all = Tensor::from_vec(values, (n, 3, heads, d), &Device::Cpu)?;
    let candle = || -> candle_core::Result<Tensor> {
        let mut outputs = Vec::with_capacity(segments.len());
        for s in &segments {
            // (heads, len, d)
            let part = |i: usize| {
                all.narrow(0, s.start, s.len())?
                    .narrow(1, i, 1)?
                    .squeeze(1)?
                    .transpose(0, 1)?
                    .contiguous()
            };
            let (q, k, v) = (part(0)?, part(1)?, part(2)?);
            let scores = (q.matmul(&k.t()?)? * f64::from(scale))?;
            let e = scores.broadcast_sub(&scores.max_keepdim(2)?)?.exp()?;
            let p = e.broadcast_div(&e.sum_keepdim(2)?)?;
            outputs.push(p.matmul(&v)?.transpose(0, 1)?.reshape((s.len(), width))?);
        }
        Tensor::cat(&outputs, 0)
    };
    let reference: Vec<f32> = candle()?.flatten_all()?.to_vec1()?;
    let candle_seconds = median_seconds(3, || {
        std::hint::black_box(candle().ok());
    });
    let flops: usize = segments
        .iter()
        .map(|s| 4 * s.len() * s.len() * d * heads)
        .sum();
    println!(
        "{{\"case\": \"attention\", \"kernel\": \"{}\", \"n\": {n}, \"heads\": {heads}, \"d\": {d}, \"segment\": {segment}, \"ms\": {:.2}, \"gflops\": {:.1}, \"candle_f32_ms\": {:.2}, \"speedup_vs_candle\": {:.2}, \"relative_difference\": {:.2e}}}",
        if bf16_gemm::amx() { "amx" } else { "avx512bf16" },
        seconds * 1e3,
        flops as f64 / seconds / 1e9,
        candle_seconds * 1e3,
        candle_seconds / seconds,
        relative_difference(&ours, &reference)
    );
    Ok(())
}

/// `m x k` f32 activations against an `n x k` BF16 weight.
fn prefill(m: usize, k: usize, n: usize) -> Result<()> {
    let x = Values(1).take(m * k);
    let w: Vec<half::bf16> = Values(2)
        .take(n * k)
        .into_iter()
        .map(half::bf16::from_f32)
        .collect();
    let flops = 2.0 * (m * k * n) as f64;
    let widened: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
    let device = Device::Cpu;
    let xt = Tensor::from_slice(&x, (m, k), &device)?;
    let wt = Tensor::from_slice(&widened, (n, k), &device)?.t()?;
    let candle: Vec<f32> = xt.matmul(&wt)?.flatten_all()?.to_vec1()?;
    let candle_s = median_seconds(5, || {
        std::hint::black_box(xt.matmul(&wt).ok());
    });
    let report = |kernel: &str, seconds: f64, y: &[f32]| {
        println!(
            "{{\"case\": \"prefill\", \"m\": {m}, \"k\": {k}, \"n\": {n}, \"kernel\": \"{kernel}\", \"ms\": {:.2}, \"gflops\": {:.1}, \"candle_f32_ms\": {:.2}, \"speedup_vs_candle\": {:.2}, \"relative_difference\": {:.2e}}}",
            seconds * 1e3,
            flops / seconds / 1e9,
            candle_s * 1e3,
            candle_s / seconds,
            relative_difference(y, &candle)
        );
    };
    let widen_row =
        |j: usize, out: &mut [f32]| simpleseg_kernels::dot::widen_bf16(&w[j * k..(j + 1) * k], out);
    let y = f32_gemm::matmul(&x, m, n, k, None, widen_row).ok_or("f32_gemm sizes")?;
    let seconds = median_seconds(5, || {
        std::hint::black_box(f32_gemm::matmul(&x, m, n, k, None, widen_row));
    });
    report("f32_gemm (widened bf16)", seconds, &y);
    if bf16_gemm::available() {
        let xb: Vec<u16> = x
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect();
        // A BF16 weight read where it lies, as the engine's BF16 checkpoints are.
        let wb: Vec<u16> = w.iter().map(|v| v.to_bits()).collect();
        let y = bf16_gemm::gemm_stored(&xb, &wb, m, n, k).ok_or("bf16_gemm")?;
        let seconds = median_seconds(5, || {
            std::hint::black_box(bf16_gemm::gemm_stored(&xb, &wb, m, n, k));
        });
        // The activations are rounded to BF16 here, hence a larger difference.
        let path = if bf16_gemm::amx() {
            "amx"
        } else {
            "avx512_bf16"
        };
        report(&format!("bf16_gemm ({path})"), seconds, &y);
        // As the engine's prefill stores its outputs: plus a bias, rounded to BF16.
        let bias = Values(3).take(n);
        // Rows of a partial last tile of 16 features are read through `row`.
        let row = |j: usize, out: &mut [u16]| out.copy_from_slice(&wb[j * k..(j + 1) * k]);
        let rounded = || bf16_gemm::gemm_rounded(&xb, row, Some(&wb), (m, n, k), Some(&bias), None);
        if let Some(bits) = rounded() {
            let seconds = median_seconds(5, || {
                std::hint::black_box(rounded());
            });
            let y: Vec<f32> = bits
                .iter()
                .zip(bias.iter().cycle())
                .map(|(b, bias)| half::bf16::from_bits(*b).to_f32() - bias)
                .collect();
            report(
                &format!("bf16_gemm ({path}), plus a bias, rounded"),
                seconds,
                &y,
            );
        }
    } else {
        println!("{{\"case\": \"prefill\", \"kernel\": \"bf16_gemm\", \"skipped\": \"this CPU lacks AVX512-BF16\"}}");
    }
    #[cfg(target_arch = "x86_64")]
    {
        use simpleseg_kernels::int8_gemm::{self, UnsignedBlock, Weights};
        if !int8_gemm::available() {
            println!("{{\"case\": \"prefill\", \"kernel\": \"int8_gemm\", \"skipped\": \"this CPU lacks AVX-512 VNNI\"}}");
            return Ok(());
        }
        // The same weights quantized; the difference is then mostly the quantization's.
        fn time<T: GgmlType + blocks::PlainBlock, B: blocks::PlainBlock + Sync>(
            widened: &[f32],
            (m, n, k): (usize, usize, usize),
            x: &[f32],
            weights: Weights,
            convert: fn(&[B], &mut [UnsignedBlock]),
        ) -> Result<(f64, Vec<f32>)> {
            let mut q = vec![T::zeros(); n * k / T::BLCK_SIZE];
            T::from_float(widened, &mut q);
            let typed: &[B] = blocks::view(blocks::bytes_of(&q)).ok_or("block layout")?;
            let per_row = k / T::BLCK_SIZE;
            let row = |j: usize, out: &mut [UnsignedBlock]| {
                convert(&typed[j * per_row..(j + 1) * per_row], out)
            };
            let y = int8_gemm::gemm(x, m, n, k, weights, row).ok_or("int8_gemm sizes")?;
            let seconds = median_seconds(5, || {
                std::hint::black_box(int8_gemm::gemm(x, m, n, k, weights, row));
            });
            Ok((seconds, y))
        }
        let (seconds, y) = time::<BlockQ8_0, q8_0::Q8_0Block>(
            &widened,
            (m, n, k),
            &x,
            Weights::Q8_0,
            int8_gemm::q8_0_row,
        )?;
        report("int8_gemm q8_0 (avx512_vnni)", seconds, &y);
        if k.is_multiple_of(256) {
            let (seconds, y) = time::<BlockQ4K, q4k::Q4KBlock>(
                &widened,
                (m, n, k),
                &x,
                Weights::Q4K,
                int8_gemm::q4k_row,
            )?;
            report("int8_gemm q4k (avx512_vnni)", seconds, &y);
        }
    }
    Ok(())
}

/// One row against an `n x k` BF16 weight, eight copies in turn so that weights come from
/// memory, as a layer's do.
fn decode(k: usize, n: usize) -> Result<()> {
    const COPIES: usize = 4;
    let x = Values(3).take(k);
    let copies: Vec<Vec<half::bf16>> = (0..COPIES as u64)
        .map(|c| {
            Values(10 + c)
                .take(n * k)
                .into_iter()
                .map(half::bf16::from_f32)
                .collect()
        })
        .collect();
    let y = rows::matmul(&x, 1, rows::Weights::Bf16(&copies[0]), n, k).ok_or("rows sizes")?;
    let ours = median_seconds(7, || {
        for w in &copies {
            std::hint::black_box(rows::matmul(&x, 1, rows::Weights::Bf16(w), n, k));
        }
    }) / COPIES as f64;
    let device = Device::Cpu;
    let xt = Tensor::from_slice(&x, (1, k), &device)?.to_dtype(DType::BF16)?;
    let tensors = copies
        .iter()
        .map(|w| Tensor::from_slice(w, (n, k), &device)?.t())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let candle: Vec<f32> = xt
        .matmul(&tensors[0])?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let theirs = median_seconds(7, || {
        for w in &tensors {
            std::hint::black_box(xt.matmul(w).ok());
        }
    }) / COPIES as f64;
    let gb = (n * k * 2) as f64 / 1e9;
    println!(
        "{{\"case\": \"decode\", \"k\": {k}, \"n\": {n}, \"kernel\": \"rows (bf16)\", \"ms\": {:.2}, \"gb_per_s\": {:.1}, \"candle_bf16_ms\": {:.2}, \"speedup_vs_candle\": {:.2}, \"relative_difference\": {:.2e}}}",
        ours * 1e3,
        gb / ours,
        theirs * 1e3,
        theirs / ours,
        relative_difference(&y, &candle)
    );
    Ok(())
}

/// `n` rows of q4k weights against one q8k-quantized input, one thread.
fn q4k_dot(n: usize, k: usize) -> Result<()> {
    if !q4k::available() {
        println!("{{\"case\": \"q4k dot\", \"skipped\": \"this CPU lacks AVX-512 VNNI\"}}");
        return Ok(());
    }
    let mut blocks_ = vec![BlockQ4K::zeros(); n * k / 256];
    BlockQ4K::from_float(&Values(4).take(n * k), &mut blocks_);
    let x = Values(5).take(k);
    let mut xq = vec![BlockQ8K::zeros(); k / 256];
    BlockQ8K::from_float(&x, &mut xq);
    let ours_blocks: &[q4k::Q4KBlock] =
        blocks::view(blocks::bytes_of(&blocks_)).ok_or("q4k view")?;
    let prepared = q4k::PreparedQ8K::new(&x);
    let per_row = k / 256;
    let ours = |out: &mut Vec<f32>| {
        out.clear();
        for row in ours_blocks.chunks(per_row) {
            out.push(q4k::dot([row], &prepared).map_or(f32::NAN, |[v]| v));
        }
    };
    let theirs = |out: &mut Vec<f32>| {
        out.clear();
        for row in blocks_.chunks(per_row) {
            out.push(BlockQ4K::vec_dot(k, row, &xq));
        }
    };
    integer_report(
        "q4k dot",
        n,
        k,
        std::mem::size_of_val(&blocks_[..]),
        ours,
        theirs,
    );
    Ok(())
}

/// `n` rows of q4_0 weights against one q8_0-quantized input, one thread.
fn q4_0_dot(n: usize, k: usize) -> Result<()> {
    if !q4_0::available() {
        println!("{{\"case\": \"q4_0 dot\", \"skipped\": \"this CPU lacks AVX-512 VNNI\"}}");
        return Ok(());
    }
    let mut blocks_ = vec![BlockQ4_0::zeros(); n * k / 32];
    BlockQ4_0::from_float(&Values(6).take(n * k), &mut blocks_);
    let x = Values(7).take(k);
    let mut xq = vec![BlockQ8_0::zeros(); k / 32];
    BlockQ8_0::from_float(&x, &mut xq);
    let ours_blocks: &[q4_0::Q4_0Block] =
        blocks::view(blocks::bytes_of(&blocks_)).ok_or("q4_0 view")?;
    let prepared = q4_0::PreparedQ8_0::new(&x);
    let per_row = k / 32;
    let ours = |out: &mut Vec<f32>| {
        out.clear();
        for row in ours_blocks.chunks(per_row) {
            out.push(q4_0::dot(row, &prepared).unwrap_or(f32::NAN));
        }
    };
    let theirs = |out: &mut Vec<f32>| {
        out.clear();
        for row in blocks_.chunks(per_row) {
            out.push(BlockQ4_0::vec_dot(k, row, &xq));
        }
    };
    integer_report(
        "q4_0 dot",
        n,
        k,
        std::mem::size_of_val(&blocks_[..]),
        ours,
        theirs,
    );
    Ok(())
}

/// `n` rows of q8_0 weights against one q8_0-quantized input, one thread, on each path.
fn q8_0_dot(n: usize, k: usize) -> Result<()> {
    let mut blocks_ = vec![BlockQ8_0::zeros(); n * k / 32];
    BlockQ8_0::from_float(&Values(8).take(n * k), &mut blocks_);
    let mut xq = vec![BlockQ8_0::zeros(); k / 32];
    BlockQ8_0::from_float(&Values(9).take(k), &mut xq);
    let ours_blocks: &[q8_0::Q8_0Block] =
        blocks::view(blocks::bytes_of(&blocks_)).ok_or("q8_0 view")?;
    let input: &[q8_0::Q8_0Block] = blocks::view(blocks::bytes_of(&xq)).ok_or("q8_0 view")?;
    let per_row = k / 32;
    for (path, case) in [
        (q8_0::Path::Avx512Vnni, "q8_0 dot (AVX-512 VNNI)"),
        (q8_0::Path::Avx2, "q8_0 dot (AVX2)"),
    ] {
        if !path.available() {
            println!("{{\"case\": \"{case}\", \"skipped\": \"this CPU lacks it\"}}");
            continue;
        }
        let ours = |out: &mut Vec<f32>| {
            out.clear();
            for row in ours_blocks.chunks(per_row) {
                out.push(q8_0::dot_on(path, row, input).unwrap_or(f32::NAN));
            }
        };
        let theirs = |out: &mut Vec<f32>| {
            out.clear();
            for row in blocks_.chunks(per_row) {
                out.push(BlockQ8_0::vec_dot(k, row, &xq));
            }
        };
        integer_report(
            case,
            n,
            k,
            std::mem::size_of_val(&blocks_[..]),
            ours,
            theirs,
        );
    }
    Ok(())
}

fn integer_report(
    case: &str,
    n: usize,
    k: usize,
    bytes: usize,
    mut ours: impl FnMut(&mut Vec<f32>),
    mut theirs: impl FnMut(&mut Vec<f32>),
) {
    let (mut a, mut b) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let ours_s = median_seconds(7, || ours(&mut a));
    let theirs_s = median_seconds(7, || theirs(&mut b));
    let gb = bytes as f64 / 1e9;
    println!(
        "{{\"case\": \"{case}\", \"n\": {n}, \"k\": {k}, \"threads\": 1, \"ms\": {:.2}, \"gb_per_s\": {:.1}, \"candle_ms\": {:.2}, \"speedup_vs_candle\": {:.2}, \"relative_difference\": {:.2e}}}",
        ours_s * 1e3,
        gb / ours_s,
        theirs_s * 1e3,
        theirs_s / ours_s,
        relative_difference(&a, &b)
    );
}
