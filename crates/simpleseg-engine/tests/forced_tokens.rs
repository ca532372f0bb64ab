//! Under a constraint, tokens that are the only ones allowed are taken without logits and fed
//! in runs, one forward per run: the answers are exactly those of step-by-step constrained
//! decoding, greedy and sampled, for both families (Qwen's one-digit tokens, Kimi's
//! tiktoken).

use std::path::PathBuf;
use std::sync::Arc;

use simpleseg_core::images::open_image;
use simpleseg_engine::runtime::constraint::{Constraint, Grammar, GrammarCache, PatternLimits};
use simpleseg_engine::runtime::generator::Generator;
use simpleseg_engine::{load, GenerationConfig, LoadOptions, Prompt, VisionLanguageModel};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn prompt(model: &dyn VisionLanguageModel, image: &str, query: &str) -> Prompt {
    let image = open_image(&root().join("examples/synth/images/synth").join(image)).unwrap();
    model
        .prepare(
            &image,
            &format!("Output the polygon coordinates of {query} in the image."),
        )
        .unwrap()
}

/// The answer's tokens and how it stopped, with forced runs or step by step.
fn answer(
    model: &dyn VisionLanguageModel,
    prompt: &Prompt,
    config: &GenerationConfig,
    grammar: &Arc<Grammar>,
    runs: bool,
) -> (Vec<u32>, String) {
    let generator = Generator::new(model);
    let mut generator = if runs {
        generator
    } else {
        generator.step_by_step()
    };
    generator
        .add(prompt, vec![((), config.clone())], Some(grammar.clone()))
        .unwrap();
    let mut finished = generator.run(&mut ()).unwrap();
    assert_eq!(finished.len(), 1);
    let f = finished.remove(0);
    (f.tokens, format!("{:?}", f.stop_reason))
}

/// How many of `tokens` the grammar forced (the only token allowed where it came).
fn forced(grammar: &Grammar, tokens: &[u32]) -> usize {
    let mut state = grammar.start().unwrap();
    let mut count = 0;
    for &t in tokens {
        if grammar.allowed(state).ids().len() == 1 {
            count += 1;
        }
        state = grammar.advance(state, t).unwrap();
    }
    count
}

fn check(model: &dyn VisionLanguageModel) {
    let config = model.generation_config().clone();
    let grammar = GrammarCache::new(PatternLimits::default())
        .get(
            model.tokenizer(),
            &config.eos_token_ids,
            &Constraint::Polygon,
        )
        .unwrap();
    let prompts = [
        prompt(model, "demo_0000008.png", "the red shape"),
        prompt(model, "demo_0000001.png", "the circle"),
    ];
    let configs = [
        GenerationConfig {
            do_sample: false,
            max_new_tokens: 60,
            ..config.clone()
        },
        GenerationConfig {
            do_sample: true,
            temperature: 1.0,
            seed: 7,
            max_new_tokens: 60,
            ..config.clone()
        },
        // A limit that falls inside a run of forced tokens.
        GenerationConfig {
            do_sample: true,
            temperature: 1.0,
            seed: 11,
            max_new_tokens: 9,
            ..config.clone()
        },
    ];
    let mut taken = 0;
    for (i, prompt) in prompts.iter().enumerate() {
        for (j, config) in configs.iter().enumerate() {
            let runs = answer(model, prompt, config, &grammar, true);
            let steps = answer(model, prompt, config, &grammar, false);
            assert_eq!(runs, steps, "prompt {i}, config {j}");
            taken += forced(&grammar, &runs.0);
        }
    }
    // Otherwise the runs were never exercised.
    assert!(taken > 0, "no answer had a forced token");
}

#[test]
fn qwen_forced_runs_equal_step_by_step_decoding() {
    let model = load(
        &root().join("models/simpleseg-tiny"),
        &LoadOptions::default(),
    )
    .unwrap();
    check(model.as_ref());
}

#[test]
fn kimi_forced_runs_equal_step_by_step_decoding() {
    let model = load(
        &root().join("fixtures/kimi/kimi-tiny"),
        &LoadOptions::default(),
    )
    .unwrap();
    check(model.as_ref());
}
