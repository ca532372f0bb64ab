//! External contours and polygon simplification, exactly as OpenCV 4.12 computes them.
//!
//! - [`find_external_contours`]: `cv2.findContours(mask, RETR_EXTERNAL, CHAIN_APPROX_SIMPLE)`,
//!   Suzuki-Abe border following on a zero-padded copy of the mask, with OpenCV's start
//!   directions, its border marks, its direction-change point filter and its output order
//!   (last contour found comes first).
//! - [`arc_length_closed`]: `cv2.arcLength(contour, True)`, single-precision segment lengths
//!   summed in double precision.
//! - [`approx_poly_dp_closed`]: `cv2.approxPolyDP(contour, epsilon, True)`, OpenCV 4.x's
//!   Douglas-Peucker with its farthest-point start, distances to the line through each
//!   slice's ends (5.x measures to the segment instead, which differs on rare ties) and its
//!   final clean-up of nearly collinear points.
//!
//! Fixtures generated with `opencv-python-headless==4.12.0.88` prove every step.

/// A contour or polygon vertex in pixel coordinates.
pub type Point = [i32; 2];

use std::cell::RefCell;

/// OpenCV's chain code directions: 0 is +x, counting counter-clockwise with y pointing down.
const CHAIN_DELTAS: [(i32, i32); 8] = [
    (1, 0),
    (1, -1),
    (0, -1),
    (-1, -1),
    (-1, 0),
    (-1, 1),
    (0, 1),
    (1, 1),
];

/// Border mark of a pixel on a contour's right edge (OpenCV's `MASK8_RIGHT | MASK8_NEW`; a
/// negative `schar` there).
const MARK_RIGHT: u8 = 0x80 | 2;
/// Border mark of any other contour pixel (OpenCV's `MASK8_NEW`).
const MARK_NEW: u8 = 2;

thread_local! {
    /// The padded copy of the mask, kept between calls: a fresh allocation of this size is
    /// a fresh mapping whose page faults would cost more than the whole trace.
    static PADDED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// External contours of a row-major mask (`mask[y * width + x]`, non-zero is foreground),
/// compressed to direction changes, in OpenCV's output order.
///
/// # Panics
/// If `mask.len() != width * height`.
pub fn find_external_contours(mask: &[u8], width: usize, height: usize) -> Vec<Vec<Point>> {
    assert_eq!(
        mask.len(),
        width * height,
        "mask length must be width * height"
    );
    if width == 0 || height == 0 {
        return Vec::new();
    }
    PADDED.with_borrow_mut(|image| {
        // OpenCV's copyMakeBorder (one pixel of 0 all round) and threshold (non-zero -> 1).
        let stride = width + 2;
        image.resize(stride * (height + 2), 0);
        image[..stride].fill(0);
        image[(height + 1) * stride..].fill(0);
        for (y, row) in mask.chunks_exact(width).enumerate() {
            let dst = &mut image[(y + 1) * stride..(y + 2) * stride];
            dst[0] = 0;
            dst[stride - 1] = 0;
            for (d, &s) in dst[1..=width].iter_mut().zip(row) {
                *d = u8::from(s != 0);
            }
        }
        let mut scanner = Scanner {
            image,
            stride,
            width: stride as i32 - 1,
            height: (height + 2) as i32 - 1,
            x: 1,
            y: 1,
            last: (0, 1),
            contours: Vec::new(),
        };
        while scanner.find_next() {}
        scanner.contours.reverse();
        scanner.contours
    })
}

struct Scanner<'a> {
    /// The padded mask: 0, 1, or a border mark. OpenCV reads these bytes as `schar`.
    image: &'a mut [u8],
    stride: usize,
    /// Last column and row the raster scan visits, exclusive (padded image size - 1).
    width: i32,
    height: i32,
    x: i32,
    y: i32,
    /// Position of the last border pixel met on the current row (OpenCV's `lnbd`).
    last: (i32, i32),
    contours: Vec<Vec<Point>>,
}

