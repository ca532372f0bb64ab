//! A mutation fuzzer for the untrusted-input paths: model answers (both parse modes, then
//! rasterization), RLE `counts` strings and image files (headers included). Seeds are the
//! answers in `fixtures/answers.json` and the bundled example images; each execution applies
//! a few random byte-level and grammar-level mutations. Any panic is a finding, and so is a
//! decoded image over the limits. Prints how many executions ran.
//!
//! Run: `cargo run --release -p simpleseg-core --example fuzz -- [SECONDS] [SEED]`

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use simpleseg_core::{parse_answer, CoordMode, ParseMode, RleMask};

const PIECES: &[&str] = &[
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
    "[0.1, 0.2]",
    "[0.1, 0.2, 0.3, 0.4]",
];

fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..rng.random_range(1..8) {
        let at = rng.random_range(0..=data.len());
        match rng.random_range(0..6) {
            0 if !data.is_empty() => {
                let end = (at + rng.random_range(1..16)).min(data.len());
                data.drain(at.min(data.len())..end);
            }
            1 => {
                let piece = PIECES[rng.random_range(0..PIECES.len())].as_bytes();
                data.splice(at..at, piece.iter().copied());
            }
            2 if at < data.len() => data[at] = rng.random(),
            3 => data.truncate(at),
            4 if !data.is_empty() => {
                // Duplicate a slice (long, repetitive answers).
                let start = rng.random_range(0..data.len());
                let end = (start + rng.random_range(1..64)).min(data.len());
                let copy = data[start..end].to_vec();
                data.splice(at..at, copy);
            }
            _ => data.insert(at, rng.random_range(b' '..=b'~')),
        }
    }
    data
}

fn exercise_answer(text: &str) {
    for mode in [ParseMode::Official, ParseMode::Robust] {
        let parsed = parse_answer(text, mode);
        for p in &parsed.polygons {
            assert!(p.points.len() >= 3 && p.points.iter().flatten().all(|v| v.is_finite()));
        }
        for coords in [CoordMode::Normalized, CoordMode::Pixels] {
            let mask = parsed
                .mask(64, 48, coords)
                .expect("finite polygons rasterize");
            assert!(mask.area() <= 64 * 48);
        }
    }
}

fn exercise_rle(text: &str) {
    if let Ok(mask) = RleMask::from_compressed(48, 64, text) {
        let again = RleMask::from_compressed(48, 64, &mask.to_compressed()).expect("re-encodes");
        assert_eq!(again.to_row_major().unwrap(), mask.to_row_major().unwrap());
    }
}

fn exercise_image(bytes: &[u8]) {
    if let Ok(image) = simpleseg_core::images::decode_image(bytes, std::path::Path::new("fuzz")) {
        let l = simpleseg_core::limits::limits();
        assert!(image.width().max(image.height()) <= l.max_side);
        assert!(u64::from(image.width()) * u64::from(image.height()) <= l.max_pixels);
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args
        .next()
        .map_or(30, |s| s.parse().expect("SECONDS is a number"));
    let seed: u64 = args
        .next()
        .map_or(1, |s| s.parse().expect("SEED is a number"));
    let fixture = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/answers.json"
    ))
    .expect("fixtures/answers.json");
    let value: serde_json::Value = serde_json::from_str(&fixture).expect("JSON");
    let seeds: Vec<String> = value["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| c["answer"].as_str().expect("answer").to_string())
        .collect();
    let images: Vec<Vec<u8>> = [
        "examples/voc.jpg",
        "examples/synth/images/synth/demo_0000008.png",
    ]
    .iter()
    .map(|name| std::fs::read(format!("{}/../../{name}", env!("CARGO_MANIFEST_DIR"))).expect(name))
    .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut answers, mut rles, mut image_runs) = (0u64, 0u64, 0u64);
    while Instant::now() < deadline {
        for _ in 0..256 {
            let seed = seeds[rng.random_range(0..seeds.len())].as_bytes();
            let input = mutate(&mut rng, seed);
            let text = String::from_utf8_lossy(&input);
            exercise_answer(&text);
            answers += 1;
            let rle: String = (0..rng.random_range(0..48))
                .map(|_| char::from(rng.random_range(48u8..112)))
                .collect();
            exercise_rle(&rle);
            rles += 1;
        }
        // Images cost more to decode: a few per round, mutated without the answer pieces.
        for _ in 0..4 {
            let mut bytes = images[rng.random_range(0..images.len())].clone();
            for _ in 0..rng.random_range(1..6) {
                let at = rng.random_range(0..bytes.len());
                match rng.random_range(0..3) {
                    0 => bytes[at] = rng.random(),
                    1 => bytes.truncate(at.max(1)),
                    // Header fields are in the first few hundred bytes.
                    _ => {
                        let at = rng.random_range(0..bytes.len().min(400).saturating_sub(4).max(1));
                        let value: [u8; 4] = rng.random();
                        let end = (at + 4).min(bytes.len());
                        bytes[at..end].copy_from_slice(&value[..end - at]);
                    }
                }
            }
            exercise_image(&bytes);
            image_runs += 1;
        }
    }
    println!("{{\"answer_executions\": {answers}, \"rle_executions\": {rles}, \"image_executions\": {image_runs}, \"seconds\": {seconds}, \"seed\": {seed}}}");
}
