//! The soak: the real `nt-server` over real gRPC, held under a steady load
//! for at least `--min-seconds`: `--runs` runs submitted at an even pace,
//! `--workers` simulated workers (each its own WorkerService client) that
//! lease, heartbeat, report progress and deliver real checkpoints, so every
//! run goes through training, the coordinator's fusion, fine-tuning and
//! evaluation; `--watchers` WatchRun streams at a time, each following a run
//! to its end and then taking the next; a client listing runs meanwhile.
//!
//! Reported: every run's final state and whether ListRuns shows it, every
//! accepted completion per task and attempt (a task completed twice, or
//! leased again after its completion, is a duplicate), watch streams that
//! ended without the run's final state, client-side latency per RPC kind,
//! and the coordinator's resident memory and CPU over time. Exits 1 when a
//! run or task was lost or duplicated, or a run did not succeed.
//!
//! `cargo run --release -p nt-bench --bin soak -- --runs 1000 --min-seconds 600 --out bench/results/soak.txt`

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use clap::Parser;
use nt_bench::soak::record::{RunList, Snapshot, Tally};
use nt_bench::soak::soak_spec;
use nt_bench::soak::watcher::watch_runs;
use nt_bench::soak::worker::{Checkpoints, SimWorker};
use nt_bench::{cpu_seconds, memory_mib, ms, percentile};
use nt_proto::v1 as pb;
use nt_testkit::cluster::{Cluster, RunClient, StoreKind};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Runs submitted, evenly over --min-seconds.
    #[arg(long, env = "NT_SOAK_RUNS", default_value_t = 1000)]
    runs: usize,
    /// Simulated workers.
    #[arg(long, env = "NT_SOAK_WORKERS", default_value_t = 64)]
    workers: usize,
    /// WatchRun streams open at a time.
    #[arg(long, env = "NT_SOAK_WATCHERS", default_value_t = 20)]
    watchers: usize,
    /// Seconds over which the runs are submitted; the soak lasts this long
    /// and then until every run has ended.
    #[arg(long, env = "NT_SOAK_MIN_SECONDS", default_value_t = 600)]
    min_seconds: u64,
    /// local (a folder) or s3 (SeaweedFS on 127.0.0.1).
    #[arg(long, env = "NT_SOAK_STORE", default_value = "local")]
    store: String,
    /// Also write the report to this file.
    #[arg(long, env = "NT_SOAK_OUT")]
    out: Option<PathBuf>,
    /// The coordinator's lease TTL.
    #[arg(long, env = "NT_SOAK_LEASE_TTL_MS", default_value_t = 10_000)]
    lease_ttl_ms: u64,
    /// How often workers heartbeat.
    #[arg(long, env = "NT_SOAK_HEARTBEAT_MS", default_value_t = 1_000)]
    heartbeat_ms: u64,
    /// Multiplies the simulated work times (training 3-9 s, fine-tuning
    /// 2-5 s, evaluation 0.5-1.5 s).
    #[arg(long, env = "NT_SOAK_WORK_SCALE", default_value_t = 1.0)]
    work_scale: f64,
    /// Seconds to wait, after the last submission, for every run to end.
    #[arg(long, env = "NT_SOAK_DRAIN_SECONDS", default_value_t = 600)]
    drain_seconds: u64,
}

/// Tasks of one run of `soak_spec`: two members, one fine-tuning, the evaluation.
const TASKS_PER_RUN: usize = 4;

/// The coordinator's memory and CPU at one moment.
#[derive(Clone, Copy)]
struct Sample {
    at: f64,
    rss_mib: f64,
    cpu_seconds: f64,
}

fn sample(pid: u32, start: Instant) -> Sample {
    Sample {
        at: start.elapsed().as_secs_f64(),
        rss_mib: memory_mib(pid, "VmRSS").unwrap_or(0.0),
        cpu_seconds: cpu_seconds(pid).unwrap_or(0.0),
    }
}

/// A run as the coordinator last showed it.
struct Seen {
    state: pb::RunState,
    message: String,
    /// (task id, state, attempt).
    tasks: Vec<(String, pb::TaskState, u32)>,
}

