//! Bounds on what untrusted input may cost.
//!
//! Images, answers and data files come from users, models and the internet. Every reader in
//! this project checks the size of what it is about to allocate against these limits first
//! (an image's size from its header, a file's length while reading it) and fails with
//! [`Error::LimitExceeded`](crate::Error::LimitExceeded) instead of exhausting memory.
//!
//! The limits are process-wide, like Pillow's `Image.MAX_IMAGE_PIXELS`: the command line sets
//! them from its `--max-*` flags, a library user with [`set_limits`]. The defaults fit a
//! machine with a few GB of memory to spare.

use std::io::Read;
use std::path::Path;
use std::sync::RwLock;

use crate::error::{Error, Result};

/// Upper bounds on untrusted input. See the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most pixels of a decoded image or a dense (one byte per pixel) mask. The default is
    /// the size at which Pillow refuses an image as a decompression bomb.
    pub max_pixels: u64,
    /// Longest side of a decoded image, in pixels.
    pub max_side: u32,
    /// Largest image file read.
    pub max_image_bytes: u64,
    /// Largest answer or prompt text read from a file or standard input.
    pub max_text_bytes: u64,
    /// Largest data file read whole: JSON, JSON lines, pickles.
    pub max_data_bytes: u64,
}

impl Limits {
    /// The defaults: 178,956,970 pixels (Pillow's bomb threshold), sides of 65,535 pixels,
    /// image files of 512 MiB, texts of 16 MiB and data files of 2 GiB.
    pub const DEFAULT: Limits = Limits {
        max_pixels: 2 * 89_478_485,
        max_side: 65_535,
        max_image_bytes: 512 << 20,
        max_text_bytes: 16 << 20,
        max_data_bytes: 2 << 30,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

static LIMITS: RwLock<Limits> = RwLock::new(Limits::DEFAULT);

/// The limits in force.
pub fn limits() -> Limits {
    *LIMITS
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Replaces the limits in force for the whole process.
pub fn set_limits(limits: Limits) {
    *LIMITS
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = limits;
}

/// The limit a check is made against, named as the command line names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Pixels,
    Side,
    ImageBytes,
    TextBytes,
    DataBytes,
}

impl Limit {
    /// The current value of this limit.
    pub fn value(self) -> u64 {
        let l = limits();
        match self {
            Limit::Pixels => l.max_pixels,
            Limit::Side => u64::from(l.max_side),
            Limit::ImageBytes => l.max_image_bytes,
            Limit::TextBytes => l.max_text_bytes,
            Limit::DataBytes => l.max_data_bytes,
        }
    }

    /// The command-line flag that raises it.
    pub fn flag(self) -> &'static str {
        match self {
            Limit::Pixels => "--max-image-pixels",
            Limit::Side => "--max-image-side",
            Limit::ImageBytes => "--max-image-bytes",
            Limit::TextBytes => "--max-text-bytes",
            Limit::DataBytes => "--max-data-bytes",
        }
    }

    /// The unit of its value, for messages.
    pub fn unit(self) -> &'static str {
        match self {
            Limit::Pixels | Limit::Side => "pixels",
            _ => "bytes",
        }
    }

    /// Errors with a message naming `what` when `amount` is over this limit.
    pub fn check(self, amount: u64, what: impl FnOnce() -> String) -> Result<()> {
        let limit = self.value();
        if amount > limit {
            return Err(Error::LimitExceeded {
                what: what(),
                amount,
                limit,
                unit: self.unit(),
                flag: self.flag(),
            });
        }
        Ok(())
    }

    /// Checks a `width x height` picture against both the side and the pixel limits.
    pub fn check_picture(width: u64, height: u64, what: impl Fn() -> String) -> Result<()> {
        Limit::Side.check(width.max(height), || {
            format!("{} of {width}x{height} pixels (its longer side)", what())
        })?;
        Limit::Pixels.check(width.saturating_mul(height), || {
            format!("{} of {width}x{height} pixels", what())
        })
    }
}

/// A buffer of `len` zeroed bytes for a dense `width x height` picture, after checking the
/// pixel limit and that the memory can be had.
pub fn dense_buffer(width: u64, height: u64, what: impl Fn() -> String) -> Result<Vec<u8>> {
    Limit::check_picture(width, height, &what)?;
    let len = usize::try_from(width * height).map_err(|_| Error::LimitExceeded {
        what: what(),
        amount: width * height,
        limit: usize::MAX as u64,
        unit: "pixels",
        flag: Limit::Pixels.flag(),
    })?;
    let mut buffer = Vec::new();
    buffer
        .try_reserve_exact(len)
        .map_err(|_| Error::OutOfMemory(format!("{} of {width}x{height} pixels", what())))?;
    buffer.resize(len, 0);
    Ok(buffer)
}

/// Reads everything from `reader`, failing once more than the `limit`'s value has come (so a
/// file like `/dev/zero` cannot exhaust memory). `source` names the input in messages.
pub fn read_to_end_bounded(reader: impl Read, limit: Limit, source: &Path) -> Result<Vec<u8>> {
    let max = limit.value();
    let mut bytes = Vec::new();
    reader
        .take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::Io {
            path: source.to_path_buf(),
            source: e,
        })?;
    limit.check(bytes.len() as u64, || {
        format!("{} (read so far)", source.display())
    })?;
    Ok(bytes)
}

/// Reads a whole file, refusing one larger than the `limit`'s value: from its length when
/// the file system knows it, else while reading.
pub fn read_file_bounded(path: &Path, limit: Limit) -> Result<Vec<u8>> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if meta.is_dir() {
        return Err(Error::BadFile {
            path: path.to_path_buf(),
            message: "is a folder, not a file".into(),
        });
    }
    limit.check(meta.len(), || path.display().to_string())?;
    read_to_end_bounded(file, limit, path)
}

/// [`read_file_bounded`] as text: invalid UTF-8 is an error naming the file.
pub fn read_text_file_bounded(path: &Path, limit: Limit) -> Result<String> {
    let bytes = read_file_bounded(path, limit)?;
    String::from_utf8(bytes).map_err(|e| Error::BadFile {
        path: path.to_path_buf(),
        message: format!("not UTF-8 text ({e})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_reads_stop_at_the_limit() {
        let source = Path::new("zeros");
        let limit = Limit::TextBytes.value();
        let endless = std::io::repeat(0);
        let err = read_to_end_bounded(endless, Limit::TextBytes, source).unwrap_err();
        assert!(
            matches!(err, Error::LimitExceeded { amount, .. } if amount == limit + 1),
            "{err}"
        );
        assert!(err.to_string().contains("--max-text-bytes"), "{err}");
        let ok = read_to_end_bounded(&b"abc"[..], Limit::TextBytes, source).unwrap();
        assert_eq!(ok, b"abc");
    }

    #[test]
    fn pictures_are_checked_before_allocating() {
        assert!(dense_buffer(4, 3, || "a mask".into()).unwrap().len() == 12);
        let err = dense_buffer(u64::from(u32::MAX), 1, || "a mask".into()).unwrap_err();
        assert!(err.to_string().contains("longer side"), "{err}");
        let err = dense_buffer(60_000, 60_000, || "a mask".into()).unwrap_err();
        assert!(err.to_string().contains("--max-image-pixels"), "{err}");
    }
}
