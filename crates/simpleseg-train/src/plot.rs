//! The training curve PNG (`OUT/training/loss.png`): logged values against the step, with
//! labelled axes, drawn with the `image` crate and a built-in 3x5 pixel font so that no font
//! file is needed.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::Result;

const WIDTH: u32 = 800;
const HEIGHT: u32 = 400;
const LEFT: u32 = 70;
const RIGHT: u32 = 20;
const TOP: u32 = 34;
const BOTTOM: u32 = 40;
/// Each font pixel becomes a SCALE x SCALE block.
const SCALE: u32 = 2;

const GRID: [u8; 3] = [230, 230, 230];
const AXIS: [u8; 3] = [150, 150, 150];
const TEXT: [u8; 3] = [60, 60, 60];
const RAW: [u8; 3] = [170, 200, 240];
const MEAN: [u8; 3] = [20, 60, 160];

/// Draws `points` (step, value) as a PNG at `path`: the logged values as a light line, their
/// trailing moving mean (over 1/25 of the points) as a dark line, the y axis labelled at five
/// levels, the x axis at its first, middle and last step, and `name` as the title.
pub fn plot_curve(path: &Path, name: &str, points: &[(f64, f64)]) -> Result<()> {
    let mut canvas = Canvas(RgbImage::from_pixel(WIDTH, HEIGHT, Rgb([255, 255, 255])));
    let title = format!("{name}   light: logged values, dark: moving mean");
    canvas.text(LEFT as i64, 10, &title, TEXT);
    let (x_lo, x_hi) = match (points.first(), points.last()) {
        (Some(a), Some(b)) => (a.0, b.0.max(a.0 + 1.0)),
        _ => (0.0, 1.0),
    };
    let finite = points.iter().map(|p| p.1).filter(|v| v.is_finite());
    let lo = finite.clone().fold(f64::INFINITY, f64::min).min(0.0);
    let hi = finite.fold(f64::NEG_INFINITY, f64::max).max(lo + 1e-9);
    let (left, right, top, bottom) = (
        LEFT as f64,
        (WIDTH - RIGHT) as f64,
        TOP as f64,
        (HEIGHT - BOTTOM) as f64,
    );
    let px = |x: f64| left + (x - x_lo) / (x_hi - x_lo) * (right - left);
    let py = |y: f64| bottom - (y - lo) / (hi - lo) * (bottom - top);
    for k in 0..=4 {
        let value = lo + (hi - lo) * k as f64 / 4.0;
        let y = py(value);
        canvas.line((left, y), (right, y), if k == 0 { AXIS } else { GRID });
        let label = tick_label(value);
        let x = LEFT as i64 - 6 - text_width(&label) as i64;
        canvas.text(x, y as i64 - (5 * SCALE / 2) as i64, &label, TEXT);
    }
    canvas.line((left, top), (left, bottom), AXIS);
    for x in [x_lo, (x_lo + x_hi) / 2.0, x_hi] {
        let label = tick_label(x.round());
        let at = px(x) as i64 - text_width(&label) as i64 / 2;
        canvas.line((px(x), bottom), (px(x), bottom + 4.0), AXIS);
        canvas.text(at, (HEIGHT - BOTTOM + 8) as i64, &label, TEXT);
    }
    let step = "step";
    canvas.text(
        (right as i64) - text_width(step) as i64,
        (HEIGHT - BOTTOM + 22) as i64,
        step,
        TEXT,
    );
    let drawable: Vec<(f64, f64)> = points.iter().copied().filter(|p| p.1.is_finite()).collect();
    for pair in drawable.windows(2) {
        canvas.line(
            (px(pair[0].0), py(pair[0].1)),
            (px(pair[1].0), py(pair[1].1)),
            RAW,
        );
    }
    let window = (drawable.len() / 25).max(1);
    let means: Vec<(f64, f64)> = (0..drawable.len())
        .map(|i| {
            let from = (i + 1).saturating_sub(window);
            let span = &drawable[from..=i];
            let mean = span.iter().map(|p| p.1).sum::<f64>() / span.len() as f64;
            (px(drawable[i].0), py(mean))
        })
        .collect();
    for pair in means.windows(2) {
        canvas.line(pair[0], pair[1], MEAN);
    }
    simpleseg_core::io::write_atomic(path, |w| {
        canvas
            .0
            .write_to(w, image::ImageFormat::Png)
            .map_err(|e| e.to_string())
    })?;
    Ok(())
}

