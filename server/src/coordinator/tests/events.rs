//! A run's events in memory: what a finished run keeps, and what its
//! watchers get.

use crate::coordinator::service::lock;
use crate::coordinator::{RunApi, WorkerApi};
use nt_proto::v1 as pb;

use super::service::{leased, with_run};

#[tokio::test]
async fn a_finished_run_lets_go_of_its_live_channel_and_most_of_its_events() {
    let (c, _store, run_id, worker) = with_run().await;
    let task = leased(&c, &worker).await;
    for step in 0..400 {
        let report = pb::ReportProgressRequest {
            task_id: task.task_id.clone(),
            attempt: 1,
            progress: Some(pb::TaskProgress {
                step,
                ..Default::default()
            }),
            ..Default::default()
        };
        c.progress(&worker, report).await.unwrap();
    }
    let (_, live) = c.watch(&run_id, 0).await.unwrap();
    let mut live = live.expect("a live run");
    c.cancel(&run_id, "done").await.unwrap();
    let slot = c.slot(&run_id).unwrap();
    assert!(lock(&slot.tx).is_none(), "the sender is dropped");
    assert!(lock(&slot.events).len() <= 256);
    // A watcher subscribed before still gets the end, then the stream closes.
    let mut last = None;
    while let Ok(ev) = live.recv().await {
        last = Some(ev);
    }
    assert!(matches!(
        last.and_then(|e| e.event),
        Some(pb::run_event::Event::StateChanged(s)) if s.state == pb::RunState::Cancelled as i32
    ));
    // A late watcher gets the end from the history, and no live channel.
    let (past, live) = c.watch(&run_id, 0).await.unwrap();
    assert!(live.is_none());
    assert!(past.iter().any(|e| matches!(
        &e.event,
        Some(pb::run_event::Event::StateChanged(s)) if s.state == pb::RunState::Cancelled as i32
    )));
}
