//! SimpleSeg evaluation: per-sample IoU on RLE masks, cIoU, gIoU and Acc@0.5 over referring
//! datasets, answers from a local model, an OpenAI-compatible server or a file, streamed to a
//! resumable predictions file, and reports laid out like the paper's tables.

// Every unwrap or expect outside tests is a decision: a panic reachable from input is a bug.
#![warn(clippy::unwrap_used, clippy::expect_used)]

pub mod agreement;
pub mod backends;
pub mod error;
pub use simpleseg_core::metrics;
pub mod runner;

pub use error::{Error, Result};