/// A short label for an axis value: whole numbers as integers, others with three significant
/// digits and no trailing zeros.
fn tick_label(value: f64) -> String {
    if value == value.trunc() && value.abs() < 1e9 {
        return format!("{value:.0}");
    }
    let magnitude = value.abs().log10().floor() as i32;
    let decimals = (2 - magnitude).clamp(0, 6) as usize;
    let text = format!("{value:.decimals$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    };
    if text == "-0" {
        "0".into()
    } else {
        text
    }
}

fn text_width(text: &str) -> u32 {
    text.chars().count() as u32 * 4 * SCALE
}

struct Canvas(RgbImage);

impl Canvas {
    fn set(&mut self, x: i64, y: i64, colour: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as u32) < WIDTH && (y as u32) < HEIGHT {
            self.0.put_pixel(x as u32, y as u32, Rgb(colour));
        }
    }

    fn line(&mut self, a: (f64, f64), b: (f64, f64), colour: [u8; 3]) {
        let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()) as usize).max(1);
        for k in 0..=n {
            let t = k as f64 / n as f64;
            let (x, y) = (a.0 + t * (b.0 - a.0), a.1 + t * (b.1 - a.1));
            self.set(x.round() as i64, y.round() as i64, colour);
        }
    }

    /// Writes `text` with its top-left corner at (x, y); characters the font lacks are blank.
    fn text(&mut self, x: i64, y: i64, text: &str, colour: [u8; 3]) {
        for (i, c) in text.chars().enumerate() {
            let Some(rows) = glyph(c) else { continue };
            let left = x + (i as u32 * 4 * SCALE) as i64;
            for (row, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits & (0b100 >> col) != 0 {
                        for dy in 0..SCALE {
                            for dx in 0..SCALE {
                                self.set(
                                    left + (col * SCALE + dx) as i64,
                                    y + (row as u32 * SCALE + dy) as i64,
                                    colour,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Rows (top to bottom) of a 3x5 glyph, the high bit on the left.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c.to_ascii_lowercase() {
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b111, 0b001, 0b111, 0b100, 0b111],
        '3' => [0b111, 0b001, 0b111, 0b001, 0b111],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b111, 0b001, 0b111],
        '6' => [0b111, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b001, 0b001, 0b001],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b111],
        '.' => [0b000, 0b000, 0b000, 0b000, 0b010],
        ',' => [0b000, 0b000, 0b000, 0b010, 0b100],
        ':' => [0b000, 0b010, 0b000, 0b010, 0b000],
        '-' => [0b000, 0b000, 0b111, 0b000, 0b000],
        '(' => [0b010, 0b100, 0b100, 0b100, 0b010],
        ')' => [0b010, 0b001, 0b001, 0b001, 0b010],
        'a' => [0b000, 0b011, 0b101, 0b101, 0b011],
        'b' => [0b100, 0b110, 0b101, 0b101, 0b110],
        'c' => [0b000, 0b011, 0b100, 0b100, 0b011],
        'd' => [0b001, 0b011, 0b101, 0b101, 0b011],
        'e' => [0b000, 0b011, 0b111, 0b100, 0b011],
        'f' => [0b011, 0b010, 0b111, 0b010, 0b010],
        'g' => [0b000, 0b011, 0b101, 0b011, 0b110],
        'h' => [0b100, 0b110, 0b101, 0b101, 0b101],
        'i' => [0b010, 0b000, 0b010, 0b010, 0b010],
        'k' => [0b100, 0b101, 0b110, 0b101, 0b101],
        'l' => [0b110, 0b010, 0b010, 0b010, 0b111],
        'm' => [0b000, 0b111, 0b111, 0b101, 0b101],
        'n' => [0b000, 0b110, 0b101, 0b101, 0b101],
        'o' => [0b000, 0b010, 0b101, 0b101, 0b010],
        'p' => [0b000, 0b110, 0b101, 0b110, 0b100],
        'r' => [0b000, 0b101, 0b110, 0b100, 0b100],
        's' => [0b000, 0b011, 0b110, 0b011, 0b110],
        't' => [0b010, 0b111, 0b010, 0b010, 0b011],
        'u' => [0b000, 0b101, 0b101, 0b101, 0b011],
        'v' => [0b000, 0b101, 0b101, 0b101, 0b010],
        'w' => [0b000, 0b101, 0b101, 0b111, 0b111],
        'x' => [0b000, 0b101, 0b010, 0b010, 0b101],
        'y' => [0b000, 0b101, 0b101, 0b010, 0b100],
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh scratch folder for one test.
    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("simpleseg-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn tick_labels_are_short_and_exact_enough() {
        assert_eq!(tick_label(12000.0), "12000");
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(0.71234), "0.712");
        assert_eq!(tick_label(4.95), "4.95");
        assert_eq!(tick_label(1.25), "1.25");
        assert_eq!(tick_label(-0.0001234), "-0.000123");
        assert_eq!(tick_label(0.5), "0.5");
    }

    #[test]
    fn curve_png_has_labels_and_both_lines() {
        let dir = scratch("plot");
        let path = dir.join("loss.png");
        let points: Vec<(f64, f64)> = (0..100)
            .map(|i| {
                (
                    i as f64 * 10.0,
                    3.0 / (1.0 + i as f64) + 0.1 * (i % 3) as f64,
                )
            })
            .collect();
        plot_curve(&path, "loss", &points).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        let count = |colour: [u8; 3], x: std::ops::Range<u32>, y: std::ops::Range<u32>| {
            x.flat_map(|x| y.clone().map(move |y| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x, y).0 == colour)
                .count()
        };
        // Tick labels left of the y axis, step labels below the x axis, the title on top.
        assert!(count(TEXT, 0..LEFT, TOP..HEIGHT - BOTTOM) > 50);
        assert!(count(TEXT, LEFT..WIDTH, HEIGHT - BOTTOM + 4..HEIGHT) > 50);
        assert!(count(TEXT, 0..WIDTH, 0..TOP) > 100);
        assert!(count(RAW, LEFT..WIDTH, TOP..HEIGHT - BOTTOM) > 100);
        assert!(count(MEAN, LEFT..WIDTH, TOP..HEIGHT - BOTTOM) > 100);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn empty_and_non_finite_series_still_draw() {
        let dir = scratch("plot-nan");
        let path = dir.join("loss.png");
        plot_curve(&path, "loss", &[]).unwrap();
        plot_curve(
            &path,
            "reward",
            &[(1.0, f64::NAN), (2.0, 0.5), (3.0, f64::INFINITY)],
        )
        .unwrap();
        assert!(image::open(&path).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
