//! A watcher: one WatchRun stream at a time, on the newest run no other
//! watcher has taken, followed to its end; then the next run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nt_proto::v1 as pb;
use nt_testkit::cluster::RunClient;

use super::record::{RunList, Tally};

/// A stream still open this long after it started counts as one that never
/// ended (the run is stuck or the stream lost its final event).
const STREAM_LIMIT: Duration = Duration::from_secs(600);

fn final_state(event: &pb::RunEvent) -> Option<pb::RunState> {
    match &event.event {
        Some(pb::run_event::Event::StateChanged(s)) => {
            pb::RunState::try_from(s.state).ok().filter(|s| {
                matches!(
                    s,
                    pb::RunState::Succeeded | pb::RunState::Failed | pb::RunState::Cancelled
                )
            })
        }
        _ => None,
    }
}

/// Watches runs until `stop` is set.
pub async fn watch_runs(
    mut client: RunClient,
    runs: Arc<RunList>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let Some(run_id) = runs.take_unwatched() else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let followed =
            tokio::time::timeout(STREAM_LIMIT, follow(&mut client, &run_id, &tally)).await;
        let (events, disordered, terminal) = followed.unwrap_or((0, 0, None));
        if terminal.is_none() {
            eprintln!("watch of {run_id} ended without the run's final state");
        }
        tally.watch_ended(events, disordered, terminal);
    }
}

/// Events received, events out of order, and whether the final state came
/// (`Some(true)` when it was `succeeded`).
async fn follow(client: &mut RunClient, run_id: &str, tally: &Tally) -> (u64, u64, Option<bool>) {
    let start = Instant::now();
    let opened = tally
        .timed(
            "WatchRun (open)",
            client.watch_run(pb::WatchRunRequest {
                run_id: run_id.into(),
                after_sequence: 0,
            }),
        )
        .await;
    let Ok(stream) = opened else {
        return (0, 0, None);
    };
    tally.watch_opened();
    let mut stream = stream.into_inner();
    let (mut events, mut disordered, mut last) = (0u64, 0u64, 0u64);
    let mut terminal = None;
    loop {
        match stream.message().await {
            Ok(Some(event)) => {
                if events == 0 {
                    tally.record("WatchRun (first event)", start.elapsed(), true);
                }
                events += 1;
                if event.sequence <= last {
                    disordered += 1;
                }
                last = event.sequence;
                if let Some(state) = final_state(&event) {
                    terminal = Some(state == pb::RunState::Succeeded);
                }
            }
            Ok(None) => break,
            Err(status) => {
                eprintln!("watch of {run_id} failed: {status:?}");
                tally.record("WatchRun (stream)", Duration::ZERO, false);
                break;
            }
        }
    }
    (events, disordered, terminal)
}
