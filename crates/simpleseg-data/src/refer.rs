//! Referring-expression datasets in the original `refer` layout:
//! `ROOT/NAME/refs(SPLITBY).p` (a Python 2 pickle of the refs) and `ROOT/NAME/instances.json`
//! (COCO format), with images under `ROOT/images/...`.
//!
//! The pickles are read with serde-pickle, which executes nothing (unlike Python's `pickle`).
//! Python 2 byte strings are decoded as Latin-1, as `pickle.load(f, encoding="latin1")` does.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value as Json;
use serde_pickle::{HashableValue, Value};
use simpleseg_core::limits::{read_file_bounded, read_text_file_bounded, Limit};
use simpleseg_core::raster::rasterize_polygons;
use simpleseg_core::RleMask;

use crate::error::{Error, Result};

/// The default `splitBy` of each dataset: `umd` for refCOCOg, `unc` for everything else.
pub fn default_split_by(name: &str) -> &'static str {
    match name {
        "refcocog" => "umd",
        _ => "unc",
    }
}

/// The default image folder of a dataset under the refer root: COCO train2014 (the original
/// data script's `images/coco_2014/train2014`, else the LISA-style `images/mscoco/images/train2014`),
/// `images/saiapr_tc-12` for refCLEF, `images/NAME` for any other name.
pub fn default_image_root(root: &Path, name: &str) -> PathBuf {
    match name {
        "refcoco" | "refcoco+" | "refcocog" => {
            let original = root.join("images/coco_2014/train2014");
            let lisa = root.join("images/mscoco/images/train2014");
            if !original.is_dir() && lisa.is_dir() {
                lisa
            } else {
                original
            }
        }
        "refclef" => root.join("images/saiapr_tc-12"),
        other => root.join("images").join(other),
    }
}

/// One referring expression.
#[derive(Clone, Debug, PartialEq)]
pub struct Sentence {
    pub sent_id: u64,
    pub sent: String,
}

/// One referred object with its expressions.
#[derive(Clone, Debug, PartialEq)]
pub struct Ref {
    pub ref_id: u64,
    pub ann_id: u64,
    pub image_id: u64,
    pub category_id: u64,
    pub split: String,
    pub sentences: Vec<Sentence>,
}

/// An image of `instances.json`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ImageInfo {
    pub id: u64,
    pub file_name: String,
    pub width: u32,
    pub height: u32,
}

/// A segmentation as COCO writes it.
#[derive(Clone, Debug, PartialEq)]
pub enum Segmentation {
    /// One or more polygons `[x0, y0, x1, y1, ...]` in pixels.
    Polygons(Vec<Vec<f64>>),
    /// One or more RLE masks.
    Rles(Vec<RleMask>),
}

/// An annotation of `instances.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Annotation {
    pub id: u64,
    pub image_id: u64,
    pub category_id: u64,
    /// `[x, y, width, height]`.
    pub bbox: [f64; 4],
    pub segmentation: Segmentation,
}

impl Annotation {
    /// The object's mask: the union of its parts, rasterized exactly as pycocotools'
    /// `frPyObjects` + `decode` + sum would give it.
    pub fn mask(&self, width: u32, height: u32) -> Result<RleMask> {
        let mask = match &self.segmentation {
            Segmentation::Polygons(polys) => {
                let points: Vec<Vec<[f64; 2]>> = polys
                    .iter()
                    .map(|p| p.chunks_exact(2).map(|c| [c[0], c[1]]).collect())
                    .collect();
                rasterize_polygons(points.iter().map(Vec::as_slice), height, width)?
            }
            Segmentation::Rles(rles) => {
                if let Some(bad) = rles
                    .iter()
                    .find(|r| r.width() != width || r.height() != height)
                {
                    return Err(Error::Invalid(format!(
                        "annotation {}: RLE of {}x{} on a {width}x{height} image",
                        self.id,
                        bad.width(),
                        bad.height()
                    )));
                }
                RleMask::union_all(rles)?
            }
        };
        Ok(mask)
    }
}

