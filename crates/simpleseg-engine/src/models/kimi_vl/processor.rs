//! Kimi-VL's image processor (`KimiVLImageProcessor`), as its reference code prepares an
//! image: when the image holds more than `in_token_limit` whole patches, scale it by
//! `sqrt(limit / patches)` (computed in double precision) to `(int(w * s), int(h * s))` with
//! Pillow's bicubic filter; then pad with zeros at the bottom and right to a multiple of
//! `patch_size * merge_kernel_size` (`pad_input`), or centre-crop to one; refuse grids of 512
//! patches or more a side (beyond the rotary table); scale to `[0, 1]` and normalize in f32;
//! cut `(3, patch, patch)` patches in row-major order over the grid.

use image::RgbImage;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::image_processing::pillow::{self, Filter};
use crate::image_processing::{channels, PerChannel, ProcessedImage, CLIP_MEAN, CLIP_STD};
use crate::io::hf::JsonFile;

/// `preprocessor_config.json` of a Kimi-VL model.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessorConfig {
    pub patch_size: usize,
    pub merge_kernel_size: [usize; 2],
    pub in_token_limit: usize,
    pub pad_input: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

#[derive(Deserialize)]
struct RawProcessor {
    patch_size: Option<usize>,
    merge_kernel_size: Option<[usize; 2]>,
    in_token_limit: Option<usize>,
    pad_input: Option<bool>,
    image_mean: Option<PerChannel>,
    image_std: Option<PerChannel>,
}

/// Grids this wide or high exceed MoonViT's rotary table.
const MAX_GRID_SIDE: usize = 512;

impl ImageProcessorConfig {
    /// Reads the settings; keys default as the processor class defaults them.
    pub fn from_json(file: &JsonFile) -> Result<Self> {
        let raw: RawProcessor = file.parse("")?;
        // The processor class's defaults are CLIP's mean and std (Kimi-VL's file sets 0.5).
        let config = ImageProcessorConfig {
            patch_size: raw.patch_size.unwrap_or(14),
            merge_kernel_size: raw.merge_kernel_size.unwrap_or([2, 2]),
            in_token_limit: raw.in_token_limit.unwrap_or(4096),
            pad_input: raw.pad_input.unwrap_or(false),
            image_mean: channels(
                file,
                raw.image_mean,
                "image_mean",
                CLIP_MEAN.map(|v| v as f32),
            )?,
            image_std: channels(file, raw.image_std, "image_std", CLIP_STD.map(|v| v as f32))?,
        };
        if !(1..=1024).contains(&config.patch_size)
            || config
                .merge_kernel_size
                .iter()
                .any(|k| !(1..=64).contains(k))
        {
            return Err(file.error(format!(
                "`patch_size` {} or `merge_kernel_size` {:?} is out of range",
                config.patch_size, config.merge_kernel_size
            )));
        }
        if config.in_token_limit == 0 {
            return Err(file.error("`in_token_limit` must be at least 1"));
        }
        Ok(config)
    }

    /// Patches per merged token.
    pub fn merge_area(&self) -> usize {
        self.merge_kernel_size[0] * self.merge_kernel_size[1]
    }
}

