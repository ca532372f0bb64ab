//! The file formats every command shares.
//!
//! - RLE JSON: `{"size": [height, width], "counts": "<pycocotools compressed string>"}`.
//!   Reading also accepts pycocotools' uncompressed form, where `counts` is a list of runs.
//! - Mask PNG: written as 8-bit grey, 0 for background and 255 for foreground; read from any
//!   PNG (or other image) with any non-zero colour value as foreground.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::rle::RleMask;

/// The JSON form of an RLE mask.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RleJson {
    /// `[height, width]`.
    pub size: [u32; 2],
    pub counts: String,
}

impl From<&RleMask> for RleJson {
    fn from(m: &RleMask) -> Self {
        RleJson {
            size: [m.height(), m.width()],
            counts: m.to_compressed(),
        }
    }
}

impl RleMask {
    /// Reads an RLE mask from a JSON value (`{"size": [h, w], "counts": "..." | [runs]}`).
    pub fn from_json_value(value: &Value) -> std::result::Result<RleMask, String> {
        let size = value
            .get("size")
            .and_then(Value::as_array)
            .filter(|s| s.len() == 2)
            .ok_or("expected \"size\": [height, width]")?;
        let dim = |v: &Value| {
            v.as_u64()
                .and_then(|d| u32::try_from(d).ok())
                .ok_or("\"size\" must hold two non-negative integers")
        };
        let (height, width) = (dim(&size[0])?, dim(&size[1])?);
        match value.get("counts") {
            Some(Value::String(s)) => {
                RleMask::from_compressed(height, width, s).map_err(|e| e.to_string())
            }
            Some(Value::Array(runs)) => {
                let runs = runs
                    .iter()
                    .map(|r| r.as_u64().and_then(|r| u32::try_from(r).ok()))
                    .collect::<Option<Vec<_>>>()
                    .ok_or("\"counts\" list must hold non-negative integers")?;
                RleMask::from_counts(height, width, runs).map_err(|e| e.to_string())
            }
            _ => Err("expected \"counts\": a compressed string or a list of runs".into()),
        }
    }

    /// The JSON value `{"size": [h, w], "counts": "..."}`.
    pub fn to_json_value(&self) -> Value {
        serde_json::to_value(RleJson::from(self)).expect("RLE JSON serializes")
    }
}

/// Reads an RLE JSON file.
pub fn read_rle_json(path: &Path) -> Result<RleMask> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })?;
    let value: Value = serde_json::from_str(&text).map_err(|e| Error::BadFile {
        path: path.into(),
        message: format!("not JSON: {e}"),
    })?;
    RleMask::from_json_value(&value).map_err(|message| Error::BadFile {
        path: path.into(),
        message: format!("not an RLE mask: {message}"),
    })
}

/// Writes an RLE JSON file (one line, newline-terminated).
pub fn write_rle_json(path: &Path, mask: &RleMask) -> Result<()> {
    let mut text = mask.to_json_value().to_string();
    text.push('\n');
    std::fs::write(path, text).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })
}

/// Reads a mask image: any pixel with a non-zero colour value is foreground.
pub fn read_mask_png(path: &Path) -> Result<RleMask> {
    let image = image::open(path).map_err(|source| Error::Image {
        path: path.into(),
        source,
    })?;
    let (width, height) = (image.width(), image.height());
    let bytes: Vec<u8> = match image {
        image::DynamicImage::ImageLuma8(g) => g.into_raw(),
        other => other
            .to_rgb16()
            .pixels()
            .map(|p| u8::from(p.0.iter().any(|&c| c != 0)))
            .collect(),
    };
    RleMask::from_row_major(&bytes, height, width)
}

/// Writes a mask as an 8-bit grey PNG, 0 for background and 255 for foreground.
pub fn write_mask_png(path: &Path, mask: &RleMask) -> Result<()> {
    let pixels: Vec<u8> = mask.to_row_major().into_iter().map(|v| v * 255).collect();
    let image = image::GrayImage::from_raw(mask.width(), mask.height(), pixels)
        .expect("row-major mask has width * height pixels");
    image
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|source| Error::Image {
            path: path.into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_errors() {
        let mask = RleMask::from_row_major(&[0, 1, 1, 1, 0, 0], 2, 3).unwrap();
        let value = mask.to_json_value();
        assert_eq!(value["size"], serde_json::json!([2, 3]));
        assert_eq!(RleMask::from_json_value(&value).unwrap(), mask);
        let runs = serde_json::json!({"size": [2, 3], "counts": mask.counts()});
        assert_eq!(RleMask::from_json_value(&runs).unwrap(), mask);
        assert!(RleMask::from_json_value(&serde_json::json!({"size": [2], "counts": ""})).is_err());
        assert!(
            RleMask::from_json_value(&serde_json::json!({"size": [2, 3], "counts": [7]})).is_err()
        );
    }

    #[test]
    fn png_round_trip() {
        let dir = std::env::temp_dir().join(format!("simpleseg-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.png");
        let mask = RleMask::from_row_major(&[0, 1, 1, 0, 0, 1], 3, 2).unwrap();
        write_mask_png(&path, &mask).unwrap();
        assert_eq!(read_mask_png(&path).unwrap(), mask);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
