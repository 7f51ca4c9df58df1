//! Following a run: its events as they happen, across reconnects (a
//! restarted coordinator, a dropped connection), until it ends.

use std::time::Duration;

use anyhow::{bail, Result};
use nt_proto::tonic::Code;
use nt_proto::v1 as pb;

use crate::RunClient;

fn is_final(state: i32) -> bool {
    matches!(
        pb::RunState::try_from(state),
        Ok(pb::RunState::Succeeded | pb::RunState::Failed | pb::RunState::Cancelled)
    )
}

/// Calls `on_event` for every event of the run, in order and once each,
/// until the run ends; returns the final run.
pub async fn follow(
    client: &mut RunClient,
    run_id: &str,
    mut on_event: impl FnMut(&pb::RunEvent),
) -> Result<pb::Run> {
    let mut after = 0u64;
    let mut failures = 0u32;
    loop {
        let stream = client
            .watch_run(pb::WatchRunRequest {
                run_id: run_id.to_string(),
                after_sequence: after,
            })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ) && failures < 120 =>
            {
                failures += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(s) => bail!("watching run {run_id}: {}", crate::explain(&s)),
        };
        loop {
            match stream.message().await {
                Ok(Some(ev)) => {
                    failures = 0;
                    if ev.sequence <= after {
                        continue;
                    }
                    after = ev.sequence;
                    on_event(&ev);
                }
                Ok(None) => break,
                Err(s) if s.code() == Code::DataLoss => break,
                Err(_) => {
                    failures += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            }
        }
        // The stream ended: done if the run is final, else watch again.
        match client
            .get_run(pb::GetRunRequest {
                run_id: run_id.to_string(),
            })
            .await
        {
            Ok(r) => {
                let run = r.into_inner();
                if is_final(run.state) {
                    return Ok(run);
                }
            }
            Err(s) if failures < 120 && matches!(s.code(), Code::Unavailable | Code::Unknown) => {
                failures += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) => bail!("reading run {run_id}: {}", crate::explain(&s)),
        }
    }
}
