//! The training graph must carry gradients through every op (candle's fused norm, softmax, rope
//! and attention kernels have no backward pass, and a missing gradient fails silently). This
//! compares autograd against central finite differences for weights all over a fresh tiny model.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use image::{Rgb, RgbImage};
use serde_json::json;
use simpleseg_engine::io::hf::JsonFile;
use simpleseg_engine::layers::Mode;
use simpleseg_engine::models::training::TrainBatch;
use simpleseg_engine::registry;
use simpleseg_train::params::Trainable;
use simpleseg_train::run::cross_entropy;
use simpleseg_train::tokenizer::train_tokenizer;

/// A tiny Qwen2.5-VL configuration (vocabulary and special token ids come from the tokenizer).
fn tiny_config() -> JsonFile {
    let root = json!({
        "model_type": "qwen2_5_vl",
        "tie_word_embeddings": true,
        "text_config": {
            "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 256,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10.0, "mrope_section": [1, 1, 2]}
        },
        "vision_config": {
            "depth": 2, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2,
            "in_channels": 3, "out_hidden_size": 32, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [1],
            "hidden_act": "silu"
        }
    });
    JsonFile {
        path: PathBuf::from("tiny.json"),
        root,
    }
}

#[test]
fn autograd_matches_finite_differences() {
    let device = Device::Cpu;
    let file = tiny_config();
    let entry = registry::training_of("qwen2_5_vl").expect("Qwen2.5-VL trains");
    let question = "Where is the cat?";
    let answer = "[[0.25, 0.5], [0.75, 0.5], [0.5, 0.9]]";
    let tokenizer = train_tokenizer(
        [question, answer, entry.chat_template]
            .into_iter()
            .chain(entry.special_tokens.iter().copied()),
        300,
        entry.special_tokens,
    )
    .unwrap();
    let model =
        Trainable::from_config(&file, tokenizer, entry.chat_template.to_string(), &device).unwrap();
    // Larger than usual weights so that every gradient is well above f32 noise.
    model.init(3, 0.2, 0.2).unwrap();
    // An 84x56 image: 6x4 patches, 3x2 merged tokens.
    let image = RgbImage::from_fn(84, 56, |x, y| {
        Rgb([(x * 3) as u8, (y * 4) as u8, ((x * y) % 251) as u8])
    });
    let example = model
        .model
        .encode(question, answer, image.dimensions())
        .unwrap();
    let processed = [model.model.process(&image).unwrap()];
    assert_eq!(processed[0].grid_thw, example.grid);
    let ids = &example.ids;
    let batch = TrainBatch {
        ids: vec![ids.as_slice()],
        pad: model.model.padding(),
        min_len: 0,
        images: &processed,
        image_of: vec![0],
    };
    // The loss over the answer and the end-of-turn token, as SFT computes it.
    let start = example.answer_start;
    let n = ids.len();
    let rows = Tensor::from_vec(
        (start as u32 - 1..n as u32 - 1).collect::<Vec<_>>(),
        n - start,
        &device,
    )
    .unwrap();
    let targets = Tensor::from_vec(ids[start..].to_vec(), n - start, &device).unwrap();
    let network = model.model.forward();
    let loss_of = || -> Tensor {
        let hidden = network.hidden_states(&batch, Mode::Train).unwrap();
        let (_, t, d) = hidden.dims3().unwrap();
        let picked = hidden
            .reshape((t, d))
            .unwrap()
            .index_select(&rows, 0)
            .unwrap();
        let logits = network.logits(&picked).unwrap();
        cross_entropy(&logits, &targets).unwrap()
    };
    let grads = loss_of().backward().unwrap();
    let mut checked = 0;
    for (name, var) in model.named_vars() {
        let Some(grad) = grads.get(var.as_tensor()) else {
            panic!("{name} gets no gradient");
        };
        let grad: Vec<f32> = grad.flatten_all().unwrap().to_vec1().unwrap();
        let values: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        // The entry with the largest gradient, where the finite difference is most reliable.
        let (index, &analytic) = grad
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        assert!(
            analytic.abs() > 1e-5,
            "{name}: gradient vanishes ({analytic})"
        );
        let at = |delta: f32| -> f64 {
            let mut v = values.clone();
            v[index] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &device).unwrap())
                .unwrap();
            let loss = loss_of().to_dtype(DType::F64).unwrap();
            loss.to_scalar::<f64>().unwrap()
        };
        let eps = 1e-2;
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
        var.set(&Tensor::from_vec(values, var.shape(), &device).unwrap())
            .unwrap();
        let error = (numeric - analytic as f64).abs();
        assert!(
            error <= 2e-2 * analytic.abs() as f64 + 1e-4,
            "{name}[{index}]: autograd {analytic}, finite difference {numeric}"
        );
        checked += 1;
    }
    assert!(checked > 20, "only {checked} tensors checked");
}
