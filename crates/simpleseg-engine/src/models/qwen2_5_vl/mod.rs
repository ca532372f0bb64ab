//! Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) on candle, following transformers.
//!
//! - Vision tower: the Qwen2.5-VL ViT ([`crate::models::qwen2_5_vit`]), whose patch merger
//!   projects into the language model.
//! - Language model: Qwen2 with M-RoPE ([`crate::models::qwen2`]).
//! - Prompts: Qwen's chat template and the Qwen2-VL image processor ([`processor`]).
//!
//! Structs mirror the checkpoint's tensor names. Both layouts transformers has written are
//! read: `model.layers.*` + `visual.*` (4.x) and `model.language_model.*` + `model.visual.*`
//! (5.x), with a flat or nested (`text_config`) `config.json`.

mod config;
pub mod processor;
pub mod training;

pub use config::{Config, TensorLayout, TextConfig, VisionConfig};
pub use processor::{preprocess, smart_resize, ImageProcessorConfig};

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::image_processing::{expand_placeholders, pixel_tensor, ProcessedImage};
use crate::io::hf::HfFolder;
use crate::io::load::{auto_dtype, LoadOptions};
use crate::io::weights::Weights;
use crate::layers::FEW_ROWS;
use crate::layers::{merge_image_features, Mode};
use crate::models::family::{Family, Network, PromptPreparer};
use crate::models::qwen2::{rope_index, TextModel};
use crate::models::qwen2_5_vit::VisionTransformer;
use crate::runtime::kv_cache::KvCache;
use crate::runtime::model::{Prompt, PromptOptions};
use crate::runtime::sampling::GenerationConfig;
use crate::runtime::session::{
    cohort_groups, extend_by_steps, extension_groups, last_position, Cohort, Decoder,
};
use crate::text::{ChatTemplate, TextTokenizer};

#[derive(Clone, Debug)]
pub struct Qwen2_5Vl {
    pub config: Config,
    pub visual: VisionTransformer,
    pub text: TextModel,
}

impl Qwen2_5Vl {
    /// Loads the weights under `vb` in the given tensor layout. Quantization, when `vb` asks
    /// for it, applies to the language model; the vision tower keeps its weights as stored.
    pub fn load(vb: &Weights, config: &Config, layout: TensorLayout) -> Result<Self> {
        let visual = VisionTransformer::load(&layout.visual(&vb.quantized(None)), &config.vision)?;
        let text = TextModel::load(
            &layout.language_model(vb),
            vb,
            &config.text,
            config.tie_word_embeddings,
        )?;
        Ok(Qwen2_5Vl {
            config: config.clone(),
            visual,
            text,
        })
    }

    /// Input embeddings for token ids `(batch, seq)` with each image placeholder replaced, in
    /// order, by the rows of `image_features` (`(placeholders, hidden)`).
    pub fn embed_with_images(
        &self,
        input_ids: &Tensor,
        image_features: Option<&Tensor>,
    ) -> Result<Tensor> {
        let embeds = self.text.embed(input_ids)?;
        match image_features {
            Some(features) => {
                merge_image_features(&embeds, input_ids, self.config.image_token_id, features)
            }
            None => Ok(embeds),
        }
    }

    /// Image features of a prompt's images, `None` without images.
    pub fn image_features(&self, images: &[ProcessedImage], mode: Mode) -> Result<Option<Tensor>> {
        if images.is_empty() {
            return Ok(None);
        }
        let device = self.text.device();
        let grids: Vec<[usize; 3]> = images.iter().map(|i| i.grid_thw).collect();
        Ok(Some(self.visual.forward(
            &pixel_tensor(images, &device)?,
            &grids,
            mode,
        )?))
    }
}

impl Decoder for Qwen2_5Vl {
    /// The rotary position offset of the prompt (`rope_deltas`).
    type Extra = i64;

