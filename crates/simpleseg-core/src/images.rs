//! The one way this project opens image files: every command, the data readers, training and
//! the server read images through here, under one policy.
//!
//! - Sizes are checked before anything is decoded: the file's length against
//!   [`Limits::max_image_bytes`](crate::limits::Limits::max_image_bytes), the dimensions in
//!   its header against the side and pixel limits. A small file that claims a huge picture (a
//!   decompression bomb) is refused from its header.
//! - A truncated or corrupt file is refused with a message that says so, as Pillow refuses it.
//! - Pixels come out as `PIL.Image.open(path).convert("RGB")` gives them, with transformers'
//!   compositing of transparency onto white: JPEG files are decoded with libjpeg-turbo's
//!   algorithms (through mozjpeg: islow IDCT, fancy upsampling, Pillow's settings), since other
//!   decoders differ by several levels. 16-bit PNGs keep their high byte (grey is clipped), as
//!   Pillow converts them. EXIF orientation is not applied, as `Image.open` does not apply
//!   it: every command, the server and its page work in the picture's stored orientation.
//!
//! PNG and JPEG are read; other formats are refused.

use std::io::{Cursor, Read};
use std::os::raw::c_int;
use std::path::Path;

use image::{DynamicImage, ImageReader, RgbImage, RgbaImage};

use crate::error::{Error, Result};
use crate::limits::{self, Limit};

/// Reads an image file's bytes, refusing a file over the image byte limit (from its length,
/// or while reading), and one that does not start like a PNG or JPEG before reading on
/// (`/dev/zero` is refused at once).
pub fn read_image_file(path: &Path) -> Result<Vec<u8>> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if meta.is_dir() {
        return Err(bad(path, "is a folder, not an image".into()));
    }
    Limit::ImageBytes.check(meta.len(), || path.display().to_string())?;
    let mut head = Vec::with_capacity(16);
    (&mut file).take(16).read_to_end(&mut head).map_err(io)?;
    check_format(image::guess_format(&head).ok(), path)?;
    let rest = limits::read_to_end_bounded(file, Limit::ImageBytes, path)?;
    head.extend_from_slice(&rest);
    Limit::ImageBytes.check(head.len() as u64, || path.display().to_string())?;
    Ok(head)
}

/// Opens an image file as Pillow's RGB. See the module documentation.
pub fn open_image(path: &Path) -> Result<RgbImage> {
    let bytes = read_image_file(path)?;
    Ok(to_rgb(&decode_image(&bytes, path)?))
}

/// The `(width, height)` an image file's header states, after checking them against the
/// limits; reads only the header.
pub fn image_dimensions(path: &Path) -> Result<(u32, u32)> {
    let reader = ImageReader::open(path)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .with_guessed_format()
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
    check_format(reader.format(), path)?;
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| bad(path, format!("cannot read the image header: {e}")))?;
    check_dimensions(w, h, path)?;
    Ok((w, h))
}

/// Decodes an image held in memory (`source` names it in messages). JPEG files come out as
/// RGB; other formats in their own colour type.
pub fn decode_image(bytes: &[u8], source: &Path) -> Result<DynamicImage> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        if let Some(rgb) = decode_jpeg(bytes, source)? {
            return Ok(DynamicImage::ImageRgb8(rgb));
        }
    }
    let reader = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|source_err| Error::Io {
                path: source.to_path_buf(),
                source: source_err,
            })
    };
    check_format(reader()?.format(), source)?;
    let (w, h) = reader()?
        .into_dimensions()
        .map_err(|e| bad(source, format!("cannot read the image header: {e}")))?;
    check_dimensions(w, h, source)?;
    let mut decoder = reader()?;
    let l = limits::limits();
    let mut image_limits = image::Limits::default();
    image_limits.max_image_width = Some(l.max_side);
    image_limits.max_image_height = Some(l.max_side);
    // Up to 8 bytes a pixel (16-bit RGBA), and the decoder's own buffers.
    image_limits.max_alloc = Some(l.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    decoder.limits(image_limits);
    decoder.decode().map_err(|e| {
        bad(
            source,
            format!("cannot decode the image (truncated or corrupt?): {e}"),
        )
    })
}

fn bad(path: &Path, message: String) -> Error {
    Error::BadFile {
        path: path.to_path_buf(),
        message,
    }
}

