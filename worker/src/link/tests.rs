use std::sync::atomic::AtomicU32;

use clap::Parser;

use nt_proto::tonic::Code;

use super::*;

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

/// A link to a coordinator that is never dialled: the tests' attempts
/// answer themselves.
fn link(patience: Patience) -> Link {
    let args =
        WorkerArgs::try_parse_from(["nt-worker", "--coordinator=http://127.0.0.1:9"]).unwrap();
    Link::new(
        connect(&args).unwrap(),
        pb::RegisterWorkerRequest::default(),
        patience,
    )
}

fn short() -> Patience {
    Patience {
        first_backoff: MS,
        max_backoff: 4 * MS,
        report_limit: 50 * MS,
    }
}

#[tokio::test]
async fn a_call_retries_transient_failures_and_stops_at_a_refusal() {
    let link = link(short());
    let tries = AtomicU32::new(0);
    let answer = link
        .call(Call::Complete, None, |_, _| {
            let n = tries.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 3 {
                    Err(Status::unavailable("restarting"))
                } else {
                    Ok(Response::new(n))
                }
            }
        })
        .await;
    assert_eq!(answer.unwrap(), 3);

    tries.store(0, Ordering::SeqCst);
    let answer: Result<(), _> = link
        .call(Call::Complete, None, |_, _| {
            tries.fetch_add(1, Ordering::SeqCst);
            async { Err(Status::failed_precondition("lease lost")) }
        })
        .await;
    assert!(
        matches!(&answer, Err(LinkError::Refused(s)) if s.code() == Code::FailedPrecondition),
        "{answer:?}"
    );
    assert_eq!(tries.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_stopping_worker_gives_up_a_report_the_coordinator_never_answers() {
    let link = link(short());
    link.begin_stopping();
    let started = Instant::now();
    let answer: Result<(), _> = link
        .call(Call::Complete, None, |_, _| std::future::pending())
        .await;
    assert!(
        matches!(answer, Err(LinkError::ReportLimit(_))),
        "{answer:?}"
    );
    assert!(started.elapsed() < 10 * SEC);
}

#[tokio::test]
async fn shutdown_ends_a_lease_at_once() {
    let link = link(Patience::default());
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let answer: Result<(), _> = link
        .call(Call::Lease, Some(&shutdown), |_, _| std::future::pending())
        .await;
    assert!(matches!(answer, Err(LinkError::Cancelled)), "{answer:?}");
}
