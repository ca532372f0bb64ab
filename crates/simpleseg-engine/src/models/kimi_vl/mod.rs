//! Kimi-VL (`KimiVLForConditionalGeneration`, the original SimpleSeg checkpoint) on candle:
//! MoonViT ([`crate::models::moonvit`]) and a projector ([`Projector`]) feeding a DeepSeek-V3
//! mixture-of-experts language model ([`crate::models::deepseek_v3`]), with Moonshot's
//! tiktoken tokenizer and Kimi's image processor ([`processor`]).
//!
//! Structs mirror the checkpoint's tensor names: `vision_tower.*`, `multi_modal_projector.*`,
//! `language_model.model.*` and `language_model.lm_head`. Each layer's
//! `self_attn.rotary_emb.inv_freq` is ignored (the angles are computed from `rope_theta`).

mod config;
pub mod processor;
mod projector;

pub use config::{Config, TextConfig, VisionConfig};
pub use processor::{preprocess, ImageProcessorConfig};
pub use projector::Projector;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::image_processing::{expand_placeholders, pixel_tensor, ProcessedImage};
use crate::io::hf::HfFolder;
use crate::io::load::{auto_dtype, LoadOptions};
use crate::io::weights::Weights;
use crate::layers::merge_image_features;
use crate::layers::FEW_ROWS;
use crate::models::deepseek_v3::DeepseekV3;
use crate::models::family::{Family, Network, PromptPreparer};
use crate::models::moonvit::MoonVit;
use crate::runtime::kv_cache::KvCache;
use crate::runtime::model::{Prompt, PromptOptions};
use crate::runtime::sampling::GenerationConfig;
use crate::runtime::session::{
    cohort_groups, extend_by_steps, extension_groups, last_position, Cohort, Decoder,
};
use crate::text::tiktoken::TiktokenTokenizer;
use crate::text::{ChatTemplate, TextTokenizer};

/// The whole model: vision tower, projector, language model.
#[derive(Clone, Debug)]
pub struct KimiVl {
    pub config: Config,
    pub vision_tower: MoonVit,
    pub multi_modal_projector: Projector,
    pub language_model: DeepseekV3,
}

impl KimiVl {
    /// Loads the weights under `vb`. Quantization, when `vb` asks for it, applies to the
    /// language model; the vision tower and projector keep their weights as stored.
    pub fn load(vb: &Weights, config: &Config) -> Result<Self> {
        let stored = vb.quantized(None);
        Ok(KimiVl {
            config: config.clone(),
            vision_tower: MoonVit::load(&stored.pp("vision_tower"), &config.vision)?,
            multi_modal_projector: Projector::load(
                &stored.pp("multi_modal_projector"),
                &config.vision,
                config.text.hidden_size,
            )?,
            language_model: DeepseekV3::load(
                &vb.pp("language_model").pp("model"),
                &vb.pp("language_model"),
                &config.text,
            )?,
        })
    }

    /// Tensors of the checkpoint that the model knows and does not read: each layer's rotary
    /// frequencies, `(name, shape)`.
    pub fn ignored_tensors(config: &Config) -> Vec<(String, Vec<usize>)> {
        (0..config.text.num_hidden_layers)
            .map(|i| {
                (
                    format!("language_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"),
                    vec![config.text.qk_rope_head_dim / 2],
                )
            })
            .collect()
    }

    /// Language-model features `(merged tokens, hidden)` of a prompt's images, `None` without
    /// images.
    pub fn image_features(&self, images: &[ProcessedImage]) -> Result<Option<Tensor>> {
        if images.is_empty() {
            return Ok(None);
        }
        let device = self.language_model.device();
        let grids: Vec<[usize; 3]> = images.iter().map(|i| i.grid_thw).collect();
        let patches = self
            .vision_tower
            .forward(&pixel_tensor(images, &device)?, &grids)?;
        let merged = self.vision_tower.merge(&patches, &grids)?;
        Ok(Some(self.multi_modal_projector.forward(&merged)?))
    }
}

impl KimiVl {
    /// Final hidden states `(1, seq, hidden)` of every prompt position, filling `cache`.
    pub fn prompt_hidden(&self, prompt: &Prompt, cache: &mut KvCache) -> Result<Tensor> {
        let device = self.language_model.device();
        let ids = Tensor::new(prompt.input_ids.as_slice(), &device)?.unsqueeze(0)?;
        let embeds = self.language_model.embed(&ids)?;
        let embeds = match self.image_features(&prompt.images)? {
            Some(features) => merge_image_features(
                &embeds,
                &ids,
                self.config.media_placeholder_token_id,
                &features,
            )?,
            None => embeds,
        };
        Ok(self.language_model.prefill(&embeds, cache)?)
    }
}

impl Decoder for KimiVl {
    type Extra = ();

    fn prefill(&self, prompt: &Prompt) -> Result<(Cohort<()>, Tensor)> {
        let mut cache = KvCache::default();
        let hidden = self.prompt_hidden(prompt, &mut cache)?;
        let logits = self.language_model.logits(&last_position(&hidden)?)?;
        Ok((
            Cohort {
                cache,
                rows: 1,
                extra: (),
            },
            logits,
        ))
    }

