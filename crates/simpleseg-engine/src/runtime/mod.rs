//! Running models: decoding settings and the next-token choice ([`sampling`]), constraints on
//! answers ([`constraint`]), one answer's decoding state ([`decoding`]), the interface every
//! family implements ([`model`]), caches and batched sessions ([`kv_cache`], [`session`]), and
//! the decoding loops built on them: batched generation ([`generator`]) and the server's
//! continuous batching ([`scheduler`]). Modules are listed from the bottom up: each uses only
//! those above it in this list.

pub mod sampling;
pub mod constraint;
pub mod decoding;
pub mod model;
pub mod kv_cache;
pub mod session;
pub mod generator;
pub mod scheduler;
