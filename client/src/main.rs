//! `ntctl`: the command line of nt. Offline verbs (`fuse`, `train`, `eval`,
//! `arch`) work on local files without any server.

mod cmd;
mod output;

use clap::{Parser, Subcommand};

use output::OutputFormat;

/// mimalloc, built with `override`, also serves libtorch's own allocations:
/// freed activation buffers are reused instead of being returned to the
/// kernel and faulted in again, which glibc's malloc does for large blocks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ntctl",
    version,
    about = "Neuron Transplantation: fuse ensembles into one model"
)]
struct Cli {
    /// Output format: human-readable text or JSON for scripts.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "NT_OUTPUT"
    )]
    output: OutputFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fuse member checkpoints into one model (offline, no server).
    Fuse(cmd::fuse::FuseArgs),
    /// Train a member, or fine-tune a fused model with --init (offline).
    Train(Box<cmd::train::TrainArgs>),
    /// Evaluate models and their output-averaging ensemble on a test set.
    Eval(cmd::eval::EvalArgs),
    /// List the architecture presets or print one as a spec file.
    Arch(cmd::arch::ArchArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Fuse(args) => cmd::fuse::run(args, cli.output),
        Command::Train(args) => cmd::train::run(*args, cli.output),
        Command::Eval(args) => cmd::eval::run(args, cli.output),
        Command::Arch(args) => cmd::arch::run(args, cli.output),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
