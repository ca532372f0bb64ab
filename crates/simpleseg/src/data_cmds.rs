//! `data synth`, `data sft`, `data rl`: making training and evaluation data.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use simpleseg_core::templates::DEFAULT_PROMPT;
use simpleseg_data::builders::{
    rl_records, sft_records, write_records, BuildStats, SftOptions, Task,
};
use simpleseg_data::formats::{write_verl_parquet, SftFormat};
use simpleseg_data::items::{by_image, coco_items, mask_folder_items, refer_items, Item};
use simpleseg_data::synth::{generate, SynthOptions};
use simpleseg_data::ReferDataset;

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    Synth(SynthArgs),
    Sft(SftArgs),
    Rl(RlArgs),
}

/// Generate synthetic referring-segmentation scenes in the refer layout (dataset `synth`).
#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Random seed; training, validation and test sets should use different seeds.
    #[arg(long)]
    seed: u64,
    /// Number of images.
    #[arg(long, value_parser = crate::options::at_least_one)]
    count: usize,
    /// Refer root to write (or add a split to).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Split name.
    #[arg(long, default_value = "train")]
    split: String,
    /// Image side in pixels (32 to 4096).
    #[arg(long, default_value_t = 112, value_parser = clap::value_parser!(u32).range(32..=4096))]
    size: u32,
    /// Dataset name (another name than `synth` lays the set out as that dataset would be).
    #[arg(long, default_value = "synth")]
    name: String,
    /// Most shapes per scene (1 to 6).
    #[arg(long, default_value_t = 6, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=6))]
    max_objects: usize,
}

/// Where objects come from: refer-format datasets, a COCO instances file, or a mask folder.
#[derive(Args, Debug)]
pub struct SourceArgs {
    /// Root of refer-format datasets (NAME/refs(SPLITBY).p, NAME/instances.json, images/...).
    #[arg(long, value_name = "DIR")]
    refer_root: Option<PathBuf>,
    /// Comma-separated dataset names under --refer-root.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "refcoco,refcoco+,refcocog,refclef"
    )]
    datasets: Vec<String>,
    /// Split to use.
    #[arg(long, default_value = "train")]
    split: String,
    /// Override the split-by of every dataset (unc, umd, google, berkeley).
    #[arg(long)]
    split_by: Option<String>,
    /// Folder holding the images (default: the dataset's usual folder under --refer-root).
    #[arg(long, value_name = "DIR")]
    image_root: Option<PathBuf>,
    /// A plain COCO instances_*.json instead: one object per annotation, named by category.
    #[arg(
        long,
        value_name = "F",
        conflicts_with = "refer_root",
        requires = "image_root"
    )]
    coco_instances: Option<PathBuf>,
    /// A folder of images and mask PNGs with queries.jsonl instead.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["refer_root", "coco_instances"])]
    mask_folder: Option<PathBuf>,
}

impl SourceArgs {
    /// What the objects come from, for verl's `data_source`: the datasets, the COCO file's
    /// name or the mask folder's.
    fn names(&self) -> String {
        let file_name = |p: &PathBuf| {
            p.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        };
        match (&self.coco_instances, &self.mask_folder) {
            (Some(f), _) => file_name(f),
            (_, Some(d)) => file_name(d),
            _ => self.datasets.join(","),
        }
    }

    /// The objects of the chosen split, dataset after dataset, grouped by image.
    pub fn items(&self) -> Result<Vec<Item>> {
        if let Some(instances) = &self.coco_instances {
            let Some(root) = &self.image_root else {
                bail!("--coco-instances needs --image-root (the folder of its images)");
            };
            return Ok(coco_items(instances, root)?);
        }
        if let Some(dir) = &self.mask_folder {
            return Ok(mask_folder_items(dir, Some(&self.split))?);
        }
        let Some(root) = &self.refer_root else {
            bail!("give --refer-root (or --coco-instances, or --mask-folder)");
        };
        let mut items = Vec::new();
        simpleseg_data::check_name("--split", &self.split)?;
        for name in &self.datasets {
            simpleseg_data::check_name("--datasets", name)?;
            let ds = ReferDataset::load(
                root,
                name,
                self.split_by.as_deref(),
                self.image_root.as_deref(),
            )
            .with_context(|| format!("loading dataset {name}"))?;
            let split: Vec<Item> = refer_items(&ds, &self.split)?;
            if split.is_empty() {
                eprintln!("warning: {name} has no refs in split {:?}", self.split);
            }
            items.extend(by_image(&split).into_iter().cloned());
        }
        Ok(items)
    }
}

