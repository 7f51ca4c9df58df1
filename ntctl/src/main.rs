//! `ntctl`: the command line of nt. `submit`, `watch`, `get`, `list`,
//! `cancel`, `events`, `report`, `upload` and `download` talk to a
//! coordinator; `run --local` runs a spec with an in-process coordinator
//! and worker; `fuse`, `train`, `eval` and `arch` work on local files
//! without any server.

mod cmd;
mod output;

use clap::{Parser, Subcommand};
use nt_client::ConnectArgs;

use output::{Exit, OutputFormat};

/// mimalloc, built with `override`, also serves libtorch's own allocations:
/// freed activation buffers are reused instead of being returned to the
/// kernel and faulted in again, which glibc's malloc does for large blocks.
/// Counted, so the in-process coordinator can report a fusion's peak memory.
#[global_allocator]
static ALLOCATOR: fusion::heap::Counting<mimalloc::MiMalloc> =
    fusion::heap::Counting(mimalloc::MiMalloc);

#[derive(Parser)]
#[command(
    name = "ntctl",
    version,
    about = "Neuron Transplantation: fuse ensembles into one model",
    after_help = "Connection settings come from flags, then NT_ENDPOINT / NT_TOKEN / NT_TLS_CA / NT_TLS_DOMAIN, \
                  then ~/.config/nt/ntctl.yaml (or $NT_CONFIG).\n\
                  Exit codes: 0 ok, 1 error, 2 run failed or cancelled, 3 quality gate missed."
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

    #[command(flatten)]
    connect: ConnectArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a spec end to end on this machine: in-process coordinator and
    /// worker, local store (the embedded default).
    Run(Box<cmd::run_local::RunArgs>),
    /// Repeat a run spec over seeds and member counts and aggregate the
    /// comparison (mean and standard deviation, curves with bands).
    Experiment(Box<cmd::experiment::ExperimentArgs>),
    /// Submit a run spec to a coordinator (--wait to follow it to its end);
    /// member checkpoints that are local files are uploaded first.
    Submit(Box<cmd::remote::SubmitArgs>),
    /// Follow a run with progress bars until it ends, then print its report.
    Watch(cmd::remote::RunIdArgs),
    /// A run's state, report table and unfinished tasks.
    Get(cmd::remote::RunIdArgs),
    /// Runs, newest first.
    List(cmd::remote::ListArgs),
    /// Cancel a run.
    Cancel(cmd::remote::CancelArgs),
    /// A run's events.
    Events(cmd::remote::EventsArgs),
    /// A run's report as text, Markdown, JSON or CSV, and its curves as a PNG.
    Report(cmd::remote::ReportArgs),
    /// Upload checkpoints through the coordinator; prints the keys a run spec can name.
    Upload(cmd::transfer::UploadArgs),
    /// Download a run's models or report through the coordinator.
    Download(cmd::transfer::DownloadArgs),
    /// Fuse member checkpoints into one model (offline, no server).
    Fuse(cmd::fuse::FuseArgs),
    /// Train a member, or fine-tune a fused model with --init (offline).
    Train(Box<cmd::train::TrainArgs>),
    /// Evaluate models and their output-averaging ensemble on a test set (offline).
    Eval(cmd::eval::EvalArgs),
    /// List the architecture presets or print one as a spec file.
    Arch(cmd::arch::ArchArgs),
    /// Load, export or upload data sets (image folders and arrays).
    Data(cmd::data::DataCmdArgs),
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let output = cli.output;
    let connect = cli.connect;
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
    };
    match cli.command {
        Command::Fuse(args) => cmd::fuse::run(args, output),
        Command::Train(args) if args.trains_members() => cmd::train_members::run(*args, output),
        Command::Train(args) => cmd::train::run(*args, output),
        Command::Eval(args) => cmd::eval::run(args, output),
        Command::Arch(args) => cmd::arch::run(args, output),
        Command::Data(args) => runtime()?.block_on(cmd::data::run(args, output)),
        Command::Run(args) => runtime()?.block_on(cmd::run_local::run(*args, &connect, output)),
        Command::Experiment(args) => {
            runtime()?.block_on(cmd::experiment::run(*args, &connect, output))
        }
        Command::Submit(args) => runtime()?.block_on(cmd::remote::submit(*args, &connect, output)),
        Command::Watch(args) => runtime()?.block_on(cmd::remote::watch(args, &connect, output)),
        Command::Get(args) => runtime()?.block_on(cmd::remote::get(args, &connect, output)),
        Command::List(args) => runtime()?.block_on(cmd::remote::list(args, &connect, output)),
        Command::Cancel(args) => runtime()?.block_on(cmd::remote::cancel(args, &connect, output)),
        Command::Events(args) => runtime()?.block_on(cmd::remote::events(args, &connect, output)),
        Command::Report(args) => runtime()?.block_on(cmd::remote::report(args, &connect, output)),
        Command::Upload(args) => runtime()?.block_on(cmd::transfer::upload(args, &connect, output)),
        Command::Download(args) => {
            runtime()?.block_on(cmd::transfer::download(args, &connect, output))
        }
    }
}

fn main() {
    // A closed stdout (`ntctl list | head`) makes println! panic; end quietly
    // instead, with the shell's code for SIGPIPE. SIGPIPE itself stays
    // ignored: sockets to a vanished peer raise it too.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info);
    }));
    if let Err(e) = nt_client::config::apply() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    // Exit codes 2 and 3 mean a failed run and a missed gate, so a usage
    // error exits 1 (help and version still exit 0).
    let cli = Cli::try_parse().unwrap_or_else(|e| {
        let _ = e.print();
        std::process::exit(if e.use_stderr() { 1 } else { 0 });
    });
    if let Err(e) = run(cli) {
        let code = e.downcast_ref::<Exit>().map_or(1, |x| x.code);
        eprintln!("error: {e:#}");
        std::process::exit(code);
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks its definitions only when a command is parsed in a debug
    /// build; this checks every subcommand's (two flags of one name slipped
    /// into `experiment` once).
    #[test]
    fn every_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
