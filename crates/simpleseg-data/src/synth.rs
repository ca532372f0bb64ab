//! Synthetic referring-segmentation scenes.
//!
//! Each scene has 1 to 6 coloured shapes (circles, ellipses, triangles, squares, pentagons,
//! stars, irregular blobs) of several sizes on a textured background. Later shapes occlude
//! earlier ones, and a thin bar sometimes cuts a shape into separate parts. Every shape whose
//! visible part is big enough gets referring expressions that single it out: by attribute
//! ("the red star"), by an extreme ("the leftmost circle", "the largest shape") or by a
//! relation to another shape ("the triangle above the blue square").
//!
//! A set is written in the refer layout under the name `synth`: `ROOT/synth/instances.json`,
//! `ROOT/synth/refs(unc).p` and `ROOT/images/synth/*.png` (another `name` is possible), so the SFT/RL builders and the
//! evaluator read it like refCOCO. Writing another split into the same root adds to it with
//! fresh ids.

use std::collections::BTreeMap;
use std::path::Path;

use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use simpleseg_core::raster::rasterize_polygon;
use simpleseg_core::RleMask;

use simpleseg_core::io::Outputs;
use simpleseg_core::limits::{read_text_file_bounded, Limit};

use crate::check_name;
use crate::error::{Error, Result};
use crate::refer::{read_instances, read_refs};

/// Shape kinds and the names used in expressions.
const KINDS: [&str; 7] = [
    "circle", "ellipse", "triangle", "square", "pentagon", "star", "blob",
];

/// Colour names and their RGB values.
const COLOURS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [235, 210, 40]),
    ("purple", [140, 60, 180]),
    ("orange", [240, 140, 30]),
    ("white", [245, 245, 245]),
    ("black", [20, 20, 20]),
];

/// Generator settings.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub seed: u64,
    pub count: usize,
    pub split: String,
    /// Image side in pixels.
    pub size: u32,
    /// Dataset name under the root (`synth` by default; another name makes a stand-in for a
    /// real dataset's layout, images in that dataset's usual folder).
    pub name: String,
    /// Most shapes per scene (1 to 6); fewer make an easier set, e.g. for a first stage of
    /// training.
    pub max_objects: usize,
}

/// One drawn shape.
struct Shape {
    kind: usize,
    colour: usize,
    /// Visible mask after occlusion.
    mask: Vec<u8>,
    area: usize,
    centre: (f64, f64),
}

fn shape_polygon(rng: &mut StdRng, kind: usize, cx: f64, cy: f64, r: f64) -> Vec<[f64; 2]> {
    let rot: f64 = rng.random_range(0.0..std::f64::consts::TAU);
    let ring = |n: usize, radius: &dyn Fn(usize) -> f64, rot: f64| -> Vec<[f64; 2]> {
        (0..n)
            .map(|i| {
                let a = rot + i as f64 * std::f64::consts::TAU / n as f64;
                let rr = radius(i);
                [cx + rr * a.cos(), cy + rr * a.sin()]
            })
            .collect()
    };
    match KINDS[kind] {
        "circle" => ring(48, &|_| r, 0.0),
        "ellipse" => {
            let (a, b) = (r, r * rng.random_range(0.45..0.7));
            (0..48)
                .map(|i| {
                    let t = i as f64 * std::f64::consts::TAU / 48.0;
                    let (x, y) = (a * t.cos(), b * t.sin());
                    [
                        cx + x * rot.cos() - y * rot.sin(),
                        cy + x * rot.sin() + y * rot.cos(),
                    ]
                })
                .collect()
        }
        "triangle" => ring(3, &|_| r, rot),
        "square" => ring(4, &|_| r, rot),
        "pentagon" => ring(5, &|_| r, rot),
        "star" => ring(10, &|i| if i % 2 == 0 { r } else { r * 0.45 }, rot),
        _ => {
            let phases: Vec<f64> = (0..3)
                .map(|_| rng.random_range(0.0..std::f64::consts::TAU))
                .collect();
            ring(
                24,
                &|i| {
                    let t = i as f64 * std::f64::consts::TAU / 24.0;
                    r * (1.0
                        + 0.22 * (2.0 * t + phases[0]).sin()
                        + 0.15 * (3.0 * t + phases[1]).sin()
                        + 0.08 * (5.0 * t + phases[2]).sin())
                        / 1.25
                },
                0.0,
            )
        }
    }
}

