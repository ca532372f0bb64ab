//! Training examples and batches.
//!
//! SFT data is what `simpleseg data sft` writes: records
//! `{"conversations": [{"from": "user", "value": "<img>PATH</img>QUESTION"},
//! {"from": "assistant", "value": "ANSWER"}]}` as an indented JSON list or JSON lines. Each
//! example becomes the chat-template prompt (image placeholders expanded) followed by the
//! answer and the family's end-of-turn token; the loss covers the answer and the end token
//! only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;
use simpleseg_core::images::open_image;
use simpleseg_core::limits::{read_text_file_bounded, Limit};
use simpleseg_engine::image_processing::ProcessedImage;
use simpleseg_engine::models::training::{TrainBatch, TrainingModel};

use crate::error::{Error, Result};

/// One SFT example.
#[derive(Clone, Debug, PartialEq)]
pub struct SftExample {
    pub image: PathBuf,
    pub question: String,
    pub answer: String,
}

/// Splits `<img>PATH</img>QUESTION`.
fn split_user(value: &str) -> Option<(&str, &str)> {
    let rest = value.strip_prefix("<img>")?;
    let end = rest.find("</img>")?;
    Some((&rest[..end], &rest[end + "</img>".len()..]))
}

/// Reads SFT data; relative image paths resolve against `root` (default: the file's folder).
pub fn read_sft(path: &Path, root: Option<&Path>) -> Result<Vec<SftExample>> {
    let text = read_text_file_bounded(path, Limit::DataBytes)?;
    let bad = |m: String| Error::BadFile {
        path: path.to_path_buf(),
        message: m,
    };
    let records: Vec<Value> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).map_err(|e| bad(format!("not a JSON list: {e}")))?
    } else {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| serde_json::from_str(l).map_err(|e| bad(format!("line {}: {e}", i + 1))))
            .collect::<Result<_>>()?
    };
    let root = root.map_or_else(
        || path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        Path::to_path_buf,
    );
    records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let turns = r["conversations"]
                .as_array()
                .ok_or_else(|| bad(format!("record {i}: no \"conversations\" list")))?;
            let value = |k: usize, from: &str| -> Result<&str> {
                let t = turns
                    .get(k)
                    .ok_or_else(|| bad(format!("record {i}: missing turn {k}")))?;
                if t["from"].as_str() != Some(from) {
                    return Err(bad(format!("record {i}: turn {k} should be from {from:?}")));
                }
                t["value"]
                    .as_str()
                    .ok_or_else(|| bad(format!("record {i}: turn {k} has no \"value\"")))
            };
            let (image, question) = split_user(value(0, "user")?).ok_or_else(|| {
                bad(format!(
                    "record {i}: the user turn must start with <img>PATH</img>"
                ))
            })?;
            let image = Path::new(image);
            Ok(SftExample {
                image: if image.is_absolute() {
                    image.to_path_buf()
                } else {
                    root.join(image)
                },
                question: question.to_string(),
                answer: value(1, "assistant")?.to_string(),
            })
        })
        .collect()
}

/// A tokenized example: prompt + answer + end token, and where the answer starts.
#[derive(Clone, Debug)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub answer_start: usize,
    pub image: PathBuf,
    pub grid: [usize; 3],
}

/// Tokenizes examples. Image sizes (hence grids) are read once per distinct image.
pub fn encode_all(examples: &[SftExample], model: &dyn TrainingModel) -> Result<Vec<Encoded>> {
    let mut sizes: HashMap<&Path, (u32, u32)> = HashMap::new();
    examples
        .iter()
        .map(|ex| {
            let size = match sizes.get(ex.image.as_path()) {
                Some(s) => *s,
                None => {
                    let s = image::image_dimensions(&ex.image).map_err(|e| Error::BadFile {
                        path: ex.image.clone(),
                        message: format!("cannot read the image: {e}"),
                    })?;
                    sizes.insert(ex.image.as_path(), s);
                    s
                }
            };
            let encoded = model.encode(&ex.question, &ex.answer, size)?;
            Ok(Encoded {
                ids: encoded.ids,
                answer_start: encoded.answer_start,
                image: ex.image.clone(),
                grid: encoded.grid,
            })
        })
        .collect()
}

/// The batches of one epoch: a shuffle, then examples of similar length grouped (sorted within
/// windows of 64 batches), then the batches shuffled. A pure function of seed and epoch.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let mut rng = StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    let mut batches = Vec::new();
    for window in order.chunks(batch_size * 64) {
        let mut w = window.to_vec();
        w.sort_by_key(|&i| lengths[i]);
        batches.extend(w.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

/// Model inputs for a batch, and the rows the loss reads.
pub struct Batch {
    pub ids: Vec<Vec<u32>>,
    pub images: Vec<ProcessedImage>,
    pub pad: u32,
    /// Flattened `(batch * seq)` rows whose next token is a target (the sequences padded to
    /// the longest), and those targets.
    pub rows: Tensor,
    pub targets: Tensor,
    pub answer_tokens: usize,
}

impl Batch {
    /// The sequences as the family's forward pass takes them (each with its own image).
    pub fn inputs(&self) -> TrainBatch<'_> {
        TrainBatch {
            ids: self.ids.iter().map(Vec::as_slice).collect(),
            pad: self.pad,
            min_len: 0,
            images: &self.images,
            image_of: (0..self.ids.len()).collect(),
        }
    }
}

/// Builds a batch (right padding with `pad`).
pub fn make_batch(
    examples: &[&Encoded],
    model: &dyn TrainingModel,
    pad: u32,
    device: &Device,
) -> Result<Batch> {
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut images: Vec<ProcessedImage> = Vec::with_capacity(examples.len());
    for (b, e) in examples.iter().enumerate() {
        let processed = model.process(&open_image(&e.image)?)?;
        if processed.grid_thw != e.grid {
            return Err(Error::Invalid(format!(
                "{} changed size during training",
                e.image.display()
            )));
        }
        images.push(processed);
        for i in e.answer_start - 1..e.ids.len() - 1 {
            rows.push((b * t + i) as u32);
            targets.push(e.ids[i + 1]);
        }
    }
    let answer_tokens = targets.len();
    Ok(Batch {
        ids: examples.iter().map(|e| e.ids.clone()).collect(),
        images,
        pad,
        rows: Tensor::from_vec(rows, answer_tokens, device)?,
        targets: Tensor::from_vec(targets, answer_tokens, device)?,
        answer_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_every_example_once_and_are_reproducible() {
        let lengths: Vec<usize> = (0..1000).map(|i| (i * 37) % 200).collect();
        let a = epoch_batches(&lengths, 8, 3, 0);
        let mut all: Vec<usize> = a.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, epoch_batches(&lengths, 8, 3, 0));
        assert_ne!(a, epoch_batches(&lengths, 8, 3, 1));
        // Lengths within a batch are close.
        let spread: usize = a
            .iter()
            .map(|b| {
                let l: Vec<usize> = b.iter().map(|&i| lengths[i]).collect();
                l.iter().max().unwrap() - l.iter().min().unwrap()
            })
            .max()
            .unwrap();
        assert!(spread < 20, "{spread}");
    }

    #[test]
    fn user_turns() {
        assert_eq!(
            split_user("<img>a/b.png</img>Locate x."),
            Some(("a/b.png", "Locate x."))
        );
        assert_eq!(split_user("no image"), None);
    }
}
