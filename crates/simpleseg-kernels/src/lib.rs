//! The CPU kernels of simpleseg: every SIMD and `unsafe` routine of the engine lives here,
//! each behind a safe function that checks what it needs (the CPU's instructions, its
//! operands' lengths) at run time and falls back, or answers `None`, where that is missing.
//!
//! - [`cpu`]: the instruction sets this CPU has, detected once.
//! - [`dot`]: f32 dot products of f32, BF16 and F16 weights (AVX2 and FMA, or portable), and
//!   BF16 widening.
//! - [`rows`]: few-rows products against BF16, F16 and F32 weights, one dot product per
//!   output, in parallel (decoding).
//! - [`f32_gemm`]: many-rows products against weights widened a block at a time (prefill).
//! - [`bf16_gemm`]: BF16 GEMM with AVX512-BF16 (prefill against BF16 weights), on
//!   [`amx`] tiles where the CPU has them.
//! - [`int8_gemm`]: integer GEMM with AVX-512 VNNI (prefill against quantized weights).
//! - [`attention`]: self-attention within segments (vision towers' images and windows)
//!   over BF16 heads read in place, on the BF16 GEMM's micro-kernel or on AMX tiles, and a
//!   prompt's causal attention with grouped-query heads on AMX tiles.
//! - [`latent_attention`]: multi-head latent attention's decoding steps in the absorbed form,
//!   weights and cache read in place.
//! - [`math`]: vectorized `exp`, SiLU, tanh-GELU and softmax (activations and attention),
//!   LayerNorm rows, and one-pass BF16 kernels (RMSNorm, the rotary embedding, `silu(gate) *
//!   up`, rounding to BF16) that round as the composed ops do.
//! - [`q4k`], [`q4_0`]: q4k x q8k and q4_0 x q8_0 dot products with AVX-512 VNNI, and
//!   [`q8_0`]: q8_0 x q8_0 with AVX-512 VNNI or AVX2 (decoding against quantized weights);
//!   [`blocks`], the typed view of quantized bytes they read; [`dequantize`]: q8_0, q4k and q4_0
//!   rows widened to BF16 for the BF16 GEMM (prefill against quantized weights on AMX).
//!
//! Every kernel is tested against a portable or reference computation (candle's ggml dot
//! products for the integer kernels); `examples/bench_kernels.rs` times them.

#![warn(clippy::unwrap_used, clippy::expect_used)]
#![warn(missing_docs)]

#[cfg(target_arch = "x86_64")]
pub mod amx;
#[cfg(target_arch = "x86_64")]
mod amx_attention;
pub mod attention;
pub mod bf16_gemm;
pub mod blocks;
pub mod cpu;
#[cfg(target_arch = "x86_64")]
pub mod dequantize;
pub mod dot;
pub mod f32_gemm;
#[cfg(target_arch = "x86_64")]
pub mod int8_gemm;
pub mod latent_attention;
pub mod math;
mod output;
#[cfg(target_arch = "x86_64")]
pub mod q4_0;
#[cfg(target_arch = "x86_64")]
pub mod q4k;
#[cfg(target_arch = "x86_64")]
pub mod q8_0;
pub mod rows;
pub mod testing;
