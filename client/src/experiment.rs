//! Repeats of one comparison, aggregated: the finished runs of an
//! experiment (one per seed and member count) become, per member count, the
//! mean and standard deviation over seeds of every figure the paper
//! compares, as a table (text, Markdown, JSON) and a plot of the
//! fine-tuning curves with bands of one standard deviation.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, Result};
use nt_proto::v1 as pb;
use serde::Serialize;

use crate::report::{best_member, mebibytes, tuned};

/// Mean and sample standard deviation of some numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Stat {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Stat> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let std = if n > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Some(Stat { mean, std, n })
    }
}

/// One fine-tuned model (a fusion method, its distilled variant, or the
/// baseline) over the seeds.
#[derive(Clone, Debug, Serialize)]
pub struct TunedSummary {
    pub name: String,
    /// Test accuracy right after fusion (member 0's for the baseline).
    pub start: Option<Stat>,
    /// The first epoch reaching the best member, over the seeds where it did.
    pub epochs_to_best_member: Option<Stat>,
    /// Seeds where it reached the best member within the epochs run.
    pub reached: usize,
    /// Test accuracy after the last epoch.
    pub end: Option<Stat>,
    pub fusion_seconds: Option<Stat>,
    pub fusion_peak_bytes: Option<Stat>,
    /// Evaluation accuracy per epoch (index 0: epoch 0, right after fusion).
    pub curve: Vec<Stat>,
}

/// The runs with one member count.
#[derive(Clone, Debug, Serialize)]
pub struct Group {
    pub members: usize,
    pub seeds: usize,
    pub best_member: Option<Stat>,
    pub mean_member: Option<Stat>,
    pub ensemble: Option<Stat>,
    pub tuned: Vec<TunedSummary>,
}

/// Every member count of an experiment.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub name: String,
    pub groups: Vec<Group>,
}

fn stat_of(values: impl Iterator<Item = Option<f64>>) -> Option<Stat> {
    Stat::of(&values.flatten().collect::<Vec<_>>())
}

/// Aggregates finished runs by their member count. Runs that did not
/// succeed are an error: a mean over the survivors would hide them.
pub fn summarize(name: &str, runs: &[pb::Run]) -> Result<Summary> {
    let mut by_count: BTreeMap<usize, Vec<&pb::Run>> = BTreeMap::new();
    for run in runs {
        if run.state != pb::RunState::Succeeded as i32 {
            return Err(anyhow!(
                "run {} did not succeed ({}): {}",
                run.run_id,
                nt_proto::enum_names::run_state::name(run.state).unwrap_or_default(),
                run.message
            ));
        }
        let report = run
            .report
            .as_ref()
            .ok_or_else(|| anyhow!("run {} has no report", run.run_id))?;
        by_count.entry(report.members.len()).or_default().push(run);
    }
    let groups = by_count
        .into_iter()
        .map(|(members, runs)| group(members, &runs))
        .collect();
    Ok(Summary {
        name: name.to_string(),
        groups,
    })
}

fn group(members: usize, runs: &[&pb::Run]) -> Group {
    let reports: Vec<&pb::RunReport> = runs.iter().filter_map(|r| r.report.as_ref()).collect();
    let mean_member = |r: &pb::RunReport| {
        (!r.members.is_empty())
            .then(|| r.members.iter().map(|m| m.accuracy).sum::<f64>() / r.members.len() as f64)
    };
    // Names in the order of the first run's report.
    let mut names: Vec<String> = Vec::new();
    for r in &reports {
        for t in tuned(r) {
            if !names.contains(&t.name) {
                names.push(t.name);
            }
        }
    }
    let tuned_summaries = names.iter().map(|name| tuned_summary(name, runs)).collect();
    Group {
        members,
        seeds: runs.len(),
        best_member: stat_of(runs.iter().map(|r| best_member(r))),
        mean_member: stat_of(reports.iter().map(|r| mean_member(r))),
        ensemble: stat_of(
            reports
                .iter()
                .map(|r| r.ensemble.as_ref().map(|e| e.accuracy)),
        ),
        tuned: tuned_summaries,
    }
}