/// Build SFT data as the released data script does (two passes, random templates).
#[derive(Args, Debug)]
pub struct SftArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Output: .json (indented like the original) or .jsonl.
    #[arg(long, value_name = "F")]
    out: PathBuf,
    /// Record format: simpleseg (the released script's `conversations`), llamafactory
    /// (`messages` with `<image>` + `images`) or trl (`messages` with typed content parts +
    /// `images`). Image paths are relative to --refer-root (LLaMA-Factory: its media_dir).
    #[arg(long, value_enum, default_value = "simpleseg")]
    format: SftFormatArg,
    /// Seed of the template choices.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Passes over the data (the script makes 2).
    #[arg(long, default_value_t = 2, value_parser = crate::options::at_least_one)]
    passes: usize,
    /// approxPolyDP epsilon as a fraction of each contour's length.
    #[arg(long, default_value_t = simpleseg_core::target::DEFAULT_EPSILON_RATIO)]
    epsilon_ratio: f64,
    /// Pairs to build: text-mask (the script's), point-mask, box-mask, text-box, text-point,
    /// point-text (region captioning: a point on the object -> its expression).
    #[arg(long, value_delimiter = ',', default_value = "text-mask")]
    tasks: Vec<Task>,
}

/// Build RL data: one row per expression with the ground-truth mask as RLE: simpleseg's JSON
/// lines (`train rl` reads them), or a parquet file of verl's RLHF dataset rows.
#[derive(Args, Debug)]
pub struct RlArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Output: a JSON lines file (simpleseg), or a .parquet file (verl).
    #[arg(long, value_name = "F.jsonl|F.parquet")]
    out: PathBuf,
    /// Row format: simpleseg (`{ref_id, sent_id, image, width, height, prompt, rle}` lines) or
    /// verl (parquet: data_source, prompt as chat messages with `<image>`, images with the
    /// image file's bytes, ability, reward_model.ground_truth = the mask's RLE JSON for
    /// simpleseg.verl.compute_score, extra_info).
    #[arg(long, value_enum, default_value = "simpleseg")]
    format: RlFormatArg,
    /// The prompt; {query} is replaced by the expression.
    #[arg(long, default_value = DEFAULT_PROMPT)]
    prompt_template: String,
}

fn report(stats: &BuildStats, out: &std::path::Path) {
    eprintln!(
        "{} objects -> {} records in {:.1}s ({:.0} objects/s), wrote {}",
        stats.objects,
        stats.records,
        stats.seconds,
        stats.objects_per_second,
        out.display()
    );
}

/// SFT record formats.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SftFormatArg {
    /// The released data script's `conversations` records.
    Simpleseg,
    /// LLaMA-Factory's multimodal `messages` + `images`.
    Llamafactory,
    /// TRL's conversational vision records.
    Trl,
}

/// RL row formats.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RlFormatArg {
    /// JSON lines for `train rl`.
    Simpleseg,
    /// verl's RLHF dataset parquet.
    Verl,
}

pub fn run(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Synth(a) => {
            simpleseg_data::check_name("--name", &a.name)?;
            simpleseg_data::check_name("--split", &a.split)?;
            let stats = generate(
                &a.out,
                &SynthOptions {
                    seed: a.seed,
                    count: a.count,
                    split: a.split.clone(),
                    size: a.size,
                    name: a.name.clone(),
                    max_objects: a.max_objects,
                },
            )?;
            println!(
                "{} images, {} objects, {} expressions written as split {:?} of {}",
                stats.images,
                stats.refs,
                stats.sentences,
                a.split,
                a.out.join(&a.name).display()
            );
        }
        DataCommand::Sft(a) => {
            let items = a.source.items()?;
            let refs: Vec<&Item> = items.iter().collect();
            let options = SftOptions {
                seed: a.seed,
                passes: a.passes,
                epsilon_ratio: a.epsilon_ratio,
                tasks: a.tasks.clone(),
                format: match a.format {
                    SftFormatArg::Simpleseg => SftFormat::Simpleseg,
                    SftFormatArg::Llamafactory => SftFormat::LlamaFactory,
                    SftFormatArg::Trl => SftFormat::Trl,
                },
            };
            let (records, stats) = sft_records(&refs, &options)?;
            write_records(&a.out, &records)?;
            report(&stats, &a.out);
        }
        DataCommand::Rl(a) => {
            let parquet = a.out.extension().is_some_and(|e| e == "parquet");
            match (a.format, parquet) {
                (RlFormatArg::Verl, false) => {
                    bail!("--format verl writes parquet: name --out F.parquet")
                }
                (RlFormatArg::Simpleseg, true) => {
                    bail!("parquet is verl's format: add --format verl, or name --out F.jsonl")
                }
                _ => {}
            }
            let items = a.source.items()?;
            let refs: Vec<&Item> = items.iter().collect();
            match a.format {
                RlFormatArg::Simpleseg => {
                    let (records, stats) = rl_records(&refs, &a.prompt_template)?;
                    write_records(&a.out, &records)?;
                    report(&stats, &a.out);
                }
                RlFormatArg::Verl => {
                    let start = std::time::Instant::now();
                    let rows = write_verl_parquet(
                        &a.out,
                        &refs,
                        &a.prompt_template,
                        &format!("simpleseg/{}", a.source.names()),
                        &a.source.split,
                    )?;
                    eprintln!(
                        "{} objects -> {rows} rows in {:.1}s, wrote {}",
                        refs.len(),
                        start.elapsed().as_secs_f64(),
                        a.out.display()
                    );
                }
            }
        }
    }
    Ok(())
}
