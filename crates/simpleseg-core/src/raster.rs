//! Polygon rasterization, bit-exact with pycocotools' `rleFrPoly`.
//!
//! pycocotools upsamples every vertex by 5, walks each edge one upsampled step at a time,
//! keeps the steps where the walk crosses the centre of a pixel column, and turns those
//! crossings into runs. The crossings are all that matters, and only one upsampled column in
//! five can hold one, so this implementation computes the crossings directly: along an edge
//! that is longer in x it evaluates the walk only at those columns; along an edge that is
//! longer in y it jumps to the step where the walk enters the next column. Every value is
//! computed with the same integer and floating-point operations as `maskApi.c`, so the
//! crossings, and therefore the runs, are identical, while the work is proportional to the
//! number of columns the polygon spans rather than to its perimeter. Columns outside the
//! image are skipped altogether, so a vertex far outside the image costs nothing.
//!
//! Exactness holds wherever pycocotools' own arithmetic is defined: while `5 * coordinate`
//! fits in a C `int` (|coordinate| < 4.29e8 pixels). Beyond that (infinity included) the
//! reference has undefined behaviour; here the upsampled coordinate saturates.

use crate::error::{Error, Result};
use crate::rle::{check_size, RleMask};

/// `rleFrPoly`'s upsampling factor.
const SCALE: f64 = 5.0;

/// C's `(int)` conversion of a double as x86-64 executes it: truncation toward zero, and the
/// "integer indefinite" value `INT_MIN` for NaN and out-of-range values. pycocotools runs
/// into NaN on degenerate (zero-length) edges, where it divides 0 by 0.
#[inline]
fn c_int(x: f64) -> i64 {
    if x.is_nan() || x >= 2_147_483_648.0 || x <= -2_147_483_649.0 {
        i64::from(i32::MIN)
    } else {
        x as i64
    }
}

/// One edge of the upsampled polygon, normalized as `rleFrPoly` normalizes it: walked from
/// `(xs, ys)` by `t = 0..=len` along its longer axis, the other coordinate interpolated.
struct Edge {
    xs: i64,
    ys: i64,
    len: i64,
    slope: f64,
    x_major: bool,
    /// Whether the walk runs from `t = len` down to 0 (the edge was swapped).
    flip: bool,
}

impl Edge {
    fn new(x0: i64, y0: i64, x1: i64, y1: i64) -> Edge {
        let (mut xs, mut xe, mut ys, mut ye) = (x0, x1, y0, y1);
        let dx = (xe - xs).abs();
        let dy = (ys - ye).abs();
        let x_major = dx >= dy;
        let flip = (x_major && xs > xe) || (!x_major && ys > ye);
        if flip {
            std::mem::swap(&mut xs, &mut xe);
            std::mem::swap(&mut ys, &mut ye);
        }
        // In C the numerator and denominator are ints converted to double; 0 / 0 is NaN.
        let slope = if x_major {
            (ye - ys) as f64 / dx as f64
        } else {
            (xe - xs) as f64 / dy as f64
        };
        Edge {
            xs,
            ys,
            len: if x_major { dx } else { dy },
            slope,
            x_major,
            flip,
        }
    }

    /// The upsampled boundary point at step `t`, exactly as `rleFrPoly` computes it.
    #[inline]
    fn point(&self, t: i64) -> (i64, i64) {
        if self.x_major {
            (
                t + self.xs,
                c_int(self.ys as f64 + self.slope * t as f64 + 0.5),
            )
        } else {
            (
                c_int(self.xs as f64 + self.slope * t as f64 + 0.5),
                t + self.ys,
            )
        }
    }

    /// The first and last point of the walk in walking order.
    fn ends(&self) -> ((i64, i64), (i64, i64)) {
        let (a, b) = (self.point(0), self.point(self.len));
        if self.flip {
            (b, a)
        } else {
            (a, b)
        }
    }
}

/// Collects the column crossings of the boundary walk as run boundaries.
struct Crossings {
    height: i64,
    width: i64,
    /// Column and row of each crossing, in the order the walk meets them.
    columns: Vec<u32>,
    rows: Vec<u32>,
}