fn tuned_summary(name: &str, runs: &[&pb::Run]) -> TunedSummary {
    let mut start = Vec::new();
    let mut end = Vec::new();
    let mut reached_at = Vec::new();
    let mut seconds = Vec::new();
    let mut peak = Vec::new();
    let mut per_epoch: Vec<Vec<f64>> = Vec::new();
    for run in runs {
        let Some(report) = run.report.as_ref() else {
            continue;
        };
        let Some(t) = tuned(report).into_iter().find(|t| t.name == name) else {
            continue;
        };
        start.extend(t.start);
        end.extend(t.end);
        let method = name.trim_end_matches(" (distilled)");
        if let Some(f) = report.fused.iter().find(|f| {
            pb::FusionMethod::try_from(f.method)
                .ok()
                .and_then(nt_spec::wire::method_from_wire)
                .is_some_and(|m| m.as_str() == method)
        }) {
            seconds.push(f.fusion_seconds);
            if f.fusion_peak_bytes > 0 {
                peak.push(f.fusion_peak_bytes as f64);
            }
        }
        let mut points: Vec<f64> = t.start.into_iter().collect();
        if let Some(c) = t.curve {
            points.extend(c.points.iter().map(|p| p.eval_accuracy));
            if let Some(best) = best_member(run) {
                if let Some(p) = c.points.iter().find(|p| p.eval_accuracy >= best) {
                    reached_at.push(f64::from(p.epoch));
                }
            }
        }
        for (e, a) in points.into_iter().enumerate() {
            if per_epoch.len() <= e {
                per_epoch.resize(e + 1, Vec::new());
            }
            per_epoch[e].push(a);
        }
    }
    TunedSummary {
        name: name.to_string(),
        start: Stat::of(&start),
        epochs_to_best_member: Stat::of(&reached_at),
        reached: reached_at.len(),
        end: Stat::of(&end),
        fusion_seconds: Stat::of(&seconds),
        fusion_peak_bytes: Stat::of(&peak),
        curve: per_epoch.iter().filter_map(|v| Stat::of(v)).collect(),
    }
}

fn pct(s: Option<Stat>) -> String {
    s.map_or_else(
        || "-".into(),
        |s| format!("{:.2} ± {:.2}", 100.0 * s.mean, 100.0 * s.std),
    )
}

impl Summary {
    /// One Markdown table per member count.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        for g in &self.groups {
            let _ = writeln!(
                out,
                "#### {}: K = {}, {} seed(s)\n\n\
                 | model | right after fusion (%) | epochs to best member | final (%) | fusion time (s) | fusion peak memory |\n\
                 | --- | ---: | ---: | ---: | ---: | ---: |",
                self.name, g.members, g.seeds
            );
            let _ = writeln!(out, "| best member | | | {} | | |", pct(g.best_member));
            let _ = writeln!(out, "| mean member | | | {} | | |", pct(g.mean_member));
            let _ = writeln!(
                out,
                "| ensemble (mean logits) | | | {} | | |",
                pct(g.ensemble)
            );
            for t in &g.tuned {
                let epochs = match t.epochs_to_best_member {
                    Some(s) if t.reached == g.seeds => format!("{:.1} ± {:.1}", s.mean, s.std),
                    Some(s) => format!("{:.1} ({}/{} seeds)", s.mean, t.reached, g.seeds),
                    None => format!("not reached (0/{})", g.seeds),
                };
                let seconds = t
                    .fusion_seconds
                    .map_or_else(|| "-".into(), |s| format!("{:.3}", s.mean));
                let peak = t
                    .fusion_peak_bytes
                    .map_or_else(|| "-".into(), |s| mebibytes(s.mean as u64));
                let _ = writeln!(
                    out,
                    "| {} | {} | {epochs} | {} | {seconds} | {peak} |",
                    t.name,
                    pct(t.start),
                    pct(t.end)
                );
            }
            out.push('\n');
        }
        out
    }

    /// Per member count, the fine-tuning curves (mean over seeds, with a
    /// band of one standard deviation) and the best member and ensemble as
    /// reference lines, side by side in one PNG.
    pub fn plot(&self, path: &Path, panel_width: u32, height: u32) -> Result<()> {
        use plotters::prelude::*;

        if self.groups.is_empty() {
            return Err(anyhow!("no runs to plot"));
        }
        crate::report::register_font()?;
        let width = panel_width * self.groups.len() as u32;
        let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let panels = root.split_evenly((1, self.groups.len()));
        for (g, area) in self.groups.iter().zip(panels.iter()) {
            draw_group(&self.name, g, area)?;
        }
        root.present()?;
        Ok(())
    }
}

