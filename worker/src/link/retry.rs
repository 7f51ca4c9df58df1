//! The retry decisions of the worker's calls, without clocks or I/O: how a
//! failure is read, how long to pause, when to give up.

use std::time::Duration;

use nt_proto::tonic::Code;

/// The calls a worker makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Register,
    Lease,
    Heartbeat,
    Progress,
    Complete,
    Fail,
}

impl Call {
    /// Attempts before giving up; `None`: until shutdown. A heartbeat or a
    /// progress report is tried once: the next one repeats it.
    fn attempts(self) -> Option<u32> {
        match self {
            Call::Register | Call::Lease => None,
            Call::Heartbeat | Call::Progress => Some(1),
            Call::Complete => Some(200),
            Call::Fail => Some(50),
        }
    }

    /// A task's last report, which a stopping worker gives up after
    /// [`Patience::report_limit`].
    fn is_last_report(self) -> bool {
        matches!(self, Call::Complete | Call::Fail)
    }
}

/// How a failed call is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The coordinator is away or busy: worth repeating.
    Transient,
    /// The coordinator does not know this worker (it restarted): register again.
    UnknownWorker,
    /// A final no (a bad token, a refused result).
    Refused,
}

/// How a failed `call` is read: `NOT_FOUND` from a lease means the worker
/// is unknown (elsewhere it names a missing object); a lease meets nothing
/// final, so the slot loop keeps leasing.
pub fn classify(call: Call, code: Code) -> Failure {
    match code {
        Code::NotFound if call == Call::Lease => Failure::UnknownWorker,
        Code::Unavailable
        | Code::Unknown
        | Code::DeadlineExceeded
        | Code::Internal
        | Code::Cancelled => Failure::Transient,
        _ if call == Call::Lease => Failure::Transient,
        _ => Failure::Refused,
    }
}

/// Pauses between attempts and the last-report limit.
#[derive(Clone, Copy, Debug)]
pub struct Patience {
    /// The first pause; each next one doubles, up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// How long a stopping worker keeps trying a task's last report. Past
    /// it the lease expires at the coordinator and the task is retried from
    /// its last epoch checkpoint, as for a killed worker.
    pub report_limit: Duration,
}

impl Default for Patience {
    fn default() -> Self {
        Patience {
            first_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            report_limit: Duration::from_secs(30),
        }
    }
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    RetryAfter(Duration),
    /// Register again, then retry at once.
    Reregister,
    GiveUp(GiveUp),
}

/// Why a call gave up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveUp {
    Refused,
    /// Its attempts ran out.
    Exhausted,
    /// The worker is stopping and the report took too long.
    ReportLimit,
}

/// The retry decisions of one call, without clocks: the caller says how
/// long the call has been going on and whether the worker is stopping.
#[derive(Debug)]
pub struct Retry {
    call: Call,
    patience: Patience,
    failures: u32,
    backoff: Duration,
}

impl Retry {
    pub fn new(call: Call, patience: Patience) -> Self {
        Retry {
            call,
            patience,
            failures: 0,
            backoff: patience.first_backoff,
        }
    }

    /// Before an attempt, `elapsed` after the first began: how long it may
    /// take (`None`: as long as it takes), or why not to make it.
    pub fn before_attempt(
        &self,
        elapsed: Duration,
        stopping: bool,
    ) -> Result<Option<Duration>, GiveUp> {
        if !(stopping && self.call.is_last_report()) {
            return Ok(None);
        }
        match self.patience.report_limit.checked_sub(elapsed) {
            Some(left) if !left.is_zero() => Ok(Some(left)),
            _ => Err(GiveUp::ReportLimit),
        }
    }

