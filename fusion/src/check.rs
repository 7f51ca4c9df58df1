//! The seam where an exactness check plugs into fusion. The fusion math
//! knows no runtime; the torch runtime's guard (`nt_runtime::guard`)
//! implements [`StepCheck`] by running the members, the concatenated model
//! and the fused model on a probe batch. [`NoCheck`] checks nothing.

use serde::Serialize;

use crate::arch::Architecture;
use crate::assemble::Selection;
use crate::coupling::Coupling;
use crate::state::StateDict;
use crate::Result;

/// When the guard runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardMode {
    /// Run when the wide model has at most this many parameters.
    Auto { max_wide_params: usize },
    /// Always run, whatever the size.
    Always,
    /// Never run.
    Off,
}

impl Default for GuardMode {
    fn default() -> Self {
        GuardMode::Auto {
            max_wide_params: 50_000_000,
        }
    }
}

/// What one guarded step measured.
#[derive(Clone, Debug, Serialize)]
pub struct GuardStep {
    pub members: usize,
    /// max |concatenated logits - mean member logits|
    pub concat_max_diff: f64,
    /// max |fused logits - masked concatenated logits|, for NT steps
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fused_max_diff: Option<f64>,
    /// The logits' scale the differences are judged against: max(1, max |logit|).
    pub scale: f64,
}

/// What the guard did over a whole fusion.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GuardReport {
    pub ran: bool,
    /// Why it did not run, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    pub steps: Vec<GuardStep>,
}

/// Checks the steps of a fusion. Contract: `check` is called once per step
/// with the step's members (for `concat`, before assembling; for the NT
/// variants, after each transplantation with the selections and the fused
/// state); an `Err` aborts the fusion with that error. `report` says what
/// was checked, for the fusion's report.
pub trait StepCheck {
    fn check(
        &mut self,
        arch: &Architecture,
        coupling: &Coupling,
        members: &[&StateDict],
        kept: Option<(&[Selection], &StateDict)>,
    ) -> Result<()>;

    fn report(&self) -> GuardReport;
}

/// Checks nothing: for callers without a runtime to run models on.
pub struct NoCheck;

impl StepCheck for NoCheck {
    fn check(
        &mut self,
        _: &Architecture,
        _: &Coupling,
        _: &[&StateDict],
        _: Option<(&[Selection], &StateDict)>,
    ) -> Result<()> {
        Ok(())
    }

    fn report(&self) -> GuardReport {
        GuardReport {
            ran: false,
            skipped: Some("no exactness check was given".into()),
            steps: Vec::new(),
        }
    }
}
