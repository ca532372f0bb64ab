//! Model answers to polygons, boxes and points.
//!
//! Two modes:
//!
//! - [`ParseMode::Official`] finds every polygon exactly where the official SimpleSeg decoder's
//!   regular expression finds it (number `(?:[1-9]\d*\.\d+|0\.\d+|\d+)`, point `[n, n]`,
//!   polygon `[pt, pt, ...]`), so scores are comparable with published numbers. Where the
//!   official code raises (a polygon of 1 or 2 points, which pycocotools refuses; a match
//!   that `json.loads` rejects), the polygon is skipped with a warning; an answer with no
//!   polygon gives an empty mask with a warning.
//! - [`ParseMode::Robust`] also accepts signed numbers and exponents, and closes an
//!   unterminated last polygon (truncated output) from its complete points if it has at
//!   least 3.
//!
//! In both modes, boxes `[x1, y1, x2, y2]` and points `[x, y]` that stand outside polygons,
//! `\boxed{...}` contents and fenced code blocks are reported too. A polygon's vertex is not
//! a point. Parsing never fails and never panics: anything it cannot use becomes a warning.

use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::raster::rasterize_polygons;
use crate::rle::RleMask;

/// How strictly answers are read. See the module documentation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParseMode {
    /// Exactly what the official decoder accepts; the default wherever results are compared
    /// with published numbers.
    #[default]
    Official,
    /// Also signed numbers, exponents and an unterminated last polygon.
    Robust,
}

/// What the numbers in an answer are measured in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CoordMode {
    /// Fractions of the image width and height (SimpleSeg's convention).
    #[default]
    Normalized,
    /// Pixels of the original image.
    Pixels,
}

macro_rules! name_enum {
    ($t:ty, $what:literal, $($variant:ident => $name:literal),+) => {
        impl $t {
            /// The lowercase name used on command lines and in result files.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $name),+ }
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s {
                    $($name => Ok(Self::$variant),)+
                    _ => Err(format!(
                        concat!("unknown ", $what, " '{}' (expected one of: {})"),
                        s,
                        [$($name),+].join(", ")
                    )),
                }
            }
        }
    };
}
name_enum!(ParseMode, "parse mode", Official => "official", Robust => "robust");
name_enum!(CoordMode, "coordinate mode", Normalized => "normalized", Pixels => "pixels");

/// One polygon found in an answer, in the answer's own coordinates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Polygon {
    /// The vertices `[x, y]`, in order.
    pub points: Vec<[f64; 2]>,
    /// Byte range of the polygon's text in the answer.
    pub span: [usize; 2],
    /// False for an unterminated last polygon that robust mode closed.
    pub terminated: bool,
}

/// Why something in an answer was not used, or was used in a way worth knowing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WarningKind {
    /// A polygon of 1 or 2 points (pycocotools raises on it); skipped.
    TooFewPoints,
    /// A polygon the official decoder's `json.loads` raises on; skipped in official mode.
    NotJson,
    /// A number too large to represent; the polygon is skipped.
    NonFinite,
    /// The answer ends inside a polygon. Official mode drops it, as the official decoder
    /// does; robust mode closes it when it has at least 3 complete points.
    Unterminated,
    /// No usable polygon: the mask is empty.
    NoPolygon,
}

/// A warning with a message for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warning {
    pub kind: WarningKind,
    pub message: String,
}

/// Everything found in one answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ParsedAnswer {
    /// The mode the answer was read in.
    pub mode: ParseMode,
    /// Polygons that make up the mask, in order of appearance.
    pub polygons: Vec<Polygon>,
    /// Boxes `[x1, y1, x2, y2]` outside polygons.
    pub boxes: Vec<[f64; 4]>,
    /// Points `[x, y]` outside polygons and boxes.
    pub points: Vec<[f64; 2]>,
    /// Contents of `\boxed{...}`.
    pub boxed: Vec<String>,
    /// Contents of fenced code blocks.
    pub blocks: Vec<String>,
    pub warnings: Vec<Warning>,
}

