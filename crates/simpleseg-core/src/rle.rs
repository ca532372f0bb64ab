//! COCO run-length encoded masks, exactly as pycocotools 2.0.x stores and measures them.
//!
//! A mask of `height x width` pixels is read in column-major order (down each column, left to
//! right) as alternating runs of background and foreground, starting with background. The
//! compressed `counts` string, union, area and bounding box come from hotcoco, a port of
//! pycocotools' `maskApi.c`; the fixtures in `tests/` prove them against pycocotools itself.

use crate::error::{Error, Result};

/// A binary mask as COCO run lengths. Always well formed: the runs cover exactly
/// `height * width` pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct RleMask(hotcoco::Rle);

/// Checks that a mask of this size can be run-length encoded with 32-bit runs.
pub(crate) fn check_size(height: u32, width: u32) -> Result<()> {
    let pixels = u64::from(height) * u64::from(width);
    if height == 0 || width == 0 {
        return Err(Error::InvalidSize {
            height: height.into(),
            width: width.into(),
            reason: "height and width must be at least 1",
        });
    }
    if pixels > u64::from(u32::MAX) {
        return Err(Error::InvalidSize {
            height: height.into(),
            width: width.into(),
            reason: "more than 2^32 - 1 pixels cannot be run-length encoded",
        });
    }
    Ok(())
}

impl RleMask {
    /// An all-background mask.
    pub fn empty(height: u32, width: u32) -> Result<Self> {
        check_size(height, width)?;
        Ok(Self::from_counts_unchecked(
            height,
            width,
            vec![height * width],
        ))
    }

    /// A mask from its run lengths; errors unless they cover exactly `height * width` pixels.
    pub fn from_counts(height: u32, width: u32, counts: Vec<u32>) -> Result<Self> {
        check_size(height, width)?;
        let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        let pixels = u64::from(height) * u64::from(width);
        if total != pixels {
            return Err(Error::InvalidRle(format!(
                "runs cover {total} pixels but the mask is {height}x{width} = {pixels} pixels"
            )));
        }
        Ok(Self::from_counts_unchecked(height, width, counts))
    }

    /// For runs this crate produced and knows to be well formed.
    pub(crate) fn from_counts_unchecked(height: u32, width: u32, counts: Vec<u32>) -> Self {
        RleMask(hotcoco::Rle {
            h: height,
            w: width,
            counts,
        })
    }

    /// Decodes pycocotools' compressed `counts` string (the `"counts"` of an RLE JSON).
    pub fn from_compressed(height: u32, width: u32, counts: &str) -> Result<Self> {
        check_size(height, width)?;
        let rle = hotcoco::mask::rle_from_string(counts, height, width)
            .map_err(|e| Error::InvalidRle(format!("counts string does not decode: {e}")))?;
        Self::from_counts(height, width, rle.counts)
    }

    /// The compressed `counts` string, byte-identical to pycocotools' `encode`.
    pub fn to_compressed(&self) -> String {
        hotcoco::mask::rle_to_string(&self.0)
    }

    /// Encodes a row-major mask (`mask[y * width + x]`, any non-zero byte is foreground).
    pub fn from_row_major(mask: &[u8], height: u32, width: u32) -> Result<Self> {
        check_size(height, width)?;
        let (h, w) = (height as usize, width as usize);
        if mask.len() != h * w {
            return Err(Error::InvalidRle(format!(
                "a {height}x{width} mask needs {} pixels, got {}",
                h * w,
                mask.len()
            )));
        }
        let mut counts = Vec::new();
        let mut run = 0u32;
        let mut foreground = false;
        for x in 0..w {
            for y in 0..h {
                if (mask[y * w + x] != 0) != foreground {
                    counts.push(run);
                    run = 0;
                    foreground = !foreground;
                }
                run += 1;
            }
        }
        counts.push(run);
        Ok(Self::from_counts_unchecked(height, width, counts))
    }

    /// The mask as row-major bytes, 1 for foreground and 0 for background. Errors, before
    /// allocating, when the mask is over the pixel limit of [`crate::limits`].
    pub fn to_row_major(&self) -> Result<Vec<u8>> {
        let (h, w) = (self.height() as usize, self.width() as usize);
        let mut out = crate::limits::dense_buffer(w as u64, h as u64, || "a dense mask".into())?;
        let mut pos = 0usize;
        for (i, &run) in self.counts().iter().enumerate() {
            let end = pos + run as usize;
            if i % 2 == 1 {
                for p in pos..end {
                    out[(p % h) * w + p / h] = 1;
                }
            }
            pos = end;
        }
        Ok(out)
    }

    /// Mask height in pixels.
    pub fn height(&self) -> u32 {
        self.0.h
    }

    /// Mask width in pixels.
    pub fn width(&self) -> u32 {
        self.0.w
    }

