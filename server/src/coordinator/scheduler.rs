//! The task scheduler, without I/O: the queue of pending tasks, the leases
//! of running ones and the registered workers. Every time is an argument,
//! so tests drive it with a fake clock.
//!
//! Contract: a task is in the queue, or reserved (picked, its lease being
//! stored), or leased, never two of these. [`Scheduler::pick`] reserves the
//! oldest task a worker can run; the driver then either leases it (the lease
//! was stored) or puts it back at the head of the queue (it was not). A task
//! put back waits a backoff (doubling with each failure, up to
//! [`MAX_BACKOFF`]) during which `pick` passes it over, so one run whose
//! writes fail never keeps workers from the other runs' tasks.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use nt_proto::v1 as pb;

/// A task waiting for a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    pub task: String,
    /// Only workers with a GPU may take it.
    pub gpu_only: bool,
}

/// The longest a task whose lease could not be stored waits before it is
/// offered again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A task whose lease could not be stored.
#[derive(Clone, Debug)]
struct Deferral {
    until: Instant,
    failures: u32,
}

#[derive(Clone, Debug)]
struct Lease {
    attempt: u32,
    deadline: Instant,
}

struct Worker {
    capabilities: pb::WorkerCapabilities,
    last_seen: Instant,
}

pub struct Scheduler {
    lease_ttl: Duration,
    /// The first wait of a task whose lease could not be stored.
    backoff: Duration,
    /// A worker not heard from for this long is forgotten.
    worker_silence: Duration,
    queue: VecDeque<Queued>,
    leases: HashMap<String, Lease>,
    deferred: HashMap<String, Deferral>,
    workers: HashMap<String, Worker>,
}

/// The worker is not registered (it must register again).
#[derive(Debug, PartialEq, Eq)]
pub struct UnknownWorker;

impl Scheduler {
    pub fn new(lease_ttl: Duration, worker_silence: Duration, backoff: Duration) -> Self {
        Scheduler {
            lease_ttl,
            backoff,
            worker_silence,
            queue: VecDeque::new(),
            leases: HashMap::new(),
            deferred: HashMap::new(),
            workers: HashMap::new(),
        }
    }

    pub fn register(&mut self, worker: &str, capabilities: pb::WorkerCapabilities, now: Instant) {
        self.workers.insert(
            worker.to_string(),
            Worker {
                capabilities,
                last_seen: now,
            },
        );
    }

    /// Notes that a worker was heard from; false when it is not registered.
    pub fn touch(&mut self, worker: &str, now: Instant) -> bool {
        match self.workers.get_mut(worker) {
            Some(w) => {
                w.last_seen = now;
                true
            }
            None => false,
        }
    }

    /// Adds a task at the back of the queue (once).
    pub fn queue(&mut self, q: Queued) {
        if !self.queue.contains(&q) && !self.leases.contains_key(&q.task) {
            self.queue.push_back(q);
        }
    }

    /// Takes a task out of the queue and forgets its lease.
    pub fn release(&mut self, task: &str) {
        self.queue.retain(|q| q.task != task);
        self.leases.remove(task);
        self.deferred.remove(task);
    }

    /// Reserves the oldest queued task this worker can run.
    pub fn pick(&mut self, worker: &str, now: Instant) -> Result<Option<Queued>, UnknownWorker> {
        let w = self.workers.get_mut(worker).ok_or(UnknownWorker)?;
        w.last_seen = now;
        let has_gpu = w.capabilities.gpus > 0;
        let deferred = &self.deferred;
        let pos = self.queue.iter().position(|q| {
            (has_gpu || !q.gpu_only) && deferred.get(&q.task).is_none_or(|d| d.until <= now)
        });
        Ok(pos.and_then(|p| self.queue.remove(p)))
    }

    /// Returns a reserved task to the head of the queue (its lease was not
    /// stored); it is offered again after its backoff.
    pub fn put_back(&mut self, q: Queued, now: Instant) {
        let d = self.deferred.entry(q.task.clone()).or_insert(Deferral {
            until: now,
            failures: 0,
        });
        d.failures += 1;
        let wait = self
            .backoff
            .saturating_mul(1 << (d.failures - 1).min(16))
            .min(MAX_BACKOFF);
        d.until = now + wait;
        self.queue.push_front(q);
    }

    /// When the next task now waiting out a backoff may be offered again.
    pub fn next_offer(&self, now: Instant) -> Option<Instant> {
        self.deferred
            .values()
            .map(|d| d.until)
            .filter(|&t| t > now)
            .min()
    }

    /// Holds `task`'s lease for `attempt` until the TTL runs out.
    pub fn lease(&mut self, task: &str, attempt: u32, now: Instant) {
        self.queue.retain(|q| q.task != task);
        self.deferred.remove(task);
        self.leases.insert(
            task.to_string(),
            Lease {
                attempt,
                deadline: now + self.lease_ttl,
            },
        );
    }

    /// Extends a lease; false when `attempt` does not hold it.
    pub fn renew(&mut self, task: &str, attempt: u32, now: Instant) -> bool {
        match self.leases.get_mut(task) {
            Some(l) if l.attempt == attempt => {
                l.deadline = now + self.lease_ttl;
                true
            }
            _ => false,
        }
    }