/// Python's `\s` for `str` patterns (`str.isspace`): Rust's `\s` lacks U+001C..U+001F.
const WS: &str = r"[\t\n\x0B\x0C\r\x1C-\x1F \x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}]";
/// The official decoder's number (Python's `\d` is any Unicode decimal digit, as Rust's is).
const OFFICIAL_NUMBER: &str = r"(?:[1-9]\d*\.\d+|0\.\d+|\d+)";
/// Robust mode's number: optional sign, optional fraction, optional exponent.
const ROBUST_NUMBER: &str = r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?";

struct Grammar {
    mode: ParseMode,
    point: Regex,
    bbox: Regex,
    polygon: Regex,
    /// An unterminated polygon running to the end of the text, possibly ending in a partial
    /// point.
    open_polygon: Regex,
}

impl Grammar {
    fn new(mode: ParseMode) -> Grammar {
        let num = match mode {
            ParseMode::Official => OFFICIAL_NUMBER,
            ParseMode::Robust => ROBUST_NUMBER,
        };
        let point = format!(r"\[{WS}*{num}{WS}*,{WS}*{num}{WS}*\]");
        let bbox = format!(r"\[{WS}*{num}{WS}*,{WS}*{num}{WS}*,{WS}*{num}{WS}*,{WS}*{num}{WS}*\]");
        let polygon = format!(r"\[{WS}*{point}(?:{WS}*,{WS}*{point})*{WS}*\]");
        let open_polygon =
            format!(r"\[{WS}*{point}(?:{WS}*,{WS}*{point})*{WS}*,?{WS}*(?:\[[^\[\]]*)?\z");
        #[expect(clippy::expect_used, reason = "the grammar is fixed; tests compile it")]
        let compile = |p: &str| Regex::new(p).expect("the answer grammar is a valid regex");
        Grammar {
            mode,
            point: compile(&point),
            bbox: compile(&bbox),
            polygon: compile(&polygon),
            open_polygon: compile(&open_polygon),
        }
    }

    fn for_mode(mode: ParseMode) -> &'static Grammar {
        static OFFICIAL: LazyLock<Grammar> = LazyLock::new(|| Grammar::new(ParseMode::Official));
        static ROBUST: LazyLock<Grammar> = LazyLock::new(|| Grammar::new(ParseMode::Robust));
        match mode {
            ParseMode::Official => &OFFICIAL,
            ParseMode::Robust => &ROBUST,
        }
    }

    /// The numbers in a span this grammar matched, in order. Inside such a span every
    /// maximal run of number characters is one number, so a byte scan finds them; `None` if
    /// one does not parse (digits that are not ASCII).
    fn numbers(&self, text: &str) -> Option<Vec<f64>> {
        let is_number_byte = |b: u8| match self.mode {
            ParseMode::Official => b.is_ascii_digit() || b == b'.',
            ParseMode::Robust => {
                b.is_ascii_digit() || matches!(b, b'.' | b'+' | b'-' | b'e' | b'E')
            }
        };
        if !text.is_ascii() {
            return None;
        }
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(bytes.len() / 6);
        let mut i = 0;
        while i < bytes.len() {
            if is_number_byte(bytes[i]) {
                let start = i;
                while i < bytes.len() && is_number_byte(bytes[i]) {
                    i += 1;
                }
                out.push(text[start..i].parse::<f64>().ok()?);
            } else {
                i += 1;
            }
        }
        Some(out)
    }
}

#[expect(clippy::expect_used, reason = "a fixed pattern; tests compile it")]
static BOXED: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\\boxed\{([^}]*)\}").expect("valid regex"));
#[expect(clippy::expect_used, reason = "a fixed pattern; tests compile it")]
static BLOCK: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?ms)^```[A-Za-z0-9_+.-]*\r?\n(.*?)\r?\n```\r?$").expect("valid regex")
});

/// Why `json.loads` (which the official decoder runs on every polygon match) rejects a
/// polygon match, if it does: whitespace JSON does not allow, digits that are not ASCII, or a
/// number with a leading zero.
fn json_rejects(text: &str) -> Option<&'static str> {
    if !text.is_ascii() {
        // Inside a match anything beyond ASCII is Unicode whitespace or a Unicode digit.
        return Some(if text.chars().any(char::is_whitespace) {
            "whitespace that JSON does not allow"
        } else {
            "digits that are not ASCII"
        });
    }
    let bytes = text.as_bytes();
    if bytes
        .iter()
        .any(|&b| matches!(b, 0x0B | 0x0C | 0x1C..=0x1F))
    {
        return Some("whitespace that JSON does not allow");
    }
    // A '0' that starts a number and is followed by a digit.
    let leading_zero = bytes.windows(2).enumerate().any(|(i, w)| {
        w[0] == b'0'
            && w[1].is_ascii_digit()
            && (i == 0 || !(bytes[i - 1].is_ascii_digit() || bytes[i - 1] == b'.'))
    });
    leading_zero.then_some("a number with a leading zero")
}