fn dense(polygon: &[[f64; 2]], size: u32) -> Result<Vec<u8>> {
    Ok(rasterize_polygon(polygon, size, size)?.to_row_major()?)
}

/// A textured background: a two-colour gradient with soft blotches and pixel noise. Its colours
/// stay muted (a grey level with a slight cast) so that a shape's colour name stays unambiguous:
/// "the purple ellipse" on a purple background would be a riddle, not a referring expression.
fn background(rng: &mut StdRng, size: u32) -> RgbImage {
    let grey: f64 = rng.random_range(90.0..180.0);
    let base: [f64; 3] = [0, 1, 2].map(|_| grey + rng.random_range(-12.0..12.0));
    let tint: [f64; 3] = [0, 1, 2].map(|_| rng.random_range(-20.0..20.0));
    let blotches: Vec<(f64, f64, f64, f64)> = (0..4)
        .map(|_| {
            (
                rng.random_range(0.0..f64::from(size)),
                rng.random_range(0.0..f64::from(size)),
                rng.random_range(10.0..40.0),
                rng.random_range(-35.0..35.0),
            )
        })
        .collect();
    let mut img = RgbImage::new(size, size);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let t = (f64::from(x) + f64::from(y)) / (2.0 * f64::from(size));
        let blot: f64 = blotches
            .iter()
            .map(|(bx, by, r, v)| {
                let d2 = (f64::from(x) - bx).powi(2) + (f64::from(y) - by).powi(2);
                v * (-d2 / (r * r)).exp()
            })
            .sum();
        let noise: f64 = rng.random_range(-12.0..12.0);
        *p = Rgb([0, 1, 2].map(|c| (base[c] + tint[c] * t + blot + noise).clamp(0.0, 255.0) as u8));
    }
    img
}

fn centre_and_area(mask: &[u8], size: u32) -> (f64, f64, usize) {
    let (mut sx, mut sy, mut n) = (0.0, 0.0, 0usize);
    for (i, &v) in mask.iter().enumerate() {
        if v != 0 {
            sx += (i % size as usize) as f64;
            sy += (i / size as usize) as f64;
            n += 1;
        }
    }
    if n == 0 {
        return (0.0, 0.0, 0);
    }
    (sx / n as f64, sy / n as f64, n)
}

