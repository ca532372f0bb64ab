//! Errors of the protocol crate.

use std::path::PathBuf;

/// Everything that can go wrong in this crate. Messages name the input and say what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A mask or image size that cannot be represented (zero, or over 2^32 pixels).
    #[error("invalid mask size {height}x{width}: {reason}")]
    InvalidSize {
        height: u64,
        width: u64,
        reason: &'static str,
    },
    /// Two masks that should have the same size do not.
    #[error("mask sizes differ: {a_height}x{a_width} vs {b_height}x{b_width} (height x width)")]
    SizeMismatch {
        a_height: u32,
        a_width: u32,
        b_height: u32,
        b_width: u32,
    },
    /// A run-length encoding that does not describe a mask of its stated size.
    #[error("invalid RLE: {0}")]
    InvalidRle(String),
    /// A request that cannot be served as given (an empty query, a box that is not a box).
    #[error("{0}")]
    Invalid(String),
    /// A coordinate that is NaN.
    #[error("coordinate {0} in polygon is not a number")]
    NonFiniteCoordinate(f64),
    /// A malformed file.
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    /// An I/O failure, with the path involved.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Input larger than a limit of [`crate::limits`].
    #[error("{what}: {amount} {unit} is over the limit of {limit} (raise it with {flag} if you trust this input)")]
    LimitExceeded {
        what: String,
        amount: u64,
        limit: u64,
        unit: &'static str,
        flag: &'static str,
    },
    /// An allocation within the limits that the system refused.
    #[error("not enough memory for {0}")]
    OutOfMemory(String),
    /// An image that could not be decoded or encoded.
    #[error("{path}: {source}")]
    Image {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
