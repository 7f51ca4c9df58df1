//! Showing a run's events: a progress bar per task (epochs, samples per
//! second, current accuracy) under a line for the run's phase on a
//! terminal; plain lines when the output is not a terminal; JSON lines with
//! `--output json`.

use std::collections::HashMap;
use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use nt_client::pb;

use crate::output::OutputFormat;

pub struct Display {
    format: OutputFormat,
    tty: bool,
    multi: MultiProgress,
    phase: Option<ProgressBar>,
    bars: HashMap<String, ProgressBar>,
    /// Last epoch printed per task (plain mode prints each epoch once).
    printed: HashMap<String, u32>,
}

fn state_name(s: i32) -> String {
    pb::RunState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("RUN_STATE_")
                .replace('_', " ")
                .to_lowercase()
        })
        .unwrap_or_default()
}

fn task_state_name(s: i32) -> String {
    pb::TaskState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("TASK_STATE_")
                .to_lowercase()
        })
        .unwrap_or_default()
}

fn progress_text(p: &pb::TaskProgress) -> String {
    let eval = p
        .eval_accuracy
        .map_or(String::new(), |a| format!("  eval {:.2}%", 100.0 * a));
    format!(
        "epoch {}/{}  loss {:.4}  acc {:.2}%{eval}  {:.0} samples/s",
        p.epoch,
        p.epochs,
        p.loss,
        100.0 * p.accuracy,
        p.samples_per_second
    )
}

impl Display {
    pub fn new(format: OutputFormat) -> Self {
        let tty = format == OutputFormat::Text && std::io::stderr().is_terminal();
        let multi = MultiProgress::with_draw_target(if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        Display {
            format,
            tty,
            multi,
            phase: None,
            bars: HashMap::new(),
            printed: HashMap::new(),
        }
    }

    fn bar(&mut self, task_id: &str, label: &str) -> ProgressBar {
        if let Some(b) = self.bars.get(task_id) {
            return b.clone();
        }
        let style = ProgressStyle::with_template("{prefix:>22} [{bar:30.cyan/blue}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let b = self.multi.add(
            ProgressBar::new(1)
                .with_style(style)
                .with_prefix(label.to_string()),
        );
        self.bars.insert(task_id.to_string(), b.clone());
        b
    }

    pub fn event(&mut self, ev: &pb::RunEvent) {
        if self.format == OutputFormat::Json {
            if let Ok(line) = serde_json::to_string(ev) {
                println!("{line}");
            }
            return;
        }
        match &ev.event {
            Some(pb::run_event::Event::StateChanged(s)) => {
                let text = if s.message.is_empty() {
                    format!("run {}", state_name(s.state))
                } else {
                    format!("run {}: {}", state_name(s.state), s.message)
                };
                if self.tty {
                    let phase = self.phase.get_or_insert_with(|| {
                        let p = self.multi.insert(0, ProgressBar::new_spinner());
                        p.enable_steady_tick(std::time::Duration::from_millis(120));
                        p
                    });
                    phase.set_message(text);
                } else {
                    eprintln!("{text}");
                }
            }
            Some(pb::run_event::Event::TaskChanged(t)) => {
                let state = task_state_name(t.state);
                let text = match (state.as_str(), t.message.is_empty()) {
                    ("running", _) => format!("attempt {} on {}", t.attempt, t.worker_id),
                    (s, true) => s.to_string(),
                    (s, false) => format!("{s}: {}", t.message),
                };
                if self.tty {
                    let b = self.bar(&t.task_id, &t.label);
                    match state.as_str() {
                        "succeeded" => b.finish_with_message("done"),
                        "failed" | "cancelled" => b.abandon_with_message(text),
                        _ => b.set_message(text),
                    }
                } else {
                    eprintln!("{}: {text}", t.label);
                }
            }
            Some(pb::run_event::Event::TaskProgress(t)) => {
                let Some(p) = &t.progress else { return };
                if p.epochs == 0 {
                    return;
                }
                if self.tty {
                    let b = self.bar(&t.task_id, &t.label);
                    b.set_length(u64::from(p.epochs) * u64::from(p.steps.max(1)));
                    b.set_position(
                        u64::from(p.epoch - 1) * u64::from(p.steps.max(1)) + u64::from(p.step),
                    );
                    b.set_message(progress_text(p));
                } else if p.eval_accuracy.is_some()
                    && self.printed.get(&t.task_id) != Some(&p.epoch)
                {
                    self.printed.insert(t.task_id.clone(), p.epoch);
                    eprintln!("{}: {}", t.label, progress_text(p));
                }
            }
            None => {}
        }
    }

    pub fn finish(&mut self) {
        if let Some(p) = self.phase.take() {
            p.finish();
        }
        let _ = self.multi.clear();
    }
}
