//! One folder per model family: config, processor, vision tower, language model, and the
//! pipeline that loads a folder and implements [`crate::VisionLanguageModel`]. See
//! `docs/adding-a-model.md`.

pub mod kimi_vl;
pub mod qwen2_5_vl;
