//! The training graph must carry gradients through every op (candle's fused norm, softmax, rope
//! and attention kernels have no backward pass, and a missing gradient fails silently). This
//! compares autograd against central finite differences for weights all over a fresh tiny model.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde_json::json;
use simpleseg_engine::io::hf::JsonFile;
use simpleseg_engine::models::qwen2::rope_index;
use simpleseg_engine::models::qwen2_5_vl::Config;
use simpleseg_engine::layers::Mode;
use simpleseg_train::params::Trainable;
use simpleseg_train::run::cross_entropy;

const IMAGE: u32 = 5;

fn tiny_config() -> Config {
    let root = json!({
        "model_type": "qwen2_5_vl",
        "tie_word_embeddings": true,
        "image_token_id": IMAGE, "video_token_id": 6,
        "vision_start_token_id": 3, "vision_end_token_id": 4, "eos_token_id": 2,
        "text_config": {
            "vocab_size": 32, "hidden_size": 32, "intermediate_size": 48,
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
    Config::from_json(&JsonFile {
        path: PathBuf::from("tiny.json"),
        root,
    })
    .unwrap()
}

#[test]
fn autograd_matches_finite_differences() {
    let device = Device::Cpu;
    let config = tiny_config();
    // Larger than usual weights so that every gradient is well above f32 noise.
    let model = Trainable::init(&config, 3, 0.2, 0.2, &device).unwrap();
    // One 4x6-patch image (2x3 merged tokens) between text tokens, then an answer.
    let grid = [1, 4, 6];
    let mut ids = vec![1, 3];
    ids.extend([IMAGE; 6]);
    ids.extend([4, 7, 8, 9, 10, 11, 12, 13]);
    let (positions, _) = rope_index(&ids, IMAGE, &[grid], 2).unwrap();
    let patches = grid.iter().product::<usize>();
    let pixels = Tensor::randn(0f32, 1.0, (patches, 3 * 2 * 14 * 14), &device).unwrap();
    let n = ids.len();
    let input = Tensor::from_vec(ids.clone(), (1, n), &device).unwrap();
    let rows = Tensor::from_vec((9..n as u32 - 1).collect::<Vec<_>>(), n - 10, &device).unwrap();
    let targets = Tensor::from_vec(ids[10..].to_vec(), n - 10, &device).unwrap();
    let loss_of = || -> Tensor {
        let features = model
            .model
            .visual
            .forward(&pixels, &[grid], Mode::Train)
            .unwrap();
        let embeds = model
            .model
            .embed_with_images(&input, Some(&features))
            .unwrap();
        let hidden = model
            .model
            .text
            .forward(&embeds, std::slice::from_ref(&positions), None, Mode::Train)
            .unwrap();
        let (_, t, d) = hidden.dims3().unwrap();
        let picked = hidden
            .reshape((t, d))
            .unwrap()
            .index_select(&rows, 0)
            .unwrap();
        let logits = model.model.text.logits(&picked).unwrap();
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
