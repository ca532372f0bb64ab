//! The file formats every command shares.
//!
//! - RLE JSON: `{"size": [height, width], "counts": "<pycocotools compressed string>"}`.
//!   Reading also accepts pycocotools' uncompressed form, where `counts` is a list of runs.
//! - Mask PNG: written as 8-bit grey, 0 for background and 255 for foreground; read from any
//!   PNG (or JPEG) with any non-zero colour value as foreground.
//!
//! Files are written atomically ([`Outputs`]): a temporary file beside the target, renamed
//! over it once complete.

pub use crate::outputs::{write_atomic, Outputs};

use std::fs::File;
use std::io::{Seek, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::images::{decode_image, read_image_file};
use crate::limits::{read_text_file_bounded, Limit};
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
        serde_json::json!({"size": [self.height(), self.width()], "counts": self.to_compressed()})
    }
}

/// Reads an RLE JSON file (at most the data byte limit).
pub fn read_rle_json(path: &Path) -> Result<RleMask> {
    let text = read_text_file_bounded(path, Limit::DataBytes)?;
    let value: Value = serde_json::from_str(&text).map_err(|e| Error::BadFile {
        path: path.into(),
        message: format!("not JSON: {e}"),
    })?;
    RleMask::from_json_value(&value).map_err(|message| Error::BadFile {
        path: path.into(),
        message: format!("not an RLE mask: {message}"),
    })
}

/// Writes an RLE JSON file (one line, newline-terminated), atomically.
pub fn write_rle_json(path: &Path, mask: &RleMask) -> Result<()> {
    write_atomic(path, |w| {
        writeln!(w, "{}", mask.to_json_value()).map_err(|e| e.to_string())
    })
}

/// Reads a mask image (PNG, or JPEG) through [`crate::images`]: any pixel with a non-zero
/// colour value is foreground.
pub fn read_mask_png(path: &Path) -> Result<RleMask> {
    let bytes = read_image_file(path)?;
    let image = decode_image(&bytes, path)?;
    drop(bytes);
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

/// Encodes a mask as an 8-bit grey PNG, 0 for background and 255 for foreground.
pub fn encode_mask_png(mask: &RleMask, out: &mut (impl Write + Seek)) -> Result<()> {
    let mut pixels = mask.to_row_major()?;
    for v in &mut pixels {
        *v *= 255;
    }
    let image = image::GrayImage::from_raw(mask.width(), mask.height(), pixels)
        .ok_or_else(|| Error::InvalidRle("a row-major mask has width * height pixels".into()))?;
    image
        .write_to(out, image::ImageFormat::Png)
        .map_err(|source| Error::Image {
            path: "mask.png".into(),
            source,
        })
}

/// Writes a mask as an 8-bit grey PNG (see [`encode_mask_png`]), atomically.
pub fn write_mask_png(path: &Path, mask: &RleMask) -> Result<()> {
    // Checked first so that a mask too large to draw fails before any file is made.
    crate::limits::Limit::check_picture(mask.width().into(), mask.height().into(), || {
        "a PNG mask".into()
    })?;
    write_atomic(path, |w| {
        encode_mask_png(mask, w).map_err(|e| e.to_string())
    })
}

/// A digest of a file's content for telling whether it changed between two runs (not
/// cryptographic): `{"bytes": length, "digest": "16 hex digits"}`. Files over 256 MiB (model
/// weights) are sampled: their length and 64 blocks of 64 KiB spread over them.
pub fn fingerprint(path: &Path) -> Result<Value> {
    use std::io::{Read, SeekFrom};
    const SAMPLED_ABOVE: u64 = 256 << 20;
    const BLOCK: u64 = 64 << 10;
    let io = |source| Error::Io {
        path: path.into(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut digest = Digest::default();
    digest.add(&len.to_le_bytes());
    let mut buffer = vec![0u8; 1 << 20];
    if len <= SAMPLED_ABOVE {
        loop {
            let n = file.read(&mut buffer).map_err(io)?;
            if n == 0 {
                break;
            }
            digest.add(&buffer[..n]);
        }
    } else {
        let block = &mut buffer[..BLOCK as usize];
        for i in 0..64u64 {
            file.seek(SeekFrom::Start((len - BLOCK) / 63 * i))
                .map_err(io)?;
            file.read_exact(block).map_err(io)?;
            digest.add(block);
        }
    }
    Ok(serde_json::json!({"bytes": len, "digest": format!("{:016x}", digest.finish())}))
}

/// A 64-bit multiply-xorshift hash over little-endian words.
#[derive(Default)]
struct Digest {
    state: u64,
    pending: Vec<u8>,
}

impl Digest {
    fn mix(&mut self, word: u64) {
        self.state = (self.state ^ word).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.state ^= self.state >> 29;
    }

    fn add(&mut self, bytes: &[u8]) {
        let mut bytes = bytes;
        if !self.pending.is_empty() {
            let need = 8 - self.pending.len();
            let take = need.min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() < 8 {
                return;
            }
            let word = u64::from_le_bytes(
                std::mem::take(&mut self.pending)
                    .try_into()
                    .unwrap_or([0; 8]),
            );
            self.mix(word);
        }
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
        self.pending.extend_from_slice(chunks.remainder());
    }

    fn finish(mut self) -> u64 {
        let mut last = [0u8; 8];
        last[..self.pending.len()].copy_from_slice(&self.pending);
        let tail = self.pending.len() as u64;
        self.mix(u64::from_le_bytes(last));
        self.mix(tail);
        self.state
    }
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
