//! Decoding several rows together gives every row exactly what it gets alone: the answers
//! sampled from one prefill equal single-answer runs with the same seeds, and a batch of
//! different prompts equals one prompt at a time.

use std::path::PathBuf;

use simpleseg_core::images::open_image;
use simpleseg_engine::{
    generate, generate_batch, load, BatchRequest, GenerationConfig, LoadOptions, Prompt,
    VisionLanguageModel,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn prompts(model: &dyn VisionLanguageModel) -> Vec<Prompt> {
    [
        ("demo_0000008.png", "the red shape"),
        ("demo_0000001.png", "the circle"),
        ("demo_0000002.png", "the largest shape"),
    ]
    .iter()
    .map(|(image, query)| {
        let image = open_image(&root().join("examples/synth/images/synth").join(image)).unwrap();
        model
            .prepare(
                &image,
                &format!("Output the polygon coordinates of {query} in the image."),
            )
            .unwrap()
    })
    .collect()
}

fn sampled(model: &dyn VisionLanguageModel, seed: u64) -> GenerationConfig {
    GenerationConfig {
        do_sample: true,
        temperature: 1.0,
        seed,
        max_new_tokens: 40,
        ..model.generation_config().clone()
    }
}

/// Batched answers of `model` equal its answers one at a time (greedy and seeded sampling).
pub fn check_batches_equal_single_runs(model: &dyn VisionLanguageModel) {
    let prompts = prompts(model);
    let greedy = GenerationConfig {
        do_sample: false,
        max_new_tokens: 40,
        ..model.generation_config().clone()
    };
    // Different prompts at once, greedy.
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            generate(model, p, greedy.clone(), |_| {})
                .unwrap()
                .token_ids
        })
        .collect();
    let requests: Vec<BatchRequest> = prompts
        .iter()
        .map(|p| BatchRequest {
            grammar: None,
            prompt: p,
            configs: vec![greedy.clone()],
        })
        .collect();
    let together: Vec<Vec<u32>> = generate_batch(model, &requests, |_, _| {})
        .unwrap()
        .into_iter()
        .map(|o| o.token_ids)
        .collect();
    assert_eq!(together, alone, "a greedy batch of different prompts");
    // Several sampled answers per prompt, from one prefill each.
    let seeds = [3u64, 17, 29];
    let requests: Vec<BatchRequest> = prompts
        .iter()
        .map(|p| BatchRequest {
            grammar: None,
            prompt: p,
            configs: seeds.iter().map(|&s| sampled(model, s)).collect(),
        })
        .collect();
    let together = generate_batch(model, &requests, |_, _| {}).unwrap();
    assert_eq!(together.len(), prompts.len() * seeds.len());
    let mut distinct = std::collections::HashSet::new();
    for (i, prompt) in prompts.iter().enumerate() {
        for (j, &seed) in seeds.iter().enumerate() {
            let single = generate(model, prompt, sampled(model, seed), |_| {}).unwrap();
            let batched = &together[i * seeds.len() + j];
            assert_eq!(
                batched.token_ids, single.token_ids,
                "prompt {i}, seed {seed}"
            );
            distinct.insert(batched.token_ids.clone());
        }
    }
    assert!(distinct.len() > prompts.len(), "sampled answers differ");
}

#[test]
fn qwen_batches_equal_single_runs() {
    let model = load(
        &root().join("models/simpleseg-tiny"),
        &LoadOptions::default(),
    )
    .unwrap();
    check_batches_equal_single_runs(model.as_ref());
}

#[test]
fn kimi_batches_equal_single_runs() {
    let model = load(
        &root().join("fixtures/kimi/kimi-tiny"),
        &LoadOptions::default(),
    )
    .unwrap();
    check_batches_equal_single_runs(model.as_ref());
}
