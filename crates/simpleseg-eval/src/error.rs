//! Errors of the evaluation crate.

use std::path::PathBuf;

/// Everything that can go wrong evaluating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    /// A backend that could not answer.
    #[error("backend: {0}")]
    Backend(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Core(#[from] simpleseg_core::Error),
    #[error(transparent)]
    Data(#[from] simpleseg_data::Error),
    #[error(transparent)]
    Engine(#[from] simpleseg_engine::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
