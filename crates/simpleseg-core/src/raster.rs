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

/// Where the walk's crossings go.
trait Sink {
    /// The boundary crosses the centre of `column` at `row` (a run boundary at pixel
    /// `column * height + row`, column-major).
    fn add(&mut self, column: u32, row: u32);
}

/// Every crossing, in walking order: the exact list `rleFrPoly` sorts.
#[derive(Default)]
struct CrossingList {
    columns: Vec<u32>,
    rows: Vec<u32>,
}

impl Sink for CrossingList {
    #[inline]
    fn add(&mut self, column: u32, row: u32) {
        self.columns.push(column);
        self.rows.push(row);
    }
}

/// The parity of the crossings at each pixel position, one bit per position (`0..=h*w`).
///
/// `rleFrPoly` turns the sorted positions into runs by differencing them, and a zero
/// difference (a repeated position) cancels together with the next one: a position that
/// occurs an even number of times toggles nothing, an odd number of times toggles once. The
/// mask is therefore fixed by these parities, and a bit set of the image's size holds them
/// in bounded memory however many crossings an answer makes.
struct Toggles {
    height: u64,
    bits: Vec<u64>,
}

impl Sink for Toggles {
    #[inline]
    fn add(&mut self, column: u32, row: u32) {
        let p = u64::from(column) * self.height + u64::from(row);
        self.bits[(p >> 6) as usize] ^= 1 << (p & 63);
    }
}

/// Walks the boundary and hands its column crossings to a sink.
struct Crossings<S> {
    height: i64,
    width: i64,
    sink: S,
}