/// Draws a scene: the image and its shapes with visible masks.
fn draw_scene(rng: &mut StdRng, size: u32, max_objects: usize) -> Result<(RgbImage, Vec<Shape>)> {
    let mut img = background(rng, size);
    let n = rng.random_range(1..=max_objects);
    let s = f64::from(size);
    let mut shapes: Vec<Shape> = Vec::new();
    for _ in 0..n {
        let kind = rng.random_range(0..KINDS.len());
        let colour = rng.random_range(0..COLOURS.len());
        let r = rng.random_range(0.09..0.24) * s;
        let (cx, cy) = (
            rng.random_range(r * 0.6..s - r * 0.6),
            rng.random_range(r * 0.6..s - r * 0.6),
        );
        let polygon = shape_polygon(rng, kind, cx, cy, r);
        let mask = dense(&polygon, size)?;
        // Later shapes occlude earlier ones.
        for other in &mut shapes {
            for (o, &m) in other.mask.iter_mut().zip(&mask) {
                if m != 0 {
                    *o = 0;
                }
            }
        }
        shapes.push(Shape {
            kind,
            colour,
            mask,
            area: 0,
            centre: (0.0, 0.0),
        });
    }
    // Sometimes a thin bar cuts through the scene and splits what it crosses.
    if rng.random_bool(0.3) {
        let x0 = rng.random_range(0.2..0.8) * s;
        let tilt = rng.random_range(-0.3..0.3) * s;
        let w = rng.random_range(2.0..4.0);
        let bar = vec![
            [x0, -1.0],
            [x0 + w, -1.0],
            [x0 + w + tilt, s + 1.0],
            [x0 + tilt, s + 1.0],
        ];
        let mask = dense(&bar, size)?;
        for shape in &mut shapes {
            for (o, &m) in shape.mask.iter_mut().zip(&mask) {
                if m != 0 {
                    *o = 0;
                }
            }
        }
        let grey = rng.random_range(60..200);
        paint(&mut img, &mask, [grey, grey, grey], rng);
    }
    for shape in &mut shapes {
        let (cx, cy, area) = centre_and_area(&shape.mask, size);
        shape.centre = (cx, cy);
        shape.area = area;
    }
    for shape in &shapes {
        paint(&mut img, &shape.mask, COLOURS[shape.colour].1, rng);
    }
    Ok((img, shapes))
}

fn paint(img: &mut RgbImage, mask: &[u8], colour: [u8; 3], rng: &mut StdRng) {
    let w = img.width() as usize;
    for (i, &m) in mask.iter().enumerate() {
        if m != 0 {
            let noise: i16 = rng.random_range(-10..=10);
            let p = colour.map(|c| (i16::from(c) + noise).clamp(0, 255) as u8);
            img.put_pixel((i % w) as u32, (i / w) as u32, Rgb(p));
        }
    }
}

/// Expressions that single out shape `i` among `shapes` (visible ones only).
fn expressions(
    rng: &mut StdRng,
    shapes: &[Shape],
    i: usize,
    visible: &[usize],
    size: u32,
) -> Vec<String> {
    let me = &shapes[i];
    let kind = KINDS[me.kind];
    let colour = COLOURS[me.colour].0;
    let others: Vec<&Shape> = visible
        .iter()
        .filter(|&&j| j != i)
        .map(|&j| &shapes[j])
        .collect();
    let mut out = Vec::new();
    let same_kind = |s: &&Shape| s.kind == me.kind;
    let same_colour = |s: &&Shape| s.colour == me.colour;
    // Attributes.
    if !others.iter().any(|s| same_kind(s) && same_colour(s)) {
        out.push(format!("the {colour} {kind}"));
    }
    if !others.iter().any(same_kind) {
        out.push(format!("the {kind}"));
    }
    if !others.iter().any(same_colour) {
        out.push(format!("the {colour} shape"));
    }
    // Extremes, with a clear margin.
    let margin = f64::from(size) * 0.08;
    let kin: Vec<&&Shape> = others.iter().filter(|s| same_kind(s)).collect();
    if !kin.is_empty() {
        let (x, y) = me.centre;
        if kin.iter().all(|s| s.centre.0 > x + margin) {
            out.push(format!("the leftmost {kind}"));
        }
        if kin.iter().all(|s| s.centre.0 < x - margin) {
            out.push(format!("the rightmost {kind}"));
        }
        if kin.iter().all(|s| s.centre.1 > y + margin) {
            out.push(format!("the top {kind}"));
        }
        if kin.iter().all(|s| s.centre.1 < y - margin) {
            out.push(format!("the bottom {kind}"));
        }
    }
    if !others.is_empty() {
        if others
            .iter()
            .all(|s| (s.area as f64) * 1.5 < me.area as f64)
        {
            out.push("the largest shape".into());
        }
        if others.iter().all(|s| s.area as f64 > me.area as f64 * 1.5) {
            out.push("the smallest shape".into());
        }
    }
    // Relations to an anchor that is itself unambiguous by colour and kind.
    for anchor in &others {
        let anchor_unique = !shapes
            .iter()
            .filter(|s| !std::ptr::eq(*s, *anchor))
            .any(|s| s.kind == anchor.kind && s.colour == anchor.colour && s.area > 0);
        if !anchor_unique {
            continue;
        }
        let (dx, dy) = (me.centre.0 - anchor.centre.0, me.centre.1 - anchor.centre.1);
        let rel = if dy < -margin * 1.5 && dy.abs() > dx.abs() {
            "above"
        } else if dy > margin * 1.5 && dy.abs() > dx.abs() {
            "below"
        } else if dx < -margin * 1.5 {
            "to the left of"
        } else if dx > margin * 1.5 {
            "to the right of"
        } else {
            continue;
        };
        // Unique: no other shape of my kind stands in the same relation.
        let holds = |s: &Shape| {
            let (dx, dy) = (s.centre.0 - anchor.centre.0, s.centre.1 - anchor.centre.1);
            match rel {
                "above" => dy < -margin,
                "below" => dy > margin,
                "to the left of" => dx < -margin,
                _ => dx > margin,
            }
        };
        if others
            .iter()
            .filter(|s| !std::ptr::eq(**s, *anchor))
            .any(|s| s.kind == me.kind && holds(s))
        {
            continue;
        }
        out.push(format!(
            "the {kind} {rel} the {} {}",
            COLOURS[anchor.colour].0, KINDS[anchor.kind]
        ));
    }
    // Keep a few, varied.
    let mut picked = Vec::new();
    while !out.is_empty() && picked.len() < 3 {
        let k = rng.random_range(0..out.len());
        picked.push(out.swap_remove(k));
    }
    picked
}

