//! The IoU reward of reinforcement learning (`train rl`, the Python bindings' trainer hooks):
//! the IoU between an answer's union mask and the ground truth, with optional shaping terms.

use serde::{Deserialize, Serialize};

use crate::parse::{parse_answer, CoordMode, ParseMode};
use crate::rle::RleMask;

/// Shaping of the reward. The default is the plain IoU (robust parsing, normalized
/// coordinates), 0 for an answer without a usable polygon.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RewardOptions {
    pub mode: ParseMode,
    pub coords: CoordMode,
    /// Subtracted times the squared distance between the predicted and true mask centroids
    /// (normalized coordinates); the whole weight when either mask is empty.
    pub centroid_weight: f64,
    /// Added when the answer has at least one usable polygon (a format term).
    pub format_weight: f64,
    /// Points allowed before `point_penalty` is subtracted per extra point.
    pub max_points: Option<usize>,
    pub point_penalty: f64,
}

impl Default for RewardOptions {
    fn default() -> Self {
        RewardOptions {
            mode: ParseMode::Robust,
            coords: CoordMode::Normalized,
            centroid_weight: 0.0,
            format_weight: 0.0,
            max_points: None,
            point_penalty: 0.0,
        }
    }
}

/// An answer's reward.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reward {
    /// The shaped reward.
    pub reward: f64,
    /// The plain IoU.
    pub iou: f64,
    /// Whether the answer had a usable polygon.
    pub parsed: bool,
    /// Points of the answer's polygons.
    pub points: usize,
}

/// Centroid of a mask in normalized coordinates, `None` when empty.
pub fn centroid(mask: &RleMask) -> Option<(f64, f64)> {
    let h = u64::from(mask.height());
    let (mut sx, mut sy, mut n) = (0f64, 0f64, 0u64);
    let mut pos = 0u64;
    for (i, &run) in mask.counts().iter().enumerate() {
        let end = pos + u64::from(run);
        if i % 2 == 1 {
            // A run is column-major: sum it one column piece at a time, not pixel by pixel.
            let mut p = pos;
            while p < end {
                let (column, row) = (p / h, p % h);
                let rows = (h - row).min(end - p);
                sx += rows as f64 * (column as f64 + 0.5);
                sy += rows as f64 * (row as f64 + rows as f64 / 2.0);
                n += rows;
                p += rows;
            }
        }
        pos = end;
    }
    (n > 0).then(|| {
        let n = n as f64;
        (
            sx / n / f64::from(mask.width()),
            sy / n / f64::from(mask.height()),
        )
    })
}

pub fn reward(answer: &str, gt: &RleMask, options: &RewardOptions) -> Reward {
    let parsed = parse_answer(answer, options.mode);
    let points: usize = parsed.polygons.iter().map(|p| p.points.len()).sum();
    let unparsed = Reward {
        reward: 0.0,
        iou: 0.0,
        parsed: false,
        points,
    };
    if parsed.polygons.is_empty() {
        return unparsed;
    }
    let Ok(mask) = parsed.mask(gt.width(), gt.height(), options.coords) else {
        return unparsed;
    };
    let (inter, union) = mask.intersection_union(gt).unwrap_or((0, 0));
    let iou = if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    };
    let centroid_term = if options.centroid_weight > 0.0 {
        match (centroid(&mask), centroid(gt)) {
            (Some(a), Some(b)) => {
                options.centroid_weight * ((a.0 - b.0).powi(2) + (a.1 - b.1).powi(2))
            }
            _ => options.centroid_weight,
        }
    } else {
        0.0
    };
    let extra_points = options.max_points.map_or(0, |m| points.saturating_sub(m));
    Reward {
        reward: iou - centroid_term + options.format_weight
            - options.point_penalty * extra_points as f64,
        iou,
        parsed: true,
        points,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_shaped() {
        let gt = RleMask::from_row_major(&[1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 4, 4)
            .unwrap();
        let answer = "[[[0.0, 0.0], [0.5, 0.0], [0.5, 0.5], [0.0, 0.5]]]";
        let plain = reward(answer, &gt, &RewardOptions::default());
        assert_eq!(
            (plain.iou, plain.reward, plain.parsed, plain.points),
            (1.0, 1.0, true, 4)
        );
        let shaped = reward(
            answer,
            &gt,
            &RewardOptions {
                format_weight: 0.1,
                max_points: Some(3),
                point_penalty: 0.05,
                centroid_weight: 1.0,
                ..RewardOptions::default()
            },
        );
        assert!((shaped.reward - (1.0 + 0.1 - 0.05)).abs() < 1e-12);
        let none = reward("no polygon", &gt, &RewardOptions::default());
        assert_eq!((none.reward, none.parsed), (0.0, false));
    }

    #[test]
    fn centroid_sums_runs_as_pixels() {
        let (h, w) = (7u32, 5u32);
        let mut state = 12345u32;
        for _ in 0..50 {
            let values: Vec<u8> = (0..h * w)
                .map(|_| {
                    state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    u8::from(state >> 16 & 3 == 0)
                })
                .collect();
            let mask = RleMask::from_row_major(&values, h, w).unwrap();
            let (mut sx, mut sy, mut n) = (0.0, 0.0, 0.0);
            for (i, _) in values.iter().enumerate().filter(|(_, &v)| v == 1) {
                let (y, x) = (i as u32 / w, i as u32 % w);
                sx += f64::from(x) + 0.5;
                sy += f64::from(y) + 0.5;
                n += 1.0;
            }
            match centroid(&mask) {
                None => assert_eq!(n, 0.0),
                Some((cx, cy)) => {
                    assert!((cx - sx / n / f64::from(w)).abs() < 1e-12);
                    assert!((cy - sy / n / f64::from(h)).abs() < 1e-12);
                }
            }
        }
    }
}
