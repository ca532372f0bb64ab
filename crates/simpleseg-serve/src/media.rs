//! Images in requests: `data:` URLs (base64), or `file://` paths under the folder the server
//! was told to allow. Remote URLs are refused: the server makes no network requests.
//!
//! An image is decoded only after its cost is reserved ([`crate::admission`]): the pixels its
//! header announces, times the bytes a pixel takes while decoding and as RGB.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use axum::http::StatusCode;
use base64::Engine;
use image::RgbImage;
use simpleseg_core::images::{decode_image, to_rgb};
use simpleseg_core::limits::Limit;
use tokio::sync::OwnedSemaphorePermit;

use crate::admission::Budgets;
use crate::ApiError;

/// The encoded bytes an URL names, and a name for messages.
pub fn image_bytes(url: &str, allowed: Option<&Path>) -> Result<(Vec<u8>, PathBuf), ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((meta, data)) = rest.split_once(',') else {
            return Err(ApiError::bad_request(
                "a data: URL needs a comma before its data",
            ));
        };
        if !meta.ends_with(";base64") {
            return Err(ApiError::bad_request(
                "data: URLs must be base64 (data:image/png;base64,...)",
            ));
        }
        Limit::ImageBytes.check((data.len() as u64) / 4 * 3, || "the request's image".into())?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| ApiError::bad_request(format!("the image's base64 is invalid: {e}")))?;
        return Ok((bytes, PathBuf::from("<request image>")));
    }
    if let Some(path) = url.strip_prefix("file://") {
        let Some(root) = allowed else {
            return Err(ApiError::bad_request(
                "file:// images are refused; start the server with --allowed-media-path DIR to allow those under DIR",
            ));
        };
        let path = allowed_file(path, root)?;
        return Ok((read_regular_file(&path)?, path));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(ApiError::bad_request(
            "http(s) image URLs are refused: this server makes no network requests; send the image as a data: URL",
        ));
    }
    Err(ApiError::bad_request(
        "image URLs must be data: URLs (or file:// under --allowed-media-path)",
    ))
}

/// The file a `file://` URL's path names, if it lies under `root`. A path outside `root` is
/// refused before the file system is asked anything, with the same answer whether or not it
/// exists; inside, links are followed and must stay inside.
fn allowed_file(url_path: &str, root: &Path) -> Result<PathBuf, ApiError> {
    let decoded = percent_encoding::percent_decode_str(url_path)
        .decode_utf8()
        .map_err(|_| ApiError::bad_request("the file:// URL is not UTF-8 once decoded"))?;
    let requested = Path::new(decoded.as_ref());
    let forbidden = || {
        ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "{} is not a file under --allowed-media-path",
                requested.display()
            ),
        )
    };
    let root = root.canonicalize().map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("--allowed-media-path {}: {e}", root.display()),
        )
    })?;
    if !requested.is_absolute() {
        return Err(forbidden());
    }
    // The path as written, `.` and `..` resolved without touching the disk.
    let mut lexical = PathBuf::new();
    for part in requested.components() {
        match part {
            Component::ParentDir => {
                lexical.pop();
            }
            Component::CurDir => {}
            other => lexical.push(other),
        }
    }
    if !lexical.starts_with(&root) {
        return Err(forbidden());
    }
    let resolved = lexical.canonicalize().map_err(|_| forbidden())?;
    if !resolved.starts_with(&root) {
        return Err(forbidden());
    }
    Ok(resolved)
}

/// Reads a regular file without blocking on anything else (a FIFO or a device under the
/// allowed folder is refused, not waited on).
fn read_regular_file(path: &Path) -> Result<Vec<u8>, ApiError> {
    let not_regular = || {
        ApiError::new(
            StatusCode::FORBIDDEN,
            format!("{} is not a regular file", path.display()),
        )
    };
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|_| not_regular())?;
    let meta = file.metadata().map_err(|_| not_regular())?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    Limit::ImageBytes.check(meta.len(), || path.display().to_string())?;
    let mut bytes = Vec::new();
    file.take(Limit::ImageBytes.value().saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| ApiError::bad_request(format!("{}: {e}", path.display())))?;
    Limit::ImageBytes.check(bytes.len() as u64, || path.display().to_string())?;
    Ok(bytes)
}

/// Bytes a decode of this picture takes at most: the decoder's output and its working copy
/// of the pixels (PNG keeps the inflated rows), and the RGB copy.
fn decode_cost(bytes: &[u8], source: &Path) -> Result<u64, ApiError> {
    let info = simpleseg_core::images::header_info(bytes, source)?;
    let pixels = u64::from(info.width) * u64::from(info.height);
    Ok(pixels.saturating_mul(2 * u64::from(info.bytes_per_pixel) + 3))
}

/// Decodes an image as Pillow's RGB, with its decoding cost reserved first; the reservation
/// comes back with it (it stands for the RGB pixels until they are dropped).
pub fn decode(
    bytes: &[u8],
    source: &Path,
    budgets: &Budgets,
) -> Result<(RgbImage, OwnedSemaphorePermit), ApiError> {
    let cost = decode_cost(bytes, source)?;
    let permit = budgets.reserve(cost, "decoding the image")?;
    let image = decode_image(bytes, source)?;
    Ok((to_rgb(&image), permit))
}
