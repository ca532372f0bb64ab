//! Models composed from parts. Language models ([`qwen2`], [`deepseek_v3`]) and vision towers
//! ([`qwen2_5_vit`], [`moonvit`]) are modules of their own; each family ([`qwen2_5_vl`],
//! [`kimi_vl`]) is a small composition of them: its config, processor, projector and wiring,
//! put to work by [`family::Family`]. Families register in `crate::registry`. See
//! `docs/adding-a-model.md`.

pub mod deepseek_v3;
pub mod family;
pub mod kimi_vl;
pub mod moonvit;
pub mod qwen2;
pub mod qwen2_5_vit;
pub mod qwen2_5_vl;
pub mod training;