impl Crossings {
    /// `rleFrPoly`'s second stage for consecutive points `(u0, v0) -> (u1, v1)`.
    #[inline]
    fn pair(&mut self, (u0, v0): (i64, i64), (u1, v1): (i64, i64)) {
        if u1 == u0 {
            return;
        }
        // C: xd = (x + .5) / 5 - .5 must be a whole column in [0, w - 1]. It is whole exactly
        // when x = 5c + 2, and then it equals c.
        let x = if u1 < u0 { u1 } else { u1 - 1 };
        if (x - 2).rem_euclid(5) != 0 {
            return;
        }
        let c = (x - 2).div_euclid(5);
        if c < 0 || c > self.width - 1 {
            return;
        }
        self.crossing(c, v0.min(v1));
    }

    /// Records the crossing of column `x` at upsampled row `v`.
    #[inline]
    fn crossing(&mut self, x: i64, v: i64) {
        // C: yd = ceil(clamp((v + .5) / 5 - .5, 0, h)). The quotient is (v - 2) / 5 up to
        // rounding that never crosses an integer, so in integers this is the clamped ceiling
        // of (v - 2) / 5.
        let y = (v + 2).div_euclid(5).clamp(0, self.height);
        self.columns.push(x as u32);
        self.rows.push(y as u32);
    }

    /// Every crossing inside one edge's walk. Within an edge consecutive points differ by at
    /// most one upsampled column, so a crossing of column `c` is the step from upsampled
    /// column `5c + 2` to `5c + 3`, in either direction, at the lower of the two rows.
    fn edge(&mut self, e: &Edge) {
        if e.len == 0 {
            return;
        }
        // Image columns c whose boundary 5c + 2 the walk can cross.
        let c_lo = 0i64;
        let c_hi = self.width - 1;
        if e.x_major {
            // The column advances by one at every step: u(t) = xs + t for t in 0..=len.
            // Crossing of boundary B between t = B - xs and t + 1.
            let first = (e.xs - 2).div_euclid(5) + i64::from((e.xs - 2).rem_euclid(5) != 0);
            let last = (e.xs + e.len - 1 - 2).div_euclid(5);
            for c in first.max(c_lo)..=last.min(c_hi) {
                let t = 5 * c + 2 - e.xs;
                let (_, v0) = e.point(t);
                let (_, v1) = e.point(t + 1);
                self.crossing(c, v0.min(v1));
            }
        } else if e.slope != 0.0 {
            // The column is a monotone function of t; find where it passes each boundary.
            let (u_start, _) = e.point(0);
            let (u_end, _) = e.point(e.len);
            let rising = u_end > u_start;
            let (lo_u, hi_u) = if rising {
                (u_start, u_end)
            } else {
                (u_end, u_start)
            };
            // Boundaries B = 5c + 2 with lo_u <= B < hi_u.
            let first = (lo_u - 2).div_euclid(5) + i64::from((lo_u - 2).rem_euclid(5) != 0);
            let last = (hi_u - 1 - 2).div_euclid(5);
            for c in first.max(c_lo)..=last.min(c_hi) {
                let b = 5 * c + 2;
                // First t where the walk is past B: u(t) >= B + 1 when rising, u(t) <= B
                // when falling. The predicate is monotone in t.
                let past = |t: i64| {
                    let (u, _) = e.point(t);
                    if rising {
                        u > b
                    } else {
                        u <= b
                    }
                };
                let t = first_true(e, b, past);
                // Steps t - 1 -> t cross B; the lower row is the earlier one.
                self.crossing(c, e.ys + t - 1);
            }
        }
    }
}