/// How a fine-tuned model is drawn: one colour per fusion method (the
/// baseline its own), the distilled variant dashed.
fn style_of(g: &Group, name: &str) -> (plotters::style::RGBColor, bool) {
    let distilled = name.ends_with(" (distilled)");
    let base = name.trim_end_matches(" (distilled)");
    if base == "baseline" {
        return (plotters::style::RGBColor(140, 80, 20), false);
    }
    let mut methods: Vec<&str> = Vec::new();
    for t in &g.tuned {
        let m = t.name.trim_end_matches(" (distilled)");
        if m != "baseline" && !methods.contains(&m) {
            methods.push(m);
        }
    }
    let i = methods.iter().position(|m| *m == base).unwrap_or(0);
    (crate::report::series_color(i), distilled)
}

fn draw_group<DB: plotters::prelude::DrawingBackend>(
    name: &str,
    g: &Group,
    area: &plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    use plotters::prelude::*;

    let max_epoch = g
        .tuned
        .iter()
        .map(|t| t.curve.len().saturating_sub(1))
        .max()
        .unwrap_or(1)
        .max(1);
    let references: Vec<(String, f64)> = [("best member", g.best_member), ("ensemble", g.ensemble)]
        .into_iter()
        .filter_map(|(n, s)| s.map(|s| (n.to_string(), 100.0 * s.mean)))
        .collect();
    // The range of the fine-tuned epochs and the references; epoch 0 is
    // often far below and is named in the legend instead.
    let values = g
        .tuned
        .iter()
        .flat_map(|t| t.curve.iter().skip(1).map(|s| 100.0 * s.mean))
        .chain(references.iter().map(|(_, a)| *a));
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), a| (lo.min(a), hi.max(a)));
    let (lo, hi) = if lo > hi {
        (0.0, 100.0)
    } else {
        ((lo - 1.5).max(0.0), (hi + 1.0).min(100.0))
    };
    let entries = g.tuned.len() + references.len();
    let legend_height = 14 + 17 * entries.div_ceil(2) as u32;
    let (chart_area, legend_area) =
        area.split_vertically(area.dim_in_pixel().1.saturating_sub(legend_height));
    let mut chart = ChartBuilder::on(&chart_area)
        .caption(
            format!("{name}, K = {} ({} seeds)", g.members, g.seeds),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max_epoch as f64, lo..hi)?;
    chart
        .configure_mesh()
        .x_labels(max_epoch + 1)
        .x_desc("fine-tuning epoch (0: right after fusion)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("test accuracy (%), mean ± std")
        .label_style(("sans-serif", 13))
        .draw()?;
    let mut legend: Vec<(String, RGBColor, bool, u32)> = Vec::new();
    for t in &g.tuned {
        let (color, dashed) = style_of(g, &t.name);
        let upper: Vec<(f64, f64)> = t
            .curve
            .iter()
            .enumerate()
            .map(|(e, s)| (e as f64, (100.0 * (s.mean + s.std)).clamp(lo, hi)))
            .collect();
        let lower = t
            .curve
            .iter()
            .enumerate()
            .rev()
            .map(|(e, s)| (e as f64, (100.0 * (s.mean - s.std)).clamp(lo, hi)));
        let band: Vec<(f64, f64)> = upper.iter().copied().chain(lower).collect();
        chart.draw_series(std::iter::once(Polygon::new(
            band,
            color.mix(0.12).filled(),
        )))?;
        let mean: Vec<(f64, f64)> = t
            .curve
            .iter()
            .enumerate()
            .map(|(e, s)| (e as f64, 100.0 * s.mean))
            .collect();
        if dashed {
            chart.draw_series(DashedLineSeries::new(mean, 7, 4, color.stroke_width(2)))?;
        } else {
            chart.draw_series(LineSeries::new(mean, color.stroke_width(2)))?;
        }
        let label = match t.curve.first() {
            Some(s) if 100.0 * s.mean < lo => {
                format!("{} ({:.1} % at epoch 0)", t.name, 100.0 * s.mean)
            }
            _ => t.name.clone(),
        };
        legend.push((label, color, dashed, 2));
    }
    for (name, acc) in &references {
        let color = if name == "ensemble" {
            RGBColor(230, 120, 0)
        } else {
            RGBColor(110, 110, 110)
        };
        chart.draw_series(DashedLineSeries::new(
            vec![(0.0, *acc), (max_epoch as f64, *acc)],
            3,
            3,
            color.stroke_width(1),
        ))?;
        legend.push((format!("{name} ({acc:.2} %)"), color, true, 1));
    }
    // The legend below the chart, in two columns, so it hides no curve.
    let (width, _) = legend_area.dim_in_pixel();
    let column = (width as i32 - 24) / 2;
    for (i, (label, color, dashed, stroke)) in legend.iter().enumerate() {
        let x = 16 + column * (i % 2) as i32;
        let y = 8 + 17 * (i / 2) as i32;
        let segments: Vec<(i32, i32)> = if *dashed {
            vec![(x, y + 6), (x + 6, y + 6), (x + 10, y + 6), (x + 16, y + 6)]
        } else {
            vec![(x, y + 6), (x + 16, y + 6)]
        };
        for pair in segments.chunks(2) {
            legend_area.draw(&PathElement::new(
                pair.to_vec(),
                color.stroke_width(*stroke),
            ))?;
        }
        legend_area.draw(&Text::new(label.clone(), (x + 22, y), ("sans-serif", 12)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str, accuracy: f64) -> pb::ModelReport {
        pb::ModelReport {
            name: name.into(),
            accuracy,
            loss: 0.3,
            ..Default::default()
        }
    }

    fn curve(name: &str, accs: &[f64]) -> pb::Curve {
        pb::Curve {
            name: name.into(),
            points: accs
                .iter()
                .enumerate()
                .map(|(i, &a)| pb::CurvePoint {
                    epoch: i as u32 + 1,
                    eval_accuracy: a,
                    ..Default::default()
                })
                .collect(),
        }
    }

    /// A finished K = 2 run whose NT curve is `nt`, distilled `kd`, baseline `base`.
    fn run(members: [f64; 2], nt: &[f64], kd: &[f64], base: &[f64], peak: u64) -> pb::Run {
        pb::Run {
            run_id: "r".into(),
            state: pb::RunState::Succeeded as i32,
            report: Some(pb::RunReport {
                members: vec![model("member 0", members[0]), model("member 1", members[1])],
                ensemble: Some(model("ensemble", 0.9)),
                fused: vec![pb::FusedReport {
                    method: pb::FusionMethod::Nt as i32,
                    after_fusion: Some(model("nt", 0.8)),
                    after_fine_tuning: Some(model("nt after fine-tuning", *nt.last().unwrap())),
                    after_distilled_fine_tuning: Some(model(
                        "nt after distilled fine-tuning",
                        *kd.last().unwrap(),
                    )),
                    fusion_seconds: 0.5,
                    fusion_peak_bytes: peak,
                    ..Default::default()
                }],
                curves: vec![
                    curve("nt fine-tuning", nt),
                    curve("nt fine-tuning (distilled)", kd),
                    curve("baseline", base),
                ],
                baseline: Some(model("baseline", *base.last().unwrap())),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn seeds_aggregate_into_mean_and_standard_deviation() {
        let runs = [
            run(
                [0.85, 0.86],
                &[0.84, 0.87],
                &[0.86, 0.88],
                &[0.85, 0.855],
                1 << 20,
            ),
            run(
                [0.86, 0.87],
                &[0.88, 0.89],
                &[0.85, 0.86],
                &[0.85, 0.86],
                3 << 20,
            ),
        ];
        let s = summarize("mlp", &runs).unwrap();
        assert_eq!(s.groups.len(), 1);
        let g = &s.groups[0];
        assert_eq!((g.members, g.seeds), (2, 2));
        let best = g.best_member.unwrap();
        assert!((best.mean - 0.865).abs() < 1e-12);
        assert!((best.std - (2.0f64 * 0.005f64.powi(2)).sqrt()).abs() < 1e-12);
        let names: Vec<&str> = g.tuned.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["nt", "nt (distilled)", "baseline"]);
        let nt = &g.tuned[0];
        // Seed 1 reaches 0.86 at epoch 2, seed 2 reaches 0.87 at epoch 1.
        assert_eq!(nt.reached, 2);
        assert!((nt.epochs_to_best_member.unwrap().mean - 1.5).abs() < 1e-12);
        assert_eq!(nt.curve.len(), 3, "epoch 0 and two fine-tuning epochs");
        assert!((nt.curve[0].mean - 0.8).abs() < 1e-12);
        assert!((nt.fusion_peak_bytes.unwrap().mean - f64::from(2u32 << 20)).abs() < 1e-6);
        // The distilled variant reaches the best member on seed 1 only.
        let kd = &g.tuned[1];
        assert_eq!(kd.reached, 1);
        assert_eq!(kd.fusion_seconds.unwrap().n, 2, "it shares the fusion");
        // The baseline starts at member 0 and never reaches the best member.
        let base = &g.tuned[2];
        assert!((base.start.unwrap().mean - 0.855).abs() < 1e-12);
        assert_eq!(base.reached, 0);
        assert!(base.fusion_seconds.is_none());
        let md = s.markdown();
        assert!(
            md.contains("| nt | 80.00 ± 0.00 | 1.5 ± 0.7 | 88.00 ± 1.41 | 0.500 | 2.0 MiB |"),
            "{md}"
        );
        assert!(
            md.contains("| nt (distilled) | 80.00 ± 0.00 | 1.0 (1/2 seeds) |"),
            "{md}"
        );
        assert!(
            md.contains("| baseline | 85.50 ± 0.71 | not reached (0/2) |"),
            "{md}"
        );
    }

    #[test]
    fn a_failed_run_is_an_error_not_a_smaller_mean() {
        let mut bad = run([0.8, 0.8], &[0.8], &[0.8], &[0.8], 0);
        bad.state = pb::RunState::Failed as i32;
        bad.message = "task member 1 failed".into();
        let e = summarize("mlp", &[bad]).unwrap_err().to_string();
        assert!(
            e.contains("did not succeed") && e.contains("member 1 failed"),
            "{e}"
        );
    }

    #[test]
    fn the_plot_has_one_panel_per_member_count() {
        let mut four = run([0.85, 0.86], &[0.84, 0.87], &[0.86, 0.88], &[0.86, 0.86], 0);
        let r = four.report.as_mut().unwrap();
        r.members
            .extend([model("member 2", 0.84), model("member 3", 0.83)]);
        let runs = [
            run([0.85, 0.86], &[0.84, 0.87], &[0.86, 0.88], &[0.86, 0.86], 0),
            four,
        ];
        let s = summarize("mlp", &runs).unwrap();
        assert_eq!(s.groups.len(), 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bands.png");
        s.plot(&path, 500, 400).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        assert_eq!(w, 1000);
    }
}
