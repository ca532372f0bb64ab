//! The Qwen2-VL image processor, exactly as transformers' PIL-based `Qwen2VLImageProcessor`
//! (`use_fast=False`) prepares an image: convert to RGB (compositing transparency onto
//! white; [`simpleseg_core::images`] opens files that way), `smart_resize` to multiples of `patch_size * merge_size` within the pixel budget,
//! Pillow bicubic resampling, rescale by 1/255 in double precision then f32, normalize in f32,
//! repeat the frame `temporal_patch_size` times and flatten into patches in the model's order.

use image::RgbImage;
use simpleseg_core::limits::Limit;

pub use crate::image_processing::ProcessedImage;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::image_processing::pillow::{self, Filter};
use crate::image_processing::{channels, PerChannel, CLIP_MEAN, CLIP_STD};
use crate::io::hf::JsonFile;

/// `preprocessor_config.json` of a Qwen2-VL-family model.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessorConfig {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f64,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        ImageProcessorConfig {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: CLIP_MEAN.map(|v| v as f32),
            image_std: CLIP_STD.map(|v| v as f32),
            rescale_factor: 1.0 / 255.0,
            do_resize: true,
            do_rescale: true,
            do_normalize: true,
        }
    }
}

/// `preprocessor_config.json` as written, every key optional.
#[derive(Debug, Default, Deserialize)]
struct RawProcessor {
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
    size: Option<RawSize>,
    patch_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    merge_size: Option<usize>,
    image_mean: Option<PerChannel>,
    image_std: Option<PerChannel>,
    rescale_factor: Option<f64>,
    do_resize: Option<bool>,
    do_rescale: Option<bool>,
    do_normalize: Option<bool>,
    resample: Option<u64>,
}

/// `size` as transformers 4.x (`shortest_edge`/`longest_edge`) or 5.x writes it.
#[derive(Debug, Default, Deserialize)]
struct RawSize {
    shortest_edge: Option<usize>,
    longest_edge: Option<usize>,
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
}

impl ImageProcessorConfig {
    /// Reads the image processor settings of a model folder (see
    /// [`crate::image_processing::settings_file`]).
    pub fn load(folder: &crate::io::hf::HfFolder) -> Result<Self> {
        Self::from_json(&crate::image_processing::settings_file(folder)?)
    }

    /// Reads `preprocessor_config.json`. As in transformers, top-level `min_pixels` /
    /// `max_pixels` win over `size.shortest_edge` / `size.longest_edge`.
    pub fn from_json(file: &JsonFile) -> Result<Self> {
        let d = ImageProcessorConfig::default();
        let raw: RawProcessor = file.parse("")?;
        let size = raw.size.unwrap_or_default();
        let config = ImageProcessorConfig {
            min_pixels: raw
                .min_pixels
                .or(size.shortest_edge)
                .or(size.min_pixels)
                .unwrap_or(d.min_pixels),
            max_pixels: raw
                .max_pixels
                .or(size.longest_edge)
                .or(size.max_pixels)
                .unwrap_or(d.max_pixels),
            patch_size: raw.patch_size.unwrap_or(d.patch_size),
            temporal_patch_size: raw.temporal_patch_size.unwrap_or(d.temporal_patch_size),
            merge_size: raw.merge_size.unwrap_or(d.merge_size),
            image_mean: channels(file, raw.image_mean, "image_mean", d.image_mean)?,
            image_std: channels(file, raw.image_std, "image_std", d.image_std)?,
            rescale_factor: raw.rescale_factor.unwrap_or(d.rescale_factor),
            do_resize: raw.do_resize.unwrap_or(true),
            do_rescale: raw.do_rescale.unwrap_or(true),
            do_normalize: raw.do_normalize.unwrap_or(true),
        };
        match raw.resample {
            None | Some(3) => {}
            Some(other) => {
                return Err(file.error(format!(
                    "`resample` {other} is not supported (only 3, PIL's BICUBIC, which the Qwen2-VL processors use)"
                )))
            }
        }
        for (name, value, max) in [
            ("patch_size", config.patch_size, 1024),
            ("merge_size", config.merge_size, 64),
            ("temporal_patch_size", config.temporal_patch_size, 64),
        ] {
            if value == 0 || value > max {
                return Err(file.error(format!("`{name}` {value} is not in 1..={max}")));
            }
        }
        Limit::Pixels
            .check(config.min_pixels as u64, || {
                format!("`min_pixels` of {}", file.path.display())
            })
            .map_err(|e| file.error(e.to_string()))?;
        if config.min_pixels > config.max_pixels {
            return Err(file.error(format!(
                "min_pixels {} is larger than max_pixels {}",
                config.min_pixels, config.max_pixels
            )));
        }
        Ok(config)
    }

    /// The resize factor: `patch_size * merge_size`.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }
}

