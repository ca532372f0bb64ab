//! The segmentation request and result every front end shares (`segment`, the server's
//! `/v1/segment`, the Python bindings): what to ask the model for an object given by a
//! referring expression, a point or a box, and what its answer means — the polygons in
//! normalized and pixel coordinates and the mask they cover (their union, exactly as `decode`
//! makes it).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::parse::{parse_answer, CoordMode, ParseMode, ParsedAnswer};
use crate::rle::RleMask;
use crate::templates::{box_prompt, fill_prompt, point_prompt, DEFAULT_PROMPT};

/// How the object is named.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// A referring expression, e.g. "the man in red".
    Query(String),
    /// A point on the object, normalized `[x, y]`.
    Point([f64; 2]),
    /// A box around the object, normalized `[x1, y1, x2, y2]`.
    Box([f64; 4]),
    /// A whole question, asked as written (evaluation and training data carry their own).
    Question(String),
}

impl Target {
    /// The question for the model; `template` (with `{query}`) applies to expressions. The
    /// prompt may be as long as the text limit ([`crate::limits::Limits::max_text_bytes`]).
    pub fn prompt(&self, template: Option<&str>) -> Result<String> {
        let limit = crate::limits::Limit::TextBytes.value();
        self.prompt_within(template, usize::try_from(limit).unwrap_or(usize::MAX))
    }

    /// [`Target::prompt`] refusing a prompt of more than `max_bytes` bytes, before it is
    /// built: a short template that repeats `{query}` can ask for a very long one.
    pub fn prompt_within(&self, template: Option<&str>, max_bytes: usize) -> Result<String> {
        if let Target::Query(q) = self {
            let t = template.unwrap_or(DEFAULT_PROMPT);
            let uses = t.matches("{query}").count();
            let len =
                (t.len() - uses * "{query}".len()).saturating_add(uses.saturating_mul(q.len()));
            if len > max_bytes {
                return Err(Error::Invalid(format!(
                    "the prompt template makes a prompt of {len} bytes (it uses {{query}} {uses} times); at most {max_bytes} are allowed"
                )));
            }
        }
        let in_unit = |v: &[f64]| v.iter().all(|x| x.is_finite() && (0.0..=1.0).contains(x));
        match self {
            Target::Question(q) => {
                if q.trim().is_empty() {
                    return Err(Error::Invalid("the question is empty".into()));
                }
                if q.len() > max_bytes {
                    return Err(Error::Invalid(format!(
                        "the question has {} bytes; at most {max_bytes} are allowed",
                        q.len()
                    )));
                }
                Ok(q.clone())
            }
            Target::Query(q) => {
                if q.trim().is_empty() {
                    return Err(Error::Invalid("the query is empty".into()));
                }
                Ok(fill_prompt(template.unwrap_or(DEFAULT_PROMPT), q))
            }
            Target::Point(p) => {
                if !in_unit(p) {
                    return Err(Error::Invalid(format!(
                        "point {p:?} is not normalized (numbers from 0 to 1)"
                    )));
                }
                Ok(point_prompt(*p))
            }
            Target::Box(b) => {
                if !in_unit(b) || b[0] > b[2] || b[1] > b[3] {
                    return Err(Error::Invalid(format!(
                        "box {b:?} is not a normalized [x1, y1, x2, y2] with x1 <= x2, y1 <= y2"
                    )));
                }
                Ok(box_prompt(*b))
            }
        }
    }
}

/// A decoded answer.
#[derive(Clone, Debug)]
pub struct Segmentation {
    /// The polygons as the answer gives them (in `coords`).
    pub polygons: Vec<Vec<[f64; 2]>>,
    /// The polygons in normalized coordinates and in pixels of the image.
    pub polygons_normalized: Vec<Vec<[f64; 2]>>,
    pub polygons_pixels: Vec<Vec<[f64; 2]>>,
    /// The mask: the union of the polygons, as COCO RLE.
    pub mask: RleMask,
    /// The mask's extent `[x, y, width, height]` and pixel count.
    pub bbox: [f64; 4],
    pub area: u64,
    pub mode: ParseMode,
    pub coords: CoordMode,
    /// What the parser could not use.
    pub warnings: Vec<String>,
}

impl Segmentation {
    /// Decodes `answer` for an image of `width x height`.
    pub fn from_answer(
        answer: &str,
        width: u32,
        height: u32,
        mode: ParseMode,
        coords: CoordMode,
    ) -> Result<Self> {
        Segmentation::from_parsed(&parse_answer(answer, mode), width, height, coords)
    }

    /// The polygons of a parsed answer and their mask on an image of `width x height`.
    pub fn from_parsed(
        parsed: &ParsedAnswer,
        width: u32,
        height: u32,
        coords: CoordMode,
    ) -> Result<Self> {
        let mode = parsed.mode;
        let mask = parsed.mask(width, height, coords)?;
        let (w, h) = (f64::from(width), f64::from(height));
        let polygons: Vec<Vec<[f64; 2]>> =
            parsed.polygons.iter().map(|p| p.points.clone()).collect();
        let scale = |f: &dyn Fn([f64; 2]) -> [f64; 2]| -> Vec<Vec<[f64; 2]>> {
            polygons
                .iter()
                .map(|p| p.iter().map(|&pt| f(pt)).collect())
                .collect()
        };
        let (normalized, pixels) = match coords {
            CoordMode::Normalized => (polygons.clone(), scale(&|[x, y]| [x * w, y * h])),
            CoordMode::Pixels => (scale(&|[x, y]| [x / w, y / h]), polygons.clone()),
        };
        Ok(Segmentation {
            polygons,
            polygons_normalized: normalized,
            polygons_pixels: pixels,
            bbox: mask.bbox(),
            area: mask.area(),
            mask,
            mode,
            coords,
            warnings: parsed.warnings.iter().map(|w| w.message.clone()).collect(),
        })
    }

