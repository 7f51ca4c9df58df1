//! The verbs that talk to a coordinator: submit, watch, get, list, cancel,
//! events, report (upload and download are in `transfer.rs`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use nt_client::{pb, report, specfile, ConnectArgs, RunClient};

use super::progress::Display;
use crate::output::{print_json, Exit, OutputFormat};

/// Spec-file overrides shared by `submit` and `run`.
#[derive(Args, Clone, Debug, Default)]
pub struct SpecOverrides {
    /// Set any field of the spec: `--set members.training.epochs=3` (repeatable; YAML values).
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    pub set: Vec<String>,
    /// The run's name.
    #[arg(long)]
    pub name: Option<String>,
    /// Members to train.
    #[arg(long)]
    pub members: Option<u32>,
    /// Epochs of each member.
    #[arg(long)]
    pub epochs: Option<u32>,
    /// Epochs of each fine-tuning.
    #[arg(long)]
    pub fine_tune_epochs: Option<u32>,
    /// Fusion methods, comma-separated (nt, nt-iterative, nt-hierarchical, average).
    #[arg(long)]
    pub fusion: Option<String>,
    /// Where tasks may run: any, gpu or cpu.
    #[arg(long)]
    pub device: Option<String>,
    /// Use a seeded subset of this many training samples.
    #[arg(long)]
    pub train_subset: Option<u64>,
    /// Use a seeded subset of this many test samples.
    #[arg(long)]
    pub test_subset: Option<u64>,
}

impl SpecOverrides {
    /// All overrides as field paths and YAML values, shortcuts first.
    pub fn pairs(&self) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        let mut add = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                out.push((k.to_string(), v));
            }
        };
        add(
            "name",
            self.name
                .clone()
                .map(|n| serde_yaml::to_string(&n).unwrap_or(n)),
        );
        add("members.count", self.members.map(|v| v.to_string()));
        add(
            "members.training.epochs",
            self.epochs.map(|v| v.to_string()),
        );
        add(
            "fine_tuning.training.epochs",
            self.fine_tune_epochs.map(|v| v.to_string()),
        );
        add("fusion", self.fusion.clone().map(|f| format!("[{f}]")));
        add("device", self.device.clone());
        add(
            "data.train_subset",
            self.train_subset.map(|v| v.to_string()),
        );
        add("data.test_subset", self.test_subset.map(|v| v.to_string()));
        for s in &self.set {
            let (k, v) = s.split_once('=').with_context(|| {
                format!("--set `{s}`: expected FIELD=VALUE, e.g. members.count=4")
            })?;
            out.push((k.trim().to_string(), v.to_string()));
        }
        Ok(out)
    }
}

/// Reads a spec file with overrides into the wire message.
pub fn load_spec(path: &Path, overrides: &SpecOverrides) -> Result<pb::RunSpec> {
    let file = specfile::load(path, &overrides.pairs()?)?;
    let base = path.parent().unwrap_or(Path::new("."));
    file.to_proto(base)
        .with_context(|| format!("run spec {}", path.display()))
}

/// Quality gates checked when a run ends.
#[derive(Args, Clone, Debug, Default)]
pub struct Gates {
    /// Fail (exit 3) unless the first fusion method's model reaches this test
    /// accuracy after fine-tuning (0.88 or 88 both mean 88 %).
    #[arg(long)]
    pub min_accuracy: Option<f64>,
    /// Fail (exit 3) unless the fine-tuned model is at least as accurate as the best member.
    #[arg(long)]
    pub beat_members: bool,
}

