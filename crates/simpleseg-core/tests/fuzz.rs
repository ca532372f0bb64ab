//! Property tests: untrusted input never panics and keeps its invariants. The long-running
//! version of these checks is `cargo run --release -p simpleseg-core --example fuzz`.

use proptest::prelude::*;
use simpleseg_core::raster::rasterize_polygon;
use simpleseg_core::{parse_answer, CoordMode, ParseMode, RleMask};

/// Text built from the characters answers are made of, so that the grammar is exercised.
fn answer_like() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "[",
        "]",
        "[[",
        "]]",
        ", ",
        ",",
        " ",
        "\n",
        "0.",
        "0.5",
        "1",
        "01",
        "-",
        "e",
        "1e-3",
        ".",
        "0.123",
        "99999999999999999999",
        "\\boxed{",
        "}",
        "```\n",
        "\n```",
        "\u{a0}",
        "\u{663}",
        "\x0b",
        "It is at ",
        "1e999",
        "+0.2",
        "1e308",
        "9e307",
    ]);
    prop::collection::vec(pieces, 0..60).prop_map(|v| v.concat())
}

fn check_answer(text: &str) {
    for mode in [ParseMode::Official, ParseMode::Robust] {
        let parsed = parse_answer(text, mode);
        for p in &parsed.polygons {
            assert!(p.points.len() >= 3);
            assert!(p.points.iter().flatten().all(|v| v.is_finite()));
            assert!(p.span[0] < p.span[1] && p.span[1] <= text.len());
        }
        if mode == ParseMode::Official {
            assert!(parsed.polygons.iter().all(|p| p.terminated));
        }
        let mask = parsed.mask(37, 23, CoordMode::Normalized).unwrap();
        // Scaling can overflow finite numbers to infinity; that still rasterizes.
        let _ = parsed.mask(u32::MAX / 4, 3, CoordMode::Normalized).unwrap();
        assert!(mask.area() <= 37 * 23);
        let pixels = parsed.mask(37, 23, CoordMode::Pixels).unwrap();
        assert_eq!(
            pixels.counts().iter().map(|&c| u64::from(c)).sum::<u64>(),
            37 * 23
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn parser_survives_answer_like_text(text in answer_like()) {
        check_answer(&text);
    }

    #[test]
    fn parser_survives_arbitrary_text(text in any::<String>()) {
        check_answer(&text);
    }

    #[test]
    fn rle_strings_decode_or_fail_cleanly(s in "[0-9a-z\\\\^_`\\[\\]=<>?@A-Z;:]{0,40}", h in 1u32..20, w in 1u32..20) {
        if let Ok(mask) = RleMask::from_compressed(h, w, &s) {
            let again = RleMask::from_compressed(h, w, &mask.to_compressed()).unwrap();
            prop_assert_eq!(again.to_row_major().unwrap(), mask.to_row_major().unwrap());
        }
    }

    #[test]
    fn rasterizer_matches_hotcoco_on_arbitrary_polygons(
        xy in prop::collection::vec(-300.0f64..300.0, 6..40),
        h in 1u32..60,
        w in 1u32..60,
    ) {
        let points: Vec<[f64; 2]> = xy.chunks_exact(2).map(|p| [p[0], p[1]]).collect();
        let flat: Vec<f64> = points.iter().flatten().copied().collect();
        let ours = rasterize_polygon(&points, h, w).unwrap();
        let oracle = hotcoco::mask::fr_poly(&flat, h, w).unwrap();
        prop_assert_eq!(ours.counts(), oracle.counts.as_slice());
    }

    #[test]
    fn rasterizer_survives_extreme_coordinates(
        xy in prop::collection::vec(prop_oneof![any::<f64>(), -1e12f64..1e12], 6..20),
    ) {
        let points: Vec<[f64; 2]> = xy.chunks_exact(2).map(|p| [p[0], p[1]]).collect();
        match rasterize_polygon(&points, 48, 64) {
            Ok(mask) => prop_assert!(mask.area() <= 48 * 64),
            Err(_) => prop_assert!(xy.iter().any(|v| v.is_nan())),
        }
    }
}