fn check_format(format: Option<image::ImageFormat>, path: &Path) -> Result<()> {
    match format {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg) => Ok(()),
        Some(other) => Err(bad(
            path,
            format!("{other:?} images are not read; convert the image to PNG or JPEG"),
        )),
        None => Err(bad(
            path,
            "not an image this tool reads (expected PNG or JPEG)".into(),
        )),
    }
}

fn check_dimensions(width: u32, height: u32, path: &Path) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(bad(
            path,
            format!("image of {width}x{height} pixels is empty"),
        ));
    }
    Limit::check_picture(width.into(), height.into(), || {
        format!("image {}", path.display())
    })
}

/// What unwinds out of libjpeg: its fatal errors and the one warning treated as an error.
enum JpegFailure {
    Truncated,
    Fatal(String),
}

/// libjpeg's fatal error handler: formats the message and unwinds (mozjpeg-sys is built to
/// let it).
extern "C-unwind" fn jpeg_fatal(cinfo: &mut mozjpeg_sys::jpeg_common_struct) {
    let mut buffer = [0u8; 80];
    // SAFETY: `cinfo.err` is the error manager this decoder was created with;
    // `format_message` writes a NUL-terminated message of at most 80 bytes into the buffer
    // (its Rust signature takes the buffer by shared reference, so the pointer is cast).
    let message = unsafe {
        match (*cinfo.err).format_message {
            Some(format) => {
                let format: unsafe extern "C-unwind" fn(
                    &mut mozjpeg_sys::jpeg_common_struct,
                    *mut [u8; 80],
                ) = std::mem::transmute(format);
                format(cinfo, &mut buffer);
                let end = buffer.iter().position(|&b| b == 0).unwrap_or(80);
                String::from_utf8_lossy(&buffer[..end]).into_owned()
            }
            None => format!("libjpeg error {}", (*cinfo.err).msg_code),
        }
    };
    std::panic::resume_unwind(Box::new(JpegFailure::Fatal(message)));
}

/// libjpeg's message handler: the end of the data before the end of the image is an error
/// (Pillow raises on it); other warnings are ignored, as Pillow ignores them.
extern "C-unwind" fn jpeg_message(cinfo: &mut mozjpeg_sys::jpeg_common_struct, level: c_int) {
    // SAFETY: `cinfo.err` is the error manager this decoder was created with.
    let code = unsafe { (*cinfo.err).msg_code };
    if level < 0 && code == mozjpeg_sys::JWRN_JPEG_EOF as c_int {
        std::panic::resume_unwind(Box::new(JpegFailure::Truncated));
    }
}

/// libjpeg's decoding to RGB; `None` for colour spaces it does not convert to RGB (CMYK,
/// YCCK), which the `image` crate's decoder reads instead.
fn decode_jpeg(bytes: &[u8], source: &Path) -> Result<Option<RgbImage>> {
    let decode = || -> Result<Option<RgbImage>> {
        // SAFETY: a zeroed error manager filled in by libjpeg's own initializer, then given
        // this module's handlers, as libjpeg's documentation describes.
        let mut err: mozjpeg_sys::jpeg_error_mgr = unsafe { std::mem::zeroed() };
        unsafe { mozjpeg_sys::jpeg_std_error(&mut err) };
        err.error_exit = Some(jpeg_fatal);
        err.emit_message = Some(jpeg_message);
        let header = mozjpeg::Decompress::with_err(err)
            .from_mem(bytes)
            .map_err(|e| bad(source, format!("cannot read the JPEG header: {e}")))?;
        let (w, h) = (header.width(), header.height());
        check_dimensions(
            u32::try_from(w).unwrap_or(u32::MAX),
            u32::try_from(h).unwrap_or(u32::MAX),
            source,
        )?;
        if matches!(
            header.color_space(),
            mozjpeg_sys::J_COLOR_SPACE::JCS_CMYK | mozjpeg_sys::J_COLOR_SPACE::JCS_YCCK
        ) {
            return Ok(None);
        }
        let mut started = header
            .rgb()
            .map_err(|e| bad(source, format!("cannot decode the JPEG: {e}")))?;
        let pixels = started.read_scanlines::<u8>().map_err(|e| match e.kind() {
            std::io::ErrorKind::OutOfMemory => {
                Error::OutOfMemory(format!("image {} of {w}x{h} pixels", source.display()))
            }
            _ => bad(source, format!("cannot decode the JPEG: {e}")),
        })?;
        started
            .finish()
            .map_err(|e| bad(source, format!("cannot finish decoding the JPEG: {e}")))?;
        RgbImage::from_raw(w as u32, h as u32, pixels)
            .map(Some)
            .ok_or_else(|| bad(source, "the JPEG's scanlines are short".into()))
    };
    match std::panic::catch_unwind(decode) {
        Ok(result) => result,
        Err(payload) => Err(match payload.downcast::<JpegFailure>() {
            Ok(failure) => match *failure {
                JpegFailure::Truncated => bad(
                    source,
                    "the JPEG file is truncated (its data ends before the image does)".into(),
                ),
                JpegFailure::Fatal(message) => bad(source, format!("corrupt JPEG file: {message}")),
            },
            Err(_) => bad(source, "the JPEG decoder failed".into()),
        }),
    }
}