impl Scanner<'_> {
    #[inline]
    fn at(&self, x: i32, y: i32) -> i8 {
        self.image[y as usize * self.stride + x as usize] as i8
    }

    #[inline]
    fn delta(&self, s: usize) -> isize {
        let (dx, dy) = CHAIN_DELTAS[s % 8];
        dx as isize + dy as isize * self.stride as isize
    }

    /// The first column from `x` on, before `self.width`, whose pixel in row `y` differs from
    /// `prev` (or `self.width`). Compares eight pixels at a time, as OpenCV compares a SIMD
    /// register's worth.
    #[inline]
    fn next_change(&self, mut x: i32, y: i32, prev: i32) -> i32 {
        let row = &self.image[y as usize * self.stride..][..self.width as usize];
        let prev = prev as i8 as u8;
        let pattern = u64::from_ne_bytes([prev; 8]);
        let start = x as usize;
        #[expect(clippy::expect_used, reason = "called on 8-byte chunks only")]
        let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes")) ^ pattern;
        let mut at = start;
        // Skip 32-pixel blocks that hold no change, one branch per block.
        for block in row[start..].chunks_exact(32) {
            #[expect(clippy::expect_used, reason = "chunks_exact(32) yields 32 bytes")]
            let block: &[u8; 32] = block.try_into().expect("32 bytes");
            if word(&block[..8]) | word(&block[8..16]) | word(&block[16..24]) | word(&block[24..])
                != 0
            {
                break;
            }
            at += 32;
        }
        for chunk in row[at..].chunks_exact(8) {
            let diff = word(chunk);
            if diff != 0 {
                return (at + (diff.trailing_zeros() / 8) as usize) as i32;
            }
            at += 8;
        }
        x = at as i32;
        while x < self.width && row[x as usize] == prev {
            x += 1;
        }
        x
    }

    /// Scans on from the current position for the start of the next external contour, traces
    /// it, and returns whether one was found.
    fn find_next(&mut self) -> bool {
        let (mut x, mut y) = (self.x, self.y);
        let mut last = self.last;
        let mut prev = i32::from(self.at(x - 1, y));
        while y < self.height {
            while x < self.width {
                x = self.next_change(x, y, prev);
                if x >= self.width {
                    break;
                }
                let p = i32::from(self.at(x, y));
                if self.start_contour(prev, p, &mut last, x, y) {
                    self.last = last;
                    return true;
                }
                prev = p;
                if prev & !1 != 0 {
                    last.0 = x;
                }
                x += 1;
            }
            last = (0, y + 1);
            x = 1;
            y += 1;
            prev = 0;
        }
        self.x = x;
        self.y = y;
        false
    }

    /// OpenCV's `contourScan` for `RETR_EXTERNAL`: starts a contour at an outer border that
    /// is not inside another object.
    fn start_contour(&mut self, prev: i32, p: i32, last: &mut (i32, i32), x: i32, y: i32) -> bool {
        if !(prev == 0 && p == 1) {
            // Not an outer border. For a hole border OpenCV still moves `last`, then refuses.
            if p != 0 || prev < 1 {
                return false;
            }
            if prev & !1 != 0 {
                last.0 = x - 1;
            }
            return false;
        }
        if self.at(last.0, last.1) > 0 {
            return false;
        }
        last.0 = x;
        let contour = self.trace(x, y);
        self.contours.push(contour);
        self.x = x + 1;
        self.y = y;
        true
    }

    /// OpenCV's `icvFetchContourEx` for an outer border starting at `(x, y)` with
    /// `CHAIN_APPROX_SIMPLE`: follows the border, marks it, and keeps the points where the
    /// direction changes. Points are in unpadded image coordinates.
    fn trace(&mut self, x: i32, y: i32) -> Vec<Point> {
        let i0 = y as usize * self.stride + x as usize;
        let mut pt = [x - 1, y - 1];
        let mut points = Vec::new();
        let offset = |i: usize, d: isize| (i as isize + d) as usize;

        // Look for the first non-zero neighbour clockwise, starting below-left of west.
        let s_end = 4usize;
        let mut s = s_end;
        let mut i1;
        loop {
            s = (s + 7) & 7;
            i1 = offset(i0, self.delta(s));
            if self.image[i1] != 0 || s == s_end {
                break;
            }
        }
        if s == s_end {
            // No neighbour (OpenCV stops at `s_end` whatever that pixel holds; west of an outer
            // border's start is background anyway): a single-pixel contour.
            self.image[i0] = MARK_RIGHT;
            points.push(pt);
            return points;
        }

        let mut i3 = i0;
        let mut prev_s = s ^ 4;
        loop {
            let s_end = s;
            let mut i4 = i3;
            while s < 15 {
                s += 1;
                i4 = offset(i3, self.delta(s));
                if self.image[i4] != 0 {
                    break;
                }
            }
            s &= 7;
            // Mark the pixel: a "right" border pixel if the scan passed east of it.
            if s.wrapping_sub(1) < s_end {
                self.image[i3] = MARK_RIGHT;
            } else if self.image[i3] == 1 {
                self.image[i3] = MARK_NEW;
            }
            if s != prev_s {
                points.push(pt);
            }
            prev_s = s;
            pt[0] += CHAIN_DELTAS[s].0;
            pt[1] += CHAIN_DELTAS[s].1;
            if i4 == i0 && i3 == i1 {
                break;
            }
            i3 = i4;
            s = (s + 4) & 7;
        }
        points
    }
}