#[derive(Serialize)]
struct PickleSentence {
    sent_id: u64,
    sent: String,
    raw: String,
    tokens: Vec<String>,
}

#[derive(Serialize)]
struct PickleRef {
    ref_id: u64,
    ann_id: u64,
    image_id: u64,
    category_id: u64,
    split: String,
    file_name: String,
    sent_ids: Vec<u64>,
    sentences: Vec<PickleSentence>,
}

/// What [`generate`] wrote.
#[derive(Clone, Debug, Serialize)]
pub struct SynthStats {
    pub images: usize,
    pub refs: usize,
    pub sentences: usize,
}

/// Smallest and largest image side accepted.
pub const SIZES: std::ops::RangeInclusive<u32> = 32..=4096;

/// Writes `options.count` scenes as split `options.split` of the `synth` dataset under `root`.
/// All or nothing: the images are written as temporary files and moved into place with the
/// dataset's index files ([`Outputs`]), so on failure, or when interrupted, no image of this
/// run remains and the index files are as they were.
pub fn generate(root: &Path, options: &SynthOptions) -> Result<SynthStats> {
    if !(1..=6).contains(&options.max_objects) {
        return Err(Error::Invalid(format!(
            "scenes hold 1 to 6 shapes; --max-objects {} is out of range",
            options.max_objects
        )));
    }
    if !SIZES.contains(&options.size) {
        return Err(Error::Invalid(format!(
            "--size {} is out of range: images are {} to {} pixels a side",
            options.size,
            SIZES.start(),
            SIZES.end()
        )));
    }
    if options.count == 0 {
        return Err(Error::Invalid("--count must be at least 1".into()));
    }
    check_name("dataset name", &options.name)?;
    check_name("split", &options.split)?;
    generate_into(root, options)
}

/// The list under `key` of an instances file.
fn list_mut<'a>(instances: &'a mut Value, key: &str, path: &Path) -> Result<&'a mut Vec<Value>> {
    instances[key].as_array_mut().ok_or_else(|| Error::BadFile {
        path: path.to_path_buf(),
        message: format!("\"{key}\" is not a list"),
    })
}

