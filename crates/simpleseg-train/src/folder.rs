//! Writing a complete Hugging Face model folder: weights, `config.json`, tokenizer, chat
//! template, processor and generation settings, so that simpleseg and transformers load it.

use std::io::Write;
use std::path::Path;

use serde_json::json;
use simpleseg_core::io::write_atomic;
use simpleseg_engine::text::TextTokenizer;
use simpleseg_engine::models::qwen2_5_vl::processor::ImageProcessorConfig;
use simpleseg_engine::models::qwen2_5_vl::Config;

use crate::error::{io, Error, Result};
use crate::params::{save_safetensors, Trainable};
use crate::tokenizer::SPECIAL_TOKENS;

/// The chat template Qwen2.5-VL-7B-Instruct ships.
pub const QWEN_CHAT_TEMPLATE: &str = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    write_atomic(path, |w| {
        serde_json::to_writer_pretty(&mut *w, value).map_err(|e| e.to_string())?;
        writeln!(w).map_err(|e| e.to_string())
    })?;
    Ok(())
}

/// The `tokenizer.json` tokenizer training works with (Qwen2.5-VL-family models have one).
pub fn hf_tokenizer(tokenizer: &TextTokenizer) -> Result<&tokenizers::Tokenizer> {
    tokenizer.hf().ok_or_else(|| {
        Error::Invalid("training needs a model with a tokenizer.json tokenizer".into())
    })
}

/// Writes every file but the weights.
pub fn write_metadata(
    dir: &Path,
    config: &Config,
    tokenizer: &tokenizers::Tokenizer,
    template: &str,
    image: &ImageProcessorConfig,
    max_new_tokens: usize,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    write_json(&dir.join("config.json"), &config.to_json())?;
    tokenizer
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let id = |t: &str| tokenizer.token_to_id(t);
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "extra_special_tokens": SPECIAL_TOKENS[1..],
            "model_max_length": config.text.max_position_embeddings,
            "processor_class": "Qwen2_5_VLProcessor",
        }),
    )?;
    write_atomic(&dir.join("chat_template.jinja"), |w| {
        w.write_all(template.as_bytes()).map_err(|e| e.to_string())
    })?;
    let image_processor = json!({
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_convert_rgb": true, "do_normalize": image.do_normalize, "do_rescale": image.do_rescale,
        "do_resize": image.do_resize, "image_mean": image.image_mean, "image_std": image.image_std,
        "merge_size": image.merge_size, "patch_size": image.patch_size, "resample": 3,
        "rescale_factor": image.rescale_factor,
        "size": {"shortest_edge": image.min_pixels, "longest_edge": image.max_pixels},
        "temporal_patch_size": image.temporal_patch_size,
    });
    let video_processor = json!({
        "video_processor_type": "Qwen2VLVideoProcessor",
        "merge_size": image.merge_size, "patch_size": image.patch_size,
        "temporal_patch_size": image.temporal_patch_size,
        "size": {"shortest_edge": image.min_pixels, "longest_edge": image.max_pixels},
    });
    // The flat file older transformers (4.x) and other loaders read; same settings.
    let mut flat = image_processor.clone();
    flat["min_pixels"] = json!(image.min_pixels);
    flat["max_pixels"] = json!(image.max_pixels);
    flat["processor_class"] = json!("Qwen2_5_VLProcessor");
    write_json(&dir.join("preprocessor_config.json"), &flat)?;
    write_json(
        &dir.join("processor_config.json"),
        &json!({"processor_class": "Qwen2_5_VLProcessor", "image_processor": image_processor, "video_processor": video_processor}),
    )?;
    let eos: Vec<u32> = [id("<|im_end|>"), id("<|endoftext|>")]
        .into_iter()
        .flatten()
        .collect();
    write_json(
        &dir.join("generation_config.json"),
        &json!({
            "do_sample": false,
            "eos_token_id": eos,
            "pad_token_id": id("<|endoftext|>"),
            "bos_token_id": id("<|endoftext|>"),
            "max_new_tokens": max_new_tokens,
        }),
    )
}

/// Writes the weights as `model.safetensors`.
pub fn write_weights(dir: &Path, model: &Trainable) -> Result<()> {
    save_safetensors(&dir.join("model.safetensors"), &model.tensors())
}
