//! `decode`, `target` and `iou`: the point protocol on the command line.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use simpleseg_core::images::open_image;
use simpleseg_core::io::{encode_mask_png, read_mask_png, read_rle_json, Outputs};
use simpleseg_core::limits::{read_file_bounded, read_to_end_bounded, Limit};
use simpleseg_core::overlay::draw_overlay;
use simpleseg_core::pyrepr::float_repr;
use simpleseg_core::segment::Segmentation;
use simpleseg_core::target::{target_from_rle, DEFAULT_EPSILON_RATIO};
use simpleseg_core::{parse_answer, CoordMode, ParseMode, ParsedAnswer, RleMask};

use crate::options::{CoordsArg, MaskOutputs, ModeArg};

/// Decode a model answer into a mask: the union of all polygons in it, rasterized exactly as
/// pycocotools does. Boxes, points, \boxed{} and fenced blocks are reported with --json.
#[derive(Args, Debug)]
pub struct DecodeArgs {
    /// File holding the model's answer ('-' reads standard input).
    #[arg(long, value_name = "F")]
    response_file: PathBuf,
    /// Image width in pixels (or give --image).
    #[arg(long, value_name = "W", requires = "height")]
    width: Option<u32>,
    /// Image height in pixels (or give --image).
    #[arg(long, value_name = "H", requires = "width")]
    height: Option<u32>,
    /// The image the answer is about: gives the size, and the background of --overlay-out.
    #[arg(long, value_name = "I")]
    image: Option<PathBuf>,
    /// Parse mode: `official` matches published numbers.
    #[arg(long, value_enum, default_value = "official")]
    mode: ModeArg,
    /// Coordinate convention of the answer.
    #[arg(long, value_enum, default_value = "normalized")]
    coords: CoordsArg,
    #[command(flatten)]
    outputs: MaskOutputs,
    /// Print one JSON object: polygons, boxes, points, warnings, area, bbox and the RLE.
    #[arg(long)]
    json: bool,
}

/// Print the training target for a mask: its outline as the answer text the released data
/// script writes (external contours, approxPolyDP, normalized, rounded to 3 decimals).
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["mask", "rle"])))]
pub struct TargetArgs {
    /// Mask image; any non-zero pixel is foreground.
    #[arg(long, value_name = "M.png")]
    mask: Option<PathBuf>,
    /// Mask as RLE JSON.
    #[arg(long, value_name = "R.json")]
    rle: Option<PathBuf>,
    /// approxPolyDP epsilon as a fraction of each contour's length.
    #[arg(long, default_value_t = DEFAULT_EPSILON_RATIO, value_name = "RATIO")]
    epsilon_ratio: f64,
}

/// Print the intersection over union of two RLE masks of the same size.
#[derive(Args, Debug)]
pub struct IouArgs {
    /// The first mask, as RLE JSON ({"size": [H, W], "counts": ...}, compressed or not).
    #[arg(long, value_name = "A.json")]
    rle_a: PathBuf,
    /// The second mask, the same size.
    #[arg(long, value_name = "B.json")]
    rle_b: PathBuf,
}

