//! One coordinator per store: a second is refused while the first renews,
//! takes over from one that went silent, and fences the late writes of the
//! one it replaced.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nt_common::{layout, Storage};
use tokio_util::sync::CancellationToken;

use super::spec;
use crate::coordinator::lease::StoreLease;
use crate::coordinator::{Coordinator, CoordinatorConfig, RunApi};
use crate::error::CoordinatorError;
use crate::metrics::Metrics;

const TTL: Duration = Duration::from_millis(600);

fn config() -> CoordinatorConfig {
    CoordinatorConfig {
        sweep_interval: Duration::from_secs(3600),
        store_lease_ttl: TTL,
        ..CoordinatorConfig::default()
    }
}

async fn start(storage: &Storage) -> Result<Arc<Coordinator>, String> {
    Coordinator::start(
        storage.clone(),
        config(),
        Metrics::new(),
        CancellationToken::new(),
    )
    .await
    .map_err(|e| e.to_string())
}

fn memory_store() -> Storage {
    Storage::open(&nt_common::storage::StorageArgs {
        url: "memory://".into(),
        ..nt_common::storage::StorageArgs::local(std::path::Path::new("."))
    })
    .unwrap()
}

#[tokio::test]
async fn a_second_coordinator_is_refused_while_the_first_renews_its_lease() {
    let storage = memory_store();
    let first = start(&storage).await.unwrap();
    let holder = first.store.lease().holder().to_string();
    let Err(e) = start(&storage).await else {
        panic!("a second coordinator started on a held store");
    };
    assert!(
        e.contains(&holder) && e.contains("only one coordinator may use a store"),
        "{e}"
    );
    // The first is untouched and still writes.
    first
        .submit(spec("members: {count: 2}\n"), String::new())
        .await
        .unwrap();
    assert!(first.lease_lost().is_none());
}

#[tokio::test]
async fn a_released_lease_is_taken_at_once_with_the_next_epoch() {
    let storage = memory_store();
    let first = start(&storage).await.unwrap();
    let (run, _) = first
        .submit(spec("members: {count: 2}\n"), String::new())
        .await
        .unwrap();
    first.close().await;
    let began = Instant::now();
    let second = start(&storage).await.unwrap();
    assert!(began.elapsed() < TTL, "waited {:?}", began.elapsed());
    assert_eq!(
        second.store.lease().epoch(),
        first.store.lease().epoch() + 1
    );
    assert_eq!(second.get(&run.run_id).await.unwrap().run_id, run.run_id);
    // The closed one writes nothing more.
    let e = first.cancel(&run.run_id, "late").await.unwrap_err();
    assert!(matches!(e, CoordinatorError::Unavailable(_)), "{e}");
}

#[tokio::test]
async fn a_silent_holder_is_taken_over_and_its_late_writes_are_fenced() {
    let storage = memory_store();
    // The first holder stops renewing without releasing: a frozen or
    // crashed coordinator.
    let frozen_stop = CancellationToken::new();
    let frozen = StoreLease::acquire(storage.clone(), "frozen".into(), TTL, frozen_stop.clone())
        .await
        .unwrap();
    frozen_stop.cancel();
    let began = Instant::now();
    let second = start(&storage).await.unwrap();
    assert!(
        began.elapsed() >= TTL,
        "took over after {:?}",
        began.elapsed()
    );
    assert_eq!(second.store.lease().epoch(), frozen.epoch() + 1);
    // The frozen one, waking up, may not write: its time is over, and its
    // next renewal finds the lease taken.
    assert!(frozen.check().is_err());
    assert!(!frozen.renew_once().await.unwrap());

    // A write it sent before freezing lands late, over the new holder's
    // document: the new holder writes over it (a lower epoch), no conflict.
    let (run, _) = second
        .submit(spec("members: {count: 2}\n"), String::new())
        .await
        .unwrap();
    let key = layout::run_doc(&run.run_id);
    let (bytes, _) = storage.get(&key).await.unwrap().unwrap();
    let mut late: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    late["writer"] = "frozen".into();
    late["epoch"] = frozen.epoch().into();
    late["message"] = "written late".into();
    storage
        .put(&key, Bytes::from(serde_json::to_vec(&late).unwrap()))
        .await
        .unwrap();
    second.cancel(&run.run_id, "fenced").await.unwrap();
    let (bytes, _) = storage.get(&key).await.unwrap().unwrap();
    let stored: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(stored["writer"], second.store.lease().holder());
    assert_eq!(stored["state"], "RUN_STATE_CANCELLED");
    assert!(second.lease_lost().is_none());
}

#[tokio::test]
async fn a_coordinator_that_meets_a_later_epoch_stops_writing() {
    let storage = memory_store();
    let c = start(&storage).await.unwrap();
    let (run, _) = c
        .submit(spec("members: {count: 2}\n"), String::new())
        .await
        .unwrap();
    // Another coordinator, with a later epoch, wrote the run.
    let key = layout::run_doc(&run.run_id);
    let (bytes, _) = storage.get(&key).await.unwrap().unwrap();
    let mut theirs: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    theirs["writer"] = "usurper".into();
    // As documents spell a 64-bit number: a string.
    theirs["epoch"] = (c.store.lease().epoch() + 5).to_string().into();
    storage
        .put(&key, Bytes::from(serde_json::to_vec(&theirs).unwrap()))
        .await
        .unwrap();
    let e = c.cancel(&run.run_id, "mine?").await.unwrap_err();
    assert!(
        matches!(&e, CoordinatorError::Unavailable(m) if m.contains("usurper")),
        "{e}"
    );
    assert!(c.lease_lost().unwrap().contains("usurper"));
    // Nothing more is written, the usurper's document stays.
    let e = c
        .submit(spec("members: {count: 2}\n"), String::new())
        .await
        .unwrap_err();
    assert!(matches!(e, CoordinatorError::Unavailable(_)), "{e}");
    let (bytes, _) = storage.get(&key).await.unwrap().unwrap();
    let stored: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(stored["writer"], "usurper");
}

#[tokio::test]
async fn writes_stop_when_the_store_has_not_confirmed_the_lease_in_time() {
    let storage = memory_store();
    let stop = CancellationToken::new();
    let lease = StoreLease::acquire(storage.clone(), "slow".into(), TTL, stop.clone())
        .await
        .unwrap();
    assert_eq!(lease.check().unwrap(), 1);
    // No renewals (as when the store does not answer): a time to live later,
    // writes are refused; a renewal that gets through allows them again.
    stop.cancel();
    tokio::time::sleep(TTL + Duration::from_millis(50)).await;
    let e = lease.check().unwrap_err();
    assert!(e.to_string().contains("not confirmed"), "{e}");
    assert!(lease.renew_once().await.unwrap());
    assert_eq!(lease.check().unwrap(), 1);
}

#[tokio::test]
async fn on_a_local_folder_a_second_coordinator_is_refused_too() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(&nt_common::storage::StorageArgs::local(dir.path())).unwrap();
    assert!(!storage.conditional_updates);
    let first = start(&storage).await.unwrap();
    let Err(e) = start(&storage).await else {
        panic!("a second coordinator started on a held folder");
    };
    assert!(e.contains("only one coordinator may use a store"), "{e}");
    // Renewals go on, and a clean close lets the next one in at once.
    tokio::time::sleep(TTL).await;
    assert!(first.lease_lost().is_none());
    first.close().await;
    start(&storage).await.unwrap();
}