/// `cv2.arcLength(points, closed=True)`.
pub fn arc_length_closed(points: &[Point]) -> f64 {
    if points.len() <= 1 {
        return 0.0;
    }
    let mut perimeter = 0.0f64;
    let last = points[points.len() - 1];
    let mut prev = [last[0] as f32, last[1] as f32];
    for p in points {
        let p = [p[0] as f32, p[1] as f32];
        let dx = p[0] - prev[0];
        let dy = p[1] - prev[1];
        perimeter += f64::from((dx * dx + dy * dy).sqrt());
        prev = p;
    }
    perimeter
}

/// `cv2.approxPolyDP(points, epsilon, closed=True)` on integer points.
pub fn approx_poly_dp_closed(src: &[Point], epsilon: f64) -> Vec<Point> {
    let count0 = src.len();
    if count0 == 0 {
        return Vec::new();
    }
    let eps = epsilon * epsilon;
    let count = count0;
    let mut dst: Vec<Point> = vec![[0, 0]; count0];
    let mut new_count = 0usize;
    let mut stack: Vec<(usize, usize)> = Vec::new();

    // 1. Find approximately the two farthest points of the contour.
    let mut right_start = 0usize;
    let mut pos = 0usize;
    let mut start_pt: Point = [-1_000_000, -1_000_000];
    let mut le_eps = false;
    for _ in 0..3 {
        let mut max_dist = 0.0f64;
        pos = (pos + right_start) % count;
        start_pt = src[pos];
        pos = (pos + 1) % count;
        for j in 1..count {
            let pt = src[pos];
            pos = (pos + 1) % count;
            let dx = f64::from(pt[0] - start_pt[0]);
            let dy = f64::from(pt[1] - start_pt[1]);
            let dist = dx * dx + dy * dy;
            if dist > max_dist {
                max_dist = dist;
                right_start = j;
            }
        }
        le_eps = max_dist <= eps;
    }

    // 2. Initialize the stack with the two halves.
    if !le_eps {
        let slice_start = pos % count;
        let slice_end = (right_start + slice_start) % count;
        stack.push((slice_end, slice_start));
        stack.push((slice_start, slice_end));
    } else {
        dst[new_count] = start_pt;
        new_count += 1;
    }

    // 3. Split slices at their farthest point until every point is within epsilon.
    while let Some((slice_start, slice_end)) = stack.pop() {
        let end_pt = src[slice_end];
        let mut pos = slice_start;
        let mut start_pt = src[pos];
        pos = (pos + 1) % count;
        let mut split = 0usize;
        let le_eps = if pos != slice_end {
            let dx = f64::from(end_pt[0] - start_pt[0]);
            let dy = f64::from(end_pt[1] - start_pt[1]);
            let segment_len_2 = dx * dx + dy * dy;
            let mut max_dist = 0.0f64;
            while pos != slice_end {
                let pt = src[pos];
                pos = (pos + 1) % count;
                let dist = (f64::from(pt[1].wrapping_sub(start_pt[1])) * dx
                    - f64::from(pt[0].wrapping_sub(start_pt[0])) * dy)
                    .abs();
                if dist > max_dist {
                    max_dist = dist;
                    split = (pos + count - 1) % count;
                }
            }
            max_dist * max_dist <= eps * segment_len_2
        } else {
            start_pt = src[slice_start];
            true
        };
        if le_eps {
            dst[new_count] = start_pt;
            new_count += 1;
        } else {
            stack.push((split, slice_end));
            stack.push((slice_start, split));
        }
    }

    // 4. Remove extra points on [almost] straight lines.
    let count = new_count;
    let mut pos = count - 1;
    let read = |dst: &[Point], pos: &mut usize| {
        let p = dst[*pos];
        *pos += 1;
        if *pos >= count {
            *pos = 0;
        }
        p
    };
    let mut start_pt = read(&dst, &mut pos);
    let mut wpos = pos;
    let mut pt = read(&dst, &mut pos);
    let mut i = 0;
    while i < count && new_count > 2 {
        let end_pt = read(&dst, &mut pos);
        let dx = f64::from(end_pt[0] - start_pt[0]);
        let dy = f64::from(end_pt[1] - start_pt[1]);
        let dist =
            (f64::from(pt[0] - start_pt[0]) * dy - f64::from(pt[1] - start_pt[1]) * dx).abs();
        let successive_inner_product = (pt[0].wrapping_sub(start_pt[0]))
            .wrapping_mul(end_pt[0].wrapping_sub(pt[0]))
            .wrapping_add(
                (pt[1].wrapping_sub(start_pt[1])).wrapping_mul(end_pt[1].wrapping_sub(pt[1])),
            );
        if dist * dist <= 0.5 * eps * (dx * dx + dy * dy)
            && dx != 0.0
            && dy != 0.0
            && successive_inner_product >= 0
        {
            new_count -= 1;
            start_pt = end_pt;
            dst[wpos] = end_pt;
            wpos += 1;
            if wpos >= count {
                wpos = 0;
            }
            pt = read(&dst, &mut pos);
            i += 2;
            continue;
        }
        start_pt = pt;
        dst[wpos] = pt;
        wpos += 1;
        if wpos >= count {
            wpos = 0;
        }
        pt = end_pt;
        i += 1;
    }
    dst.truncate(new_count);
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn square_contour_and_simplification() {
        // A 3x3 block at (1..4, 1..4) in a 5x5 mask.
        let mut mask = vec![0u8; 25];
        for y in 1..4 {
            for x in 1..4 {
                mask[y * 5 + x] = 1;
            }
        }
        let contours = find_external_contours(&mask, 5, 5);
        assert_eq!(contours, vec![vec![[1, 1], [1, 3], [3, 3], [3, 1]]]);
        assert_eq!(arc_length_closed(&contours[0]), 8.0);
        assert_eq!(approx_poly_dp_closed(&contours[0], 0.008), contours[0]);
    }

    #[test]
    fn single_pixels_and_order() {
        let mut mask = vec![0u8; 4 * 6];
        mask[6 + 1] = 1;
        mask[3 * 6 + 4] = 1;
        let contours = find_external_contours(&mask, 6, 4);
        // OpenCV returns the last contour found first.
        assert_eq!(contours, vec![vec![[4, 3]], vec![[1, 1]]]);
        assert_eq!(approx_poly_dp_closed(&contours[0], 0.0), vec![[4, 3]]);
    }

    #[test]
    fn empty_mask_has_no_contours() {
        assert!(find_external_contours(&[0; 12], 4, 3).is_empty());
        assert!(approx_poly_dp_closed(&[], 1.0).is_empty());
    }
}