    /// The run lengths, starting with background.
    pub fn counts(&self) -> &[u32] {
        &self.0.counts
    }

    /// Number of foreground pixels (pycocotools `area`).
    pub fn area(&self) -> u64 {
        hotcoco::mask::area(&self.0)
    }

    /// Bounding box `[x, y, width, height]` of the foreground (pycocotools `toBbox`);
    /// all zeros for an empty mask.
    pub fn bbox(&self) -> [f64; 4] {
        hotcoco::mask::to_bbox(&self.0)
    }

    /// Union of masks of one size (pycocotools `merge`); errors on differing sizes or no masks.
    pub fn union_all<'a>(masks: impl IntoIterator<Item = &'a RleMask>) -> Result<RleMask> {
        let rles: Vec<hotcoco::Rle> = masks.into_iter().map(|m| m.0.clone()).collect();
        let first = rles
            .first()
            .ok_or_else(|| Error::InvalidRle("union of no masks has no size".into()))?;
        if let Some(other) = rles.iter().find(|r| r.h != first.h || r.w != first.w) {
            return Err(Error::SizeMismatch {
                a_height: first.h,
                a_width: first.w,
                b_height: other.h,
                b_width: other.w,
            });
        }
        let merged = hotcoco::mask::merge(&rles, false)
            .map_err(|e| Error::InvalidRle(format!("union failed: {e}")))?;
        Ok(RleMask(merged))
    }

    /// Pixel counts of the intersection and the union with `other`, walking both run lists
    /// (no dense mask).
    pub fn intersection_union(&self, other: &RleMask) -> Result<(u64, u64)> {
        self.check_same_size(other)?;
        let (a, b) = (self.counts(), other.counts());
        let (mut ia, mut ib) = (0usize, 0usize);
        // Remaining pixels in the current run of each mask, and whether that run is foreground.
        let (mut ra, mut rb) = (0u64, 0u64);
        let (mut fa, mut fb) = (true, true);
        let (mut inter, mut union) = (0u64, 0u64);
        loop {
            while ra == 0 {
                if ia == a.len() {
                    return Ok((inter, union));
                }
                ra = u64::from(a[ia]);
                ia += 1;
                fa = !fa;
            }
            while rb == 0 {
                if ib == b.len() {
                    return Ok((inter, union));
                }
                rb = u64::from(b[ib]);
                ib += 1;
                fb = !fb;
            }
            let step = ra.min(rb);
            if fa || fb {
                union += step;
                if fa && fb {
                    inter += step;
                }
            }
            ra -= step;
            rb -= step;
        }
    }

    /// Intersection over union, as pycocotools `iou` gives it for two masks: 0 when they do
    /// not overlap (also when both are empty).
    pub fn iou(&self, other: &RleMask) -> Result<f64> {
        let (inter, union) = self.intersection_union(other)?;
        Ok(if inter == 0 {
            0.0
        } else {
            inter as f64 / union as f64
        })
    }

    fn check_same_size(&self, other: &RleMask) -> Result<()> {
        if self.height() != other.height() || self.width() != other.width() {
            return Err(Error::SizeMismatch {
                a_height: self.height(),
                a_width: self.width(),
                b_height: other.height(),
                b_width: other.width(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_major_round_trip() {
        let mask = [0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 1];
        let rle = RleMask::from_row_major(&mask, 3, 4).unwrap();
        // Column-major: col0 = [0,0,0], col1 = [1,1,0], col2 = [1,1,0], col3 = [0,1,1].
        assert_eq!(rle.counts(), &[3, 2, 1, 2, 2, 2]);
        assert_eq!(rle.to_row_major().unwrap(), mask.to_vec());
        assert_eq!(rle.area(), 6);
    }

    #[test]
    fn intersection_union_counts_pixels() {
        let a = RleMask::from_row_major(&[1, 1, 0, 0], 2, 2).unwrap();
        let b = RleMask::from_row_major(&[0, 1, 1, 0], 2, 2).unwrap();
        assert_eq!(a.intersection_union(&b).unwrap(), (1, 3));
        assert!((a.iou(&b).unwrap() - 1.0 / 3.0).abs() < 1e-12);
        let empty = RleMask::empty(2, 2).unwrap();
        assert_eq!(empty.iou(&empty).unwrap(), 0.0);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(RleMask::from_counts(2, 2, vec![1, 2]).is_err());
        assert!(RleMask::empty(0, 5).is_err());
        assert!(RleMask::from_compressed(2, 2, "zzzz").is_err());
        let a = RleMask::empty(2, 2).unwrap();
        let b = RleMask::empty(2, 3).unwrap();
        assert!(a.iou(&b).is_err());
        assert!(RleMask::union_all([&a, &b]).is_err());
    }
}
