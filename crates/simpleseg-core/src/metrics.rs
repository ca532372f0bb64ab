//! Per-sample scores and the split-level metrics the papers report.
//!
//! - IoU per sample on RLE masks; an answer with no usable polygon is an empty mask.
//! - cIoU: the sum of intersections over the sum of unions.
//! - gIoU: the mean per-sample IoU, counting 1 when prediction and ground truth are both empty.
//! - Acc@0.5: the share of samples whose predicted box has IoU >= 0.5 with the annotation's box;
//!   the predicted box is the answer's first box, or the predicted mask's extent.

use crate::parse::{parse_answer, CoordMode, ParseMode};
use crate::rle::RleMask;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Where the predicted box for Acc@0.5 comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BoxSource {
    /// The extent of the predicted mask (pycocotools `toBbox`).
    #[default]
    Mask,
    /// The first `[x1, y1, x2, y2]` box in the answer.
    Answer,
}

/// IoU of two boxes given as `[x1, y1, x2, y2]`; 0 when either is empty.
pub fn box_iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: [f64; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// `[x, y, w, h]` to `[x1, y1, x2, y2]`.
pub fn xywh_to_xyxy(b: [f64; 4]) -> [f64; 4] {
    [b[0], b[1], b[0] + b[2], b[1] + b[3]]
}

/// How one answer scores against its ground truth.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub intersection: u64,
    pub union: u64,
    /// Per-sample IoU (1 when both masks are empty).
    pub iou: f64,
    /// Predicted box `[x1, y1, x2, y2]` in pixels, if any.
    pub pred_box: Option<[f64; 4]>,
    pub box_iou: f64,
    /// True when the answer had no usable polygon.
    pub parse_failure: bool,
    pub polygons: usize,
    pub points: usize,
}

/// Scores an answer.
pub fn score_answer(
    answer: &str,
    gt: &RleMask,
    gt_bbox_xywh: [f64; 4],
    mode: ParseMode,
    coords: CoordMode,
    box_source: BoxSource,
) -> Result<Score> {
    let parsed = parse_answer(answer, mode);
    let (w, h) = (gt.width(), gt.height());
    let mask = parsed.mask(w, h, coords)?;
    let (intersection, union) = mask.intersection_union(gt)?;
    let iou = if union == 0 {
        1.0
    } else {
        intersection as f64 / union as f64
    };
    let pred_box = match box_source {
        BoxSource::Mask => (mask.area() > 0).then(|| xywh_to_xyxy(mask.bbox())),
        BoxSource::Answer => parsed.boxes.first().map(|b| match coords {
            CoordMode::Pixels => *b,
            CoordMode::Normalized => {
                let (fw, fh) = (f64::from(w), f64::from(h));
                [b[0] * fw, b[1] * fh, b[2] * fw, b[3] * fh]
            }
        }),
    };
    let box_iou = pred_box.map_or(0.0, |b| box_iou(b, xywh_to_xyxy(gt_bbox_xywh)));
    Ok(Score {
        intersection,
        union,
        iou,
        pred_box,
        box_iou,
        parse_failure: parsed.polygons.is_empty(),
        polygons: parsed.polygons.len(),
        points: parsed.polygons.iter().map(|p| p.points.len()).sum(),
    })
}

/// Split-level metrics over scores in a fixed order (sums are order-dependent in floating
/// point, so callers pass samples sorted by id for reproducible reports).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub n: usize,
    pub ciou: f64,
    pub giou: f64,
    pub acc50: f64,
    pub parse_failures: usize,
    /// Mean points per predicted polygon.
    pub mean_points_per_polygon: f64,
}

/// Aggregates scores.
pub fn aggregate<'a>(scores: impl IntoIterator<Item = &'a Score>) -> Metrics {
    let (mut n, mut inter, mut union, mut iou_sum, mut hits, mut failures, mut polys, mut points) =
        (0usize, 0u64, 0u64, 0f64, 0usize, 0usize, 0usize, 0usize);
    for s in scores {
        n += 1;
        inter += s.intersection;
        union += s.union;
        iou_sum += s.iou;
        hits += usize::from(s.box_iou >= 0.5);
        failures += usize::from(s.parse_failure);
        polys += s.polygons;
        points += s.points;
    }
    let ratio = |a: f64, b: f64| if b == 0.0 { 0.0 } else { a / b };
    Metrics {
        n,
        ciou: if union == 0 {
            1.0
        } else {
            inter as f64 / union as f64
        },
        giou: ratio(iou_sum, n as f64),
        acc50: ratio(hits as f64, n as f64),
        parse_failures: failures,
        mean_points_per_polygon: ratio(points as f64, polys as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_iou_basics() {
        assert_eq!(box_iou([0., 0., 2., 2.], [0., 0., 2., 2.]), 1.0);
        assert_eq!(box_iou([0., 0., 2., 2.], [1., 0., 3., 2.]), 2.0 / 6.0);
        assert_eq!(box_iou([0., 0., 1., 1.], [2., 2., 3., 3.]), 0.0);
        assert_eq!(box_iou([0., 0., 0., 0.], [0., 0., 0., 0.]), 0.0);
    }

    #[test]
    fn empty_answers_score_as_empty_masks() {
        let gt = RleMask::from_row_major(&[0, 1, 1, 0], 2, 2).unwrap();
        let s = score_answer(
            "no idea",
            &gt,
            [0., 0., 1., 1.],
            ParseMode::Official,
            CoordMode::Normalized,
            BoxSource::Mask,
        )
        .unwrap();
        assert!(s.parse_failure);
        assert_eq!((s.intersection, s.union, s.iou), (0, 2, 0.0));
        let empty = RleMask::empty(2, 2).unwrap();
        let s = score_answer(
            "",
            &empty,
            [0.; 4],
            ParseMode::Official,
            CoordMode::Normalized,
            BoxSource::Mask,
        )
        .unwrap();
        assert_eq!(s.iou, 1.0);
        let m = aggregate([&s]);
        assert_eq!((m.n, m.ciou, m.giou, m.parse_failures), (1, 1.0, 1.0, 1));
    }
}