    fn step(&self, tokens: &Tensor, cohorts: &mut [Cohort<()>]) -> Result<Tensor> {
        let embeds = self.language_model.embed(&tokens.unsqueeze(1)?)?;
        let groups = cohort_groups(cohorts, |_| 0);
        let mut caches: Vec<&mut KvCache> = cohorts.iter_mut().map(|c| &mut c.cache).collect();
        let hidden = self.language_model.step(&embeds, &mut caches, &groups)?;
        Ok(self.language_model.logits(&hidden.squeeze(1)?)?)
    }

    /// One forward on the CPU, where every product of a few rows gives each row what it gives
    /// alone (one dot product per output); a step at a time elsewhere.
    fn extend(&self, tokens: &Tensor, cohort: &mut Cohort<()>) -> Result<Tensor> {
        let n = tokens.dim(0)?;
        if !tokens.device().is_cpu() || n > FEW_ROWS || cohort.rows != 1 {
            return extend_by_steps(self, tokens, cohort);
        }
        let embeds = self.language_model.embed(&tokens.unsqueeze(1)?)?;
        let groups = extension_groups(n, cohort.cache.len() as i64);
        let hidden = self
            .language_model
            .step(&embeds, &mut [&mut cohort.cache], &groups)?;
        Ok(self
            .language_model
            .logits(&hidden.narrow(0, n - 1, 1)?.squeeze(1)?)?)
    }
}

/// Builds model inputs: chat template, image processing, `<|media_pad|>` expansion, tokens.
#[derive(Clone)]
pub struct PromptBuilder {
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    pub image_config: ImageProcessorConfig,
    media_pad: String,
}

impl PromptBuilder {
    /// The pieces of a folder, checked against its configuration.
    pub fn load(folder: &HfFolder, config: &Config) -> Result<Self> {
        let tokenizer = TextTokenizer::tiktoken(TiktokenTokenizer::load(folder)?);
        let template = ChatTemplate::load(folder)?;
        let settings = crate::image_processing::settings_file(folder)?;
        let image_config = ImageProcessorConfig::from_json(&settings)?;
        let v = &config.vision;
        if image_config.patch_size != v.patch_size
            || image_config.merge_kernel_size != v.merge_kernel_size
        {
            return Err(settings.error(format!(
                "patch_size {} / merge_kernel_size {:?} differ from config.json's vision_config {} / {:?}",
                image_config.patch_size, image_config.merge_kernel_size, v.patch_size, v.merge_kernel_size
            )));
        }
        let media_pad = tokenizer
            .id_to_token(config.media_placeholder_token_id)
            .ok_or_else(|| Error::BadConfig {
                path: folder.path("config.json"),
                message: format!(
                    "`media_placeholder_token_id` {} is not a token of the tokenizer",
                    config.media_placeholder_token_id
                ),
            })?;
        Ok(PromptBuilder {
            tokenizer,
            template,
            image_config,
            media_pad,
        })
    }
}

impl PromptPreparer for PromptBuilder {
    fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    fn prepare_with(
        &self,
        image: &image::RgbImage,
        prompt: &str,
        options: &PromptOptions,
    ) -> Result<Prompt> {
        let processed = preprocess(image, &self.image_config)?;
        let text = self
            .template
            .image_prompt(prompt, options.system.as_deref())?;
        let count = processed.patches() / self.image_config.merge_area();
        let text = expand_placeholders(&text, &self.media_pad, &[count])?;
        Ok(Prompt {
            input_ids: self.tokenizer.encode(&text)?,
            images: vec![processed],
        })
    }
}

impl Network for KimiVl {
    fn max_positions(&self) -> usize {
        self.config.text.max_position_embeddings
    }
}

/// A Kimi-VL folder loaded for inference.
pub type KimiVlModel = Family<KimiVl, PromptBuilder>;

/// Loads every file of the folder; errors name the file and key at fault.
pub fn load(folder: &HfFolder, options: &LoadOptions) -> Result<KimiVlModel> {
    let config = Config::from_json(&folder.json("config.json")?)?;
    let dtype = match options.dtype {
        Some(DType::F16) => {
            return Err(Error::Unsupported(
                "--dtype f16 is refused for Kimi-VL: its activations overflow f16's range; use bf16 or f32".into(),
            ))
        }
        Some(d) => d,
        None => auto_dtype(folder)?,
    };
    let vb = options.weights(folder, dtype)?;
    let model = KimiVl::load(&vb, &config).map_err(|e| Error::BadFile {
        path: folder.dir().to_path_buf(),
        message: format!("weights do not fit config.json: {e}"),
    })?;
    let prompts = PromptBuilder::load(folder, &config)?;
    let generation =
        GenerationConfig::for_model(folder, &config.eos_token_ids, &prompts.tokenizer)?;
    Ok(Family {
        architecture: "kimi_vl",
        model,
        prompts,
        generation,
        dtype,
    })
}

/// The tensors the family reads from a folder, as `weights` records them; returns where the
/// family looks for a separate output head.
pub fn plan(folder: &HfFolder, weights: &Weights) -> Result<&'static str> {
    KimiVl::load(weights, &Config::from_json(&folder.json("config.json")?)?)?;
    Ok("language_model.lm_head.weight")
}
