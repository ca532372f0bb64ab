//! One file per architecture.

pub mod qwen2_5_vl;