    /// The outline as SVG path data in pixels of the image, one closed subpath per polygon
    /// (`M x,y L x,y ... Z`; coordinates to 3 decimals): what an editor imports.
    pub fn svg_path(&self) -> String {
        self.polygons_pixels
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| {
                let points: Vec<String> = p
                    .iter()
                    .map(|&[x, y]| format!("{},{}", svg_number(x), svg_number(y)))
                    .collect();
                format!("M {} Z", points.join(" L "))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// A standalone SVG document of the image's size with the outline: one filled path per
    /// polygon, so that overlapping polygons add up as the mask's union does.
    pub fn svg_document(&self) -> String {
        let (w, h) = (self.mask.width(), self.mask.height());
        let mut doc = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\n"
        );
        for polygon in self.polygons_pixels.iter().filter(|p| !p.is_empty()) {
            let single = Segmentation {
                polygons_pixels: vec![polygon.clone()],
                ..self.clone()
            };
            doc.push_str(&format!(
                "  <path d=\"{}\" fill=\"#ff3b30\" fill-opacity=\"0.5\" stroke=\"#ff3b30\"/>\n",
                single.svg_path()
            ));
        }
        doc.push_str("</svg>\n");
        doc
    }

    /// The result as JSON: polygons (normalized and pixel), `svg` (the outline as SVG path
    /// data in pixels), `rle` (`{size, counts}`), bbox, area, mode, coords, warnings.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "polygons": self.polygons_normalized,
            "polygons_pixels": self.polygons_pixels,
            "svg": self.svg_path(),
            "rle": self.mask.to_json_value(),
            "bbox": self.bbox,
            "area": self.area,
            "width": self.mask.width(),
            "height": self.mask.height(),
            "mode": self.mode,
            "coords": self.coords,
            "warnings": self.warnings,
        })
    }
}

/// A coordinate with at most 3 decimals and no trailing zeros (`12`, `12.5`, `12.346`).
fn svg_number(v: f64) -> String {
    let text = format!("{v:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".to_string()
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_make_the_data_script_questions() {
        assert_eq!(
            Target::Point([0.621, 0.592]).prompt(None).unwrap(),
            "Show me the contour of the object at point [0.621, 0.592]."
        );
        assert_eq!(
            Target::Box([0.372, 0.162, 0.784, 0.605]).prompt(None).unwrap(),
            "Give the polygon vertices of the stuff within the box region [0.372, 0.162, 0.784, 0.605]."
        );
        assert!(Target::Box([0.5, 0.1, 0.2, 0.3]).prompt(None).is_err());
        assert!(Target::Point([1.5, 0.1]).prompt(None).is_err());
        assert!(Target::Query(" ".into()).prompt(None).is_err());
        let repeated = "{query}".repeat(1000);
        let err = Target::Query("a long query".into())
            .prompt_within(Some(&repeated), 10_000)
            .unwrap_err();
        assert!(err.to_string().contains("12000 bytes"), "{err}");
        let fits = Target::Query("q".into()).prompt_within(Some(&repeated), 1000);
        assert_eq!(fits.unwrap(), "q".repeat(1000));
    }

    #[test]
    fn the_svg_outline_draws_the_same_mask() {
        let answer = "[[[0.1, 0.05], [0.6, 0.1], [0.45, 0.7]], [[0.7, 0.7], [0.95, 0.72], [0.8, 0.99], [0.66, 0.9]]]";
        let s =
            Segmentation::from_answer(answer, 40, 30, ParseMode::Official, CoordMode::Normalized)
                .unwrap();
        let path = s.svg_path();
        assert!(
            path.starts_with("M 4,1.5 L 24,3 L 18,21 Z M 28,21"),
            "{path}"
        );
        // The path's subpaths, read back as an answer in pixels, rasterize to the same mask.
        let polygons: Vec<String> = path
            .split(" Z")
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                let points: Vec<String> = p
                    .trim()
                    .trim_start_matches("M ")
                    .split(" L ")
                    .map(|xy| format!("[{xy}]"))
                    .collect();
                format!("[{}]", points.join(", "))
            })
            .collect();
        let back = format!("[{}]", polygons.join(", "));
        let again =
            Segmentation::from_answer(&back, 40, 30, ParseMode::Robust, CoordMode::Pixels).unwrap();
        assert_eq!(again.mask, s.mask);
        let doc = s.svg_document();
        assert!(doc.contains("viewBox=\"0 0 40 30\""));
        assert_eq!(doc.matches("<path ").count(), 2);
    }

    #[test]
    fn answer_to_mask_and_pixels() {
        let s = Segmentation::from_answer(
            "[[[0.0, 0.0], [0.5, 0.0], [0.5, 0.5], [0.0, 0.5]]].",
            10,
            20,
            ParseMode::Official,
            CoordMode::Normalized,
        )
        .unwrap();
        assert_eq!(s.polygons_pixels[0][2], [5.0, 10.0]);
        let decoded = parse_answer(
            "[[[0.0, 0.0], [0.5, 0.0], [0.5, 0.5], [0.0, 0.5]]].",
            ParseMode::Official,
        )
        .mask(10, 20, CoordMode::Normalized)
        .unwrap();
        assert_eq!(s.mask, decoded);
        assert_eq!(s.area, decoded.area());
    }
}
