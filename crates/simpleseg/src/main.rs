//! The `simpleseg` command line: a thin layer over the library crates.

// Every unwrap or expect outside tests is a decision: a panic reachable from input is a bug.
#![warn(clippy::unwrap_used, clippy::expect_used)]

mod batch_cmd;
mod data_cmds;
mod eval_cmds;
mod interrupts;
mod model_cmds;
mod options;
mod protocol_cmds;
mod quantize_cmd;
mod serve_cmd;
mod train_cmds;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use simpleseg_core::limits::Limits;

// Training and inference allocate and free many short-lived tensors of the same few sizes.
// glibc's allocator spent a fifth of a tiny-model training step in malloc/free, and mimalloc
// with its default purging a seventh in the kernel zeroing pages it had just given back.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// SimpleSeg: segmentation as text. Models answer with an object's outline as a list of
/// [x, y] points normalized to [0, 1]; this tool turns such answers into masks, masks into
/// training targets, and scores them.
#[derive(Parser)]
#[command(name = "simpleseg", version, about, long_about = None, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Bounds on untrusted input, checked before anything is allocated; every command takes them.
#[derive(clap::Args)]
#[command(next_help_heading = "Input limits (raise them only for trusted input)")]
struct LimitArgs {
    /// Most pixels of a decoded image, a dense mask or a resized model input [default:
    /// 178956970, the size at which Pillow refuses a decompression bomb].
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_image_pixels: Option<u64>,
    /// Longest side of a decoded image in pixels [default: 65535].
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_image_side: Option<u32>,
    /// Largest image file read, in bytes [default: 536870912 (512 MiB)].
    #[arg(long, global = true, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    max_image_bytes: Option<u64>,
    /// Largest answer or text read from a file or standard input, in bytes [default: 16777216
    /// (16 MiB)].
    #[arg(long, global = true, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    max_text_bytes: Option<u64>,
    /// Largest data file read whole (JSON, JSON lines, pickles), in bytes [default:
    /// 2147483648 (2 GiB)].
    #[arg(long, global = true, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    max_data_bytes: Option<u64>,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        let d = Limits::DEFAULT;
        Limits {
            max_pixels: self.max_image_pixels.unwrap_or(d.max_pixels),
            max_side: self.max_image_side.unwrap_or(d.max_side),
            max_image_bytes: self.max_image_bytes.unwrap_or(d.max_image_bytes),
            max_text_bytes: self.max_text_bytes.unwrap_or(d.max_text_bytes),
            max_data_bytes: self.max_data_bytes.unwrap_or(d.max_data_bytes),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    Chat(model_cmds::ChatArgs),
    Segment(model_cmds::SegmentArgs),
    Decode(protocol_cmds::DecodeArgs),
    Eval(eval_cmds::EvalArgs),
    /// Train a model: SFT, then RL with an IoU reward.
    #[command(subcommand)]
    Train(train_cmds::TrainCommand),
    /// Make training and evaluation data.
    #[command(subcommand)]
    Data(data_cmds::DataCommand),
    Target(protocol_cmds::TargetArgs),
    Iou(protocol_cmds::IouArgs),
    ExportModel(ExportModelArgs),
    Quantize(quantize_cmd::QuantizeArgs),
    Serve(serve_cmd::ServeArgs),
}

/// Write the built-in default model (used when --model is omitted) as a Hugging Face folder,
/// e.g. to load it in transformers or to fine-tune it with `train sft --init`.
#[derive(clap::Args)]
struct ExportModelArgs {
    /// Folder to write (created if missing).
    #[arg(long, value_name = "DIR")]
    out: std::path::PathBuf,
}

/// `mi_option_purge_delay` in mimalloc.h (same value in its v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Keep freed memory for reuse instead of returning it to the OS: steps free and re-allocate
    // the same tensors, so returned pages come straight back zeroed by the kernel. A server
    // gives memory back after a burst of large requests instead (mimalloc's default delay).
    if !matches!(cli.command, Command::Serve(_)) {
        // SAFETY: sets a process-wide allocator option before any other thread exists.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
        interrupts::remove_outputs_on_signal();
    }
    simpleseg_core::limits::set_limits(cli.limits.limits());
    let result = match cli.command {
        Command::Chat(args) => on_worker(|| model_cmds::chat(args)),
        Command::Segment(args) => on_worker(|| model_cmds::segment(args)),
        Command::Decode(args) => protocol_cmds::decode(args),
        Command::Data(command) => data_cmds::run(command),
        Command::Eval(args) => eval_cmds::eval(args),
        Command::Train(command) => train_cmds::run(command),
        Command::Target(args) => protocol_cmds::target(args),
        Command::Iou(args) => protocol_cmds::iou(args),
        Command::ExportModel(args) => simpleseg_builtin::export(&args.out).map_err(Into::into),
        Command::Quantize(args) => quantize_cmd::quantize(args),
        Command::Serve(args) => serve_cmd::serve(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_message(&e));
            ExitCode::FAILURE
        }
    }
}

/// Runs `work` on one of rayon's worker threads, as the one job of a model command. The
/// engine's parallel loops called from outside the pool each hand their work to it and put the
/// calling thread to sleep until it is done, a wake-up per loop and hundreds per decoded token;
/// from a worker they split in place (Kimi-VL q4k decoding on 2 Xeon cores: 8-11% faster).
fn on_worker<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    // The workers get a main thread's stack, since the whole command runs on one of them
    // (rayon's default is 2 MiB). The pool's size stays RAYON_NUM_THREADS or the CPU count.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(8 << 20)
        .build_global();
    rayon::scope(|_| work())
}

/// The error and its causes, each cause once: the library errors already name their cause in
/// their own message (`PATH: No such file or directory`), which `{:#}` would repeat.
fn error_message(error: &anyhow::Error) -> String {
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message = format!("{message}: {cause}");
        }
    }
    message
}
