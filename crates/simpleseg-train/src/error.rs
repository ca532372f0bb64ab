//! Errors of the training crate.

use std::path::PathBuf;

/// Everything that can go wrong training.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Engine(#[from] simpleseg_engine::Error),
    #[error(transparent)]
    Core(#[from] simpleseg_core::Error),
    #[error(transparent)]
    Data(#[from] simpleseg_data::Error),
    #[error(transparent)]
    Eval(#[from] simpleseg_eval::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An I/O error mapper naming the path.
pub(crate) fn io(path: &std::path::Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}