fn is_final(state: pb::RunState) -> bool {
    matches!(
        state,
        pb::RunState::Succeeded | pb::RunState::Failed | pb::RunState::Cancelled
    )
}

fn seen(run: &pb::Run) -> Seen {
    Seen {
        state: pb::RunState::try_from(run.state).unwrap_or(pb::RunState::Unspecified),
        message: run.message.clone(),
        tasks: run
            .tasks
            .iter()
            .map(|t| {
                (
                    t.task_id.clone(),
                    pb::TaskState::try_from(t.state).unwrap_or(pb::TaskState::Unspecified),
                    t.attempt,
                )
            })
            .collect(),
    }
}

/// Every run ListRuns shows: run id -> (request id, state).
async fn list_all(
    client: &mut RunClient,
    tally: &Tally,
) -> Result<HashMap<String, (String, pb::RunState)>> {
    let mut all = HashMap::new();
    let mut token = String::new();
    loop {
        let page = tally
            .timed(
                "ListRuns (500 per page)",
                client.list_runs(pb::ListRunsRequest {
                    page_size: 500,
                    page_token: token.clone(),
                    ..Default::default()
                }),
            )
            .await?
            .into_inner();
        for r in page.runs {
            let state = pb::RunState::try_from(r.state).unwrap_or(pb::RunState::Unspecified);
            all.insert(r.run_id, (r.request_id, state));
        }
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        token = page.next_page_token;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.runs > 0 && args.workers > 0,
        "--runs and --workers must be at least 1"
    );
    let mut cluster = Cluster::new(if args.store == "s3" {
        StoreKind::S3
    } else {
        StoreKind::Local
    });
    cluster.lease_ttl_ms = args.lease_ttl_ms;
    cluster.heartbeat_ms = args.heartbeat_ms;
    cluster.start_server();
    let pid = cluster.server.as_ref().map_or(0, |p| p.child.id());
    let storage = cluster.storage();
    let start = Instant::now();
    println!(
        "soak: {} runs over {} s, {} simulated workers, {} watchers, store {}, nt-server pid {pid}",
        args.runs, args.min_seconds, args.workers, args.watchers, args.store
    );

    let tally = Arc::new(Tally::default());
    let runs = Arc::new(RunList::default());
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(vec![sample(pid, start)]));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (samples, sampling) = (samples.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let s = sample(pid, start);
                samples.lock().unwrap_or_else(|e| e.into_inner()).push(s);
            }
        })
    };

    let checkpoints = Arc::new(Checkpoints::default());
    let mut workers = Vec::new();
    for i in 0..args.workers {
        let worker = SimWorker {
            name: format!("soak{i}"),
            client: cluster.worker_client().await,
            storage: storage.clone(),
            checkpoints: checkpoints.clone(),
            tally: tally.clone(),
            stop: stop.clone(),
            work_scale: args.work_scale,
        };
        workers.push(tokio::spawn(worker.run(0x5eed + i as u64)));
    }
    let mut watchers = Vec::new();
    for _ in 0..args.watchers {
        watchers.push(tokio::spawn(watch_runs(
            cluster.client().await,
            runs.clone(),
            tally.clone(),
            stop.clone(),
        )));
    }
    // A client listing runs and reading one now and then.
    let lister = {
        let (mut client, tally, runs, stop) = (
            cluster.client().await,
            tally.clone(),
            runs.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let _ = tally
                    .timed(
                        "ListRuns (50 per page)",
                        client.list_runs(pb::ListRunsRequest {
                            page_size: 50,
                            ..Default::default()
                        }),
                    )
                    .await;
                let all = runs.all();
                if !all.is_empty() {
                    n = n.wrapping_mul(31).wrapping_add(7);
                    let run_id = all[n % all.len()].clone();
                    let _ = tally
                        .timed("GetRun", client.get_run(pb::GetRunRequest { run_id }))
                        .await;
                }
            }
        })
    };

    // Submit at an even pace; meanwhile follow the unfinished runs with GetRun.
    let submitter = {
        let (mut client, tally, runs) = (cluster.client().await, tally.clone(), runs.clone());
        let interval = Duration::from_secs(args.min_seconds).div_f64(args.runs as f64);
        let count = args.runs;
        tokio::spawn(async move {
            let mut errors = 0usize;
            for i in 0..count {
                tokio::time::sleep_until((start + interval.mul_f64(i as f64)).into()).await;
                let spec = match soak_spec(i) {
                    Ok(s) => s,
                    Err(e) => return Err(e),
                };
                let submitted = tally
                    .timed(
                        "SubmitRun",
                        client.submit_run(pb::SubmitRunRequest {
                            spec: Some(spec),
                            request_id: format!("soak-{i}"),
                            spec_file: String::new(),
                        }),
                    )
                    .await;
                match submitted {
                    Ok(r) => runs.push(r.into_inner().run.unwrap_or_default().run_id),
                    Err(status) => {
                        eprintln!("submitting run {i}: {status:?}");
                        errors += 1;
                    }
                }
            }
            anyhow::Ok(errors)
        })
    };
    let mut client = cluster.client().await;
    let mut finals: HashMap<String, Seen> = HashMap::new();
    let deadline = start + Duration::from_secs(args.min_seconds + args.drain_seconds);
    let mut last_progress = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        for run_id in runs.all() {
            if finals.contains_key(&run_id) {
                continue;
            }
            let got = tally
                .timed(
                    "GetRun",
                    client.get_run(pb::GetRunRequest {
                        run_id: run_id.clone(),
                    }),
                )
                .await;
            if let Ok(run) = got {
                let s = seen(&run.into_inner());
                if is_final(s.state) {
                    finals.insert(run_id, s);
                }
            }
        }
        if last_progress.elapsed() >= Duration::from_secs(60) {
            last_progress = Instant::now();
            println!(
                "  {:>4.0} s: {} runs submitted, {} ended, coordinator RSS {:.0} MiB",
                start.elapsed().as_secs_f64(),
                runs.all().len(),
                finals.len(),
                memory_mib(pid, "VmRSS").unwrap_or(0.0)
            );
        }
        let all_in = submitter.is_finished() && finals.len() >= runs.all().len();
        if all_in || Instant::now() > deadline {
            break;
        }
    }
    let ended_at = start.elapsed().as_secs_f64();
    let submit_errors = if submitter.is_finished() {
        submitter.await??
    } else {
        submitter.abort();
        args.runs - runs.all().len()
    };
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        if let Err(e) = w.await? {
            eprintln!("a simulated worker stopped: {e:#}");
        }
    }
    for w in watchers {
        w.await?;
    }
    lister.await?;
    let listed = list_all(&mut client, &tally).await?;
    // The coordinator idle for a few seconds after the load.
    tokio::time::sleep(Duration::from_secs(5)).await;
    sampling.store(false, Ordering::Relaxed);
    sampler.await?;
    let mut samples = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    samples.push(sample(pid, start));
    let hwm = memory_mib(pid, "VmHWM").unwrap_or(0.0);

    let report = Report {
        args: &args,
        submitted: runs.all(),
        submit_errors,
        listed,
        finals,
        snapshot: tally.snapshot(),
        samples,
        hwm,
        ended_at,
    };
    let (text, clean) = report.render();
    print!("{text}");
    if let Some(out) = &args.out {
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(out, &text)?;
        println!("written to {}", out.display());
    }
    if !clean {
        eprintln!("{}", cluster.logs());
        // Stop the processes before exiting (exit runs no destructors).
        drop(cluster);
        std::process::exit(1);
    }
    Ok(())
}