/// Prepares an RGB image for MoonViT; `grid_thw` is `[1, rows, columns]` of patches.
pub fn preprocess(image: &RgbImage, config: &ImageProcessorConfig) -> Result<ProcessedImage> {
    let p = config.patch_size;
    let (w, h) = (image.width() as usize, image.height() as usize);
    if w == 0 || h == 0 {
        return Err(Error::Input(format!("image of {w}x{h} pixels is empty")));
    }
    let whole = (w / p) * (h / p);
    let scaled = if whole > config.in_token_limit {
        let scale = (config.in_token_limit as f64 / whole as f64).sqrt();
        // Python's int() truncates toward zero.
        let (nw, nh) = ((w as f64 * scale) as u32, (h as f64 * scale) as u32);
        if nw == 0 || nh == 0 {
            return Err(Error::Input(format!(
                "image of {w}x{h} pixels scales to nothing under in_token_limit {}",
                config.in_token_limit
            )));
        }
        pillow::resize(image, nw, nh, Filter::Bicubic)
    } else {
        image.clone()
    };
    let (sw, sh) = (scaled.width() as usize, scaled.height() as usize);
    let unit_h = config.merge_kernel_size[0] * p;
    let unit_w = config.merge_kernel_size[1] * p;
    // The patch grid's image: padded with zeros, or cropped about the centre.
    let (gw, gh, left, top) = if config.pad_input {
        (
            sw.div_ceil(unit_w) * unit_w,
            sh.div_ceil(unit_h) * unit_h,
            0,
            0,
        )
    } else {
        let (cw, ch) = (sw - sw % unit_w, sh - sh % unit_h);
        (cw, ch, (sw - cw) / 2, (sh - ch) / 2)
    };
    if gw == 0 || gh == 0 {
        return Err(Error::Input(format!(
            "image of {sw}x{sh} pixels is smaller than one merged patch ({unit_w}x{unit_h})"
        )));
    }
    let (rows, cols) = (gh / p, gw / p);
    if rows >= MAX_GRID_SIDE || cols >= MAX_GRID_SIDE {
        return Err(Error::Input(format!(
            "a grid of {cols}x{rows} patches exceeds MoonViT's position table ({MAX_GRID_SIDE} a side); lower in_token_limit"
        )));
    }
    // [0, 1] in f32, then normalized in f32, as torchvision's to_tensor and normalize do;
    // padding is black (0) before normalization.
    let raw = scaled.as_raw();
    let value = |c: usize, y: usize, x: usize| -> f32 {
        let (sx, sy) = (x + left, y + top);
        let byte = if sx < sw && sy < sh && (config.pad_input || (x < gw && y < gh)) {
            raw[(sy * sw + sx) * 3 + c]
        } else {
            0
        };
        (f32::from(byte) / 255.0 - config.image_mean[c]) / config.image_std[c]
    };
    let mut out = Vec::new();
    out.try_reserve_exact(rows * cols * 3 * p * p)
        .map_err(|_| {
            Error::Input(format!(
                "not enough memory for the patches of a {gw}x{gh} image"
            ))
        })?;
    for gy in 0..rows {
        for gx in 0..cols {
            for c in 0..3 {
                for y in 0..p {
                    for x in 0..p {
                        out.push(value(c, gy * p + y, gx * p + x));
                    }
                }
            }
        }
    }
    Ok(ProcessedImage {
        pixel_values: out,
        grid_thw: [1, rows, cols],
        resized: (gw, gh),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pad_input: bool) -> ImageProcessorConfig {
        ImageProcessorConfig {
            patch_size: 2,
            merge_kernel_size: [2, 2],
            in_token_limit: 4096,
            pad_input,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
        }
    }

    #[test]
    fn pads_or_crops_to_the_merge_grid_and_orders_patches_row_major() {
        // 5x3 image: padded to 8x4 (4x2 patches of 2x2), or cropped to 4x0 (refused).
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([(x * 10 + y) as u8, 0, 255]));
        let padded = preprocess(&img, &config(true)).unwrap();
        assert_eq!(padded.grid_thw, [1, 2, 4]);
        assert_eq!(padded.patch_dim(), 3 * 2 * 2);
        // Patch (row 0, col 1), channel 0, pixel (0, 0) is image pixel (2, 0) = 20.
        let v = padded.pixel_values[12];
        assert_eq!(v, (20.0f32 / 255.0 - 0.5) / 0.5);
        // The padding is black.
        let last = padded.pixel_values.len() - 1;
        assert_eq!(padded.pixel_values[last], (0.0 - 0.5) / 0.5);
        assert!(preprocess(&img, &config(false)).is_err());
    }
}
