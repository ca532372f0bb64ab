//! SimpleSeg data: readers for referring-segmentation datasets (the refer layout of refCOCO,
//! refCOCO+, refCOCOg and refCLEF; plain COCO instances; folders of mask PNGs), the SFT and RL
//! training-data builders, and a generator of synthetic referring scenes.

// Every unwrap or expect outside tests is a decision: a panic reachable from input is a bug.
#![warn(clippy::unwrap_used, clippy::expect_used)]

pub mod builders;
pub mod error;
pub mod formats;
pub mod items;
pub mod pickle_shape;
pub mod pyjson;
pub mod refer;
pub mod synth;

pub use error::{Error, Result};
pub use items::Item;
pub use refer::ReferDataset;

/// Refuses a dataset or split name that is not a plain file name: names become folder and
/// file names, so `..`, separators and the like could write outside the output folder.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '+' | '.'));
    if plain {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{what} {name:?} is not a plain name (letters, digits, '_', '-', '+', '.'; not '.' or '..')"
        )))
    }
}
