//! Errors of the engine. Messages name the file and key involved and say what to do.

use std::path::PathBuf;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the model folder must have is missing.
    #[error("{path}: missing ({hint})")]
    MissingFile { path: PathBuf, hint: String },
    /// A file that exists but cannot be used.
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    /// A configuration key that is missing or has an unusable value.
    #[error("{path}: {message}")]
    BadConfig { path: PathBuf, message: String },
    /// The model folder holds an architecture this engine does not run.
    #[error("{0}")]
    Unsupported(String),
    /// Tokenizer failures.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Chat template failures.
    #[error("chat template: {0}")]
    Template(String),
    /// Bad input to a model call (image too small, prompt too long, ...).
    #[error("{0}")]
    Input(String),
    /// Tensor library failures.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Input refused by the protocol crate: images over the limits, unreadable images.
    #[error(transparent)]
    Core(#[from] simpleseg_core::Error),
    /// I/O failures with the path involved.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
