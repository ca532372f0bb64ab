//! A picture of a mask over its image: the foreground tinted, its boundary drawn solid.

use image::{Rgb, RgbImage};

use crate::error::{Error, Result};
use crate::rle::RleMask;

/// Tint colour of the foreground.
const TINT: [u8; 3] = [255, 48, 48];
/// Colour of the mask boundary.
const EDGE: [u8; 3] = [255, 255, 0];

/// Draws `mask` over `image` (same size): foreground blended at 45% with red, boundary
/// pixels (foreground with a background 4-neighbour) in yellow. Errors when the sizes differ.
pub fn draw_overlay(image: &RgbImage, mask: &RleMask) -> Result<RgbImage> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    if (image.width(), image.height()) != (mask.width(), mask.height()) {
        return Err(Error::SizeMismatch {
            a_height: image.height(),
            a_width: image.width(),
            b_height: mask.height(),
            b_width: mask.width(),
        });
    }
    let fg = mask.to_row_major()?;
    let at = |x: isize, y: isize| {
        x >= 0
            && y >= 0
            && (x as usize) < w
            && (y as usize) < h
            && fg[y as usize * w + x as usize] != 0
    };
    let mut out = image.clone();
    for (x, y, pixel) in out.enumerate_pixels_mut() {
        let (xi, yi) = (x as isize, y as isize);
        if !at(xi, yi) {
            continue;
        }
        let edge = !(at(xi - 1, yi) && at(xi + 1, yi) && at(xi, yi - 1) && at(xi, yi + 1));
        *pixel = if edge {
            Rgb(EDGE)
        } else {
            let blend =
                |c: u8, t: u8| ((f32::from(c) * 0.55) + (f32::from(t) * 0.45)).round() as u8;
            Rgb([
                blend(pixel[0], TINT[0]),
                blend(pixel[1], TINT[1]),
                blend(pixel[2], TINT[2]),
            ])
        };
    }
    Ok(out)
}