/// Reads an answer from a file or standard input (`-`), at most the text byte limit.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = if path == Path::new("-") {
        read_to_end_bounded(
            std::io::stdin().lock(),
            Limit::TextBytes,
            Path::new("standard input"),
        )?
    } else {
        read_file_bounded(path, Limit::TextBytes)?
    };
    // Model output is untrusted: keep going on invalid UTF-8, as the replacement characters
    // cannot form numbers.
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Writes the requested mask outputs, all or none; returns the paths written.
pub fn write_outputs(
    outputs: &MaskOutputs,
    segmentation: &Segmentation,
    image: Option<&image::RgbImage>,
) -> Result<Vec<PathBuf>> {
    let mask = &segmentation.mask;
    let mut staged = Outputs::default();
    if let Some(path) = &outputs.rle_out {
        staged.add(path, |w| {
            writeln!(w, "{}", mask.to_json_value()).map_err(|e| e.to_string())
        })?;
    }
    if let Some(path) = &outputs.mask_out {
        staged.add(path, |w| {
            encode_mask_png(mask, w).map_err(|e| e.to_string())
        })?;
    }
    if let Some(path) = &outputs.overlay_out {
        let Some(image) = image else {
            bail!("--overlay-out needs --image (the picture to draw the mask on)");
        };
        let format = image::ImageFormat::from_path(path)
            .with_context(|| format!("{}: name the overlay .png or .jpg", path.display()))?;
        let overlay = draw_overlay(image, mask)?;
        staged.add(path, |w| {
            overlay.write_to(w, format).map_err(|e| e.to_string())
        })?;
    }
    if let Some(path) = &outputs.svg_out {
        staged.add(path, |w| {
            w.write_all(segmentation.svg_document().as_bytes())
                .map_err(|e| e.to_string())
        })?;
    }
    Ok(staged.commit()?)
}

/// The JSON report of a decoded answer, shared by `decode --json` and `segment --json`.
pub fn answer_json(parsed: &ParsedAnswer, coords: CoordMode, mask: &RleMask) -> serde_json::Value {
    let mut report = parsed.to_json_value();
    for (key, value) in [
        ("coords", json!(coords)),
        ("width", json!(mask.width())),
        ("height", json!(mask.height())),
        ("area", json!(mask.area())),
        ("bbox", json!(mask.bbox())),
        ("rle", mask.to_json_value()),
    ] {
        report[key] = value;
    }
    report
}

pub fn decode(args: DecodeArgs) -> Result<()> {
    if args.outputs.overlay_out.is_some() && args.image.is_none() {
        bail!("--overlay-out needs --image (the picture to draw the mask on)");
    }
    let text = read_text(&args.response_file)?;
    let image = args.image.as_deref().map(open_image).transpose()?;
    let (width, height) = match (&image, args.width, args.height) {
        (_, Some(w), Some(h)) => (w, h),
        (Some(img), _, _) => (img.width(), img.height()),
        _ => bail!("give the image size with --width and --height, or --image"),
    };
    if let Some(img) = &image {
        if (img.width(), img.height()) != (width, height) {
            bail!(
                "--width/--height {width}x{height} differ from the image's {}x{}",
                img.width(),
                img.height()
            );
        }
    }
    let mode = ParseMode::from(args.mode);
    let coords = CoordMode::from(args.coords);
    let parsed = parse_answer(&text, mode);
    let segmentation = Segmentation::from_parsed(&parsed, width, height, coords)?;
    let mask = &segmentation.mask;
    let written = write_outputs(&args.outputs, &segmentation, image.as_ref())?;
    if args.json {
        println!("{}", answer_json(&parsed, coords, mask));
    } else {
        for w in &parsed.warnings {
            eprintln!("warning: {}", w.message);
        }
        println!(
            "{} polygon{} ({} mode, {} coordinates), mask {}x{} with {} foreground pixels",
            parsed.polygons.len(),
            if parsed.polygons.len() == 1 { "" } else { "s" },
            mode,
            coords,
            width,
            height,
            mask.area()
        );
        for path in written {
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}

pub fn target(args: TargetArgs) -> Result<()> {
    let mask = match (&args.mask, &args.rle) {
        (Some(png), _) => read_mask_png(png)?,
        (None, Some(rle)) => read_rle_json(rle)?,
        (None, None) => unreachable!("clap requires one input"),
    };
    println!("{}", target_from_rle(&mask, args.epsilon_ratio)?);
    Ok(())
}

pub fn iou(args: IouArgs) -> Result<()> {
    let a = read_rle_json(&args.rle_a)?;
    let b = read_rle_json(&args.rle_b)?;
    let iou = a.iou(&b).with_context(|| {
        format!(
            "comparing {} with {}",
            args.rle_a.display(),
            args.rle_b.display()
        )
    })?;
    println!("{}", float_repr(iou));
    Ok(())
}