    /// After an attempt failed with `code`.
    pub fn after_failure(&mut self, code: Code) -> Next {
        self.failures += 1;
        match classify(self.call, code) {
            Failure::Refused => Next::GiveUp(GiveUp::Refused),
            Failure::UnknownWorker => Next::Reregister,
            Failure::Transient => {
                if self.call.attempts().is_some_and(|n| self.failures >= n) {
                    return Next::GiveUp(GiveUp::Exhausted);
                }
                let pause = self.backoff;
                self.backoff = (self.backoff * 2).min(self.patience.max_backoff);
                Next::RetryAfter(pause)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn only_a_lease_reads_not_found_as_a_forgotten_worker_and_it_never_gives_up() {
        assert_eq!(
            classify(Call::Lease, Code::NotFound),
            Failure::UnknownWorker
        );
        // Completing names a missing result checkpoint with NOT_FOUND: final.
        assert_eq!(classify(Call::Complete, Code::NotFound), Failure::Refused);
        assert_eq!(
            classify(Call::Lease, Code::PermissionDenied),
            Failure::Transient
        );
        for code in [
            Code::Unavailable,
            Code::Unknown,
            Code::DeadlineExceeded,
            Code::Internal,
            Code::Cancelled,
        ] {
            for call in [Call::Register, Call::Heartbeat, Call::Complete, Call::Fail] {
                assert_eq!(
                    classify(call, code),
                    Failure::Transient,
                    "{call:?} {code:?}"
                );
            }
        }
        for code in [
            Code::Unauthenticated,
            Code::FailedPrecondition,
            Code::InvalidArgument,
        ] {
            for call in [Call::Register, Call::Progress, Call::Complete, Call::Fail] {
                assert_eq!(classify(call, code), Failure::Refused, "{call:?} {code:?}");
            }
        }
        let mut lease = Retry::new(Call::Lease, Patience::default());
        assert_eq!(lease.after_failure(Code::NotFound), Next::Reregister);
    }

    #[test]
    fn pauses_double_up_to_the_cap_and_attempts_run_out_per_call() {
        let mut complete = Retry::new(Call::Complete, Patience::default());
        let pauses: Vec<Next> = (0..7)
            .map(|_| complete.after_failure(Code::Unavailable))
            .collect();
        let ms = |n| Next::RetryAfter(Duration::from_millis(n));
        assert_eq!(
            pauses,
            [
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                ms(3200),
                ms(5000),
                ms(5000)
            ]
        );
        let failures_until_given_up = |call| {
            let mut retry = Retry::new(call, Patience::default());
            (1..=10_000)
                .find(|_| retry.after_failure(Code::Unavailable) == Next::GiveUp(GiveUp::Exhausted))
        };
        assert_eq!(failures_until_given_up(Call::Complete), Some(200));
        assert_eq!(failures_until_given_up(Call::Fail), Some(50));
        assert_eq!(failures_until_given_up(Call::Heartbeat), Some(1));
        assert_eq!(failures_until_given_up(Call::Progress), Some(1));
        assert_eq!(failures_until_given_up(Call::Register), None);
        assert_eq!(failures_until_given_up(Call::Lease), None);
        let mut register = Retry::new(Call::Register, Patience::default());
        assert_eq!(
            register.after_failure(Code::Unauthenticated),
            Next::GiveUp(GiveUp::Refused)
        );
    }

    #[test]
    fn a_stopping_worker_bounds_only_last_reports() {
        let retry = |call| Retry::new(call, Patience::default());
        // Running: no bound on anything.
        assert_eq!(
            retry(Call::Complete).before_attempt(100 * SEC, false),
            Ok(None)
        );
        // Stopping: a last report gets what is left of 30 s, then gives up.
        assert_eq!(
            retry(Call::Complete).before_attempt(10 * SEC, true),
            Ok(Some(20 * SEC))
        );
        assert_eq!(
            retry(Call::Fail).before_attempt(30 * SEC, true),
            Err(GiveUp::ReportLimit)
        );
        assert_eq!(
            retry(Call::Heartbeat).before_attempt(100 * SEC, true),
            Ok(None)
        );
    }
}
