//! `config.json` of a `qwen2_5_vl` model and where its checkpoint keeps the tensors.
//!
//! transformers has written two layouts: 4.x puts the language model's keys at the top level,
//! 5.x under `text_config` (and the rotary settings under `rope_parameters` instead of
//! `rope_scaling`). Both are read: the keys of `text_config` are taken first and completed
//! from the top level, serde aliases name the alternatives, and errors name the key at fault.

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::hf::{JsonFile, OneOrMany};
use crate::io::weights::Weights;

pub use crate::models::qwen2::TextConfig;
pub use crate::models::qwen2_5_vit::VisionConfig;

/// `config.json` of a `qwen2_5_vl` model.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub tie_word_embeddings: bool,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    /// `eos_token_id` of the config (one or several).
    pub eos_token_ids: Vec<u32>,
}

/// Rotary settings: `rope_parameters` (5.x) or `rope_scaling` (4.x).
#[derive(Clone, Debug, Default, Deserialize)]
struct RawRope {
    rope_theta: Option<f64>,
    mrope_section: Option<Vec<usize>>,
}

/// The language model's keys as written, every one optional.
#[derive(Clone, Debug, Default, Deserialize)]
struct RawText {
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RawRope>,
    rope_scaling: Option<RawRope>,
    max_position_embeddings: Option<usize>,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
}

/// The keys of [`RawText`]: those a flat (4.x) config has at its top level.
const TEXT_KEYS: [&str; 13] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "max_position_embeddings",
    "hidden_act",
    "use_sliding_window",
];

#[derive(Clone, Debug, Default, Deserialize)]
struct RawVision {
    #[serde(alias = "num_hidden_layers")]
    depth: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    #[serde(alias = "num_attention_heads")]
    num_heads: Option<usize>,
    #[serde(alias = "in_chans")]
    in_channels: Option<usize>,
    out_hidden_size: Option<usize>,
    #[serde(alias = "spatial_patch_size")]
    patch_size: Option<usize>,
    spatial_merge_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    window_size: Option<usize>,
    fullatt_block_indexes: Option<Vec<usize>>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RawRope>,
    hidden_act: Option<String>,
}

/// Keys read at the top level first, then under `text_config`.
#[derive(Clone, Debug, Default, Deserialize)]
struct RawTop {
    model_type: Option<String>,
    tie_word_embeddings: Option<bool>,
    image_token_id: Option<u32>,
    video_token_id: Option<u32>,
    vision_start_token_id: Option<u32>,
    vision_end_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
}

