//! What the soak saw, shared by its tasks: client-side latency per RPC kind,
//! every lease and every accepted completion per task, watch streams, and
//! the runs submitted so far.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Latencies and errors of one RPC kind.
#[derive(Clone, Debug, Default)]
pub struct Calls {
    pub latencies: Vec<Duration>,
    pub errors: u64,
}

/// How watch streams ended.
#[derive(Clone, Debug, Default)]
pub struct Watches {
    pub opened: u64,
    /// Ended after the run's final state.
    pub terminal: u64,
    /// Ended (closed, failed or timed out) without it.
    pub without_terminal: u64,
    /// The final state they saw was not `succeeded`.
    pub not_succeeded: u64,
    pub events: u64,
    /// Events whose sequence number did not increase.
    pub out_of_order: u64,
}

/// Everything recorded, as one copy.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub calls: BTreeMap<&'static str, Calls>,
    /// Task id -> attempts leased, in order.
    pub leases: HashMap<String, Vec<u32>>,
    /// Task id -> attempts whose completion the coordinator accepted.
    pub completed: HashMap<String, Vec<u32>>,
    /// Leases of a task whose completion had already been accepted.
    pub leased_after_completion: u64,
    /// Completions the coordinator refused.
    pub refused: u64,
    /// Attempts stopped by a directive other than CONTINUE.
    pub abandoned: u64,
    /// Attempts given up for a store error (reported with FailTask).
    pub failed: u64,
    pub watches: Watches,
}

#[derive(Default)]
pub struct Tally {
    inner: Mutex<Snapshot>,
}

impl Tally {
    fn with<T>(&self, f: impl FnOnce(&mut Snapshot) -> T) -> T {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// Awaits `call`, recording its latency (successes) or an error under `kind`.
    pub async fn timed<T, E>(
        &self,
        kind: &'static str,
        call: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let start = Instant::now();
        let result = call.await;
        self.record(kind, start.elapsed(), result.is_ok());
        result
    }

    pub fn record(&self, kind: &'static str, latency: Duration, ok: bool) {
        self.with(|s| {
            let calls = s.calls.entry(kind).or_default();
            if ok {
                calls.latencies.push(latency);
            } else {
                calls.errors += 1;
            }
        });
    }

    pub fn leased(&self, task_id: &str, attempt: u32) {
        self.with(|s| {
            if s.completed.contains_key(task_id) {
                s.leased_after_completion += 1;
            }
            s.leases.entry(task_id.into()).or_default().push(attempt);
        });
    }

    pub fn completed(&self, task_id: &str, attempt: u32) {
        self.with(|s| s.completed.entry(task_id.into()).or_default().push(attempt));
    }

    pub fn refused(&self) {
        self.with(|s| s.refused += 1);
    }

    pub fn abandoned(&self) {
        self.with(|s| s.abandoned += 1);
    }

    pub fn failed(&self) {
        self.with(|s| s.failed += 1);
    }

    pub fn watch_opened(&self) {
        self.with(|s| s.watches.opened += 1);
    }

    /// A stream ended: `events` received, `disordered` of them out of
    /// order, and the final state when it came (`Some(true)`: succeeded).
    pub fn watch_ended(&self, events: u64, disordered: u64, terminal: Option<bool>) {
        self.with(|s| {
            let w = &mut s.watches;
            w.events += events;
            w.out_of_order += disordered;
            match terminal {
                Some(succeeded) => {
                    w.terminal += 1;
                    w.not_succeeded += u64::from(!succeeded);
                }
                None => w.without_terminal += 1,
            }
        });
    }

    pub fn snapshot(&self) -> Snapshot {
        self.with(|s| s.clone())
    }
}

/// The runs submitted so far, and which a watcher has taken.
#[derive(Default)]
pub struct RunList {
    inner: Mutex<(Vec<String>, HashSet<String>)>,
}

impl RunList {
    pub fn push(&self, run_id: String) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .push(run_id);
    }

    /// The newest run no watcher has taken yet (taking it).
    pub fn take_unwatched(&self) -> Option<String> {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (runs, taken) = &mut *guard;
        let run = runs.iter().rev().find(|r| !taken.contains(*r))?.clone();
        taken.insert(run.clone());
        Some(run)
    }

    pub fn all(&self) -> Vec<String> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_after_an_accepted_completion_is_counted() {
        let t = Tally::default();
        t.leased("r/member-0", 1);
        t.completed("r/member-0", 1);
        t.leased("r/member-0", 2);
        let s = t.snapshot();
        assert_eq!(s.leased_after_completion, 1);
        assert_eq!(s.leases["r/member-0"], vec![1, 2]);
    }

    #[test]
    fn watchers_take_the_newest_run_once() {
        let runs = RunList::default();
        runs.push("a".into());
        runs.push("b".into());
        assert_eq!(runs.take_unwatched().as_deref(), Some("b"));
        assert_eq!(runs.take_unwatched().as_deref(), Some("a"));
        assert_eq!(runs.take_unwatched(), None);
    }
}
