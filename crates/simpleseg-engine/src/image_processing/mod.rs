//! Image processing: what every family's image processor shares (the processed image it hands
//! the model, the settings file it reads, the pixel tensor and the expansion of the image
//! placeholder in the prompt) and Pillow's resampling ([`pillow`]). Each family's own resizing
//! and patch order live with the family (`models/*/processor.rs`).

pub mod pillow;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::io::hf::{HfFolder, JsonFile};

/// CLIP's normalization constants, the default mean and std of the processors.
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// A processed image: patches in the order the family's vision tower reads them.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessedImage {
    /// `grid_t * grid_h * grid_w` rows of one patch's values each.
    pub pixel_values: Vec<f32>,
    /// `[grid_t, grid_h, grid_w]` in patches (`grid_t` is 1 for families without time).
    pub grid_thw: [usize; 3],
    /// Size of the image the patches were cut from, `(width, height)`.
    pub resized: (usize, usize),
}

impl ProcessedImage {
    /// Number of patches.
    pub fn patches(&self) -> usize {
        self.grid_thw.iter().product()
    }

    /// Number of values per patch row.
    pub fn patch_dim(&self) -> usize {
        self.pixel_values.len() / self.patches().max(1)
    }
}

/// The image processor's settings file of a model folder: `preprocessor_config.json`
/// (transformers 4.x and remote-code processors), or the `image_processor` object of
/// `processor_config.json` (transformers 5.x).
pub fn settings_file(folder: &HfFolder) -> Result<JsonFile> {
    if let Some(file) = folder.optional_json("preprocessor_config.json")? {
        return Ok(file);
    }
    if let Some(file) = folder.optional_json("processor_config.json")? {
        let root = file
            .root
            .get("image_processor")
            .cloned()
            .ok_or_else(|| file.error("missing the \"image_processor\" object"))?;
        return Ok(JsonFile {
            path: file.path,
            root,
        });
    }
    Err(Error::MissingFile {
        path: folder.path("preprocessor_config.json"),
        hint: "the image processor settings (min/max pixels, mean/std); transformers 5 writes them into processor_config.json".into(),
    })
}

/// A per-channel setting (`image_mean`, `image_std`): one number for all channels or three.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PerChannel {
    All(f64),
    Each(Vec<f64>),
}

/// A per-channel setting as three f32 values, `default` when absent.
pub fn channels(
    file: &JsonFile,
    value: Option<PerChannel>,
    key: &str,
    default: [f32; 3],
) -> Result<[f32; 3]> {
    match value {
        None => Ok(default),
        Some(PerChannel::All(v)) => Ok([v as f32; 3]),
        Some(PerChannel::Each(v)) => match v.as_slice() {
            [a, b, c] => Ok([*a as f32, *b as f32, *c as f32]),
            _ => Err(file.error(format!("`{key}` must be a number or a list of 3 numbers"))),
        },
    }
}

/// Pixel values of processed images as one `(patches, patch_dim)` tensor.
pub fn pixel_tensor(images: &[ProcessedImage], device: &Device) -> Result<Tensor> {
    let rows: usize = images.iter().map(ProcessedImage::patches).sum();
    let values: Vec<f32> = images
        .iter()
        .flat_map(|i| i.pixel_values.iter().copied())
        .collect();
    let dim = values.len() / rows.max(1);
    Ok(Tensor::from_vec(values, (rows, dim), device)?)
}

/// Prompt text with each image placeholder `token` (one per image, as the chat template
/// writes it) repeated `counts[i]` times for image `i`, as processors do before tokenizing.
pub fn expand_placeholders(text: &str, token: &str, counts: &[usize]) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut counts = counts.iter();
    while let Some(at) = rest.find(token) {
        let n = counts.next().ok_or_else(|| {
            Error::Input("the chat template produced more image placeholders than images".into())
        })?;
        out.push_str(&rest[..at]);
        for _ in 0..*n {
            out.push_str(token);
        }
        rest = &rest[at + token.len()..];
    }
    out.push_str(rest);
    if counts.next().is_some() {
        return Err(Error::Template(format!(
            "the chat template did not place the image token {token}"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_expand_once_per_image() {
        assert_eq!(
            expand_placeholders("a<I>b<I>", "<I>", &[2, 1]).unwrap(),
            "a<I><I>b<I>"
        );
        assert!(expand_placeholders("a<I>", "<I>", &[]).is_err());
        assert!(expand_placeholders("a", "<I>", &[1]).is_err());
    }
}
