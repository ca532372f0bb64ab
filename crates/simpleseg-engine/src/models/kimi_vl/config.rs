//! `config.json` of a `kimi_vl` model: a MoonViT `vision_config` and a DeepSeek-V3-layout
//! `text_config` (Moonlight), read as serde structs; errors name the key at fault.

use serde::Deserialize;

use crate::error::Result;
use crate::io::hf::{JsonFile, OneOrMany};

pub use crate::models::deepseek_v3::TextConfig;
pub use crate::models::moonvit::VisionConfig;

/// `config.json` of a `kimi_vl` model.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub vision: VisionConfig,
    pub text: TextConfig,
    /// `<|media_pad|>`, the token each merged image patch takes in the prompt.
    pub media_placeholder_token_id: u32,
    /// The language model's `eos_token_id` (one or several).
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    #[serde(default = "media_pad")]
    media_placeholder_token_id: u32,
}

fn media_pad() -> u32 {
    163605
}

impl Config {
    /// Reads `config.json` and checks the settings this engine runs.
    pub fn from_json(file: &JsonFile) -> Result<Self> {
        let raw: RawConfig = file.parse("")?;
        if let Some(t) = &raw.model_type {
            if t != "kimi_vl" {
                return Err(file.error(format!(
                    "`model_type` is \"{t}\"; this loader reads \"kimi_vl\""
                )));
            }
        }
        let vision: VisionConfig = file.parse("vision_config")?;
        let text: TextConfig = file.parse("text_config")?;
        let t = &text;
        let check = |ok: bool, message: String| if ok { Ok(()) } else { Err(file.error(message)) };
        check(
            t.hidden_act == "silu",
            format!(
                "`text_config.hidden_act` \"{}\" is not supported (only \"silu\")",
                t.hidden_act
            ),
        )?;
        check(
            t.scoring_func == "sigmoid",
            format!(
                "`text_config.scoring_func` \"{}\" is not supported (DeepSeek-V3's \"sigmoid\" only)",
                t.scoring_func
            ),
        )?;
        check(
            t.topk_method == "noaux_tc",
            format!(
                "`text_config.topk_method` \"{}\" is not supported (DeepSeek-V3's \"noaux_tc\" only)",
                t.topk_method
            ),
        )?;
        let plain_rope = match &t.rope_scaling {
            None => true,
            Some(v) => {
                v.get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(|r| r.as_str())
                    == Some("default")
            }
        };
        check(
            plain_rope,
            "`text_config.rope_scaling` is set; only plain rotary embeddings are supported (Kimi-VL has none)".into(),
        )?;
        check(
            t.num_attention_heads > 0 && t.hidden_size > 0 && t.qk_rope_head_dim.is_multiple_of(2),
            "`text_config` needs heads, a hidden size and an even qk_rope_head_dim".into(),
        )?;
        check(
            t.n_routed_experts == 0
                || (t.n_group > 0
                    && t.n_routed_experts.is_multiple_of(t.n_group)
                    && t.topk_group <= t.n_group
                    && t.num_experts_per_tok <= t.n_routed_experts
                    && t.num_experts_per_tok > 0),
            format!(
                "`text_config` routes {} of {} experts in {} groups ({} kept): inconsistent",
                t.num_experts_per_tok, t.n_routed_experts, t.n_group, t.topk_group
            ),
        )?;
        let v = &vision;
        check(
            v.num_attention_heads > 0
                && v.hidden_size.is_multiple_of(v.num_attention_heads)
                && (v.hidden_size / v.num_attention_heads).is_multiple_of(4),
            "`vision_config.hidden_size` / num_attention_heads must be a multiple of 4 (2D rotary pairs)".into(),
        )?;
        check(
            v.merge_kernel_size.iter().all(|&k| k > 0) && v.patch_size > 0,
            "`vision_config` needs a positive patch size and merge kernel".into(),
        )?;
        let eos_token_ids = text
            .eos_token_id
            .clone()
            .map_or_else(|| vec![163585], OneOrMany::into_vec);
        Ok(Config {
            vision,
            text,
            media_placeholder_token_id: raw.media_placeholder_token_id,
            eos_token_ids,
        })
    }
}