fn to_points(numbers: &[f64]) -> Vec<[f64; 2]> {
    numbers.chunks_exact(2).map(|p| [p[0], p[1]]).collect()
}

/// Parses a model answer. Never fails: what cannot be used is reported in
/// [`ParsedAnswer::warnings`].
pub fn parse_answer(text: &str, mode: ParseMode) -> ParsedAnswer {
    let grammar = Grammar::for_mode(mode);
    let mut out = ParsedAnswer {
        mode,
        ..ParsedAnswer::default()
    };
    // Byte ranges that belong to polygons, used or not: their brackets are not points.
    let mut polygon_spans: Vec<[usize; 2]> = Vec::new();
    let mut warn = |kind, message: String| out.warnings.push(Warning { kind, message });

    let mut polygons = Vec::new();
    for m in grammar.polygon.find_iter(text) {
        let span = [m.start(), m.end()];
        polygon_spans.push(span);
        let at = format!("polygon at bytes {}..{}", span[0], span[1]);
        if mode == ParseMode::Official {
            if let Some(reason) = json_rejects(m.as_str()) {
                warn(
                    WarningKind::NotJson,
                    format!("{at} has {reason}; the official decoder raises on it; skipped"),
                );
                continue;
            }
        }
        let Some(numbers) = grammar.numbers(m.as_str()) else {
            warn(
                WarningKind::NotJson,
                format!("{at} has a number that does not parse; skipped"),
            );
            continue;
        };
        if let Some(polygon) = checked_polygon(&numbers, span, true, &at, &mut warn) {
            polygons.push(polygon);
        }
    }

    // An unterminated polygon at the very end (truncated output).
    let tail_start = polygon_spans.last().map_or(0, |s| s[1]);
    if let Some(m) = grammar.open_polygon.find(&text[tail_start..]) {
        let span = [tail_start + m.start(), tail_start + m.end()];
        polygon_spans.push(span);
        // Only complete points count; a trailing partial point is dropped.
        let complete: Vec<_> = grammar.point.find_iter(m.as_str()).collect();
        let numbers = complete
            .iter()
            .map(|p| grammar.numbers(p.as_str()))
            .collect::<Option<Vec<_>>>()
            .map(|v| v.concat());
        let at = format!("unterminated polygon at bytes {}..{}", span[0], span[1]);
        match (mode, numbers) {
            (ParseMode::Official, _) => warn(
                WarningKind::Unterminated,
                format!("{at} (the answer was cut off?); the official decoder drops it"),
            ),
            (ParseMode::Robust, Some(numbers)) => {
                if let Some(polygon) = checked_polygon(&numbers, span, false, &at, &mut warn) {
                    warn(
                        WarningKind::Unterminated,
                        format!(
                            "closed the {at} from its {} complete points",
                            polygon.points.len()
                        ),
                    );
                    polygons.push(polygon);
                }
            }
            (ParseMode::Robust, None) => warn(
                WarningKind::NonFinite,
                format!("{at} has a number that does not parse; skipped"),
            ),
        }
    }
    out.polygons = polygons;

    // Boxes and points stand outside polygons. A match of either holds one '[' and one ']',
    // so none can straddle a polygon's edge: scanning the gaps between polygons finds exactly
    // the matches of a whole-text scan that overlap no polygon.
    polygon_spans.sort_unstable();
    let mut gap_start = 0;
    for span in polygon_spans
        .iter()
        .copied()
        .chain([[text.len(), text.len()]])
    {
        if gap_start < span[0] {
            let gap = &text[gap_start..span[0]];
            let finite = |n: &Vec<f64>| n.iter().all(|v| v.is_finite());
            for m in grammar.bbox.find_iter(gap) {
                if let Some(n) = grammar.numbers(m.as_str()).filter(finite) {
                    out.boxes.push([n[0], n[1], n[2], n[3]]);
                }
            }
            for m in grammar.point.find_iter(gap) {
                if let Some(n) = grammar.numbers(m.as_str()).filter(finite) {
                    out.points.push([n[0], n[1]]);
                }
            }
        }
        gap_start = gap_start.max(span[1]);
    }
    out.boxed = BOXED
        .captures_iter(text)
        .map(|c| c[1].to_string())
        .collect();
    out.blocks = BLOCK
        .captures_iter(text)
        .map(|c| c[1].to_string())
        .collect();
    if out.polygons.is_empty() {
        out.warnings.push(Warning {
            kind: WarningKind::NoPolygon,
            message: "no usable polygon in the answer; the mask is empty".into(),
        });
    }
    out
}