    /// Leases past their deadline, as (task, attempt). They stay held until
    /// the driver releases them, so an expiry that could not be stored is
    /// found again by the next sweep.
    pub fn expired(&self, now: Instant) -> Vec<(String, u32)> {
        let mut out: Vec<_> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline < now)
            .map(|(t, l)| (t.clone(), l.attempt))
            .collect();
        out.sort();
        out
    }

    /// Forgets workers not heard from for a while.
    pub fn forget_silent_workers(&mut self, now: Instant) {
        let silence = self.worker_silence;
        self.workers
            .retain(|_, w| now.saturating_duration_since(w.last_seen) < silence);
    }

    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    pub fn is_registered(&self, worker: &str) -> bool {
        self.workers.contains_key(worker)
    }

    pub fn is_leased(&self, task: &str) -> bool {
        self.leases.contains_key(task)
    }

    /// The queued task ids, oldest first.
    pub fn queued(&self) -> Vec<&str> {
        self.queue.iter().map(|q| q.task.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(task: &str, gpu_only: bool) -> Queued {
        Queued {
            task: task.into(),
            gpu_only,
        }
    }

    fn worker(gpus: u32) -> pb::WorkerCapabilities {
        pb::WorkerCapabilities {
            gpus,
            slots: 1,
            ..Default::default()
        }
    }

    fn scheduler() -> Scheduler {
        Scheduler::new(
            Duration::from_secs(4),
            Duration::from_secs(60),
            Duration::from_secs(1),
        )
    }

    #[test]
    fn tasks_go_oldest_first_and_gpu_tasks_only_to_gpu_workers() {
        let t0 = Instant::now();
        let mut s = scheduler();
        s.register("cpu", worker(0), t0);
        s.register("gpu", worker(1), t0);
        s.queue(q("r/gpu-task", true));
        s.queue(q("r/any-task", false));
        s.queue(q("r/any-task", false));
        assert_eq!(s.queue_depth(), 2, "a task is queued once");
        assert_eq!(s.pick("cpu", t0).unwrap(), Some(q("r/any-task", false)));
        assert_eq!(s.pick("cpu", t0).unwrap(), None, "the GPU task waits");
        assert_eq!(s.pick("gpu", t0).unwrap(), Some(q("r/gpu-task", true)));
        assert_eq!(s.pick("stranger", t0), Err(UnknownWorker));
    }

    #[test]
    fn a_task_whose_lease_was_not_stored_goes_back_to_the_head() {
        let t0 = Instant::now();
        let mut s = scheduler();
        s.register("w", worker(0), t0);
        s.queue(q("r/a", false));
        s.queue(q("r/b", false));
        let picked = s.pick("w", t0).unwrap().unwrap();
        assert_eq!(s.queued(), ["r/b"]);
        s.put_back(picked, t0);
        assert_eq!(s.queued(), ["r/a", "r/b"]);
        // It waits out its backoff while other tasks go first.
        assert_eq!(s.pick("w", t0).unwrap(), Some(q("r/b", false)));
        assert_eq!(s.pick("w", t0).unwrap(), None);
        assert_eq!(s.next_offer(t0), Some(t0 + Duration::from_secs(1)));
        let again = s.pick("w", t0 + Duration::from_secs(1)).unwrap().unwrap();
        assert_eq!(again, q("r/a", false));
        // A second failure doubles the wait; a stored lease clears it.
        let t1 = t0 + Duration::from_secs(1);
        s.put_back(again, t1);
        assert_eq!(s.next_offer(t1), Some(t1 + Duration::from_secs(2)));
        let a = s.pick("w", t1 + Duration::from_secs(2)).unwrap().unwrap();
        s.lease(&a.task, 1, t1);
        assert_eq!(s.next_offer(t1), None);
    }

    #[test]
    fn leases_expire_on_the_fake_clock_unless_renewed_by_their_attempt() {
        let t0 = Instant::now();
        let mut s = scheduler();
        s.lease("r/a", 1, t0);
        s.lease("r/b", 2, t0);
        assert!(s.expired(t0 + Duration::from_secs(3)).is_empty());
        assert!(s.renew("r/a", 1, t0 + Duration::from_secs(3)));
        assert!(
            !s.renew("r/b", 1, t0 + Duration::from_secs(3)),
            "a stale attempt"
        );
        let expired = s.expired(t0 + Duration::from_secs(5));
        assert_eq!(expired, [("r/b".to_string(), 2)]);
        // Expired leases stay until released, so a failed store write is retried.
        assert_eq!(s.expired(t0 + Duration::from_secs(5)).len(), 1);
        s.release("r/b");
        assert!(s.expired(t0 + Duration::from_secs(5)).is_empty());
        assert_eq!(
            s.expired(t0 + Duration::from_secs(8)).len(),
            1,
            "r/a, renewed at 3 s"
        );
    }

    #[test]
    fn silent_workers_are_forgotten_and_must_register_again() {
        let t0 = Instant::now();
        let mut s = scheduler();
        s.register("w", worker(0), t0);
        s.register("v", worker(0), t0);
        assert!(s.touch("v", t0 + Duration::from_secs(50)));
        s.forget_silent_workers(t0 + Duration::from_secs(61));
        assert_eq!(s.workers(), 1);
        assert!(!s.touch("w", t0 + Duration::from_secs(61)));
        assert_eq!(s.pick("w", t0), Err(UnknownWorker));
    }

    #[test]
    fn releasing_a_task_removes_it_from_the_queue_and_its_lease() {
        let t0 = Instant::now();
        let mut s = scheduler();
        s.queue(q("r/a", false));
        s.lease("r/b", 1, t0);
        s.release("r/a");
        s.release("r/b");
        assert_eq!((s.queue_depth(), s.is_leased("r/b")), (0, false));
    }
}
