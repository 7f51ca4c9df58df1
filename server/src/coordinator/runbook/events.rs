//! What a run tells its watchers: every event numbered in order, for a
//! run's and a task's change of state.

use nt_proto::v1 as pb;

use super::{Effect, Effects, Runbook};
use crate::coordinator::document::{task_id, RunState, TaskState};

impl Runbook {
    /// The run's next event.
    pub(super) fn emit(&mut self, event: pb::run_event::Event, now: i64, fx: &mut Effects) {
        self.doc.event_sequence += 1;
        fx.push(Effect::Emit(pb::RunEvent {
            run_id: self.doc.run_id.clone(),
            sequence: self.doc.event_sequence,
            time_unix_ms: now,
            event: Some(event),
        }));
    }

    /// The run's state changed.
    pub(super) fn emit_state(&mut self, now: i64, fx: &mut Effects) {
        let event = pb::run_event::Event::StateChanged(pb::RunStateChanged {
            state: pb::RunState::from(self.doc.state) as i32,
            message: self.doc.message.clone(),
        });
        self.emit(event, now, fx);
    }

    /// Moves the run to `state` (nothing when it is there already).
    pub(super) fn set_run_state(
        &mut self,
        state: RunState,
        message: &str,
        now: i64,
        fx: &mut Effects,
    ) {
        if self.doc.state == state {
            return;
        }
        self.doc.state = state;
        self.doc.message = message.to_string();
        if state.is_final() {
            self.doc.finished_ms = Some(now);
        }
        self.emit_state(now, fx);
    }

    /// Moves task `i` to `state`; a message is kept as its error.
    pub(super) fn set_task_state(
        &mut self,
        i: usize,
        state: TaskState,
        message: &str,
        now: i64,
        fx: &mut Effects,
    ) {
        let t = &mut self.doc.tasks[i];
        t.state = state;
        if state == TaskState::Failed || !message.is_empty() {
            t.error = message.to_string();
        }
        if state != TaskState::Running {
            t.worker_id.clear();
        }
        self.task_event(i, message, now, fx);
    }

    /// Tells watchers where task `i` stands, with `message`.
    pub(super) fn task_event(&mut self, i: usize, message: &str, now: i64, fx: &mut Effects) {
        let t = &self.doc.tasks[i];
        let state = t.state;
        let event = pb::run_event::Event::TaskChanged(pb::TaskStateChanged {
            task_id: task_id(&self.doc.run_id, &t.work.local_name()),
            label: t.work.label(),
            state: pb::TaskState::from(state) as i32,
            attempt: t.attempt,
            worker_id: t.worker_id.clone(),
            message: message.to_string(),
        });
        self.emit(event, now, fx);
    }
}