/// Python's `round` (half to even) on a float.
fn py_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// transformers' `smart_resize`: `(height, width)` rounded to multiples of `factor` with the
/// pixel count within `[min_pixels, max_pixels]`, aspect ratio kept as closely as possible.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    if height == 0 || width == 0 {
        return Err(Error::Input(format!(
            "image of {width}x{height} pixels is empty"
        )));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        return Err(Error::Input(format!(
            "absolute aspect ratio must be smaller than 200, got {ratio}"
        )));
    }
    let mut h_bar = py_round(h / f) * f;
    let mut w_bar = py_round(w / f) * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((height * width) as f64 / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (height * width) as f64).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// Prepares an RGB image for the vision tower.
pub fn preprocess(image: &RgbImage, config: &ImageProcessorConfig) -> Result<ProcessedImage> {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let resized = if config.do_resize {
        let (h, w) = smart_resize(
            height,
            width,
            config.factor(),
            config.min_pixels,
            config.max_pixels,
        )?;
        Limit::check_picture(w as u64, h as u64, || {
            "the image resized for the model (min_pixels/max_pixels)".into()
        })?;
        pillow::resize(image, w as u32, h as u32, Filter::Bicubic)
    } else {
        image.clone()
    };
    let (w, h) = (resized.width() as usize, resized.height() as usize);
    let (p, m, tp) = (
        config.patch_size,
        config.merge_size,
        config.temporal_patch_size,
    );
    if h % (p * m) != 0 || w % (p * m) != 0 {
        return Err(Error::Input(format!(
            "image of {w}x{h} pixels is not a multiple of {} (patch size x merge size); enable do_resize",
            p * m
        )));
    }
    // Channel-first f32 planes: rescale in f64 then round to f32, normalize in f32.
    let raw = resized.as_raw();
    let mut planes = zeroed(3 * h * w)?;
    for (i, px) in raw.chunks_exact(3).enumerate() {
        for c in 0..3 {
            let mut v = if config.do_rescale {
                (f64::from(px[c]) * config.rescale_factor) as f32
            } else {
                f32::from(px[c])
            };
            if config.do_normalize {
                v = (v - config.image_mean[c]) / config.image_std[c];
            }
            planes[c * h * w + i] = v;
        }
    }
    // patches[gh/m, gw/m, m, m, c, t, p, p]: the numpy transpose (1, 4, 2, 5, 0, 3, 6) with the
    // frame repeated along t.
    let (gh, gw) = (h / p, w / p);
    let patch_dim = 3 * tp * p * p;
    let mut out = Vec::new();
    out.try_reserve_exact(gh * gw * patch_dim).map_err(|_| {
        Error::Input(format!(
            "not enough memory for the patches of a {w}x{h} image"
        ))
    })?;
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    let (py, px) = ((bh * m + mh) * p, (bw * m + mw) * p);
                    for c in 0..3 {
                        for _t in 0..tp {
                            for y in 0..p {
                                let row = c * h * w + (py + y) * w + px;
                                out.extend_from_slice(&planes[row..row + p]);
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(ProcessedImage {
        pixel_values: out,
        grid_thw: [1, gh, gw],
        resized: (w, h),
    })
}

/// `len` zeroed floats, or an error when the memory cannot be had.
fn zeroed(len: usize) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| Error::Input(format!("not enough memory for {len} pixel values")))?;
    v.resize(len, 0.0);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_reference_cases() {
        // Values from transformers' smart_resize.
        assert_eq!(
            smart_resize(480, 640, 28, 3136, 12845056).unwrap(),
            (476, 644)
        );
        assert_eq!(smart_resize(10, 10, 28, 3136, 12845056).unwrap(), (56, 56));
        assert_eq!(
            smart_resize(1000, 1000, 28, 3136, 28 * 28 * 16).unwrap(),
            (112, 112)
        );
        assert!(smart_resize(1, 300, 28, 3136, 12845056).is_err());
        assert!(smart_resize(0, 3, 28, 3136, 12845056).is_err());
    }

    #[test]
    fn patch_layout() {
        let config = ImageProcessorConfig {
            do_resize: false,
            do_normalize: false,
            do_rescale: false,
            patch_size: 1,
            merge_size: 2,
            temporal_patch_size: 1,
            ..ImageProcessorConfig::default()
        };
        // 4x2 image, pixel value = x + 10 y in every channel.
        let img = RgbImage::from_fn(4, 2, |x, y| image::Rgb([(x + 10 * y) as u8; 3]));
        let out = preprocess(&img, &config).unwrap();
        assert_eq!(out.grid_thw, [1, 2, 4]);
        // First merge block (x 0..2, y 0..2) in row-major order, then the next block.
        let firsts: Vec<f32> = out.pixel_values.chunks(3).map(|c| c[0]).collect();
        assert_eq!(firsts, vec![0., 1., 10., 11., 2., 3., 12., 13.]);
    }
}
