//! Training targets: a mask's outline as the answer text the released data script writes.
//!
//! The script traces the mask's external contours, simplifies each with `approxPolyDP` at
//! `epsilon = ratio * arcLength` (closed), divides by `(width, height)`, rounds with
//! `np.round(x, 3)` and prints the nested list as Python does. Holes are lost and every
//! disconnected part becomes its own polygon; a contour of any length is kept.

use crate::contour::{approx_poly_dp_closed, arc_length_closed, find_external_contours, Point};
use crate::error::{Error, Result};
use crate::pyrepr::polygons_repr;
use crate::rle::RleMask;

/// The data script's `epsilon_ratio`.
pub const DEFAULT_EPSILON_RATIO: f64 = 0.001;

/// The simplified external polygons of a row-major mask, in pixel coordinates and OpenCV's
/// order.
pub fn mask_polygons(
    mask: &[u8],
    width: usize,
    height: usize,
    epsilon_ratio: f64,
) -> Vec<Vec<Point>> {
    find_external_contours(mask, width, height)
        .iter()
        .map(|contour| {
            let epsilon = epsilon_ratio * arc_length_closed(contour);
            approx_poly_dp_closed(contour, epsilon)
        })
        .collect()
}

/// `np.round(x, 3)`: scale by 1000, round half to even, scale back.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round_ties_even() / 1000.0
}

/// Pixel polygons divided by `(width, height)` and rounded to 3 decimals, as the script does.
pub fn normalize_polygons(
    polygons: &[Vec<Point>],
    width: usize,
    height: usize,
) -> Vec<Vec<[f64; 2]>> {
    let (w, h) = (width as f64, height as f64);
    polygons
        .iter()
        .map(|p| {
            p.iter()
                .map(|&[x, y]| [round3(f64::from(x) / w), round3(f64::from(y) / h)])
                .collect()
        })
        .collect()
}

/// The target string for a row-major mask, e.g. `[[[0.625, 0.208], [0.5, 0.21], ...]]`;
/// `[]` for an empty mask.
pub fn target_from_mask(
    mask: &[u8],
    width: usize,
    height: usize,
    epsilon_ratio: f64,
) -> Result<String> {
    check_epsilon_ratio(epsilon_ratio)?;
    if mask.len() != width * height {
        return Err(Error::InvalidRle(format!(
            "a {height}x{width} mask needs {} pixels, got {}",
            width * height,
            mask.len()
        )));
    }
    let polygons = mask_polygons(mask, width, height, epsilon_ratio);
    Ok(polygons_repr(&normalize_polygons(&polygons, width, height)))
}

/// The target string for an RLE mask.
pub fn target_from_rle(rle: &RleMask, epsilon_ratio: f64) -> Result<String> {
    let (w, h) = (rle.width() as usize, rle.height() as usize);
    target_from_mask(&rle.to_row_major()?, w, h, epsilon_ratio)
}

fn check_epsilon_ratio(ratio: f64) -> Result<()> {
    // OpenCV refuses epsilons below 0 or not below 1e30.
    if !(0.0..1e30).contains(&ratio) {
        return Err(Error::InvalidRle(format!(
            "epsilon ratio must be a finite number >= 0, got {ratio}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round3_is_numpy_round() {
        // np.round(0.0625, 3) == 0.062 (half to even); np.round(0.2085, 3) == 0.208 since
        // 0.2085 * 1000 is 208.49999999999997.
        assert_eq!(round3(0.0625), 0.062);
        assert_eq!(round3(0.2085), 0.208);
        assert_eq!(round3(0.5), 0.5);
    }

    #[test]
    fn rectangle_target() {
        let (w, h) = (8, 4);
        let mut mask = vec![0u8; w * h];
        for y in 1..3 {
            for x in 2..6 {
                mask[y * w + x] = 255;
            }
        }
        assert_eq!(
            target_from_mask(&mask, w, h, DEFAULT_EPSILON_RATIO).unwrap(),
            "[[[0.25, 0.25], [0.25, 0.5], [0.625, 0.5], [0.625, 0.25]]]"
        );
        assert_eq!(
            target_from_mask(&vec![0; w * h], w, h, 0.001).unwrap(),
            "[]"
        );
        assert!(target_from_mask(&mask, w, h, -1.0).is_err());
    }
}
