//! A run's report as people and programs read it: a table (text, Markdown,
//! CSV) and a PNG plot of the fine-tuning curves with the members and the
//! ensemble as reference lines.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, Result};
use nt_proto::v1 as pb;

/// One line of the report table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub model: String,
    /// Test accuracy in [0, 1], when evaluated.
    pub accuracy: Option<f64>,
    pub loss: Option<f64>,
    pub parameters: u64,
    pub checkpoint: String,
}

fn method_name(m: i32) -> String {
    pb::FusionMethod::try_from(m)
        .ok()
        .and_then(nt_spec::wire::method_from_wire)
        .map_or_else(|| format!("method {m}"), |m| m.to_string())
}

fn evaluated(m: &pb::ModelReport) -> (Option<f64>, Option<f64>) {
    if m.accuracy == 0.0 && m.loss == 0.0 {
        (None, None)
    } else {
        (Some(m.accuracy), Some(m.loss))
    }
}

fn row(model: String, m: &pb::ModelReport) -> Row {
    let (accuracy, loss) = evaluated(m);
    Row {
        model,
        accuracy,
        loss,
        parameters: m.parameters,
        checkpoint: m.checkpoint.clone(),
    }
}

/// The rows: members, the ensemble, each method right after fusion and after fine-tuning.
pub fn rows(run: &pb::Run) -> Vec<Row> {
    let Some(report) = &run.report else {
        return Vec::new();
    };
    let mut out: Vec<Row> = report
        .members
        .iter()
        .map(|m| row(m.name.clone(), m))
        .collect();
    if let Some(e) = &report.ensemble {
        out.push(row(
            format!("ensemble of {} (mean logits)", report.members.len()),
            e,
        ));
    }
    for f in &report.fused {
        let name = method_name(f.method);
        if let Some(m) = &f.after_fusion {
            out.push(row(format!("{name} right after fusion"), m));
        }
        if let Some(m) = &f.after_fine_tuning {
            out.push(row(format!("{name} after fine-tuning"), m));
        }
        if let Some(m) = &f.after_distilled_fine_tuning {
            out.push(row(format!("{name} after distilled fine-tuning"), m));
        }
    }
    if let Some(b) = &report.baseline {
        out.push(row("baseline (member 0 trained on)".into(), b));
    }
    out
}

/// A fine-tuned model of a run with where it started: each fused method
/// (and its distilled variant), and the compute-matched baseline.
#[derive(Clone, Debug)]
pub struct Tuned<'a> {
    /// `nt`, `nt (distilled)`, `baseline`.
    pub name: String,
    /// Test accuracy at epoch 0: right after fusion (member 0's for the baseline).
    pub start: Option<f64>,
    /// Test accuracy after the last epoch.
    pub end: Option<f64>,
    /// Its fine-tuning curve, when reported.
    pub curve: Option<&'a pb::Curve>,
}

/// Every fine-tuned model of a report, in report order.
pub fn tuned(report: &pb::RunReport) -> Vec<Tuned<'_>> {
    let curve = |name: String| report.curves.iter().find(|c| c.name == name);
    let accuracy = |m: Option<&pb::ModelReport>| m.and_then(|m| evaluated(m).0);
    let mut out = Vec::new();
    for f in &report.fused {
        let method = method_name(f.method);
        let start = accuracy(f.after_fusion.as_ref());
        out.push(Tuned {
            name: method.clone(),
            start,
            end: accuracy(f.after_fine_tuning.as_ref()),
            curve: curve(format!("{method} fine-tuning")),
        });
        if let Some(m) = &f.after_distilled_fine_tuning {
            out.push(Tuned {
                name: format!("{method} (distilled)"),
                start,
                end: accuracy(Some(m)),
                curve: curve(format!("{method} fine-tuning (distilled)")),
            });
        }
    }
    if let Some(b) = &report.baseline {
        out.push(Tuned {
            name: "baseline".into(),
            start: accuracy(report.members.first()),
            end: accuracy(Some(b)),
            curve: curve("baseline".into()),
        });
    }
    out
}

