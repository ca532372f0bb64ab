//! Times a checkpoint's vision tower (and projector) alone on one image: the family's
//! `image_features` on the prepared prompt's pixels, after one warm-up run. Prints one JSON
//! line: the median of RUNS runs in milliseconds, the patches and the threads.
//! `scripts/bench/bench_engine.py --kimi16b` prints it beside transformers' vision tower time.
//!
//! Run: `RAYON_NUM_THREADS=2 cargo run --release -p simpleseg-engine --example bench_vision -- MODEL_DIR IMAGE [RUNS] [f32|bf16|auto]`

use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

use candle_core::DType;
use simpleseg_core::images::open_image;
use simpleseg_engine::image_processing::ProcessedImage;
use simpleseg_engine::layers::Mode;
use simpleseg_engine::models::family::PromptPreparer;
use simpleseg_engine::models::{kimi_vl, qwen2_5_vl};
use simpleseg_engine::{HfFolder, LoadOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: sets a process-wide allocator option before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, image, rest @ ..] = args.as_slice() else {
        eprintln!("usage: bench_vision MODEL_DIR IMAGE [RUNS] [f32|bf16|auto]");
        std::process::exit(2);
    };
    let runs: usize = rest
        .first()
        .map_or(3, |r| r.parse().expect("RUNS is a number"));
    let dtype = match rest.get(1).map(String::as_str) {
        Some("f32") => Some(DType::F32),
        Some("bf16") => Some(DType::BF16),
        _ => None,
    };
    let options = LoadOptions {
        dtype,
        ..LoadOptions::default()
    };
    let folder = HfFolder::open(dir)?;
    let rgb = open_image(image.as_ref())?;
    let question = "Output the polygon coordinates of the object in the image.";
    let kimi = std::fs::read_to_string(folder.path("config.json"))?.contains("\"kimi_vl\"");
    let time = |f: &mut dyn FnMut() -> simpleseg_engine::Result<usize>| -> simpleseg_engine::Result<(f64, usize)> {
        let patches = f()?;
        let mut ms: Vec<f64> = Vec::with_capacity(runs);
        for _ in 0..runs.max(1) {
            let start = Instant::now();
            f()?;
            ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        Ok((ms[ms.len() / 2], patches))
    };
    let patches = |images: &[ProcessedImage]| {
        images
            .iter()
            .map(|i| i.grid_thw.iter().product::<usize>())
            .sum()
    };
    let (ms, patches) = if kimi {
        let model = kimi_vl::load(&folder, &options)?;
        let prompt = model.prompts.prepare(&rgb, question)?;
        time(&mut || {
            model.model.image_features(&prompt.images)?;
            Ok(patches(&prompt.images))
        })?
    } else {
        let model = qwen2_5_vl::load(&folder, &options)?;
        let prompt = model.prompts.prepare(&rgb, question)?;
        time(&mut || {
            model.model.image_features(&prompt.images, Mode::Infer)?;
            Ok(patches(&prompt.images))
        })?
    };
    println!(
        "{}",
        serde_json::json!({
            "engine": "simpleseg",
            "family": if kimi { "kimi_vl" } else { "qwen2_5_vl" },
            "threads": rayon::current_num_threads(),
            "vision_ms": ms,
            "runs": runs,
            "patches": patches,
        })
    );
    Ok(())
}