/// What an image's header says, read without decoding the pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderInfo {
    pub width: u32,
    pub height: u32,
    /// Bytes a decoded pixel takes (3 for RGB, 8 for 16-bit RGBA, ...).
    pub bytes_per_pixel: u8,
}

/// The size and pixel format an image held in memory announces, after checking its format
/// and its size against the limits (as [`decode_image`] does first).
pub fn header_info(bytes: &[u8], source: &Path) -> Result<HeaderInfo> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Io {
            path: source.to_path_buf(),
            source: e,
        })?;
    check_format(reader.format(), source)?;
    let decoder = reader
        .into_decoder()
        .map_err(|e| bad(source, format!("cannot read the image header: {e}")))?;
    let (width, height) = image::ImageDecoder::dimensions(&decoder);
    check_dimensions(width, height, source)?;
    Ok(HeaderInfo {
        width,
        height,
        bytes_per_pixel: image::ImageDecoder::color_type(&decoder).bytes_per_pixel(),
    })
}

/// `Image.open(...)` then transformers' `convert_to_rgb`: transparency is composited onto
/// white. 16-bit pictures come out as Pillow reads them: the high byte of each sample, except
/// 16-bit grey (Pillow's mode I;16), which is clipped to 0..=255.
pub fn to_rgb(image: &DynamicImage) -> RgbImage {
    let high = |v: u16| (v >> 8) as u8;
    match image {
        DynamicImage::ImageLuma16(grey) => {
            RgbImage::from_fn(grey.width(), grey.height(), |x, y| {
                let v = grey.get_pixel(x, y).0[0].min(255) as u8;
                image::Rgb([v, v, v])
            })
        }
        DynamicImage::ImageLumaA16(grey) => {
            composite_on_white(&RgbaImage::from_fn(grey.width(), grey.height(), |x, y| {
                let [l, a] = grey.get_pixel(x, y).0;
                image::Rgba([high(l), high(l), high(l), high(a)])
            }))
        }
        DynamicImage::ImageRgb16(rgb) => RgbImage::from_fn(rgb.width(), rgb.height(), |x, y| {
            image::Rgb(rgb.get_pixel(x, y).0.map(high))
        }),
        DynamicImage::ImageRgba16(rgba) => {
            composite_on_white(&RgbaImage::from_fn(rgba.width(), rgba.height(), |x, y| {
                image::Rgba(rgba.get_pixel(x, y).0.map(high))
            }))
        }
        other if other.color().has_alpha() => composite_on_white(&other.to_rgba8()),
        other => other.to_rgb8(),
    }
}

