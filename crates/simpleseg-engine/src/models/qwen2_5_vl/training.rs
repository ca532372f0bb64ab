//! Qwen2.5-VL for training ([`crate::models::training`]): the network over trainable
//! variables, named as transformers 5 names them; the chat tokens and template of
//! Qwen2.5-VL-Instruct; M-RoPE positions for padded batches; the folder transformers loads.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use image::RgbImage;
use serde_json::json;
use simpleseg_core::io::write_atomic;

use crate::error::{Error, Result};
use crate::image_processing::{pixel_tensor, ProcessedImage};
use crate::io::hf::{HfFolder, JsonFile};
use crate::io::load::LoadOptions;
use crate::io::weights::Weights;
use crate::layers::Mode;
use crate::models::family::PromptPreparer;
use crate::models::qwen2::{rope_index, MropePosition};
use crate::models::qwen2_5_vl::processor::{preprocess, smart_resize};
use crate::models::qwen2_5_vl::{
    prompt_builder, Config, ImageProcessorConfig, PromptBuilder, Qwen2_5Vl, TensorLayout,
};
use crate::models::training::{
    EncodedExample, Forward, Init, TrainBatch, TrainingEntry, TrainingModel,
};
use crate::runtime::model::{PromptSource, Sessions};
use crate::text::{ChatTemplate, TextTokenizer};

/// Qwen2.5-VL's special tokens, in id order (a tokenizer trained here gives them ids 0..8).
pub const SPECIAL_TOKENS: [&str; 8] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
];

/// The chat template Qwen2.5-VL-7B-Instruct ships.
pub const CHAT_TEMPLATE: &str = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// The family's training entry points.
pub const ENTRY: TrainingEntry = TrainingEntry {
    special_tokens: &SPECIAL_TOKENS,
    chat_template: CHAT_TEMPLATE,
    from_folder: |folder, device| Ok(Box::new(Trainable::from_folder(folder, device)?)),
    from_config: |file, tokenizer, template, device| {
        Ok(Box::new(Trainable::from_config(
            file, tokenizer, template, device,
        )?))
    },
    frozen: |folder, device| Ok(Box::new(frozen(folder, device)?)),
    init,
};

/// Normalization scales start at one, biases at zero, the rest normal (the vision tower's,
/// `model.visual.*`, with its own deviation).
fn init(name: &str) -> Init {
    if name.ends_with(".weight") && (name.contains("norm") || name.contains("ln_q")) {
        Init::One
    } else if name.ends_with(".bias") {
        Init::Zero
    } else {
        Init::Normal {
            vision: name.starts_with("model.visual."),
        }
    }
}

impl Forward for Qwen2_5Vl {
    /// Padding positions continue the sequence's text positions; they only feed padding.
    fn hidden_states(&self, batch: &TrainBatch, mode: Mode) -> Result<Tensor> {
        let device = self.text.device();
        let t = batch
            .ids
            .iter()
            .map(|s| s.len())
            .max()
            .unwrap_or(0)
            .max(batch.min_len);
        let grids: Vec<[usize; 3]> = batch.images.iter().map(|i| i.grid_thw).collect();
        let mut ids = Vec::with_capacity(batch.ids.len() * t);
        let mut positions: Vec<Vec<MropePosition>> = Vec::with_capacity(batch.ids.len());
        for (seq, &image) in batch.ids.iter().zip(&batch.image_of) {
            let grid = grids.get(image).copied().ok_or_else(|| {
                Error::Input(format!("sequence image {image} of {} images", grids.len()))
            })?;
            let (mut pos, _) = rope_index(
                seq,
                self.config.image_token_id,
                &[grid],
                self.config.vision.spatial_merge_size,
            )?;
            let last = pos.last().map_or(0, |p| p[0]);
            for k in seq.len()..t {
                pos.push([last + (k - seq.len()) as i64 + 1; 3]);
            }
            positions.push(pos);
            ids.extend_from_slice(seq);
            ids.extend(std::iter::repeat_n(batch.pad, t - seq.len()));
        }
        let features = self
            .visual
            .forward(&pixel_tensor(batch.images, &device)?, &grids, mode)?;
        let n = batch.image_of.len();
        let features = if batch.image_of.iter().copied().eq(0..n) {
            features
        } else if batch.images.len() == 1 {
            // One vision pass, its features repeated for every sequence (gradients add up).
            Tensor::cat(&vec![features; n], 0)?
        } else {
            return Err(Error::Input(
                "sequences show their own images in order, or all one image".into(),
            ));
        };
        let ids = Tensor::from_vec(ids, (n, t), &device)?;
        let embeds = self.embed_with_images(&ids, Some(&features))?;
        Ok(self.text.forward(&embeds, &positions, None, mode)?)
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.text.logits(hidden)?)
    }
}

/// A Qwen2.5-VL model over trainable variables, with its prompts.
pub struct Trainable {
    varmap: VarMap,
    model: Qwen2_5Vl,
    prompts: PromptBuilder,
    end_of_turn: u32,
    padding: u32,
}

impl Trainable {
    fn new(config: &Config, prompts: PromptBuilder, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = Qwen2_5Vl::load(&Weights::from_var_builder(vb), config, TensorLayout::Nested)?;
        let end_of_turn = prompts
            .tokenizer
            .token_id("<|im_end|>")
            .ok_or_else(|| Error::Input("the tokenizer lacks <|im_end|>".into()))?;
        let padding = prompts
            .tokenizer
            .token_id("<|endoftext|>")
            .unwrap_or(end_of_turn);
        Ok(Trainable {
            varmap,
            model,
            prompts,
            end_of_turn,
            padding,
        })
    }