impl<S: Sink> Crossings<S> {
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
        self.sink.add(x as u32, y as u32);
    }

    /// Every crossing inside one edge's walk. Within an edge consecutive points differ by at
    /// most one upsampled column, so a crossing of column `c` is the step from upsampled
    /// column `5c + 2` to `5c + 3`, in either direction, at the lower of the two rows.
    fn edge(&mut self, e: &Edge) {
        let Some(span) = EdgeColumns::of(e, self.width) else {
            return;
        };
        if e.x_major {
            // The column advances by one at every step: u(t) = xs + t for t in 0..=len.
            // Crossing of boundary B between t = B - xs and t + 1.
            for c in span.columns {
                let t = 5 * c + 2 - e.xs;
                let (_, v0) = e.point(t);
                let (_, v1) = e.point(t + 1);
                self.crossing(c, v0.min(v1));
            }
        } else {
            for c in span.columns {
                let b = 5 * c + 2;
                // First t where the walk is past B: u(t) >= B + 1 when rising, u(t) <= B
                // when falling. The predicate is monotone in t.
                let past = |t: i64| {
                    let (u, _) = e.point(t);
                    if span.rising {
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

/// The image columns whose centre boundary (`5c + 2` upsampled) one edge's walk crosses.
struct EdgeColumns {
    columns: std::ops::RangeInclusive<i64>,
    /// For an edge longer in y: whether its column grows along the walk.
    rising: bool,
}

impl EdgeColumns {
    /// `None` when the walk crosses no column of a `width`-column image.
    fn of(e: &Edge, width: i64) -> Option<EdgeColumns> {
        if e.len == 0 {
            return None;
        }
        // Boundaries B = 5c + 2 with lo <= B <= hi.
        let (lo, hi, rising) = if e.x_major {
            (e.xs, e.xs + e.len - 1, true)
        } else if e.slope != 0.0 {
            // The column is a monotone function of t; it passes each boundary once.
            let (u_start, _) = e.point(0);
            let (u_end, _) = e.point(e.len);
            let rising = u_end > u_start;
            let (lo_u, hi_u) = if rising {
                (u_start, u_end)
            } else {
                (u_end, u_start)
            };
            (lo_u, hi_u - 1, rising)
        } else {
            return None;
        };
        let first = (lo - 2).div_euclid(5) + i64::from((lo - 2).rem_euclid(5) != 0);
        let last = (hi - 2).div_euclid(5);
        let columns = first.max(0)..=last.min(width - 1);
        (!columns.is_empty()).then_some(EdgeColumns { columns, rising })
    }

    fn len(&self) -> u64 {
        (self.columns.end() - self.columns.start() + 1) as u64
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

impl CrossingList {
    /// The crossings as column-major pixel positions (`x * height + y`), sorted: the order
    /// of `rleFrPoly`'s `qsort`. A counting sort by column, then a sort of the rows within
    /// each column (usually a handful); for an image far wider than the crossings are many,
    /// one sort of all positions instead.
    fn sorted_positions(&self, height: u32, width: u32, bucket: &mut Vec<u32>, out: &mut Vec<u32>) {
        let width = width as usize;
        out.clear();
        if width > 4 * self.rows.len() + 1024 {
            out.extend(
                self.columns
                    .iter()
                    .zip(&self.rows)
                    .map(|(&c, &r)| c * height + r),
            );
            out.sort_unstable();
            return;
        }
        bucket.clear();
        bucket.resize(width + 1, 0);
        for &c in &self.columns {
            bucket[c as usize + 1] += 1;
        }
        for c in 0..width {
            bucket[c + 1] += bucket[c];
        }
        out.resize(self.rows.len(), 0);
        for (&c, &r) in self.columns.iter().zip(&self.rows) {
            let slot = &mut bucket[c as usize];
            out[*slot as usize] = c * height + r;
            *slot += 1;
        }
        // `bucket[c]` now ends column c.
        let mut start = 0;
        for &end in &bucket[..width] {
            out[start..end as usize].sort_unstable();
            start = end as usize;
        }
    }
}

/// Reusable buffers for rasterizing many polygons.
#[derive(Default)]
struct Scratch {
    crossings: CrossingList,
    bucket: Vec<u32>,
    positions: Vec<u32>,
}

/// Rasterizes one polygon given in pixel coordinates, exactly as pycocotools
/// `frPyObjects([[x0, y0, x1, y1, ...]], height, width)` followed by `decode` does.
///
/// Polygons of fewer than 3 vertices are rasterized as `rleFrPoly` would (to an empty mask);
/// pycocotools' Python layer refuses them, which callers decide how to report. NaN
/// coordinates are an error; infinite ones saturate like other out-of-range values.
///
/// Time is linear in the number of column crossings (an edge crosses at most the image's
/// width) and memory is bounded by the smaller of 12 bytes per crossing and one bit per
/// pixel, so no answer, however long, can exhaust memory; where even that cannot be had, the
/// result is [`Error::OutOfMemory`].
pub fn rasterize_polygon(points: &[[f64; 2]], height: u32, width: u32) -> Result<RleMask> {
    check_size(height, width)?;
    rasterize_with(points, height, width, &mut Scratch::default())
}

/// Rasterizes and unions several polygons (the official decoder's union of masks).
///
/// Memory is bounded by the vertices, one polygon's runs and one bit per pixel, however many
/// polygons there are: each polygon is rasterized with reused buffers and merged into the
/// union at once ([`PixelBits`]); on a canvas too large for a bit per pixel, into a running
/// union of runs instead.
pub fn rasterize_polygons<'a>(
    polygons: impl IntoIterator<Item = &'a [[f64; 2]]>,
    height: u32,
    width: u32,
) -> Result<RleMask> {
    check_size(height, width)?;
    let mut scratch = Scratch::default();
    let mut polygons = polygons.into_iter();
    let Some(first) = polygons.next() else {
        return RleMask::empty(height, width);
    };
    let first = rasterize_with(first, height, width, &mut scratch)?;
    let Some(second) = polygons.next() else {
        return Ok(first);
    };
    let pixels = u64::from(height) * u64::from(width);
    if pixels / 8 <= UNION_BITS_BYTES {
        let mut union = PixelBits::new(pixels).ok_or_else(|| out_of_memory(height, width))?;
        union.add(&first);
        union.add(&rasterize_with(second, height, width, &mut scratch)?);
        for polygon in polygons {
            union.add(&rasterize_with(polygon, height, width, &mut scratch)?);
        }
        return Ok(RleMask::from_counts_unchecked(
            height,
            width,
            union.counts(),
        ));
    }
    let mut union = RleMask::union_all([
        &first,
        &rasterize_with(second, height, width, &mut scratch)?,
    ])?;
    for polygon in polygons {
        let mask = rasterize_with(polygon, height, width, &mut scratch)?;
        union = RleMask::union_all([&union, &mask])?;
    }
    Ok(union)
}

/// The largest bit set [`rasterize_polygons`] keeps for a union (a canvas of 2^28 pixels,
/// beyond the default image limit).
const UNION_BITS_BYTES: u64 = 32 << 20;

/// A union of masks as one bit per pixel, in column-major order.
struct PixelBits {
    pixels: u64,
    words: Vec<u64>,
}

impl PixelBits {
    fn new(pixels: u64) -> Option<PixelBits> {
        let n = usize::try_from(pixels.div_ceil(64)).ok()?;
        let mut words = Vec::new();
        words.try_reserve_exact(n).ok()?;
        words.resize(n, 0);
        Some(PixelBits { pixels, words })
    }

    /// Sets the pixels of `mask`'s foreground runs.
    fn add(&mut self, mask: &RleMask) {
        let mut at = 0u64;
        for (i, &run) in mask.counts().iter().enumerate() {
            let end = at + u64::from(run);
            if i % 2 == 1 {
                self.fill(at, end);
            }
            at = end;
        }
    }

    /// Sets bits `start..end`.
    fn fill(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (first, last) = ((start / 64) as usize, ((end - 1) / 64) as usize);
        let head = !0u64 << (start % 64);
        let tail = !0u64 >> (63 - (end - 1) % 64);
        if first == last {
            self.words[first] |= head & tail;
            return;
        }
        self.words[first] |= head;
        self.words[first + 1..last].fill(!0);
        self.words[last] |= tail;
    }

    /// The runs of the union, starting with background.
    fn counts(&self) -> Vec<u32> {
        let mut counts = Vec::new();
        let mut previous = 0u64;
        // The value of the bit before the current one (pixel -1 counts as background).
        let mut carry = 0u64;
        for (i, &word) in self.words.iter().enumerate() {
            // Bit k is set where pixel 64i + k differs from the pixel before it.
            let mut changes = word ^ ((word << 1) | carry);
            carry = word >> 63;
            while changes != 0 {
                let p = (i as u64) * 64 + u64::from(changes.trailing_zeros());
                if p >= self.pixels {
                    break;
                }
                counts.push((p - previous) as u32);
                previous = p;
                changes &= changes - 1;
            }
        }
        counts.push((self.pixels - previous) as u32);
        counts
    }
}

/// The polygon's edges in `rleFrPoly`'s order, with the last point of the previous edge's
/// walk (the walks of consecutive edges meet through one more crossing check).
fn edges(points: &[[f64; 2]]) -> impl Iterator<Item = Edge> + '_ {
    let upsample = |c: f64| (SCALE * c + 0.5) as i32 as i64;
    let k = points.len();
    let vertex = move |j: usize| {
        let p = points[j % k];
        (upsample(p[0]), upsample(p[1]))
    };
    (0..k).map(move |j| {
        let (x0, y0) = vertex(j);
        let (x1, y1) = vertex(j + 1);
        Edge::new(x0, y0, x1, y1)
    })
}

/// Walks the polygon's edges and hands their column crossings to the sink.
fn walk<S: Sink>(points: &[[f64; 2]], crossings: &mut Crossings<S>) {
    let mut previous_end: Option<(i64, i64)> = None;
    for edge in edges(points) {
        let (start, end) = edge.ends();
        if let Some(prev) = previous_end {
            crossings.pair(prev, start);
        }
        crossings.edge(&edge);
        previous_end = Some(end);
    }
}

/// An upper bound on the crossings [`walk`] produces, in time linear in the vertices.
fn crossing_bound(points: &[[f64; 2]], width: i64) -> u64 {
    edges(points)
        .map(|e| EdgeColumns::of(&e, width).map_or(0, |c| c.len()) + 1)
        .fold(0u64, u64::saturating_add)
}

fn out_of_memory(height: u32, width: u32) -> Error {
    Error::OutOfMemory(format!("rasterizing a polygon on a {width}x{height} mask"))
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
    let pixels = u64::from(height) * u64::from(width);
    let bound = crossing_bound(points, i64::from(width));
    // The list costs 12 bytes a crossing (two coordinates and a position), the parity bits
    // one bit a pixel position: take the smaller.
    if bound.saturating_mul(12) > pixels / 8 + 4096 {
        return rasterize_by_parity(points, height, width);
    }
    let list = &mut scratch.crossings;
    list.columns.clear();
    list.rows.clear();
    let n = bound as usize;
    list.columns
        .try_reserve(n)
        .and_then(|()| list.rows.try_reserve(n))
        .and_then(|()| scratch.positions.try_reserve(n + 1))
        .map_err(|_| out_of_memory(height, width))?;
    let mut crossings = Crossings {
        height: i64::from(height),
        width: i64::from(width),
        sink: std::mem::take(list),
    };
    walk(points, &mut crossings);
    *list = crossings.sink;
    let a = &mut scratch.positions;
    list.sorted_positions(height, width, &mut scratch.bucket, a);

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

/// The same runs as [`rasterize_with`] from the crossings' parities (see [`Toggles`]).
fn rasterize_by_parity(points: &[[f64; 2]], height: u32, width: u32) -> Result<RleMask> {
    let pixels = u64::from(height) * u64::from(width);
    // Positions run from 0 to h * w inclusive: a crossing at the bottom of the last column.
    let words = (pixels / 64 + 1) as usize;
    let mut bits = Vec::new();
    bits.try_reserve_exact(words)
        .map_err(|_| out_of_memory(height, width))?;
    bits.resize(words, 0u64);
    let mut crossings = Crossings {
        height: i64::from(height),
        width: i64::from(width),
        sink: Toggles {
            height: u64::from(height),
            bits,
        },
    };
    walk(points, &mut crossings);
    let mut counts = Vec::new();
    let mut previous = 0u64;
    'words: for (i, &word) in crossings.sink.bits.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            let p = (i as u64) * 64 + u64::from(word.trailing_zeros());
            if p >= pixels {
                // A toggle at the very end changes no pixel.
                break 'words;
            }
            counts.push((p - previous) as u32);
            previous = p;
            word &= word - 1;
        }
    }
    counts.push((pixels - previous) as u32);
    Ok(RleMask::from_counts_unchecked(height, width, counts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

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
            .sink
            .columns
            .iter()
            .zip(&c.sink.rows)
            .map(|(x, y)| x * h + y)
            .collect();
        p.sort_unstable();
        p
    }

    fn crossings(h: u32, w: u32) -> Crossings<CrossingList> {
        Crossings {
            height: h.into(),
            width: w.into(),
            sink: CrossingList::default(),
        }
    }

    fn fast_positions(points: &[[f64; 2]], h: u32, w: u32) -> Vec<u32> {
        let mut c = crossings(h, w);
        walk(points, &mut c);
        assert!(c.sink.rows.len() as u64 <= crossing_bound(points, w.into()));
        let mut out = Vec::new();
        c.sink.sorted_positions(h, w, &mut Vec::new(), &mut out);
        out
    }

    fn random_polygon(rng: &mut StdRng, n: usize, h: u32, w: u32) -> Vec<[f64; 2]> {
        (0..n)
            .map(|_| {
                [
                    rng.random_range(-0.2..1.2) * f64::from(w),
                    rng.random_range(-0.2..1.2) * f64::from(h),
                ]
            })
            .collect()
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
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let (h, w) = (rng.random_range(1..40), rng.random_range(1..40));
            let n = rng.random_range(3..30);
            let pts = random_polygon(&mut rng, n, h, w);
            assert_eq!(fast_positions(&pts, h, w), naive_positions(&pts, h, w));
        }
        // Few crossings over a very wide image take the plain sort.
        let pts = [[5.0, 1.0], [40.0, 3.0], [7.0, 9.0]];
        assert_eq!(
            fast_positions(&pts, 10, 100_000),
            naive_positions(&pts, 10, 100_000)
        );
    }

    #[test]
    fn parity_path_gives_the_same_runs_as_the_list() {
        let mut rng = StdRng::seed_from_u64(11);
        for round in 0..300 {
            let (h, w) = (rng.random_range(1..50), rng.random_range(1..50));
            // Many points make repeated positions (even and odd multiplicities) common.
            let n = if round % 3 == 0 {
                400
            } else {
                rng.random_range(3..20)
            };
            let pts = random_polygon(&mut rng, n, h, w);
            let list = rasterize_with(&pts, h, w, &mut Scratch::default()).unwrap();
            let parity = rasterize_by_parity(&pts, h, w).unwrap();
            assert_eq!(list, parity, "{h}x{w} {pts:?}");
        }
    }

    #[test]
    fn answers_with_very_many_crossings_stay_small() {
        // 200,000 edges spanning a 10-pixel-wide image: the list would need millions of
        // entries and the old insertion sort quadratic time; the parity bits need 2 words.
        let pts: Vec<[f64; 2]> = (0..200_000)
            .map(|i| [if i % 2 == 0 { -1.0 } else { 11.0 }, (i % 97) as f64 / 9.7])
            .collect();
        assert!(crossing_bound(&pts, 10) > 1_000_000);
        let mask = rasterize_polygon(&pts, 10, 10).unwrap();
        assert_eq!(
            mask.counts().iter().map(|&c| u64::from(c)).sum::<u64>(),
            100
        );
        // A polygon on the widest possible mask allocates nothing per column.
        let tri = [[1e8, 0.0], [1e8 + 1000.0, 2.0], [1e8 + 500.0, 4.0]];
        let mask = rasterize_polygon(&tri, 4, 1_000_000_000).unwrap();
        assert!(mask.area() > 1000, "{}", mask.area());
    }

    #[test]
    fn union_as_bits_equals_the_union_of_runs() {
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..200 {
            let (h, w) = (rng.random_range(1..60), rng.random_range(1..60));
            let polygons: Vec<Vec<[f64; 2]>> = (0..rng.random_range(2..6))
                .map(|_| {
                    let n = rng.random_range(3..12);
                    random_polygon(&mut rng, n, h, w)
                })
                .collect();
            let masks: Vec<RleMask> = polygons
                .iter()
                .map(|p| rasterize_polygon(p, h, w).unwrap())
                .collect();
            let expected = RleMask::union_all(&masks).unwrap();
            let union = rasterize_polygons(polygons.iter().map(Vec::as_slice), h, w).unwrap();
            assert_eq!(union, expected, "{h}x{w}");
        }
        // Runs that touch the first and the last pixel, and whole words.
        let mut bits = PixelBits::new(200).unwrap();
        bits.fill(0, 3);
        bits.fill(64, 128);
        bits.fill(190, 200);
        assert_eq!(bits.counts(), vec![0, 3, 61, 64, 62, 10]);
    }

    #[test]
    fn many_polygons_merge_as_they_come() {
        // 20,000 small triangles over a 200x160 canvas: the union never holds more than one
        // triangle's runs beside the canvas' bits.
        let triangles: Vec<Vec<[f64; 2]>> = (0..20_000)
            .map(|i| {
                let (x, y) = ((i * 37 % 190) as f64, (i * 53 % 150) as f64);
                vec![[x, y], [x + 6.0, y + 1.0], [x + 2.0, y + 7.0]]
            })
            .collect();
        let union = rasterize_polygons(triangles.iter().map(Vec::as_slice), 160, 200).unwrap();
        let masks: Vec<RleMask> = triangles[..500]
            .iter()
            .map(|p| rasterize_polygon(p, 160, 200).unwrap())
            .collect();
        let some = RleMask::union_all(&masks).unwrap();
        let (inter, _) = union.intersection_union(&some).unwrap();
        assert_eq!(inter, some.area(), "the union holds every triangle");
        assert!(union.area() > some.area());
    }
}
