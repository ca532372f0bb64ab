//! Running models, from the bottom up (each module uses only those before it): decoding
//! settings and the next-token choice ([`sampling`]), constraints on answers
//! ([`constraint`]), the interface every family implements ([`model`]), one answer's decoding
//! state ([`decoding`]), caches and batched sessions ([`kv_cache`], [`session`]), the one
//! decoding loop ([`generator`]), the segmentation pipeline on it ([`segment`]) and the
//! server's continuous batching ([`scheduler`]).

pub mod constraint;
pub mod decoding;
pub mod generator;
pub mod kv_cache;
pub mod model;
pub mod sampling;
pub mod scheduler;
pub mod segment;
pub mod session;