/// A polygon from its flat numbers, or a warning if it cannot be rasterized.
fn checked_polygon(
    numbers: &[f64],
    span: [usize; 2],
    terminated: bool,
    at: &str,
    warn: &mut impl FnMut(WarningKind, String),
) -> Option<Polygon> {
    let points = to_points(numbers);
    if points.len() < 3 {
        warn(
            WarningKind::TooFewPoints,
            format!(
                "{at} has {} point{}; a polygon needs at least 3 (pycocotools raises); skipped",
                points.len(),
                if points.len() == 1 { "" } else { "s" }
            ),
        );
        return None;
    }
    if numbers.iter().any(|v| !v.is_finite()) {
        warn(
            WarningKind::NonFinite,
            format!("{at} has a number too large to represent; skipped"),
        );
        return None;
    }
    Some(Polygon {
        points,
        span,
        terminated,
    })
}

impl ParsedAnswer {
    /// What was found, as JSON: mode, polygons (point lists), boxes, points, boxed contents,
    /// code blocks and warnings (the image-independent fields of `simpleseg decode --json`).
    pub fn to_json_value(&self) -> serde_json::Value {
        serde_json::json!({
            "mode": self.mode,
            "polygons": self.polygons.iter().map(|p| &p.points).collect::<Vec<_>>(),
            "boxes": self.boxes,
            "points": self.points,
            "boxed": self.boxed,
            "blocks": self.blocks,
            "warnings": self.warnings,
        })
    }

    /// The polygons in pixel coordinates of a `width x height` image: normalized coordinates
    /// are multiplied by `(width, height)` as the official decoder does (no clipping).
    pub fn pixel_polygons(&self, width: u32, height: u32, coords: CoordMode) -> Vec<Vec<[f64; 2]>> {
        self.polygons
            .iter()
            .map(|p| match coords {
                CoordMode::Pixels => p.points.clone(),
                CoordMode::Normalized => p
                    .points
                    .iter()
                    .map(|&[x, y]| [x * f64::from(width), y * f64::from(height)])
                    .collect(),
            })
            .collect()
    }