/// The best member's test accuracy.
pub fn best_member(run: &pb::Run) -> Option<f64> {
    run.report
        .as_ref()?
        .members
        .iter()
        .map(|m| m.accuracy)
        .fold(None, |best, a| Some(best.map_or(a, |b: f64| b.max(a))))
}

/// The models of a finished run whose loss or accuracy is not a finite
/// number (a diverged training, or non-finite weights), by their row names.
pub fn diverged(run: &pb::Run) -> Vec<String> {
    rows(run)
        .into_iter()
        .filter(|r| {
            r.loss.is_some_and(|l| !l.is_finite()) || r.accuracy.is_some_and(|a| !a.is_finite())
        })
        .map(|r| r.model)
        .collect()
}

/// For each fine-tuned model ([`tuned`]), the first epoch whose evaluation
/// accuracy reaches the best member's (`None`: not within the epochs run),
/// and the epochs its curve has. The paper's measure of how much
/// fine-tuning a fusion method needs. Curves are on the evaluation set (the
/// test set, unless the run holds out validation data) and members on the
/// test set, so with a validation split this compares across the two.
pub fn epochs_to_best_member(run: &pb::Run) -> Vec<(String, Option<u32>, usize)> {
    let (Some(report), Some(best)) = (run.report.as_ref(), best_member(run)) else {
        return Vec::new();
    };
    tuned(report)
        .into_iter()
        .filter_map(|t| {
            let curve = t.curve?;
            let reached = curve
                .points
                .iter()
                .find(|p| p.eval_accuracy >= best)
                .map(|p| p.epoch);
            Some((t.name, reached, curve.points.len()))
        })
        .collect()
}

/// The test accuracy of a method's model after fine-tuning (the first method when `None`).
pub fn fine_tuned_accuracy(run: &pb::Run, method: Option<&str>) -> Option<f64> {
    let report = run.report.as_ref()?;
    let f = match method {
        None => report.fused.first()?,
        Some(name) => report
            .fused
            .iter()
            .find(|f| method_name(f.method) == name)?,
    };
    evaluated(f.after_fine_tuning.as_ref()?).0
}

fn percent(a: Option<f64>) -> String {
    a.map_or_else(|| "-".into(), |a| format!("{:.2} %", 100.0 * a))
}

/// Bytes as MiB with one decimal.
pub fn mebibytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The state as run specs, JSON output and the progress view spell it
/// (`fine-tuning`).
fn state_name(run: &pb::Run) -> String {
    nt_proto::enum_names::run_state::name(run.state).unwrap_or_default()
}

/// One line on how the run's tasks loaded the user's data (image folders
/// and arrays): how many decoded, how long, how many read the cache.
pub fn data_summary(report: &pb::RunReport) -> Option<String> {
    let loads: Vec<&pb::DataLoad> = report
        .members
        .iter()
        .chain(report.fused.iter().flat_map(|f| {
            [&f.after_fine_tuning, &f.after_distilled_fine_tuning]
                .into_iter()
                .flatten()
        }))
        .chain(&report.baseline)
        .filter_map(|m| m.data.as_ref())
        .collect();
    let first = loads.first()?;
    let (hits, misses): (Vec<&&pb::DataLoad>, Vec<&&pb::DataLoad>) =
        loads.iter().partition(|l| l.cache_hit);
    let seconds = |ls: &[&&pb::DataLoad]| ls.iter().map(|l| l.seconds).fold(0.0, f64::max);
    let mut parts = vec![format!(
        "{} images from {}",
        group(first.images),
        first.source
    )];
    if !misses.is_empty() {
        parts.push(format!(
            "read by {} task(s) in up to {:.2} s",
            misses.len(),
            seconds(&misses)
        ));
    }
    if !hits.is_empty() {
        parts.push(format!(
            "from the decoded cache by {} in up to {:.2} s",
            hits.len(),
            seconds(&hits)
        ));
    }
    let skipped = loads.iter().map(|l| l.skipped).max().unwrap_or(0);
    if skipped > 0 {
        parts.push(format!("{skipped} undecodable image(s) skipped"));
    }
    Some(format!("data: {}", parts.join("; ")))
}

