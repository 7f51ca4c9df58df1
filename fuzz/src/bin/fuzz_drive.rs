//! Mutation-driven fuzzing of nt's parsers on the stable toolchain.
//!
//! For each target: replays its corpus, then mutates corpus entries (stacked
//! byte, token and field mutations) for a time or an execution budget. A
//! panic is caught, its input saved as `crash-*` and counted; an input whose
//! outcome signature was never seen joins the pool (and, small ones, the
//! corpus as `new-*`): a cheap proxy for the coverage feedback a
//! coverage-guided fuzzer would use. A summary goes to `bench/results/fuzz.md`.

use std::collections::{BTreeMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use nt_fuzz::mutate::{mutate, set_extreme, Rng};
use nt_fuzz::{corpus, Target};
use nt_proto::prost::Message;
use nt_proto::v1 as pb;

#[derive(Parser, Debug)]
#[command(about = "Fuzz nt's checkpoint, spec and request parsers")]
struct Args {
    /// Targets to fuzz (checkpoint, run_spec, arch_spec, request); all when none.
    #[arg(long = "target", env = "NT_FUZZ_TARGETS", value_delimiter = ',')]
    targets: Vec<String>,
    /// Seconds per target.
    #[arg(long, env = "NT_FUZZ_SECONDS", default_value_t = 60.0)]
    seconds: f64,
    /// Executions per target at most (0: no limit).
    #[arg(long, env = "NT_FUZZ_EXECS", default_value_t = 0)]
    execs: u64,
    /// Seed of the mutations.
    #[arg(long, env = "NT_FUZZ_SEED", default_value_t = 1)]
    seed: u64,
    /// Largest input made, in bytes.
    #[arg(long, env = "NT_FUZZ_MAX_LEN", default_value_t = 64 * 1024)]
    max_len: usize,
    /// Most new-outcome inputs written to the corpus per target (the rest stay in memory).
    #[arg(long, env = "NT_FUZZ_MAX_NEW", default_value_t = 25)]
    max_new: usize,
    /// An input slower than this many milliseconds is saved as `slow-*`.
    #[arg(long, env = "NT_FUZZ_SLOW_MS", default_value_t = 1000)]
    slow_ms: u64,
    /// The corpus folder.
    #[arg(long, env = "NT_FUZZ_CORPUS", default_value_os_t = corpus::root())]
    corpus: PathBuf,
    /// Writes the request seeds (encoded from the run-spec seeds) and exits.
    #[arg(long)]
    write_seeds: bool,
    /// Where the summary goes (markdown).
    #[arg(long, env = "NT_FUZZ_RESULTS", default_value = "bench/results/fuzz.md")]
    results: PathBuf,
}

struct Summary {
    target: Target,
    execs: u64,
    seconds: f64,
    corpus_before: usize,
    outcomes: usize,
    saved: usize,
    crashes: u64,
    crash_messages: BTreeMap<String, String>,
    slowest_ms: f64,
}

#[global_allocator]
static ALLOCATOR: nt_fuzz::guard::Guard = nt_fuzz::guard::Guard;

static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn main() -> Result<()> {
    let args = Args::parse();
    if args.write_seeds {
        let dir = corpus::dir(&args.corpus, Target::Request);
        std::fs::create_dir_all(&dir)?;
        for (name, data) in corpus::request_seeds(&args.corpus)? {
            std::fs::write(dir.join(name), data)?;
        }
        return Ok(());
    }
    let targets = if args.targets.is_empty() {
        Target::ALL.to_vec()
    } else {
        args.targets
            .iter()
            .map(|n| Target::from_name(n).with_context(|| format!("no target `{n}`")))
            .collect::<Result<_>>()?
    };
    std::panic::set_hook(Box::new(|info| {
        let payload = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!(" at {l}"))
            .unwrap_or_default();
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = Some(format!("{}{at}", nt_fuzz::targets::clip(&payload, 400)));
        }
    }));
    let mut summaries = Vec::new();
    for (i, target) in targets.into_iter().enumerate() {
        let s = fuzz(&args, target, args.seed.wrapping_add(i as u64))?;
        println!(
            "{:<10} {:>10} execs in {:>6.1} s ({:>7.0}/s), {} outcomes, {} saved, {} crashes, slowest {:.1} ms",
            target.name(),
            s.execs,
            s.seconds,
            s.execs as f64 / s.seconds,
            s.outcomes,
            s.saved,
            s.crashes,
            s.slowest_ms
        );
        summaries.push(s);
    }
    write_results(&args, &summaries)?;
    if summaries.iter().any(|s| s.crashes > 0) {
        bail!("crashes found; their inputs are in the corpus as crash-*");
    }
    Ok(())
}

fn run_once(
    target: Target,
    data: &[u8],
) -> (std::result::Result<nt_fuzz::Outcome, String>, Duration) {
    let started = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| target.run(data))).map_err(|_| {
        LAST_PANIC
            .lock()
            .ok()
            .and_then(|mut l| l.take())
            .unwrap_or_else(|| "panic".into())
    });
    (result, started.elapsed())
}

