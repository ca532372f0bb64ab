//! Qwen2.5-VL against transformers, on the tiny checkpoints `scripts/fixtures/gen_qwen_fixtures.py`
//! writes with transformers 5.24 (PIL image processor): Pillow resampling, the processor's
//! pixel values, prompt token ids, logits at every prompt position, and greedy decoding.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use simpleseg_core::images::to_rgb;
use simpleseg_engine::image_processing::pillow::{resize, Filter};
use simpleseg_engine::layers::{max_abs_diff, Mode};
use simpleseg_engine::models::qwen2::rope_index;
use simpleseg_engine::models::qwen2_5_vl;
use simpleseg_engine::models::qwen2_5_vl::processor::preprocess;
use simpleseg_engine::{generate, load, HfFolder, LoadOptions, VisionLanguageModel};

const CASES: [&str; 2] = ["flat-window112-tied", "nested-window56-untied"];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen")
}

fn expected(case: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join(format!("{case}.expected.safetensors")),
        &Device::Cpu,
    )
    .expect("expected tensors")
}

/// The fixture's one image grid `[t, h, w]`.
fn image_grids(exp: &HashMap<String, Tensor>) -> [[usize; 3]; 1] {
    let grid: Vec<i64> = exp["image_grid_thw"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    [[grid[0] as usize, grid[1] as usize, grid[2] as usize]]
}

fn f32_options() -> LoadOptions {
    LoadOptions {
        device: Device::Cpu,
        dtype: Some(DType::F32),
        quantize: None,
    }
}

#[test]
fn pillow_bicubic_is_exact() {
    let dir = fixtures().join("resize");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let mut checked = 0;
    for case in cases["cases"].as_array().unwrap() {
        let src = image::open(dir.join(case["source"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let want = image::open(dir.join(case["expected"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let (w, h) = (
            case["width"].as_u64().unwrap() as u32,
            case["height"].as_u64().unwrap() as u32,
        );
        let got = resize(&src, w, h, Filter::Bicubic);
        let diff = got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            diff, 0,
            "{}: {diff} values differ from Pillow",
            case["expected"]
        );
        checked += 1;
    }
    assert!(checked >= 10);
}

#[test]
fn transparency_is_composited_on_white_like_transformers() {
    let dir = fixtures().join("resize");
    let rgba = image::open(dir.join("rgba.png")).unwrap();
    let want = image::open(dir.join("rgba_on_white.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(to_rgb(&rgba), want);
}

#[test]
fn jpeg_decoding_is_exactly_pillows() {
    let ours =
        simpleseg_core::images::open_image(&fixtures().join("../../examples/voc.jpg")).unwrap();
    let pillow = image::open(fixtures().join("resize/voc.png"))
        .unwrap()
        .to_rgb8();
    let max = ours
        .as_raw()
        .iter()
        .zip(pillow.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    eprintln!("JPEG decoders differ by at most {max} levels");
    assert_eq!(max, 0, "JPEG decoding differs from Pillow by {max} levels");
}

#[test]
fn processor_and_prompt_match_transformers() {
    for case in CASES {
        let folder = HfFolder::open(fixtures().join(case)).unwrap();
        let model = qwen2_5_vl::load(&folder, &f32_options()).unwrap();
        let exp = expected(case);
        let image = to_rgb(&image::open(folder.path("image.png")).unwrap());
        let processed = preprocess(&image, &model.prompts.image_config).unwrap();
        let grid: Vec<i64> = exp["image_grid_thw"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            processed.grid_thw.map(|v| v as i64).to_vec(),
            grid,
            "{case}: grid"
        );
        let want: Vec<f32> = exp["pixel_values"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            processed.pixel_values.len(),
            want.len(),
            "{case}: patch count"
        );
        let worst = processed
            .pixel_values
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert_eq!(worst, 0.0, "{case}: pixel values differ by up to {worst}");
        let prompt = model.prepare(&image, &serde_json_prompt(case)).unwrap();
        let ids: Vec<i64> = exp["input_ids"].to_vec1().unwrap();
        assert_eq!(
            prompt
                .input_ids
                .iter()
                .map(|&i| i64::from(i))
                .collect::<Vec<_>>(),
            ids,
            "{case}: prompt ids"
        );
    }
}

fn serde_json_prompt(case: &str) -> String {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("{case}.expected.json"))).unwrap(),
    )
    .unwrap();
    meta["prompt"].as_str().unwrap().to_string()
}

#[test]
fn logits_match_transformers_within_1e4() {
    for case in CASES {
        let folder = HfFolder::open(fixtures().join(case)).unwrap();
        let m = qwen2_5_vl::load(&folder, &f32_options()).unwrap();
        let exp = expected(case);
        let grids = image_grids(&exp);
        let features = m
            .model
            .visual
            .forward(&exp["pixel_values"], &grids, Mode::Infer)
            .unwrap();
        let ids: Vec<u32> = exp["input_ids"]
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&i| i as u32)
            .collect();
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let embeds = m.model.embed_with_images(&input, Some(&features)).unwrap();
        let (positions, _) = rope_index(&ids, m.model.config.image_token_id, &grids, 2).unwrap();
        let hidden = m
            .model
            .text
            .forward(&embeds, &[positions], None, Mode::Infer)
            .unwrap();
        let logits = m.model.text.logits(&hidden).unwrap().squeeze(0).unwrap();
        let diff = max_abs_diff(&logits, &exp["logits"]).unwrap();
        eprintln!("{case}: max |logit difference| = {diff:e}");
        assert!(diff <= 1e-4, "{case}: logits differ by {diff}");
        // The differentiable ops give the same function.
        let hidden = m
            .model
            .text
            .forward(
                &embeds,
                &[rope_index(&ids, m.model.config.image_token_id, &grids, 2)
                    .unwrap()
                    .0],
                None,
                Mode::Train,
            )
            .unwrap();
        let train_logits = m.model.text.logits(&hidden).unwrap().squeeze(0).unwrap();
        assert!(
            max_abs_diff(&train_logits, &exp["logits"]).unwrap() <= 1e-4,
            "{case}: training-mode logits"
        );
    }
}

#[test]
fn greedy_decoding_matches_transformers_end_to_end() {
    for case in CASES {
        let dir = fixtures().join(case);
        let model = load(&dir, &f32_options()).unwrap();
        let exp = expected(case);
        let image = to_rgb(&image::open(dir.join("image.png")).unwrap());
        let prompt = model.prepare(&image, &serde_json_prompt(case)).unwrap();
        let mut config = model.generation_config().clone();
        config.do_sample = false;
        config.max_new_tokens = 24;
        let out = generate(model.as_ref(), &prompt, config, |_| {}).unwrap();
        let want: Vec<u32> = exp["greedy_ids"]
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&i| i as u32)
            .collect();
        assert_eq!(out.token_ids, want, "{case}: greedy tokens");
    }
}

/// In BF16 (on CPUs with AVX512-BF16: the fused window and full attention and the BF16 GEMM)
/// the vision tower stays within BF16 roundings of its f32 features, which the logits above
/// tie to transformers.
#[test]
fn bf16_vision_tower_stays_within_bf16_roundings_of_f32() {
    for case in CASES {
        let folder = HfFolder::open(fixtures().join(case)).unwrap();
        let exp = expected(case);
        let grids = image_grids(&exp);
        let features = |dtype| {
            let options = LoadOptions {
                dtype: Some(dtype),
                ..f32_options()
            };
            let m = qwen2_5_vl::load(&folder, &options).unwrap();
            m.model
                .visual
                .forward(&exp["pixel_values"], &grids, Mode::Infer)
                .unwrap()
        };
        let (bf16, f32) = (features(DType::BF16), features(DType::F32));
        assert_eq!(bf16.dtype(), DType::BF16);
        let scale = f32
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let gap = max_abs_diff(&bf16, &f32).unwrap() / scale;
        eprintln!("{case}: BF16 vision features within {gap:e} of the largest");
        assert!(
            gap < 3e-2,
            "{case}: BF16 features differ by {gap} of the largest"
        );
    }
}
