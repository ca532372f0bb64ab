//! Images in requests: `data:` URLs (base64), or `file://` paths under the folder the server
//! was told to allow. Remote URLs are refused: the server makes no network requests.

use std::path::{Path, PathBuf};

use base64::Engine;
use image::RgbImage;
use simpleseg_core::images::{decode_image, read_image_file, to_rgb};

use crate::ApiError;

/// Decodes the image an URL names (within the image limits of [`simpleseg_core::limits`]).
pub fn image_from_url(url: &str, allowed: Option<&Path>) -> Result<RgbImage, ApiError> {
    let (bytes, source) = if let Some(rest) = url.strip_prefix("data:") {
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
        let max = simpleseg_core::limits::limits().max_image_bytes;
        if (data.len() as u64) / 4 * 3 > max {
            return Err(simpleseg_core::Error::LimitExceeded {
                what: "image".into(),
                amount: (data.len() as u64) / 4 * 3,
                limit: max,
                unit: "bytes",
                flag: "--max-image-bytes",
            }
            .into());
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| ApiError::bad_request(format!("the image's base64 is invalid: {e}")))?;
        (bytes, PathBuf::from("<request image>"))
    } else if let Some(path) = url.strip_prefix("file://") {
        let Some(root) = allowed else {
            return Err(ApiError::bad_request(
                "file:// images are refused; start the server with --allowed-media-path DIR to allow those under DIR",
            ));
        };
        let path = Path::new(path);
        let resolved = path
            .canonicalize()
            .map_err(|e| ApiError::bad_request(format!("{}: {e}", path.display())))?;
        let root = root
            .canonicalize()
            .map_err(|e| ApiError::bad_request(format!("{}: {e}", root.display())))?;
        if !resolved.starts_with(&root) {
            return Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                format!("{} is outside --allowed-media-path", path.display()),
            ));
        }
        (read_image_file(&resolved)?, resolved)
    } else if url.starts_with("http://") || url.starts_with("https://") {
        return Err(ApiError::bad_request(
            "http(s) image URLs are refused: this server makes no network requests; send the image as a data: URL",
        ));
    } else {
        return Err(ApiError::bad_request(
            "image URLs must be data: URLs (or file:// under --allowed-media-path)",
        ));
    };
    let image = decode_image(&bytes, &source)?;
    Ok(to_rgb(&image))
}
