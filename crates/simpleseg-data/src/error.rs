//! Errors of the data crate.

use std::path::PathBuf;

/// Everything that can go wrong reading or writing data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: missing ({hint})")]
    Missing { path: PathBuf, hint: String },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Core(#[from] simpleseg_core::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