/// The report as an aligned text table with a one-line verdict.
pub fn text(run: &pb::Run) -> String {
    let rows = rows(run);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "run {} ({}): {}",
        run.run_id,
        run.spec.as_ref().map_or("", |s| &s.name),
        state_name(run)
    );
    if !run.message.is_empty() {
        let _ = writeln!(out, "  {}", run.message);
    }
    if rows.is_empty() {
        return out;
    }
    let w = rows.iter().map(|r| r.model.len()).max().unwrap_or(5).max(5);
    let _ = writeln!(
        out,
        "\n{:<w$}  {:>9}  {:>7}  {:>12}",
        "model", "accuracy", "loss", "parameters"
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "{:<w$}  {:>9}  {:>7}  {:>12}",
            r.model,
            percent(r.accuracy),
            r.loss.map_or_else(|| "-".into(), |l| format!("{l:.4}")),
            group(r.parameters)
        );
    }
    let diverged = diverged(run);
    if !diverged.is_empty() {
        let _ = writeln!(
            out,
            "\ndiverged (loss or accuracy not a number): {}",
            diverged.join(", ")
        );
    }
    if let Some(report) = &run.report {
        let fusion: Vec<String> = report
            .fused
            .iter()
            .map(|f| {
                let peak = match f.fusion_peak_bytes {
                    0 => String::new(),
                    b => format!(" ({} peak)", mebibytes(b)),
                };
                format!("{} {:.3} s{peak}", method_name(f.method), f.fusion_seconds)
            })
            .collect();
        if !fusion.is_empty() {
            let _ = writeln!(out, "\nfusion time: {}", fusion.join(", "));
        }
        if let Some(t) = &report.timings {
            if t.wall_seconds > 0.0 {
                let _ = writeln!(
                    out,
                    "wall {:.1} s; task compute {:.1} s; fusion {:.2} s",
                    t.wall_seconds, t.task_seconds, t.fusion_seconds
                );
            }
        }
        if let Some(line) = data_summary(report) {
            let _ = writeln!(out, "{line}");
        }
        let reached: Vec<String> = epochs_to_best_member(run)
            .into_iter()
            .map(|(method, epoch, epochs)| match epoch {
                Some(e) => format!("{method} epoch {e}"),
                None => format!("{method} not within {epochs}"),
            })
            .collect();
        if !reached.is_empty() {
            let _ = writeln!(
                out,
                "fine-tuning reaches the best member at: {}",
                reached.join(", ")
            );
        }
        if let (Some(best), Some(f)) = (best_member(run), report.fused.first()) {
            if let Some(acc) = fine_tuned_accuracy(run, None) {
                let verdict = if acc >= best { "at or above" } else { "below" };
                let _ = writeln!(
                    out,
                    "{} after fine-tuning: {:.2} %, {verdict} the best member ({:.2} %, {:+.2} points)",
                    method_name(f.method),
                    100.0 * acc,
                    100.0 * best,
                    100.0 * (acc - best)
                );
            }
        }
    }
    out
}

/// The report as a Markdown table.
pub fn markdown(run: &pb::Run) -> String {
    let mut out = format!(
        "### Run `{}` ({})\n\n| model | accuracy | loss | parameters |\n| --- | ---: | ---: | ---: |\n",
        run.run_id,
        state_name(run)
    );
    for r in rows(run) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            r.model,
            percent(r.accuracy),
            r.loss.map_or_else(|| "-".into(), |l| format!("{l:.4}")),
            group(r.parameters)
        );
    }
    out
}

