//! Kimi-VL against what references compute on tiny checkpoints in the real layout
//! (`scripts/fixtures/gen_kimi_fixtures.py`): the processor's pixel values and the prompt's token ids
//! (PIL, torch and tiktoken), the vision tower and projector's features (transformers'
//! `Kimi_K25VisionModel` on converted weights, which NeMo Automodel's MoonViT matched within
//! 2e-6), the logits at every prompt position (transformers' `DeepseekV3ForCausalLM`, which
//! NeMo's MLA and MoE matched within 1.1e-5) and the greedy continuation (transformers'
//! `generate`). Also: the loading plan of the real 16B config asks for exactly the real
//! checkpoint's tensors.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device};
use simpleseg_core::images::open_image;
use simpleseg_engine::io::hf::{HfFolder, JsonFile};
use simpleseg_engine::io::weights::{LoadingPlan, Quantization, Weights};
use simpleseg_engine::layers::max_abs_diff;
use simpleseg_engine::models::family::PromptPreparer;
use simpleseg_engine::models::kimi_vl::{self, Config, KimiVl};
use simpleseg_engine::runtime::kv_cache::KvCache;
use simpleseg_engine::{generate, GenerationConfig, LoadOptions};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/kimi")
}

/// A fixture checkpoint loaded in `dtype`, with its folder, the references' metadata and their
/// expected tensors.
fn load_fixture(
    name: &str,
    dtype: DType,
) -> (
    HfFolder,
    kimi_vl::KimiVlModel,
    serde_json::Value,
    std::collections::HashMap<String, candle_core::Tensor>,
) {
    let folder = HfFolder::open(fixtures().join(name)).unwrap();
    let options = LoadOptions {
        dtype: Some(dtype),
        ..LoadOptions::default()
    };
    let model = kimi_vl::load(&folder, &options).unwrap();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("{name}.expected.json"))).unwrap(),
    )
    .unwrap();
    let expected = candle_core::safetensors::load(
        fixtures().join(format!("{name}.expected.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    (folder, model, meta, expected)
}

fn check_checkpoint(name: &str) {
    let (folder, model, meta, expected) = load_fixture(name, DType::F32);
    for case in meta["cases"].as_array().unwrap() {
        let key = case["name"].as_str().unwrap();
        let image = open_image(&folder.path(case["image"].as_str().unwrap())).unwrap();
        let prompt = model
            .prompts
            .prepare(&image, case["prompt"].as_str().unwrap())
            .unwrap();
        // Processor and tokenizer: exact.
        let grid = &prompt.images[0].grid_thw;
        assert_eq!(
            [grid[1], grid[2]].to_vec(),
            serde_json::from_value::<Vec<usize>>(case["grid_hw"].clone()).unwrap(),
            "{name}/{key} grid"
        );
        let want_pixels: Vec<Vec<f32>> =
            expected[&format!("{key}.pixel_values")].to_vec2().unwrap();
        let got = &prompt.images[0].pixel_values;
        let dim = want_pixels[0].len();
        for (i, row) in want_pixels.iter().enumerate() {
            assert_eq!(
                &got[i * dim..(i + 1) * dim],
                row.as_slice(),
                "{name}/{key} patch {i}"
            );
        }
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        assert_eq!(prompt.input_ids, ids, "{name}/{key} token ids");
        // Vision tower and projector.
        let features = model.model.image_features(&prompt.images).unwrap().unwrap();
        let gap = max_abs_diff(&features, &expected[&format!("{key}.image_features")]).unwrap();
        eprintln!("{name}/{key}: image features within {gap:e}");
        assert!(gap < 1e-4, "{name}/{key} image features differ by {gap}");
        // Logits at every prompt position.
        let hidden = model
            .model
            .prompt_hidden(&prompt, &mut KvCache::default())
            .unwrap();
        let logits = model
            .model
            .language_model
            .logits(&hidden.squeeze(0).unwrap())
            .unwrap();
        let gap = max_abs_diff(&logits, &expected[&format!("{key}.logits")]).unwrap();
        eprintln!("{name}/{key}: logits within {gap:e}");
        assert!(gap < 1e-4, "{name}/{key} logits differ by {gap}");
        // Greedy continuation, stopping where the reference stopped.
        let mut want: Vec<u32> = serde_json::from_value(case["greedy_ids"].clone()).unwrap();
        let config = GenerationConfig {
            do_sample: false,
            max_new_tokens: want.len(),
            ..model.generation.clone()
        };
        if want
            .last()
            .is_some_and(|t| config.eos_token_ids.contains(t))
        {
            want.pop();
        }
        let out = generate(&model, &prompt, config, |_| {}).unwrap();
        assert_eq!(out.token_ids, want, "{name}/{key} greedy tokens");
    }
}

#[test]
fn kimi_tiny_matches_the_references() {
    check_checkpoint("kimi-tiny");
}

#[test]
fn grouped_routing_and_low_rank_queries_match_the_references() {
    check_checkpoint("kimi-tiny-grouped");
}

/// In BF16 (on CPUs with AVX512-BF16: the fused vision attention and the BF16 GEMM) the vision
/// tower and projector stay within BF16 roundings of the f32 reference's features.
#[test]
fn bf16_image_features_stay_within_bf16_roundings_of_the_reference() {
    let name = "kimi-tiny";
    let (folder, model, meta, expected) = load_fixture(name, DType::BF16);
    let case = &meta["cases"][0];
    let key = case["name"].as_str().unwrap();
    let image = open_image(&folder.path(case["image"].as_str().unwrap())).unwrap();
    let prompt = model
        .prompts
        .prepare(&image, case["prompt"].as_str().unwrap())
        .unwrap();
    let features = model.model.image_features(&prompt.images).unwrap().unwrap();
    assert_eq!(features.dtype(), DType::BF16);
    let want = &expected[&format!("{key}.image_features")];
    let scale = want
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let gap = max_abs_diff(&features, want).unwrap() / scale;
    eprintln!("{name}/{key}: BF16 image features within {gap:e} of the largest");
    assert!(
        gap < 3e-2,
        "{name}/{key} BF16 image features differ by {gap} of the largest"
    );
}

#[test]
fn the_real_config_asks_for_exactly_the_real_tensors() {
    let real: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("real-tensors.json")).unwrap(),
    )
    .unwrap();
    let config = Config::from_json(&JsonFile {
        path: "config.json".into(),
        root: real["config"].clone(),
    })
    .unwrap();
    let plan = LoadingPlan::default();
    KimiVl::load(
        &Weights::plan(&plan, DType::BF16).quantized(Some(Quantization::Q4K)),
        &config,
    )
    .unwrap();
    let requests = plan.requests();
    // Quantized: every linear layer of the language model but the routers; nothing else.
    for r in &requests {
        let language_linear = r.name.starts_with("language_model.") && r.linear.is_some();
        let router = r.name.ends_with(".mlp.gate.weight");
        assert_eq!(
            r.linear.flatten().is_some(),
            language_linear && !router && !r.name.contains("embed_tokens"),
            "{}: {:?}",
            r.name,
            r.linear
        );
    }
    let mut asked: BTreeMap<String, Vec<usize>> =
        requests.into_iter().map(|r| (r.name, r.shape)).collect();
    asked.extend(KimiVl::ignored_tensors(&config));
    let want: BTreeMap<String, Vec<usize>> =
        serde_json::from_value(real["tensors"].clone()).unwrap();
    assert_eq!(want.len(), 5679);
    let missing: Vec<&String> = want.keys().filter(|k| !asked.contains_key(*k)).collect();
    let extra: Vec<&String> = asked.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    for (name, shape) in &want {
        assert_eq!(&asked[name], shape, "{name}");
    }
}
