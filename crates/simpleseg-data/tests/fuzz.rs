//! Property tests: the dataset readers never panic on mutated files. Seeds are the committed
//! refer fixtures (a Python 2 refs pickle and a COCO instances file); mutations flip, cut,
//! duplicate and splice bytes, including pickle opcodes that nest and memoize.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use simpleseg_data::pickle_shape;
use simpleseg_data::refer::{parse_instances, parse_refs};

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/refer/refcoco")
        .join(name);
    std::fs::read(path).unwrap()
}

/// An edit to a seed file.
#[derive(Clone, Debug)]
enum Edit {
    Set(usize, u8),
    Cut(usize),
    Remove(usize, usize),
    Duplicate(usize, usize, usize),
    Insert(usize, Vec<u8>),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    // Pickle opcodes that build, nest and reuse values.
    let opcodes = prop::sample::select(vec![
        b'(', b']', b'}', b'a', b'e', b'u', b's', b'h', b'q', b'0', b'1', b'2', b'.', 0x85, 0x94,
    ]);
    let edit = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Edit::Set(at, b)),
        any::<usize>().prop_map(Edit::Cut),
        (any::<usize>(), 1usize..64).prop_map(|(at, n)| Edit::Remove(at, n)),
        (any::<usize>(), 1usize..256, any::<usize>())
            .prop_map(|(a, n, b)| Edit::Duplicate(a, n, b)),
        (any::<usize>(), prop::collection::vec(opcodes, 1..32))
            .prop_map(|(at, v)| Edit::Insert(at, v)),
    ];
    prop::collection::vec(edit, 1..6)
}

fn apply(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for edit in edits {
        let at = |i: usize, data: &Vec<u8>| {
            if data.is_empty() {
                0
            } else {
                i % (data.len() + 1)
            }
        };
        match edit {
            Edit::Set(i, b) if !data.is_empty() => {
                let i = i % data.len();
                data[i] = *b;
            }
            Edit::Cut(i) => data.truncate(at(*i, &data)),
            Edit::Remove(i, n) => {
                let start = at(*i, &data);
                let end = (start + n).min(data.len());
                data.drain(start..end);
            }
            Edit::Duplicate(a, n, b) => {
                let start = at(*a, &data);
                let end = (start + n).min(data.len());
                let copy = data[start..end].to_vec();
                let to = at(*b, &data);
                data.splice(to..to, copy);
            }
            Edit::Insert(i, bytes) => {
                let to = at(*i, &data);
                data.splice(to..to, bytes.iter().copied());
            }
            Edit::Set(..) => {}
        }
    }
    data
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn refs_reader_survives_mutated_pickles(edits in edits()) {
        let bytes = apply(&fixture("refs(unc).p"), &edits);
        let shape = pickle_shape::check(&bytes);
        let refs = parse_refs(&bytes, Path::new("refs(unc).p"));
        // Whatever the measure refuses, the reader refuses too.
        if shape.is_err() {
            prop_assert!(refs.is_err());
        }
    }

    #[test]
    fn instances_reader_survives_mutated_json(edits in edits()) {
        let bytes = apply(&fixture("instances.json"), &edits);
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(instances) = parse_instances(&text, Path::new("instances.json")) {
            for a in instances.annotations.values() {
                let image = &instances.images[&a.image_id];
                if image.width > 0 && image.height > 0 && u64::from(image.width) * u64::from(image.height) < 1 << 24 {
                    let _ = a.mask(image.width, image.height);
                }
            }
        }
    }
}