/// Parses a COCO segmentation value: a list of polygons, an RLE dict, or a list of RLE dicts.
pub fn parse_segmentation(
    value: &Json,
    width: u32,
    height: u32,
) -> std::result::Result<Segmentation, String> {
    let rle = |v: &Json| -> std::result::Result<RleMask, String> {
        let mut v = v.clone();
        if v.get("size").is_none() {
            v["size"] = serde_json::json!([height, width]);
        }
        RleMask::from_json_value(&v)
    };
    match value {
        Json::Object(_) => Ok(Segmentation::Rles(vec![rle(value)?])),
        Json::Array(items) if !items.is_empty() && items.iter().all(Json::is_object) => {
            Ok(Segmentation::Rles(
                items
                    .iter()
                    .map(rle)
                    .collect::<std::result::Result<_, _>>()?,
            ))
        }
        Json::Array(items) => {
            let polygons = items
                .iter()
                .map(|p| {
                    p.as_array()
                        .and_then(|coords| {
                            coords.iter().map(Json::as_f64).collect::<Option<Vec<_>>>()
                        })
                        .ok_or_else(|| "a polygon must be a list of numbers".to_string())
                })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            // pycocotools' frPyObjects chooses its reading from the first entry alone.
            match polygons.first().map(Vec::len) {
                None => Err("the segmentation is an empty list (pycocotools raises on it)".into()),
                Some(4) => Err(
                    "the first polygon has 4 numbers, which pycocotools reads as a box \
                     [x, y, w, h] and then refuses for a list; write boxes as 4-point polygons"
                        .into(),
                ),
                Some(n) if n < 4 => Err(format!(
                    "the first polygon has {n} numbers; pycocotools needs more than 4"
                )),
                Some(_) => Ok(Segmentation::Polygons(polygons)),
            }
        }
        _ => Err("segmentation must be a list of polygons or an RLE".into()),
    }
}

/// A refer-format dataset.
#[derive(Clone, Debug)]
pub struct ReferDataset {
    pub name: String,
    pub split_by: String,
    pub root: PathBuf,
    pub image_root: PathBuf,
    pub refs: Vec<Ref>,
    pub images: HashMap<u64, ImageInfo>,
    pub annotations: HashMap<u64, Annotation>,
    pub categories: BTreeMap<u64, String>,
}

fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
}

fn key_of(k: &HashableValue) -> Option<String> {
    match k {
        HashableValue::String(s) => Some(s.clone()),
        HashableValue::Bytes(b) => Some(latin1(b)),
        _ => None,
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::I64(i) => u64::try_from(*i).ok(),
        Value::Int(big) => big.to_string().parse().ok(),
        _ => None,
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bytes(b) => Some(latin1(b)),
        _ => None,
    }
}

fn dict(v: &Value) -> Option<HashMap<String, &Value>> {
    match v {
        Value::Dict(m) => Some(
            m.iter()
                .filter_map(|(k, v)| key_of(k).map(|k| (k, v)))
                .collect(),
        ),
        _ => None,
    }
}

fn list(v: &Value) -> Option<&Vec<Value>> {
    match v {
        Value::List(l) | Value::Tuple(l) => Some(l),
        _ => None,
    }
}

/// Reads `refs(SPLITBY).p`.
pub fn read_refs(path: &Path) -> Result<Vec<Ref>> {
    parse_refs(&read_file_bounded(path, Limit::DataBytes)?, path)
}