impl Gates {
    /// Checks a finished run: the exit to use.
    pub fn check(&self, run: &pb::Run) -> Result<()> {
        match pb::RunState::try_from(run.state) {
            Ok(pb::RunState::Succeeded) => {}
            Ok(pb::RunState::Cancelled) => {
                return Err(Exit::run_failed(format!(
                    "run {} was cancelled: {}",
                    run.run_id, run.message
                )))
            }
            _ => {
                return Err(Exit::run_failed(format!(
                    "run {} failed: {}",
                    run.run_id, run.message
                )))
            }
        }
        let acc = report::fine_tuned_accuracy(run, None);
        // A model whose loss is not a number passes no gate, however its
        // accuracy compares: it diverged, or its weights are not finite.
        if self.min_accuracy.is_some() || self.beat_members {
            let diverged = report::diverged(run);
            let gated = |name: &str| {
                name.ends_with("after fine-tuning")
                    || (self.beat_members && name.starts_with("member "))
            };
            let failed: Vec<&String> = diverged.iter().filter(|n| gated(n)).collect();
            if let Some(first) = failed.first() {
                return Err(Exit::gate(format!(
                    "quality gate missed: {first} has a loss or accuracy that is not a number \
                     (diverged, or non-finite weights)"
                )));
            }
        }
        if let Some(min) = self.min_accuracy {
            let min = if min > 1.0 { min / 100.0 } else { min };
            match acc {
                Some(a) if a >= min => {}
                Some(a) => {
                    return Err(Exit::gate(format!(
                        "quality gate missed: accuracy after fine-tuning {:.2} % < {:.2} %",
                        100.0 * a,
                        100.0 * min
                    )))
                }
                None => {
                    return Err(Exit::gate(
                        "quality gate: the run has no fine-tuned accuracy",
                    ))
                }
            }
        }
        if self.beat_members {
            match (acc, report::best_member(run)) {
                (Some(a), Some(best)) if a < best => {
                    return Err(Exit::gate(format!(
                        "quality gate missed: accuracy after fine-tuning {:.2} % < best member {:.2} %",
                        100.0 * a,
                        100.0 * best
                    )));
                }
                (Some(_), Some(_)) => {}
                // A gate that cannot be checked is missed, as for --min-accuracy.
                (None, _) => {
                    return Err(Exit::gate(
                        "quality gate: the run has no fine-tuned accuracy",
                    ))
                }
                (_, None) => {
                    return Err(Exit::gate(
                        "quality gate: the run has no member accuracy to beat",
                    ))
                }
            }
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct SubmitArgs {
    /// The run spec (YAML).
    spec: PathBuf,
    #[command(flatten)]
    overrides: SpecOverrides,
    /// Idempotency key: submitting it again returns the same run.
    #[arg(long, env = "NT_REQUEST_ID")]
    request_id: Option<String>,
    /// Follow the run until it ends, then print its report; exit non-zero
    /// when it fails (2) or misses a quality gate (3).
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    gates: Gates,
    /// With --wait, also write the fine-tuning curves as a PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
}

pub async fn connect(args: &ConnectArgs) -> Result<RunClient> {
    nt_client::connect(args).await
}

/// A gRPC failure as an error that says what to do.
pub fn grpc(context: &str, s: nt_proto::tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{context}: {}", nt_client::explain(&s))
}

/// Submits a spec; the response says whether a request id found an existing run.
pub async fn submit_spec(
    client: &mut RunClient,
    spec: pb::RunSpec,
    request_id: Option<String>,
) -> Result<pb::SubmitRunResponse> {
    Ok(client
        .submit_run(pb::SubmitRunRequest {
            spec: Some(spec),
            request_id: request_id.unwrap_or_default(),
            spec_file: String::new(),
        })
        .await
        .map_err(|s| grpc("submitting the run", s))?
        .into_inner())
}

/// Follows a run to its end, showing progress, then prints the report.
pub async fn wait_and_report(
    client: &mut RunClient,
    run_id: &str,
    output: OutputFormat,
    gates: &Gates,
    plot: Option<&Path>,
) -> Result<()> {
    let mut display = Display::new(output);
    let run = nt_client::follow::follow(client, run_id, |ev| display.event(ev)).await;
    display.finish();
    let run = run?;
    match output {
        // The last of the JSON lines the progress events began: one object per line.
        OutputFormat::Json => println!("{}", serde_json::to_string(&run)?),
        OutputFormat::Text => print!("{}", report::text(&run)),
    }
    if let Some(p) = plot {
        if run.report.as_ref().is_some_and(|r| !r.fused.is_empty()) {
            report::plot(&run, p, 960, 600)?;
            if output == OutputFormat::Text {
                println!("curves written to {}", p.display());
            }
        }
    }
    gates.check(&run)
}

pub async fn submit(
    args: SubmitArgs,
    connect_args: &ConnectArgs,
    output: OutputFormat,
) -> Result<()> {
    let mut spec = load_spec(&args.spec, &args.overrides)?;
    let mut client = connect(connect_args).await?;
    // Member checkpoints that are local files go through the service first.
    super::transfer::upload_local_members(&mut client, &mut spec).await?;
    let response = submit_spec(&mut client, spec, args.request_id).await?;
    let run = response.run.clone().unwrap_or_default();
    if !args.wait {
        match output {
            OutputFormat::Json => print_json(&response)?,
            OutputFormat::Text => println!(
                "{} run {}",
                if response.created {
                    "submitted"
                } else {
                    "already submitted with this request id:"
                },
                run.run_id
            ),
        }
        return Ok(());
    }
    if output == OutputFormat::Text {
        eprintln!(
            "{} run {}",
            if response.created {
                "submitted"
            } else {
                "following the run already submitted with this request id:"
            },
            run.run_id
        );
    }
    wait_and_report(
        &mut client,
        &run.run_id,
        output,
        &args.gates,
        args.plot.as_deref(),
    )
    .await
}

#[derive(Args)]
pub struct RunIdArgs {
    /// The run id.
    run: String,
}

pub async fn watch(
    args: RunIdArgs,
    connect_args: &ConnectArgs,
    output: OutputFormat,
) -> Result<()> {
    let mut client = connect(connect_args).await?;
    wait_and_report(&mut client, &args.run, output, &Gates::default(), None).await
}

pub async fn get(args: RunIdArgs, connect_args: &ConnectArgs, output: OutputFormat) -> Result<()> {
    let mut client = connect(connect_args).await?;
    let run = client
        .get_run(pb::GetRunRequest {
            run_id: args.run.clone(),
        })
        .await
        .map_err(|s| grpc(&format!("reading run {}", args.run), s))?
        .into_inner();
    match output {
        OutputFormat::Json => print_json(&run)?,
        OutputFormat::Text => {
            print!("{}", report::text(&run));
            if run
                .tasks
                .iter()
                .any(|t| t.state != pb::TaskState::Succeeded as i32)
            {
                println!("\ntasks:");
                for t in &run.tasks {
                    let state = pb::TaskState::try_from(t.state)
                        .map(|s| {
                            s.as_str_name()
                                .trim_start_matches("TASK_STATE_")
                                .to_lowercase()
                        })
                        .unwrap_or_default();
                    let progress = t
                        .progress
                        .map(|p| format!(" epoch {}/{}", p.epoch, p.epochs))
                        .unwrap_or_default();
                    println!(
                        "  {:<22} {state:<10} attempt {}{progress} {}",
                        t.label, t.attempt, t.error
                    );
                }
            }
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct ListArgs {
    /// Only runs in this state (queued, training, fusing, fine-tuning, evaluating, succeeded, failed, cancelled).
    #[arg(long)]
    state: Option<String>,
    /// Runs per page.
    #[arg(long, default_value_t = 20)]
    limit: u32,
    /// Continue from a previous page's token.
    #[arg(long, default_value = "")]
    page_token: String,
}

struct RunLine {
    run_id: String,
    name: String,
    state: String,
    tasks: usize,
    fine_tuned_accuracy: Option<f64>,
}

pub async fn list(args: ListArgs, connect_args: &ConnectArgs, output: OutputFormat) -> Result<()> {
    let state = match args.state.as_deref() {
        None => pb::RunState::Unspecified,
        Some(s) => {
            let name = format!("RUN_STATE_{}", s.replace('-', "_").to_uppercase());
            pb::RunState::from_str_name(&name).with_context(|| {
                format!("--state `{s}`: use queued, training, fusing, fine-tuning, evaluating, succeeded, failed or cancelled")
            })?
        }
    };
    let mut client = connect(connect_args).await?;
    let page = client
        .list_runs(pb::ListRunsRequest {
            page_size: args.limit,
            page_token: args.page_token,
            state: state as i32,
        })
        .await
        .map_err(|s| grpc("listing runs", s))?
        .into_inner();
    let lines: Vec<RunLine> = page
        .runs
        .iter()
        .map(|r| RunLine {
            run_id: r.run_id.clone(),
            name: r.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
            state: nt_proto::enum_names::run_state::name(r.state).unwrap_or_default(),
            tasks: r.tasks.len(),
            fine_tuned_accuracy: report::fine_tuned_accuracy(r, None),
        })
        .collect();
    match output {
        // The ListRunsResponse itself, in proto3 JSON.
        OutputFormat::Json => print_json(&page)?,
        OutputFormat::Text => {
            println!(
                "{:<30} {:<24} {:<12} {:>5} {:>9}",
                "run", "name", "state", "tasks", "accuracy"
            );
            for l in &lines {
                println!(
                    "{:<30} {:<24} {:<12} {:>5} {:>9}",
                    l.run_id,
                    l.name,
                    l.state,
                    l.tasks,
                    l.fine_tuned_accuracy
                        .map_or("-".into(), |a| format!("{:.2} %", 100.0 * a))
                );
            }
            if !page.next_page_token.is_empty() {
                println!("more: --page-token {}", page.next_page_token);
            }
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct CancelArgs {
    /// The run id.
    run: String,
    /// Why (kept with the run).
    #[arg(long, default_value = "")]
    reason: String,
}

pub async fn cancel(
    args: CancelArgs,
    connect_args: &ConnectArgs,
    output: OutputFormat,
) -> Result<()> {
    let mut client = connect(connect_args).await?;
    let run = client
        .cancel_run(pb::CancelRunRequest {
            run_id: args.run.clone(),
            reason: args.reason,
        })
        .await
        .map_err(|s| grpc(&format!("cancelling run {}", args.run), s))?
        .into_inner();
    match output {
        OutputFormat::Json => print_json(&run)?,
        OutputFormat::Text => println!("cancelled run {}", run.run_id),
    }
    Ok(())
}

#[derive(Args)]
pub struct EventsArgs {
    /// The run id.
    run: String,
    /// Keep following new events until the run ends.
    #[arg(long)]
    follow: bool,
}

pub async fn events(
    args: EventsArgs,
    connect_args: &ConnectArgs,
    output: OutputFormat,
) -> Result<()> {
    let mut client = connect(connect_args).await?;
    let print = |ev: &pb::RunEvent| match output {
        OutputFormat::Json => {
            if let Ok(line) = serde_json::to_string(ev) {
                println!("{line}");
            }
        }
        OutputFormat::Text => println!("{:>5} {} {}", ev.sequence, ev.time_unix_ms, describe(ev)),
    };
    if args.follow {
        nt_client::follow::follow(&mut client, &args.run, print).await?;
        return Ok(());
    }
    // The events so far: the stream's backlog, without waiting for new ones.
    let mut stream = client
        .watch_run(pb::WatchRunRequest {
            run_id: args.run.clone(),
            after_sequence: 0,
        })
        .await
        .map_err(|s| grpc(&format!("reading the events of run {}", args.run), s))?
        .into_inner();
    loop {
        match tokio::time::timeout(std::time::Duration::from_millis(300), stream.message()).await {
            Ok(Ok(Some(ev))) => print(&ev),
            Ok(Ok(None)) | Err(_) => break,
            Ok(Err(s)) => return Err(grpc("reading events", s)),
        }
    }
    Ok(())
}

fn describe(ev: &pb::RunEvent) -> String {
    match &ev.event {
        Some(pb::run_event::Event::StateChanged(s)) => format!(
            "run {} {}",
            pb::RunState::try_from(s.state)
                .map(|s| s.as_str_name())
                .unwrap_or("?"),
            s.message
        ),
        Some(pb::run_event::Event::TaskChanged(t)) => format!(
            "{} {} attempt {} {} {}",
            t.label,
            pb::TaskState::try_from(t.state)
                .map(|s| s.as_str_name())
                .unwrap_or("?"),
            t.attempt,
            t.worker_id,
            t.message
        ),
        Some(pb::run_event::Event::TaskProgress(t)) => format!(
            "{} {}",
            t.label,
            t.progress
                .map(|p| format!(
                    "epoch {}/{} step {}/{} loss {:.4}",
                    p.epoch, p.epochs, p.step, p.steps, p.loss
                ))
                .unwrap_or_default()
        ),
        None => String::new(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Text,
    Markdown,
    Json,
    Csv,
}

#[derive(Args)]
pub struct ReportArgs {
    /// The run id.
    run: String,
    /// text, markdown, json or csv (default: text, or json with --output json).
    #[arg(long, value_enum)]
    format: Option<ReportFormat>,
    /// Write the fine-tuning curves, with the members and the ensemble as reference lines, as a PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Plot size in pixels, WIDTHxHEIGHT.
    #[arg(long, default_value = "960x600")]
    plot_size: String,
}

pub async fn report(
    args: ReportArgs,
    connect_args: &ConnectArgs,
    output: OutputFormat,
) -> Result<()> {
    let mut client = connect(connect_args).await?;
    let run = client
        .get_run(pb::GetRunRequest {
            run_id: args.run.clone(),
        })
        .await
        .map_err(|s| grpc(&format!("reading run {}", args.run), s))?
        .into_inner();
    let format = args.format.unwrap_or(if output == OutputFormat::Json {
        ReportFormat::Json
    } else {
        ReportFormat::Text
    });
    match format {
        ReportFormat::Text => print!("{}", report::text(&run)),
        ReportFormat::Markdown => print!("{}", report::markdown(&run)),
        ReportFormat::Csv => print!("{}", report::csv(&run)),
        // The RunReport message in proto3 JSON, as report.json in the store.
        ReportFormat::Json => print_json(&run.report.clone().unwrap_or_default())?,
    }
    if let Some(p) = &args.plot {
        let (w, h) = args
            .plot_size
            .split_once('x')
            .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
            .filter(|(w, h)| (200..=8000).contains(w) && (150..=8000).contains(h))
            .with_context(|| {
                format!(
                    "--plot-size `{}`: expected WIDTHxHEIGHT, e.g. 960x600",
                    args.plot_size
                )
            })?;
        report::plot(&run, p, w, h)?;
        if format == ReportFormat::Text {
            println!("curves written to {}", p.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(members: &[f64], fine_tuned: Option<f64>) -> pb::Run {
        let model = |a: f64| pb::ModelReport {
            accuracy: a,
            loss: 0.5,
            ..Default::default()
        };
        pb::Run {
            state: pb::RunState::Succeeded as i32,
            report: Some(pb::RunReport {
                members: members.iter().map(|&a| model(a)).collect(),
                fused: vec![pb::FusedReport {
                    method: pb::FusionMethod::Nt as i32,
                    after_fine_tuning: fine_tuned.map(model),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn code(r: Result<()>) -> Option<i32> {
        r.err()
            .map(|e| e.downcast_ref::<Exit>().map_or(1, |x| x.code))
    }

    #[test]
    fn beat_members_needs_something_to_compare() {
        let gates = Gates {
            beat_members: true,
            ..Default::default()
        };
        assert_eq!(code(gates.check(&run(&[0.8, 0.85], Some(0.86)))), None);
        assert_eq!(code(gates.check(&run(&[0.8, 0.85], Some(0.84)))), Some(3));
        // No fine-tuned accuracy, or no members: missed, not passed.
        assert_eq!(code(gates.check(&run(&[0.8, 0.85], None))), Some(3));
        assert_eq!(code(gates.check(&run(&[], Some(0.9)))), Some(3));
    }

    #[test]
    fn a_model_whose_loss_is_not_a_number_misses_every_gate() {
        let mut diverged = run(&[0.1, 0.85], Some(0.86));
        let report = diverged.report.as_mut().unwrap();
        report.members[0].name = "member 0".into();
        report.members[0].loss = f64::NAN;
        let beat = Gates {
            beat_members: true,
            ..Default::default()
        };
        assert_eq!(code(beat.check(&diverged)), Some(3));
        let min = Gates {
            min_accuracy: Some(0.5),
            ..Default::default()
        };
        // A diverged member alone does not fail --min-accuracy ...
        assert_eq!(code(min.check(&diverged)), None);
        // ... a diverged fine-tuned model does, whatever its accuracy.
        let report = diverged.report.as_mut().unwrap();
        report.fused[0].after_fine_tuning.as_mut().unwrap().loss = f64::INFINITY;
        assert_eq!(code(min.check(&diverged)), Some(3));
        let text = report::text(&diverged);
        assert!(
            text.contains(
                "diverged (loss or accuracy not a number): member 0, nt after fine-tuning"
            ),
            "{text}"
        );
    }
}
