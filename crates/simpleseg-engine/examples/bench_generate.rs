//! Times one generation: load, preprocessing + prefill (time to first token) and decoding,
//! plus peak resident memory. Ignores end-of-sequence tokens so every run decodes the same
//! number of tokens. Prints one JSON line. `scripts/bench/bench_engine.py` runs this next to
//! transformers on the same checkpoint and image.
//!
//! Run: `cargo run --release -p simpleseg-engine --example bench_generate -- MODEL_DIR IMAGE [TOKENS] [DTYPE] [RUNS] [QUANTIZE]`
//! With RUNS > 1 the reported generation is the last one (warm). QUANTIZE (q8_0, q4k)
//! quantizes at load; a folder written by `simpleseg quantize` needs none. Threads follow
//! RAYON_NUM_THREADS.

use std::time::Instant;

// The allocator and its setting are the simpleseg binary's, so that the figures are what the
// command line gets.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

use candle_core::DType;
use simpleseg_core::images::open_image;
use simpleseg_engine::{generate, load, LoadOptions};

/// Peak resident set size of this process in MiB (Linux), or 0 when unknown.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() -> simpleseg_engine::Result<()> {
    // SAFETY: sets a process-wide allocator option before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // On a rayon worker, as `simpleseg segment` and `chat` run a model.
    rayon::scope(|_| run())
}

fn run() -> simpleseg_engine::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (dir, image) = match args.as_slice() {
        [d, i, ..] => (d.clone(), i.clone()),
        _ => {
            eprintln!(
                "usage: bench_generate MODEL_DIR IMAGE [TOKENS] [f32|bf16|auto] [RUNS] [q8_0|q4k]"
            );
            std::process::exit(2);
        }
    };
    let tokens: usize = args
        .get(2)
        .map_or(64, |t| t.parse().expect("TOKENS is a number"));
    let dtype = match args.get(3).map(String::as_str) {
        Some("f32") => Some(DType::F32),
        Some("bf16") => Some(DType::BF16),
        _ => None,
    };
    let runs: usize = args
        .get(4)
        .map_or(1, |r| r.parse().expect("RUNS is a number"));
    let quantize = args
        .get(5)
        .map(|q| q.parse().expect("QUANTIZE is q8_0 or q4k"));
    let start = Instant::now();
    let model = load(
        dir.as_ref(),
        &LoadOptions {
            dtype,
            quantize,
            ..LoadOptions::default()
        },
    )?;
    let load_ms = start.elapsed().as_secs_f64() * 1e3;
    let mut config = model.generation_config().clone();
    config.do_sample = false;
    config.max_new_tokens = tokens;
    config.eos_token_ids.clear();
    let mut last = None;
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        let rgb = open_image(image.as_ref())?;
        let prompt = model.prepare(
            &rgb,
            "Output the polygon coordinates of the object in the image.",
        )?;
        let preprocess_ms = start.elapsed().as_secs_f64() * 1e3;
        let out = generate(model.as_ref(), &prompt, config.clone(), |_| {})?;
        last = Some((preprocess_ms, out));
    }
    let (preprocess_ms, out) = last.expect("at least one run");
    // The first token comes from the prefill; decoding is the n - 1 forward passes after it,
    // counted the same way as the transformers side of the benchmark.
    let decode_steps = out.token_ids.len().saturating_sub(1) as f64;
    println!(
        "{}",
        serde_json::json!({
            "engine": "simpleseg",
            "threads": rayon::current_num_threads(),
            "load_ms": load_ms,
            "preprocess_ms": preprocess_ms,
            "prefill_ms": out.timings.prefill_ms,
            "time_to_first_token_ms": preprocess_ms + out.timings.prefill_ms,
            "decode_tokens": out.token_ids.len(),
            "decode_ms": out.timings.decode_ms,
            "decode_tokens_per_s": decode_steps / (out.timings.decode_ms / 1e3).max(1e-9),
            "prompt_tokens": out.prompt_tokens,
            "peak_rss_mib": peak_rss_mib(),
        })
    );
    Ok(())
}
