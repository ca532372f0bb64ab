//! The SimpleSeg point protocol.
//!
//! A SimpleSeg model answers a referring question with the object's outline as text:
//! `[[[0.625, 0.208], [0.5, 0.21], ...]]`, points normalized to `[0, 1]` by the image's
//! width and height. This crate holds everything that turns such text into masks and masks
//! back into such text, exactly as the reference tools do:
//!
//! - [`parse`]: answers to polygons, boxes and points, in the official decoder's `official`
//!   mode or a `robust` mode for rewards and users;
//! - [`rle`] and [`raster`]: COCO run-length masks and a polygon rasterizer that are
//!   bit-exact with pycocotools 2.0.x;
//! - [`contour`] and [`target`]: mask -> external contours -> `approxPolyDP` -> answer text,
//!   exactly as OpenCV 4.12 and the released data script produce it;
//! - [`pyrepr`]: Python's `repr` of floats, which the training targets are written in;
//! - [`io`] and [`overlay`]: the file formats every command shares (RLE JSON, 0/255 PNG
//!   masks), written atomically, and a visual overlay;
//! - [`images`] and [`limits`]: the one image-opening path (Pillow's pixels, decompression
//!   bombs and truncated files refused from the header) and the bounds every reader of
//!   untrusted input checks before it allocates.
//!
//! The crate has no machine-learning dependencies, so data builders, rewards and bindings can
//! use it on its own.

// Every unwrap or expect outside tests is a decision: a panic reachable from input is a bug.
#![warn(clippy::unwrap_used, clippy::expect_used)]

pub mod contour;
pub mod error;
pub mod images;
pub mod io;
pub mod journal;
pub mod limits;
pub mod metrics;
pub mod outputs;
pub mod overlay;
pub mod parse;
pub mod pyrepr;
pub mod raster;
pub mod reward;
pub mod rle;
pub mod segment;
pub mod target;
pub mod templates;

pub use error::{Error, Result};
pub use parse::{parse_answer, CoordMode, ParseMode, ParsedAnswer, Polygon};
pub use rle::RleMask;