struct Report<'a> {
    args: &'a Args,
    submitted: Vec<String>,
    submit_errors: usize,
    listed: HashMap<String, (String, pb::RunState)>,
    finals: HashMap<String, Seen>,
    snapshot: Snapshot,
    samples: Vec<Sample>,
    hwm: f64,
    ended_at: f64,
}

impl Report<'_> {
    /// The report's text, and whether nothing was lost or duplicated and
    /// every run succeeded.
    fn render(self) -> (String, bool) {
        let a = self.args;
        let s = &self.snapshot;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "nt soak: {} runs submitted evenly over {} s, {} simulated workers, {} WatchRun streams at a time, store {}",
            a.runs, a.min_seconds, a.workers, a.watchers, a.store
        );
        let _ = writeln!(
            out,
            "  real nt-server over gRPC on 127.0.0.1; lease TTL {} ms, heartbeat {} ms; each run: 2 members (mlp:hidden=8,depth=2), NT fusion in the coordinator, 1 fine-tuning, 1 evaluation",
            a.lease_ttl_ms, a.heartbeat_ms
        );
        let _ = writeln!(
            out,
            "  simulated work: training {:.1}-{:.1} s, fine-tuning {:.1}-{:.1} s, evaluation {:.1}-{:.1} s; every run ended {:.0} s after the start",
            3.0 * a.work_scale, 9.0 * a.work_scale, 2.0 * a.work_scale, 5.0 * a.work_scale,
            0.5 * a.work_scale, 1.5 * a.work_scale, self.ended_at
        );
        out.push('\n');

        // Runs.
        let submitted: HashSet<&String> = self.submitted.iter().collect();
        let lost_runs = submitted
            .iter()
            .filter(|r| !self.listed.contains_key(**r))
            .count();
        let mut request_ids: HashMap<&str, usize> = HashMap::new();
        for (req, _) in self.listed.values() {
            *request_ids.entry(req.as_str()).or_default() += 1;
        }
        let duplicate_runs = request_ids.values().filter(|&&n| n > 1).count()
            + self
                .listed
                .keys()
                .filter(|r| !submitted.contains(r))
                .count();
        let count = |state| self.listed.values().filter(|(_, st)| *st == state).count();
        let succeeded = count(pb::RunState::Succeeded);
        let not_final = self
            .listed
            .values()
            .filter(|(_, st)| !is_final(*st))
            .count();
        let _ = writeln!(
            out,
            "runs     submitted {} (errors {}), listed {}, succeeded {}, failed {}, cancelled {}, not final {}, lost {}, duplicated {}",
            self.submitted.len(),
            self.submit_errors,
            self.listed.len(),
            succeeded,
            count(pb::RunState::Failed),
            count(pb::RunState::Cancelled),
            not_final,
            lost_runs,
            duplicate_runs
        );
        let mut failures: Vec<_> = self
            .finals
            .iter()
            .filter(|(_, f)| f.state != pb::RunState::Succeeded)
            .collect();
        failures.sort_by(|x, y| x.0.cmp(y.0));
        for (run, f) in failures.iter().take(5) {
            let _ = writeln!(out, "         {run}: {:?} {}", f.state, f.message);
        }

        // Tasks: the coordinator's final view against every accepted completion.
        let mut in_runs = HashSet::new();
        let (mut tasks, mut unfinished, mut not_accepted) = (0, 0, 0);
        for f in self.finals.values() {
            for (task, state, attempt) in &f.tasks {
                tasks += 1;
                in_runs.insert(task.clone());
                if *state != pb::TaskState::Succeeded {
                    unfinished += 1;
                } else if !s.completed.get(task).is_some_and(|a| a.contains(attempt)) {
                    not_accepted += 1;
                }
            }
        }
        let twice = s.completed.values().filter(|a| a.len() > 1).count();
        let stray = s.completed.keys().filter(|t| !in_runs.contains(*t)).count();
        let retried = s.leases.values().filter(|a| a.len() > 1).count();
        let accepted: usize = s.completed.values().map(Vec::len).sum();
        let _ = writeln!(
            out,
            "tasks    expected {}, in the runs {}, completions accepted {}, completed twice {}, leased again after completion {}, not succeeded {}, succeeded without our completion {}, accepted but in no run {}",
            self.submitted.len() * TASKS_PER_RUN,
            tasks,
            accepted,
            twice,
            s.leased_after_completion,
            unfinished,
            not_accepted,
            stray
        );
        let _ = writeln!(
            out,
            "attempts leases {}, tasks retried {}, completions refused {}, attempts stopped by the coordinator {}, failed for a store error {}",
            s.leases.values().map(Vec::len).sum::<usize>(),
            retried,
            s.refused,
            s.abandoned,
            s.failed
        );
        let w = &s.watches;
        let _ = writeln!(
            out,
            "watches  streams {}, ended with the final state {}, without it {}, final state not succeeded {}, events {}, out of order {}",
            w.opened, w.terminal, w.without_terminal, w.not_succeeded, w.events, w.out_of_order
        );
        out.push('\n');

        // Latency.
        let _ = writeln!(
            out,
            "{:<28} {:>8} {:>7} {:>9} {:>9} {:>9}",
            "client-side latency", "calls", "errors", "p50 ms", "p99 ms", "max ms"
        );
        let mut unary = Vec::new();
        let calls: BTreeMap<_, _> = s.calls.clone();
        for (kind, mut c) in calls {
            let is_rpc = !kind.contains("not an RPC") && !kind.starts_with("WatchRun");
            if is_rpc && kind != "LeaseTask" {
                unary.extend_from_slice(&c.latencies);
            }
            let _ = writeln!(
                out,
                "{:<28} {:>8} {:>7} {:>9.2} {:>9.2} {:>9.2}",
                kind,
                c.latencies.len(),
                c.errors,
                ms(percentile(&mut c.latencies, 50.0)),
                ms(percentile(&mut c.latencies, 99.0)),
                ms(percentile(&mut c.latencies, 100.0))
            );
        }
        let _ = writeln!(
            out,
            "{:<28} {:>8} {:>7} {:>9.2} {:>9.2} {:>9.2}",
            "all RPCs but LeaseTask",
            unary.len(),
            "",
            ms(percentile(&mut unary, 50.0)),
            ms(percentile(&mut unary, 99.0)),
            ms(percentile(&mut unary, 100.0))
        );
        let _ = writeln!(
            out,
            "  (LeaseTask is a long poll of up to 2 s: its time includes waiting for work)"
        );
        out.push('\n');

        // The coordinator's memory and CPU.
        let first = self.samples.first().copied();
        let last = self.samples.last().copied();
        if let (Some(first), Some(last)) = (first, last) {
            let peak = self.samples.iter().map(|x| x.rss_mib).fold(0.0, f64::max);
            let cpu = last.cpu_seconds - first.cpu_seconds;
            let wall = (last.at - first.at).max(1e-9);
            let _ = writeln!(
                out,
                "coordinator RSS: start {:.1} MiB, peak {:.1} MiB, end {:.1} MiB (VmHWM {:.1} MiB), {:.1} KiB per run kept; CPU {:.1} s over {:.0} s ({:.1} % of one core)",
                first.rss_mib,
                peak,
                last.rss_mib,
                self.hwm,
                1024.0 * (last.rss_mib - first.rss_mib) / self.submitted.len().max(1) as f64,
                cpu,
                wall,
                100.0 * cpu / wall
            );
            let _ = write!(out, "coordinator RSS every 60 s (MiB):");
            let mut next = 0.0;
            for x in &self.samples {
                if x.at >= next {
                    let _ = write!(out, " {:.0}", x.rss_mib);
                    next += 60.0;
                }
            }
            let _ = writeln!(out, " | end {:.0}", last.rss_mib);
        }

        let clean = lost_runs == 0
            && duplicate_runs == 0
            && self.submit_errors == 0
            && succeeded == a.runs
            && tasks == a.runs * TASKS_PER_RUN
            && twice == 0
            && s.leased_after_completion == 0
            && unfinished == 0
            && not_accepted == 0
            && stray == 0
            && w.without_terminal == 0
            && w.out_of_order == 0;
        let _ = writeln!(
            out,
            "\nverdict: {}",
            if clean {
                "every run succeeded; nothing lost or duplicated"
            } else {
                "FAILED: something was lost, duplicated or did not succeed (see above)"
            }
        );
        (out, clean)
    }
}