/// Pillow's `alpha_composite` of an image over opaque white, then `convert("RGB")`.
fn composite_on_white(rgba: &RgbaImage) -> RgbImage {
    const PRECISION_BITS: u32 = 7;
    let shift_div_255 = |a: u32| (a + (a >> 8)) >> 8;
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let src_a = u32::from(p[3]);
        if src_a == 0 {
            return image::Rgb([255, 255, 255]);
        }
        // dst is white and opaque: blend = 255 * (255 - a), outa255 = a * 255 + blend.
        let blend = 255 * (255 - src_a);
        let outa255 = src_a * 255 + blend;
        let coef1 = src_a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
        let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
        let channel = |c: u8| {
            let tmp = u32::from(c) * coef1 + 255 * coef2;
            (shift_div_255(tmp + (0x80 << PRECISION_BITS)) >> PRECISION_BITS) as u8
        };
        image::Rgb([channel(p[0]), channel(p[1]), channel(p[2])])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut out = Vec::new();
        RgbImage::from_pixel(width, height, image::Rgb([10, 200, 30]))
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn decodes_png_and_refuses_what_it_cannot_read() {
        let path = Path::new("t.png");
        let bytes = png(20, 10);
        let image = decode_image(&bytes, path).unwrap();
        assert_eq!((image.width(), image.height()), (20, 10));
        let err = decode_image(&bytes[..bytes.len() / 2], path).unwrap_err();
        assert!(err.to_string().contains("truncated or corrupt"), "{err}");
        let err = decode_image(b"GIF89a......", path).unwrap_err();
        assert!(
            err.to_string().contains("convert the image to PNG"),
            "{err}"
        );
        let err = decode_image(b"hello", path).unwrap_err();
        assert!(err.to_string().contains("expected PNG or JPEG"), "{err}");
    }

    fn jpeg(width: u32, height: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let image = RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([
                (x * 7 % 256) as u8,
                (y * 13 % 256) as u8,
                ((x ^ y) % 256) as u8,
            ])
        });
        image
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg)
            .unwrap();
        out
    }

    #[test]
    fn jpeg_bombs_and_truncated_jpegs_are_refused() {
        let path = Path::new("t.jpg");
        let good = jpeg(64, 48);
        let rgb = to_rgb(&decode_image(&good, path).unwrap());
        assert_eq!((rgb.width(), rgb.height()), (64, 48));
        // Cut inside the entropy-coded data: libjpeg would pad it with grey.
        let err = decode_image(&good[..good.len() * 2 / 3], path).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        // The baseline frame header's height and width, claiming 65500x65500.
        let sof = good.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        let mut bomb = good.clone();
        bomb[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xDC, 0xFF, 0xDC]);
        let err = decode_image(&bomb, path).unwrap_err();
        assert!(matches!(err, Error::LimitExceeded { .. }), "{err}");
        let err = decode_image(&good[..40], path).unwrap_err();
        assert!(matches!(err, Error::BadFile { .. }), "{err}");
    }

    /// PNG's chunk checksum (CRC-32, polynomial 0xEDB88320).
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// The fixtures of `scripts/fixtures/gen_image_fixtures.py`: Pillow's RGB of 16-bit PNGs and of a
    /// JPEG with an EXIF orientation.
    #[test]
    fn pictures_decode_as_pillow_reads_them() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/images");
        for name in [
            "grey16.png",
            "greyalpha16.png",
            "rgb16.png",
            "rgba16.png",
            "exif6.jpg",
        ] {
            let path = dir.join(name);
            let ours = open_image(&path).unwrap();
            let stem = name.split('.').next().unwrap();
            let pillow = open_image(&dir.join(format!("{stem}.rgb.png"))).unwrap();
            assert_eq!(ours.dimensions(), pillow.dimensions(), "{name}");
            assert_eq!(ours.as_raw(), pillow.as_raw(), "{name}");
            let info = header_info(&std::fs::read(&path).unwrap(), &path).unwrap();
            assert_eq!((info.width, info.height), ours.dimensions());
        }
        // Stored 12 wide and 8 high; EXIF asks viewers to turn it upright (8 x 12).
        assert_eq!(
            open_image(&dir.join("exif6.jpg")).unwrap().dimensions(),
            (12, 8)
        );
    }

    #[test]
    fn png_header_claiming_a_huge_picture_is_refused_before_decoding() {
        let mut bytes = png(4, 4);
        // IHDR's width and height follow the 8-byte signature, the length and the type.
        bytes[16..20].copy_from_slice(&60_000u32.to_be_bytes());
        bytes[20..24].copy_from_slice(&60_000u32.to_be_bytes());
        let crc = crc32(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        let err = decode_image(&bytes, Path::new("bomb.png")).unwrap_err();
        assert!(
            matches!(err, Error::LimitExceeded { .. }),
            "expected a limit error, got {err}"
        );
    }
}