    fn prefill(&self, prompt: &Prompt) -> Result<(Cohort<i64>, Tensor)> {
        let device = self.text.device();
        let grids: Vec<[usize; 3]> = prompt.images.iter().map(|i| i.grid_thw).collect();
        let features = self.image_features(&prompt.images, Mode::Infer)?;
        let ids = Tensor::new(prompt.input_ids.as_slice(), &device)?.unsqueeze(0)?;
        let embeds = self.embed_with_images(&ids, features.as_ref())?;
        let (positions, delta) = rope_index(
            &prompt.input_ids,
            self.config.image_token_id,
            &grids,
            self.config.vision.spatial_merge_size,
        )?;
        let mut cache = KvCache::default();
        let hidden = self
            .text
            .forward(&embeds, &[positions], Some(&mut cache), Mode::Infer)?;
        let logits = self.text.logits(&last_position(&hidden)?)?;
        Ok((
            Cohort {
                cache,
                rows: 1,
                extra: delta,
            },
            logits,
        ))
    }

    fn step(&self, tokens: &Tensor, cohorts: &mut [Cohort<i64>]) -> Result<Tensor> {
        let embeds = self.text.embed(&tokens.unsqueeze(1)?)?;
        let groups = cohort_groups(cohorts, |&delta| delta);
        let mut caches: Vec<&mut KvCache> = cohorts.iter_mut().map(|c| &mut c.cache).collect();
        let hidden = self.text.step(&embeds, &mut caches, &groups)?;
        Ok(self.text.logits(&hidden.squeeze(1)?)?)
    }

