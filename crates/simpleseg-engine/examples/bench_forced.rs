//! Decoding under the polygon constraint with runs of forced tokens (the tokens that are the
//! only ones the constraint allows, fed with the chosen token as one forward) and step by step,
//! on the same prompt: the share of forced tokens, tokens per second each way, and whether the
//! answers are identical (they must be). Greedy; end-of-sequence tokens are not allowed, so
//! both decode TOKENS tokens. Prints one JSON line.
//!
//! Run: `cargo run --release -p simpleseg-engine --example bench_forced -- MODEL_DIR IMAGE [TOKENS]`
//! Threads follow RAYON_NUM_THREADS.

use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use simpleseg_core::images::open_image;
use simpleseg_engine::runtime::constraint::{Constraint, GrammarCache, PatternLimits};
use simpleseg_engine::runtime::generator::Generator;
use simpleseg_engine::{load, LoadOptions};

fn main() -> simpleseg_engine::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, image, rest @ ..] = args.as_slice() else {
        eprintln!("usage: bench_forced MODEL_DIR IMAGE [TOKENS]");
        std::process::exit(2);
    };
    let tokens: usize = rest
        .first()
        .map_or(64, |t| t.parse().expect("TOKENS is a number"));
    let model = load(dir.as_ref(), &LoadOptions::default())?;
    let mut config = model.generation_config().clone();
    config.do_sample = false;
    config.max_new_tokens = tokens;
    config.eos_token_ids.clear();
    // No stop tokens: the grammar never lets the answer end, so it runs to TOKENS.
    let grammar = GrammarCache::new(PatternLimits::default()).get(
        model.tokenizer(),
        &[],
        &Constraint::Polygon,
    )?;
    let prompt = model.prepare(
        &open_image(image.as_ref())?,
        "Output the polygon coordinates of the object in the image.",
    )?;
    let mut results = Vec::new();
    for runs in [true, false] {
        let generator = Generator::new(model.as_ref());
        let mut generator = if runs {
            generator
        } else {
            generator.step_by_step()
        };
        generator.add(&prompt, vec![((), config.clone())], Some(grammar.clone()))?;
        // `add` prefilled: `run` is the decoding alone.
        let start = Instant::now();
        let mut finished = generator.run(&mut ())?;
        let decode_ms = start.elapsed().as_secs_f64() * 1e3;
        results.push((finished.remove(0).tokens, decode_ms));
    }
    let (answer, runs_ms) = &results[0];
    let (steps_answer, steps_ms) = &results[1];
    let mut state = grammar.start()?;
    let mut forced = 0;
    for &t in answer {
        if grammar.allowed(state).ids().len() == 1 {
            forced += 1;
        }
        state = grammar.advance(state, t).unwrap_or(state);
    }
    let decoded = answer.len().saturating_sub(1) as f64;
    println!(
        "{}",
        serde_json::json!({
            "threads": rayon::current_num_threads(),
            "tokens": answer.len(),
            "forced_tokens": forced,
            "forced_share": forced as f64 / answer.len().max(1) as f64,
            "runs_tokens_per_s": decoded / (runs_ms / 1e3),
            "step_by_step_tokens_per_s": decoded / (steps_ms / 1e3),
            "speedup": steps_ms / runs_ms,
            "identical": answer == steps_answer,
            "answer": model.tokenizer().decode(answer)?,
        })
    );
    Ok(())
}
