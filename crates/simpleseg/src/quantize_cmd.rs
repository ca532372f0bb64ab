//! `quantize`: writes a quantized copy of a model folder, optionally gated by how closely the
//! quantized model's masks agree with the original's on a referring split.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use simpleseg_core::templates::DEFAULT_PROMPT;
use simpleseg_core::{CoordMode, ParseMode};
use simpleseg_data::items::refer_items;
use simpleseg_data::ReferDataset;
use simpleseg_engine::{HfFolder, LoadOptions};
use simpleseg_eval::agreement::{compare, Expressions};
use simpleseg_eval::runner::samples;

use crate::options::{at_least_one, fraction, ModelArgs, QuantizeArg};

/// Write a quantized copy of a model folder: the language model's linear layers (and experts)
/// in GGUF (`model.gguf`) beside the unchanged config, tokenizer, template and processor files.
/// The folder loads directly with `--model` and memory-maps its weights. With --check-*, both
/// models first answer the same expressions greedily; the folder is written only if their masks
/// agree (mean IoU >= --min-agreement), and quantization.json records the comparison.
#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// The model folder to quantize, and how the check runs both models (`--quantize` names
    /// the format, as --format does).
    #[command(flatten)]
    model: ModelArgs,
    /// q8_0 (8.5 bits per weight) or q4k (4.5 bits; layers whose rows are not a multiple of
    /// 256 get q4_0, and those not a multiple of 32 stay as stored).
    #[arg(
        long,
        value_enum,
        value_name = "FORMAT",
        required_unless_present = "quantize",
        conflicts_with = "quantize"
    )]
    format: Option<QuantizeArg>,
    /// Folder to write; it must not exist. Nothing is left there if the run fails or the check
    /// refuses the model.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Folder of refer-format datasets for the agreement check.
    #[arg(long, value_name = "DIR", requires_all = ["check_dataset", "check_split"])]
    check_refer_root: Option<PathBuf>,
    /// Dataset of the check (a folder under --check-refer-root).
    #[arg(long, value_name = "NAME", requires = "check_refer_root")]
    check_dataset: Option<String>,
    /// Split of the check.
    #[arg(long, value_name = "SPLIT", requires = "check_refer_root")]
    check_split: Option<String>,
    /// Only the first N expressions of the split.
    #[arg(long, value_name = "N", value_parser = at_least_one, requires = "check_refer_root")]
    check_limit: Option<usize>,
    /// Which refs(SPLIT_BY).p to read (default: the dataset's usual one).
    #[arg(long, value_name = "SPLIT_BY", requires = "check_refer_root")]
    check_split_by: Option<String>,
    /// Folder holding the check's images (default: the dataset's usual folder).
    #[arg(long, value_name = "DIR", requires = "check_refer_root")]
    check_image_root: Option<PathBuf>,
    /// Least mean mask IoU between the two models for the folder to be written.
    #[arg(long, value_name = "F", default_value_t = 0.9, value_parser = fraction)]
    min_agreement: f64,
    /// Write the folder even when the check finds less agreement than --min-agreement.
    #[arg(long)]
    force: bool,
}

/// Where the folder is written before it is moved into place.
fn staging_dir(out: &Path) -> Result<PathBuf> {
    let name = out
        .file_name()
        .with_context(|| format!("--out {} names no folder", out.display()))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok(parent.join(format!(".{}.partial", name.to_string_lossy())))
}

/// Removes the staging folder unless disarmed: nothing half-written survives a failure.
struct Staging(Option<PathBuf>);

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

pub fn quantize(args: QuantizeArgs) -> Result<()> {
    let Some(format) = args.format.or(args.model.quantize).map(QuantizeArg::format) else {
        bail!("name the format with --format q8_0 or --format q4k");
    };
    let (src_dir, src_name) = (args.model.dir()?, args.model.model_name());
    let src = HfFolder::open(&src_dir)?;
    if args.out.exists() {
        bail!(
            "{} exists already; remove it or choose another --out",
            args.out.display()
        );
    }
    let staging = staging_dir(&args.out)?;
    if staging.exists() {
        // Left by an interrupted run.
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("removing {}", staging.display()))?;
    }
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let guard = Staging(Some(staging.clone()));

    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "quantizing [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let summary =
        simpleseg_engine::quantize::quantize_folder(&src, format, &staging, |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        })?;
    bar.finish_and_clear();

    let mut record = json!({
        "format": format.name(),
        "source": src_name,
        "vision_tower": "kept as stored (not quantized)",
        "tensors_by_type": summary.tensors_by_type,
        "source_bytes": summary.source_bytes,
        "written_bytes": summary.written_bytes,
        "check": null,
    });
    let mut refused = None;
    if let (Some(root), Some(dataset), Some(split)) = (
        &args.check_refer_root,
        &args.check_dataset,
        &args.check_split,
    ) {
        let ds = ReferDataset::load(
            root,
            dataset,
            args.check_split_by.as_deref(),
            args.check_image_root.as_deref(),
        )
        .with_context(|| format!("loading {dataset}"))?;
        let items = refer_items(&ds, split)?;
        let chosen = samples(&items, args.check_limit);
        if chosen.is_empty() {
            bail!("{dataset} has no expressions in split {split:?}");
        }
        // The reference as stored: --quantize names what is written, not how it loads.
        let options = LoadOptions {
            quantize: None,
            ..args.model.load_options()?
        };
        let reference = simpleseg_engine::load(&src_dir, &options)
            .with_context(|| format!("loading {}", src_dir.display()))?;
        let candidate =
            simpleseg_engine::load(&staging, &options).context("loading the quantized folder")?;
        let agreement = compare(
            reference.as_ref(),
            candidate.as_ref(),
            Expressions {
                items: &items,
                samples: &chosen,
                prompt_template: DEFAULT_PROMPT,
                mode: ParseMode::Official,
                coords: CoordMode::Normalized,
            },
            true,
        )?;
        let passed = agreement.mean_mask_iou >= args.min_agreement;
        eprintln!(
            "{} expressions: mean mask IoU between the models {:.4} ({:.1}% >= 0.9), gIoU {:.4} (original) vs {:.4} ({}), token agreement {:.4}",
            agreement.n,
            agreement.mean_mask_iou,
            100.0 * agreement.share_at_least_0_9,
            agreement.giou_reference,
            agreement.giou_candidate,
            format.name(),
            agreement.token_agreement,
        );
        record["check"] = json!({
            "refer_root": root,
            "dataset": dataset,
            "split": split,
            "limit": args.check_limit,
            "prompt_template": DEFAULT_PROMPT,
            "decoding": "greedy",
            "min_agreement": args.min_agreement,
            "passed": passed,
            "forced": !passed && args.force,
            "agreement": agreement,
        });
        if !passed && !args.force {
            refused = Some(agreement.mean_mask_iou);
        }
    }
    let text = serde_json::to_string_pretty(&record)?;
    if let Some(mean) = refused {
        println!("{text}");
        bail!(
            "the {} model's masks agree with the original's at a mean IoU of {mean:.4}, below --min-agreement {}; nothing was written (--force writes it anyway)",
            format.name(),
            args.min_agreement
        );
    }
    std::fs::write(staging.join("quantization.json"), format!("{text}\n"))
        .context("writing quantization.json")?;
    std::fs::rename(&staging, &args.out)
        .with_context(|| format!("moving the folder to {}", args.out.display()))?;
    std::mem::forget(guard);
    println!(
        "wrote {} ({} MB of weights from {} MB)",
        args.out.display(),
        summary.written_bytes / 1_000_000,
        summary.source_bytes / 1_000_000
    );
    Ok(())
}