/// The first `t` in `1..=len` for which `past(t)` holds, given that `past(0)` is false and
/// `past(len)` is true. Probes around the linear estimate of the answer, then bisects what is
/// left of the bracket (usually nothing).
#[inline]
fn first_true(e: &Edge, b: i64, past: impl Fn(i64) -> bool) -> i64 {
    let (mut lo, mut hi) = (0i64, e.len);
    // u(t) = xs + slope * t + 0.5 passes B + 0.5 near t = (B + 0.5 - xs) / slope, whichever
    // way it runs.
    let estimate = (b as f64 + 0.5 - e.xs as f64) / e.slope;
    if estimate.is_finite() {
        // Truncation plus one stands in for the ceiling (a libm call here): the probes
        // around the guess absorb the difference.
        let guess = (estimate.clamp(0.0, e.len as f64) as i64 + 1).min(e.len);
        for t in [guess - 1, guess, guess + 1] {
            if t > lo && t < hi {
                if past(t) {
                    hi = t;
                    break;
                }
                lo = t;
            }
        }
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if past(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

impl Crossings {
    /// The crossings as column-major pixel positions (`x * height + y`), sorted. A counting
    /// sort by column, then an insertion sort of the few rows within each column: the same
    /// order as `rleFrPoly`'s `qsort`, for a fraction of its comparisons.
    fn sorted_positions(&self, bucket: &mut Vec<u32>, out: &mut Vec<u32>) {
        let width = self.width as usize;
        bucket.clear();
        bucket.resize(width + 1, 0);
        for &c in &self.columns {
            bucket[c as usize + 1] += 1;
        }
        for c in 0..width {
            bucket[c + 1] += bucket[c];
        }
        out.clear();
        out.resize(self.rows.len(), 0);
        for (&c, &r) in self.columns.iter().zip(&self.rows) {
            let slot = &mut bucket[c as usize];
            out[*slot as usize] = c * self.height as u32 + r;
            *slot += 1;
        }
        // `bucket[c]` now ends column c; runs of one column are short.
        let mut start = 0;
        for &end in &bucket[..width] {
            let column = &mut out[start..end as usize];
            for i in 1..column.len() {
                let mut j = i;
                while j > 0 && column[j - 1] > column[j] {
                    column.swap(j - 1, j);
                    j -= 1;
                }
            }
            start = end as usize;
        }
    }
}

/// Reusable buffers for rasterizing many polygons.
#[derive(Default)]
struct Scratch {
    columns: Vec<u32>,
    rows: Vec<u32>,
    bucket: Vec<u32>,
    positions: Vec<u32>,
}

/// Rasterizes one polygon given in pixel coordinates, exactly as pycocotools
/// `frPyObjects([[x0, y0, x1, y1, ...]], height, width)` followed by `decode` does.
///
/// Polygons of fewer than 3 vertices are rasterized as `rleFrPoly` would (to an empty mask);
/// pycocotools' Python layer refuses them, which callers decide how to report. NaN
/// coordinates are an error; infinite ones saturate like other out-of-range values.
pub fn rasterize_polygon(points: &[[f64; 2]], height: u32, width: u32) -> Result<RleMask> {
    check_size(height, width)?;
    rasterize_with(points, height, width, &mut Scratch::default())
}

/// Rasterizes and unions several polygons (the official decoder's union of masks).
pub fn rasterize_polygons<'a>(
    polygons: impl IntoIterator<Item = &'a [[f64; 2]]>,
    height: u32,
    width: u32,
) -> Result<RleMask> {
    check_size(height, width)?;
    let mut scratch = Scratch::default();
    let masks = polygons
        .into_iter()
        .map(|p| rasterize_with(p, height, width, &mut scratch))
        .collect::<Result<Vec<_>>>()?;
    match masks.len() {
        0 => RleMask::empty(height, width),
        1 => Ok(masks.into_iter().next().expect("one mask")),
        _ => RleMask::union_all(&masks),
    }
}

/// Walks the polygon's edges and collects its column crossings.
fn walk(points: &[[f64; 2]], crossings: &mut Crossings) {
    let upsample = |c: f64| (SCALE * c + 0.5) as i32 as i64;
    let k = points.len();
    let vertex = |j: usize| {
        let p = points[j % k];
        (upsample(p[0]), upsample(p[1]))
    };
    let mut previous_end: Option<(i64, i64)> = None;
    for j in 0..k {
        let (x0, y0) = vertex(j);
        let (x1, y1) = vertex(j + 1);
        let edge = Edge::new(x0, y0, x1, y1);
        let (start, end) = edge.ends();
        if let Some(prev) = previous_end {
            crossings.pair(prev, start);
        }
        crossings.edge(&edge);
        previous_end = Some(end);
    }
}

fn rasterize_with(
    points: &[[f64; 2]],
    height: u32,
    width: u32,
    scratch: &mut Scratch,
) -> Result<RleMask> {
    // Infinite coordinates saturate like any coordinate beyond the `int` range; NaN has no
    // place on the boundary.
    if let Some(bad) = points.iter().flatten().find(|c| c.is_nan()) {
        return Err(Error::NonFiniteCoordinate(*bad));
    }
    scratch.columns.clear();
    scratch.rows.clear();
    let mut crossings = Crossings {
        height: i64::from(height),
        width: i64::from(width),
        columns: std::mem::take(&mut scratch.columns),
        rows: std::mem::take(&mut scratch.rows),
    };
    walk(points, &mut crossings);
    let a = &mut scratch.positions;
    crossings.sorted_positions(&mut scratch.bucket, a);
    scratch.columns = crossings.columns;
    scratch.rows = crossings.rows;

    // From here on this is `rleFrPoly`'s final stage: the sorted positions, then the total,
    // as differences; a zero difference (two crossings at one pixel) cancels, joining the
    // runs on either side of it.
    a.push(height * width);
    let mut p = 0u32;
    for value in a.iter_mut() {
        let t = *value;
        *value = value.wrapping_sub(p);
        p = t;
    }
    let mut counts = Vec::with_capacity(a.len());
    let mut j = 0;
    counts.push(a[j]);
    j += 1;
    while j < a.len() {
        if a[j] > 0 {
            counts.push(a[j]);
            j += 1;
        } else {
            j += 1;
            if j < a.len() {
                let last = counts.len() - 1;
                counts[last] = counts[last].wrapping_add(a[j]);
                j += 1;
            }
        }
    }
    Ok(RleMask::from_counts_unchecked(height, width, counts))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `rleFrPoly`'s first two stages verbatim: every upsampled boundary point, then the
    /// column crossings. The test oracle for the fast walk.
    fn naive_positions(points: &[[f64; 2]], h: u32, w: u32) -> Vec<u32> {
        let k = points.len();
        let up = |c: f64| (SCALE * c + 0.5) as i32 as i64;
        let x: Vec<i64> = (0..=k).map(|j| up(points[j % k][0])).collect();
        let y: Vec<i64> = (0..=k).map(|j| up(points[j % k][1])).collect();
        let (mut u, mut v) = (Vec::new(), Vec::new());
        for j in 0..k {
            let (mut xs, mut xe, mut ys, mut ye) = (x[j], x[j + 1], y[j], y[j + 1]);
            let dx = (xe - xs).abs();
            let dy = (ys - ye).abs();
            let flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
            if flip {
                std::mem::swap(&mut xs, &mut xe);
                std::mem::swap(&mut ys, &mut ye);
            }
            let s = if dx >= dy {
                (ye - ys) as f64 / dx as f64
            } else {
                (xe - xs) as f64 / dy as f64
            };
            if dx >= dy {
                for d in 0..=dx {
                    let t = if flip { dx - d } else { d };
                    u.push(t + xs);
                    v.push(c_int(ys as f64 + s * t as f64 + 0.5));
                }
            } else {
                for d in 0..=dy {
                    let t = if flip { dy - d } else { d };
                    v.push(t + ys);
                    u.push(c_int(xs as f64 + s * t as f64 + 0.5));
                }
            }
        }
        let mut c = crossings(h, w);
        for j in 1..u.len() {
            c.pair((u[j - 1], v[j - 1]), (u[j], v[j]));
        }
        let mut p: Vec<u32> = c
            .columns
            .iter()
            .zip(&c.rows)
            .map(|(x, y)| x * h + y)
            .collect();
        p.sort_unstable();
        p
    }

    fn crossings(h: u32, w: u32) -> Crossings {
        Crossings {
            height: h.into(),
            width: w.into(),
            columns: Vec::new(),
            rows: Vec::new(),
        }
    }

    fn fast_positions(points: &[[f64; 2]], h: u32, w: u32) -> Vec<u32> {
        let mut c = crossings(h, w);
        walk(points, &mut c);
        let mut out = Vec::new();
        c.sorted_positions(&mut Vec::new(), &mut out);
        out
    }

    #[test]
    fn fast_walk_finds_the_same_crossings() {
        let cases: &[(&[[f64; 2]], u32, u32)] = &[
            (&[[1.0, 1.0], [6.0, 1.0], [6.0, 6.0], [1.0, 6.0]], 10, 10),
            (&[[0.3, 0.2], [7.7, 1.4], [3.1, 8.9]], 10, 10),
            (&[[2.0, 0.5], [2.6, 9.5], [8.0, 3.0]], 10, 12),
        ];
        for (pts, h, w) in cases {
            assert_eq!(
                fast_positions(pts, *h, *w),
                naive_positions(pts, *h, *w),
                "{pts:?}"
            );
        }
    }
}