    /// The union mask of all polygons, rasterized exactly as the official decoder does.
    pub fn mask(&self, width: u32, height: u32, coords: CoordMode) -> Result<RleMask> {
        let polygons = self.pixel_polygons(width, height, coords);
        rasterize_polygons(polygons.iter().map(Vec::as_slice), height, width)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(a: &ParsedAnswer) -> Vec<WarningKind> {
        a.warnings.iter().map(|w| w.kind).collect()
    }

    #[test]
    fn finds_nested_polygons() {
        let a = parse_answer(
            "[[[0.1, 0.2], [0.3, 0.4], [0.5, 0.1]], [[0.6, 0.6],[0.7,0.6],[0.7,0.7]]].",
            ParseMode::Official,
        );
        assert_eq!(a.polygons.len(), 2);
        assert_eq!(
            a.polygons[0].points,
            vec![[0.1, 0.2], [0.3, 0.4], [0.5, 0.1]]
        );
        assert_eq!(a.polygons[1].points[2], [0.7, 0.7]);
        assert!(a.warnings.is_empty());
        assert!(a.points.is_empty(), "vertices are not points");
    }

    #[test]
    fn official_skips_short_polygons_and_rejects_signs() {
        let a = parse_answer(
            "[[0.1, 0.2]] and [[0.1, 0.2], [0.3, 0.4]]",
            ParseMode::Official,
        );
        assert!(a.polygons.is_empty());
        assert_eq!(
            kinds(&a),
            vec![
                WarningKind::TooFewPoints,
                WarningKind::TooFewPoints,
                WarningKind::NoPolygon
            ]
        );
        let a = parse_answer("[[-0.1, 0.2], [0.3, 0.4], [0.5, 0.5]]", ParseMode::Official);
        assert!(a.polygons.is_empty());
        let a = parse_answer("[[-0.1, 0.2], [0.3, 0.4], [5e-1, 0.5]]", ParseMode::Robust);
        assert_eq!(
            a.polygons[0].points,
            vec![[-0.1, 0.2], [0.3, 0.4], [0.5, 0.5]]
        );
    }

    #[test]
    fn official_number_grammar_backtracks_like_python() {
        // "01.5" is no number for the official grammar, so the first polygon fails at its
        // second point and the search resumes inside it.
        let a = parse_answer(
            "[[0.1, 0.2], [01.5, 0.2]], [[0.3, 0.4], [0.5, 0.5], [1, 1]]",
            ParseMode::Official,
        );
        assert_eq!(a.polygons.len(), 1);
        assert_eq!(
            a.polygons[0].points,
            vec![[0.3, 0.4], [0.5, 0.5], [1.0, 1.0]]
        );
        // Integers with a leading zero match the regex, but json.loads raises on them.
        let a = parse_answer("[[01, 0.2], [0.3, 0.4], [0.5, 0.5]]", ParseMode::Official);
        assert_eq!(
            kinds(&a),
            vec![WarningKind::NotJson, WarningKind::NoPolygon]
        );
        let a = parse_answer(
            "[[0.1,\u{0B}0.2], [0.3, 0.4], [0.5, 0.5]]",
            ParseMode::Official,
        );
        assert_eq!(
            kinds(&a),
            vec![WarningKind::NotJson, WarningKind::NoPolygon]
        );
    }

    #[test]
    fn unterminated_polygon() {
        let text = "Sure: [[[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7";
        let official = parse_answer(text, ParseMode::Official);
        assert!(official.polygons.is_empty());
        assert_eq!(
            kinds(&official),
            vec![WarningKind::Unterminated, WarningKind::NoPolygon]
        );
        let robust = parse_answer(text, ParseMode::Robust);
        assert_eq!(robust.polygons.len(), 1);
        assert!(!robust.polygons[0].terminated);
        assert_eq!(robust.polygons[0].points.len(), 3);
        assert_eq!(kinds(&robust), vec![WarningKind::Unterminated]);
    }

    #[test]
    fn boxes_points_boxed_and_blocks() {
        let text = "```\nbox [0.1, 0.2, 0.3, 0.4] at [0.5, 0.5]\n```\n\\boxed{[0.2, 0.3]} [[0.1,0.1],[0.2,0.1],[0.2,0.2]]";
        let a = parse_answer(text, ParseMode::Official);
        assert_eq!(a.boxes, vec![[0.1, 0.2, 0.3, 0.4]]);
        assert_eq!(a.points, vec![[0.5, 0.5], [0.2, 0.3]]);
        assert_eq!(a.boxed, vec!["[0.2, 0.3]".to_string()]);
        assert_eq!(
            a.blocks,
            vec!["box [0.1, 0.2, 0.3, 0.4] at [0.5, 0.5]".to_string()]
        );
        assert_eq!(a.polygons.len(), 1);
    }

    #[test]
    fn huge_numbers_do_not_panic() {
        let a = parse_answer("[[1e999, 0.2], [0.3, 0.4], [0.5, 0.6]]", ParseMode::Robust);
        assert_eq!(
            kinds(&a),
            vec![WarningKind::NonFinite, WarningKind::NoPolygon]
        );
        let a = parse_answer(
            "[[99999999999999999999999, 0.2], [0.3, 0.4], [0.5, 0.6]]",
            ParseMode::Official,
        );
        assert_eq!(a.polygons.len(), 1);
        assert!(a.mask(640, 480, CoordMode::Normalized).is_ok());
    }

    #[test]
    fn mode_names_round_trip() {
        assert_eq!("robust".parse::<ParseMode>().unwrap(), ParseMode::Robust);
        assert_eq!(CoordMode::Pixels.to_string(), "pixels");
        assert!("strict".parse::<ParseMode>().is_err());
    }
}