/// The refs in a pickle's bytes (`path` names it in messages). Malformed or hostile pickles
/// are errors, never panics: the pickle is measured before it is unpickled
/// ([`crate::pickle_shape`]).
pub fn parse_refs(bytes: &[u8], path: &Path) -> Result<Vec<Ref>> {
    let bad = |message: String| Error::BadFile {
        path: path.to_path_buf(),
        message,
    };
    // Measured first: unpickling recurses and copies memoized values.
    crate::pickle_shape::check(bytes).map_err(|e| bad(e.to_string()))?;
    let value = serde_pickle::value_from_slice(bytes, serde_pickle::DeOptions::new())
        .map_err(|e| bad(format!("not a readable pickle: {e}")))?;
    let items = list(&value).ok_or_else(|| bad("expected a list of refs".into()))?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let d = dict(item).ok_or_else(|| bad(format!("ref {i} is not a dict")))?;
            let num = |k: &str| {
                d.get(k)
                    .and_then(|v| as_u64(v))
                    .ok_or_else(|| bad(format!("ref {i}: missing integer `{k}`")))
            };
            let sentences =
                d.get("sentences")
                    .and_then(|v| list(v))
                    .ok_or_else(|| bad(format!("ref {i}: missing `sentences`")))?
                    .iter()
                    .map(|s| {
                        let s = dict(s)
                            .ok_or_else(|| bad(format!("ref {i}: a sentence is not a dict")))?;
                        Ok(Sentence {
                            sent_id: s.get("sent_id").and_then(|v| as_u64(v)).ok_or_else(|| {
                                bad(format!("ref {i}: sentence without `sent_id`"))
                            })?,
                            sent: s
                                .get("sent")
                                .and_then(|v| as_string(v))
                                .ok_or_else(|| bad(format!("ref {i}: sentence without `sent`")))?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
            Ok(Ref {
                ref_id: num("ref_id")?,
                ann_id: num("ann_id")?,
                image_id: num("image_id")?,
                category_id: num("category_id").unwrap_or(0),
                split: d
                    .get("split")
                    .and_then(|v| as_string(v))
                    .ok_or_else(|| bad(format!("ref {i}: missing `split`")))?,
                sentences,
            })
        })
        .collect()
}

/// Images, annotations and categories of a COCO `instances.json`.
pub struct Instances {
    pub images: HashMap<u64, ImageInfo>,
    pub annotations: HashMap<u64, Annotation>,
    pub categories: BTreeMap<u64, String>,
    /// Annotation ids in file order.
    pub annotation_order: Vec<u64>,
}

/// Reads a COCO `instances*.json`.
pub fn read_instances(path: &Path) -> Result<Instances> {
    parse_instances(&read_text_file_bounded(path, Limit::DataBytes)?, path)
}

/// The content of a COCO instances file (`path` names it in messages).
pub fn parse_instances(text: &str, path: &Path) -> Result<Instances> {
    let bad = |message: String| Error::BadFile {
        path: path.to_path_buf(),
        message,
    };
    let root: Json = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let images: HashMap<u64, ImageInfo> = root
        .get("images")
        .and_then(Json::as_array)
        .ok_or_else(|| bad("missing the \"images\" list".into()))?
        .iter()
        .map(|i| {
            serde_json::from_value::<ImageInfo>(i.clone())
                .map(|info| (info.id, info))
                .map_err(|e| bad(format!("bad image entry: {e}")))
        })
        .collect::<Result<_>>()?;
    let mut annotations = HashMap::new();
    let mut annotation_order = Vec::new();
    for a in root
        .get("annotations")
        .and_then(Json::as_array)
        .ok_or_else(|| bad("missing the \"annotations\" list".into()))?
    {
        let id = a
            .get("id")
            .and_then(Json::as_u64)
            .ok_or_else(|| bad("annotation without `id`".into()))?;
        let image_id = a
            .get("image_id")
            .and_then(Json::as_u64)
            .ok_or_else(|| bad(format!("annotation {id} without `image_id`")))?;
        let image = images.get(&image_id).ok_or_else(|| {
            bad(format!(
                "annotation {id} refers to unknown image {image_id}"
            ))
        })?;
        let bbox: Vec<f64> = a
            .get("bbox")
            .and_then(Json::as_array)
            .map(|b| b.iter().filter_map(Json::as_f64).collect())
            .unwrap_or_default();
        let segmentation = a
            .get("segmentation")
            .ok_or_else(|| bad(format!("annotation {id} without `segmentation`")))
            .and_then(|s| {
                parse_segmentation(s, image.width, image.height)
                    .map_err(|m| bad(format!("annotation {id}: {m}")))
            })?;
        annotations.insert(
            id,
            Annotation {
                id,
                image_id,
                category_id: a.get("category_id").and_then(Json::as_u64).unwrap_or(0),
                bbox: if bbox.len() == 4 {
                    [bbox[0], bbox[1], bbox[2], bbox[3]]
                } else {
                    [0.0; 4]
                },
                segmentation,
            },
        );
        annotation_order.push(id);
    }
    let categories = root
        .get("categories")
        .and_then(Json::as_array)
        .map(|cats| {
            cats.iter()
                .filter_map(|c| {
                    Some((c.get("id")?.as_u64()?, c.get("name")?.as_str()?.to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Instances {
        images,
        annotations,
        categories,
        annotation_order,
    })
}

impl ReferDataset {
    /// Loads `ROOT/NAME/refs(SPLITBY).p` and `ROOT/NAME/instances.json`. `split_by` defaults
    /// to [`default_split_by`], `image_root` to [`default_image_root`].
    pub fn load(
        root: &Path,
        name: &str,
        split_by: Option<&str>,
        image_root: Option<&Path>,
    ) -> Result<Self> {
        let split_by = split_by
            .unwrap_or_else(|| default_split_by(name))
            .to_string();
        let dir = root.join(name);
        let refs_path = dir.join(format!("refs({split_by}).p"));
        if !refs_path.is_file() {
            return Err(Error::Missing {
                path: refs_path,
                hint: format!("the refs of dataset {name} split by {split_by}; check --refer-root and --split-by"),
            });
        }
        let refs = read_refs(&refs_path)?;
        let instances = read_instances(&dir.join("instances.json"))?;
        for r in &refs {
            if !instances.annotations.contains_key(&r.ann_id) {
                return Err(Error::BadFile {
                    path: refs_path.clone(),
                    message: format!(
                        "ref {} names annotation {} missing from instances.json",
                        r.ref_id, r.ann_id
                    ),
                });
            }
        }
        Ok(ReferDataset {
            name: name.to_string(),
            split_by,
            root: root.to_path_buf(),
            image_root: image_root
                .map_or_else(|| default_image_root(root, name), Path::to_path_buf),
            refs,
            images: instances.images,
            annotations: instances.annotations,
            categories: instances.categories,
        })
    }

    /// The refs pickle and the instances file this dataset was read from.
    pub fn files(&self) -> [PathBuf; 2] {
        let dir = self.root.join(&self.name);
        [
            dir.join(format!("refs({}).p", self.split_by)),
            dir.join("instances.json"),
        ]
    }

    /// What identifies the dataset's content, for runs that resume: its folders (absolute)
    /// and the fingerprints of its files ([`simpleseg_core::io::fingerprint`]).
    pub fn identity(&self) -> Result<Json> {
        let absolute = |p: &Path| {
            std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.to_path_buf())
                .display()
                .to_string()
        };
        let [refs, instances] = self.files();
        Ok(serde_json::json!({
            "refer_root": absolute(&self.root),
            "dataset": self.name,
            "split_by": self.split_by,
            "image_root": absolute(&self.image_root),
            "refs": simpleseg_core::io::fingerprint(&refs)?,
            "instances": simpleseg_core::io::fingerprint(&instances)?,
        }))
    }

    /// The refs of a split, in file order.
    pub fn split<'a>(&'a self, split: &'a str) -> impl Iterator<Item = &'a Ref> + 'a {
        self.refs.iter().filter(move |r| r.split == split)
    }

    /// The image of a ref.
    pub fn image(&self, r: &Ref) -> Result<&ImageInfo> {
        self.images.get(&r.image_id).ok_or_else(|| {
            Error::Invalid(format!(
                "ref {} names image {} missing from instances.json",
                r.ref_id, r.image_id
            ))
        })
    }

    /// The annotation of a ref.
    pub fn annotation(&self, r: &Ref) -> &Annotation {
        &self.annotations[&r.ann_id]
    }

    /// The path of an image file.
    pub fn image_path(&self, image: &ImageInfo) -> PathBuf {
        self.image_root.join(&image.file_name)
    }
}
