//! The `simpleseg` command line: a thin layer over the library crates.

mod data_cmds;
mod embedded;
mod eval_cmds;
mod model_cmds;
mod protocol_cmds;
mod train_cmds;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// SimpleSeg: segmentation as text. Models answer with an object's outline as a list of
/// [x, y] points normalized to [0, 1]; this tool turns such answers into masks, masks into
/// training targets, and scores them.
#[derive(Parser)]
#[command(name = "simpleseg", version, about, long_about = None, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
}

/// Write the built-in default model (used when --model is omitted) as a Hugging Face folder,
/// e.g. to load it in transformers or to fine-tune it with `train sft --init`.
#[derive(clap::Args)]
struct ExportModelArgs {
    /// Folder to write (created if missing).
    #[arg(long, value_name = "DIR")]
    out: std::path::PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Chat(args) => model_cmds::chat(args),
        Command::Segment(args) => model_cmds::segment(args),
        Command::Decode(args) => protocol_cmds::decode(args),
        Command::Data(command) => data_cmds::run(command),
        Command::Eval(args) => eval_cmds::eval(args),
        Command::Train(command) => train_cmds::run(command),
        Command::Target(args) => protocol_cmds::target(args),
        Command::Iou(args) => protocol_cmds::iou(args),
        Command::ExportModel(args) => embedded::export(&args.out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