    /// A folder's model with its weights, of either tensor layout.
    pub fn from_folder(folder: &HfFolder, device: &Device) -> Result<Self> {
        let config = Config::from_json(&folder.json("config.json")?)?;
        let prompts = prompt_builder(folder, &config)?;
        let this = Trainable::new(&config, prompts, device)?;
        let layout = TensorLayout::detect(&folder.tensor_names()?)?;
        let source = folder.var_builder(DType::F32, device)?;
        #[expect(clippy::expect_used, reason = "poisoned only after a panic elsewhere")]
        let vars = this.varmap.data().lock().expect("var map lock").clone();
        for (name, var) in vars {
            let source_name = match layout {
                TensorLayout::Nested => name.clone(),
                TensorLayout::Flat => name
                    .replacen("model.language_model.", "model.", 1)
                    .replacen("model.visual.", "visual.", 1),
            };
            let value = source
                .get(var.shape(), &source_name)
                .map_err(|e| Error::BadFile {
                    path: folder.dir().to_path_buf(),
                    message: format!("cannot initialize {name} from {source_name}: {e}"),
                })?;
            var.set(&value)?;
        }
        Ok(this)
    }

    /// A new model from a configuration file, its vocabulary and special token ids filled in
    /// from the tokenizer.
    pub fn from_config(
        file: &JsonFile,
        tokenizer: tokenizers::Tokenizer,
        template: String,
        device: &Device,
    ) -> Result<Self> {
        let id = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| Error::Input(format!("the tokenizer lacks the special token {t}")))
        };
        let mut file = file.clone();
        let vocab = tokenizer.get_vocab_size(true);
        let root = &mut file.root;
        let text = if root.get("text_config").is_some() {
            &mut root["text_config"]
        } else {
            &mut *root
        };
        text["vocab_size"] = json!(vocab);
        text["eos_token_id"] = json!(id("<|im_end|>")?);
        root["image_token_id"] = json!(id("<|image_pad|>")?);
        root["video_token_id"] = json!(id("<|video_pad|>")?);
        root["vision_start_token_id"] = json!(id("<|vision_start|>")?);
        root["vision_end_token_id"] = json!(id("<|vision_end|>")?);
        root["eos_token_id"] = json!(id("<|im_end|>")?);
        let config = Config::from_json(&file)?;
        let image_config = match file.root.get("image_processor") {
            Some(v) => ImageProcessorConfig::from_json(&JsonFile {
                path: file.path.clone(),
                root: v.clone(),
            })?,
            None => ImageProcessorConfig::default(),
        };
        let prompts = PromptBuilder::new(
            TextTokenizer::new(tokenizer),
            ChatTemplate::from_source(template),
            image_config,
            &config,
        )?;
        Trainable::new(&config, prompts, device)
    }
}

/// A folder's network, its weights read as stored (f32).
fn frozen(folder: &HfFolder, device: &Device) -> Result<Qwen2_5Vl> {
    let config = Config::from_json(&folder.json("config.json")?)?;
    let options = LoadOptions {
        device: device.clone(),
        dtype: Some(DType::F32),
        quantize: None,
    };
    let weights = options.weights(folder, DType::F32)?;
    let layout = TensorLayout::detect(&weights.names())?;
    Qwen2_5Vl::load(&weights, &config, layout)
}

impl TrainingModel for Trainable {
    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    fn forward(&self) -> &dyn Forward {
        &self.model
    }

    fn sessions(&self) -> &dyn Sessions {
        &self.model
    }

    fn prompts(&self) -> &dyn PromptSource {
        &self.prompts
    }

    fn tokenizer(&self) -> &TextTokenizer {
        PromptPreparer::tokenizer(&self.prompts)
    }

    fn end_of_turn(&self) -> u32 {
        self.end_of_turn
    }

    fn padding(&self) -> u32 {
        self.padding
    }

    fn encode(&self, question: &str, answer: &str, (w, h): (u32, u32)) -> Result<EncodedExample> {
        let c = &self.prompts.image_config;
        let (rh, rw) = smart_resize(
            h as usize,
            w as usize,
            c.factor(),
            c.min_pixels,
            c.max_pixels,
        )?;
        let grid = [1, rh / c.patch_size, rw / c.patch_size];
        let text = self.prompts.template.image_prompt(question, None)?;
        let text = self.prompts.expand_placeholders(&text, &[grid])?;
        let tokenizer = &self.prompts.tokenizer;
        let mut ids = tokenizer.encode(&text)?;
        let answer_start = ids.len();
        ids.extend(tokenizer.encode(answer)?);
        ids.push(self.end_of_turn);
        Ok(EncodedExample {
            ids,
            answer_start,
            grid,
        })
    }

    fn process(&self, image: &RgbImage) -> Result<ProcessedImage> {
        preprocess(image, &self.prompts.image_config)
    }

    fn write_metadata(&self, dir: &Path, max_new_tokens: usize) -> Result<()> {
        write_metadata(dir, &self.model.config, &self.prompts, max_new_tokens)
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    write_atomic(path, |w| {
        serde_json::to_writer_pretty(&mut *w, value).map_err(|e| e.to_string())?;
        writeln!(w).map_err(|e| e.to_string())
    })?;
    Ok(())
}

/// Every file of the folder but the weights, as transformers writes them for Qwen2.5-VL.
fn write_metadata(
    dir: &Path,
    config: &Config,
    prompts: &PromptBuilder,
    max_new_tokens: usize,
) -> Result<()> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let tokenizer = prompts.tokenizer.hf().ok_or_else(|| {
        Error::Input("training needs a model with a tokenizer.json tokenizer".into())
    })?;
    let image = &prompts.image_config;
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
        w.write_all(prompts.template.source().as_bytes())
            .map_err(|e| e.to_string())
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
