//! Property tests: untrusted input never panics and keeps its invariants. The long-running
//! version of these checks is `cargo run --release -p simpleseg-core --example fuzz`.

use proptest::prelude::*;
use simpleseg_core::images::decode_image;
use simpleseg_core::limits::limits;
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

/// A small PNG and JPEG to mutate.
fn image_seeds() -> [Vec<u8>; 2] {
    let image = image::RgbImage::from_fn(24, 16, |x, y| {
        image::Rgb([(x * 11) as u8, (y * 15) as u8, ((x * y) % 256) as u8])
    });
    [image::ImageFormat::Png, image::ImageFormat::Jpeg].map(|format| {
        let mut bytes = Vec::new();
        image
            .write_to(&mut std::io::Cursor::new(&mut bytes), format)
            .unwrap();
        bytes
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// Flipped bytes anywhere (headers included), cuts and header fields set to extremes:
    /// the decoder errs or returns an image within the limits, and never panics.
    #[test]
    fn image_decoder_survives_mutated_files(
        which in 0usize..2,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        size_at in any::<prop::sample::Index>(),
        size in prop_oneof![Just([0u8; 4]), Just([0xFF; 4]), any::<[u8; 4]>()],
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let mut bytes = image_seeds()[which].clone();
        // Header fields live in the first 200 bytes of both seeds.
        let at = size_at.index(200.min(bytes.len() - 4));
        bytes[at..at + 4].copy_from_slice(&size);
        for (i, b) in flips {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        if let Ok(image) = decode_image(&bytes, std::path::Path::new("fuzz")) {
            let l = limits();
            prop_assert!(image.width().max(image.height()) <= l.max_side);
            prop_assert!(u64::from(image.width()) * u64::from(image.height()) <= l.max_pixels);
        }
    }

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
