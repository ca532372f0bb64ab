//! Training examples and batches.
//!
//! SFT data is what `simpleseg data sft` writes: records
//! `{"conversations": [{"from": "user", "value": "<img>PATH</img>QUESTION"},
//! {"from": "assistant", "value": "ANSWER"}]}` as an indented JSON list or JSON lines. Each
//! example becomes the chat-template prompt (image placeholders expanded) followed by the
//! answer and `<|im_end|>`; the loss covers the answer and the end token only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;
use simpleseg_core::images::open_image;
use simpleseg_core::limits::{read_text_file_bounded, Limit};
use simpleseg_engine::models::qwen2_5_vl::processor::{preprocess, smart_resize, ProcessedImage};
use simpleseg_engine::models::qwen2::{rope_index, MropePosition};
use simpleseg_engine::models::qwen2_5_vl::PromptBuilder;
use simpleseg_engine::image_processing::pixel_tensor;

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
pub fn encode_all(
    examples: &[SftExample],
    prompts: &PromptBuilder,
    im_end: u32,
) -> Result<Vec<Encoded>> {
    let mut grids: HashMap<&Path, [usize; 3]> = HashMap::new();
    let c = &prompts.image_config;
    examples
        .iter()
        .map(|ex| {
            let grid = match grids.get(ex.image.as_path()) {
                Some(g) => *g,
                None => {
                    let (w, h) =
                        image::image_dimensions(&ex.image).map_err(|e| Error::BadFile {
                            path: ex.image.clone(),
                            message: format!("cannot read the image: {e}"),
                        })?;
                    let (rh, rw) = smart_resize(
                        h as usize,
                        w as usize,
                        c.factor(),
                        c.min_pixels,
                        c.max_pixels,
                    )?;
                    let g = [1, rh / c.patch_size, rw / c.patch_size];
                    grids.insert(ex.image.as_path(), g);
                    g
                }
            };
            let text = prompts.template.image_prompt(&ex.question)?;
            let text = prompts.expand_placeholders(&text, &[grid])?;
            let mut ids = prompts.tokenizer.encode(&text)?;
            let answer_start = ids.len();
            ids.extend(prompts.tokenizer.encode(&ex.answer)?);
            ids.push(im_end);
            Ok(Encoded {
                ids,
                answer_start,
                image: ex.image.clone(),
                grid,
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

/// Model inputs for a batch.
pub struct Batch {
    pub ids: Tensor,
    pub pixels: Tensor,
    pub grids: Vec<[usize; 3]>,
    pub positions: Vec<Vec<MropePosition>>,
    /// Flattened `(batch * seq)` rows whose next token is a target, and those targets.
    pub rows: Tensor,
    pub targets: Tensor,
    pub answer_tokens: usize,
}

/// Builds a padded batch (right padding with `pad`). Positions past a sequence's end continue
/// its text positions; they only feed padding, which no loss row reads.
pub fn make_batch(
    examples: &[&Encoded],
    prompts: &PromptBuilder,
    image_token_id: u32,
    merge_size: usize,
    pad: u32,
    device: &Device,
) -> Result<Batch> {
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(examples.len() * t);
    let mut positions = Vec::with_capacity(examples.len());
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut images: Vec<ProcessedImage> = Vec::with_capacity(examples.len());
    for (b, e) in examples.iter().enumerate() {
        let rgb = open_image(&e.image)?;
        let processed = preprocess(&rgb, &prompts.image_config)?;
        if processed.grid_thw != e.grid {
            return Err(Error::Invalid(format!(
                "{} changed size during training",
                e.image.display()
            )));
        }
        images.push(processed);
        let (mut pos, _) = rope_index(&e.ids, image_token_id, &[e.grid], merge_size)?;
        let last = pos.last().map_or(0, |p| p[0]);
        for k in e.ids.len()..t {
            pos.push([last + (k - e.ids.len()) as i64 + 1; 3]);
        }
        positions.push(pos);
        ids.extend(e.ids.iter().copied());
        ids.extend(std::iter::repeat_n(pad, t - e.ids.len()));
        for i in e.answer_start - 1..e.ids.len() - 1 {
            rows.push((b * t + i) as u32);
            targets.push(e.ids[i + 1]);
        }
    }
    let answer_tokens = targets.len();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (examples.len(), t), device)?,
        pixels: pixel_tensor(&images, device)?,
        grids: images.iter().map(|i| i.grid_thw).collect(),
        positions,
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
