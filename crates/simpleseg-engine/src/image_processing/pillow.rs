//! Image resizing exactly as Pillow's `Image.resize` does it for 8-bit RGB images.
//!
//! The Qwen2.5-VL and Kimi-VL image processors resize with Pillow; other resamplers differ by
//! up to 16 levels on real photos. This is a port of Pillow's `Resample.c`: filter weights in
//! double precision, normalized per output pixel, converted to 22-bit fixed point, then a
//! horizontal pass and a vertical pass in integer arithmetic with Pillow's rounding and
//! clipping. Downscaling widens the filter (antialiasing) as Pillow does.

use image::RgbImage;

/// The resampling filters this port supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BICUBIC` (cubic convolution with a = -0.5).
    Bicubic,
    /// `Image.BILINEAR` (triangle).
    Bilinear,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bicubic => 2.0,
            Filter::Bilinear => 1.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fractional bits of Pillow's fixed-point weights for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: first input index, number of taps, and fixed-point weights
/// (`ksize` per pixel).
struct Coefficients {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the full box
/// `[0, in_size)`.
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Coefficients {
    // Pillow computes `in1 - in0` in single precision; sizes are exact there.
    let scale = (in_size as f32 - 0.0f32) as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let taps = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, slot) in k.iter_mut().enumerate().take(taps) {
            let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            *slot = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for (x, slot) in row.iter_mut().enumerate().take(taps) {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            *slot = if w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin, taps));
    }
    Coefficients {
        ksize,
        bounds,
        weights,
    }
}

/// Pillow's `clip8`: the fixed-point sum shifted down and clamped to a byte.
#[inline]
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One horizontal pass: `rows` rows of a `in_w`-wide image starting at row `first_row`,
/// resampled to the width of `coeffs`.
fn horizontal_pass(
    src: &[u8],
    in_w: usize,
    first_row: usize,
    rows: usize,
    coeffs: &Coefficients,
) -> Vec<u8> {
    let out_w = coeffs.bounds.len();
    let mut out = vec![0u8; rows * out_w * 3];
    for (line, dst) in src[first_row * in_w * 3..]
        .chunks_exact(in_w * 3)
        .zip(out.chunks_exact_mut(out_w * 3))
    {
        for ((&(xmin, taps), k), px) in coeffs
            .bounds
            .iter()
            .zip(coeffs.weights.chunks_exact(coeffs.ksize))
            .zip(dst.chunks_exact_mut(3))
        {
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for (p, &w) in line[xmin * 3..(xmin + taps) * 3]
                .chunks_exact(3)
                .zip(&k[..taps])
            {
                ss[0] = ss[0].wrapping_add(i32::from(p[0]).wrapping_mul(w));
                ss[1] = ss[1].wrapping_add(i32::from(p[1]).wrapping_mul(w));
                ss[2] = ss[2].wrapping_add(i32::from(p[2]).wrapping_mul(w));
            }
            px[0] = clip8(ss[0]);
            px[1] = clip8(ss[1]);
            px[2] = clip8(ss[2]);
        }
    }
    out
}

/// One vertical pass over a `w`-wide image whose first row is source row `row_offset`,
/// resampled to the height of `coeffs`. Accumulates whole rows at a time (the same sums in the
/// same order as Pillow's per-pixel loop, since integer addition is exact).
fn vertical_pass(src: &[u8], w: usize, row_offset: usize, coeffs: &Coefficients) -> Vec<u8> {
    let out_h = coeffs.bounds.len();
    let stride = w * 3;
    let mut out = vec![0u8; stride * out_h];
    let mut acc = vec![0i32; stride];
    for ((&(ymin, taps), k), dst) in coeffs
        .bounds
        .iter()
        .zip(coeffs.weights.chunks_exact(coeffs.ksize))
        .zip(out.chunks_exact_mut(stride))
    {
        acc.fill(1i32 << (PRECISION_BITS - 1));
        for (y, &wgt) in k[..taps].iter().enumerate() {
            let row = &src[(y + ymin - row_offset) * stride..][..stride];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a = a.wrapping_add(i32::from(v).wrapping_mul(wgt));
            }
        }
        for (d, &a) in dst.iter_mut().zip(&acc) {
            *d = clip8(a);
        }
    }
    out
}

/// Resizes an RGB image to `width x height` as `PIL.Image.resize((width, height), filter)`
/// does in Pillow 13: two separable passes, horizontal first unless the height shrinks by
/// more than twice as many pixels as the width (then vertical first, which changes the
/// rounding of the intermediate image; Pillow 12 and earlier always went horizontal first).
///
/// # Panics
/// If either target dimension is zero.
pub fn resize(image: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    assert!(width > 0 && height > 0, "resize target must be non-empty");
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if (in_w, in_h) == (out_w, out_h) {
        return image.clone();
    }
    let src = image.as_raw();
    let need_horizontal = out_w != in_w;
    let need_vertical = out_h != in_h;
    let shrink_h = in_h as i64 - out_h as i64;
    let shrink_w = in_w as i64 - out_w as i64;
    let horizontal_first = !(shrink_h > 0 && shrink_h > shrink_w * 2);
    let pixels = if horizontal_first {
        let vertical = coefficients(in_h, out_h, filter);
        // Only the rows the vertical pass reads go through the horizontal pass.
        let first_row = vertical.bounds[0].0;
        let last_row = vertical.bounds[out_h - 1].0 + vertical.bounds[out_h - 1].1;
        let (rows, rows_w, offset) = if need_horizontal {
            let h = coefficients(in_w, out_w, filter);
            (
                horizontal_pass(src, in_w, first_row, last_row - first_row, &h),
                out_w,
                first_row,
            )
        } else {
            (src.clone(), in_w, 0)
        };
        if need_vertical {
            vertical_pass(&rows, rows_w, offset, &vertical)
        } else {
            rows
        }
    } else {
        let vertical = coefficients(in_h, out_h, filter);
        let rows = vertical_pass(src, in_w, 0, &vertical);
        if need_horizontal {
            horizontal_pass(&rows, in_w, 0, out_h, &coefficients(in_w, out_w, filter))
        } else {
            rows
        }
    };
    #[expect(
        clippy::expect_used,
        reason = "both passes keep width * height * 3 bytes"
    )]
    let image = RgbImage::from_raw(width, height, pixels).expect("buffer is width * height * 3");
    image
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_shapes() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 7]));
        assert_eq!(resize(&img, 7, 5, Filter::Bicubic), img);
        let down = resize(&img, 3, 2, Filter::Bicubic);
        assert_eq!(down.dimensions(), (3, 2));
        let up = resize(&img, 20, 9, Filter::Bicubic);
        assert_eq!(up.dimensions(), (20, 9));
        // A constant image stays constant under a normalized filter.
        let flat = RgbImage::from_pixel(9, 4, image::Rgb([200, 13, 77]));
        assert!(resize(&flat, 5, 11, Filter::Bicubic)
            .pixels()
            .all(|p| p.0 == [200, 13, 77]));
    }
}