fn fuzz(args: &Args, target: Target, seed: u64) -> Result<Summary> {
    let entries = corpus::load(&args.corpus, target)?;
    let mut pool: Vec<Vec<u8>> = entries.iter().map(|(_, d)| d.clone()).collect();
    if pool.is_empty() {
        pool.push(Vec::new());
    }
    let mut summary = Summary {
        target,
        execs: 0,
        seconds: 0.0,
        corpus_before: entries.len(),
        outcomes: 0,
        saved: 0,
        crashes: 0,
        crash_messages: BTreeMap::new(),
        slowest_ms: 0.0,
    };
    let mut seen = HashSet::new();
    let started = Instant::now();
    for (_, data) in &entries {
        record(args, target, data, &mut pool, &mut summary, &mut seen, true)?;
    }
    let budget = Duration::from_secs_f64(args.seconds);
    let mut rng = Rng::new(seed);
    let mut data = Vec::new();
    while started.elapsed() < budget && (args.execs == 0 || summary.execs < args.execs) {
        let base = rng.below(pool.len());
        let other = rng.below(pool.len());
        data.clear();
        data.extend_from_slice(&pool[base]);
        if target == Target::Request && rng.below(4) == 0 {
            let mut request = pb::SubmitRunRequest::decode(data.as_slice()).unwrap_or_default();
            let spec = request.spec.get_or_insert_with(Default::default);
            for _ in 0..1 + rng.below(3) {
                set_extreme(spec, rng.next_u64() as u32, rng.next_u64());
            }
            data = request.encode_to_vec();
        } else {
            let other = pool[other].clone();
            for _ in 0..1 + rng.below(4) {
                mutate(&mut rng, &mut data, &other, target.is_text(), args.max_len);
            }
        }
        record(
            args,
            target,
            &data,
            &mut pool,
            &mut summary,
            &mut seen,
            false,
        )?;
    }
    summary.seconds = started.elapsed().as_secs_f64();
    summary.outcomes = seen.len();
    if let Some(path) = std::env::var_os("NT_FUZZ_DUMP_OUTCOMES") {
        let mut all: Vec<_> = seen.into_iter().collect();
        all.sort();
        std::fs::write(path, all.join("\n"))?;
    }
    Ok(summary)
}

/// Runs one input and keeps what it taught: a crash, a slow input, a new outcome.
fn record(
    args: &Args,
    target: Target,
    data: &[u8],
    pool: &mut Vec<Vec<u8>>,
    summary: &mut Summary,
    seen: &mut HashSet<String>,
    replay: bool,
) -> Result<()> {
    if let Ok(mut current) = nt_fuzz::guard::CURRENT.lock() {
        let dir = corpus::dir(&args.corpus, target);
        match current.as_mut() {
            Some((d, input)) => {
                *d = dir;
                input.clear();
                input.extend_from_slice(data);
            }
            None => *current = Some((dir, data.to_vec())),
        }
    }
    let (result, took) = run_once(target, data);
    summary.execs += 1;
    let ms = took.as_secs_f64() * 1000.0;
    summary.slowest_ms = summary.slowest_ms.max(ms);
    if ms > args.slow_ms as f64 && !replay {
        corpus::save(&args.corpus, target, "slow", data)?;
    }
    match result {
        Err(message) => {
            summary.crashes += 1;
            // One file per kind of crash (the message with numbers and quotes blanked).
            let kind = nt_fuzz::targets::normalize(&message);
            if summary.crash_messages.len() < 20 && !summary.crash_messages.contains_key(&kind) {
                let path = corpus::save(&args.corpus, target, "crash", data)?;
                let file = path
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default();
                println!(
                    "  crash ({file}): {}",
                    nt_fuzz::targets::clip(&message, 300)
                );
                summary.crash_messages.insert(kind, file);
            }
        }
        Ok(outcome) => {
            if seen.insert(outcome.signature) && !replay {
                pool.push(data.to_vec());
                if summary.saved < args.max_new && data.len() <= 4096 {
                    corpus::save(&args.corpus, target, "new", data)?;
                    summary.saved += 1;
                }
            }
        }
    }
    Ok(())
}

fn write_results(args: &Args, summaries: &[Summary]) -> Result<()> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut out = String::from("# Fuzzing: `fuzz-drive` (nt-fuzz)\n\n");
    out.push_str(&format!(
        "One process, one thread, on a {cores}-core machine; release build with overflow checks and \
         debug assertions (`--profile fuzz`). Budget: {} s per target{}, seed {}.\n\n",
        args.seconds,
        if args.execs > 0 { format!(" or {} executions", args.execs) } else { String::new() },
        args.seed
    ));
    out.push_str("| target | executions | seconds | execs/s | corpus before | outcomes seen | inputs saved | crashes | slowest exec (ms) |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut total = 0;
    let mut seconds = 0.0;
    for s in summaries {
        total += s.execs;
        seconds += s.seconds;
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.0} | {} | {} | {} | {} | {:.1} |\n",
            s.target.name(),
            s.execs,
            s.seconds,
            s.execs as f64 / s.seconds,
            s.corpus_before,
            s.outcomes,
            s.saved,
            s.crashes,
            s.slowest_ms
        ));
    }
    out.push_str(&format!(
        "| **all** | **{total}** | **{seconds:.1}** | | | | | | |\n"
    ));
    for s in summaries {
        for (m, file) in &s.crash_messages {
            out.push_str(&format!(
                "\nCrash in `{}` (`{file}`): {m}\n",
                s.target.name()
            ));
        }
    }
    if let Some(dir) = args.results.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.results, out)
        .with_context(|| format!("writing {}", args.results.display()))?;
    Ok(())
}
