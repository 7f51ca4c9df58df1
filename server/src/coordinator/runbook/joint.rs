//! Joint training in the run state machine: whether one joint task trains
//! a phase's models ([`nt_spec::joint::decide`]), its attempts mirrored
//! onto their records, and the split back into tasks of their own when a
//! worker finds they cannot train jointly.

use nt_spec::joint::{decide, Decision};
use nt_spec::{JointPhase, TaskWork};

use super::{Effect, Effects, Runbook};
use crate::coordinator::document::TaskState;

impl Runbook {
    /// Adds a phase's tasks: one joint task and the records of the models
    /// it trains when the run's `members.joint` resolves to joint for them,
    /// else a task per model (saying why, when `on` was refused). A phase
    /// of one model has nothing to join.
    pub(super) fn add_phase(
        &mut self,
        phase: JointPhase,
        works: Vec<TaskWork>,
        now: i64,
        fx: &mut Effects,
    ) {
        let configs: Vec<_> = works.iter().filter_map(|w| self.train_config(w)).collect();
        let decision = if works.len() < 2 || configs.len() != works.len() {
            Decision::Separate(None)
        } else {
            let plan = &self.plan;
            // Distilled fine-tunings hold the members as teachers.
            let teachers = match phase {
                JointPhase::FineTunings => self.doc.member_keys.len(),
                JointPhase::Members => 0,
            };
            decide(
                plan.joint,
                plan.device,
                &plan.arch,
                &configs,
                teachers,
                self.joint_budget,
            )
        };
        match decision {
            Decision::Joint => {
                let joint = TaskWork::Joint {
                    phase,
                    models: works.len(),
                };
                let group = joint.local_name();
                self.add_task(joint, "", "", now, fx);
                for work in works {
                    self.add_task(work, &group, "", now, fx);
                }
            }
            Decision::Separate(why) => {
                let note = why.map_or_else(String::new, |w| format!("trained separately: {w}"));
                for work in works {
                    self.add_task(work, "", &note, now, fx);
                }
            }
        }
    }

    /// The records of the models joint task `i` trains, in their order in
    /// the run (its parts' order); none for any other task.
    pub fn parts(&self, i: usize) -> Vec<usize> {
        let joint = &self.doc.tasks[i].work;
        if !matches!(joint, TaskWork::Joint { .. }) {
            return Vec::new();
        }
        let name = joint.local_name();
        (0..self.doc.tasks.len())
            .filter(|&j| self.doc.tasks[j].group == name)
            .collect()
    }

    /// Gives joint task `i`'s models its new `state`, attempt and worker
    /// (nothing for any other task), so listings show them as it is.
    pub(super) fn mirror(
        &mut self,
        i: usize,
        state: TaskState,
        message: &str,
        now: i64,
        fx: &mut Effects,
    ) {
        let attempt = self.doc.tasks[i].attempt;
        let worker = self.doc.tasks[i].worker_id.clone();
        for j in self.parts(i) {
            let t = &mut self.doc.tasks[j];
            t.attempt = attempt;
            t.worker_id.clone_from(&worker);
            if state == TaskState::Running {
                t.progress = None;
                t.curve.clear();
            }
            self.set_task_state(j, state, message, now, fx);
        }
    }

    /// The attempts task `i` has used of its own: after a split, those of
    /// the joint task that trained it first do not count (its attempt
    /// numbers go on from the joint task's, so every attempt keeps its own
    /// prefix, but it gets `max_attempts` of its own).
    pub(super) fn own_attempts(&self, i: usize) -> u32 {
        let t = &self.doc.tasks[i];
        let phase = match t.work {
            TaskWork::Train { .. } => JointPhase::Members,
            TaskWork::FineTune { .. } | TaskWork::Baseline => JointPhase::FineTunings,
            TaskWork::Evaluate | TaskWork::Joint { .. } => return t.attempt,
        };
        let split = self.doc.tasks.iter().find(|r| {
            matches!(r.work, TaskWork::Joint { phase: p, .. } if p == phase)
                && r.state == TaskState::Cancelled
                && r.error.starts_with("split: ")
        });
        match split {
            Some(joint) if t.group.is_empty() => t.attempt.saturating_sub(joint.attempt),
            _ => t.attempt,
        }
    }

    /// Joint task `i`'s models cannot train jointly (`reason`): it ends, and
    /// each model is queued as a task of its own, starting afresh.
    pub(super) fn split(&mut self, i: usize, reason: &str, now: i64, fx: &mut Effects) {
        let parts = self.parts(i);
        fx.push(Effect::Release {
            task: self.task_id(&self.doc.tasks[i]),
        });
        let message = format!("split: {reason}");
        self.set_task_state(i, TaskState::Cancelled, &message, now, fx);
        let note = format!("trained separately: {reason}");
        for j in parts {
            let t = &mut self.doc.tasks[j];
            t.group.clear();
            t.state = TaskState::Pending;
            t.worker_id.clear();
            t.progress = None;
            t.curve.clear();
            t.resume = None;
            t.resume_epoch = 0;
            self.task_event(j, &note, now, fx);
            fx.push(Effect::Queue {
                task: self.task_id(&self.doc.tasks[j]),
                gpu_only: self.gpu_only(),
            });
        }
    }
}
