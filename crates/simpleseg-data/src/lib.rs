//! SimpleSeg data: readers for referring-segmentation datasets (the refer layout of refCOCO,
//! refCOCO+, refCOCOg and refCLEF; plain COCO instances; folders of mask PNGs), the SFT and RL
//! training-data builders, and a generator of synthetic referring scenes.

pub mod builders;
pub mod error;
pub mod items;
pub mod pyjson;
pub mod refer;
pub mod synth;

pub use error::{Error, Result};
pub use items::Item;
pub use refer::ReferDataset;
