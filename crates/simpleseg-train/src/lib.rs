//! SimpleSeg training in Rust: a tokenizer trained on the data, supervised fine-tuning on
//! mask-derived polygons, then reinforcement learning (GSPO or GRPO) with an IoU reward, for
//! any family the engine can train (its registry's training entries). The model is the
//! engine's own implementation, built over trainable variables.

// Every unwrap or expect outside tests is a decision: a panic reachable from input is a bug.
#![warn(clippy::unwrap_used, clippy::expect_used)]

pub mod data;
pub mod error;
pub mod folder;
pub mod optim;
pub mod params;
pub mod plot;
pub mod rl;
pub mod run;
pub mod sft;
pub mod tokenizer;

pub use error::{Error, Result};