/// The report as CSV (accuracy as a fraction).
pub fn csv(run: &pb::Run) -> String {
    let mut out = String::from("model,accuracy,loss,parameters,checkpoint\n");
    for r in rows(run) {
        let _ = writeln!(
            out,
            "\"{}\",{},{},{},{}",
            r.model.replace('"', "\"\""),
            r.accuracy.map_or(String::new(), |a| format!("{a:.6}")),
            r.loss.map_or(String::new(), |l| format!("{l:.6}")),
            r.parameters,
            r.checkpoint
        );
    }
    out
}

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Makes the embedded font plotters' `sans-serif`. Registering twice is
/// harmless; it fails only for an invalid font.
pub(crate) fn register_font() -> Result<()> {
    plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, FONT)
        .map_err(|_| anyhow!("the embedded font is invalid"))
}

/// The colour of the `i`th curve of a plot.
pub(crate) fn series_color(i: usize) -> plotters::style::RGBColor {
    use plotters::style::colors::*;
    use plotters::style::RGBColor;
    let palette = [
        BLUE,
        RED,
        GREEN,
        MAGENTA,
        CYAN,
        BLACK,
        RGBColor(140, 80, 20),
        RGBColor(120, 0, 160),
    ];
    palette[i % palette.len()]
}

/// Writes the fine-tuning curves (evaluation accuracy per epoch, epoch 0 is
/// right after fusion) with the members and the ensemble as horizontal
/// reference lines, as a `width` x `height` PNG.
pub fn plot(run: &pb::Run, path: &Path, width: u32, height: u32) -> Result<()> {
    use plotters::prelude::*;

    let report = run
        .report
        .as_ref()
        .ok_or_else(|| anyhow!("run {} has no report yet", run.run_id))?;
    register_font()?;

    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for t in tuned(report) {
        let mut points: Vec<(f64, f64)> = t.start.map(|a| (0.0, 100.0 * a)).into_iter().collect();
        if let Some(c) = t.curve {
            points.extend(
                c.points
                    .iter()
                    .map(|p| (f64::from(p.epoch), 100.0 * p.eval_accuracy)),
            );
        }
        if !points.is_empty() {
            series.push((t.name, points));
        }
    }
    let references: Vec<(String, f64)> = report
        .members
        .iter()
        .map(|m| (m.name.clone(), 100.0 * m.accuracy))
        .chain(
            report
                .ensemble
                .as_ref()
                .map(|e| ("ensemble".to_string(), 100.0 * e.accuracy)),
        )
        .filter(|(_, a)| *a > 0.0)
        .collect();
    if series.is_empty() && references.is_empty() {
        return Err(anyhow!("run {} has no curves to plot yet", run.run_id));
    }
    let max_epoch = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(e, _)| *e))
        .fold(1.0f64, f64::max);
    // Focus on the interesting range: the fine-tuned curves and the references.
    let tuned_values = series
        .iter()
        .flat_map(|(_, p)| p.iter().skip(1).map(|(_, a)| *a))
        .chain(references.iter().map(|(_, a)| *a));
    let (lo, hi) = tuned_values.fold((f64::MAX, f64::MIN), |(lo, hi), a| (lo.min(a), hi.max(a)));
    let (lo, hi) = if lo > hi {
        (0.0, 100.0)
    } else {
        ((lo - 2.0).max(0.0), (hi + 1.0).min(100.0))
    };

    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "{} — accuracy while fine-tuning",
        run.spec.as_ref().map_or(run.run_id.as_str(), |s| &s.name)
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..max_epoch, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("fine-tuning epoch (0: right after fusion)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("accuracy (%)")
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = series_color(i);
        // The accuracy right after fusion is often far below the chart.
        let label = match points.first() {
            Some((e, a)) if *e == 0.0 && *a < lo => format!("{name} ({a:.2} % right after fusion)"),
            _ => name.clone(),
        };
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
    }
    for (i, (name, acc)) in references.iter().enumerate() {
        let color = if name == "ensemble" {
            RGBColor(230, 120, 0)
        } else {
            RGBColor(120, 120, 120 + 30 * (i as u8 % 4))
        };
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, *acc), (max_epoch, *acc)],
                6,
                4,
                color.stroke_width(1),
            ))?
            .label(format!("{name} ({acc:.2} %)"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(1))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> pb::Run {
        let model = |name: &str, acc: f64| pb::ModelReport {
            name: name.into(),
            accuracy: acc,
            loss: 0.3,
            parameters: 1000,
            checkpoint: format!("{name}.safetensors"),
            data: None,
        };
        pb::Run {
            run_id: "run-1".into(),
            state: pb::RunState::Succeeded as i32,
            report: Some(pb::RunReport {
                members: vec![model("member 0", 0.88), model("member 1", 0.885)],
                ensemble: Some(model("ensemble", 0.89)),
                fused: vec![pb::FusedReport {
                    method: pb::FusionMethod::Nt as i32,
                    after_fusion: Some(model("nt", 0.86)),
                    after_fine_tuning: Some(model("nt after fine-tuning", 0.891)),
                    fusion_seconds: 0.05,
                    ..Default::default()
                }],
                curves: vec![pb::Curve {
                    name: "nt fine-tuning".into(),
                    points: (1..=3)
                        .map(|e| pb::CurvePoint {
                            epoch: e,
                            eval_accuracy: 0.87 + 0.007 * f64::from(e),
                            ..Default::default()
                        })
                        .collect(),
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_data_line_says_who_decoded_and_who_read_the_cache() {
        let mut r = run();
        assert!(!text(&r).contains("data:"), "no line for the known sets");
        let load = |hit: bool, seconds: f64| pb::DataLoad {
            source: "s3://nt/datasets/fm".into(),
            images: 70_000,
            skipped: 2,
            seconds,
            cache_hit: hit,
            cache_key: "cache/data/x.safetensors".into(),
        };
        let report = r.report.as_mut().unwrap();
        report.members[0].data = Some(load(false, 9.5));
        report.members[1].data = Some(load(true, 0.25));
        let t = text(&r);
        assert!(
            t.contains(
                "data: 70,000 images from s3://nt/datasets/fm; read by 1 task(s) in up to 9.50 s; \
                 from the decoded cache by 1 in up to 0.25 s; 2 undecodable image(s) skipped"
            ),
            "{t}"
        );
    }

    #[test]
    fn states_are_spelt_as_everywhere_else() {
        let run = pb::Run {
            run_id: "run-1".into(),
            state: pb::RunState::FineTuning as i32,
            ..Default::default()
        };
        assert!(
            text(&run).starts_with("run run-1 (): fine-tuning"),
            "{}",
            text(&run)
        );
    }

    #[test]
    fn tables_name_every_model() {
        let r = run();
        let t = text(&r);
        assert!(
            t.contains("nt after fine-tuning") && t.contains("89.10 %"),
            "{t}"
        );
        assert!(
            t.contains("at or above the best member (88.50 %, +0.60 points)"),
            "{t}"
        );
        let md = markdown(&r);
        assert!(
            md.contains("| nt right after fusion | 86.00 % | 0.3000 | 1,000 |"),
            "{md}"
        );
        let c = csv(&r);
        assert_eq!(c.lines().count(), 6);
        assert!(
            c.contains("\"ensemble of 2 (mean logits)\",0.890000"),
            "{c}"
        );
        assert_eq!(best_member(&r), Some(0.885));
        // The curve (87.7, 88.4, 89.1 %) passes 88.5 % at its third epoch.
        assert_eq!(epochs_to_best_member(&r), [("nt".to_string(), Some(3), 3)]);
        assert!(
            t.contains("fine-tuning reaches the best member at: nt epoch 3"),
            "{t}"
        );
        let mut slow = r.clone();
        slow.report.as_mut().unwrap().members[1].accuracy = 0.95;
        assert_eq!(epochs_to_best_member(&slow), [("nt".to_string(), None, 3)]);
        assert!(text(&slow).contains("nt not within 3"), "{}", text(&slow));
    }

    #[test]
    fn the_plot_is_a_png_of_the_asked_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curves.png");
        plot(&run(), &path, 640, 400).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!((w, h), (640, 400));
    }
}
