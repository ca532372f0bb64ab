//! Objects to segment, with their expressions and ground truth, from any supported source:
//! a refer-format dataset, a plain COCO `instances*.json` (one object per annotation, the
//! category name as the expression), or a folder of images and mask PNGs with a JSON lines
//! file of queries.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use simpleseg_core::images::image_dimensions;
use simpleseg_core::io::read_mask_png;
use simpleseg_core::limits::{read_text_file_bounded, Limit};
use simpleseg_core::RleMask;

use crate::error::{Error, Result};
use crate::refer::{read_instances, Annotation, ReferDataset, Sentence};

/// Where an item's mask comes from.
#[derive(Clone, Debug)]
enum MaskSource {
    Annotation(Annotation),
    Png(PathBuf),
}

/// One object: an image, its mask and the expressions that refer to it.
#[derive(Clone, Debug)]
pub struct Item {
    /// Unique within the source (the refer `ref_id`, the COCO annotation id, or the line
    /// number of a mask folder's query file).
    pub ref_id: u64,
    /// The image file.
    pub image: PathBuf,
    /// The image path as written into built data: relative to the source's root when the
    /// image is under it.
    pub image_rel: String,
    pub width: u32,
    pub height: u32,
    /// Ground-truth box `[x, y, width, height]`.
    pub bbox: [f64; 4],
    pub sentences: Vec<Sentence>,
    mask: MaskSource,
}

impl Item {
    /// The ground-truth mask.
    pub fn mask(&self) -> Result<RleMask> {
        match &self.mask {
            MaskSource::Annotation(a) => a.mask(self.width, self.height),
            MaskSource::Png(path) => {
                let mask = read_mask_png(path)?;
                if (mask.width(), mask.height()) != (self.width, self.height) {
                    return Err(Error::BadFile {
                        path: path.clone(),
                        message: format!(
                            "mask is {}x{}, the image {}x{}",
                            mask.width(),
                            mask.height(),
                            self.width,
                            self.height
                        ),
                    });
                }
                Ok(mask)
            }
        }
    }
}

/// `path` relative to `root` when it lies under it, else as given.
fn relative(path: &Path, root: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// The objects of one split of a refer-format dataset, in file order.
pub fn refer_items(dataset: &ReferDataset, split: &str) -> Result<Vec<Item>> {
    dataset
        .split(split)
        .map(|r| {
            let image = dataset.image(r)?;
            let path = dataset.image_path(image);
            let ann = dataset.annotation(r);
            Ok(Item {
                ref_id: r.ref_id,
                image_rel: relative(&path, &dataset.root),
                image: path,
                width: image.width,
                height: image.height,
                bbox: ann.bbox,
                sentences: r.sentences.clone(),
                mask: MaskSource::Annotation(ann.clone()),
            })
        })
        .collect()
}

/// One object per annotation of a COCO `instances*.json`, its category name as the expression.
/// Crowd annotations are included as written.
pub fn coco_items(instances: &Path, image_root: &Path) -> Result<Vec<Item>> {
    let data = read_instances(instances)?;
    let root = instances.parent().unwrap_or(Path::new("."));
    data.annotation_order
        .iter()
        .map(|id| {
            let ann = &data.annotations[id];
            let image = &data.images[&ann.image_id];
            let name = data
                .categories
                .get(&ann.category_id)
                .cloned()
                .ok_or_else(|| Error::BadFile {
                    path: instances.to_path_buf(),
                    message: format!("annotation {id} has unknown category {}", ann.category_id),
                })?;
            let path = image_root.join(&image.file_name);
            Ok(Item {
                ref_id: *id,
                image_rel: relative(&path, root),
                image: path,
                width: image.width,
                height: image.height,
                bbox: ann.bbox,
                sentences: vec![Sentence {
                    sent_id: *id,
                    sent: name,
                }],
                mask: MaskSource::Annotation(ann.clone()),
            })
        })
        .collect()
}

/// A line of a mask folder's query file.
#[derive(Deserialize)]
struct QueryLine {
    image: String,
    mask: String,
    /// One expression, or several.
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    queries: Vec<String>,
    #[serde(default)]
    split: Option<String>,
}

/// Objects of a folder of images and mask PNGs described by `queries.jsonl` lines
/// `{"image": "a.jpg", "mask": "a.png", "query": "the cat"}` (or `"queries": [...]`, and an
/// optional `"split"`). Paths are relative to the folder. Item ids are line numbers; sentence
/// ids are `line * 1000 + index`.
pub fn mask_folder_items(dir: &Path, split: Option<&str>) -> Result<Vec<Item>> {
    let path = dir.join("queries.jsonl");
    let text = read_text_file_bounded(&path, Limit::DataBytes)?;
    let mut items = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let q: QueryLine = serde_json::from_str(line).map_err(|e| Error::BadFile {
            path: path.clone(),
            message: format!("line {}: {e}", n + 1),
        })?;
        if let (Some(want), Some(have)) = (split, q.split.as_deref()) {
            if want != have {
                continue;
            }
        }
        let image = dir.join(&q.image);
        let (width, height) = image_dimensions(&image)?;
        let mut texts = q.queries;
        texts.extend(q.query);
        if texts.is_empty() {
            return Err(Error::BadFile {
                path: path.clone(),
                message: format!("line {}: no \"query\"", n + 1),
            });
        }
        let line_id = n as u64 + 1;
        let mask_path = dir.join(&q.mask);
        let bbox = read_mask_png(&mask_path)?.bbox();
        items.push(Item {
            ref_id: line_id,
            image_rel: q.image.clone(),
            image,
            width,
            height,
            bbox,
            sentences: texts
                .into_iter()
                .enumerate()
                .map(|(i, sent)| Sentence {
                    sent_id: line_id * 1000 + i as u64,
                    sent,
                })
                .collect(),
            mask: MaskSource::Png(mask_path),
        });
    }
    Ok(items)
}

/// Items grouped by image in order of first appearance, as the data script walks them.
pub fn by_image(items: &[Item]) -> Vec<&Item> {
    let mut order: BTreeMap<PathBuf, usize> = BTreeMap::new();
    for item in items {
        let next = order.len();
        order.entry(item.image.clone()).or_insert(next);
    }
    let mut sorted: Vec<&Item> = items.iter().collect();
    sorted.sort_by_key(|i| order[&i.image]);
    sorted
}