    /// One forward on the CPU, where every product of a few rows gives each row what it gives
    /// alone (one dot product per output); a step at a time elsewhere.
    fn extend(&self, tokens: &Tensor, cohort: &mut Cohort<i64>) -> Result<Tensor> {
        let n = tokens.dim(0)?;
        if !tokens.device().is_cpu() || n > FEW_ROWS || cohort.rows != 1 {
            return extend_by_steps(self, tokens, cohort);
        }
        let embeds = self.text.embed(&tokens.unsqueeze(1)?)?;
        let position = cohort.cache.len() as i64 + cohort.extra;
        let groups = extension_groups(n, position);
        let hidden = self.text.step(&embeds, &mut [&mut cohort.cache], &groups)?;
        Ok(self.text.logits(&hidden.narrow(0, n - 1, 1)?.squeeze(1)?)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Pipeline: folder loading, prompts and sessions

/// Builds model inputs: chat template, image processing, placeholder expansion, tokens.
#[derive(Clone)]
pub struct PromptBuilder {
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    pub image_config: ImageProcessorConfig,
    image_token: String,
    merge_size: usize,
}

impl PromptBuilder {
    /// Checks that the pieces fit the model configuration.
    pub fn new(
        tokenizer: TextTokenizer,
        template: ChatTemplate,
        image_config: ImageProcessorConfig,
        config: &Config,
    ) -> Result<Self> {
        if image_config.patch_size != config.vision.patch_size
            || image_config.merge_size != config.vision.spatial_merge_size
            || image_config.temporal_patch_size != config.vision.temporal_patch_size
        {
            return Err(Error::Input(format!(
                "the image processor's patch_size/merge_size/temporal_patch_size {}/{}/{} differ from config.json's vision_config {}/{}/{}",
                image_config.patch_size,
                image_config.merge_size,
                image_config.temporal_patch_size,
                config.vision.patch_size,
                config.vision.spatial_merge_size,
                config.vision.temporal_patch_size
            )));
        }
        let image_token = tokenizer
            .id_to_token(config.image_token_id)
            .ok_or_else(|| {
                Error::Input(format!(
                    "config.json's `image_token_id` {} is not in the tokenizer's vocabulary",
                    config.image_token_id
                ))
            })?;
        Ok(PromptBuilder {
            tokenizer,
            template,
            image_config,
            image_token,
            merge_size: config.vision.spatial_merge_size,
        })
    }

    /// Prompt text with the image placeholder expanded to one token per merged patch, as the
    /// processor does before tokenizing.
    pub fn expand_placeholders(&self, text: &str, grids: &[[usize; 3]]) -> Result<String> {
        let m2 = self.merge_size.pow(2);
        let counts: Vec<usize> = grids.iter().map(|g| g[0] * g[1] * g[2] / m2).collect();
        expand_placeholders(text, &self.image_token, &counts)
    }

    /// One user turn with the image and the prompt (after a system message when given), the
    /// image processed with `image_config`.
    pub fn prepare_resized(
        &self,
        image: &image::RgbImage,
        prompt: &str,
        system: Option<&str>,
        image_config: &ImageProcessorConfig,
    ) -> Result<Prompt> {
        let processed = preprocess(image, image_config)?;
        let text = self.template.image_prompt(prompt, system)?;
        let text = self.expand_placeholders(&text, &[processed.grid_thw])?;
        Ok(Prompt {
            input_ids: self.tokenizer.encode(&text)?,
            images: vec![processed],
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
        let mut config = self.image_config.clone();
        if let Some(min) = options.pixels.min_pixels {
            config.min_pixels = min;
        }
        if let Some(max) = options.pixels.max_pixels {
            config.max_pixels = max;
        }
        if config.min_pixels > config.max_pixels || config.max_pixels == 0 {
            return Err(Error::Input(format!(
                "min_pixels {} and max_pixels {} leave no image size",
                config.min_pixels, config.max_pixels
            )));
        }
        self.prepare_resized(image, prompt, options.system.as_deref(), &config)
    }

    fn pixel_range(&self) -> Option<(usize, usize)> {
        Some((self.image_config.min_pixels, self.image_config.max_pixels))
    }
}

impl Network for Qwen2_5Vl {
    fn max_positions(&self) -> usize {
        self.config.text.max_position_embeddings
    }
}

/// A Qwen2.5-VL folder loaded for inference: model, prompt builder, decoding defaults.
pub type Qwen2_5VlModel = Family<Qwen2_5Vl, PromptBuilder>;

/// The tokenizer, template and processor settings of a folder.
pub fn prompt_builder(folder: &HfFolder, config: &Config) -> Result<PromptBuilder> {
    let tokenizer = TextTokenizer::from_file(&folder.path("tokenizer.json"))?;
    let template = ChatTemplate::load(folder)?;
    let image_config = ImageProcessorConfig::load(folder)?;
    PromptBuilder::new(tokenizer, template, image_config, config).map_err(|e| Error::BadConfig {
        path: folder.dir().to_path_buf(),
        message: e.to_string(),
    })
}

/// Loads every file of the folder; errors name the file and key at fault.
pub fn load(folder: &HfFolder, options: &LoadOptions) -> Result<Qwen2_5VlModel> {
    let config = Config::from_json(&folder.json("config.json")?)?;
    let dtype = match options.dtype {
        Some(d) => d,
        None => auto_dtype(folder)?,
    };
    let vb = options.weights(folder, dtype)?;
    let layout = TensorLayout::detect(&vb.names())?;
    let model = Qwen2_5Vl::load(&vb, &config, layout).map_err(|e| Error::BadFile {
        path: folder.dir().to_path_buf(),
        message: format!("weights do not fit config.json: {e}"),
    })?;
    let prompts = prompt_builder(folder, &config)?;
    let generation =
        GenerationConfig::for_model(folder, &config.eos_token_ids, &prompts.tokenizer)?;
    Ok(Family {
        architecture: "qwen2_5_vl",
        model,
        prompts,
        generation,
        dtype,
    })
}

/// The tensors the family reads from a folder, as `weights` records them; returns where the
/// family looks for a separate output head.
pub fn plan(folder: &HfFolder, weights: &Weights) -> Result<&'static str> {
    let config = Config::from_json(&folder.json("config.json")?)?;
    let layout = TensorLayout::detect(&weights.names())?;
    Qwen2_5Vl::load(weights, &config, layout)?;
    Ok("lm_head.weight")
}