/// `object`'s entries with nulls dropped (a null key counts as absent).
fn entries(object: Option<&Value>) -> serde_json::Map<String, Value> {
    object
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// A required value, or the error naming where it may be written.
fn need<T>(file: &JsonFile, value: Option<T>, keys: &[&str], what: &str) -> Result<T> {
    value.ok_or_else(|| {
        file.error(format!(
            "missing key {} ({what})",
            keys.iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(" or ")
        ))
    })
}

impl Config {
    /// Reads either layout of `config.json`.
    pub fn from_json(file: &JsonFile) -> Result<Self> {
        let nested = entries(file.root.get("text_config"));
        let top = entries(Some(&file.root));
        // The language model: `text_config`, completed from the top level.
        let mut text_object = nested.clone();
        for key in TEXT_KEYS {
            if !text_object.contains_key(key) {
                if let Some(v) = top.get(key) {
                    text_object.insert(key.into(), v.clone());
                }
            }
        }
        // Which key a text setting was read from, for messages.
        let text_origin = if file.root.get("text_config").is_some_and(Value::is_object) {
            "text_config"
        } else {
            ""
        };
        let raw: RawText = file.parse_value(Value::Object(text_object), text_origin)?;
        // Ids and stop tokens: the top level first, then `text_config`.
        let mut top_object = nested;
        top_object.extend(top);
        let ids: RawTop = file.parse_value(Value::Object(top_object), "")?;
        let vision: RawVision = file.parse("vision_config")?;

        if let Some(t) = &ids.model_type {
            if t != "qwen2_5_vl" {
                return Err(file.error(format!(
                    "`model_type` is \"{t}\"; this loader reads \"qwen2_5_vl\""
                )));
            }
        }
        let text_keys = |k: &'static str| [format!("text_config.{k}"), k.to_string()];
        let get = |value: Option<usize>, k: &'static str| -> Result<usize> {
            let keys = text_keys(k);
            need(file, value, &[&keys[0], &keys[1]], "a non-negative integer")
        };
        let hidden_act = raw.hidden_act.as_deref().unwrap_or("silu");
        if hidden_act != "silu" {
            return Err(file.error(format!(
                "`hidden_act` \"{hidden_act}\" is not supported (only \"silu\")"
            )));
        }
        if raw.use_sliding_window.unwrap_or(false) {
            return Err(file.error(
                "`use_sliding_window` is true; sliding-window attention is not implemented (transformers' default attention does not apply it either)",
            ));
        }
        let num_attention_heads = get(raw.num_attention_heads, "num_attention_heads")?;
        let hidden_size = get(raw.hidden_size, "hidden_size")?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(file.error(format!(
                "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"
            )));
        }
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(file.error(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        let head_dim = hidden_size / num_attention_heads;
        let rope = raw.rope_parameters.clone().unwrap_or_default();
        let scaling = raw.rope_scaling.clone().unwrap_or_default();
        let rope_theta = rope
            .rope_theta
            .or(raw.rope_theta)
            .or(scaling.rope_theta)
            .unwrap_or(1_000_000.0);
        let mrope_section = rope
            .mrope_section
            .or(scaling.mrope_section)
            .unwrap_or_else(|| vec![16, 24, 24]);
        if mrope_section.len() != 3 || mrope_section.iter().sum::<usize>() * 2 != head_dim {
            return Err(file.error(format!(
                "`mrope_section` {mrope_section:?} must be 3 numbers summing to head_dim / 2 = {}",
                head_dim / 2
            )));
        }
        let text = TextConfig {
            vocab_size: get(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: get(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: get(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            mrope_section,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(32768),
        };
        let vision_act = vision.hidden_act.as_deref().unwrap_or("silu");
        if vision_act != "silu" {
            return Err(file.error(format!(
                "`vision_config.hidden_act` \"{vision_act}\" is not supported (only \"silu\")"
            )));
        }
        let v_need =
            |value: Option<usize>, keys: &[&str]| need(file, value, keys, "a non-negative integer");
        let vision = VisionConfig {
            depth: v_need(
                vision.depth,
                &["vision_config.depth", "vision_config.num_hidden_layers"],
            )?,
            hidden_size: v_need(vision.hidden_size, &["vision_config.hidden_size"])?,
            intermediate_size: v_need(
                vision.intermediate_size,
                &["vision_config.intermediate_size"],
            )?,
            num_heads: v_need(
                vision.num_heads,
                &[
                    "vision_config.num_heads",
                    "vision_config.num_attention_heads",
                ],
            )?,
            in_channels: vision.in_channels.unwrap_or(3),
            out_hidden_size: vision.out_hidden_size.unwrap_or(text.hidden_size),
            patch_size: vision.patch_size.unwrap_or(14),
            spatial_merge_size: vision.spatial_merge_size.unwrap_or(2),
            temporal_patch_size: vision.temporal_patch_size.unwrap_or(2),
            window_size: vision.window_size.unwrap_or(112),
            fullatt_block_indexes: vision
                .fullatt_block_indexes
                .unwrap_or_else(|| vec![7, 15, 23, 31]),
            rope_theta: vision
                .rope_parameters
                .and_then(|r| r.rope_theta)
                .or(vision.rope_theta)
                .unwrap_or(10000.0),
        };
        if vision.out_hidden_size != text.hidden_size {
            return Err(file.error(format!(
                "`vision_config.out_hidden_size` {} differs from the language model's hidden_size {}",
                vision.out_hidden_size, text.hidden_size
            )));
        }
        if vision.num_heads == 0
            || !vision.hidden_size.is_multiple_of(vision.num_heads)
            || !(vision.hidden_size / vision.num_heads).is_multiple_of(4)
        {
            return Err(file.error("vision hidden_size / num_heads must be a multiple of 4"));
        }
        let window_unit = vision.spatial_merge_size * vision.patch_size;
        if vision.window_size < window_unit {
            return Err(file.error(format!(
                "`vision_config.window_size` {} is smaller than patch_size x spatial_merge_size = {window_unit}",
                vision.window_size
            )));
        }
        Ok(Config {
            tie_word_embeddings: ids.tie_word_embeddings.unwrap_or(false),
            image_token_id: ids.image_token_id.unwrap_or(151655),
            video_token_id: ids.video_token_id.unwrap_or(151656),
            vision_start_token_id: ids.vision_start_token_id.unwrap_or(151652),
            vision_end_token_id: ids.vision_end_token_id.unwrap_or(151653),
            eos_token_ids: ids
                .eos_token_id
                .map_or_else(|| vec![151645], OneOrMany::into_vec),
            text,
            vision,
        })
    }

    /// `config.json` as transformers 5 writes it (language model under `text_config`).
    pub fn to_json(&self) -> serde_json::Value {
        let t = &self.text;
        let v = &self.vision;
        let eos = match self.eos_token_ids.as_slice() {
            [one] => serde_json::json!(one),
            many => serde_json::json!(many),
        };
        serde_json::json!({
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "dtype": "float32",
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "eos_token_id": eos,
            "text_config": {
                "model_type": "qwen2_5_vl_text",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "hidden_act": "silu",
                "rms_norm_eps": t.rms_norm_eps,
                "max_position_embeddings": t.max_position_embeddings,
                "use_sliding_window": false,
                "eos_token_id": eos,
                "tie_word_embeddings": self.tie_word_embeddings,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": t.rope_theta,
                    "mrope_section": t.mrope_section,
                },
            },
            "vision_config": {
                "model_type": "qwen2_5_vl_vision",
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_channels": v.in_channels,
                "out_hidden_size": v.out_hidden_size,
                "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "temporal_patch_size": v.temporal_patch_size,
                "window_size": v.window_size,
                "fullatt_block_indexes": v.fullatt_block_indexes,
                "hidden_act": "silu",
                "tokens_per_second": 2,
            },
        })
    }
}

/// Where the checkpoint keeps its tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorLayout {
    /// `model.layers.*`, `model.embed_tokens`, `visual.*` (transformers 4.x).
    Flat,
    /// `model.language_model.*`, `model.visual.*` (transformers 5.x).
    Nested,
}

impl TensorLayout {
    /// Detects the layout from the tensor names.
    pub fn detect<'a>(names: impl IntoIterator<Item = &'a String>) -> Result<Self> {
        let mut flat = false;
        for n in names {
            if n.starts_with("model.language_model.") {
                return Ok(TensorLayout::Nested);
            }
            flat |= n.starts_with("model.layers.") || n.starts_with("model.embed_tokens.");
        }
        if flat {
            Ok(TensorLayout::Flat)
        } else {
            Err(Error::Unsupported(
                "no Qwen2.5-VL language model tensors found (expected `model.language_model.*` or `model.layers.*`)".into(),
            ))
        }
    }

    pub(crate) fn language_model(self, vb: &Weights) -> Weights {
        match self {
            TensorLayout::Flat => vb.pp("model"),
            TensorLayout::Nested => vb.pp("model").pp("language_model"),
        }
    }

    pub(crate) fn visual(self, vb: &Weights) -> Weights {
        match self {
            TensorLayout::Flat => vb.pp("visual"),
            TensorLayout::Nested => vb.pp("model").pp("visual"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_json_round_trips() {
        let folder = crate::io::hf::HfFolder::open(
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../fixtures/qwen/flat-window112-tied"),
        )
        .unwrap();
        let config = Config::from_json(&folder.json("config.json").unwrap()).unwrap();
        let again = Config::from_json(&JsonFile {
            path: "config.json".into(),
            root: config.to_json(),
        })
        .unwrap();
        assert_eq!(config, again);
    }
}