fn generate_into(root: &Path, options: &SynthOptions) -> Result<SynthStats> {
    let dir = root.join(&options.name);
    let image_dir = crate::refer::default_image_root(root, &options.name);
    for d in [&dir, &image_dir] {
        std::fs::create_dir_all(d).map_err(|source| Error::Io {
            path: d.clone(),
            source,
        })?;
    }
    let instances_path = dir.join("instances.json");
    let refs_path = dir.join(format!(
        "refs({}).p",
        crate::refer::default_split_by(&options.name)
    ));
    // Existing content, to append to with fresh ids.
    let mut instances: Value = if instances_path.is_file() {
        let text = read_text_file_bounded(&instances_path, Limit::DataBytes)?;
        read_instances(&instances_path)?; // validates
        serde_json::from_str(&text).map_err(|e| Error::BadFile {
            path: instances_path.clone(),
            message: e.to_string(),
        })?
    } else {
        json!({
            "images": [],
            "annotations": [],
            "categories": KINDS.iter().enumerate().map(|(i, k)| json!({"id": i + 1, "name": k, "supercategory": "shape"})).collect::<Vec<_>>(),
        })
    };
    let existing_refs = if refs_path.is_file() {
        read_refs(&refs_path)?
    } else {
        Vec::new()
    };
    if existing_refs.iter().any(|r| r.split == options.split) {
        return Err(Error::Invalid(format!(
            "{} already holds a split named {:?}; choose another --split or another --out",
            refs_path.display(),
            options.split
        )));
    }
    let max_id = |key: &str| {
        instances[key].as_array().map_or(0, |a| {
            a.iter().filter_map(|x| x["id"].as_u64()).max().unwrap_or(0)
        })
    };
    let mut next_image = max_id("images") + 1;
    let mut next_ann = max_id("annotations") + 1;
    let mut next_ref = existing_refs.iter().map(|r| r.ref_id).max().unwrap_or(0) + 1;
    let mut next_sent = existing_refs
        .iter()
        .flat_map(|r| r.sentences.iter().map(|s| s.sent_id))
        .max()
        .unwrap_or(0)
        + 1;

    let mut pickle_refs: Vec<PickleRef> = existing_refs
        .iter()
        .map(|r| PickleRef {
            ref_id: r.ref_id,
            ann_id: r.ann_id,
            image_id: r.image_id,
            category_id: r.category_id,
            split: r.split.clone(),
            file_name: String::new(),
            sent_ids: r.sentences.iter().map(|s| s.sent_id).collect(),
            sentences: r
                .sentences
                .iter()
                .map(|s| PickleSentence {
                    sent_id: s.sent_id,
                    sent: s.sent.clone(),
                    raw: s.sent.clone(),
                    tokens: s.sent.split_whitespace().map(String::from).collect(),
                })
                .collect(),
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut stats = SynthStats {
        images: 0,
        refs: 0,
        sentences: 0,
    };
    let min_area = (options.size as usize * options.size as usize) / 150;
    let mut outputs = Outputs::default();
    while stats.images < options.count {
        let (img, shapes) = draw_scene(&mut rng, options.size, options.max_objects)?;
        let visible: Vec<usize> = (0..shapes.len())
            .filter(|&i| shapes[i].area >= min_area)
            .collect();
        let mut scene_refs = Vec::new();
        for &i in &visible {
            let sents = expressions(&mut rng, &shapes, i, &visible, options.size);
            if !sents.is_empty() {
                scene_refs.push((i, sents));
            }
        }
        if scene_refs.is_empty() {
            continue;
        }
        let image_id = next_image;
        next_image += 1;
        let file_name = format!("{}_{image_id:07}.png", options.split);
        // Staged with the index files: the images appear with them or not at all.
        outputs.add(&image_dir.join(&file_name), |w| {
            img.write_to(w, image::ImageFormat::Png)
                .map_err(|e| e.to_string())
        })?;
        list_mut(&mut instances, "images", &instances_path)?.push(json!({
            "id": image_id, "file_name": file_name, "width": options.size, "height": options.size,
        }));
        for (i, sents) in scene_refs {
            let shape = &shapes[i];
            let rle = RleMask::from_row_major(&shape.mask, options.size, options.size)?;
            let ann_id = next_ann;
            next_ann += 1;
            let bbox = rle.bbox();
            list_mut(&mut instances, "annotations", &instances_path)?.push(json!({
                "id": ann_id, "image_id": image_id, "category_id": shape.kind + 1,
                "segmentation": rle.to_json_value(), "area": rle.area(), "bbox": bbox, "iscrowd": 0,
                "color": COLOURS[shape.colour].0,
            }));
            let sentences: Vec<PickleSentence> = sents
                .into_iter()
                .map(|sent| {
                    let id = next_sent;
                    next_sent += 1;
                    PickleSentence {
                        sent_id: id,
                        tokens: sent.split_whitespace().map(String::from).collect(),
                        raw: sent.clone(),
                        sent,
                    }
                })
                .collect();
            stats.sentences += sentences.len();
            pickle_refs.push(PickleRef {
                ref_id: next_ref,
                ann_id,
                image_id,
                category_id: shape.kind as u64 + 1,
                split: options.split.clone(),
                file_name: file_name.clone(),
                sent_ids: sentences.iter().map(|s| s.sent_id).collect(),
                sentences,
            });
            next_ref += 1;
            stats.refs += 1;
        }
        stats.images += 1;
    }
    outputs.add(&instances_path, |w| {
        serde_json::to_writer(w, &instances).map_err(|e| e.to_string())
    })?;
    outputs.add(&refs_path, |w| {
        serde_pickle::to_writer(w, &pickle_refs, serde_pickle::SerOptions::new().proto_v2())
            .map_err(|e| e.to_string())
    })?;
    outputs.commit()?;
    Ok(stats)
}

/// Counts of each expression kind in a set of sentences, for reports.
pub fn expression_kinds<'a>(
    sentences: impl IntoIterator<Item = &'a str>,
) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for s in sentences {
        let kind = if s.contains(" above ") || s.contains(" below ") || s.contains(" of the ") {
            "relation"
        } else if [
            "leftmost",
            "rightmost",
            "top ",
            "bottom",
            "largest",
            "smallest",
        ]
        .iter()
        .any(|w| s.contains(w))
        {
            "extreme"
        } else {
            "attribute"
        };
        *counts.entry(kind).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::items::refer_items;
    use crate::refer::ReferDataset;

    #[test]
    fn generates_a_readable_refer_dataset_and_appends_splits() {
        let root = std::env::temp_dir().join(format!("simpleseg-synth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let train = generate(
            &root,
            &SynthOptions {
                seed: 1,
                count: 12,
                split: "train".into(),
                size: 112,
                name: "synth".into(),
                max_objects: 6,
            },
        )
        .unwrap();
        assert_eq!(train.images, 12);
        let test = generate(
            &root,
            &SynthOptions {
                seed: 2,
                count: 5,
                split: "test".into(),
                size: 112,
                name: "synth".into(),
                max_objects: 6,
            },
        )
        .unwrap();
        let ds = ReferDataset::load(&root, "synth", None, None).unwrap();
        let items = refer_items(&ds, "train").unwrap();
        assert_eq!(items.len(), train.refs);
        assert_eq!(refer_items(&ds, "test").unwrap().len(), test.refs);
        // Ids are unique across splits.
        let mut ids: Vec<u64> = ds.refs.iter().map(|r| r.ref_id).collect();
        ids.dedup();
        assert_eq!(ids.len(), train.refs + test.refs);
        for item in &items {
            let mask = item.mask().unwrap();
            assert!(mask.area() > 0);
            assert!(item.image.is_file());
        }
        assert!(generate(
            &root,
            &SynthOptions {
                seed: 3,
                count: 1,
                split: "train".into(),
                size: 112,
                name: "synth".into(),
                max_objects: 6,
            }
        )
        .is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
